"""Layer normalisation over the last axis, with a learned gain and bias (BERT's LayerNorm).

Shape letters: x (..., d), gamma and beta (d,).

    mu   = mean_c x,   var = mean_c (x - mu)^2,   rstd = 1 / sqrt(var + eps)
    xhat = (x - mu) * rstd
    y    = xhat * gamma + beta

Backward (per row):
    dbeta  = sum_rows dy,   dgamma = sum_rows dy * xhat
    g      = dy * gamma
    dx     = rstd * (g - mean_c g - xhat * mean_c (g * xhat))
"""
from __future__ import annotations

from types import ModuleType

import numpy as np
from numpy.typing import DTypeLike

from topkattn.backend import FLOAT_DTYPES, Array, as_engine_array, get_array_module
from topkattn.checks import check_int, check_real
from topkattn.layers.module import check_grad_output


def layer_norm(x: Array, gamma: Array, beta: Array, eps: float = 1e-5) -> Array:
    """LayerNorm of ``x`` (..., d) over its last axis; gamma, beta (d,).

    float32/float64, NumPy or CuPy; the result has x's dtype.  The variance is the
    biased one (divide by d), as in PyTorch and BERT; ``eps`` is added to it.
    """
    y, _ = layer_norm_forward(x, gamma, beta, eps=eps)
    return y


def layer_norm_forward(x: Array, gamma: Array, beta: Array,
                       eps: float = 1e-5) -> tuple[Array, tuple[Array, Array, Array]]:
    """Returns ``(y, saved)``; ``saved`` keeps xhat (..., d), rstd (..., 1) and gamma."""
    x, gamma, beta = (as_engine_array(a, n) for a, n in ((x, "x"), (gamma, "gamma"), (beta, "beta")))
    _check(x, gamma, beta, eps)
    xp = get_array_module(x, gamma, beta)
    mu = x.mean(-1, keepdims=True)  # (..., 1)
    xc = x - mu  # (..., d)
    var = (xc * xc).mean(-1, keepdims=True)  # (..., 1)
    rstd = 1.0 / xp.sqrt(var + x.dtype.type(eps))  # (..., 1)
    xhat = xc * rstd  # (..., d)
    y = xhat * gamma.astype(x.dtype, copy=False) + beta.astype(x.dtype, copy=False)
    return y, (xhat, rstd, gamma)


def layer_norm_backward(dy: Array, saved: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
    """``(dx, dgamma, dbeta)`` from dy (..., d)."""
    xhat, rstd, gamma = saved
    dy = check_grad_output(dy, xhat.shape, xhat)  # (..., d)
    d = xhat.shape[-1]
    rows = dy.reshape(-1, d)  # (rows, d)
    dbeta = rows.sum(0)  # (d,)
    dgamma = (rows * xhat.reshape(-1, d)).sum(0)  # (d,)
    g = dy * gamma.astype(xhat.dtype, copy=False)  # (..., d)
    dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    return dx, dgamma.astype(gamma.dtype, copy=False), dbeta.astype(gamma.dtype, copy=False)


class LayerNorm:
    """A LayerNorm layer: ``params`` {"weight", "bias"} (d,), ``grads`` of the same keys.

    ``forward(x)`` keeps what ``backward(dy)`` needs; backward returns dx and
    accumulates into ``grads``.
    """

    def __init__(self, dim: int, eps: float = 1e-5, dtype: DTypeLike = np.float32, xp: ModuleType = np) -> None:
        check_int("dim", dim, 1)
        self.eps = check_real("eps", eps, 0.0)
        self.params = {"weight": xp.ones(dim, dtype=dtype), "bias": xp.zeros(dim, dtype=dtype)}
        self.grads = {name: xp.zeros_like(p) for name, p in self.params.items()}
        self._saved = None

    def forward(self, x: Array) -> Array:
        y, self._saved = layer_norm_forward(x, self.params["weight"], self.params["bias"], self.eps)
        return y

    def backward(self, dy: Array) -> Array:
        if self._saved is None:
            raise RuntimeError("LayerNorm.backward called before forward")
        dx, dgamma, dbeta = layer_norm_backward(dy, self._saved)
        self.grads["weight"] += dgamma
        self.grads["bias"] += dbeta
        return dx


def _check(x, gamma, beta, eps):
    for name, a in (("x", x), ("gamma", gamma), ("beta", beta)):
        if a.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32 or float64, got {a.dtype}")
    if x.ndim < 1:
        raise ValueError(f"x must have at least one axis (..., d), got shape {tuple(x.shape)}")
    d = x.shape[-1]
    for name, a in (("gamma", gamma), ("beta", beta)):
        if tuple(a.shape) != (d,):
            raise ValueError(f"{name} must have shape (d,) = ({d},), got {tuple(a.shape)}")
    check_real("eps", eps, 0.0)
