"""Tests for the LorannIndex build's fast parts: subspace-iteration eigenvectors, the two-level
nearest-centroid search, the small top-w kernel and the query-Gram shrinkage.

Each compares against a plain NumPy reference (``eigh``, a full argmax, ``argsort``).
"""
import numpy as np
import pytest

from topkattn.ann import LorannIndex, kernels, kmeans, rrr
from topkattn.ann.index import _cluster_gram, _mean_gram


def _spd(g, spectrum, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((g, g)))
    return (q * spectrum) @ q.T


@pytest.mark.parametrize("kind,atol", [("decay", 1e-4), ("gap", 2e-6)])
def test_top_eigh_subspace_matches_eigh(kind, atol):
    """Above SUBSPACE_MIN_DIM the top eigenpairs come from subspace iteration: eigenvalues to
    1e-6 relative, and the eigenvectors span the same space as eigh's (to 2e-6 with a clear
    gap after the r-th eigenvalue, to 1e-4 in a slowly decaying spectrum)."""
    g, r = 160, 12
    assert g >= rrr.SUBSPACE_MIN_DIM
    if kind == "decay":
        spec = 1.0 / np.arange(1, g + 1) ** 1.5
    else:
        spec = np.concatenate([np.linspace(10, 5, r), np.linspace(1, 0.1, g - r)])
    m = _spd(g, spec, 0)
    w, u = rrr.top_eigh(m, r)
    wr, ur = np.linalg.eigh(m)
    wr, ur = wr[::-1][:r], ur[:, ::-1][:, :r]
    np.testing.assert_allclose(w, wr, rtol=1e-6)
    np.testing.assert_allclose(u.T @ u, np.eye(r), atol=1e-12)
    # the projector onto the found space equals eigh's
    np.testing.assert_allclose(u @ u.T, ur @ ur.T, atol=atol)
    # deterministic: the same matrix gives the same vectors
    np.testing.assert_array_equal(rrr.top_eigh(m, r)[1], u)


def test_top_eigh_flat_spectrum_captures_nearly_all_energy():
    """In a flat spectrum (any r-dim subspace captures >= 95.6% here) subspace iteration still
    captures within 2% of the optimum."""
    g, r = 200, 32
    m = _spd(g, 1.0 + 0.05 * np.random.default_rng(1).random(g), 2)
    _, u = rrr.top_eigh(m, r)
    best = np.sort(np.linalg.eigvalsh(m))[::-1][:r].sum()
    assert np.trace(u.T @ m @ u) >= 0.98 * best


def test_fit_cluster_subspace_path_places_points_consistently():
    """Big Dg (subspace path): A, P and B fit together -- every point's column of B is P b
    (what add() would give it), and the fitted scores are close to the exact rank-r fit."""
    rng = np.random.default_rng(3)
    g, n, m, r = 128, 300, 600, 16
    beta = (rng.standard_normal((g, n)) * np.linspace(3, 0.2, g)[:, None]).astype(np.float32)
    x = rng.standard_normal((m, g)) * np.linspace(2, 0.5, g)
    A, Bt, P = rrr.fit_cluster(beta, x.T @ x, r)
    np.testing.assert_allclose((P @ beta.astype(np.float64)).T, Bt, atol=1e-4 * np.abs(Bt).max())
    yhat = x @ beta
    _, _, vt = np.linalg.svd(yhat, full_matrices=False)
    best = yhat @ vt[:r].T @ vt[:r]
    err = np.linalg.norm(x @ A @ Bt.T - yhat)
    assert err <= 1.001 * np.linalg.norm(best - yhat)


@pytest.mark.parametrize("distance", ["ip", "l2"])
def test_two_level_assignment_matches_exact_on_clustered_points(distance):
    """Clustered points (each near one centroid): the two-level search returns the exact
    nearest centroid for at least 99% of them (it misses only when that centroid sits in
    none of the probed groups) and never a worse one than the point's own centre."""
    rng = np.random.default_rng(4)
    c, d = 400, 24
    assert c >= kmeans.TREE_MIN_CLUSTERS
    cent = rng.standard_normal((c, d)).astype(np.float32)
    if distance == "ip":
        cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    gen = rng.integers(0, c, 3000)  # the centroid each point was drawn around
    x = (cent[gen] + 0.05 * rng.standard_normal((3000, d))).astype(np.float32)
    got = kmeans.assign_nearest(x, cent, distance, rng=0)
    scores = kmeans.centroid_scores(x, cent, distance)
    exact = np.argmax(scores, axis=1)
    assert (got == exact).mean() >= 0.99
    rows = np.arange(len(x))
    assert (scores[rows, got] >= scores[rows, gen]).mean() >= 0.99


