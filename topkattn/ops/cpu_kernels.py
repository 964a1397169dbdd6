"""Numba CPU kernels for the hot loops of top-k attention.

Each kernel names the reference it must match; tests compare them.
Compiled lazily on first call and cached on disk (:func:`topkattn.threads.njit`: the first
real compile prints one line on stderr).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.cpython.unsafe.numbers import trailing_zeros
from numba.extending import intrinsic

from topkattn.backend import Array
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
def choose_k_ranked(tile, ranked, lse_forced, n_cand, n_ret, tail_bound, k_out, found_out, nominal_out):
    """:func:`topkattn.ops.dynamic_k.choose_k` row by row, reading the ranked scores from the tile.

    tile (rows, n) scores; ranked (rows, m) column indices in descending score order (-1 =
    none); lse_forced (rows,) float64; n_cand, n_ret (rows,) int64.  Writes k_out (int64),
    found_out (bool) and nominal_out (float64), each (rows,).  The same float64 arithmetic in
    the same order as choose_k (a running sum of exp(score - top), then top + log(forced +
    sum)), stopping at the first k that meets the bound instead of evaluating every k."""
    rows, m = ranked.shape
    for r in range(rows):
        lf = lse_forced[r]
        v0 = -np.inf if ranked[r, 0] < 0 else np.float64(tile[r, ranked[r, 0]])
        top = lf if lf > v0 else v0
        if np.isnan(lf) or np.isnan(v0) or not np.isfinite(top):
            top = 0.0
        base = np.exp(lf - top)
        k_max = min(m, n_ret[r])
        found = False
        k_row = k_max
        nominal = 0.0
        csum = 0.0
        for j in range(k_max):
            v = -np.inf if ranked[r, j] < 0 else np.float64(tile[r, ranked[r, j]])
            csum += np.exp(v - top)
            lse = top + np.log(base + csum)
            n_rest = n_cand[r] - (j + 1)
            nom = n_rest * np.exp(v - lse) if n_rest > 0 else 0.0
            nominal = nom
            if n_rest <= 0 or (tail_bound > 0 and nom <= tail_bound):
                found = True
                k_row = j + 1
                break
        k_out[r] = k_row
        found_out[r] = found
        nominal_out[r] = nominal if k_row > 0 else 0.0


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


# -- fused exact decode selection: one pass over a KV head's cache, every head it serves ----
# fast-math without "no NaN / no inf": NaN scores rank above every number and -inf is a score
_FAST = {"nsz", "arcp", "contract", "afn", "reassoc"}
DECODE_BLOCK = 64  # keys scored per tile: the (64, heads) tile and the key rows stay in L1
PANEL_KEYS = 8  # keys per vector panel (8 accumulators of one vector each)
PREFETCH_ROWS = 16  # the panel hints the key rows this far ahead into cache (a hint: never read)


def decode_topm_scan(keys: Array, qs: Array, qt: Array, j0: int, j1: int, m: int, vals: Array, ids: Array) -> None:
    """Each head's ``m`` best keys among keys j0 .. j1-1 for one decode query, in one pass.

    keys: (S, D) C-contiguous, one KV head's cache rows; qs: (rep, D) the scaled queries of the
    rep heads that read it; qt: (D, Hp) their transpose, zero-padded to Hp heads, a multiple
    of the vector width W (64 bytes: 16 float32 or 8 float64 heads), or an empty (0, 0) array
    for few heads.  vals, ids: (rep, m) receive each head's best scores and key indices in
    rank order (score descending, ties to the lower key, NaN above every number), padded
    with -inf / -1 when fewer than m keys are scanned.

    Keys are scored ``DECODE_BLOCK`` at a time into a small tile while they are in cache:
    with ``qt`` by :func:`decode_topm_panels` (:func:`_panel` holds one vector of heads per
    key: every head against a key at once, no horizontal sums, and flags per key the heads
    whose score beats their current m-th best), else by :func:`decode_topm_quads` or
    :func:`decode_topm_dots` (dot products along D).  Each head keeps its m best keys (a heap
    while scanning, :func:`_offer`; ranked at the end); only scores above a head's m-th best
    are offered, so almost every score costs one comparison.  Three kernels: a process
    compiles only the one its shapes use.
    Serial and ``nogil``: callers run key ranges on worker threads and merge them with
    :func:`merge_topm`.  Reference: :func:`topkattn.ops.reference.rank_row` over ``qs @ keys.T``.
    """
    if qt.shape[1]:
        decode_topm_panels(keys, qt, qs.shape[0], j0, j1, m, vals, ids)
    elif qs.shape[0] >= 4:
        decode_topm_quads(keys, qs, j0, j1, m, vals, ids)
    else:
        decode_topm_dots(keys, qs, j0, j1, m, vals, ids)


@njit(fastmath=_FAST)
def decode_topm_panels(keys, qt, rep, j0, j1, m, vals, ids):
    """:func:`decode_topm_scan` with vector panels: qt (D, Hp), Hp a multiple of the vector width."""
    Hp = qt.shape[1]
    lanes = 64 // keys.itemsize
    vals[:, :] = -np.inf
    ids[:, :] = -1
    n = np.zeros(rep, dtype=np.int64)
    tile = np.empty((DECODE_BLOCK, Hp), dtype=vals.dtype)  # (keys, heads)
    thresh = np.full(Hp, np.inf, dtype=vals.dtype)  # padded heads: never flagged
    thresh[:rep] = np.nan  # NaN: "take every key" until the head holds m
    n_vec = Hp // lanes
    hits = np.empty((DECODE_BLOCK, n_vec), dtype=np.int64)  # (keys, head vectors) bit per head
    for b0 in range(j0, j1, DECODE_BLOCK):
        nb = min(DECODE_BLOCK, j1 - b0)
        for t in range(0, nb, PANEL_KEYS):
            for c0 in range(0, Hp, lanes):
                _panel(keys, qt, tile, thresh, hits, b0 + t, min(PANEL_KEYS, nb - t), t, c0, c0, c0 // lanes)
        for t in range(nb):
            for v in range(n_vec):
                bits = hits[t, v]
                while bits:
                    h = v * lanes + trailing_zeros(bits)
                    bits &= bits - 1
                    if h < rep:
                        _offer(vals, ids, n, thresh, h, tile[t, h], b0 + t, m)
    _sort_heaps(vals, ids, n)


@njit(fastmath=_FAST)
def decode_topm_dots(keys, qs, j0, j1, m, vals, ids):
    """:func:`decode_topm_scan` with dot products along D, for fewer than 4 heads
    (:func:`_score_keys_by_4`)."""
    rep = qs.shape[0]
    vals[:, :] = -np.inf
    ids[:, :] = -1
    n = np.zeros(rep, dtype=np.int64)
    tile = np.empty((DECODE_BLOCK, rep), dtype=vals.dtype)  # (keys, heads)
    thresh = np.full(rep, np.nan, dtype=vals.dtype)  # NaN: "take every key" until the head holds m
    for b0 in range(j0, j1, DECODE_BLOCK):
        nb = min(DECODE_BLOCK, j1 - b0)
        _score_keys_by_4(keys, qs, b0, nb, tile)
        _offer_tile(tile, nb, b0, vals, ids, n, thresh, m)
    _sort_heaps(vals, ids, n)


@njit(fastmath=_FAST)
def decode_topm_quads(keys, qs, j0, j1, m, vals, ids):
    """:func:`decode_topm_scan` with dot products along D, 4 heads x 2 keys at a time, for 4 or
    more heads but under half a vector (:func:`_score_heads_by_4`)."""
    rep = qs.shape[0]
    vals[:, :] = -np.inf
    ids[:, :] = -1
    n = np.zeros(rep, dtype=np.int64)
    tile = np.empty((DECODE_BLOCK, rep), dtype=vals.dtype)  # (keys, heads)
    thresh = np.full(rep, np.nan, dtype=vals.dtype)
    for b0 in range(j0, j1, DECODE_BLOCK):
        nb = min(DECODE_BLOCK, j1 - b0)
        _score_heads_by_4(keys, qs, b0, nb, tile)
        _offer_tile(tile, nb, b0, vals, ids, n, thresh, m)
    _sort_heaps(vals, ids, n)


@njit(fastmath=_FAST, inline="always")
def _offer_tile(tile, nb, b0, vals, ids, n, thresh, m):
    """Offer every score of tile[:nb] (keys b0 ..) above its head's threshold (or NaN) to the buffers."""
    for h in range(tile.shape[1]):
        for t in range(nb):
            s = tile[t, h]
            if not s <= thresh[h]:  # above, or NaN on either side
                _offer(vals, ids, n, thresh, h, s, b0 + t, m)


