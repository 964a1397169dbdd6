"""CPU threading for the hot loops (one BLAS thread per worker, workers from one pool) and
the Numba kernel decorator (:func:`njit`: cached on disk, one stderr line on a real compile).

Multi-threaded BLAS and Numba's OpenMP threads both spin for milliseconds after each
call; interleaving them (a GEMM, then a ``prange`` kernel, then a GEMM ...) makes each
starve the other (the T = S = 8192 top-k forward took 2.2 s that way on 2 cores, 1.2 s
with the work split below).  So the loops that alternate GEMMs and Numba kernels pin BLAS
to one thread and run whole pieces of work (GEMM + kernel) on a shared thread pool;
the kernels are ``nogil``, so the pieces run in parallel.

One policy for a run (:func:`cpu_policy`, which training applies): the threads come from the
size of the work (:func:`threads_for`: one below ``PARALLEL_WORK`` multiply-adds per call, where
waking threads costs more than they save, and never more than the cores other processes leave
idle: spinning BLAS threads on a busy machine made train-toy's large size 5-15x slower), the
same count for BLAS and for the worker pool; and freed memory is kept for reuse
(:func:`keep_freed_memory`), since mapping and zeroing fresh pages for every large temporary
took a fifth of a train-toy step.
"""
from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

_BLAS_CONTROLLER = []
_POOL = []
_PREFIX = "topkattn-worker"
# blas_single_thread is entered by concurrent callers.  One lock guards the controller, the
# entries each thread holds and the one limiter: the first entrant lowers BLAS, the last
# leaver restores it, so overlapping calls never restore each other's limits in the wrong
# order.  Both happen on one dedicated thread: OpenBLAS's thread count is process-wide and
# threadpoolctl (>= 3.8) lets only the thread that took control of it change it, so a
# limit lowered by one caller must be restored by that same thread.
_BLAS_LOCK = threading.Lock()
_BLAS_HELD = {}  # thread ident -> entries of blas_single_thread it holds
_BLAS_LIMITER = []  # the active threadpoolctl limiter while any entry is held
_BLAS_THREAD = []  # the one-thread executor that lowers and restores the limit


def _load_numba_blas() -> None:
    """Load the BLAS Numba's np.dot calls (SciPy's, a library apart from NumPy's) so that a
    thread limit set now covers it too: loaded later by a kernel's first call, it would run
    with its default thread count under any limit set before."""
    try:
        import scipy.linalg.cython_blas  # noqa: F401
    except ImportError:  # pragma: no cover - scipy is a dependency
        pass


def _blas_controller():
    """The process-wide ThreadpoolController (None without threadpoolctl); call under _BLAS_LOCK."""
    if not _BLAS_CONTROLLER:
        _load_numba_blas()
        try:
            from threadpoolctl import ThreadpoolController

            _BLAS_CONTROLLER.append(ThreadpoolController())
        except ImportError:  # pragma: no cover - threadpoolctl is a dependency
            _BLAS_CONTROLLER.append(None)
    return _BLAS_CONTROLLER[0]


def _on_blas_thread(fn, *args):
    """Run fn(*args) on the dedicated BLAS-control thread and return its result; under _BLAS_LOCK."""
    if not _BLAS_THREAD:
        _BLAS_THREAD.append(ThreadPoolExecutor(1, thread_name_prefix="topkattn-blas"))
    try:
        job = _BLAS_THREAD[0].submit(fn, *args)
    except RuntimeError:  # interpreter shutting down: no new threads; do it here
        return fn(*args)
    return job.result()


def _lower_blas(ctl):
    limiter = ctl.limit(limits=1, user_api="blas")
    limiter.__enter__()
    return limiter


def _restore_blas(limiter):
    limiter.__exit__(None, None, None)


@contextlib.contextmanager
def blas_single_thread() -> Iterator[None]:
    """Context pinning BLAS to one thread (threadpoolctl; a no-op if it is missing).

    Reference-counted and thread-safe: any number of threads may hold it at once, in any
    overlap, and nest it; the first entrant lowers BLAS to one thread and the last leaver
    restores the limits found by the first entrant, so the process keeps its BLAS threads
    afterwards.  (Where the caller itself holds a ``threadpoolctl.threadpool_limits`` on
    OpenBLAS, threadpoolctl leaves the limit to that caller and this is a no-op.)
    """
    me = threading.get_ident()
    with _BLAS_LOCK:
        if not _BLAS_HELD:
            ctl = _blas_controller()
            if ctl is not None:
                _BLAS_LIMITER.append(_on_blas_thread(_lower_blas, ctl))
        _BLAS_HELD[me] = _BLAS_HELD.get(me, 0) + 1
    try:
        yield
    finally:
        with _BLAS_LOCK:
            _BLAS_HELD[me] -= 1
            if not _BLAS_HELD[me]:
                del _BLAS_HELD[me]
            if not _BLAS_HELD and _BLAS_LIMITER:
                _on_blas_thread(_restore_blas, _BLAS_LIMITER.pop())


