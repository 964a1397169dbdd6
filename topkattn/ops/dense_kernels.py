"""Numba CPU kernels for dense (causal) softmax attention on finite inputs.

Shape letters: B batch, H query heads, G KV heads, rep = H // G, T queries, S keys, D head dim,
Dv value dim, c queries per chunk, m = rep * c the rows of one chunk's tile, n the keys the
chunk sees.

Each call runs the (b, g) groups i0 .. i1 - 1 (group i is b = i // G, g = i % G) one after the
other; callers split the groups over the worker pool.  The arrays may be strided views (the
layers' (B, T, H, D) -> (B, H, T, D) transposes): each chunk copies its queries and the keys
and values it sees into contiguous tiles.  Per query chunk the two GEMMs go to BLAS
(``np.dot``) and the softmax work between them is one fused pass per row (causal mask, max,
exp, sum) over an (m, n) tile, instead of a dozen NumPy passes over a (B, H, c, S) tile.  The
arithmetic is :mod:`topkattn.ops.dense_attention`'s, with the sums in another order and, in
float32, the vectorised exp of :mod:`topkattn.ops.kernel_math` (within 3e-7 relative).

The inputs must be finite (the caller checks; :mod:`topkattn.ops.dense_attention` handles the
rest by the rule of :mod:`topkattn.ops.reference`).  A score can then still overflow (+inf, or
NaN as inf - inf): that row gets a NaN output and lse as there, and in backward a NaN dq and
nothing sent to dk, dv.
"""
import numpy as np

from topkattn.ops.kernel_math import fast_exp
from topkattn.threads import njit

# fast-math without "no NaN / no inf": a NaN or +inf score still makes a NaN row and -inf hides a key
_FAST = {"nsz", "arcp", "contract", "afn", "reassoc"}


@njit(fastmath=_FAST)
def dense_forward_groups(q, k, v, causal, scale, chunk, i0, i1, out, lse):
    """Forward of groups i0 .. i1 - 1: q (B, H, T, D), k (B, G, S, D), v (B, G, S, Dv); writes
    out (B, H, T, Dv) and lse (B, H, T) (rows that see no key: 0 and -inf)."""
    H, T, D = q.shape[1], q.shape[2], q.shape[3]
    G, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    rep = H // G
    cast = np.empty(1, dtype=out.dtype)  # rounds a scalar to the arrays' dtype (float32 exp)
    cast[0] = scale
    sc = cast[0]
    kg = np.empty((S, D), dtype=out.dtype)
    vg = np.empty((S, Dv), dtype=out.dtype)
    for i in range(i0, i1):
        b, g = i // G, i % G
        _copy_rows(k[b, g], kg)
        _copy_rows(v[b, g], vg)
        for t0 in range(0, T, chunk):
            t1 = min(T, t0 + chunk)
            c = t1 - t0
            n = min(S, S - T + t1) if causal else S  # keys the chunk's last row sees
            if n <= 0:
                for h in range(g * rep, (g + 1) * rep):
                    for t in range(t0, t1):
                        lse[b, h, t] = -np.inf
                        for d in range(Dv):
                            out[b, h, t, d] = 0.0
                continue
            qs = np.empty((rep * c, D), dtype=out.dtype)
            for hh in range(rep):
                for a in range(c):
                    for d in range(D):
                        qs[hh * c + a, d] = q[b, g * rep + hh, t0 + a, d] * sc
            s = np.dot(qs, kg[:n].T)  # (m, n) scaled scores
            row_max = np.empty(rep * c, dtype=out.dtype)
            row_sum = np.empty(rep * c, dtype=out.dtype)
            for r in range(rep * c):
                end = max(0, min(n, S - T + t0 + r % c + 1)) if causal else n
                rm = -np.inf
                for j in range(end):
                    x = s[r, j]
                    if x != x or x == np.inf:  # NaN (inf - inf) or an overflowed score: a NaN row
                        rm = np.inf
                    elif x > rm:
                        rm = x
                cast[0] = 0.0 if end == 0 or rm == np.inf else rm
                m0 = cast[0]
                tot = 0.0
                for j in range(end):
                    e = fast_exp(s[r, j] - m0)
                    s[r, j] = e
                    tot += e
                for j in range(end, n):
                    s[r, j] = 0.0
                row_max[r] = rm
                row_sum[r] = tot
            o = np.dot(s, vg[:n])  # (m, Dv) unnormalised
            for r in range(rep * c):
                h, t = g * rep + r // c, t0 + r % c
                rm, tot = row_max[r], row_sum[r]
                if rm == np.inf:  # a NaN row
                    lse[b, h, t] = np.nan
                    for d in range(Dv):
                        out[b, h, t, d] = np.nan
                elif tot > 0:
                    lse[b, h, t] = rm + np.log(tot)
                    for d in range(Dv):
                        out[b, h, t, d] = o[r, d] / tot
                else:  # no visible key
                    lse[b, h, t] = -np.inf
                    for d in range(Dv):
                        out[b, h, t, d] = 0.0


