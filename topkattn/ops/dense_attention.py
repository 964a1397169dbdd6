"""Dense (causal) softmax attention, chunked over queries, saving the row logsumexp.

Shape letters: B batch, H query heads, G KV heads (H % G == 0), T queries, S keys,
D head dim, Dv value dim; c queries per chunk, n the keys a chunk sees, rep = H // G.
Head h reads KV head g(h) = h // (H / G).

    s[t, j] = scale * q_t . k_j          (causal: query t sits at S - T + t, sees j <= S - T + t)
    out_t   = softmax_j(s[t]) v,         lse_t = logsumexp_j s[t]
Backward, with p = exp(s - lse) recomputed chunk by chunk and delta_t = dout_t . out_t:
    dv = p^T dout,   ds = p * (dout v^T - delta),   dq = scale ds k,   dk = scale ds^T q
Peak extra memory is one (B, H, chunk, S) tile: no (T, S) matrix is kept.

Non-finite inputs follow the rule of :mod:`topkattn.ops.reference` (``attend_row``): a
row sees only its visible keys and values -- a NaN or inf in a future key or value never
reaches an earlier row, forward or backward (hidden entries are removed with ``where``
and non-finite values are summed only over the rows that see them, never multiplied
by a zero weight); a NaN or +inf among a row's visible scores gives a NaN row; a row whose
output is not finite gets a NaN dq and sends nothing to dk, dv.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import numpy as np

from topkattn.backend import FLOAT_DTYPES, Array, as_engine_array, get_array_module, to_numpy
from topkattn.checks import check_bool, check_int, check_real
from topkattn.ops.selection import decode_scores
from topkattn.ops.sparse_attention import inactive_rows, run_split
from topkattn.threads import blas_single_thread, n_workers

try:  # Numba CPU kernels are optional at run time: the NumPy path needs no compiler.
    from topkattn.ops import dense_kernels as _kernels
except Exception:  # pragma: no cover - numba missing or broken
    _kernels = None

TILE_BYTES = 16 * 2**20  # budget for one chunk's (B, H, c, S) score tile
KERNEL_TILE_BYTES = 4 * 2**20  # budget for one (b, g) group's (rep c, S) tile in the Numba kernels
KERNEL_CHUNK = 64  # queries per tile at most: causal chunks skip the keys after their last row


def default_scale(D: int) -> float:
    """1 / sqrt(D), the default score scale (1 for D = 0, where every score is 0)."""
    return 1.0 / np.sqrt(max(int(D), 1))


class DenseAttentionSaved:
    """q, k, v, out, lse (B, H, T), scale, causal, chunk_size (of the NumPy path) and
    kernel_chunk (queries per tile of the Numba kernels; None: the forward did not use them)."""

    __slots__ = ("q", "k", "v", "out", "lse", "scale", "causal", "chunk_size", "kernel_chunk")

    def __init__(self, q: Array, k: Array, v: Array, out: Array, lse: Array, scale: float, causal: bool,
                 chunk_size: int) -> None:
        self.q, self.k, self.v, self.out, self.lse = q, k, v, out, lse
        self.scale, self.causal, self.chunk_size = scale, causal, chunk_size
        self.kernel_chunk = None


def dense_attention(q: Array, k: Array, v: Array, *, causal: bool = True, scale: float | None = None,
                    chunk_size: int | None = None) -> Array:
    """Dense softmax attention: q (B, H, T, D), k (B, G, S, D), v (B, G, S, Dv) -> (B, H, T, Dv).

    ``scale`` multiplies q.k (default 1/sqrt(D), 1 for D = 0).  Rows that see no key give
    zeros; a NaN or inf reaches only the rows that see it (module docstring).
    Equal to :func:`topkattn.ops.topk_attention` with ``topk >= S``, without the selection.
    """
    return dense_attention_forward(q, k, v, causal=causal, scale=scale, chunk_size=chunk_size)[0]


def dense_attention_forward(q: Array, k: Array, v: Array, *, causal: bool = True, scale: float | None = None,
                            chunk_size: int | None = None) -> tuple[Array, DenseAttentionSaved]:
    """``(out, saved)``; saved keeps q, k, v, out and the logsumexp (B, H, T).

    On NumPy float32/float64 inputs with Numba and every entry finite, the Numba group
    kernels of :mod:`topkattn.ops.dense_kernels` compute it (the same arithmetic, sums in
    another order, float32 exp within 3e-7 relative); otherwise the NumPy/CuPy chunk loop below.
    """
    q, k, v = (as_engine_array(a, n) for a, n in ((q, "q"), (k, "k"), (v, "v")))
    check_qkv(q, k, v, scale, chunk_size)
    causal = check_bool("causal", causal)
    xp = get_array_module(q, k, v)
    B, H, T, D = q.shape
    G, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    rep = H // G
    scale = default_scale(D) if scale is None else float(scale)
    if _use_kernels(xp, q, k, v):
        return _kernel_forward(q, k, v, causal, scale, chunk_size)
    c = _numpy_chunk(B * H * S * q.dtype.itemsize, chunk_size)
    out = xp.zeros((B, H, T, Dv), dtype=q.dtype)
    lse = xp.full((B, H, T), -np.inf, dtype=q.dtype)
    qg = q.reshape(B, G, rep, T, D)
    v_ok, bad_keys = finite_keys(xp, v)  # values with non-finite entries zeroed, their keys
    for t0, t1, n in query_chunks(T, S, c, causal):
        if n == 0:
            continue
        cc = t1 - t0
        s = chunk_scores(xp, qg, k, t0, t1, n, S, T, scale, causal)  # (B, G, rep, c, n)
        m = s.max(-1, keepdims=True)  # NaN and +inf reach the row maximum
        bad = (xp.isnan(m) | (m == np.inf))[..., 0]  # (B, G, rep, c): NaN rows
        m = xp.where(xp.isfinite(m), m, 0)
        p = xp.exp(s - m)  # hidden keys and -inf scores -> 0
        denom = p.sum(-1, keepdims=True)
        ls = xp.where(denom > 0, denom, 1)
        w = p / ls  # (B, G, rep, c, n)
        vis = visible_mask(t0, t1, n, S, T, causal) if bad_keys.size else None  # only for non-finite values
        o = weighted_values(xp, w, v_ok, v, bad_keys, vis)
        o = xp.where(denom > 0, o.reshape(B, G, rep, cc, Dv), 0)  # nothing to attend: zeros
        out[:, :, t0:t1] = xp.where(bad[..., None], np.nan, o).reshape(B, H, cc, Dv)
        ls = xp.where(denom > 0, m + xp.log(ls), -np.inf)[..., 0]
        lse[:, :, t0:t1] = xp.where(bad, np.nan, ls).reshape(B, H, cc)
    return out, DenseAttentionSaved(q, k, v, out, lse, scale, causal, c)


def dense_attention_backward(dout: Array, saved: DenseAttentionSaved) -> tuple[Array, Array, Array]:
    """``(dq, dk, dv)`` from dout (B, H, T, Dv).

    A row whose output is not finite gets a NaN dq and sends nothing to dk, dv; a NaN or
    inf in a key or value reaches no gradient of a row that does not see it.
    """
    if not isinstance(saved, DenseAttentionSaved):
        raise TypeError(f"saved must come from dense_attention_forward, got {type(saved).__name__}")
    q, k, v, out, lse = saved.q, saved.k, saved.v, saved.out, saved.lse
    dout = check_dout(dout, out)
    xp = get_array_module(q)
    if saved.kernel_chunk is not None and bool(xp.isfinite(dout).all()):  # the forward's kernels took q, k, v
        return _kernel_backward(dout, saved)
    B, H, T, D = q.shape
    G, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    rep = H // G
    sc = q.dtype.type(saved.scale)
    dq = xp.zeros_like(q)
    dk = xp.zeros_like(k)
    dv = xp.zeros_like(v)
    inactive, nan_rows = inactive_rows(xp, out, lse)  # (B, H, T)
    live = ~inactive
    qg = xp.where(live[..., None], q, 0).reshape(B, G, rep, T, D)  # inactive rows send nothing
    dout = xp.where(live[..., None], dout, 0)
    delta = (dout * xp.where(live[..., None], out, 0)).sum(-1)  # (B, H, T)
    lse = xp.where(live, lse, 0)
    k_ok, _ = finite_keys(xp, k)  # a key a live row weighs 0 (score -inf) may hold inf:
    v_ok, _ = finite_keys(xp, v)  # zeroed, it adds nothing instead of 0 * inf
    for t0, t1, n in query_chunks(T, S, saved.chunk_size, saved.causal):
        if n == 0:
            continue
        c = t1 - t0
        s = chunk_scores(xp, qg, k, t0, t1, n, S, T, saved.scale, saved.causal)  # (B, G, rep, c, n)
        L = lse[:, :, t0:t1].reshape(B, G, rep, c, 1)
        lv = live[:, :, t0:t1].reshape(B, G, rep, c, 1)
        p = xp.where(lv, xp.exp(s - L), 0)  # hidden keys (-inf) -> 0
        p = p.reshape(B, G, rep * c, n)
        do = dout[:, :, t0:t1].reshape(B, G, rep * c, Dv)
        dv[:, :, :n] += xp.matmul(p.swapaxes(-1, -2), do)  # (B, G, n, Dv)
        dp = xp.matmul(do, v_ok[:, :, :n].swapaxes(-1, -2))  # (B, G, rep*c, n)
        ds = p * (dp - delta[:, :, t0:t1].reshape(B, G, rep * c, 1)) * sc
        qc = qg[:, :, :, t0:t1].reshape(B, G, rep * c, D)
        dq_c = xp.matmul(ds, k_ok[:, :, :n]).reshape(B, H, c, D)
        dq[:, :, t0:t1] = xp.where(nan_rows[:, :, t0:t1, None], np.nan, dq_c)
        dk[:, :, :n] += xp.matmul(ds.swapaxes(-1, -2), qc)
    return dq, dk, dv


def _use_kernels(xp, *arrays):
    """The Numba kernels run for finite NumPy float32/float64 arrays of one dtype, Numba importable."""
    return (xp is np and _kernels is not None and arrays[0].dtype in (np.float32, np.float64)
            and all(a.dtype == arrays[0].dtype for a in arrays) and all(bool(np.isfinite(a).all()) for a in arrays))


def _numpy_chunk(bytes_per_query: int, chunk_size: int | None) -> int:
    """Queries per chunk of the NumPy path: ``chunk_size``, or a (B, H, c, S) tile of about TILE_BYTES."""
    return chunk_size or max(1, TILE_BYTES // max(1, bytes_per_query))


def _kernel_chunk(rep: int, S: int, itemsize: int, chunk_size: int | None) -> int:
    """Queries per tile of the Numba kernels: ``chunk_size``, or at most KERNEL_CHUNK with a
    (rep c, S) tile of at most KERNEL_TILE_BYTES."""
    return chunk_size or max(1, min(KERNEL_CHUNK, KERNEL_TILE_BYTES // max(1, rep * S * itemsize)))


def _run_groups(run, n_groups: int, work: int) -> None:
    """run(i0, i1) over the (b, g) groups: on the worker pool with one BLAS thread each when
    there are more groups than one (their GEMMs are small), else inline with the BLAS threads
    the process has."""
    if n_workers() > 1 and n_groups > 1:
        with blas_single_thread():
            run_split(run, n_groups, work)
    else:
        run(0, n_groups)


def _kernel_forward(q, k, v, causal, scale, chunk_size):
    B, H, T, D = q.shape
    G, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    c = _kernel_chunk(H // G, S, q.dtype.itemsize, chunk_size)
    out = np.empty((B, H, T, Dv), dtype=q.dtype)
    lse = np.empty((B, H, T), dtype=q.dtype)

    def groups(i0, i1):
        _kernels.dense_forward_groups(q, k, v, bool(causal), float(scale), c, i0, i1, out, lse)

    _run_groups(groups, B * G, B * H * T * S * (D + Dv))
    numpy_chunk = _numpy_chunk(B * H * S * q.dtype.itemsize, chunk_size)  # should a backward fall back
    saved = DenseAttentionSaved(q, k, v, out, lse, scale, causal, numpy_chunk)
    saved.kernel_chunk = c
    return out, saved


def _kernel_backward(dout, saved):
    q, k, v = saved.q, saved.k, saved.v
    B, H, T, D = q.shape
    G, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    c = saved.kernel_chunk
    dq = np.zeros_like(q, order="C")  # chunks that see no key are skipped
    dk = np.zeros((B, G, S, D), dtype=q.dtype)
    dv = np.zeros((B, G, S, Dv), dtype=q.dtype)

    def groups(i0, i1):
        _kernels.dense_backward_groups(q, k, v, saved.out, saved.lse, dout, bool(saved.causal), float(saved.scale),
                                       c, i0, i1, dq, dk, dv)

    _run_groups(groups, B * G, 2 * B * H * T * S * (D + Dv))
    return dq, dk, dv


def dense_attention_decode(query: Array, keys: Array, values: Array, scale: float) -> Array:
    """Dense softmax of one decode query per row over all S keys: (B, H, D) -> (B, H, Dv).

    keys (B, G, S, D) and values (B, G, S, Dv) may be views into a larger cache buffer:
    each (b, g) pair is one 2-D matrix product (BLAS on the strided view, no copy).
    Non-finite scores follow the rule of :func:`dense_attention` (S = 0: zeros).
    """
    xp = get_array_module(query, keys)
    B, H, D = query.shape
    G, S = keys.shape[1], keys.shape[2]
    Dv = values.shape[-1]
    out = xp.zeros((B, G, H // G, Dv), dtype=query.dtype)
    if S == 0 or B * H == 0:
        return out.reshape(B, H, Dv)
    s = decode_scores(query, keys, scale).reshape(B, G, H // G, -1)  # (B, G, rep, S)
    m = s.max(-1, keepdims=True)  # NaN and +inf reach the row maximum
    bad = xp.isnan(m) | (m == np.inf)  # (B, G, rep, 1): NaN rows
    s -= xp.where(xp.isfinite(m), m, 0)
    p = xp.exp(s)
    denom = p.sum(-1, keepdims=True)
    p /= xp.where(denom > 0, denom, 1)
    for b in range(B):
        for g in range(G):
            out[b, g] = p[b, g] @ values[b, g]  # (rep, Dv)
    out = xp.where(bad, np.nan, xp.where(denom > 0, out, 0))
    return out.reshape(B, H, Dv)


def finite_keys(xp: ModuleType, a: Array) -> tuple[Array, np.ndarray]:
    """``(a_ok, bad)`` for keys or values a (B, G, S, X): a_ok is a with every key row that
    holds a NaN or inf zeroed (a itself when there is none); bad the host int64 array of
    those key indices j (in any batch and head)."""
    nonfinite = ~xp.isfinite(a).all(-1)  # (B, G, S)
    bad = np.flatnonzero(to_numpy(nonfinite.any((0, 1)))) if nonfinite.size else np.zeros(0, np.int64)
    if not bad.size:
        return a, bad
    return xp.where(nonfinite[..., None], 0, a), bad


def visible_mask(t0: int, t1: int, n: int, S: int, T: int, causal: bool) -> np.ndarray | None:
    """Host (c, n) bool: key j visible to query row t0 + i; None when every row sees all n."""
    if not causal:
        return None
    pos = np.arange(t0, t1) + (S - T)
    vis = np.arange(n)[None, :] <= pos[:, None]
    return None if vis.all() else vis


def weighted_values(xp: ModuleType, w: Array, v_ok: Array, v: Array, bad_keys: np.ndarray,
                    attend: Array | None) -> Array:
    """sum_j w[..., j] v_j over the keys each row attends: (B, G, rep*c, Dv).

    w (B, G, rep, c, n) weights (0 off the attended keys); v_ok: v (B, G, S, Dv) with the
    rows of ``bad_keys`` zeroed (see :func:`finite_keys`); attend: the keys each row
    attends, None (all n), a host (c, n) bool array or an array broadcastable to w's shape.
    One matmul over v_ok, then the non-finite keys each row attends are added term by term
    (w_j * v_j, so 0 * NaN stays NaN for a row that attends it, and a row that does not
    attend it never multiplies it).
    """
    B, G, rep, c, n = w.shape
    Dv = v.shape[-1]
    o = xp.matmul(w.reshape(B, G, rep * c, n), v_ok[:, :, :n])  # (B, G, rep*c, Dv)
    js = bad_keys[bad_keys < n]
    if not js.size:
        return o
    o = o.reshape(B, G, rep, c, Dv)
    step = max(1, TILE_BYTES // max(1, B * G * rep * c * Dv * w.dtype.itemsize))
    for i in range(0, js.size, step):
        j = js[i:i + step]
        jd = xp.asarray(j)
        vj = v[:, :, jd]  # (B, G, nb, Dv); rows finite in this (b, g) were in the matmul already
        vj = xp.where(xp.isfinite(vj).all(-1, keepdims=True), 0, vj)
        term = w[..., jd, None] * vj[:, :, None, None]  # (B, G, rep, c, nb, Dv)
        if attend is not None:
            a = xp.asarray(attend[:, j]) if isinstance(attend, np.ndarray) and attend.ndim == 2 \
                else attend[..., jd]  # (c, nb) or (B, G, rep, c, nb)
            term = xp.where(a[..., None], term, 0)
        o = o + term.sum(-2)
    return o.reshape(B, G, rep * c, Dv)


def check_dout(dout: Array, out: Array) -> Array:
    """dout as an engine array of out's shape (B, H, T, Dv) and dtype.

    TypeError unless a real floating-point array (complex, object, bool, integer refused)
    on the forward's device; ValueError for another shape.
    """
    dout = as_engine_array(dout, "dout")
    if dout.dtype.kind != "f":
        raise TypeError(f"dout must be a real floating-point array like the output ({out.dtype}), "
                        f"got dtype {dout.dtype}")
    if get_array_module(dout) is not get_array_module(out):
        raise TypeError("dout must live on the same device as the forward inputs")
    if tuple(dout.shape) != tuple(out.shape):
        raise ValueError(f"dout must have shape {tuple(out.shape)} (B, H, T, Dv), got {tuple(dout.shape)}")
    return dout.astype(out.dtype, copy=False)


def query_chunks(T: int, S: int, c: int, causal: bool) -> Iterator[tuple[int, int, int]]:
    """(t0, t1, n_cols): query chunks and the number of keys the chunk's last row sees."""
    for t0 in range(0, T, c):
        t1 = min(T, t0 + c)
        n = min(S, max(0, S - T + t1)) if causal else S
        yield t0, t1, n


def chunk_scores(xp: ModuleType, qg: Array, k: Array, t0: int, t1: int, n: int, S: int, T: int, scale: float,
                 causal: bool) -> Array:
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


def check_qkv(q: Array, k: Array, v: Array, scale: float | None, chunk_size: int | None) -> None:
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
