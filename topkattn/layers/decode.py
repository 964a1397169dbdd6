"""Incremental decoding helpers: growing caches, the exact top-k selector, attend-one-query.

Shape letters: B batch, H query heads, G KV heads, S cached keys (persistent rows first),
D key dim, Dv value dim, K selected slots, C latent dim, R rope dim.

A selector is any callable ``selector(query, cache, *, topk, sinks, window, scale) -> idx``
with query (B, H, D) and ``cache.keys`` (B, S, D) (MLA: one key set shared by all heads)
or (B, G, S, D); idx (B, H, K) int64 with -1 for empty slots.  :func:`exact_topk_selector`
applies the rule of :func:`topkattn.topk_attention` to the last query position S - 1:
forced sinks and window first, then the ``topk`` best remaining keys in rank order.
An ANN-backed selector (LoRANN over the cached latents) can replace it on a layer.
"""
import numpy as np

from topkattn.backend import get_array_module
from topkattn.selection import RowBounds, ranked_topm_xp, select_dynamic_topk


class GrowingBuffer:
    """An array that grows along ``axis`` by doubling; ``view()`` is the filled part."""

    def __init__(self, xp, shape, axis, dtype, capacity=64):
        shape = list(shape)
        shape[axis] = max(1, capacity)
        self.axis = axis
        self.data = xp.zeros(tuple(shape), dtype=dtype)
        self.n = 0

    def _sl(self, a, b):
        sl = [slice(None)] * self.data.ndim
        sl[self.axis] = slice(a, b)
        return tuple(sl)

    def append(self, rows):
        """Append ``rows`` (the buffer's shape with ``rows.shape[axis]`` entries on the axis)."""
        xp = get_array_module(self.data)
        m = rows.shape[self.axis]
        cap = self.data.shape[self.axis]
        if self.n + m > cap:
            new_cap = max(2 * cap, self.n + m)
            shape = list(self.data.shape)
            shape[self.axis] = new_cap
            grown = xp.zeros(tuple(shape), dtype=self.data.dtype)
            grown[self._sl(0, self.n)] = self.data[self._sl(0, self.n)]
            self.data = grown
        self.data[self._sl(self.n, self.n + m)] = rows
        self.n += m

    def view(self):
        return self.data[self._sl(0, self.n)]


def exact_topk_selector(query, cache, *, topk, sinks=0, window=0, scale=1.0):
    """Exact selection for one query per row: idx (B, H, K), forced keys first, -1 padded.

    query (B, H, D); cache.keys (B, S, D) shared by all heads, or (B, G, S, D) with H % G == 0.
    The rule (ranking, ties to the lower index, sinks and window forced and not counted in
    ``topk``) is that of :func:`topkattn.selection.select_topk` at query position S - 1.
    """
    keys = cache.keys
    xp = get_array_module(query, keys)
    B, H, D = query.shape
    kg = keys[:, None] if keys.ndim == 3 else keys  # (B, G, S, D)
    G, S = kg.shape[1], kg.shape[2]
    bounds = RowBounds(S, 1, topk=topk, causal=True, sinks=sinks, window=window)
    forced = xp.asarray(bounds.forced_indices())  # (1, P' + W')
    parts = [xp.broadcast_to(forced[None], (B, H, forced.shape[1]))]
    if bounds.n_sel:
        s = _all_scores(query.reshape(B, G, H // G, D) * query.dtype.type(scale), kg).reshape(B * H, S)
        cand = xp.broadcast_to(xp.asarray(bounds.candidate_mask(0, 1, S)), (B * H, S))
        parts.append(ranked_topm_xp(s, cand, bounds.n_sel).reshape(B, H, bounds.n_sel))
    return xp.concatenate(parts, axis=-1).astype(xp.int64)


def selector_k(topk, max_topk, S):
    """The ``topk`` a layer passes its selector: its k, or for "auto" its cap (max_topk, else all S)."""
    return (max_topk or S) if topk == "auto" else topk


def dynamic_exact_selector(tail_bound):
    """A selector for ``topk="auto"`` layers: per row the smallest k whose left-out softmax mass
    is provably <= ``tail_bound`` (:func:`topkattn.selection.select_dynamic_topk` at query
    position S - 1); the layer passes its cap as ``topk``.  idx (B, H, K) like
    :func:`exact_topk_selector`, -1 past each row's k."""

    def select(query, cache, *, topk, sinks=0, window=0, scale=1.0):
        keys = cache.keys
        kg = keys[:, None] if keys.ndim == 3 else keys  # (B, G, S, D)
        idx, _ = select_dynamic_topk(query[:, :, None], kg, tail_bound=tail_bound, max_topk=topk,
                                     causal=True, scale=scale, sinks=sinks, window=window, impl="numpy")
        return idx[:, :, 0]

    return select


def attend_selected(query, keys, values, idx, scale):
    """Softmax over the selected keys of one query per row.

    query (B, H, D); keys (B, G, S, D); values (B, G, S, Dv); idx (B, H, K) (-1 = empty).
    Returns (B, H, Dv); a row with no selected key gives zeros.  ``values is keys`` gathers once.
    """
    xp = get_array_module(query, keys)
    B, H, D = query.shape
    G = keys.shape[1]
    bi = xp.arange(B)[:, None, None]
    gi = (xp.arange(H) // (H // G))[None, :, None]
    valid = idx >= 0
    j = xp.where(valid, idx, 0)
    kk = keys[bi, gi, j]  # (B, H, K, D)
    s = (kk * (query * query.dtype.type(scale))[:, :, None, :]).sum(-1)  # (B, H, K)
    s = xp.where(valid, s, -np.inf)
    m = s.max(-1, keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0)
    p = xp.exp(s - m)
    l = p.sum(-1, keepdims=True)
    p = p / xp.where(l > 0, l, 1)
    vv = kk if values is keys else values[bi, gi, j]  # (B, H, K, Dv)
    return (p[..., None] * vv).sum(-2)  # (B, H, Dv)


def attend_all(query, keys, values, scale):
    """Dense softmax of one query per row over all S keys: (B, H, D) -> (B, H, Dv).

    keys/values may be views into a larger cache buffer: each (b, g) pair is one 2-D
    matrix product (BLAS on the strided view, no copy of the cache).
    """
    xp = get_array_module(query, keys)
    B, H, D = query.shape
    G = keys.shape[1]
    rep = H // G
    qg = query.reshape(B, G, rep, D) * query.dtype.type(scale)
    out = xp.empty((B, G, rep, values.shape[-1]), dtype=query.dtype)
    s = _all_scores(qg, keys)  # (B, G, rep, S)
    s -= s.max(-1, keepdims=True)
    p = xp.exp(s)
    p /= p.sum(-1, keepdims=True)
    for b in range(B):
        for g in range(G):
            out[b, g] = p[b, g] @ values[b, g]  # (rep, Dv)
    return out.reshape(B, H, -1)


def _all_scores(qg, keys):
    """qg (B, G, rep, D) against keys (B, G, S, D) -> (B, G, rep, S), one 2-D product per (b, g).

    numpy.matmul on a stacked *view* of a cache buffer leaves BLAS (10x slower in our runs);
    a 2-D product on each (S, D) slice keeps it.
    """
    xp = get_array_module(qg, keys)
    B, G, rep, _ = qg.shape
    s = xp.empty((B, G, rep, keys.shape[2]), dtype=qg.dtype)
    for b in range(B):
        for g in range(G):
            s[b, g] = qg[b, g] @ keys[b, g].T
    return s
