"""Launching the Numba CUDA kernels: CuPy arrays on a GPU, NumPy arrays under the simulator.

On a GPU, every kernel argument that is a CuPy array is handed to Numba through
``__cuda_array_interface__`` (zero copy) and the kernel is queued on CuPy's
*current* stream (``cupy.cuda.get_current_stream()`` wrapped with
``numba.cuda.external_stream``), so kernels order correctly with the CuPy work
around them and nothing is synchronised or copied to the host.

Under the Numba CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, set before
``numba.cuda`` is first imported) kernels run as Python threads on the CPU and
take NumPy arrays; that is how the kernels are tested on machines without a GPU.
Mixing (NumPy arrays on a real GPU, CuPy arrays under the simulator) raises.
"""
from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

import numpy as np

from topkattn.backend import get_array_module, is_cupy_array


def simulator_enabled() -> bool:
    """True when Numba's CUDA simulator is on (read from numba's config, no GPU probe)."""
    try:
        from numba.core import config
    except ImportError:  # pragma: no cover - numba missing
        return False
    return bool(getattr(config, "ENABLE_CUDASIM", 0))


NUMBA_CUDA_MISSING = ("the CUDA kernels need numba-cuda: pip install 'topkattn[cuda12]' (or 'topkattn[cuda13]') "
                      "for a GPU, or 'topkattn[test]' for the CPU simulator")


def get_cuda() -> ModuleType:
    """Return ``numba.cuda`` if it can run kernels (a GPU or the simulator), else RuntimeError.

    numba-cuda must be installed (the cuda12/cuda13/test extras): Numba's own deprecated
    built-in ``numba.cuda`` is not used.
    """
    try:
        import numba_cuda  # noqa: F401  (without it ``numba.cuda`` is Numba's built-in target)
        from numba import cuda
    except ImportError as e:
        raise RuntimeError(NUMBA_CUDA_MISSING) from e
    try:
        ok = cuda.is_available()
    except Exception as e:  # pragma: no cover - broken driver
        raise RuntimeError(f"numba.cuda cannot use the GPU: {e}") from e
    if not ok:
        raise RuntimeError(
            "numba.cuda finds no usable CUDA GPU; install the driver and CuPy "
            "(pip install 'topkattn[cuda12]'), or set NUMBA_ENABLE_CUDASIM=1 before "
            "numba.cuda is imported to run the kernels on the CPU simulator")
    return cuda


def cuda_usable() -> bool:
    """True when the CUDA kernels can run on CuPy arrays: a real GPU, numba.cuda and CuPy."""
    if simulator_enabled() or "cupy" not in sys.modules:
        return False
    try:
        get_cuda()
    except RuntimeError:
        return False
    return True


def array_module(*arrays: Any) -> ModuleType:
    """The array module kernels allocate with: CuPy on a GPU, NumPy under the simulator.

    Raises RuntimeError with the reason when the arrays cannot reach a kernel.
    """
    get_cuda()
    xp = get_array_module(*arrays)
    if simulator_enabled():
        if xp is not np:
            raise RuntimeError("CuPy arrays cannot run under the CUDA simulator "
                               "(NUMBA_ENABLE_CUDASIM=1); pass NumPy arrays")
        return np
    if xp is np:
        raise RuntimeError("the CUDA kernels take CuPy arrays on a GPU (NumPy arrays run "
                           "only under NUMBA_ENABLE_CUDASIM=1); move them with cupy.asarray")
    return xp


def _stream(cuda):
    cp = sys.modules["cupy"]
    ptr = cp.cuda.get_current_stream().ptr
    return cuda.default_stream() if ptr == 0 else cuda.external_stream(ptr)


def launch(kernel: Any, grid: int | tuple[int, ...], block: int | tuple[int, ...], *args: Any) -> None:
    """Run ``kernel[grid, block, stream](*args)`` on CuPy's current stream (or the simulator).

    CuPy arguments are wrapped with ``numba.cuda.as_cuda_array(..., sync=False)``: the
    kernel is queued on the same stream that produced them, so no extra sync is needed.
    Strided CuPy views are passed as they are (no copy); kernels write only into arrays
    their launcher allocated.
    """
    cuda = get_cuda()
    if simulator_enabled():  # the simulator copies arguments whole: strided inputs go contiguous
        args = tuple(np.ascontiguousarray(a) if isinstance(a, np.ndarray) and not (
            a.flags.c_contiguous or a.flags.f_contiguous) else a for a in args)
        kernel[grid, block](*args)
        return
    args = tuple(cuda.as_cuda_array(a, sync=False) if is_cupy_array(a) else a for a in args)
    kernel[grid, block, _stream(cuda)](*args)


def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def pow2_at_least(n: int, lo: int = 1) -> int:
    """The smallest power of two >= max(n, lo): kernel specialisations are keyed by it."""
    n = max(int(n), int(lo))
    return 1 << (n - 1).bit_length()


__all__ = ["simulator_enabled", "get_cuda", "cuda_usable", "array_module", "launch", "cdiv",
           "pow2_at_least"]