@njit(inline="always")
def _worse(s1, j1, s2, j2):
    """(s1, j1) ranks below (s2, j2): a lower score, or the same score and a higher key."""
    return s1 < s2 or (s1 == s2 and j1 > j2)


@njit
def _offer(vals, ids, n, thresh, h, s, j, m):
    """Offer key j with score s to head h's bounded heap: vals[h], ids[h] hold the n[h] <= m
    best keys so far as a heap with the worst at the root (keys come in increasing order).

    NaN is taken as +inf; a full heap takes only a score above its root's (a tie goes to the
    lower key, offered first); thresh[h] is the root's score once the heap is full.
    O(log m) per offer (a sorted buffer moves m/2 entries); :func:`_sort_heaps` ranks them."""
    if s != s:
        s = np.inf
    c = n[h]
    if c < m:  # not full: sift the new key up from the end
        p = c
        while p > 0:
            par = (p - 1) // 2
            if not _worse(s, j, vals[h, par], ids[h, par]):
                break
            vals[h, p] = vals[h, par]
            ids[h, p] = ids[h, par]
            p = par
        vals[h, p] = s
        ids[h, p] = j
        n[h] = c + 1
    else:
        if not s > vals[h, 0]:
            return
        _sift_down(vals, ids, h, 0, m, s, j)
    if n[h] == m:
        thresh[h] = vals[h, 0]


