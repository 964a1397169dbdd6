"""Decode caches and the keys of one decode step.

Shape letters: B batch, G KV heads, S cached tokens (persistent rows first), D key dim
(C + R for MLA), Dv value dim, C latent dim, R rope dim, H query heads, K index slots per
query, d model width.

    GrowingBuffer   an array that grows along one axis by doubling
    KVCache         full keys (B, G, S, D) and values (B, G, S, Dv): Attention
    MLACache        latents [c_j ; kr_j] (B, S, C + R), shared by every head: MLA
    check_step_input  one decode step's input (B, 1, d) against the layer's own cache
    select_step     the keys one decode query attends: the layer's selector, else exact
    attend_step     one decode query's attention output: dense, token top-k (plain or mean tail) or block top-k
    tail_attention_decode  one decode query's top-k attention with the mean tail
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

Token top-k layers with ``tail="mean"`` decode with the tail op's formula at the last position
(:func:`tail_attention_decode`): every cached key is visible, so the step scores every cached key
for the full logsumexp (the tail weight 1 - alpha needs it, exactly as training computes it),
selects as a plain top-k step does, and gives the dropped mass 1 - alpha to the mean value of the
unselected keys.  That needs every score, which exact selection computes anyway; a selector that
does not select exactly (LoRANN, simulated recall: ``selects_exactly`` False) exists to avoid
scoring every key, and the tail weight cannot be had exactly without them (running key and value
sums give the unselected keys' mean value, but not their softmax mass: exp is not linear), so such
a selector is refused with a ValueError rather than decoding something other than what was trained.
"""
from typing import Any

from topkattn.backend import Array, get_array_module
from topkattn.ops.block_selection import BlockBounds, expand_blocks, select_blocks
from topkattn.ops.dense_attention import dense_attention_decode
from topkattn.ops.selection import select_decode
from topkattn.ops.sparse_attention import sparse_attention_decode


def check_step_input(layer: Any, x_t: Array, cache: Any) -> Array:
    """``x_t`` (B, 1, d) of a decode step of ``layer``; TypeError unless ``cache`` is the
    layer's own (from its ``init_cache``), ValueError for a wrong shape or batch."""
    if getattr(cache, "owner", None) is not layer:
        raise TypeError("cache must come from this layer's init_cache")
    if x_t.shape[1] != 1:
        raise ValueError(f"x_t must have shape (B, 1, d_model), got {tuple(x_t.shape)}")
    if x_t.shape[0] != cache.batch:
        raise ValueError(f"x_t has batch {x_t.shape[0]} but the cache was made for batch {cache.batch}")
    return x_t


def select_step(layer: Any, query: Array, cache: Any) -> Array:
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


def attend_step(layer: Any, query: Array, cache: Any, keys: Array, values: Array,
                dense_values: Array | None = None) -> Array:
    """o (B, H, Dv) of one decode step of ``layer`` (MLA or Attention): dense (``topk=None``),
    token top-k (:func:`select_step`; with ``tail="mean"`` :func:`tail_attention_decode`, which
    refuses a selector that does not select exactly) or block top-k (``selection="block"``:
    :func:`select_block_step`).

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
    tail = getattr(layer, "tail", None) == "mean"
    if tail:
        check_tail_selector(layer)
    idx = select_step(layer, query, cache)  # (B, H, K)
    if stats is not None:
        stats.record_step(query, S, idx)
    if tail:
        return tail_attention_decode(query, keys, values, idx, layer.scale)
    return sparse_attention_decode(query, keys, values, idx, layer.scale)


def check_tail_selector(layer: Any) -> None:
    """ValueError unless ``layer.selector`` is None or selects exactly (``selects_exactly``): a
    ``tail="mean"`` step needs every cached key's score (see the module docstring)."""
    sel = layer.selector
    if sel is not None and not getattr(sel, "selects_exactly", False):
        raise ValueError(f"tail='mean' decodes with exact selection only (selector None or an exact selector), "
                         f"got selector {type(sel).__name__}: the tail weight needs every cached key's score, "
                         f"which an approximate selector does not compute")


def tail_attention_decode(query: Array, keys: Array, values: Array, idx: Array, scale: float) -> Array:
    """o (B, H, Dv) of one decode query per row with the mean tail, every cached key visible.

    query (B, H, D) at position S - 1; keys (B, G, S, D), values (B, G, S, Dv), H % G == 0;
    idx (B, H, K) the selected keys (-1: empty slot).  With p the softmax over all S scores,
    A the selected keys and U the rest: o = sum_A p_j v_j + (1 - sum_A p_j) mean_U v (0 when U
    is empty): :func:`topkattn.ops.tail_attention.tail_topk_attention` at its last row.
    """
    xp = get_array_module(query, keys, values)
    B, H, D = query.shape
    G, S, Dv = keys.shape[1], keys.shape[2], values.shape[3]
    rep = H // G
    s = xp.matmul(query.reshape(B, G, rep, D), keys.swapaxes(-1, -2)) * query.dtype.type(scale)  # (B, G, rep, S)
    e = xp.exp(s - s.max(-1, keepdims=True))
    p = e / e.sum(-1, keepdims=True)  # (B, G, rep, S)
    sel = xp.zeros((B, G, rep, S + 1), dtype=bool)
    ig = idx.reshape(B, G, rep, -1)  # (B, G, rep, K)
    b, g, h = (xp.arange(d).reshape((-1,) + (1,) * (3 - i)) for i, d in enumerate((B, G, rep)))
    sel[b, g, h, xp.where(ig >= 0, ig, S)] = True  # empty slots mark the spare column S
    sel = sel[..., :S]
    alpha = xp.where(sel, p, 0).sum(-1)  # (B, G, rep)
    n_rest = S - sel.sum(-1)  # (B, G, rep)
    w_rest = (1 - alpha) / xp.maximum(n_rest, 1)  # each unselected key's weight
    w = xp.where(sel, p, w_rest[..., None].astype(p.dtype))  # (B, G, rep, S)
    return xp.matmul(w, values).reshape(B, H, Dv)


