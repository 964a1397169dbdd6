"""CUDA top-m selection on a score matrix, in rank order (the building block of every selector).

Shapes: a (rows, cols) score matrix (both spelled out), m columns kept per row, n_par
threads per row (the kernels' ``n_par``).

    ranked[r] = the m best candidate columns of scores[r], best first

Order: score descending, ties to the lower column, NaN above every number (so NaN
inputs reach the output); rows with fewer than m candidates pad with -1.
Candidates of row r: sinks <= j < end[r] and not win_lo[r] <= j < win_hi[r]
(the :class:`topkattn.ops.selection.RowBounds` geometry; without bounds every column).
Reference: :func:`topkattn.ops.reference.rank_row` (and ``selection.ranked_topm_xp``).

Algorithm (split-k, no sort of the full row): n_par threads share a row, thread p
scanning columns p, p + n_par, ... (adjacent threads read adjacent columns) and keeping
a sorted buffer of its m best in local memory; most columns fail the threshold test
and cost one comparison.  The n_par lists of m (column, score) pairs form a new, shorter
candidate matrix (rows, n_par * m) that the same kernel reduces again until n_par = 1.
Every comparison uses the full order (score, then column) so merging in any order gives
the exact result.  Also used by the MLA decode step and the LoRANN search.
"""
from __future__ import annotations

import functools
import math
from types import ModuleType
from typing import Any

import numpy as np
from numba import cuda, types

from topkattn.backend import Array
from topkattn.checks import check_int
from topkattn.cuda.launch import array_module, cdiv, launch, pow2_at_least, simulator_enabled

PER_THREAD = 256  # columns one thread scans at least (and >= 16 m) before a merge level
THREADS = 128


