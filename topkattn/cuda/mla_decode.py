"""CUDA MLA decode step: absorbed queries against the latent cache, top-k, attend.

Shape letters: B batch, H query heads, S cached tokens (persistent rows first),
C latent dim, R rope dim, D = C + R key dim (``Dk`` in code), K index slots (P' sinks +
W' window + K' selected).

With weight absorption (:mod:`topkattn.layers.mla`) every head scores the one shared
cache row [c_j ; kr_j] with its absorbed query, and the values are the latents c_j:

    score[b, h, j] = scale * q_abs[b, h] . keys[b, j]          keys (B, S, C + R)
    idx[b, h]      = [sinks | window | top-k of the rest]      (query position S - 1)
    o_lat[b, h]    = sum_i softmax_i(score[b, h, idx_i]) keys[b, idx_i, :C]

Launches: (1) one thread per (b, j) reads its cache row once and scores it for all
H heads (the (B, H, S) score vector is O(H S), smaller than the cache itself); (2) the
split-k top-k of :mod:`topkattn.cuda.topk_select`; (3) :func:`attend_selected`: one
thread per selected slot rescores it, then one block per (b, h), threads over the C
latent features, takes the softmax over the K selected scores (max subtracted).
:func:`attend_selected` also serves indices from another selector (a LoRANN index).
Reference: :func:`topkattn.ops.reference.topk_attention_reference` with T = 1, G = 1,
k = keys, v = keys[..., :C] (and :func:`topkattn.ops.selection.select_decode` for the
indices).  As a decode selector (the protocol of :mod:`topkattn.decoding.selectors`):
``layer.selector = ExactSelector(impl="cuda")``.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda, types

from topkattn.backend import Array
from topkattn.checks import check_int
from topkattn.cuda.launch import array_module, cdiv, launch, pow2_at_least, simulator_enabled
from topkattn.cuda.topk_select import topm_rows
from topkattn.ops.selection import RowBounds

THREADS = 128


def mla_decode(q_abs: Array, keys: Array, *, topk: int, C: int, scale: float, sinks: int = 0,
               window: int = 0) -> tuple[Array, Array, Array]:
    """One decode step: (o_lat (B, H, C), idx (B, H, K) int64, lse (B, H)).

    q_abs (B, H, C + R) absorbed queries; keys (B, S, C + R) the latent cache rows
    [c_j ; kr_j].  A row with a NaN among its attended scores gives NaN out and lse.
    """
    _check(q_abs, keys, C)
    idx = mla_select(q_abs, keys, topk=topk, scale=scale, sinks=sinks, window=window)
    o, lse = attend_selected(q_abs, keys, idx, C=C, scale=scale)
    return o, idx, lse


def attend_selected(q_abs: Array, keys: Array, idx: Array, *, C: int, scale: float) -> tuple[Array, Array]:
    """(o_lat (B, H, C), lse (B, H)): softmax over the keys ``idx`` (B, H, K) (-1 = empty) of
    each absorbed query, values keys[..., :C].  Any selector's indices (exact, LoRANN) fit."""
    xp = array_module(q_abs, keys, idx)
    B, H, Dk = _check(q_abs, keys, C)
    if idx.ndim != 3 or tuple(idx.shape[:2]) != (B, H):
        raise ValueError(f"idx must have shape (B, H, K) = ({B}, {H}, K), got {tuple(idx.shape)}")
    K = idx.shape[-1]
    o = xp.zeros((B, H, C), dtype=q_abs.dtype)
    lse = xp.full((B, H), -np.inf, dtype=q_abs.dtype)
    if K == 0 or B * H == 0:
        return o, lse
    idx = xp.ascontiguousarray(idx, dtype=xp.int64)
    sel = xp.empty((B, H, K), dtype=q_abs.dtype)
    threads = 32 if simulator_enabled() else THREADS
    launch(_sel_scores_kernel(q_abs.dtype.char), cdiv(B * H * K, threads), threads,
           xp.ascontiguousarray(q_abs), keys, idx, float(scale), sel)
    threads = 32 if simulator_enabled() else min(THREADS, pow2_at_least(C, 32))
    launch(_attend_kernel(q_abs.dtype.char), B * H, threads, keys, sel, idx, C, o, lse)
    return o, lse


