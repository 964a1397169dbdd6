"""Tests for topkattn.ann.LorannIndex: recall, exactness, quantisation, add/refit, persistence, input errors.

Tiny generated data; every test asserts numbers against a NumPy reference (brute force in
float64, an explicit SVD of the fitted values, or the dense padded ``_search_xp`` path).
"""
import json
import os
import re

import numpy as np
import pytest

from topkattn.ann import LorannIndex, kmeans, quant, rrr


def mixture(n, d, seed, centers=12, spread=0.35):
    rng = np.random.default_rng(seed)
    mu = rng.standard_normal((centers, d)) * 2.0
    scale = np.linspace(1.5, 0.2, d)
    return (mu[rng.integers(0, centers, n)] + spread * rng.standard_normal((n, d)) * scale
            ).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    x = mixture(2400, 32, 0)
    rng = np.random.default_rng(1)
    q = (mixture(60, 32, 2) @ (np.eye(32) + 0.2 * rng.standard_normal((32, 32)) / 6)
         ).astype(np.float32)
    return x, q


@pytest.fixture(scope="module", params=["ip", "l2"])
def built(request, data):
    x, _ = data
    ix = LorannIndex(x, 16, 24, 8, 16, 4, request.param, seed=3)
    ix.build()
    return ix


def brute(x, q, k, distance):
    """Reference: float64 distances (ascending), ids ties -> lower id."""
    x64, q64 = x.astype(np.float64), q.astype(np.float64)
    s = q64 @ x64.T
    dist = -s if distance == "ip" else (q64 ** 2).sum(1)[:, None] - 2 * s + (x64 ** 2).sum(1)
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(dist, order, axis=1)


def assert_same_neighbours(ids, dist, ref_ids, ref_dist, all_dist, tol):
    """faiss-style check: distances within tol; ids equal outside tied groups."""
    np.testing.assert_allclose(dist, ref_dist, rtol=0, atol=tol)
    for i in range(len(ids)):
        kth = ref_dist[i, -1]
        sure = set(ref_ids[i][ref_dist[i] < kth - tol])
        assert sure <= set(ids[i])
        for j, pid in enumerate(ids[i]):  # every returned id really has the reported distance
            assert abs(all_dist[i, pid] - dist[i, j]) <= tol


def recall(found, truth):
    return np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(found, truth)])


def test_recall_floor_moderate_settings(built, data):
    x, q = data
    truth, _ = brute(x, q, 10, built.distance)
    found = built.search(q, 10, clusters_to_search=6, points_to_rerank=60)
    assert found.shape == (len(q), 10) and found.dtype == np.int64
    assert recall(found, truth) >= 0.9


def test_recall_is_one_when_everything_is_searched_and_reranked(built, data):
    x, q = data
    ref_ids, ref_dist = brute(x, q, 10, built.distance)
    _, all_dist = brute(x, q, len(x), built.distance)
    all_d = np.empty_like(all_dist)
    np.put_along_axis(all_d, brute(x, q, len(x), built.distance)[0], all_dist, axis=1)
    ids, dist = built.search(q, 10, 16, len(x), return_distances=True)
    assert recall(ids, ref_ids) == 1.0
    assert_same_neighbours(ids, dist, ref_ids, ref_dist, all_d, tol=2e-3)


def test_exact_search_equals_brute_force_with_ties(data):
    x, q = data
    x = np.concatenate([x[:300], x[:300]])  # every point twice: ties everywhere
    for distance in ("ip", "l2"):
        ix = LorannIndex(x, 4, None, 8, 4, 2, distance)
        ref_ids, ref_dist = brute(x, q, 7, distance)
        ids, dist = ix.exact_search(q, 7, return_distances=True)
        np.testing.assert_allclose(dist, ref_dist, rtol=1e-5, atol=1e-3)
        # a point and its copy tie exactly: the lower id comes first, the copy right after
        first = ids[:, 0]
        assert np.all(first < 300) and np.all(ids[:, 1] == first + 300)


def test_fit_cluster_matches_explicit_svd_of_fitted_values():
    rng = np.random.default_rng(0)
    g, n, m, r = 10, 30, 80, 4
    beta = rng.standard_normal((g, n))
    X = rng.standard_normal((m, g)) * np.linspace(2, 0.5, g)
    A, Bt, P = rrr.fit_cluster(beta, X.T @ X, r)
    yhat = X @ beta
    u, s, vt = np.linalg.svd(yhat, full_matrices=False)
    ref = yhat @ vt[:r].T @ vt[:r]  # rank-r reduced-rank regression fit
    np.testing.assert_allclose(X @ A @ Bt.T, ref, atol=1e-9 * np.abs(ref).max())
    np.testing.assert_allclose(Bt.T @ Bt, np.eye(r), atol=1e-10)
    # P places a training point exactly on its own column of B
    np.testing.assert_allclose(P @ beta, Bt.T, atol=1e-9)


@pytest.mark.parametrize("m", [80, 6])  # positive definite (Cholesky) and singular (eigh)
def test_fit_cluster_with_a_singular_or_regular_gram(m):
    rng = np.random.default_rng(1)
    g, n, r = 10, 30, 4
    X = rng.standard_normal((m, g))
    F = rrr.gram_sqrt(X.T @ X)
    np.testing.assert_allclose(F.T @ F, X.T @ X, atol=1e-10 * m)
    beta = rng.standard_normal((g, n))
    A, Bt, _ = rrr.fit_cluster(beta, X.T @ X, r)
    yhat = X @ beta
    _, _, vt = np.linalg.svd(yhat, full_matrices=False)
    ref = yhat @ vt[:r].T @ vt[:r]
    np.testing.assert_allclose(X @ A @ Bt.T, ref, atol=1e-8 * np.abs(ref).max())


