"""One all-gather for several fields of a step, with the agreement on errors folded in.

A decode step of sharded decoding sends, per rank, a few arrays (candidate scores, their
positions, a logsumexp per row, ...).  :func:`allgather_fields` packs them into one byte
buffer behind an 8-byte status word and makes **one** all-gather
(:func:`topkattn.distributed.comm.allgather_rows`: MPI ``Allgather`` of host bytes, or NCCL for
a CuPy buffer when chosen): a rank that failed while computing its fields still takes part
(its status says so, its fields are zeros), and only then, when some status is set, every
rank calls :func:`topkattn.distributed.comm.agree` to learn the message and raise.  So a step
costs one collective, not two (an agreement and the data), and a failure on one rank never
leaves the others waiting.

``spec``: ``[(name, shape, dtype), ...]``, the same on every rank (the shapes follow from
the step's geometry, never from rank-local data).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from topkattn.backend import Array, to_numpy
from topkattn.distributed.comm import agree, allgather_rows

STATUS_BYTES = 8


def spec_bytes(spec: Sequence[tuple[str, tuple[int, ...], DTypeLike]]) -> int:
    """Payload bytes of one rank's buffer for ``spec`` (status word included)."""
    return STATUS_BYTES + sum(_nbytes(shape, dtype) for _, shape, dtype in spec)


def _nbytes(shape, dtype):
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def allgather_fields(comm: Any, spec: Sequence[tuple[str, tuple[int, ...], DTypeLike]],
                     values: Mapping[str, Array] | None, error: BaseException | None = None,
                     xp: ModuleType = np) -> dict[str, Array]:
    """``{name: (ranks,) + shape array}`` of every rank's fields, on ``xp``; raises on every rank
    when any rank passed an ``error``.

    ``values``: ``{name: array}`` matching ``spec`` (cast to its dtype; ignored when ``error``
    is set, then zeros are sent).  One :func:`topkattn.distributed.comm.allgather_rows` of
    :func:`spec_bytes` bytes per rank: the buffer is packed on ``xp``, so with CuPy it travels
    through NCCL when that is chosen for ``comm`` (MPI host buffers otherwise).
    """
    buf = xp.zeros(spec_bytes(spec), dtype=xp.uint8)
    if error is None:
        try:
            off = STATUS_BYTES
            for name, shape, dtype in spec:
                a = xp.ascontiguousarray(to_numpy(values[name]) if xp is np else xp.asarray(values[name]), dtype=dtype)
                if a.shape != tuple(shape):
                    raise ValueError(f"field {name!r} has shape {a.shape}, the step's spec says {tuple(shape)}")
                n = a.nbytes
                buf[off:off + n] = a.reshape(-1).view(xp.uint8)
                off += n
        except (KeyError, TypeError, ValueError) as e:  # a rank's own bug: still exchange, then agree
            error = e
    if error is not None:
        buf[:] = 0
        buf[0] = 1
    out = allgather_rows(comm, buf)  # (ranks, bytes)
    if to_numpy(out[:, 0]).any():
        agree(comm, error)  # every rank saw a status: all of them call it, all raise
    got, off = {}, STATUS_BYTES
    for name, shape, dtype in spec:
        n = _nbytes(shape, dtype)
        got[name] = xp.ascontiguousarray(out[:, off:off + n]).view(dtype).reshape((out.shape[0],) + tuple(shape))
        off += n
    return got


__all__ = ["allgather_fields", "spec_bytes"]
