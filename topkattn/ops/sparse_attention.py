"""Sparse attention over selected keys: the attend stage every selection policy feeds.

Shape letters: B batch, H query heads, G KV heads, T queries, S keys, D head dim,
Dv value dim, K index slots per query (forced + selected; -1 = empty slot), c queries per chunk.

    s[b,h,t,i]  = scale * q[b,h,t] . k[b, g(h), idx[b,h,t,i]]      (g(h) = h // (H/G))
    p           = softmax_i(s)          (empty slots get p = 0)
    out[b,h,t]  = sum_i p[b,h,t,i] * v[b, g(h), idx[b,h,t,i]]

Forward saves (q, k, v, idx, out, lse); backward costs O(T*K*D): only selected
keys receive gradient.  Work is done in query chunks so gathers stay small.

Non-finite inputs follow the rule of :mod:`topkattn.ops.reference` (``attend_row``): a NaN
or +inf among a row's attended scores gives a NaN row (out and lse); -inf scores get
weight 0 and a row with nothing to attend gives zeros (lse -inf); only the values a row
attends reach it.  Backward: a row whose output is not finite gets a NaN dq and sends
nothing to dk, dv (:func:`inactive_rows`), so one bad row never poisons shared keys.
"""
from __future__ import annotations

from types import ModuleType

import numpy as np

from topkattn.backend import Array, get_array_module
from topkattn.threads import n_workers, pool

try:
    from topkattn.ops import cpu_kernels as _cpu_kernels
except Exception:  # pragma: no cover
    _cpu_kernels = None

GATHER_BYTES = 8 * 2**20  # budget for one chunk's gathered (B, H, c, K, D) keys


class SparseAttentionSaved:
    """What backward needs: inputs, indices (B, H, T, K), output and row logsumexp (B, H, T)."""

    __slots__ = ("q", "k", "v", "idx", "out", "lse", "scale")

    def __init__(self, q: Array, k: Array, v: Array, idx: Array, out: Array, lse: Array, scale: float) -> None:
        self.q, self.k, self.v, self.idx, self.out, self.lse, self.scale = q, k, v, idx, out, lse, scale


def sparse_attention_forward(q: Array, k: Array, v: Array, idx: Array, scale: float,
                             impl: str = "auto") -> tuple[Array, SparseAttentionSaved]:
    """out (B, H, T, Dv), saved.  Inputs are assumed validated (see topk_attention_forward).

    ``impl``: "auto" runs the Numba kernel :func:`topkattn.ops.cpu_kernels.sparse_attend_rows`
    for NumPy float inputs of one dtype (rows on the worker pool, no (B, H, c, K, D) gathers),
    "numpy" the vectorised xp path (CuPy always takes it).
    """
    xp = get_array_module(q, k, v)
    B, H, T, D = q.shape
    G, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    K = idx.shape[-1]
    out = xp.zeros((B, H, T, Dv), dtype=q.dtype)
    lse = xp.full((B, H, T), -xp.inf, dtype=q.dtype)
    if K == 0 or T == 0 or S == 0:  # nothing to attend: zeros, lse -inf
        return out, SparseAttentionSaved(q, k, v, idx, out, lse, scale)
    if impl != "numpy" and _use_kernel(xp, q, k, v):
        _attend_kernel(q, k, v, idx, scale, out, lse)
        return out, SparseAttentionSaved(q, k, v, idx, out, lse, scale)
    kf, vf = k.reshape(B * G * S, D), v.reshape(B * G * S, Dv)
    sc = q.dtype.type(scale)
    for t0, t1 in _chunks(T, B * H * K * max(D, Dv) * q.dtype.itemsize):
        flat, valid = _flat_rows(xp, idx[:, :, t0:t1], G, S)  # (B, H, c, K)
        ks = kf[flat]  # (B, H, c, K, D)
        s = ((q[:, :, t0:t1, None, :] * sc) * ks).sum(-1)  # (B, H, c, K)
        s = xp.where(valid, s, -xp.inf)
        mx = s.max(-1, keepdims=True)  # (B, H, c, 1); NaN and +inf reach the row maximum
        bad = (xp.isnan(mx) | (mx == xp.inf))[..., 0]  # (B, H, c): NaN rows
        mx_safe = xp.where(xp.isfinite(mx), mx, 0).astype(q.dtype)
        p = xp.exp(s - mx_safe)  # empty slots and -inf scores -> 0
        denom = p.sum(-1, keepdims=True)
        l_safe = xp.where(denom > 0, denom, 1)
        vs = _gather_valid(xp, vf, flat, valid)  # (B, H, c, K, Dv)
        o = ((p / l_safe)[..., None] * vs).sum(-2)  # every attended value: 0 * NaN stays NaN
        o = xp.where(denom > 0, o, 0)  # nothing to attend (no key, or every score -inf): zeros
        ls = xp.where(denom[..., 0] > 0, mx_safe[..., 0] + xp.log(l_safe[..., 0]), -xp.inf)
        out[:, :, t0:t1] = xp.where(bad[..., None], xp.nan, o)
        lse[:, :, t0:t1] = xp.where(bad, xp.nan, ls)
    return out, SparseAttentionSaved(q, k, v, idx, out, lse, scale)