def topk_select(scores: Array, m: int, *, end: Array | None = None, win_lo: Array | None = None,
                win_hi: Array | None = None, sinks: int = 0, return_scores: bool = False,
                _per_thread: int | None = None) -> Array | tuple[Array, Array]:
    """Top-``m`` columns of each row of ``scores`` (rows, cols), best first, -1 padded.

    Args:
      scores: (rows, cols) float32/float64 CuPy array (NumPy under the CUDA simulator).
      m: columns kept per row (>= 1).
      end, win_lo, win_hi: optional (rows,) int64 arrays on the same device: row r's candidates
        are sinks <= j < end[r] outside [win_lo[r], win_hi[r]) (default: every column).
      return_scores: also return the (rows, m) ranking scores (NaN shown as +inf, -inf padding).

    Returns ``ranked`` (rows, m) int64, or ``(ranked, values)``.
    """
    xp = array_module(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D (n_rows, n_cols), got shape {tuple(scores.shape)}")
    if scores.dtype not in (np.float32, np.float64):
        raise TypeError(f"scores must be float32 or float64, got {scores.dtype}")
    check_int("m", m, 1)
    n_rows, n_cols = scores.shape
    given = [a is not None for a in (end, win_lo, win_hi)]
    if any(given) and not all(given):
        raise ValueError("end, win_lo and win_hi go together: pass all three or none")
    if all(given):
        for name, a in (("end", end), ("win_lo", win_lo), ("win_hi", win_hi)):
            if tuple(a.shape) != (n_rows,):
                raise ValueError(f"{name} must have shape ({n_rows},), got {tuple(a.shape)}")
        end, win_lo, win_hi = (xp.ascontiguousarray(a, dtype=xp.int64) for a in (end, win_lo, win_hi))
    else:
        end = xp.full(n_rows, n_cols, dtype=xp.int64)
        win_lo = win_hi = xp.zeros(n_rows, dtype=xp.int64)
    vals, ids = topm_rows(xp, xp.ascontiguousarray(scores), None, int(m), end, win_lo, win_hi,
                          int(sinks), per_thread=_per_thread)
    return (ids, vals) if return_scores else ids


def topm_rows(xp: ModuleType, vals: Array, ids: Array | None, m: int, end: Array, win_lo: Array, win_hi: Array,
              sinks: int, per_thread: int | None = None) -> tuple[Array, Array]:
    """Rank-ordered top-m of each row: (values (rows, m), ids (rows, m) int64), reduced level by level.

    ``ids`` None: the candidates are the columns of ``vals`` within the bounds and NaN ranks
    as +inf; else ``ids`` (rows, cols) int64 names each candidate (-1 = none) and bounds are ignored.
    """
    n_rows, n_cols = vals.shape
    per = max(PER_THREAD, 16 * m) if per_thread is None else max(int(per_thread), 2 * m)
    dummy = xp.zeros((1, 1), dtype=xp.int64)
    threads = 32 if simulator_enabled() else THREADS
    while True:
        n_par = max(1, cdiv(n_cols, per))
        out_v = xp.empty((n_rows, n_par * m), dtype=vals.dtype)
        out_i = xp.empty((n_rows, n_par * m), dtype=xp.int64)
        kern = _topm_kernel(pow2_at_least(m, 8), np.dtype(vals.dtype).char)
        launch(kern, max(1, cdiv(n_rows * n_par, threads)), threads, vals, dummy if ids is None else ids,
               0 if ids is None else 1, end, win_lo, win_hi, sinks, n_par, m, out_v, out_i)
        if n_par == 1:
            return out_v, out_i
        vals, ids, n_cols = out_v, out_i, n_par * m


def _device_functions():
    @cuda.jit(device=True)
    def better(s1, j1, s2, j2):
        """(s1, j1) ranks before (s2, j2): higher score, then the lower index."""
        return s1 > s2 or (s1 == s2 and j1 < j2)

    @cuda.jit(device=True)
    def topm_insert(bv, bi, n, m, s, j):
        """Offer (s, j) to the sorted buffer (bv, bi) holding n <= m entries; return the new n."""
        if n == m:
            if not better(s, j, bv[m - 1], bi[m - 1]):
                return n
            p = m - 2
        else:
            p = n - 1
            n += 1
        while p >= 0 and better(s, j, bv[p], bi[p]):
            bv[p + 1] = bv[p]
            bi[p + 1] = bi[p]
            p -= 1
        bv[p + 1] = s
        bi[p + 1] = j
        return n

    return better, topm_insert


@functools.cache
def device_functions() -> tuple[Any, Any]:
    """(better, topm_insert) CUDA device functions shared by the kernels of this package."""
    return _device_functions()


@functools.cache
def _topm_kernel(MCAP, dchar):
    vt = types.float32 if dchar == "f" else types.float64
    cast = np.float32 if dchar == "f" else np.float64  # keep float32 kernels in float32
    _, topm_insert = device_functions()
    INF = math.inf

    @cuda.jit
    def topm_kernel(vals, ids, has_ids, end, win_lo, win_hi, sinks, n_par, m, out_v, out_i):
        i = cuda.grid(1)
        n_rows, n_cols = vals.shape
        if i >= n_rows * n_par:
            return
        r = i // n_par
        p = i - r * n_par
        bv = cuda.local.array(MCAP, vt)
        bi = cuda.local.array(MCAP, types.int64)
        n = 0
        if has_ids == 0:
            e = min(end[r], n_cols)
            lo = win_lo[r]
            hi = win_hi[r]
            for c in range(p, e, n_par):
                if c < sinks or (c >= lo and c < hi):
                    continue
                s = vals[r, c]
                if s != s:  # NaN ranks above every number
                    s = cast(INF)
                n = topm_insert(bv, bi, n, m, s, c)
        else:
            for c in range(p, n_cols, n_par):
                j = ids[r, c]
                if j >= 0:
                    n = topm_insert(bv, bi, n, m, vals[r, c], j)
        base = p * m
        for t in range(m):
            if t < n:
                out_v[r, base + t] = bv[t]
                out_i[r, base + t] = bi[t]
            else:
                out_v[r, base + t] = cast(-INF)
                out_i[r, base + t] = -1

    return topm_kernel


__all__ = ["topk_select", "topm_rows", "device_functions"]
