"""MPI plumbing shared by the distributed modes: mpi4py on demand, agreement on errors, and the
array collectives routed by :func:`device_route`.

mpi4py carries control messages and host (NumPy) buffers; CuPy buffers go through NCCL
(:mod:`topkattn.distributed.device_comm`) when it is chosen for the communicator, else they are
copied to the host and sent through MPI.  Nothing here is a transport of its own.  mpi4py is
imported when a distributed function first needs it, so ``import topkattn`` works without it,
and :func:`require_mpi` says in one line what to install.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any, TextIO

import numpy as np

from topkattn.backend import Array, get_array_module, is_cupy_array, to_numpy
from topkattn.distributed.device_comm import DeviceComm, device_comm_for

INSTALL_HINT = 'pip install -e ".[mpi]" (mpi4py and an MPI from wheels)'


def require_mpi() -> ModuleType:
    """The ``mpi4py.MPI`` module; ImportError with the install command when it is missing."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ImportError(f"topkattn.distributed needs mpi4py: {INSTALL_HINT}") from e
    return MPI


LAUNCHER_VARS = (("PMI_RANK", "PMI_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"))


def launched_world(environ: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """``(rank, size)`` when an MPI launcher started this process as one of ``size`` > 1 ranks
    (read from its environment variables: MPICH/Hydra PMI_RANK/PMI_SIZE, Open MPI
    OMPI_COMM_WORLD_RANK/OMPI_COMM_WORLD_SIZE), else None.  Imports nothing."""
    env = os.environ if environ is None else environ
    for rank_var, size_var in LAUNCHER_VARS:
        if rank_var in env and size_var in env:
            try:
                rank, size = int(env[rank_var]), int(env[size_var])
            except ValueError:
                continue
            if size > 1 and 0 <= rank < size:
                return rank, size
    return None


def world() -> Any:
    """``MPI.COMM_WORLD``."""
    return require_mpi().COMM_WORLD


def agree(comm: Any, error: BaseException | None) -> None:
    """Raise on every rank if ``error`` (an exception or None) was raised on any rank.

    A check that fails on one rank only would leave the others waiting in the next
    collective; after this call every rank raises: the failing rank its own error, the
    others a RuntimeError naming the rank and its message.
    """
    _raise_agreed(error, comm.allgather(_message(error)))


def _message(error):
    return None if error is None else f"{type(error).__name__}: {error}"


def _raise_agreed(error, msgs):
    if error is not None:
        raise error
    bad = [(r, m) for r, m in enumerate(msgs) if m is not None]
    if bad:
        rank, msg = bad[0]
        raise RuntimeError(f"rank {rank} failed: {msg}")


class _Absent:
    def __repr__(self):
        return "(absent)"


_ABSENT = _Absent()


def settings_mismatch(what: str, everyone: list[Mapping[str, Any] | None]) -> ValueError | None:
    """The ValueError naming the settings that differ between the ranks' dicts ``everyone``
    (one per rank, None for a rank with none to compare), or None when they agree:
    ``<what> needs the same a, b on every rank, got rank 0: a=1, b=2; rank 1: a=3, b=4``."""
    shown = [(r, s) for r, s in enumerate(everyone) if s is not None]
    first = shown[0][1] if shown else {}
    names = sorted({n for _, s in shown for n in s})
    differ = [n for n in names if any(s.get(n, _ABSENT) != first.get(n, _ABSENT) for _, s in shown)]
    if not differ:
        return None
    return ValueError(f"{what} needs the same {', '.join(differ)} on every rank, got "
                      + "; ".join(f"rank {r}: " + ", ".join(f"{n}={s.get(n, _ABSENT)!r}" for n in differ)
                                  for r, s in shown))


def agree_settings(comm: Any, what: str, settings: Mapping[str, Any] | None,
                   error: BaseException | None = None) -> None:
    """One allgather of every rank's ``settings`` (a dict of plain values that must be equal on
    every rank; None when this rank's checks failed before it had them) and ``error`` (the
    outcome of its local checks, as :func:`agree`).  Then, on every rank: the ValueError of
    :func:`settings_mismatch` when the settings differ, else what :func:`agree` raises."""
    everyone = comm.allgather((None if settings is None else dict(settings), _message(error)))
    mismatch = settings_mismatch(what, [s for s, _ in everyone])
    if mismatch is not None:
        raise mismatch
    _raise_agreed(error, [m for _, m in everyone])


def device_route(comm: Any, a: Array) -> DeviceComm | None:
    """How the collectives of ``a`` travel over ``comm``: the NCCL :class:`DeviceComm` for a CuPy
    array when NCCL is chosen for ``comm`` (see :func:`topkattn.distributed.device_comm.device_comm_for`;
    the first CuPy collective chooses, collectively), None for MPI (NumPy arrays always)."""
    return device_comm_for(comm) if is_cupy_array(a) else None


def allgather_rows(comm: Any, a: Array) -> Array:
    """Stack ``a`` (rows, ...) of every rank: (ranks, rows, ...) on the array's device.

    Every rank must pass the same shape and dtype.  NCCL carries a CuPy array when
    :func:`device_route` says so, host buffers through MPI otherwise.
    """
    device = device_route(comm, a)
    if device is not None:
        return device.allgather(a)
    xp = get_array_module(a)
    host = np.asarray(to_numpy(a), order="C")  # (ascontiguousarray would make a 0-d array 1-d)
    out = np.empty((comm.size,) + host.shape, dtype=host.dtype)
    comm.Allgather(host, out)
    return xp.asarray(out)


def allreduce_sum(comm: Any, a: Array, inplace: bool = False) -> Array:
    """Elementwise sum of ``a`` over the ranks, on the array's device (NaN propagates); one
    collective.  ``inplace``: written into ``a``, which is returned.  NCCL carries a CuPy array
    when :func:`device_route` says so, host buffers through MPI otherwise."""
    device = device_route(comm, a)
    if device is not None:
        return device.allreduce_sum(a, out=a if inplace else None)
    MPI = require_mpi()
    xp = get_array_module(a)
    host = np.asarray(to_numpy(a), order="C")  # ``a`` itself for a contiguous NumPy array; 0-d stays 0-d
    if not inplace:
        out = np.empty_like(host)
        comm.Allreduce(host, out, op=MPI.SUM)
        return xp.asarray(out)
    comm.Allreduce(MPI.IN_PLACE, host, op=MPI.SUM)
    if host is not a:
        a[...] = xp.asarray(host)
    return a


def abort(comm: Any, error: BaseException | None, file: TextIO | None = None) -> None:
    """Print ``Error: rank R: <message>`` on stderr and end every rank of the job (``comm.Abort(1)``)."""
    stream = file or sys.stderr
    msg = str(error) or type(error).__name__
    print(f"Error: rank {comm.rank}: {msg}", file=stream, flush=True)
    comm.Abort(1)


def install_excepthook(comm: Any) -> Callable[..., Any]:
    """Make an uncaught exception on this rank end the whole job (:func:`abort`) instead of
    leaving the other ranks waiting in a collective; returns the previous hook.

    Call it at the top of a script of your own (or run it under ``mpiexec -n N python -m mpi4py
    script.py``, which does the same): the library agrees on errors at set-up, but an error in a
    per-step input on one rank (e.g. a token outside the vocabulary) is raised on that rank only."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        abort(comm, value)  # KeyboardInterrupt too: "Error: rank R: KeyboardInterrupt"

    sys.excepthook = hook
    return previous
