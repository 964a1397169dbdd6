"""Math for the Numba CPU kernels: an exp that vectorises.

``fast_exp(x)`` inside a jitted function: for float32 a branch-free exp that LLVM vectorises
(Numba's ``np.exp`` calls libm once per element: 2.4 ns against 0.2 ns per element here,
where the softmax passes of the attention kernels spend much of their time); for float64 (and
anything else) ``np.exp`` itself.

float32 method (Cody-Waite): x = n ln2 + f with n = round(x / ln2) and |f| <= ln2 / 2 (ln2 in
two parts, so f is exact to float32 rounding), exp(f) by its Taylor polynomial of degree 7
(truncation below 6e-9 relative), times 2^n built in the exponent bits.
Measured against the float64 exp over [-87, 88]: at most 3.0e-7 relative, about NumPy's own
float32 ``np.exp`` (its SIMD loop: 2.0e-7 over the same points; libm's expf, which Numba's
``np.exp`` calls: 6e-8).  Exactly: exp(0) = 1, exp(-inf) = 0, exp(+inf) =
+inf, NaN -> NaN; x below -87.34 (where float32 exp leaves the normal range) gives 0 instead
of a subnormal, and x >= 88.0 gives +inf (float32 exp overflows at 88.72; the kernels take
x <= 0, scores less their row maximum or logsumexp).
"""
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

_LO, _HI = np.float32(-87.33654), np.float32(88.0)  # float32 exp's normal range (see the docstring for _HI)
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI, _LN2_LO = np.float32(0.693145751953125), np.float32(1.428606765330187e-06)  # ln 2 = hi + lo
_C = tuple(np.float32(1.0 / f) for f in (5040.0, 720.0, 120.0, 24.0, 6.0, 2.0, 1.0, 1.0))  # 1/7! .. 1/0!


@intrinsic
def _bits_as_float32(typingctx, bits):
    """The float32 whose bit pattern is the int32 ``bits``."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


def fast_exp(x):  # pragma: no cover - replaced by the overload inside jitted code
    """exp(x) for jitted kernels (module docstring); plain ``np.exp`` when called from Python."""
    return np.exp(x)


@overload(fast_exp, inline="always")
def _fast_exp(x):
    if x != types.float32:
        return lambda x: np.exp(x)

    def exp32(x):
        xc = min(max(x, _LO), _HI)
        n = np.floor(xc * _LOG2E + np.float32(0.5))  # -126 .. 127: 2^n is normal
        f = (xc - n * _LN2_HI) - n * _LN2_LO
        p = _C[0]
        p = p * f + _C[1]
        p = p * f + _C[2]
        p = p * f + _C[3]
        p = p * f + _C[4]
        p = p * f + _C[5]
        p = p * f + _C[6]
        p = p * f + _C[7]
        r = p * _bits_as_float32((np.int32(n) + np.int32(127)) << np.int32(23))
        r = r if x > _LO else np.float32(0.0)
        r = r if x < _HI else np.float32(np.inf)
        return r if x == x else x

    return exp32
