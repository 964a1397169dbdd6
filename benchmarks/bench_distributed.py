"""Strong scaling of the MPI modes (1 -> N ranks), bytes sent per step, and a cost model that
projects sharded decode to 10M tokens on 64 ranks.

    mpiexec -n 2 python benchmarks/bench_distributed.py [--quick] [--json PATH] [--plot PATH]
    python benchmarks/bench_distributed.py --quick      # one rank: the 1-rank side only

What is measured (fixed global problem, one run).  Every workload is timed first on a
sub-communicator of size 1 (rank 0 alone, ``comm.Split``; the other ranks wait in a sleeping
``Ibarrier`` poll so they do not spin on a core), then on all N ranks.  The workloads with
keys (cp, decode) are also timed on rank 0 alone at S/2 (for the compute fit) and with every
rank alone on S/N keys at the same time ("busy S/N": the sharded compute with every core busy,
no communication): tN minus it is what communication and waiting for the slower rank cost,
t1(S/2) minus it is what sharing the cores costs.  Each timing is the median over ``--reps``
repeats (one warm-up call first, a barrier before every repeat; a repeat's time is the
slowest rank's).  speedup = t1 / tN, efficiency = t1 / (N tN).  Workloads:

  cp-fwd, cp-fwd+bwd  context-parallel exact top-k attention (topkattn.distributed.
                      context_parallel), keys sharded along S in contiguous slices; default
                      B=1 H=8 G=2 T=256 S=8192 D=Dv=64 k=16 (``--quick``: S=4096, T=128).
  decode              one decode step of an MLA layer with its latent cache sharded by position
                      (topkattn.distributed.ShardedMLA, exact selection, round-robin blocks of 64):
                      each rank stores S/N latents of C+R=288 (random, filled before timing),
                      scores them, one Allgather merges the candidates, each rank attends its own
                      selected keys and one Allreduce merges the outputs; the query and output
                      projections (d=512, Lq=128) are replicated.  Default S=65536, H=16, k=64
                      (``--quick``: S=16384).
  head-par            forward + backward (softmax cross-entropy) of a 2-layer MLA Transformer
                      with head_parallel(model, comm): heads split, embedding/FFN replicated.
  data-par            one data-parallel training step without the optimizer: forward + backward
                      of this rank's rows of a fixed global batch, then GradientReducer (one fused
                      float64 Allreduce of every gradient).  train_data_parallel itself runs a
                      whole training job (config, files), so the step is assembled here from the
                      module's GradientReducer, as train_data_parallel does inside train().

Bytes: the library receives a counting proxy of the communicator that forwards everything and
counts, per call, the bytes THIS rank hands to the collective (Allgather/Allreduce: nbytes of
the send buffer; pickled ``allgather``: len(pickle.dumps(obj))).  The table shows rank 0's
count per step.  On one rank nothing leaves the process, so 1-rank bytes are reported as 0.

Cost model (decode and the context-parallel op).  Per step, for P ranks, rows = B*H (decode)
or B*H*T (context parallel), M = min(k, S) candidates per row, itemsize w (float32: 4):

  decode  payload = 8 + rows*8 + rows*M*(w + 4)          2 collectives: one Allgather (status,
          + rows*C*w                                      forced logsumexp, M scores and int32
                                                          positions per row), one Allreduce of
                                                          the (B, H, C) partial outputs
  cp fwd  payload = pk(None) + pk(shard) + rows*M*(w + 8) 6 collectives: agree, shard layout
                    + rows*w + rows*Dv*w                  (pickled), Allgather scores, indices,
                                                          lse; Allreduce out
  cp bwd  adds    pk(None) + rows*D*w                     2 more: agree, Allreduce dq

pk(x) = len(pickle.dumps(x)), checked against the proxy's count.  On the wire each rank of a
ring sends (P - 1) n for an Allgather of n bytes per rank and 2 (P - 1) / P n for an Allreduce
of n bytes (``wire`` bytes), so

  latency(P) = alpha * collectives * ceil(log2 P) + wire(P) / beta + a + b * S / P

alpha and beta are fitted (least squares, t = alpha + n / beta) from a ping-pong of Allgather
and Allreduce at a few sizes on all N ranks of this run; a (fixed cost per step) and b (per
key) from the 1-rank times at S and S/2.  The model's 2-rank prediction is printed beside the
measurement.  The projection (decode, S = 10M tokens, 64 ranks) uses the fitted constants and,
as a second row, assumed datacenter constants alpha = 5 us, beta = 10 GB/s (with this run's
compute fit).  Each rank holds S/P latents (S (C+R) w / P bytes): the cache is sharded, not only
the search.  The model ignores the merge's growth with P (P*M candidates ranked per row).

Read the numbers with care: this machine is shared and has 2 cores; with 2 ranks both cores
are busy, so any other load lands on the ranks, and the interconnect is shared memory
(alpha, beta here are far better than a network's).  Ratios come from one run.  BLAS runs on
``--threads`` threads per rank (default 1).
"""
import argparse
import math
import os
import pickle
import time

