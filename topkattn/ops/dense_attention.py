"""Dense (causal) softmax attention, chunked over queries, saving the row logsumexp.

Shape letters: B batch, H query heads, G KV heads (H % G == 0), T queries, S keys,
D head dim, Dv value dim; c queries per chunk, n the keys a chunk sees, rep = H // G.
Head h reads KV head g(h) = h // (H / G).

    s[t, j] = scale * q_t . k_j          (causal: query t sits at S - T + t, sees j <= S - T + t)
    out_t   = softmax_j(s[t]) v,         lse_t = logsumexp_j s[t]
Backward, with p = exp(s - lse) recomputed chunk by chunk and delta_t = dout_t . out_t:
    dv = p^T dout,   ds = p * (dout v^T - delta),   dq = scale ds k,   dk = scale ds^T q
Peak extra memory is one (B, H, chunk, S) tile: no (T, S) matrix is kept.
"""

import numpy as np

from topkattn.backend import FLOAT_DTYPES, as_engine_array, get_array_module
from topkattn.checks import check_int, check_real
from topkattn.ops.selection import decode_scores

TILE_BYTES = 16 * 2**20  # budget for one chunk's (B, H, c, S) score tile


class DenseAttentionSaved:
    """q, k, v, out, lse (B, H, T), scale, causal, chunk_size."""

    __slots__ = ("q", "k", "v", "out", "lse", "scale", "causal", "chunk_size")

    def __init__(self, q, k, v, out, lse, scale, causal, chunk_size):
        self.q, self.k, self.v, self.out, self.lse = q, k, v, out, lse
        self.scale, self.causal, self.chunk_size = scale, causal, chunk_size


def dense_attention(q, k, v, *, causal=True, scale=None, chunk_size=None):
    """Dense softmax attention: q (B, H, T, D), k (B, G, S, D), v (B, G, S, Dv) -> (B, H, T, Dv).

    ``scale`` multiplies q.k (default 1/sqrt(D)).  Rows that see no key give zeros.
    Equal to :func:`topkattn.ops.topk_attention` with ``topk >= S``, without the selection.
    """
    return dense_attention_forward(q, k, v, causal=causal, scale=scale, chunk_size=chunk_size)[0]


