"""Numba CPU kernels of the SwiGLU activation: one fused pass forward, one backward.

Shape letters: n entries of the flattened (..., Dff) arrays a = W1 x and b = W3 x.
Formulas of :mod:`topkattn.layers.swiglu`:

    sg = sigmoid(a) = 1 / (1 + e) where a >= 0, e / (1 + e) elsewhere, e = exp(-|a|)
    h  = silu(a) b = a sg b
    da = dh b sg (1 + a (1 - sg)),   db = dh a sg

NumPy spends about ten passes over (n,) arrays on each direction; these kernels make one,
with :func:`topkattn.ops.kernel_math.fast_exp` (float32: within 3e-7 relative of exp;
float64: ``np.exp``).  A NaN in a reaches sg, h, da and db as NumPy's formulas carry it.
Serial and ``nogil``; the arrays are 1-D and contiguous.
"""

from topkattn.ops.kernel_math import fast_exp
from topkattn.threads import njit

_FAST = {"nsz", "arcp", "contract", "afn", "reassoc"}  # no "nnan"/"ninf": NaN stays NaN


@njit(fastmath=_FAST, error_model="numpy")  # numpy: no zero-division check, so the loop vectorises
def swiglu_forward(a, b, sg, h):
    """sg[i] = sigmoid(a[i]), h[i] = a[i] sg[i] b[i] for every i."""
    one = a.dtype.type(1.0)
    for i in range(a.size):
        x = a[i]
        e = fast_exp(-abs(x))
        s = (one if x >= 0 else e) / (one + e)
        sg[i] = s
        h[i] = x * s * b[i]


@njit(fastmath=_FAST, error_model="numpy")  # numpy: no zero-division check, so the loop vectorises
def swiglu_backward(dh, a, b, sg, da, db):
    """da[i] = dh b sg (1 + a (1 - sg)), db[i] = dh a sg for every i."""
    one = a.dtype.type(1.0)
    for i in range(a.size):
        x, s, g = a[i], sg[i], dh[i]
        da[i] = g * b[i] * s * (one + x * (one - s))
        db[i] = g * x * s
