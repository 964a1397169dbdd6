"""Attend the selected keys through a dense score tile: the short-sequence implementation of
the attend stage (:mod:`topkattn.ops.sparse_attention` is the general one).

Shape letters: B batch, H query heads, G KV heads (H % G == 0), T queries, S keys, D head dim,
Dv value dim, K index slots per query (-1 = empty slot), c queries per chunk, n the keys a
chunk's rows select among (one past the largest index), rep = H // G.

Same contract as ``sparse_attention_forward``/``_backward`` -- the same ``idx`` in, the same
output and row logsumexp out, gradients only for the selected keys -- computed another way:

    s    = scale * q k^T                      (B, H, c, n)  one matrix product per (b, g)
    mask = the selected keys of each row      (B, H, c, n)  scattered from idx
    p    = softmax over the masked row,       out = p v,    lse = logsumexp of the masked row
Backward, p recomputed from lse, delta = dout . out:
    dv = p^T dout,  ds = p * (dout v^T - delta),  dq = scale ds k,  dk = scale ds^T q

Where it pays: the gather path reads K key and value rows per query (B H T K (D + Dv)
numbers moved by fancy indexing); this one does matrix products over the n <= S keys and a
few passes over a (B, H, c, n) tile, cheaper while S is small next to K (D + Dv)
(:func:`masked_is_cheaper`).  The results equal the gather path's up to the order of the
float sums (the scores come from a matrix product instead of an elementwise product and sum).
Peak extra memory: one (B, H, c, S) tile, c chosen for about 16 MiB.

On NumPy float arrays with Numba (the training CPU path) neither tile nor gather is made: the
Numba row kernels (:func:`topkattn.ops.cpu_kernels.sparse_attend_heads` forward,
:func:`topkattn.ops.cpu_kernels.sparse_backward_groups` backward: one call per worker, not per
head) attend each row's selected keys directly -- the gather path's arithmetic, without its
(B, H, c, K, D) copies and scatter-adds.  At train-toy's default size (B H = 128, T = 64, K = 8,
D + Dv = 40) forward 2.9 -> 0.9 ms and backward 9.5 -> 1.9 ms a layer.  The backward kernel
takes finite inputs whose rows are all live; anything else goes the tile way below.

Non-finite inputs follow the rule of :mod:`topkattn.ops.reference` (``attend_row``), as the
gather path: a NaN or +inf among a row's selected scores gives a NaN row (out and lse);
-inf scores get weight 0; a row with nothing selected gives zeros and lse -inf; a NaN or inf
value reaches only the rows that select it; backward gives a NaN row a NaN dq and lets it
send nothing to dk, dv.  A non-finite dout in a live row goes to the gather backward (a
product over the tile would multiply its inf by the zero weights of unselected keys).
"""
from __future__ import annotations

from types import ModuleType

import numpy as np

from topkattn.backend import Array, get_array_module
from topkattn.ops.dense_attention import check_dout, finite_keys, weighted_values
from topkattn.ops.sparse_attention import (
    SparseAttentionSaved,
    inactive_rows,
    kernel_backward,
    run_split,
    sparse_attention_backward,
)

try:  # Numba CPU kernels are optional at run time: the NumPy path needs no compiler.
    from topkattn.ops import cpu_kernels as _cpu_kernels
except Exception:  # pragma: no cover - numba missing or broken
    _cpu_kernels = None

TILE_BYTES = 16 * 2**20  # budget for one chunk's (B, H, c, S) score tile


class MaskedAttentionSaved(SparseAttentionSaved):
    """What :func:`masked_attention_backward` needs: q, k, v, idx, out, lse, scale, chunk_size.
    (A :class:`SparseAttentionSaved`: the gather backward accepts it too.)"""

    __slots__ = ("chunk_size",)


def masked_is_cheaper(S: int, K: int, D: int, Dv: int) -> bool:
    """Whether the dense-tile path beats the gather path (forward + backward) for S keys and K
    slots per query: S <= K (D + Dv) / 2.5.

    Measured on one x86 core (float32, causal, fixed k): the tile path costs 10-16 ns per
    (query, key) whatever D, the gather path 4.5 ns per (query, slot) and head dim, mostly in
    its backward.  Tile / gather time: 0.47 at B H = 128, S = 64, K = 8, D + Dv = 40 (train-toy's
    default); 0.87 at B H = 256, S = 256, K = 8, D + Dv = 80 (its --d-model 256 --heads 8
    --seq-len 256); 1.03 at S = 192, K = 8, D + Dv = 80; 1.26 at S = 128, K = 4; 2.1 at S = 512,
    K = 8; 0.45 at S = 512, K = 32.  On the boundary (S = K (D + Dv) / 2.5: train-toy's large size,
    and S = 128, K = 4) the two are within a quarter either way.
    """
    return 5 * S <= 2 * K * (D + Dv)


