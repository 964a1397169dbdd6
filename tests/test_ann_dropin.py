"""``from topkattn.ann import LorannIndex, IP, L2`` as a drop-in for the reference ``lorann``.

The drop-in test runs one script, written the way the reference's README writes it
(positional arguments, ``IP``/``L2``, ``build(True, False)``, ``search(Q, k, w, r, True)``,
``n_threads``, ``get_dissimilarity``, ``copy``), against ``topkattn.ann`` and -- where the
reference is installed -- against ``lorann`` with the very same calls; both must accept every
call and reach a recall floor against brute force.  The unit tests below pin each piece of
the compatibility (and that the index's own extras still work with it).
"""
import os
import threading
from unittest import mock

import numba
import numpy as np
import pytest

from topkattn import ann
from topkattn.ann import IP, L2, LorannIndex
from topkattn.ann import index as index_module

try:  # the reference package (optional): the same script must run on it unchanged
    import lorann as reference
except ImportError:  # pragma: no cover - depends on the environment
    reference = None

RECALL_FLOOR = 0.9  # recall@10 of the script's re-ranked full-dimension searches, both packages
# Lower floors where this index trails the reference (measured on the script's data, l2:
# no re-ranking 0.43 vs 0.65, global_dim=64 with training queries 0.72 vs 1.0; ip 0.80 vs
# 0.91 and 0.99 vs 1.0): a recall gap of the index, not of the drop-in API tested here.
APPROX_FLOOR = 0.35  # points_to_rerank=0
REDUCED_FLOOR = 0.6  # global_dim=64, rank 16, training queries

# The README-style script: only the import line differs between the two packages.
SCRIPT = '''
import os
import numpy as np
from {module} import LorannIndex, IP, L2

rng = np.random.default_rng(0)
centers = 4.0 * rng.standard_normal((40, 128))
X = (centers[rng.integers(0, 40, 4000)] + rng.standard_normal((4000, 128))).astype(np.float32)
Q = (centers[rng.integers(0, 40, 100)] + rng.standard_normal((100, 128))).astype(np.float32)
TQ = (centers[rng.integers(0, 40, 2000)] + rng.standard_normal((2000, 128))).astype(np.float32)
k = 10

def recall(found, exact):
    return np.mean([len(np.intersect1d(a, b)) for a, b in zip(found, exact)]) / exact.shape[1]

results = {{}}
for distance in (IP, L2):
    if distance == IP:
        truth = np.argsort(-(Q @ X.T), axis=1, kind="stable")[:, :k]
    else:
        d2 = (Q * Q).sum(1)[:, None] - 2 * Q @ X.T + (X * X).sum(1)[None]
        truth = np.argsort(d2, axis=1, kind="stable")[:, :k]

    # data, n_clusters, global_dim, quantization_bits, rank, train_size, distance
    index = LorannIndex(X, 64, None, 8, 32, 5, distance)
    index.build(True, False)                       # approximate, verbose
    I = index.search(Q, k, 16, 100)                # clusters_to_search, points_to_rerank
    I2, D2 = index.search(Q, k, 16, 100, True)     # return_distances
    I3 = index.search(Q, k, 16, 100, False, 1)     # n_threads
    I4 = index.search(Q, k, 10 ** 4, 100)          # clusters_to_search > n_clusters: clamped
    I5 = index.search(Q, k, 16, 0)                 # no re-ranking: approximate scores only
    i1, d1 = index.search(Q[0], k, 16, 100, True)  # one query vector
    E = index.exact_search(Q, k)
    E2, ED = index.exact_search(Q, k, True, 2)     # return_distances, n_threads
    g = index.get_dissimilarity(Q[0], X[E2[0, 0]])
    results[distance] = dict(
        recall=recall(I, truth), recall_approx=recall(I5, truth),
        recall_clamped=recall(I4, truth), recall_exact=recall(E, truth),
        same=bool((I == I2).all() and (I == I3).all()), single=(i1.shape, d1.shape),
        dissimilarity=(g, float(ED[0, 0])), shapes=(I.shape, D2.shape, E2.shape, ED.shape),
        dtypes=(I.dtype, D2.dtype), sizes=(index.n_samples, index.dim, index.n_clusters),
        ascending=bool((np.diff(D2, axis=1) >= -1e-3 * (1 + np.abs(D2[:, 1:]))).all()))

    # global_dim, rank 16, train_size, balanced, copy; keyword build with training queries
    index = LorannIndex(X, 64, 64, 8, 16, 3, distance, False, True)
    index.build(False, False, -1, training_queries=TQ)
    results[distance]["recall_reduced"] = recall(index.search(Q, k, 16, 100), truth)

    # unquantised, copy=False; save and load
    index = LorannIndex(data=X, n_clusters=64, global_dim=None, quantization_bits=None,
                        rank=32, train_size=5, distance=distance, balanced=False, copy=False)
    index.build(approximate=True, verbose=False, n_threads=1)
    results[distance]["recall_float"] = recall(index.search(Q, k, 16, 100), truth)
    path = os.path.join(TMP, "index" + str(distance))
    index.save(path)
    loaded = LorannIndex.load(path)
    results[distance]["loaded_same"] = bool(
        (loaded.search(Q, k, 16, 100) == index.search(Q, k, 16, 100)).all())

    # 4-bit quantisation, by keyword
    index = LorannIndex(X, 64, None, quantization_bits=4, rank=32, train_size=5, distance=distance)
    index.build()
    results[distance]["recall_4bit"] = recall(index.search(Q, k, 16, 200), truth)
'''


