"""Numba CPU kernel for the packed ternary matmul (BitNet b1.58 weights at 2 bits each).

Packed layout (see :mod:`topkattn.ops.ternary`): a weight row of Din ternary values is
``nb = ceil(Din / 4)`` bytes; weight j sits in byte ``j % nb`` at bits ``2 * (j // nb)``
(four "planes" of nb weights each), code 0 -> 0, 1 -> +1, 2 -> -1.  The planar order lets
the kernel decode eight bytes of one plane at a time with 64-bit integer operations
(no per-weight shifts), so the decode vectorises.

Compiled lazily on first call and cached on disk (``cache=True``); serial and ``nogil``:
callers run blocks of output rows on worker threads (see :mod:`topkattn.threads`).
"""
import numba as nb
import numpy as np

_LOW_BITS = np.uint64(0x0101010101010101)  # bit 0 of every byte
_HIGH_BITS = np.uint64(0x8080808080808080)  # bit 7 of every byte


@nb.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def ternary_matmul_rows(x, codes, out, o0, o1):
    """out[n, o] += sum_j x[n, j] * w(o, j) for the output rows o0 <= o < o1.

    x: (N, Din) float32 or float64, C-contiguous; codes: (Dout, nb) uint8, the packed ternary
    weights w(o, j) in {-1, 0, +1} (layout in the module docstring; code 3 reads as 0);
    out: (N, Dout) of x's dtype (the caller zero-fills it and multiplies by the scale).
    Per output row: the row's bytes are copied into a zero-padded run of 64-bit words and each
    plane is decoded eight weights per word to int8 (per byte: ((bit0 | 0x80) - bit1) ^ 0x80,
    borrow-free).  Few rows (N <= 4, decode): each row of x is dotted with the int8 planes
    directly.  More rows: four output rows at a time are widened to x's dtype in x's order
    and every row of x is dotted with the four at once (each x entry loaded once per four).
    Loops run over slices so that indices are provably non-negative (Numba's wraparound
    checks would stop vectorisation).  Sums are reassociated (vectorised): float results
    equal the reference to rounding, integer-valued inputs give exact sums.
    Reference: :func:`topkattn.ops.ternary.packed_matmul_reference`.
    """
    N, Din = x.shape
    nbt = codes.shape[1]
    nw = (nbt + 7) // 8  # 64-bit words per plane
    raw = np.zeros(nw * 8, dtype=np.uint8)
    planes = np.zeros(4 * nw, dtype=np.uint64)
    w8 = planes.view(np.int8)  # plane i: bytes [8 * nw * i, 8 * nw * i + nb)
    if N <= 4:
        for o in range(o0, o1):
            _decode_row(codes[o], raw, planes, nbt, nw)
            for n in range(N):
                acc = out[n, o]
                for i in range(4):
                    j0 = i * nbt
                    n_i = min(nbt, Din - j0)
                    if n_i <= 0:
                        break
                    xs = x[n, j0:j0 + n_i]
                    ws = w8[8 * nw * i:8 * nw * i + n_i]
                    for jb in range(n_i):
                        acc += xs[jb] * ws[jb]
                out[n, o] = acc
        return
    wf = np.zeros((4, Din), dtype=out.dtype)  # four decoded weight rows in x's order
    o = o0
    while o + 4 <= o1:
        for r in range(4):
            _decode_row(codes[o + r], raw, planes, nbt, nw)
            _widen(w8, wf[r], nbt, nw)
        w0, w1, w2, w3 = wf[0], wf[1], wf[2], wf[3]
        for n in range(N):
            xs = x[n]
            a0, a1, a2, a3 = out[n, o], out[n, o + 1], out[n, o + 2], out[n, o + 3]
            for j in range(Din):
                xv = xs[j]
                a0 += xv * w0[j]
                a1 += xv * w1[j]
                a2 += xv * w2[j]
                a3 += xv * w3[j]
            out[n, o], out[n, o + 1], out[n, o + 2], out[n, o + 3] = a0, a1, a2, a3
        o += 4
    for o_last in range(o, o1):
        _decode_row(codes[o_last], raw, planes, nbt, nw)
        w0 = wf[0]
        _widen(w8, w0, nbt, nw)
        for n in range(N):
            xs = x[n]
            acc = out[n, o_last]
            for j in range(Din):
                acc += xs[j] * w0[j]
            out[n, o_last] = acc


@nb.njit(cache=True, nogil=True)
def _decode_row(row, raw, planes, nbt, nw):
    """planes (4 * nw,) uint64 <- the int8 weights of one packed row (nb bytes), plane by plane."""
    for jb in range(nbt):
        raw[jb] = row[jb]
    raw64 = raw.view(np.uint64)
    for i in range(4):
        sh0 = np.uint64(2 * i)
        sh1 = np.uint64(2 * i + 1)
        plane = planes[i * nw:(i + 1) * nw]
        for w in range(nw):
            v = raw64[w]
            plane[w] = ((((v >> sh0) & _LOW_BITS) | _HIGH_BITS) - ((v >> sh1) & _LOW_BITS)) ^ _HIGH_BITS


@nb.njit(cache=True, nogil=True)
def _widen(w8, dst, nbt, nw):
    """dst (Din,) float <- the int8 planes w8 in x's order (plane i holds weights i*nb .. i*nb + nb - 1)."""
    Din = dst.shape[0]
    for i in range(4):
        j0 = i * nbt
        n_i = min(nbt, Din - j0)
        if n_i <= 0:
            break
        d = dst[j0:j0 + n_i]
        src = w8[8 * nw * i:8 * nw * i + n_i]
        for jb in range(n_i):
            d[jb] = src[jb]
