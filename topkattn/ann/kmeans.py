"""k-means for the IVF partition: spherical (inner product) or Euclidean, optionally balanced.

Shape letters (the ANN index's own): N points, Nc clusters, Dx dimension, Wc clusters kept per
point.
Scores are "larger is nearer": inner product ``x.c`` with unit-norm centroids for
``ip``; ``2 x.c - |c|^2`` (= |x|^2 - |x - c|^2) for ``l2``.

Many clusters (Nc >= TREE_MIN_CLUSTERS): assigning N points to the nearest of Nc centroids
costs N Nc Dx, which at a million points and a thousand clusters is most of a build.  A
two-level search (:func:`assign_nearest`) groups the centroids into about sqrt(Nc) groups;
each point scores the group centres, then only the centroids of its TREE_PROBE best groups:
N (sqrt(Nc) + TREE_PROBE sqrt(Nc)) Dx, ~6x less at Nc = 1024.  A point whose nearest
centroid sits in none of those groups gets the best centroid found instead (rare; the
partition stays a valid IVF partition, it only loses a little balance).
"""
import numba as nb
import numpy as np

from topkattn.ann import kernels
from topkattn.threads import blas_single_thread, njit

BLOCK = 8192
TREE_BLOCK = 65536  # points per pass of the two-level search (bigger GEMMs per group)
FEW_COLUMNS = 16  # nearest_clusters keeps up to this many per point with an insertion buffer
SPLIT_POWER_ITERATIONS = 30  # power iterations for a split's principal axis
TREE_MIN_CLUSTERS = 384  # from this many centroids on, assignments use the two-level search
TREE_PROBE = 4  # groups searched per point by the two-level search
TREE_ITERATIONS = 5  # Lloyd iterations grouping the centroids


def centroid_scores(x: np.ndarray, centroids: np.ndarray, distance: str,
                    cnorm: np.ndarray | None = None) -> np.ndarray:
    """(N, Nc) float32 scores of points ``x`` (N, Dx) against ``centroids`` (Nc, Dx)."""
    s = x @ centroids.T  # (N, Nc)
    if distance == "l2":
        if cnorm is None:
            cnorm = np.einsum("cd,cd->c", centroids, centroids)
        s *= 2
        s -= cnorm
    return s


def nearest_clusters(x: np.ndarray, centroids: np.ndarray, w: int, distance: str) -> np.ndarray:
    """Indices (N, Wc) int64 of the ``w`` best clusters per point, best first (ties to lower id)."""
    n = len(x)
    c = len(centroids)
    w = min(w, c)
    out = np.empty((n, w), np.int64)
    cnorm = np.einsum("cd,cd->c", centroids, centroids)
    for b in range(0, n, BLOCK):
        s = centroid_scores(x[b:b + BLOCK], centroids, distance, cnorm)  # (n_b, Nc)
        if w == 1:
            out[b:b + BLOCK, 0] = np.argmax(s, axis=1)
            continue
        fn = kernels.top_few_columns if w <= FEW_COLUMNS else kernels.top_columns
        fn(np.ascontiguousarray(s, np.float32), w, out[b:b + BLOCK])
    return out


def kmeans(x: np.ndarray, n_clusters: int, *, distance: str = "ip", iters: int = 10,
           sample_size: int | None = None, balanced: bool = False,
           rng: int | np.random.Generator | None = None) -> np.ndarray:
    """Train ``n_clusters`` centroids (Nc, Dx) float32 on ``x`` (N, Dx).

    Lloyd iterations on a random sample of ``sample_size`` rows (all rows if None);
    initial centroids are distinct sampled rows; an emptied cluster is re-seeded by
    splitting the largest cluster that can be split (:func:`fill_empty`).  ``ip``
    normalises centroids to unit length (spherical k-means).  ``balanced`` finishes with capacity-constrained
    assignment passes (see :func:`balanced_assign`) over all rows.
    """
    rng = np.random.default_rng(rng)
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    if not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters must be in [1, {n}], got {n_clusters}")
    train = x
    if sample_size is not None and sample_size < n:
        train = x[np.sort(rng.choice(n, sample_size, replace=False))]
    cent = train[rng.choice(len(train), n_clusters, replace=False)].copy()  # (Nc, Dx)
    _postprocess(cent, distance)
    for _ in range(iters):
        assign = assign_nearest(train, cent, distance, rng=rng)
        cent, _ = _update(train, assign, n_clusters, cent)
        fill_empty(train, cent, assign, distance)
        _postprocess(cent, distance)
    if balanced:
        for _ in range(2):
            assign = balanced_assign(x, cent, distance)
            cent, sizes = _update(x, assign, n_clusters, cent)
            _postprocess(cent, distance)
    return cent