def _run_script(module, tmp_path):
    namespace = {"TMP": str(tmp_path)}
    exec(compile(SCRIPT.format(module=module), f"<README script: {module}>", "exec"), namespace)
    return namespace["results"]


def _check_script_results(results, int_dtype, float_dtype, clamp=True):
    for distance, r in results.items():
        label = f"distance={distance}"
        for name in ("recall", "recall_float", "recall_4bit"):
            assert r[name] >= RECALL_FLOOR, (label, name, r)
        assert r["recall_reduced"] >= REDUCED_FLOOR, (label, r)
        assert r["recall_approx"] >= APPROX_FLOOR, (label, r)
        if clamp:
            assert r["recall_clamped"] >= r["recall"] - 1e-9, (label, r)
        assert r["recall_exact"] == 1.0, (label, r)
        assert r["same"] and r["loaded_same"], (label, r)
        assert r["single"] == ((10,), (10,)), (label, r)
        assert r["shapes"] == ((100, 10),) * 4, (label, r)
        assert r["sizes"] == (4000, 128, 64), (label, r)
        assert r["ascending"], (label, r)
        g, exact = r["dissimilarity"]
        assert isinstance(g, float) and g == pytest.approx(exact, rel=1e-4, abs=1e-3), (label, r)
        assert r["dtypes"] == (np.dtype(int_dtype), np.dtype(float_dtype)), (label, r)


def test_readme_script_runs_unchanged(tmp_path):
    results = _run_script("topkattn.ann", tmp_path)
    assert set(results) == {IP, L2}
    # the documented difference: int64 ids and float32 distances (the reference: int32, float64)
    _check_script_results(results, np.int64, np.float32)


@pytest.mark.skipif(reference is None, reason="the reference lorann package is not installed")
def test_readme_script_runs_on_the_reference_too(tmp_path):
    ours = _run_script("topkattn.ann", tmp_path / "ours")
    ref = _run_script("lorann", tmp_path)
    # (the reference accepts clusters_to_search > n_clusters, but its results there vary from
    # run to run -- recall 0.02 to 0.98 seen -- so only ours is held to the clamp's recall)
    _check_script_results(ref, np.int32, np.float64, clamp=False)
    for distance in (IP, L2):  # the same calls, comparable quality
        assert ours[distance]["recall"] >= ref[distance]["recall"] - 0.05, (ours, ref)


