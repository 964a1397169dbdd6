"""Time and peak memory of topk_attention vs dense attention (NumPy, PyTorch SDPA).

Each (method, size) runs in its own subprocess so peak RSS is measured cleanly:
peak extra memory = max RSS of the process - RSS after the inputs were created.
Report ratios from one run: this machine is shared and noisy.

    python benchmarks/bench_topk_attention.py                      # the issue's grid
    python benchmarks/bench_topk_attention.py --sizes 1024 4096 --json out.json    # and out.png
    python benchmarks/bench_topk_attention.py --sizes 8192 --methods topkattn torch-sdpa --long 0 --rounds 3

Each row keeps the best wall time and the best process CPU time (all threads) of its runs;
the CPU-time ratios are the steadier ones on a shared machine.  With ``--json`` (or ``--png``)
the charts of time and peak memory against the sequence length per method are stored in the
JSON under ``"plots"`` and drawn to a PNG (benchmarks/plotting.py).
"""
import argparse
import json
import os
import subprocess
import sys
import time

import memory
import numpy as np
import plotting
from bench_args import non_negative_int, positive_int

METHODS = ["topkattn", "numpy-dense", "torch-sdpa", "torch-topk-seed"]


def worker(method, T, H, D, k, repeat):
    rng = np.random.default_rng(0)
    shape = (1, H, T, D)
    q, kk, v = (rng.standard_normal(shape, dtype=np.float32) for _ in range(3))
    dout = rng.standard_normal(shape, dtype=np.float32)
    if method == "topkattn":
        import topkattn as ta

        ta.topk_attention(q[:, :, :64], kk[:, :, :64], v[:, :, :64], topk=k)  # compile/warm
        ta.topk_attention_backward(dout[:, :, :64], ta.topk_attention_forward(
            q[:, :, :64], kk[:, :, :64], v[:, :, :64], topk=k)[1])

        def fwd():
            return ta.topk_attention_forward(q, kk, v, topk=k, causal=True)

        def bwd(state):
            ta.topk_attention_backward(dout, state[1])
    elif method == "numpy-dense":
        def fwd():
            s = np.matmul(q, kk.swapaxes(-1, -2)) * np.float32(1 / np.sqrt(D))
            s += np.triu(np.full((T, T), -np.inf, dtype=np.float32), 1)
            s -= s.max(-1, keepdims=True)
            np.exp(s, out=s)
            s /= s.sum(-1, keepdims=True)
            return s, s @ v

        def bwd(state):
            p, out = state
            dp = dout @ v.swapaxes(-1, -2)
            dv = p.swapaxes(-1, -2) @ dout
            ds = p * (dp - (dout * out).sum(-1, keepdims=True))
            dq = ds @ kk
            dk = ds.swapaxes(-1, -2) @ q
            return dq, dk, dv
    else:
        import torch

        torch.set_num_threads(os.cpu_count())
        tq, tk, tv = (torch.from_numpy(a).requires_grad_() for a in (q, kk, v))
        tdout = torch.from_numpy(dout)
        if method == "torch-sdpa":
            def fwd():
                return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
        else:  # the seed-style top-k: full scores, topk, scatter, softmax
            def fwd():
                s = (tq @ tk.transpose(-1, -2)) / np.sqrt(D)
                s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
                val, ind = s.topk(min(k, T), dim=-1)
                masked = torch.full_like(s, float("-inf")).scatter(-1, ind, val)
                return torch.softmax(masked, -1) @ tv

        def bwd(state):
            state.backward(tdout)
    base = memory.start_peak()
    t_fwd, t_both, c_fwd, c_both = [], [], [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        state = fwd()
        t1, c1 = time.perf_counter(), time.process_time()
        bwd(state)
        t2, c2 = time.perf_counter(), time.process_time()
        del state
        t_fwd.append(t1 - t0)
        t_both.append(t2 - t0)
        c_fwd.append(c1 - c0)
        c_both.append(c2 - c0)
    peak = memory.peak_extra_bytes(base)
    print(json.dumps(dict(method=method, T=T, H=H, fwd_s=min(t_fwd), fwd_bwd_s=min(t_both),
                          fwd_cpu_s=min(c_fwd), fwd_bwd_cpu_s=min(c_both),
                          peak_extra_mib=max(peak, 0) / 2**20)))


def run_case(method, T, H, D, k, repeat, timeout):
    cmd = [sys.executable, __file__, "--worker", method, str(T), str(H), "--dim", str(D),
           "--k", str(k), "--repeat", str(repeat)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(method=method, T=T, H=H, error=f"timeout {timeout}s")
    if r.returncode != 0:
        return dict(method=method, T=T, H=H, error=(r.stderr.strip().splitlines() or ["?"])[-1])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=positive_int, nargs="+", default=[1024, 4096, 8192, 16384])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--long", type=non_negative_int, default=65536,
                    help="extra H=1 run of topkattn at this T (0: skip)")
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--dense-max", type=int, default=8192, help="largest T for numpy-dense/torch-topk-seed")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every case this many times, round-robin, and keep each one's best (a shared "
                         "machine's load then hits the methods alike)")
    ap.add_argument("--json", help="write the rows to this JSON file")
    ap.add_argument("--png", metavar="PATH", help="time and memory charts [default: the --json path with .png]")
    ap.add_argument("--worker", nargs=3, metavar=("METHOD", "T", "H"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker[0], int(a.worker[1]), int(a.worker[2]), a.dim, a.k, a.repeat)
        return
    have_torch = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True).returncode == 0
    cases = [(m, T, a.heads) for T in a.sizes for m in a.methods]
    if a.long:
        cases += [("topkattn", a.long, 1), ("torch-sdpa", a.long, 1)]
    cases = [(m, T, H) for m, T, H in cases if (have_torch or not m.startswith("torch"))
             and not (m in ("numpy-dense", "torch-topk-seed") and T > a.dense_max)]
    best = {}
    for _ in range(a.rounds):
        for m, T, H in cases:
            row = run_case(m, T, H, a.dim, a.k, a.repeat, a.timeout)
            print(_fmt(row), flush=True)
            old = best.get((m, T, H))
            if old is None or "error" in old:
                best[(m, T, H)] = row
            elif "error" not in row:
                for key in ("fwd_s", "fwd_bwd_s", "fwd_cpu_s", "fwd_bwd_cpu_s"):
                    old[key] = min(old[key], row[key])
    rows = [best[c] for c in cases]
    print()
    print(f"{'T':>6} {'H':>2}  {'topk fwd/sdpa':>13} {'topk f+b/sdpa':>13} {'topk mem/sdpa':>13}"
          f" {'cpu fwd/sdpa':>13} {'cpu f+b/sdpa':>13}")
    by = {(r["method"], r["T"], r["H"]): r for r in rows if "error" not in r}
    for (m, T, H), r in sorted(by.items(), key=lambda x: (x[0][2], x[0][1])):
        s = by.get(("torch-sdpa", T, H))
        if m == "topkattn" and s:
            print(f"{T:>6} {H:>2}  {r['fwd_s'] / s['fwd_s']:>13.2f} {r['fwd_bwd_s'] / s['fwd_bwd_s']:>13.2f} "
                  f"{memory.mem_ratio(r['peak_extra_mib'], s['peak_extra_mib']):>13.2f}"
                  f" {r['fwd_cpu_s'] / s['fwd_cpu_s']:>13.2f} {r['fwd_bwd_cpu_s'] / s['fwd_bwd_cpu_s']:>13.2f}")
    charts = time_charts(rows, a.heads)
    if a.json:
        from topkattn.storage import atomic_write_json

        atomic_write_json(a.json, dict(device="cpu", cores=os.cpu_count(), k=a.k, D=a.dim, rows=rows, plots=charts),
                          prefix=".bench-")
    plotting.save_png(charts, plotting.png_path(a.png, a.json),
                      title=f"top-k attention vs dense, CPU ({os.cpu_count()} cores, D={a.dim}, k={a.k})")


