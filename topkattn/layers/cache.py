"""Decode caches and the keys of one decode step.

Shape letters: B batch, G KV heads, S cached tokens (persistent rows first), D key dim
(C + R for MLA), Dv value dim, C latent dim, R rope dim, H query heads, K index slots per
query, d model width.

    GrowingBuffer   an array that grows along one axis by doubling
    KVCache         full keys (B, G, S, D) and values (B, G, S, Dv): Attention
    MLACache        latents [c_j ; kr_j] (B, S, C + R), shared by every head: MLA
    check_step_input  one decode step's input (B, 1, d) against the layer's own cache
    select_step     the keys one decode query attends: the layer's selector, else exact
    attend_step     one decode query's attention output: dense, token top-k or block top-k
    BlockMeans      block attention's representatives: the running mean of each key block

A layer's ``selector`` follows the one decode-selection protocol of
:mod:`topkattn.decoding.selectors`: ``selector(query, cache, *, topk, sinks, window,
scale) -> idx (B, H, K)``; ``None`` is exact selection (:func:`topkattn.ops.selection.select_decode`).

Block top-k layers (``selection="block"``) decode as MoBA/Quest do: the cache keeps each key
block's mean (:class:`BlockMeans`, Nb = ceil(S / block_size) rows, updated as keys arrive), the
decode query ranks the blocks before its own by q . mean (unscaled, ties to the lower block,
exactly :func:`topkattn.ops.block_selection.select_blocks`), keeps its own block and the
``topk_blocks - 1`` best, and attends their keys exactly.  Training ranks the same means
(:func:`topkattn.ops.block_selection.block_means`), so a decode step equals the forward's row.
A block layer selects with its block means; a decode ``selector`` is not used.
"""
from topkattn.backend import get_array_module
from topkattn.ops.block_selection import BlockBounds, expand_blocks, select_blocks
from topkattn.ops.dense_attention import dense_attention_decode
from topkattn.ops.selection import select_decode
from topkattn.ops.sparse_attention import sparse_attention_decode


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


def attend_step(layer, query, cache, keys, values, dense_values=None):
    """o (B, H, Dv) of one decode step of ``layer`` (MLA or Attention): dense (``topk=None``),
    token top-k (:func:`select_step`) or block top-k (``selection="block"``: :func:`select_block_step`).

    query (B, H, D); keys (B, G, S, D) and values (B, G, S, Dv) hold every cached row, this
    token's included; ``values is keys`` gathers once.  ``dense_values``: the values a dense
    step reads instead (MLA: the latents without the rope part).  Records the step in
    ``layer.stats`` when it is set (:class:`topkattn.layers.attention_stats.AttentionStats`).
    """
    stats = getattr(layer, "stats", None)
    S = keys.shape[2]
    if getattr(layer, "selection", "token") == "block":
        idx, blocks = select_block_step(layer, query, cache, keys)  # (B, H, K), (B, H, Kb)
        if stats is not None:
            stats.update(idx, n_keys=S, score_dtype=query.dtype, blocks=blocks, index_bytes=int(blocks.nbytes))
        return sparse_attention_decode(query, keys, values, idx, layer.scale)
    if layer.topk is None:
        if stats is not None:
            stats.record_step(query, S)
        return dense_attention_decode(query, keys, values if dense_values is None else dense_values, layer.scale)
    idx = select_step(layer, query, cache)  # (B, H, K)
    if stats is not None:
        stats.record_step(query, S, idx)
    return sparse_attention_decode(query, keys, values, idx, layer.scale)


def select_block_step(layer, query, cache, keys):
    """``(idx (B, H, K), blocks (B, H, Kb))`` of one block top-k decode step of ``layer``.

    query (B, H, D) sits at the last cached position S - 1; keys (B, G, S, D) are the cache's
    rows.  ``cache.block_means`` (a :class:`BlockMeans`) is brought up to date with the rows
    appended since the last step, then the blocks are chosen as in training
    (:func:`topkattn.ops.block_selection.select_blocks` on the kept means) and expanded to
    K = Kb * block_size token indices (-1 past the query's position).
    """
    state = cache.block_means
    if state is None or state.block_size != layer.block_size:
        raise ValueError("cache has no block state for this layer's block_size: make it with the layer's "
                         "init_cache after setting selection='block'")
    means = state.update(keys)  # (B, G, Nb, D)
    S = keys.shape[2]
    bounds = BlockBounds(S, 1, block_size=layer.block_size, topk_blocks=layer.topk_blocks, causal=True)
    blocks = select_blocks(query[:, :, None], keys, block_size=layer.block_size, topk_blocks=layer.topk_blocks,
                           causal=True, means=means)  # (B, H, 1, Kb)
    return expand_blocks(blocks, bounds)[:, :, 0], blocks[:, :, 0]


class BlockMeans:
    """Running means of the cached keys' blocks: ``means`` (B, G, Nb, D), Nb = ceil(n / block_size).

    Block b holds cache rows b * block_size .. (b + 1) * block_size - 1 (persistent rows first,
    as in training, where the persistent keys open the sequence).  :meth:`update` folds in the
    rows appended since its last call, each once: a row i (0-based) inside its block moves that
    block's mean by (key - mean) / (i + 1), a row opening a block starts it.  O(new rows * D)
    a step; the cache's exact token path is untouched.
    """

    def __init__(self, xp, batch, G, D, dtype, block_size):
        self.block_size = int(block_size)
        self.buf = GrowingBuffer(xp, (batch, G, 0, D), axis=2, dtype=dtype, capacity=16)
        self.n = 0  # cache rows folded in

    @property
    def means(self):
        return self.buf.view()

    def update(self, keys):
        """The block means (B, G, Nb, D) of keys (B, G, S, D), S >= the rows already folded in."""
        S, bs = keys.shape[2], self.block_size
        if S < self.n:
            raise ValueError(f"keys has {S} rows, fewer than the {self.n} already folded into the block means")
        while self.n < S:
            b, i = divmod(self.n, bs)
            m = min(bs - i, S - self.n)  # rows of block b to fold in now
            rows = keys[:, :, self.n:self.n + m]  # (B, G, m, D)
            if i == 0:  # a new block: the mean of its first m rows
                self.buf.append(rows.sum(axis=2, keepdims=True) / keys.dtype.type(m))
            else:
                mean = self.buf.data[:, :, b]  # (B, G, D), in place
                for r in range(m):
                    mean += (rows[:, :, r] - mean) / keys.dtype.type(i + r + 1)
            self.n += m
        return self.means


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
        self.block_means = None  # a BlockMeans of the keys for a block top-k layer

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
        self.block_means = None  # a BlockMeans of the latent keys [c_j ; kr_j] (G = 1) for a block top-k layer

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
