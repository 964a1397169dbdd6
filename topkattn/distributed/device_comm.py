"""NCCL through CuPy for device (CuPy) buffers; MPI stays for control and host (NumPy) data.

This is ChainerMN's split: mpi4py carries the control messages (agreement on errors, the NCCL
unique id, layouts) and NumPy buffers; ``cupy.cuda.nccl.NcclCommunicator`` carries CuPy
buffers GPU to GPU on the current stream.  Nothing here is a transport of its own.

The choice, per communicator, is made once, collectively, by :func:`select_device_comm`
(:func:`device_comm_for` calls it on the first collective over a CuPy array):

    TOPKATTN_DEVICE_COMM=auto   (default) NCCL when every rank has it and each rank sits on a
                                GPU of its own; otherwise the MPI host path, with one warning
                                (:class:`DeviceCommFallback`) on rank 0
    TOPKATTN_DEVICE_COMM=nccl   NCCL or a RuntimeError on every rank saying why not
    TOPKATTN_DEVICE_COMM=mpi    CuPy arrays are copied to the host and sent through MPI

Two ranks on one GPU cannot form an NCCL communicator: the ranks gather (host, PCI bus id) of
their current device over MPI and compare them.  :func:`use_local_device` selects the GPU
``local rank % device count`` for this rank (call it before creating arrays).

CuPy is imported only here and only when a CuPy array (or a GPU device) is in use, so
``import topkattn`` never imports it.
"""
from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from topkattn.backend import Array

ENV_VAR = "TOPKATTN_DEVICE_COMM"
MODES = ("auto", "nccl", "mpi")
NCCL_TYPE_NAMES = {np.dtype(np.float16): "NCCL_FLOAT16", np.dtype(np.float32): "NCCL_FLOAT32",
                   np.dtype(np.float64): "NCCL_FLOAT64", np.dtype(np.int32): "NCCL_INT32",
                   np.dtype(np.int64): "NCCL_INT64", np.dtype(np.uint8): "NCCL_UINT8"}


class DeviceCommFallback(RuntimeWarning):
    """``auto`` could not use NCCL (missing, or ranks sharing a GPU): CuPy arrays go through MPI."""


def transport_mode(mode: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """``mode``, or ``$TOPKATTN_DEVICE_COMM`` when None (default ``auto``), checked against
    :data:`MODES`; ValueError naming the argument and the value received otherwise."""
    source = "mode"
    if mode is None:
        env = os.environ if environ is None else environ
        mode, source = env.get(ENV_VAR, "auto"), ENV_VAR
    if not isinstance(mode, str) or mode.strip().lower() not in MODES:
        raise ValueError(f"{source} must be one of {'|'.join(MODES)}, got {mode!r}")
    return mode.strip().lower()


def nccl_datatype(nccl: ModuleType, dtype: DTypeLike) -> int:
    """The NCCL datatype constant of ``dtype`` (float16/32/64, int32/64, uint8); TypeError
    naming the dtype and the supported ones otherwise."""
    dt = np.dtype(dtype)
    name = NCCL_TYPE_NAMES.get(dt)
    if name is None:
        supported = ", ".join(str(d) for d in NCCL_TYPE_NAMES)
        raise TypeError(f"NCCL has no datatype for dtype {dt} (supported: {supported})")
    return int(getattr(nccl, name))


def _same_host(comm: Any) -> list[bool]:
    """Per rank: whether it runs on this rank's host (one ``allgather`` of host names)."""
    hosts = comm.allgather(socket.gethostname())
    return [h == hosts[comm.Get_rank()] for h in hosts]


def local_rank(comm: Any) -> int:
    """This rank's index among the ranks on the same host (one ``allgather`` of host names)."""
    return sum(_same_host(comm)[:comm.Get_rank()])


def local_size(comm: Any) -> int:
    """The number of ranks on this rank's host (one ``allgather`` of host names)."""
    return sum(_same_host(comm))


def local_device(comm: Any, n_devices: int) -> int:
    """The GPU for this rank: ``local rank % n_devices`` (collective: one ``allgather``)."""
    if not isinstance(n_devices, int) or n_devices < 1:
        raise ValueError(f"n_devices must be a positive int, got {n_devices!r}")
    return local_rank(comm) % n_devices


def use_local_device(comm: Any) -> int:
    """Make GPU ``local rank % device count`` current for this rank (CuPy); returns its id.
    Collective.  Call it before creating CuPy arrays so that ranks on one host use distinct GPUs."""
    import cupy

    device = local_device(comm, int(cupy.cuda.runtime.getDeviceCount()))
    cupy.cuda.Device(device).use()
    return device


def _nccl_module() -> tuple[ModuleType | None, str | None]:
    """(``cupy.cuda.nccl``, None), or (None, why it cannot be used)."""
    try:
        from cupy.cuda import nccl
    except ImportError as e:
        return None, f"cupy.cuda.nccl cannot be imported ({e})"
    if not getattr(nccl, "available", True):
        return None, "CuPy was built or installed without NCCL (cupy.cuda.nccl.available is False)"
    return nccl, None


def _device_info(mode: str) -> dict[str, Any]:
    """What this rank tells the others when the transport is chosen."""
    info: dict[str, Any] = {"mode": mode, "host": socket.gethostname(), "device": None, "bus": None,
                            "why_not": None}
    if mode == "mpi":
        return info
    try:
        import cupy

        dev = cupy.cuda.Device()
        info["device"], info["bus"] = int(dev.id), str(dev.pci_bus_id)
    except ImportError:
        info["why_not"] = "CuPy is not installed"
    except Exception as e:  # no driver, no device: CuPy's CUDARuntimeError and kin
        info["why_not"] = f"no usable GPU ({type(e).__name__}: {e})"
    else:
        _, info["why_not"] = _nccl_module()
    return info


def shared_gpus(infos: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], list[int]]:
    """``{(host, PCI bus id): ranks}`` of every GPU that more than one rank uses."""
    users: dict[tuple[str, str], list[int]] = {}
    for r, info in enumerate(infos):
        if info["bus"] is not None:
            users.setdefault((info["host"], info["bus"]), []).append(r)
    return {gpu: ranks for gpu, ranks in users.items() if len(ranks) > 1}


