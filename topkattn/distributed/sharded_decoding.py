"""Sharded decoding: each rank searches its share of the cached positions; the merge is exact.

Shape letters: B batch, H query heads, G KV heads, S cached keys (persistent rows first),
D key dim (C + R for MLA), K index slots per query, K' selected slots, Sp the candidate keys
this rank owns, M candidates per row offered by each rank (M = K').

Every rank runs the same token-by-token decode (replicated weights, same tokens, the whole
latent cache: C + R numbers per token).  What is sharded is the expensive part, the search:
rank r owns the candidate positions j with ``(j // block) % ranks == r`` (round-robin blocks,
balanced as the cache grows).  Per decode step :class:`ShardedSelector`

1. brings its shard up to the step's candidates (keys that are neither sinks nor in the
   window; forced keys are attended exactly and never looked up) and asks its *inner*
   selector for the top K' of the shard: the inner sees a view cache (B, Sp, D) of the owned
   keys in position order, with no sinks and no window (for :class:`LorannSelector`: one
   index per batch element over this rank's positions, built at ``end_prefill`` over its
   prompt positions and grown with ``add``);
2. re-scores the returned keys exactly (the product of
   :func:`topkattn.ops.selection.decode_scores`, in the cache's dtype);
3. all-gathers (score, global position) and ranks the union (score descending, ties to the
   lower position, NaN on top): the global index ``idx`` (B, H, K), forced keys first, equal
   on every rank.  With an exact inner (:class:`ExactSelector`) the shard scores are the
   selection and the merge is the single-process exact top-k, bit for bit.

The attention then runs unchanged in the layer over the merged ``idx``.  ``stats`` are taken
on the merged selection (recall against the exact top-k, itself found shard by shard and
merged), so they are the same on every rank.  Prefill selects exactly as in one process
(replicated) while the inner records the absorbed queries.

Restrictions: a fixed k (dynamic k, ``tail_bound``, is single-process); every rank must
construct the same selectors and decode the same tokens.
"""
import numpy as np

from topkattn.backend import get_array_module
from topkattn.checks import check_int
from topkattn.decoding.selectors import DecodeSelector, ExactSelector
from topkattn.distributed.comm import agree, allgather_rows, require_mpi
from topkattn.distributed.context_parallel import merge_candidates
from topkattn.layers.cache import GrowingBuffer
from topkattn.ops.selection import decode_scores, grouped_keys, ranked_topm_xp


