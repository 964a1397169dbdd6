"""The decode-selection protocol and its selectors: exact, simulated recall (LoRANN: lorann.py).

Shape letters: B batch, H query heads, G KV heads, S cached keys (persistent rows
first), D key dim (C + R for MLA), K index slots per query (forced + selected), K' selected
slots, F forced slots, M ranked candidates per row (``m`` in code).

**The protocol** (one for every decode-time selection policy).  A layer's ``step`` calls

    selector(query, cache, *, topk, sinks, window, scale) -> idx (B, H, K) int64

with query (B, H, D) and ``cache.keys`` (B, S, D) (MLA latents, shared by all heads) or
(B, G, S, D); ``topk`` an int >= 1 (a dynamic-k layer passes its cap), ``sinks`` and
``window`` ints >= 0 (checked once, in :meth:`DecodeSelector.__call__`, for every selector
here).  The query sits at position S - 1 and sees every cached key.  ``idx`` holds
the forced keys (sinks, window) first, then the selected ones, -1 padded (the rule of
:mod:`topkattn.ops.selection`).  A layer whose ``selector`` is None selects exactly with
:func:`topkattn.ops.selection.select_decode`; the selectors here are :class:`DecodeSelector`
subclasses that add prefill hooks (``begin_prefill``/``end_prefill``) and ``stats``.
A new decode-time policy subclasses :class:`DecodeSelector` and implements ``_select``.

Every selector here records, per decode step, the k it chose and its recall against
exact top-k (the fraction of the exact top-k_row keys it selected, k_row being the
number it meant to select); ``stats`` sums them.  Between :meth:`begin_prefill` and
:meth:`end_prefill` a selector selects exactly (the prompt is processed as exact top-k
attention) and records the absorbed queries, which an index trains on.

Dynamic k: with ``tail_bound=eps`` a selector picks per row the smallest k whose
left-out softmax mass is at most eps (see :mod:`topkattn.ops.dynamic_k`), capped at
``max_topk`` (default: the layer's ``topk``).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from topkattn.backend import Array, get_array_module, to_numpy
from topkattn.checks import check_bool, check_choice, check_int, check_real, logsumexp_rows, make_rng
from topkattn.ops.selection import RowBounds, apply_forgetting, grouped_keys, rank_decode_candidates, select_decode


class DecodeStats:
    """Running totals of a selector's decode steps (prefill steps are not counted).

    ``rows``: (step, batch, head) rows seen; ``k_hist[k]``: rows that chose k keys
    (besides forced ones); ``hits``/``wanted``: exact top-k keys found / sought;
    ``certified``: rows whose left-out mass bound is certified (dynamic k only).
    """

    def __init__(self) -> None:
        self.rows = 0
        self.hits = 0
        self.wanted = 0
        self.rank_hits = np.zeros(0, dtype=np.int64)  # [r]: rows whose exact rank-r key was selected
        self.rank_wanted = np.zeros(0, dtype=np.int64)  # [r]: rows that sought an exact rank-r key
        self.certified = 0
        self.dynamic_rows = 0
        self.k_hist = np.zeros(1, dtype=np.int64)

    def add_k(self, k_row: Array) -> None:
        k = to_numpy(k_row).astype(np.int64).ravel()
        self.rows += k.size
        if k.size:
            h = np.bincount(k)
            if len(h) > len(self.k_hist):
                self.k_hist = np.concatenate([self.k_hist, np.zeros(len(h) - len(self.k_hist), np.int64)])
            self.k_hist[:len(h)] += h

    def add_recall(self, hits: Array, wanted: Array, rank_hits: Array | None = None,
                   rank_wanted: Array | None = None) -> None:
        self.hits += int(to_numpy(hits).sum())
        self.wanted += int(to_numpy(wanted).sum())
        if rank_hits is not None:
            self.rank_hits = _add_padded(self.rank_hits, to_numpy(rank_hits))
            self.rank_wanted = _add_padded(self.rank_wanted, to_numpy(rank_wanted))

    def add_certified(self, certified: Array) -> None:
        c = to_numpy(certified)
        self.certified += int(c.sum())
        self.dynamic_rows += c.size

    def merge(self, other: DecodeStats) -> DecodeStats:
        self.rows += other.rows
        self.hits += other.hits
        self.wanted += other.wanted
        self.certified += other.certified
        self.dynamic_rows += other.dynamic_rows
        n = max(len(self.k_hist), len(other.k_hist))
        h = np.zeros(n, np.int64)
        h[:len(self.k_hist)] += self.k_hist
        h[:len(other.k_hist)] += other.k_hist
        self.k_hist = h
        self.rank_hits = _add_padded(self.rank_hits, other.rank_hits)
        self.rank_wanted = _add_padded(self.rank_wanted, other.rank_wanted)
        return self

    @property
    def recall_by_rank(self) -> list[float | None]:
        """[r]: fraction of the rows seeking their exact rank-r key (0 = best) that selected it."""
        return [float(h / w) if w else None for h, w in zip(self.rank_hits, self.rank_wanted)]

    @property
    def recall(self) -> float:
        """Fraction of the exact top-k keys that were selected (1.0 when none were sought)."""
        return self.hits / self.wanted if self.wanted else 1.0

    @property
    def mean_k(self) -> float:
        return float((self.k_hist * np.arange(len(self.k_hist))).sum() / self.rows) if self.rows else 0.0

    @property
    def certified_fraction(self) -> float | None:
        return self.certified / self.dynamic_rows if self.dynamic_rows else None

    def k_quantiles(self, qs: Sequence[float] = (0.1, 0.5, 0.9)) -> list[int]:
        """Quantiles of the chosen k (from the histogram)."""
        if not self.rows:
            return [0 for _ in qs]
        c = np.cumsum(self.k_hist)
        return [int(np.searchsorted(c, q * self.rows, side="left")) for q in qs]

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "recall": self.recall, "mean_k": self.mean_k,
                "certified_fraction": self.certified_fraction, "recall_by_rank": self.recall_by_rank,
                "k_hist": {int(k): int(n) for k, n in enumerate(self.k_hist) if n}}


def _add_padded(a, b):
    n = max(len(a), len(b))
    out = np.zeros(n, dtype=np.int64)
    out[:len(a)] += a
    out[:len(b)] += b
    return out


class DecodeSelector:
    """Base of the stateful selectors: prefill handling, dynamic-k options, recall bookkeeping.

    Subclasses implement ``_select(query, keys, cache, ctx) -> (idx, k_row, certified)``
    with k_row (B, H) the number of keys each row meant to select (certified None
    unless dynamic k).
    """

    selects_exactly = False  # True: the selection is the exact ranking itself (recall 1 without a re-rank)

    def __init__(self, *, tail_bound: float | None = None, max_topk: int | None = None,
                 measure_recall: bool = True) -> None:
        if max_topk is not None and tail_bound is None:
            raise ValueError("max_topk applies only with tail_bound (dynamic k)")
        self.tail_bound = None if tail_bound is None else check_real("tail_bound", tail_bound, 0.0, 1.0, hi_open=True)
        self.max_topk = check_int("max_topk", max_topk, 1, optional=True)
        self.measure_recall = check_bool("measure_recall", measure_recall)
        self.prefilling = False
        self.stats = DecodeStats()
        self._cache = None
        self._ctx = None

    @property
    def dynamic(self) -> bool:
        return self.tail_bound is not None

    def begin_prefill(self) -> None:
        """Select exactly and record queries until :meth:`end_prefill`."""
        self.prefilling = True

    def end_prefill(self) -> None:
        """Leave prefill; subclasses build their index here."""
        self.prefilling = False

    def reset_stats(self) -> None:
        self.stats = DecodeStats()

    def __call__(self, query: Array, cache: Any, *, topk: int, sinks: int = 0, window: int = 0,
                 scale: float = 1.0) -> Array:
        topk = check_int("topk", topk, 1)
        sinks = check_int("sinks", sinks, 0)
        window = check_int("window", window, 0)
        keys = cache.keys
        xp = get_array_module(query, keys)
        if query.ndim != 3:
            raise ValueError(f"query must be (B, H, D), got shape {tuple(query.shape)}")
        if keys.ndim not in (3, 4) or keys.shape[0] != query.shape[0] or keys.shape[-1] != query.shape[-1]:
            raise ValueError(f"cache.keys must be (B, S, D) or (B, G, S, D) matching query "
                             f"{tuple(query.shape)}, got {tuple(keys.shape)}")
        if cache is not self._cache:
            self._cache = cache
            self._reset(cache)
        k_cap = (self.max_topk or topk) if self.dynamic else topk
        self._ctx = ctx = _Context(S=keys.shape[-2], topk=topk, k_cap=k_cap, sinks=sinks, window=window,
                                   scale=float(scale), xp=xp)
        if self.prefilling:
            self._observe(query, cache, ctx)
            idx, _, _ = exact_select(query, keys, ctx, tail_bound=self.tail_bound)
            return idx
        self._observe(query, cache, ctx)
        idx, k_row, certified = self._select(query, keys, cache, ctx)
        self.stats.add_k(k_row)
        if certified is not None:
            self.stats.add_certified(certified)
        if self.measure_recall:
            measure = exact_recall if self.selects_exactly else recall_hits
            hits, wanted, rank_hits, rank_wanted = measure(query, keys, idx, k_row, ctx, by_rank=True)
            self.stats.add_recall(hits, wanted, rank_hits, rank_wanted)
        return idx

    # -- hooks -------------------------------------------------------------------------
    def _reset(self, cache):
        """A new cache (a new decode) begins."""

    def _observe(self, query, cache, ctx):
        """See every query (prefill and decode)."""

    def _select(self, query, keys, cache, ctx):
        raise NotImplementedError


class _Context:
    """The geometry of one decode step (row at position S - 1)."""

    def __init__(self, *, S, topk, k_cap, sinks, window, scale, xp):
        self.S, self.topk, self.k_cap = S, topk, k_cap
        self.sinks, self.window, self.scale, self.xp = sinks, window, scale, xp
        self.bounds = RowBounds(S, 1, topk=k_cap, causal=True, sinks=sinks, window=window)
        self.n_forced = self.bounds.n_sink + self.bounds.n_win
        # candidates: keys sinks .. cand_end - 1 (the window is the keys cand_end .. S - 1)
        self.n_cand = int(self.bounds.n_candidates()[0])
        self.cand_end = min(sinks, S) + self.n_cand
        self.k_fixed = min(self.bounds.n_sel, self.n_cand)  # keys a fixed-k row selects


class ExactSelector(DecodeSelector):
    """Exact top-k (or exact dynamic k) at every step, with the bookkeeping of the base.

    ``impl``: "xp" (NumPy/CuPy, :func:`topkattn.ops.selection.select_decode`) or "cuda" (the
    kernels of :mod:`topkattn.cuda.mla_decode`, same rule; CuPy arrays on a GPU, NumPy under
    the simulator; an MLA latent cache (B, S, C + R) and a fixed k only).
    """

    selects_exactly = True  # its recall is 1 by construction: no second pass to measure it

    def __init__(self, *, impl: str = "xp", tail_bound: float | None = None, max_topk: int | None = None,
                 measure_recall: bool = True) -> None:
        super().__init__(tail_bound=tail_bound, max_topk=max_topk, measure_recall=measure_recall)
        self.impl = check_choice("impl", impl, ("xp", "cuda"))
        if impl == "cuda" and self.dynamic:
            raise ValueError("impl='cuda' selects a fixed k; dynamic k (tail_bound) runs with impl='xp'")

    def _select(self, query, keys, cache, ctx):
        if self.impl == "xp":
            return exact_select(query, keys, ctx, tail_bound=self.tail_bound)
        if keys.ndim != 3:
            raise ValueError(f"impl='cuda' needs an MLA latent cache (B, S, C + R), got cache.keys of shape "
                             f"{tuple(keys.shape)}")
        from topkattn.cuda.mla_decode import mla_select  # importing numba.cuda is deferred to first use

        idx = mla_select(query, keys, topk=ctx.k_cap, scale=ctx.scale, sinks=ctx.sinks, window=ctx.window)
        B, H, _ = query.shape
        return idx, ctx.xp.full((B, H), ctx.k_fixed, dtype=ctx.xp.int64), None


class SimulatedRecallSelector(DecodeSelector):
    """An ANN of recall ``recall`` simulated by forgetful masking of the exact ranking.

    Each of the exact top-k keys is dropped with probability 1 - recall and the freed
    slots are refilled in rank order from the keys ranked k + 1, k + 2, ... -- the rule
    of training-time forgetful masking (:func:`topkattn.ops.selection.apply_forgetting`).
    ``seed``: int or numpy Generator; every step draws (B*H, K') from it.
    """

    def __init__(self, recall: float, *, seed: int | np.random.Generator | None = 0,
                 measure_recall: bool = True) -> None:
        super().__init__(measure_recall=measure_recall)
        self.recall = check_real("recall", recall, 0.0, 1.0, lo_open=True)
        self.rng = make_rng(seed)

    def _select(self, query, keys, cache, ctx):
        xp = ctx.xp
        B, H, _ = query.shape
        n_sel = ctx.bounds.n_sel
        idx, _, _ = exact_select(query, keys, ctx, tail_bound=None)
        k_row = xp.full((B, H), ctx.k_fixed, dtype=xp.int64)
        if n_sel == 0 or self.recall >= 1.0:
            return idx, k_row, None
        drop = self.rng.random((B * H, n_sel)) < (1.0 - self.recall)  # host draws
        m = n_sel + int(drop.sum(axis=1).max(initial=0))
        ranked = rank_decode_candidates(query, keys, ctx.bounds, m, ctx.scale)  # (B*H, m)
        sel = apply_forgetting(ranked, xp.asarray(drop), n_sel)  # (B*H, n_sel)
        idx = idx.copy()
        idx[..., ctx.n_forced:] = sel.reshape(B, H, n_sel)
        return idx, k_row, None


# -- shared helpers -----------------------------------------------------------------------
def exact_select(query: Array, keys: Array, ctx: _Context, *,
                 tail_bound: float | None = None) -> tuple[Array, Array, Array | None]:
    """Exact selection of one decode step: ``(idx (B, H, K), k_row (B, H), certified or None)``.

    :func:`topkattn.ops.selection.select_decode` with the step's geometry, capped at ``ctx.k_cap``.
    """
    return select_decode(query, keys, topk=ctx.k_cap, sinks=ctx.sinks, window=ctx.window, scale=ctx.scale,
                         tail_bound=tail_bound)


def recall_hits(query: Array, keys: Array, idx: Array, k_row: Array, ctx: _Context,
                by_rank: bool = False) -> tuple[Array, ...]:
    """Per row, how many of the exact top-k_row candidates ``idx`` selected: (hits, wanted), (B*H,).

    ``idx`` (B, H, K) with the forced prefix first; k_row (B, H) the keys the row meant to
    select.  Ranks come from the exact scores (ties to the lower index).  ``by_rank`` also
    returns, per exact rank r (M,), the rows that selected their rank-r key and the rows
    that sought one.
    """
    xp = ctx.xp
    B, H, K = idx.shape
    m = K - ctx.n_forced
    wanted = xp.minimum(xp.asarray(k_row).reshape(B * H), ctx.n_cand)
    if m <= 0:
        zero = xp.zeros(B * H, dtype=xp.int64)
        return (zero, wanted, xp.zeros(0, xp.int64), xp.zeros(0, xp.int64)) if by_rank else (zero, wanted)
    ranked = rank_decode_candidates(query, keys, ctx.bounds, m, ctx.scale)  # (B*H, m)
    sel = idx.reshape(B * H, K)[:, ctx.n_forced:]  # (B*H, m)
    sought = xp.arange(m)[None, :] < wanted[:, None]  # (B*H, m): exact ranks the row seeks
    top = xp.where(sought, ranked, -2)  # the exact top-k_row, -2 = none
    found = ((top[:, :, None] == sel[:, None, :]) & (sel[:, None, :] >= 0)).any(axis=2)  # (B*H, m)
    hits = found.sum(axis=1)
    if by_rank:
        return hits, wanted, found.sum(axis=0), sought.sum(axis=0)
    return hits, wanted


def exact_recall(query: Array, keys: Array, idx: Array, k_row: Array, ctx: _Context,
                 by_rank: bool = False) -> tuple[Array, ...]:
    """:func:`recall_hits` of a selection that is the exact ranking itself: every sought key found.

    Same returns, without scoring the cache again (an exact decode step reads it once, not twice).
    """
    xp = ctx.xp
    B, H, K = idx.shape
    m = max(K - ctx.n_forced, 0)
    wanted = xp.minimum(xp.asarray(k_row).reshape(B * H), ctx.n_cand)
    sought = xp.arange(m)[None, :] < wanted[:, None]  # (B*H, m): exact ranks the row seeks
    hits = sought.sum(axis=1)
    if by_rank:
        return hits, wanted, sought.sum(axis=0), sought.sum(axis=0)
    return hits, wanted


def forced_scores_lse(query: Array, keys: Array, ctx: _Context) -> Array:
    """(B*H,) logsumexp of each row's forced-key scores (-inf when there are none)."""
    xp = ctx.xp
    B, H, _ = query.shape
    forced = ctx.bounds.forced_indices()[0]  # (F,)
    forced = forced[forced >= 0]
    if forced.size == 0:
        return xp.full(B * H, -xp.inf)
    kg = grouped_keys(keys, H)
    grp = xp.arange(H) // (H // kg.shape[1])  # (H,) KV head of each query head
    kf = kg[:, :, xp.asarray(forced)]  # (B, G, F, D)
    s = (kf[:, grp] * query[:, :, None, :]).sum(-1) * ctx.scale  # (B, H, F)
    return logsumexp_rows(s.reshape(B * H, -1))
