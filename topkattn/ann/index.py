"""LorannIndex: the LoRANN approximate maximum-inner-product / nearest-neighbour index.

LoRANN (Jaasaari, Hyvonen, Roos, NeurIPS 2024) = an IVF partition (k-means) whose
clusters each carry a reduced-rank regression model that maps a query to the
approximate inner products with every point of the cluster, followed by exact
re-ranking of the best candidates.  The API mirrors the reference ``lorann``
package (``LorannIndex(data, ...)`` -> ``build()`` -> ``search(q, k, ...)``).

Shape letters (the ANN index's own, see docs/architecture.md): N points, Dx data dim, Dg
reduced (global) dim, Nc clusters, Rk rank, Q queries, Qt training queries, Wc clusters
searched per query, Kn results, Mc candidates re-ranked (max(Kn, points_to_rerank)).

Distances follow the reference: ``ip`` returns ``-q.x`` and ``l2`` returns the
squared Euclidean distance, both ascending (best first).  Ids are int64, padded
with -1 (distance +inf) when fewer than k points are reachable; ties go to the
lower id.  Queries are routed to their best non-empty clusters only.

Drop-in use: code written for the reference runs unchanged with
``from topkattn.ann import LorannIndex, IP, L2`` -- the same positional arguments
(``LorannIndex(data, n_clusters, global_dim, quantization_bits, rank, train_size,
distance, balanced, copy)``, ``build(approximate, verbose, n_threads)``,
``search(q, k, clusters_to_search, points_to_rerank, return_distances, n_threads)``,
``exact_search(q, k, return_distances, n_threads)``), ``get_dissimilarity(u, v)``, the
``IP``/``L2`` constants (the reference's values 0 and 1; the strings ``"ip"``/``"l2"``
work too) and ``clusters_to_search`` above ``n_clusters`` clamped.  Differences, kept on
purpose: results are int64 ids and float32 distances (the reference: int32, float64) --
int64 ids never overflow however far ``add`` grows the index, every caller in this
package indexes with them, and float32 is the arithmetic the scores are computed in;
cast with ``ids.astype(np.int32)`` where an int32 is needed.  ``copy`` is accepted, but
the index always owns its storage (a float32 copy that ``add`` grows), so ``copy=False``
never aliases the caller's array.  The reference's restrictions (data dim >= 64,
rank in 16/32/64 and global_dim a multiple of 32 when quantised, float32 data) do not
apply here.  Extras: ``add``/``refit``, CuPy queries, ``seed``, ``refit_growth``,
``search_state``, thread-safe sharing.

Threads: one :class:`~topkattn.ann.rwlock.RWLock` per index; searches share it, every
mutation (``add``, ``refit``, ``build``, a search's lazy refit, a maintenance job's swap)
holds it alone.

Implementation notes
- Build: k-means on a sample (256 points per cluster, at most 131072), the final
  assignment by a two-level search (about sqrt(Nc) groups of centroids, 4 probed) from
  384 clusters on; clusters above ``max_cluster_size`` are split before the build returns.
- Model fit: the right singular vectors of the fitted values X beta come from the
  (Dg, Dg) eigenproblem of F beta beta^T F^T with F^T F = X^T X (its top Rk eigenvectors by
  subspace iteration above 96 dims), so a cluster costs O(Qt Dg^2 + N Dg^2) and the (Qt, N)
  fitted-value matrix is never formed; every point's column of B is then placed by P (the
  least-squares placement ``add`` uses).  A cluster with fewer training queries than points
  tops its queries' Gram up with the mean Gram of all training queries.
- Maintenance (``max_cluster_size``, ``refit_growth``, ``background``): a job snapshots one
  cluster (split by 2-means from its principal axis, or refit), fits with no lock held and
  swaps the result in under the write lock; the point storage is doubled ahead of need the
  same way.  Nothing a decode step does waits for a fit or a whole-index copy.
- Quantisation: A (per rank component) and B (per point) are stored as 8- or
  4-bit codes with one float32 scale per row; scoring uses the dequantised
  values (to float32 accuracy).  The CPU kernels read B from a transposed mirror (per cluster
  float32 (Rk, cap_c) blocks for the GEMM path and, 8-bit, the codes with two rank
  components of a point side by side, 4x less memory traffic).  8-bit fused scoring is
  integer arithmetic: the query and then A_c^T q are split into two int16 parts each
  (float32-level accuracy) and multiplied with the int8 codes of A and B by pair dots
  (``vpdpwssd`` with AVX-512 VNNI), 16 points per instruction; BLAS has no int8 GEMM, so
  the GEMM path uses the float32 mirror.
- Search (CPU): one float32 query with int arguments takes a latency path (finiteness
  check, global reduction, routing and search in one Numba call, no generic checks).  Up
  to 16 queries, batches whose visited clusters get fewer than 4 queries on average, and
  every batch of an 8-bit index (measured faster than the GEMM path up to 2000 queries per
  cluster) run the fused Numba kernel (query-parallel, or serial for 1-2 queries);
  other batches group queries by cluster and run two single-threaded BLAS GEMMs per visited
  cluster inside one ``prange`` (every query's best cluster first, so each
  query's candidate threshold is good before the rest).  Routing of a few queries scores
  the transposed centroids (16 clusters per vector operation).  Candidates: a
  vectorised count per score row, a branch-free 64-bit-mask append (only set
  bits are visited), buffers compacted by a bisection bound on the m-th best;
  the exact re-rank prefetches the candidate rows.  CuPy queries take a padded
  dense path.
- Streaming ``add``: a point joins its nearest centroid and gets the B column
  P_c (T^T x), the least-squares fit of its inner products over the cluster's
  training queries (exact for points the model was trained on).  The cluster's
  basis V is kept until a refit.  Measured cost (benchmarks/bench_ann.py
  --add-fraction 0.3: build on 70k attention-like keys, add 30k one at a time):
  recall@10 at clusters_to_search=24 falls by 0.010 (points_to_rerank=50:
  0.870 vs 0.879 for a full build) and by 0.003 without re-ranking; refit()
  recovers it (0.882).  Lazy refits (``refit_growth``) bound the drift.
"""
import contextlib
import numbers
import os
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numba
import numpy as np

from topkattn.ann import kernels, kmeans, quant, rrr
from topkattn.ann.rwlock import RWLock
from topkattn.backend import Array, get_array_module, is_cupy_array, to_numpy
from topkattn.checks import check_bool, check_choice, check_int, check_real, make_rng
from topkattn.threads import blas_single_thread, n_workers

KMEANS_ITERATIONS = 10
SAMPLED_POINTS_PER_CLUSTER = 256
MIN_SAMPLED_POINTS_PER_CLUSTER = 64
KMEANS_MAX_SAMPLE = 131072  # 1M points in 1024 clusters: 128 per cluster
GLOBAL_DIM_REDUCTION_SAMPLES = 16384
FUSED_MAX_QUERIES = 16  # up to this many queries: fused Numba kernel, no BLAS
SERIAL_MAX_QUERIES = 2  # up to this many: on one thread (no thread-pool wake-up)
PARALLEL_CHUNK = 4  # queries per work item of the parallel fused kernel (dynamic hand-out)
BLOCK_MIN_GROUP = 4  # GEMM path once clusters get this many queries on average (measured; float32 and 4-bit)
BLOCK_MIN_GROUP_INT8 = 4096  # 8-bit: the integer fused kernel beat the GEMM path up to 2000 (measured)
MAX_SQUARED_NORM = 2.0 ** 124  # rows above it could overflow float32 products (|q - x|^2 <= 2^126)
DATA_SPARE_DIVISOR = 8  # the point storage's room for adds (at least 1024 rows); doubled when due
GROW_WHEN_FREE = 0.04  # background: double the point storage ahead, once less than this fraction is free
SPARE_DIVISOR = 4  # a build leaves each cluster (and the slot storage) 1/4 spare room
DEFAULT_TRAIN_SIZE = 5  # train_size=None: this many nearest clusters, at most n_clusters
_DISTANCES = ("ip", "l2")
IP = 0  # the reference's lorann.IP: maximum inner product (distance -q.x)
L2 = 1  # the reference's lorann.L2: squared Euclidean distance
_DISTANCE_CODES = {IP: "ip", L2: "l2"}
_NO_REDUCTION = np.zeros((0, 0), np.float32)  # route_search_one's t_red without a global reduction
_NO_PAIRS = np.zeros((0, 0, 0, 2), np.int8)  # the fused kernels' pair-layout A codes argument when not 8-bit