def test_model_is_exact_when_rank_covers_every_cluster(data):
    x, q = data
    x = x[:96]
    ix = LorannIndex(x, 8, None, None, 16, 2, "ip", balanced=True)
    ix.build()
    assert ix.cluster_sizes.max() <= 16
    ids, dist = ix.search(q, 96, 8, 0, return_distances=True)  # approximate scores only
    exact = -(q.astype(np.float64) @ x.T.astype(np.float64))
    np.testing.assert_allclose(dist, np.take_along_axis(exact, ids, axis=1), atol=2e-3)


def test_quantised_scores_close_to_unquantised(data):
    x, q = data
    s = {}
    for bits in (None, 8, 4):
        ix = LorannIndex(x, 16, 24, bits, 8, 4, "ip", seed=5)
        ix.build()
        ids, dist = ix.search(q, len(x), 16, 0, return_distances=True)
        per_id = np.empty_like(dist)
        np.put_along_axis(per_id, ids, dist, axis=1)
        s[bits] = per_id
    spread = s[None].std()
    rms8 = np.sqrt(np.mean((s[8] - s[None]) ** 2)) / spread
    rms4 = np.sqrt(np.mean((s[4] - s[None]) ** 2)) / spread
    print(rms8, rms4)
    assert 0 < rms8 < 0.01 and rms8 < rms4 < 0.15
    assert np.abs(s[8] - s[None]).max() / spread < 0.05


def test_quantize_rows_roundtrip():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 9)).astype(np.float32)
    x[3] = 0
    for bits, levels in ((8, 127), (4, 7)):
        codes, scale = quant.quantize_rows(x, bits)
        back = quant.dequantize_rows(codes, scale, bits, 9)
        bound = np.abs(x).max(1, keepdims=True) / levels / 2 + 1e-7
        assert np.all(np.abs(back - x) <= bound)
        assert np.all(back[3] == 0)
    assert quant.quantize_rows(x, 4)[0].shape == (50, 5)


@pytest.mark.parametrize("nq,min_group", [(1, 64), (8, 64), (40, 10**6), (40, 0)])
def test_numba_paths_match_dense_reference(built, data, nq, min_group, monkeypatch):
    """Serial fused (1), parallel fused (8, 40) and GEMM-block (40, min_group=0) paths."""
    from topkattn.ann import index as index_module

    monkeypatch.setattr(index_module, "BLOCK_MIN_GROUP", min_group)
    monkeypatch.setattr(index_module, "BLOCK_MIN_GROUP_INT8", min_group)
    _, q = data
    for rr in (0, 30):
        assert_matches_dense_reference(built, q[:nq], 5, rr)


def assert_matches_dense_reference(ix, qq, w, rr):
    """The CPU search of qq equals the dense padded reference path on the same index."""
    ids, dist = ix.search(qq, 10, w, rr, return_distances=True)
    q2, _ = ix._check_queries(qq, "q", np)
    ref_ids, ref_s = ix._search_xp(q2, 10, w, rr, np, exclusive=True)
    _, ref_dist = ix._output(ref_ids, ref_s, q2, False, True, np)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-4, atol=1e-3)
    # ids agree except where float rounding reorders (near-)tied scores
    assert (ids != ref_ids).mean() <= 0.02


def test_single_query_returns_1d(built, data):
    _, q = data
    a = built.search(q[3], 5, 4, 20)
    b = built.search(q[3:4], 5, 4, 20)
    assert a.shape == (5,)
    np.testing.assert_array_equal(a, b[0])


def test_padding_when_fewer_points_than_k(data):
    x, q = data
    ix = LorannIndex(x[:64], 8, None, 8, 4, 2, "l2")
    ix.build()
    ids, dist = ix.search(q[:5], 60, 1, 0, return_distances=True)
    sizes = ix.cluster_sizes
    for i in range(5):
        valid = ids[i] >= 0
        assert valid.sum() in sizes  # exactly the one searched cluster
        assert np.all(ids[i][~valid] == -1) and np.all(np.isinf(dist[i][~valid]))
        assert np.all(np.diff(dist[i][valid]) >= 0)


def test_distances_are_true_distances_after_rerank(built, data):
    x, q = data
    ids, dist = built.search(q, 10, 4, 40, return_distances=True)
    xs = x[ids].astype(np.float64)
    q64 = q.astype(np.float64)[:, None]
    ref = -(xs * q64).sum(-1) if built.distance == "ip" else ((xs - q64) ** 2).sum(-1)
    np.testing.assert_allclose(dist, ref, rtol=1e-4, atol=1e-3)


def test_training_queries_out_of_distribution(data):
    x, _ = data
    rng = np.random.default_rng(7)
    lin = np.eye(32) + 0.5 * rng.standard_normal((32, 32)) / 6
    pool = (mixture(3060, 32, 9) @ lin + 0.5).astype(np.float32)  # queries unlike the keys
    q, train_q = pool[:60], pool[60:]
    truth, _ = brute(x, q, 10, "ip")
    got = {}
    for tq in (None, train_q):
        for approximate in (True, False):
            ix = LorannIndex(x, 16, 16, 8, 16, 4, "ip", seed=1)
            ix.build(training_queries=tq, approximate=approximate)
            got[tq is None, approximate] = recall(ix.search(q, 10, 6, 60), truth)
    print(got)
    assert min(got[False, True], got[False, False]) >= 0.9
    # the query-trained reduction beats the one learned from the keys
    assert got[False, True] > got[True, True]


def test_add_then_search_finds_new_points(data):
    x, q = data
    ix = LorannIndex(x, 16, 24, 8, 8, 4, "ip", refit_growth=None)
    ix.build()
    # unit directions scaled far out: each is its own query's best inner product
    new = (40.0 * q[:5] / np.linalg.norm(q[:5], axis=1, keepdims=True)).astype(np.float32)
    ids = ix.add(new)
    np.testing.assert_array_equal(ids, np.arange(len(x), len(x) + 5))
    assert len(ix) == len(x) + 5
    found = ix.search(q[:5], 1, 3, 20)
    np.testing.assert_array_equal(found[:, 0], ids)
    assert len(ix.stale_clusters) > 0


