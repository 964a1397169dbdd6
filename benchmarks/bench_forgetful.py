"""The forgetful-masking experiment: does training with forgetful top-k make a model robust to
an ANN index's missed keys at decode time?

Trains MQAR models with ``train-toy``'s library function (:func:`topkattn.training.train.train`) at
the same seed and budget -- one with forget rate 0, one (or more) with forgetting -- then
decodes each held-out set token by token with

  exact                  exact top-k
  simulated r            each exact top-k key dropped with probability 1 - r, refilled from
                         the next-ranked keys (recall r = 0.9, 0.8, 0.7)
  lorann A / lorann B    a LoRANN index per sequence over the MLA latent cache, two settings

and prints accuracy (and the measured recall of the selection against exact top-k) per
model.  The claim under test: the forgetful model loses less accuracy as recall drops.

Runs are cached: a folder under ``--runs`` whose ``metrics.json`` holds the same config is
reused, so the table can be re-made without retraining.

    python benchmarks/bench_forgetful.py --json forgetful.json      # and forgetful.png
    python benchmarks/bench_forgetful.py --forget-rates 0,0.15,0.3 --steps 1000 --n-sequences 256

Set OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1 on a small shared machine: thread pools
there cost more than they bring for these tiny matrices.
"""
import argparse
import json
import os
import sys
import time

import plotting
from bench_args import rate_list

from topkattn.decoding.runner import evaluate_decoding, selector_factory
from topkattn.storage import atomic_write_json
from topkattn.training.runs import load_run
from topkattn.training.train import TrainConfig, heldout_set, make_task, train

LORANN_SETTINGS = {
    # about sqrt(N) clusters per index; probe a quarter of them, approximate scores only
    "lorann A": dict(n_clusters=None, clusters_to_search=0.25, points_to_rerank=0, rank=16),
    # probe half of them and re-rank 16 candidates exactly
    "lorann B": dict(n_clusters=None, clusters_to_search=0.5, points_to_rerank=16, rank=16),
}
SIM_RECALLS = (0.9, 0.8, 0.7)


def get_run(runs_dir, cfg, log):
    """Train (or reuse) the run of ``cfg``; returns its folder."""
    name = (f"mqar_k{cfg.k}_f{cfg.forget_rate:g}_s{cfg.seed}_n{cfg.steps}_p{cfg.num_kv_pairs}"
            f"{'_ts' if cfg.token_shift else ''}")
    out = os.path.join(runs_dir, name)
    metrics = os.path.join(out, "metrics.json")
    if os.path.exists(metrics):
        with open(metrics) as f:
            m = json.load(f)
        if m.get("config") == cfg.to_dict():
            log(f"reusing {out} (held-out accuracy {m.get('accuracy'):.4f})")
            return out, m
    resume = os.path.exists(os.path.join(out, "checkpoint.npz"))
    log(f"training {out} (forget_rate={cfg.forget_rate}, {cfg.steps} steps{', resuming' if resume else ''})")
    t0 = time.perf_counter()

    def progress(step, loss, lr, tps):
        if step % 100 == 0:
            log(f"  step {step}/{cfg.steps} loss {loss:.4f} ({time.perf_counter() - t0:.0f} s)")

    res = train(cfg, out_dir=out, resume=resume, checkpoint_every=50, progress=progress)
    return out, res.metrics