def masked_attention_forward(q: Array, k: Array, v: Array, idx: Array, scale: float,
                             chunk_size: int | None = None) -> tuple[Array, MaskedAttentionSaved]:
    """out (B, H, T, Dv) and a :class:`MaskedAttentionSaved` from q (B, H, T, D),
    k (B, G, S, D), v (B, G, S, Dv) and the selection idx (B, H, T, K) int (-1 = empty).

    Inputs are assumed validated (the layers build them; ``topk_attention_forward``'s checks
    describe them).
    """
    xp = get_array_module(q, k, v)
    B, H, T, D = q.shape
    G, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    rep = H // G
    out = xp.zeros((B, H, T, Dv), dtype=q.dtype)
    lse = xp.full((B, H, T), -np.inf, dtype=q.dtype)
    saved = MaskedAttentionSaved(q, k, v, idx, out, lse, scale)
    saved.chunk_size = chunk_size
    if idx.shape[-1] == 0 or T == 0 or S == 0 or B * H == 0:
        return out, saved
    if _use_kernels(xp, q, k, v):  # NumPy: the selected keys row by row, no tile
        qc, kc, vc, ic = (np.ascontiguousarray(a) for a in (q, k, v, idx))
        work = B * H * T * idx.shape[-1] * (D + Dv)

        def heads(i0, i1):
            _cpu_kernels.sparse_attend_heads(qc, kc, vc, ic, float(scale), i0, i1, out, lse)

        run_split(heads, B * H, work)
        return out, saved
    sc = q.dtype.type(scale)
    qg = q.reshape(B, G, rep, T, D)
    v_ok, bad_keys = finite_keys(xp, v)  # values with non-finite entries zeroed, their keys
    finite = bool(xp.isfinite(q).all()) and bool(xp.isfinite(k).all())  # every score a number
    for t0, t1, n in _chunks(xp, idx, B * H * S * q.dtype.itemsize, chunk_size):
        c = t1 - t0
        s = _scores(xp, qg, k, t0, t1, n, sc)  # (B, H, c, n)
        hide_unselected(xp, s, idx[:, :, t0:t1], finite)
        m = s.max(-1, keepdims=True)  # NaN and +inf among the selected reach the row maximum
        bad = (xp.isnan(m) | (m == np.inf))[..., 0]  # (B, H, c): NaN rows
        m = xp.where(xp.isfinite(m), m, 0)
        xp.subtract(s, m, out=s)
        p = xp.exp(s, out=s)  # unnormalised weights: unselected and -inf scores -> 0
        denom = p.sum(-1, keepdims=True)  # (B, H, c, 1)
        ls = xp.where(denom > 0, denom, 1)
        attend = None if not bad_keys.size else ~unselected_mask(xp, idx[:, :, t0:t1], n).reshape(B, G, rep, c, n)
        o = weighted_values(xp, p.reshape(B, G, rep, c, n), v_ok, v, bad_keys, attend)  # (B, G, rep*c, Dv)
        o = o.reshape(B, H, c, Dv) / ls
        o = xp.where(denom > 0, o, 0)  # nothing selected: zeros
        out[:, :, t0:t1] = xp.where(bad[..., None], np.nan, o)
        row_lse = xp.where(denom > 0, m + xp.log(ls), -np.inf)[..., 0]
        lse[:, :, t0:t1] = xp.where(bad, np.nan, row_lse)
    return out, saved


def masked_attention_backward(dout: Array, saved: MaskedAttentionSaved) -> tuple[Array, Array, Array]:
    """``(dq, dk, dv)`` from dout (B, H, T, Dv); keys no row selected get exactly zero."""
    if not isinstance(saved, MaskedAttentionSaved):
        raise TypeError(f"saved must come from masked_attention_forward, got {type(saved).__name__}")
    q, k, v, idx, out, lse = saved.q, saved.k, saved.v, saved.idx, saved.out, saved.lse
    dout = check_dout(dout, out)
    xp = get_array_module(q, k, v)
    B, H, T, D = q.shape
    G, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    rep = H // G
    dq = xp.zeros_like(q)
    dk = xp.zeros_like(k)
    dv = xp.zeros_like(v)
    if idx.shape[-1] == 0 or T == 0 or S == 0 or B * H == 0:
        return dq, dk, dv
    sc = q.dtype.type(saved.scale)
    inactive, nan_rows = inactive_rows(xp, out, lse)  # (B, H, T)
    grads = kernel_backward(q, k, v, idx, out, lse, dout, saved.scale, inactive)  # NumPy: no tile
    if grads is not None:
        return grads
    live = ~inactive
    qg = xp.where(live[..., None], q, 0).reshape(B, G, rep, T, D)  # inactive rows send nothing
    dout_live = xp.where(live[..., None], dout, 0)
    if not bool(xp.isfinite(dout_live).all()):  # 0 * inf would leak into unselected keys: gather path
        return sparse_attention_backward(dout, saved)
    dout = dout_live
    delta = (dout * xp.where(live[..., None], out, 0)).sum(-1)  # (B, H, T)
    lse = xp.where(live, lse, 0)
    k_ok, _ = finite_keys(xp, k)  # a selected key scoring -inf (p = 0) may hold inf: zeroed,
    v_ok, _ = finite_keys(xp, v)  # it adds nothing instead of 0 * inf
    finite = bool(xp.isfinite(qg).all()) and bool(xp.isfinite(k).all())  # every live row's scores numbers
    any_inactive = bool(inactive.any())
    dos = dout * sc  # (B, H, T, Dv): the scale folded into dp = dout v^T (ds = p (dp - delta) scale)
    delta *= sc
    for t0, t1, n in _chunks(xp, idx, B * H * S * q.dtype.itemsize, saved.chunk_size):
        c = t1 - t0
        s = _scores(xp, qg, k, t0, t1, n, sc)  # (B, H, c, n)
        hide_unselected(xp, s, idx[:, :, t0:t1], finite)
        if any_inactive:
            xp.copyto(s, -np.inf, where=inactive[:, :, t0:t1, None])  # whole rows: they send nothing
        xp.subtract(s, lse[:, :, t0:t1, None], out=s)
        p = xp.exp(s, out=s).reshape(B, G, rep * c, n)  # weights of the kept keys, 0 elsewhere
        do = dout[:, :, t0:t1].reshape(B, G, rep * c, Dv)
        dv[:, :, :n] += xp.matmul(p.swapaxes(-1, -2), do)  # (B, G, n, Dv)
        ds = xp.matmul(dos[:, :, t0:t1].reshape(B, G, rep * c, Dv), v_ok[:, :, :n].swapaxes(-1, -2))
        ds -= delta[:, :, t0:t1].reshape(B, G, rep * c, 1)
        ds *= p  # (B, G, rep*c, n): scale * p * (dp - delta)
        qc = qg[:, :, :, t0:t1].reshape(B, G, rep * c, D)
        dq_c = xp.matmul(ds, k_ok[:, :, :n]).reshape(B, H, c, D)
        dq[:, :, t0:t1] = xp.where(nan_rows[:, :, t0:t1, None], np.nan, dq_c)
        dk[:, :, :n] += xp.matmul(ds.swapaxes(-1, -2), qc)
    return dq, dk, dv


