"""Ternary projections (BitNet b1.58): quantise, straight-through backward, 2-bit packing, packed matmul.

Shape letters: Din, Dout a projection's input and output widths; x (..., Din); W (Dout, Din)
(PyTorch layout, as :class:`topkattn.layers.Linear`); N the rows of x flattened; nb = ceil(Din / 4)
packed bytes per weight row.

Weights, absmean (BitNet b1.58, Ma et al. 2024), per matrix:
    s  = mean_{o,j} |W_oj| + eps                 (float64)
    Wq = clip(round(W / s), -1, 1)               in {-1, 0, +1}, int8
    W~ = s Wq                                    the weight the forward uses
Activations, absmax per token (optional, ``act_bits`` b in [2, 8], BitNet's 8 by default there):
    Qp = 2^(b-1) - 1;  a = Qp / max(max_j |x_j|, eps)      (..., 1) float64
    xq = clip(round(a x), -Qp - 1, Qp)           int8;  x~ = xq / a   (x~ = x without act_bits)
  round: half to even, and a x within ``tie_band(x.dtype)`` (2048 ulps of 1.0 in x's dtype:
  2^-12 for float32, 2^-41 for float64) of a half-integer counts as that half-integer.  Values
  built from integer products (a quantised projection's output, or an attention output that one
  key carries) hit exact ties such as 127 n / (2 n) = 63.5, and two evaluation orders of the same
  number (a batched forward and a decode step) land an ulp either side; the band rounds both the
  same way, so decode equals forward.  (Outside the band the quantiser is round-to-nearest.)
Forward:  y = x~ W~^T                            (..., Dout)
Backward, the straight-through estimator (STE) of BitNet b1.58 (Bengio et al. 2013): round and
clip pass the gradient as the identity and the scales s, a are constants (``w + (q(w) - w).detach()``):
    dW = sum_rows dy^T x~   (Dout, Din)   to the float master weights W
    dx = dy W~              (..., Din)    to the float input x (through the activation quantiser too)
This is the exact gradient of the surrogate y(x', W') = x~ W'^T at W' = W~ (for dW) and of
y(x', W') = x' W~^T at x' = x~ (for dx); the true derivative of the quantised forward is zero
almost everywhere.  round is NumPy's round-half-to-even (like ``torch.round``).

Packing (inference): 2 bits per weight, 4 weights per uint8.  Row o of Wq is ``nb`` bytes;
weight j sits in byte ``j % nb`` at bits ``2 * (j // nb)`` (four planes of nb weights; the
planar order lets the kernel decode 8 bytes of a plane per 64-bit word), code 0 -> 0, 1 -> +1,
2 -> -1 (3 is invalid).  Unused slots of the last plane (Din not a multiple of 4) hold 0.
    packed_matmul(x, P) = s * (x~ @ Wq^T)        equals the forward's y up to float rounding

Implementations: the float64 loop references at the bottom of this module; the vectorised
xp path (NumPy or CuPy); the Numba CPU kernel :func:`topkattn.ops.ternary_kernels.ternary_matmul_rows`
for ``packed_matmul`` on NumPy arrays.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from numpy.typing import DTypeLike

from topkattn.backend import FLOAT_DTYPES, Array, as_engine_array, get_array_module, to_numpy
from topkattn.checks import check_choice, check_int, check_real
from topkattn.threads import n_workers, pool

try:  # numba is a dependency; without it packed_matmul runs the xp path
    from topkattn.ops import ternary_kernels as _kernels
except ImportError:  # pragma: no cover
    _kernels = None

DEFAULT_EPS = 1e-5
CODE_PLUS, CODE_MINUS = 1, 2  # 2-bit codes of +1 and -1 (0 is 0)
_PARALLEL_MIN_WORK = 1 << 21  # N * Dout * Din below which packed_matmul stays on one thread


# -- public functions --------------------------------------------------------------------------
def ternary_quantize(W: Array, eps: float = DEFAULT_EPS) -> tuple[Array, float]:
    """Absmean ternary quantisation of a weight matrix: ``(Wq, s)``.

    W: float array of any shape (a weight matrix (Dout, Din)); eps > 0 keeps s positive.
    Returns Wq (int8, W's shape and array module) in {-1, 0, +1} and s = mean|W| + eps
    (a Python float); W~ = s * Wq.  The division W / s is done in float64.
    """
    W = _check_float("W", W)
    eps = check_eps(eps)
    Wq, s = _quantize_weight(W, eps)
    return Wq, float(s)


def quantize_activations(x: Array, bits: int = 8, eps: float = DEFAULT_EPS) -> tuple[Array, Array]:
    """Per-token absmax quantisation of activations: ``(xq, a)``.

    x: float (..., Din); bits in [2, 8].  Returns xq (int8, x's shape) with values in
    [-2^(bits-1), 2^(bits-1) - 1] and a (..., 1) float64 with x~ = xq / a; a row of zeros
    gets a = Qp / eps and xq = 0.
    """
    x = _check_float("x", x)
    if x.ndim == 0:
        raise ValueError("x must have a last axis (..., Din), got a 0-d array")
    bits = check_act_bits(bits, optional=False, name="bits")
    return _quantize_acts(x, bits, check_eps(eps))


def ternary_linear(x: Array, W: Array, *, act_bits: int | None = None, eps: float = DEFAULT_EPS) -> Array:
    """y = x~ W~^T (..., Dout) of a ternary projection; see :func:`ternary_linear_forward`."""
    y, _ = ternary_linear_forward(x, W, act_bits=act_bits, eps=eps)
    return y


def ternary_linear_forward(x: Array, W: Array, *, act_bits: int | None = None,
                           eps: float = DEFAULT_EPS) -> tuple[Array, TernaryLinearSaved]:
    """Forward of a BitNet b1.58 projection: ``(y, saved)``.

    x: (..., Din), W: (Dout, Din) float master weights, the same float dtype (float32 or
    float64) and array module.  act_bits: None (float activations) or an int in [2, 8]
    (per-token absmax quantisation).  y (..., Dout) = x~ W~^T in W's dtype; ``saved`` keeps
    x~ and W~ for :func:`ternary_linear_backward`.
    """
    W = _check_float("W", W)
    if W.ndim != 2:
        raise ValueError(f"W must be 2-D (Dout, Din), got shape {tuple(W.shape)}")
    x = _check_float("x", x)
    if x.dtype != W.dtype:
        raise TypeError(f"x and W must share one dtype, got x {x.dtype}, W {W.dtype}")
    if get_array_module(x) is not get_array_module(W):
        raise TypeError("x and W must both be NumPy arrays or both CuPy arrays")
    d_out, d_in = W.shape
    if x.ndim == 0 or x.shape[-1] != d_in:
        raise ValueError(f"x must have last axis Din={d_in} (..., Din), got shape {tuple(x.shape)}")
    act_bits = check_act_bits(act_bits)
    eps = check_eps(eps)
    Wq, s = _quantize_weight(W, eps)
    w_deq = (Wq * s).astype(W.dtype)  # (Dout, Din)
    if act_bits is None:
        x_deq = x
    else:
        xq, a = _quantize_acts(x, act_bits, eps)
        x_deq = (xq / a).astype(W.dtype)  # (..., Din)
    y = x_deq @ w_deq.T  # (..., Dout)
    return y, TernaryLinearSaved(x_deq, w_deq)


def ternary_linear_backward(dy: Array, saved: TernaryLinearSaved) -> tuple[Array, Array]:
    """Straight-through gradients ``(dx, dW)``: dx = dy W~ (..., Din), dW = sum_rows dy^T x~ (Dout, Din).

    dy: (..., Dout), the shape of the forward's output.  dW is the gradient of the float master
    weights (accumulate it into the layer's grads); see the module docstring for the rule.
    """
    if not isinstance(saved, TernaryLinearSaved):
        raise TypeError(f"saved must come from ternary_linear_forward, got {type(saved).__name__}")
    x_deq, w_deq = saved.x_deq, saved.w_deq
    d_out, d_in = w_deq.shape
    dy = as_engine_array(dy, "dy")
    if dy.dtype.kind != "f":
        raise TypeError(f"dy must be a float array, got {dy.dtype}")
    want = tuple(x_deq.shape[:-1]) + (d_out,)
    if tuple(dy.shape) != want:
        raise ValueError(f"dy must have the shape of the forward output, {want}, got {tuple(dy.shape)}")
    dy = dy.astype(w_deq.dtype, copy=False)
    dW = dy.reshape(-1, d_out).T @ x_deq.reshape(-1, d_in)  # (Dout, Din)
    dx = dy @ w_deq  # (..., Din)
    return dx, dW


class TernaryLinearSaved:
    """What :func:`ternary_linear_backward` needs: x~ (..., Din) and W~ (Dout, Din)."""

    __slots__ = ("x_deq", "w_deq")

    def __init__(self, x_deq: Array, w_deq: Array) -> None:
        self.x_deq, self.w_deq = x_deq, w_deq


def pack_ternary(Wq: Array) -> Array:
    """Pack ternary values (..., Din) in {-1, 0, +1} (any integer dtype) into codes (..., nb) uint8.

    Layout in the module docstring (nb = ceil(Din / 4), 4 weights per byte, planar order).
    TypeError for a non-integer array, ValueError for a value outside {-1, 0, +1} or Din = 0.
    """
    Wq = as_engine_array(Wq, "Wq")
    if Wq.dtype.kind not in "iu":
        raise TypeError(f"Wq must be an integer array of values in {{-1, 0, 1}}, got dtype {Wq.dtype}")
    if Wq.ndim == 0 or Wq.shape[-1] == 0:
        raise ValueError(f"Wq must have a non-empty last axis (..., Din), got shape {tuple(Wq.shape)}")
    xp = get_array_module(Wq)
    bad = (Wq < -1) | (Wq > 1)
    if bool(bad.any()):
        raise ValueError(f"Wq must hold only -1, 0, +1, got {int(bad.sum())} other value(s), "
                         f"e.g. {int(Wq[bad].ravel()[0])}")
    lead, d_in = tuple(Wq.shape[:-1]), Wq.shape[-1]
    nb = (d_in + 3) // 4
    padded = xp.zeros(lead + (4 * nb,), dtype=np.uint8)
    padded[..., :d_in] = xp.where(Wq > 0, CODE_PLUS, xp.where(Wq < 0, CODE_MINUS, 0))
    planes = padded.reshape(lead + (4, nb))  # plane i holds weights i*nb .. i*nb + nb - 1
    return (planes[..., 0, :] | (planes[..., 1, :] << 2) | (planes[..., 2, :] << 4)
            | (planes[..., 3, :] << 6)).astype(np.uint8)


def unpack_ternary(codes: Array, d_in: int) -> Array:
    """Ternary values (..., Din) int8 from codes (..., nb) uint8 written by :func:`pack_ternary`.

    d_in must satisfy ceil(d_in / 4) == nb.  ValueError for a code 3 or a d_in that does not fit.
    """
    codes = _check_codes(codes, d_in)
    xp = get_array_module(codes)
    nb = codes.shape[-1]
    planes = xp.stack([(codes >> (2 * i)) & 3 for i in range(4)], axis=-2)  # (..., 4, nb)
    c = planes.reshape(tuple(codes.shape[:-1]) + (4 * nb,))[..., :d_in]
    return ((c == CODE_PLUS).astype(np.int8) - (c == CODE_MINUS).astype(np.int8))  # (..., Din)


class PackedTernary:
    """A ternary weight matrix stored at 2 bits per weight: ``codes`` (Dout, nb) uint8 and the scale s.

    Build it with :func:`pack_weight` (from float master weights) or from ``codes``/``scale``/
    ``d_in``; W~ = s * unpack(codes).  ``nbytes`` counts the codes plus the 8-byte scale.
    ``to_arrays``/``from_arrays`` give the numeric arrays a :mod:`topkattn.storage` container
    holds (``codes`` uint8, ``scale`` float64 (1,), ``shape`` int64 (2,)).
    """

    __slots__ = ("codes", "scale", "d_out", "d_in")

    def __init__(self, codes: Array, scale: float, d_in: int) -> None:
        codes = _check_codes(codes, d_in)
        if codes.ndim != 2:
            raise ValueError(f"codes must be 2-D (Dout, nb), got shape {tuple(codes.shape)}")
        self.codes = codes
        self.scale = check_real("scale", scale, 0.0, lo_open=True)
        self.d_out, self.d_in = int(codes.shape[0]), int(d_in)

    @property
    def shape(self) -> tuple[int, int]:
        return self.d_out, self.d_in

    @property
    def nbytes(self) -> int:
        return int(self.codes.nbytes) + 8

    def unpack(self) -> Array:
        """Wq (Dout, Din) int8 in {-1, 0, +1}."""
        return unpack_ternary(self.codes, self.d_in)

    def dequantize(self, dtype: DTypeLike = np.float32) -> Array:
        """W~ = s * Wq (Dout, Din) in ``dtype``."""
        return (self.unpack() * self.scale).astype(dtype)

    def to_arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        """``{prefix + "codes", prefix + "scale", prefix + "shape"}`` -> host NumPy arrays."""
        return {prefix + "codes": to_numpy(self.codes),
                prefix + "scale": np.array([self.scale], dtype=np.float64),
                prefix + "shape": np.array([self.d_out, self.d_in], dtype=np.int64)}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], prefix: str = "") -> PackedTernary:
        """The inverse of :meth:`to_arrays`; ValueError naming a missing or malformed entry."""
        for key in ("codes", "scale", "shape"):
            if prefix + key not in arrays:
                raise ValueError(f"packed ternary arrays lack {prefix + key!r}")
        scale, shape = np.asarray(arrays[prefix + "scale"]), np.asarray(arrays[prefix + "shape"])
        if scale.shape != (1,) or scale.dtype.kind != "f":
            raise ValueError(f"{prefix}scale must be a float array of shape (1,), got {scale.dtype} {scale.shape}")
        if shape.shape != (2,) or shape.dtype.kind not in "iu":
            raise ValueError(f"{prefix}shape must be an integer array of shape (2,), got {shape.dtype} {shape.shape}")
        codes = arrays[prefix + "codes"]
        if tuple(np.shape(codes))[:1] != (int(shape[0]),):
            raise ValueError(f"{prefix}codes must have {int(shape[0])} rows (shape {shape.tolist()}), "
                             f"got shape {tuple(np.shape(codes))}")
        return cls(codes, float(scale[0]), int(shape[1]))

    def __repr__(self):
        return f"PackedTernary(d_out={self.d_out}, d_in={self.d_in}, scale={self.scale:.6g}, nbytes={self.nbytes})"


def pack_weight(W: Array, eps: float = DEFAULT_EPS) -> PackedTernary:
    """Quantise float master weights W (Dout, Din) and pack them: a :class:`PackedTernary`."""
    W = _check_float("W", W)
    if W.ndim != 2:
        raise ValueError(f"W must be 2-D (Dout, Din), got shape {tuple(W.shape)}")
    Wq, s = _quantize_weight(W, check_eps(eps))
    return PackedTernary(pack_ternary(Wq), float(s), W.shape[1])


def packed_matmul(x: Array, packed: PackedTernary, *, act_bits: int | None = None, eps: float = DEFAULT_EPS,
                  impl: str = "auto") -> Array:
    """y = s * (x~ @ Wq^T) (..., Dout) with the weights read from their 2-bit packed form.

    x: (..., Din) float32 or float64 (NumPy or CuPy); packed: a :class:`PackedTernary`;
    act_bits/eps as in :func:`ternary_linear_forward` (x~ = x without act_bits).  impl:
    "auto" (the Numba kernel for NumPy arrays, else "numpy"), "numba" (CPU kernel, rows of
    the output split over the worker threads for large products) or "numpy" (unpack, then
    an xp matmul).  y is in x's dtype and equals :func:`ternary_linear` up to rounding.
    """
    if not isinstance(packed, PackedTernary):
        raise TypeError(f"packed must be a PackedTernary, got {type(packed).__name__}")
    x = _check_float("x", x)
    if x.ndim == 0 or x.shape[-1] != packed.d_in:
        raise ValueError(f"x must have last axis Din={packed.d_in} (..., Din), got shape {tuple(x.shape)}")
    act_bits = check_act_bits(act_bits)
    eps = check_eps(eps)
    impl = check_choice("impl", impl, ("auto", "numba", "numpy"))
    xp = get_array_module(x)
    if impl == "numba" and (xp is not np or _kernels is None):
        raise ValueError("impl='numba' needs NumPy arrays and numba" if xp is not np
                         else "impl='numba' requested but numba is not importable")
    use_numba = impl == "numba" or (impl == "auto" and xp is np and _kernels is not None)
    dt = x.dtype
    if act_bits is not None:
        xq, a = _quantize_acts(x, act_bits, eps)
        x = (xq / a).astype(dt)
    lead = tuple(x.shape[:-1])
    if not use_numba:
        wq = xp.asarray(packed.unpack()).astype(dt)  # (Dout, Din)
        return (x @ wq.T) * dt.type(packed.scale)  # (..., Dout)
    x2 = np.ascontiguousarray(x.reshape(-1, packed.d_in))  # (N, Din)
    out = np.zeros((x2.shape[0], packed.d_out), dtype=dt)  # (N, Dout)
    _run_kernel(x2, np.ascontiguousarray(to_numpy(packed.codes)), out)
    out *= dt.type(packed.scale)
    return out.reshape(lead + (packed.d_out,))


# -- argument checks (shared with the layers) ----------------------------------------------------
def check_act_bits(act_bits: int | None, optional: bool = True, name: str = "act_bits") -> int | None:
    """None (with ``optional``) or an int in [2, 8]: the activation bits of a ternary projection."""
    return check_int(name, act_bits, 2, 8, optional=optional)


def check_eps(eps: float) -> float:
    """eps > 0 of the quantisers."""
    return check_real("eps", eps, 0.0, lo_open=True)


# -- helpers -------------------------------------------------------------------------------------
def _check_float(name, a):
    a = as_engine_array(a, name)
    if a.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {a.dtype}")
    return a


def _check_codes(codes, d_in):
    codes = as_engine_array(codes, "codes")
    if codes.dtype != np.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    d_in = check_int("d_in", d_in, 1)
    if codes.ndim == 0 or codes.shape[-1] != (d_in + 3) // 4:
        raise ValueError(f"codes must have last axis ceil(d_in / 4) = {(d_in + 3) // 4} for d_in={d_in}, "
                         f"got shape {tuple(codes.shape)}")
    invalid = codes & (codes >> 1) & 0x55  # a 2-bit slot holding code 3
    if bool(invalid.any()):
        raise ValueError("codes hold the invalid 2-bit code 3 (valid: 0 -> 0, 1 -> +1, 2 -> -1)")
    return codes


def _quantize_weight(W, eps):
    """(Wq int8, s) with s a float64 0-d array of W's module (no host sync on the GPU)."""
    xp = get_array_module(W)
    W64 = W.astype(xp.float64)
    s = xp.abs(W64).sum() / max(W.size, 1) + eps  # an empty W: mean|W| taken as 0, s = eps
    Wq = xp.clip(xp.round(W64 / s), -1, 1).astype(np.int8)
    return Wq, s


def tie_band(dtype: DTypeLike) -> float:
    """Half-width of the band around a half-integer that the activation quantiser treats as a tie
    (in units of the quantisation step): 2048 ulps of 1.0 in ``dtype`` (see the module docstring)."""
    return 2048.0 * float(np.finfo(np.dtype(dtype)).eps)


def _quantize_acts(x, bits, eps):
    xp = get_array_module(x)
    qp = 2 ** (bits - 1) - 1
    x64 = x.astype(xp.float64)
    if x.shape[-1]:
        a = qp / xp.maximum(xp.abs(x64).max(axis=-1, keepdims=True), eps)  # (..., 1)
    else:  # Din = 0: every row is a row of zeros
        a = xp.full(x.shape[:-1] + (1,), qp / eps)
    y = x64 * a
    half = xp.floor(y) + 0.5
    y = xp.where(xp.abs(y - half) <= tie_band(x.dtype), half, y)  # near-ties are ties (half to even below)
    xq = xp.clip(xp.round(y), -qp - 1, qp).astype(np.int8)
    return xq, a


def _run_kernel(x2, codes, out):
    """The Numba kernel over all output rows, in blocks on the worker pool when it pays."""
    d_out = codes.shape[0]
    nw = 1 if x2.shape[0] * d_out * x2.shape[1] < _PARALLEL_MIN_WORK else min(n_workers(), d_out)
    if nw <= 1:
        _kernels.ternary_matmul_rows(x2, codes, out, 0, d_out)
        return
    bounds = np.linspace(0, d_out, nw + 1).astype(np.int64)
    jobs = [pool().submit(_kernels.ternary_matmul_rows, x2, codes, out, int(o0), int(o1))
            for o0, o1 in zip(bounds[:-1], bounds[1:]) if o1 > o0]
    for job in jobs:
        job.result()


# -- float64 references (slow loops, obviously correct) -------------------------------------------
def ternary_quantize_reference(W: Array, eps: float = DEFAULT_EPS) -> tuple[np.ndarray, float]:
    """(Wq int64, s) by loops: s = sum|w| / n + eps, q = min(1, max(-1, round-half-even(w / s)))."""
    W = np.asarray(W, dtype=np.float64)
    flat = W.ravel()
    s = math.fsum(abs(float(w)) for w in flat) / max(flat.size, 1) + eps
    q = [min(1, max(-1, round(float(w) / s))) for w in flat]  # Python round: half to even
    return np.array(q, dtype=np.int64).reshape(W.shape), s


def quantize_activations_reference(x: Array, bits: int = 8, eps: float = DEFAULT_EPS) -> tuple[np.ndarray, np.ndarray]:
    """(xq int64 (..., Din), a (..., 1)) by loops over tokens and entries."""
    band = tie_band(np.asarray(x).dtype if np.asarray(x).dtype.kind == "f" else np.float64)
    x = np.asarray(x, dtype=np.float64)
    qp = 2 ** (bits - 1) - 1
    rows = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # (N, Din); Din may be 0
    xq = np.zeros(rows.shape, dtype=np.int64)
    a = np.zeros((rows.shape[0], 1))
    for n, row in enumerate(rows):
        a[n, 0] = qp / max(max((abs(float(v)) for v in row), default=0.0), eps)
        for j, v in enumerate(row):
            y = float(v) * a[n, 0]
            if abs(y - (math.floor(y) + 0.5)) <= band:  # a near-tie is the tie
                y = math.floor(y) + 0.5
            xq[n, j] = min(qp, max(-qp - 1, round(y)))  # Python round: half to even
    return xq.reshape(x.shape), a.reshape(x.shape[:-1] + (1,))


def ternary_linear_reference(x: Array, W: Array, act_bits: int | None = None, eps: float = DEFAULT_EPS) -> np.ndarray:
    """y (..., Dout) = x~ W~^T by loops, in float64."""
    x_deq, w_deq = _dequantized_reference(x, W, act_bits, eps)
    rows = x_deq.reshape(-1, x_deq.shape[-1])
    y = np.zeros((rows.shape[0], w_deq.shape[0]))
    for n in range(rows.shape[0]):
        for o in range(w_deq.shape[0]):
            y[n, o] = sum(rows[n, j] * w_deq[o, j] for j in range(w_deq.shape[1]))
    return y.reshape(x_deq.shape[:-1] + (w_deq.shape[0],))


def ternary_linear_backward_reference(dy: Array, x: Array, W: Array, act_bits: int | None = None,
                                      eps: float = DEFAULT_EPS) -> tuple[np.ndarray, np.ndarray]:
    """(dx, dW) of the straight-through rule by loops: dx = dy W~, dW = sum_rows dy^T x~."""
    x_deq, w_deq = _dequantized_reference(x, W, act_bits, eps)
    d_out, d_in = w_deq.shape
    rows, drows = x_deq.reshape(-1, d_in), np.asarray(dy, dtype=np.float64).reshape(-1, d_out)
    dx = np.zeros(rows.shape)
    dW = np.zeros((d_out, d_in))
    for n in range(rows.shape[0]):
        for o in range(d_out):
            for j in range(d_in):
                dx[n, j] += drows[n, o] * w_deq[o, j]
                dW[o, j] += drows[n, o] * rows[n, j]
    return dx.reshape(x_deq.shape), dW


def pack_reference(Wq: Array) -> np.ndarray:
    """codes (Dout, nb) uint8 of Wq (Dout, Din) by loops: weight j -> byte j % nb, bits 2 * (j // nb)."""
    Wq = np.asarray(Wq)
    d_out, d_in = Wq.shape
    nb = (d_in + 3) // 4
    codes = np.zeros((d_out, nb), dtype=np.uint8)
    for o in range(d_out):
        for j in range(d_in):
            code = {0: 0, 1: CODE_PLUS, -1: CODE_MINUS}[int(Wq[o, j])]
            codes[o, j % nb] |= code << (2 * (j // nb))
    return codes


def unpack_reference(codes: Array, d_in: int) -> np.ndarray:
    """Wq (Dout, Din) int64 from codes (Dout, nb) by loops (the inverse of :func:`pack_reference`)."""
    codes = np.asarray(codes)
    nb = codes.shape[1]
    Wq = np.zeros((codes.shape[0], d_in), dtype=np.int64)
    for o in range(codes.shape[0]):
        for j in range(d_in):
            code = (int(codes[o, j % nb]) >> (2 * (j // nb))) & 3
            Wq[o, j] = {0: 0, CODE_PLUS: 1, CODE_MINUS: -1}[code]
    return Wq


def packed_matmul_reference(x: Array, codes: Array, scale: float, d_in: int, act_bits: int | None = None,
                            eps: float = DEFAULT_EPS) -> np.ndarray:
    """y (..., Dout) = s * (x~ @ Wq^T) with Wq unpacked by loops, sums in float64."""
    x = np.asarray(x, dtype=np.float64)
    if act_bits is not None:
        xq, a = quantize_activations_reference(x, act_bits, eps)
        x = xq / a
    Wq = unpack_reference(codes, d_in)
    rows = x.reshape(-1, d_in)
    y = np.zeros((rows.shape[0], Wq.shape[0]))
    for n in range(rows.shape[0]):
        for o in range(Wq.shape[0]):
            y[n, o] = scale * sum(rows[n, j] * Wq[o, j] for j in range(d_in))
    return y.reshape(x.shape[:-1] + (Wq.shape[0],))


def _dequantized_reference(x, W, act_bits, eps):
    Wq, s = ternary_quantize_reference(W, eps)
    x = np.asarray(x, dtype=np.float64)
    if act_bits is None:
        return x, Wq * s
    xq, a = quantize_activations_reference(x, act_bits, eps)
    return xq / a, Wq * s
