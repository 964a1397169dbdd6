"""LorannIndex maintenance: refits and splits in the calling thread (maintain) or a background
thread, against fresh fits and builds over the same clusters, and searches while they run.

Every test asserts numbers: models against ``rrr.fit_cluster`` on the same members and Gram,
a refit index against a fresh build with the same centroids, searches at full probes and
re-ranking against brute force (exact whatever state the models are in).
"""
import threading
import time

import numpy as np
import pytest

from topkattn.ann import LorannIndex, rrr


def _mixture(n, d, seed, centers=6):
    rng = np.random.default_rng(seed)
    mu = rng.standard_normal((centers, d)) * 2.0
    return (mu[rng.integers(0, centers, n)] + 0.5 * rng.standard_normal((n, d))).astype(np.float32)


def _exact(q, x, k):
    s = q.astype(np.float64) @ x.T.astype(np.float64)
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def _check_partition(ix):
    """Every point in exactly one slot, of the cluster ``_assign`` names."""
    n = len(ix)
    seen = np.zeros(n, np.int64)
    for c in range(ix.n_clusters):
        lo, n_c = ix._start[c], ix._size[c]
        ids = ix._slot_id[lo:lo + n_c]
        assert (ids >= 0).all()
        seen[ids] += 1
        assert (ix._assign[ids] == c).all()
    np.testing.assert_array_equal(seen, np.ones(n, np.int64))


def _scores(ix, c):
    """Cluster c's approximate score matrix A_c B_c^T (Dg, n_c) and its member ids."""
    lo, n_c = ix._start[c], ix._size[c]
    return ix._adeq[c] @ ix._bdeq[lo:lo + n_c].T, ix._slot_id[lo:lo + n_c]


@pytest.mark.parametrize("bits", [None, 8])
def test_split_children_equal_fresh_fits_and_search_stays_exact(bits):
    """A cluster past max_cluster_size is split by 2-means; each child's model is exactly
    rrr.fit_cluster on its members with its Gram, sizes end at or below the threshold, the
    partition stays whole, and full search equals brute force."""
    x = _mixture(1200, 16, 0)
    q = _mixture(40, 16, 1)
    ix = LorannIndex(x[:300], 3, None, bits, 6, 2, "ip", seed=0, refit_growth=None)
    ix.build(training_queries=_mixture(900, 16, 2))
    ix.add(x[300:])
    assert ix.cluster_sizes.max() > 200
    ix.max_cluster_size = 200
    jobs = ix.maintain()
    assert jobs >= 3 and ix.maintenance_jobs["split"] == ix.n_clusters - 3
    assert ix.cluster_sizes.max() <= 200
    _check_partition(ix)
    for c in range(ix.n_clusters):
        got, ids = _scores(ix, c)
        A, Bt, _ = rrr.fit_cluster(x[ids].T, ix._gram[c], 6)
        want = A @ Bt.T
        if bits is None:
            np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())
        else:  # 8-bit A and B: each score within a few quantisation steps
            assert np.abs(got - want).max() <= 0.03 * np.abs(want).max()
        # the centroid is the normalised mean of the members (the 2-means fixed point)
        mean = x[ids].astype(np.float64).mean(0)
        np.testing.assert_allclose(ix._cent[c], mean / np.linalg.norm(mean), atol=1e-5)
    np.testing.assert_array_equal(ix.search(q, 7, ix.n_clusters, len(x)), _exact(q, x, 7))


