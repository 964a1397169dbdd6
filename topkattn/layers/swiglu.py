"""SwiGLU feed-forward: y = W2 (silu(W1 x) * (W3 x)).

Shape letters: x (..., d), W1 and W3 (Dff, d), W2 (d, Dff), a = W1 x, b = W3 x (..., Dff).
    silu(a) = a * sigmoid(a),  silu'(a) = sigmoid(a) * (1 + a * (1 - sigmoid(a)))
Backward: dh = dy W2;  da = dh * b * silu'(a);  db = dh * silu(a);  dx = da W1 + db W3.
On contiguous NumPy float arrays the elementwise part is one fused Numba pass each way
(:mod:`topkattn.ops.activation_kernels`; float32 through its vectorised exp, within 3e-7
relative of NumPy's), else the NumPy passes below.
"""
from __future__ import annotations

import numpy as np
from numpy.typing import DTypeLike

from topkattn.backend import Array, get_array_module
from topkattn.checks import check_int, float_dtype, make_rng
from topkattn.layers.module import Module, as_input, check_grad_output, normal

try:  # Numba CPU kernels are optional at run time: the NumPy path needs no compiler.
    from topkattn.ops import activation_kernels as _kernels
except Exception:  # pragma: no cover - numba missing or broken
    _kernels = None


def _sigmoid(xp, a):
    """sigmoid(a), stable for large |a| (exp of a non-positive number only):
    1 / (1 + e) where a >= 0, e / (1 + e) elsewhere, e = exp(-|a|).

    NumPy: the two branches are blended by multiplying with the 0/1 masks and adding (each
    entry exactly one branch: the same numbers as ``where``), because ``where`` on a mask
    without pattern costs ten times an arithmetic pass (branch mispredictions).
    """
    e = xp.abs(a)
    if xp is not np:  # pragma: no cover - GPU
        e = xp.exp(-e)
        return xp.where(a >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    np.negative(e, out=e)
    np.exp(e, out=e)
    d = e + 1.0
    pos = a >= 0
    out = np.divide(1.0, d)
    out *= pos  # 1 / (1 + e) where a >= 0, else 0
    np.divide(e, d, out=e)
    e *= ~pos  # e / (1 + e) where a < 0, else 0 (a NaN stays NaN through both)
    out += e
    return out


def _use_kernels(*arrays):
    """The fused Numba kernels (:mod:`topkattn.ops.activation_kernels`) take contiguous NumPy
    float32/float64 arrays of one dtype (Numba importable)."""
    first = arrays[0]
    return (_kernels is not None and all(isinstance(x, np.ndarray) and x.dtype == first.dtype
                                         and x.flags.c_contiguous for x in arrays)
            and first.dtype in (np.float32, np.float64))


class SwiGLU(Module):
    """``params`` {"W1" (Dff, d), "W3" (Dff, d), "W2" (d, Dff)}; backward accumulates into ``grads``."""

    def __init__(self, d_model: int, d_ff: int, seed: int | np.random.Generator = 0,
                 dtype: DTypeLike = "float32") -> None:
        super().__init__()
        self.d_model, self.d_ff = check_int("d_model", d_model, 1), check_int("d_ff", d_ff, 1)
        dt = float_dtype(dtype)
        rng = make_rng(seed)
        self.add_param("W1", normal(rng, (d_ff, d_model), 1 / np.sqrt(d_model), dt))
        self.add_param("W3", normal(rng, (d_ff, d_model), 1 / np.sqrt(d_model), dt))
        self.add_param("W2", normal(rng, (d_model, d_ff), 1 / np.sqrt(d_ff), dt))
        self._saved = None

    def forward(self, x: Array) -> Array:
        p = self.params
        x = as_input(x, "x", p["W1"].dtype, last_dim=self.d_model, letters=f"(..., d={self.d_model})")
        xp = get_array_module(x)
        a = x @ p["W1"].T  # (..., Dff)
        b = x @ p["W3"].T  # (..., Dff)
        if _use_kernels(a, b):  # one fused pass (the same formulas)
            sg, h = np.empty_like(a), np.empty_like(a)
            _kernels.swiglu_forward(a.reshape(-1), b.reshape(-1), sg.reshape(-1), h.reshape(-1))
        else:
            sg = _sigmoid(xp, a)
            h = a * sg
            h *= b  # (..., Dff): silu(a) * b
        self._saved = (x, a, b, sg, h)
        return h @ p["W2"].T  # (..., d)

    def backward(self, dy: Array) -> Array:
        if self._saved is None:
            raise RuntimeError("SwiGLU.backward called before forward")
        p, g = self.params, self.grads
        x, a, b, sg, h = self._saved
        d, Dff = self.d_model, self.d_ff
        dy = check_grad_output(dy, x.shape, x)  # (..., d)
        g["W2"] += dy.reshape(-1, d).T @ h.reshape(-1, Dff)
        dh = dy @ p["W2"]  # (..., Dff)
        if _use_kernels(dh, a, b, sg):  # one fused pass (the same formulas)
            da, db = np.empty_like(a), np.empty_like(a)
            _kernels.swiglu_backward(dh.reshape(-1), a.reshape(-1), b.reshape(-1), sg.reshape(-1), da.reshape(-1),
                                     db.reshape(-1))
        else:
            dsilu = 1 - sg
            dsilu *= a
            dsilu += 1  # 1 + a (1 - sg): silu'(a) / sg
            da = dh * b
            da *= sg
            da *= dsilu  # dh * b * silu'(a)
            db = a * sg
            db *= dh  # dh * silu(a)
        x2 = x.reshape(-1, d)
        g["W1"] += da.reshape(-1, Dff).T @ x2
        g["W3"] += db.reshape(-1, Dff).T @ x2
        return da @ p["W1"] + db @ p["W3"]
