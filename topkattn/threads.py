"""CPU threading for the hot loops: one BLAS thread per worker, workers from one pool.

Multi-threaded BLAS and Numba's OpenMP threads both spin for milliseconds after each
call; interleaving them (a GEMM, then a ``prange`` kernel, then a GEMM ...) makes each
starve the other (the T = S = 8192 top-k forward took 2.2 s that way on 2 cores, 1.2 s
with the work split below).  So the loops that alternate GEMMs and Numba kernels pin BLAS
to one thread and run whole pieces of work (GEMM + kernel) on a shared thread pool;
the kernels are ``nogil``, so the pieces run in parallel.
"""
import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

_BLAS_CONTROLLER = []
_POOL = []
_PREFIX = "topkattn-worker"


def blas_single_thread():
    """Context pinning BLAS to one thread (threadpoolctl; a no-op if it is missing)."""
    if not _BLAS_CONTROLLER:
        try:
            import scipy.linalg.cython_blas  # noqa: F401  (the BLAS Numba's np.dot calls: limit it too)
        except ImportError:  # pragma: no cover - scipy is a dependency
            pass
        try:
            from threadpoolctl import ThreadpoolController

            _BLAS_CONTROLLER.append(ThreadpoolController())
        except ImportError:  # pragma: no cover - threadpoolctl is a dependency
            _BLAS_CONTROLLER.append(None)
    ctl = _BLAS_CONTROLLER[0]
    return contextlib.nullcontext() if ctl is None else ctl.limit(limits=1, user_api="blas")


def n_workers():
    """Worker threads to use: Numba's thread count, at most the number of cores; 1 inside a
    worker of :func:`pool` (nested work runs inline, so the pool can never deadlock)."""
    if threading.current_thread().name.startswith(_PREFIX):
        return 1
    try:
        import numba

        n = numba.get_num_threads()
    except ImportError:  # pragma: no cover - numba is a dependency
        n = os.cpu_count() or 1
    return max(1, min(n, os.cpu_count() or 1))


def _forget_pool_after_fork():
    _POOL.clear()  # a forked child has none of the parent's worker threads: start a new pool


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def pool():
    """The process-wide worker pool (created on first use, one thread per core)."""
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(max(1, os.cpu_count() or 1), thread_name_prefix=_PREFIX))
    return _POOL[0]