def test_background_refit_equals_a_fresh_build_on_the_same_clusters(monkeypatch):
    """Background refits (points added in one call, then the thread drains) give the models a
    fresh build with the same centroids gives (enough training queries per cluster that each
    cluster's Gram is its own queries'), and the same approximate search results."""
    from topkattn.ann import index as index_mod

    rng = np.random.default_rng(1)
    x = rng.standard_normal((400, 12)).astype(np.float32)
    tq = (rng.standard_normal((300, 12)) @ rng.standard_normal((12, 12)) * 0.5).astype(np.float32)
    q = tq[:20] + 0.1
    kw = dict(rank=4, train_size=2, quantization_bits=8, seed=0)
    a = LorannIndex(x[:250], 5, refit_growth=0.1, background=True, **kw)
    a.build(training_queries=tq)
    a.add(x[250:])
    assert a.wait_maintenance(timeout=60)
    assert a.maintenance_jobs["refit"] > 0 and len(a.stale_clusters) < 5
    a.refit()  # the clusters grown by less than 10% too: every model is fit on its members now
    cent = a._cent.copy()
    monkeypatch.setattr(index_mod.kmeans, "kmeans", lambda *args, **kws: cent.copy())
    b = LorannIndex(x, 5, **kw)
    b.build(training_queries=tq)
    np.testing.assert_array_equal(a.cluster_sizes, b.cluster_sizes)
    for c in range(5):
        ga, ia = _scores(a, c)
        gb, ib = _scores(b, c)
        order_a, order_b = np.argsort(ia), np.argsort(ib)
        np.testing.assert_array_equal(ia[order_a], ib[order_b])
        np.testing.assert_allclose(ga[:, order_a], gb[:, order_b], atol=1e-2 * np.abs(gb).max())
    ia, da = a.search(q, 8, 5, 0, return_distances=True)
    ib, db = b.search(q, 8, 5, 0, return_distances=True)
    np.testing.assert_allclose(da, db, rtol=1e-2, atol=1e-2)


def test_background_maintenance_equals_maintain():
    """The same jobs in the maintenance thread or in maintain(): identical indexes."""
    x = _mixture(1500, 16, 3)
    tq = _mixture(600, 16, 4)
    q = _mixture(30, 16, 5)
    out = []
    for background in (False, True):
        ix = LorannIndex(x[:400], 4, None, 8, 6, 2, "ip", seed=0, refit_growth=0.3,
                         background=background)
        ix.build(training_queries=tq)
        ix.max_cluster_size = 250
        ix.add(x[400:])  # one call: the thread (if any) starts once every point is in
        if background:
            assert ix.wait_maintenance(timeout=60)
        else:
            ix.maintain()
        out.append(ix)
    a, b = out
    assert a.maintenance_jobs == b.maintenance_jobs and a.maintenance_jobs["split"] > 0
    np.testing.assert_array_equal(a.cluster_sizes, b.cluster_sizes)
    np.testing.assert_array_equal(a._cent, b._cent)
    ra = a.search(q, 9, 3, 20, return_distances=True)
    rb = b.search(q, 9, 3, 20, return_distances=True)
    np.testing.assert_array_equal(ra[0], rb[0])
    np.testing.assert_array_equal(ra[1], rb[1])


def test_search_during_background_maintenance_returns_valid_exact_keys(monkeypatch):
    """Searches run while the thread splits and refits (each fit slowed to make them overlap):
    every search at full probes and re-ranking equals brute force over the points added so
    far, and approximate searches return distinct valid ids."""
    slow_fit = rrr.fit_cluster

    def fit(*args, **kw):
        time.sleep(0.003)
        return slow_fit(*args, **kw)

    monkeypatch.setattr(rrr, "fit_cluster", fit)
    x = _mixture(3000, 16, 6)
    q = _mixture(12, 16, 7)
    ix = LorannIndex(x[:300], 4, None, 8, 6, 2, "ip", seed=0, refit_growth=0.2, max_cluster_size=150,
                     background=True)
    ix.build(training_queries=_mixture(500, 16, 8))
    overlapped = 0
    for lo in range(300, 3000, 90):
        ix.add(x[lo:lo + 90])
        n = lo + 90
        running = ix.maintenance_pending
        found = ix.search(q, 6, ix.n_clusters + 5, n)  # clamped: every cluster
        np.testing.assert_array_equal(found, _exact(q, x[:n], 6))
        approx = ix.search(q, 6, 2, 12)
        assert ((approx >= 0) & (approx < n)).all()
        assert all(len(set(r)) == len(r) for r in approx)
        overlapped += running
    assert ix.wait_maintenance(timeout=120)
    assert overlapped > 0 and ix.maintenance_jobs["split"] > 0  # (refits too, as timing allows)
    _check_partition(ix)
    np.testing.assert_array_equal(ix.search(q, 6, ix.n_clusters, 3000), _exact(q, x, 6))


