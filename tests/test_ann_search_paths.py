"""LorannIndex.search: the single-query latency path (one float32 query, int arguments: route
and search in one kernel call) returns exactly what the general path returns."""
import numpy as np
import pytest

from topkattn.ann import LorannIndex


@pytest.mark.parametrize("distance,bits", [("ip", 8), ("l2", 8), ("ip", None), ("l2", 4)])
def test_single_query_path_equals_general_path(distance, bits):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3000, 20)) + rng.integers(0, 4, (3000, 1))).astype(np.float32)
    q = rng.standard_normal((12, 20)).astype(np.float32)
    ix = LorannIndex(x, 30, 16, bits, 8, 2, distance, seed=0)
    ix.build()
    for k, w, rr in ((10, 4, 0), (10, 6, 40), (5, 30, 3000), (4000, 2, 50)):
        for qi in q:
            fast = ix.search(qi, k, w, rr, return_distances=True)  # 1-D float32, ints: the fast path
            slow = ix.search(qi[None].astype(np.float64), np.int64(k), w, rr, return_distances=True)
            np.testing.assert_array_equal(fast[0], slow[0][0])
            np.testing.assert_array_equal(fast[1], slow[1][0])
            np.testing.assert_array_equal(ix.search(qi, k, w, rr), slow[0][0])


def test_single_query_path_checks_its_input_like_the_general_path():
    x = np.random.default_rng(1).standard_normal((200, 6)).astype(np.float32)
    ix = LorannIndex(x, 4, None, 8, 2, 2, "ip")
    ix.build()
    bad = x[0].copy()
    bad[2] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        ix.search(bad, 3, 2, 0)
    with pytest.raises(ValueError, match="shape"):
        ix.search(x[0, :5].copy(), 3, 2, 0)
    with pytest.raises(ValueError, match="k"):
        ix.search(x[0], 0, 2, 0)
    with pytest.raises(ValueError, match="points_to_rerank"):
        ix.search(x[0], 3, 2, -1)
    huge = np.full(6, 3e19, np.float32)  # finite, but q.q overflows float32: refused on both paths
    for qq in (huge, huge[None]):
        with pytest.raises(ValueError, match="q has rows of squared norm inf"):
            ix.search(qq, 3, 2, 0)


@pytest.mark.parametrize("nc", [7, 100, 259])
@pytest.mark.parametrize("l2", [False, True])
def test_route_small_equals_a_stable_ranking_of_exact_scores(nc, l2):
    """The few-query routing kernel (register panels of 4 queries x 64 clusters, zero-padded
    columns, a scalar tail for unpadded ones) ranks the non-empty clusters like a stable
    float64 argsort; halves make every float32 product and sum exact, so ties are real."""
    from topkattn.ann import kernels

    rng = np.random.default_rng(nc)
    g, nq = 24, 11
    cent = (rng.integers(-4, 5, (nc, g)) / 2).astype(np.float32)
    cent[3] = cent[1]  # tied clusters
    qr = (rng.integers(-4, 5, (nq, g)) / 2).astype(np.float32)
    size = rng.integers(1, 9, nc)
    size[[0, 5]] = 0  # empty clusters are never chosen
    cnorm = np.einsum("cd,cd->c", cent, cent).astype(np.float32)
    s = qr.astype(np.float64) @ cent.T.astype(np.float64)
    if l2:
        s = 2 * s - cnorm
    s[:, size == 0] = -np.inf
    padded = np.zeros((g, -(-nc // 16) * 16), np.float32)
    padded[:, :nc] = cent.T
    for w in (w for w in (1, 5, 16, 20) if w <= (size > 0).sum()):  # as the callers keep it
        want = np.argsort(-s, axis=1, kind="stable")[:, :w]
        for cent_t in (padded, np.ascontiguousarray(cent.T)):
            out = np.empty((nq, w), np.int64)
            kernels.route_small(qr, cent_t, cnorm, size, l2, w, out)
            np.testing.assert_array_equal(out, want)
            one = np.empty((1, w), np.int64)  # one query at a time: the same answer
            for i in (0, nq - 1):
                kernels.route_small(qr[i:i + 1], cent_t, cnorm, size, l2, w, one)
                np.testing.assert_array_equal(one[0], want[i])