def n_workers() -> int:
    """Worker threads to use: Numba's thread count, at most the number of cores and at most
    the cap of an enclosing :func:`cpu_policy` on this thread; 1 inside a worker of :func:`pool`
    (nested work runs inline, so the pool can never deadlock)."""
    if threading.current_thread().name.startswith(_PREFIX):
        return 1
    try:
        import numba

        n = numba.get_num_threads()
    except ImportError:  # pragma: no cover - numba is a dependency
        n = os.cpu_count() or 1
    cap = getattr(_POLICY, "cap", None)
    return max(1, min(n, os.cpu_count() or 1, cap or n))


# -- one policy for a run: threads chosen by size, freed memory kept ------------------------
PARALLEL_WORK = 2**26  # multiply-adds per call below which one thread is faster
_POLICY = threading.local()  # .cap: the worker cap of the innermost cpu_policy on this thread
_HEAP = {"kept": False}


LOADAVG = "/proc/loadavg"
IDLE_SAMPLES, IDLE_INTERVAL_S = 8, 0.005  # reads of the running-task count (40 ms in all)


def idle_cores() -> int:
    """Cores the other processes leave idle now: the core count less the tasks running besides
    the calling thread (the kernel's running count in /proc/loadavg, averaged over
    ``IDLE_SAMPLES`` reads ``IDLE_INTERVAL_S`` apart), rounded to nearest, at least 1.  Where
    /proc/loadavg is missing: the core count less the 1-minute load average, rounded down.

    The running count, not the load average: the load average lags by a minute and counts this
    process's own recent work (a benchmark that had just trained on one core saw load >= 1 and
    never got a second core).  Still asked once, at the start of a run: with OpenBLAS at 2
    threads next to other busy processes, a train-toy step of the large size took 5x as long
    (9.5 s against 1.5-2 s at load 2 on 2 cores)."""
    cores = os.cpu_count() or 1
    others = _others_running()
    if others is None:
        try:
            return max(1, min(cores, int(cores - os.getloadavg()[0])))
        except (AttributeError, OSError):  # pragma: no cover - platforms without a load average
            return cores
    return max(1, min(cores, int(cores - others + 0.5)))


def _others_running():
    """Mean running tasks other than this thread over a few reads of /proc/loadavg; None without it."""
    import time

    total = 0
    for i in range(IDLE_SAMPLES):
        if i:
            time.sleep(IDLE_INTERVAL_S)
        try:
            with open(LOADAVG) as f:
                running = int(f.read().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return None
        total += max(0, running - 1)
    return total / IDLE_SAMPLES


def threads_for(work: float) -> int:
    """Threads worth using for calls of ``work`` multiply-adds each (e.g. a training step's
    largest matrix product): 1 below :data:`PARALLEL_WORK`, else :func:`n_workers` at most the
    :func:`idle_cores`."""
    if work < PARALLEL_WORK:
        return 1
    return max(1, min(n_workers(), idle_cores()))


@contextlib.contextmanager
def cpu_policy(threads: int) -> Iterator[int]:
    """Within: BLAS at ``threads`` threads (threadpoolctl) and :func:`n_workers` at most
    ``threads`` on this thread (the ops' worker pool), and glibc's malloc keeping freed memory
    (:func:`keep_freed_memory`).  ``threads`` from :func:`threads_for`; restored on exit
    (the memory setting stays: see :func:`keep_freed_memory`)."""
    threads = max(1, int(threads))
    keep_freed_memory()
    outer = getattr(_POLICY, "cap", None)
    _POLICY.cap = threads
    _load_numba_blas()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        limits = contextlib.nullcontext()
    else:
        limits = threadpool_limits(limits=threads, user_api="blas")
    try:
        with limits:
            yield threads
    finally:
        _POLICY.cap = outer


def keep_freed_memory() -> None:
    """Make glibc's malloc serve blocks up to 512 MiB from the heap and keep up to 1 GiB of
    freed memory mapped (``mallopt`` M_MMAP_THRESHOLD, M_TRIM_THRESHOLD), so the same-sized
    temporaries of every training step reuse pages instead of mapping and zeroing fresh ones
    (page faults: 6,000 a train-toy step, 13 of its 62 ms).  Process-wide and kept (glibc
    cannot restore its adaptive threshold); a no-op off glibc.  Returns whether it applied."""
    if _HEAP["kept"]:
        return True
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    _HEAP["kept"] = bool(mallopt(M_MMAP_THRESHOLD, 512 * 2**20)) and bool(mallopt(M_TRIM_THRESHOLD, 2**30))
    return _HEAP["kept"]


def _forget_pool_after_fork():
    _POOL.clear()  # a forked child has none of the parent's worker threads: start a new pool
    # ... nor the other threads' blas_single_thread entries, nor its BLAS-control thread:
    # keep only the forking thread's entries (the limit stays until it leaves them)
    global _BLAS_LOCK
    _BLAS_LOCK = threading.Lock()  # another thread may have held it at the fork
    _BLAS_THREAD.clear()
    me = threading.get_ident()
    mine = _BLAS_HELD.get(me, 0)
    _BLAS_HELD.clear()
    if mine:
        _BLAS_HELD[me] = mine
    elif _BLAS_LIMITER:  # restored here (and control of OpenBLAS released), not on a thread
        _restore_blas(_BLAS_LIMITER.pop())


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def pool() -> ThreadPoolExecutor:
    """The process-wide worker pool (created on first use, one thread per core)."""
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(max(1, os.cpu_count() or 1), thread_name_prefix=_PREFIX))
    return _POOL[0]