if __name__ == "__main__":  # BLAS threads must be fixed before NumPy loads (see --threads)
    from blas_env import threads_from_argv

    threads_from_argv()

import numpy as np
import plotting

from topkattn.distributed.comm import require_mpi

DATACENTER = {"alpha_s": 5e-6, "beta_Bps": 10e9}


def _protocol():
    MPI = require_mpi()
    return getattr(getattr(MPI, "pickle", None), "PROTOCOL", pickle.HIGHEST_PROTOCOL)


def pk(obj):
    """Bytes of a pickled ``allgather`` object, as the proxy counts them."""
    return len(pickle.dumps(obj, protocol=_protocol()))


def _nbytes(buf):
    if isinstance(buf, (list, tuple)):
        buf = buf[0]
    return int(np.asarray(buf).nbytes)


class CountingComm:
    """An mpi4py communicator that counts the collectives and the bytes this rank sends."""

    def __init__(self, comm):
        self._comm = comm
        self.reset()

    def reset(self):
        self.calls, self.bytes, self.kinds = 0, 0, {}

    def _add(self, kind, n):
        n = n if self._comm.Get_size() > 1 else 0  # one rank: nothing leaves the process
        self.calls += 1
        self.bytes += n
        c, b = self.kinds.get(kind, (0, 0))
        self.kinds[kind] = (c + 1, b + n)

    @property
    def size(self):
        return self._comm.Get_size()

    @property
    def rank(self):
        return self._comm.Get_rank()

    def Get_size(self):
        return self._comm.Get_size()

    def Get_rank(self):
        return self._comm.Get_rank()

    def allgather(self, obj):
        self._add("allgather", pk(obj))
        return self._comm.allgather(obj)

    def Allgather(self, sendbuf, recvbuf):
        self._add("Allgather", _nbytes(sendbuf))
        return self._comm.Allgather(sendbuf, recvbuf)

    def Allreduce(self, sendbuf, recvbuf, op=None):
        MPI = require_mpi()
        self._add("Allreduce", _nbytes(recvbuf if sendbuf is MPI.IN_PLACE else sendbuf))
        return self._comm.Allreduce(sendbuf, recvbuf, op=MPI.SUM if op is None else op)

    def bcast(self, obj, root=0):
        self._add("bcast", pk(obj) if self.rank == root else 0)
        return self._comm.bcast(obj, root=root)

    def Barrier(self):
        self._add("Barrier", 0)
        return self._comm.Barrier()

    def Split(self, color=0, key=0):
        return CountingComm(self._comm.Split(color, key))

    def __getattr__(self, name):  # everything else goes through uncounted
        return getattr(self._comm, name)


# -- timing -------------------------------------------------------------------------------------
def timed(raw, cc, make_step, reps):
    """Median step seconds (slowest rank per repeat), counted collectives and bytes per step."""
    step = make_step(cc)
    step()  # warm-up (Numba compile, caches)
    cc.reset()
    times = []
    for _ in range(reps):
        raw.Barrier()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    every = raw.allgather(times)
    worst = np.max(np.array(every), axis=0)
    kinds = {k: [c / reps, b / reps] for k, (c, b) in cc.kinds.items()}
    return {"median_s": float(np.median(worst)), "best_s": float(np.min(worst)),
            "collectives": cc.calls / reps, "bytes": cc.bytes / reps, "by_kind": kinds}


def idle_wait(world):
    """Wait for rank 0's solo phase without spinning on a core."""
    req = world.Ibarrier()
    while not req.Test():
        time.sleep(0.002)