@njit(inline="always")
def _sift_down(vals, ids, h, p, size, s, j):
    """Place (s, j) at heap slot p of row h (heap of ``size``), moving worse children up."""
    while True:
        c = 2 * p + 1
        if c >= size:
            break
        if c + 1 < size and _worse(vals[h, c + 1], ids[h, c + 1], vals[h, c], ids[h, c]):
            c += 1
        if not _worse(vals[h, c], ids[h, c], s, j):
            break
        vals[h, p] = vals[h, c]
        ids[h, p] = ids[h, c]
        p = c
    vals[h, p] = s
    ids[h, p] = j


@njit
def _sort_heaps(vals, ids, n):
    """Heapsort each row's heap in place into rank order (best first; slots past n[h] untouched)."""
    for h in range(vals.shape[0]):
        for end in range(n[h] - 1, 0, -1):
            s, j = vals[h, end], ids[h, end]
            vals[h, end] = vals[h, 0]  # the worst left goes last
            ids[h, end] = ids[h, 0]
            _sift_down(vals, ids, h, 0, end, s, j)


@njit
def _insert(vals, ids, n, thresh, h, s, j, m):
    """Offer key j with score s to row h's sorted buffer (vals[h], ids[h], n[h] held, at most m).

    NaN is taken as +inf; a full buffer takes only a score above its m-th (ties go to the
    lower key, offered first); thresh[h] becomes the m-th score once the buffer is full."""
    if s != s:
        s = np.inf
    if n[h] == m:
        if not s > vals[h, m - 1]:
            return
        p = m - 2
    else:
        p = n[h] - 1
        n[h] += 1
    while p >= 0 and vals[h, p] < s:
        vals[h, p + 1] = vals[h, p]
        ids[h, p + 1] = ids[h, p]
        p -= 1
    vals[h, p + 1] = s
    ids[h, p + 1] = j
    if n[h] == m:
        thresh[h] = vals[h, m - 1]


