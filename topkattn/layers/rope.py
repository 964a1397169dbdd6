"""Rotary position embedding (rotate-half layout) on the last axis.

Shape letters: x (..., T, R) with R even, positions (T,).  For i < R/2 the pair
(x_i, x_{i+R/2}) is rotated by the angle pos * base^(-2i/R):

    y_i       = x_i cos - x_{i+R/2} sin
    y_{i+R/2} = x_i sin + x_{i+R/2} cos
Backward is the inverse rotation (the transpose): angle -> -angle.
"""
from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import numpy as np
from numpy.typing import DTypeLike

from topkattn.backend import Array, as_engine_array, get_array_module
from topkattn.checks import check_int, check_real
from topkattn.layers.module import Module, check_grad_output


def check_rope_base(name: str, base: float) -> float:
    """``float(base)``: the rotary base, a finite real number > 1 (TypeError / ValueError naming ``name``).

    A base <= 1 (or NaN, or infinite) gives no usable rotation: the angles base^(-2i/R) do
    not decrease, or the output is NaN.
    """
    return check_real(name, base, 1.0, lo_open=True)


def rope_angles(positions: Sequence[int] | np.ndarray, R: int, base: float, xp: ModuleType = np,
                dtype: DTypeLike = np.float64) -> tuple[Array, Array]:
    """(cos, sin), each (T, R/2), for integer ``positions`` (T,)."""
    half = R // 2
    inv = base ** (-np.arange(half, dtype=np.float64) / half)  # (R/2,)
    ang = np.asarray(positions, dtype=np.float64)[:, None] * inv[None, :]  # (T, R/2)
    return xp.asarray(np.cos(ang).astype(dtype)), xp.asarray(np.sin(ang).astype(dtype))


def rope_apply(x: Array, cos: Array, sin: Array, inverse: bool = False) -> Array:
    """Rotate x (..., T, R) by (cos, sin) (T, R/2); ``inverse`` rotates back (backward).

    Computed as x * [cos, cos] + [x2, x1] * [-sin, sin] over whole rows (the same products and
    sums as the two formulas above, so the same numbers), not half-rows: NumPy loops over R/2
    numbers at a time cost three times as much.
    """
    xp = get_array_module(x)
    half = x.shape[-1] // 2
    if inverse:
        sin = -sin
    dtype = xp.result_type(x, cos, sin)
    full_cos = xp.concatenate([cos, cos], axis=-1)  # (T, R)
    signed_sin = xp.concatenate([-sin, sin], axis=-1)  # (T, R)
    swapped = xp.empty(xp.broadcast_shapes(x.shape, full_cos.shape), dtype=dtype)  # [x2, x1]
    swapped[..., :half] = x[..., half:]
    swapped[..., half:] = x[..., :half]
    swapped *= signed_sin
    out = x * full_cos
    out += swapped  # [x1 cos - x2 sin, x2 cos + x1 sin]
    return out


class RoPE(Module):
    """Parameter-free rotary layer: ``forward(x, positions)``, ``backward(dy)``."""

    def __init__(self, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        self.dim = check_int("dim", dim, 2)
        if dim % 2:
            raise ValueError(f"rope dim must be even, got {dim}")
        self.base = check_rope_base("base", base)
        self._cs = None
        self._shape = None

    def angles(self, positions: Sequence[int] | np.ndarray, like: Array) -> tuple[Array, Array]:
        return rope_angles(positions, self.dim, self.base, get_array_module(like), like.dtype)

    def forward(self, x: Array, positions: Sequence[int] | np.ndarray) -> Array:
        x = as_engine_array(x, "x")
        if x.dtype.kind != "f":
            raise TypeError(f"x must be a float array, got {x.dtype}")
        if x.ndim < 2 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have last axis R={self.dim}, got shape {tuple(x.shape)}")
        if len(positions) != x.shape[-2]:
            raise ValueError(f"positions must have length T={x.shape[-2]}, got {len(positions)}")
        self._cs = self.angles(positions, x)
        self._shape = x.shape
        return rope_apply(x, *self._cs)

    def step(self, x: Array, positions: Sequence[int] | np.ndarray) -> Array:
        return rope_apply(x, *self.angles(positions, x))

    def backward(self, dy: Array) -> Array:
        if self._cs is None:
            raise RuntimeError("RoPE.backward called before forward")
        dy = check_grad_output(dy, self._shape, self._cs[0])  # (..., T, R)
        return rope_apply(dy, *self._cs, inverse=True)