# -- Numba CPU kernels: compiled once, cached on disk, announced once ----------------------
# Every CPU kernel of the package (ops/cpu_kernels.py, ann/kernels.py) is made with njit below:
# numba.njit with cache=True and nogil=True unless given (parallel=True works too).  Numba
# compiles a kernel on its first call with a new signature and writes the machine code beside
# the source (__pycache__; NUMBA_CACHE_DIR elsewhere; Numba's per-user cache when the package
# folder is read-only); a later process loads it instead of compiling.  The first time a process
# really compiles one of these kernels (fresh install, edited source, new CPU or signature) one
# line goes to stderr, COMPILE_NOTICE.  A cache hit prints nothing: the line hangs on Numba's
# "numba:compile" event, which Numba fires only when it compiles, never when it loads a cached
# kernel, and only for dispatchers made here.  TOPKATTN_COMPILE_NOTICE=0 (or
# set_compile_notice(False)) silences it; compile_count() counts this process's compilations.
COMPILE_NOTICE = "topkattn: compiling kernels (first run only; cached on disk for the next runs)"
_JIT_LOCK = threading.Lock()
_JIT_KERNELS = set()  # py_func of every dispatcher made by njit
_JIT_STATE = {"printed": False, "enabled": None, "compiles": 0, "listener": None}


def njit(*args: Callable[..., Any], **options: Any) -> Any:
    """``numba.njit`` with ``cache=True, nogil=True`` unless given, registered for the compile notice.

    Bare (``@njit``) or with Numba's options (``@njit(parallel=True, fastmath={...})``).
    Numba is imported on the first use, not with this module.
    """
    import numba

    options.setdefault("cache", True)
    options.setdefault("nogil", True)
    _install_compile_listener()

    def wrap(fn):
        dispatcher = numba.njit(**options)(fn)
        with _JIT_LOCK:
            _JIT_KERNELS.add(fn)
        return dispatcher

    if len(args) == 1 and callable(args[0]) and not options.keys() - {"cache", "nogil"}:
        return wrap(args[0])
    if args:
        raise TypeError("njit takes Numba's options as keywords (or the function alone)")
    return wrap


def is_package_kernel(dispatcher: Any) -> bool:
    """True if ``dispatcher`` was made by :func:`njit`."""
    return getattr(dispatcher, "py_func", None) in _JIT_KERNELS


def set_compile_notice(enabled: bool | None) -> None:
    """Print (True) or suppress (False) the first-compile line; None: follow TOPKATTN_COMPILE_NOTICE."""
    _JIT_STATE["enabled"] = None if enabled is None else bool(enabled)


def compile_count() -> int:
    """Kernels made by :func:`njit` that this process compiled (not loaded from the disk cache)."""
    return _JIT_STATE["compiles"]


def _notice_enabled():
    if _JIT_STATE["enabled"] is not None:
        return _JIT_STATE["enabled"]
    return os.environ.get("TOPKATTN_COMPILE_NOTICE", "1").strip().lower() not in ("0", "false", "no", "off")


def _install_compile_listener():
    with _JIT_LOCK:
        if _JIT_STATE["listener"] is not None:
            return
        from numba.core import event

        class CompileListener(event.Listener):
            """Counts the package's compilations; prints COMPILE_NOTICE before the first."""

            def on_start(self, ev):
                if not is_package_kernel((ev.data or {}).get("dispatcher")):
                    return
                with _JIT_LOCK:
                    _JIT_STATE["compiles"] += 1
                    first = not _JIT_STATE["printed"]
                    _JIT_STATE["printed"] = True
                if first and _notice_enabled():
                    import sys

                    print(COMPILE_NOTICE, file=sys.stderr, flush=True)

            def on_end(self, ev):
                pass

        _JIT_STATE["listener"] = CompileListener()
        event.register("numba:compile", _JIT_STATE["listener"])