@intrinsic
def _panel(typingctx, keys, qt, tile, thresh, hits, j0, nk, t0, c0, tc0, hc):
    """Score PANEL_KEYS keys against one vector of W queries (heads or query rows) and flag the beaters.

    tile[t0 + k, tc0:tc0 + W] = sum_d qt[d, c0:c0 + W] * keys[j0 + k, d] for k < nk (nk <= PANEL_KEYS);
    hits[t0 + k, hc] = bit mask of the lanes w whose score is above thresh[tc0 + w] or
    unordered with it (a NaN score, or a NaN threshold meaning "take every key").
    W = one 64-byte vector (16 float32, 8 float64).  The PANEL_KEYS keys share each loaded
    vector of queries; each key's scores are one vector accumulator updated by one fused
    multiply-add per d, in order d = 0 .. D-1 (the same arithmetic for every key, so equal
    keys score equal).  Keys past nk re-read key j0 + nk - 1 and are not stored.  Each
    cache line of the 8 key rows PREFETCH_ROWS rows ahead is hinted into cache while these
    are scored (the hardware prefetcher alone left the streaming panel 25% slower; a
    prefetch past the end of the cache is a no-op).  The
    caller guarantees the shapes: keys (S, D), qt (D, Hp), tile (n, Ht), thresh (>= Ht,),
    hits (n, > hc) int64, c0 + W <= Hp, tc0 + W <= Ht, all C-contiguous.
    """
    sig = types.void(keys, qt, tile, thresh, hits, j0, nk, t0, c0, tc0, hc)

    def codegen(context, builder, signature, args):
        arrays = [context.make_array(t)(context, builder, a) for t, a in zip(signature.args[:5], args[:5])]
        kk, qq, tt, th, hh = arrays
        j0v, nkv, t0v, c0v, tc0v, hcv = args[5:]
        kty = signature.args[0]
        i32, i64 = ir.IntType(32), ir.IntType(64)
        fp = context.get_value_type(kty.dtype)
        width = 16 if kty.dtype == types.float32 else 8
        align = fp_align(kty)
        vec = ir.VectorType(fp, width)
        n_dim = cgutils.unpack_tuple(builder, kk.shape, 2)[1]  # D
        n_head = cgutils.unpack_tuple(builder, qq.shape, 2)[1]  # Hp
        n_tile = cgutils.unpack_tuple(builder, tt.shape, 2)[1]  # Ht
        n_hits = cgutils.unpack_tuple(builder, hh.shape, 2)[1]
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, vec, vec]),
                                             "llvm.fma.v16f32" if width == 16 else "llvm.fma.v8f64")
        undef = ir.Constant(vec, ir.Undefined)
        splat = ir.Constant(ir.VectorType(i32, width), [0] * width)
        last = builder.sub(nkv, ir.Constant(i64, 1))
        rows = []
        for k in range(PANEL_KEYS):
            kc = ir.Constant(i64, k)
            j = builder.add(j0v, builder.select(builder.icmp_signed("<", kc, nkv), kc, last))
            rows.append(builder.gep(kk.data, [builder.mul(j, n_dim)]))
        accs = [cgutils.alloca_once_value(builder, ir.Constant(vec, None)) for _ in range(PANEL_KEYS)]
        byte_ptr = ir.IntType(8).as_pointer()
        prefetch = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
            ir.VoidType(), [byte_ptr, i32, i32, i32]), "llvm.prefetch.p0i8")
        line_mask = ir.Constant(i64, width - 1)  # one 64-byte line holds `width` elements
        prefetch_off = builder.mul(ir.Constant(i64, PREFETCH_ROWS), n_dim)
        zero64, zero32, one32 = ir.Constant(i64, 0), ir.Constant(i32, 0), ir.Constant(i32, 1)
        with cgutils.for_range(builder, n_dim) as loop:
            d = loop.index
            qptr = builder.gep(qq.data, [builder.add(builder.mul(d, n_head), c0v)])
            qv = builder.load(builder.bitcast(qptr, vec.as_pointer()), align=align)
            with builder.if_then(builder.icmp_signed("==", builder.and_(d, line_mask), zero64)):
                for k in range(PANEL_KEYS):  # one hint per cache line of each key row, PREFETCH_ROWS ahead
                    ahead = builder.gep(rows[k], [builder.add(d, prefetch_off)])
                    builder.call(prefetch, [builder.bitcast(ahead, byte_ptr), zero32, ir.Constant(i32, 3), one32])
            for k in range(PANEL_KEYS):
                kv = builder.insert_element(undef, builder.load(builder.gep(rows[k], [d])), ir.Constant(i32, 0))
                kv = builder.shuffle_vector(kv, undef, splat)
                builder.store(builder.call(fma, [qv, kv, builder.load(accs[k])]), accs[k])
        tv = builder.load(builder.bitcast(builder.gep(th.data, [tc0v]), vec.as_pointer()), align=align)
        for k in range(PANEL_KEYS):
            with builder.if_then(builder.icmp_signed("<", ir.Constant(i64, k), nkv)):
                row = builder.add(t0v, ir.Constant(i64, k))
                a = builder.load(accs[k])
                tptr = builder.gep(tt.data, [builder.add(builder.mul(row, n_tile), tc0v)])
                builder.store(a, builder.bitcast(tptr, vec.as_pointer()), align=align)
                beat = builder.fcmp_unordered(">", a, tv)  # <W x i1>: above, or NaN on either side
                bits = builder.zext(builder.bitcast(beat, ir.IntType(width)), i64)
                builder.store(bits, builder.gep(hh.data, [builder.add(builder.mul(row, n_hits), hcv)]))
        return context.get_dummy_value()

    return sig, codegen


