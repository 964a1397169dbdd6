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
keys: on NumPy they run on the worker pool, one BLAS thread each.  Memory: per-row
accumulators O(T Dv) and one (n, bs) tile per segment piece; no (T, S) matrix, no gathered
(T, K, D) keys.

Non-finite inputs: this route needs finite keys and values (a NaN value hidden by the
causal mask would reach its block's other rows through the GEMM as 0 * NaN);
:mod:`topkattn.ops.block_attention` sends inputs with a non-finite key or value to the
gather route, which follows the full rule of :mod:`topkattn.ops.reference`.  A NaN or inf
in q gives that row a NaN output and lse (a NaN or +inf among its scores), a NaN dq, and
nothing to dk, dv.
"""
import numpy as np

from topkattn.backend import get_array_module, to_numpy
from topkattn.ops.sparse_attention import inactive_rows
from topkattn.threads import blas_single_thread, n_workers, pool

TILE_BYTES = 8 * 2**20  # budget for one segment piece's (n, bs) score tile


def blockwise_attention_forward(q, k, v, blocks, bounds, scale):
    """(out (B, H, T, Dv), lse (B, H, T)) of softmax attention over the selected blocks.

    blocks (B, H, T, Kb) int64 (-1 = empty), bounds the :class:`~topkattn.ops.block_selection.
    BlockBounds` it was selected with; ``scale`` multiplies q.k.  k and v must be finite.
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

    _run_segments(xp, blocks, bounds, k.shape[1], q.dtype.itemsize, segment)
    some = acc_l > 0
    l_safe = xp.where(some, acc_l, 1)
    out = xp.where(some[:, None], acc_o / l_safe[:, None], 0)
    lse = xp.where(some, acc_m + xp.log(l_safe), -np.inf)
    out = xp.where(bad[:, None], np.nan, out).astype(q.dtype, copy=False)
    lse = xp.where(bad, np.nan, lse).astype(q.dtype, copy=False)
    return out.reshape(B, H, T, Dv), lse.reshape(B, H, T)


def blockwise_attention_backward(dout, q, k, v, blocks, bounds, out, lse, scale):
    """(dq, dk, dv) of :func:`blockwise_attention_forward` from dout (B, H, T, Dv).

    A row whose output is not finite gets a NaN dq and sends nothing to dk, dv; a row with
    nothing to attend gets zeros.  Only the keys of selected blocks the row sees get gradient.
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

    _run_segments(xp, blocks, bounds, k.shape[1], q.dtype.itemsize, segment)
    dq = xp.where(nan_rows.reshape(n_rows, 1), np.nan, dq).astype(q.dtype, copy=False)
    return dq.reshape(q.shape), dk, dv


def block_segments(xp, blocks, G, n_blocks):
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
    order = ent[xp.argsort(key[ent], kind="stable")]
    sorted_keys = to_numpy(key[order])
    edge = np.flatnonzero(np.diff(sorted_keys)) + 1 if sorted_keys.size else np.zeros(0, np.int64)
    starts = np.concatenate([[0], edge, [sorted_keys.size]]).astype(np.int64)
    keys = sorted_keys[starts[:-1]] if sorted_keys.size else np.zeros(0, np.int64)
    return order // Kb, keys, starts


def _run_segments(xp, blocks, bounds, G, itemsize, segment):
    """Call ``segment(b, g, j0, j1, rows, pos)`` for every segment piece, (b, g) groups on workers.

    j0 .. j1 - 1: the block's keys; rows: the query rows (a piece of the segment, at most
    TILE_BYTES of (n, bs) scores); pos: their positions when the block may hold keys after
    some of them (causal, the block reaching S - T or later), else None.
    """
    T, bs, S, Nb = bounds.T, bounds.block_size, bounds.S, bounds.n_blocks
    rows, keys, starts = block_segments(xp, blocks, G, Nb)
    if not keys.size:
        return
    piece = max(1, TILE_BYTES // max(1, bs * itemsize))
    pos_all = xp.asarray(np.arange(T, dtype=np.int64) + (S - T))  # (T,)
    groups = keys // Nb  # b * G + g of each segment
    group_edges = np.concatenate([[0], np.flatnonzero(np.diff(groups)) + 1, [keys.size]])

    def run_group(i0, i1):
        for i in range(i0, i1):
            bg, n = divmod(int(keys[i]), Nb)
            b, g = divmod(bg, G)
            j0, j1 = n * bs, min(S, (n + 1) * bs)
            for p0 in range(int(starts[i]), int(starts[i + 1]), piece):
                r = rows[p0:min(int(starts[i + 1]), p0 + piece)]
                pos = pos_all[r % T] if bounds.causal and j1 - 1 > S - T else None
                segment(b, g, j0, j1, r, pos)

    spans = list(zip(group_edges[:-1], group_edges[1:]))
    if xp is not np:
        for span in spans:
            run_group(*span)
        return
    # small GEMMs: one BLAS thread each (threaded BLAS spins between them: 10x slower here)
    with blas_single_thread():
        if n_workers() == 1 or len(spans) == 1:
            for span in spans:
                run_group(*span)
            return
        # groups touch disjoint rows and keys: no two workers write one entry
        for job in [pool().submit(run_group, *span) for span in spans]:
            job.result()


__all__ = ["blockwise_attention_forward", "blockwise_attention_backward", "block_segments"]