def test_add_reproduces_training_point_columns(data):
    x, _ = data
    ix = LorannIndex(x, 8, None, None, 8, 2, "ip")
    ix.build()
    c = int(ix._assign[0])
    lo = ix._start[c]
    row = np.flatnonzero(ix._slot_id[lo:lo + ix._size[c]] == 0)[0]
    (pid,) = ix.add(x[:1])
    slot = np.flatnonzero(ix._slot_id == pid)[0]
    np.testing.assert_allclose(ix._bdeq[slot], ix._bdeq[lo + row], atol=1e-5)


def test_many_adds_grow_clusters_and_stay_exact(data):
    x, q = data
    ix = LorannIndex(x[:400], 8, None, 8, 8, 2, "l2", refit_growth=None)
    ix.build()
    for i in range(400, 1400, 100):  # clusters outgrow their capacity and move
        ix.add(x[i:i + 100])
    ix.add(x[1400])
    assert len(ix) == 1401 and ix.cluster_sizes.sum() == 1401
    ref_ids, _ = brute(x[:1401], q, 10, "l2")
    assert recall(ix.search(q, 10, 8, 1401), ref_ids) == 1.0
    assert recall(ix.search(q, 10, 3, 50), ref_ids) >= 0.85


@pytest.mark.parametrize("bits", [8, 4, None])
def test_numba_paths_match_dense_reference_after_adds(data, bits, monkeypatch):
    """Searches interleaved with one-point and batch adds (clusters outgrow their capacity
    and move, so the transposed mirror is refreshed per cluster and reads cap > size blocks):
    every CPU path equals the dense reference on the same state."""
    from topkattn.ann import index as index_module

    x, q = data
    ix = LorannIndex(x[:600], 8, 24, bits, 8, 2, "ip", refit_growth=None)
    ix.build()
    paths = [(1, 64), (8, 64), (40, 10**6), (40, 0)]  # serial, parallel fused, block (2x)
    # batches, then single points near the queries (they enter the results) that land in
    # the free capacity of clusters moved before (no reallocation: only the stale mark
    # refreshes the mirror)
    near = [1.5 * q[i:i + 1] for i in range(12)]
    for step, pts in enumerate([x[600:601], x[601:900], x[900:901], x[901:1500]] + near):
        ix.add(pts)
        for nq, min_group in paths:
            monkeypatch.setattr(index_module, "BLOCK_MIN_GROUP", min_group)
            monkeypatch.setattr(index_module, "BLOCK_MIN_GROUP_INT8", min_group)
            for rr in (0, 20):
                assert_matches_dense_reference(ix, q[:nq], 3, rr)
    assert (ix._cap > ix._size).any()  # the state the mirror must handle


def test_lazy_refit_and_refit(data):
    x, q = data
    ix = LorannIndex(x[:600], 8, None, None, 8, 2, "ip", refit_growth=0.2)
    ix.build()
    ix.add(x[600:1800])
    stale = ix.stale_clusters
    assert len(stale) > 0
    ix.search(q[:20], 5, 8, 10)  # visits every cluster: all grown ones refit
    assert len(ix.stale_clusters) == 0
    # a refit model equals a fresh fit on the same members and query Gram
    c = int(stale[0])
    lo, n_c = ix._start[c], ix._size[c]
    beta = x[ix._slot_id[lo:lo + n_c]].T
    A, Bt, _ = rrr.fit_cluster(beta, ix._gram[c], 8)
    np.testing.assert_allclose(ix._adeq[c] @ ix._bdeq[lo:lo + n_c].T, A @ Bt.T, atol=1e-3)
    ix2 = LorannIndex(x[:600], 8, None, 8, 8, 2, "ip", refit_growth=None)
    ix2.build()
    ix2.add(x[600:700])
    ix2.refit()
    assert len(ix2.stale_clusters) == 0
    ix2.add(x[700:800])
    stale = ix2.stale_clusters
    for empty in ([], (), np.array([], np.int64)):  # an empty sequence refits nothing (it was a TypeError)
        ix2.refit(empty)
        np.testing.assert_array_equal(ix2.stale_clusters, stale)


def test_add_before_build_is_indexed(data):
    x, q = data
    ix = LorannIndex(x[:1000], 8, None, 8, 8, 2, "ip")
    ix.add(x[1000:1200])
    ix.build()
    assert ix.cluster_sizes.sum() == 1200
    ref_ids, _ = brute(x[:1200], q, 5, "ip")
    assert recall(ix.search(q, 5, 8, 1200), ref_ids) == 1.0


@pytest.mark.parametrize("distance", ["l2", "ip"])
def test_save_load_roundtrip(tmp_path, data, distance):
    x, q = data
    for bits in (8, 4, None):
        ix = LorannIndex(x, 16, 24, bits, 8, 4, distance)
        ix.build()
        ix.add(x[:3] + 0.5)
        path = tmp_path / f"ix{bits}.npz"
        ix.save(path)
        ix.save(path)  # overwrite in place
        back = LorannIndex.load(path)
        for rr in (0, 30):
            a = ix.search(q, 10, 5, rr, return_distances=True)
            b = back.search(q, 10, 5, rr, return_distances=True)
            np.testing.assert_array_equal(a[0], b[0])
            np.testing.assert_array_equal(a[1], b[1])
        assert len(back) == len(ix)
        np.testing.assert_array_equal(back.add(x[5:6]), [len(ix)])
        assert back.distance == distance
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask  # not a temporary file's 0600