# -- workloads ----------------------------------------------------------------------------------
def cp_workload(a, S, backward):
    from topkattn.distributed import topk_attention_backward, topk_attention_forward

    rng = np.random.default_rng(0)
    B, H, G, T, D = 1, a.cp_heads, 2, a.cp_queries, 64
    q = rng.standard_normal((B, H, T, D), dtype=np.float32)
    k = rng.standard_normal((B, G, S, D), dtype=np.float32)
    v = rng.standard_normal((B, G, S, D), dtype=np.float32)
    dout = rng.standard_normal((B, H, T, D), dtype=np.float32)

    def make(cc):
        P, r = cc.size, cc.rank
        lo, hi = r * S // P, (r + 1) * S // P
        kl, vl = np.ascontiguousarray(k[:, :, lo:hi]), np.ascontiguousarray(v[:, :, lo:hi])

        def step():
            out, saved = topk_attention_forward(q, kl, vl, comm=cc, topk=a.cp_topk, key_offset=lo)
            if backward:
                topk_attention_backward(dout, saved)
        return step

    return make


DEC_C, DEC_R, DEC_WIDTH = 256, 32, 512


def decode_workload(a, S):
    from topkattn.distributed import ShardedMLA
    from topkattn.layers import MLA

    rng = np.random.default_rng(1)
    layer = MLA(DEC_WIDTH, a.dec_heads, 128, DEC_C, 64, DEC_R, 64, topk=a.dec_topk, seed=0)
    layer.training = False
    latents = rng.standard_normal((1, S, DEC_C + DEC_R), dtype=np.float32)  # the same on every rank
    x = rng.standard_normal((1, 1, DEC_WIDTH), dtype=np.float32)

    def make(cc):
        sharded = ShardedMLA(layer, cc, block=64)
        cache = sharded.init_cache(1)
        cache.extend(latents)  # each rank keeps only the positions it owns

        def step():
            sharded.step(x, cache)  # one more token each call (S + reps + 1 at most)
        return step

    return make


def _small_model_cfg(a):
    from topkattn.model import TransformerConfig

    return TransformerConfig(vocab_size=256, d_model=a.model_width, n_layers=2, n_heads=8, q_lora_rank=64,
                             kv_lora_rank=64, qk_nope_dim=32, qk_rope_dim=16, v_head_dim=32,
                             d_ff=2 * a.model_width, topk=16, seed=0)


def _batch(a):
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 256, size=(a.model_batch, a.model_seq + 1))
    return tokens[:, :-1], tokens[:, 1:]


def head_parallel_workload(a):
    from topkattn.distributed import head_parallel
    from topkattn.layers.loss import softmax_cross_entropy
    from topkattn.model import Transformer

    x, y = _batch(a)

    def make(cc):
        model = head_parallel(Transformer(_small_model_cfg(a)), cc)

        def step():
            logits = model.forward(x)
            _, dl = softmax_cross_entropy(logits, y)
            model.backward(dl)
        return step

    return make


def data_parallel_workload(a):
    from topkattn.distributed import GradientReducer, split_rows
    from topkattn.layers.loss import softmax_cross_entropy
    from topkattn.model import Transformer

    x, y = _batch(a)

    def make(cc):
        model = Transformer(_small_model_cfg(a))
        lo, hi = split_rows(a.model_batch, cc.rank, cc.size)
        reducer = GradientReducer(cc)
        weight = (hi - lo) / a.model_batch

        def step():
            logits = model.forward(x[lo:hi])
            loss, dl = softmax_cross_entropy(logits, y[lo:hi])
            model.backward(dl)
            reducer(model.params, model.grads, loss, model.aux_loss, weight)
        step()  # the reducer's first call also checks the layout (one allgather): not a step's cost
        return step

    return make


