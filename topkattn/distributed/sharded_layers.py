"""Decode layers whose cache is sharded by position over MPI ranks, and the log-sum-exp merge.

Shape letters: B batch, H query heads, G KV heads, S cached positions in all, Sp this rank's
rows, D key dim (C + R for MLA), Dv value dim (C for MLA: the latent), K index slots, d model
width.

:class:`ShardedMLA` (and :class:`ShardedAttention` for plain attention) is the single-process
layer with a sharded decode: ``init_cache`` makes a cache holding only this rank's positions
(:mod:`topkattn.distributed.sharded_cache`), and ``step``

1. computes the absorbed query on every rank and the new token's latent [c ; kr] only on the
   rank that owns its position (the others skip those projections), which stores it;
2. top-k: selects through a :class:`~topkattn.distributed.ShardedSelector` (the layer's
   ``selector``, or an exact one when it is None), then :func:`attend_selection`; dense
   (``topk=None``): :func:`attend_all`; block top-k (``selection="block"``): the blocks chosen
   from every rank's block means (:func:`~topkattn.distributed.sharded_decoding.select_blocks_sharded`),
   then :func:`attend_selection`;
3. projects the merged output as the single-process layer does.

Both attentions are exact: each rank computes ``sum_{j its own} exp(s_j - lse) v_j`` with the
global logsumexp ``lse`` of the attended scores, and one Allreduce of (B, H, Dv) adds the ranks'
parts.  The training path (``forward``/``backward``) is the layer's own, unchanged (replicated).
:func:`shard_decoding` converts a model's attention layers in place, after comparing the model
across the ranks.  The sharding ``block`` defaults to 64, rounded up to a multiple of a block
layer's ``block_size`` (a selection block must live on one rank); an explicit ``block`` that
is not such a multiple is a ValueError.
A step is recorded in ``layer.stats`` as in one process (the global positions attended).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from topkattn.backend import Array, get_array_module
from topkattn.checks import check_int, logsumexp_rows
from topkattn.decoding.selectors import ExactSelector
from topkattn.distributed.comm import agree_settings, allreduce_sum
from topkattn.distributed.head_parallel import (
    HeadParallelMLA,
    layer_settings,
    layers_of,
    model_settings,
    replace_layers,
)
from topkattn.distributed.sharded_cache import ShardedKVCache, ShardedMLACache
from topkattn.distributed.sharded_decoding import (
    ShardedSelection,
    ShardedSelector,
    check_block_sharding,
    merged_lse,
    select_blocks_sharded,
)
from topkattn.layers.attention import Attention
from topkattn.layers.cache import BlockMeans, check_step_input
from topkattn.layers.mla import MLA
from topkattn.layers.rmsnorm import rms_norm_forward
from topkattn.layers.rope import rope_angles, rope_apply
from topkattn.model import Transformer
from topkattn.ops.selection import decode_scores, grouped_keys


def _weights(scores, lse, own):
    """exp(scores - lse) where ``own`` (0 elsewhere and on rows with no key), in float64."""
    xp = get_array_module(scores)
    finite = xp.isfinite(lse)
    with np.errstate(invalid="ignore", over="ignore"):
        p = xp.exp(scores.astype(xp.float64) - xp.where(finite, lse, 0.0))
    return xp.where(own & finite, p, 0.0)


def _bad_rows(lse):
    """Rows whose logsumexp is NaN or +inf (a NaN or +inf score): their output is NaN, as in one process."""
    xp = get_array_module(lse)
    return xp.isnan(lse) | (lse == xp.inf)


def attend_selection(comm: Any, query: Array, keys: Array, values: Array, sel: ShardedSelection) -> Array:
    """out (B, H, Dv): softmax attention over the merged selection ``sel``
    (:class:`~topkattn.distributed.ShardedSelection`), each rank over its own keys.

    query (B, H, D); keys (B, Sp, D) or (B, G, Sp, D) and values (B, Sp, Dv) or (B, G, Sp, Dv),
    this rank's rows.  One Allreduce of B*H*Dv numbers.  A row with no key gives zeros; a row
    with a NaN or +inf score NaN (the rule of :func:`topkattn.ops.sparse_attention.sparse_attention_decode`).
    """
    xp = get_array_module(query, keys)
    B, H, _ = query.shape
    vg = grouped_keys(values, H)  # (B, G, Sp, Dv)
    lse = xp.asarray(sel.lse)[..., None]  # (B, H, 1)
    own = sel.rows >= 0  # (B, H, K)
    out = xp.zeros((B, H, vg.shape[-1]), dtype=query.dtype)
    if vg.shape[2] and bool(own.any()):
        p = _weights(sel.scores, lse, own).astype(query.dtype)  # (B, H, K)
        bi = xp.arange(B)[:, None, None]
        gi = (xp.arange(H) // (H // vg.shape[1]))[None, :, None]
        vv = xp.where(own[..., None], vg[bi, gi, xp.where(own, sel.rows, 0)], 0)  # (B, H, K, Dv)
        out = xp.matmul(p[:, :, None, :], vv)[:, :, 0]
    out = allreduce_sum(comm, out)
    return xp.where(_bad_rows(lse), xp.nan, out)


def attend_all(comm: Any, query: Array, keys: Array, values: Array, scale: float) -> Array:
    """out (B, H, Dv): dense softmax attention over every rank's keys (keys and values as in
    :func:`attend_selection`).  One Allgather of the ranks' logsumexp (B*H numbers each) and
    one Allreduce of B*H*Dv numbers."""
    xp = get_array_module(query, keys)
    B, H, _ = query.shape
    vg = grouped_keys(values, H)  # (B, G, Sp, Dv)
    G, Sp = vg.shape[1], vg.shape[2]
    s = decode_scores(query, keys, scale) if Sp else xp.zeros((B, H, 0), dtype=query.dtype)  # (B, H, Sp)
    lse = merged_lse(comm, lambda: logsumexp_rows(s.reshape(B * H, Sp)), B * H, xp).reshape(B, H, 1)
    out = xp.zeros((B, G, H // G, vg.shape[-1]), dtype=query.dtype)
    if Sp:
        p = _weights(s, lse, xp.ones(s.shape, dtype=bool)).astype(query.dtype).reshape(B, G, H // G, Sp)
        for b in range(B):
            for g in range(G):
                out[b, g] = p[b, g] @ vg[b, g]  # (rep, Dv)
    out = allreduce_sum(comm, out.reshape(B, H, -1))
    return xp.where(_bad_rows(lse), xp.nan, out)


def _check_comm(comm):
    for name in ("Get_size", "Get_rank", "allgather", "Allgather", "Allreduce"):
        if not hasattr(comm, name):
            raise TypeError(f"comm must be an mpi4py communicator, got {type(comm).__name__} (no {name!r})")
    return comm


DEFAULT_BLOCK = 64


def sharding_block(layer: MLA | Attention, block: int | None = None) -> int:
    """The sharding block of ``layer``: ``block`` (ValueError unless an int >= 1 and, for a block
    top-k layer, a multiple of its ``block_size``), or by default 64 rounded up to such a multiple."""
    bs = layer.block_size if getattr(layer, "selection", "token") == "block" else 1
    if block is None:
        return -(-DEFAULT_BLOCK // bs) * bs
    block = check_int("block", block, 1)
    check_block_sharding(block, bs)
    return block


class _ShardedDecode:
    """What the sharded layers share: the communicator, the block, the step's selection."""

    def _init_sharded(self, layer, comm, block):
        _check_comm(comm)
        error = settings = None
        try:
            self._check_layer(layer)
            block = sharding_block(layer, block)
            if getattr(layer, "tail", None) is not None:  # the tail needs every rank's scores and values merged
                raise ValueError(f"sharded decoding attends plain top-k; layer has tail={layer.tail!r} (decode it "
                                 f"in one process)")
            if getattr(layer, "variant", False):  # KV experts, split ranks, ternary: the sharded steps are plain
                raise ValueError("sharded decoding runs plain MLA or attention; layer has variant options "
                                 "(kv_experts, k_rank/v_rank or ternary): decode it in one process")
            settings = dict(layer_settings(layer), block=block)
        except (TypeError, ValueError) as e:
            error = e
        # one collective: the same layer (settings, params) and block on every rank, else the same error on
        # every rank (a different topk or block would select differently or break a collective's sizes)
        agree_settings(comm, "sharded decoding", settings, error)
        vars(self).update(vars(layer))  # the same params, grads and settings: a view of ``layer``
        self.comm, self.block = comm, block
        self.last_selection = None  # the ShardedSelection of the last top-k step
        self._exact_selectors = {}

    def _shard(self):
        return dict(rank=self.comm.Get_rank(), ranks=self.comm.Get_size(), block=self.block)

    def _check_batch(self, batch):
        """``batch`` (an int >= 1), the same on every rank: every step's exchange has its size
        (one small collective per cache, none per step; ValueError on every rank otherwise)."""
        error = None
        try:
            batch = check_int("batch", batch, 1)
        except (TypeError, ValueError) as e:
            error = e
        agree_settings(self.comm, "sharded decoding", None if error else {"batch": batch}, error)
        return batch

    def _decode_selector(self):
        sel = self.selector
        if sel is None:  # exact, as select_step does in one process (dynamic k under topk="auto")
            tb = self.tail_bound if self.topk == "auto" else None
            sel = self._exact_selectors.get(tb)
            if sel is None:
                sel = self._exact_selectors[tb] = ShardedSelector(
                    lambda: ExactSelector(tail_bound=tb, measure_recall=False), self.comm, measure_recall=False)
        if not isinstance(sel, ShardedSelector):
            raise TypeError(f"a sharded layer's selector must be a ShardedSelector (or None: exact), got "
                            f"{type(sel).__name__}; wrap it with topkattn.distributed.sharded_selector_factory")
        return sel

    def _block_state(self, cache, G, D):
        """``cache`` with a BlockMeans of this rank's rows (B, G, Nl, D) for a block layer."""
        if self.selection == "block":
            keys = cache.keys
            cache.block_means = BlockMeans(get_array_module(keys), cache.batch, G, D, keys.dtype, self.block_size)
        return cache

    def _attend(self, query, cache, keys, values):
        stats = getattr(self, "stats", None)
        if self.selection == "block":  # the blocks from every rank's means; a decode selector is not used
            sel, blocks = select_blocks_sharded(self.comm, query, cache, block_size=self.block_size,
                                                topk_blocks=self.topk_blocks, scale=self.scale)
            self.last_selection = sel
            if stats is not None:
                stats.update(sel.idx, n_keys=cache.n_rows, score_dtype=query.dtype, blocks=blocks,
                             index_bytes=int(blocks.nbytes))
            return attend_selection(self.comm, query, keys, values, sel)
        if self.topk is None:
            if stats is not None:
                stats.record_step(query, cache.n_rows)
            return attend_all(self.comm, query, keys, values, self.scale)
        k = (self.max_topk or cache.n_rows) if self.topk == "auto" else self.topk
        sel = self._decode_selector().select(query, cache, topk=k, sinks=self.persistent_tokens, window=self.window,
                                             scale=self.scale)
        self.last_selection = sel
        if stats is not None:
            stats.record_step(query, cache.n_rows, sel.idx)
        return attend_selection(self.comm, query, keys, values, sel)


