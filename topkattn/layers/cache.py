"""Decode caches and the keys of one decode step.

Shape letters: B batch, G KV heads, S cached tokens (persistent rows first), D key dim
(C + R for MLA), Dv value dim, C latent dim, R rope dim, H query heads, K index slots per
query, d model width.

    GrowingBuffer   an array that grows along one axis by doubling
    KVCache         full keys (B, G, S, D) and values (B, G, S, Dv): Attention
    MLACache        latents [c_j ; kr_j] (B, S, C + R), shared by every head: MLA
    check_step_input  one decode step's input (B, 1, d) against the layer's own cache
    select_step     the keys one decode query attends: the layer's selector, else exact

A layer's ``selector`` follows the one decode-selection protocol of
:mod:`topkattn.decoding.selectors`: ``selector(query, cache, *, topk, sinks, window,
scale) -> idx (B, H, K)``; ``None`` is exact selection (:func:`topkattn.ops.selection.select_decode`).
"""
from topkattn.backend import get_array_module
from topkattn.ops.selection import select_decode


def check_step_input(layer, x_t, cache):
    """``x_t`` (B, 1, d) of a decode step of ``layer``; TypeError unless ``cache`` is the
    layer's own (from its ``init_cache``), ValueError for a wrong shape or batch."""
    if getattr(cache, "owner", None) is not layer:
        raise TypeError("cache must come from this layer's init_cache")
    if x_t.shape[1] != 1:
        raise ValueError(f"x_t must have shape (B, 1, d_model), got {tuple(x_t.shape)}")
    if x_t.shape[0] != cache.batch:
        raise ValueError(f"x_t has batch {x_t.shape[0]} but the cache was made for batch {cache.batch}")
    return x_t


def select_step(layer, query, cache):
    """idx (B, H, K) of one decode step of ``layer`` (MLA or Attention) for query (B, H, D).

    Fixed k passes the layer's ``topk``; dynamic k (``topk="auto"``) passes its cap
    (``max_topk``, else every cached key) and, without a selector, selects exactly under
    the layer's ``tail_bound``.
    """
    keys = cache.keys
    dynamic = layer.topk == "auto"
    k = (layer.max_topk or keys.shape[-2]) if dynamic else layer.topk
    if layer.selector is not None:
        return layer.selector(query, cache, topk=k, sinks=layer.persistent_tokens, window=layer.window,
                              scale=layer.scale)
    idx, _, _ = select_decode(query, keys, topk=k, sinks=layer.persistent_tokens, window=layer.window,
                              scale=layer.scale, tail_bound=layer.tail_bound if dynamic else None)
    return idx


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



class KVCache:
    """Full KV cache: ``keys`` (B, G, S, D), ``values`` (B, G, S, Dv), persistent rows first."""

    def __init__(self, xp, batch, G, D, Dv, dtype, owner):
        self.batch = batch
        self.kbuf = GrowingBuffer(xp, (batch, G, 0, D), axis=2, dtype=dtype)
        self.vbuf = GrowingBuffer(xp, (batch, G, 0, Dv), axis=2, dtype=dtype)
        self.owner = owner
        self.prefix = 0

    @property
    def keys(self):
        return self.kbuf.view()

    @property
    def values(self):
        return self.vbuf.view()

    @property
    def n_tokens(self):
        return self.kbuf.n - self.prefix

    @property
    def floats_per_token(self):
        k, v = self.kbuf.data, self.vbuf.data
        return k.shape[1] * k.shape[3] + v.shape[1] * v.shape[3]

    @property
    def bytes_per_token(self):
        return self.floats_per_token * self.kbuf.data.dtype.itemsize


class MLACache:
    """Latent KV cache: ``keys`` (B, S, C + R) = [c_j ; kr_j], persistent rows first.

    Holds exactly C + R numbers per token (``floats_per_token``); ``weights`` are the
    absorbed decode weights taken when the cache was made.  With ``v_rank`` Cv > 0 (MLA with
    separate key and value latents) C is the key latent's rank and ``values`` (B, S, Cv) are
    kept apart (C + R + Cv numbers per token; an index reads only ``keys``); otherwise
    ``values`` is the keys' first C numbers.
    """

    def __init__(self, xp, batch, C, R, dtype, weights, owner, v_rank=0):
        self.batch, self.C, self.R = batch, C, R
        self.buf = GrowingBuffer(xp, (batch, 0, C + R), axis=1, dtype=dtype)
        self.vbuf = GrowingBuffer(xp, (batch, 0, v_rank), axis=1, dtype=dtype) if v_rank else None
        self.weights = weights
        self.owner = owner
        self.prefix = 0

    def append(self, keys, values=None):
        """Append key rows (B, n, C + R) and, with a value buffer, value rows (B, n, Cv)."""
        if (values is None) != (self.vbuf is None):
            raise ValueError("values must be given exactly when the cache keeps them apart (v_rank > 0)")
        self.buf.append(keys)
        if values is not None:
            self.vbuf.append(values)

    @property
    def keys(self):
        return self.buf.view()

    @property
    def values(self):
        """(B, S, Cv) value latents: the separate buffer, else the keys' first C numbers."""
        return self.vbuf.view() if self.vbuf is not None else self.buf.view()[..., :self.C]

    @property
    def n_tokens(self):
        return self.buf.n - self.prefix

    @property
    def floats_per_token(self):
        return self.buf.data.shape[-1] + (self.vbuf.data.shape[-1] if self.vbuf is not None else 0)

    @property
    def bytes_per_token(self):
        return self.floats_per_token * self.buf.data.dtype.itemsize