def test_failed_save_keeps_the_old_file(tmp_path, data, monkeypatch):
    from topkattn.ann import persist

    x, q = data
    ix = LorannIndex(x[:500], 4, None, 8, 4, 2, "ip")
    ix.build()
    path = tmp_path / "ix.npz"
    ix.save(path)
    before = path.read_bytes()
    expected = ix.search(q, 5, 2, 10)

    def broken_savez(f, **arrays):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(persist.np, "savez", broken_savez)
    ix.add(x[500:510])
    with pytest.raises(OSError, match="disk full"):
        ix.save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ix.npz"]
    monkeypatch.undo()
    back = LorannIndex.load(path)
    assert len(back) == 500
    np.testing.assert_array_equal(back.search(q, 5, 2, 10), expected)


def test_load_rejects_truncated_corrupted_and_newer(tmp_path, data):
    x, _ = data
    ix = LorannIndex(x[:500], 4, None, 8, 4, 2, "ip")
    ix.build()
    path = tmp_path / "ix.npz"
    ix.save(path)
    raw = path.read_bytes()
    (tmp_path / "trunc.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="truncated|corrupted"):
        LorannIndex.load(tmp_path / "trunc.npz")
    with np.load(path, allow_pickle=False) as z:
        files = {k: z[k].copy() for k in z.files}
    bad = dict(files)
    bad["cent"] = bad["cent"] + 1e-3  # content changed, checksum kept
    np.savez(tmp_path / "bad.npz", **bad)
    with pytest.raises(ValueError, match="checksum"):
        LorannIndex.load(tmp_path / "bad.npz")
    header = json.loads(files["__header__"].tobytes())
    header["version"] = 99
    newer = dict(files)
    newer["__header__"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    np.savez(tmp_path / "newer.npz", **newer)
    with pytest.raises(ValueError, match="version 99"):
        LorannIndex.load(tmp_path / "newer.npz")
    flipped = bytearray(raw)
    flipped[len(raw) // 3] ^= 0xFF
    (tmp_path / "flip.npz").write_bytes(bytes(flipped))
    with pytest.raises(ValueError):
        LorannIndex.load(tmp_path / "flip.npz")
    with pytest.raises(FileNotFoundError):
        LorannIndex.load(tmp_path / "missing.npz")


def test_bad_input(data):
    x, q = data
    with pytest.raises(ValueError, match="rank"):
        LorannIndex(x, 8, None, 8, 32)
    with pytest.raises(ValueError, match="non-finite"):
        LorannIndex(np.where(np.arange(32) == 3, np.nan, x[:100]), 8)
    with pytest.raises(ValueError, match="float32 range"):
        LorannIndex(np.full((20, 32), 1e39), 2, rank=4, train_size=1)
    with pytest.raises(ValueError, match="n_clusters"):
        LorannIndex(x[:10], 11, rank=4)
    with pytest.raises(ValueError, match="distance"):
        LorannIndex(x, 8, rank=4, distance="cos")
    with pytest.raises(ValueError, match="quantization_bits"):
        LorannIndex(x, 8, rank=4, quantization_bits=5)
    with pytest.raises(ValueError, match="global_dim"):
        LorannIndex(x, 8, 64, rank=4)
    with pytest.raises(TypeError, match="data"):
        LorannIndex(x.astype(np.complex64), 8, rank=4)
    ix = LorannIndex(x[:500], 8, None, 8, 4, 2)
    with pytest.raises(RuntimeError, match="build"):
        ix.search(q, 5, 2, 10)
    ix.build()
    with pytest.raises(RuntimeError, match="already"):
        ix.build()
    with pytest.raises(ValueError, match="shape"):
        ix.search(q[:, :31], 5, 2, 10)
    with pytest.raises(ValueError, match="non-finite"):
        ix.search(np.full(32, np.inf, np.float32), 5, 2, 10)
    with pytest.raises(ValueError, match="float32 range"):
        ix.search(np.full(32, -1e300), 5, 2, 10)
    with pytest.raises(ValueError, match="k must"):
        ix.search(q, 0, 2, 10)
    with pytest.raises(ValueError, match="clusters_to_search"):
        ix.search(q, 5, 0, 10)
    # above n_clusters: clamped, like the reference lorann
    np.testing.assert_array_equal(ix.search(q, 5, 9, 10), ix.search(q, 5, 8, 10))
    with pytest.raises(ValueError, match="points_to_rerank"):
        ix.search(q, 5, 2, -1)
    for bad in ("no", None, 1):  # one query (the latency path) and a batch, search and exact_search
        for queries in (q[0], q):
            with pytest.raises(TypeError, match="return_distances must be True or False"):
                ix.search(queries, 5, 2, 10, return_distances=bad)
            with pytest.raises(TypeError, match="return_distances must be True or False"):
                ix.exact_search(queries, 5, return_distances=bad)
    np.testing.assert_array_equal(ix.search(q, 5, 2, 10, return_distances=np.bool_(True))[1],
                                  ix.search(q, 5, 2, 10, return_distances=True)[1])
    with pytest.raises(ValueError, match="new_points"):
        ix.add(np.zeros((2, 31), np.float32))
    with pytest.raises(ValueError, match="non-finite"):
        ix.add(np.full((1, 32), np.nan, np.float32))
    ix2 = LorannIndex(x[:500], 8, None, 8, 4, 2)
    with pytest.raises(ValueError, match="training_queries"):
        ix2.build(training_queries=q[:, :30])


def test_balanced_assignment_respects_capacity(data):
    x, _ = data
    cent = kmeans.kmeans(x, 12, distance="l2", rng=0)
    a = kmeans.balanced_assign(x, cent, "l2", slack=0.05)
    assert np.bincount(a, minlength=12).max() <= int(np.ceil(len(x) / 12 * 1.05))
    # unconstrained assignment is the argmax of the scores
    s = kmeans.centroid_scores(x, cent, "l2")
    np.testing.assert_array_equal(kmeans.nearest_clusters(x, cent, 1, "l2")[:, 0],
                                  np.argmax(s, axis=1))


def test_single_point_add_kernel_matches_batched_add(data):
    x, _ = data
    a = LorannIndex(x[:800], 8, 24, 8, 8, 2, "l2", refit_growth=None)
    a.build()
    b = LorannIndex(x[:800], 8, 24, 8, 8, 2, "l2", refit_growth=None)
    b.build()
    for i in range(800, 810):
        a.add(x[i])  # Numba single-point path
    b.add(x[800:810])  # batched NumPy path
    for pid in range(800, 810):
        sa = np.flatnonzero(a._slot_id == pid)[0]
        sb = np.flatnonzero(b._slot_id == pid)[0]
        assert a._assign[pid] == b._assign[pid]
        np.testing.assert_allclose(a._bdeq[sa], b._bdeq[sb], rtol=1e-5, atol=1e-6)
        assert np.abs(a._bcodes[sa].astype(int) - b._bcodes[sb]).max() <= 1


def test_quantize_row_kernel_matches_quantize_rows():
    from topkattn.ann import kernels

    rng = np.random.default_rng(4)
    x = rng.standard_normal((20, 16)).astype(np.float32)
    codes, scale = quant.quantize_rows(x, 8)
    for i in range(20):
        c = np.empty(16, np.int8)
        d = np.empty(16, np.float32)
        s = kernels.quantize_row_into(x[i], 127, c, d)
        assert s == scale[i]
        np.testing.assert_array_equal(c, codes[i])
        np.testing.assert_array_equal(d, codes[i] * scale[i])


def test_cupy_queries_match_numpy(built, data):
    """The array-library path on a GPU gives the CPU path's neighbours (skipped without CuPy)."""
    cp = pytest.importorskip("cupy")
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
    except Exception:
        pytest.skip("no usable CUDA device")
    _, q = data
    for rr in (0, 30):
        ids, dist = built.search(q, 10, 5, rr, return_distances=True)
        gids, gdist = built.search(cp.asarray(q), 10, 5, rr, return_distances=True)
        assert isinstance(gids, cp.ndarray)
        np.testing.assert_array_equal(gids.get(), ids)
        np.testing.assert_allclose(gdist.get(), dist, rtol=1e-4, atol=1e-3)
    eids = built.exact_search(cp.asarray(q), 7)
    np.testing.assert_array_equal(eids.get(), built.exact_search(q, 7))


@pytest.mark.parametrize("ties", [False, True])
def test_candidate_selection_kernels_keep_the_exact_m_best(ties):
    """scan_row over many rows into one small buffer (forcing compactions and threshold
    raises), then the merge cut, equals the exact m best by (score desc, id asc)."""
    from topkattn.ann import kernels

    rng = np.random.default_rng(7)
    for trial in range(40):
        m = int(rng.integers(1, 40))
        rows = [rng.standard_normal(int(rng.integers(1, 300))).astype(np.float32)
                for _ in range(int(rng.integers(1, 8)))]
        if ties:  # few distinct values: whole blocks tie with the threshold
            rows = [np.round(r * 2).astype(np.float32) for r in rows]
        ids = [rng.permutation(10_000)[: len(r)] + 10_000 * i for i, r in enumerate(rows)]
        all_s, all_i = np.concatenate(rows), np.concatenate(ids)
        order = np.lexsort((all_i, -all_s))[:m]
        cap = 2 * m
        cs, ci = np.empty(cap, np.float32), np.empty(cap, np.int64)
        # no threshold yet, or one another thread's buffer set (empty buffer, rows > cap)
        th = np.float32(-np.inf if trial % 2 else np.quantile(all_s, 0.1))
        th = min(th, all_s[order[-1]])
        n = 0
        for r, i in zip(rows, ids):
            n, th = kernels.scan_row(r, i, th, cs, ci, n, m)
            assert n <= cap
        kept = set(zip(cs[:n].tolist(), ci[:n].tolist()))
        assert set(zip(all_s[order].tolist(), all_i[order].tolist())) <= kept
        assert (all_s >= th).sum() >= min(m, len(all_s))  # the threshold never cut a best-m
        cut = kernels._cut_to_m(cs, ci, n, m)
        assert sorted(ci[:cut].tolist()) == sorted(all_i[order].tolist())


def test_mth_bound_is_a_tight_lower_bound():
    from topkattn.ann import kernels

    rng = np.random.default_rng(8)
    for trial in range(300):
        x = rng.standard_normal(int(rng.integers(1, 500))).astype(np.float32)
        if trial % 3 == 0:
            x = np.round(x * 3).astype(np.float32)
        m = int(rng.integers(1, len(x) + 1))
        t = kernels._mth_bound(x, m)
        exact = np.sort(x)[::-1][m - 1]
        assert t <= exact and (x >= t).sum() >= m
        assert exact - t <= (x.max() - x.min()) / 2 ** 15


# ----------------------------------------------------------------------------- empty clusters
def _search_every_path(ix, q, k, w, rr, monkeypatch):
    """ids of search(q) on each CPU path (serial fused, parallel fused, GEMM blocks) and the
    dense array-library path, for the queries q (Q, Dx), Q > 16."""
    from topkattn.ann import index as index_module

    out = {"serial": ix.search(q[:1], k, w, rr), "fused": ix.search(q[:8], k, w, rr)}
    monkeypatch.setattr(index_module, "BLOCK_MIN_GROUP", 0)
    monkeypatch.setattr(index_module, "BLOCK_MIN_GROUP_INT8", 0)
    out["blocks"] = ix.search(q, k, w, rr)
    monkeypatch.undo()
    q2, _ = ix._check_queries(q, "q", np)
    w_live = min(w, int((ix.cluster_sizes > 0).sum()))
    out["dense"] = ix._search_xp(q2, k, w_live, rr, np, exclusive=True)[0]
    return out


def _lure_to_empty(ix, q):
    """Move every empty cluster's centroid to where query q (Dx,) routes first."""
    for c in np.flatnonzero(ix.cluster_sizes == 0):
        ix._cent[c] = q if ix.distance == "l2" else q / np.linalg.norm(q)
    ix._cnorm = np.einsum("cg,cg->c", ix._cent, ix._cent)
    ix._device = {}


@pytest.mark.parametrize("distance", ["ip", "l2"])
def test_identical_points_are_found_past_empty_clusters(distance, monkeypatch):
    """600 copies of one point leave 7 of 8 clusters empty (they cannot be split); routing
    must skip the empty ones even when their centroids are the query's best (it sent
    queries to them: [-1, -1, -1])."""
    rng = np.random.default_rng(0)
    x = np.tile(rng.standard_normal((1, 32)).astype(np.float32), (600, 1))
    ix = LorannIndex(x, 8, rank=4, distance=distance)
    ix.build()
    assert (ix.cluster_sizes > 0).sum() == 1
    q = rng.standard_normal((40, 32)).astype(np.float32)
    _lure_to_empty(ix, q[0])
    want = ix.exact_search(q, 3)
    np.testing.assert_array_equal(want, np.tile([0, 1, 2], (40, 1)))
    np.testing.assert_array_equal(ix.search(q[0], 3, 2, 3), [0, 1, 2])
    for name, ids in _search_every_path(ix, q, 3, 2, 3, monkeypatch).items():
        np.testing.assert_array_equal(ids, want[: len(ids)], err_msg=name)


def test_cupy_search_skips_empty_clusters():
    """The CuPy routing of the array-library path (skipped without CuPy and a GPU)."""
    cp = pytest.importorskip("cupy")
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
    except Exception:
        pytest.skip("no usable CUDA device")
    rng = np.random.default_rng(0)
    x = np.tile(rng.standard_normal((1, 32)).astype(np.float32), (600, 1))
    ix = LorannIndex(x, 8, rank=4)
    ix.build()
    q = rng.standard_normal((4, 32)).astype(np.float32)
    _lure_to_empty(ix, q[0])
    np.testing.assert_array_equal(ix.search(cp.asarray(q), 3, 2, 3).get(), np.tile([0, 1, 2], (4, 1)))


@pytest.mark.parametrize("seed,distance", [(4, "ip"), (5, "l2")])
def test_kmeans_leaves_no_cluster_empty_when_it_can_split(seed, distance):
    """Three very tight blobs of 300, 20 and 4 points, 8 clusters: the old perturbed-copy
    re-seeding left clusters empty for these seeds; splitting the largest cluster across its
    widest axis fills every one."""
    rng = np.random.default_rng(seed)
    mu = rng.standard_normal((3, 16)) * 10
    x = np.concatenate([m + 1e-4 * rng.standard_normal((s, 16)) for m, s in zip(mu, [300, 20, 4])]
                       ).astype(np.float32)
    ix = LorannIndex(x, 8, rank=4, distance=distance, seed=seed)
    ix.build()
    assert (ix.cluster_sizes > 0).all(), ix.cluster_sizes
    q = rng.standard_normal((5, 16)).astype(np.float32)
    ids, dist = ix.search(q, 5, 8, len(x), return_distances=True)
    np.testing.assert_allclose(dist, ix.exact_search(q, 5, return_distances=True)[1], rtol=1e-5)


def test_fill_empty_splits_the_largest_cluster_deterministically():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal((50, 4)) - 5, rng.standard_normal((30, 4)) + 5,
                        np.ones((40, 4))]).astype(np.float32)
    assign = np.repeat(np.array([0, 1, 3]), [50, 30, 40]).astype(np.int64)  # 2 and 4 empty
    cent = np.zeros((5, 4), np.float32)
    runs = []
    for _ in range(2):
        a, c = assign.copy(), cent.copy()
        assert kmeans.fill_empty(x, c, a, "l2") == 0
        runs.append((a, c))
        sizes = np.bincount(a, minlength=5)
        assert (sizes > 0).all() and sizes.sum() == 120
        assert (a[100:] == 3).all()  # the identical points were never split
        for j in (0, 1, 2, 4):  # split: the means of their points
            np.testing.assert_allclose(c[j], x[a == j].mean(0), atol=1e-5)
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    same = np.ones((6, 3), np.float32)
    a = np.zeros(6, np.int64)
    assert kmeans.fill_empty(same, np.zeros((3, 3), np.float32), a, "ip") == 2
    assert (a == 0).all()


# ----------------------------------------------------------------------------- defaults and sizes
def test_default_train_size_fits_few_clusters(data):
    x, q = data
    for c in (1, 2, 4):
        ix = LorannIndex(x[:300], c, rank=4)
        assert ix.train_size == min(5, c)
        ix.build()
        np.testing.assert_array_equal(ix.search(q[:3], 5, c, 300), ix.exact_search(q[:3], 5))
    assert LorannIndex(x[:300], 8, rank=4).train_size == 5
    with pytest.raises(ValueError, match=r"train_size must be an integer in \[1, 2\], got 3"):
        LorannIndex(x[:300], 2, rank=4, train_size=3)  # an explicit value is not clamped


def test_k_beyond_the_points_pads_and_an_unallocatable_k_is_a_value_error(data):
    x, q = data
    ix = LorannIndex(x[:600], 8, rank=4, distance="l2")
    ix.build()
    ids, dist = ix.search(q[:3], 605, 8, 600, return_distances=True)
    assert ids.shape == dist.shape == (3, 605)
    np.testing.assert_array_equal(ids[:, :600], ix.exact_search(q[:3], 600))
    assert (ids[:, 600:] == -1).all() and np.isinf(dist[:, 600:]).all()
    eids = ix.exact_search(q[:3], 605)
    np.testing.assert_array_equal(eids, ids)
    for fn in (lambda: ix.search(q[0], 10 ** 12, 2, 0), lambda: ix.exact_search(q[:2], 10 ** 12),
               lambda: ix.search(q[:2], 10 ** 12, 2, 5, return_distances=True)):
        with pytest.raises(ValueError, match=r"k=1000000000000 asks for a .* GiB"):
            fn()


def test_points_to_rerank_is_capped_at_the_points(data, monkeypatch):
    """points_to_rerank = 10**5 on 600 points allocated candidate buffers for 10**5 (GEMM
    path: 2 threads x 40 queries x 2 x 10**5 x 12 bytes, 190 MB); capped, it is ~0."""
    import tracemalloc

    from topkattn.ann import index as index_module

    x, q = data
    ix = LorannIndex(x[:600], 8, rank=4)
    ix.build()
    monkeypatch.setattr(index_module, "BLOCK_MIN_GROUP", 0)
    monkeypatch.setattr(index_module, "BLOCK_MIN_GROUP_INT8", 0)
    want = ix.search(q[:40], 5, 3, 600)
    tracemalloc.start()
    try:
        got = ix.search(q[:40], 5, 3, 10 ** 5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(got, want)
    assert peak < 16 * 2 ** 20, peak


# ----------------------------------------------------------------------------- crafted files
def _rewrite(path, out, arrays=None, meta=None):
    """Copy the index file ``path`` to ``out`` with arrays/meta entries replaced (valid checksums)."""
    from topkattn.ann import persist
    from topkattn.storage import load_container, save_container

    files, params, _ = load_container(path, kind=persist.KIND, max_version=persist.VERSION)
    files = {**files, **(arrays or {})}
    files = {n: a for n, a in files.items() if a is not None}
    save_container(out, files, {**params, **(meta or {})}, kind=persist.KIND,
                   version=persist.VERSION, prefix=".t-")
    return out


def test_load_refuses_files_whose_contents_do_not_fit_together(tmp_path, data):
    """Checksums hold (the files are rewritten through save_container) but the meaning does
    not: each crafted file is one StorageError naming it; the shifted ids used to load and
    then crash the search, the claimed n = 10**6 to load with len() = 10**6."""
    from topkattn.storage import StorageError, load_container

    x, q = data
    ix = LorannIndex(x[:500], 4, 24, 8, 4, 2, "ip")
    ix.build()
    ix.add(x[500:520])
    good = tmp_path / "good.npz"
    ix.save(good)
    files, meta, _ = load_container(good, kind="LorannIndex", max_version=2)
    sid, size = files["slot_id"], files["size"]
    dup = sid.copy()
    dup[1] = dup[0]
    moved = size.copy()
    moved[0] -= 1
    moved[1] += 1
    cases = {
        "shifted_ids": ({"slot_id": sid + 10 ** 12}, {}, "slot_id holds ids outside"),
        "negative_id": ({"slot_id": np.where(sid == 3, -1, sid)}, {}, "outside"),
        "duplicate_id": ({"slot_id": dup}, {}, "exactly once"),
        "claims_more_points": ({}, {"n": 10 ** 6}, "'data' has .* shape"),
        "sizes_off": ({"size": size + 1}, {}, "sum to"),
        "negative_size": ({"size": np.where(np.arange(4) == 0, -3, size + (np.arange(4) == 1) * 3)},
                          {}, "0 <= fit_size <= size"),
        "moved_point": ({"size": moved}, {}, "assign disagrees"),
        "assign_out_of_range": ({"assign": files["assign"] + 4}, {}, "assign disagrees"),
        "fit_size_above_size": ({"fit_size": size + 1}, {}, "fit_size <= size"),
        "wrong_P_shape": ({"P": files["P"][:, :, :5]}, {}, "'P' has .* shape"),
        "codes_dtype": ({"bcodes": files["bcodes"].astype(np.int16)}, {}, "'bcodes' has dtype int16"),
        "codes_shape": ({"acodes": files["acodes"][:, :, :3]}, {}, "'acodes'"),
        "nan_scale": ({"bscale": np.where(np.arange(520) == 7, np.nan, files["bscale"])
                      .astype(np.float32)}, {}, "non-finite"),
        "float_ids": ({"slot_id": sid.astype(np.float32)}, {}, "integer dtype"),
        "no_T": ({"T": None}, {}, "'T' is missing|arrays \\['T'\\] are missing"),
        "T_without_reduction": ({}, {"global_dim": 32}, "'T' is present"),
        "zero_clusters": ({}, {"n_clusters": 0}, "n_clusters must be"),
        "rank_text": ({}, {"rank": "4"}, "rank must be an integer"),
        "rank_too_big": ({}, {"rank": 32}, "rank must be"),
        "distance": ({}, {"distance": "cos"}, "distance must be"),
        "bits": ({}, {"quantization_bits": 5}, "quantization_bits must be"),
        "bits_float": ({}, {"quantization_bits": 8.0}, "quantization_bits must be an integer"),
        "bits_none_for_codes": ({}, {"quantization_bits": None}, "missing"),
        "train_size": ({}, {"train_size": 9}, "train_size must be"),
        "balanced": ({}, {"balanced": 1}, "balanced must be a bool"),
        "refit_growth": ({}, {"refit_growth": -1.0}, "refit_growth must be"),
        "n_float": ({}, {"n": 520.0}, "n must be an integer"),
    }
    for name, (arrays, meta_change, msg) in cases.items():
        bad = _rewrite(good, tmp_path / f"{name}.npz", arrays, meta_change)
        with pytest.raises(StorageError, match=re.escape(str(bad)) + ".*(" + msg + ")") as e:
            LorannIndex.load(bad)
        assert "\n" not in str(e.value), name
    back = LorannIndex.load(_rewrite(good, tmp_path / "same.npz"))
    np.testing.assert_array_equal(back.search(q, 5, 2, 20), ix.search(q, 5, 2, 20))


def test_load_of_a_npy_file_or_a_non_path(tmp_path, data):
    from topkattn.storage import StorageError

    x, _ = data
    np.save(tmp_path / "x.npy", x)
    with pytest.raises(StorageError, match="single .npy array"):
        LorannIndex.load(tmp_path / "x.npy")
    with pytest.raises(TypeError, match="path must be a str or os.PathLike, got int"):
        LorannIndex.load(3)


# ----------------------------------------------------------------------------- CUDA scorer routing
@pytest.mark.cuda
def test_cuda_lorann_search_skips_empty_clusters():
    """lorann_search (simulator without a GPU) routes past the empty clusters like the index."""
    from numba.core import config

    if config.ENABLE_CUDASIM:
        xp = np
    else:
        xp = pytest.importorskip("cupy")
    from topkattn.backend import to_numpy
    from topkattn.cuda.lorann_score import lorann_arrays, lorann_search

    rng = np.random.default_rng(0)
    x = np.tile(rng.standard_normal((1, 16)).astype(np.float32), (40, 1))
    ix = LorannIndex(x, 4, rank=4, train_size=1)
    ix.build()
    assert (ix.cluster_sizes > 0).sum() == 1
    q = rng.standard_normal((2, 16)).astype(np.float32)
    _lure_to_empty(ix, q[0])
    ids, _ = lorann_search(lorann_arrays(ix, xp), xp.asarray(q), 3, 2, 3)
    np.testing.assert_array_equal(to_numpy(ids), ix.exact_search(q, 3))


def test_numpy_scalar_arguments_are_stored_as_plain_values(tmp_path, data):
    """NumPy ints/floats as parameters are kept as Python ints/floats (the file's JSON header
    could not hold np.int64: save failed); a float quantization_bits is refused."""
    x, q = data
    ix = LorannIndex(x[:300], np.int64(4), np.int32(16), np.int64(8), np.int64(4), np.int64(2),
                     refit_growth=np.float32(0.5))
    assert type(ix.quantization_bits) is int and type(ix.refit_growth) is float
    ix.build()
    ix.save(tmp_path / "ix.npz")
    back = LorannIndex.load(tmp_path / "ix.npz")
    np.testing.assert_array_equal(back.search(q, 5, 2, 20), ix.search(q, 5, 2, 20))
    with pytest.raises(TypeError, match="quantization_bits must be an integer"):
        LorannIndex(x[:300], 4, quantization_bits=8.0, rank=4)
    with pytest.raises(TypeError, match="distance must be IP, L2"):
        LorannIndex(x[:300], 4, rank=4, distance=2.0)
    with pytest.raises(ValueError, match="distance must be IP"):  # ints: the IP/L2 constants only
        LorannIndex(x[:300], 4, rank=4, distance=2)
    with pytest.raises(TypeError, match="balanced must be True or False"):
        LorannIndex(x[:300], 4, rank=4, balanced="yes")


@pytest.mark.parametrize("bits", [8, None])
def test_l2_exact_results_far_from_the_origin(bits):
    """Points 1000 from the origin, neighbours 0.1-3 apart: exact search, full re-ranked search
    (single, small-batch and batch paths) and the dense padded path give float64 brute force's
    ids and distances.  The float32 expansion |q|^2 - 2 q.x + |x|^2 lost these distances to
    cancellation (every row wrong at this offset, distance 2.0 for a true 0.107)."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2000, 16)) + 1000).astype(np.float32)
    q = (x[:40] + 0.1 * rng.standard_normal((40, 16))).astype(np.float32)
    d64 = ((q.astype(np.float64)[:, None, :] - x.astype(np.float64)[None]) ** 2).sum(-1)  # (40, N)
    want_ids = np.argsort(d64, axis=1, kind="stable")[:, :3]
    want_d = np.take_along_axis(d64, want_ids, axis=1)
    ix = LorannIndex(x, 10, None, bits, 4, None, "l2")
    ix.build()
    q2, _ = ix._check_queries(q, "q", np)
    results = [ix.exact_search(q, 3, True), ix.search(q, 3, 10, 2000, True),
               ix._output(*ix._search_xp(q2, 3, 10, 2000, np, exclusive=True), q2, False, True, np)]
    results += [tuple(np.stack(r) for r in zip(*[ix.search(qi, 3, 10, 2000, True) for qi in q]))]
    results += [ix.search(q[:2], 3, 10, 2000, True)]  # (compared on its two rows below)
    for ids, dist in results:
        n = len(ids)
        np.testing.assert_array_equal(ids, want_ids[:n])
        np.testing.assert_allclose(dist, want_d[:n], rtol=1e-4, atol=1e-3)


def test_rows_whose_products_overflow_float32_are_refused():
    """Finite float32 rows of norm ~1e19 used to be accepted and then gave NaN distances, wrong
    ids, -1 ids or an internal bincount error; 3e17 (squared norms < 2^124) still works exactly."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    for distance in ("ip", "l2"):
        with pytest.raises(ValueError, match="data has rows of squared norm"):
            LorannIndex(x * np.float32(1e19), 4, None, None, 2, None, distance)
        big = x * np.float32(3e17)
        ix = LorannIndex(big, 4, None, None, 2, None, distance)
        ix.build()
        for fn in (lambda v: ix.search(v, 3, 4, 300), lambda v: ix.exact_search(v, 3), ix.add):
            for v in (big[7] * np.float32(10), big[:2] * np.float32(10)):  # single and batch paths
                with pytest.raises(ValueError, match="(q|new_points) has rows of squared norm"):
                    fn(v)
        q = big[7] + np.float32(3e16) * rng.standard_normal(8).astype(np.float32)
        b64, q64 = big.astype(np.float64), q.astype(np.float64)
        want = np.argsort(((b64 - q64) ** 2).sum(1) if distance == "l2" else -(b64 @ q64), kind="stable")[:3]
        np.testing.assert_array_equal(ix.exact_search(q, 3), want)
        np.testing.assert_array_equal(ix.search(q, 3, 4, 300), want)