def plan_transport(infos: Sequence[Mapping[str, Any]]) -> tuple[bool, str | None]:
    """(use NCCL, why not) from every rank's :func:`_device_info`, the same on every rank.
    RuntimeError when the ranks disagree on the mode or ``nccl`` was asked and cannot run."""
    modes = sorted({info["mode"] for info in infos})
    if len(modes) > 1:
        by_mode = {m: [r for r, info in enumerate(infos) if info["mode"] == m] for m in modes}
        raise RuntimeError(f"the ranks disagree on {ENV_VAR}: {by_mode} (set it alike on every rank)")
    mode = modes[0]
    if mode == "mpi":
        return False, None
    why = None
    missing = [(r, info["why_not"]) for r, info in enumerate(infos) if info["why_not"]]
    shared = shared_gpus(infos)
    if missing:
        why = f"rank {missing[0][0]}: {missing[0][1]}"
    elif shared:
        (host, bus), ranks = next(iter(shared.items()))
        why = (f"ranks {ranks} share the GPU {bus} on {host} and NCCL needs one GPU per rank "
               f"(select one per rank with topkattn.distributed.device_comm.use_local_device)")
    if why is None:
        return True, None
    if mode == "nccl":
        raise RuntimeError(f"{ENV_VAR}=nccl cannot run: {why}")
    return False, why