def mla_select(q_abs: Array, keys: Array, *, topk: int, scale: float, sinks: int = 0, window: int = 0,
               return_scores: bool = False) -> Array | tuple[Array, Array]:
    """idx (B, H, K) of the decode query (position S - 1): forced keys first, then the top-k.

    Same rule as :func:`topkattn.ops.selection.select_decode`; with ``return_scores``
    also the (B, H, S) scores.
    """
    xp = array_module(q_abs, keys)
    B, H, Dk = q_abs.shape
    S = keys.shape[1]
    if keys.ndim != 3 or keys.shape[0] != B or keys.shape[2] != Dk:
        raise ValueError(f"keys must have shape (B, S, C + R) = ({B}, S, {Dk}), got {tuple(keys.shape)}")
    bounds = RowBounds(S, 1, topk=int(topk), causal=True, sinks=int(sinks), window=int(window))
    scores = xp.empty((B, H, S), dtype=q_abs.dtype)
    parts = [xp.broadcast_to(xp.asarray(bounds.forced_indices())[None], (B, H, bounds.n_sink + bounds.n_win))]
    if S > 0:
        threads = 32 if simulator_enabled() else THREADS
        launch(_scores_kernel(pow2_at_least(H, 1), q_abs.dtype.char), cdiv(B * S, threads), threads,
               xp.ascontiguousarray(q_abs), keys, float(scale), scores)  # keys may be strided
    if bounds.n_sel:
        n_rows = B * H
        def full(val):
            return xp.full(n_rows, val, dtype=xp.int64)
        _, ranked = topm_rows(xp, scores.reshape(n_rows, S), None, bounds.n_sel, full(S),
                              full(int(bounds.win_lo[0])), full(int(bounds.win_hi[0])),
                              bounds.sinks)
        parts.append(ranked.reshape(B, H, bounds.n_sel))
    idx = xp.ascontiguousarray(xp.concatenate(parts, axis=-1).astype(xp.int64))
    return (idx, scores) if return_scores else idx


def _check(q_abs, keys, C):
    if q_abs.ndim != 3:
        raise ValueError(f"q_abs must be (B, H, C + R), got shape {tuple(q_abs.shape)}")
    B, H, Dk = q_abs.shape
    if keys.ndim != 3 or keys.shape[0] != B or keys.shape[2] != Dk:
        raise ValueError(f"keys must have shape (B, S, C + R) = ({B}, S, {Dk}), got {tuple(keys.shape)}")
    if q_abs.dtype != keys.dtype or q_abs.dtype not in (np.float32, np.float64):
        raise TypeError(f"q_abs and keys must share a float32/float64 dtype, got {q_abs.dtype}, {keys.dtype}")
    check_int("C", C, 0, Dk)
    return B, H, Dk


@functools.cache
def _scores_kernel(HCAP, dchar):
    vt = types.float32 if dchar == "f" else types.float64
    cast = np.float32 if dchar == "f" else np.float64

    @cuda.jit
    def scores_kernel(q, keys, scale, scores):
        x = cuda.grid(1)
        B, H, Dk = q.shape
        S = keys.shape[1]
        if x >= B * S:
            return
        b = x // S
        j = x - b * S
        acc = cuda.local.array(HCAP, vt)
        for h in range(H):
            acc[h] = 0
        sc = cast(scale)
        for d in range(Dk):
            kv = keys[b, j, d]
            for h in range(H):
                acc[h] += (q[b, h, d] * sc) * kv
        for h in range(H):
            scores[b, h, j] = acc[h]

    return scores_kernel


@functools.cache
def _sel_scores_kernel(dchar):
    cast = np.float32 if dchar == "f" else np.float64

    @cuda.jit
    def sel_scores_kernel(q, keys, idx, scale, sel):
        x = cuda.grid(1)
        B, H, K = idx.shape
        if x >= B * H * K:
            return
        b = x // (H * K)
        h = (x // K) % H
        i = x % K
        j = idx[b, h, i]
        acc = cast(0)
        if j >= 0:
            sc = cast(scale)
            for d in range(q.shape[2]):
                acc += (q[b, h, d] * sc) * keys[b, j, d]
        sel[b, h, i] = acc

    return sel_scores_kernel


@functools.cache
def _attend_kernel(dchar):
    cast = np.float32 if dchar == "f" else np.float64
    NAN = math.nan
    INF = math.inf

    @cuda.jit
    def attend_kernel(keys, sel, idx, C, o, lse):
        row = cuda.blockIdx.x
        B, H, K = idx.shape
        b = row // H
        h = row - b * H
        tx = cuda.threadIdx.x
        mx = cast(-INF)
        bad = False
        for i in range(K):
            if idx[b, h, i] >= 0:
                s = sel[b, h, i]
                if s != s or s == INF:
                    bad = True
                elif s > mx:
                    mx = s
        if bad:
            for d in range(tx, C, cuda.blockDim.x):
                o[b, h, d] = NAN
            if tx == 0:
                lse[b, h] = NAN
            return
        if mx == -INF:
            return  # no key: zeros, lse -inf
        denom = cast(0)
        for i in range(K):
            if idx[b, h, i] >= 0:
                denom += math.exp(sel[b, h, i] - mx)
        for d in range(tx, C, cuda.blockDim.x):
            acc = cast(0)
            for i in range(K):
                j = idx[b, h, i]
                if j >= 0:
                    acc += math.exp(sel[b, h, i] - mx) * keys[b, j, d]
            o[b, h, d] = acc / denom
        if tx == 0:
            lse[b, h] = mx + math.log(denom)

    return attend_kernel


__all__ = ["mla_decode", "mla_select", "attend_selected"]