def dense_attention_forward(q, k, v, *, causal=True, scale=None, chunk_size=None):
    """``(out, saved)``; saved keeps q, k, v, out and the logsumexp (B, H, T)."""
    q, k, v = (as_engine_array(a, n) for a, n in ((q, "q"), (k, "k"), (v, "v")))
    check_qkv(q, k, v, scale, chunk_size)
    xp = get_array_module(q, k, v)
    B, H, T, D = q.shape
    G, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    rep = H // G
    scale = 1.0 / np.sqrt(D) if scale is None else float(scale)
    c = chunk_size or max(1, TILE_BYTES // max(1, B * H * S * q.dtype.itemsize))
    out = xp.zeros((B, H, T, Dv), dtype=q.dtype)
    lse = xp.full((B, H, T), -np.inf, dtype=q.dtype)
    qg = q.reshape(B, G, rep, T, D)
    for t0, t1, n in query_chunks(T, S, c, causal):
        if n == 0:
            continue
        s = chunk_scores(xp, qg, k, t0, t1, n, S, T, scale, causal)  # (B, G, rep, c, n)
        m = s.max(-1, keepdims=True)
        m = xp.where(xp.isfinite(m), m, 0)
        p = xp.exp(s - m)
        denom = p.sum(-1, keepdims=True)
        ls = xp.where(denom > 0, denom, 1)
        o = xp.matmul((p / ls).reshape(B, G, rep * (t1 - t0), n), v[:, :, :n])  # (B, G, rep*c, Dv)
        out[:, :, t0:t1] = o.reshape(B, H, t1 - t0, Dv)
        lse[:, :, t0:t1] = xp.where(denom > 0, m + xp.log(ls), -np.inf)[..., 0].reshape(B, H, t1 - t0)
    return out, DenseAttentionSaved(q, k, v, out, lse, scale, causal, c)


def dense_attention_backward(dout, saved):
    """``(dq, dk, dv)`` from dout (B, H, T, Dv)."""
    q, k, v, out, lse = saved.q, saved.k, saved.v, saved.out, saved.lse
    dout = check_dout(dout, out)
    xp = get_array_module(q)
    B, H, T, D = q.shape
    G, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    rep = H // G
    sc = q.dtype.type(saved.scale)
    dq = xp.zeros_like(q)
    dk = xp.zeros_like(k)
    dv = xp.zeros_like(v)
    qg = q.reshape(B, G, rep, T, D)
    delta = (dout * out).sum(-1)  # (B, H, T)
    for t0, t1, n in query_chunks(T, S, saved.chunk_size, saved.causal):
        if n == 0:
            continue
        c = t1 - t0
        s = chunk_scores(xp, qg, k, t0, t1, n, S, T, saved.scale, saved.causal)  # (B, G, rep, c, n)
        L = lse[:, :, t0:t1].reshape(B, G, rep, c, 1)
        p = xp.where(xp.isfinite(L), xp.exp(s - xp.where(xp.isfinite(L), L, 0)), 0)
        p = p.reshape(B, G, rep * c, n)
        do = dout[:, :, t0:t1].reshape(B, G, rep * c, Dv)
        dv[:, :, :n] += xp.matmul(p.swapaxes(-1, -2), do)  # (B, G, n, Dv)
        dp = xp.matmul(do, v[:, :, :n].swapaxes(-1, -2))  # (B, G, rep*c, n)
        ds = p * (dp - delta[:, :, t0:t1].reshape(B, G, rep * c, 1)) * sc
        qc = qg[:, :, :, t0:t1].reshape(B, G, rep * c, D)
        dq[:, :, t0:t1] = xp.matmul(ds, k[:, :, :n]).reshape(B, H, c, D)
        dk[:, :, :n] += xp.matmul(ds.swapaxes(-1, -2), qc)
    return dq, dk, dv


def dense_attention_decode(query, keys, values, scale):
    """Dense softmax of one decode query per row over all S keys: (B, H, D) -> (B, H, Dv).

    keys (B, G, S, D) and values (B, G, S, Dv) may be views into a larger cache buffer:
    each (b, g) pair is one 2-D matrix product (BLAS on the strided view, no copy).
    """
    xp = get_array_module(query, keys)
    B, H, D = query.shape
    G = keys.shape[1]
    s = decode_scores(query, keys, scale).reshape(B, G, H // G, -1)  # (B, G, rep, S)
    s -= s.max(-1, keepdims=True)
    p = xp.exp(s)
    p /= p.sum(-1, keepdims=True)
    out = xp.empty((B, G, H // G, values.shape[-1]), dtype=query.dtype)
    for b in range(B):
        for g in range(G):
            out[b, g] = p[b, g] @ values[b, g]  # (rep, Dv)
    return out.reshape(B, H, -1)


def check_dout(dout, out):
    """dout as an engine array of out's shape (B, H, T, Dv) and dtype; ValueError otherwise."""
    dout = as_engine_array(dout, "dout")
    if tuple(dout.shape) != tuple(out.shape):
        raise ValueError(f"dout must have shape {tuple(out.shape)} (B, H, T, Dv), got {tuple(dout.shape)}")
    return dout.astype(out.dtype, copy=False)


def query_chunks(T, S, c, causal):
    """(t0, t1, n_cols): query chunks and the number of keys the chunk's last row sees."""
    for t0 in range(0, T, c):
        t1 = min(T, t0 + c)
        n = min(S, max(0, S - T + t1)) if causal else S
        yield t0, t1, n


def chunk_scores(xp, qg, k, t0, t1, n, S, T, scale, causal):
    B, G, rep, _, D = qg.shape
    c = t1 - t0
    qc = qg[:, :, :, t0:t1].reshape(B, G, rep * c, D)
    s = xp.matmul(qc * qc.dtype.type(scale), k[:, :, :n].swapaxes(-1, -2)).reshape(B, G, rep, c, n)
    if causal:
        pos = np.arange(t0, t1) + (S - T)  # (c,)
        hide = np.arange(n)[None, :] > pos[:, None]  # (c, n)
        if hide.any():
            s = xp.where(xp.asarray(hide), -np.inf, s)
    return s


def check_qkv(q, k, v, scale, chunk_size):
    for name, a, letters in (("q", q, "(B, H, T, D)"), ("k", k, "(B, G, S, D)"), ("v", v, "(B, G, S, Dv)")):
        if a.ndim != 4:
            raise ValueError(f"{name} must be 4-D {letters}, got shape {tuple(a.shape)}")
        if a.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32 or float64, got {a.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, H, T, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {B}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[3] != D:
        raise ValueError(f"k head dim must equal q's ({D}), got k shape {tuple(k.shape)}")
    if v.shape[1:3] != k.shape[1:3]:
        raise ValueError(f"v must have shape (B, G, S, Dv) like k {tuple(k.shape)}, got {tuple(v.shape)}")
    G = k.shape[1]
    if G == 0 or H % G:
        raise ValueError(f"query heads H={H} must be a multiple of KV heads G={G}")
    if scale is not None:
        check_real("scale", scale)
    check_int("chunk_size", chunk_size, 1, optional=True)