def assign_nearest(x: np.ndarray, centroids: np.ndarray, distance: str, *,
                   rng: int | np.random.Generator | None = 0) -> np.ndarray:
    """The nearest centroid (N,) int64 of every point of ``x`` (N, Dx) among ``centroids`` (Nc, Dx).

    Exact (ties to the lower id) below TREE_MIN_CLUSTERS centroids; from there the
    two-level search of the module docstring (``rng`` seeds the grouping of the centroids).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    c = len(centroids)
    if c < TREE_MIN_CLUSTERS:
        out = np.empty(len(x), np.int64)
        cnorm = np.einsum("cd,cd->c", centroids, centroids)
        for b in range(0, len(x), BLOCK):
            out[b:b + BLOCK] = np.argmax(centroid_scores(x[b:b + BLOCK], centroids, distance, cnorm), axis=1)
        return out
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    groups, members = _group_centroids(centroids, distance, rng)
    starts = np.zeros(len(members) + 1, np.int64)
    starts[1:] = np.cumsum([len(m) for m in members])
    flat = np.concatenate(members).astype(np.int64)
    cnorm = np.einsum("cd,cd->c", centroids, centroids)
    out = np.empty(len(x), np.int64)
    probe = min(TREE_PROBE, len(groups))
    parts = nb.config.NUMBA_NUM_THREADS  # thread ids of a parallel region are below this
    most_m = int(np.diff(starts).max())
    with blas_single_thread():
        for b in range(0, len(x), TREE_BLOCK):
            xb = x[b:b + TREE_BLOCK]
            top = nearest_clusters(xb, groups, probe, distance)  # (n_b, probe) groups
            rows = np.empty(top.size, np.int64)
            vstarts = np.empty(len(groups) + 1, np.int64)
            kernels.group_visits(top, len(groups), rows, vstarts)
            most_n = int(np.diff(vstarts).max())
            scratch_x = np.empty((parts, most_n * x.shape[1]), np.float32)
            scratch_s = np.empty((parts, most_n * max(most_m, 1)), np.float32)
            best_s = np.full(top.shape, -np.inf, np.float32)
            best_i = np.full(top.shape, -1, np.int64)
            kernels.nearest_in_groups(xb, centroids, cnorm, distance == "l2", top, rows, vstarts, starts, flat,
                                      scratch_x, scratch_s, best_s, best_i)
            kernels.best_of_probes(best_s, best_i, out[b:b + TREE_BLOCK])
    lost = np.flatnonzero(out < 0)  # every probed group empty: search them all
    if len(lost):
        out[lost] = np.argmax(centroid_scores(x[lost], centroids, distance, cnorm), axis=1)
    return out


def _group_centroids(cent, distance, rng):
    """Group centres (G, Dx) and each group's centroid ids (ascending int64 arrays) for
    :func:`assign_nearest`: a few Lloyd iterations over the centroids, G ~ sqrt(Nc)."""
    c = len(cent)
    g = int(np.ceil(np.sqrt(c)))
    rng = np.random.default_rng(rng)
    centres = cent[np.sort(rng.choice(c, g, replace=False))].copy()
    for _ in range(TREE_ITERATIONS):
        a = np.argmax(centroid_scores(cent, centres, distance), axis=1)
        centres, _ = _update(cent, a, g, centres)
        _postprocess(centres, distance)
    a = np.argmax(centroid_scores(cent, centres, distance), axis=1)
    order = np.argsort(a, kind="stable")
    members = np.split(order, np.cumsum(np.bincount(a, minlength=g))[:-1])
    return centres, members


def _update(x, assign, c, old):
    sizes = np.bincount(assign, minlength=c)
    sums = np.zeros((c, x.shape[1]), np.float64)
    _segment_sum(sums, x, assign)
    cent = old.copy()
    nz = sizes > 0
    cent[nz] = (sums[nz] / sizes[nz, None]).astype(np.float32)
    return cent, sizes


@njit(cache=True, nogil=True)
def _segment_sum(sums, x, assign):
    for i in range(x.shape[0]):
        a = assign[i]
        for j in range(x.shape[1]):
            sums[a, j] += x[i, j]


def fill_empty(x: np.ndarray, cent: np.ndarray, assign: np.ndarray, distance: str) -> int:
    """Give every empty cluster half of the largest cluster that can be split (in place).

    x (N, Dx) points, cent (Nc, Dx) centroids, assign (N,) int64 cluster of each point.  An
    empty cluster takes the largest cluster (ties to the lower id) whose points are not all
    alike and splits it across the direction of its greatest spread (its top principal
    axis, at the mean): the side without the cluster's first point moves, and both
    centroids become the means of their points.  Deterministic.  A cluster stays empty only
    when no cluster can be split (e.g. identical points).  Returns how many stay empty.
    """
    c = len(cent)
    sizes = np.bincount(assign, minlength=c)
    stuck = np.zeros(c, bool)  # clusters found unsplittable
    for i in np.flatnonzero(sizes == 0):
        while True:
            cand = np.flatnonzero((sizes >= 2) & ~stuck)
            if not len(cand):
                return int(np.count_nonzero(sizes == 0))
            j = cand[np.argmax(sizes[cand])]  # the largest, ties to the lower id
            members = np.flatnonzero(assign == j)
            side = _split(x[members])
            if side is None:
                stuck[j] = True
                continue
            assign[members[side]] = i
            cent[i] = _centre(x[members[side]], distance)
            cent[j] = _centre(x[members[~side]], distance)
            sizes[i] = np.count_nonzero(side)
            sizes[j] -= sizes[i]
            break
    return 0


def _split(xs):
    """Bool mask (n,) of the points of xs (n, Dx) on one side of their top principal axis
    through the mean (not the side of xs[0]), or None when all the points are alike."""
    x64 = xs.astype(np.float64)
    centred = x64 - x64.mean(axis=0)
    axis = _top_axis(centred)
    if axis is None:
        return None
    proj = centred @ axis  # (n,) sums to zero
    side = proj > 0
    if not side.any() or side.all():  # no spread along the axis: the points are alike
        return None
    return side if not side[0] else ~side


def _top_axis(centred, iters=SPLIT_POWER_ITERATIONS):
    """The top principal axis (Dx,) of centred rows (n, Dx) by power iteration on C^T C (never
    formed: two thin products a step; a full eigendecomposition of the (Dx, Dx) covariance
    took 10-500 ms at Dx = 288), from the row of largest norm; None if every row is zero."""
    norms = np.einsum("nd,nd->n", centred, centred)
    if not norms.max(initial=0.0) > 0:
        return None
    v = centred[int(np.argmax(norms))].copy()
    for _ in range(iters):
        v = centred.T @ (centred @ v)
        nv = np.sqrt(v @ v)
        if not nv > 0:
            return None
        v /= nv
    return v


def _centre(xs, distance):
    """The centroid of the points xs (n, Dx): their mean (``ip``: scaled to unit length)."""
    mean = xs.astype(np.float64).mean(axis=0)
    if distance == "ip":
        norm = np.sqrt(mean @ mean)
        if norm > 0:
            mean = mean / norm
    return mean.astype(np.float32)


def _postprocess(cent, distance):
    if distance == "ip":
        norm = np.linalg.norm(cent, axis=1)
        nz = norm > 0
        cent[nz] /= norm[nz, None]


def balanced_assign(x: np.ndarray, centroids: np.ndarray, distance: str, slack: float = 0.05,
                    candidates: int = 16) -> np.ndarray:
    """Assign each row of ``x`` to one cluster with at most ceil(N/Nc*(1+slack)) rows per cluster.

    Rows are placed in order of confidence (gap between their best and
    ``candidates``-th best cluster score, largest first); each takes its best cluster
    that still has room, falling back to the best open cluster overall.
    Returns (N,) int64.
    """
    n, c = len(x), len(centroids)
    cap = int(np.ceil(n / c * (1 + slack)))
    w = min(candidates, c)
    pref = nearest_clusters(x, centroids, w, distance)  # (N, Wc)
    cnorm = np.einsum("cd,cd->c", centroids, centroids)
    best = np.einsum("nd,nd->n", x, centroids[pref[:, 0]])
    worst = np.einsum("nd,nd->n", x, centroids[pref[:, -1]])
    if distance == "l2":
        best = 2 * best - cnorm[pref[:, 0]]
        worst = 2 * worst - cnorm[pref[:, -1]]
    order = np.argsort(-(best - worst), kind="stable")
    assign = np.full(n, -1, np.int64)
    counts = np.zeros(c, np.int64)
    left = _greedy_fill(order, pref, cap, counts, assign)
    if len(left):  # rows whose candidates were all full: best open cluster by score
        for i in left:
            s = centroid_scores(x[i:i + 1], centroids, distance, cnorm)[0]
            s[counts >= cap] = -np.inf
            a = int(np.argmax(s))
            assign[i] = a
            counts[a] += 1
    return assign


@njit(cache=True, nogil=True)
def _greedy_fill(order, pref, cap, counts, assign):
    left = []
    for i in order:
        placed = False
        for j in range(pref.shape[1]):
            a = pref[i, j]
            if counts[a] < cap:
                counts[a] += 1
                assign[i] = a
                placed = True
                break
        if not placed:
            left.append(i)
    return np.array(left, dtype=np.int64) if len(left) else np.empty(0, np.int64)
