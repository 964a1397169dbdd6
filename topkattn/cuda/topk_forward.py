"""CUDA streaming top-k attention forward: select and attend in one kernel, no (T, S) matrix.

Shape letters: B batch, H query heads, G KV heads (H % G == 0), T queries, S keys,
D head dim, Dv value dim, K index slots per query, M ranked keys kept per query.

One block per (query block of TQ queries, batch*head); one thread per query.

    for each key tile of TS keys (up to the block's last visible key):
        the block loads the tile k[b, g, j0:j0+TS] into shared memory
        each thread scores its query against the tile (scale * q . k_j, NaN -> +inf
        for ranking) and offers the candidates to its running top-M buffer,
        a sorted list in thread-local memory (most keys fail one comparison)
    forgetful refill: ranked slot i < K' is dropped where drop[b, h, t, i]; the freed
        slots take ranks K', K'+1, ... (as many as were dropped)   [same draws as
        selection.forget_draws, so every implementation picks the same keys]
    softmax over the forced keys (sinks, window) and the selected keys (max subtracted),
    out = sum_i p_i v_i; write out (B, H, T, Dv), idx (B, H, T, K), lse (B, H, T)

The index layout is the one of :class:`topkattn.ops.selection.RowBounds`:
``[sinks (P') | window (W') | selected (K')]``, -1 padded.  A NaN (or +inf) among a
row's attended scores makes that row's out and lse NaN; a row with no key gets zeros
and lse = -inf.  Reference: :func:`topkattn.ops.reference.topk_attention_reference`
(indices equal to ``topk_attention_forward(impl="numpy")``).
"""
from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
from numba import cuda, types

from topkattn.backend import Array
from topkattn.cuda.launch import array_module, cdiv, launch, pow2_at_least, simulator_enabled
from topkattn.cuda.topk_select import device_functions, topm_rows
from topkattn.ops.selection import RowBounds, forget_draws

MAX_RANKED = 1024  # thread-local buffer limit (topk + forgotten refills)
MAX_DIM = 256  # D and Dv limit (thread-local query and accumulator)
SHARED_TILE_BYTES = 16 * 1024