def test_nearest_in_groups_equals_argmax_over_candidates():
    """Random (unclustered) points: each point's answer is the best of exactly the centroids
    of its probed groups (ties to the lower id), as a NumPy argmax over them finds."""
    rng = np.random.default_rng(5)
    c, d, n = 300, 16, 700
    cent = np.round(rng.standard_normal((c, d)), 1).astype(np.float32)  # rounding makes ties
    x = np.round(rng.standard_normal((n, d)), 1).astype(np.float32)
    groups, members = kmeans._group_centroids(cent, "l2", 0)
    gstarts = np.zeros(len(members) + 1, np.int64)
    gstarts[1:] = np.cumsum([len(m) for m in members])
    flat = np.concatenate(members).astype(np.int64)
    top = kmeans.nearest_clusters(x, groups, 3, "l2")
    rows = np.empty(top.size, np.int64)
    vstarts = np.empty(len(groups) + 1, np.int64)
    kernels.group_visits(top, len(groups), rows, vstarts)
    most_n = int(np.diff(vstarts).max())
    parts = kernels.nb.config.NUMBA_NUM_THREADS
    cn = np.einsum("cd,cd->c", cent, cent)
    best_s = np.full(top.shape, -np.inf, np.float32)
    best_i = np.full(top.shape, -1, np.int64)
    kernels.nearest_in_groups(x, cent, cn, True, top, rows, vstarts, gstarts, flat,
                              np.empty((parts, most_n * d), np.float32),
                              np.empty((parts, most_n * int(np.diff(gstarts).max())), np.float32), best_s, best_i)
    out = np.empty(n, np.int64)
    kernels.best_of_probes(best_s, best_i, out)
    s = 2 * (x.astype(np.float64) @ cent.T.astype(np.float64)) - cn
    for i in range(n):
        cand = np.sort(np.concatenate([members[g] for g in top[i]]))
        assert out[i] == cand[np.argmax(s[i, cand])]


@pytest.mark.parametrize("w", [1, 3, 16])
@pytest.mark.parametrize("cols", [16, 40, 257])
@pytest.mark.parametrize("ties", [True, False])
def test_top_few_columns_equals_stable_argsort(w, cols, ties):
    rng = np.random.default_rng(6)
    s = (rng.integers(0, 6, (300, cols)) if ties else rng.standard_normal((300, cols))).astype(np.float32)
    s[0] = 1.0  # a row of one value: every column ties with the bound
    out = np.empty((300, w), np.int64)
    kernels.top_few_columns(s, w, out)
    np.testing.assert_array_equal(out, np.argsort(-s, axis=1, kind="stable")[:, :w])


def test_cluster_gram_tops_up_with_the_mean_query_gram():
    rng = np.random.default_rng(7)
    q = rng.standard_normal((50, 6))
    mean = _mean_gram(q)
    np.testing.assert_allclose(mean, q.T @ q / 50)
    few = q[:4]
    np.testing.assert_allclose(_cluster_gram(few, mean, 10), few.T @ few + 6 * mean)
    np.testing.assert_allclose(_cluster_gram(q[:20], mean, 10), q[:20].T @ q[:20])


def test_build_uses_the_two_level_search_and_stays_a_partition():
    """An index with TREE_MIN_CLUSTERS clusters builds through the two-level search: every
    point in exactly one cluster, and search at full probes + re-rank is exact."""
    rng = np.random.default_rng(8)
    c = kmeans.TREE_MIN_CLUSTERS
    centers = rng.standard_normal((c // 2, 12))
    x = (centers[rng.integers(0, len(centers), 40 * c)] + 0.1 * rng.standard_normal((40 * c, 12))).astype(np.float32)
    q = rng.standard_normal((10, 12)).astype(np.float32)
    ix = LorannIndex(x, c, None, 8, 4, 2, "ip", seed=0)
    ix.build()
    assert ix.cluster_sizes.sum() == len(x)
    ids = ix.search(q, 5, c, len(x))
    ref = np.argsort(-(q.astype(np.float64) @ x.T.astype(np.float64)), axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(ids, ref)


def test_split_axis_is_the_top_principal_axis():
    """kmeans._top_axis (power iteration) finds eigh's top eigenvector of the covariance (up to
    sign) when the top variance stands out; identical points give None."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((500, 40)) * np.concatenate([[3.0], np.linspace(1.5, 0.5, 39)])
    c = x - x.mean(0)
    axis = kmeans._top_axis(c)
    ref = np.linalg.eigh(c.T @ c)[1][:, -1]
    np.testing.assert_allclose(abs(axis @ ref), 1.0, atol=1e-6)
    assert kmeans._top_axis(np.zeros((5, 3))) is None
    assert kmeans._split(np.ones((6, 3), np.float32)) is None


@pytest.mark.parametrize("distance", ["ip", "l2"])
def test_build_is_scale_equivariant_and_large_data_does_not_overflow(distance):
    # data scaled by 2^30 (|x| ~ 1e9: float32 products of the fit would overflow unscaled) or
    # 2^-30 gives the same approximate ranking and the distances times scale^2
    x = np.random.default_rng(3).standard_normal((400, 16)).astype(np.float32)
    out = {}
    for sc in (1.0, 2.0**30, 2.0**-30):
        idx = LorannIndex(x * np.float32(sc), 4, rank=4, distance=distance)
        with np.errstate(over="raise", invalid="raise"):
            idx.build()
        ids, d = idx.search(x[:30] * np.float32(sc), 5, clusters_to_search=2, points_to_rerank=0,
                            return_distances=True)
        out[sc] = (ids, d / sc**2)
    for sc in (2.0**30, 2.0**-30):
        np.testing.assert_array_equal(out[sc][0], out[1.0][0])
        np.testing.assert_allclose(out[sc][1], out[1.0][1], rtol=1e-6, atol=1e-6)
