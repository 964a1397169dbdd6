"""Decode step time and cache bytes per token: MLA (absorbed weights, latent cache) vs plain
MHA with a full KV cache.

Default sizes follow issue 3: H=16 heads, head dim 64, MLA latent C=256 and rope R=32,
d_model=1024, contexts 4k/16k/64k, batch 1, float32.  The cache is pre-filled with random
rows (attention cost does not depend on the values) and one token is decoded on top; each
step is timed and the cache rewound (MLA and MHA steps alternate), so every timed step sees
exactly ``context`` cached tokens; the table shows the best of ``--reps`` steps (the JSON
also keeps the median).  Runs dense attention (topk=None) and top-k attention (``--topk``).  BLAS runs on
``--threads`` threads (default 1: OpenBLAS threads fighting over busy cores made single
matrix products 20x slower in our runs).

    python benchmarks/bench_mla_decode.py [--contexts 4096 16384 65536] [--reps 5] [--json PATH] [--png PATH]
    python benchmarks/bench_mla_decode.py --device cupy   # on a GPU

Roofline (top-k rows, NumPy): per step, the bytes read (the weights the step multiplies, once;
the cached keys the exact selection scores, once) and the FLOPs (2 per multiply-add), against
this machine's rates measured in the same run: one pass over the MHA cache (the read
bandwidth), one pass over the MHA weights (the weights' bandwidth), and the fused selection kernel's
per-thread rate on an in-cache block times the worker threads.  The bound is
weights / their bandwidth + max(cache bytes / read bandwidth, selection FLOPs / compute rate).
MLA selection does 2 H (C + R) = 9216 FLOPs per 1152-byte token (8 FLOP/B), MHA 2 H D = 2048
per 4096-byte token (0.5 FLOP/B): MLA wins on a machine whose compute rate is above
9216 / 4096 = 2.25x its bandwidth in bytes/s.  The h200 columns give the same bound with an
H200's rates (4.8 TB/s HBM3e, 67 TFLOP/s FP32 FMA; launch latencies left out).

With ``--json`` (or ``--png``) the charts (step time and its roofline bound, cache size, against
the context) are stored in the JSON under ``"plots"`` and drawn to a PNG (benchmarks/plotting.py).
"""
import argparse
import os
import time

if __name__ == "__main__":  # BLAS threads must be fixed before NumPy loads (see --threads)
    from blas_env import threads_from_argv

    threads_from_argv()

import numpy as np
import plotting
from bench_args import positive_int

from topkattn.layers import MLA, Attention


def fill(cache, n, rng, xp):
    """Pre-fill a cache with n random token rows (capacity n + 1 so a step never reallocates)."""
    bufs = [cache.buf] if hasattr(cache, "buf") else [cache.kbuf, cache.vbuf]
    for buf in bufs:
        shape = list(buf.data.shape)
        shape[buf.axis] = n + buf.n + 1
        data = xp.zeros(tuple(shape), dtype=buf.data.dtype)
        sl = [slice(None)] * len(shape)
        sl[buf.axis] = slice(0, buf.n + n)
        data[tuple(sl)] = xp.asarray(rng.standard_normal(data[tuple(sl)].shape).astype(buf.data.dtype))
        buf.data, buf.n = data, buf.n + n
    return bufs


def time_interleaved(runs, x_t, reps, sync):
    """Best and median step seconds of each (layer, cache, bufs) run, the runs alternating so
    that load from other processes hits them alike."""
    times = [[] for _ in runs]
    for rep in range(reps + 1):  # the first round warms up
        for i, (layer, cache, bufs) in enumerate(runs):
            n0 = [b.n for b in bufs]
            t0 = time.perf_counter()
            layer.step(x_t, cache)
            sync()
            dt = time.perf_counter() - t0
            for b, n in zip(bufs, n0):  # rewind: every step sees the same context
                b.n = n
            if rep:
                times[i].append(dt)
    return [(float(np.min(t)), float(np.median(t))) for t in times]


H200_BYTES_PER_S = 4.8e12  # HBM3e
H200_FLOPS = 67e12  # FP32 FMA, no tensor cores


