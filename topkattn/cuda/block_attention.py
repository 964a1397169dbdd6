"""CUDA block top-k attention (MoBA): block selection and a fused forward, no (T, S) matrix.

Shape letters: B batch, H query heads, G KV heads (H % G == 0), T queries, S keys, D head
dim, Dv value dim, Nb key blocks, Kb selected blocks per query, M ranked blocks per query
(Kb - 1 under causal, the own block taking slot 0; else Kb).

Selection kernel: one block per (query tile of TQ queries, batch*head), one thread per query.

    the block means (B, G, Nb, D) come from ``block_selection.block_means`` (xp);
    for each tile of TS means: the block loads it into shared memory, each thread scores
    its query's gate q . mean_n (unscaled; NaN -> +inf) for its candidate blocks
    n < n_cand[t] and offers them to a running top-M buffer in thread-local memory
    (ties to the lower block: ``topk_select.device_functions``' insert);
    blocks[b, h, t] = [own block (causal) | the M ranked blocks], -1 padded

Forward kernel: one thread per query row (b, h, t): for each selected block, every key of
it the query sees (j < end[t]), s = scale * q . k_j, an online softmax (running max m,
sum l, accumulator o rescaled by e^(m - m') when the max grows); out = o / l, lse = m + log l.
A NaN or +inf score gives a NaN row (out, lse); a row with no key (or only -inf scores)
gives zeros and lse -inf; every attended value enters o (so a NaN value reaches the row, as
0 * NaN does in the reference).  Backward: :func:`topkattn.cuda.sparse_backward.sparse_backward`
on the expanded token indices (``block_selection.expand_blocks``).
Reference: :func:`topkattn.ops.reference.block_topk_attention_reference` (blocks equal to
``block_selection.select_blocks``).
"""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda, types

from topkattn.backend import Array
from topkattn.cuda.launch import array_module, cdiv, launch, pow2_at_least, simulator_enabled
from topkattn.cuda.topk_select import device_functions
from topkattn.ops.block_selection import BlockBounds, block_means

MAX_RANKED = 1024  # thread-local buffer limit (topk_blocks - 1 under causal)
MAX_DIM = 256  # D and Dv limit (thread-local query and accumulator)
SHARED_TILE_BYTES = 16 * 1024
THREADS = 128


def block_forward(q: Array, k: Array, v: Array, *, bounds: BlockBounds, scale: float) -> tuple[Array, Array, Array]:
    """(out (B, H, T, Dv), blocks (B, H, T, Kb) int64, lse (B, H, T)) by the CUDA kernels.

    ``bounds``: the :class:`~topkattn.ops.block_selection.BlockBounds` of the call; ``scale``
    multiplies q.k.  CuPy arrays (NumPy under the simulator), validated by
    :func:`topkattn.ops.block_attention.block_topk_attention_forward`.
    """
    xp = array_module(q, k, v)
    B, H, T, D = q.shape
    Dv = v.shape[3]
    check_limits(bounds.m, D, Dv)
    blocks = block_select(q, k, bounds=bounds)
    out = xp.zeros((B, H, T, Dv), dtype=q.dtype)
    lse = xp.full((B, H, T), -np.inf, dtype=q.dtype)
    if B * H * T == 0 or bounds.n_sel == 0:
        return out, blocks, lse
    q, k, v = (xp.ascontiguousarray(a) for a in (q, k, v))
    threads = 32 if simulator_enabled() else THREADS
    launch(_forward_kernel(D, Dv, q.dtype.char), cdiv(B * H * T, threads), threads, q, k, v, blocks,
           xp.asarray(bounds.end), bounds.block_size, float(scale), out, lse)
    return out, blocks, lse


