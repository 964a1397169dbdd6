"""Top-k attention with a mean tail: the softmax mass top-k drops goes to the mean unselected value.

Shape letters: B batch, H query heads, G KV heads (H % G == 0), T queries, S keys,
D head dim, Dv value dim, K index slots per query, c (or cc) queries per chunk,
n the keys a chunk sees, rep = H // G.

Plain top-k attention renormalises the softmax over the selected keys A and so drops
the mass 1 - alpha of the other visible keys U.  Here that mass is kept, exactly, and
spread over U uniformly (each unselected key gets the same weight):

    p_j   = exp(s_j - logsumexp_{j visible} s_j)   the dense softmax weights
    alpha = sum_{j in A} p_j                       mass the selection keeps
    r     = mean_{j in U} v_j                      (0 when U is empty)
    out   = sum_{j in A} p_j v_j + (1 - alpha) r

So out equals dense attention whenever U is empty (topk >= visible keys), and the error
is (1 - alpha) (r - mean of U weighted by p) instead of plain top-k's (1 - alpha) times
(out_A - that mean).  The selection A is exact top-k plus forced keys
(:func:`topkattn.ops.selection.select_topk`; ``topk="auto"``: the certified dynamic k of
:func:`~topkattn.ops.selection.select_dynamic_topk`, so 1 - alpha <= tail_bound); the tail
needs the full-row logsumexp, so every score is computed (chunk by chunk, as the selection
does): cost O(T S D) forward and backward, memory O(chunk * S + T * K).  Meant for inference
on pretrained models (e.g. the BERT encoder), where the selection pass computes every score anyway.

Backward, with g = dout and o_A = sum_A p_j v_j:
    ds_i = p_i [ 1[i in A] (g.v_i - g.r) - g.o_A + alpha g.r ]      (i visible)
    dv_j = p_j g (j in A),   (1 - alpha) g / |U| (j in U)
    dq   = scale sum_i ds_i k_i,   dk_i = scale ds_i q

Non-finite inputs follow the rule of :mod:`topkattn.ops.reference`, over every *visible*
key (the tail weighs them all): a NaN or +inf among a row's visible scores gives a NaN
row, a NaN or inf value reaches only the rows that see it (never an earlier row), a row
with nothing to attend gives zeros; a row whose output is not finite gets a NaN dq and
sends nothing to dk, dv.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from topkattn.backend import Array, as_engine_array, get_array_module, to_caller_kind
from topkattn.checks import check_bool, check_int, check_real
from topkattn.ops.dense_attention import (
    TILE_BYTES,
    check_dout,
    check_qkv,
    chunk_scores,
    default_scale,
    finite_keys,
    query_chunks,
    visible_mask,
    weighted_values,
)
from topkattn.ops.selection import select_dynamic_topk, select_topk
from topkattn.ops.sparse_attention import inactive_rows


class TailAttentionSaved:
    """q, k, v, idx (B, H, T, K), out, lse over every visible key (B, H, T), scale, causal, chunk."""

    __slots__ = ("q", "k", "v", "idx", "out", "lse", "scale", "causal", "chunk_size", "like")

    def __init__(self, q: Array, k: Array, v: Array, idx: Array, out: Array, lse: Array, scale: float, causal: bool,
                 chunk_size: int, like: Any) -> None:
        self.q, self.k, self.v, self.idx, self.out, self.lse = q, k, v, idx, out, lse
        self.scale, self.causal, self.chunk_size, self.like = scale, causal, chunk_size, like


def tail_topk_attention(q: Array, k: Array, v: Array, *, topk: int | str, causal: bool = True,
                        scale: float | None = None, sinks: int = 0, window: int = 0, chunk_size: int | None = None,
                        tail_bound: float | None = None, max_topk: int | None = None) -> Array:
    """Top-k attention whose dropped softmax mass goes to the mean of the unselected values.

    q (B, H, T, D), k (B, G, S, D), v (B, G, S, Dv) -> (B, H, T, Dv).  ``topk``, ``causal``,
    ``scale``, ``sinks``, ``window`` select keys as :func:`topkattn.ops.topk_attention` does
    (``topk="auto"`` with ``tail_bound`` and ``max_topk``: its certified dynamic k);
    ``chunk_size`` queries per score tile (default: about 16 MiB per tile).  With
    ``topk >= S`` it is exactly dense attention.  See the module docstring for the formula
    and the non-finite rule.
    """
    return tail_topk_attention_forward(q, k, v, topk=topk, causal=causal, scale=scale, sinks=sinks,
                                       window=window, chunk_size=chunk_size, tail_bound=tail_bound,
                                       max_topk=max_topk)[0]


def tail_topk_attention_forward(q: Array, k: Array, v: Array, *, topk: int | str, causal: bool = True,
                                scale: float | None = None, sinks: int = 0, window: int = 0,
                                chunk_size: int | None = None, tail_bound: float | None = None,
                                max_topk: int | None = None) -> tuple[Array, TailAttentionSaved]:
    """``(out, saved)`` of :func:`tail_topk_attention`; saved keeps the indices and the full lse."""
    like = q
    q, k, v = (as_engine_array(a, n) for a, n in ((q, "q"), (k, "k"), (v, "v")))
    check_qkv(q, k, v, scale, chunk_size)
    if topk == "auto":
        if tail_bound is None:
            raise ValueError("topk='auto' needs tail_bound in [0, 1), got None")
        check_real("tail_bound", tail_bound, 0.0, 1.0, hi_open=True)
        check_int("max_topk", max_topk, 1, optional=True)
    elif tail_bound is not None or max_topk is not None:
        raise ValueError("tail_bound and max_topk apply only with topk='auto'")
    for name, val, lo in (("topk", 1 if topk == "auto" else topk, 1), ("sinks", sinks, 0), ("window", window, 0)):
        check_int(name, val, lo)
    xp = get_array_module(q, k, v)
    B, H, T, D = q.shape
    G, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    rep = H // G
    scale = default_scale(D) if scale is None else float(scale)
    causal = check_bool("causal", causal)
    c = chunk_size or max(1, TILE_BYTES // max(1, B * H * S * q.dtype.itemsize))
    if topk == "auto":
        idx, _ = select_dynamic_topk(q, k, tail_bound=float(tail_bound), max_topk=max_topk, causal=causal,
                                     scale=scale, sinks=int(sinks), window=int(window),
                                     chunk_size=chunk_size)  # (B, H, T, K)
    else:
        idx = select_topk(q, k, topk=int(topk), causal=causal, scale=scale, sinks=int(sinks),
                          window=int(window), chunk_size=chunk_size)  # (B, H, T, K)
    out = xp.zeros((B, H, T, Dv), dtype=q.dtype)
    lse = xp.full((B, H, T), -np.inf, dtype=q.dtype)
    qg = q.reshape(B, G, rep, T, D)
    v_ok, bad_keys = finite_keys(xp, v)  # values with non-finite entries zeroed, their keys
    for t0, t1, n in query_chunks(T, S, c, causal):
        if n == 0 or B * H == 0:
            continue
        cc = t1 - t0
        p, lse_c, sel, vis_n, bad = _chunk_weights(xp, qg, k, idx, t0, t1, n, S, T, scale, causal)
        vis = visible_mask(t0, t1, n, S, T, causal)  # host (c, n) or None
        pa = xp.where(sel, p, 0)  # weights of the selected keys (B, G, rep, c, n)
        o_a = weighted_values(xp, pa, v_ok, v, bad_keys, sel).reshape(B, H, cc, Dv)
        alpha = pa.sum(-1).reshape(B, H, cc, 1)
        r = _rest_mean(xp, sel, vis, v_ok, v, bad_keys).reshape(B, H, cc, Dv)
        o = o_a + (1 - alpha) * r
        some = xp.isfinite(lse_c).reshape(B, H, cc, 1)  # rows with something to attend
        o = xp.where(some, o, 0)
        out[:, :, t0:t1] = xp.where(bad.reshape(B, H, cc, 1), np.nan, o)
        lse[:, :, t0:t1] = lse_c.reshape(B, H, cc)
    saved = TailAttentionSaved(q, k, v, idx, out, lse, scale, causal, c, like)
    return to_caller_kind(out, like), saved


def tail_topk_attention_backward(dout: Array, saved: TailAttentionSaved) -> tuple[Array, Array, Array]:
    """``(dq, dk, dv)`` of :func:`tail_topk_attention` from dout (B, H, T, Dv).

    The selection is constant (as for top-k attention), but the tail weight 1 - alpha
    depends on every visible score, so every visible key receives gradient.  A row whose
    output is not finite gets a NaN dq and sends nothing to dk, dv.
    """
    if not isinstance(saved, TailAttentionSaved):
        raise TypeError(f"saved must come from tail_topk_attention_forward, got {type(saved).__name__}")
    q, k, v, idx = saved.q, saved.k, saved.v, saved.idx
    dout = check_dout(dout, saved.out)
    xp = get_array_module(q)
    B, H, T, D = q.shape
    G, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    rep = H // G
    sc = q.dtype.type(saved.scale)
    dq, dk, dv = xp.zeros_like(q), xp.zeros_like(k), xp.zeros_like(v)
    if B * H == 0:
        return dq, dk, dv
    inactive, nan_rows = inactive_rows(xp, saved.out, saved.lse)  # (B, H, T)
    live = ~inactive
    qg = xp.where(live[..., None], q, 0).reshape(B, G, rep, T, D)  # inactive rows send nothing
    dout = xp.where(live[..., None], dout, 0)
    k_ok, _ = finite_keys(xp, k)  # a key a live row weighs 0 may hold inf: 0, not 0 * inf
    v_ok, _ = finite_keys(xp, v)  # live rows see only finite values: v_ok is exact for them
    no_bad = np.zeros(0, dtype=np.int64)
    for t0, t1, n in query_chunks(T, S, saved.chunk_size, saved.causal):
        if n == 0:
            continue
        cc = t1 - t0
        p, _, sel, vis_n, _ = _chunk_weights(xp, qg, k, idx, t0, t1, n, S, T, saved.scale, saved.causal)
        lv = live[:, :, t0:t1].reshape(B, G, rep, cc)
        p = xp.where(lv[..., None], p, 0)
        vis = _visible(xp, cc, n, S, T, t0, saved.causal)  # (c, n)
        r = _rest_mean(xp, sel, visible_mask(t0, t1, n, S, T, saved.causal), v_ok, v_ok, no_bad)
        r = r.reshape(B, H, cc, Dv)
        g = dout[:, :, t0:t1]  # (B, H, c, Dv)
        pa = xp.where(sel, p, 0)  # (B, G, rep, c, n)
        alpha = pa.sum(-1)  # (B, G, rep, c)
        n_rest = (vis_n[None, None, None] - sel.sum(-1))  # (B, G, rep, c)
        gr = (g * r).sum(-1).reshape(B, G, rep, cc)  # g . r
        o_a = xp.matmul(pa.reshape(B, G, rep * cc, n), v_ok[:, :, :n])  # (B, G, rep*c, Dv)
        go = (g.reshape(B, G, rep * cc, Dv) * o_a).sum(-1).reshape(B, G, rep, cc)  # g . o_A
        gv = xp.matmul(g.reshape(B, G, rep * cc, Dv), v_ok[:, :, :n].swapaxes(-1, -2)).reshape(B, G, rep, cc, n)
        ds = p * (xp.where(sel, gv - gr[..., None], 0) - go[..., None] + (alpha * gr)[..., None])
        ds = xp.where(vis, ds, 0).reshape(B, G, rep * cc, n) * sc
        qc = qg[:, :, :, t0:t1].reshape(B, G, rep * cc, D)
        dq_c = xp.matmul(ds, k_ok[:, :, :n]).reshape(B, H, cc, D)
        dq[:, :, t0:t1] = xp.where(nan_rows[:, :, t0:t1, None], np.nan, dq_c)
        dk[:, :, :n] += xp.matmul(ds.swapaxes(-1, -2), qc)
        # dv: p_j g on the selected keys, (1 - alpha) g / |U| on the rest
        w_rest = xp.where(lv & (n_rest > 0), (1 - alpha) / xp.maximum(n_rest, 1), 0)  # (B, G, rep, c)
        wv = xp.where(sel, p, w_rest[..., None]) * vis  # (B, G, rep, c, n)
        dv[:, :, :n] += xp.matmul(wv.reshape(B, G, rep * cc, n).swapaxes(-1, -2),
                                  g.reshape(B, G, rep * cc, Dv))
    return dq, dk, dv


def _visible(xp, c, n, S, T, t0, causal):
    """(c, n) bool: key j visible to query row t0 + i."""
    if not causal:
        return xp.ones((c, n), dtype=bool)
    pos = np.arange(t0, t0 + c) + (S - T)
    return xp.asarray(np.arange(n)[None, :] <= pos[:, None])


def _chunk_weights(xp, qg, k, idx, t0, t1, n, S, T, scale, causal):
    """Dense softmax p (B, G, rep, c, n) over the visible keys, its lse (B, G, rep, c) (NaN on
    NaN rows, -inf where nothing is attended), the selected-key mask sel (B, G, rep, c, n)
    from idx, the number of visible keys per row vis_n (c,) and the NaN rows bad
    (B, G, rep, c): a NaN or +inf among the visible scores."""
    B, G, rep = qg.shape[:3]
    c = t1 - t0
    s = chunk_scores(xp, qg, k, t0, t1, n, S, T, scale, causal)  # (B, G, rep, c, n)
    m = s.max(-1, keepdims=True)  # NaN and +inf reach the row maximum
    bad = (xp.isnan(m) | (m == np.inf))[..., 0]
    m = xp.where(xp.isfinite(m), m, 0)
    e = xp.exp(s - m)
    denom = e.sum(-1, keepdims=True)
    p = e / xp.where(denom > 0, denom, 1)
    lse_c = xp.where(denom > 0, m + xp.log(xp.where(denom > 0, denom, 1)), -np.inf)[..., 0]  # (B, G, rep, c)
    lse_c = xp.where(bad, np.nan, lse_c)
    ic = idx[:, :, t0:t1].reshape(B, G, rep, c, -1)  # (B, G, rep, c, K)
    sel = xp.zeros((B, G, rep, c, n + 1), dtype=bool)
    col = xp.where(ic >= 0, ic, n)  # empty slots mark the spare column n
    b, g, h, t = (xp.arange(d).reshape((-1,) + (1,) * (4 - i)) for i, d in enumerate((B, G, rep, c)))
    sel[b, g, h, t, col] = True  # fancy-index scatter: NumPy and CuPy alike
    sel = sel[..., :n]
    pos = np.arange(t0, t1) + (S - T)
    vis_n = xp.asarray(np.clip(pos + 1, 0, n) if causal else np.full(c, n))  # (c,)
    return p, lse_c, sel, vis_n, bad


def _rest_mean(xp, sel, vis, v_ok, v, bad_keys):
    """Mean value of each row's visible unselected keys, (B, G, rep*c, Dv); 0 where there is none.

    sel (B, G, rep, c, n) selected keys; vis (c, n) host bool or None (every key visible);
    v_ok, v, bad_keys as for :func:`topkattn.ops.dense_attention.weighted_values` (a NaN or
    inf value reaches only the rows that see it).
    """
    rest = ~sel if vis is None else ~sel & xp.asarray(vis)  # (B, G, rep, c, n)
    total = weighted_values(xp, rest.astype(v.dtype), v_ok, v, bad_keys, rest)  # (B, G, rep*c, Dv)
    n_rest = rest.sum(-1).reshape(total.shape[:-1] + (1,))  # (B, G, rep*c, 1)
    return xp.where(n_rest > 0, total / xp.maximum(n_rest, 1), 0)