def select_block_step(layer: Any, query: Array, cache: Any, keys: Array) -> tuple[Array, Array]:
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

    def __init__(self, xp: Any, batch: int, G: int, D: int, dtype: Any, block_size: int) -> None:
        self.block_size = int(block_size)
        self.buf = GrowingBuffer(xp, (batch, G, 0, D), axis=2, dtype=dtype, capacity=16)
        self.n = 0  # cache rows folded in

    @property
    def means(self) -> Array:
        return self.buf.view()

    def update(self, keys: Array) -> Array:
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

    def __init__(self, xp: Any, shape: tuple[int, ...], axis: int, dtype: Any, capacity: int = 64) -> None:
        shape = list(shape)
        shape[axis] = max(1, capacity)
        self.axis = axis
        self.data = xp.zeros(tuple(shape), dtype=dtype)
        self.n = 0

    def _sl(self, a, b):
        sl = [slice(None)] * self.data.ndim
        sl[self.axis] = slice(a, b)
        return tuple(sl)

    def append(self, rows: Array) -> None:
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

    def view(self) -> Array:
        return self.data[self._sl(0, self.n)]



class KVCache:
    """Full KV cache: ``keys`` (B, G, S, D), ``values`` (B, G, S, Dv), persistent rows first."""

    def __init__(self, xp: Any, batch: int, G: int, D: int, Dv: int, dtype: Any, owner: Any) -> None:
        self.batch = batch
        self.kbuf = GrowingBuffer(xp, (batch, G, 0, D), axis=2, dtype=dtype)
        self.vbuf = GrowingBuffer(xp, (batch, G, 0, Dv), axis=2, dtype=dtype)
        self.owner = owner
        self.prefix = 0
        self.block_means = None  # a BlockMeans of the keys for a block top-k layer

    @property
    def keys(self) -> Array:
        return self.kbuf.view()

    @property
    def values(self) -> Array:
        return self.vbuf.view()

    @property
    def n_tokens(self) -> int:
        return self.kbuf.n - self.prefix

    @property
    def floats_per_token(self) -> int:
        k, v = self.kbuf.data, self.vbuf.data
        return k.shape[1] * k.shape[3] + v.shape[1] * v.shape[3]

    @property
    def bytes_per_token(self) -> int:
        return self.floats_per_token * self.kbuf.data.dtype.itemsize


class MLACache:
    """Latent KV cache: ``keys`` (B, S, C + R) = [c_j ; kr_j], persistent rows first.

    Holds exactly C + R numbers per token (``floats_per_token``); ``weights`` are the
    absorbed decode weights taken when the cache was made.  With ``v_rank`` Cv > 0 (MLA with
    separate key and value latents) C is the key latent's rank and ``values`` (B, S, Cv) are
    kept apart (C + R + Cv numbers per token; an index reads only ``keys``); otherwise
    ``values`` is the keys' first C numbers.
    """

    def __init__(self, xp: Any, batch: int, C: int, R: int, dtype: Any, weights: dict[str, Array], owner: Any,
                 v_rank: int = 0) -> None:
        self.batch, self.C, self.R = batch, C, R
        self.buf = GrowingBuffer(xp, (batch, 0, C + R), axis=1, dtype=dtype)
        self.vbuf = GrowingBuffer(xp, (batch, 0, v_rank), axis=1, dtype=dtype) if v_rank else None
        self.weights = weights
        self.owner = owner
        self.prefix = 0
        self.block_means = None  # a BlockMeans of the latent keys [c_j ; kr_j] (G = 1) for a block top-k layer

    def append(self, keys: Array, values: Array | None = None) -> None:
        """Append key rows (B, n, C + R) and, with a value buffer, value rows (B, n, Cv)."""
        if (values is None) != (self.vbuf is None):
            raise ValueError("values must be given exactly when the cache keeps them apart (v_rank > 0)")
        self.buf.append(keys)
        if values is not None:
            self.vbuf.append(values)

    @property
    def keys(self) -> Array:
        return self.buf.view()

    @property
    def values(self) -> Array:
        """(B, S, Cv) value latents: the separate buffer, else the keys' first C numbers."""
        return self.vbuf.view() if self.vbuf is not None else self.buf.view()[..., :self.C]

    @property
    def n_tokens(self) -> int:
        return self.buf.n - self.prefix

    @property
    def floats_per_token(self) -> int:
        return self.buf.data.shape[-1] + (self.vbuf.data.shape[-1] if self.vbuf is not None else 0)

    @property
    def bytes_per_token(self) -> int:
        return self.floats_per_token * self.buf.data.dtype.itemsize
