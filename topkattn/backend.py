"""Array-library dispatch: NumPy or CuPy, chosen from the inputs.

CuPy is never imported here: an array is a CuPy array only if ``cupy`` is
already in ``sys.modules`` (the caller created it) and the array is an
instance of ``cupy.ndarray``.  Foreign arrays (PyTorch, JAX, anything with
``__dlpack__``) are converted at the boundary with :func:`as_engine_array` and
converted back with :func:`to_caller_kind`.
"""
from __future__ import annotations

import sys
from types import ModuleType
from typing import Any, TypeAlias

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
Array: TypeAlias = Any  # a NumPy or CuPy ndarray (CuPy is never imported just to name its type)


def _cupy() -> ModuleType | None:
    return sys.modules.get("cupy")


def is_cupy_array(x: Any) -> bool:
    cp = _cupy()
    return cp is not None and isinstance(x, cp.ndarray)


def get_array_module(*arrays: Any) -> ModuleType:
    """Return ``cupy`` if any argument is a CuPy array, else ``numpy``."""
    for a in arrays:
        if is_cupy_array(a):
            return _cupy()
    return np


def require_cupy() -> ModuleType:
    """Import and return CuPy with a usable GPU, or raise a clear RuntimeError."""
    try:
        import cupy as cp
    except ImportError as e:
        raise RuntimeError(
            "the GPU path needs CuPy: pip install 'topkattn[cuda12]' (or cuda13)"
        ) from e
    try:
        n = cp.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDA driver missing or broken
        raise RuntimeError(f"CuPy is installed but no CUDA device is usable: {e}") from e
    if n < 1:
        raise RuntimeError("CuPy is installed but no CUDA device is present")
    return cp


def _framework(x: Any) -> str:
    """The top-level module name of an array's type ('numpy', 'torch', 'jaxlib', ...)."""
    return type(x).__module__.split(".")[0]


def as_engine_array(x: Any, name: str = "array") -> Array:
    """Return ``x`` as a NumPy or CuPy array without copying where possible.

    NumPy and CuPy arrays pass through; objects exposing ``__dlpack__`` (PyTorch,
    JAX, ...) are imported zero-copy with ``from_dlpack`` (CuPy for CUDA
    devices).  Python lists and scalars go through ``numpy.asarray``.
    """
    if type(x) is np.ndarray or is_cupy_array(x):
        return x
    if isinstance(x, np.ma.MaskedArray):  # its mask would be dropped silently
        raise TypeError(f"{name} must be a plain array, not a masked array (its mask would be ignored): "
                        f"pass {name}.filled(value)")
    if isinstance(x, np.ndarray):  # another subclass (np.matrix, memmap, ...): its plain ndarray view
        return x.view(np.ndarray)
    if hasattr(x, "__dlpack__"):
        device_type = None
        if hasattr(x, "__dlpack_device__"):
            device_type = int(x.__dlpack_device__()[0])
        if device_type in (2, 3, 13):  # kDLCUDA, kDLCUDAHost, kDLCUDAManaged
            return require_cupy().from_dlpack(x)
        try:
            return np.from_dlpack(x)
        except (BufferError, TypeError, RuntimeError) as e:
            err = e
        if _framework(x) == "torch":  # e.g. a tensor that requires grad: detach first
            try:
                return np.from_dlpack(x.detach())
            except (BufferError, TypeError, RuntimeError) as e:
                err = e
        dtype = str(getattr(x, "dtype", "?"))
        if dtype.rsplit(".", 1)[-1] in ("float32", "float64"):
            raise err  # not the dtype (a device, a layout): DLPack's own error
        # e.g. bfloat16, which NumPy cannot hold
        raise TypeError(f"{name} must be float32 or float64 (or an array NumPy can import), got "
                        f"{type(x).__name__} of dtype {dtype}: {err}") from err
    if hasattr(x, "__cuda_array_interface__"):
        return require_cupy().asarray(x)
    try:
        return np.asarray(x)
    except Exception as e:
        raise TypeError(f"{name} must be an array, got {type(x).__name__}") from e


def to_caller_kind(y: Array, like: Any) -> Any:
    """Convert the engine array ``y`` back to the kind of ``like`` (torch, jax) where natural."""
    fw = _framework(like)
    if fw == "torch":
        return sys.modules["torch"].from_dlpack(y)
    if fw in ("jax", "jaxlib"):
        return sys.modules["jax"].numpy.from_dlpack(y)
    return y


def to_numpy(x: Any) -> np.ndarray:
    """Move an engine array to the host as a NumPy array."""
    if is_cupy_array(x):
        return x.get()
    return np.asarray(x)