def block_select(q: Array, k: Array, *, bounds: BlockBounds, means: Array | None = None) -> Array:
    """(B, H, T, Kb) int64 selected blocks in rank order (own block first under causal), -1 padded.

    ``means`` (B, G, Nb, D): the block means when already computed.
    """
    xp = array_module(q, k)
    B, H, T, D = q.shape
    blocks = xp.full((B, H, T, bounds.n_sel), -1, dtype=xp.int64)
    if B * H * T == 0 or bounds.n_sel == 0:
        return blocks
    m = bounds.m
    check_limits(m, max(D, 1), 1)
    means = xp.ascontiguousarray(block_means(k, bounds.block_size) if means is None else means)
    if simulator_enabled():
        TQ, TS = 4, 4  # several blocks and tiles even at tiny test shapes
    else:
        TQ = 64
        TS = max(1, min(64, SHARED_TILE_BYTES // (max(D, 1) * q.dtype.itemsize)))
    kern = _select_kernel(pow2_at_least(m, 8), max(D, 1), TQ, TS, q.dtype.char)
    n_own = 1 if bounds.causal else 0
    launch(kern, (cdiv(T, TQ), B * H), TQ, xp.ascontiguousarray(q), means, xp.asarray(bounds.own),
           xp.asarray(bounds.n_cand), m, n_own, blocks)
    return blocks


def check_limits(m: int, D: int, Dv: int) -> None:
    """Raise ValueError when a shape exceeds what the kernels keep in thread-local memory."""
    if m > MAX_RANKED:
        raise ValueError(f"the CUDA block selection ranks at most {MAX_RANKED} blocks per query, got {m}; "
                         "use impl='numpy'")
    if not (1 <= D <= MAX_DIM and 1 <= Dv <= MAX_DIM):
        raise ValueError(f"the CUDA block kernels support head dims 1..{MAX_DIM}, got D={D}, Dv={Dv}; "
                         "use impl='numpy'")


@functools.cache
def _select_kernel(MCAP, D, TQ, TS, dchar):
    """Specialised on the head dim (the query stays in registers) and the tile sizes."""
    vt = types.float32 if dchar == "f" else types.float64
    cast = np.float32 if dchar == "f" else np.float64
    _, topm_insert = device_functions()
    INF = math.inf

    @cuda.jit
    def select_kernel(q, means, own, n_cand, m, n_own, blocks):
        H, T = q.shape[1], q.shape[2]
        G, Nb = means.shape[1], means.shape[2]
        Dq = q.shape[3]
        tx = cuda.threadIdx.x
        t = cuda.blockIdx.x * TQ + tx
        bh = cuda.blockIdx.y
        b = bh // H
        h = bh - b * H
        g = h // (H // G)
        live = t < T
        mtile = cuda.shared.array((TS, D), vt)
        qreg = cuda.local.array(D, vt)
        bv = cuda.local.array(MCAP, vt)
        bi = cuda.local.array(MCAP, types.int64)
        nc = 0
        if live:
            nc = n_cand[t]
            for d in range(Dq):
                qreg[d] = q[b, h, t, d]
        n_cols = n_cand[min(T, (cuda.blockIdx.x + 1) * TQ) - 1]  # n_cand is non-decreasing in t
        n = 0
        for j0 in range(0, n_cols, TS):
            cuda.syncthreads()
            for x in range(tx, TS * D, TQ):
                jj = x // D
                d = x - jj * D
                j = j0 + jj
                mtile[jj, d] = means[b, g, j, d] if j < Nb and d < Dq else cast(0)
            cuda.syncthreads()
            if live and m > 0:
                for jj in range(min(TS, nc - j0)):
                    acc = cast(0)
                    for d in range(Dq):
                        acc += qreg[d] * mtile[jj, d]
                    if acc != acc:  # NaN ranks above every number
                        acc = cast(INF)
                    n = topm_insert(bv, bi, n, m, acc, j0 + jj)
        if not live:
            return
        if n_own > 0:
            blocks[b, h, t, 0] = own[t]
        for i in range(m):
            blocks[b, h, t, n_own + i] = bi[i] if i < n else -1

    return select_kernel


@functools.cache
def _forward_kernel(D, Dv, dchar):
    """Specialised on the head dims: constant loop trips, query and accumulator in registers."""
    vt = types.float32 if dchar == "f" else types.float64
    cast = np.float32 if dchar == "f" else np.float64
    INF = math.inf
    NAN = math.nan

    @cuda.jit
    def forward_kernel(q, k, v, blocks, end, bs, scale, out, lse):
        r = cuda.grid(1)
        B, H, T = q.shape[0], q.shape[1], q.shape[2]
        G = k.shape[1]
        Kb = blocks.shape[3]
        if r >= B * H * T:
            return
        b = r // (H * T)
        h = (r // T) % H
        t = r % T
        g = h // (H // G)
        sc = cast(scale)
        qreg = cuda.local.array(D, vt)
        acc = cuda.local.array(Dv, vt)
        for d in range(D):
            qreg[d] = q[b, h, t, d] * sc
        for d in range(Dv):
            acc[d] = 0
        mx = cast(-INF)
        denom = cast(0)
        bad = False
        e = end[t]
        for slot in range(Kb):
            blk = blocks[b, h, t, slot]
            if blk < 0:
                continue
            for j in range(blk * bs, min(blk * bs + bs, e)):
                s = cast(0)
                for d in range(D):
                    s += qreg[d] * k[b, g, j, d]
                if s != s or s == INF:
                    bad = True
                    continue
                if s > mx:  # a new maximum: rescale what was summed so far
                    c = math.exp(mx - s) if mx > -INF else cast(0)
                    denom *= c
                    for d in range(Dv):
                        acc[d] *= c
                    mx = s
                pr = math.exp(s - mx) if s > -INF else cast(0)
                denom += pr
                for d in range(Dv):
                    acc[d] += pr * v[b, g, j, d]  # 0 * NaN stays NaN, as in the reference
        if bad:
            for d in range(Dv):
                out[b, h, t, d] = NAN
            lse[b, h, t] = NAN
            return
        if mx == -INF:
            return  # nothing attended (or only -inf scores): out stays 0, lse -inf
        for d in range(Dv):
            out[b, h, t, d] = acc[d] / denom
        lse[b, h, t] = mx + math.log(denom)

    return forward_kernel


__all__ = ["block_forward", "block_select", "check_limits", "MAX_RANKED", "MAX_DIM"]
