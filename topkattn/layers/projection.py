"""Float or ternary projections of the attention layers (MLA, Attention): the weight and activation
views a forward multiplies with, and the decode-time form of a weight.

Shape letters: x (..., Din), W (Dout, Din) (PyTorch layout).

With ``ternary`` a forward multiplies W~ = s clip(round(W / s), -1, 1) (absmean s, per matrix) and,
with ``act_bits``, the per-token absmax-quantised x~ (:mod:`topkattn.ops.ternary`); the backward is
the straight-through estimator: the gradient of W~ goes to the float master weight W, the gradient
of x~ to x.  Layers call :func:`weight_view` once per forward and keep W~ for the backward.
At decode a ternary weight is a :class:`topkattn.ops.ternary.PackedTernary` (2 bits per weight)
that :func:`decode_project` multiplies directly.
"""
from __future__ import annotations

from topkattn.backend import Array
from topkattn.ops.ternary import (
    DEFAULT_EPS,
    PackedTernary,
    pack_weight,
    packed_matmul,
    quantize_activations,
    ternary_quantize,
)


def weight_view(W: Array, ternary: bool, eps: float = DEFAULT_EPS) -> Array:
    """W~ = s Wq (W's shape and dtype) with ``ternary``, else W itself."""
    if not ternary:
        return W
    Wq, s = ternary_quantize(W, eps)
    return (Wq * s).astype(W.dtype)


def act_view(x: Array, act_bits: int | None, eps: float = DEFAULT_EPS) -> Array:
    """x~ = xq / a (x's shape and dtype, per-token absmax over the last axis) with ``act_bits``, else x."""
    if act_bits is None:
        return x
    xq, a = quantize_activations(x, act_bits, eps)
    return (xq / a).astype(x.dtype)


def ternary_product(x: Array, W: Array, ternary: bool, act_bits: int | None = None,
                    eps: float = DEFAULT_EPS) -> tuple[Array, Array, Array]:
    """``(y, x~, W~)`` of a projection y = x~ W~^T (..., Dout) in training (x~, W~ for the backward).

    With ``act_bits`` the product is evaluated as (xq Wq^T) s / a: the integer product is exact in
    any summation order, so :func:`decode_project` on the packed weight gives the same bits, and
    quantisers downstream (which meet exact rounding ties on such integer-derived values) agree.
    """
    if not ternary:
        return x @ W.T, x, W
    Wq, s = ternary_quantize(W, eps)
    Wt = (Wq * s).astype(W.dtype)
    if act_bits is None:
        return x @ Wt.T, x, Wt
    xq, a = quantize_activations(x, act_bits, eps)
    dt = x.dtype
    y = (xq.astype(dt) @ Wq.astype(dt).T) * dt.type(s)  # (..., Dout): exact integers times s
    return (y / a).astype(dt), (xq / a).astype(dt), Wt


def decode_weight(W: Array, ternary: bool, eps: float = DEFAULT_EPS) -> Array | PackedTernary:
    """A decode-time snapshot of W: its :class:`PackedTernary` with ``ternary``, else a copy."""
    return pack_weight(W, eps) if ternary else W.copy()


def decode_project(x: Array, W: Array | PackedTernary, act_bits: int | None = None, eps: float = DEFAULT_EPS) -> Array:
    """y = x~ W~^T (..., Dout) for a :func:`decode_weight` W (packed: read at 2 bits per weight)."""
    if isinstance(W, PackedTernary):
        if act_bits is None:
            return packed_matmul(x, W, eps=eps)
        xq, a = quantize_activations(x, act_bits, eps)
        y = packed_matmul(xq.astype(x.dtype), W, eps=eps)  # (xq Wq^T) s, as ternary_product
        return (y / a).astype(x.dtype)
    return act_view(x, act_bits, eps) @ W.T