def fp_align(array_type: types.Array) -> int:
    """Byte alignment the vector loads and stores of :func:`_panel` assume: one element."""
    return 4 if array_type.dtype == types.float32 else 8


@njit(fastmath=_FAST, inline="always")
def _score_heads_by_4(keys, qs, b0, nb, tile):
    """tile[t, h] = qs[h] . keys[b0 + t] for t < nb, heads in blocks of 4 x 2 keys (rep >= 4).

    Each key row is loaded once per 4 heads, 8 dot products share 6 loads per step.  Every
    score comes out of the same arithmetic whatever its position (the odd key out paired with
    itself, the last head block shifted back to end at rep): equal keys get equal scores.
    """
    rep, D = qs.shape
    zero = tile.dtype.type(0)
    for t in range(0, nb, 2):
        ja = b0 + t
        jb = b0 + min(t + 1, nb - 1)
        for hb in range(0, rep, 4):
            h = min(hb, rep - 4)
            s00 = s01 = s10 = s11 = s20 = s21 = s30 = s31 = zero
            for d in range(D):
                ka = keys[ja, d]
                kb = keys[jb, d]
                q0 = qs[h, d]
                q1 = qs[h + 1, d]
                q2 = qs[h + 2, d]
                q3 = qs[h + 3, d]
                s00 += q0 * ka
                s01 += q0 * kb
                s10 += q1 * ka
                s11 += q1 * kb
                s20 += q2 * ka
                s21 += q2 * kb
                s30 += q3 * ka
                s31 += q3 * kb
            tile[t, h] = s00
            tile[t, h + 1] = s10
            tile[t, h + 2] = s20
            tile[t, h + 3] = s30
            if t + 1 < nb:
                tile[t + 1, h] = s01
                tile[t + 1, h + 1] = s11
                tile[t + 1, h + 2] = s21
                tile[t + 1, h + 3] = s31


