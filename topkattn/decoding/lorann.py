"""LoRANN-backed decode selection over the MLA latent cache.

Shape letters: B batch, H query heads, S cached keys (P persistent rows first), D = C + R
(latent + rope dims), K' selected slots (``topk``; forced keys are not looked up), M candidates
fetched from the index per row (``m`` in code), N indexed keys (the ANN index's points).

With weight absorption the score of head h for key j is scale * q_h . [c_j ; kr_j] where
q_h = [W_UK_h^T q_nope_h ; q_rope_h] (see :mod:`topkattn.layers.mla`), so **one** maximum
inner product index over the cached rows [c_j ; kr_j] serves every head.  This selector
keeps one :class:`topkattn.ann.LorannIndex` per batch element (per layer: one selector per
layer) and per step:

1. grows the index with the keys that became candidates (``add``): a key enters once it
   is neither a sink (persistent token) nor inside the sliding window -- forced keys are
   attended exactly and never looked up, so the index holds exactly the candidates;
2. asks the index for each head's ``max(K', points_to_rerank)`` best keys, re-scores the
   returned keys exactly (in the cache's dtype) and keeps the top K' (ties to the lower
   index) -- or, with ``tail_bound``, the dynamic k of :mod:`topkattn.ops.dynamic_k`,
   certified with a Cauchy-Schwarz bound on the keys the index did not return.

Index life cycle: prefill (between ``begin_prefill``/``end_prefill``) selects exactly and
records the absorbed queries; ``end_prefill`` builds the index over the prompt's candidate
latents once, training its regressions on those queries (queries and keys come from
different distributions).  :meth:`LorannSelector.prefill` does the same in one call for a
prompt whose queries were computed elsewhere (a batched forward).  Later steps ``add`` keys;
the index keeps itself fit as it grows, without ever stopping a step for a rebuild: a
cluster grown past ``refit_growth`` is refit, and one grown past ``split_factor`` times the
target cluster size (sqrt(N), or N / n_clusters) is split in two by 2-means, both in the
index's background maintenance thread while searches go on with the old model
(``background``; without it, inside the step that makes them due; see
:class:`topkattn.ann.LorannIndex`).  ``refit_factor`` instead rebuilds
the index from scratch whenever it has grown by that factor (re-clustered, trained on the
recent queries; the step that triggers it waits for the build).  Rows with at most K'
candidates need no search and take every candidate.

Defaults (measured in ``benchmarks/bench_long_decode.py``): sqrt(N) clusters, rank 32,
8-bit models, ``clusters_to_search="auto"`` (:func:`auto_clusters_to_search`: the clusters
holding about max(8192, 16 sqrt(N)) keys, so the scanned fraction of the keys falls as the
context grows) and ``points_to_rerank="auto"`` (2 K' candidates re-ranked exactly).
"""
from __future__ import annotations

import contextlib
import math
import numbers
from typing import Any

import numpy as np

from topkattn.ann import LorannIndex
from topkattn.backend import Array, get_array_module, to_numpy
from topkattn.checks import check_bool, check_choice, check_int, check_real
from topkattn.decoding.selectors import DecodeSelector, _Context, exact_select, forced_scores_lse
from topkattn.ops.dynamic_k import dynamic_k_from_ranked
from topkattn.ops.selection import ranked_topm_xp

AUTO_MIN_POINTS = 8192  # clusters_to_search="auto": scan about max(this, ...
AUTO_POINTS_PER_ROOT = 16  # ... this * sqrt(N)) keys per query
AUTO_RERANK_FACTOR = 2  # points_to_rerank="auto": this many times K' candidates re-ranked exactly


def auto_clusters_to_search(n_clusters: int, n_points: int) -> int:
    """Clusters probed per query by ``clusters_to_search="auto"``: enough clusters of the mean
    size to scan max(AUTO_MIN_POINTS, AUTO_POINTS_PER_ROOT * sqrt(N)) keys, at least 1, at most
    n_clusters.  The scanned fraction falls as the index grows (every cluster below ~8k keys,
    3% at 1M in 1000 clusters): measured on MLA latents (benchmarks/bench_long_decode.py),
    recall@64 at a fixed probe count rises with N, as the best keys concentrate in fewer,
    larger clusters -- 48 of 132 clusters at 16k, 24 of 270 at 64k and 16 of 552 at 256k each
    gave about 0.93 with rank 32 and 128 re-ranked."""
    want = max(AUTO_MIN_POINTS, AUTO_POINTS_PER_ROOT * math.sqrt(n_points))
    mean = n_points / max(n_clusters, 1)
    return max(1, min(n_clusters, math.ceil(want / max(mean, 1.0))))