class LorannIndex:
    """A LoRANN index over the rows of ``data`` (N, Dx).

    Args:
        data: index points (N, Dx), real and finite, each row of squared norm at most 2^124
            (larger products would overflow float32; queries and added points too); stored as
            float32 (copied).
        n_clusters: number of k-means clusters Nc (about sqrt(N) is a good start).
        global_dim: reduced dimension Dg learned from the (training-query) data by
            PCA, or None for no reduction (Dg = Dx).
        quantization_bits: 8 or 4 (per-row scalar quantisation of the regression
            matrices; scores use the quantised values) or None (float32).
        rank: rank Rk of each cluster's regression (1 <= Rk < Dx, Rk <= Dg).
        train_size: each training query trains the models of its ``train_size``
            nearest clusters (1 <= train_size <= n_clusters); None (the default) takes
            min(5, n_clusters), the reference's 5 where there are that many clusters.
        distance: ``IP`` or ``"ip"`` (maximum inner product), ``L2`` or ``"l2"`` (squared
            Euclidean); ``IP``/``L2`` are the reference's int constants (0, 1), so
            ``lorann.IP`` works too.  Stored as the string (``index.distance``).
        balanced: capacity-constrained (balanced) k-means assignment.
        copy: accepted for the reference's signature; the index always copies ``data``
            into float32 storage it owns (and grows on ``add``), whatever ``copy`` says.
        seed: seed or numpy Generator for sampling, k-means initialisation.
        refit_growth: after ``add``, a cluster grown by more than this fraction of
            its size at the last fit is refit at the next search that visits it (with
            ``background``: by the maintenance thread); None disables lazy refits (call
            :meth:`refit`).
        max_cluster_size: a cluster holding more points is split in two (2-means over its
            points, both halves refit) by :meth:`maintain` or, with ``background``, by the
            maintenance thread; None (the default) never splits.  May be changed later
            (``index.max_cluster_size = ...``), e.g. to grow with the index.
        background: do refits and splits in a maintenance thread: each job snapshots one
            cluster, fits without holding the index (searches and adds go on with the
            old model) and swaps the result in holding the index alone for a moment
            (points added meanwhile are placed with the new model); searches then never
            refit.  See :meth:`wait_maintenance`.

    Threads: an index may be shared.  Searches (``search``, ``exact_search``) run
    concurrently with each other; ``add``, ``refit`` and ``build`` each run alone (a
    writer-preferring readers-writer lock: a waiting ``add`` holds back new searches, so a
    stream of searches cannot starve it), so every search sees the index before or after a
    whole call, never half of one.  A search whose clusters are due a lazy refit does the
    refit holding the index alone.  ``save`` and ``search_state`` read a consistent
    snapshot.  With Numba's ``workqueue`` threading layer (not thread-safe) the parallel
    kernels of all indexes take turns.
    """

    def __init__(self, data: np.ndarray, n_clusters: int, global_dim: int | None = None,
                 quantization_bits: int | None = 8, rank: int = 32, train_size: int | None = None,
                 distance: int | str = "ip", balanced: bool = False, copy: bool = False, *,
                 seed: int | np.random.Generator | None = 0, refit_growth: float | None = 0.5,
                 max_cluster_size: int | None = None, background: bool = False) -> None:
        data = _as_matrix(data, "data")
        n, d = data.shape
        if d < 2:  # rank must be >= 1 and < d
            raise ValueError(f"data must have at least 2 columns, got shape {data.shape}")
        distance = _check_distance(distance)
        n_clusters = check_int("n_clusters", n_clusters, 1, n)
        global_dim = d if global_dim is None else check_int("global_dim", global_dim, 1, d)
        rank = check_int("rank", rank, 1, None)
        if rank >= d:
            raise ValueError(f"rank must be smaller than the data dimension {d}, got {rank}")
        if rank > global_dim:
            raise ValueError(f"rank must be <= global_dim={global_dim}, got {rank}")
        if train_size is None:
            train_size = min(DEFAULT_TRAIN_SIZE, n_clusters)
        train_size = check_int("train_size", train_size, 1, n_clusters)
        if quantization_bits is not None:
            quantization_bits = check_int("quantization_bits", quantization_bits)
            if quantization_bits not in (4, 8):
                raise ValueError(f"quantization_bits must be None, 4 or 8, got {quantization_bits!r}")
        check_bool("balanced", balanced)
        check_bool("copy", copy)
        if refit_growth is not None:
            refit_growth = check_real("refit_growth", refit_growth, 0.0, lo_open=True)
        max_cluster_size = check_int("max_cluster_size", max_cluster_size, 2, optional=True)
        check_bool("background", background)
        self.n_clusters = n_clusters
        self.global_dim = global_dim
        self.quantization_bits = quantization_bits
        self.rank = rank
        self.train_size = train_size
        self.distance = distance
        self.balanced = bool(balanced)
        self.refit_growth = refit_growth
        self.max_cluster_size = max_cluster_size
        self.background = bool(background)
        self._rng = make_rng(seed, allow_none=True)
        # (capacity, Dx): the points and room for DATA_SPARE_DIVISOR-th more (``add``)
        cap = n + max(1024, n // DATA_SPARE_DIVISOR)
        self._data = np.zeros((cap, d), np.float32)
        with np.errstate(over="ignore"):  # overflow is reported below
            self._data[:n] = data
        if data.dtype != np.float32 and not _all_finite(self._data[:n]):
            raise ValueError("data has values outside the float32 range")
        self._n = n
        self._norms = np.zeros(cap, np.float32)
        for lo in range(0, n, 65536):  # (N,) in blocks (einsum's temporaries stay small)
            blk = self._data[lo:min(n, lo + 65536)]
            with np.errstate(over="ignore"):  # an overflow is reported below
                self._norms[lo:lo + len(blk)] = np.einsum("nd,nd->n", blk, blk)
        _check_norms(self._norms[:n], "data", np)
        self.built = False
        self._device = {}
        self._init_runtime()

    def _init_runtime(self):
        """The readers-writer lock and the CPU search's transposed copy of B (see
        :meth:`_mirror`; rebuilt on first use, refreshed under ``_tr_lock`` by any reader)."""
        self._lock = RWLock()
        self._tr = None
        self._tr_stale = set()
        self._tr_lock = threading.Lock()
        self._cent_tr = None  # (centroids, norms, centroids transposed): see _centroids_t
        self._mlock = threading.Condition()  # the maintenance worker's state below
        self._worker_alive = False
        self._maintenance_error = None
        self.maintenance_jobs = {"refit": 0, "split": 0, "grow": 0, "discarded": 0}
        self._nosplit = {}  # cluster -> size at which its points were found alike (no split)
        self._oversized = set()  # clusters seen above max_cluster_size by an add (kept exact by _take_job)
        self._cbuf = {}  # capacity buffers of the per-cluster arrays (see _grow_clusters)

    # ------------------------------------------------------------------ properties
    def __len__(self) -> int:
        return self._n

    @property
    def dim(self) -> int:
        return self._data.shape[1]

    @property
    def n_samples(self) -> int:
        return self._n

    @property
    def data(self) -> np.ndarray:
        """The stored points (N, Dx) float32 (a view; do not modify)."""
        with self._lock.read():
            return self._data[: self._n]

    @property
    def cluster_sizes(self) -> np.ndarray:
        self._require_built()
        with self._lock.read():
            return self._size.copy()

    @property
    def stale_clusters(self) -> np.ndarray:
        """Clusters that received points since their last fit (their model lags)."""
        self._require_built()
        with self._lock.read():
            return np.flatnonzero(self._size != self._fit_size)

    # ------------------------------------------------------------------ build
    def build(self, approximate: bool = True, verbose: bool = False, n_threads: int = -1, *,
              training_queries: np.ndarray | None = None) -> None:
        """Cluster the points and fit every cluster's reduced-rank model.

        The reference's signature: ``build(approximate, verbose, n_threads)`` positionally,
        ``training_queries`` by keyword only.  ``training_queries`` (Qt, Dx): queries from
        the search distribution (the out-of-distribution case, e.g. attention queries); they
        define the PCA reduction and train each cluster's model.  Without them the points
        serve as training queries.  ``approximate=False`` solves the exact OLS problem under
        dimensionality reduction instead of using the projected points.  ``verbose`` prints
        progress.  ``n_threads``: see :meth:`search`.
        """
        check_bool("approximate", approximate)
        if not isinstance(verbose, (bool, np.bool_)):
            hint = ("; pass training queries as training_queries=..."
                    if hasattr(verbose, "shape") or isinstance(verbose, (list, tuple)) else "")
            raise TypeError(f"verbose must be a bool, got {type(verbose).__name__}{hint}")
        n_threads = _check_threads(n_threads)
        with self._lock.write(), _numba_threads(n_threads):
            self._build(approximate, training_queries, verbose)

    def _build(self, approximate, training_queries, verbose):
        if self.built:
            raise RuntimeError("the index has already been built")
        d = self.dim
        data = self._data[: self._n]
        if training_queries is None:
            tq = data
        else:
            tq = _as_matrix(training_queries, "training_queries")
            if tq.shape[1] != d:
                raise ValueError(
                    f"training_queries must have {d} columns, got shape {tq.shape}")
            with np.errstate(over="ignore"):
                tq = np.ascontiguousarray(tq, dtype=np.float32)
            if not np.isfinite(tq).all():
                raise ValueError("training_queries has values outside the float32 range")
        say = print if verbose else (lambda *a, **k: None)
        # global dimensionality reduction: top principal directions of the queries
        if self.global_dim < d:
            sample = tq
            if len(tq) > GLOBAL_DIM_REDUCTION_SAMPLES:
                sample = tq[self._rng.choice(len(tq), GLOBAL_DIM_REDUCTION_SAMPLES, replace=False)]
            s64 = sample.astype(np.float64)
            _, vecs = np.linalg.eigh(s64.T @ s64)  # ascending eigenvalues
            self._T = np.ascontiguousarray(vecs[:, ::-1][:, : self.global_dim], np.float32)
        else:
            self._T = None
        xr = self._reduce(data)  # (N, Dg)
        qr = xr if training_queries is None else self._reduce(tq)  # (Qt, Dg)
        c = self.n_clusters
        # k-means trains on a sample: SAMPLED_POINTS_PER_CLUSTER per cluster, at most
        # KMEANS_MAX_SAMPLE points (but MIN_SAMPLED_POINTS_PER_CLUSTER) for big indexes
        sample = max(MIN_SAMPLED_POINTS_PER_CLUSTER * c,
                     min(SAMPLED_POINTS_PER_CLUSTER * c, KMEANS_MAX_SAMPLE))
        if not approximate or sample > 0.5 * len(xr):
            sample = None
        say(f"k-means: {c} clusters on {len(xr) if sample is None else sample} points")
        # (threaded BLAS: its GEMMs split rows and columns, so the result is the same for any
        # thread count)
        self._cent = kmeans.kmeans(xr, c, distance=self.distance, iters=KMEANS_ITERATIONS,
                                   sample_size=sample, balanced=self.balanced, rng=self._rng)
        if self.balanced:
            assign = kmeans.balanced_assign(xr, self._cent, self.distance)
        else:
            assign = kmeans.assign_nearest(xr, self._cent, self.distance, rng=self._rng)
        # k-means ran on a sample: split clusters again if this assignment left any empty
        kmeans.fill_empty(xr, self._cent, assign, self.distance)
        self._cnorm = np.einsum("cg,cg->c", self._cent, self._cent)
        members = _group(assign, c)
        tmap = kmeans.nearest_clusters(qr, self._cent, self.train_size, self.distance)  # (Qt, Wc)
        qmembers = _group(tmap.ravel(), c, div=tmap.shape[1])
        # storage
        g, r = self.global_dim, self.rank
        self._adeq = np.zeros((c, g, r), np.float32)
        self._adeq_t = np.zeros((c, r, g), np.float32)  # A_c^T: the fused kernel's layout
        self._acodes = None if self.quantization_bits is None else np.zeros(
            (c, r, _code_cols(g, self.quantization_bits)),
            np.int8 if self.quantization_bits == 8 else np.uint8)
        self._apair = None if self.quantization_bits != 8 else np.zeros(
            (c,) + kernels.a_pairs(np.zeros((r, g), np.int8)).shape, np.int8)  # the fused kernel's A codes
        self._ascale = np.zeros((c, r), np.float32)
        self._P = np.zeros((c, r, g), np.float32)
        self._gram = [None] * c  # (Dg, Dg) float32 per cluster (a list: splits append)
        self._cgen = np.zeros(c, np.int64)  # bumped whenever a cluster's model or members are rewritten
        self._size = np.array([len(mm) for mm in members], np.int64)
        self._n_live = int(np.count_nonzero(self._size))  # non-empty clusters
        self._fit_size = self._size.copy()
        self._cap = self._size + self._size // SPARE_DIVISOR + 8  # room to grow before a move
        self._start = np.zeros(c, np.int64)
        self._start[1:] = np.cumsum(self._cap)[:-1]
        self._used = int(self._cap.sum())
        self._alloc_slots(self._used + self._used // SPARE_DIVISOR)  # room for moved and new clusters
        self._assign = np.zeros(len(self._data), np.int64)  # capacity follows _data
        self._assign[: len(assign)] = assign
        say("fitting reduced-rank models")
        T = self._T

        mean_gram = _mean_gram(qr)  # (Dg, Dg) per training query

        def fit_one(ci):
            mem = members[ci]
            qmem = qmembers[ci]
            pts = data[mem]  # (n_c, Dx)
            qx, qfull = qr[qmem], tq[qmem]
            # too few training queries for the cluster's points: top its own queries' Gram up
            # with the mean Gram of all of them, to as many (pseudo-)queries as it has points
            gram = _cluster_gram(qx, mean_gram, len(mem))  # (Dg, Dg)
            qgram_full = None
            if not approximate and T is not None:  # the same mixture in the full dimension
                qgram_full = _cluster_gram(qfull, _mean_gram(tq), len(mem))  # (Dx, Dx)
            beta = rrr.ols_beta(pts if T is None else xr[mem], pts, T, qgram_full, gram, approximate)  # (Dg, n_c)
            fitted = self._fit_model(beta, gram)
            # stored here, on the pool's thread: each cluster writes only its own rows and slots
            self._gram[ci] = gram.astype(np.float32)
            lo = self._start[ci]
            self._slot_id[lo:lo + len(mem)] = mem
            self._store_fit(ci, *fitted)

        with blas_single_thread(), ThreadPoolExecutor(n_workers()) as pool:
            for _ in pool.map(fit_one, range(c)):  # (raises a fit's exception here)
                pass
        self._approximate = bool(approximate)
        self._overgrown = set()  # clusters grown past refit_growth, refit when next visited
        self.built = True
        self._device = {}
        self._grow_clusters(c, capacity=c + c // SPARE_DIVISOR + 8)  # room for splits
        if self.max_cluster_size is not None:  # clusters k-means left too big: split them now
            say("splitting clusters above max_cluster_size")
            while True:
                job = self._take_job()
                if job is None or job["kind"] == "refit":
                    break
                self._apply_job(job, self._compute_job(job))
        self._mirror()  # the CPU kernels' transposed B, now rather than in the first search

    def _fit(self, ci, beta, gram):
        """Fit, quantise and store cluster ci's model from its OLS beta (Dg, n_c)."""
        self._store_fit(ci, *self._fit_model(beta, gram))

    def _fit_model(self, beta, gram):
        """(A, Bt, P) of one cluster (:func:`rrr.fit_cluster`): every fit of the index goes here."""
        return rrr.fit_cluster(beta, gram, self.rank)

    def _store_fit(self, ci, A, Bt, P):
        self._store_A(ci, A)
        self._P[ci] = P
        lo = self._start[ci]
        self._store_B(slice(lo, lo + len(Bt)), Bt)
        self._fit_size[ci] = self._size[ci]
        self._tr_stale.add(int(ci))

    def _store_A(self, ci, A):
        if self.quantization_bits is None:
            self._adeq[ci] = A
        else:
            codes, scale = quant.quantize_rows(A.T, self.quantization_bits)  # rows = rank comps
            self._acodes[ci] = codes
            if self._apair is not None:
                self._apair[ci] = kernels.a_pairs(codes)
            self._ascale[ci] = scale
            self._adeq[ci] = quant.dequantize_rows(codes, scale, self.quantization_bits,
                                                   self.global_dim).T
        self._adeq_t[ci] = self._adeq[ci].T

    def _store_B(self, slots, Bt):
        if self.quantization_bits is None:
            self._bdeq[slots] = Bt
            return
        codes, scale = quant.quantize_rows(Bt, self.quantization_bits)
        self._bcodes[slots] = codes
        self._bscale[slots] = scale
        self._bdeq[slots] = quant.dequantize_rows(codes, scale, self.quantization_bits, self.rank)

    def _alloc_slots(self, cap, old=None):
        r = self.rank
        bits = self.quantization_bits
        new = {
            "_bdeq": np.zeros((cap, r), np.float32),
            "_slot_id": np.full(cap, -1, np.int64),
            "_bscale": np.zeros(cap, np.float32),
            "_bcodes": None if bits is None else np.zeros(
                (cap, _code_cols(r, bits)), np.int8 if bits == 8 else np.uint8),
        }
        for name, arr in new.items():
            if old is not None and arr is not None:
                prev = getattr(self, name)
                arr[: len(prev)] = prev
            setattr(self, name, arr)

    def _reduce(self, x):
        return x if self._T is None else x @ self._T

    def _mirror(self):
        """B transposed per cluster for the CPU kernels: flat arrays in the slot layout, cluster
        c's block (Rk, cap_c) row-major at Rk * start[c] (float32 ``bt``), so its GEMM reads a
        contiguous (Rk, n) block; and the 8-bit codes ``ct`` (or None) in pair layout, cluster
        c's (ceil(Rk/2), cap_c, 2) block at 2 ceil(Rk/2) start[c] (two rank components of a
        point side by side), so the fused kernel scores 16 points per integer pair dot.  Built
        on first use, then refreshed per cluster that ``add``/``refit`` touched (a decode step
        refreshes one)."""
        with self._tr_lock:
            need = self.rank * len(self._bdeq)
            need_c = 2 * ((self.rank + 1) // 2) * len(self._bdeq) + kernels.CODE_PAD
            if self._tr is None:
                bt = np.zeros(need, np.float32)
                ct = np.zeros(need_c, np.int8) if self.quantization_bits == 8 else None
                self._tr_stale.clear()
                cl = np.arange(self.n_clusters, dtype=np.int64)
            elif len(self._tr[0]) != need:  # the slot storage grew: the layout is unchanged, copy
                old_bt, old_ct = self._tr
                bt = np.zeros(need, np.float32)
                bt[:len(old_bt)] = old_bt
                ct = None
                if old_ct is not None:
                    ct = np.zeros(need_c, np.int8)
                    ct[:len(old_ct)] = old_ct
                cl = np.fromiter(self._tr_stale, np.int64)
                self._tr_stale.clear()
            elif self._tr_stale:
                bt, ct = self._tr
                cl = np.fromiter(self._tr_stale, np.int64)
                self._tr_stale.clear()
            else:
                return self._tr
            codes = ct is not None
            fn = kernels.transpose_clusters if len(cl) > 4 else kernels.transpose_clusters_serial
            fn(cl, self._start, self._size, self._cap, self._bdeq,
               self._bcodes if codes else np.zeros((0, 0), np.int8), codes, bt,
               ct if codes else np.zeros(0, np.int8))
            self._tr = (bt, ct)
            return self._tr

    # ------------------------------------------------------------------ search
    def search(self, q: Array, k: int, clusters_to_search: int, points_to_rerank: int,
               return_distances: bool = False, n_threads: int = -1) -> Array | tuple[Array, Array]:
        """Approximate k nearest neighbours of ``q`` (Dx,) or (Q, Dx).

        Routes each query to its ``clusters_to_search`` best non-empty centroids (all of
        them when fewer are non-empty, or when ``clusters_to_search`` exceeds
        ``n_clusters``: clamped, like the reference), scores their points with the quantised low-rank
        models, keeps the max(k, points_to_rerank) best and re-ranks them exactly
        (``points_to_rerank=0``: approximate scores only).  Returns ids (Kn,) or
        (Q, Kn) int64 and, with ``return_distances``, float32 distances (the reference
        returns int32 and float64: see the module docstring).
        k and points_to_rerank above len(index) do no extra work: the ids past the
        reachable points are -1 (distance inf); a k whose (Q, k) result cannot be
        allocated is a ValueError naming k.
        NumPy queries run on the CPU (BLAS + Numba); CuPy queries on the GPU.
        ``n_threads``: the Numba threads (and worker threads) this call may use, -1 (the
        default) for Numba's current count (all cores unless lowered); more than
        ``numba.config.NUMBA_NUM_THREADS`` is clamped to it.  The setting is per calling
        thread and restored afterwards, so concurrent calls do not affect each other; BLAS
        keeps its own (process-wide) thread count.  Ignored for CuPy queries.
        """
        if return_distances is not False and return_distances is not True:
            return_distances = check_bool("return_distances", return_distances)
        if (type(q) is np.ndarray and q.ndim == 1 and q.dtype == np.float32 and type(k) is int
                and type(clusters_to_search) is int and type(points_to_rerank) is int and n_threads == -1
                and self.built and k >= 1 and clusters_to_search >= 1 and points_to_rerank >= 0
                and q.shape[0] == self._data.shape[1] and q.flags.c_contiguous):
            found = self._search_one(q, k, clusters_to_search, points_to_rerank)  # the latency path
            if found is not None:
                if found[0].shape[1] == k and not return_distances:
                    return found[0][0]
                return self._result(found, k, q[None], True, return_distances, np)
        self._require_built()
        xp = get_array_module(q)
        q2, single = self._check_queries(q, "q", xp)
        k = check_int("k", k, 1, None)
        w = min(check_int("clusters_to_search", clusters_to_search, 1, None), self.n_clusters)
        rr = check_int("points_to_rerank", points_to_rerank, 0, None)
        n_threads = _check_threads(n_threads)
        with _numba_threads(n_threads):
            with self._lock.read():
                found = self._search(q2, k, w, rr, xp, exclusive=False)
            if found is None:  # a lazy refit is due: a mutation, so with the index held alone
                with self._lock.write():
                    found = self._search(q2, k, w, rr, xp, exclusive=True)
        return self._result(found, k, q2, single, return_distances, xp)

    def _search_one(self, q, k, w, rr):
        """:meth:`search` of one float32 query (Dx,) with int arguments, the checks and dispatch
        of the general path skipped (single-query latency); None when the query is not finite or
        too large, or a lazy refit is due (the general path reports or does it)."""
        with self._lock.read():
            if self._overgrown and not self.background:  # a lazy refit may be due: general path
                return None
            n = self._n
            k, rr = min(k, n), min(rr, n)
            w = min(w, self.n_clusters, self._n_live)
            ids = np.empty((1, k), np.int64)
            scores = np.empty((1, k), np.float32)
            tr = self._tr  # the mirror, refreshed only when due (no lock taken otherwise)
            if tr is None or self._tr_stale or len(tr[0]) != self.rank * len(self._bdeq):
                tr = self._mirror()
            bt, ct = tr
            int8 = ct is not None
            t_red = _NO_REDUCTION if self._T is None else self._T
            if not kernels.route_search_one(q, MAX_SQUARED_NORM, t_red, self._centroids_t(), self._cnorm, w,
                                            self._adeq_t, self._ascale,
                                            self._apair if int8 else _NO_PAIRS, ct if int8 else bt, self._bscale,
                                            int8, self._start, self._size, self._cap, self._slot_id, self._norms,
                                            self.distance == "l2", self._data, max(k, rr), k, rr > 0, ids, scores):
                return None
            return ids, scores

    def _centroids_t(self):
        """The centroids transposed (Dg, Nc rounded up to 16, zero columns past Nc) for
        :func:`kernels.route_small`, made again when the centroid or norm arrays were replaced
        or a cluster rewritten (``_after_rewrite``)."""
        made = self._cent_tr
        if made is None or made[0] is not self._cent or made[1] is not self._cnorm:
            nc, g = self._cent.shape
            cent_t = np.zeros((g, -(-nc // 16) * 16), np.float32)
            cent_t[:, :nc] = self._cent.T
            made = (self._cent, self._cnorm, cent_t)
            self._cent_tr = made
        return made[2]

    def _search(self, q, k, w, rr, xp, exclusive):
        """(ids, scores) (Q, min(k, N)), or None when a lazy refit is due and not ``exclusive``."""
        n = self._n
        k, rr = min(k, n), min(rr, n)  # more would only pad
        w = min(w, self._n_live)  # the non-empty clusters
        if xp is np:
            return self._search_cpu(q, k, w, rr, exclusive)
        return self._search_xp(q, k, w, rr, xp, exclusive)

    def exact_search(self, q: Array, k: int, return_distances: bool = False,
                     n_threads: int = -1) -> Array | tuple[Array, Array]:
        """Exact k nearest neighbours by brute force (ties to the lower id); k above
        len(index) pads with -1 like :meth:`search`; ``n_threads`` as in :meth:`search`."""
        xp = get_array_module(q)
        q2, single = self._check_queries(q, "q", xp)
        k = check_int("k", k, 1, None)
        return_distances = check_bool("return_distances", return_distances)
        n_threads = _check_threads(n_threads)
        with self._lock.read(), _numba_threads(n_threads):
            kk = min(k, self._n)
            if xp is np:
                ids = np.empty((len(q2), kk), np.int64)
                scores = np.empty((len(q2), kk), np.float32)
                for b in range(0, len(q2), 256):
                    s = self._exact_scores(q2[b:b + 256], self._data[: self._n])  # (Q_b, N)
                    kernels.exact_topk(s, kk, ids[b:b + 256], scores[b:b + 256])
            else:
                data = self._dev(xp)["data"]
                s = self._exact_scores(q2, data)
                ids = _topk_xp(xp, s, xp.tile(xp.arange(self._n), (len(q2), 1)), kk)
                scores = xp.take_along_axis(s, ids, axis=1)
        return self._result((ids, scores), k, q2, single, return_distances, xp)

    def get_dissimilarity(self, u: np.ndarray, v: np.ndarray) -> float:
        """The index's distance between two vectors u, v (Dx,), as a Python float: ``-u.v``
        for ``ip``, the squared Euclidean distance for ``l2`` (the values :meth:`search`
        returns; computed in float32 like them).  Works before ``build``."""
        with self._lock.read():
            d = self.dim
            pair = []
            for name, x in (("u", u), ("v", v)):
                x = _as_matrix(x, name, allow_1d=True)
                if x.shape != (d,):
                    raise ValueError(f"{name} must have shape ({d},), got {x.shape}")
                with np.errstate(over="ignore"):
                    x32 = x.astype(np.float32)
                if not np.isfinite(x32).all():
                    raise ValueError(f"{name} has values outside the float32 range")
                pair.append(x32)
            u32, v32 = pair
            if self.distance == "ip":
                return -float(np.dot(u32, v32))
            diff = u32 - v32
            return float(np.dot(diff, diff))

    def _exact_scores(self, q, data):
        """Minus the distances (Q, N) float32: ``q.x`` (ip) or ``-|q - x|^2`` (l2), the latter as
        sums of squared differences (CPU) or in float64 (array libraries): the float32
        expansion ``|q|^2 - 2 q.x + |x|^2`` loses small distances far from the origin."""
        if self.distance == "ip":
            return (q @ data.T).astype(np.float32, copy=False)
        xp = get_array_module(q)
        if xp is np:
            out = np.empty((len(q), len(data)), np.float32)
            kernels.neg_sq_distances(q, data, out)
            return out
        q64, d64 = q.astype(xp.float64), data.astype(xp.float64)
        d2 = (q64 * q64).sum(1)[:, None] - 2 * (q64 @ d64.T) + (d64 * d64).sum(1)[None, :]
        return (-xp.maximum(d2, 0)).astype(xp.float32)

    def _route(self, qr, w, xp):
        """The w best non-empty clusters (Q, Wc) of reduced queries qr (Q, Dg), best first;
        w <= the number of non-empty clusters (all Nc clusters when w = Nc)."""
        if w >= self.n_clusters:
            return xp.broadcast_to(xp.arange(self.n_clusters), (len(qr), w)).copy()
        l2 = self.distance == "l2"
        if xp is np:  # the w best, best first (the first pass of _score_blocks uses the best)
            live = np.flatnonzero(self._size)
            every = len(live) == self.n_clusters
            s = qr @ (self._cent if every else self._cent[live]).T  # (Q, live)
            if l2:
                s = 2 * s - (self._cnorm if every else self._cnorm[live])
            top = np.empty((len(s), w), np.int64)
            kernels.top_columns(np.ascontiguousarray(s, np.float32), w, top)
            return top if every else live[top]
        dev = self._dev(xp)
        s = qr @ dev["cent"].T  # (Q, Nc)
        if l2:
            s = 2 * s - dev["cnorm"]
        s = xp.where(dev["live"], s, -np.inf)
        return xp.argsort(-s, axis=1)[:, :w]

    def _search_cpu(self, q, k, w, rr, exclusive):
        nq = len(q)
        min_group = BLOCK_MIN_GROUP_INT8 if self.quantization_bits == 8 else BLOCK_MIN_GROUP
        fused = nq <= FUSED_MAX_QUERIES or nq * w < min_group * self.n_clusters
        if fused:  # no BLAS at all: Numba reduction, routing and scoring
            return self._search_cpu_inner(q, k, w, rr, exclusive, fused)
        with blas_single_thread():  # many small GEMMs: a threaded BLAS only spins
            return self._search_cpu_inner(q, k, w, rr, exclusive, fused)

    def _search_cpu_inner(self, q, k, w, rr, exclusive, fused):
        nq = len(q)
        if fused:  # the reduction and routing in Numba too (a BLAS call would wake its threads)
            qr = q
            if self._T is not None:  # as the single-query path reduces (the same values)
                qr = np.empty((nq, self.global_dim), np.float32)
                kernels.reduce_queries(q, self._T, qr)
            top = np.empty((nq, w), np.int64)
            route = kernels.route_small if nq <= FUSED_MAX_QUERIES else kernels.route_many
            route(qr, self._centroids_t(), self._cnorm, self._size, self.distance == "l2", w, top)
        else:
            qr = np.ascontiguousarray(self._reduce(q), np.float32)  # (Q, Dg)
            top = self._route(qr, w, np)  # (Q, Wc)
        if not self._lazy_refit(top, exclusive):
            return None
        m = max(k, rr)
        ids = np.empty((nq, k), np.int64)  # the kernels write every row (padding included)
        scores = np.empty((nq, k), np.float32)
        l2 = self.distance == "l2"
        if fused:
            fn = kernels.fused_search_serial if nq <= SERIAL_MAX_QUERIES else kernels.fused_search
            bt, ct = self._mirror()
            int8 = ct is not None  # then read A's and B's 8-bit codes (4x less memory traffic)
            # queries handed out 4 at a time, not in one block per thread: on a busy machine a
            # descheduled worker then holds up 4 queries, not half the batch
            chunk = numba.set_parallel_chunksize(PARALLEL_CHUNK)
            try:
                fn(qr, q, top, self._adeq_t, self._ascale, self._apair if int8 else _NO_PAIRS,
                   ct if int8 else bt, self._bscale, int8, self._start, self._size, self._cap,
                   self._slot_id, self._norms, l2, self._data, m, k, rr > 0, ids, scores)
            finally:
                numba.set_parallel_chunksize(chunk)
        else:
            self._score_blocks(q, qr, top, w, m, k, rr, l2, ids, scores)
        return ids, scores

    def _score_blocks(self, q, qr, top, w, m, k, rr, l2, ids, scores):
        """Batched path: per visited cluster two GEMMs over its queries (clusters in parallel,
        :func:`kernels.score_clusters`), candidates kept per thread, then merge + re-rank.

        Two passes: first every query's best cluster, then (with each query's threshold set
        to the m-th best score found so far) the rest, so few candidates pass the threshold.
        """
        nq = len(q)
        parts = numba.config.NUMBA_NUM_THREADS  # thread ids of a parallel region are below this
        cap = 2 * m  # (a compaction keeps ~m: one per m new candidates at most)
        cand_s = np.empty((parts, nq, cap), np.float32)
        cand_i = np.empty((parts, nq, cap), np.int64)
        cand_n = np.zeros((parts, nq), np.int64)
        thresh = np.full(nq, -np.inf, np.float32)
        passes = [top[:, :1], top[:, 1:]] if w > 1 else [top]
        bt = self._mirror()[0]
        with blas_single_thread():
            for i, sub in enumerate(passes):
                rows = np.empty(sub.size, np.int64)  # (visits,) query of each visit, by cluster
                starts = np.empty(self.n_clusters + 1, np.int64)
                kernels.group_visits(sub, self.n_clusters, rows, starts)
                counts = np.diff(starts)
                visit = np.flatnonzero(counts * self._size)
                if not len(visit):
                    continue
                most = int(counts.max())
                scratch_q = np.empty((parts, most * qr.shape[1]), np.float32)
                scratch_t = np.empty((parts, most * max(self.rank, 1)), np.float32)
                scratch_s = np.empty((parts, int((counts * self._cap).max())), np.float32)
                scratch_n = np.empty((parts, int(self._size.max()) if l2 else 0), np.float32)
                kernels.score_clusters(qr, rows, starts, visit, self._adeq, bt, self._start,
                                       self._size, self._cap, self._slot_id, self._norms, l2, m,
                                       cand_s, cand_i, cand_n, thresh, scratch_q, scratch_t,
                                       scratch_s, scratch_n)
                if i + 1 < len(passes):
                    kernels.raise_thresholds(cand_s, cand_i, cand_n, m, thresh)
        kernels.merge_rerank(cand_s, cand_i, cand_n, self._data, q, l2, m, k, rr > 0, ids, scores)

    def _search_xp(self, q, k, w, rr, xp, exclusive):
        """Array-library path (CuPy, or NumPy as the reference): padded dense tensors."""
        dev = self._dev(xp)
        nq = len(q)
        qr = q if dev["T"] is None else q @ dev["T"]  # (Q, Dg)
        top = self._route(qr, w, xp)  # (Q, Wc)
        if self._overgrown:  # copy the routing to the host only when a refit may be due
            if not self._lazy_refit(to_numpy(top), exclusive):
                return None
            dev = self._dev(xp)
        m = max(k, rr)
        ids = xp.full((nq, k), -1, xp.int64)
        scores = xp.full((nq, k), -np.inf, xp.float32)
        maxsz = dev["bpad"].shape[1]
        chunk = max(1, int(2 ** 24 // max(1, w * maxsz * max(self.rank, 1))))
        for b in range(0, nq, chunk):
            tb = top[b:b + chunk]  # (q, Wc)
            t = xp.einsum("qg,qwgr->qwr", qr[b:b + chunk], dev["adeq"][tb])  # (q, Wc, Rk)
            s = xp.einsum("qwr,qwnr->qwn", t, dev["bpad"][tb])  # (q, Wc, maxsz)
            pid = dev["idpad"][tb]  # (q, Wc, maxsz)
            if self.distance == "l2":
                s = 2 * s - dev["norms"][xp.maximum(pid, 0)]
            s = xp.where(pid >= 0, s, -np.inf).reshape(len(tb), -1).astype(xp.float32)
            pid = pid.reshape(len(tb), -1)
            mm = min(m, s.shape[1])
            sel = _topk_xp(xp, s, pid, mm)  # (q, mm) positions
            cid = xp.take_along_axis(pid, sel, axis=1)
            cs = xp.take_along_axis(s, sel, axis=1)
            if rr > 0:
                rows = dev["data"][xp.maximum(cid, 0)]  # (q, mm, Dx)
                if self.distance == "l2":  # sums of squared differences (see _exact_scores)
                    diff = rows - q[b:b + chunk, None, :]
                    ex = -xp.einsum("qmd,qmd->qm", diff, diff)
                else:
                    ex = xp.einsum("qd,qmd->qm", q[b:b + chunk], rows)
                cs = xp.where(cid >= 0, ex, -np.inf).astype(xp.float32)
            elif self.distance == "l2":  # the approximate 2 q.x - |x|^2 as -|q - x|^2
                qb = q[b:b + chunk]
                cs = cs - xp.einsum("qd,qd->q", qb, qb)[:, None].astype(xp.float32)
            kk = min(k, mm)
            sel2 = _topk_xp(xp, cs, cid, kk)
            fi = xp.take_along_axis(cid, sel2, axis=1)
            fs = xp.take_along_axis(cs, sel2, axis=1)
            ids[b:b + chunk, :kk] = xp.where(fs > -np.inf, fi, -1)
            scores[b:b + chunk, :kk] = fs
        return ids, scores

    def _result(self, found, k, q, single, return_distances, xp):
        """The user's result from ``found`` = (ids, scores) (Q, min(k, N)): padded to k
        columns (-1, distance inf); ValueError naming k if that cannot be allocated."""
        ids, scores = found
        nq, have = ids.shape
        try:
            if have < k:
                pad_i = xp.full((nq, k), -1, xp.int64)
                pad_s = xp.full((nq, k), -np.inf, xp.float32)
                pad_i[:, :have] = ids
                pad_s[:, :have] = scores
                ids, scores = pad_i, pad_s
            return self._output(ids, scores, q, single, return_distances, xp)
        except (MemoryError, ValueError) as e:  # numpy: ValueError for "array is too big"
            if have == k and not isinstance(e, MemoryError):
                raise
            gib = nq * k * (20 if return_distances else 12) / 2 ** 30
            raise ValueError(f"k={k} asks for a ({nq}, {k}) result of {gib:.3g} GiB, which cannot "
                             f"be allocated ({type(e).__name__}); the index holds "
                             f"{len(self)} points (ids past them are -1)") from None

    def _output(self, ids, scores, q, single, return_distances, xp):
        """Scores are minus the distances (``q.x`` for ip, ``-|q - x|^2`` for l2)."""
        if not return_distances:
            return ids[0] if single else ids
        dist = -scores if self.distance == "ip" else xp.maximum(-scores, 0)
        dist = xp.where(ids >= 0, dist, np.inf).astype(xp.float32)
        return (ids[0], dist[0]) if single else (ids, dist)

    # ------------------------------------------------------------------ streaming inserts
    def add(self, new_points: np.ndarray) -> np.ndarray:
        """Insert points (Dx,) or (n_new, Dx); returns their ids (continuing from len(index)).

        Each point joins its nearest cluster and is searchable at once: its
        column of the cluster's B is ``P_c (T^T x)``, the least-squares fit of
        its inner products over the cluster's training queries, O(Dx Dg + Dg Rk)
        per point, no refit.  The cluster's low-rank basis is not updated until a
        refit (lazy, see ``refit_growth``, or :meth:`refit`).
        """
        x, _ = self._check_queries(new_points, "new_points", np)
        with self._lock.write():
            ids = self._add(x)
            if self.built and self.background:
                self._kick()
            return ids

    def _add(self, x):
        p = len(x)
        ids = np.arange(self._n, self._n + p, dtype=np.int64)
        self._grow_data(self._n + p)
        self._data[self._n:self._n + p] = x
        self._norms[self._n:self._n + p] = np.einsum("nd,nd->n", x, x)
        self._n += p
        self._device = {}
        if not self.built:
            return ids
        xr = self._reduce(x)  # (n_new, Dg)
        if p == 1:  # the decoding case, one point per step: two small Numba calls
            b = np.empty(self.rank, np.float32)
            c = kernels.assign_column(xr[0], self._cent, self._cnorm, self.distance == "l2",
                                      self._P, b)
            self._assign[ids[0]] = c
            slots = self._reserve(c, 1)
            self._slot_id[slots] = ids
            if self.quantization_bits == 8:
                lo = slots.start
                self._bscale[lo] = kernels.quantize_row_into(b, 127, self._bcodes[lo],
                                                             self._bdeq[lo])
            else:
                self._store_B(slots, b[None])
            return ids
        cs = xr @ self._cent.T  # (n_new, Nc)
        if self.distance == "l2":
            cs = 2 * cs - self._cnorm
        assign = np.argmax(cs, axis=1)
        self._assign[ids[0]:ids[-1] + 1] = assign
        for c in np.unique(assign):
            sel = np.flatnonzero(assign == c)
            self._place(int(c), ids[sel], xr[sel] @ self._P[c].T)  # (p_c, Rk)
        return ids

    def _place(self, c, ids, bt):
        slots = self._reserve(c, len(ids))
        self._slot_id[slots] = ids
        self._store_B(slots, bt)

    def _grow_data(self, need):
        cap = len(self._data)
        if need <= cap:
            return
        cap = max(need, 2 * cap)
        data = np.zeros((cap, self.dim), np.float32)
        data[: self._n] = self._data[: self._n]
        norms = np.zeros(cap, np.float32)
        norms[: self._n] = self._norms[: self._n]
        self._data, self._norms = data, norms
        if self.built:
            assign = np.zeros(cap, np.int64)
            assign[: self._n] = self._assign[: self._n]
            self._assign = assign

    def _reserve(self, c, p):
        """Slots for p more points of cluster c (moved to the end with doubled capacity if full)."""
        if self._size[c] + p > self._cap[c]:
            cap = max(2 * self._cap[c], self._size[c] + p, 8)
            if self._used + cap > len(self._bdeq):
                self._alloc_slots(max(2 * len(self._bdeq), self._used + cap), old=True)
            lo, n_c, new = self._start[c], self._size[c], self._used
            for name in ("_bdeq", "_slot_id", "_bscale", "_bcodes"):
                arr = getattr(self, name)
                if arr is not None:
                    arr[new:new + n_c] = arr[lo:lo + n_c]
            self._slot_id[lo:lo + n_c] = -1
            self._start[c] = new
            self._cap[c] = cap
            self._used += cap
        lo = self._start[c] + self._size[c]
        if not self._size[c]:
            self._n_live += 1
        self._size[c] += p
        self._tr_stale.add(int(c))  # new slots (or a moved cluster): the caller writes B next
        if self.refit_growth is not None and (
                self._size[c] > self._fit_size[c] * (1 + self.refit_growth)):
            self._overgrown.add(int(c))
        if self.max_cluster_size is not None and self._size[c] > self.max_cluster_size:
            self._oversized.add(int(c))
        return slice(lo, lo + p)

    def refit(self, clusters: Iterable[int] | None = None) -> None:
        """Refit the reduced-rank models of ``clusters`` (default: every cluster with new points).

        Uses the cluster's stored training-query Gram and its current members
        with beta = T^T x (the ``approximate=True`` coefficients; without a global
        reduction they are exact).  O(N_c Dg^2) per cluster.
        """
        self._require_built()
        if clusters is not None:
            cl = np.atleast_1d(np.asarray(clusters))
            if cl.ndim == 1 and cl.size == 0:  # an empty sequence: nothing to refit
                cl = cl.astype(np.int64)
            if cl.dtype.kind not in "iu" or cl.ndim != 1:
                raise TypeError(f"clusters must be an int or a 1-D sequence of ints, got {clusters!r}")
            bad = cl[(cl < 0) | (cl >= self.n_clusters)]
            if len(bad):
                raise ValueError(f"clusters must be in [0, {self.n_clusters}), got {int(bad[0])}")
        with self._lock.write():
            self._refit(np.flatnonzero(self._size != self._fit_size) if clusters is None
                        else cl.astype(np.int64))

    def _refit(self, cl):
        for c in cl:
            c = int(c)
            lo, n_c = self._start[c], self._size[c]
            pid = self._slot_id[lo:lo + n_c]
            beta = self._reduce(self._data[pid]).T  # (Dg, n_c)
            with blas_single_thread():
                self._fit(c, beta, self._gram[c].astype(np.float64))
            self._cgen[c] += 1
        self._overgrown.difference_update(int(c) for c in cl)
        self._device = {}

    def _stale_in(self, top):
        """Overgrown clusters among those in ``top`` (O(1) when none is overgrown)."""
        if not self._overgrown:
            return np.empty(0, np.int64)
        grown = np.fromiter(self._overgrown, np.int64)
        return grown[np.isin(grown, np.asarray(top))]

    def _lazy_refit(self, top, exclusive):
        """Refit the overgrown clusters among ``top``; False (nothing done) if that is due
        but the caller does not hold the index alone."""
        if self.background:  # the maintenance thread refits; searches never do
            return True
        stale = self._stale_in(top)
        if not len(stale):
            return True
        if not exclusive:
            return False
        self._refit(stale)
        return True


    # ------------------------------------------------------------------ maintenance
    def maintain(self) -> int:
        """Do every due maintenance job now, in the calling thread: split the clusters larger
        than ``max_cluster_size`` (largest first) and refit the ones grown past
        ``refit_growth`` (or, without it, any with points added since their fit).  Returns
        the number of jobs done.  With ``background`` this waits for the maintenance thread
        first; either way the result is the same as running the jobs one by one."""
        self._require_built()
        self.wait_maintenance()
        done = 0
        while True:
            with self._lock.read():
                job = self._take_job(every_stale=True)
            if job is None:
                return done
            result = self._compute_job(job)
            with self._lock.write():
                self._apply_job(job, result)
            done += 1

    def wait_maintenance(self, timeout: float | None = None) -> bool:
        """Wait until the maintenance thread has nothing left to do (True) or ``timeout``
        seconds pass (False).  An exception raised in the thread is raised here (once)."""
        with self._mlock:
            ok = self._mlock.wait_for(lambda: not self._worker_alive, timeout)
            err, self._maintenance_error = self._maintenance_error, None
        if err is not None:
            raise RuntimeError("the index's maintenance thread failed") from err
        return ok

    @property
    def maintenance_pending(self) -> bool:
        """Whether a maintenance job (split or refit) is due or running."""
        with self._lock.read():
            return self._worker_alive or self._take_job(peek=True) is not None

    def _kick(self):
        """Start the maintenance thread if a job is due and none runs (caller holds the write
        lock, so the thread cannot be between its last look and its exit)."""
        with self._mlock:
            if self._worker_alive or self._maintenance_error is not None:
                return
            short = len(self._data) - self._n < GROW_WHEN_FREE * len(self._data)
            if not (self._overgrown or self._oversized or short) or self._take_job(peek=True) is None:
                return
            self._worker_alive = True
        threading.Thread(target=self._worker, name="lorann-maintenance", daemon=True).start()

    def _worker(self):
        try:
            while True:
                with self._lock.read():
                    job = self._take_job()
                    if job is None:
                        with self._mlock:
                            self._worker_alive = False
                            self._mlock.notify_all()
                        return
                result = self._compute_job(job)  # no lock: searches and adds go on
                with self._lock.write():
                    self._apply_job(job, result)
        except BaseException as e:  # reported by wait_maintenance
            with self._mlock:
                self._maintenance_error = e
                self._worker_alive = False
                self._mlock.notify_all()

    def _take_job(self, peek=False, every_stale=False):
        """The next job as a snapshot of one cluster (caller holds the lock), or None.

        Splits first (the largest cluster above ``max_cluster_size``), then refits (the
        cluster grown most past ``refit_growth``; with ``every_stale``, any cluster with
        points added since its fit when ``refit_growth`` is None).  ``peek``: only whether
        there is one (returns True or None, no snapshot).
        """
        if self.background and len(self._data) - self._n < GROW_WHEN_FREE * len(self._data):
            if peek:
                return True
            return dict(kind="grow", c=None, n0=self._n, data=self._data, norms=self._norms)
        c, kind = None, None
        if self.max_cluster_size is not None:
            over = np.flatnonzero(self._size > self.max_cluster_size)
            self._oversized = set(int(j) for j in over)  # the maintained set, made exact
            over = [int(j) for j in over[np.argsort(-self._size[over], kind="stable")] if self._splittable(j)]
            if over:
                c, kind = over[0], "split"
        else:
            self._oversized = set()
        if c is None:
            if self.refit_growth is not None:
                due = self._size > self._fit_size * (1 + self.refit_growth)
            elif every_stale:
                due = self._size != self._fit_size
            else:
                due = None
            if due is not None and due.any():
                cand = np.flatnonzero(due)
                grow = self._size[cand] / np.maximum(self._fit_size[cand], 1)
                c, kind = int(cand[np.argmax(grow)]), "refit"
        if c is None:
            return None
        if peek:
            return True
        lo, n0 = self._start[c], int(self._size[c])
        ids = self._slot_id[lo:lo + n0].copy()
        return dict(kind=kind, c=c, gen=int(self._cgen[c]), ids=ids, pts=self._data[ids],
                    gram=np.asarray(self._gram[c], np.float64),
                    cent=self._cent[c].copy())

    def _splittable(self, c):
        """False once a split of c found its points alike (until c grows past that size)."""
        return self._size[c] > self._nosplit.get(c, -1)

    def _compute_job(self, job):
        """The heavy part of a job, without any lock: 2-means of the cluster's points (split)
        and the reduced-rank fit of each part."""
        if job["kind"] == "grow":  # rows below n0 never change: copy them with no lock held
            n0, cap = job["n0"], 2 * len(job["data"])
            data = np.zeros((cap, self.dim), np.float32)
            data[:n0] = job["data"][:n0]
            norms = np.zeros(cap, np.float32)
            norms[:n0] = job["norms"][:n0]
            return dict(data=data, norms=norms)
        xr = self._reduce(job["pts"])  # (n0, Dg)
        with blas_single_thread():
            if job["kind"] == "refit":
                return dict(fits=[self._fit_model(xr.T, job["gram"])])
            labels, cents = _two_means(xr, self.distance)
            if labels is None:
                return dict(fits=None)
            fits = [self._fit_model(xr[labels == j].T, job["gram"]) for j in (0, 1)]
        return dict(labels=labels, cents=cents, fits=fits)

    def _apply_job(self, job, result):
        """Swap a job's result in (caller holds the write lock); a cluster rewritten since the
        snapshot (its generation moved on) discards it."""
        if job["kind"] == "grow":
            if self._data is not job["data"]:  # an add outgrew it meanwhile (and copied it itself)
                self.maintenance_jobs["discarded"] += 1
                return
            data, norms, n0, n = result["data"], result["norms"], job["n0"], self._n
            data[n0:n] = self._data[n0:n]  # the rows added meanwhile
            norms[n0:n] = self._norms[n0:n]
            assign = np.zeros(len(data), np.int64)
            assign[:n] = self._assign[:n]
            self._data, self._norms, self._assign = data, norms, assign
            self._device = {}
            self.maintenance_jobs["grow"] += 1
            return
        c = job["c"]
        if self._cgen[c] != job["gen"]:
            self.maintenance_jobs["discarded"] += 1
            return
        n0 = len(job["ids"])
        lo, n_now = self._start[c], int(self._size[c])
        extra = self._slot_id[lo + n0:lo + n_now].copy()  # added since the snapshot, in order
        xe = self._reduce(self._data[extra]) if len(extra) else None  # (n_extra, Dg)
        if job["kind"] == "refit":
            A, Bt, P = result["fits"][0]
            bt = Bt if xe is None else np.concatenate([Bt, xe @ P.T])
            self._store_model(c, A, P, job["gram"])
            self._store_B(slice(lo, lo + n_now), bt)
            self._fit_size[c] = n0
            self._after_rewrite(c)
            self.maintenance_jobs["refit"] += 1
            return
        if result["fits"] is None:  # all points alike: leave it until it grows
            self._nosplit[c] = n_now
            self.maintenance_jobs["discarded"] += 1
            return
        labels, cents = result["labels"], result["cents"]
        side_e = np.zeros(0, np.int64)
        if xe is not None:
            s = xe @ cents.T  # (n_extra, 2)
            if self.distance == "l2":
                s = 2 * s - np.einsum("cg,cg->c", cents, cents)
            side_e = np.argmax(s, axis=1)
        c2 = self.n_clusters
        self._grow_clusters(c2 + 1)
        parts = []
        for j, cj in ((0, c), (1, c2)):
            A, Bt, P = result["fits"][j]
            ids = np.concatenate([job["ids"][labels == j], extra[side_e == j]])
            bt = Bt if xe is None else np.concatenate([Bt, xe[side_e == j] @ P.T])
            parts.append((cj, ids, bt, int(np.count_nonzero(labels == j)), A, P))
        self._slot_id[lo:lo + n_now] = -1
        self._size[c] = 0
        self._n_live -= 1
        for cj, ids, bt, n_fit, A, P in parts:
            self._cent[cj] = cents[0 if cj == c else 1]
            self._cnorm[cj] = float(cents[0 if cj == c else 1] @ cents[0 if cj == c else 1])
            self._store_model(cj, A, P, job["gram"])
            self._fit_size[cj] = n_fit
            slots = self._reserve(cj, len(ids))
            self._slot_id[slots] = ids
            self._store_B(slots, bt)
            self._assign[ids] = cj
            self._after_rewrite(cj)
        self._nosplit.pop(c, None)
        self.maintenance_jobs["split"] += 1

    def _store_model(self, c, A, P, gram):
        self._store_A(c, A)
        self._P[c] = P
        self._gram[c] = np.asarray(gram, np.float32)

    def _after_rewrite(self, c):
        self._cgen[c] += 1
        self._cent_tr = None  # a split moved its centroids in place
        self._tr_stale.add(int(c))
        self._device = {}
        if self.refit_growth is not None and self._size[c] > self._fit_size[c] * (1 + self.refit_growth):
            self._overgrown.add(int(c))
        else:
            self._overgrown.discard(int(c))

    _CLUSTER_ARRAYS = ("_cent", "_cnorm", "_adeq", "_adeq_t", "_acodes", "_apair", "_ascale", "_P", "_size",
                       "_fit_size", "_cap", "_start", "_cgen")

    def _grow_clusters(self, n, capacity=None):
        """Make room for n clusters: every per-cluster array becomes a view of the first n rows of
        a buffer with doubling capacity (a split appends one cluster, copying only on doubling;
        ``capacity``: at least this many rows when a buffer is made); the new rows are zero (an
        empty cluster, capacity 0)."""
        old = self.n_clusters
        for name in self._CLUSTER_ARRAYS:
            arr = getattr(self, name)
            if arr is None:
                continue
            buf = self._cbuf.get(name)
            if buf is None or len(buf) < n:
                cap = max(n, 2 * old, 8, capacity or 0)
                buf = np.zeros((cap,) + arr.shape[1:], arr.dtype)
                buf[:old] = arr[:old]
                self._cbuf[name] = buf
            buf[old:n] = 0
            setattr(self, name, buf[:n])
        if n > old:
            self._start[old:n] = self._used
            self._gram.extend([None] * (n - old))
        self.n_clusters = n

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the index atomically to ``path`` (the :mod:`topkattn.storage` container:
        versioned .npz, JSON header, SHA-256 per array)."""
        self._require_built()
        from topkattn.ann import persist

        _check_path(path)
        with self._lock.read():
            persist.save_index(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LorannIndex":
        """Load an index written by :meth:`save`.

        :class:`topkattn.storage.StorageError` (a ValueError) naming the file if it is
        truncated, corrupt, newer, not an index (e.g. a ``.npy`` array) or inconsistent
        (ids, sizes, shapes or parameters that do not fit together); FileNotFoundError (also
        a StorageError) if missing; TypeError if ``path`` is not a path.
        """
        from topkattn.ann import persist

        _check_path(path)
        return persist.load_index(cls, path)

    def search_state(self) -> dict[str, Any]:
        """The built index's search state as host arrays, for scoring kernels outside ``ann/``.

        A dict: ``T`` (global projection or None), ``cent``/``cnorm`` (centroids, their
        squared norms), ``a``/``ascale`` (per-cluster A: 8/4-bit codes and per-row scales,
        or float32 with unit scales when unquantised), ``b``/``bscale`` (per-slot B rows),
        ``start``/``size`` (each cluster's slot range), ``slot_id`` (point of each slot),
        ``norms`` (squared point norms), ``data`` (the points), ``bits`` (0 = float32),
        ``rank`` and ``l2`` (distance).  The arrays are copies, a consistent snapshot taken
        with the index's read lock: later ``add`` calls do not change them.
        """
        self._require_built()
        with self._lock.read():
            return {name: val.copy() if isinstance(val, np.ndarray) else val
                    for name, val in self._search_state().items()}

    def _search_state(self):
        bits = self.quantization_bits
        if bits is None:
            a, b = self._adeq, self._bdeq
            ascale, bscale = np.ones((self.n_clusters, self.rank), np.float32), np.ones(len(b), np.float32)
        else:
            a, b, ascale, bscale = self._acodes, self._bcodes, self._ascale, self._bscale
        return dict(T=self._T, cent=self._cent, cnorm=self._cnorm, a=a, ascale=ascale, b=b, bscale=bscale,
                    start=self._start, size=self._size, slot_id=self._slot_id, norms=self._norms[:self.n_samples],
                    data=self._data[: self._n], bits=0 if bits is None else int(bits), rank=int(self.rank),
                    l2=self.distance == "l2")

    # ------------------------------------------------------------------ helpers
    def _require_built(self):
        if not self.built:
            raise RuntimeError("the index is not built: call build() before searching")

    def _check_queries(self, q, name, xp):
        if xp is np:
            q = _as_matrix(q, name, allow_1d=True)
        elif q.dtype.kind not in "fiu":
            raise TypeError(f"{name} must be real-valued, got dtype {q.dtype}")
        single = q.ndim == 1
        q2 = q[None, :] if single else q
        if q2.ndim != 2 or q2.shape[1] != self.dim:
            raise ValueError(f"{name} must have shape ({self.dim},) or (n, {self.dim}), "
                             f"got {tuple(q.shape)}")
        if xp is not np:
            q2 = q2.astype(xp.float32)
            if not bool(xp.isfinite(q2).all()):
                raise ValueError(f"{name} contains non-finite values")
        elif q2.dtype != np.float32 or not q2.flags.c_contiguous:
            with np.errstate(over="ignore"):  # overflow is reported below
                q2 = np.ascontiguousarray(q2, dtype=np.float32)
            if q2.dtype != q.dtype and not np.isfinite(q2).all():
                raise ValueError(f"{name} has values outside the float32 range")
        with np.errstate(over="ignore"):
            _check_norms(xp.einsum("qd,qd->q", q2, q2), name, xp)
        return q2, single

    def _dev(self, xp):
        """Device copies (and padded per-cluster tensors) of the search state for ``xp``.

        Called with the read lock held: the state is frozen then, so concurrent callers build
        equal dicts; writers reset the cache (``self._device = {}``) holding the index alone.
        """
        key = xp.__name__
        if key in self._device:
            return self._device[key]
        d = {"data": xp.asarray(self._data[: self._n]), "norms": xp.asarray(self._norms[: self._n]),
             "T": None if self._T is None else xp.asarray(self._T)}
        if self.built:
            c = self.n_clusters
            maxsz = max(1, int(self._size.max()))
            bpad = np.zeros((c, maxsz, self.rank), np.float32)
            idpad = np.full((c, maxsz), -1, np.int64)
            for ci in range(c):
                lo, n_c = self._start[ci], self._size[ci]
                bpad[ci, :n_c] = self._bdeq[lo:lo + n_c]
                idpad[ci, :n_c] = self._slot_id[lo:lo + n_c]
            d.update(cent=xp.asarray(self._cent), cnorm=xp.asarray(self._cnorm),
                     adeq=xp.asarray(self._adeq), bpad=xp.asarray(bpad),
                     idpad=xp.asarray(idpad), live=xp.asarray(self._size > 0))
        self._device[key] = d
        return d


def _two_means(xr, distance, iters=8):
    """Split points xr (n, Dg) in two: labels (n,) int64 in {0, 1} and centroids (2, Dg)
    float32 (unit length for ``ip``), or (None, None) when the points are all alike.
    Starts from the halves across the top principal axis (deterministic), then Lloyd
    iterations; side 0 holds the first point."""
    side = kmeans._split(xr)  # True: the side without xr[0]
    if side is None:
        return None, None
    labels = side.astype(np.int64)
    cents = np.stack([kmeans._centre(xr[labels == j], distance) for j in (0, 1)])
    for _ in range(iters):
        s = kmeans.centroid_scores(xr, cents, distance)
        new = np.argmax(s, axis=1).astype(np.int64)
        if new[0] == 1:  # keep xr[0] on side 0
            new = 1 - new
        if (new == labels).all() or new.min() == new.max():
            break
        labels = new
        cents = np.stack([kmeans._centre(xr[labels == j], distance) for j in (0, 1)])
    return labels, cents


def _mean_gram(q):
    """The mean outer product (Dg, Dg) float64 of the rows of q (Qt, Dg)."""
    q64 = q.astype(np.float64)
    return (q64.T @ q64) / max(len(q64), 1)


def _cluster_gram(qx, mean_gram, n_points):
    """A cluster's training-query Gram (Dg, Dg) float64: its queries' qx (Qt_c, Dg) Gram plus
    ``n_points - Qt_c`` times the mean Gram of all training queries when it has fewer
    queries than points (shrinkage to the global query distribution: a cluster with few
    queries still learns the directions queries take; the reference uses the points)."""
    q64 = qx.astype(np.float64)
    gram = q64.T @ q64
    if len(qx) < n_points:
        gram += mean_gram * (n_points - len(qx))
    return gram


def _check_distance(distance):
    """The distance's string: ``"ip"``/``"l2"`` (any case) or the int constants IP/L2."""
    if isinstance(distance, numbers.Integral) and not isinstance(distance, bool):
        if int(distance) not in _DISTANCE_CODES:
            raise ValueError(f"distance must be IP ({IP}), L2 ({L2}), 'ip' or 'l2', "
                             f"got {distance!r}")
        return _DISTANCE_CODES[int(distance)]
    if not isinstance(distance, str):
        raise TypeError(f"distance must be IP, L2 (ints) or a string 'ip'/'l2', "
                        f"got {type(distance).__name__} {distance!r}")
    return check_choice("distance", distance.lower(), _DISTANCES)


def _check_threads(n_threads):
    """-1 (Numba's current count) or a positive thread count, clamped to Numba's pool."""
    n_threads = check_int("n_threads", n_threads)
    if n_threads == -1:
        return -1
    if n_threads < 1:
        raise ValueError(f"n_threads must be -1 (all) or >= 1, got {n_threads}")
    return min(n_threads, numba.config.NUMBA_NUM_THREADS)


@contextlib.contextmanager
def _numba_threads(n_threads):
    """Numba's thread count set to ``n_threads`` for the calling thread (Numba keeps it per
    thread), restored on exit; -1 leaves it alone."""
    if n_threads == -1:
        yield
        return
    before = numba.get_num_threads()
    numba.set_num_threads(n_threads)
    try:
        yield
    finally:
        numba.set_num_threads(before)


def _topk_xp(xp, s, ids, k):
    """Positions (Q, k) of the k largest scores per row, ties to the lower id, best first."""
    o1 = xp.argsort(ids, axis=1, kind="stable") if xp is np else xp.argsort(ids, axis=1)
    s1 = xp.take_along_axis(s, o1, axis=1)
    o2 = xp.argsort(-s1, axis=1, kind="stable") if xp is np else xp.argsort(-s1, axis=1)
    return xp.take_along_axis(o1, o2[:, :k], axis=1)


def _group(labels, c, div=1):
    """Indices (divided by ``div``) grouped by label: a list of Nc int64 arrays."""
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels, minlength=c)
    splits = np.split(order // div, np.cumsum(counts)[:-1])
    return splits


def _check_path(path):
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__} {path!r}")


def _code_cols(n, bits):
    return n if bits == 8 else (n + 1) // 2


def _as_matrix(x, name, allow_1d=False):
    if is_cupy_array(x):
        x = x.get()
    try:
        x = np.asarray(x)
    except Exception as e:
        raise TypeError(f"{name} must be an array, got {type(x).__name__}") from e
    if x.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be real-valued, got dtype {x.dtype}")
    if not (x.ndim == 2 or (allow_1d and x.ndim == 1)):
        want = "1-D or 2-D" if allow_1d else "2-D"
        raise ValueError(f"{name} must be {want}, got shape {x.shape}")
    if x.size == 0 and x.ndim == 2 and x.shape[0] == 0:
        raise ValueError(f"{name} must not be empty, got shape {x.shape}")
    if x.dtype.kind == "f" and not _all_finite(x):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    return x


def _check_norms(sq_norms, name, xp):
    """ValueError naming ``name`` when a row's float32 squared norm is above MAX_SQUARED_NORM (or
    overflowed): the index's products of such rows could overflow float32."""
    top = float(sq_norms.max()) if sq_norms.size else 0.0
    if not top <= MAX_SQUARED_NORM:
        raise ValueError(f"{name} has rows of squared norm {top:.3g}, above the supported 2^124 = "
                         f"{MAX_SQUARED_NORM:.3g} (products of such rows overflow float32); scale the "
                         f"vectors down")


def _all_finite(x, rows=16384):
    """np.isfinite(x).all() in row blocks (no full-size boolean temporary for a million rows)."""
    if x.ndim < 2 or len(x) <= rows:
        return bool(np.isfinite(x).all())
    return all(bool(np.isfinite(x[lo:lo + rows]).all()) for lo in range(0, len(x), rows))