def _seconds(fn, reps=5):
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def roofline(mla, mha, runs, S, args):
    """Bytes, FLOPs and the bound of one top-k step of each layer, with this machine's measured rates."""
    from bench_exact_decode import panel_gflops

    from topkattn.threads import n_workers

    B, H = args.batch, args.heads
    mla_cache, mha_cache = runs[0][1], runs[1][1]
    w = mla_cache.weights  # what the MLA step multiplies: the decode factors, not W_QK / W_OV
    mla_w = [w[n] for n in ("W_DQ", "W_UQ", "W_UKh", "W_QR", "W_DKV", "W_KR", "W_UVh", "W_O")]
    mha_w = [mha.params[n] for n in ("W_Q", "W_K", "W_V", "W_O")]
    keys_mla, keys_mha = mla_cache.keys, mha_cache.keys  # (B, S, C + R), (B, G, S, D)
    out = {"mla_weight_bytes": sum(a.nbytes for a in mla_w), "mha_weight_bytes": sum(a.nbytes for a in mha_w),
           "mla_cache_bytes": keys_mla.nbytes, "mha_cache_bytes": keys_mha.nbytes}
    out["mla_bytes"] = out["mla_weight_bytes"] + out["mla_cache_bytes"]
    out["mha_bytes"] = out["mha_weight_bytes"] + out["mha_cache_bytes"]
    mla_sel = 2 * B * H * keys_mla.shape[-1] * S
    mha_sel = 2 * B * H * keys_mha.shape[-1] * S
    out["mla_gflop"] = (mla_sel + 2 * B * sum(a.size for a in mla_w)) / 1e9
    out["mha_gflop"] = (mha_sel + 2 * B * sum(a.size for a in mha_w)) / 1e9
    read_s = _seconds(lambda: np.add.reduce(keys_mha, axis=None))
    out["read_GBps"] = keys_mha.nbytes / read_s / 1e9
    wread_s = _seconds(lambda: [np.add.reduce(a, axis=None) for a in mha_w])  # weights: one pass each
    out["weights_GBps"] = out["mha_weight_bytes"] / wread_s / 1e9
    out["compute_GFLOPps"] = panel_gflops(H, keys_mla.shape[-1]) * n_workers()
    bw, bw_w, fl = out["read_GBps"] * 1e9, out["weights_GBps"] * 1e9, out["compute_GFLOPps"] * 1e9
    out["mla_roof_ms"] = 1e3 * (out["mla_weight_bytes"] / bw_w + max(out["mla_cache_bytes"] / bw, mla_sel / fl))
    out["mha_roof_ms"] = 1e3 * (out["mha_weight_bytes"] / bw_w + max(out["mha_cache_bytes"] / bw, mha_sel / fl))
    for name in ("mla", "mha"):
        out[f"h200_{name}_us"] = 1e6 * max(out[f"{name}_bytes"] / H200_BYTES_PER_S,
                                           out[f"{name}_gflop"] * 1e9 / H200_FLOPS)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", type=positive_int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--latent", type=int, default=256, help="C, the MLA kv_lora_rank")
    ap.add_argument("--rope", type=int, default=32, help="R, the MLA rope dim")
    ap.add_argument("--q-lora", type=int, default=512)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--topk", type=int, default=64, help="top-k for the sparse rows (0: dense only)")
    ap.add_argument("--reps", type=positive_int, default=15)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", choices=["numpy", "cupy"], default="numpy")
    ap.add_argument("--threads", default="1", help="BLAS threads (default 1: stable timings on a shared machine)")
    ap.add_argument("--json", default=None, help="write the results to this path")
    ap.add_argument("--png", metavar="PATH", help="step time and cache charts [default: the --json path with .png]")
    ap.add_argument("--no-roofline", action="store_true", help="skip the rate measurements and the bound")
    args = ap.parse_args(argv)

    if args.device == "cupy":
        from topkattn.backend import require_cupy
        xp = require_cupy()
        sync = xp.cuda.Device().synchronize
    else:
        xp, sync = np, (lambda: None)
    H, D, C, R, B = args.heads, args.head_dim, args.latent, args.rope, args.batch
    rng = np.random.default_rng(0)
    x_t = xp.asarray(rng.standard_normal((B, 1, args.d_model)).astype(args.dtype))
    modes = [None] + ([args.topk] if args.topk else [])
    rows = []
    for topk in modes:
        mla = MLA(args.d_model, H, args.q_lora, C, D, R, D, topk=topk, seed=0, dtype=args.dtype)
        mha = Attention(args.d_model, H, n_kv_heads=H, head_dim=D, topk=topk, seed=0, dtype=args.dtype)
        mla.to_device(xp)
        mha.to_device(xp)
        for S in args.contexts:
            res = {"attention": "dense" if topk is None else f"top-{topk}", "context": S}
            runs = []
            for name, layer in (("mla", mla), ("mha", mha)):
                cache = layer.init_cache(B)
                runs.append((layer, cache, fill(cache, S, rng, xp)))
                res[f"{name}_bytes_per_token"] = cache.bytes_per_token
                res[f"{name}_cache_MiB"] = cache.bytes_per_token * S * B / 2**20
            for name, (best, med) in zip(("mla", "mha"), time_interleaved(runs, x_t, args.reps, sync)):
                res[f"{name}_step_ms"], res[f"{name}_step_ms_median"] = 1e3 * best, 1e3 * med
            if topk is not None and args.device == "numpy" and not args.no_roofline:
                res.update(roofline(mla, mha, runs, S, args))
            del runs
            res["cache_ratio"] = res["mha_bytes_per_token"] / res["mla_bytes_per_token"]
            res["step_speedup"] = res["mha_step_ms"] / res["mla_step_ms"]
            rows.append(res)

    expected = 2 * H * D / (C + R)
    print(f"H={H} head_dim={D} C={C} R={R} d_model={args.d_model} batch={B} {args.dtype} on {args.device} "
          f"(BLAS threads {os.environ.get('OPENBLAS_NUM_THREADS')}); "
          f"expected cache ratio 2*H*D/(C+R) = {expected:.2f}")
    hdr = ("attention", "context", "MLA B/tok", "MHA B/tok", "cache ratio", "MLA MiB", "MHA MiB",
           "MLA step ms", "MHA step ms", "MHA/MLA time")
    print(" | ".join(f"{h:>12}" for h in hdr))
    for r in rows:
        vals = (r["attention"], r["context"], r["mla_bytes_per_token"], r["mha_bytes_per_token"],
                f"{r['cache_ratio']:.2f}x", f"{r['mla_cache_MiB']:.1f}", f"{r['mha_cache_MiB']:.1f}",
                f"{r['mla_step_ms']:.2f}", f"{r['mha_step_ms']:.2f}", f"{r['step_speedup']:.2f}x")
        print(" | ".join(f"{v:>12}" for v in vals))
    roof = [r for r in rows if "mla_roof_ms" in r]
    if roof:
        print(f"\nRoofline of the top-{args.topk} step (per step: bytes read, FLOPs; bound = weights/their BW + "
              f"max(cache/read BW, selection FLOPs/compute rate); H200: 4.8 TB/s, 67 TFLOP/s)")
        hdr = ("context", "MLA MB", "MHA MB", "MLA GFLOP", "MHA GFLOP", "read GB/s", "GFLOP/s",
               "MLA roof ms", "MHA roof ms", "MLA meas ms", "MHA meas ms", "H200 MLA us", "H200 MHA us")
        print(" | ".join(f"{h:>11}" for h in hdr))
        for r in roof:
            vals = (r["context"], f"{r['mla_bytes'] / 1e6:.1f}", f"{r['mha_bytes'] / 1e6:.1f}",
                    f"{r['mla_gflop']:.3f}", f"{r['mha_gflop']:.3f}", f"{r['read_GBps']:.1f}",
                    f"{r['compute_GFLOPps']:.0f}", f"{r['mla_roof_ms']:.2f}", f"{r['mha_roof_ms']:.2f}",
                    f"{r['mla_step_ms']:.2f}", f"{r['mha_step_ms']:.2f}", f"{r['h200_mla_us']:.1f}",
                    f"{r['h200_mha_us']:.1f}")
            print(" | ".join(f"{v:>11}" for v in vals))
    charts = decode_charts(rows)
    if args.json:
        from topkattn.storage import atomic_write_json

        atomic_write_json(args.json, {"args": vars(args), "expected_cache_ratio": expected, "rows": rows,
                                      "plots": charts}, prefix=".bench-")
    plotting.save_png(charts, plotting.png_path(args.png, args.json),
                      title=f"MLA vs MHA decode step (H={H}, head dim {D}, C={C}, R={R}, batch {B}, {args.dtype}, "
                            f"{args.device})")
    return rows


