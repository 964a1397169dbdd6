"""Time and peak memory of block top-k attention (MoBA), both routes, against token top-k and SDPA.

Methods (B = 1, H = 8, D = 64, causal, float32; each (method, T) in its own subprocess so
peak RSS is measured cleanly: peak extra memory = the high-water RSS after the inputs were made
(benchmarks/memory.py) - RSS then):

    block-blockwise   block_topk_attention, route="blockwise" (per key-block GEMMs, online softmax;
                      the Numba group kernels of ops/block_kernels.py, the default)
    block-blockwise-numpy  the same route with impl="numpy" (the NumPy segment loop)
    block-gather      block_topk_attention, route="gather" (expanded indices, the sparse attend)
    token-kN          topk_attention with k = block_size * topk_blocks (the same keys per query)
    token-k8          topk_attention with k = 8
    torch-sdpa        PyTorch scaled_dot_product_attention (dense, causal), if torch imports

The issue's goal: block top-k fwd+bwd at T = S = 8192 no slower than token top-k.
Report ratios from one run: this machine is shared and noisy.

    python benchmarks/bench_block_attention.py                       # T in {2048, 8192}
    python benchmarks/bench_block_attention.py --sizes 2048 --methods block-blockwise block-gather
"""
import argparse
import json
import os
import subprocess
import sys
import time

import memory
import numpy as np

METHODS = ["block-blockwise", "block-blockwise-numpy", "block-gather", "token-kN", "token-k8", "torch-sdpa"]
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "block_attention.json")


def worker(method, T, H, D, block_size, topk_blocks, repeat):
    rng = np.random.default_rng(0)
    shape = (1, H, T, D)
    q, k, v, dout = (rng.standard_normal(shape, dtype=np.float32) for _ in range(4))
    if method.startswith("block") or method.startswith("token"):
        import topkattn as ta

        if method.startswith("block"):
            route = method.split("-")[1]
            impl = "numpy" if method.endswith("-numpy") else "auto"
            kw = dict(block_size=block_size, topk_blocks=topk_blocks, route=route, impl=impl)
            fwd_op, bwd_op = ta.block_topk_attention_forward, ta.block_topk_attention_backward
        else:
            kw = dict(topk=block_size * topk_blocks if method == "token-kN" else 8)
            fwd_op, bwd_op = ta.topk_attention_forward, ta.topk_attention_backward
        small = [a[:, :, :4 * block_size] for a in (q, k, v, dout)]  # compile / warm the kernels
        bwd_op(small[3], fwd_op(*small[:3], **kw)[1])

        def fwd():
            return fwd_op(q, k, v, causal=True, **kw)

        def bwd(state):
            bwd_op(dout, state[1])
    else:
        import torch

        torch.set_num_threads(os.cpu_count())
        tq, tk, tv = (torch.from_numpy(a).requires_grad_() for a in (q, k, v))
        tdout = torch.from_numpy(dout)

        def fwd():
            return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)

        def bwd(state):
            state.backward(tdout)
    base = memory.start_peak()
    t_fwd, t_both = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        state = fwd()
        t1 = time.perf_counter()
        bwd(state)
        t2 = time.perf_counter()
        del state
        t_fwd.append(t1 - t0)
        t_both.append(t2 - t0)
    peak = memory.peak_extra_bytes(base)
    print(json.dumps(dict(method=method, T=T, H=H, fwd_s=min(t_fwd), fwd_bwd_s=min(t_both),
                          peak_extra_mib=max(peak, 0) / 2**20)))


def run_case(method, T, a):
    cmd = [sys.executable, __file__, "--worker", method, str(T), "--heads", str(a.heads), "--dim", str(a.dim),
           "--block-size", str(a.block_size), "--topk-blocks", str(a.topk_blocks), "--repeat", str(a.repeat)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
    except subprocess.TimeoutExpired:
        return dict(method=method, T=T, H=a.heads, error=f"timeout {a.timeout}s")
    if r.returncode != 0:
        return dict(method=method, T=T, H=a.heads, error=(r.stderr.strip().splitlines() or ["?"])[-1])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--topk-blocks", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--json", default=RESULTS, help=f"write the rows here (default {RESULTS}; '' to skip)")
    ap.add_argument("--worker", nargs=2, metavar=("METHOD", "T"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker[0], int(a.worker[1]), a.heads, a.dim, a.block_size, a.topk_blocks, a.repeat)
        return
    have_torch = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True).returncode == 0
    kn = a.block_size * a.topk_blocks
    rows = []
    for T in a.sizes:
        for m in a.methods:
            if m == "torch-sdpa" and not have_torch:
                continue
            row = run_case(m, T, a)
            row["label"] = f"token-k{kn}" if m == "token-kN" else m
            rows.append(row)
            print(_fmt(row), flush=True)
    print()
    print(f"fwd+bwd time and peak extra memory relative to block-blockwise "
          f"(block_size={a.block_size}, topk_blocks={a.topk_blocks}, H={a.heads}, D={a.dim})")
    print(f"{'T':>6} {'method':>21} {'fwd s':>8} {'f+b s':>8} {'MiB':>8} {'f+b / block':>12} {'mem / block':>12}")
    by = {(r["method"], r["T"]): r for r in rows if "error" not in r}
    for T in a.sizes:
        ref = by.get(("block-blockwise", T))
        for m in a.methods:
            r = by.get((m, T))
            if r is None:
                continue
            rel_t = r["fwd_bwd_s"] / ref["fwd_bwd_s"] if ref else float("nan")
            rel_m = memory.mem_ratio(r["peak_extra_mib"], ref["peak_extra_mib"]) if ref else float("nan")
            print(f"{T:>6} {r['label']:>21} {r['fwd_s']:>8.3f} {r['fwd_bwd_s']:>8.3f} {r['peak_extra_mib']:>8.1f} "
                  f"{rel_t:>12.2f} {rel_m:>12.2f}")
    if a.json:
        from topkattn.storage import atomic_write_json

        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        atomic_write_json(a.json, dict(device="cpu", cores=os.cpu_count(), D=a.dim, H=a.heads,
                                       block_size=a.block_size, topk_blocks=a.topk_blocks, causal=True,
                                       dtype="float32", rows=rows), prefix=".bench-")
        print(f"wrote {a.json}")


def _fmt(r):
    if "error" in r:
        return f"{r['label']:>21} T={r['T']:>6}: {r['error']}"
    return (f"{r['label']:>21} T={r['T']:>6}: fwd {r['fwd_s']:8.3f}s  fwd+bwd {r['fwd_bwd_s']:8.3f}s"
            f"  peak +{r['peak_extra_mib']:8.1f} MiB")


if __name__ == "__main__":
    main()
