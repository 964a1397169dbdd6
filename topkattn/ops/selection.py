"""Selection: which keys each query row attends, as an index tensor (B, H, T, K).

Shape letters: B batch, H query heads, G KV heads, T queries, S keys, D head dim, K index
slots per query, P sinks, W window, F = P' + W' forced slots, M ranked candidates per row
(``m`` in code), c queries per chunk; flattened (b, h, t) rows are written ``rows``.

A row's index list has three regions, each padded with -1 (an empty slot):

    [ sinks (P' slots) | window (W' slots) | selected (K' slots) ]

with P' = min(sinks, S), W' = min(window, S), K' = min(topk, S).  Sinks and the
window are *forced* keys: always attended, never counted in ``topk``, never
forgotten.  The selected region holds the ``topk`` best-scoring remaining
visible keys, ranked by score (descending; ties go to the lower key index; a
NaN score ranks above every number so that NaN inputs reach the output).

Causal alignment: query t sits at absolute position pos = S - T + t and sees
keys j <= pos; without ``causal`` it sees all S keys.  The window of query t
is the keys pos - W + 1 .. pos (those it may see).

Forgetful masking (rate r): each selected key is dropped with probability r
and the freed slots are refilled, in rank order, by the keys ranked K'+1,
K'+2, ... -- what an ANN index with recall 1 - r returns.  The drop draws
(B, H, T, K') come from :func:`forget_draws` so every implementation (NumPy,
Numba, CUDA, the reference) makes the same choices for one seed.  With
``head_slice=(h0, h1, H_all)`` the draws are made for all H_all heads and heads
h0 .. h1-1 kept: a process holding those heads (head-parallel) drops what the
all-heads call drops for them.
"""
from __future__ import annotations

import numpy as np

from topkattn.backend import Array, get_array_module
from topkattn.checks import check_int, logsumexp_rows, make_rng
from topkattn.ops.dynamic_k import choose_k
from topkattn.threads import blas_single_thread, n_workers, pool

try:  # Numba CPU kernels are optional at run time: the NumPy path needs no compiler.
    from topkattn.ops import cpu_kernels as _cpu_kernels
except Exception:  # pragma: no cover - numba missing or broken
    _cpu_kernels = None

# Default budget for one chunk's (rows, S) score tile, in bytes.
TILE_BYTES = 16 * 2**20
# fused_ranked_rows ranks rows of at most this many keys from a BLAS score tile
# (cpu_kernels.ranked_topm_rows): faster than the fused scan there (train-toy's T = 64: 8.0 -> 4.1 ms
# per layer; T = 256: about even), and the tile is small.
SHORT_KEYS = 256


class RowBounds:
    """Per-query-row geometry shared by every implementation.

    Attributes (all int64 arrays of shape (T,)):
      end     -- one past the last visible key (pos + 1 if causal else S, clipped to [0, S])
      win_lo  -- first window key (inclusive); win_lo == win_hi when there is no window
      win_hi  -- one past the last window key
    and the ints ``sinks`` (P), ``n_sink`` (P'), ``n_win`` (W'), ``n_sel`` (K').
    Candidates of row t are the keys j with sinks <= j < end[t] and not win_lo[t] <= j < win_hi[t].
    """

    def __init__(self, S: int, T: int, *, topk: int, causal: bool, sinks: int, window: int) -> None:
        pos = np.arange(T, dtype=np.int64) + (S - T)  # (T,)
        self.S, self.T = S, T
        sinks, window = min(int(sinks), S), min(int(window), S)  # more than S means all S (no int64 overflow)
        self.sinks = sinks
        self.end = np.clip(pos + 1, 0, S) if causal else np.full(T, S, dtype=np.int64)
        if window > 0:  # the `window` most recent visible keys (causal=False: the last keys)
            self.win_lo = np.clip(self.end - window, sinks, S)
            self.win_hi = np.maximum(self.end, self.win_lo)
        else:
            self.win_lo = np.zeros(T, dtype=np.int64)
            self.win_hi = np.zeros(T, dtype=np.int64)
        self.n_sink = sinks
        self.n_win = window
        self.n_sel = min(int(topk), S)

    def n_candidates(self) -> np.ndarray:
        """(T,) int64: the selection candidates of each row (visible keys less sinks and window)."""
        return np.maximum(self.end - self.sinks, 0) - (self.win_hi - self.win_lo)

    @property
    def n_slots(self) -> int:
        return self.n_sink + self.n_win + self.n_sel

    def forced_indices(self) -> np.ndarray:
        """(T, P' + W') int64: sink and window key indices of each row, -1 where absent."""
        T = self.T
        sink = np.broadcast_to(np.arange(self.n_sink, dtype=np.int64), (T, self.n_sink)).copy()
        sink[sink >= self.end[:, None]] = -1
        # window slot w of row t holds key win_hi - 1 - w (most recent first)
        win = self.win_hi[:, None] - 1 - np.arange(self.n_win, dtype=np.int64)[None, :]
        win[win < self.win_lo[:, None]] = -1
        return np.concatenate([sink, win], axis=1)

    def candidate_mask(self, t0: int, t1: int, n_cols: int, col0: int = 0) -> np.ndarray:
        """(t1 - t0, n_cols) bool: True where key col0 + j is a selection candidate of row t."""
        j = np.arange(col0, col0 + n_cols, dtype=np.int64)[None, :]
        sl = slice(t0, t1)
        return ((j >= self.sinks) & (j < self.end[sl, None])
                & ~((j >= self.win_lo[sl, None]) & (j < self.win_hi[sl, None])))


