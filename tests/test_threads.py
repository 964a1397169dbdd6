"""topkattn.threads: the BLAS single-thread switch under concurrent callers."""
import threading

import numpy as np
import pytest

threadpoolctl = pytest.importorskip("threadpoolctl")

import topkattn  # noqa: E402
from topkattn.threads import blas_single_thread  # noqa: E402


def _blas_threads():
    import scipy.linalg.cython_blas  # noqa: F401  (load every BLAS the switch controls)

    return sorted((i["filepath"], i["num_threads"]) for i in threadpoolctl.threadpool_info()
                  if i["user_api"] == "blas")


def _release_control():
    """threadpoolctl >= 3.8 lets one thread at a time control OpenBLAS: give it up."""
    clear = getattr(getattr(threadpoolctl, "OpenBLASController", None), "clear_controlling_thread", None)
    if clear is not None:
        clear()


@pytest.fixture
def two_blas_threads():
    """Run the test with every BLAS at 2 threads (so that 1 thread is a visible change),
    without this thread keeping control of OpenBLAS."""
    limiter = threadpoolctl.ThreadpoolController().limit(limits=2, user_api="blas")
    _release_control()
    try:
        before = _blas_threads()
        if not before or any(n != 2 for _, n in before):
            pytest.skip(f"BLAS cannot run 2 threads here: {before}")
        yield before
    finally:
        limiter.restore_original_limits()
        _release_control()


@pytest.mark.parametrize("leave_order", ["same", "reverse", "interleaved"])
def test_overlapping_switches_restore_blas_threads(two_blas_threads, leave_order):
    # N threads enter one after another (each inside before the next enters), then leave in
    # the given order: whoever leaves last, BLAS must be back at its threads, and at one
    # thread while anyone is still inside
    N = 4
    order = {"same": list(range(N)), "reverse": list(range(N))[::-1],
             "interleaved": [1, 3, 0, 2]}[leave_order]
    entered = [threading.Event() for _ in range(N)]
    may_leave = [threading.Event() for _ in range(N)]
    left = [threading.Event() for _ in range(N)]
    inside, errors = {}, []

    def worker(i):
        try:
            if i:
                entered[i - 1].wait(10)
            with blas_single_thread():
                inside[i] = _blas_threads()
                entered[i].set()
                may_leave[i].wait(10)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
        finally:
            entered[i].set()
            left[i].set()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(N)]
    for t in threads:
        t.start()
    assert entered[-1].wait(10)
    for n, i in enumerate(order):
        may_leave[i].set()
        assert left[i].wait(10)
        if n < N - 1:  # someone is still inside
            assert all(c == 1 for _, c in _blas_threads())
    for t in threads:
        t.join(10)
    assert not errors
    assert all(all(c == 1 for _, c in v) for v in inside.values()) and len(inside) == N
    assert _blas_threads() == two_blas_threads


def test_concurrent_switches_with_barriers(two_blas_threads):
    # many rounds of N threads entering and leaving at once (barriers force the overlap)
    N, rounds = 4, 20
    barrier = threading.Barrier(N)
    errors = []

    def worker():
        try:
            for _ in range(rounds):
                barrier.wait(10)
                with blas_single_thread():
                    barrier.wait(10)
                    with blas_single_thread():  # nested entries count too
                        pass
                barrier.wait(10)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(N)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert _blas_threads() == two_blas_threads


def test_concurrent_topk_attention_keeps_blas_threads(two_blas_threads):
    # the reported case: 4 threads calling topk_attention at once (several query chunks each,
    # so each call runs its chunks on the pool under blas_single_thread)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 64, 8)) for _ in range(3))
    want = topkattn.topk_attention(q, k, v, topk=4, chunk_size=8, impl="numba")
    barrier = threading.Barrier(4)
    results, errors = [], []

    def worker():
        try:
            for _ in range(5):
                barrier.wait(10)
                results.append(topkattn.topk_attention(q, k, v, topk=4, chunk_size=8, impl="numba"))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 20
    for r in results:
        np.testing.assert_array_equal(r, want)
    assert _blas_threads() == two_blas_threads
