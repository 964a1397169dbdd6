"""GELU activation: y = x * Phi(x), Phi the standard normal CDF (BERT's "gelu").

Elementwise, any shape (written ``(..., d)`` below).  ``approximate="tanh"`` gives
the tanh form 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) used by GPT-2.

    forward:  y  = x * Phi(x)
    backward: dx = dy * (Phi(x) + x * phi(x)),   phi the standard normal density
"""
from __future__ import annotations

import math

import numpy as np

from topkattn.backend import FLOAT_DTYPES, Array, as_engine_array, get_array_module
from topkattn.layers.module import check_grad_output

_APPROXIMATIONS = ("none", "tanh")
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def gelu(x: Array, approximate: str = "none") -> Array:
    """GELU of ``x`` (any shape, float32/float64, NumPy or CuPy).

    approximate: "none" (exact, erf-based; BERT, MiniLM) or "tanh".
    """
    y, _ = gelu_forward(x, approximate=approximate)
    return y


def gelu_forward(x: Array, approximate: str = "none") -> tuple[Array, tuple[Array, str]]:
    """Returns ``(y, saved)``; ``saved`` keeps only x and the form used."""
    x = as_engine_array(x, "x")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float32 or float64, got {x.dtype}")
    if approximate not in _APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {_APPROXIMATIONS}, got {approximate!r}")
    xp = get_array_module(x)
    if approximate == "tanh":
        u = _SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
        y = 0.5 * x * (1.0 + xp.tanh(u))
    else:
        y = 0.5 * x * (1.0 + _erf(xp, x * _INV_SQRT_2))
    return y.astype(x.dtype, copy=False), (x, approximate)


def gelu_backward(dy: Array, saved: tuple[Array, str]) -> Array:
    """dx from dy (same shape as x)."""
    x, approximate = saved
    dy = check_grad_output(dy, x.shape, x)  # the shape of x
    xp = get_array_module(x)
    if approximate == "tanh":
        u = _SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
        th = xp.tanh(u)
        du = _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)
        dydx = 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * du
    else:
        cdf = 0.5 * (1.0 + _erf(xp, x * _INV_SQRT_2))
        pdf = _INV_SQRT_2PI * xp.exp(-0.5 * x * x)
        dydx = cdf + x * pdf
    return (dy * dydx).astype(x.dtype, copy=False)


def _erf(xp, x):
    if xp is np:
        from scipy.special import erf
    else:
        from cupyx.scipy.special import erf
    return erf(x)