class LorannSelector(DecodeSelector):
    """Top-k (or dynamic k) decode selection through a LoRANN index per batch element.

    Args:
      n_clusters: clusters per index at a build, or None for ceil(sqrt(N)) (always capped at N).
      clusters_to_search: clusters probed per query: an int, a float in (0, 1] for that
        fraction of the clusters (rounded up), or "auto" (the default,
        :func:`auto_clusters_to_search`).
      points_to_rerank: candidates re-ranked exactly inside the index (0: approximate
        scores only), or "auto" (AUTO_RERANK_FACTOR * K'); the selector fetches
        max(K', points_to_rerank) keys and re-scores them.
      rank, global_dim, quantization_bits, train_size: LoRANN settings (rank and
        global_dim are capped by the key dim; global_dim None = no reduction).
      refit_factor: rebuild the index from scratch when it holds this many times the keys
        it was built with (None, the default: never; it grows by adds, refits and splits).
      refit_growth: refit a cluster grown by this fraction (> 0) since its fit, or None (see
        LorannIndex).
      split_factor: split a cluster holding more than this many times the target cluster
        size (N / n_clusters, or sqrt(N)) (None: never split).
      background: refits and splits run in each index's maintenance thread (True, the
        default) instead of inside the decode steps that make them due
        (:meth:`topkattn.ann.LorannIndex.maintain`).
      max_training_queries: most recent query rows kept per batch element for (re)builds.
      tail_bound, max_topk: dynamic k (see :class:`DecodeSelector`).
      seed: non-negative int seed of the indexes' sampling and k-means.
    """

    def __init__(self, *, n_clusters: int | None = None, clusters_to_search: int | float | str = "auto",
                 points_to_rerank: int | str = "auto", rank: int = 32, global_dim: int | None = None,
                 quantization_bits: int | None = 8, train_size: int = 2, refit_factor: float | None = None,
                 refit_growth: float | None = 0.5, split_factor: float | None = 2.0, background: bool = True,
                 max_training_queries: int = 8192, tail_bound: float | None = None, max_topk: int | None = None,
                 seed: int = 0, measure_recall: bool = True) -> None:
        super().__init__(tail_bound=tail_bound, max_topk=max_topk, measure_recall=measure_recall)
        self.n_clusters = check_int("n_clusters", n_clusters, 1, optional=True)
        if isinstance(clusters_to_search, str):
            self.clusters_to_search = check_choice("clusters_to_search", clusters_to_search, ("auto",))
        elif isinstance(clusters_to_search, numbers.Integral) and not isinstance(clusters_to_search, bool):
            self.clusters_to_search = check_int("clusters_to_search", clusters_to_search, 1)
        else:
            self.clusters_to_search = check_real("clusters_to_search", clusters_to_search, 0.0, 1.0, lo_open=True)
        if isinstance(points_to_rerank, str):
            self.points_to_rerank = check_choice("points_to_rerank", points_to_rerank, ("auto",))
        else:
            self.points_to_rerank = check_int("points_to_rerank", points_to_rerank, 0)
        self.rank = check_int("rank", rank, 1)
        self.global_dim = check_int("global_dim", global_dim, 1, optional=True)
        if quantization_bits is not None and check_int("quantization_bits", quantization_bits) not in (4, 8):
            raise ValueError(f"quantization_bits must be None, 4 or 8, got {quantization_bits!r}")
        self.quantization_bits = None if quantization_bits is None else int(quantization_bits)
        self.train_size = check_int("train_size", train_size, 1)
        self.refit_factor = None if refit_factor is None else check_real("refit_factor", refit_factor, 1.0,
                                                                          lo_open=True)
        self.refit_growth = None if refit_growth is None else check_real("refit_growth", refit_growth, 0.0,
                                                                          lo_open=True)
        self.split_factor = None if split_factor is None else check_real("split_factor", split_factor, 1.0,
                                                                          lo_open=True)
        self.background = check_bool("background", background)
        self.max_training_queries = check_int("max_training_queries", max_training_queries, 1)
        self.seed = check_int("seed", seed, 0)
        self.builds = 0  # index (re)builds, all batch elements
        self.searches = 0  # index.search calls
        self.indexes = []
        self.last_info = None  # dynamic k: k, certified, bound, certified_bound, n_returned (B, H), last step

    def prefill(self, cache: Any, queries: Array, *, sinks: int = 0, window: int = 0) -> None:
        """Build the indexes over a prompt already in ``cache``, trained on its queries, in one call.

        For a prompt processed outside the decode protocol (a batched forward instead of
        ``begin_prefill``, one step per token, ``end_prefill``): ``queries`` (B, T, H, D) are
        the prompt's absorbed queries (the last ``max_training_queries`` rows are kept),
        ``cache.keys`` (B, S, D) its latents; each batch element's index is built over the
        keys the next step sees as candidates (sinks .. S - window).  The next call of the
        selector decodes on from there.
        """
        keys = cache.keys
        if keys.ndim != 3:
            raise TypeError("LorannSelector needs an MLA latent cache (cache.keys of shape (B, S, C + R)); "
                            f"got cache.keys of shape {tuple(keys.shape)}")
        q = to_numpy(queries)
        if q.ndim != 4 or q.shape[0] != keys.shape[0] or q.shape[-1] != keys.shape[-1]:
            raise ValueError(f"queries must be (B, T, H, D) = ({keys.shape[0]}, T, H, {keys.shape[-1]}), "
                             f"got shape {tuple(q.shape)}")
        sinks = check_int("sinks", sinks, 0)
        window = check_int("window", window, 0)
        self._cache = cache
        self._reset(cache)
        q = q.astype(np.float32)
        for b in range(q.shape[0]):
            rows = q[b].reshape(-1, q.shape[-1])[-self.max_training_queries:]  # (T*H, D), most recent
            self._queries[b].append(rows)
            self._n_queries[b] += len(rows)
        S = keys.shape[-2]
        self._ctx = _Context(S=S, topk=1, k_cap=1, sinks=sinks, window=window, scale=1.0,
                             xp=get_array_module(keys))
        self.prefilling = True
        self.end_prefill()

    # -- state ---------------------------------------------------------------------------
    def _reset(self, cache):
        keys = cache.keys
        if keys.ndim != 3:
            raise TypeError("LorannSelector needs an MLA latent cache (cache.keys of shape (B, S, C + R)); "
                            f"got cache.keys of shape {tuple(keys.shape)}")
        B = keys.shape[0]
        self.indexes = [None] * B
        self._built_size = [0] * B
        self._n_indexed = 0  # candidate keys sinks .. sinks + n_indexed - 1 are in every index
        self._queries = [[] for _ in range(B)]  # per batch element: list of (H, D) float32
        self._n_queries = [0] * B
        self._norm_max = np.zeros((B, 3))  # max |key|, |c part|, |rope part| over indexed keys
        self._split = getattr(cache, "C", None)

    def _observe(self, query, cache, ctx):
        with np.errstate(over="ignore"):
            q = to_numpy(query).astype(np.float32)  # (B, H, D)
        if not np.isfinite(q).all():  # refused before it joins the training queries of every later build
            raise ValueError("query contains non-finite values (or values outside the float32 range)")
        for b in range(q.shape[0]):
            self._queries[b].append(q[b])
            self._n_queries[b] += q.shape[1]
            while self._n_queries[b] - len(self._queries[b][0]) >= self.max_training_queries:
                self._n_queries[b] -= len(self._queries[b].pop(0))

    def end_prefill(self) -> None:
        """Leave prefill: build each batch element's index over the prompt's candidate keys."""
        super().end_prefill()
        ctx = self._ctx
        if self._cache is None or ctx is None:
            return
        if ctx.n_cand > 0:
            keys = to_numpy(self._cache.keys)
            for b in range(keys.shape[0]):
                self._build(b, keys[b, ctx.sinks:ctx.cand_end])
            self._n_indexed = ctx.n_cand

    def _training_queries(self, b):
        q = np.concatenate(self._queries[b], axis=0) if self._queries[b] else None
        if q is not None and len(q) > self.max_training_queries:
            q = q[-self.max_training_queries:]
        return q

    def _build(self, b, data):
        """(Re)build index b over ``data`` (N, D), the candidates in key order."""
        N, D = data.shape
        nc = self.n_clusters if self.n_clusters is not None else math.ceil(math.sqrt(N))
        nc = max(1, min(nc, N))
        gd = D if self.global_dim is None else min(self.global_dim, D)
        rank = max(1, min(self.rank, D - 1, gd))
        seed = np.random.SeedSequence([self.seed, b, self.builds])
        idx = LorannIndex(data, nc, global_dim=gd if gd < D else None,  # (the index copies it to float32)
                          quantization_bits=self.quantization_bits, rank=rank,
                          train_size=min(self.train_size, nc), distance="ip",
                          seed=np.random.default_rng(seed), refit_growth=self.refit_growth,
                          max_cluster_size=self._max_cluster_size(N, nc), background=self.background)
        idx.build(training_queries=self._training_queries(b))
        self.indexes[b] = idx
        self._built_size[b] = N
        self._norm_max[b] = 0.0
        self._update_norms(b, data)
        self.builds += 1

    def _max_cluster_size(self, n, nc_built=None):
        """The index's split threshold at n keys: split_factor times the target cluster size."""
        if self.split_factor is None:
            return None
        target = n / self.n_clusters if self.n_clusters is not None else math.sqrt(n)
        return max(2, math.ceil(self.split_factor * target))

    def _update_norms(self, b, data):
        """Raise the largest norms of batch element b's indexed keys (whole, latent part, rope
        part; see :meth:`_outside_upper`) by those of ``data`` (n, D), in float64, in row chunks
        (no float64 copy of a million-key prompt)."""
        C = self._split
        split = C is not None and 0 < C < data.shape[1]
        if not split:
            self._norm_max[b, 1:] = np.inf
        for lo in range(0, len(data), 16384):
            d = data[lo:lo + 16384]
            if split:  # squared norms of the two parts, summed in float64 without an (n, D) temporary
                lat = np.einsum("nd,nd->n", d[:, :C], d[:, :C], dtype=np.float64)  # (n,)
                rope = np.einsum("nd,nd->n", d[:, C:], d[:, C:], dtype=np.float64)  # (n,)
                self._norm_max[b, 0] = max(self._norm_max[b, 0], np.sqrt((lat + rope).max(initial=0.0)))
                self._norm_max[b, 1] = max(self._norm_max[b, 1], np.sqrt(lat.max(initial=0.0)))
                self._norm_max[b, 2] = max(self._norm_max[b, 2], np.sqrt(rope.max(initial=0.0)))
            else:
                sq = np.einsum("nd,nd->n", d, d, dtype=np.float64)  # (n,)
                self._norm_max[b, 0] = max(self._norm_max[b, 0], np.sqrt(sq.max(initial=0.0)))

    def _sync(self, keys_np, ctx):
        """Bring every index up to the current candidates: add new keys, rebuild when grown and,
        without ``background``, run the index maintenance (splits, refits) now due."""
        B = keys_np.shape[0]
        lo = ctx.sinks + self._n_indexed
        hi = ctx.cand_end
        for b in range(B):
            if self.indexes[b] is None:
                self._build(b, keys_np[b, ctx.sinks:hi])
                continue
            if hi > lo:
                new = keys_np[b, lo:hi]
                self.indexes[b].add(new)
                self._update_norms(b, new)
            if self.refit_factor is not None and len(self.indexes[b]) >= self.refit_factor * self._built_size[b]:
                self._build(b, keys_np[b, ctx.sinks:hi])
            elif self.split_factor is not None:
                self.indexes[b].max_cluster_size = self._max_cluster_size(len(self.indexes[b]))
            if not self.background and self.indexes[b].maintenance_pending:
                self.indexes[b].maintain()  # the splits and refits this step made due, done in it
        self._n_indexed = ctx.n_cand

    def _clusters(self, index):
        c = self.clusters_to_search
        nc = index.n_clusters
        if c == "auto":
            return auto_clusters_to_search(nc, len(index))
        if isinstance(c, numbers.Integral):
            return min(int(c), nc)
        return max(1, min(nc, math.ceil(c * nc - 1e-9)))

    # -- selection -------------------------------------------------------------------------
    def _select(self, query, keys, cache, ctx):
        xp = ctx.xp
        B, H, D = query.shape
        k_need = ctx.bounds.n_sel
        built = bool(self.indexes) and self.indexes[0] is not None
        if ctx.n_cand <= k_need or k_need == 0:
            # every candidate fits: nothing to look up; a built index still takes the new keys
            if built and ctx.n_cand > self._n_indexed:
                self._sync(to_numpy(keys), ctx)
            idx, k_row, certified = exact_select(query, keys, ctx, tail_bound=self.tail_bound)
            self.last_info = dict(k=k_row, certified=certified, bound=None, certified_bound=None)
            return idx, k_row, certified
        self._sync(to_numpy(keys), ctx)
        q_np = to_numpy(query).astype(np.float32)
        rr = AUTO_RERANK_FACTOR * k_need if self.points_to_rerank == "auto" else self.points_to_rerank
        m = min(max(k_need, rr), ctx.n_cand)
        # a float32 cache re-ranked exactly by the index (in float32, from its copy of the keys,
        # best first, ties to the lower key) needs no second scoring: ask for the k' best only
        final = rr > 0 and not self.dynamic and keys.dtype == np.float32
        m_ask = min(k_need, m) if final else m
        pos = np.full((B, H, m_ask), -1, dtype=np.int64)
        with _one_numba_thread():  # H queries per call: a thread pool costs more than it saves
            for b in range(B):
                index = self.indexes[b]
                ids = index.search(q_np[b], m_ask, self._clusters(index), rr)  # (H, m_ask)
                self.searches += 1
                pos[b] = np.where(ids >= 0, ids + ctx.sinks, -1)
        if final:
            idx = xp.full((B, H, ctx.n_forced + k_need), -1, dtype=xp.int64)
            idx[..., :ctx.n_forced] = xp.asarray(ctx.bounds.forced_indices())[None]
            idx[..., ctx.n_forced:ctx.n_forced + m_ask] = xp.asarray(pos)
            return idx, xp.full((B, H), k_need, dtype=xp.int64), None
        # exact re-scoring of the returned keys, in the cache's dtype
        pos_x = xp.asarray(np.sort(np.where(pos < 0, np.iinfo(np.int64).max, pos), axis=-1))
        pos_x = xp.where(pos_x == np.iinfo(np.int64).max, -1, pos_x)  # (B, H, m) ascending, -1 last
        valid = pos_x >= 0
        bi = xp.arange(B)[:, None, None]
        kk = keys[bi, xp.maximum(pos_x, 0)]  # (B, H, m, D)
        s = (kk * query[:, :, None, :]).sum(-1) * query.dtype.type(ctx.scale)  # (B, H, m)
        s = s.reshape(B * H, m)
        valid = valid.reshape(B * H, m)
        n_forced = ctx.n_forced
        idx = xp.full((B, H, n_forced + k_need), -1, dtype=xp.int64)
        forced = xp.asarray(ctx.bounds.forced_indices())  # (1, F)
        idx[..., :n_forced] = forced[None]
        order = ranked_topm_xp(s, valid, m)  # (B*H, m) columns, best first; ties to lower key
        cols = xp.maximum(order, 0)
        ranked_pos = xp.where(order >= 0, xp.take_along_axis(pos_x.reshape(B * H, m), cols, axis=1), -1)
        if not self.dynamic:
            sel = ranked_pos[:, :k_need]
            idx[..., n_forced:] = sel.reshape(B, H, k_need)
            k_row = xp.full((B, H), k_need, dtype=xp.int64)
            return idx, k_row, None
        vals = xp.where(order >= 0, xp.take_along_axis(s, cols, axis=1).astype(xp.float64), -xp.inf)
        n_ret = (order >= 0).sum(axis=1)
        upper = self._outside_upper(to_numpy(query), ctx.scale).reshape(B * H)
        lse_f = forced_scores_lse(query, keys, ctx)
        kc, certified, nominal, rigorous = dynamic_k_from_ranked(
            vals, lse_f, xp.full(B * H, ctx.n_cand), tail_bound=self.tail_bound, max_topk=k_need,
            n_ret=n_ret, outside_upper=xp.asarray(upper))
        slot = xp.arange(k_need)[None, :]
        sel = xp.where(slot < kc[:, None], ranked_pos[:, :k_need], -1)  # m >= k_need here
        idx[..., n_forced:] = sel.reshape(B, H, k_need)
        self.last_info = dict(k=kc.reshape(B, H), certified=certified.reshape(B, H),
                              bound=nominal.reshape(B, H), certified_bound=rigorous.reshape(B, H),
                              n_returned=n_ret.reshape(B, H))
        return idx, kc.reshape(B, H), certified.reshape(B, H)

    def _outside_upper(self, query, scale):
        """(B, H) upper bound on scale * q . key over every indexed key (Cauchy-Schwarz).

        Taken over the whole key and over its latent and rope parts separately (the smaller
        wins), with a relative slack of 1e-5 for the rounding of float32 scores.
        """
        q = np.asarray(query, dtype=np.float64)
        nm = self._norm_max  # (B, 3)
        whole = np.linalg.norm(q, axis=-1) * nm[:, None, 0]
        C = self._split
        if C is not None and 0 < C < q.shape[-1] and np.isfinite(nm[:, 1:]).all():
            split = (np.linalg.norm(q[..., :C], axis=-1) * nm[:, None, 1]
                     + np.linalg.norm(q[..., C:], axis=-1) * nm[:, None, 2])
            whole = np.minimum(whole, split)
        return whole * abs(scale) * (1 + 1e-5)


@contextlib.contextmanager
def _one_numba_thread():
    """Run Numba parallel kernels on one thread inside the block (restored afterwards)."""
    try:
        import numba
    except ImportError:  # pragma: no cover - numba is a dependency
        yield
        return
    n = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(n)



__all__ = ["LorannSelector", "auto_clusters_to_search"]
