"""Numba CPU kernels for LoRANN search: candidate selection, exact re-ranking, fused small-batch scoring.

Shape letters (the ANN index's own): Q queries, Wc clusters searched per query, Dx data dim,
Dg reduced dim, Nc clusters, Rk rank, Kn results, Mc candidates kept for re-ranking (``m``),
Nt threads (one candidate buffer each).
Scores are "larger is better": candidates are scored ``q.x`` (ip) or ``2 q.x - |x|^2`` (l2, the
same order as minus the distance); the results written are minus the distances (``-|q - x|^2``
for l2, see :func:`_finish`).
Ties go to the lower point id.  Reference: ``LorannIndex._search_xp`` (dense,
padded array-library path); tests compare the two.
"""
import functools
import threading

import numba as nb
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from topkattn.threads import njit

# fast-math without "no NaN / no inf": -inf is the "no threshold yet" score and must compare
_FAST = {"nsz", "arcp", "contract", "afn", "reassoc"}

_LAUNCH_LOCK = threading.Lock()
_LAYER_THREADSAFE = []  # [bool] once the first parallel launch has chosen Numba's threading layer


def _threadsafe_launch(kernel):
    """Wrap a ``parallel=True`` kernel so concurrent callers cannot abort the process.

    Numba's ``workqueue`` threading layer (used when neither TBB nor OpenMP is available)
    aborts on a second concurrent parallel launch; under it (and until the first launch has
    told which layer runs) launches take one process-wide lock.  The thread-safe layers
    (``tbb``, ``omp``) run concurrent launches in parallel.  ``.kernel`` is the dispatcher.
    """

    @functools.wraps(kernel.py_func)
    def launch(*args):
        if _LAYER_THREADSAFE and _LAYER_THREADSAFE[0]:
            return kernel(*args)
        with _LAUNCH_LOCK:
            out = kernel(*args)
            if not _LAYER_THREADSAFE:
                _LAYER_THREADSAFE.append(nb.threading_layer() != "workqueue")
            return out

    launch.kernel = kernel
    return launch


@njit(inline="always")
def _worse(s1, i1, s2, i2):
    return s1 < s2 or (s1 == s2 and i1 > i2)


@njit(inline="always")
def _sift_down(hs, hi, n, p):
    while True:
        c = 2 * p + 1
        if c >= n:
            break
        if c + 1 < n and _worse(hs[c + 1], hi[c + 1], hs[c], hi[c]):
            c += 1
        if _worse(hs[c], hi[c], hs[p], hi[p]):
            hs[c], hs[p] = hs[p], hs[c]
            hi[c], hi[p] = hi[p], hi[c]
            p = c
        else:
            break


@njit(inline="always")
def _push(hs, hi, n, m, s, i):
    """Offer (s, i) to a bounded min-heap of capacity m holding n items; return the new n."""
    if n < m:
        p = n
        hs[p] = s
        hi[p] = i
        n += 1
        while p > 0:
            q = (p - 1) // 2
            if _worse(hs[p], hi[p], hs[q], hi[q]):
                hs[p], hs[q] = hs[q], hs[p]
                hi[p], hi[q] = hi[q], hi[p]
                p = q
            else:
                break
        return n
    if _worse(hs[0], hi[0], s, i):
        hs[0] = s
        hi[0] = i
        _sift_down(hs, hi, n, 0)
    return n


@njit(inline="always")
def _drain_sorted(hs, hi, n, out_s, out_i):
    """Empty the heap into out_* best first."""
    while n > 0:
        n -= 1
        out_s[n] = hs[0]
        out_i[n] = hi[0]
        hs[0] = hs[n]
        hi[0] = hi[n]
        _sift_down(hs, hi, n, 0)