@njit(fastmath=_FAST, inline="always")
def _score_keys_by_4(keys, qs, b0, nb, tile):
    """tile[t, h] = qs[h] . keys[b0 + t] for t < nb, one head x 4 keys at a time (rep < 4: MHA, small GQA).

    The last group of keys is padded by repeating its last key: equal keys get equal scores.
    """
    rep, D = qs.shape
    zero = tile.dtype.type(0)
    for t in range(0, nb, 4):
        j1 = b0 + min(t + 1, nb - 1)
        j2 = b0 + min(t + 2, nb - 1)
        j3 = b0 + min(t + 3, nb - 1)
        for h in range(rep):
            s0 = s1 = s2 = s3 = zero
            for d in range(D):
                q = qs[h, d]
                s0 += q * keys[b0 + t, d]
                s1 += q * keys[j1, d]
                s2 += q * keys[j2, d]
                s3 += q * keys[j3, d]
            tile[t, h] = s0
            if t + 1 < nb:
                tile[t + 1, h] = s1
            if t + 2 < nb:
                tile[t + 2, h] = s2
            if t + 3 < nb:
                tile[t + 3, h] = s3


@njit(fastmath=_FAST)
def rows_topm_scan(keys, qt, r0, r1, end, win_lo, win_hi, sinks, m, out):
    """Each query row's ``m`` best candidate keys, scored and ranked in one pass (training selection).

    keys: (S, D) C-contiguous, the rows of one KV head; qt: (D, Tp) the scaled queries of one
    head transposed, Tp a multiple of the vector width W (64 bytes: 16 float32, 8 float64),
    zero-padded; rows r0 .. r1-1 (r0 a multiple of W) are done; end, win_lo, win_hi: (T,)
    the :class:`topkattn.ops.selection.RowBounds` arrays; out: (T, m) int64, pre-filled with
    -1, receives row r's candidates in rank order (score descending, ties to the lower key,
    NaN above every number).  Candidates of row r: sinks <= j < end[r], not win_lo[r] <= j <
    win_hi[r].  The rule and the result of :func:`ranked_topm_rows` on the score tile, without
    the tile: W consecutive rows ride in the lanes of one vector, keys come 8 at a time
    (:func:`_panel`), which flags per key the rows whose score beats their m-th best; only
    flagged (row, key) pairs reach the sorted buffers.  Keys every row of the W sees (below
    the first window and the smallest end) need no candidate test; blocks near the diagonal
    test the flagged pairs.
    Reference: :func:`topkattn.ops.reference.rank_row` (and ``selection.ranked_topm_xp``).
    """
    lanes = 64 // keys.itemsize
    tile = np.empty((DECODE_BLOCK, lanes), dtype=qt.dtype)  # (keys, rows)
    hits = np.empty((DECODE_BLOCK, 1), dtype=np.int64)
    vals = np.empty((lanes, max(m, 1)), dtype=qt.dtype)
    n = np.zeros(lanes, dtype=np.int64)
    thresh = np.empty(lanes, dtype=qt.dtype)
    for q0 in range(r0, r1, lanes):
        nl = min(lanes, r1 - q0)
        n[:] = 0
        thresh[:] = np.inf  # padding rows: never flagged
        thresh[:nl] = np.nan  # NaN: "take every key" until the row holds m
        hi = 0
        clean = keys.shape[0]  # keys below it are candidates of every row of the block
        for ln in range(nl):
            e = end[q0 + ln]
            hi = max(hi, e)
            c = min(e, win_lo[q0 + ln]) if win_hi[q0 + ln] > win_lo[q0 + ln] else e
            clean = min(clean, c)
        rows = out[q0:q0 + nl]
        for b0 in range(sinks, hi, DECODE_BLOCK):
            nb = min(DECODE_BLOCK, hi - b0)
            for t in range(0, nb, PANEL_KEYS):
                _panel(keys, qt, tile, thresh, hits, b0 + t, min(PANEL_KEYS, nb - t), t, q0, 0, 0)
            masked = b0 + nb > clean
            for t in range(nb):
                bits = hits[t, 0]
                j = b0 + t
                while bits:
                    ln = trailing_zeros(bits)
                    bits &= bits - 1
                    if ln >= nl:
                        continue
                    r = q0 + ln
                    if masked and (j >= end[r] or (win_lo[r] <= j < win_hi[r])):
                        continue
                    _insert(vals, rows, n, thresh, ln, tile[t, ln], j, m)


