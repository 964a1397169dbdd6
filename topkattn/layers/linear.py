"""Linear layer: y = x W^T + b, optionally ternary (BitNet b1.58).

Shape letters: x (..., Din), W (Dout, Din) (PyTorch layout), b (Dout,), y (..., Dout).
Backward: dx = dy W;  dW = sum_rows dy^T x;  db = sum_rows dy.

``ternary=True``: the forward uses W~ = s * clip(round(W / s), -1, 1), s = mean|W| + eps (and
with ``act_bits`` the per-token absmax-quantised x~), the backward passes the gradient straight
through to the float master weight: dW = sum_rows dy^T x~, dx = dy W~
(:mod:`topkattn.ops.ternary`).  ``params["weight"]`` stays the float master weight (what
training checkpoints hold); decode steps multiply with the 2-bit packed form (``packed``).
"""
from __future__ import annotations

import numpy as np
from numpy.typing import DTypeLike

from topkattn.backend import Array
from topkattn.checks import check_int, float_dtype, make_rng
from topkattn.layers.module import Module, as_input, check_grad_output, normal
from topkattn.ops.ternary import (
    DEFAULT_EPS,
    PackedTernary,
    check_act_bits,
    check_eps,
    pack_weight,
    packed_matmul,
    ternary_linear_backward,
    ternary_linear_forward,
)


class Linear(Module):
    """``params`` {"weight" (Dout, Din), "bias" (Dout,) if bias}; init N(0, std^2), std 1/sqrt(Din).

    backward accumulates into ``grads``.
    ternary: quantise the weight to {-1, 0, +1} * absmean scale in the forward (straight-through
    backward to the float weight); act_bits: None or an int in [2, 8], per-token absmax
    quantisation of the input (ternary only); eps: the quantisers' floor.
    A ternary layer's ``step`` multiplies with ``packed`` (a :class:`topkattn.ops.ternary.PackedTernary`,
    2 bits per weight): :meth:`pack` builds it, ``step`` builds it when it is None, and ``forward``
    drops it (the weights are about to change).  Call :meth:`pack` again after changing
    ``params["weight"]`` by hand.
    """

    def __init__(self, d_in: int, d_out: int, bias: bool = False, seed: int | np.random.Generator = 0,
                 dtype: DTypeLike = "float32", std: float | None = None, *, ternary: bool = False,
                 act_bits: int | None = None, eps: float = DEFAULT_EPS) -> None:
        super().__init__()
        self.d_in, self.d_out = check_int("d_in", d_in, 1), check_int("d_out", d_out, 1)
        if not isinstance(ternary, bool):
            raise TypeError(f"ternary must be True or False, got {type(ternary).__name__} {ternary!r}")
        if act_bits is not None and not ternary:
            raise ValueError(f"act_bits applies only with ternary=True, got act_bits={act_bits!r}")
        self.ternary = ternary
        self.act_bits = check_act_bits(act_bits)
        self.eps = check_eps(eps)
        self.packed = None
        dt = float_dtype(dtype)
        rng = make_rng(seed)
        std = 1.0 / np.sqrt(d_in) if std is None else std
        self.add_param("weight", normal(rng, (d_out, d_in), std, dt))
        if bias:
            self.add_param("bias", np.zeros(d_out, dtype=dt))
        self._x = None
        self._ternary_saved = None

    def forward(self, x: Array) -> Array:
        W = self.params["weight"]
        x = as_input(x, "x", W.dtype, last_dim=self.d_in, letters=f"(..., Din={self.d_in})")
        self._x = x
        if self.ternary:
            self.packed = None  # training: the master weight is about to change
            y, self._ternary_saved = ternary_linear_forward(x, W, act_bits=self.act_bits, eps=self.eps)  # (..., Dout)
        else:
            y = x @ W.T  # (..., Dout)
        if "bias" in self.params:
            y = y + self.params["bias"]
        return y

    def step(self, x: Array) -> Array:
        """Forward of one decode step, keeping nothing for backward; a ternary layer reads its packed weights."""
        if not self.ternary:
            return self.forward(x)
        W = self.params["weight"]
        x = as_input(x, "x", W.dtype, last_dim=self.d_in, letters=f"(..., Din={self.d_in})")
        packed = self.packed if self.packed is not None else self.pack()
        y = packed_matmul(x, packed, act_bits=self.act_bits, eps=self.eps)  # (..., Dout)
        if "bias" in self.params:
            y = y + self.params["bias"]
        return y

    def pack(self) -> PackedTernary:
        """Quantise and pack the current weight (ternary layers): sets and returns ``packed``."""
        if not self.ternary:
            raise ValueError("pack() needs a ternary Linear (ternary=True)")
        self.packed = pack_weight(self.params["weight"], eps=self.eps)
        return self.packed

    def backward(self, dy: Array) -> Array:
        if self._x is None:
            raise RuntimeError("Linear.backward called before forward")
        W = self.params["weight"]
        x = self._x
        dy = check_grad_output(dy, x.shape[:-1] + (self.d_out,), W)  # (..., Dout)
        if self.ternary:
            dx, dW = ternary_linear_backward(dy, self._ternary_saved)  # straight through to the master weight
            self.grads["weight"] += dW
        else:
            self.grads["weight"] += dy.reshape(-1, self.d_out).T @ x.reshape(-1, self.d_in)  # (Dout, Din)
        if "bias" in self.params:
            self.grads["bias"] += dy.reshape(-1, self.d_out).sum(0)
        return dx if self.ternary else dy @ W  # (..., Din)