def evaluate_run(run_dir, settings, n_sequences, batch_size, seed, log):
    cfg, model = load_run(run_dir)
    x, y = heldout_set(make_task(cfg), cfg)
    x, y = x[:n_sequences], y[:n_sequences]
    prompt = 2 * cfg.num_kv_pairs
    rows = {}
    for name, (retriever, kw) in settings.items():
        make = selector_factory(retriever, len(model.blocks), seed=seed, **kw)
        r = evaluate_decoding(model, x, y, make_selectors=make, prompt_len=prompt, topk=cfg.k,
                              batch_size=batch_size)
        rows[name] = {k: r[k] for k in ("accuracy", "recall", "recall_by_rank", "mean_k", "seconds", "n_scored")}
        log(f"  {os.path.basename(run_dir)} {name:<14} accuracy {r['accuracy']:.4f} recall {r['recall']:.4f} "
            f"({r['seconds']:.0f} s)")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--forget-rates", type=rate_list, default="0,0.15",
                    help="comma-separated; the first is the baseline")
    ap.add_argument("--steps", type=int, default=None, help="default: train-toy's default budget")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-sequences", type=int, default=256, help="held-out sequences decoded per setting")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--runs", default="runs/forgetful", help="folder of the cached training runs")
    ap.add_argument("--json", dest="json_path", default=None, help="write the table and settings here")
    ap.add_argument("--png", default=None, help="accuracy vs recall chart [default: the --json path with .png]")
    args = ap.parse_args(argv)
    rates = args.forget_rates
    def log(msg):
        return print(msg, file=sys.stderr, flush=True)

    settings = {"exact": ("exact", {})}
    for r in SIM_RECALLS:
        settings[f"simulated {r:g}"] = ("simulated", {"recall": r})
    for name, kw in LORANN_SETTINGS.items():
        settings[name] = ("lorann", kw)

    results = {}
    for rate in rates:
        extra = {} if args.steps is None else {"steps": args.steps}
        cfg = TrainConfig(task="mqar", k=args.k, forget_rate=rate, seed=args.seed, **extra)
        run_dir, metrics = get_run(args.runs, cfg, log)
        rows = evaluate_run(run_dir, settings, args.n_sequences, args.batch_size, args.seed, log)
        results[f"{rate:g}"] = {"run": run_dir, "train_accuracy": metrics.get("accuracy"), "rows": rows}

    # table: one line per decode setting; per model accuracy, drop from its exact accuracy, recall
    heads = [f"forget {r}" for r in results]
    print(f"MQAR (seq {cfg.seq_len}, {cfg.num_kv_pairs} pairs, token shift {cfg.token_shift}), k={args.k}, "
          f"{cfg.steps} steps, seed {args.seed}, {args.n_sequences} held-out sequences decoded token by token")
    line = f"{'decode':<14}" + "".join(f" | {h:>28}" for h in heads)
    print(line)
    print(f"{'':<14}" + "".join(f" | {'acc':>8} {'drop':>8} {'recall':>9}" for _ in heads))
    print("-" * len(line))
    for name in settings:
        cells = []
        for rate, res in results.items():
            row = res["rows"][name]
            drop = res["rows"]["exact"]["accuracy"] - row["accuracy"]
            cells.append(f" | {row['accuracy']:>8.4f} {drop:>+8.4f} {row['recall']:>9.4f}")
        print(f"{name:<14}" + "".join(cells))
    charts = forgetful_charts(results, list(settings))
    if args.json_path:
        doc = {"benchmark": "forgetful", "k": args.k, "train_config": cfg.to_dict(), "seed": args.seed,
               "n_sequences": args.n_sequences,
               "settings": {n: {"retriever": r, **kw} for n, (r, kw) in settings.items()},
               "results": results, "plots": charts}
        atomic_write_json(args.json_path, doc, prefix=".bench-")
        log(f"wrote {args.json_path}")
    plotting.save_png(charts, plotting.png_path(args.png, args.json_path),
                      title=f"MQAR k={args.k}, {cfg.steps} steps, {args.n_sequences} held-out sequences")
    return results


def forgetful_charts(results, names):
    """Held-out accuracy against the measured recall of each decode setting (one line per forget
    rate, sorted by recall), and the accuracy per decode setting."""
    by_recall, by_setting = [], []
    for rate, res in results.items():
        rows = sorted(res["rows"].values(), key=lambda r: r["recall"])
        by_recall.append(plotting.series(f"forget {rate}", [r["recall"] for r in rows], [r["accuracy"] for r in rows]))
        by_setting.append(plotting.series(f"forget {rate}", names, [res["rows"][n]["accuracy"] for n in names]))
    return [plotting.chart("accuracy vs the selection's recall", "measured recall vs exact top-k",
                           "held-out accuracy", by_recall),
            plotting.chart("accuracy per decode setting", "decode setting", "held-out accuracy", by_setting,
                           kind="bar")]


if __name__ == "__main__":
    main()