def forget_draws(seed: int | np.random.Generator | None, shape: tuple[int, ...],
                 forget_rate: float, head_slice: tuple[int, int, int] | None = None) -> np.ndarray | None:
    """Bool drop mask of ``shape`` (B, H, T, K'): True = this ranked slot is forgotten.

    Drawn on the host with NumPy so every implementation sees the same draws for a seed.
    ``head_slice=(h0, h1, H_all)`` (h1 - h0 == H): draw (B, H_all, T, K') as the call on all
    H_all heads would, from the same seed and consuming as much of a Generator, and return
    heads h0 .. h1-1 of it.
    """
    if forget_rate <= 0.0:
        return None
    rng = make_rng(seed, allow_none=True)
    if head_slice is None:
        return rng.random(shape) < forget_rate
    h0, h1, H_all = check_head_slice(head_slice, shape[1])
    full = rng.random((shape[0], H_all, *shape[2:]))  # (B, H_all, T, K')
    return np.ascontiguousarray(full[:, h0:h1] < forget_rate)


def check_head_slice(head_slice: object, H: int) -> tuple[int, int, int]:
    """``head_slice`` as ints ``(h0, h1, H_all)`` with 0 <= h0, h1 - h0 == H (the query heads
    given) and h1 <= H_all; TypeError / ValueError naming ``head_slice`` otherwise."""
    if not (isinstance(head_slice, (tuple, list)) and len(head_slice) == 3):
        raise TypeError(f"head_slice must be a tuple (h0, h1, H_all) of 3 ints, "
                        f"got {type(head_slice).__name__} {head_slice!r}")
    h0, h1, H_all = (check_int(f"head_slice[{i}]", n) for i, n in enumerate(head_slice))
    if not (0 <= h0 and h1 - h0 == H and h1 <= H_all):
        raise ValueError(f"head_slice (h0, h1, H_all) must satisfy 0 <= h0, h1 - h0 == H = {H} (the query "
                         f"heads given) and h1 <= H_all, got {tuple(head_slice)!r}")
    return h0, h1, H_all


def apply_forgetting(ranked: Array, drop: Array, n_sel: int) -> Array:
    """Compose the forgetful selection from ranked candidates.

    ranked: (rows, M) int64 key indices in rank order (-1 = none), M >= n_sel.
    drop:   (rows, n_sel) bool, True where the ranked slot is forgotten.
    Returns (rows, n_sel): the kept top-n_sel keys followed by refills from ranks n_sel, n_sel+1, ...
    (as many as were dropped), -1 padded.
    """
    xp = get_array_module(ranked)
    n_rows, M = ranked.shape
    n_drop = drop.sum(axis=-1, keepdims=True)  # (rows, 1)
    extra = xp.arange(M - n_sel)[None, :] < n_drop  # (rows, M - n_sel)
    keep = xp.concatenate([~drop, extra], axis=1) & (ranked >= 0)  # (rows, M)
    order = xp.argsort(~keep, axis=-1, kind="stable")[:, :n_sel]  # kept slots first, rank order
    out = xp.take_along_axis(ranked, order, axis=-1)
    out[~xp.take_along_axis(keep, order, axis=-1)] = -1
    return out