class ShardedSelector(DecodeSelector):
    """A decode selector whose search is sharded by position over the ranks of ``comm``.

    Args:
      inner_factory: zero-argument callable returning a fresh :class:`DecodeSelector` (fixed
        k) that searches this rank's shard; called once now and once per new cache.
      comm: an mpi4py communicator (every rank calls the selector at the same steps).
      block: positions per round-robin block of the ownership rule.
      measure_recall: record recall of the merged selection against the exact top-k.
    """

    def __init__(self, inner_factory, comm, *, block=64, measure_recall=True):
        super().__init__(measure_recall=False)  # recall is measured here, on the merged selection
        if not callable(inner_factory):
            raise TypeError(f"inner_factory must be a callable returning a DecodeSelector, "
                            f"got {type(inner_factory).__name__}")
        for name in ("Get_size", "Get_rank", "allgather", "Allgather"):
            if not hasattr(comm, name):
                raise TypeError(f"comm must be an mpi4py communicator, got {type(comm).__name__}")
        self.inner_factory = inner_factory
        self.comm = comm
        self.block = check_int("block", block, 1)
        self.measure_sharded_recall = bool(measure_recall)
        self.inner = self._new_inner()
        self._view = None
        self._pending = None  # an error of this step's _observe, agreed in _select

    def _new_inner(self):
        inner = self.inner_factory()
        if not isinstance(inner, DecodeSelector):
            raise TypeError(f"inner_factory must return a DecodeSelector, got {type(inner).__name__}")
        if inner.dynamic:
            raise ValueError("inner_factory must return a fixed-k selector: dynamic k (tail_bound) is "
                             "single-process")
        inner.measure_recall = False  # its shard-local recall means nothing; ours is global
        if self.prefilling:
            inner.begin_prefill()
        return inner

    # -- prefill ---------------------------------------------------------------------------
    def begin_prefill(self):
        super().begin_prefill()
        self.inner.begin_prefill()

    def end_prefill(self):
        super().end_prefill()
        error = None
        try:
            self.inner.end_prefill()  # LorannSelector: builds the shard's indexes
        except Exception as e:  # every rank must learn of it, or the others hang
            error = e
        agree(self.comm, error)

    # -- state -----------------------------------------------------------------------------
    def _reset(self, cache):
        if self._view is not None:  # a second decode: a fresh inner for the fresh shard
            self.inner = self._new_inner()
        keys = cache.keys
        xp = get_array_module(keys)
        shape = list(keys.shape)
        shape[-2] = 0
        self._view = _ShardView(GrowingBuffer(xp, shape, axis=keys.ndim - 2, dtype=keys.dtype),
                                getattr(cache, "C", None))
        self._own = np.zeros(0, dtype=np.int64)  # global positions of the shard's keys, ascending
        self._seen_end = None  # candidates [sinks, seen_end) have been assigned to their owners

    def _observe(self, query, cache, ctx):
        """Bring the shard up to the step's candidates; the inner records prefill queries."""
        error = None
        try:
            self._grow(cache.keys, ctx)
            if self.prefilling and len(self._own) and not isinstance(self.inner, ExactSelector):
                self.inner(query, self._view, topk=ctx.k_cap, sinks=0, window=0, scale=ctx.scale)
        except Exception as e:  # agreed below: no rank is left waiting
            error = e
        if self.prefilling:
            agree(self.comm, error)
        else:
            self._pending = error  # agreed in _select, before the step's collective

    def _grow(self, keys, ctx):
        start = ctx.sinks if self._seen_end is None else self._seen_end
        if ctx.cand_end < start:
            raise ValueError(f"the cache's candidates shrank (cand_end {ctx.cand_end} < {start}): "
                             "sinks and window must stay fixed during one decode")
        mine = _owned(np.arange(start, ctx.cand_end, dtype=np.int64), self.comm.Get_rank(), self.comm.Get_size(),
                      self.block)
        if len(mine):
            xp = get_array_module(keys)
            self._view.buf.append(keys[..., xp.asarray(mine), :])
            self._own = np.concatenate([self._own, mine])
        self._seen_end = ctx.cand_end

    # -- selection -------------------------------------------------------------------------
    def _select(self, query, keys, cache, ctx):
        xp = ctx.xp
        B, H, _ = query.shape
        n_sel, n_forced = ctx.bounds.n_sel, ctx.n_forced
        idx = xp.full((B, H, n_forced + n_sel), -1, dtype=xp.int64)
        idx[..., :n_forced] = xp.asarray(ctx.bounds.forced_indices())[None]
        k_row = xp.full((B, H), ctx.k_fixed, dtype=xp.int64)
        error, self._pending = self._pending, None
        exact = isinstance(self.inner, ExactSelector)
        local = None
        if n_sel and error is None:
            try:
                if exact:
                    local = self._exact_local(query, ctx, n_sel)
                else:
                    local = self._inner_local(query, ctx, n_sel)
            except Exception as e:  # agreed below
                error = e
        agree(self.comm, error)
        if not n_sel:
            return idx, k_row, None
        ranked = self._merge(*local, n_sel)  # (B*H, K') global positions, rank order
        idx[..., n_forced:] = ranked.reshape(B, H, n_sel)
        if self.measure_sharded_recall:
            truth = ranked if exact else self._merge(*self._exact_local(query, ctx, n_sel), n_sel)
            self.stats.add_recall(*_recall(idx, truth, k_row, ctx))
        return idx, k_row, None

    def _merge(self, scores, pos, m):
        return merge_candidates(allgather_rows(self.comm, scores), allgather_rows(self.comm, pos), m)

    def _exact_local(self, query, ctx, m):
        """The shard's exact top ``m``: (scores (B*H, M), global positions (B*H, M)), -1 padded."""
        xp = ctx.xp
        B, H, _ = query.shape
        if not len(self._own):
            return xp.full((B * H, m), -xp.inf, dtype=query.dtype), xp.full((B * H, m), -1, dtype=xp.int64)
        s = decode_scores(query, self._view.keys, ctx.scale).reshape(B * H, -1)  # (B*H, Sp)
        cols = ranked_topm_xp(s, xp.ones(s.shape, dtype=bool), m)
        got = cols >= 0
        own = xp.asarray(self._own)
        return (xp.where(got, xp.take_along_axis(s, xp.maximum(cols, 0), axis=1), -xp.inf),
                xp.where(got, own[xp.maximum(cols, 0)], -1))

    def _inner_local(self, query, ctx, m):
        """The inner selector's top ``m`` of the shard, re-scored exactly: (B*H, M) each."""
        xp = ctx.xp
        B, H, _ = query.shape
        if not len(self._own):
            return xp.full((B * H, m), -xp.inf, dtype=query.dtype), xp.full((B * H, m), -1, dtype=xp.int64)
        local = self.inner(query, self._view, topk=ctx.k_cap, sinks=0, window=0, scale=ctx.scale)[..., :m]
        got = local >= 0
        pos = xp.where(got, xp.asarray(self._own)[xp.maximum(local, 0)], -1)  # (B, H, m') global
        scores = _score_positions(query, self._view.keys, xp.where(got, local, -1), ctx.scale)
        pad = m - pos.shape[-1]
        if pad:
            pos = xp.concatenate([pos, xp.full((B, H, pad), -1, dtype=xp.int64)], axis=-1)
            scores = xp.concatenate([scores, xp.full((B, H, pad), -xp.inf, dtype=scores.dtype)], axis=-1)
        return scores.reshape(B * H, m), pos.reshape(B * H, m)


