"""Exact decode selection at long context: the fused one-pass scan against the cache read, the
previous GEMM + partition route and PyTorch GEMM + topk, with a roofline.

MLA-like setting (issue 17): one decode query of H=16 heads over a latent cache (1, S, C + R)
with C=256, R=32 (float32), top-64, no sinks or window.  Per context, every method runs
``--reps`` times, the methods interleaved so that load from other processes hits them alike;
the table shows the median (the JSON also keeps the minimum).

    cache read   one pass over the cache (np.add.reduce): on 1 thread, and split over the
                 worker threads (the bandwidth line)
    fused        select_decode (impl='auto': ops.cpu_kernels.decode_topm_scan on the worker pool)
    current      select_decode(impl='numpy'): one GEMM per KV head, then ranked_topm_xp
    torch        torch.topk(q @ K^T, k) on the same memory (when torch is importable)

Roofline: bytes = S (C + R) 4 read once; FLOPs = 2 H (C + R) S.  The bound is
max(bytes / read bandwidth, FLOPs / compute rate) with the read bandwidth measured above and
the compute rate of the fused kernel's own vector panels measured on an in-cache block
(``panel_gflops``) and of BLAS sgemm on the same shape (``sgemm_gflops``), per thread.

    python benchmarks/bench_exact_decode.py [--contexts 16384 65536 262144 1048576] [--reps 5]
        [--json out.json] [--png out.png]
"""
import argparse
import os
import time

# PyTorch's OpenMP threads spin after each call and would steal the cores from the next method
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import plotting
from bench_args import positive_int

from topkattn.ops import cpu_kernels
from topkattn.ops.selection import select_decode
from topkattn.threads import n_workers, pool

PAUSE_S = 0.05  # between timed calls: spinning BLAS/OpenMP threads of one method go idle first


def read_once(keys):
    return float(np.add.reduce(keys, axis=None))


