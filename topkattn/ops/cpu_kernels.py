"""Numba CPU kernels for the hot loops of top-k attention.

Each kernel names the reference it must match; tests compare them.
Compiled lazily on first call and cached on disk (:func:`topkattn.threads.njit`: the first
real compile prints one line on stderr).
"""
import numpy as np

from topkattn.threads import njit


@njit
def ranked_topm_rows(tile, out, end, win_lo, win_hi, sinks, m):
    """Streaming top-m over each row of a score tile, in rank order.

    tile: (rows, cols) float scores; out: (rows, >= m) int64, pre-filled with -1, receives the
    column indices of row r's m best candidates (score descending, ties to the lower
    column, NaN above every number).  Candidates of row r: sinks <= j < end[r] and not
    win_lo[r] <= j < win_hi[r].  One pass per row keeping a sorted buffer of m entries:
    most scores fail the threshold test and cost one comparison.  Serial and ``nogil``:
    callers run row blocks on worker threads (see :mod:`topkattn.threads`).
    Reference: :func:`topkattn.ops.reference.rank_row` (and ``selection.ranked_topm_xp``).
    """
    n_rows = tile.shape[0]
    for r in range(n_rows):
        vals = np.empty(m, dtype=tile.dtype)
        ids = out[r]
        n = 0
        thresh = -np.inf
        e = end[r]
        lo = win_lo[r]
        hi = win_hi[r]
        if hi <= lo:
            lo = e
            hi = e
        for part in range(2):
            j0 = sinks if part == 0 else max(sinks, hi)
            j1 = min(e, lo) if part == 0 else e
            for j in range(j0, j1):
                s = tile[r, j]
                if s != s:
                    s = np.inf
                if n == m:
                    if not s > thresh:
                        continue
                    p = m - 2
                else:
                    p = n - 1
                    n += 1
                while p >= 0 and vals[p] < s:
                    vals[p + 1] = vals[p]
                    ids[p + 1] = ids[p]
                    p -= 1
                vals[p + 1] = s
                ids[p + 1] = j
                if n == m:
                    thresh = vals[m - 1]


@njit
def scatter_add_rows(out, rows, vals):
    """out[rows[i]] += vals[i] for every i with rows[i] >= 0, in index order (deterministic).

    out: (n_out, D), e.g. a key gradient flattened to (B*G*S, D); rows: (n,) int64;
    vals: (n, D).  Reference: ``numpy.add.at``.
    """
    D = out.shape[1]
    for i in range(rows.shape[0]):
        r = rows[i]
        if r < 0:
            continue
        for d in range(D):
            out[r, d] += vals[i, d]