class ShardedMLA(_ShardedDecode, MLA):
    """``layer`` (an :class:`~topkattn.layers.mla.MLA`, whose params it shares) decoding over a
    latent cache sharded by position on ``comm``'s ranks (round-robin blocks of ``block``)."""

    def __init__(self, layer: MLA, comm: Any, *, block: int | None = None) -> None:
        self._init_sharded(layer, comm, block)

    @staticmethod
    def _check_layer(layer):
        if not isinstance(layer, MLA) or isinstance(layer, (ShardedMLA, HeadParallelMLA)):
            raise TypeError(f"layer must be a plain MLA (not head-parallel or already sharded), got "
                            f"{type(layer).__name__}")

    def init_cache(self, batch: int) -> ShardedMLACache:
        """An empty :class:`~topkattn.distributed.ShardedMLACache` (this rank's persistent rows in it);
        a collective call: ``batch`` must be the same on every rank."""
        batch = self._check_batch(batch)
        p = self.params
        xp = get_array_module(p["W_DQ"])
        cache = ShardedMLACache(xp, batch, self.kv_lora_rank, self.qk_rope_dim, p["W_DQ"].dtype,
                                self.decode_weights(), owner=self, **self._shard())
        self._block_state(cache, 1, self.kv_lora_rank + self.qk_rope_dim)  # means of the latent keys [c ; kr]
        if self.persistent_tokens:
            rows = xp.concatenate([p["persist_c"], p["persist_kr"]], axis=-1)  # (P, C + R)
            cache.extend(xp.broadcast_to(rows[None], (batch,) + rows.shape))
            cache.prefix = self.persistent_tokens
        return cache

    def step(self, x_t: Array, cache: ShardedMLACache) -> Array:
        """y_t (B, 1, d) for x_t (B, 1, d) (the same on every rank); the owner of the token's
        position stores its [c ; kr]."""
        x_t = check_step_input(self, self._check_x(x_t), cache)
        B = x_t.shape[0]
        w = cache.weights
        xp = get_array_module(x_t)
        x1 = x_t[:, 0]  # (B, d)
        pos = cache.n_tokens
        q_abs = self.absorbed_query(x1, pos, w)  # (B, H, C + R)
        row = None
        if cache.owns_next():  # only the owner computes the latent (MLA.step's formulas)
            c = rms_norm_forward(x1 @ w["W_DKV"].T, w["kv_norm"], self.eps)[0]  # (B, C)
            cs = rope_angles([pos], self.qk_rope_dim, self.rope_base, xp, x_t.dtype)
            kr = rope_apply((x1 @ w["W_KR"].T)[:, None], *cs)[:, 0]  # (B, R)
            row = xp.concatenate([c, kr], axis=-1)[:, None]
        cache.push(row)
        keys = cache.keys  # (B, Sp, C + R)
        o = self._attend(q_abs, cache, keys, keys[..., :self.kv_lora_rank])  # (B, H, C)
        return (o.reshape(B, -1) @ w["W_OV"].T)[:, None]  # (B, 1, d)