def inactive_rows(xp: ModuleType, out: Array, lse: Array) -> tuple[Array, Array]:
    """(B, H, T) bool masks ``(inactive, nan_rows)`` of a forward's rows for backward.

    nan_rows: the output is not finite (or lse is NaN): such a row gets a NaN dq.
    inactive: nan_rows and the rows with nothing to attend (lse -inf): they send nothing
    to dk, dv (and their dq is NaN or 0).
    """
    nan_rows = xp.isnan(lse) | ~xp.isfinite(out).all(-1)
    return nan_rows | ~xp.isfinite(lse), nan_rows


def sparse_attention_backward(dout: Array, saved: SparseAttentionSaved) -> tuple[Array, Array, Array]:
    """(dq, dk, dv) from dout (B, H, T, Dv).  Unselected keys get exactly zero gradient.

    Rows whose forward output is not finite (a NaN or inf among the scores or values they
    attend) get a NaN dq and send nothing to dk/dv, so one bad query, key or value cannot
    poison the gradients of keys other rows share (:func:`inactive_rows`).  Reference:
    :func:`topkattn.ops.reference.masked_attention_grad_reference`.

    dk and dv are accumulated with a deterministic serial scatter-add (Numba on CPU,
    ``numpy.add.at`` without Numba, ``cupyx.scatter_add`` on the GPU).
    """
    q, k, v, idx, out, lse = saved.q, saved.k, saved.v, saved.idx, saved.out, saved.lse
    xp = get_array_module(q, k, v)
    B, H, T, D = q.shape
    G, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    K = idx.shape[-1]
    dq = xp.zeros_like(q)
    dk = xp.zeros((B * G * S, D), dtype=k.dtype)
    dv = xp.zeros((B * G * S, Dv), dtype=v.dtype)
    if K == 0 or T == 0 or B * H == 0 or S == 0:
        return dq, dk.reshape(k.shape), dv.reshape(v.shape)
    kf, vf = k.reshape(B * G * S, D), v.reshape(B * G * S, Dv)
    k_finite = bool(xp.isfinite(kf).all())
    sc = q.dtype.type(saved.scale)
    inactive, nan_rows = inactive_rows(xp, out, lse)  # (B, H, T)
    for t0, t1 in _chunks(T, B * H * K * max(D, Dv) * q.dtype.itemsize):
        c = t1 - t0
        flat, valid = _flat_rows(xp, idx[:, :, t0:t1], G, S)  # (B, H, c, K)
        live = ~inactive[:, :, t0:t1]  # (B, H, c)
        qc = xp.where(live[..., None], q[:, :, t0:t1], 0)  # (B, H, c, D)
        doc = xp.where(live[..., None], dout[:, :, t0:t1], 0)  # (B, H, c, Dv)
        ks = _gather_valid(xp, kf, flat, valid)  # (B, H, c, K, D)
        vs = _gather_valid(xp, vf, flat, valid)  # (B, H, c, K, Dv)
        s = ((qc[..., None, :] * sc) * ks).sum(-1)  # (B, H, c, K)
        lse_c = xp.where(live, lse[:, :, t0:t1], 0)[..., None]
        p = xp.where(valid & live[..., None], xp.exp(xp.where(valid, s, -xp.inf) - lse_c), 0)
        dp = (vs * doc[..., None, :]).sum(-1)  # (B, H, c, K)
        delta = (doc * xp.where(live[..., None], out[:, :, t0:t1], 0)).sum(-1, keepdims=True)  # (B, H, c, 1)
        ds = xp.where(p > 0, p * (dp - delta), 0) * sc  # (B, H, c, K)
        if not k_finite:  # a key scoring -inf has p = ds = 0: keep its inf out of dq (0 * inf)
            ks = xp.where(xp.isfinite(ks), ks, 0)
        dq_c = (ds[..., None] * ks).sum(-2)  # (B, H, c, D)
        dq[:, :, t0:t1] = xp.where(nan_rows[:, :, t0:t1, None], xp.nan, dq_c)  # NaN rows stay NaN
        rows = xp.where(valid & live[..., None], flat, -1).reshape(-1)  # inactive rows send nothing
        n = B * H * c * K
        _scatter_add(xp, dk, rows, (ds[..., None] * qc[..., None, :]).reshape(n, D))
        _scatter_add(xp, dv, rows, (p[..., None] * doc[..., None, :]).reshape(n, Dv))
    return dq, dk.reshape(k.shape), dv.reshape(v.shape)



