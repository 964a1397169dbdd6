"""RMS normalisation over the last axis with a learned gain.

Shape letters: x (..., d), g (d,): d the normalised width (the model width; C or Lq
inside MLA).

    rstd = 1 / sqrt(mean_c x^2 + eps),   xhat = x * rstd,   y = xhat * g
Backward (per row):
    dg = sum_rows dy * xhat
    u  = dy * g,   dx = rstd * (u - xhat * mean_c(u * xhat))
"""
from __future__ import annotations

import numpy as np
from numpy.typing import DTypeLike

from topkattn.backend import Array, get_array_module
from topkattn.checks import check_int, check_real, float_dtype
from topkattn.layers.module import Module, as_input, check_grad_output


def rms_norm_forward(x: Array, g: Array, eps: float = 1e-6) -> tuple[Array, tuple[Array, Array, Array]]:
    """``(y, saved)``; saved = (xhat (..., d), rstd (..., 1), g)."""
    xp = get_array_module(x, g)
    ms = (x * x).mean(-1, keepdims=True)  # (..., 1)
    rstd = 1.0 / xp.sqrt(ms + x.dtype.type(eps))
    xhat = x * rstd
    return xhat * g, (xhat, rstd, g)


def rms_norm_backward(dy: Array, saved: tuple[Array, Array, Array]) -> tuple[Array, Array]:
    """``(dx, dg)`` from dy (..., d) (the formula above; the temporaries reused in place)."""
    xhat, rstd, g = saved
    xp = get_array_module(dy, xhat)
    d = xhat.shape[-1]
    t = dy * xhat
    dg = t.reshape(-1, d).sum(0)  # (d,)
    u = dy * g
    xp.multiply(u, xhat, out=t)
    m = t.mean(-1, keepdims=True)  # (..., 1): mean_c(u * xhat)
    xp.multiply(xhat, m, out=t)
    xp.subtract(u, t, out=u)
    return xp.multiply(rstd, u, out=u), dg


class RMSNorm(Module):
    """``params`` {"weight" (d,)} initialised to ones; backward accumulates into ``grads``."""

    def __init__(self, dim: int, eps: float = 1e-6, dtype: DTypeLike = "float32") -> None:
        super().__init__()
        self.dim = check_int("dim", dim, 1)
        self.eps = check_real("eps", eps, 0.0)  # eps = 0 is allowed (an all-zero row then gives NaN)
        self.add_param("weight", np.ones(dim, dtype=float_dtype(dtype)))
        self._saved = None

    def forward(self, x: Array) -> Array:
        g = self.params["weight"]
        x = as_input(x, "x", g.dtype, last_dim=self.dim, letters=f"(..., d={self.dim})")
        y, self._saved = rms_norm_forward(x, g, self.eps)
        return y

    def step(self, x: Array) -> Array:
        """Forward without keeping state for backward (incremental decoding)."""
        g = self.params["weight"]
        x = as_input(x, "x", g.dtype, last_dim=self.dim, letters=f"(..., d={self.dim})")
        return rms_norm_forward(x, g, self.eps)[0]

    def backward(self, dy: Array) -> Array:
        if self._saved is None:
            raise RuntimeError("RMSNorm.backward called before forward")
        xhat = self._saved[0]
        dx, dg = rms_norm_backward(check_grad_output(dy, xhat.shape, xhat), self._saved)
        self.grads["weight"] += dg
        return dx