def decode_charts(rows):
    """Best step time against the context per layer and attention (the top-k rows' roofline
    bounds as faint lines), and the cache size per layer, log-log."""
    modes = list(dict.fromkeys(r["attention"] for r in rows))
    steps, bounds = [], []
    for mode in modes:
        rs = sorted((r for r in rows if r["attention"] == mode), key=lambda r: r["context"])
        ctx = [r["context"] for r in rs]
        for name in ("mla", "mha"):
            steps.append(plotting.series(f"{name.upper()} {mode}", ctx, [r[f"{name}_step_ms"] for r in rs]))
            if all(f"{name}_roof_ms" in r for r in rs):
                bounds.append(plotting.series(f"{name.upper()} {mode} bound", ctx, [r[f"{name}_roof_ms"] for r in rs],
                                              alpha=0.4))
    first = sorted((r for r in rows if r["attention"] == modes[0]), key=lambda r: r["context"]) if rows else []
    cache = [plotting.series(name.upper(), [r["context"] for r in first], [r[f"{name}_cache_MiB"] for r in first])
             for name in ("mla", "mha")] if first else []
    charts = [plotting.chart("decode step (best of the reps)", "context (cached tokens)", "ms", steps + bounds,
                             xscale="log", yscale="log"),
              plotting.chart("KV cache per sequence", "context (cached tokens)", "MiB", cache,
                             xscale="log", yscale="log")]
    return [c for c in charts if c["series"]]


if __name__ == "__main__":
    main()
