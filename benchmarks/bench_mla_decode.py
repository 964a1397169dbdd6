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

    python benchmarks/bench_mla_decode.py [--contexts 4096 16384 65536] [--reps 5] [--json PATH]
    python benchmarks/bench_mla_decode.py --device cupy   # on a GPU
"""
import argparse
import os
import time

if __name__ == "__main__":  # BLAS threads must be fixed before NumPy loads (see --threads)
    from blas_env import threads_from_argv

    threads_from_argv()

import numpy as np

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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--latent", type=int, default=256, help="C, the MLA kv_lora_rank")
    ap.add_argument("--rope", type=int, default=32, help="R, the MLA rope dim")
    ap.add_argument("--q-lora", type=int, default=512)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--topk", type=int, default=64, help="top-k for the sparse rows (0: dense only)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", choices=["numpy", "cupy"], default="numpy")
    ap.add_argument("--threads", default="1", help="BLAS threads (default 1: stable timings on a shared machine)")
    ap.add_argument("--json", default=None, help="write the results to this path")
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
    if args.json:
        from topkattn.storage import atomic_write_json

        atomic_write_json(args.json, {"args": vars(args), "expected_cache_ratio": expected, "rows": rows},
                          prefix=".bench-")
    return rows


if __name__ == "__main__":
    main()
