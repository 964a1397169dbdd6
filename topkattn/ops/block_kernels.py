"""Numba CPU kernels for the block-wise attend of block top-k attention (MoBA).

Shape letters: T queries, S keys, D head dim, Dv value dim, bs block size, n the query rows
of one segment, nk <= bs the keys of its block; flattened (b, h, t) rows are written ``rows``.

Each kernel runs every segment of one (batch, KV head) group, one after the other: a
segment is one key block and the query rows that selected it (``blockwise_attention.
block_segments``).  The two GEMMs per segment go to BLAS (``np.dot``); the softmax work
between them is one fused pass per row (mask, max, exp, sum) instead of a dozen NumPy
calls, and nothing is allocated per row.  Serial and ``nogil``: groups touch disjoint rows
and keys, so callers run them on worker threads (:mod:`topkattn.threads`).
Reference: :mod:`topkattn.ops.blockwise_attention` (its NumPy segment functions, equal to
:func:`topkattn.ops.reference.block_topk_attention_reference`).
"""
import numpy as np

from topkattn.threads import njit

# fast-math without "no NaN / no inf": NaN scores still make NaN rows and -inf is a score
_FAST = {"nsz", "arcp", "contract", "afn", "reassoc"}


@njit(fastmath=_FAST)
def blockwise_forward_group(qf, kg, vg, rows, blk, starts, T, bs, causal, scale, acc_o, acc_m, acc_l, bad):
    """Online-softmax forward over the segments of one group, merged into per-row accumulators.

    qf (rows, D) the flattened queries; kg (S, D), vg (S, Dv) the group's keys and values;
    segment i is block blk[i] with the rows rows[starts[i]:starts[i + 1]].  Updates acc_o
    (rows, Dv), acc_m, acc_l (rows,) (running max, sum) and bad (rows,) (a NaN or +inf score).
    ``causal``: query row r sits at S - T + r % T and sees keys up to it.
    """
    S = kg.shape[0]
    D = qf.shape[1]
    Dv = vg.shape[1]
    ninf = -np.inf
    cast = np.empty(1, dtype=acc_l.dtype)  # rounds a scalar to the arrays' dtype (float32 exp)
    cast[0] = scale
    sc = cast[0]
    for i in range(blk.shape[0]):
        j0 = blk[i] * bs
        j1 = min(S, j0 + bs)
        nk = j1 - j0
        r0 = starts[i]
        n = starts[i + 1] - r0
        qs = np.empty((n, D), dtype=qf.dtype)
        for a in range(n):
            r = rows[r0 + a]
            for d in range(D):
                qs[a, d] = qf[r, d] * sc
        s = np.dot(qs, np.ascontiguousarray(kg[j0:j1]).T)  # (n, nk)
        for a in range(n):
            r = rows[r0 + a]
            p_end = nk
            if causal:  # keys after the query (inside its own block) are hidden
                p_end = max(0, min(nk, S - T + r % T - j0 + 1))
            rm = ninf
            row_bad = False
            for c in range(p_end):
                x = s[a, c]
                if x != x or x == np.inf:
                    row_bad = True
                elif x > rm:
                    rm = x
            m_old = acc_m[r]
            m_new = max(m_old, rm)
            cast[0] = 0.0 if m_new == ninf else m_new
            m_safe = cast[0]
            tot = 0.0
            for c in range(p_end):
                e = np.exp(s[a, c] - m_safe)
                s[a, c] = e
                tot += e
            for c in range(p_end, nk):
                s[a, c] = 0.0
            alpha = np.exp(m_old - m_safe)
            acc_l[r] = acc_l[r] * alpha + tot
            for d in range(Dv):
                acc_o[r, d] *= alpha
            acc_m[r] = m_new
            if row_bad:
                bad[r] = True
        pv = np.dot(s, np.ascontiguousarray(vg[j0:j1]))  # (n, Dv)
        for a in range(n):
            r = rows[r0 + a]
            for d in range(Dv):
                acc_o[r, d] += pv[a, d]


@njit(fastmath=_FAST)
def blockwise_backward_group(qz, dz, lse_z, delta, kg, vg, rows, blk, starts, T, bs, causal, scale, dq, dkg, dvg):
    """Gradients of the segments of one group (FlashAttention's backward per segment).

    qz (rows, D), dz (rows, Dv): queries and output gradients with inactive rows zeroed;
    lse_z (rows,) the forward logsumexp (+inf on inactive rows: p = 0); delta (rows,)
    dout . out.  Adds into dq (rows, D) and the group's dkg (S, D), dvg (S, Dv).
    """
    S = kg.shape[0]
    D = qz.shape[1]
    Dv = dz.shape[1]
    cast = np.empty(1, dtype=qz.dtype)
    cast[0] = scale
    sc = cast[0]  # the scale in the arrays' dtype
    for i in range(blk.shape[0]):
        j0 = blk[i] * bs
        j1 = min(S, j0 + bs)
        nk = j1 - j0
        r0 = starts[i]
        n = starts[i + 1] - r0
        kb = np.ascontiguousarray(kg[j0:j1])  # (nk, D)
        vb = np.ascontiguousarray(vg[j0:j1])  # (nk, Dv)
        qs = np.empty((n, D), dtype=qz.dtype)
        dos = np.empty((n, Dv), dtype=dz.dtype)
        for a in range(n):
            r = rows[r0 + a]
            for d in range(D):
                qs[a, d] = qz[r, d]
            for d in range(Dv):
                dos[a, d] = dz[r, d]
        p = np.dot(qs, kb.T)  # (n, nk) unscaled scores
        for a in range(n):
            r = rows[r0 + a]
            p_end = nk
            if causal:
                p_end = max(0, min(nk, S - T + r % T - j0 + 1))
            L = lse_z[r]
            for c in range(p_end):
                p[a, c] = np.exp(p[a, c] * sc - L)
            for c in range(p_end, nk):
                p[a, c] = 0.0
        dvb = np.dot(p.T, dos)  # (nk, Dv)
        ds = np.dot(dos, vb.T)  # (n, nk): dp
        for a in range(n):
            dl = delta[rows[r0 + a]]
            for c in range(nk):
                ds[a, c] = p[a, c] * (ds[a, c] - dl) * sc
        dqb = np.dot(ds, kb)  # (n, D)
        dkb = np.dot(ds.T, qs)  # (nk, D)
        for a in range(n):
            r = rows[r0 + a]
            for d in range(D):
                dq[r, d] += dqb[a, d]
        for c in range(nk):
            for d in range(D):
                dkg[j0 + c, d] += dkb[c, d]
            for d in range(Dv):
                dvg[j0 + c, d] += dvb[c, d]
