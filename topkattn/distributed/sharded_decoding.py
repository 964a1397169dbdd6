"""Sharded decoding: the cache is sharded by position; each rank searches its shard; the merge is exact.

Shape letters: B batch, H query heads, G KV heads, S cached positions in all (persistent rows
first), Sp the rows this rank stores, D key dim (C + R for MLA), K index slots per query, F
forced slots (sinks, window), K' selected slots, M candidates per row offered by each rank;
``rows`` are the flattened (b, h).

Each rank stores only the positions it owns (:mod:`topkattn.distributed.sharded_cache`:
round-robin blocks) and runs the same token-by-token decode (replicated weights, the same
tokens, the query computed on every rank).  Per decode step and layer,
:meth:`ShardedSelector.select`

1. scores this rank's forced keys (the sinks and window positions it owns) and reduces them
   to one logsumexp per row;
2. takes the top M = K' of its candidates: an exact scan of its rows, or its *inner*
   selector (e.g. :class:`~topkattn.decoding.LorannSelector`: one index per batch element
   over this rank's candidates only, built at ``end_prefill`` and grown with ``add``) over a
   view of its candidate rows (no sinks, no window), re-scored exactly;
3. one Allgather (:func:`topkattn.distributed.exchange.allgather_fields`: scores, global
   positions, the forced logsumexp, an error status) and the union ranked (score
   descending, ties to the lower position, NaN on top): the global top K' is inside the
   union of the local top K's, so with an exact scan the selection is the single-process
   one; the index ``idx`` (B, H, K) of global positions, forced keys first, equal on every rank.

The layer (:mod:`topkattn.distributed.sharded_layers`) then attends: every rank knows the
selection's logsumexp ``lse`` (the forced keys' part came with the exchange, the selected
keys' scores too), so rank p computes ``sum_{j its own} exp(s_j - lse) v_j`` and one
Allreduce of (B, H, Dv) sums the ranks' parts: O(B H (K + Dv)) bytes a step, never O(S).

**Dynamic k** (an inner with ``tail_bound``): the k of
:func:`topkattn.ops.dynamic_k.choose_k` depends only on the top-k scores, the forced keys'
logsumexp and the candidate count, all known after the merge, so the choice is the
single-process one.  Rounds keep the bytes small: the first exchange offers
``dynamic_first`` candidates per row; while a row has not met the bound and more
candidates exist, the offer doubles (up to the cap).  The certificate
(:func:`~topkattn.ops.dynamic_k.dynamic_k_from_ranked`) needs, for a retriever that may
miss keys, how many candidates were returned (summed over the ranks) and an upper bound
on any other candidate's score (Cauchy-Schwarz over this rank's candidate rows; the
maximum over the ranks), both sent in the first exchange.

``stats`` are taken on the merged selection (recall against the exact top-k, found shard
by shard and merged: one more exchange per step for a non-exact inner), so they are the
same on every rank.  Every rank must construct the same selectors and decode the same tokens.

**Block top-k** (a layer with ``selection="block"``; no selector): :func:`select_blocks_sharded`.
The sharding ``block`` is a multiple of the layer's ``block_size``, so each selection block lives
on one rank, and this rank's cache rows fall into whole selection blocks: its ``block_means``
(a :class:`~topkattn.layers.cache.BlockMeans` over its own rows, folded as in one process, so
the same numbers) holds the means of the blocks it owns.  Per step it ranks its blocks before
the query's own one by q . mean (unscaled, one product per KV group, as
:func:`topkattn.ops.block_selection.select_blocks`), offers its top Kb - 1 (score, block
index) in one Allgather (O(ranks * Kb) numbers per head, not O(S)), and the union is ranked by
the single-process rule (score descending, ties to the lower block, NaN on top); the own block
is forced and counted.  The chosen blocks expand to global positions
(:func:`~topkattn.ops.block_selection.expand_blocks`); each rank scores its own keys among them,
one Allgather of the ranks' logsumexp (:func:`merged_lse`) gives the selection's ``lse``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from topkattn.backend import Array, get_array_module, to_numpy
from topkattn.checks import check_int, logsumexp_rows
from topkattn.decoding.lorann import LorannSelector
from topkattn.decoding.selectors import DecodeSelector, ExactSelector
from topkattn.distributed.comm import agree, require_mpi
from topkattn.distributed.exchange import allgather_fields
from topkattn.distributed.sharded_cache import _ShardedRows, owned_below, shard_positions
from topkattn.ops.block_selection import BlockBounds, expand_blocks
from topkattn.ops.dynamic_k import choose_k, dynamic_k_from_ranked
from topkattn.ops.selection import RowBounds, grouped_keys, rank_decode_candidates, ranked_topm_xp


class ShardedSelection:
    """One decode step's merged selection as rank r sees it.

    ``idx`` (B, H, K) global positions (forced first, -1 empty) and ``lse`` (B, H) float64,
    the logsumexp of the scores of every selected key (all ranks'), are equal on every rank;
    ``rows`` (B, H, K) are rank r's cache rows of those keys (-1: another rank's or empty) and
    ``scores`` (B, H, K) their exact scores (meaningless where ``rows`` is -1).  ``k`` (B, H)
    the keys selected besides forced ones; ``certified`` (B, H) bool (dynamic k) or None.
    """

    __slots__ = ("idx", "rows", "scores", "lse", "k", "certified")

    def __init__(self, idx: Array, rows: Array, scores: Array, lse: Array, k: Array, certified: Array | None) -> None:
        self.idx, self.rows, self.scores, self.lse, self.k, self.certified = idx, rows, scores, lse, k, certified


class _Step:
    """The geometry of one decode row at position S - 1 (the rule of RowBounds)."""

    def __init__(self, S, k_cap, sinks, window):
        self.S = S
        self.bounds = RowBounds(S, 1, topk=k_cap, causal=True, sinks=sinks, window=window)
        self.forced = self.bounds.forced_indices()[0]  # (F,) global positions, -1 absent
        self.n_forced = len(self.forced)
        self.n_sel = self.bounds.n_sel
        self.n_cand = int(self.bounds.n_candidates()[0])
        self.cand_lo = self.bounds.n_sink  # candidates: positions cand_lo .. cand_hi - 1
        self.cand_hi = self.cand_lo + self.n_cand
        self.k_fixed = min(self.n_sel, self.n_cand)
        self.pos_dtype = np.int32 if S < 2**31 else np.int64


class _CandidateView:
    """The cache an inner selector sees: ``keys`` (B, n, D) or (B, G, n, D), this rank's
    candidate rows lo .. hi - 1 in position order (``C``: the MLA latent split)."""

    def __init__(self, cache):
        self.cache = cache
        self.C = getattr(cache, "C", None)
        self.lo = self.hi = 0

    @property
    def keys(self):
        return self.cache.keys[..., self.lo:self.hi, :]


class ShardedSelector(DecodeSelector):
    """A decode selector over a cache sharded by position on the ranks of ``comm``.

    Args:
      inner_factory: zero-argument callable returning a fresh :class:`DecodeSelector` that
        searches this rank's candidates (called now and once per new cache).  An
        :class:`ExactSelector` (``impl="xp"``) is replaced by an exact scan of the shard.  The
        inner's ``tail_bound``/``max_topk`` (dynamic k) become this selector's and apply to the
        merged selection; a dynamic non-exact inner is set to ``tail_bound=0`` (it returns its
        whole ranking up to the cap and, for LoRANN, how many keys it retrieved).
      comm: an mpi4py communicator (every rank calls the selector at the same steps).
      measure_recall: record recall of the merged selection against the exact top-k.
      dynamic_first: dynamic k: candidates per row in the first exchange (doubling after).

    Used by the sharded layers (:func:`topkattn.distributed.shard_decoding`), whose caches
    hold only this rank's positions; ``select`` returns a :class:`ShardedSelection`, calling
    the selector returns its ``idx``.
    """

    def __init__(self, inner_factory: Callable[[], DecodeSelector], comm: Any, *, measure_recall: bool = True,
                 dynamic_first: int = 32) -> None:
        super().__init__(measure_recall=False)  # recall is measured here, on the merged selection
        if not callable(inner_factory):
            raise TypeError(f"inner_factory must be a callable returning a DecodeSelector, "
                            f"got {type(inner_factory).__name__}")
        for name in ("Get_size", "Get_rank", "allgather", "Allgather"):
            if not hasattr(comm, name):
                raise TypeError(f"comm must be an mpi4py communicator, got {type(comm).__name__}")
        self.inner_factory = inner_factory
        self.comm = comm
        self.measure_sharded_recall = bool(measure_recall)
        self.dynamic_first = check_int("dynamic_first", dynamic_first, 1)
        self._view = None
        self.inner = self._new_inner()

    def _new_inner(self):
        inner = self.inner_factory()
        if not isinstance(inner, DecodeSelector):
            raise TypeError(f"inner_factory must return a DecodeSelector, got {type(inner).__name__}")
        if isinstance(inner, ShardedSelector):
            raise TypeError("inner_factory must return a single-shard selector, not a ShardedSelector")
        inner.measure_recall = False  # its shard-local recall means nothing; ours is global
        self.tail_bound, self.max_topk = inner.tail_bound, inner.max_topk  # dynamic k: decided after the merge
        self._exact = isinstance(inner, ExactSelector)
        self._scan = self._exact and inner.impl == "xp"  # the shard scanned here, exactly
        if inner.dynamic and not self._scan:
            inner.tail_bound, inner.max_topk = 0.0, None  # its whole ranking up to the cap, n_returned reported
        if self.prefilling:
            inner.begin_prefill()
        return inner

    # -- prefill ---------------------------------------------------------------------------
    def begin_prefill(self) -> None:
        super().begin_prefill()
        self.inner.begin_prefill()

    def end_prefill(self) -> None:
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
        self._view = _CandidateView(cache)
        self._norm_hi = 0  # candidate rows 0 .. _norm_hi - 1 are in _norm_max
        shape = cache.keys.shape[:-2]  # (B,) or (B, G)
        self._norm_max = np.zeros(shape + (3,))  # max |key|, |latent part|, |rope part|

    # -- the protocol ----------------------------------------------------------------------
    def __call__(self, query: Array, cache: _ShardedRows, *, topk: int, sinks: int = 0, window: int = 0,
                 scale: float = 1.0) -> Array:
        return self.select(query, cache, topk=topk, sinks=sinks, window=window, scale=scale).idx

    def select(self, query: Array, cache: _ShardedRows, *, topk: int, sinks: int = 0, window: int = 0,
               scale: float = 1.0) -> ShardedSelection:
        """The merged :class:`ShardedSelection` of one decode step (a collective call)."""
        topk, sinks, window = check_int("topk", topk, 1), check_int("sinks", sinks, 0), check_int("window", window, 0)
        if not isinstance(cache, _ShardedRows):
            raise TypeError(f"ShardedSelector needs a cache sharded by position (a layer converted with "
                            f"topkattn.distributed.shard_decoding), got {type(cache).__name__}")
        keys = cache.keys
        xp = get_array_module(query, keys)
        if query.ndim != 3 or keys.shape[0] != query.shape[0] or keys.shape[-1] != query.shape[-1]:
            raise ValueError(f"query must be (B, H, D) matching cache.keys {tuple(keys.shape)}, "
                             f"got shape {tuple(query.shape)}")
        if cache is not self._cache:
            self._cache = cache
            self._reset(cache)
        k_cap = (self.max_topk or topk) if self.dynamic else topk
        st = _Step(cache.n_rows, int(k_cap), int(sinks), int(window))
        B, H, _ = query.shape
        n, m = B * H, st.n_sel
        dynamic = self.dynamic and m > 0
        m_round = min(m, self.dynamic_first) if dynamic else m
        spec = [("lse_forced", (n,), np.float64)]
        if dynamic and not self._exact:
            spec += [("n_ret", (n,), np.int64), ("upper", (n,), np.float64)]
        error = fields = local = None
        try:
            local = self._local(query, cache, st, float(scale))
            fields = self._offer(local, m_round, st)
        except Exception as e:  # agreed in the exchange: no rank is left waiting
            error = e
        got = allgather_fields(self.comm, spec + _cand_spec(n, m_round, query.dtype, st), fields, error, xp)
        lse_f = logsumexp_rows(xp.moveaxis(got["lse_forced"], 0, -1))  # (n,) over the ranks
        vals, pos = _merge_ranked(got["cand_s"], got["cand_j"], m_round)  # (n, M) each
        certified = None
        if dynamic:
            n_cand = xp.full(n, st.n_cand, dtype=xp.int64)
            n_ret = n_cand if self._exact else got["n_ret"].sum(axis=0)
            while m_round < m:  # another round while a row may need more candidates than offered
                _, found, _, _, _ = choose_k(vals.astype(xp.float64), lse_f, n_cand, xp.minimum(n_ret, n_cand),
                                             self.tail_bound)
                if not bool((~found & (pos[:, -1] >= 0)).any()):
                    break
                m_round = min(m, 2 * m_round)
                error = fields = None
                try:
                    fields = self._offer(local, m_round, st)
                except Exception as e:  # agreed in the exchange
                    error = e
                got2 = allgather_fields(self.comm, _cand_spec(n, m_round, query.dtype, st), fields, error, xp)
                vals, pos = _merge_ranked(got2["cand_s"], got2["cand_j"], m_round)
            upper = None if self._exact else got["upper"].max(axis=0)
            k_row, certified, _, _ = dynamic_k_from_ranked(vals.astype(xp.float64), lse_f, n_cand,
                                                           tail_bound=self.tail_bound, max_topk=m_round,
                                                           n_ret=n_ret, outside_upper=upper)
            keep = xp.arange(m_round)[None, :] < k_row[:, None]
            ranked, pos = pos, xp.where(keep, pos, -1)
            vals = xp.where(keep, vals, -xp.inf)
            width = int(k_row.max()) if n else 0  # as in one process: the slots no row uses are dropped
            pos, vals = pos[:, :width], vals[:, :width]
        else:
            ranked = pos
            k_row = xp.full(n, st.k_fixed, dtype=xp.int64)
        sel = self._selection(query, cache, st, local, vals, pos, lse_f, k_row, certified)
        if not self.prefilling:
            self.stats.add_k(sel.k)
            if certified is not None:
                self.stats.add_certified(sel.certified)
            if self.measure_sharded_recall and m:
                truth = ranked if self._exact else self._exact_ranking(local, st, max(1, int(k_row.max())), xp)
                self.stats.add_recall(*_recall(sel.idx, truth, k_row, st, xp))
        return sel

    # -- this rank's part ------------------------------------------------------------------
    def _local(self, query, cache, st, scale):
        """This rank's forced scores, its candidates' ranking (scan or inner) and bookkeeping."""
        xp = get_array_module(query)
        keys = cache.keys
        B, H, _ = query.shape
        n = B * H
        lo, hi = cache.local_range(st.cand_lo, st.cand_hi)
        view = self._view
        view.lo, view.hi = lo, hi
        f_rows = xp.asarray(cache.local_rows(st.forced))  # (F,) -1 = not this rank's
        f_scores = _score_rows(query, keys, xp.broadcast_to(f_rows, (B, H, st.n_forced)), scale)  # (B, H, F)
        local = {"f_scores": f_scores, "lse_forced": logsumexp_rows(f_scores.reshape(n, -1)), "query": query,
                 "scale": scale, "lo": lo, "hi": hi}
        if self._scan:
            local["cand_s"], local["cand_j"] = self._scan_top(local, st.n_sel)
        else:
            local.update(self._inner_ranking(query, cache, st, scale))
        return local

    def _scan_top(self, local, m):
        """This rank's exact top ``m`` candidates: (scores (rows, m), global positions (rows, m)), -1 padded.

        :func:`topkattn.ops.selection.rank_decode_candidates` over the candidate rows lo .. hi - 1
        of the cache (the fused scan on NumPy), then the ``m`` chosen rows scored.
        """
        query, keys, lo, hi = local["query"], self._cache.keys, local["lo"], local["hi"]
        xp = get_array_module(query)
        B, H, _ = query.shape
        if hi <= lo or m == 0:
            return xp.full((B * H, m), -xp.inf, dtype=query.dtype), xp.full((B * H, m), -1, dtype=xp.int64)
        Sp = keys.shape[-2]
        bounds = RowBounds(Sp, 1, topk=m, causal=True, sinks=lo, window=Sp - hi)  # candidates: rows lo .. hi - 1
        rows = rank_decode_candidates(query, keys, bounds, m, local["scale"])  # (rows, m), -1 padded
        scores = _score_rows(query, keys, rows.reshape(B, H, m), local["scale"]).reshape(B * H, m)
        return scores, xp.where(rows >= 0, self._cache.positions_of(rows), -1)

    def _inner_ranking(self, query, cache, st, scale):
        """The inner selector's ranking of this rank's candidates, re-scored exactly."""
        xp = get_array_module(query)
        view = self._view
        B, H, _ = query.shape
        n, nv = B * H, view.hi - view.lo
        out = {"cand_s": xp.full((n, 0), -xp.inf, dtype=query.dtype), "cand_j": xp.full((n, 0), -1, xp.int64),
               "n_ret": xp.zeros(n, dtype=xp.int64), "upper": xp.full(n, -xp.inf)}
        if self.prefilling or nv:  # prefill: the inner records the queries its index trains on
            loc = self.inner(query, view, topk=st.bounds.n_sel if st.n_sel else 1, sinks=0, window=0, scale=scale)
            loc = loc.reshape(n, -1)  # (n, M') view rows in rank order, -1 padded
            got = loc >= 0
            s = _score_rows(query, view.keys, loc.reshape(B, H, -1), scale).reshape(n, -1)
            out["cand_s"] = xp.where(got, s, -xp.inf)
            out["cand_j"] = xp.where(got, cache.positions_of(loc + view.lo), -1)
            out["n_ret"] = self._returned(got, nv, n, xp)
        if self.dynamic and nv:
            out["upper"] = xp.where(out["n_ret"] < nv, self._outside_upper(query, view, scale).reshape(n), -xp.inf)
        return out

    def _returned(self, got, nv, n, xp):
        """(n,) candidates the inner ranked on this rank: every one it scored (LoRANN reports
        how many it retrieved; an exact ranking covers all ``nv``), else those it returned."""
        if self.prefilling:
            return xp.full(n, nv, dtype=xp.int64)  # prefill selects exactly
        info = getattr(self.inner, "last_info", None)
        if isinstance(self.inner, LorannSelector) and isinstance(info, dict) and self.inner.dynamic:
            if info.get("n_returned") is None:  # every candidate fit: an exact selection
                return xp.full(n, nv, dtype=xp.int64)
            return xp.asarray(info["n_returned"]).reshape(n).astype(xp.int64)
        return got.sum(axis=1).astype(xp.int64)

    def _outside_upper(self, query, view, scale):
        """(B, H) upper bound on the score of any of this rank's candidates (Cauchy-Schwarz, over
        the whole key and over its latent and rope parts; relative slack 1e-5 for rounding)."""
        new = to_numpy(view.keys[..., self._norm_hi:, :]).astype(np.float64)  # the rows new since the last call
        if new.shape[-2]:
            C = view.C
            parts = [new] + ([new[..., :C], new[..., C:]] if C is not None and 0 < C < new.shape[-1] else [])
            for i, a in enumerate(parts):
                self._norm_max[..., i] = np.maximum(self._norm_max[..., i], np.linalg.norm(a, axis=-1).max(-1))
            if len(parts) == 1:
                self._norm_max[..., 1:] = np.inf
            self._norm_hi = view.hi - view.lo
        q = to_numpy(query).astype(np.float64)  # (B, H, D)
        B, H, D = q.shape
        nm = self._norm_max.reshape(B, -1, 3)  # (B, G, 3)
        grp = np.arange(H) // (H // nm.shape[1])
        nm = nm[:, grp]  # (B, H, 3)
        bound = np.linalg.norm(q, axis=-1) * nm[..., 0]
        C = view.C
        if C is not None and 0 < C < D and np.isfinite(nm[..., 1:]).all():
            split = np.linalg.norm(q[..., :C], axis=-1) * nm[..., 1] + np.linalg.norm(q[..., C:], axis=-1) * nm[..., 2]
            bound = np.minimum(bound, split)
        return get_array_module(query).asarray(bound * abs(scale) * (1 + 1e-5))

    def _offer(self, local, m, st):
        """The fields this rank sends: its top ``m`` candidates (scores, global positions), -1 padded."""
        fields = {"lse_forced": local["lse_forced"]}
        if "n_ret" in local:
            fields.update(n_ret=local["n_ret"], upper=local["upper"])
        s, j = _pad(local["cand_s"][:, :m], local["cand_j"][:, :m], m)
        fields.update(cand_s=s, cand_j=j)
        return fields

    def _exact_ranking(self, local, st, m, xp):
        """(n, m) the exact global ranking of the candidates (one more exchange): recall's truth."""
        n = local["lse_forced"].shape[0]
        s, j = self._scan_top(local, m)
        got = allgather_fields(self.comm, _cand_spec(n, m, s.dtype, st), {"cand_s": s, "cand_j": j}, None, xp)
        return _merge_ranked(got["cand_s"], got["cand_j"], m)[1]

    def _selection(self, query, cache, st, local, vals, pos, lse_f, k_row, certified):
        xp = get_array_module(query)
        B, H, _ = query.shape
        F, m = st.n_forced, vals.shape[1]
        idx = xp.full((B, H, F + m), -1, dtype=xp.int64)
        idx[..., :F] = xp.asarray(st.forced)
        idx[..., F:] = pos.reshape(B, H, m)
        scores = xp.concatenate([local["f_scores"], vals.reshape(B, H, m).astype(query.dtype)], axis=-1)
        with np.errstate(invalid="ignore"):  # a NaN score makes the row's lse NaN (its output NaN)
            lse = np.logaddexp(to_numpy(lse_f), to_numpy(logsumexp_rows(vals))) if m else to_numpy(lse_f)
        return ShardedSelection(idx, cache.local_rows(idx), scores, xp.asarray(lse).reshape(B, H),
                                k_row.reshape(B, H), None if certified is None else certified.reshape(B, H))


