"""Long-context decode selection, 16k to 1M cached tokens: exact, PyTorch GEMM + topk and LoRANN
against the time it takes to read the cache once.

The issue-17 setting: one MLA layer (H=16 heads, latent C=256, rope R=32, top-k 64, float32),
random-init (seed 0), whose cache holds the latents [c_j ; kr_j] of a token stream: tokens
drawn uniformly from a vocabulary of ``--vocab`` (256: byte-level text), embedded by a random
table, projected by the layer (RMS-normed latent, rotated rope key at each position).  Each
decode step appends the next token's latent and selects the top-k keys of its 16 absorbed
queries (positions N, N + 1, ...), as ``MLA.step`` does.

Per context N:
  read      the time to read the cache (N x (C + R) float32) once: the fastest of a column
            sum and a BLAS matrix-vector product; its bytes / time is the bandwidth line
  exact     :func:`topkattn.ops.selection.select_decode` (the layers' exact decode selection)
  torch     PyTorch GEMM (S, D) @ (D, H) + ``topk`` over the cache (when torch imports)
  lorann    :class:`topkattn.decoding.LorannSelector` at three settings: the defaults and
            two others (``--settings``); the index is built over the prompt by
            ``LorannSelector.prefill`` from the absorbed queries of the prompt's last
            ``--train-positions`` positions (every head), then every step adds the new key
            (maintenance, if due, runs in the index's background thread)
Columns: median, p99 and max step time (ms, the selection call only), recall@k against
exact top-k (every ``--recall-every``-th step), build time (s), peak memory of the build
(MiB, numpy allocations traced) and the index's size (MiB); "x read" = median step / read time.

The growth run (``--growth P:E``) decodes one token a step from a P-token prompt to E tokens
with the default LorannSelector and with the old policy (rebuild from scratch whenever the
index has doubled, ``refit_factor=2``, no background maintenance): p99 and max step time show
the stalls.

    python benchmarks/bench_long_decode.py --quick                     # 16k and 64k, a few minutes
    python benchmarks/bench_long_decode.py --json long.json --png long.png   # 16k .. 1M
    python benchmarks/bench_long_decode.py --contexts 1048576 --steps 100

BLAS threads come from ``--threads`` (default 2, set before NumPy loads); Numba's from
NUMBA_NUM_THREADS.  Peak resident memory of the process is printed at the end.
"""
import argparse
import ast
import os
import resource
import sys
import time
import tracemalloc

if __name__ == "__main__":  # BLAS threads must be fixed before NumPy loads
    from blas_env import threads_from_argv

    threads_from_argv(default="2")

import numpy as np
import plotting
from bench_args import positive_int

from topkattn.decoding import LorannSelector
from topkattn.layers import MLA
from topkattn.layers.rmsnorm import rms_norm_forward
from topkattn.layers.rope import rope_angles, rope_apply
from topkattn.ops.selection import select_decode

DEFAULT_SETTINGS = [
    ("default", {}),
    ("lean", {"clusters_to_search": 16, "points_to_rerank": 128}),
    ("wide", {"clusters_to_search": 64, "rank": 64, "points_to_rerank": 256}),
]
CHUNK = 32768