@intrinsic
def _prefetch(typingctx, arr, index):
    """Hint the CPU to fetch arr.ravel()[index] into cache (LLVM prefetch; no effect on results)."""
    sig = types.void(arr, index)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        byte = ir.IntType(8).as_pointer()
        addr = builder.bitcast(builder.gep(ary.data, [args[1]]), byte)
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte, i32, i32, i32]),
            "llvm.prefetch.p0i8")
        builder.call(fn, [addr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


_PREFETCH_AHEAD = 8  # candidate rows fetched ahead of the re-rank dot (random rows of data)


@njit(inline="always")
def _prefetch_row(flat, d, pid):
    for o in range(0, d, 16):  # one hint per 64-byte line of float32
        _prefetch(flat, pid * d + o)


_PAIR_LANES = 16  # int32 lanes of one pair dot (a 512-bit vector: 16 points x 2 int8 codes)
CODE_PAD = 128  # bytes past the end of a pair-layout array that a last block may read (never used)


def _pair_dot_codegen(blocks, parts=2):
    """Code of :func:`_pair_dot16` over ``blocks`` adjacent blocks of 16 lanes (each step's
    factors broadcast once for all of them, and as many independent accumulators); with
    ``parts=1`` the first factor only (x_hi into out[0]: half the multiply-adds)."""

    def codegen(context, builder, signature, args):
        out_a = context.make_array(signature.args[0])(context, builder, args[0])
        codes_a = context.make_array(signature.args[2])(context, builder, args[2])
        xs_a = [context.make_array(signature.args[j])(context, builder, args[j]) for j in (5, 6)[:parts]]
        i8, i16, i32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
        v16 = ir.VectorType(i32, _PAIR_LANES)
        v32 = ir.VectorType(i32, 2 * _PAIR_LANES)
        accs = [[cgutils.alloca_once(builder, v16) for _ in range(blocks)] for _ in xs_a]
        for acc in sum(accs, []):
            builder.store(ir.Constant(v16, None), acc)
        even = ir.Constant(v16, [2 * t for t in range(_PAIR_LANES)])
        odd = ir.Constant(v16, [2 * t + 1 for t in range(_PAIR_LANES)])
        splat = ir.Constant(v16, [0] * _PAIR_LANES)
        byte = ir.VectorType(i8, 2 * _PAIR_LANES).as_pointer()
        codes = builder.bitcast(codes_a.data, i8.as_pointer())
        with cgutils.for_range(builder, args[7]) as loop:
            i = loop.index
            at = builder.add(args[3], builder.mul(i, args[4]))
            factors = []
            for x_a in xs_a:
                xv = builder.load(builder.gep(x_a.data, [i]))
                xs = builder.insert_element(ir.Constant(v16, None), xv, ir.Constant(i32, 0))
                xs = builder.shuffle_vector(xs, xs, splat)
                factors.append(builder.sext(builder.bitcast(xs, ir.VectorType(i16, 2 * _PAIR_LANES)), v32))
            for b in range(blocks):
                ptr = builder.gep(codes, [builder.add(at, ir.Constant(at.type, 2 * _PAIR_LANES * b))])
                a = builder.sext(builder.load(builder.bitcast(ptr, byte), align=1), v32)
                for xw, acc in zip(factors, accs):
                    prod = builder.mul(a, xw)
                    pair = builder.add(builder.shuffle_vector(prod, prod, even),
                                       builder.shuffle_vector(prod, prod, odd))
                    builder.store(builder.add(builder.load(acc[b]), pair), acc[b])
        row = cgutils.unpack_tuple(builder, out_a.strides, 2)[0]  # bytes from out[0] to out[1]
        base = builder.bitcast(out_a.data, i8.as_pointer())
        for h, acc in enumerate(accs):
            for b in range(blocks):
                lane = builder.add(args[1], ir.Constant(args[1].type, _PAIR_LANES * b))
                at = builder.add(builder.mul(row, ir.Constant(row.type, h)),
                                 builder.mul(lane, ir.Constant(lane.type, 4)))
                builder.store(builder.load(acc[b]), builder.bitcast(builder.gep(base, [at]), v16.as_pointer()),
                              align=4)
        return context.get_dummy_value()

    return codegen


@intrinsic
def _pair_dot16(typingctx, out, out_off, codes, code_off, stride, x_hi, x_lo, npairs):
    """Two integer dot products of 16 lanes: for h in (hi, lo), out[h, out_off:out_off + 16]
    (int32) = sum over i < npairs of the lane dots of the 32 int8 codes at byte
    code_off + i * stride of ``codes`` (lane t: codes 2t, 2t + 1) with x_h[i], an int32
    holding two int16 (low half: the even code's factor).  ``out`` is (2, >= out_off + 16).

    Exact integer arithmetic: a sign extension to int16 and multiply-adds of adjacent pairs,
    which LLVM turns into ``vpmovsxbw`` + ``vpdpwssd`` (AVX-512 VNNI) or ``vpmaddwd`` +
    ``vpaddd`` (AVX2/AVX-512BW); other targets get the generic vector code.  The codes are
    loaded once for both factors (the high and low int16 parts of one float vector, see
    :func:`_quantize_pairs`).  Reads 32 bytes per step from any C-contiguous array (by its
    data pointer), so a block may read past the points it uses (callers pad the array by
    :data:`CODE_PAD`).  Callers keep sum |code| * |x| below 2^31 (:func:`_pair_levels`).
    """
    return types.void(out, out_off, codes, code_off, stride, x_hi, x_lo, npairs), _pair_dot_codegen(1)


@intrinsic
def _pair_dot32(typingctx, out, out_off, codes, code_off, stride, x_hi, x_lo, npairs):
    """:func:`_pair_dot16` over 32 lanes (two adjacent blocks: 64 bytes of codes per step)."""
    return types.void(out, out_off, codes, code_off, stride, x_hi, x_lo, npairs), _pair_dot_codegen(2)


@intrinsic
def _pair_dot64(typingctx, out, out_off, codes, code_off, stride, x_hi, x_lo, npairs):
    """:func:`_pair_dot16` over 64 lanes (four adjacent blocks: 128 bytes of codes per step)."""
    return types.void(out, out_off, codes, code_off, stride, x_hi, x_lo, npairs), _pair_dot_codegen(4)


def _pair_dot_hi(blocks):
    """An intrinsic like :func:`_pair_dot16` over 16 * blocks lanes with the first factor only
    (out[0] = the pair dots with x_hi; x_lo is not read)."""

    @intrinsic
    def dot(typingctx, out, out_off, codes, code_off, stride, x_hi, x_lo, npairs):
        return types.void(out, out_off, codes, code_off, stride, x_hi, x_lo, npairs), _pair_dot_codegen(blocks, 1)

    return dot


_pair_dot16_hi = _pair_dot_hi(1)
_pair_dot32_hi = _pair_dot_hi(2)
_pair_dot64_hi = _pair_dot_hi(4)


def _fma_panel_codegen(rows, blocks):
    """Code of :func:`_fma_panel`: ``rows`` queries times ``blocks`` adjacent blocks of 16
    float32 lanes, all rows * blocks accumulators held in registers for the whole loop (each
    load of the matrix serves every row)."""

    def codegen(context, builder, signature, args):
        out_a, mat_a, x_a = (context.make_array(signature.args[j])(context, builder, args[j]) for j in (0, 3, 5))
        f32, i32, i8 = ir.FloatType(), ir.IntType(32), ir.IntType(8)
        v16 = ir.VectorType(f32, _PAIR_LANES)
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16, [v16, v16, v16]),
                                             "llvm.fma.v16f32")
        accs = [[cgutils.alloca_once(builder, v16) for _ in range(blocks)] for _ in range(rows)]
        for acc in sum(accs, []):
            builder.store(ir.Constant(v16, None), acc)
        splat = ir.Constant(ir.VectorType(i32, _PAIR_LANES), [0] * _PAIR_LANES)
        undef = ir.Constant(v16, None)
        four = ir.Constant(args[2].type, 4)
        m_row = cgutils.unpack_tuple(builder, mat_a.strides, 2)[0]  # bytes between rows
        x_row = cgutils.unpack_tuple(builder, x_a.strides, 2)[0]
        o_row = cgutils.unpack_tuple(builder, out_a.strides, 2)[0]
        m_base, x_base, o_base = (builder.bitcast(a.data, i8.as_pointer()) for a in (mat_a, x_a, out_a))
        x_at = [builder.mul(builder.add(args[1], ir.Constant(args[1].type, r)), x_row) for r in range(rows)]
        with cgutils.for_range(builder, args[6]) as loop:
            u = loop.index
            at = builder.add(builder.mul(u, m_row), builder.mul(args[4], four))
            cols = [builder.load(builder.bitcast(builder.gep(m_base, [builder.add(at, ir.Constant(at.type, 64 * b))]),
                                                 v16.as_pointer()), align=4) for b in range(blocks)]
            for r in range(rows):
                ptr = builder.bitcast(builder.gep(x_base, [builder.add(x_at[r], builder.mul(u, four))]),
                                      f32.as_pointer())
                xs = builder.shuffle_vector(builder.insert_element(undef, builder.load(ptr), ir.Constant(i32, 0)),
                                            undef, splat)
                for b in range(blocks):
                    acc = accs[r][b]
                    builder.store(builder.call(fma, [xs, cols[b], builder.load(acc)]), acc)
        for r in range(rows):
            row = builder.mul(builder.add(args[1], ir.Constant(args[1].type, r)), o_row)
            for b in range(blocks):
                at = builder.add(row, builder.mul(builder.add(args[2], ir.Constant(args[2].type, 16 * b)), four))
                builder.store(builder.load(accs[r][b]), builder.bitcast(builder.gep(o_base, [at]), v16.as_pointer()),
                              align=4)
        return context.get_dummy_value()

    return codegen


