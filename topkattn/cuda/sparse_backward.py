"""CUDA sparse attention backward from saved indices and logsumexp: dq, dk, dv.

Shape letters: B batch, H query heads, G KV heads, T queries, S keys, D head dim,
Dv value dim, K index slots per query (-1 = empty), rows = B*H*T query rows,
n_ent = rows * K entries.

    s_i   = scale * q . k_{idx_i}            p_i = exp(s_i - lse)     (0 for empty slots)
    dp_i  = dout . v_{idx_i}                 delta = dout . out
    ds_i  = p_i (dp_i - delta) scale
    dq    = sum_i ds_i k_{idx_i};  dk_j = sum_{(r,i): idx=j} ds_i q_r;  dv_j = sum p_i dout_r

Kernel 1 (one thread per query row) computes p, ds (n_ent,) and dq.  dk, dv are gathered per
key by a **deterministic segmented reduction**, not atomics: the n_ent entries are sorted by
key (a sort on unique composite keys, so the order never depends on the sort algorithm);
a key's segment longer than PIECE entries (sinks: every row selects them) is cut into
pieces of PIECE entries that one thread per (piece, feature) sums (kernel 2), and one
thread per (key, feature) then adds its key's short segment, or its pieces' partial
sums, in that fixed order (kernel 3).  Why: float atomics add in a run-dependent order
(results differ in the last bits between runs), and the keys that many rows share
(sinks, the window, popular keys) would serialise thousands of atomics on one address;
the sort costs O(n_ent log n_ent) and the pieces O(n_ent / PIECE) memory, all O(T K).
Rows whose output is not finite (or whose lse is NaN: a NaN or +inf among their scores, a
NaN or inf among their values) get a NaN dq and send nothing to dk/dv, so one bad row never
poisons keys other rows share; rows with no key (lse -inf) get zeros.  A key a row weighs 0
(score -inf) sends and receives nothing (no 0 * inf).  The rule of
:func:`topkattn.ops.reference.masked_attention_grad_reference`.
Reference: :func:`topkattn.ops.sparse_attention.sparse_attention_backward` (itself checked
against float64 finite differences of :func:`topkattn.ops.reference.topk_attention_reference`).
"""
from __future__ import annotations

import functools
import math
from types import ModuleType

import numpy as np
from numba import cuda, types

from topkattn.backend import Array
from topkattn.cuda.launch import array_module, cdiv, launch, simulator_enabled

THREADS = 128
PIECE = 512  # longest segment one thread sums directly (4 under the simulator)


