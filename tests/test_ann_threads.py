"""LorannIndex shared by threads: searches while another thread adds, and the RWLock itself.

The hammer runs in a child ``python -X faulthandler`` (a crash there fails one test with its
traceback instead of killing pytest): search threads check every result (ids in range, the
reported distance of each returned id equal to its exact distance) while the main thread
adds points, and the final index must equal one grown by the same adds serially.
"""
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from topkattn.ann.rwlock import RWLock

HAMMER = textwrap.dedent('''
    import sys, threading, time
    import numpy as np
    from topkattn.ann import LorannIndex

    refit_growth = None if sys.argv[1] == "none" else float(sys.argv[1])
    rng = np.random.default_rng(0)
    X = rng.standard_normal((2000, 32)).astype(np.float32)
    new = rng.standard_normal((1500, 32)).astype(np.float32)
    Q1 = rng.standard_normal((1, 32)).astype(np.float32)
    Q4 = rng.standard_normal((4, 32)).astype(np.float32)
    Q40 = rng.standard_normal((40, 32)).astype(np.float32)  # the batched GEMM path

    def make():
        ix = LorannIndex(X, n_clusters=16, rank=8, refit_growth=refit_growth, seed=0)
        ix.build()
        return ix

    ix = make()
    done = threading.Event()
    errors, counts = [], [0, 0, 0]

    def check(q, ids, dist, rr):
        n = len(ix)  # only grows: every id returned so far is below it
        assert ids.dtype == np.int64 and ids.shape == (len(q), 5), ids.shape
        assert ((ids >= 0) & (ids < n)).all(), ids
        if rr:  # re-ranked: the reported distances are the exact ones of the returned ids
            exact = -np.einsum("qd,qkd->qk", q.astype(np.float64), ix.data[ids].astype(np.float64))
            assert np.allclose(dist, exact, rtol=1e-4, atol=1e-3), (dist, exact)
            assert (np.diff(dist, axis=1) >= -1e-3).all(), dist

    def searcher(t):
        try:
            while not done.is_set():
                for q, w, rr in ((Q1, 4, 20), (Q4, 4, 20), (Q40, 16, 30), (Q4, 16, 0)):
                    ids, dist = ix.search(q, 5, w, rr, return_distances=True)
                    check(q, ids, dist, rr)
                counts[t] += 1
        except BaseException as e:
            errors.append(repr(e))
            done.set()

    threads = [threading.Thread(target=searcher, args=(t,), daemon=True) for t in range(3)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    for i in range(1000):
        if done.is_set():
            break
        ix.add(new[i])
    for lo in range(1000, 1500, 100):
        ix.add(new[lo:lo + 100])
    done.set()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a search thread hangs"
    assert not errors, errors
    assert min(counts) > 0, counts  # every thread searched while the adds ran
    if refit_growth is None:  # no lazy refits: the result cannot depend on the interleaving
        ref = make()
        for i in range(1000):
            ref.add(new[i])
        for lo in range(1000, 1500, 100):
            ref.add(new[lo:lo + 100])
        a, b = ix.search_state(), ref.search_state()
        for name in a:
            assert np.array_equal(a[name], b[name]) if a[name] is not None else b[name] is None, name
        for q in (Q1, Q4, Q40):
            assert np.array_equal(ix.search(q, 5, 4, 20), ref.search(q, 5, 4, 20))
    print("OK", counts, round(time.perf_counter() - t0, 2))
''')


def _run_hammer(refit_growth, layer=None):
    env = dict(os.environ)
    if layer is not None:
        env["NUMBA_THREADING_LAYER"] = layer
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", HAMMER, refit_growth],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, (
        f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def test_searches_while_adding_stay_valid_and_end_equal_to_serial_adds():
    _run_hammer("none")


def test_searches_doing_lazy_refits_while_adding_stay_valid():
    _run_hammer("0.5")  # searches refit overgrown clusters: they take the write side


def test_concurrent_searches_under_the_workqueue_threading_layer():
    # workqueue aborts the process on concurrent parallel launches unless they take turns
    _run_hammer("none", layer="workqueue")


# ----------------------------------------------------------------------------- RWLock
def _wait_until(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("timed out")
        time.sleep(0.001)


def test_rwlock_readers_share_and_a_writer_excludes():
    lock = RWLock()
    inside = []
    release = threading.Event()

    def reader():
        with lock.read():
            inside.append(1)
            release.wait(10)

    readers = [threading.Thread(target=reader) for _ in range(3)]
    for t in readers:
        t.start()
    _wait_until(lambda: len(inside) == 3)  # three readers at once
    wrote = threading.Event()

    def writer():
        with lock.write():
            wrote.set()

    w = threading.Thread(target=writer)
    w.start()
    time.sleep(0.05)
    assert not wrote.is_set()  # readers hold it
    release.set()
    w.join(10)
    assert wrote.is_set()
    for t in readers:
        t.join(10)


def test_rwlock_prefers_a_waiting_writer_over_new_readers():
    lock = RWLock()
    order = []
    first_in = threading.Event()
    release = threading.Event()

    def first_reader():
        with lock.read():
            first_in.set()
            release.wait(10)
        order.append("reader 1 out")

    def writer():
        with lock.write():
            order.append("writer")

    def late_reader():
        with lock.read():
            order.append("reader 2")

    r1 = threading.Thread(target=first_reader)
    r1.start()
    first_in.wait(10)
    w = threading.Thread(target=writer)
    w.start()
    _wait_until(lambda: lock._waiting == 1)
    r2 = threading.Thread(target=late_reader)
    r2.start()
    time.sleep(0.05)
    assert "reader 2" not in order  # held back behind the waiting writer
    release.set()
    for t in (r1, w, r2):
        t.join(10)
    assert order.index("writer") < order.index("reader 2")


def test_rwlock_reentrancy_and_refused_upgrade():
    lock = RWLock()
    with lock.write():
        with lock.write():
            with lock.read():
                pass
    with lock.read():
        with lock.read():  # nested read does not wait behind a queued writer
            pass
        with pytest.raises(RuntimeError, match="release the read side"):
            lock.acquire_write()
    done = threading.Event()

    def writer():
        with lock.write():
            done.set()

    w = threading.Thread(target=writer)
    w.start()
    w.join(10)
    assert done.is_set()  # everything was released
    with pytest.raises(RuntimeError):
        lock.release_read()
    with pytest.raises(RuntimeError):
        lock.release_write()