@intrinsic
def _fma32(typingctx, a, b, c):
    """a * b + c rounded once (llvm.fma.f32): the scalar tail of :func:`_fma_panel`'s sums."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f32, [f32] * 3), "llvm.fma.f32")
        return builder.call(fn, list(args))

    return sig, codegen


def _fma_panel(rows, blocks):
    """An intrinsic ``f(out, row0, out_col, mat, col, x, n)``: for r < rows,
    out[row0 + r, out_col:out_col + 16 * blocks] = sum over u < n of
    x[row0 + r, u] * mat[u, col:col + 16 * blocks], in float32 with one fused multiply-add per
    u in increasing u (every row and column rounds alike, whatever the panel).  out, mat and x
    are 2-D float32 arrays with contiguous rows."""

    @intrinsic
    def panel(typingctx, out, row0, out_col, mat, col, x, n):
        return types.void(out, row0, out_col, mat, col, x, n), _fma_panel_codegen(rows, blocks)

    return panel


_fma_1x16 = _fma_panel(1, 1)
_fma_1x64 = _fma_panel(1, 4)
_fma_4x64 = _fma_panel(4, 4)  # 16 accumulators: each 64-column load serves four queries


@njit(inline="always")
def _pair_levels(npairs):
    """The int16 level of a factor whose pair dots with npairs pairs of int8 codes stay below
    2^31 (32767 up to 258 pairs)."""
    return min(32767, 2147483647 // (254 * max(npairs, 1)))


@njit(inline="always", fastmath=_FAST)
def _quantize_pairs(x, n, levels, hi, lo):
    """x[:n] (float32) as two int16 parts packed two per int32 into hi and lo[: (n + 1) // 2]
    (an odd tail's partner 0): x ~ hi * s_hi + lo * s_lo with s_hi = max|x| / levels and s_lo
    = max|x - hi s_hi| / levels, so the error is about 2^-30 of max|x| (a float32's own
    rounding: scores of many points cancel their large terms, and one int16 part would not
    do).  Returns (s_hi, s_lo), zero for an all-zero part."""
    amax = np.float32(0.0)
    for v in range(n):
        amax = max(amax, abs(x[v]))
    s_hi = amax / np.float32(levels)
    inv = np.float32(1.0) / s_hi if s_hi > 0 else np.float32(0.0)
    rmax = np.float32(0.0)
    for v in range(n):
        rmax = max(rmax, abs(x[v] - np.rint(x[v] * inv) * s_hi))
    s_lo = rmax / np.float32(levels)
    inv_lo = np.float32(1.0) / s_lo if s_lo > 0 else np.float32(0.0)
    for i in range(n // 2):
        a, b = x[2 * i], x[2 * i + 1]
        ca, cb = np.rint(a * inv), np.rint(b * inv)
        hi[i] = (np.int32(ca) & np.int32(0xFFFF)) | (np.int32(cb) << np.int32(16))
        la, lb = np.rint((a - ca * s_hi) * inv_lo), np.rint((b - cb * s_hi) * inv_lo)
        lo[i] = (np.int32(la) & np.int32(0xFFFF)) | (np.int32(lb) << np.int32(16))
    if n % 2:
        a = x[n - 1]
        ca = np.rint(a * inv)
        hi[n // 2] = np.int32(ca) & np.int32(0xFFFF)
        lo[n // 2] = np.int32(np.rint((a - ca * s_hi) * inv_lo)) & np.int32(0xFFFF)
    return s_hi, s_lo


@njit(inline="always", fastmath=_FAST)
def _scale_row(acc_hi, acc_lo, s_hi, s_lo, scale, out, hi_only):
    """out = (acc_hi * s_hi + acc_lo * s_lo) * scale (the float values of two pair-dot parts;
    contiguous views, so the loop vectorises); acc_hi * s_hi * scale when ``hi_only`` (acc_lo
    not read)."""
    if hi_only:
        for t in range(out.shape[0]):
            out[t] = np.float32(acc_hi[t]) * s_hi * scale[t]
        return
    for t in range(out.shape[0]):
        out[t] = (np.float32(acc_hi[t]) * s_hi + np.float32(acc_lo[t]) * s_lo) * scale[t]


@njit(inline="always")
def _finish(qi, q, data, l2, cand_s, cand_i, nc, k, rerank, out_i, out_s):
    """Write the k best of the nc candidates (exact re-rank if ``rerank``: cand_s[:nc] is
    overwritten with the exact scores) into row qi, padded with id -1 / score -inf.

    The scores written are minus the distances: ``q.x`` for ip, ``-|q - x|^2`` for l2 (the
    candidates' ``2 q.x - |x|^2`` minus ``|q|^2``).  Exact l2 scores are computed as the sum
    of squared differences, not from the norms: for points far from the origin the expansion
    would lose the small distances to float32 cancellation."""
    for j in range(out_i.shape[1]):  # (loops: a slice assignment's generic code compiles for seconds)
        out_i[qi, j] = -1
        out_s[qi, j] = -np.inf
    if not rerank:
        qn = np.float32(0.0)
        if l2:
            for t in range(q.shape[0]):
                qn += q[t] * q[t]
        for j in range(min(k, nc)):
            out_i[qi, j] = cand_i[j]
            out_s[qi, j] = cand_s[j] - qn
        return
    d = data.shape[1]
    flat = data.reshape(-1)
    for j in range(min(_PREFETCH_AHEAD, nc)):
        _prefetch_row(flat, d, cand_i[j])
    for j in range(nc):  # the exact scores replace the approximate ones in place
        if j + _PREFETCH_AHEAD < nc:
            _prefetch_row(flat, d, cand_i[j + _PREFETCH_AHEAD])
        pid = cand_i[j]
        x = data[pid]  # a row view: the loops vectorise (2-D indexing would not)
        acc = np.float32(0.0)
        if l2:
            for t in range(d):
                diff = q[t] - x[t]
                acc += diff * diff
            cand_s[j] = -acc
        else:
            for t in range(d):
                acc += q[t] * x[t]
            cand_s[j] = acc
    n = nc
    if n > k:  # the k best by a bound and one filter pass (a heap's sifts cost ~2x the dots)
        n = _compact(cand_s, cand_i, n, k)[0]
    n = _best_m_sorted(cand_s, cand_i, n, k)
    for j in range(n):
        out_i[qi, j] = cand_i[j]
        out_s[qi, j] = cand_s[j]


@njit(cache=True, nogil=True)
def _best_m_sorted(cs, ci, n, m):
    """Reorder cs/ci[:n] so the first min(n, m) are the best, best first (score desc, ties to
    the lower id); returns min(n, m).  Insertion sort: callers cut n to about m first."""
    for a in range(1, n):
        s, i = cs[a], ci[a]
        b = a - 1
        while b >= 0 and _worse(cs[b], ci[b], s, i):
            cs[b + 1] = cs[b]
            ci[b + 1] = ci[b]
            b -= 1
        cs[b + 1] = s
        ci[b + 1] = i
    return min(n, m)


@njit(cache=True, nogil=True)
def _cut_to_m(cs, ci, n, m):
    """Reorder cs/ci[:n] so the first min(n, m) are the m best, in no order (score desc, ties
    to the lower id); returns min(n, m).  A few extra go one worst-scan each."""
    if n - m > 8:
        return _best_m_sorted(cs, ci, n, m)
    while n > m:
        w = 0
        for j in range(1, n):
            if _worse(cs[j], ci[j], cs[w], ci[w]):
                w = j
        n -= 1
        cs[w] = cs[n]
        ci[w] = ci[n]
    return n


@njit(cache=True, nogil=True, fastmath=_FAST)
def _count_ge(x, t):
    """How many of x are >= t (a vectorised loop, no branches; x a contiguous view: indexing
    a longer array at j0 + u would keep LLVM from vectorising)."""
    c = 0
    for j in range(x.shape[0]):
        c += np.int32(x[j] >= t)
    return c


@njit(cache=True, nogil=True, fastmath=_FAST)
def _least_at_least(x, t):
    """The least of x that is >= t (+inf if none; a vectorised, branch-free pass)."""
    best = np.float32(np.inf)
    for j in range(x.shape[0]):
        v = x[j]
        best = min(best, v if v >= t else np.float32(np.inf))
    return best


@njit(cache=True, nogil=True, fastmath=_FAST)
def _mth_bound(x, m):
    """A score t with at least m of x (m <= len(x)) >= t, at most (max - min) / 2^16 below
    the m-th largest (the m-th largest itself once a bisection step finds exactly m at or
    above its midpoint): bisection on the value with branch-free counts (quickselect's
    mispredicted branches cost ~10x more at these sizes)."""
    lo = x[0]
    hi = x[0]
    for j in range(1, x.shape[0]):
        v = x[j]
        lo = v if v < lo else lo
        hi = v if v > hi else hi
    if _count_ge(x, hi) >= m:
        return hi
    for _ in range(16):  # invariant: count(x >= lo) >= m > count(x >= hi)
        mid = np.float32(0.5) * (lo + hi)
        if not lo < mid < hi:
            break
        c = _count_ge(x, mid)
        if c == m:  # exactly the m best at or above mid: the least of them is the m-th
            return _least_at_least(x, mid)
        if c > m:
            lo = mid
        else:
            hi = mid
    return lo


@njit(cache=True, nogil=True)
def _compact(cs, ci, n, m):
    """Keep the candidates scoring at least (a tight lower bound of) the m-th best of cs[:n]
    (m <= n; ties all stay); returns (new n, that score).  Degenerate ties that would keep
    the buffer full fall back to an exact cut at m."""
    kth = _mth_bound(cs[:n], m)
    j = 0
    for t in range(n):
        if cs[t] >= kth:
            cs[j] = cs[t]
            ci[j] = ci[t]
            j += 1
    if j >= cs.shape[0]:
        j = _best_m_sorted(cs, ci, j, m)
    return j, kth


_BLOCK = 64  # scan block: one 64-bit mask of the scores >= the threshold


@intrinsic
def _lowest_bit(typingctx, x):
    """Index of the lowest set bit of a nonzero uint64 (LLVM cttz: one instruction)."""
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 1))

    return sig, codegen


@njit(cache=True, nogil=True, fastmath=_FAST)
def _append_at_least(row, ids, th, cs, ci, n):
    """Append every score of row >= th (and its id) to cs/ci after n; returns the new n.
    The caller guarantees room.  Each block of 64 scores becomes a bit mask of those >= th
    in one vectorised pass (no branch per score) and only its set bits are visited; any
    extra branch in this loop costs ~4x (measured), so it has none."""
    n_c = row.shape[0]
    full = n_c - n_c % _BLOCK
    for j0 in range(0, full, _BLOCK):
        v = row[j0:j0 + _BLOCK]
        mk = np.uint64(0)
        for u in range(_BLOCK):
            mk |= np.uint64(v[u] >= th) << np.uint64(u)
        while mk:
            u = np.int64(_lowest_bit(mk))
            mk &= mk - np.uint64(1)
            cs[n] = v[u]
            ci[n] = ids[j0 + u]
            n += 1
    for j in range(full, n_c):
        if row[j] >= th:
            cs[n] = row[j]
            ci[n] = ids[j]
            n += 1
    return n


@njit(cache=True, nogil=True, fastmath=_FAST)
def scan_row(row, ids, th, cs, ci, n, m):
    """Offer every score of ``row`` (n_c,) (point ids ``ids``) that is >= th to the candidate
    buffer cs/ci holding n; returns (n, th).  A vectorised count of the scores >= th comes
    first: most rows (once th is good) stop there, and the others get the branch-free
    :func:`_append_at_least` when they fit; a buffer they would overflow is compacted to
    its ~m best first (which raises th).  A query's first scores (empty buffer, no
    threshold) set th to (a bound of) their m-th best, so they are not all appended."""
    n_c = row.shape[0]
    cap = cs.shape[0]
    if n == 0 and th == -np.inf and n_c > m:
        th = _mth_bound(row, m)
    c = _count_ge(row, th)
    if c == 0:
        return n, th
    if n + c > cap and n > m:
        n, kth = _compact(cs, ci, n, m)
        if kth > th:
            th = kth
            c = _count_ge(row, th)
    if n + c <= cap:
        return _append_at_least(row, ids, th, cs, ci, n), th
    for j in range(n_c):  # more than the buffer holds: compact as it fills
        s = row[j]
        if s < th:
            continue
        if n == cap:
            n, kth = _compact(cs, ci, n, m)
            if kth > th:
                th = kth
            if s < th:
                continue
        cs[n] = s
        ci[n] = ids[j]
        n += 1
    return n, th


@_threadsafe_launch
@njit(parallel=True, cache=True, nogil=True, fastmath=_FAST)
def score_clusters(qr: np.ndarray, rows: np.ndarray, starts: np.ndarray, visit: np.ndarray, adeq: np.ndarray,
                   bt: np.ndarray, start: np.ndarray, size: np.ndarray, cap: np.ndarray, slot_id: np.ndarray,
                   norms: np.ndarray, l2: bool, m: int, cand_s: np.ndarray, cand_i: np.ndarray, cand_n: np.ndarray,
                   thresh: np.ndarray, scratch_q: np.ndarray, scratch_t: np.ndarray, scratch_s: np.ndarray,
                   scratch_n: np.ndarray) -> None:
    """Approximate scores of every visited cluster for its queries, straight into candidate buffers.

    Clusters run in parallel (``prange``; two BLAS GEMMs each: (cnt, Dg) @ A_c, then
    @ B_c^T read from the transposed mirror ``bt`` (``LorannIndex._mirror``) over the
    cluster's cap[c] slots, of which the first size[c] are scanned).  qr (Q, Dg) reduced
    queries; visits starts[c] .. starts[c+1] of cluster c belong to queries rows[...]
    (gathered into the thread's scratch_q (Nt, >= cnt * Dg)).  Each thread appends to its
    own buffers cand_s/cand_i (Nt, Q, cap), cand_n (Nt, Q) through :func:`scan_row`: scores
    below ``thresh[q]`` (the best m-th score any thread has seen for q, shared, only ever
    raised) are dropped, a full buffer is compacted to its ~m best.  scratch_t
    (Nt, >= cnt * Rk) and scratch_s (Nt, >= cnt * cap_c) float32 hold each thread's GEMM
    outputs (no allocation, so no page faults, per cluster); scratch_n (Nt, >= n_c) the
    cluster's norms for l2.  BLAS must run on one thread
    (``topkattn.threads.blas_single_thread``).
    """
    r_dim = adeq.shape[2]
    g_dim = qr.shape[1]
    for vi in nb.prange(len(visit)):
        tid = nb.get_thread_id()
        c = visit[vi]
        a0, a1 = starts[c], starts[c + 1]
        cnt = a1 - a0
        lo, n_c = start[c], size[c]
        ids = slot_id[lo:lo + n_c]
        qc = scratch_q[tid, :cnt * g_dim].reshape(cnt, g_dim)
        for r in range(cnt):
            qc[r] = qr[rows[a0 + r]]
        t = scratch_t[tid, :cnt * r_dim].reshape(cnt, r_dim)
        np.dot(qc, adeq[c], t)  # (cnt, Rk)
        cp = cap[c]
        blk = scratch_s[tid, :cnt * cp].reshape(cnt, cp)
        np.dot(t, bt[r_dim * lo:r_dim * (lo + cp)].reshape(r_dim, cp), blk)  # (cnt, cap_c)
        if l2:  # 2 q.x - |x|^2, with the cluster's norms gathered once
            nrm = scratch_n[tid, :n_c]
            for j in range(n_c):
                nrm[j] = norms[ids[j]]
            for r in range(cnt):
                for j in range(n_c):
                    blk[r, j] = 2 * blk[r, j] - nrm[j]
        for r in range(cnt):
            qi = rows[a0 + r]
            n, th = scan_row(blk[r, :n_c], ids, thresh[qi], cand_s[tid, qi], cand_i[tid, qi],
                             cand_n[tid, qi], m)
            cand_n[tid, qi] = n
            if th > thresh[qi]:
                thresh[qi] = th


@_threadsafe_launch
@njit(parallel=True, cache=True, nogil=True)
def raise_thresholds(cand_s: np.ndarray, cand_i: np.ndarray, cand_n: np.ndarray, m: int, thresh: np.ndarray) -> None:
    """Compact every buffer holding more than m candidates and raise its query's threshold to
    the best m-th score found (between the scoring passes of :meth:`LorannIndex._score_blocks`)."""
    n_parts, nq, _ = cand_s.shape
    for qi in nb.prange(nq):
        for p in range(n_parts):
            n = cand_n[p, qi]
            if n > m:
                n, kth = _compact(cand_s[p, qi], cand_i[p, qi], n, m)
                cand_n[p, qi] = n
                if kth > thresh[qi]:
                    thresh[qi] = kth


@_threadsafe_launch
@njit(parallel=True, cache=True, nogil=True, fastmath=_FAST)
def merge_rerank(cand_s: np.ndarray, cand_i: np.ndarray, cand_n: np.ndarray, data: np.ndarray, queries: np.ndarray,
                 l2: bool, m: int, k: int, rerank: bool, out_i: np.ndarray, out_s: np.ndarray) -> None:
    """Each query's m best candidates over all threads' buffers (score desc, ties to the lower
    id), re-ranked exactly when ``rerank``; the k best go to out_i (Q, Kn) int64 and out_s
    (Q, Kn) float32, padded with -1 / -inf."""
    n_parts, nq, cap = cand_s.shape
    for qi in nb.prange(nq):
        total = 0
        for p in range(n_parts):
            total += cand_n[p, qi]
        cs = np.empty(total, np.float32)
        ci = np.empty(total, np.int64)
        n = np.int64(0)
        for p in range(n_parts):
            for j in range(cand_n[p, qi]):
                cs[n] = cand_s[p, qi, j]
                ci[n] = cand_i[p, qi, j]
                n += 1
        _select_finish(qi, queries[qi], data, l2, cs, ci, n, m, k, rerank, out_i, out_s)


@njit(cache=True, nogil=True, fastmath=_FAST)
def _select_finish(qi, q, data, l2, cs, ci, n, m, k, rerank, out_i, out_s):
    """The m best of the n candidates cs/ci (score desc, ties to the lower id), re-ranked
    exactly when ``rerank``, the k best into row qi of out_i/out_s."""
    if n > m:  # cut to the scores >= (a bound of) the m-th best in O(n) first
        n = _compact(cs, ci, n, m)[0]
    if rerank:  # the exact scores decide the order
        n = _cut_to_m(cs, ci, n, m)
    else:
        n = _best_m_sorted(cs, ci, n, m)
    _finish(qi, q, data, l2, cs, ci, n, k, rerank, out_i, out_s)


@njit(cache=True, nogil=True, fastmath=_FAST)
def _fused_one(qi, qr, queries, clusters, a_src, a_scale, a_pair, src, bscale, scaled, start, size, cap,
               slot_id, norms, l2, data, m, k, rerank, out_i, out_s):
    """One query: per cluster (best first) t = A_c^T q, the scores of its points into a row,
    :func:`scan_row` into the candidate buffer, then :func:`_select_finish`.

    8-bit (``scaled``): q and then t are split into two int16 parts each
    (:func:`_quantize_pairs`: float32-level accuracy) and both products are exact integer pair
    dots (:func:`_pair_dot16`: 16 rank components of A_c from ``a_pair``, 16 points of B_c from
    the pair-layout mirror ``src``).  With ``rerank`` the scores only pick the candidates that
    exact scores then order, so the products take the first part alone (about 2^-16 of
    max|x|, far below the 8-bit codes' own error; half the multiply-adds,
    :func:`_pair_dot_hi`).  Otherwise float32: t from a_src (Nc, Rk, Dg), then 16 points per
    vector operation from the float mirror ``src``."""
    r = a_src.shape[1]
    most = 0
    for j in range(clusters.shape[1]):
        most = max(most, size[clusters[qi, j]])
    sc = np.empty(most, np.float32)  # one cluster's scores
    cs = np.empty(2 * m, np.float32)
    ci = np.empty(2 * m, np.int64)
    tq = np.empty(r, np.float32)
    q = qr[qi]
    n = np.int64(0)
    th = np.float32(-np.inf)
    g = q.shape[0]
    gp = (g + 1) // 2  # pairs of A's codes per rank component
    rp = (r + 1) // 2  # pairs of B's codes per point
    r16 = a_pair.shape[2] if scaled else 0  # rank rounded up to 16 lanes
    qpairs = np.empty((2, gp), np.int32)
    tpairs = np.empty((2, rp), np.int32)
    iacc = np.empty((2, max(most, r16) + 4 * _PAIR_LANES), np.int32)
    qs_hi, qs_lo = np.float32(0.0), np.float32(0.0)
    if scaled:
        qs_hi, qs_lo = _quantize_pairs(q, g, _pair_levels(gp), qpairs[0], qpairs[1])
    for j in range(clusters.shape[1]):
        c = clusters[qi, j]
        n_c = size[c]
        if n_c == 0:
            continue
        p0 = start[c]
        cp = cap[c]
        ids = slot_id[p0:p0 + n_c]
        row = sc[:n_c]
        if scaled:
            base = c * gp * r16 * 2
            vb = 0
            while vb < r16:
                if vb + 2 * _PAIR_LANES <= r16:
                    if rerank:
                        _pair_dot32_hi(iacc, vb, a_pair, base + 2 * vb, 2 * r16, qpairs[0], qpairs[1], gp)
                    else:
                        _pair_dot32(iacc, vb, a_pair, base + 2 * vb, 2 * r16, qpairs[0], qpairs[1], gp)
                    vb += 2 * _PAIR_LANES
                else:
                    if rerank:
                        _pair_dot16_hi(iacc, vb, a_pair, base + 2 * vb, 2 * r16, qpairs[0], qpairs[1], gp)
                    else:
                        _pair_dot16(iacc, vb, a_pair, base + 2 * vb, 2 * r16, qpairs[0], qpairs[1], gp)
                    vb += _PAIR_LANES
            _scale_row(iacc[0, :r], iacc[1, :r], qs_hi, qs_lo, a_scale[c], tq, rerank)
            ts_hi, ts_lo = _quantize_pairs(tq, r, _pair_levels(rp), tpairs[0], tpairs[1])
            base = 2 * rp * p0
            b0 = 0
            while b0 < n_c:  # 64 points per call while 48 or more are left, then 16
                if b0 + 3 * _PAIR_LANES < n_c:
                    if rerank:
                        _pair_dot64_hi(iacc, b0, src, base + 2 * b0, 2 * cp, tpairs[0], tpairs[1], rp)
                    else:
                        _pair_dot64(iacc, b0, src, base + 2 * b0, 2 * cp, tpairs[0], tpairs[1], rp)
                    b0 += 4 * _PAIR_LANES
                else:
                    if rerank:
                        _pair_dot16_hi(iacc, b0, src, base + 2 * b0, 2 * cp, tpairs[0], tpairs[1], rp)
                    else:
                        _pair_dot16(iacc, b0, src, base + 2 * b0, 2 * cp, tpairs[0], tpairs[1], rp)
                    b0 += _PAIR_LANES
            _scale_row(iacc[0, :n_c], iacc[1, :n_c], ts_hi, ts_lo, bscale[p0:p0 + n_c], row, rerank)
            if l2:
                for t in range(n_c):
                    row[t] = 2 * row[t] - norms[ids[t]]
            n, th = scan_row(row, ids, th, cs, ci, n, m)
            continue
        for v in range(r):  # t = A_c^T q: contiguous dots (2.4x faster than rows of A_c)
            a = a_src[c, v]
            acc = np.float32(0.0)
            for u in range(q.shape[0]):
                acc += q[u] * np.float32(a[u])
            tq[v] = acc
        for t in range(n_c):
            row[t] = 0
        v = 0
        while v < r:  # four rank components per pass over the row (fewer loads/stores of it)
            o = r * p0 + v * cp
            if v + 4 <= r:
                b0 = src[o:o + n_c]
                b1 = src[o + cp:o + cp + n_c]
                b2 = src[o + 2 * cp:o + 2 * cp + n_c]
                b3 = src[o + 3 * cp:o + 3 * cp + n_c]
                x0, x1, x2, x3 = tq[v], tq[v + 1], tq[v + 2], tq[v + 3]
                for t in range(n_c):
                    row[t] += (x0 * np.float32(b0[t]) + x1 * np.float32(b1[t])
                               + x2 * np.float32(b2[t]) + x3 * np.float32(b3[t]))
                v += 4
            else:
                b0 = src[o:o + n_c]
                x0 = tq[v]
                for t in range(n_c):
                    row[t] += x0 * np.float32(b0[t])
                v += 1
        if l2:
            for t in range(n_c):
                row[t] = 2 * row[t] - norms[ids[t]]
        n, th = scan_row(row, ids, th, cs, ci, n, m)
    _select_finish(qi, queries[qi], data, l2, cs, ci, n, m, k, rerank, out_i, out_s)


@_threadsafe_launch
@njit(parallel=True, cache=True, nogil=True)
def fused_search(qr: np.ndarray, queries: np.ndarray, clusters: np.ndarray, a_src: np.ndarray, a_scale: np.ndarray,
                 a_pair: np.ndarray, src: np.ndarray, bscale: np.ndarray, scaled: bool, start: np.ndarray,
                 size: np.ndarray, cap: np.ndarray, slot_id: np.ndarray, norms: np.ndarray, l2: bool,
                 data: np.ndarray, m: int, k: int, rerank: bool, out_i: np.ndarray, out_s: np.ndarray) -> None:
    """Score, select and re-rank in one pass, query-parallel (no BLAS calls).

    qr (Q, Dg) reduced queries, clusters (Q, Wc) clusters to search.  When ``scaled`` (8-bit):
    A_c's codes in pair layout ``a_pair`` (Nc, ceil(Dg/2), Rk16, 2) (:func:`a_pairs`) times
    a_scale (Nc, Rk) (per rank component), and B's codes from the pair-layout mirror ``src``
    (``LorannIndex._mirror``: cluster c's (ceil(Rk/2), cap[c], 2) block at 2 ceil(Rk/2) start[c])
    times ``bscale`` (per slot): integer pair dots, 4x less memory traffic than float32.
    Otherwise A_c^T from a_src (Nc, Rk, Dg) float32 and B from the float32 mirror ``src``
    (cluster c's (Rk, cap[c]) block at Rk * start[c]).  Cluster c's points sit at slots
    start[c] .. start[c] + size[c].
    Same output contract as :func:`merge_rerank`.
    """
    for qi in nb.prange(qr.shape[0]):  # (int64 qi: the serial kernel's specialisation of _fused_one)
        _fused_one(np.int64(qi), qr, queries, clusters, a_src, a_scale, a_pair, src, bscale, scaled, start,
                   size, cap, slot_id, norms, l2, data, m, k, rerank, out_i, out_s)


@njit(cache=True, nogil=True)
def fused_search_serial(qr, queries, clusters, a_src, a_scale, a_pair, src, bscale, scaled, start, size,
                        cap, slot_id, norms, l2, data, m, k, rerank, out_i, out_s):
    """:func:`fused_search` on one thread (single queries: no thread-pool wake-up)."""
    for qi in range(qr.shape[0]):
        _fused_one(qi, qr, queries, clusters, a_src, a_scale, a_pair, src, bscale, scaled, start, size,
                   cap, slot_id, norms, l2, data, m, k, rerank, out_i, out_s)


@njit(cache=True, nogil=True)
def _best_above(row, th, w, out, cs, ci):
    """The w best positions of row (best first, ties to the lower one) into out, given a bound
    th with at least w entries of row at or above it: those entries are gathered into the
    scratch cs/ci (N,) and sorted (a bounded heap when many tie at th)."""
    n = np.int64(0)
    for j in range(row.shape[0]):
        if row[j] >= th:
            cs[n] = row[j]
            ci[n] = j
            n += 1
    if n <= 64:
        _best_m_sorted(cs, ci, n, w)
    else:  # a bounded heap (no sort: Numba's sorts cost seconds of compile time)
        hs = np.empty(w, np.float32)
        hi = np.empty(w, np.int64)
        m = 0
        for j in range(n):
            m = _push(hs, hi, m, w, cs[j], ci[j])
        _drain_sorted(hs, hi, m, cs, ci)
    for j in range(w):
        out[j] = ci[j]


@njit(cache=True, nogil=True, fastmath=_FAST)
def _top_of_row(row, w, out):
    """The w best positions of row (Nc,) into out (Wc,), best first (ties to the lower one): a
    bisection bound, then a sort of the ~w above it (cheaper than a heap at these sizes)."""
    nc = row.shape[0]
    _best_above(row, _mth_bound(row, w), w, out, np.empty(nc, np.float32), np.empty(nc, np.int64))


@_threadsafe_launch
@njit(parallel=True, cache=True, nogil=True)
def top_columns(scores: np.ndarray, w: int, out: np.ndarray) -> None:
    """The w best columns of each row of scores (Q, Nc), best first (ties to the lower
    column), into out (Q, Wc) int64."""
    for qi in nb.prange(scores.shape[0]):
        _top_of_row(scores[qi], w, out[qi])


@njit(cache=True, nogil=True, fastmath=_FAST)
def _top_few(row, w, out, cs, ci):
    """The w <= 16 best positions of row (N,) into out (Wc,), best first, ties to the lower
    position; cs/ci (N,) scratch.  The 16 lane maxima of row's 16-wide blocks (one vectorised
    pass) are 16 distinct entries, so the w-th best of them is a lower bound with at least w
    entries at or above it; only those are gathered and sorted (:func:`_best_above`, usually
    about w)."""
    n = row.shape[0]
    full = n - n % _PAIR_LANES
    th = np.float32(-np.inf)
    if full:
        lane = np.empty(_PAIR_LANES, np.float32)
        for t in range(_PAIR_LANES):
            lane[t] = row[t]
        for j0 in range(_PAIR_LANES, full, _PAIR_LANES):
            blk = row[j0:j0 + _PAIR_LANES]
            for t in range(_PAIR_LANES):
                lane[t] = max(lane[t], blk[t])
        for a in range(1, _PAIR_LANES):  # sort the maxima, best first
            v = lane[a]
            b = a - 1
            while b >= 0 and lane[b] < v:
                lane[b + 1] = lane[b]
                b -= 1
            lane[b + 1] = v
        th = lane[w - 1]
    _best_above(row, th, w, out, cs, ci)


@_threadsafe_launch
@njit(parallel=True, cache=True, nogil=True)
def top_few_columns(scores: np.ndarray, w: int, out: np.ndarray) -> None:
    """:func:`top_columns` for w <= 16 (:func:`_top_few`, blocks of 64 rows in parallel): the w
    best columns of each row of scores (Q, Nc), best first, ties to the lower column."""
    nq, nc = scores.shape
    for b in nb.prange((nq + 63) // 64):
        cs = np.empty(nc, np.float32)
        ci = np.empty(nc, np.int64)
        for qi in range(64 * b, min(nq, 64 * b + 64)):
            _top_few(scores[qi], w, out[qi], cs, ci)


@njit(inline="always")
def _transpose_one(c, start, size, cap, bdeq, bcodes, codes, bt, ct):
    r = bdeq.shape[1]
    lo, n, cp = start[c], size[c], cap[c]
    base = r * lo
    pbase = 2 * ((r + 1) // 2) * lo
    for j in range(n):
        for v in range(r):
            bt[base + v * cp + j] = bdeq[lo + j, v]
            if codes:
                ct[pbase + (v // 2) * 2 * cp + 2 * j + (v & 1)] = bcodes[lo + j, v]


@_threadsafe_launch
@njit(parallel=True, cache=True, nogil=True)
def transpose_clusters(clusters: np.ndarray, start: np.ndarray, size: np.ndarray, cap: np.ndarray, bdeq: np.ndarray,
                       bcodes: np.ndarray, codes: bool, bt: np.ndarray, ct: np.ndarray) -> None:
    """Write the transposed blocks of ``clusters`` into the mirror (see
    ``LorannIndex._mirror``): bt[Rk*start[c] + v*cap[c] + j] = bdeq[start[c] + j, v] for the
    size[c] points j, and, when ``codes``, the 8-bit ``bcodes`` into ``ct`` in pair layout:
    ct[2 Rp start[c] + (v // 2) 2 cap[c] + 2 j + v % 2] with Rp = ceil(Rk / 2) (two rank
    components of a point side by side, for :func:`_pair_dot16`)."""
    for i in nb.prange(len(clusters)):
        _transpose_one(clusters[i], start, size, cap, bdeq, bcodes, codes, bt, ct)


@njit(cache=True, nogil=True)
def transpose_clusters_serial(clusters, start, size, cap, bdeq, bcodes, codes, bt, ct):
    """:func:`transpose_clusters` on one thread (the cluster or two a decode step touched)."""
    for i in range(len(clusters)):
        _transpose_one(clusters[i], start, size, cap, bdeq, bcodes, codes, bt, ct)


@njit(cache=True, nogil=True)
def group_visits(top, n_clusters, rows, starts):
    """Group the visits top (Q, Wc) by cluster (a counting sort): the visits of cluster c are
    rows[starts[c]:starts[c + 1]], the ids of its queries in increasing order."""
    for c in range(starts.shape[0]):
        starts[c] = 0
    for qi in range(top.shape[0]):
        for j in range(top.shape[1]):
            starts[top[qi, j] + 1] += 1
    for c in range(n_clusters):
        starts[c + 1] += starts[c]
    fill = starts[:-1].copy()
    for qi in range(top.shape[0]):
        for j in range(top.shape[1]):
            c = top[qi, j]
            rows[fill[c]] = qi
            fill[c] += 1


@_threadsafe_launch
@njit(parallel=True, cache=True, nogil=True, fastmath=_FAST)
def neg_sq_distances(q: np.ndarray, data: np.ndarray, out: np.ndarray) -> None:
    """out (Q, N) = -|q_i - x_j|^2 for queries q (Q, D) and points data (N, D), float32, as sums
    of squared differences (accurate far from the origin, unlike the norm expansion); parallel
    over blocks of 64 points, each point row reused from cache by every query."""
    nq, d = q.shape
    n = data.shape[0]
    for blk in nb.prange((n + 63) // 64):
        for j in range(blk * 64, min(n, blk * 64 + 64)):
            x = data[j]
            for i in range(nq):
                qi = q[i]
                acc = np.float32(0.0)
                for t in range(d):
                    diff = qi[t] - x[t]
                    acc += diff * diff
                out[i, j] = -acc


@_threadsafe_launch
@njit(parallel=True, cache=True, nogil=True)
def exact_topk(scores: np.ndarray, k: int, out_i: np.ndarray, out_s: np.ndarray) -> None:
    """Row-wise top-k of a (Q, N) score block, ties to the lower column; best first."""
    nq, nn = scores.shape
    for qi in nb.prange(nq):
        hs = np.empty(k, np.float32)
        hi = np.empty(k, np.int64)
        n = np.int64(0)
        for t in range(nn):
            if n == k and scores[qi, t] < hs[0]:
                continue
            n = _push(hs, hi, n, k, scores[qi, t], t)
        _drain_sorted(hs, hi, n, out_s[qi], out_i[qi])


@_threadsafe_launch
@njit(parallel=True, cache=True, nogil=True, fastmath=_FAST)
def nearest_in_groups(x: np.ndarray, cent: np.ndarray, cnorm: np.ndarray, l2: bool, top: np.ndarray,
                      rows: np.ndarray, starts: np.ndarray, gstarts: np.ndarray, members: np.ndarray,
                      scratch_x: np.ndarray, scratch_s: np.ndarray, best_s: np.ndarray, best_i: np.ndarray) -> None:
    """The best centroid of each point's probed groups, group by group (a GEMM per group).

    x (N, Dx) points, cent (Nc, Dx) centroids, cnorm (Nc,) their squared norms, top (N, probe)
    the groups each point searches; the points probing group g are rows[starts[g]:starts[g+1]]
    (:func:`group_visits`), its centroids members[gstarts[g]:gstarts[g + 1]] (ascending).
    Groups run in parallel; a group's points are gathered into the thread's scratch_x
    (Nt, >= n_g * Dx) and scored against its centroids with one BLAS GEMM into scratch_s
    (Nt, >= n_g * m_g), so the centroids stay in cache (one point at a time would stream
    every probed centroid from memory).  best_s/best_i (N, probe): the best score and id of
    each (point, probe) pair, -inf / -1 for an empty group; reduce with
    :func:`best_of_probes`.  BLAS must run on one thread.  Reference: the argmax of
    ``kmeans.centroid_scores`` over the same candidates.
    """
    g_dim = x.shape[1]
    n_groups = len(starts) - 1
    for g in nb.prange(n_groups):
        tid = nb.get_thread_id()
        a0, a1 = starts[g], starts[g + 1]
        m0, m1 = gstarts[g], gstarts[g + 1]
        n_g, m_g = a1 - a0, m1 - m0
        if n_g == 0:
            continue
        xg = scratch_x[tid, :n_g * g_dim].reshape(n_g, g_dim)
        for r in range(n_g):
            xg[r] = x[rows[a0 + r]]
        sg = scratch_s[tid, :n_g * max(m_g, 1)].reshape(n_g, max(m_g, 1))
        if m_g:
            cg = np.empty((m_g, g_dim), np.float32)
            for j in range(m_g):
                cg[j] = cent[members[m0 + j]]
            np.dot(xg, cg.T, sg)
        for r in range(n_g):
            i = rows[a0 + r]
            best = -np.inf
            bid = -1
            for j in range(m_g):
                c = members[m0 + j]
                v = sg[r, j]
                if l2:
                    v = 2 * v - cnorm[c]
                if v > best:  # members ascending: ties keep the lower id
                    best = v
                    bid = c
            for p in range(top.shape[1]):
                if top[i, p] == g:
                    best_s[i, p] = best
                    best_i[i, p] = bid


@njit(cache=True, nogil=True)
def best_of_probes(best_s, best_i, out):
    """out (N,) = the id of the best (score desc, ties to the lower id) of each row of best_s /
    best_i (N, probe) (:func:`nearest_in_groups`); -1 when a row has none."""
    for i in range(best_s.shape[0]):
        b = -np.inf
        bid = -1
        for p in range(best_s.shape[1]):
            c = best_i[i, p]
            if c < 0:
                continue
            v = best_s[i, p]
            if bid < 0 or v > b or (v == b and c < bid):
                b = v
                bid = c
        out[i] = bid


@njit(cache=True, nogil=True, fastmath=_FAST)
def assign_column(xr, cent, cnorm, l2, proj, out_b):
    """Nearest cluster of one reduced point xr (Dg,) and its model column out_b = proj[c] @ xr.

    cent (Nc, Dg), cnorm (Nc,), proj (Nc, Rk, Dg).  Ties go to the lower cluster (like argmax).
    Reference: the batched ``add`` path in ``LorannIndex.add``.
    """
    g = xr.shape[0]
    best = -np.inf
    c = 0
    for j in range(cent.shape[0]):
        cj = cent[j]  # row views: contiguous, vectorised dots
        s = np.float32(0.0)
        for u in range(g):
            s += xr[u] * cj[u]
        if l2:
            s = 2 * s - cnorm[j]
        if s > best:
            best = s
            c = j
    for v in range(proj.shape[1]):
        pv = proj[c, v]
        acc = np.float32(0.0)
        for u in range(g):
            acc += pv[u] * xr[u]
        out_b[v] = acc
    return c


@njit(cache=True, nogil=True)
def quantize_row_into(b, levels, codes, deq):
    """Quantise one row like ``quant.quantize_rows`` (8-bit codes, unpacked); returns its scale."""
    amax = np.float32(0.0)
    for v in range(b.shape[0]):
        amax = max(amax, abs(b[v]))
    scale = np.float32(amax / np.float32(levels))
    inv = np.float32(1.0) / scale if scale > 0 else np.float32(0.0)
    for v in range(b.shape[0]):
        q = np.rint(b[v] * inv)
        q = min(max(q, -levels), levels)
        codes[v] = np.int8(q)
        deq[v] = np.float32(np.int8(q)) * scale
    return scale


@njit(cache=True, nogil=True, fastmath=_FAST)
def route_small(qr, cent_t, cnorm, size, l2, w, out):
    """The w best non-empty clusters of each query, best first (ties to the lower cluster).

    qr (Q, Dg), cent_t (Dg, >= Nc) the centroids transposed, zero columns past Nc
    (``LorannIndex._centroids_t`` pads Nc to a multiple of 16: the scores of four queries and
    64 clusters build up in registers, one query component at a time, :func:`_fma_panel`, the
    same values for any batch; unpadded columns take a scalar loop), size (Nc,) points per cluster
    (clusters with none are never chosen: the caller keeps w <= the number of non-empty
    clusters), out (Q, Wc) int64.  For a few queries, where the NumPy call overhead of
    ``LorannIndex._route`` dominates.
    """
    g, width = cent_t.shape
    nc = size.shape[0]
    nq = qr.shape[0]
    live = np.empty(nc, np.int64)
    n_live = 0
    for j in range(nc):
        if size[j] > 0:
            live[n_live] = j
            n_live += 1
    every = np.empty((4, width), np.float32)  # the scores of up to four queries
    s = np.empty(n_live, np.float32)
    pos = np.empty(w, np.int64)
    cs = np.empty(n_live, np.float32)  # _top_few's scratch
    ci = np.empty(n_live, np.int64)
    for q0 in range(0, nq, 4):
        nr = min(4, nq - q0)
        j0 = 0
        while j0 + 4 * _PAIR_LANES <= width:
            if nr == 4:
                _fma_4x64(every, 0, j0, cent_t, j0, qr[q0:], g)
            else:
                for r in range(nr):
                    _fma_1x64(every, r, j0, cent_t, j0, qr[q0:], g)
            j0 += 4 * _PAIR_LANES
        while j0 + _PAIR_LANES <= width:
            for r in range(nr):
                _fma_1x16(every, r, j0, cent_t, j0, qr[q0:], g)
            j0 += _PAIR_LANES
        for r in range(nr):
            q = qr[q0 + r]
            for j in range(j0, nc):
                acc = np.float32(0.0)
                for u in range(g):
                    acc = _fma32(q[u], cent_t[u, j], acc)
                every[r, j] = acc
            for t in range(n_live):
                j = live[t]
                s[t] = 2 * every[r, j] - cnorm[j] if l2 else every[r, j]
            if w <= _PAIR_LANES:
                _top_few(s, w, pos, cs, ci)
            else:
                _top_of_row(s, w, pos)
            for t in range(w):
                out[q0 + r, t] = live[pos[t]]


@_threadsafe_launch
@njit(parallel=True, cache=True, nogil=True)
def route_many(qr: np.ndarray, cent_t: np.ndarray, cnorm: np.ndarray, size: np.ndarray, l2: bool, w: int,
               out: np.ndarray) -> None:
    """:func:`route_small` of many queries, blocks of 16 in parallel (the same result)."""
    n = qr.shape[0]
    for b in nb.prange((n + 15) // 16):
        lo = b * 16
        hi = min(n, lo + 16)
        route_small(qr[lo:hi], cent_t, cnorm, size, l2, w, out[lo:hi])


@njit(cache=True, nogil=True, fastmath=_FAST)
def reduce_queries(q, t_red, out):
    """out (Q, Dg) = q (Q, Dx) @ t_red (Dx, Dg), one row of t_red at a time (vectorised over Dg):
    the few-query paths' global reduction (the single-query path and the general one compute
    it alike, so they return the same)."""
    for i in range(q.shape[0]):
        red = out[i]
        for j in range(red.shape[0]):
            red[j] = 0
        for u in range(q.shape[1]):
            v = q[i, u]
            row = t_red[u]
            for j in range(red.shape[0]):
                red[j] += v * row[j]


@njit(cache=True, nogil=True)
def route_search_one(query, max_sq_norm, t_red, cent_t, cnorm, w, a_src, a_scale, a_pair, src, bscale, scaled,
                     start, size, cap, slot_id, norms, l2, data, m, k, rerank, out_i, out_s):
    """One query end to end (:func:`route_small`, then :func:`fused_search_serial`) in one call:
    the single-query latency path of ``LorannIndex.search``.  query (Dx,); t_red (Dx, Dg) the
    global reduction or an empty (0, 0) array for none.  False (nothing written) when the
    query is not finite or its squared norm is above ``max_sq_norm`` (the caller's general path
    reports it)."""
    sq = np.float32(0.0)
    for u in range(query.shape[0]):
        if not np.isfinite(query[u]):
            return False
        sq += query[u] * query[u]
    if not sq <= max_sq_norm:  # (overflowed to inf included)
        return False
    q2 = query.reshape(1, query.shape[0])
    if t_red.shape[0] == 0:
        qr = q2
    else:
        qr = np.empty((1, t_red.shape[1]), np.float32)
        reduce_queries(q2, t_red, qr)
    top = np.empty((1, w), np.int64)
    route_small(qr, cent_t, cnorm, size, l2, w, top)
    _fused_one(np.int64(0), qr, q2, top, a_src, a_scale, a_pair, src, bscale, scaled, start, size, cap, slot_id,
               norms, l2, data, m, k, rerank, out_i, out_s)
    return True


def a_pairs(codes: np.ndarray) -> np.ndarray:
    """A_c's 8-bit codes (Rk, Dg) in the pair layout of the fused kernel: (ceil(Dg/2), Rk16, 2)
    int8, out[i, v, e] = codes[v, 2i + e] (zero past Dg and Rk), Rk16 = Rk rounded up to 16."""
    r, g = codes.shape
    gp = (g + 1) // 2
    r16 = -(-r // _PAIR_LANES) * _PAIR_LANES
    padded = np.zeros((r16, 2 * gp), np.int8)
    padded[:r, :g] = codes
    return np.ascontiguousarray(padded.reshape(r16, gp, 2).transpose(1, 0, 2))
