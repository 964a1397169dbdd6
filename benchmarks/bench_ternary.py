"""Packed ternary (BitNet b1.58, 2 bits per weight) vs float32 projections at decode-like shapes.

For a square d x d projection and a batch of N token rows (N = 1: one decode step; N = 32: a
batch of decode steps) it reports the weight bytes (float32 d*d*4 vs packed ceil(d/4)*d + 8)
and the best (and median) time of

* ``x @ W.T``            the float32 matmul (BLAS)
* ``packed_matmul``      the Numba kernel reading the 2-bit codes (``topkattn.ops.ternary``)
* ``Linear.step``        a float32 Linear vs a ternary Linear (packed weights, float activations)
  and a ternary Linear with 8-bit activations (``act_bits=8``)

The runs alternate within each repetition so that load from other processes hits them alike.
BLAS and the kernel run on ``--threads`` threads (default 1; Numba's thread count is set the
same, before Numba loads).  The kernel's result is checked against x @ W~^T.

    python benchmarks/bench_ternary.py [--dims 64 256 1024 4096] [--batches 1 32] [--reps 20] [--json PATH]
"""
import argparse
import os
import time

if __name__ == "__main__":  # thread counts must be fixed before NumPy / Numba load (see --threads)
    from blas_env import threads_from_argv

    threads_from_argv()
    os.environ["NUMBA_NUM_THREADS"] = os.environ["OPENBLAS_NUM_THREADS"]

import numpy as np
from bench_args import positive_int

from topkattn.layers import Linear
from topkattn.ops.ternary import pack_weight, packed_matmul, ternary_quantize


def time_interleaved(fns, reps):
    """Best and median seconds of each function; the first round warms up (Numba compiles)."""
    times = [[] for _ in fns]
    for rep in range(reps + 1):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if rep:
                times[i].append(dt)
    return [(float(np.min(t)), float(np.median(t))) for t in times]


def bench_shape(d, n_rows, reps, rng):
    float_layer = Linear(d, d, seed=0)
    tern_layer = Linear(d, d, seed=0, ternary=True)
    tern8_layer = Linear(d, d, seed=0, ternary=True, act_bits=8)
    W = float_layer.params["weight"]  # (d, d) float32, the same master weight in all three
    packed = pack_weight(W)
    tern_layer.pack()
    tern8_layer.pack()
    x = rng.standard_normal((n_rows, d)).astype(np.float32)  # (N, d)
    Wq, s = ternary_quantize(W)
    want = x @ (Wq * s).astype(np.float32).T
    err = float(np.max(np.abs(packed_matmul(x, packed) - want)) / max(np.max(np.abs(want)), 1e-30))
    names = ("float_matmul", "packed_matmul", "float_step", "ternary_step", "ternary8_step")
    fns = (lambda: x @ W.T, lambda: packed_matmul(x, packed), lambda: float_layer.step(x),
           lambda: tern_layer.step(x), lambda: tern8_layer.step(x))
    res = {"d": d, "batch": n_rows, "float32_bytes": int(W.nbytes), "packed_bytes": packed.nbytes,
           "bytes_ratio": W.nbytes / packed.nbytes, "max_rel_err": err}
    for name, (best, med) in zip(names, time_interleaved(fns, reps)):
        res[f"{name}_us"], res[f"{name}_us_median"] = 1e6 * best, 1e6 * med
    res["matmul_speedup"] = res["float_matmul_us"] / res["packed_matmul_us"]
    res["step_speedup"] = res["float_step_us"] / res["ternary_step_us"]
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 256, 1024, 4096])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--reps", type=positive_int, default=20)
    ap.add_argument("--threads", default="1", help="BLAS and Numba threads (default 1)")
    ap.add_argument("--json", default=None, help="write the results to this path")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = [bench_shape(d, n, args.reps, rng) for d in args.dims for n in args.batches]

    print(f"square d x d projections, float32 activations; BLAS threads {os.environ.get('OPENBLAS_NUM_THREADS')}, "
          f"Numba threads {os.environ.get('NUMBA_NUM_THREADS')}; best of {args.reps} (microseconds)")
    hdr = ("d", "batch", "f32 bytes", "packed bytes", "bytes ratio", "f32 matmul", "packed mm", "mm speedup",
           "f32 step", "tern step", "tern8 step", "step speedup", "max rel err")
    print(" | ".join(f"{h:>12}" for h in hdr))
    for r in rows:
        vals = (r["d"], r["batch"], r["float32_bytes"], r["packed_bytes"], f"{r['bytes_ratio']:.2f}x",
                f"{r['float_matmul_us']:.1f}", f"{r['packed_matmul_us']:.1f}", f"{r['matmul_speedup']:.2f}x",
                f"{r['float_step_us']:.1f}", f"{r['ternary_step_us']:.1f}", f"{r['ternary8_step_us']:.1f}",
                f"{r['step_speedup']:.2f}x", f"{r['max_rel_err']:.1e}")
        print(" | ".join(f"{v:>12}" for v in vals))
    if args.json:
        from topkattn.storage import atomic_write_json

        atomic_write_json(args.json, {"args": vars(args), "cores": os.cpu_count(), "rows": rows}, prefix=".bench-")
    return rows


if __name__ == "__main__":
    main()
