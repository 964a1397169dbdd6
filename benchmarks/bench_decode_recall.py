"""Recall of LoRANN-backed decoding against exact top-k as the context grows, with and without refit.

A model (a train-toy run with ``--run``, else a freshly initialised train-toy-sized MLA model)
decodes long MQAR-style sequences token by token.  Each layer's :class:`LorannSelector`
builds its index over the prompt's latents (trained on the prefill's absorbed queries),
then grows it with ``add`` every step; with ``refit_factor`` it is rebuilt (re-clustered,
retrained on every query so far) whenever it has doubled.  Per step the selection is
compared with exact top-k; the table gives the recall per context-length bucket.

    python benchmarks/bench_decode_recall.py --length 1024 --json recall.json   # and recall.png
    python benchmarks/bench_decode_recall.py --run runs/forgetful/mqar_k8_f0_s0_n1000

Set OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1 on a small shared machine.
"""
import argparse
import sys
import time

import numpy as np
import plotting
from bench_args import positive_int

from topkattn.decoding import LorannSelector, decode_teacher_forced
from topkattn.model import Transformer
from topkattn.storage import atomic_write_json
from topkattn.training.runs import load_run
from topkattn.training.tasks import MQAR
from topkattn.training.train import TrainConfig, model_config


class StepRecall:
    """Wraps a selector; records (context length, hits, wanted) of every decode step."""

    def __init__(self, inner):
        self.inner = inner
        self.steps = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, query, cache, **kw):
        h0, w0 = self.inner.stats.hits, self.inner.stats.wanted
        idx = self.inner(query, cache, **kw)
        if not self.inner.prefilling:
            self.steps.append((cache.keys.shape[1], self.inner.stats.hits - h0, self.inner.stats.wanted - w0))
        return idx


def buckets(length, prompt):
    edges = [prompt]
    while edges[-1] * 2 < length:
        edges.append(edges[-1] * 2)
    edges.append(length + 1)
    return list(zip(edges[:-1], edges[1:]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default=None, help="train-toy run folder (default: a fresh model)")
    ap.add_argument("--length", type=positive_int, default=1024, help="tokens per sequence")
    ap.add_argument("--prompt", type=positive_int, default=64, help="prefill tokens (index built over them)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--clusters-to-search", type=float, default=0.25)
    ap.add_argument("--rerank", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", dest="json_path", default=None)
    ap.add_argument("--png", default=None, help="recall vs context chart [default: the --json path with .png]")
    args = ap.parse_args(argv)
    if args.prompt >= args.length:
        ap.error(f"--prompt must be below --length ({args.length}): at least one token is decoded, got {args.prompt}")
    def log(msg):
        return print(msg, file=sys.stderr, flush=True)

    if args.run:
        cfg, model = load_run(args.run)
        vocab = cfg.vocab_size
        source = args.run
    else:
        cfg = TrainConfig(k=args.k, seed=args.seed)
        vocab = cfg.vocab_size
        model = Transformer(model_config(cfg, vocab))
        source = "fresh train-toy-sized model (untrained)"
    pairs = min(vocab // 2 - 1, (args.length + 1) // 4)
    x, _ = MQAR(vocab_size=vocab, seq_len=args.length, num_kv_pairs=pairs).batch(args.seed, args.batch)
    configs = {"refit x2": 2.0, "no refit": None}
    out = {}
    for name, factor in configs.items():
        sels = [StepRecall(LorannSelector(clusters_to_search=args.clusters_to_search,
                                          points_to_rerank=args.rerank, refit_factor=factor, seed=args.seed))
                for _ in model.blocks]
        t0 = time.perf_counter()
        decode_teacher_forced(model, x, selectors=sels, prompt_len=args.prompt, topk=args.k)
        secs = time.perf_counter() - t0
        steps = np.array([s for sel in sels for s in sel.steps])  # (n, 3): S, hits, wanted
        rows = []
        for lo, hi in buckets(args.length, args.prompt):
            m = (steps[:, 0] >= lo) & (steps[:, 0] < hi)
            recall = float(steps[m, 1].sum() / max(1, steps[m, 2].sum()))
            rows.append({"from": int(lo), "to": int(hi - 1), "recall": recall})
        out[name] = {"buckets": rows, "seconds": secs, "builds": int(sum(s.builds for s in sels)),
                     "recall": float(steps[:, 1].sum() / max(1, steps[:, 2].sum()))}
        log(f"{name}: recall {out[name]['recall']:.4f}, {out[name]['builds']} builds, {secs:.1f} s")

    print(f"LoRANN decode recall vs exact top-{args.k}: {source}; {args.batch} sequences x {args.length} tokens, "
          f"prompt {args.prompt}, clusters ~sqrt(N), probe {args.clusters_to_search:g}, rerank {args.rerank}")
    names = list(out)
    print(f"{'context':>12}" + "".join(f" | {n:>10}" for n in names))
    print("-" * (12 + 13 * len(names)))
    for i, b in enumerate(out[names[0]]["buckets"]):
        print(f"{b['from']:>5}-{b['to']:<6}" + "".join(f" | {out[n]['buckets'][i]['recall']:>10.4f}" for n in names))
    print(f"{'all':>12}" + "".join(f" | {out[n]['recall']:>10.4f}" for n in names))
    print(f"{'builds':>12}" + "".join(f" | {out[n]['builds']:>10d}" for n in names))
    print(f"{'seconds':>12}" + "".join(f" | {out[n]['seconds']:>10.1f}" for n in names))
    charts = [plotting.chart(f"LoRANN decode recall vs exact top-{args.k}", "context length (bucket start)",
                             "recall", [plotting.series(n, [b["from"] for b in out[n]["buckets"]],
                                                        [b["recall"] for b in out[n]["buckets"]]) for n in names],
                             xscale="log")]
    if args.json_path:
        atomic_write_json(args.json_path, {"benchmark": "decode_recall", "source": source, "length": args.length,
                                           "prompt": args.prompt, "batch": args.batch, "k": args.k,
                                           "clusters_to_search": args.clusters_to_search,
                                           "rerank": args.rerank, "results": out, "plots": charts}, prefix=".bench-")
        log(f"wrote {args.json_path}")
    plotting.save_png(charts, plotting.png_path(args.png, args.json_path),
                      title=f"{source}: {args.batch} x {args.length} tokens, prompt {args.prompt}")
    return out


if __name__ == "__main__":
    main()