def ranked_topm_xp(tile: Array, cand: Array, m: int) -> Array:
    """Top-``m`` columns of each row of ``tile`` among ``cand``, in rank order (NumPy/CuPy path).

    tile: (rows, cols) scores; cand: (rows, cols) bool candidates.  Returns (rows, m) int64,
    -1 where a row has fewer than m candidates.  Ties go to the lower column; NaN ranks above every number.
    Reference: :func:`topkattn.ops.reference.rank_row`.
    """
    xp = get_array_module(tile)
    n_rows, n_cols = tile.shape
    work = xp.where(xp.isnan(tile), xp.inf, tile)
    work = xp.where(cand, work, -xp.inf)
    if m >= n_cols:
        cols = _rank_order(xp, work, cand)
        pad = xp.full((n_rows, m - n_cols), -1, dtype=xp.int64)
        valid = xp.take_along_axis(cand, cols, axis=-1)
        cols = xp.where(valid, cols, -1).astype(xp.int64)
        return xp.concatenate([cols, pad], axis=1)
    th = xp.partition(work, n_cols - m, axis=-1)[:, n_cols - m:n_cols - m + 1]  # (rows, 1): m-th largest
    gt = work > th
    need = m - gt.sum(axis=-1, keepdims=True)
    # ties with the m-th score: candidates first (a candidate may score -inf like a non-candidate),
    # then the lower column
    eq_c = (work == th) & cand
    eq_n = (work == th) & ~cand
    rank_n = eq_c.sum(axis=-1, keepdims=True) + xp.cumsum(eq_n, axis=-1, dtype=xp.int32)
    take = gt | (eq_c & (xp.cumsum(eq_c, axis=-1, dtype=xp.int32) <= need)) | (eq_n & (rank_n <= need))
    cols = xp.nonzero(take)[1].reshape(n_rows, m)  # ascending column order
    valid = xp.take_along_axis(cand, cols, axis=-1)
    cols = xp.take_along_axis(cols, _rank_order(xp, xp.take_along_axis(work, cols, axis=-1), valid), axis=-1)
    valid = xp.take_along_axis(cand, cols, axis=-1)
    return xp.where(valid, cols, -1).astype(xp.int64)


def _rank_order(xp, work, cand):
    """(rows, n) column order: score descending, then candidates before non-candidates, then
    the lower column (two stable sorts)."""
    first = xp.argsort(~cand, axis=-1, kind="stable")  # candidates first, each group in column order
    by_score = xp.argsort(-xp.take_along_axis(work, first, axis=-1), axis=-1, kind="stable")
    return xp.take_along_axis(first, by_score, axis=-1)


def select_topk(q: Array, k: Array, *, topk: int, causal: bool = True, scale: float, sinks: int = 0, window: int = 0,
                forget_rate: float = 0.0, seed: int | np.random.Generator | None = None, chunk_size: int | None = None,
                impl: str = "auto", head_slice: tuple[int, int, int] | None = None) -> Array:
    """Indices (B, H, T, K) of the keys each query attends (forced + top-k), -1 padded.

    q (B, H, T, D), k (B, G, S, D); ``scale`` multiplies q.k (already divided by the
    temperature).  Scores are computed chunk by chunk: peak extra memory is one
    (B, H, chunk, S) tile plus the (B, H, T, K) result.  ``impl``: "auto" (Numba
    on CPU when available), "numba" or "numpy" (vectorised NumPy/CuPy).
    ``head_slice=(h0, h1, H_all)``: q holds heads h0 .. h1-1 of H_all; the forgetful draws
    are those of the all-heads call (:func:`forget_draws`).
    Inputs are validated by :func:`topkattn.topk_attention_forward`.
    """
    xp = get_array_module(q, k)
    B, H, T, _ = q.shape
    S = k.shape[2]
    if head_slice is not None:  # checked whatever forget_rate is
        head_slice = check_head_slice(head_slice, H)
    bounds = RowBounds(S, T, topk=topk, causal=causal, sinks=sinks, window=window)
    n_sel = bounds.n_sel
    drop = forget_draws(seed, (B, H, T, n_sel), forget_rate, head_slice)  # host (B, H, T, K') or None
    n_drop_max = 0 if drop is None else int(drop.sum(axis=-1).max(initial=0))
    m = n_sel + n_drop_max  # ranked candidates needed per row

    idx, n_forced = _forced_prefix(xp, bounds, B, H)
    if m and B * H * T and _choose_numba(impl, xp) and q.dtype in (np.float32, np.float64):
        ranked = fused_ranked_rows(q, k, bounds, m, scale).reshape(B * H * T, m)  # no score tiles
        if drop is not None:
            ranked = apply_forgetting(ranked, drop.reshape(B * H * T, n_sel), n_sel)
        idx[..., n_forced:] = ranked.reshape(B, H, T, n_sel)
        return idx
    for t0, t1, _tile, ranked in _ranked_chunks(q, k, bounds, m, causal, scale, chunk_size, impl):
        c = t1 - t0
        if drop is not None:
            d = xp.asarray(drop[:, :, t0:t1].reshape(B * H * c, n_sel))
            ranked = apply_forgetting(ranked, d, n_sel)
        idx[:, :, t0:t1, n_forced:] = ranked.reshape(B, H, c, n_sel)
    return idx


