"""CUDA LoRANN query scoring for batched decode: per-cluster low-rank scores with dequantisation.

Shape letters (the ANN index's own, as in :mod:`topkattn.ann`): Q queries, Dx data dim, Dg
reduced dim, Nc clusters, Rk rank, Wc clusters searched per query, Z slots (cluster storage,
>= N points), Mc candidates, Kn results.

Data layout (that of :class:`topkattn.ann.LorannIndex`, gathered by :func:`lorann_arrays`):
  a (Nc, Rk, Dg) int8 codes of each cluster's A^T (8 bits), or (Nc, Rk, ceil(Dg/2)) uint8 with
  two 4-bit codes per byte (low nibble = even column, code + 8), or (Nc, Dg, Rk) float32 A
  (no quantisation); ascale (Nc, Rk) float32:  A_c[u, v] = code[c, v, u] * ascale[c, v]
  b (Z, Rk) int8 / (Z, ceil(Rk/2)) uint8 / (Z, Rk) float32; bscale (Z,):  B[z, v] = code[z, v] * bscale[z]
  start (Nc,), size (Nc,) int64: cluster c's points sit at slots start[c] .. start[c] + size[c];
  slot_id (Z,) int64 the point id of each slot; norms (N,) |x|^2 (l2 candidate scores); data (N, Dx) for re-ranking.

    score(q, z) = (qr_q A_c) . B[z]          qr = q T (Q, Dg);  l2: 2 score - |x|^2
    candidates  = the Mc best scores over the Wc searched clusters (ties to the lower id)
    results     = the Kn best candidates by exact q . x or -|q - x|^2 (l2, a sum of squared
                  differences) when re-ranking, else by score (l2: minus |q|^2); result scores are
                  minus the distances

Kernels: (1) one block per (query, searched cluster): the threads first form
tq = qr A_c (Rk,) in shared memory, dequantising A's codes on the fly, then each thread
scores slots of the cluster against tq, dequantising B; (2) the split-k top-m of
:mod:`topkattn.cuda.topk_select` keeps the Mc best (score, id); (3) one thread per
candidate computes the exact score for re-ranking, and top-m again keeps Kn.  Routing
(q T, centroid scores, top-Wc clusters) uses the same top-m kernel over the non-empty
clusters only (all of them when fewer than Wc are non-empty), as the index does.
Reference: ``LorannIndex.search`` (NumPy path; its ``_search_xp`` is the dense padded form)
and, in the tests, an explicit float64 dequantise-and-score loop.
"""
from __future__ import annotations

import functools
import math
from collections import namedtuple
from types import ModuleType
from typing import Any

import numpy as np
from numba import cuda, types

from topkattn.backend import Array
from topkattn.checks import check_int
from topkattn.cuda.launch import array_module, cdiv, launch, pow2_at_least, simulator_enabled
from topkattn.cuda.topk_select import topm_rows

THREADS = 128

LorannArrays = namedtuple("LorannArrays", "T cent cnorm a ascale b bscale start size slot_id norms "
                                          "data bits rank l2 maxsz live")
LorannArrays.__doc__ = "Device arrays of a LoRANN index in the layout of this module's docstring."


def lorann_arrays(index: Any, xp: ModuleType) -> LorannArrays:  # index: a LorannIndex (cuda must not import ann)
    """A built :class:`topkattn.ann.LorannIndex`'s search state (``index.search_state()``) as
    device arrays of ``xp``, copied to the device once, here, not per search; ``live`` lists
    the non-empty clusters (the only ones routed to)."""
    st = index.search_state()
    arrays = {name: val if np.isscalar(val) or val is None else xp.asarray(np.ascontiguousarray(val))
              for name, val in st.items()}
    return LorannArrays(**arrays, maxsz=max(1, int(st["size"].max())),
                        live=xp.asarray(np.flatnonzero(st["size"] > 0).astype(np.int64)))


def lorann_search(arrays: LorannArrays, q: Array, k: int, clusters_to_search: int,
                  points_to_rerank: int) -> tuple[Array, Array]:
    """Approximate top-k of queries q (Q, Dx) float32: (ids (Q, Kn) int64, scores (Q, Kn) float32).

    Scores are minus the distances (``q.x``; l2: ``-|q - x|^2``), like ``LorannIndex.search``'s;
    ids padded with -1 and -inf.  ``points_to_rerank`` = 0 returns the approximate scores of the
    best Kn.
    """
    xp = array_module(q)
    if q.ndim != 2 or q.shape[1] != arrays.data.shape[1]:
        raise ValueError(f"q must have shape (Q, {arrays.data.shape[1]}), got {tuple(q.shape)}")
    nc = arrays.cent.shape[0]
    for name, val, lo, hi in (("k", k, 1, None), ("clusters_to_search", clusters_to_search, 1, nc),
                              ("points_to_rerank", points_to_rerank, 0, None)):
        check_int(name, val, lo, hi)
    q = xp.ascontiguousarray(q, dtype=xp.float32)
    Q = q.shape[0]
    qr = q if arrays.T is None else xp.ascontiguousarray(q @ arrays.T)  # (Q, Dg)
    cs = qr @ arrays.cent.T  # (Q, Nc)
    if arrays.l2:
        cs = 2 * cs - arrays.cnorm
    def full(val):
        return xp.full(Q, val, dtype=xp.int64)
    n_live = int(arrays.live.shape[0])
    if n_live < nc:  # route among the non-empty clusters only
        cs = cs[:, arrays.live]  # (Q, live)
    _, clusters = topm_rows(xp, xp.ascontiguousarray(cs, dtype=xp.float32), None,
                            min(int(clusters_to_search), n_live), full(n_live), full(0), full(0), 0)
    if n_live < nc:
        clusters = xp.ascontiguousarray(arrays.live[clusters])  # (Q, Wc) cluster ids
    m = max(int(k), min(int(points_to_rerank), arrays.data.shape[0]))  # more would only pad
    cand_s, cand_i = lorann_score(arrays, qr, clusters, m)
    if points_to_rerank == 0:
        s = cand_s[:, :k].copy()
        if arrays.l2:  # 2 q.x - |x|^2 as -|q - x|^2
            s -= (q * q).sum(1)[:, None]
        return cand_i[:, :k].copy(), s
    ex = xp.empty((Q, m), dtype=xp.float32)
    threads = 32 if simulator_enabled() else THREADS
    launch(_rerank_kernel(), cdiv(Q * m, threads), threads, q, arrays.data, 1 if arrays.l2 else 0,
           cand_i, ex)
    s, i = topm_rows(xp, ex, cand_i, int(k), full(0), full(0), full(0), 0)
    return i, s