class _ShardView:
    """The cache a shard's inner selector sees: ``keys`` (B, Sp, D) or (B, G, Sp, D), its own
    candidates in position order (``C``: the MLA latent split, as on :class:`MLACache`)."""

    def __init__(self, buf, C):
        self.buf = buf
        self.C = C

    @property
    def keys(self):
        return self.buf.view()


def _score_positions(query, keys, pos, scale):
    """(B, H, M) exact scores of keys ``pos`` (B, H, M) (-1: none, -inf) for each head's query.

    The product of :func:`topkattn.ops.selection.decode_scores` (query times scale, then one
    matrix product per (b, g) over the keys any head of the group asked for).
    """
    xp = get_array_module(query, keys)
    B, H, D = query.shape
    kg = grouped_keys(keys, H)  # (B, G, Sp, D)
    G = kg.shape[1]
    rep = H // G
    qg = query.reshape(B, G, rep, D) * query.dtype.type(scale)
    out = xp.full(pos.shape, -xp.inf, dtype=query.dtype)
    for b in range(B):
        for g in range(G):
            p = pos[b, g * rep:(g + 1) * rep]  # (rep, M)
            valid = p >= 0
            if not bool(valid.any()):
                continue
            uniq, inv = xp.unique(p[valid], return_inverse=True)
            t = qg[b, g] @ kg[b, g][uniq].T  # (rep, U)
            cols = xp.zeros(p.shape, dtype=xp.int64)
            cols[valid] = inv.reshape(-1)
            out[b, g * rep:(g + 1) * rep] = xp.where(valid, xp.take_along_axis(t, cols, axis=1), -xp.inf)
    return out


def _recall(idx, truth, k_row, ctx):
    """(hits, wanted, rank_hits, rank_wanted) of the merged ``idx`` against the exact ranking
    ``truth`` (B*H, K'): the bookkeeping of :func:`topkattn.decoding.selectors.recall_hits`."""
    xp = ctx.xp
    B, H, K = idx.shape
    m = K - ctx.n_forced
    wanted = xp.minimum(xp.asarray(k_row).reshape(B * H), ctx.n_cand)
    sel = idx.reshape(B * H, K)[:, ctx.n_forced:]  # (B*H, K')
    sought = xp.arange(m)[None, :] < wanted[:, None]
    top = xp.where(sought, truth, -2)
    found = ((top[:, :, None] == sel[:, None, :]) & (sel[:, None, :] >= 0)).any(axis=2)  # (B*H, K')
    return found.sum(axis=1), wanted, found.sum(axis=0), sought.sum(axis=0)


def sharded_selector_factory(make_selectors, comm=None, *, block=64):
    """Wrap ``make_selectors(batch_number) -> [selector per layer]`` (e.g.
    :func:`topkattn.decoding.runner.selector_factory`) so each layer's selector searches this
    rank's shard: ``make(batch_number) -> [ShardedSelector per layer]``.  ``comm``: default
    ``MPI.COMM_WORLD``."""
    if not callable(make_selectors):
        raise TypeError(f"make_selectors must be callable, got {type(make_selectors).__name__}")
    comm = require_mpi().COMM_WORLD if comm is None else comm
    block = check_int("block", block, 1)

    def make(batch_no):
        return [ShardedSelector(lambda s=s: s, comm, block=block) for s in make_selectors(batch_no)]

    return make


def shard_positions(n, rank, ranks, block=64):
    """The positions 0 .. n - 1 rank ``rank`` of ``ranks`` owns (the rule of :class:`ShardedSelector`)."""
    n, rank, ranks, block = (check_int(a, v, lo) for a, v, lo in
                             (("n", n, 0), ("rank", rank, 0), ("ranks", ranks, 1), ("block", block, 1)))
    if rank >= ranks:
        raise ValueError(f"rank must be below ranks ({ranks}), got {rank}")
    return _owned(np.arange(n, dtype=np.int64), rank, ranks, block)


def _owned(positions, rank, ranks, block):
    return positions[(positions // block) % ranks == rank]


__all__ = ["ShardedSelector", "shard_positions", "sharded_selector_factory"]
