"""Data-parallel toy training over MPI: the global batch split over the ranks, gradients all-reduced.

Every rank holds the whole model (replicated parameters) and trains on rows
``[r B / N, (r + 1) B / N)`` of every step's batch (B = ``cfg.batch_size``, N ranks; B % N
must be 0).  After the backward, :class:`GradientReducer` packs every gradient, the loss and
the aux loss into one contiguous float64 buffer and sums it with one all-reduce; each rank
first scales its part by ``weight`` = its scored targets / the batch's (the loss is a mean over
the non-ignored targets, so the global gradient is the count-weighted sum of the ranks' mean
gradients, exactly the single-process gradient in real arithmetic).  On GPUs the buffer stays
on the device and NCCL sums it when chosen (``TOPKATTN_DEVICE_COMM``, see
:mod:`topkattn.distributed.device_comm`).  Clipping and AdamW then
run identically on every rank.  The forgetful masking draws, per layer, the whole batch's block
and keeps the rank's rows (:class:`topkattn.training.train.RowSliceGenerator`), so the loss
history equals the single-process run's to float32 rounding.

Rank 0 writes the files (checkpoint, metrics.json, history.json) and reports; every rank reads
the checkpoint on ``resume``.  The ranks first compare their configs (a ValueError naming the
fields that differ, on every rank); errors before the first step are agreed (every rank raises).
A failure on one rank during the steps raises on that rank only, while the others wait in the
next all-reduce: ``topkattn train-toy`` ends the job then (:func:`topkattn.distributed.comm.abort`,
``Error: rank R: ...`` on stderr, ``comm.Abort(1)``); a script of your own should run under
``mpiexec -n N python -m mpi4py script.py`` or call :func:`topkattn.distributed.comm.install_excepthook`.

Launch detection (:func:`topkattn.distributed.comm.launched_world`) reads the launcher's
environment only (MPICH/Hydra ``PMI_RANK``/``PMI_SIZE``, Open MPI ``OMPI_COMM_WORLD_RANK``/
``OMPI_COMM_WORLD_SIZE``), so a process that ``mpiexec`` did not start with N > 1 never
imports mpi4py.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from topkattn.backend import Array, get_array_module, to_numpy
from topkattn.checks import check_int
from topkattn.distributed.comm import agree_settings, allreduce_sum
from topkattn.distributed.device_comm import local_size, use_local_device

if TYPE_CHECKING:
    from topkattn.training.train import TrainConfig, TrainResult


def split_rows(batch_size: int, rank: int, size: int) -> tuple[int, int]:
    """Rows ``(start, stop)`` of a batch of ``batch_size`` that ``rank`` of ``size`` trains on;
    ValueError naming both when batch_size is not a multiple of the ranks."""
    check_int("batch_size", batch_size, 1)
    check_int("size", size, 1)
    check_int("rank", rank, 0)
    if rank >= size:
        raise ValueError(f"rank ({rank}) must be below size ({size})")
    if batch_size % size:
        raise ValueError(f"batch_size ({batch_size}) must be a multiple of the number of MPI ranks ({size})")
    per = batch_size // size
    return rank * per, (rank + 1) * per


def params_checksum(params: Mapping[str, Array]) -> str:
    """SHA-256 hex digest of the parameters' names, shapes, dtypes and bytes, by sorted name."""
    h = hashlib.sha256()
    for name in sorted(params):
        a = np.ascontiguousarray(to_numpy(params[name]))
        h.update(f"{name}{a.shape}{a.dtype}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def check_replicas(comm: Any, params: Mapping[str, Array]) -> None:
    """Raise RuntimeError on every rank unless every rank's ``params`` are bit-identical
    (compares :func:`params_checksum` across the ranks; one small allgather)."""
    sums = comm.allgather(params_checksum(params))
    bad = [r for r, s in enumerate(sums) if s != sums[0]]
    if bad:
        raise RuntimeError(f"the parameters of rank(s) {bad} differ from rank 0's (replicas diverged)")


class GradientReducer:
    """The ``reduce_grads`` hook of :func:`topkattn.training.train.train` over ``comm``.

    ``reducer(params, grads, loss, aux, weight)`` writes ``weight * grad`` of every parameter,
    then ``weight * loss`` and ``weight * aux``, into one contiguous float64 buffer on the
    gradients' device, sums it over the ranks in place with one collective
    (:func:`topkattn.distributed.comm.allreduce_sum`: MPI ``Allreduce`` for NumPy; for CuPy NCCL
    when chosen for ``comm``, else MPI through one host copy) and unpacks it into ``grads``;
    returns the summed ``(loss, aux)``.  The first
    call checks that every rank packs the same layout (names and shapes); with
    ``check_every`` > 0 every that many calls :func:`check_replicas` compares the parameters.
    ``calls`` counts the calls, ``allreduces`` the all-reduces made.
    """

    def __init__(self, comm: Any, check_every: int = 0) -> None:
        self.comm = comm
        self.check_every = check_int("check_every", check_every, 0)
        self.calls = self.allreduces = 0
        self._layout = None

    def _check_layout(self, grads):
        layout = [(name, tuple(int(n) for n in g.shape)) for name, g in grads.items()]
        everyone = self.comm.allgather(layout)
        bad = [r for r, lay in enumerate(everyone) if lay != everyone[0]]
        if bad:
            raise RuntimeError(f"rank(s) {bad} hold other gradients (names or shapes) than rank 0")
        self._layout = layout

    def __call__(self, params, grads, loss, aux, weight):
        if self._layout is None:
            self._check_layout(grads)
        if self.check_every and self.calls % self.check_every == 0:
            check_replicas(self.comm, params)
        self.calls += 1
        xp = get_array_module(*grads.values()) if grads else np
        sizes = [int(g.size) for g in grads.values()]
        buf = xp.empty(sum(sizes) + 2, dtype=xp.float64)  # on the gradients' device
        o = 0
        for g, n in zip(grads.values(), sizes):
            buf[o:o + n] = g.reshape(-1)
            o += n
        buf[:o] *= weight
        buf[o], buf[o + 1] = float(loss) * weight, float(aux) * weight
        allreduce_sum(self.comm, buf, inplace=True)  # NumPy: MPI; CuPy: NCCL when chosen, else MPI via the host
        self.allreduces += 1
        o = 0
        for g, n in zip(grads.values(), sizes):
            g[...] = buf[o:o + n].reshape(g.shape)
            o += n
        loss_sum, aux_sum = (float(v) for v in to_numpy(buf[o:o + 2]))
        return loss_sum, aux_sum


class PeerError(RuntimeError):
    """Another rank failed before the first step (``rank``, ``kind`` its exception's class name,
    ``message``)."""

    def __init__(self, rank: int, kind: str, message: str) -> None:
        super().__init__(f"rank {rank}: {kind}: {message}")
        self.rank, self.kind, self.message = rank, kind, message


def check_data_parallel(cfg: TrainConfig, size: int) -> None:
    """ValueError (the same on every rank: it reads only the config) for a run data parallelism
    over ``size`` > 1 ranks cannot reproduce: KV experts, whose load-balancing loss is a function of
    the whole batch (each rank's share would be balanced on its own rows instead), or a batch size
    that is not a multiple of the ranks."""
    if size > 1 and cfg.kv_experts:
        raise ValueError(f"kv_experts ({cfg.kv_experts}): the experts' load-balancing loss is one over the "
                         f"whole batch, which data parallelism over {size} ranks would split; train KV experts "
                         f"in one process")
    split_rows(cfg.batch_size, 0, size)


def train_data_parallel(cfg: TrainConfig, comm: Any, *, out_dir: str | os.PathLike | None = None, resume: bool = False,
                        device: str = "cpu", checkpoint_every: int = 100, progress: Callable[..., Any] | None = None,
                        log: Callable[..., Any] | None = None, eval_every: int | None = None,
                        check_every: int = 0, overwrite: bool = False) -> TrainResult:
    """:func:`topkattn.training.train.train` over the ranks of ``comm``: returns its TrainResult on
    every rank (the same losses and, checked at the end, the same parameters).

    ``progress`` and ``log`` are called on rank 0 only; rank 0 writes the files.  Every rank
    must pass the same ``cfg`` (and ``resume``, ``device``, ``check_every``): compared first,
    a ValueError naming the fields that differ on every rank.  ValueError (on every rank) for
    a run :func:`check_data_parallel` refuses.  ``check_every``
    > 0 also compares the parameters across the ranks every that many steps.  ``device="gpu"``
    first makes GPU ``local rank % device count`` current on each rank
    (:func:`topkattn.distributed.device_comm.use_local_device`).  An error on one rank during
    the steps leaves the others waiting unless the script runs under ``python -m mpi4py`` or
    calls :func:`topkattn.distributed.comm.install_excepthook` (see the module docstring).
    """
    from topkattn.training.train import TrainConfig, run_threads, train

    error = settings = None
    try:  # one collective: the same config everywhere (else e.g. other steps: a hang), the checks agreed
        if not isinstance(cfg, TrainConfig):
            raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
        settings = dict(cfg.to_dict(), resume=resume, device=device, check_every=check_every)
        check_data_parallel(cfg, comm.size)
    except (TypeError, ValueError) as e:
        error = e
    agree_settings(comm, "train_data_parallel", settings, error)
    rows = split_rows(cfg.batch_size, comm.rank, comm.size)
    if device == "gpu":
        use_local_device(comm)  # GPU local rank % count, so that NCCL can carry the gradients
    writer = comm.rank == 0
    reducer = GradientReducer(comm, check_every=check_every)
    share = max(1, (os.cpu_count() or 1) // local_size(comm))  # the host's cores over its ranks
    threads = min(share, run_threads(dataclasses.replace(cfg, batch_size=rows[1] - rows[0]), device))
    result = train(cfg, out_dir=out_dir, resume=resume, device=device, checkpoint_every=checkpoint_every,
                   progress=progress if writer else None, log=log if writer else None,
                   eval_every=eval_every, batch_slice=rows, reduce_grads=reducer, is_writer=writer,
                   after_setup=lambda e: agree_setup(comm, e), threads=threads, overwrite=overwrite)
    check_replicas(comm, result.model.params)
    return result


def agree_setup(comm: Any, error: BaseException | None) -> None:
    """Every rank raises when one failed: the failing rank its error, the others :class:`PeerError`."""
    msgs = comm.allgather(None if error is None else (type(error).__name__, str(error)))
    if error is not None:
        raise error
    bad = [(r, *m) for r, m in enumerate(msgs) if m is not None]
    if bad:
        raise PeerError(*bad[0])