class DeviceComm:
    """NCCL collectives on CuPy arrays over the ranks of an MPI ``comm`` (one GPU per rank).

    Build it with :meth:`create` (collective).  Every method works on C-contiguous arrays of
    the communicator's GPU, on CuPy's current stream, with sum as the reduction; ``calls``
    counts the NCCL collectives made.
    """

    def __init__(self, comm: Any, nccl_comm: Any, device: int, nccl: ModuleType) -> None:
        self.comm, self.nccl_comm, self.device, self.nccl = comm, nccl_comm, int(device), nccl
        self.rank, self.size = int(comm.Get_rank()), int(comm.Get_size())
        self.calls = 0

    @classmethod
    def create(cls, comm: Any) -> DeviceComm:
        """NCCL communicator on the current GPU of every rank: rank 0 makes the unique id
        (``nccl.get_unique_id()``), MPI broadcasts it, each rank joins with
        ``NcclCommunicator(size, uid, rank)``.  Collective."""
        import cupy

        nccl, why = _nccl_module()
        if nccl is None:
            raise RuntimeError(why)
        rank, size = int(comm.Get_rank()), int(comm.Get_size())
        uid = nccl.get_unique_id() if rank == 0 else None
        uid = comm.bcast(uid, root=0)
        device = int(cupy.cuda.Device().id)
        with cupy.cuda.Device(device):
            nccl_comm = nccl.NcclCommunicator(size, uid, rank)
        return cls(comm, nccl_comm, device, nccl)

    def _stream(self) -> int:
        import cupy

        return int(cupy.cuda.get_current_stream().ptr)

    def _check(self, name: str, a: Array, contiguous: bool = True) -> int:
        if int(a.device.id) != self.device:
            raise ValueError(f"{name} is on GPU {int(a.device.id)}, the NCCL communicator on GPU {self.device}")
        if contiguous and not a.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous (it is written in place)")
        return nccl_datatype(self.nccl, a.dtype)

    def _out(self, name: str, out: Array | None, shape: tuple[int, ...], dtype: Any) -> Array:
        import cupy

        if out is None:
            with cupy.cuda.Device(self.device):
                return cupy.empty(shape, dtype=dtype)
        if tuple(out.shape) != shape or out.dtype != dtype:
            raise ValueError(f"{name} must have shape {shape} and dtype {np.dtype(dtype)}, "
                             f"got {tuple(out.shape)} {out.dtype}")
        self._check(name, out)
        return out

    def _send(self, a: Array) -> tuple[Array, int]:
        """(``a`` as a C-contiguous array, its NCCL datatype)."""
        import cupy

        dtype = self._check("a", a, contiguous=False)
        return (a if a.flags.c_contiguous else cupy.ascontiguousarray(a)), dtype

    def allreduce_sum(self, a: Array, out: Array | None = None) -> Array:
        """Elementwise sum of ``a`` over the ranks into ``out`` (new when None; ``out=a``: in place)."""
        send, dtype = self._send(a)
        out = self._out("out", out, tuple(a.shape), a.dtype)
        self.nccl_comm.allReduce(send.data.ptr, out.data.ptr, send.size, dtype, self.nccl.NCCL_SUM, self._stream())
        self.calls += 1
        return out

    def allgather(self, a: Array, out: Array | None = None) -> Array:
        """Every rank's ``a`` stacked: (ranks,) + a.shape, rank-major."""
        send, dtype = self._send(a)
        out = self._out("out", out, (self.size,) + tuple(a.shape), a.dtype)
        self.nccl_comm.allGather(send.data.ptr, out.data.ptr, send.size, dtype, self._stream())
        self.calls += 1
        return out

    def bcast(self, a: Array, root: int = 0) -> Array:
        """Rank ``root``'s ``a`` into ``a`` on every rank (in place; ``a`` is returned)."""
        self._check_root(root)
        dtype = self._check("a", a)
        self.nccl_comm.bcast(a.data.ptr, a.size, dtype, root, self._stream())
        self.calls += 1
        return a

    def reduce_sum(self, a: Array, out: Array | None = None, root: int = 0) -> Array:
        """Elementwise sum of ``a`` over the ranks into ``out`` on rank ``root`` (``out`` of
        the other ranks is left as it was)."""
        self._check_root(root)
        send, dtype = self._send(a)
        out = self._out("out", out, tuple(a.shape), a.dtype)
        self.nccl_comm.reduce(send.data.ptr, out.data.ptr, send.size, dtype, self.nccl.NCCL_SUM, root, self._stream())
        self.calls += 1
        return out

    def _check_root(self, root):
        if not isinstance(root, (int, np.integer)) or not 0 <= root < self.size:
            raise ValueError(f"root must be a rank in [0, {self.size}), got {root!r}")


_CHOSEN: dict[int, tuple[Any, DeviceComm | None]] = {}  # id(comm) -> (comm, its DeviceComm or None)


def select_device_comm(comm: Any, mode: str | None = None) -> DeviceComm | None:
    """Choose how CuPy arrays travel over ``comm`` (collective; one ``allgather``, plus the
    unique-id ``bcast`` when NCCL is chosen) and remember it: a :class:`DeviceComm`, or None
    for the MPI host path.  ``mode``: ``auto|nccl|mpi``, None reads ``$TOPKATTN_DEVICE_COMM``."""
    mode = transport_mode(mode)
    infos = comm.allgather(_device_info(mode))
    use_nccl, why = plan_transport(infos)
    if why is not None and comm.Get_rank() == 0:
        warnings.warn(f"{ENV_VAR}=auto: CuPy arrays travel through MPI host buffers: {why}",
                      DeviceCommFallback, stacklevel=2)
    chosen = DeviceComm.create(comm) if use_nccl else None
    _CHOSEN[id(comm)] = (comm, chosen)
    return chosen


def device_comm_for(comm: Any) -> DeviceComm | None:
    """The choice :func:`select_device_comm` made for ``comm``, made now (collectively, from
    ``$TOPKATTN_DEVICE_COMM``) on the first call."""
    got = _CHOSEN.get(id(comm))
    if got is not None and got[0] is comm:
        return got[1]
    return select_device_comm(comm)


def forget_device_comm(comm: Any) -> None:
    """Drop the choice remembered for ``comm`` (the next CuPy collective chooses again)."""
    _CHOSEN.pop(id(comm), None)


__all__ = ["ENV_VAR", "MODES", "DeviceComm", "DeviceCommFallback", "device_comm_for", "forget_device_comm",
           "local_device", "local_rank", "nccl_datatype", "plan_transport", "select_device_comm", "shared_gpus",
           "transport_mode", "use_local_device"]