@njit(fastmath=_FAST)
def heads_topm_scan(keys, qt, i0, i1, end, win_lo, win_hi, sinks, m, out):
    """:func:`rows_topm_scan` over every row of heads i0 .. i1-1 (flat ``b * H + h``) in one call.

    keys: (B, G, S, D) C-contiguous; qt: (B, H, D, Tp) as there; out: (B, H, T, m) int64,
    pre-filled with -1.  Head h reads KV head h // (H // G).  The same arithmetic and result as
    one :func:`rows_topm_scan` call per head, without a Python call (and its dispatch) per head:
    at train-toy's default size (128 heads of 64 rows) those calls were most of the selection's time.
    """
    H = qt.shape[1]
    rep = H // keys.shape[1]
    T = out.shape[2]
    for i in range(i0, i1):
        b = i // H
        h = i - b * H
        rows_topm_scan(keys[b, h // rep], qt[b, h], 0, T, end, win_lo, win_hi, sinks, m, out[b, h])


@njit
def merge_topm(part_vals, part_ids, vals, ids):
    """Merge ranked lists: vals, ids (rep, m) <- the m best of part_vals, part_ids (L, rep, m).

    Each part holds the ranked top-m of a disjoint key range (from :func:`decode_topm_scan`,
    -1 = empty); the result ranks by score descending, ties to the lower key (NaN was taken
    as +inf by the scan).  Reference: :func:`topkattn.ops.reference.rank_row`.
    """
    L, rep, m = part_vals.shape
    vals[:, :] = -np.inf
    ids[:, :] = -1
    for h in range(rep):
        n = 0
        for part in range(L):
            for i in range(m):
                j = part_ids[part, h, i]
                if j < 0:
                    break
                s = part_vals[part, h, i]
                if n == m:
                    if s < vals[h, m - 1] or (s == vals[h, m - 1] and j > ids[h, m - 1]):
                        if s < vals[h, m - 1]:
                            break  # the rest of this part ranks lower still
                        continue
                    p = m - 2
                else:
                    p = n - 1
                    n += 1
                while p >= 0 and (vals[h, p] < s or (vals[h, p] == s and ids[h, p] > j)):
                    vals[h, p + 1] = vals[h, p]
                    ids[h, p + 1] = ids[h, p]
                    p -= 1
                vals[h, p + 1] = s
                ids[h, p + 1] = j


# -- sparse attention over selected keys ----------------------------------------------------
_ATTEND_FAST = {"nsz", "contract", "reassoc"}  # no "afn" (exp stays exact), no "nnan"/"ninf"


@njit(fastmath=_ATTEND_FAST)
def sparse_attend_rows(q, k, v, idx, scale, t0, t1, out, lse):
    """out[t], lse[t] for the rows t0 .. t1-1 of one (batch, head): softmax over the selected keys.

    q: (T, D) the head's queries; k: (S, D), v: (S, Dv) its KV head's keys and values;
    idx: (T, K) int64 selected key indices (-1 = empty slot); out: (T, Dv), lse: (T,).
    s_i = (scale q_t) . k_idx[i]; p = softmax(s) over the filled slots; out_t = sum_i p_i v_idx[i].
    Non-finite rule of :func:`topkattn.ops.reference.attend_row`: a NaN or +inf score gives a
    NaN row (out and lse); -inf scores weigh 0; a row with nothing to attend (no slot, or
    every score -inf) gives zeros and lse -inf; every attended value reaches the row (0 * NaN
    is NaN).  Reference: :func:`topkattn.ops.reference.attend_row` (and the NumPy path of
    :func:`topkattn.ops.sparse_attention.sparse_attention_forward`).
    """
    K = idx.shape[1]
    D = q.shape[1]
    Dv = v.shape[1]
    sc = q.dtype.type(scale)
    s = np.empty(K, dtype=q.dtype)
    zero = q.dtype.type(0)
    for t in range(t0, t1):
        mx = -np.inf
        bad = False
        for i in range(K):
            j = idx[t, i]
            if j < 0:
                s[i] = -np.inf
                continue
            acc = zero
            for d in range(D):
                acc += (q[t, d] * sc) * k[j, d]
            s[i] = acc
            if acc != acc or acc == np.inf:
                bad = True
            elif acc > mx:
                mx = acc
        if bad:
            out[t, :] = np.nan
            lse[t] = np.nan
            continue
        m0 = mx if mx > -np.inf else zero
        denom = zero
        for i in range(K):
            s[i] = np.exp(s[i] - m0)  # -inf scores and empty slots: 0
            denom += s[i]
        if not denom > 0:
            out[t, :] = 0
            lse[t] = -np.inf
            continue
        out[t, :] = 0
        for i in range(K):
            j = idx[t, i]
            if j < 0:
                continue
            w = s[i] / denom
            for d in range(Dv):
                out[t, d] += w * v[j, d]
        lse[t] = m0 + np.log(denom)


@njit(fastmath=_ATTEND_FAST)
def sparse_attend_heads(q, k, v, idx, scale, i0, i1, out, lse):
    """:func:`sparse_attend_rows` over every row of heads i0 .. i1-1 (flat ``b * H + h``) in one call.

    q (B, H, T, D), k (B, G, S, D), v (B, G, S, Dv), idx (B, H, T, K), out (B, H, T, Dv),
    lse (B, H, T), all C-contiguous; head h reads KV head h // (H // G).  The same arithmetic
    as one call per head, without a Python call (and its dispatch) per head.
    """
    H = q.shape[1]
    rep = H // k.shape[1]
    T = q.shape[2]
    for i in range(i0, i1):
        b = i // H
        h = i - b * H
        sparse_attend_rows(q[b, h], k[b, h // rep], v[b, h // rep], idx[b, h], scale, 0, T, out[b, h], lse[b, h])


@njit(fastmath=_ATTEND_FAST)
def sparse_backward_groups(q, k, v, idx, lse, dout, delta, scale, g0, g1, dq, dk, dv):
    """Backward of softmax over the selected keys for KV heads g0 .. g1-1 (flat ``b * G + g``).

    q (B, H, T, D), k (B, G, S, D), v (B, G, S, Dv), idx (B, H, T, K) (-1 = empty), lse (B, H, T),
    dout (B, H, T, Dv), delta (B, H, T) = dout . out; writes dq (B, H, T, D) and adds into dk, dv
    (zero-filled by the caller), all C-contiguous.  Per row t and slot i with key j:
    p = exp(scale q_t . k_j - lse_t), dv_j += p dout_t, ds = p (dout_t . v_j - delta_t) scale,
    dq_t += ds k_j, dk_j += ds q_t.  A KV head's rows are summed by one call (its rep query
    heads in order), so the sums are deterministic whatever the threads.  For finite inputs and
    rows whose forward is finite (callers check): the rule for the others is
    :func:`topkattn.ops.sparse_attention.sparse_attention_backward`'s.
    Reference: :func:`topkattn.ops.reference.masked_attention_grad_reference`.
    """
    G = k.shape[1]
    H, T, D = q.shape[1], q.shape[2], q.shape[3]
    rep = H // G
    K = idx.shape[3]
    Dv = v.shape[3]
    sc = q.dtype.type(scale)
    zero = q.dtype.type(0)
    for pair in range(g0, g1):
        b = pair // G
        g = pair - b * G
        kk = k[b, g]
        vv = v[b, g]
        dkk = dk[b, g]
        dvv = dv[b, g]
        for h in range(g * rep, (g + 1) * rep):
            for t in range(T):
                L = lse[b, h, t]
                dl = delta[b, h, t]
                for i in range(K):
                    j = idx[b, h, t, i]
                    if j < 0:
                        continue
                    s = zero
                    for d in range(D):
                        s += (q[b, h, t, d] * sc) * kk[j, d]
                    p = np.exp(s - L)
                    dp = zero
                    for d in range(Dv):
                        dp += dout[b, h, t, d] * vv[j, d]
                        dvv[j, d] += p * dout[b, h, t, d]
                    ds = p * (dp - dl) * sc
                    for d in range(D):
                        dq[b, h, t, d] += ds * kk[j, d]
                        dkk[j, d] += ds * q[b, h, t, d]
