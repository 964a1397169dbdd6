"""GPU benchmark of the Numba CUDA kernels: fused top-k attention vs dense, MLA decode with LoRANN.

Part 1, training shapes (B=1, H=16, D=64, k=64, causal, T = S): time of forward and of
forward+backward, and peak device memory above the inputs, for
  topk-fused   the fused streaming forward kernel (what impl="cuda" runs) and the
               deterministic segmented backward kernel, float32
  topk-tiled   topk_forward_tiled: cuBLAS score tiles + the CUDA top-m kernel + the
               vectorised sparse attend, same backward
  sdpa-bf16    torch SDPA on CUDA in bfloat16 (the FlashAttention backend where available)
  sdpa-fp32    torch SDPA on CUDA in float32 (memory-efficient backend)
  cupy-dense   without a CUDA torch: chunked dense CuPy attention, forward only
Part 2, one decode step (B=1, H=16, absorbed queries C + R = 512 + 64, k=64) over S latents:
  exact-cuda   topkattn.cuda.mla_decode (score every latent, split-k top-k, attend)
  exact-cupy   the vectorised path (ops.selection.select_decode: cuBLAS scores + partition)
  lorann-cuda  LoRANN search kernels (routing, int8 low-rank scoring, re-rank) + attend,
               with recall@k against the exact top-k
Targets (issue 7): at 64k the top-k forward within 2x of dense FlashAttention forward,
the backward faster than the dense backward, peak memory O(T * K).

    python benchmarks/bench_cuda.py                               # the issue's grid
    python benchmarks/bench_cuda.py --sizes 4096 16384 --decode-latents 100000 --json out.json   # and out.png

Needs a CUDA GPU, CuPy (pip install 'topkattn[cuda12]') and numba-cuda; exits with a
message otherwise.  ``--check-sim`` runs every code path once on tiny shapes under the
Numba CUDA simulator (NumPy arrays, CPU timers, no memory figures) to test the script.
"""
import argparse
import os
import sys
import time

import numpy as np
import plotting


# ----------------------------------------------------------------------------- device helpers
class Gpu:
    """CuPy arrays, CUDA-event timing, CuPy pool high-water mark for memory."""

    def __init__(self):
        import cupy as cp

        self.cp = self.xp = cp
        self.pool = cp.get_default_memory_pool()

    def randn(self, rng_seed, shape):
        return self.cp.random.default_rng(rng_seed).standard_normal(shape, dtype=self.cp.float32)

    def timed(self, fn, repeat):
        """Median milliseconds of fn() over ``repeat`` runs (after one warm-up run)."""
        fn()
        self.cp.cuda.get_current_stream().synchronize()
        times = []
        for _ in range(repeat):
            a, b = self.cp.cuda.Event(), self.cp.cuda.Event()
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(self.cp.cuda.get_elapsed_time(a, b))
        return float(np.median(times))

    def peak_extra(self, fn):
        """Peak pool bytes above what was allocated before fn() (the pool's high-water mark)."""
        self.cp.cuda.get_current_stream().synchronize()
        self.pool.free_all_blocks()
        before = self.pool.used_bytes()
        keep = fn()
        self.cp.cuda.get_current_stream().synchronize()
        peak = self.pool.total_bytes() - before
        del keep
        return int(peak)


class SimCpu(Gpu):
    """--check-sim: NumPy arrays under the CUDA simulator, wall-clock timing, no memory figures."""

    def __init__(self):
        self.xp = np

    def randn(self, rng_seed, shape):
        return np.random.default_rng(rng_seed).standard_normal(shape, dtype=np.float32)

    def timed(self, fn, repeat):
        fn()
        t = time.perf_counter()
        for _ in range(repeat):
            fn()
        return (time.perf_counter() - t) * 1e3 / repeat

    def peak_extra(self, fn):
        fn()
        return None