# ---------------------------------------------------------------- unit tests
def _data(n=600, d=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    q = rng.standard_normal((12, d)).astype(np.float32)
    return x, q


@pytest.fixture(scope="module")
def built():
    x, q = _data()
    ix = LorannIndex(x, 8, None, 8, 4, 2, IP)
    ix.build(True, False)
    return ix, x, q


def test_distance_constants_match_the_reference():
    assert (IP, L2) == (0, 1) and ann.__all__ == ["IP", "L2", "LorannIndex"]
    if reference is not None:
        assert (IP, L2) == (reference.IP, reference.L2)


@pytest.mark.parametrize("given, stored", [
    (IP, "ip"), (L2, "l2"), ("ip", "ip"), ("L2", "l2"), (np.int64(1), "l2"), (np.int32(0), "ip")])
def test_distance_accepts_constants_and_strings(given, stored):
    x, _ = _data(200)
    ix = LorannIndex(x, 4, None, 8, 4, 2, given)
    assert ix.distance == stored
    ix.build()
    assert ix.search(x[:3], 3, 4, 50).shape == (3, 3)


def test_distance_from_the_reference_module():
    if reference is None:
        pytest.skip("the reference lorann package is not installed")
    x, _ = _data(200)
    assert LorannIndex(x, 4, None, 8, 4, 2, reference.IP).distance == "ip"
    assert LorannIndex(x, 4, None, 8, 4, 2, reference.L2).distance == "l2"


@pytest.mark.parametrize("bad, exc", [
    (3, ValueError), (-1, ValueError), ("cos", ValueError), (True, TypeError), (1.0, TypeError),
    (None, TypeError)])
def test_distance_refused_names_it(bad, exc):
    x, _ = _data(200)
    with pytest.raises(exc, match="^distance"):
        LorannIndex(x, 4, None, 8, 4, 2, bad)


def test_copy_is_accepted_and_the_index_owns_its_storage():
    x, q = _data(300)
    for copy in (False, True, np.bool_(False)):
        mine = x.copy()
        ix = LorannIndex(mine, 4, None, 8, 4, 2, IP, False, copy)  # positional, as the reference
        ix.build()
        before = ix.exact_search(q, 5, True)
        mine[:] = 0  # the caller's array changes: the index does not (it always copies)
        after = ix.exact_search(q, 5, True)
        assert (before[0] == after[0]).all() and (before[1] == after[1]).all()
        assert not np.shares_memory(ix.data, mine)
    with pytest.raises(TypeError, match="^copy"):
        LorannIndex(x, 4, None, 8, 4, 2, IP, False, "no")


def test_build_takes_the_references_positional_arguments(capsys):
    x, q = _data(400)
    ix = LorannIndex(x, 4, None, 8, 4, 2, IP)
    ix.build(True, False, 1)  # approximate, verbose, n_threads
    assert ix.built and capsys.readouterr().out == ""
    ix = LorannIndex(x, 4, None, 8, 4, 2, IP)
    ix.build(False, True, -1, training_queries=q)  # verbose prints; training queries by keyword
    assert "k-means" in capsys.readouterr().out
    ix = LorannIndex(x, 4, None, 8, 4, 2, IP)
    ix.build(approximate=True, training_queries=q)  # the package's own keyword style
    assert ix.search(q, 5, 2, 20).shape == (len(q), 5)


def test_build_refuses_bad_arguments_naming_them():
    x, q = _data(200)
    ix = LorannIndex(x, 4, None, 8, 4, 2, IP)
    with pytest.raises(TypeError, match="^verbose.*training_queries="):
        ix.build(True, q)  # the old positional training_queries: now the reference's verbose
    with pytest.raises(TypeError, match="^approximate"):
        ix.build("yes")
    with pytest.raises(TypeError, match="^n_threads"):
        ix.build(True, False, 1.5)
    with pytest.raises(ValueError, match="^n_threads"):
        ix.build(True, False, 0)
    assert not ix.built
    ix.build(True, False)
    assert ix.built


def test_n_threads_gives_the_same_results(built):
    ix, _, q = built
    for args in ((5, 3, 20), (5, 8, 0)):
        want = ix.search(q, *args, True)
        for n in (1, 2, -1, 10 ** 6):  # more than Numba has: clamped
            got = ix.search(q, *args, True, n)
            assert (got[0] == want[0]).all() and (got[1] == want[1]).all()
    want = ix.exact_search(q, 7, True)
    for n in (1, -1):
        got = ix.exact_search(q, 7, True, n)
        assert (got[0] == want[0]).all() and (got[1] == want[1]).all()
    got = ix.search(q[0], 5, 3, 20, n_threads=1)  # by keyword, one query
    assert got.shape == (5,)


@pytest.mark.parametrize("bad, exc", [(0, ValueError), (-2, ValueError), (1.0, TypeError),
                                      (True, TypeError), ("2", TypeError)])
def test_n_threads_refused_names_it(built, bad, exc):
    ix, _, q = built
    with pytest.raises(exc, match="^n_threads"):
        ix.search(q, 5, 3, 20, False, bad)
    with pytest.raises(exc, match="^n_threads"):
        ix.exact_search(q, 5, False, bad)


def test_n_threads_applies_during_the_call_to_that_thread_only(built):
    """Numba's count is set for the calling thread during the call and restored after it
    (an error inside included); another thread meanwhile keeps its own count."""
    ix, _, q = built
    default = numba.get_num_threads()
    seen, inside, release = [], threading.Event(), threading.Event()
    real = index_module.kernels.exact_topk

    def spy(*args):
        seen.append(numba.get_num_threads())
        inside.set()
        release.wait(10)
        return real(*args)

    with mock.patch.object(index_module.kernels, "exact_topk", spy):
        t = threading.Thread(target=ix.exact_search, args=(q[:2], 3, False, 1))
        t.start()
        assert inside.wait(10)
        other = numba.get_num_threads()  # this thread, while the other one searches
        release.set()
        t.join(10)
    assert seen == [1] and other == default and numba.get_num_threads() == default

    def boom(*args):
        seen.append(numba.get_num_threads())
        raise RuntimeError("kernel failed")

    with mock.patch.object(index_module.kernels, "exact_topk", boom):
        with pytest.raises(RuntimeError, match="kernel failed"):
            ix.exact_search(q, 3, False, 1)
    assert seen[-1] == 1 and numba.get_num_threads() == default


def test_n_threads_takes_the_read_lock_like_search(built):
    """search/exact_search with n_threads still share the index: they wait for a writer."""
    ix, _, q = built
    done = threading.Event()
    with ix._lock.write():
        t = threading.Thread(target=lambda: (ix.search(q, 5, 3, 20, False, 1), done.set()))
        t.start()
        assert not done.wait(0.2)
    t.join(10)
    assert done.is_set()


def test_clusters_to_search_above_n_clusters_is_clamped(built):
    ix, _, q = built
    want = ix.search(q, 6, ix.n_clusters, 30, True)
    for w in (ix.n_clusters + 1, 10 ** 9, np.int64(100)):
        got = ix.search(q, 6, w, 30, True)
        assert (got[0] == want[0]).all() and (got[1] == want[1]).all()
    with pytest.raises(ValueError, match="^clusters_to_search"):
        ix.search(q, 6, 0, 30)
    with pytest.raises(TypeError, match="^clusters_to_search"):
        ix.search(q, 6, 2.0, 30)


@pytest.mark.parametrize("distance", [IP, L2])
def test_get_dissimilarity_matches_the_search_distances(distance):
    x, q = _data(400)
    ix = LorannIndex(x, 4, None, 8, 4, 2, distance)
    u, v = q[0], x[7]
    want = -float(u @ v) if distance == IP else float(((u - v) ** 2).sum())
    got = ix.get_dissimilarity(u, v)  # before build, like the reference
    assert isinstance(got, float) and got == pytest.approx(want, rel=1e-5, abs=1e-5)
    assert ix.get_dissimilarity(list(map(float, u)), v.astype(np.float64)) == pytest.approx(got)
    ix.build()
    ids, dist = ix.search(q, 5, 4, 400, True)  # every cluster, exact re-rank
    for i in range(len(q)):
        for j in range(5):
            assert ix.get_dissimilarity(q[i], x[ids[i, j]]) == pytest.approx(
                float(dist[i, j]), rel=1e-4, abs=1e-4)
    if reference is not None:  # the reference needs dim >= 64
        x64, q64 = _data(300, 64)
        ref = reference.LorannIndex(x64, 4, None, 8, 32, 2, distance)
        ours = LorannIndex(x64, 4, None, 8, 32, 2, distance)
        assert ours.get_dissimilarity(q64[0], x64[3]) == pytest.approx(
            ref.get_dissimilarity(q64[0], x64[3]), rel=1e-5, abs=1e-4)


def test_get_dissimilarity_refuses_bad_vectors_naming_them(built):
    ix, x, q = built
    with pytest.raises(ValueError, match="^u"):
        ix.get_dissimilarity(q[0, :5], x[0])
    with pytest.raises(ValueError, match="^v"):
        ix.get_dissimilarity(q[0], x[:2])
    with pytest.raises(TypeError, match="^u"):
        ix.get_dissimilarity(q[0].astype(np.complex64), x[0])
    with pytest.raises(ValueError, match="^v"):
        ix.get_dissimilarity(q[0], np.full(32, np.nan))
    with pytest.raises(ValueError, match="^v.*float32 range"):
        ix.get_dissimilarity(q[0], np.full(32, 1e300))


def test_return_dtypes_are_documented(built):
    """int64 ids and float32 distances, kept on purpose (see the module docstring); the
    difference from the reference's int32/float64 is documented where users look."""
    ix, _, q = built
    ids, dist = ix.search(q, 5, 3, 20, True)
    assert ids.dtype == np.int64 and dist.dtype == np.float32
    ids, dist = ix.exact_search(q, 5, True)
    assert ids.dtype == np.int64 and dist.dtype == np.float32
    for doc in (index_module.__doc__, LorannIndex.search.__doc__, ann.__doc__):
        assert "int32" in doc and "float64" in doc


def test_extras_still_work_in_the_drop_in_style(tmp_path):
    """add/refit, seeds and save/load behind the reference-style constructor and build."""
    x, q = _data(500)
    a = LorannIndex(x[:400], 4, None, 8, 4, 2, L2, False, False, seed=3, refit_growth=None)
    b = LorannIndex(x[:400], 4, None, 8, 4, 2, L2, False, True, seed=3, refit_growth=None)
    a.build(True, False)
    b.build(True, False, 1)
    assert (a.search(q, 5, 2, 20) == b.search(q, 5, 2, 20)).all()  # same seed, same index
    new = a.add(x[400:])
    assert (new == np.arange(400, 500)).all() and a.n_samples == 500
    ids = a.search(x[450:460], 1, 4, 500, False, 1)[:, 0]  # every cluster, every point
    assert (ids == np.arange(450, 460)).all()  # added points are found (l2: itself first)
    a.refit()
    assert not len(a.stale_clusters)
    path = os.path.join(tmp_path, "ix.npz")
    a.save(path)
    c = LorannIndex.load(path)
    assert c.distance == "l2"
    assert (c.search(q, 5, 10, 20, False, 1) == a.search(q, 5, 4, 20)).all()
    assert c.get_dissimilarity(q[0], x[0]) == a.get_dissimilarity(q[0], x[0])


def test_cupy_queries_take_n_threads_and_the_clamp():
    cp = pytest.importorskip("cupy")
    try:
        cp.zeros(1)
    except Exception as e:  # pragma: no cover - no usable GPU
        pytest.skip(f"no usable CUDA device: {e}")
    x, q = _data(400)
    ix = LorannIndex(x, 4, None, 8, 4, 2, IP)
    ix.build(True, False)
    want_i, want_d = ix.search(q, 5, 4, 50, True)
    got_i, got_d = ix.search(cp.asarray(q), 5, 100, 50, True, 1)
    assert (cp.asnumpy(got_i) == want_i).all()
    np.testing.assert_allclose(cp.asnumpy(got_d), want_d, rtol=1e-4, atol=1e-4)
    e_i = ix.exact_search(cp.asarray(q), 5, False, 2)
    assert (cp.asnumpy(e_i) == ix.exact_search(q, 5)).all()
