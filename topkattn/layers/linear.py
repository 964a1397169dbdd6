"""Linear layer: y = x W^T + b.

Shape letters: x (..., Din), W (Dout, Din) (PyTorch layout), b (Dout,), y (..., Dout).
Backward: dx = dy W;  dW = sum_rows dy^T x;  db = sum_rows dy.
"""
import numpy as np

from topkattn.checks import check_int, float_dtype, make_rng
from topkattn.layers.module import Module, as_input, check_grad_output, normal


class Linear(Module):
    """``params`` {"weight" (Dout, Din), "bias" (Dout,) if bias}; init N(0, std^2), std 1/sqrt(Din).

    backward accumulates into ``grads``.
    """

    def __init__(self, d_in, d_out, bias=False, seed=0, dtype="float32", std=None):
        super().__init__()
        self.d_in, self.d_out = check_int("d_in", d_in, 1), check_int("d_out", d_out, 1)
        dt = float_dtype(dtype)
        rng = make_rng(seed)
        std = 1.0 / np.sqrt(d_in) if std is None else std
        self.add_param("weight", normal(rng, (d_out, d_in), std, dt))
        if bias:
            self.add_param("bias", np.zeros(d_out, dtype=dt))
        self._x = None

    def forward(self, x):
        W = self.params["weight"]
        x = as_input(x, "x", W.dtype, last_dim=self.d_in, letters=f"(..., Din={self.d_in})")
        self._x = x
        y = x @ W.T  # (..., Dout)
        if "bias" in self.params:
            y = y + self.params["bias"]
        return y

    step = forward

    def backward(self, dy):
        if self._x is None:
            raise RuntimeError("Linear.backward called before forward")
        W = self.params["weight"]
        x = self._x
        dy = check_grad_output(dy, x.shape[:-1] + (self.d_out,), W)  # (..., Dout)
        self.grads["weight"] += dy.reshape(-1, self.d_out).T @ x.reshape(-1, self.d_in)  # (Dout, Din)
        if "bias" in self.params:
            self.grads["bias"] += dy.reshape(-1, self.d_out).sum(0)
        return dy @ W  # (..., Din)