def require_gpu():
    """Return a Gpu, or exit with the reason the benchmark cannot run."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        sys.exit("bench_cuda: NUMBA_ENABLE_CUDASIM is set; unset it to benchmark a real GPU "
                 "(or pass --check-sim)")
    try:
        import cupy as cp

        n = cp.cuda.runtime.getDeviceCount()
    except Exception as e:  # ImportError, or a CUDA driver error
        sys.exit(f"bench_cuda: no usable GPU (CuPy with a CUDA device is required): {e}")
    if n < 1:
        sys.exit("bench_cuda: no CUDA device found")
    from topkattn.cuda.launch import cuda_usable

    if not cuda_usable():
        sys.exit("bench_cuda: numba.cuda cannot use the GPU (is numba-cuda installed?)")
    return Gpu()


def torch_cuda():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


# ----------------------------------------------------------------------------- part 1
def bench_topk(dev, T, H, D, k, repeat, tiled=False):
    from topkattn.cuda.sparse_backward import sparse_backward
    from topkattn.cuda.topk_forward import topk_forward, topk_forward_tiled

    q, kk, v, dout = [dev.randn(i, (1, H, T, D)) for i in range(4)]
    scale = 1 / np.sqrt(D)
    forward = topk_forward_tiled if tiled else topk_forward

    def fwd():
        return forward(q, kk, v, topk=k, causal=True, scale=scale)

    def fwd_bwd():
        out, idx, lse = fwd()
        return out, sparse_backward(dout, q, kk, v, idx, out, lse, scale)

    row = dict(method="topk-tiled" if tiled else "topk-fused", T=T, H=H, D=D, k=k, dtype="float32")
    row["fwd_ms"] = dev.timed(fwd, repeat)
    row["fwd_bwd_ms"] = dev.timed(fwd_bwd, repeat)
    row["fwd_peak_bytes"] = dev.peak_extra(fwd)
    row["fwd_bwd_peak_bytes"] = dev.peak_extra(fwd_bwd)
    if row["fwd_peak_bytes"] is not None:  # O(T K): indices + lse + out relative to T*K
        row["fwd_peak_bytes_per_TK"] = row["fwd_peak_bytes"] / (H * T * k)
    return row  # the inputs are freed with this frame


def bench_sdpa(torch, T, H, D, repeat, dtype_name):
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, H, T, D, device="cuda", dtype=dt, generator=g).requires_grad_()
               for _ in range(3))
    dout = torch.randn(1, H, T, D, device="cuda", dtype=dt, generator=g)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def fwd():
        with torch.no_grad():
            return sdpa(q, k, v, is_causal=True)

    def fwd_bwd():
        out = sdpa(q, k, v, is_causal=True)
        return torch.autograd.grad(out, (q, k, v), dout)

    def timed(fn):
        fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(repeat):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b))
        return float(np.median(ts))

    def peak(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        keep = fn()
        torch.cuda.synchronize()
        del keep
        return int(torch.cuda.max_memory_allocated() - base)

    row = dict(method=f"sdpa-{dtype_name}", T=T, H=H, D=D, k=None, dtype=dtype_name)
    try:
        row.update(fwd_ms=timed(fwd), fwd_bwd_ms=timed(fwd_bwd), fwd_peak_bytes=peak(fwd),
                   fwd_bwd_peak_bytes=peak(fwd_bwd))
    except RuntimeError as e:  # out of memory or no kernel for this shape
        row["error"] = str(e).splitlines()[0]
    return row


def bench_cupy_dense(dev, T, H, D, repeat, chunk=1024):
    xp = dev.xp
    q, k, v = (dev.randn(i, (1, H, T, D)) for i in range(3))
    scale = np.float32(1 / np.sqrt(D))

    def fwd():
        out = xp.empty_like(q)
        for t0 in range(0, T, chunk):
            t1 = min(T, t0 + chunk)
            s = xp.matmul(q[:, :, t0:t1] * scale, k[:, :, :t1].swapaxes(-1, -2))  # (1, H, c, t1)
            pos = xp.arange(t0, t1)[:, None]
            s = xp.where(xp.arange(t1)[None, :] <= pos, s, -np.inf)
            s -= s.max(-1, keepdims=True)
            p = xp.exp(s)
            out[:, :, t0:t1] = xp.matmul(p / p.sum(-1, keepdims=True), v[:, :, :t1])
        return out

    return dict(method="cupy-dense", T=T, H=H, D=D, k=None, dtype="float32",
                fwd_ms=dev.timed(fwd, repeat), fwd_bwd_ms=None, fwd_peak_bytes=dev.peak_extra(fwd),
                fwd_bwd_peak_bytes=None)


# ----------------------------------------------------------------------------- part 2
def bench_decode(dev, S, H, C, R, k, repeat, clusters, rank, global_dim, search, rerank, seed=0):
    from topkattn.ann import LorannIndex
    from topkattn.cuda.lorann_score import lorann_arrays, lorann_search
    from topkattn.cuda.mla_decode import attend_selected, mla_decode
    from topkattn.ops.selection import select_decode

    xp = dev.xp
    rng = np.random.default_rng(seed)
    Dk = C + R
    # clustered latents (a mixture), so that an index has structure to exploit
    n_mix = max(1, S // 256)
    centers = rng.standard_normal((n_mix, Dk), dtype=np.float32)
    lat = centers[rng.integers(0, n_mix, S)] + 0.5 * rng.standard_normal((S, Dk), dtype=np.float32)
    q_host = (centers[rng.integers(0, n_mix, H)] + 0.5 * rng.standard_normal((H, Dk), dtype=np.float32))
    keys = xp.asarray(lat[None])  # (1, S, C + R)
    q = xp.asarray(q_host[None])  # (1, H, C + R)
    scale = 1 / np.sqrt(Dk)
    rows = []

    def exact():
        return mla_decode(q, keys, topk=k, C=C, scale=scale)
    rows.append(dict(method="exact-cuda", S=S, ms=dev.timed(exact, repeat),
                     peak_bytes=dev.peak_extra(exact)))

    def exact_cupy():
        idx, _, _ = select_decode(q, keys, topk=k, scale=scale)
        return attend_selected(q, keys, idx, C=C, scale=scale)

    rows.append(dict(method="exact-cupy-select", S=S, ms=dev.timed(exact_cupy, repeat),
                     peak_bytes=dev.peak_extra(exact_cupy)))
    t = time.perf_counter()
    index = LorannIndex(lat, n_clusters=clusters, global_dim=global_dim, quantization_bits=8,
                        rank=rank, train_size=min(5, clusters), distance="ip", seed=seed)
    index.build()
    build_s = time.perf_counter() - t
    arrays = lorann_arrays(index, xp)

    def lorann():
        ids, _ = lorann_search(arrays, q[0], k, search, rerank)
        return attend_selected(q, keys, ids[None], C=C, scale=scale)

    _, ex_idx, _ = exact()
    ids, _ = lorann_search(arrays, q[0], k, search, rerank)
    ex, got = np.asarray(_host(ex_idx))[0], np.asarray(_host(ids))
    recall = float(np.mean([len(set(ex[h]) & set(got[h])) / k for h in range(H)]))
    rows.append(dict(method="lorann-cuda", S=S, ms=dev.timed(lorann, repeat),
                     peak_bytes=dev.peak_extra(lorann), recall_at_k=recall, build_s=build_s,
                     clusters=clusters, clusters_to_search=search, points_to_rerank=rerank,
                     rank=rank, global_dim=global_dim))
    return rows


def _host(a):
    return a.get() if hasattr(a, "get") else a


# ----------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 65536], help="T = S")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--decode-latents", type=int, default=1_000_000, help="0 skips part 2")
    ap.add_argument("--latent-dim", type=int, default=512)
    ap.add_argument("--rope-dim", type=int, default=64)
    ap.add_argument("--lorann-clusters", type=int, default=1024)
    ap.add_argument("--lorann-rank", type=int, default=32)
    ap.add_argument("--lorann-global-dim", type=int, default=128)
    ap.add_argument("--clusters-to-search", type=int, default=32)
    ap.add_argument("--points-to-rerank", type=int, default=512)
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    ap.add_argument("--png", metavar="PATH", help="time and memory charts [default: the --json path with .png]")
    ap.add_argument("--check-sim", action="store_true",
                    help="run every path once on tiny shapes under the CUDA simulator")
    a = ap.parse_args(argv)
    if a.check_sim:
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"  # before numba.cuda is imported
        dev = SimCpu()
        a.sizes, a.heads, a.dim, a.topk, a.repeat = [16], 2, 8, 4, 1
        a.decode_latents, a.latent_dim, a.rope_dim = 400, 12, 4
        a.lorann_clusters, a.lorann_rank, a.lorann_global_dim = 4, 3, 8
        a.clusters_to_search, a.points_to_rerank = 2, 20
        torch = None
    else:
        dev = require_gpu()
        torch = torch_cuda()
    train, decode = [], []
    for T in a.sizes:
        for tiled in (False, True):
            train.append(bench_topk(dev, T, a.heads, a.dim, a.topk, a.repeat, tiled=tiled))
        if torch is not None:
            for dt in ("bf16", "fp32"):
                train.append(bench_sdpa(torch, T, a.heads, a.dim, a.repeat, dt))
        else:
            train.append(bench_cupy_dense(dev, T, a.heads, a.dim, a.repeat))
        _print_train([r for r in train if r["T"] == T])
    if a.decode_latents:
        decode = bench_decode(dev, a.decode_latents, a.heads, a.latent_dim, a.rope_dim, a.topk,
                              a.repeat, a.lorann_clusters, a.lorann_rank, a.lorann_global_dim,
                              a.clusters_to_search, a.points_to_rerank)
        _print_decode(decode)
    charts = cuda_charts(train, decode)
    if a.json:
        from topkattn.storage import atomic_write_json

        atomic_write_json(a.json, {"train": train, "decode": decode, "device": _device_name(dev), "plots": charts},
                          prefix=".bench-")
    plotting.save_png(charts, plotting.png_path(a.png, a.json),
                      title=f"Numba CUDA kernels on {_device_name(dev)} (H={a.heads}, D={a.dim}, k={a.topk})")


def cuda_charts(train, decode):
    """Time and peak memory against the sequence length per training method (log-log), and the
    decode step's time per method."""
    ok = [r for r in train if "error" not in r]
    methods = list(dict.fromkeys(r["method"] for r in ok))

    def lines(key, scale=1.0):
        out = []
        for m in methods:
            rows = [r for r in ok if r["method"] == m]
            ys = [None if r.get(key) is None else r[key] * scale for r in rows]
            if any(y is not None for y in ys):
                out.append(plotting.series(m, [r["T"] for r in rows], ys))
        return out

    charts = [plotting.chart("forward", "sequence length T (= S)", "ms", lines("fwd_ms"), xscale="log", yscale="log"),
              plotting.chart("forward + backward", "sequence length T (= S)", "ms", lines("fwd_bwd_ms"),
                             xscale="log", yscale="log")]
    memory = lines("fwd_bwd_peak_bytes", 1 / 2**20)
    if memory:
        charts.append(plotting.chart("peak memory above the inputs (forward + backward)", "sequence length T (= S)",
                                     "MiB", memory, xscale="log", yscale="log"))
    if decode:
        charts.append(plotting.chart(f"one decode step over S = {decode[0]['S']:,} latents", "method", "ms",
                                     [plotting.series("ms", [r["method"] for r in decode], [r["ms"] for r in decode])],
                                     yscale="log", kind="bar"))
    return [c for c in charts if c["series"]]