def fused_ranked_rows(q: Array, k: Array, bounds: RowBounds, m: int, scale: float) -> np.ndarray:
    """(B, H, T, m) int64: each query row's m best candidates, ranked, -1 padded (NumPy, Numba).

    q (B, H, T, D), k (B, G, S, D) of one dtype.  Scores and ranking in one pass per head
    (:func:`topkattn.ops.cpu_kernels.rows_topm_scan`): no (rows, S) score tile is made, so
    memory is O(T * (D + m)).  Row blocks are split into pieces of about equal work (a causal
    row sees more keys the later it sits) and run on the worker pool.  The rule of
    :func:`ranked_topm_xp`.  Rows of at most ``SHORT_KEYS`` keys are ranked from a score tile
    instead (one matrix product per chunk of queries, :func:`_ranked_chunks`): faster there, the
    same rule; the scores come from BLAS instead of the scan's multiply-adds in key order (equal
    here, in our checks; they could differ in the last bit, which only a near-tie would show).
    """
    B, H, T, D = q.shape
    if bounds.S <= SHORT_KEYS:  # short rows: a score tile per chunk of queries, then one ranking pass
        ranked = np.full((B, H, T, m), -1, dtype=np.int64)
        for t0, t1, _tile, r in _ranked_chunks(q, k, bounds, m, True, scale, None, "numba"):
            ranked[:, :, t0:t1] = r.reshape(B, H, t1 - t0, m)
        return ranked
    G = k.shape[1]
    rep = H // G
    lanes = 64 // q.dtype.itemsize  # query rows per vector
    Tp = -(-T // lanes) * lanes
    qt = np.zeros((B, H, D, Tp), dtype=q.dtype)  # (B, H, D, Tp) scaled queries, transposed
    qt[..., :T] = (q * q.dtype.type(scale)).swapaxes(-1, -2)
    ranked = np.full((B, H, T, m), -1, dtype=np.int64)
    nw = n_workers()
    pieces = 1 if nw == 1 else max(1, -(-4 * nw // (B * H)))  # row pieces per head
    if pieces == 1:  # whole heads: one kernel call per worker (a call per head cost more than its work)
        kc = np.ascontiguousarray(k)  # (B, G, S, D)
        n_jobs = 1 if nw == 1 or B * H * T * bounds.S * D < FUSED_TASK_WORK else nw
        cuts = [B * H * j // n_jobs for j in range(n_jobs + 1)]

        def heads(i0, i1):
            _cpu_kernels.heads_topm_scan(kc, qt, i0, i1, bounds.end, bounds.win_lo, bounds.win_hi,
                                         bounds.sinks, m, ranked)

        if n_jobs == 1:
            heads(0, B * H)
        else:
            for job in [pool().submit(heads, i0, i1) for i0, i1 in zip(cuts[:-1], cuts[1:])]:
                job.result()
        return ranked
    keys = [[np.ascontiguousarray(k[b, g]) for g in range(G)] for b in range(B)]  # (S, D) views
    # work of each block of `lanes` rows: the keys its last row may see
    block_work = np.maximum(bounds.end[np.minimum(np.arange(lanes, Tp + 1, lanes), T) - 1] - bounds.sinks, 1)
    cum = np.cumsum(block_work)
    cuts = np.searchsorted(cum, cum[-1] * np.arange(1, pieces) / pieces)  # equal-work block boundaries
    edges = sorted({0, len(block_work), *map(int, cuts)})
    tasks = [(b, h, lanes * e0, min(T, lanes * e1)) for b in range(B) for h in range(H)
             for e0, e1 in zip(edges[:-1], edges[1:]) if e1 > e0]

    def run(task):
        b, h, r0, r1 = task
        _cpu_kernels.rows_topm_scan(keys[b][h // rep], qt[b, h], r0, r1, bounds.end, bounds.win_lo,
                                    bounds.win_hi, bounds.sinks, m, ranked[b, h])

    if nw == 1 or len(tasks) == 1:
        for task in tasks:
            run(task)
    else:
        for job in [pool().submit(run, task) for task in tasks]:
            job.result()
    return ranked


def select_dynamic_topk(q: Array, k: Array, *, tail_bound: float, max_topk: int | None = None, causal: bool = True,
                        scale: float, sinks: int = 0, window: int = 0, chunk_size: int | None = None,
                        impl: str = "auto") -> tuple[Array, dict[str, Array]]:
    """Dynamic k: per query the smallest k whose left-out softmax mass is provably <= tail_bound.

    With the selected keys (forced + the k best candidates) and s_(k) the k-th best
    candidate score, every unselected candidate scores at most s_(k), so

        mass outside the selection <= n_rest * exp(s_(k) - logsumexp(selected scores))

    with n_rest the candidates not selected.  k grows from 1 until that bound is at most
    ``tail_bound`` (``tail_bound = 0`` takes every candidate), capped at ``max_topk``
    (default: S); a row that hits the cap uncertified is reported in ``certified``.

    Returns (idx (B, H, T, P' + W' + K), info) where K is the largest k chosen (<= max_topk:
    the slots no row uses are dropped) and info holds, each (B, H, T): ``k`` the chosen k,
    ``certified`` bool, ``bound`` the certified bound on the outside mass.
    """
    xp = get_array_module(q, k)
    B, H, T, _ = q.shape
    S = k.shape[2]
    max_topk = S if max_topk is None else max_topk
    bounds = RowBounds(S, T, topk=max_topk, causal=causal, sinks=sinks, window=window)
    m = bounds.n_sel
    idx, n_forced = _forced_prefix(xp, bounds, B, H)
    k_chosen = xp.zeros((B, H, T), dtype=xp.int64)
    certified = xp.ones((B, H, T), dtype=bool)
    bound_out = xp.zeros((B, H, T), dtype=xp.float64)
    forced_all = xp.asarray(bounds.forced_indices())  # (T, F)
    n_cand_all = bounds.n_candidates()  # (T,)
    for t0, t1, tile, ranked in _ranked_chunks(q, k, bounds, m, causal, scale, chunk_size, impl):
        c = t1 - t0
        n_rows = B * H * c
        f = xp.broadcast_to(forced_all[None, t0:t1], (B * H, c, forced_all.shape[1])).reshape(n_rows, -1)
        fvals = xp.where(f >= 0, xp.take_along_axis(tile, xp.maximum(f, 0), axis=-1), -xp.inf)
        n_cand = xp.asarray(np.tile(n_cand_all[t0:t1], B * H))  # (rows,)
        n_ret = xp.minimum(n_cand, m)  # exact ranking: every candidate up to m is returned
        lse_f = logsumexp_rows(fvals).astype(xp.float64)
        if _choose_numba(impl, xp):  # row by row, stopping at each row's k (choose_k's numbers)
            kc, found = np.empty(n_rows, np.int64), np.empty(n_rows, np.bool_)
            row_bound = np.empty(n_rows, np.float64)
            _cpu_kernels.choose_k_ranked(tile, ranked, lse_f, n_cand.astype(np.int64), n_ret.astype(np.int64),
                                         float(tail_bound), kc, found, row_bound)
        else:
            vals = xp.take_along_axis(tile, xp.maximum(ranked, 0), axis=-1).astype(xp.float64)
            vals = xp.where(ranked >= 0, vals, -xp.inf)  # (rows, m) ranked scores
            kc, found, row_bound, _, _ = choose_k(vals, lse_f, n_cand, n_ret, tail_bound)
        sel = xp.where(xp.arange(m)[None, :] < kc[:, None], ranked, -1)
        idx[:, :, t0:t1, n_forced:] = sel.reshape(B, H, c, m)
        k_chosen[:, :, t0:t1] = kc.reshape(B, H, c)
        certified[:, :, t0:t1] = (found | (kc >= n_cand)).reshape(B, H, c)
        bound_out[:, :, t0:t1] = row_bound.reshape(B, H, c)
    width = n_forced + (int(k_chosen.max()) if k_chosen.size else 0)  # later slots are -1 in every row
    if width < idx.shape[-1]:
        idx = xp.ascontiguousarray(idx[..., :width])
    return idx, dict(k=k_chosen, certified=certified, bound=bound_out)



# -- one decode query per row (position S - 1 of a cache) ---------------------------------
def grouped_keys(keys: Array, H: int) -> Array:
    """A (B, G, S, D) view of decode keys (B, S, D) (shared by all heads) or (B, G, S, D)."""
    kg = keys[:, None] if keys.ndim == 3 else keys
    if H % kg.shape[1]:
        raise ValueError(f"query heads H={H} must be a multiple of the cache's KV heads G={kg.shape[1]}")
    return kg


def decode_scores(query: Array, keys: Array, scale: float) -> Array:
    """(B, H, S) scores scale * q_h . k_j of one query per row against every cached key.

    query (B, H, D); keys (B, S, D) or (B, G, S, D), possibly a strided view of a cache
    buffer.  NumPy: one 2-D product per (b, g): numpy.matmul on a stacked *view* leaves BLAS
    (10x slower in our runs), a 2-D product on each (S, D) slice keeps it.  CuPy: one
    batched matmul.
    """
    xp = get_array_module(query, keys)
    B, H, D = query.shape
    kg = grouped_keys(keys, H)
    G, S = kg.shape[1], kg.shape[2]
    qg = query.reshape(B, G, H // G, D) * query.dtype.type(scale)
    if xp is not np:  # cuBLAS batches the stacked product: one launch, not B * G
        return xp.matmul(qg, kg.swapaxes(-1, -2)).reshape(B, H, S)
    s = np.empty((B, G, H // G, S), dtype=qg.dtype)
    for b in range(B):
        for g in range(G):
            s[b, g] = qg[b, g] @ kg[b, g].T
    return s.reshape(B, H, S)


def rank_decode_candidates(query: Array, keys: Array, bounds: RowBounds, m: int, scale: float,
                           impl: str = "auto") -> Array:
    """(B*H, m) int64: the exact ranking of each decode row's candidates (not forced keys), -1 padded.

    ``bounds``: the :class:`RowBounds` of the decode row (S keys, T = 1).  ``impl``: "auto"
    (the fused Numba scan of :func:`fused_decode_ranking` for NumPy float arrays when Numba
    is importable, else the xp path), "numba" or "numpy" (scores for every key with one
    matrix product per KV head, then :func:`ranked_topm_xp`; CuPy takes this path).
    """
    xp = get_array_module(query, keys)
    if _choose_fused(impl, xp, query, keys):
        kg = grouped_keys(keys, query.shape[1])
        c0 = min(bounds.sinks, bounds.S)  # the decode row's candidates are one range: sinks .. window
        return fused_decode_ranking(query, kg, c0, c0 + max(int(bounds.n_candidates()[0]), 0), m, scale)
    B, H, _ = query.shape
    s = decode_scores(query, keys, scale).reshape(B * H, bounds.S)
    cand = xp.broadcast_to(xp.asarray(bounds.candidate_mask(0, 1, bounds.S)), s.shape)
    return ranked_topm_xp(s, cand, m)


# multiply-adds per worker task (about a millisecond here); below 2 tasks' worth the calling
# thread does it all.  Each key-range chunk re-fills its heads' top-m (0.3 ms for 16 heads,
# m = 64), so ranges are cut no finer than this, into at most 4 per worker thread.
FUSED_TASK_WORK = 1 << 25


def fused_decode_ranking(query: Array, kg: Array, c0: int, c1: int, m: int, scale: float) -> np.ndarray:
    """(B*H, m) int64: each decode row's m best keys among c0 .. c1-1, ranked, -1 padded.

    query (B, H, D) NumPy; kg (B, G, S, D) NumPy (e.g. a view of a cache buffer; each (b, g)
    slice with contiguous rows is read in place).  One pass over the cache: every KV head's
    rows are scored against all the query heads that read it while they are in cache, each
    head keeping a sorted top-m buffer (:func:`topkattn.ops.cpu_kernels.decode_topm_scan`);
    the key range is split into chunks scanned on the worker pool and the chunks' lists are
    merged (:func:`topkattn.ops.cpu_kernels.merge_topm`).  No (H, S) score matrix is made.
    Scores are ``(scale * q) . k`` in the inputs' dtype; the rule is that of
    :func:`ranked_topm_xp` (score descending, ties to the lower key, NaN above every number).
    """
    B, H, D = query.shape
    G = kg.shape[1]
    rep = H // G
    ranked = np.full((B, G, rep, m), -1, dtype=np.int64)
    n_cand = c1 - c0
    if m == 0 or n_cand <= 0 or B * H == 0:
        return ranked.reshape(B * H, m)
    dt = np.result_type(query.dtype, kg.dtype)
    qs = (query * query.dtype.type(scale)).astype(dt, copy=False).reshape(B, G, rep, D)
    pairs = [(b, g) for b in range(B) for g in range(G)]
    work = len(pairs) * n_cand * max(D, 1) * max(rep, 4)  # multiply-adds; few heads: memory-bound, count 4
    nw = n_workers()
    n_tasks = 1 if nw == 1 or work < 2 * FUSED_TASK_WORK else min(4 * nw, max(nw, work // FUSED_TASK_WORK))
    per_pair = max(1, -(-n_tasks // len(pairs)))  # chunks of each (b, g) key range
    step = -(-n_cand // per_pair)
    tasks = [(i, j0, min(c1, j0 + step)) for i in range(len(pairs)) for j0 in range(c0, c1, step)]
    vals = np.empty((len(tasks), rep, m), dtype=dt)
    ids = np.empty((len(tasks), rep, m), dtype=np.int64)
    lanes = 64 // dt.itemsize  # heads per vector
    Hp = -(-rep // lanes) * lanes if 2 * rep >= lanes else 0  # vector panels from half a vector of heads
    keys_of, q_of, qt_of = {}, {}, {}
    for i, (b, g) in enumerate(pairs):
        keys_of[i] = np.ascontiguousarray(kg[b, g], dtype=dt)  # (S, D): a view when rows are contiguous
        q_of[i] = np.ascontiguousarray(qs[b, g])  # (rep, D)
        qt_of[i] = np.zeros((D if Hp else 0, Hp), dtype=dt)  # (D, Hp) heads padded with zeros
        qt_of[i][:, :rep] = q_of[i].T if Hp else 0

    def run(lo, hi):  # tasks lo .. hi-1 on one thread
        for t in range(lo, hi):
            i, j0, j1 = tasks[t]
            _cpu_kernels.decode_topm_scan(keys_of[i], q_of[i], qt_of[i], j0, j1, m, vals[t], ids[t])

    n_jobs = min(len(tasks), max(n_tasks, 1))
    bounds = [len(tasks) * r // n_jobs for r in range(n_jobs + 1)]
    if n_jobs <= 1:
        run(0, len(tasks))
    else:
        for job in [pool().submit(run, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]:
            job.result()
    if per_pair == 1 and len(tasks) == len(pairs):
        ranked[...] = ids.reshape(B, G, rep, m)
    else:
        out_vals = np.empty((rep, m), dtype=dt)
        for i, (b, g) in enumerate(pairs):
            mine = [t for t, task in enumerate(tasks) if task[0] == i]
            _cpu_kernels.merge_topm(vals[mine[0]:mine[-1] + 1], ids[mine[0]:mine[-1] + 1], out_vals, ranked[b, g])
    return ranked.reshape(B * H, m)


def select_decode(query: Array, keys: Array, *, topk: int, sinks: int = 0, window: int = 0, scale: float = 1.0,
                  tail_bound: float | None = None, impl: str = "auto") -> tuple[Array, Array, Array | None]:
    """Exact selection for one decode query per row: ``(idx (B, H, K), k (B, H), certified)``.

    query (B, H, D) at position S - 1; keys (B, S, D) shared by all heads, or (B, G, S, D)
    with H % G == 0.  The rule of :func:`select_topk` (forced sinks and window first, then
    the ``topk`` best remaining keys, ties to the lower index), -1 padded.  With
    ``tail_bound`` it is :func:`select_dynamic_topk` with ``topk`` as the cap.  ``k`` is the
    number of keys each row selected besides forced ones; ``certified`` is None for a
    fixed k, else (B, H) bool.  ``impl`` (fixed k): see :func:`rank_decode_candidates`.
    """
    xp = get_array_module(query, keys)
    B, H, _ = query.shape
    kg = grouped_keys(keys, H)
    S = kg.shape[2]
    if tail_bound is not None:
        idx, info = select_dynamic_topk(query[:, :, None], kg, tail_bound=tail_bound, max_topk=topk,
                                        causal=True, scale=scale, sinks=sinks, window=window, impl="numpy")
        return idx[:, :, 0], info["k"][:, :, 0], info["certified"][:, :, 0]
    bounds = RowBounds(S, 1, topk=topk, causal=True, sinks=sinks, window=window)
    forced = xp.asarray(bounds.forced_indices())  # (1, P' + W')
    parts = [xp.broadcast_to(forced[None], (B, H, forced.shape[1]))]
    if bounds.n_sel:
        ranked = rank_decode_candidates(query, kg, bounds, bounds.n_sel, scale, impl=impl)  # (B*H, K')
        parts.append(ranked.reshape(B, H, bounds.n_sel))
    idx = xp.concatenate(parts, axis=-1).astype(xp.int64)
    k = xp.full((B, H), min(bounds.n_sel, int(bounds.n_candidates()[0])), dtype=xp.int64)
    return idx, k, None

def _forced_prefix(xp, bounds, B, H):
    """The (B, H, T, n_slots) index tensor with its forced prefix filled and the rest -1."""
    idx = xp.full((B, H, bounds.T, bounds.n_slots), -1, dtype=xp.int64)
    forced = xp.asarray(bounds.forced_indices())  # (T, P' + W')
    idx[..., :forced.shape[1]] = forced
    return idx, forced.shape[1]


def _ranked_chunks(q, k, bounds, m, causal, scale, chunk_size, impl):
    """Yield (t0, t1, tile (B*H*c, n_cols), ranked (B*H*c, m)) per query chunk; rows are (b, h, t)."""
    xp = get_array_module(q, k)
    B, H, T, D = q.shape
    G, S = k.shape[1], k.shape[2]
    rep = H // G
    use_numba = _choose_numba(impl, xp)
    if m == 0 or B * H == 0:  # nothing to rank (no candidates kept, or no rows)
        return
    if chunk_size is None:
        chunk_size = max(1, TILE_BYTES // max(1, B * H * S * q.dtype.itemsize))
    qs = (q * q.dtype.type(scale)).reshape(B, G, rep, T, D)
    kt = k.swapaxes(-1, -2)  # (B, G, D, S)
    spans = []
    for t0 in range(0, T, chunk_size):
        t1 = min(T, t0 + chunk_size)
        n_cols = int(bounds.end[t1 - 1]) if causal else S  # keys any row of the chunk may see
        if n_cols:
            spans.append((t0, t1, n_cols))

    def tile_of(t0, t1, n_cols):
        qc = qs[:, :, :, t0:t1].reshape(B, G, rep * (t1 - t0), D)
        return xp.matmul(qc, kt[..., :n_cols]).reshape(B * H * (t1 - t0), n_cols)  # (B*H*c, n_cols)

    def numba_chunk(t0, t1, n_cols):  # a whole chunk on one worker: its GEMM, then its top-m
        tile = tile_of(t0, t1, n_cols)
        rows_t = np.tile(np.arange(t0, t1), B * H)
        ranked = np.full((B * H * (t1 - t0), m), -1, dtype=np.int64)
        _cpu_kernels.ranked_topm_rows(tile, ranked, bounds.end[rows_t], bounds.win_lo[rows_t],
                                      bounds.win_hi[rows_t], bounds.sinks, m)
        return t0, t1, tile, ranked

    if not use_numba:
        for t0, t1, n_cols in spans:
            cand = xp.asarray(bounds.candidate_mask(t0, t1, n_cols))  # (c, n_cols)
            cand = xp.broadcast_to(cand[None], (B * H, t1 - t0, n_cols)).reshape(-1, n_cols)
            tile = tile_of(t0, t1, n_cols)
            yield t0, t1, tile, ranked_topm_xp(tile, cand, m)
        return
    nw = n_workers() if len(spans) > 1 else 1
    if nw == 1:  # one chunk, or already on a worker: inline, BLAS keeps its threads
        for span in spans:
            yield numba_chunk(*span)
        return
    with blas_single_thread():  # one BLAS thread per worker: no spinning threads fighting
        for i in range(0, len(spans), nw):  # nw chunks in flight: memory stays O(nw * chunk * S)
            jobs = [pool().submit(numba_chunk, *span) for span in spans[i:i + nw]]
            for job in jobs:
                yield job.result()


def _choose_fused(impl, xp, query, keys):
    """Use the fused Numba decode scan? "auto": NumPy float32/float64 inputs with Numba importable."""
    if impl not in ("auto", "numba", "numpy"):
        raise ValueError(f"impl must be 'auto', 'numba' or 'numpy', got {impl!r}")
    floats = query.dtype in (np.float32, np.float64) and keys.dtype in (np.float32, np.float64)
    if impl == "numba":
        if xp is not np or not floats or _cpu_kernels is None:
            raise ValueError("impl='numba' needs NumPy float32/float64 arrays and numba")
        return True
    return impl == "auto" and xp is np and floats and _cpu_kernels is not None


def _choose_numba(impl, xp):
    if impl not in ("auto", "numba", "numpy", "cuda"):
        raise ValueError(f"impl must be 'auto', 'numba', 'numpy' or 'cuda', got {impl!r}")
    if impl == "cuda":  # selection stages the CUDA kernels do not fuse run on the xp path
        return False
    if xp is not np:
        if impl == "numba":
            raise ValueError("impl='numba' runs on the CPU; got CuPy arrays")
        return False
    if impl == "numpy":
        return False
    if _cpu_kernels is None:
        if impl == "numba":
            raise RuntimeError("impl='numba' requested but numba is not importable")
        return False
    return True


__all__ = ["RowBounds", "select_topk", "select_dynamic_topk", "select_decode", "decode_scores",
           "rank_decode_candidates", "grouped_keys", "forget_draws", "check_head_slice", "apply_forgetting",
           "ranked_topm_xp"]
