"""Block-wise attend: block selections attended with query-group x key-block GEMMs.

Shape letters: B batch, H query heads, G KV heads (H % G == 0), T queries, S keys, D head
dim, Dv value dim, Nb key blocks, Kb selected blocks per query, bs = block_size, n the
query rows one key block serves; flattened (b, h, t) rows are written ``rows``.

The attend stage for a block index tensor ``blocks`` (B, H, T, Kb) from
:mod:`topkattn.ops.block_selection`, equal to :func:`topkattn.ops.sparse_attention.
sparse_attention_forward` on the expanded token indices (``expand_blocks``) but without
gathering keys per query (the route MoBA takes with FlashAttention):

    the (row, block) selections are grouped by key block (b, g, n): a *segment*;
    per segment: s = scale * Q_rows K_n^T (n, bs), the causal mask inside the own block,
    then an online-softmax merge into per-row accumulators (running max m, sum l, out o):
        m' = max(m, max_j s),  l' = l e^(m - m') + sum_j e^(s_j - m'),  o' = o e^(m - m') + e^(s - m') V_n
    out = o / l,  lse = m + log l
Backward (FlashAttention's), segment by segment with P = exp(s - lse), delta = dout . out:
    dV_n += P^T dO,  dS = P (dO V_n^T - delta) scale,  dq_rows += dS K_n,  dK_n += dS^T Q_rows
Each key block's gradient is a contiguous slice (no scatter-add); a query row appears once
per segment, so ``dq[rows] += ...`` never collides.  (b, g) groups touch disjoint rows and
keys: on NumPy they run on the worker pool, one BLAS thread each, through the Numba group
kernels of :mod:`topkattn.ops.block_kernels` (one fused softmax pass per row between the two
GEMMs; in bench_block_attention.py's run fwd 1.4x and fwd+bwd 1.06x the NumPy segment loop at
T = S = 8192, 1.3x and 1.4x at 2048), or the NumPy segment loop (CuPy, ``impl="numpy"``).  Memory: per-row
accumulators O(T Dv) and one (n, bs) tile per segment piece; no (T, S) matrix, no gathered
(T, K, D) keys.

Non-finite inputs: this route needs finite keys and values (a NaN value hidden by the
causal mask would reach its block's other rows through the GEMM as 0 * NaN);
:mod:`topkattn.ops.block_attention` sends inputs with a non-finite key or value to the
gather route, which follows the full rule of :mod:`topkattn.ops.reference`.  A NaN or inf
in q gives that row a NaN output and lse (a NaN or +inf among its scores), a NaN dq, and
nothing to dk, dv.
"""
from __future__ import annotations

from types import ModuleType

import numpy as np

from topkattn.backend import Array, get_array_module, to_numpy
from topkattn.ops.block_selection import BlockBounds
from topkattn.ops.sparse_attention import inactive_rows
from topkattn.threads import blas_single_thread, n_workers, pool

try:  # Numba CPU kernels are optional at run time: the NumPy path needs no compiler.
    from topkattn.ops import block_kernels as _kernels
except Exception:  # pragma: no cover - numba missing or broken
    _kernels = None

TILE_BYTES = 8 * 2**20  # budget for one segment piece's (n, bs) score tile