class ShardedAttention(_ShardedDecode, Attention):
    """``layer`` (a plain :class:`~topkattn.layers.attention.Attention`, whose params it shares)
    decoding over a key-value cache sharded by position on ``comm``'s ranks."""

    def __init__(self, layer: Attention, comm: Any, *, block: int | None = None) -> None:
        self._init_sharded(layer, comm, block)

    @staticmethod
    def _check_layer(layer):
        if not isinstance(layer, Attention) or isinstance(layer, ShardedAttention):
            raise TypeError(f"layer must be a plain Attention (not already sharded), got {type(layer).__name__}")

    def init_cache(self, batch: int) -> ShardedKVCache:
        """An empty :class:`~topkattn.distributed.ShardedKVCache` (this rank's persistent rows in it);
        a collective call: ``batch`` must be the same on every rank."""
        batch = self._check_batch(batch)
        p = self.params
        xp = get_array_module(p["W_Q"])
        G, D, Dv = self.n_kv_heads, self.head_dim, self.v_head_dim
        cache = ShardedKVCache(xp, batch, G, D, Dv, p["W_Q"].dtype, self, **self._shard())
        self._block_state(cache, G, D)
        if self.persistent_tokens:
            P = self.persistent_tokens
            cache.extend(xp.broadcast_to(p["persist_k"][None], (batch, G, P, D)),
                         xp.broadcast_to(p["persist_v"][None], (batch, G, P, Dv)))
            cache.prefix = P
        return cache

    def step(self, x_t: Array, cache: ShardedKVCache) -> Array:
        """y_t (B, 1, d) for x_t (B, 1, d); the owner of the token's position stores its key and value."""
        x_t = check_step_input(self, self._check_x(x_t), cache)
        B = x_t.shape[0]
        xp = get_array_module(x_t)
        p = self.params
        H, G, D, Dv = self.n_heads, self.n_kv_heads, self.head_dim, self.v_head_dim
        x1 = x_t[:, 0]
        cs = rope_angles([cache.n_tokens], D, self.rope_base, xp, x_t.dtype) if self.rope else None
        q = self._rot((x1 @ p["W_Q"].T).reshape(B, H, 1, D), cs)[:, :, 0]  # (B, H, D)
        if cache.owns_next():
            cache.push(self._rot((x1 @ p["W_K"].T).reshape(B, G, 1, D), cs), (x1 @ p["W_V"].T).reshape(B, G, 1, Dv))
        else:
            cache.push(None, None)
        o = self._attend(q, cache, cache.keys, cache.values)  # (B, H, Dv)
        return (o.reshape(B, H * Dv) @ p["W_O"].T)[:, None]