def time_charts(rows, heads):
    """Forward and forward + backward wall time, and peak extra memory, against the sequence
    length T (= S), one line per method and head count (log-log; failed runs left out)."""
    ok = [r for r in rows if "error" not in r]
    groups = list(dict.fromkeys((r["method"], r["H"]) for r in ok))

    def lines(key, scale=1.0):
        out = []
        for m, H in groups:
            rs = sorted((r for r in ok if (r["method"], r["H"]) == (m, H)), key=lambda r: r["T"])
            out.append(plotting.series(m if H == heads else f"{m} (H={H})", [r["T"] for r in rs],
                                       [r[key] * scale for r in rs]))
        return out

    charts = [plotting.chart(f"forward (B=1, H={heads}, causal)", "sequence length T (= S)", "ms",
                             lines("fwd_s", 1e3), xscale="log", yscale="log"),
              plotting.chart("forward + backward", "sequence length T (= S)", "ms", lines("fwd_bwd_s", 1e3),
                             xscale="log", yscale="log"),
              plotting.chart("peak memory above the inputs (forward + backward)", "sequence length T (= S)", "MiB",
                             lines("peak_extra_mib"), xscale="log", yscale="log")]
    return [c for c in charts if c["series"]]


def _fmt(r):
    if "error" in r:
        return f"{r['method']:>16} T={r['T']:>6} H={r['H']}: {r['error']}"
    return (f"{r['method']:>16} T={r['T']:>6} H={r['H']}: fwd {r['fwd_s']:8.3f}s  fwd+bwd {r['fwd_bwd_s']:8.3f}s"
            f"  (CPU {r['fwd_cpu_s']:.3f}s, {r['fwd_bwd_cpu_s']:.3f}s)  peak +{r['peak_extra_mib']:8.1f} MiB")


if __name__ == "__main__":
    main()