def blockwise_attention_forward(q: Array, k: Array, v: Array, blocks: Array, bounds: BlockBounds, scale: float,
                                impl: str = "auto") -> tuple[Array, Array]:
    """(out (B, H, T, Dv), lse (B, H, T)) of softmax attention over the selected blocks.

    blocks (B, H, T, Kb) int64 (-1 = empty), bounds the :class:`~topkattn.ops.block_selection.
    BlockBounds` it was selected with; ``scale`` multiplies q.k.  k and v must be finite.
    ``impl``: "auto" (the Numba group kernels of :mod:`topkattn.ops.block_kernels` on NumPy
    arrays when Numba is importable), "numba", or "numpy" (the NumPy/CuPy segment loop).
    """
    xp = get_array_module(q, k, v)
    B, H, T, D = q.shape
    Dv = v.shape[3]
    n_rows = B * H * T
    qf = q.reshape(n_rows, D)
    acc_o = xp.zeros((n_rows, Dv), dtype=q.dtype)
    acc_m = xp.full(n_rows, -np.inf, dtype=q.dtype)
    acc_l = xp.zeros(n_rows, dtype=q.dtype)
    bad = xp.zeros(n_rows, dtype=bool)
    sc = q.dtype.type(scale)

    def segment(b, g, j0, j1, rows, pos):
        s = xp.matmul(qf[rows] * sc, k[b, g, j0:j1].T)  # (n, nk)
        if pos is not None:  # the own block: hide keys after the query
            s = xp.where(xp.arange(j0, j1)[None, :] > pos[:, None], -np.inf, s)
        rm = s.max(-1)  # (n,); NaN and +inf reach the row maximum
        bad_r = xp.isnan(rm) | (rm == np.inf)
        m_old = acc_m[rows]
        m_new = xp.maximum(m_old, xp.where(bad_r, -np.inf, rm))
        m_safe = xp.where(m_new == -np.inf, 0, m_new)
        p = xp.exp(s - m_safe[:, None])  # (n, nk); NaN only in bad rows
        alpha = xp.exp(m_old - m_safe)  # (n,) in [0, 1]
        acc_l[rows] = acc_l[rows] * alpha + p.sum(-1)
        acc_o[rows] = acc_o[rows] * alpha[:, None] + xp.matmul(p, v[b, g, j0:j1])
        acc_m[rows] = m_new
        bad[rows] |= bad_r

    if _use_kernels(impl, xp):
        kc, vc, qc = (np.ascontiguousarray(a) for a in (k, v, qf))

        def run_group(b, g, rows, blk, starts):
            _kernels.blockwise_forward_group(qc, kc[b, g], vc[b, g], rows, blk, starts, T, bounds.block_size,
                                             bounds.causal, float(scale), acc_o, acc_m, acc_l, bad)

        _run_groups(xp, blocks, bounds, k.shape[1], run_group)
    else:
        _run_segments(xp, blocks, bounds, k.shape[1], q.dtype.itemsize, segment)
    some = acc_l > 0
    l_safe = xp.where(some, acc_l, 1)
    out = xp.where(some[:, None], acc_o / l_safe[:, None], 0)
    lse = xp.where(some, acc_m + xp.log(l_safe), -np.inf)
    out = xp.where(bad[:, None], np.nan, out).astype(q.dtype, copy=False)
    lse = xp.where(bad, np.nan, lse).astype(q.dtype, copy=False)
    return out.reshape(B, H, T, Dv), lse.reshape(B, H, T)


def blockwise_attention_backward(dout: Array, q: Array, k: Array, v: Array, blocks: Array, bounds: BlockBounds,
                                 out: Array, lse: Array, scale: float,
                                 impl: str = "auto") -> tuple[Array, Array, Array]:
    """(dq, dk, dv) of :func:`blockwise_attention_forward` from dout (B, H, T, Dv).

    A row whose output is not finite gets a NaN dq and sends nothing to dk, dv; a row with
    nothing to attend gets zeros.  Only the keys of selected blocks the row sees get gradient.
    ``impl`` as for :func:`blockwise_attention_forward`.
    """
    xp = get_array_module(q, k, v)
    B, H, T, D = q.shape
    Dv = v.shape[3]
    n_rows = B * H * T
    inactive, nan_rows = inactive_rows(xp, out, lse)  # (B, H, T)
    live = ~inactive.reshape(n_rows)
    qz = xp.where(live[:, None], q.reshape(n_rows, D), 0)  # inactive rows send nothing
    dz = xp.where(live[:, None], dout.reshape(n_rows, Dv), 0)
    delta = (dz * xp.where(live[:, None], out.reshape(n_rows, Dv), 0)).sum(-1)  # (rows,)
    lse_z = xp.where(live, lse.reshape(n_rows), np.inf)  # p = exp(s - inf) = 0 for inactive rows
    dq = xp.zeros((n_rows, D), dtype=q.dtype)
    dk = xp.zeros_like(k)
    dv = xp.zeros_like(v)
    sc = q.dtype.type(scale)

    def segment(b, g, j0, j1, rows, pos):
        qs = qz[rows]  # (n, D)
        kb, vb = k[b, g, j0:j1], v[b, g, j0:j1]  # (nk, D), (nk, Dv)
        s = xp.matmul(qs * sc, kb.T)  # (n, nk)
        if pos is not None:
            s = xp.where(xp.arange(j0, j1)[None, :] > pos[:, None], -np.inf, s)
        p = xp.exp(s - lse_z[rows][:, None])  # (n, nk)
        do = dz[rows]  # (n, Dv)
        dv[b, g, j0:j1] += xp.matmul(p.T, do)
        ds = p * (xp.matmul(do, vb.T) - delta[rows][:, None]) * sc  # (n, nk)
        dq[rows] += xp.matmul(ds, kb)
        dk[b, g, j0:j1] += xp.matmul(ds.T, qs)

    if _use_kernels(impl, xp):
        kc, vc = np.ascontiguousarray(k), np.ascontiguousarray(v)

        def run_group(b, g, rows, blk, starts):
            _kernels.blockwise_backward_group(qz, dz, lse_z, delta, kc[b, g], vc[b, g], rows, blk, starts, T,
                                              bounds.block_size, bounds.causal, float(scale), dq, dk[b, g],
                                              dv[b, g])

        _run_groups(xp, blocks, bounds, k.shape[1], run_group)
    else:
        _run_segments(xp, blocks, bounds, k.shape[1], q.dtype.itemsize, segment)
    dq = xp.where(nan_rows.reshape(n_rows, 1), np.nan, dq).astype(q.dtype, copy=False)
    return dq.reshape(q.shape), dk, dv


