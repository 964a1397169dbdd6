"""Scalar quantisation of the per-cluster regression matrices (8-bit and 4-bit).

Rows are quantised independently and symmetrically: ``x ~ scale * code`` with one
float32 scale per row, codes in [-127, 127] (8 bits) or [-7, 7] (4 bits).  4-bit
codes are packed two per byte (offset by 8: low nibble = even column).

Shapes are written (rows, cols): rows are points (N) or rank components (Rk), cols the rank
or a dim (the ANN index's letters).
"""
import numpy as np

LEVELS = {8: 127, 4: 7}


def quantize_rows(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Quantise each row of ``x`` (rows, cols) to ``bits`` bits.

    Returns ``(codes, scale)``: codes int8 (rows, cols) for 8 bits, packed uint8
    (rows, ceil(cols/2)) for 4 bits; scale float32 (rows,).  A zero row gets scale 0.
    """
    if bits not in LEVELS:
        raise ValueError(f"quantization_bits must be 4 or 8, got {bits!r}")
    x = np.asarray(x, dtype=np.float32)
    levels = LEVELS[bits]
    amax = np.max(np.abs(x), axis=1) if x.shape[1] else np.zeros(len(x), np.float32)  # (rows,)
    scale = (amax / levels).astype(np.float32)
    inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale > 0)
    codes = np.clip(np.rint(x * inv[:, None]), -levels, levels).astype(np.int8)  # (rows, cols)
    if bits == 4:
        codes = pack4(codes)
    return codes, scale


def dequantize_rows(codes: np.ndarray, scale: np.ndarray, bits: int, ncols: int) -> np.ndarray:
    """Inverse of :func:`quantize_rows`: float32 (rows, ncols) = scale * code."""
    if bits == 4:
        codes = unpack4(codes, ncols)
    return codes.astype(np.float32) * np.asarray(scale, np.float32)[:, None]


def pack4(codes: np.ndarray) -> np.ndarray:
    """Pack int8 codes in [-7, 7] of shape (rows, cols) into uint8 (rows, ceil(cols/2))."""
    n, r = codes.shape
    u = (codes.astype(np.int16) + 8).astype(np.uint8)  # 1..15
    if r % 2:
        u = np.concatenate([u, np.full((n, 1), 8, np.uint8)], axis=1)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8)


def unpack4(packed: np.ndarray, ncols: int) -> np.ndarray:
    """Unpack uint8 (rows, ceil(cols/2)) into int8 codes (rows, ncols)."""
    lo = (packed & 0x0F).astype(np.int8) - 8
    hi = (packed >> 4).astype(np.int8) - 8
    out = np.empty((packed.shape[0], 2 * packed.shape[1]), np.int8)
    out[:, 0::2] = lo
    out[:, 1::2] = hi
    return out[:, :ncols]