def _use_kernels(xp, *arrays):
    """The row kernels run for NumPy float32/float64 arrays of one dtype with Numba importable."""
    return (xp is np and _cpu_kernels is not None and arrays[0].dtype in (np.float32, np.float64)
            and all(a.dtype == arrays[0].dtype for a in arrays))


def hide_unselected(xp: ModuleType, s: Array, idx: Array, finite: bool) -> None:
    """Set the scores s (B, H, c, n) of the keys idx (B, H, c, K) does not select to -inf, in place.

    With ``finite`` scores by adding a mask of 0 (selected) and -inf (elsewhere): an arithmetic
    pass, where a masked copy over a mask without pattern costs several (branch
    mispredictions); else by a masked copy (a NaN score must become -inf, not stay NaN)."""
    B, H, c, K = idx.shape
    n = s.shape[-1]
    rows = B * H * c
    cols = xp.where(idx >= 0, idx, n).reshape(rows, K)  # empty slots -> a spare column
    flat = (xp.arange(rows)[:, None] * (n + 1) + cols).reshape(-1)
    if finite:
        add = xp.full(rows * (n + 1), -np.inf, dtype=s.dtype)
        add[flat] = 0
        s += add.reshape(B, H, c, n + 1)[..., :n]
    else:
        unsel = xp.ones(rows * (n + 1), dtype=bool)
        unsel[flat] = False
        xp.copyto(s, -np.inf, where=unsel.reshape(B, H, c, n + 1)[..., :n])


def unselected_mask(xp: ModuleType, idx: Array, n: int) -> Array:
    """(B, H, c, n) bool: False at the keys idx (B, H, c, K) selects, True elsewhere (-1 slots
    select nothing; every index < n)."""
    B, H, c, K = idx.shape
    rows = B * H * c
    flat = xp.ones(rows * (n + 1), dtype=bool)  # one spare column per row takes the empty slots
    cols = xp.where(idx >= 0, idx, n).reshape(rows, K)
    flat[(xp.arange(rows)[:, None] * (n + 1) + cols).reshape(-1)] = False
    return flat.reshape(B, H, c, n + 1)[..., :n]


def _scores(xp, qg, k, t0, t1, n, sc):
    """scale * q k^T for queries t0..t1 and keys 0..n: (B, H, c, n)."""
    B, G, rep, _, D = qg.shape
    c = t1 - t0
    qc = qg[:, :, :, t0:t1].reshape(B, G, rep * c, D)
    return xp.matmul(qc * sc, k[:, :, :n].swapaxes(-1, -2)).reshape(B, G * rep, c, n)


def _chunks(xp, idx, bytes_per_query, chunk_size):
    """(t0, t1, n): query chunks of about TILE_BYTES of scores and the keys their rows select
    among (chunks selecting nothing are skipped: their rows keep out 0, lse -inf)."""
    T = idx.shape[2]
    c = chunk_size or max(1, TILE_BYTES // max(1, bytes_per_query))
    last = idx.max(axis=(0, 1, 3))  # (T,) the largest key each query row selects, -1 for none
    last = np.asarray(last.get() if hasattr(last, "get") else last)
    for t0 in range(0, T, c):
        t1 = min(T, t0 + c)
        n = int(last[t0:t1].max()) + 1
        if n > 0:
            yield t0, t1, n