class TokenStream:
    """Latents and absorbed queries of a random-init MLA layer over a stream of random tokens."""

    def __init__(self, layer, vocab, n_tokens, seed=0):
        rng = np.random.default_rng(seed)
        self.layer = layer
        self.w = layer.decode_weights()
        self.emb = rng.standard_normal((vocab, layer.d_model)).astype(np.float32)  # (V, d)
        self.tokens = rng.integers(0, vocab, n_tokens)
        self.D = layer.kv_lora_rank + layer.qk_rope_dim

    def hidden(self, lo, hi):
        return self.emb[self.tokens[lo:hi]]  # (n, d)

    def keys_into(self, out, lo, hi):
        """Write the cached rows [c ; kr] (hi - lo, C + R) of positions lo .. hi - 1 into out
        (a token's latent and unrotated rope key depend on the token only: computed once per
        vocabulary entry, then gathered and rotated to each position)."""
        L, w = self.layer, self.w
        C = L.kv_lora_rank
        if not hasattr(self, "_c_tab"):
            self._c_tab = rms_norm_forward(self.emb @ w["W_DKV"].T, w["kv_norm"], L.eps)[0]  # (V, C)
            self._kr_tab = self.emb @ w["W_KR"].T  # (V, R)
        for a in range(lo, hi, CHUNK):
            b = min(hi, a + CHUNK)
            tok = self.tokens[a:b]
            out[a - lo:b - lo, :C] = self._c_tab[tok]
            cos, sin = rope_angles(np.arange(a, b), L.qk_rope_dim, L.rope_base, np, np.float32)
            out[a - lo:b - lo, C:] = rope_apply(self._kr_tab[tok], cos, sin)

    def queries(self, lo, hi):
        """Absorbed queries (hi - lo, H, C + R) of positions lo .. hi - 1 (``MLA.absorbed_query``)."""
        L, w = self.layer, self.w
        H, C, R = L.n_heads, L.kv_lora_rank, L.qk_rope_dim
        x = self.hidden(lo, hi)
        cq = rms_norm_forward(x @ w["W_DQ"].T, w["q_norm"], L.eps)[0]  # (n, Lq)
        q_lat = (cq @ w["W_QK"].T).reshape(-1, H, C)
        cos, sin = rope_angles(np.arange(lo, hi), R, L.rope_base, np, np.float32)
        qr = rope_apply((cq @ w["W_QR"].T).reshape(-1, H, R).transpose(1, 0, 2), cos, sin).transpose(1, 0, 2)
        return np.concatenate([q_lat, qr], axis=-1).astype(np.float32)


def filled_cache(layer, stream, n, room):
    """An MLA cache (batch 1) holding the first n tokens' latents, with room for ``room`` more."""
    cache = layer.init_cache(1)
    data = np.zeros((1, n + room + 1, stream.D), np.float32)
    stream.keys_into(data[0], 0, n)
    cache.buf.data, cache.buf.n = data, n
    return cache


def exact_topk(q, keys, k):
    """Exact top-k ids (H, k) of q (H, D) over keys (S, D) (ties: argpartition's choice)."""
    s = keys @ q.T  # (S, H)
    part = np.argpartition(-s, k - 1, axis=0)[:k]  # (k, H)
    return part.T


def recall_of(sel, truth):
    return float(np.mean([len(np.intersect1d(a[a >= 0], b)) / len(b) for a, b in zip(sel, truth)]))


def read_time(keys, reps):
    """Seconds to read keys (S, D) once: the fastest of a column sum and a BLAS GEMV."""
    ones = np.ones(len(keys), np.float32)
    best = np.inf
    for _ in range(reps):
        for fn in (lambda: keys.sum(axis=0), lambda: ones @ keys):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
    return best


def stats(times_s):
    t = np.asarray(times_s) * 1e3
    return dict(median_ms=float(np.median(t)), p99_ms=float(np.percentile(t, 99)), max_ms=float(t.max()),
                steps=len(t))


def run_exact(q_steps, cache, stream, args, n_steps):
    times, recalls = [], []
    buf = cache.buf
    n0 = buf.n
    for t in range(n_steps):
        stream.keys_into(buf.data[0, buf.n:buf.n + 1], n0 + t, n0 + t + 1)
        buf.n += 1
        keys = cache.keys
        t0 = time.perf_counter()
        idx, _, _ = select_decode(q_steps[t][None], keys, topk=args.k, scale=1.0)
        times.append(time.perf_counter() - t0)
        if t % args.recall_every == 0:
            recalls.append(recall_of(idx[0], exact_topk(q_steps[t], keys[0], args.k)))
    buf.n = n0
    return times, recalls