def merged_lse(comm: Any, local: Callable[[], Array], n: int, xp: Any = np) -> Array:
    """(n,) float64: the logsumexp over every rank of ``local()`` (n,) (this rank's logsumexp per
    row, -inf where it has no key).  One Allgather of 8 + 8 n bytes; an exception raised by
    ``local`` on any rank is raised on every rank."""
    error = fields = None
    try:
        fields = {"lse": local()}
    except Exception as e:  # agreed in the exchange
        error = e
    got = allgather_fields(comm, [("lse", (n,), np.float64)], fields, error, xp)
    return logsumexp_rows(xp.moveaxis(got["lse"], 0, -1))


def check_block_sharding(block: int, block_size: int) -> None:
    """ValueError unless the sharding ``block`` is a multiple of a block layer's ``block_size``
    (then every selection block lives on one rank)."""
    if block % block_size:
        raise ValueError(f"block (the sharding block, positions dealt round-robin) must be a multiple of the "
                         f"layer's block_size={block_size} so that each selection block lives on one rank, "
                         f"got block={block}")


def select_blocks_sharded(comm: Any, query: Array, cache: _ShardedRows, *, block_size: int, topk_blocks: int,
                          scale: float) -> tuple[ShardedSelection, Array]:
    """``(selection, blocks (B, H, Kb))`` of one block top-k decode step over a sharded cache
    (a collective call; see the module docstring).

    query (B, H, D) sits at the last cached position S - 1; ``cache.block_means`` holds this
    rank's blocks.  ``blocks``: own block first, then the others in rank order (-1 empty), equal
    on every rank and to :func:`topkattn.layers.cache.select_block_step` in one process;
    ``selection.idx`` (B, H, K) their global positions, ``scores`` scaled by ``scale``.
    """
    if not isinstance(cache, _ShardedRows):
        raise TypeError(f"select_blocks_sharded needs a cache sharded by position, got {type(cache).__name__}")
    state = cache.block_means
    if state is None or state.block_size != block_size:
        raise ValueError("cache has no block state for this layer's block_size: make it with the sharded layer's "
                         "init_cache")
    check_block_sharding(cache.block, block_size)
    keys = cache.keys
    xp = get_array_module(query, keys)
    B, H, D = query.shape
    n, S = B * H, cache.n_rows
    kg = grouped_keys(keys, H)  # (B, G, Sp, D)
    G = kg.shape[1]
    bounds = BlockBounds(S, 1, block_size=block_size, topk_blocks=topk_blocks, causal=True)
    m, own = bounds.m, int(bounds.own[0])
    blocks = xp.full((B, H, bounds.n_sel), -1, dtype=xp.int64)
    blocks[..., 0] = own
    error = fields = None
    try:
        means = state.update(kg)  # (B, G, Nl, D): this rank's blocks, in position order
        if m:
            n_mine = int(owned_below(own * block_size, cache.rank, cache.ranks, cache.block)) // block_size
            fields = {"cand_s": xp.full((n, m), -xp.inf, dtype=query.dtype),
                      "cand_j": xp.full((n, m), -1, dtype=xp.int64)}  # a rank with no candidate block offers none
            if n_mine:  # this rank's candidate blocks: its first n_mine (global block indices ids)
                ids = xp.asarray(cache.positions_of(np.arange(n_mine, dtype=np.int64) * block_size) // block_size)
                qg = query.reshape(B, G, H // G, D)
                gate = xp.matmul(qg, means[:, :, :n_mine].swapaxes(-1, -2)).reshape(n, n_mine)  # unscaled q . mean
                cols = ranked_topm_xp(gate, xp.ones(gate.shape, dtype=bool), m)  # (n, m), -1 padded
                c = xp.maximum(cols, 0)
                fields = {"cand_s": xp.where(cols >= 0, xp.take_along_axis(gate, c, axis=1), -xp.inf),
                          "cand_j": xp.where(cols >= 0, ids[c], -1)}
    except Exception as e:  # agreed in the next exchange: no rank is left waiting
        error = e
    if m:  # one Allgather of every rank's best Kb - 1 blocks
        spec = [("cand_s", (n, m), query.dtype), ("cand_j", (n, m), np.int32 if S < 2**31 else np.int64)]
        got = allgather_fields(comm, spec, fields, error, xp)
        blocks[..., 1:] = _merge_ranked(got["cand_s"], got["cand_j"], m)[1].reshape(B, H, m)
    idx = expand_blocks(blocks[:, :, None], bounds)[:, :, 0]  # (B, H, K) global positions
    rows = cache.local_rows(idx)
    scores = None

    def local_lse():
        nonlocal scores
        if error is not None:  # Kb = 1: no candidate exchange ran
            raise error
        scores = _score_rows(query, keys, rows, scale)  # (B, H, K), -inf where another rank's
        return logsumexp_rows(scores.reshape(n, -1))

    lse = merged_lse(comm, local_lse, n, xp).reshape(B, H)
    sel = ShardedSelection(idx, rows, scores, lse, (idx >= 0).sum(axis=-1), None)
    return sel, blocks


def _cand_spec(n, m, dtype, st):
    return [("cand_s", (n, m), dtype), ("cand_j", (n, m), st.pos_dtype)]


def _pad(s, j, m):
    xp = get_array_module(s)
    pad = m - s.shape[1]
    if pad:
        s = xp.concatenate([s, xp.full((s.shape[0], pad), -xp.inf, dtype=s.dtype)], axis=1)
        j = xp.concatenate([j, xp.full((j.shape[0], pad), -1, dtype=j.dtype)], axis=1)
    return s, j


def _merge_ranked(scores, pos, m):
    """The global top ``m`` of every row from the ranks' candidates (ranks, rows, M):
    ``(vals, positions)`` (rows, m) in rank order (score descending, ties to the lower position,
    NaN on top), -inf / -1 padded.  The rule of
    :func:`topkattn.distributed.context_parallel.merge_candidates`, with the scores kept."""
    xp = get_array_module(scores, pos)
    P, n_rows, M = scores.shape
    s = scores.transpose(1, 0, 2).reshape(n_rows, P * M)
    j = pos.astype(xp.int64).transpose(1, 0, 2).reshape(n_rows, P * M)
    by_pos = xp.argsort(xp.where(j >= 0, j, np.iinfo(np.int64).max), axis=-1, kind="stable")  # ties: lower pos
    s, j = xp.take_along_axis(s, by_pos, axis=-1), xp.take_along_axis(j, by_pos, axis=-1)
    cols = ranked_topm_xp(s, j >= 0, m)
    got = cols >= 0
    c = xp.maximum(cols, 0)
    vals = xp.where(got, xp.take_along_axis(s, c, axis=-1), -xp.inf)
    return vals, xp.where(got, xp.take_along_axis(j, c, axis=-1), -1)


def _score_rows(query, keys, rows, scale):
    """(B, H, M) exact scores of key rows ``rows`` (B, H, M) (-1: none, -inf) for each head's query.

    The product of :func:`topkattn.ops.selection.decode_scores` (query times scale, then one
    matrix product per (b, g) over the rows any head of the group asked for).
    """
    xp = get_array_module(query, keys)
    B, H, D = query.shape
    kg = grouped_keys(keys, H)  # (B, G, Sp, D)
    G = kg.shape[1]
    rep = H // G
    qg = query.reshape(B, G, rep, D) * query.dtype.type(scale)
    out = xp.full(rows.shape, -xp.inf, dtype=query.dtype)
    for b in range(B):
        for g in range(G):
            p = rows[b, g * rep:(g + 1) * rep]  # (rep, M)
            valid = p >= 0
            if not bool(valid.any()):
                continue
            uniq, inv = xp.unique(p[valid], return_inverse=True)
            t = qg[b, g] @ kg[b, g][uniq].T  # (rep, U)
            cols = xp.zeros(p.shape, dtype=xp.int64)
            cols[valid] = inv.reshape(-1)
            out[b, g * rep:(g + 1) * rep] = xp.where(valid, xp.take_along_axis(t, cols, axis=1), -xp.inf)
    return out


def _recall(idx, truth, k_row, st, xp):
    """(hits, wanted, rank_hits, rank_wanted) of the merged ``idx`` against the exact ranking
    ``truth`` (rows, M): the bookkeeping of :func:`topkattn.decoding.selectors.recall_hits`."""
    B, H, K = idx.shape
    m = K - st.n_forced
    wanted = xp.minimum(xp.asarray(k_row).reshape(B * H), st.n_cand)
    truth = _pad(xp.zeros((B * H, truth.shape[1])), truth, m)[1] if truth.shape[1] < m else truth[:, :m]
    sel = idx.reshape(B * H, K)[:, st.n_forced:]  # (rows, K')
    sought = xp.arange(m)[None, :] < wanted[:, None]
    top = xp.where(sought, truth, -2)
    found = ((top[:, :, None] == sel[:, None, :]) & (sel[:, None, :] >= 0)).any(axis=2)  # (rows, K')
    return found.sum(axis=1), wanted, found.sum(axis=0), sought.sum(axis=0)


def sharded_selector_factory(make_selectors: Callable[[int], Sequence[DecodeSelector]], comm: Any = None,
                             **options: Any) -> Callable[[int], list[ShardedSelector]]:
    """Wrap ``make_selectors(batch_number) -> [selector per layer]`` (e.g.
    :func:`topkattn.decoding.runner.selector_factory`) so each layer's selector searches this
    rank's shard: ``make(batch_number) -> [ShardedSelector per layer]``.  ``comm``: default
    ``MPI.COMM_WORLD``; ``options`` go to :class:`ShardedSelector`."""
    if not callable(make_selectors):
        raise TypeError(f"make_selectors must be callable, got {type(make_selectors).__name__}")
    comm = require_mpi().COMM_WORLD if comm is None else comm

    def make(batch_no):
        return [ShardedSelector(lambda s=s: s, comm, **options) for s in make_selectors(batch_no)]

    return make


__all__ = ["ShardedSelection", "ShardedSelector", "check_block_sharding", "merged_lse", "select_blocks_sharded",
           "shard_positions", "sharded_selector_factory"]