def _device_name(dev):
    if isinstance(dev, SimCpu):
        return "numba CUDA simulator (CPU)"
    props = dev.cp.cuda.runtime.getDeviceProperties(dev.cp.cuda.Device().id)
    return props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])


def _mb(x):
    return f"{'-':>9}" if x is None else f"{x / 2**20:9.1f}"


def _ms(x):
    return f"{'-':>10}" if x is None else f"{x:10.2f}"


def _print_train(rows):
    base = next((r for r in rows if r["method"] in ("sdpa-bf16", "cupy-dense") and "error" not in r), None)
    print(f"{'method':12} {'T':>7} {'fwd ms':>10} {'fwd+bwd ms':>10} {'fwd MiB':>9} "
          f"{'f+b MiB':>9} {'fwd/dense':>9} {'f+b/dense':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['method']:12} {r['T']:7d}  error: {r['error']}")
            continue
        rf = rb = "-"
        if base is not None and base["fwd_ms"]:
            rf = f"{r['fwd_ms'] / base['fwd_ms']:9.2f}"
        if base is not None and base.get("fwd_bwd_ms") and r.get("fwd_bwd_ms"):
            rb = f"{r['fwd_bwd_ms'] / base['fwd_bwd_ms']:9.2f}"
        print(f"{r['method']:12} {r['T']:7d} {_ms(r['fwd_ms'])} {_ms(r.get('fwd_bwd_ms'))} "
              f"{_mb(r.get('fwd_peak_bytes'))} {_mb(r.get('fwd_bwd_peak_bytes'))} {rf:>9} {rb:>9}")
    sys.stdout.flush()


def _print_decode(rows):
    ex = rows[0]["ms"]
    print(f"{'decode step':18} {'S':>9} {'ms':>9} {'vs exact-cuda':>13} {'MiB':>9} {'recall@k':>8}")
    for r in rows:
        rec = f"{r['recall_at_k']:8.3f}" if "recall_at_k" in r else "       -"
        print(f"{r['method']:18} {r['S']:9d} {r['ms']:9.3f} {r['ms'] / ex:13.2f} "
              f"{_mb(r.get('peak_bytes'))} {rec}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