def run_torch(torch, q_steps, cache, stream, args, n_steps):
    times = []
    buf = cache.buf
    n0 = buf.n
    for t in range(n_steps):
        stream.keys_into(buf.data[0, buf.n:buf.n + 1], n0 + t, n0 + t + 1)
        buf.n += 1
        keys = torch.from_numpy(cache.keys[0])
        q = torch.from_numpy(q_steps[t])
        t0 = time.perf_counter()
        s = keys @ q.T  # (S, H)
        torch.topk(s, args.k, dim=0)
        times.append(time.perf_counter() - t0)
    buf.n = n0
    return times


def index_mib(selector):
    total = 0
    for ix in selector.indexes:
        for name, val in vars(ix).items():
            if isinstance(val, np.ndarray) and name not in ("_data", "_norms"):
                total += val.nbytes
            elif name == "_gram":
                total += sum(g.nbytes for g in val if g is not None)
        if ix._tr is not None:
            total += sum(a.nbytes for a in ix._tr if a is not None)
    return total / 2**20


def run_lorann(kw, q_steps, train_q, cache, stream, args, n_steps):
    sel = LorannSelector(measure_recall=False, **kw)
    tracemalloc.start()
    t0 = time.perf_counter()
    sel.prefill(cache, train_q[None])  # (1, T, H, D)
    build_s = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    times, recalls = [], []
    buf = cache.buf
    n0 = buf.n
    for t in range(n_steps):
        stream.keys_into(buf.data[0, buf.n:buf.n + 1], n0 + t, n0 + t + 1)
        buf.n += 1
        t0 = time.perf_counter()
        idx = sel(q_steps[t][None], cache, topk=args.k, scale=1.0)
        times.append(time.perf_counter() - t0)
        if t % args.recall_every == 0:
            recalls.append(recall_of(idx[0], exact_topk(q_steps[t], cache.keys[0], args.k)))
    buf.n = n0
    ix = sel.indexes[0]
    ix.wait_maintenance()
    info = dict(build_s=build_s, build_peak_MiB=peak, index_MiB=index_mib(sel), n_clusters=ix.n_clusters,
                jobs=dict(ix.maintenance_jobs), probes=sel._clusters(ix))
    sel.indexes = []
    return times, recalls, info


def one_context(N, layer, stream, args, torch, settings):
    steps = args.steps
    cache = filled_cache(layer, stream, N, steps)
    keys2d = cache.keys[0]
    row = dict(context=N, cache_MiB=keys2d.nbytes / 2**20)
    t_read = read_time(keys2d, 5)
    row.update(read_ms=t_read * 1e3, read_GBps=keys2d.nbytes / t_read / 1e9)
    q_steps = stream.queries(N, N + steps)  # (steps, H, D)
    train_q = stream.queries(max(0, N - args.train_positions), N)  # (T, H, D)
    n_exact = max(3, min(steps, int(args.exact_budget / max(t_read * 10, 1e-4))))
    times, rec = run_exact(q_steps, cache, stream, args, n_exact)
    row["exact"] = dict(stats(times), recall=float(np.mean(rec)))
    if torch is not None:
        row["torch"] = stats(run_torch(torch, q_steps, cache, stream, args, n_exact))
    for name, kw in settings:
        times, rec, info = run_lorann(kw, q_steps, train_q, cache, stream, args, steps)
        row[f"lorann:{name}"] = dict(stats(times), recall=float(np.mean(rec)), **info)
    return row