def _use_kernels(impl, xp):
    """Run the Numba group kernels? "auto": NumPy arrays with Numba importable."""
    if impl == "numba":
        if xp is not np:
            raise ValueError("impl='numba' runs on the CPU; got CuPy arrays")
        if _kernels is None:
            raise RuntimeError("impl='numba' requested but numba is not importable")
        return True
    return impl == "auto" and xp is np and _kernels is not None


def block_segments(xp: ModuleType, blocks: Array, G: int, n_blocks: int) -> tuple[Array, Array, Array]:
    """Selections grouped by key block: ``(rows, keys, starts)``.

    rows (n_ent,) int64: the flattened (b, h, t) row of every valid selection, sorted by its
    segment key u = (b * G + g) * Nb + n (stable: ascending rows inside a segment); keys
    (n_seg,) and starts (n_seg + 1,) on the host: segment i is rows[starts[i]:starts[i + 1]].
    """
    B, H, T, Kb = blocks.shape
    rep = H // G
    base = (xp.arange(B, dtype=xp.int64)[:, None] * G + xp.arange(H, dtype=xp.int64)[None, :] // rep) * n_blocks
    key = xp.where(blocks >= 0, blocks + base[:, :, None, None], -1).reshape(-1)  # (B*H*T*Kb,)
    ent = xp.flatnonzero(key >= 0)
    order = ent[xp.argsort(key[ent] * key.size + ent)]  # unique sort keys: any sort algorithm agrees
    sorted_keys = to_numpy(key[order])
    edge = np.flatnonzero(np.diff(sorted_keys)) + 1 if sorted_keys.size else np.zeros(0, np.int64)
    starts = np.concatenate([[0], edge, [sorted_keys.size]]).astype(np.int64)
    keys = sorted_keys[starts[:-1]] if sorted_keys.size else np.zeros(0, np.int64)
    return order // Kb, keys, starts


def _run_segments(xp, blocks, bounds, G, itemsize, segment):
    """Call ``segment(b, g, j0, j1, rows, pos)`` for every segment piece (the NumPy/CuPy path).

    j0 .. j1 - 1: the block's keys; rows: the query rows (a piece of the segment, at most
    TILE_BYTES of (n, bs) scores); pos: their positions when the block may hold keys after
    some of them (causal, the block reaching S - T or later), else None.
    """
    T, bs, S = bounds.T, bounds.block_size, bounds.S
    piece = max(1, TILE_BYTES // max(1, bs * itemsize))
    pos_all = xp.asarray(np.arange(T, dtype=np.int64) + (S - T))  # (T,)

    def run_group(b, g, rows, blk, starts):
        for i in range(blk.size):
            j0, j1 = int(blk[i]) * bs, min(S, (int(blk[i]) + 1) * bs)
            for p0 in range(int(starts[i]), int(starts[i + 1]), piece):
                r = rows[p0:min(int(starts[i + 1]), p0 + piece)]
                pos = pos_all[r % T] if bounds.causal and j1 - 1 > S - T else None
                segment(b, g, j0, j1, r, pos)

    _run_groups(xp, blocks, bounds, G, run_group)


def _run_groups(xp, blocks, bounds, G, run_group):
    """Call ``run_group(b, g, rows, blk, starts)`` for every (b, g) group that has selections.

    rows: the group's rows sorted by segment; blk (n_seg,) host int64 block numbers; starts
    (n_seg + 1,) host offsets into rows.  On NumPy the groups run on the worker pool with one
    BLAS thread each (their GEMMs are small: threaded BLAS spins between them, 10x slower here);
    they touch disjoint rows and keys, so no two workers write one entry.
    """
    Nb = bounds.n_blocks
    rows, keys, starts = block_segments(xp, blocks, G, Nb)
    if not keys.size:
        return
    groups = keys // Nb  # b * G + g of each segment
    edges = np.concatenate([[0], np.flatnonzero(np.diff(groups)) + 1, [keys.size]])
    jobs = []
    for i0, i1 in zip(edges[:-1], edges[1:]):
        b, g = divmod(int(groups[i0]), G)
        jobs.append((b, g, rows[starts[i0]:starts[i1]], keys[i0:i1] % Nb, starts[i0:i1 + 1] - starts[i0]))
    if xp is not np:
        for job in jobs:
            run_group(*job)
        return
    with blas_single_thread():
        if n_workers() == 1 or len(jobs) == 1:
            for job in jobs:
                run_group(*job)
            return
        for fut in [pool().submit(run_group, *job) for job in jobs]:
            fut.result()


__all__ = ["blockwise_attention_forward", "blockwise_attention_backward", "block_segments"]
