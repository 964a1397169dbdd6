"""A writer-preferring readers-writer lock: LorannIndex searches share it, mutations own it.

Many threads may hold the read side at once; the write side is exclusive.  A thread waiting
for the write side blocks new readers, so a stream of searches cannot starve ``add``.
Re-entrant where that cannot deadlock: the writing thread may take either side again, and a
reading thread may take the read side again (it does not wait behind a queued writer, which
would wait for it).  A reading thread asking for the write side gets RuntimeError: two such
upgrades would wait for each other forever, so release the read side first.
"""
from __future__ import annotations

import threading
from threading import get_ident


class RWLock:
    """``with lock.read(): ...`` (shared) and ``with lock.write(): ...`` (exclusive)."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()  # guards the counts below
        self._cond = threading.Condition(self._mutex)  # waits for them to change
        self._readers = 0  # threads holding the read side (the writer's nested reads not counted)
        self._writer = None  # ident of the thread holding the write side
        self._depth = 0  # the writer's nesting depth
        self._waiting = 0  # threads waiting for the write side
        # thread ident -> its read nesting depth: > 0 counted in _readers, < 0 the writer's own
        # (each thread changes only its own entry)
        self._held = {}
        self._read = _ReadSide(self)
        self._write = _WriteSide(self)

    def read(self) -> _ReadSide:
        """Context manager holding the read side."""
        return self._read

    def write(self) -> _WriteSide:
        """Context manager holding the write side."""
        return self._write

    def acquire_read(self) -> None:
        self._read.__enter__()

    def release_read(self) -> None:
        self._read.__exit__(None, None, None)

    def _wait_to_read(self, me):
        """The read side's slow path (a writer holds or waits for the lock, or this thread
        writes); returns whether this thread now counts as a reader."""
        with self._mutex:
            if self._writer == me:  # the writer's own nested read
                return False
            while self._writer is not None or self._waiting:
                self._cond.wait()
            self._readers += 1
            return True

    def acquire_write(self) -> None:
        me = threading.get_ident()
        with self._mutex:
            if self._writer == me:
                self._depth += 1
                return
            if self._held.get(me, 0) > 0:
                raise RuntimeError("the write side was asked for while holding the read side "
                                   "(an upgrade could deadlock): release the read side first")
            self._waiting += 1
            try:
                while self._writer is not None or self._readers:
                    self._cond.wait()
            except BaseException:
                self._waiting -= 1
                self._cond.notify_all()  # readers held back by this waiter may go on
                raise
            self._waiting -= 1
            self._writer = me
            self._depth = 1

    def release_write(self) -> None:
        with self._mutex:
            if self._writer != threading.get_ident():
                raise RuntimeError("release_write by a thread that does not hold the write side")
            self._depth -= 1
            if not self._depth:
                self._writer = None
                self._cond.notify_all()


class _ReadSide:
    """The read side as a context manager; its fast path (no writer) is inlined here, since
    every search takes it."""

    __slots__ = ("_lock",)

    def __init__(self, lock):
        self._lock = lock

    def __enter__(self):
        lock = self._lock
        me = get_ident()
        held = lock._held
        depth = held.get(me, 0)
        if depth:  # nested: this thread already reads (or writes)
            held[me] = depth + 1 if depth > 0 else depth - 1
            return self
        mutex = lock._mutex
        mutex.acquire()
        if lock._writer is None and not lock._waiting:
            lock._readers += 1
            mutex.release()
            held[me] = 1
        else:
            mutex.release()
            held[me] = 1 if lock._wait_to_read(me) else -1
        return self

    def __exit__(self, exc_type, exc, tb):
        lock = self._lock
        me = get_ident()
        held = lock._held
        depth = held.get(me, 0)
        if depth > 1 or depth < -1:
            held[me] = depth - 1 if depth > 0 else depth + 1
            return False
        if not depth:
            raise RuntimeError("release_read without a matching acquire_read")
        del held[me]
        if depth < 0:
            return False
        mutex = lock._mutex
        mutex.acquire()
        lock._readers -= 1
        if not lock._readers and lock._waiting:
            lock._cond.notify_all()
        mutex.release()
        return False


class _WriteSide:
    __slots__ = ("_lock",)

    def __init__(self, lock):
        self._lock = lock

    def __enter__(self):
        self._lock.acquire_write()
        return self

    def __exit__(self, exc_type, exc, tb):
        self._lock.release_write()
        return False