def sparse_attention_decode(query: Array, keys: Array, values: Array, idx: Array, scale: float,
                            impl: str = "auto") -> Array:
    """Softmax over the selected keys of one decode query per row (no backward: inference).

    query (B, H, D); keys (B, G, S, D); values (B, G, S, Dv); idx (B, H, K) (-1 = empty).
    Returns (B, H, Dv); a row with no selected key gives zeros.  ``values is keys`` gathers once.
    NumPy float inputs of one dtype run :func:`topkattn.ops.cpu_kernels.sparse_attend_rows` on
    each KV head's rows (its rep query heads as rows; no gathered copies); ``impl="numpy"``
    (and CuPy) takes the vectorised path.
    """
    xp = get_array_module(query, keys)
    B, H, D = query.shape
    G = keys.shape[1]
    if impl != "numpy" and _use_kernel(xp, query, keys, values) and _rows_contiguous(keys, values):
        rep = H // G
        out = np.empty((B, G, rep, values.shape[-1]), dtype=query.dtype)
        lse = np.empty((B, G, rep), dtype=query.dtype)
        qg = np.ascontiguousarray(query).reshape(B, G, rep, D)
        ig = np.ascontiguousarray(idx).reshape(B, G, rep, idx.shape[-1])
        for b in range(B):
            for g in range(G):
                kb = np.ascontiguousarray(keys[b, g])  # (S, D): a view of the cache rows
                vb = kb if values is keys else np.ascontiguousarray(values[b, g])
                _cpu_kernels.sparse_attend_rows(qg[b, g], kb, vb, ig[b, g], scale, 0, rep, out[b, g], lse[b, g])
        return out.reshape(B, H, -1)
    bi = xp.arange(B)[:, None, None]
    gi = (xp.arange(H) // (H // G))[None, :, None]
    valid = idx >= 0
    j = xp.where(valid, idx, 0)
    kk = keys[bi, gi, j]  # (B, H, K, D)
    s = (kk * (query * query.dtype.type(scale))[:, :, None, :]).sum(-1)  # (B, H, K)
    s = xp.where(valid, s, -np.inf)
    m = s.max(-1, keepdims=True)  # NaN and +inf reach the row maximum
    bad = xp.isnan(m) | (m == np.inf)  # (B, H, 1): NaN rows
    m = xp.where(xp.isfinite(m), m, 0)
    p = xp.exp(s - m)
    denom = p.sum(-1, keepdims=True)
    p = p / xp.where(denom > 0, denom, 1)
    vv = kk if values is keys else values[bi, gi, j]  # (B, H, K, Dv)
    vv = xp.where(valid[..., None], vv, 0)  # empty slots read key 0: keep its NaN out
    out = xp.where(denom > 0, (p[..., None] * vv).sum(-2), 0)  # (B, H, Dv)
    return xp.where(bad, np.nan, out)


# rows x selected slots per worker task of the Numba attend kernel
ATTEND_TASK_SLOTS = 1 << 16


KERNEL_TASK_WORK = 1 << 22  # multiply-adds per worker task of the row kernels; below 2 tasks: one thread


def kernel_backward(q: Array, k: Array, v: Array, idx: Array, out: Array, lse: Array, dout: Array, scale: float,
                    inactive: Array) -> tuple[Array, Array, Array] | None:
    """``(dq, dk, dv)`` of softmax over the selected keys idx (B, H, T, K) by the Numba kernel
    :func:`topkattn.ops.cpu_kernels.sparse_backward_groups` (KV heads split over the worker
    pool), or None where it does not apply: not NumPy float arrays of one dtype, no Numba, a row
    in ``inactive`` (B, H, T) (its forward was not finite, or attended nothing), or a non-finite
    dout, key or value -- the vectorised path handles those by the rules of
    :func:`sparse_attention_backward`.  The same sums as that path up to their order (so
    :func:`sparse_attention_backward` itself keeps the vectorised path: its tests compare a run
    with a non-finite input to a clean one at 1e-12; :mod:`topkattn.ops.masked_attention` uses this)."""
    xp = get_array_module(q, k, v)
    if not (_use_kernel(xp, q, k, v, dout) and not bool(inactive.any()) and bool(np.isfinite(dout).all())
            and bool(np.isfinite(k).all()) and bool(np.isfinite(v).all())):
        return None
    B, H, T, D = q.shape
    G, Dv = k.shape[1], v.shape[3]
    qc, kc, vc, ic, doc = (np.ascontiguousarray(a) for a in (q, k, v, idx, dout))
    delta = np.ascontiguousarray((doc * out).sum(-1))  # (B, H, T)
    lc = np.ascontiguousarray(lse)
    dq, dk, dv = np.zeros_like(qc), np.zeros_like(kc), np.zeros_like(vc)

    def groups(g0, g1):
        _cpu_kernels.sparse_backward_groups(qc, kc, vc, ic, lc, doc, delta, float(scale), g0, g1, dq, dk, dv)

    run_split(groups, B * G, B * H * T * idx.shape[-1] * 2 * (D + Dv))
    return dq, dk, dv


def run_split(run: object, n: int, work: int) -> None:
    """run(i0, i1) over 0 .. n-1: inline, or in contiguous ranges on the worker pool when there
    are workers and ``work`` multiply-adds is worth two tasks (``KERNEL_TASK_WORK`` each)."""
    nw = min(n_workers(), n)
    if nw <= 1 or work < 2 * KERNEL_TASK_WORK:
        run(0, n)
        return
    cuts = [n * j // nw for j in range(nw + 1)]
    for job in [pool().submit(run, a, b) for a, b in zip(cuts[:-1], cuts[1:])]:
        job.result()


def _use_kernel(xp, *arrays):
    """The Numba kernels run for NumPy float arrays of one dtype (every other input: the xp path)."""
    return (xp is np and _cpu_kernels is not None and arrays[0].dtype in (np.float32, np.float64)
            and all(a.dtype == arrays[0].dtype for a in arrays))


def _rows_contiguous(*arrays):
    """Each (b, g) slice of these (B, G, S, X) arrays has contiguous rows (no copy to hand it to a kernel)."""
    return all(a.strides[-1] == a.itemsize and a.strides[-2] == a.shape[-1] * a.itemsize for a in arrays)


def _attend_kernel(q, k, v, idx, scale, out, lse):
    """Forward of the selected rows with :func:`topkattn.ops.cpu_kernels.sparse_attend_rows`,
    (batch, head, query range) pieces on the worker pool; fills out (B, H, T, Dv), lse (B, H, T)."""
    B, H, T, _ = q.shape
    G = k.shape[1]
    rep = H // G
    K = idx.shape[-1]
    kc = [[np.ascontiguousarray(k[b, g]) for g in range(G)] for b in range(B)]  # (S, D) views
    vc = [[np.ascontiguousarray(v[b, g]) for g in range(G)] for b in range(B)]
    qc, ic = np.ascontiguousarray(q), np.ascontiguousarray(idx)
    step = max(1, ATTEND_TASK_SLOTS // max(K, 1))
    tasks = [(b, h, t0, min(T, t0 + step)) for b in range(B) for h in range(H) for t0 in range(0, T, step)]

    def run(task):
        b, h, t0, t1 = task
        _cpu_kernels.sparse_attend_rows(qc[b, h], kc[b][h // rep], vc[b][h // rep], ic[b, h], scale, t0, t1,
                                        out[b, h], lse[b, h])

    if n_workers() == 1 or len(tasks) == 1:
        for task in tasks:
            run(task)
    else:
        for job in [pool().submit(run, task) for task in tasks]:
            job.result()


def _chunks(T, bytes_per_query):
    c = max(1, GATHER_BYTES // max(1, bytes_per_query))
    return [(t0, min(T, t0 + c)) for t0 in range(0, T, c)]


def _flat_rows(xp, idx, G, S):
    """Row numbers into k.reshape(B*G*S, D) for idx (B, H, c, K); empty slots point at row 0."""
    B, H = idx.shape[:2]
    rep = H // G
    base = (xp.arange(B)[:, None] * G + xp.arange(H)[None, :] // rep) * S  # (B, H)
    valid = idx >= 0
    flat = xp.where(valid, idx + base[:, :, None, None], 0)
    return flat, valid


def _gather_valid(xp, rows, flat, valid):
    """rows[flat] with empty slots zeroed: they point at row 0, which may hold a NaN that
    0 * NaN would carry into rows (of any batch) that never selected it."""
    return xp.where(valid[..., None], rows[flat], 0)


def _scatter_add(xp, out, rows, vals):
    if xp is np:
        if _cpu_kernels is not None:
            _cpu_kernels.scatter_add_rows(out, rows, np.ascontiguousarray(vals))
        else:
            keep = rows >= 0
            np.add.at(out, rows[keep], vals[keep])
    else:
        import cupyx

        keep = rows >= 0
        cupyx.scatter_add(out, rows[keep], vals[keep])