def shard_decoding(model: Transformer, comm: Any, *, block: int | None = None) -> Transformer:
    """Make every attention layer of ``model`` (a :class:`~topkattn.model.Transformer` or a module
    holding MLA/Attention children) decode over a cache sharded by position on ``comm``, in
    place; returns ``model``.  The layers keep their params (shared, same names); only
    ``init_cache``/``step`` change.  ``block``: positions dealt round-robin in blocks of it
    (:func:`sharding_block`: default 64, rounded up per block top-k layer to a multiple of its
    ``block_size``).

    Every rank must pass the same model and ``block``: its config, attention layers, their settings
    (:func:`~topkattn.distributed.head_parallel.layer_settings`) and params are compared across the
    ranks here (a few small collectives), a ValueError naming what differs on every rank;
    ``init_cache`` compares the batch.  Every rank must also decode the same tokens: the steps'
    inputs are not compared (no collective is spent on it), and an input error on one rank
    only (e.g. a token outside the vocabulary) raises on that rank alone while the others wait
    in the step's collective: run scripts under ``mpiexec -n N python -m mpi4py script.py``
    or call :func:`topkattn.distributed.install_excepthook` so that it ends the job."""
    _check_comm(comm)
    error = settings = None
    try:  # the local checks and the model's description, agreed before the layers' own checks
        if block is not None:
            block = check_int("block", block, 1)
        every = layers_of(model, (MLA, Attention))
        if any(isinstance(child, HeadParallelMLA) for _, _, child, _ in every):
            raise ValueError("shard_decoding does not combine with head_parallel (a head-parallel MLA "
                             "already splits the heads over the ranks)")
        layers = [(path, type(child).__name__) for _, _, child, path in every]
        found = [(module, name, child) for module, name, child, _ in every
                 if not isinstance(child, (ShardedMLA, ShardedAttention))]
        settings = dict(model_settings(model), block=block, attention_layers=layers)
    except (TypeError, ValueError) as e:
        error = e
    agree_settings(comm, "shard_decoding", settings, error)
    replace_layers(model, [(module, name, child, (ShardedMLA if isinstance(child, MLA) else ShardedAttention)(
        child, comm, block=block)) for module, name, child in found])
    return model


__all__ = ["ShardedAttention", "ShardedMLA", "attend_all", "attend_selection", "shard_decoding", "sharding_block"]