def read_parallel(keys, nw):
    """One pass over the cache split over nw worker threads (NumPy releases the GIL)."""
    flat = keys.reshape(-1)
    cuts = [len(flat) * i // nw for i in range(nw + 1)]
    jobs = [pool().submit(np.add.reduce, flat[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    return float(sum(j.result() for j in jobs))


def panel_gflops(H, D, reps=20):
    """Per-thread GFLOP/s of the fused scan on an in-cache block (the compute roof of one core)."""
    rng = np.random.default_rng(1)
    S = 2048  # 2.4 MB: in L2/L3
    keys = rng.standard_normal((S, D), dtype=np.float32)
    qs = rng.standard_normal((H, D), dtype=np.float32)
    lanes = 16
    qt = np.zeros((D, -(-H // lanes) * lanes), np.float32)
    qt[:, :H] = qs.T
    vals, ids = np.empty((H, 64), np.float32), np.empty((H, 64), np.int64)
    cpu_kernels.decode_topm_scan(keys, qs, qt, 0, S, 64, vals, ids)
    t0 = time.thread_time()
    for _ in range(reps):
        cpu_kernels.decode_topm_scan(keys, qs, qt, 0, S, 64, vals, ids)
    return 2 * H * D * S * reps / (time.thread_time() - t0) / 1e9


def sgemm_gflops(H, D, reps=20):
    """Per-thread GFLOP/s of NumPy's sgemm on the same shape, (2048, D) @ (D, H), in cache."""
    rng = np.random.default_rng(2)
    keys = rng.standard_normal((2048, D), dtype=np.float32)
    qt = np.ascontiguousarray(rng.standard_normal((H, D), dtype=np.float32).T)
    out = np.empty((2048, H), np.float32)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        np.dot(keys, qt, out=out)
        t0 = time.thread_time()
        for _ in range(reps):
            np.dot(keys, qt, out=out)
        dt = time.thread_time() - t0
    return 2 * H * D * 2048 * reps / dt / 1e9


def torch_route(keys, query, topk, threads):
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    tk, tq = torch.from_numpy(keys[0]), torch.from_numpy(query[0])

    def run():
        return torch.topk(tq @ tk.T, topk, dim=-1)

    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", type=positive_int, nargs="+", default=[16384, 65536, 262144, 1048576])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--latent", type=int, default=256, help="C")
    ap.add_argument("--rope", type=int, default=32, help="R")
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--reps", type=positive_int, default=5)
    ap.add_argument("--no-current", action="store_true", help="skip the GEMM + partition route")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for every method (fused workers, BLAS, torch, the parallel read); "
                         "default: Numba's thread count.  On a shared machine --threads 1 with the CPU-time "
                         "columns gives the steadiest ratios")
    ap.add_argument("--json", default=None)
    ap.add_argument("--png", default=None, help="chart path (default: the JSON path with .png)")
    a = ap.parse_args(argv)
    H, D, k = a.heads, a.latent + a.rope, a.topk
    if a.threads:
        import numba
        from threadpoolctl import threadpool_limits

        numba.set_num_threads(min(a.threads, numba.config.NUMBA_NUM_THREADS))
        threadpool_limits(a.threads, "blas")
    nw = n_workers()
    rng = np.random.default_rng(0)
    scale = 1.0 / np.sqrt(D)
    roof = {"panel_gflops_per_thread": panel_gflops(H, D), "sgemm_gflops_per_thread": sgemm_gflops(H, D),
            "threads": nw}
    rows = []
    for S in a.contexts:
        keys = rng.standard_normal((1, S, D), dtype=np.float32)
        query = rng.standard_normal((1, H, D), dtype=np.float32)
        methods = {
            "read_1t": lambda: read_once(keys),
            "read": lambda: read_parallel(keys, nw),
            "fused": lambda: select_decode(query, keys, topk=k, scale=scale),
        }
        if not a.no_current:
            methods["current"] = lambda: select_decode(query, keys, topk=k, scale=scale, impl="numpy")
        tr = torch_route(keys, query, k, a.threads or os.cpu_count() or 1)
        if tr is not None:
            methods["torch"] = tr
        fused_idx = select_decode(query, keys, topk=k, scale=scale)[0]
        if "current" in methods:  # same keys selected (sets: float rounding may order near-ties differently)
            cur = select_decode(query, keys, topk=k, scale=scale, impl="numpy")[0]
            same = np.mean([len(set(fused_idx[0, h]) & set(cur[0, h])) / k for h in range(H)])
        else:
            same = None
        times = {name: [] for name in methods}
        cpu = {name: [] for name in methods}
        for rep in range(a.reps + 1):  # the first round warms up
            for name, fn in methods.items():
                time.sleep(PAUSE_S)
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
                if rep:
                    times[name].append(dt)
                    cpu[name].append(dc)
        row = {"context": S, "bytes": S * D * 4, "gflop": 2 * H * D * S / 1e9, "fused_vs_current_overlap": same,
               "threads": nw}
        for name, ts in times.items():
            row[f"{name}_ms"] = 1e3 * float(np.median(ts))
            row[f"{name}_ms_min"] = 1e3 * float(np.min(ts))
            row[f"{name}_cpu_ms"] = 1e3 * float(np.median(cpu[name]))  # all threads of the process
        row["read_GBps"] = row["bytes"] / row["read_ms"] / 1e6
        row["read_1t_GBps"] = row["bytes"] / row["read_1t_ms"] / 1e6
        compute_ms = row["gflop"] / (roof["panel_gflops_per_thread"] * nw) * 1e3
        row["roofline_ms"] = max(row["read_ms"], compute_ms)
        row["fused_gflops"] = row["gflop"] / row["fused_ms"] * 1e3
        rows.append(row)
        print(_fmt(row), flush=True)
        methods = tr = None  # drop the cache before the next context is made
    print(f"\nH={H} C+R={D} k={k} float32, {nw} worker threads; per thread: fused panel "
          f"{roof['panel_gflops_per_thread']:.1f} GFLOP/s, sgemm {roof['sgemm_gflops_per_thread']:.1f} GFLOP/s "
          f"(in cache); median of {a.reps}")
    hdr = ["context", "MB", "GFLOP", "read 1t ms", f"read {nw}t ms", "fused ms", "current ms", "torch ms",
           "fused/read", "fused/read1t", "fused/torch", "roof ms", "fused GFLOP/s"]
    print(" | ".join(f"{h:>12}" for h in hdr))
    for r in rows:
        vals = [r["context"], f"{r['bytes'] / 1e6:.0f}", f"{r['gflop']:.2f}", f"{r['read_1t_ms']:.1f}",
                f"{r['read_ms']:.1f}", f"{r['fused_ms']:.1f}", _ms(r, "current"), _ms(r, "torch"),
                f"{r['fused_ms'] / r['read_ms']:.2f}x", f"{r['fused_ms'] / r['read_1t_ms']:.2f}x",
                _ratio(r, "fused", "torch"), f"{r['roofline_ms']:.1f}", f"{r['fused_gflops']:.0f}"]
        print(" | ".join(f"{v:>12}" for v in vals))
    print("\nCPU time of the process (all its threads), median ms:")
    names = [n for n in ("read_1t", "read", "fused", "current", "torch") if f"{n}_cpu_ms" in rows[0]]
    print(" | ".join(f"{h:>12}" for h in ["context"] + names + ["fused/read1t"]))
    for r in rows:
        vals = [r["context"]] + [f"{r[n + '_cpu_ms']:.1f}" for n in names]
        vals.append(f"{r['fused_cpu_ms'] / r['read_1t_cpu_ms']:.2f}x")
        print(" | ".join(f"{v:>12}" for v in vals))
    charts = _charts(rows)
    if a.json:
        from topkattn.storage import atomic_write_json

        atomic_write_json(a.json, {"args": vars(a), "roof": roof, "rows": rows, "plots": charts}, prefix=".bench-")
    plotting.save_png(charts, plotting.png_path(a.png, a.json), title="exact decode selection")
    return rows


def _ms(r, name):
    return f"{r[name + '_ms']:.1f}" if name + "_ms" in r else "-"


def _ratio(r, a, b):
    return f"{r[a + '_ms'] / r[b + '_ms']:.2f}x" if b + "_ms" in r else "-"


def _fmt(r):
    parts = [f"S={r['context']:>8}"] + [f"{n} {r[n + '_ms']:.1f} ms" for n in
                                       ("read_1t", "read", "fused", "current", "torch") if n + "_ms" in r]
    return "  ".join(parts)


def _charts(rows):
    """The chart spec (benchmarks/plotting.py): ms per selection against the context, with the read
    lines and the 2x-read goal."""
    S = [r["context"] for r in rows]
    lines = [plotting.series(name, S, [r[name + "_ms"] for r in rows])
             for name in ("read", "read_1t", "fused", "current", "torch") if all(name + "_ms" in r for r in rows)]
    lines.append(plotting.series("2x read (goal)", S, [2 * r["read_ms"] for r in rows]))
    return [plotting.chart("exact decode selection against the cache read", "context (keys)",
                           "ms per decode step selection", lines, xscale="log", yscale="log")]


if __name__ == "__main__":
    main()
