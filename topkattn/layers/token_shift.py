"""Token shift: y_t = x_t + W x_{t-1}, a kernel-2 causal convolution over the sequence.

Shape letters: B batch, T tokens, d model width.

Recall tasks need a "previous token" feature (the value at position t must know the key
at t-1); attention alone has to discover it as a previous-token head, which on MQAR costs
thousands of steps of plateau for dense and top-k attention alike.  The shift (the short
convolution of RWKV / H3 / Based / Mamba) supplies it; W starts at zero (the identity map).
"""
from __future__ import annotations

import numpy as np
from numpy.typing import DTypeLike

from topkattn.backend import Array, get_array_module
from topkattn.checks import check_int, float_dtype
from topkattn.layers.module import Module, as_input, check_grad_output


class TokenShift(Module):
    """y_t = x_t + W x_{t-1} (x_{-1} = 0): a kernel-2 causal convolution mixing channels.

    ``params`` {"weight" (d, d)}, initialised to zero (the identity map at step 0).
    forward: x (B, T, d) -> y (B, T, d);  backward: dW = sum_bt dy_t x_{t-1}^T,
    dx_t = dy_t + W^T dy_{t+1}.
    """

    def __init__(self, dim: int, dtype: DTypeLike = "float32") -> None:
        super().__init__()
        self.dim = check_int("dim", dim, 1)
        self.add_param("weight", np.zeros((self.dim, self.dim), dtype=float_dtype(dtype)))
        self._prev = None

    def forward(self, x: Array) -> Array:
        W = self.params["weight"]
        x = as_input(x, "x", W.dtype, ndim=3, last_dim=self.dim, letters=f"(B, T, d={self.dim})")
        xp = get_array_module(x)
        prev = xp.zeros_like(x)                      # (B, T, d)
        prev[:, 1:] = x[:, :-1]
        self._prev = prev
        return x + prev @ W.T

    def backward(self, dy: Array) -> Array:
        if self._prev is None:
            raise RuntimeError("TokenShift.backward called before forward")
        d = self.dim
        W = self.params["weight"]
        dy = check_grad_output(dy, self._prev.shape, W)  # (B, T, d)
        self.grads["weight"] += dy.reshape(-1, d).T @ self._prev.reshape(-1, d)   # (d, d)
        dx = dy.copy()
        dx[:, :-1] += dy[:, 1:] @ W                  # (B, T-1, d)
        return dx

    def step(self, x_t: Array, prev: Array | None) -> Array:
        """y_t for x_t (B, 1, d) given the previous input ``prev`` (B, 1, d) or None."""
        if prev is None:
            return x_t.copy()
        return x_t + prev @ self.params["weight"].T