# -- communication fit ------------------------------------------------------------------------
def pingpong(world, sizes, reps):
    """Median seconds of Allgather and Allreduce of n bytes per rank; (kind, n, wire, t) rows."""
    MPI = require_mpi()
    P = world.Get_size()
    rows = []
    for n in sizes:
        m = max(1, n // 8)
        send = np.ones(m, dtype=np.float64)
        for kind in ("Allgather", "Allreduce"):
            recv = np.empty(m * P if kind == "Allgather" else m, dtype=np.float64)
            times = []
            for i in range(reps + 2):
                world.Barrier()
                t0 = time.perf_counter()
                if kind == "Allgather":
                    world.Allgather(send, recv)
                else:
                    world.Allreduce(send, recv, op=MPI.SUM)
                if i >= 2:
                    times.append(time.perf_counter() - t0)
            t = float(np.median(np.max(np.array(world.allgather(times)), axis=0)))
            rows.append({"kind": kind, "bytes": 8 * m, "wire_bytes": wire(kind, 8 * m, P), "median_s": t})
    small = []
    for i in range(reps + 2):
        world.Barrier()
        t0 = time.perf_counter()
        world.allgather(None)
        if i >= 2:
            small.append(time.perf_counter() - t0)
    pickled = float(np.median(np.max(np.array(world.allgather(small)), axis=0)))
    return rows, pickled


def fit_alpha_beta(rows):
    """Least squares t = alpha + wire / beta over the ping-pong rows (log2 P rounds: P = 2 here)."""
    n = np.array([r["wire_bytes"] for r in rows], dtype=np.float64)
    t = np.array([r["median_s"] for r in rows], dtype=np.float64)
    A = np.stack([np.ones_like(n), n], axis=1)
    w = 1.0 / t  # relative errors: the small messages matter as much as the large ones
    (alpha, inv_beta), *_ = np.linalg.lstsq(A * w[:, None], t * w, rcond=None)
    alpha = float(alpha) if alpha > 0 else 0.5 * float(t.min())  # noise: half the smallest time
    inv_beta = max(float(inv_beta), 1e-15)
    return alpha, 1.0 / inv_beta


def wire(kind, n, P):
    if P <= 1:
        return 0.0
    return (P - 1) * n if kind in ("Allgather", "allgather") else 2.0 * (P - 1) / P * n


# -- cost model ------------------------------------------------------------------------------------
def decode_bytes(P, B, H, S, k, C=DEC_C, itemsize=4):
    """[(kind, payload bytes this rank sends)] of one sharded MLA decode step (exact selection):
    the packed Allgather (status word, forced logsumexp, M scores and positions per row) and the
    Allreduce of the (B, H, C) partial outputs.  Positions are int32 below 2**31 keys."""
    M = min(k, S)
    rows = B * H
    pos = 4 if S < 2**31 else 8
    return [("Allgather", 8 + rows * 8 + rows * M * (itemsize + pos)), ("Allreduce", rows * C * itemsize)]


def cp_bytes(P, B, H, G, T, S, D, Dv, k, backward, itemsize=4, rank=0):
    """[(kind, payload bytes)] of one context-parallel forward (and backward) on ``rank``."""
    M = min(k, S)
    rows = B * H * T
    off, Sp = rank * S // P, (rank + 1) * S // P - rank * S // P
    shard = (off, Sp, (B, H, T, D), B, G, D, Dv, np.dtype(np.float32).str)
    out = [("allgather", pk(None)), ("allgather", pk(shard)), ("Allgather", rows * M * itemsize),
           ("Allgather", rows * M * 8), ("Allgather", rows * itemsize), ("Allreduce", rows * Dv * itemsize)]
    if backward:
        out += [("allgather", pk(None)), ("Allreduce", rows * D * itemsize)]
    return out


def model_latency(colls, P, S, alpha, beta, a_fix, b_key):
    """(comm seconds, compute seconds, total) of the cost model."""
    rounds = math.ceil(math.log2(P)) if P > 1 else 0
    wire_b = sum(wire(kind, n, P) for kind, n in colls)
    comm = alpha * len(colls) * rounds + wire_b / beta if P > 1 else 0.0
    comp = a_fix + b_key * S / P
    return comm, comp, comm + comp


def fit_compute(t_full, t_half, S):
    """a (fixed s/step) and b (s/key) from the 1-rank times at S and S/2."""
    b = (t_full - t_half) / (S - S // 2)
    a = t_full - b * S
    if b <= 0 or a < 0:  # noise: all of the time per key
        a, b = 0.0, t_full / S
    return a, b


# -- main -----------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller problems and fewer repeats (about 1 minute)")
    ap.add_argument("--reps", type=int, default=None, help="timed repeats per measurement (default 5, quick 3)")
    ap.add_argument("--cp-keys", type=int, default=None, help="S of the context-parallel op (default 8192)")
    ap.add_argument("--cp-queries", type=int, default=None, help="T of the context-parallel op (default 256)")
    ap.add_argument("--cp-heads", type=int, default=8)
    ap.add_argument("--cp-topk", type=int, default=16)
    ap.add_argument("--dec-keys", type=int, default=None, help="latent cache length (default 65536)")
    ap.add_argument("--dec-heads", type=int, default=16)
    ap.add_argument("--dec-topk", type=int, default=64)
    ap.add_argument("--model-width", type=int, default=None, help="d_model of the 2-layer model (default 256)")
    ap.add_argument("--model-seq", type=int, default=None, help="tokens per sequence (default 256)")
    ap.add_argument("--model-batch", type=int, default=4, help="global batch (a multiple of the ranks)")
    ap.add_argument("--project-tokens", type=int, default=10_000_000)
    ap.add_argument("--project-ranks", type=int, default=64)
    ap.add_argument("--threads", default="1", help="BLAS threads per rank (default 1)")
    ap.add_argument("--json", default=None, help="write every number to this path")
    ap.add_argument("--plot", default=None, help="write the charts as a PNG here (needs matplotlib) "
                                                 "[default: the --json path with .png]")
    a = ap.parse_args(argv)
    q = a.quick
    a.reps = a.reps or (3 if q else 5)
    a.cp_keys = a.cp_keys or (4096 if q else 8192)
    a.cp_queries = a.cp_queries or (128 if q else 256)
    a.dec_keys = a.dec_keys or (16384 if q else 65536)
    a.model_width = a.model_width or (128 if q else 256)
    a.model_seq = a.model_seq or (128 if q else 256)

    MPI = require_mpi()
    world = MPI.COMM_WORLD
    rank, N = world.Get_rank(), world.Get_size()
    say = print if rank == 0 else (lambda *x, **k: None)
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]

    comm_fit = None
    if N > 1:
        sizes = [8, 1024, 16384, 262144] + ([] if q else [2 ** 21])
        pp, pickled_s = pingpong(world, sizes, reps=10 if q else 20)
        alpha, beta = fit_alpha_beta(pp)
        comm_fit = {"alpha_s": alpha, "beta_Bps": beta, "pingpong": pp, "pickled_allgather_none_s": pickled_s}

    workloads = [
        ("cp-fwd", lambda S: cp_workload(a, S, False), a.cp_keys),
        ("cp-fwd+bwd", lambda S: cp_workload(a, S, True), a.cp_keys),
        ("decode", lambda S: decode_workload(a, S), a.dec_keys),
        ("head-par", lambda S: head_parallel_workload(a), None),
        ("data-par", lambda S: data_parallel_workload(a), None),
    ]
    raw_sub = world.Split(0 if rank == 0 else MPI.UNDEFINED, rank)
    raw_solo = world.Split(rank, 0)
    rows = []
    for name, build, S in workloads:
        res = {"workload": name, "S": S, "ranks": N}
        if rank == 0:
            sub = CountingComm(raw_sub)
            res["t1"] = timed(raw_sub, sub, build(S), a.reps)
            if S is not None:
                res["t1_half"] = timed(raw_sub, sub, build(S // 2), a.reps)
        if N > 1:
            if rank == 0:
                world.Ibarrier().Wait()
            else:
                idle_wait(world)
            res["tN"] = timed(world, CountingComm(world), build(S), a.reps)
            if S is not None:  # every rank alone on S/N keys at once: the compute with all cores busy
                world.Barrier()
                res["t1_busy"] = timed(raw_solo, CountingComm(raw_solo), build(S // N), a.reps)
        rows.append(res)
        say(f"  [{time.perf_counter() - t_start:6.1f} s] {name} done", flush=True)

    if rank != 0:
        return None

    # -- model check --------------------------------------------------------------------------
    cp_shape = dict(B=1, H=a.cp_heads, G=2, T=a.cp_queries, D=64, Dv=64, k=a.cp_topk)
    for r in rows:
        t1 = r["t1"]["median_s"]
        if "tN" in r:
            tN = r["tN"]["median_s"]
            r["speedup"] = t1 / tN
            r["efficiency"] = t1 / (N * tN)
            r["residual_s"] = tN - t1 / N  # what ideal sharding does not explain: comm + contention
        if r["S"] is None:
            continue
        S = r["S"]
        r["compute_fit"] = dict(zip(("a_s", "b_s_per_key"), fit_compute(t1, r["t1_half"]["median_s"], S)))
        if r["workload"] == "decode":
            colls = decode_bytes(N, 1, a.dec_heads, S, a.dec_topk)
        else:
            colls = cp_bytes(N, S=S, backward=r["workload"] == "cp-fwd+bwd", **cp_shape)
        r["model_collectives"] = len(colls)
        r["model_bytes"] = sum(n for _, n in colls) if N > 1 else 0
        if comm_fit is not None:
            cm, cp, tot = model_latency(colls, N, S, comm_fit["alpha_s"], comm_fit["beta_Bps"],
                                        r["compute_fit"]["a_s"], r["compute_fit"]["b_s_per_key"])
            r["model_tN"] = {"comm_s": cm, "compute_s": cp, "total_s": tot}
            r["model_over_measured"] = tot / r["tN"]["median_s"]

    # -- projection -------------------------------------------------------------------------------
    dec = next(r for r in rows if r["workload"] == "decode")
    P, S = a.project_ranks, a.project_tokens
    colls = decode_bytes(P, 1, a.dec_heads, S, a.dec_topk)
    consts = ([("fitted (this run)", comm_fit)] if comm_fit else []) + [("datacenter (assumed)", DATACENTER)]
    proj = []
    for label, c in consts:
        cm, cp, tot = model_latency(colls, P, S, c["alpha_s"], c["beta_Bps"], dec["compute_fit"]["a_s"],
                                    dec["compute_fit"]["b_s_per_key"])
        proj.append({"constants": label, "alpha_s": c["alpha_s"], "beta_Bps": c["beta_Bps"], "ranks": P,
                     "tokens": S, "collectives": len(colls), "payload_bytes": sum(n for _, n in colls),
                     "wire_bytes": sum(wire(k, n, P) for k, n in colls), "comm_s": cm, "compute_s": cp,
                     "latency_s": tot, "cache_bytes_per_rank": S * (DEC_C + DEC_R) * 4 / P})

    # -- report -------------------------------------------------------------------------------------
    say(f"\nbench_distributed: {N} MPI rank(s) on a shared {os.cpu_count()}-core machine (BLAS threads "
        f"{os.environ.get('OPENBLAS_NUM_THREADS')} per rank); median of {a.reps} repeats, one run."
        + ("" if N > 1 else "\nONE RANK: only the 1-rank side is measured; no scaling, no fitted "
           "alpha/beta (run under mpiexec -n 2)."))
    say(f"cp: B=1 H={a.cp_heads} G=2 T={a.cp_queries} S={a.cp_keys} D=64 k={a.cp_topk}; decode: MLA step, "
        f"S={a.dec_keys} latents of 288 sharded, H={a.dec_heads}, k={a.dec_topk}; model: 2 layers "
        f"d={a.model_width} 8 heads T={a.model_seq} batch {a.model_batch}")
    hdr = ("workload", "1 rank ms", f"{N} ranks ms" if N > 1 else "- ranks ms", "speedup", "effic.",
           f"busy S/{N} ms" if N > 1 else "busy ms", "colls/step", "B sent/step", "model B", "model ms", "model/meas")
    say(" | ".join(f"{h:>11}" for h in hdr))
    for r in rows:
        tn = r.get("tN")
        m = r.get("model_tN")
        vals = (r["workload"], f"{1e3 * r['t1']['median_s']:.2f}",
                f"{1e3 * tn['median_s']:.2f}" if tn else "-",
                f"{r['speedup']:.2f}x" if tn else "-", f"{r['efficiency']:.0%}" if tn else "-",
                f"{1e3 * r['t1_busy']['median_s']:.2f}" if "t1_busy" in r else "-",
                f"{(tn or r['t1'])['collectives']:g}", f"{(tn or r['t1'])['bytes']:.0f}",
                f"{r['model_bytes']}" if "model_bytes" in r else "-",
                f"{1e3 * m['total_s']:.2f}" if m else "-",
                f"{r['model_over_measured']:.2f}" if m else "-")
        say(" | ".join(f"{v:>11}" for v in vals))
    if N > 1:
        say(f"read: model = alpha/beta comm + compute fit at S/{N} on an idle core; 'busy S/{N}' is that compute "
            f"with all {N} ranks running at once (no comm); {N} ranks minus busy = collectives + waiting for the "
            f"slower rank (with other load on these cores a rank descheduled in a collective stalls the others).")
    if comm_fit:
        say(f"fitted on this run: alpha = {1e6 * comm_fit['alpha_s']:.1f} us per collective round, "
            f"beta = {comm_fit['beta_Bps'] / 1e9:.2f} GB/s (Allgather/Allreduce ping-pong, {N} ranks, shared "
            f"memory); pickled allgather(None): {1e6 * comm_fit['pickled_allgather_none_s']:.1f} us")
    for r in rows:
        if "compute_fit" in r:
            f = r["compute_fit"]
            say(f"compute fit {r['workload']:>10}: a = {1e3 * f['a_s']:.3f} ms/step + "
                f"b = {1e9 * f['b_s_per_key']:.1f} ns/key (1 rank at S={r['S']} and {r['S'] // 2})")
    say(f"\nprojection: decode step over {S:,} tokens on {P} ranks (H={a.dec_heads}, k={a.dec_topk}, "
        f"C+R=288 float32; cache per rank {proj[0]['cache_bytes_per_rank'] / 2**30:.2f} GiB: S/{P} latents)")
    hdr2 = ("constants", "alpha us", "beta GB/s", "colls", "payload B", "wire B/rank", "comm ms", "compute ms",
            "latency ms")
    say(" | ".join(f"{h:>20}" if i == 0 else f"{h:>11}" for i, h in enumerate(hdr2)))
    for p in proj:
        vals = (p["constants"], f"{1e6 * p['alpha_s']:.2f}", f"{p['beta_Bps'] / 1e9:.2f}", p["collectives"],
                p["payload_bytes"], f"{p['wire_bytes']:.0f}", f"{1e3 * p['comm_s']:.3f}",
                f"{1e3 * p['compute_s']:.2f}", f"{1e3 * p['latency_s']:.2f}")
        say(" | ".join(f"{v:>20}" if i == 0 else f"{v:>11}" for i, v in enumerate(vals)))
    load = (load_start, os.getloadavg()[0])
    say(f"(total {time.perf_counter() - t_start:.0f} s; 1-minute load average {load[0]:.2f} at the start, "
        f"{load[1]:.2f} at the end, on {os.cpu_count()} cores: other processes share these cores)")

    charts = distributed_charts(rows, N, dec, colls_fn=lambda p: decode_bytes(p, 1, a.dec_heads, S, a.dec_topk),
                                S=S, consts=consts)
    out = {"args": vars(a), "ranks": N, "cpu_count": os.cpu_count(), "load_average_1min": list(load),
           "comm_fit": comm_fit, "rows": rows,
           "projection": proj, "assumed_datacenter": DATACENTER,
           "note": "shared 2-core machine; N ranks on N cores over shared memory; one run", "plots": charts}
    if a.json:
        from topkattn.storage import atomic_write_json

        atomic_write_json(a.json, out, prefix=".bench-")
    plotting.save_png(charts, plotting.png_path(a.plot, a.json), title=f"bench_distributed: {N} MPI rank(s)")
    return out


def distributed_charts(rows, N, dec, colls_fn, S, consts):
    """The measured time per step against the ranks (1 and N) per workload, and the cost model's
    sharded decode latency over S tokens for 1..128 ranks, per set of constants."""
    measured = []
    for r in rows:
        ts = [r["t1"]["median_s"]] + ([r["tN"]["median_s"]] if "tN" in r else [])
        measured.append(plotting.series(r["workload"], [1, N][:len(ts)], [1e3 * t for t in ts]))
    ranks = [2 ** i for i in range(0, 8)]
    model = []
    for label, c in consts:
        lat = [1e3 * model_latency(colls_fn(p), p, S, c["alpha_s"], c["beta_Bps"], dec["compute_fit"]["a_s"],
                                   dec["compute_fit"]["b_s_per_key"])[2] for p in ranks]
        model.append(plotting.series(label, ranks, lat))
    return [plotting.chart("measured (shared 2-core machine)", "ranks", "ms per step", measured, yscale="log"),
            plotting.chart(f"model: sharded MLA decode step over {S:,} tokens", "ranks", "ms per decode step",
                           model, xscale="log", yscale="log")]

if __name__ == "__main__":
    main()