def test_concurrent_adds_and_searches_with_background_maintenance():
    """Two threads add while two search; the partition stays whole and the final index
    searches exactly at full probes."""
    x = _mixture(4000, 12, 9)
    q = _mixture(8, 12, 10)
    ix = LorannIndex(x[:500], 4, None, 8, 4, 2, "ip", seed=0, max_cluster_size=200, background=True)
    ix.build()
    errors = []
    stop = threading.Event()

    def adder(part):
        try:
            for row in part:
                ix.add(row)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    def searcher():
        try:
            while not stop.is_set():
                ids = ix.search(q, 5, 3, 10)
                assert (ids >= 0).all() and (ids < len(x)).all()
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    adders = [threading.Thread(target=adder, args=(x[500 + i:4000:2],)) for i in range(2)]
    searchers = [threading.Thread(target=searcher) for _ in range(2)]
    for t in adders + searchers:
        t.start()
    for t in adders:
        t.join()
    stop.set()
    for t in searchers:
        t.join()
    assert not errors, errors
    assert ix.wait_maintenance(timeout=120)
    _check_partition(ix)
    assert ix.cluster_sizes.max() <= 200
    # ids follow the order the two threads' adds interleaved in: brute force over the stored points
    np.testing.assert_array_equal(ix.search(q, 5, ix.n_clusters, 4000), _exact(q, ix.data, 5))
    np.testing.assert_array_equal(np.sort(ix.data, axis=0), np.sort(x, axis=0))


def test_saved_split_index_loads_and_searches_the_same(tmp_path):
    x = _mixture(900, 10, 11)
    q = _mixture(10, 10, 12)
    ix = LorannIndex(x[:200], 2, None, 8, 4, 2, "ip", seed=0, max_cluster_size=150)
    ix.build()
    ix.add(x[200:])
    ix.maintain()
    assert ix.n_clusters > 2
    ix.save(tmp_path / "ix.npz")
    back = LorannIndex.load(tmp_path / "ix.npz")
    assert back.n_clusters == ix.n_clusters and back.max_cluster_size == 150
    np.testing.assert_array_equal(back.search(q, 5, 3, 10), ix.search(q, 5, 3, 10))
    back.add(x[:300])  # it keeps growing and splitting after a load
    back.maintain()
    assert back.cluster_sizes.max() <= 150
    _check_partition(back)


def test_bad_maintenance_arguments_raise():
    x = _mixture(50, 4, 13)
    with pytest.raises(ValueError, match="max_cluster_size"):
        LorannIndex(x, 2, rank=2, max_cluster_size=1)
    with pytest.raises(TypeError, match="background"):
        LorannIndex(x, 2, rank=2, background=1)


def test_build_splits_clusters_above_max_cluster_size():
    """max_cluster_size given at construction: the build itself splits what k-means left too big
    (no maintenance is due afterwards), and searching every cluster stays exact."""
    x = _mixture(2000, 12, 14, centers=3)
    q = _mixture(10, 12, 15)
    ix = LorannIndex(x, 4, None, 8, 4, 2, "ip", seed=0, max_cluster_size=300)
    ix.build()
    assert ix.n_clusters > 4 and ix.cluster_sizes.max() <= 300
    assert not ix.maintenance_pending
    _check_partition(ix)
    np.testing.assert_array_equal(ix.search(q, 6, ix.n_clusters, 2000), _exact(q, x, 6))


def test_background_grows_the_point_storage_ahead_of_the_adds():
    """Nearly full point storage: the maintenance thread doubles it (copying the old rows with no
    lock held) before an add would have to; every point and search stays the same."""
    x = _mixture(1300, 8, 16)
    q = _mixture(5, 8, 17)
    ix = LorannIndex(x[:100], 2, None, 8, 4, 2, "ip", seed=0, refit_growth=None, background=True)
    ix.build()
    cap = len(ix._data)
    ix.add(x[100:cap - 10])  # one add, then less than GROW_WHEN_FREE of the storage is free
    assert ix.wait_maintenance(timeout=60)
    assert ix.maintenance_jobs["grow"] == 1 and len(ix._data) == 2 * cap
    ix.add(x[cap - 10:])
    np.testing.assert_array_equal(ix.data, x)
    np.testing.assert_allclose(ix._norms[:len(x)], (x.astype(np.float64) ** 2).sum(1), rtol=1e-5)
    np.testing.assert_array_equal(ix.search(q, 4, 2, 1300), _exact(q, x, 4))