def sparse_backward(dout: Array, q: Array, k: Array, v: Array, idx: Array, out: Array, lse: Array,
                    scale: float) -> tuple[Array, Array, Array]:
    """(dq (B, H, T, D), dk (B, G, S, D), dv (B, G, S, Dv)) from dout (B, H, T, Dv).

    CuPy arrays (NumPy under the simulator); ``scale`` is the score scale of the forward.
    """
    xp = array_module(dout, q, k, v, idx)
    B, H, T, D = q.shape
    G, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    K = idx.shape[-1]
    if not (1 <= D <= 256 and 1 <= Dv <= 256):
        raise ValueError(f"the CUDA backward supports head dims 1..256, got D={D}, Dv={Dv}")
    dq = xp.zeros_like(q)
    dk = xp.zeros_like(k)
    dv = xp.zeros_like(v)
    n_rows, NK = B * H * T, B * G * S
    if n_rows == 0 or K == 0 or NK == 0:
        return dq, dk, dv
    q, k, v, dout, out, idx, lse = (xp.ascontiguousarray(a) for a in (q, k, v, dout, out, idx, lse))
    p = xp.empty((n_rows, K), dtype=q.dtype)
    ds = xp.empty((n_rows, K), dtype=q.dtype)
    threads = 32 if simulator_enabled() else THREADS
    launch(_rows_kernel(D, Dv, q.dtype.char), cdiv(n_rows, threads), threads,
           q, k, v, dout, out, idx, lse, float(scale), p, ds, dq)
    order, seg = key_segments(xp, idx, G, S)
    DM = max(D, Dv)
    piece = 4 if simulator_enabled() else PIECE
    n_ent = n_rows * K
    lens = seg[1:] - seg[:-1]  # (NK,) entries per key
    n_pieces = xp.where(lens > piece, (lens + piece - 1) // piece, 0)  # long segments only
    pstart = xp.concatenate([xp.zeros(1, dtype=xp.int64), xp.cumsum(n_pieces)])  # (NK + 1,)
    NP = 2 * (n_ent // piece) + 1  # >= the number of pieces, known without a device sync
    piece_key = xp.searchsorted(pstart[1:], xp.arange(NP, dtype=xp.int64), side="right")
    part_k = xp.empty((NP, D), dtype=q.dtype)
    part_v = xp.empty((NP, Dv), dtype=q.dtype)
    launch(_pieces_kernel(q.dtype.char), cdiv(NP * DM, threads), threads, q, dout, p, ds, order,
           seg, pstart, piece_key.astype(xp.int64), piece, K, part_k, part_v)
    launch(_keys_kernel(q.dtype.char), cdiv(NK * DM, threads), threads, q, dout, p, ds, order,
           seg, pstart, piece, K, part_k, part_v, dk, dv)
    return dq, dk, dv


def key_segments(xp: ModuleType, idx: Array, G: int, S: int) -> tuple[Array, Array]:
    """Entries grouped by key: ``order`` (n_ent,) entry numbers sorted by key, ``seg`` (B*G*S + 1,).

    Entry e = r * K + i is slot i of row r = (b, h, t); its key row is (b * G + h // (H / G)) * S
    + idx.  Key n's entries are order[seg[n]:seg[n + 1]], ascending in e (deterministic).
    """
    B, H, T, K = idx.shape
    NK, n_ent = B * G * S, B * H * T * K
    if (NK + 1) * n_ent >= 2**62:
        raise ValueError(f"too many keys x entries for the composite sort: {NK} x {n_ent}")
    base = (xp.arange(B, dtype=xp.int64)[:, None] * G
            + xp.arange(H, dtype=xp.int64)[None, :] // (H // G)) * S  # (B, H)
    flat = xp.where(idx >= 0, idx + base[:, :, None, None], NK).reshape(n_ent)  # empty -> NK
    order = xp.argsort(flat * n_ent + xp.arange(n_ent, dtype=xp.int64))  # unique keys: any sort agrees
    seg = xp.searchsorted(flat[order], xp.arange(NK + 1, dtype=xp.int64))
    return order.astype(xp.int64), seg.astype(xp.int64)


@functools.cache
def _rows_kernel(D, Dv, dchar):
    """Specialised on the head dims (constant loop trips: dq accumulates in registers)."""
    vt = types.float32 if dchar == "f" else types.float64
    cast = np.float32 if dchar == "f" else np.float64
    NAN = math.nan
    INF = math.inf

    @cuda.jit
    def rows_kernel(q, k, v, dout, out, idx, lse, scale, p_out, ds_out, dq):
        r = cuda.grid(1)
        B, H, T = q.shape[0], q.shape[1], q.shape[2]
        G = k.shape[1]
        K = idx.shape[3]
        if r >= B * H * T:
            return
        b = r // (H * T)
        h = (r // T) % H
        t = r % T
        g = h // (H // G)
        sc = cast(scale)
        L = lse[b, h, t]
        nan_row = L != L
        for d in range(Dv):  # an output that is not finite marks a NaN row too
            o = out[b, h, t, d]
            if o != o or o == INF or o == -INF:
                nan_row = True
        if nan_row or L == -INF:
            for i in range(K):
                p_out[r, i] = 0
                ds_out[r, i] = 0
            if nan_row:
                for d in range(D):
                    dq[b, h, t, d] = NAN
            return
        delta = cast(0)
        for d in range(Dv):
            delta += dout[b, h, t, d] * out[b, h, t, d]
        acc = cuda.local.array(D, vt)
        for d in range(D):
            acc[d] = 0
        for i in range(K):
            j = idx[b, h, t, i]
            if j < 0:
                p_out[r, i] = 0
                ds_out[r, i] = 0
                continue
            s = cast(0)
            for d in range(D):
                s += (q[b, h, t, d] * sc) * k[b, g, j, d]
            pr = math.exp(s - L)
            if pr == 0:  # weight 0 (score -inf, or underflow): nothing to send or receive
                p_out[r, i] = 0
                ds_out[r, i] = 0
                continue
            dp = cast(0)
            for d in range(Dv):
                dp += dout[b, h, t, d] * v[b, g, j, d]
            dsv = pr * (dp - delta) * sc
            p_out[r, i] = pr
            ds_out[r, i] = dsv
            for d in range(D):
                acc[d] += dsv * k[b, g, j, d]
        for d in range(D):
            dq[b, h, t, d] = acc[d]

    return rows_kernel


@cuda.jit(device=True)
def _segment_sums(q, dout, p, ds, order, u0, u1, K, d, acc_k, acc_v):
    """(acc_k, acc_v) plus the dk, dv contributions of sorted entries u0 .. u1 - 1 at feature d."""
    H, T, D = q.shape[1], q.shape[2], q.shape[3]
    Dv = dout.shape[3]
    for u in range(u0, u1):
        e = order[u]
        r = e // K
        i = e - r * K
        pr = p[r, i]
        if pr == 0:  # nothing to send (also keeps NaN rows, p = 0, out of dk/dv)
            continue
        rb = r // (H * T)
        rh = (r // T) % H
        rt = r % T
        if d < D:
            acc_k += ds[r, i] * q[rb, rh, rt, d]
        if d < Dv:
            acc_v += pr * dout[rb, rh, rt, d]
    return acc_k, acc_v


@functools.cache
def _pieces_kernel(dchar):
    cast = np.float32 if dchar == "f" else np.float64

    @cuda.jit
    def pieces_kernel(q, dout, p, ds, order, seg, pstart, piece_key, piece, K, part_k, part_v):
        x = cuda.grid(1)
        D, Dv = q.shape[3], dout.shape[3]
        DM = max(D, Dv)
        NP = part_k.shape[0]
        if x >= NP * DM:
            return
        pc = x // DM
        d = x - pc * DM
        key = piece_key[pc]
        if key >= seg.shape[0] - 1:
            return  # beyond the last piece
        u0 = seg[key] + (pc - pstart[key]) * piece
        u1 = min(seg[key + 1], u0 + piece)
        acc_k, acc_v = _segment_sums(q, dout, p, ds, order, u0, u1, K, d, cast(0), cast(0))
        if d < D:
            part_k[pc, d] = acc_k
        if d < Dv:
            part_v[pc, d] = acc_v

    return pieces_kernel


@functools.cache
def _keys_kernel(dchar):
    cast = np.float32 if dchar == "f" else np.float64

    @cuda.jit
    def keys_kernel(q, dout, p, ds, order, seg, pstart, piece, K, part_k, part_v, dk, dv):
        x = cuda.grid(1)
        D, Dv = q.shape[3], dout.shape[3]
        G, S = dk.shape[1], dk.shape[2]
        DM = max(D, Dv)
        if x >= dk.shape[0] * G * S * DM:
            return
        key = x // DM
        d = x - key * DM
        b = key // (G * S)
        g = (key // S) % G
        j = key % S
        acc_k = cast(0)
        acc_v = cast(0)
        if seg[key + 1] - seg[key] > piece:  # long segment: add its pieces in order
            for pc in range(pstart[key], pstart[key + 1]):
                if d < D:
                    acc_k += part_k[pc, d]
                if d < Dv:
                    acc_v += part_v[pc, d]
        else:
            acc_k, acc_v = _segment_sums(q, dout, p, ds, order, seg[key], seg[key + 1], K, d,
                                         acc_k, acc_v)
        if d < D:
            dk[b, g, j, d] = acc_k
        if d < Dv:
            dv[b, g, j, d] = acc_v

    return keys_kernel


__all__ = ["sparse_backward", "key_segments"]