def growth_run(layer, stream, args, prompt, end):
    """Decode one token a step from ``prompt`` to ``end`` cached tokens: default vs rebuild policy."""
    out = {}
    policies = [("default", {}), ("rebuild x2 (old)", {"refit_factor": 2.0, "split_factor": None,
                                                        "background": False})]
    q_all = None
    for name, kw in policies:
        cache = filled_cache(layer, stream, prompt, end - prompt)
        if q_all is None:
            q_all = stream.queries(prompt, end)
        train_q = stream.queries(max(0, prompt - args.train_positions), prompt)
        sel = LorannSelector(measure_recall=False, **kw)
        t0 = time.perf_counter()
        sel.prefill(cache, train_q[None])
        build_s = time.perf_counter() - t0
        times, recalls = [], []
        buf = cache.buf
        every = max(1, (end - prompt) // 64)
        for t in range(end - prompt):
            stream.keys_into(buf.data[0, buf.n:buf.n + 1], prompt + t, prompt + t + 1)
            buf.n += 1
            t1 = time.perf_counter()
            idx = sel(q_all[t][None], cache, topk=args.k, scale=1.0)
            times.append(time.perf_counter() - t1)
            if t % every == 0 or t == end - prompt - 1:
                recalls.append(recall_of(idx[0], exact_topk(q_all[t], cache.keys[0], args.k)))
        ix = sel.indexes[0]
        ix.wait_maintenance()
        out[name] = dict(stats(times), recall=float(np.mean(recalls)), recall_last=recalls[-1],
                         build_s=build_s, rebuilds=sel.builds - 1, jobs=dict(ix.maintenance_jobs),
                         n_clusters=ix.n_clusters, total_s=float(np.sum(times)))
        print(f"  growth {prompt}->{end} {name}: median {out[name]['median_ms']:.2f} ms, "
              f"p99 {out[name]['p99_ms']:.2f}, max {out[name]['max_ms']:.1f} ms, recall {out[name]['recall']:.3f}, "
              f"rebuilds {out[name]['rebuilds']}, jobs {out[name]['jobs']}", file=sys.stderr, flush=True)
        sel.indexes = []
        del cache
    return out


def print_table(rows, names):
    hdr = f"{'context':>8} {'method':>16} {'median ms':>10} {'p99 ms':>8} {'max ms':>8} {'x read':>7} " \
          f"{'recall':>7} {'build s':>8} {'build MiB':>10} {'index MiB':>10}"
    print(hdr)
    for r in rows:
        print(f"{r['context']:>8} {'read once':>16} {r['read_ms']:>10.2f} {'':>8} {'':>8} {1.0:>7.2f} "
              f"{'':>7} {'':>8} {'':>10} {r['cache_MiB']:>10.0f}  ({r['read_GBps']:.1f} GB/s)")
        for name in names:
            m = r.get(name)
            if m is None:
                continue
            rec = f"{m['recall']:.3f}" if "recall" in m else "-"
            b = f"{m['build_s']:.1f}" if "build_s" in m else "-"
            bp = f"{m['build_peak_MiB']:.0f}" if "build_peak_MiB" in m else "-"
            im = f"{m['index_MiB']:.0f}" if "index_MiB" in m else "-"
            print(f"{'':>8} {name:>16} {m['median_ms']:>10.2f} {m['p99_ms']:>8.2f} {m['max_ms']:>8.2f} "
                  f"{m['median_ms'] / r['read_ms']:>7.2f} {rec:>7} {b:>8} {bp:>10} {im:>10}")


def charts(rows, names):
    """The chart spec (benchmarks/plotting.py): median selection step against the context, with the
    cache read and a fifth of it (the LoRANN goal)."""
    ctx = [r["context"] for r in rows]
    lines = [plotting.series("read the cache once", ctx, [r["read_ms"] for r in rows]),
             plotting.series("read / 5", ctx, [r["read_ms"] / 5 for r in rows])]
    lines += [plotting.series(name, ctx, [r[name]["median_ms"] for r in rows])
              for name in names if all(name in r for r in rows)]
    return [plotting.chart("MLA decode selection, H=16, C=256, R=32, k=64", "cached tokens",
                           "decode selection step (ms, median)", lines, xscale="log", yscale="log")]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", type=positive_int, nargs="+", default=None,
                    help="cached tokens [default: 16384 65536 262144 1048576; --quick: 16384 65536]")
    ap.add_argument("--quick", action="store_true", help="16k and 64k, 48 steps, a short growth run")
    ap.add_argument("--steps", type=int, default=200, help="decode steps timed per context and method")
    ap.add_argument("--exact-budget", type=float, default=10.0,
                    help="about this many seconds of exact/torch steps per context (at least 3 steps)")
    ap.add_argument("--recall-every", type=int, default=5, help="measure recall every this many steps")
    ap.add_argument("--train-positions", type=int, default=512,
                    help="prompt positions whose queries (all heads) train the index")
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--latent", type=int, default=256, help="C")
    ap.add_argument("--rope", type=int, default=32, help="R")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--settings", default=None,
                    help="LoRANN settings as a Python list of (name, kwargs) pairs [default: %(default)s -> "
                         + repr(DEFAULT_SETTINGS) + "]")
    ap.add_argument("--growth", default=None, help="P:E -- the growth run from P to E tokens ('' to skip) "
                    "[default 8192:65536; --quick 4096:16384]")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--threads", default="2", help="BLAS threads (read before NumPy loads)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--png", default=None, help="chart path (default: the JSON path with .png)")
    args = ap.parse_args(argv)
    if args.contexts is None:
        args.contexts = [16384, 65536] if args.quick else [16384, 65536, 262144, 1048576]
    if args.quick:
        args.steps = min(args.steps, 48)
        args.exact_budget = min(args.exact_budget, 3.0)
    growth = args.growth if args.growth is not None else ("4096:16384" if args.quick else "8192:65536")
    settings = DEFAULT_SETTINGS if args.settings is None else ast.literal_eval(args.settings)
    torch = None
    if not args.no_torch:
        try:
            import torch

            torch.set_num_threads(int(os.environ.get("OPENBLAS_NUM_THREADS", "2")))
        except ImportError:
            print("torch not installed: no PyTorch row", file=sys.stderr)
    H, C, R = args.heads, args.latent, args.rope
    layer = MLA(args.d_model, H, 512, C, 64, R, 64, topk=args.k, seed=0, dtype="float32")
    n_max = max(args.contexts + [int(growth.split(":")[1]) if growth else 0]) + args.steps + 8
    stream = TokenStream(layer, args.vocab, n_max, seed=0)
    print(f"MLA H={H} C={C} R={R} k={args.k}, vocab {args.vocab}, BLAS threads "
          f"{os.environ.get('OPENBLAS_NUM_THREADS')}, Numba threads {os.environ.get('NUMBA_NUM_THREADS', 'all')}",
          file=sys.stderr)
    # load the compiled kernels (and compile them on a very first run) outside the timings
    warm = filled_cache(layer, stream, 4096, 8)
    run_lorann({}, stream.queries(4096, 4104), stream.queries(3584, 4096), warm, stream,
               argparse.Namespace(k=args.k, recall_every=1000), 4)
    rows = []
    names = ["exact"] + (["torch"] if torch is not None else []) + [f"lorann:{n}" for n, _ in settings]
    for N in args.contexts:
        t0 = time.perf_counter()
        rows.append(one_context(N, layer, stream, args, torch, settings))
        print(f"context {N}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    print_table(rows, names)
    out = {"args": vars(args), "settings": [[n, kw] for n, kw in settings], "rows": rows}
    if growth:
        p, e = (int(v) for v in growth.split(":"))
        out["growth"] = growth_run(layer, stream, args, p, e)
        print(f"\ngrowth run: one token a step from {p} to {e} cached tokens")
        print(f"{'policy':>18} {'median ms':>10} {'p99 ms':>8} {'max ms':>8} {'recall':>7} {'rebuilds':>9} "
              f"{'splits':>7} {'refits':>7} {'clusters':>9}")
        for name, g in out["growth"].items():
            print(f"{name:>18} {g['median_ms']:>10.2f} {g['p99_ms']:>8.2f} {g['max_ms']:>8.1f} {g['recall']:>7.3f} "
                  f"{g['rebuilds']:>9} {g['jobs']['split']:>7} {g['jobs']['refit']:>7} {g['n_clusters']:>9}")
    out["peak_rss_MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak resident memory of the process: {out['peak_rss_MiB']:.0f} MiB")
    out["plots"] = charts(rows, names)
    if args.json:
        from topkattn.storage import atomic_write_json

        atomic_write_json(args.json, out, prefix=".bench-")
    plotting.save_png(out["plots"], plotting.png_path(args.png, args.json), title="long-context decode")
    return out


if __name__ == "__main__":
    main()