def topk_forward(q: Array, k: Array, v: Array, *, topk: int, causal: bool = True, scale: float, sinks: int = 0,
                 window: int = 0, forget_rate: float = 0.0, seed: int | np.random.Generator | None = None,
                 head_slice: tuple[int, int, int] | None = None) -> tuple[Array, Array, Array]:
    """(out (B, H, T, Dv), idx (B, H, T, K) int64, lse (B, H, T)) by the fused kernel.

    ``scale`` multiplies q.k (already divided by the temperature).  ``head_slice``: the
    forgetful draws of :func:`topkattn.ops.selection.forget_draws`.  Inputs are CuPy arrays
    (NumPy under the simulator), validated by :func:`topkattn.topk_attention_forward`.
    """
    xp = array_module(q, k, v)
    B, H, T, D = q.shape
    S, Dv = k.shape[2], v.shape[3]
    bounds = RowBounds(S, T, topk=topk, causal=causal, sinks=sinks, window=window)
    n_sel = bounds.n_sel
    drop = forget_draws(seed, (B, H, T, n_sel), forget_rate, head_slice)  # host (B, H, T, K') or None
    n_drop_max = 0 if drop is None else int(drop.sum(axis=-1).max(initial=0))
    m = n_sel + n_drop_max
    check_limits(m, D, Dv)
    out = xp.zeros((B, H, T, Dv), dtype=q.dtype)
    idx = xp.full((B, H, T, bounds.n_slots), -1, dtype=xp.int64)
    lse = xp.full((B, H, T), -np.inf, dtype=q.dtype)
    if T == 0 or S == 0 or B * H == 0:
        return out, idx, lse
    def dev(a):
        return xp.asarray(np.ascontiguousarray(a))
    drop_d = xp.zeros((1, 1, 1, 1), dtype=xp.uint8) if drop is None else dev(drop.astype(np.uint8))
    itemsize = q.dtype.itemsize
    if simulator_enabled():
        TQ, TS = 4, 4  # several blocks and tiles even at tiny test shapes
    else:
        TQ = 64
        TS = max(1, min(64, SHARED_TILE_BYTES // (D * itemsize)))
    kern = _forward_kernel(pow2_at_least(m, 8), D, Dv, TQ, TS, q.dtype.char)
    q, k, v = (xp.ascontiguousarray(a) for a in (q, k, v))
    launch(kern, (cdiv(T, TQ), B * H), TQ, q, k, v, float(scale), dev(bounds.end),
           dev(bounds.win_lo), dev(bounds.win_hi), bounds.sinks, bounds.n_sink, bounds.n_win,
           n_sel, m, drop_d, 0 if drop is None else 1, out, idx, lse)
    return out, idx, lse


def topk_forward_auto(q: Array, k: Array, v: Array, *, few_rows: int = 16384, long_rows: int = 2048,
                      **kw: Any) -> tuple[Array, Array, Array]:
    """:func:`topk_forward` (fused), or :func:`topk_forward_tiled` when there are fewer than
    ``few_rows`` query rows B*H*T over at least ``long_rows`` keys: the fused kernel runs one
    thread per query row, too few to fill a GPU for decode-like shapes, while the tiled
    path splits each long row over many threads.  Same results either way (tested)."""
    B, H, T = q.shape[:3]
    if B * H * T < few_rows and k.shape[2] >= long_rows:
        return topk_forward_tiled(q, k, v, **kw)
    return topk_forward(q, k, v, **kw)


def topk_forward_tiled(q: Array, k: Array, v: Array, *, topk: int, causal: bool = True, scale: float,
                       sinks: int = 0, window: int = 0, forget_rate: float = 0.0,
                       seed: int | np.random.Generator | None = None, head_slice: tuple[int, int, int] | None = None,
                       tile_bytes: int | None = None) -> tuple[Array, Array, Array]:
    """The same contract as :func:`topk_forward`, scoring with matmul tiles instead.

    Per query chunk the (B*H*c, S') score tile comes from ``xp.matmul`` (cuBLAS, tensor
    cores where CuPy enables them), the split-k CUDA top-m kernel ranks each row within its
    RowBounds candidates, forgetting is applied with :func:`selection.apply_forgetting` and
    the vectorised sparse attend computes out and lse.  Peak extra memory is one tile
    (``tile_bytes``, default 256 MiB on a GPU) plus O(T K).  Which of the two forwards is
    faster depends on the GPU; ``benchmarks/bench_cuda.py`` times both.
    """
    from topkattn.ops.selection import apply_forgetting
    from topkattn.ops.sparse_attention import sparse_attention_forward

    xp = array_module(q, k, v)
    B, H, T, D = q.shape
    G, S = k.shape[1], k.shape[2]
    rep = H // G
    bounds = RowBounds(S, T, topk=topk, causal=causal, sinks=sinks, window=window)
    n_sel = bounds.n_sel
    drop = forget_draws(seed, (B, H, T, n_sel), forget_rate, head_slice)  # host (B, H, T, K') or None
    m = n_sel + (0 if drop is None else int(drop.sum(axis=-1).max(initial=0)))
    idx = xp.full((B, H, T, bounds.n_slots), -1, dtype=xp.int64)
    n_forced = bounds.n_sink + bounds.n_win
    idx[..., :n_forced] = xp.asarray(bounds.forced_indices())
    if m > 0 and T > 0 and B * H > 0:
        if tile_bytes is None:
            tile_bytes = 2**12 if simulator_enabled() else 256 * 2**20
        chunk = max(1, int(tile_bytes) // max(1, B * H * S * q.dtype.itemsize))
        geo = [xp.asarray(a) for a in (bounds.end, bounds.win_lo, bounds.win_hi)]  # (T,) each
        qs = (q * q.dtype.type(scale)).reshape(B, G, rep, T, D)
        kt = k.swapaxes(-1, -2)  # (B, G, D, S)
        for t0 in range(0, T, chunk):
            t1 = min(T, t0 + chunk)
            c = t1 - t0
            n_cols = int(bounds.end[t1 - 1])  # keys any row of the chunk may see
            if n_cols == 0:
                continue
            qc = qs[:, :, :, t0:t1].reshape(B, G, rep * c, D)
            tile = xp.matmul(qc, kt[..., :n_cols]).reshape(B * H * c, n_cols)  # rows (b, h, t)
            end, lo, hi = (xp.tile(a[t0:t1], B * H) for a in geo)  # (B*H*c,)
            _, ranked = topm_rows(xp, xp.ascontiguousarray(tile), None, m, end, lo, hi,
                                  bounds.sinks)
            if drop is not None:
                d = xp.asarray(drop[:, :, t0:t1].reshape(B * H * c, n_sel))
                ranked = apply_forgetting(ranked, d, n_sel)
            else:
                ranked = ranked[:, :n_sel]
            idx[:, :, t0:t1, n_forced:] = ranked.reshape(B, H, c, n_sel)
    out, saved = sparse_attention_forward(q, k, v, idx, scale)
    return out, idx, saved.lse


def check_limits(m: int, D: int, Dv: int) -> None:
    """Raise ValueError when a shape exceeds what the kernel keeps in thread-local memory."""
    if m > MAX_RANKED:
        raise ValueError(f"the CUDA kernel keeps at most {MAX_RANKED} ranked keys per query "
                         f"(topk plus forgotten refills), got {m}; use impl='numpy'")
    if D < 1 or Dv < 1:
        raise ValueError(f"the CUDA kernel needs head dims >= 1, got D={D}, Dv={Dv}")
    if D > MAX_DIM or Dv > MAX_DIM:
        raise ValueError(f"the CUDA kernel supports head dims up to {MAX_DIM}, got D={D}, "
                         f"Dv={Dv}; use impl='numpy'")


def fits(m: int, D: int, Dv: int, m_auto: int = 256) -> bool:
    """True when ``impl='auto'`` should pick this kernel (small enough top-k and head dims)."""
    return m <= m_auto and 1 <= D <= MAX_DIM and 1 <= Dv <= MAX_DIM


@functools.cache
def _forward_kernel(MCAP, D, Dv, TQ, TS, dchar):
    """Specialised on the head dims: the d-loops have constant trip counts, so the compiler
    can unroll them and keep the query and the output accumulator in registers."""
    vt = types.float32 if dchar == "f" else types.float64
    cast = np.float32 if dchar == "f" else np.float64
    _, topm_insert = device_functions()
    INF = math.inf
    NAN = math.nan

    @cuda.jit(device=True, inline=True)
    def slot(p, n_forced, qreg, k, idx, bv, bi, b, g, h, t):
        """(key, score) of index slot p: a forced key is scored here, a selected one kept its score."""
        if p >= n_forced:
            return bi[p - n_forced], bv[p - n_forced]
        j = idx[b, h, t, p]
        s = cast(0)
        if j >= 0:
            for d in range(D):
                s += qreg[d] * k[b, g, j, d]
        return j, s

    @cuda.jit
    def forward_kernel(q, k, v, scale, end, win_lo, win_hi, sinks, n_sink, n_win, n_sel, m,
                       drop, has_drop, out, idx, lse):
        H, T = q.shape[1], q.shape[2]
        G, S = k.shape[1], k.shape[2]
        tx = cuda.threadIdx.x
        t = cuda.blockIdx.x * TQ + tx
        bh = cuda.blockIdx.y
        b = bh // H
        h = bh - b * H
        g = h // (H // G)
        live = t < T
        ktile = cuda.shared.array((TS, D), vt)
        qreg = cuda.local.array(D, vt)
        bv = cuda.local.array(MCAP, vt)
        bi = cuda.local.array(MCAP, types.int64)
        sc = cast(scale)
        e = 0
        lo = 0
        hi = 0
        if live:
            e = end[t]
            lo = win_lo[t]
            hi = win_hi[t]
            for d in range(D):
                qreg[d] = q[b, h, t, d] * sc
        n_cols = end[min(T, (cuda.blockIdx.x + 1) * TQ) - 1]  # end[] is non-decreasing in t
        n = 0
        # ---- stream the key tiles, keep a running top-m per query
        for j0 in range(0, n_cols, TS):
            cuda.syncthreads()
            for x in range(tx, TS * D, TQ):
                jj = x // D
                d = x - jj * D
                j = j0 + jj
                ktile[jj, d] = k[b, g, j, d] if j < S else cast(0)
            cuda.syncthreads()
            if live and m > 0:
                for jj in range(min(TS, e - j0)):
                    j = j0 + jj
                    if j < sinks or (j >= lo and j < hi):
                        continue
                    acc = cast(0)
                    for d in range(D):
                        acc += qreg[d] * ktile[jj, d]
                    if acc != acc:
                        acc = cast(INF)
                    n = topm_insert(bv, bi, n, m, acc, j)
        if not live:
            return
        # ---- forgetful refill: kept top slots, then ranks n_sel, n_sel + 1, ...
        if has_drop != 0:
            nd = 0
            for i in range(n_sel):
                nd += drop[b, h, t, i]
            o = 0
            for i in range(n):
                keep = drop[b, h, t, i] == 0 if i < n_sel else (i - n_sel) < nd
                if keep and o < n_sel:
                    bv[o] = bv[i]
                    bi[o] = bi[i]
                    o += 1
            n = o
        else:
            n = min(n, n_sel)
        # ---- index row: [sinks | window | selected], -1 padded
        n_forced = n_sink + n_win
        for p in range(n_sink):
            idx[b, h, t, p] = p if p < e else -1
        for w in range(n_win):
            j = hi - 1 - w
            idx[b, h, t, n_sink + w] = j if j >= lo else -1
        for i in range(n_sel):
            idx[b, h, t, n_forced + i] = bi[i] if i < n else -1
        # ---- softmax over the attended scores (max subtracted)
        mx = cast(-INF)
        bad = False
        cnt = 0
        for p in range(n_forced + n):
            j, s = slot(p, n_forced, qreg, k, idx, bv, bi, b, g, h, t)
            if j < 0:
                continue
            cnt += 1
            if s != s or s == INF:
                bad = True
            elif s > mx:
                mx = s
        if bad:
            for d in range(Dv):
                out[b, h, t, d] = NAN
            lse[b, h, t] = NAN
            return
        if cnt == 0 or mx == -INF:
            return  # out stays 0, lse -inf
        accv = cuda.local.array(Dv, vt)
        for d in range(Dv):
            accv[d] = 0
        denom = cast(0)
        for p in range(n_forced + n):
            j, s = slot(p, n_forced, qreg, k, idx, bv, bi, b, g, h, t)
            if j < 0:
                continue
            pr = math.exp(s - mx)
            denom += pr
            for d in range(Dv):
                accv[d] += pr * v[b, g, j, d]
        for d in range(Dv):
            out[b, h, t, d] = accv[d] / denom
        lse[b, h, t] = mx + math.log(denom)

    return forward_kernel


__all__ = ["topk_forward", "topk_forward_tiled", "topk_forward_auto", "check_limits", "fits", "MAX_RANKED", "MAX_DIM"]