def lorann_score(arrays: LorannArrays, qr: Array, clusters: Array, m: int) -> tuple[Array, Array]:
    """The Mc best (scores (Q, Mc) float32, ids (Q, Mc) int64) of reduced queries qr (Q, Dg)
    over their searched ``clusters`` (Q, Wc) int64, scored by the quantised low-rank models."""
    xp = array_module(qr, clusters)
    Q, W = clusters.shape
    G = qr.shape[1]
    if arrays.bits == 0:
        g_ok = arrays.a.shape[1] == G
    else:
        g_ok = arrays.a.shape[2] == (G if arrays.bits == 8 else (G + 1) // 2)
    if not g_ok:
        raise ValueError(f"qr has G={G} columns, which does not match the index's models")
    maxsz = arrays.maxsz
    buf = xp.empty((Q, W, maxsz), dtype=xp.float32)
    bid = xp.empty((Q, W, maxsz), dtype=xp.int64)
    threads = 32 if simulator_enabled() else THREADS
    kern = _score_kernel(pow2_at_least(arrays.rank, 8), arrays.bits)
    launch(kern, Q * W, threads, xp.ascontiguousarray(qr, dtype=xp.float32),
           xp.ascontiguousarray(clusters, dtype=xp.int64), arrays.a, arrays.ascale, arrays.b,
           arrays.bscale, arrays.start, arrays.size, arrays.slot_id, arrays.norms,
           1 if arrays.l2 else 0, arrays.rank, buf, bid)
    zeros = xp.zeros(Q, dtype=xp.int64)
    return topm_rows(xp, buf.reshape(Q, W * maxsz), bid.reshape(Q, W * maxsz), int(m),
                     zeros, zeros, zeros, 0)


@functools.cache
def _score_kernel(RCAP, BITS):
    INF = math.inf

    @cuda.jit
    def score_kernel(qr, clusters, a, ascale, b, bscale, start, size, slot_id, norms, l2, R,
                     buf, bid):
        Q, W = clusters.shape
        G = qr.shape[1]
        pair = cuda.blockIdx.x
        qi = pair // W
        w = pair - qi * W
        c = clusters[qi, w]
        tx = cuda.threadIdx.x
        tq = cuda.shared.array(RCAP, types.float32)
        for v in range(tx, R, cuda.blockDim.x):  # tq = qr A_c, dequantising A on the fly
            acc = np.float32(0)
            for u in range(G):
                if BITS == 8:
                    av = np.float32(a[c, v, u])
                elif BITS == 4:
                    av = np.float32(((np.int32(a[c, v, u >> 1]) >> ((u & 1) * 4)) & 15) - 8)
                else:
                    av = a[c, u, v]
                acc += qr[qi, u] * av
            tq[v] = acc * ascale[c, v]
        cuda.syncthreads()
        n_c = size[c]
        p0 = start[c]
        maxsz = buf.shape[2]
        for t in range(tx, maxsz, cuda.blockDim.x):
            if t >= n_c:
                buf[qi, w, t] = np.float32(-INF)
                bid[qi, w, t] = -1
                continue
            z = p0 + t
            acc = np.float32(0)
            for v in range(R):
                if BITS == 8:
                    bv = np.float32(b[z, v])
                elif BITS == 4:
                    bv = np.float32(((np.int32(b[z, v >> 1]) >> ((v & 1) * 4)) & 15) - 8)
                else:
                    bv = b[z, v]
                acc += tq[v] * bv
            acc *= bscale[z]
            pid = slot_id[z]
            if l2 != 0:
                acc = np.float32(2) * acc - norms[pid]
            buf[qi, w, t] = acc
            bid[qi, w, t] = pid

    return score_kernel


@functools.cache
def _rerank_kernel():
    INF = math.inf

    @cuda.jit
    def rerank_kernel(q, data, l2, cand, ex):
        x = cuda.grid(1)
        Q, M = cand.shape
        if x >= Q * M:
            return
        qi = x // M
        i = x - qi * M
        pid = cand[qi, i]
        if pid < 0:
            ex[qi, i] = np.float32(-INF)
            return
        acc = np.float32(0)
        if l2 != 0:  # the sum of squared differences (the norm expansion loses small distances)
            for d in range(q.shape[1]):
                diff = q[qi, d] - data[pid, d]
                acc += diff * diff
            ex[qi, i] = -acc
        else:
            for d in range(q.shape[1]):
                acc += q[qi, d] * data[pid, d]
            ex[qi, i] = acc

    return rerank_kernel


__all__ = ["LorannArrays", "lorann_arrays", "lorann_search", "lorann_score"]
