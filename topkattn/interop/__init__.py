"""Lazy bridges to PyTorch and JAX (never imported by topkattn itself).

``topkattn.interop.torch`` and ``topkattn.interop.jax`` are imported on first access,
so ``import topkattn.interop`` alone imports neither framework.
"""
import importlib
from types import ModuleType

__all__ = ["torch", "jax"]


def __getattr__(name: str) -> ModuleType:
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