@njit(fastmath=_FAST)
def dense_backward_groups(q, k, v, out, lse, dout, causal, scale, chunk, i0, i1, dq, dk, dv):
    """Gradients of groups i0 .. i1 - 1 (FlashAttention's backward per query chunk).

    q (B, H, T, D), k (B, G, S, D), v (B, G, S, Dv), dout (B, H, T, Dv) finite; out, lse the
    forward's.  A row whose lse is NaN or whose output is not finite gets a NaN dq; it and the
    rows that saw no key (lse -inf) send nothing to dk, dv.  Writes dq (B, H, T, D) of the
    chunks that see a key (zero it first) and adds into dk (B, G, S, D), dv (B, G, S, Dv).
    """
    H, T, D = q.shape[1], q.shape[2], q.shape[3]
    G, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    rep = H // G
    cast = np.empty(1, dtype=dq.dtype)
    cast[0] = scale
    sc = cast[0]
    kg = np.empty((S, D), dtype=dq.dtype)
    vg = np.empty((S, Dv), dtype=dq.dtype)
    for i in range(i0, i1):
        b, g = i // G, i % G
        _copy_rows(k[b, g], kg)
        _copy_rows(v[b, g], vg)
        for t0 in range(0, T, chunk):
            t1 = min(T, t0 + chunk)
            c = t1 - t0
            n = min(S, S - T + t1) if causal else S
            if n <= 0:
                continue
            m = rep * c
            qs = np.empty((m, D), dtype=dq.dtype)
            dos = np.empty((m, Dv), dtype=dq.dtype)
            lse_r = np.empty(m, dtype=dq.dtype)  # +inf on rows that send nothing (p = 0)
            delta = np.empty(m, dtype=dq.dtype)  # dout . out
            nan_row = np.zeros(m, dtype=np.bool_)
            for r in range(m):
                h, t = g * rep + r // c, t0 + r % c
                L = lse[b, h, t]
                dl = 0.0
                for d in range(Dv):
                    o = out[b, h, t, d]
                    if o != o or o == np.inf or o == -np.inf:
                        nan_row[r] = True
                    dl += dout[b, h, t, d] * o
                if L != L:
                    nan_row[r] = True
                live = not nan_row[r] and L != -np.inf
                lse_r[r] = L if live else np.inf
                delta[r] = dl if live else 0.0
                for d in range(D):
                    qs[r, d] = q[b, h, t, d] if live else 0.0
                for d in range(Dv):
                    dos[r, d] = dout[b, h, t, d] if live else 0.0
            kn = kg[:n]  # (n, D)
            vn = vg[:n]  # (n, Dv)
            p = np.dot(qs, kn.T)  # (m, n) unscaled scores
            for r in range(m):
                end = max(0, min(n, S - T + t0 + r % c + 1)) if causal else n
                L = lse_r[r]
                for j in range(end):
                    p[r, j] = fast_exp(p[r, j] * sc - L)
                for j in range(end, n):
                    p[r, j] = 0.0
            dvn = np.dot(p.T, dos)  # (n, Dv)
            ds = np.dot(dos, vn.T)  # (m, n): dp
            for r in range(m):
                dl = delta[r]
                for j in range(n):
                    ds[r, j] = p[r, j] * (ds[r, j] - dl) * sc
            dqc = np.dot(ds, kn)  # (m, D)
            dkn = np.dot(ds.T, qs)  # (n, D)
            for r in range(m):
                h, t = g * rep + r // c, t0 + r % c
                for d in range(D):
                    dq[b, h, t, d] = np.nan if nan_row[r] else dqc[r, d]
            for j in range(n):
                for d in range(D):
                    dk[b, g, j, d] += dkn[j, d]
                for d in range(Dv):
                    dv[b, g, j, d] += dvn[j, d]


@njit
def _copy_rows(src, dst):
    """dst[:] = src for a 2-D (possibly strided) src into a contiguous dst of its shape."""
    for j in range(src.shape[0]):
        for d in range(src.shape[1]):
            dst[j, d] = src[j, d]
