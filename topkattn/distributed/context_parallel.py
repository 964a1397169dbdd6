"""Context-parallel exact top-k attention: keys and values sharded by position over MPI ranks.

Shape letters: B batch, H query heads, G KV heads, T queries, S keys in all (every rank's
together), Sp the keys this rank holds, D head dim, Dv value dim, K index slots per query,
M ranked candidates per row; ``rows`` are the flattened (b, h, t).

Rank p holds the keys at global positions [key_offset_p, key_offset_p + Sp); the queries are
the same on every rank and sit at global position S - T + t (causal alignment uses S).

Forward, on every rank:
  1. score the local keys (query chunks, as :func:`topkattn.ops.selection.select_topk` does)
     and keep each row's M = K' + (forgetful refills) best local candidates;
  2. all-gather their (score, global index): (ranks, rows, M); the global top M is inside the
     union of the local top Ms, so ranking the union (ties to the lower global index, NaN on
     top) gives exactly the single-process selection;
  3. forgetful masking with the seed's draws (the same on every rank), forced keys (sinks,
     window) first: the index tensor (B, H, T, K) of global positions, equal on every rank;
  4. attend over the rank's own selected keys (:func:`topkattn.ops.sparse_attention.
     sparse_attention_forward` with local indices): partial out_p and lse_p;
  5. merge: lse = logsumexp_p lse_p, out = sum_p exp(lse_p - lse) out_p.
Backward: :func:`topkattn.ops.sparse_attention.sparse_attention_backward` over the local keys
with the merged out and lse gives dk_local, dv_local and this rank's share of dq; dq is
summed over the ranks.  Traffic per call: 2 * ranks * rows * M numbers for the selection,
rows * (ranks + Dv) for the merge, rows * D for dq: O(T * K * ranks), never O(T * S).
"""
from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from topkattn.backend import Array, as_engine_array, get_array_module, to_caller_kind
from topkattn.checks import check_bool, check_int, logsumexp_rows
from topkattn.distributed.comm import agree, allgather_rows, allreduce_sum, settings_mismatch
from topkattn.ops.dense_attention import check_dout, default_scale
from topkattn.ops.selection import TILE_BYTES, RowBounds, apply_forgetting, forget_draws, ranked_topm_xp
from topkattn.ops.sparse_attention import SparseAttentionSaved, sparse_attention_backward, sparse_attention_forward
from topkattn.ops.topk_attention import check_inputs


def topk_attention(q: Array, k_local: Array, v_local: Array, *, comm: Any, topk: int, key_offset: int,
                   causal: bool = True, scale: float | None = None, temperature: float = 1.0, forget_rate: float = 0.0,
                   seed: int | np.random.Generator | None = None, sinks: int = 0, window: int = 0,
                   chunk_size: int | None = None) -> Array:
    """Exact top-k attention over keys sharded along S: ``out`` (B, H, T, Dv), complete on every rank.

    q (B, H, T, D), the same on every rank; k_local (B, G, Sp, D) and v_local (B, G, Sp, Dv),
    this rank's keys and values, which start at global position ``key_offset``; the ranks'
    shards must tile [0, S) without gaps or overlaps.  ``comm``: an mpi4py communicator.
    The other arguments are those of :func:`topkattn.topk_attention` (integer ``topk``; a
    ``seed`` makes forgetful masking reproducible and equal on every rank).  The result
    equals the single-process op on the concatenated keys, to float tolerance.
    """
    out, _ = topk_attention_forward(q, k_local, v_local, comm=comm, topk=topk, key_offset=key_offset,
                                    causal=causal, scale=scale, temperature=temperature,
                                    forget_rate=forget_rate, seed=seed, sinks=sinks, window=window,
                                    chunk_size=chunk_size)
    return out


def topk_attention_forward(q: Array, k_local: Array, v_local: Array, *, comm: Any, topk: int, key_offset: int,
                           causal: bool = True, scale: float | None = None, temperature: float = 1.0,
                           forget_rate: float = 0.0, seed: int | np.random.Generator | None = None, sinks: int = 0,
                           window: int = 0, chunk_size: int | None = None) -> tuple[Array, ContextParallelSaved]:
    """``(out, saved)`` of :func:`topk_attention`; ``saved.global_idx`` (B, H, T, K) holds the
    selected global positions (equal on every rank), ``saved.idx`` their local positions on
    this rank (-1 where another rank owns the key)."""
    like = q
    error = None
    try:  # every check before the first collective: a rank that fails must not leave the others waiting
        q, k, v = (as_engine_array(a, n) for a, n in ((q, "q"), (k_local, "k_local"), (v_local, "v_local")))
        if isinstance(topk, str):
            raise ValueError(f"topk must be an integer >= 1 (dynamic k is single-process), got {topk!r}")
        check_inputs(q, k, v, topk=topk, scale=scale, temperature=temperature, forget_rate=forget_rate,
                     sinks=sinks, window=window, chunk_size=chunk_size, seed=seed)
        causal = check_bool("causal", causal)
        key_offset = check_int("key_offset", key_offset, 0)
        if forget_rate and seed is None:
            raise ValueError("forget_rate > 0 needs a seed in context-parallel attention (every rank must "
                             "draw the same keys to forget)")
    except (TypeError, ValueError) as e:
        error = e
    agree(comm, error)
    options = dict(topk=int(topk), causal=causal, sinks=int(sinks), window=int(window), forget_rate=float(forget_rate),
                   seed=_seed_key(seed) if forget_rate else None,
                   scale=scale if scale is None else float(scale), temperature=float(temperature))
    S = _global_keys(comm, q, k, v, key_offset, options)
    xp = get_array_module(q, k, v)
    B, H, T, D = q.shape
    Sp = k.shape[2]
    eff_scale = (default_scale(D) if scale is None else float(scale)) / float(temperature)
    bounds = RowBounds(S, T, topk=int(topk), causal=causal, sinks=int(sinks), window=int(window))
    n_sel = bounds.n_sel
    drop = forget_draws(seed, (B, H, T, n_sel), forget_rate)  # host, equal on every rank
    m = n_sel + (0 if drop is None else int(drop.sum(axis=-1).max(initial=0)))

    idx = xp.full((B, H, T, bounds.n_slots), -1, dtype=xp.int64)
    forced = xp.asarray(bounds.forced_indices())  # (T, F)
    idx[..., :forced.shape[1]] = forced
    if m:
        scores, keys = _local_candidates(q, k, bounds, m, eff_scale, key_offset, chunk_size)  # (rows, M)
        ranked = merge_candidates(allgather_rows(comm, scores), allgather_rows(comm, keys), m)  # (rows, M)
        if drop is None:
            ranked = ranked[:, :n_sel]
        else:
            ranked = apply_forgetting(ranked, xp.asarray(drop.reshape(-1, n_sel)), n_sel)
        idx[..., forced.shape[1]:] = ranked.reshape(B, H, T, n_sel)

    local = xp.where((idx >= key_offset) & (idx < key_offset + Sp), idx - key_offset, -1)
    out_p, part = sparse_attention_forward(q, k, v, local, eff_scale)
    lse = logsumexp_rows(xp.moveaxis(allgather_rows(comm, part.lse), 0, -1))  # (B, H, T) over the ranks
    with np.errstate(invalid="ignore"):
        w = xp.where(xp.isneginf(lse), 0, xp.exp(part.lse - xp.where(xp.isneginf(lse), 0, lse)))
    out = allreduce_sum(comm, out_p * w[..., None].astype(q.dtype))  # (B, H, T, Dv)
    saved = ContextParallelSaved(q, k, v, local, out, lse.astype(q.dtype), eff_scale)
    saved.global_idx, saved.comm, saved.like = idx, comm, like
    return to_caller_kind(out, like), saved


def topk_attention_backward(dout: Array, saved: ContextParallelSaved) -> tuple[Array, Array, Array]:
    """``(dq, dk_local, dv_local)``: dq complete on every rank, dk/dv of this rank's own keys."""
    if not isinstance(saved, ContextParallelSaved):
        raise TypeError(f"saved must come from distributed topk_attention_forward, got {type(saved).__name__}")
    error = None
    try:
        dout = check_dout(dout, saved.out)
    except (TypeError, ValueError) as e:
        error = e
    agree(saved.comm, error)
    dq_p, dk, dv = sparse_attention_backward(dout.astype(saved.q.dtype, copy=False), saved)
    dq = allreduce_sum(saved.comm, dq_p)
    return tuple(to_caller_kind(g, saved.like) for g in (dq, dk, dv))


class ContextParallelSaved(SparseAttentionSaved):
    """What backward needs on this rank: local keys and indices, the merged out and lse."""

    __slots__ = ("global_idx", "comm", "like")


def _seed_key(seed):
    """What the ranks must agree on of a forgetting seed: the integer, or "Generator" (a generator's
    state is not compared)."""
    return int(seed) if isinstance(seed, numbers.Integral) else None if seed is None else "Generator"


def _global_keys(comm, q, k, v, key_offset, options):
    """S, the keys of every rank together; ValueError on every rank unless the shards tile [0, S)
    and every rank has the same queries' shape, dtype and head layout and the same ``options``
    (topk, causal, ...: a rank would otherwise select differently, or abort in a collective of
    mismatched sizes)."""
    mine = (key_offset, k.shape[2], tuple(q.shape), k.shape[0], k.shape[1], k.shape[3], v.shape[3], q.dtype.str,
            options)
    shards = comm.allgather(mine)
    mismatch = settings_mismatch("context-parallel attention", [s[8] for s in shards])
    if mismatch is not None:
        raise mismatch
    layouts = {s[2:8] for s in shards}
    if len(layouts) != 1:
        raise ValueError("every rank must pass the same q shape, dtype, batch, KV heads and head dims; got "
                         + ", ".join(f"rank {r}: q {s[2]}, k (B={s[3]}, G={s[4]}, D={s[5]}), Dv={s[6]}, {s[7]}"
                                     for r, s in enumerate(shards)))
    end = 0
    for off, n in sorted((s[0], s[1]) for s in shards):
        if off != end:
            raise ValueError("the ranks' key shards (key_offset, Sp) must tile [0, S) without gaps or overlaps, "
                             f"got {[(s[0], s[1]) for s in shards]}")
        end = off + n
    return end


def _local_candidates(q, k, bounds, m, scale, offset, chunk_size):
    """Each row's ``m`` best local candidates: (scores (rows, M), global indices (rows, M)), -1 padded."""
    xp = get_array_module(q, k)
    B, H, T, D = q.shape
    G, Sp = k.shape[1], k.shape[2]
    rep = H // G
    scores = xp.full((B, H, T, m), -xp.inf, dtype=q.dtype)
    keys = xp.full((B, H, T, m), -1, dtype=xp.int64)
    if Sp == 0:  # a rank without keys offers no candidate
        return scores.reshape(-1, m), keys.reshape(-1, m)
    if chunk_size is None:
        chunk_size = max(1, TILE_BYTES // max(1, B * H * Sp * q.dtype.itemsize))
    qs = (q * q.dtype.type(scale)).reshape(B, G, rep, T, D)
    kt = k.swapaxes(-1, -2)  # (B, G, D, Sp)
    for t0 in range(0, T, chunk_size):
        t1 = min(T, t0 + chunk_size)
        c = t1 - t0
        tile = xp.matmul(qs[:, :, :, t0:t1].reshape(B, G, rep * c, D), kt).reshape(B * H * c, Sp)
        cand = xp.asarray(bounds.candidate_mask(t0, t1, Sp, col0=offset))  # (c, Sp): only this rank's columns
        cand = xp.broadcast_to(cand[None], (B * H, c, Sp)).reshape(B * H * c, Sp)
        cols = ranked_topm_xp(tile, cand, m)  # (B*H*c, M) local columns, -1 padded
        got = cols >= 0
        s = xp.where(got, xp.take_along_axis(tile, xp.maximum(cols, 0), axis=-1), -xp.inf)
        scores[:, :, t0:t1] = s.reshape(B, H, c, m)
        keys[:, :, t0:t1] = xp.where(got, cols + offset, -1).reshape(B, H, c, m)
    return scores.reshape(-1, m), keys.reshape(-1, m)


def merge_candidates(scores: Array, keys: Array, m: int) -> Array:
    """The global top ``m`` of every row from the ranks' candidates (ranks, rows, M): (rows, M)
    global indices in rank order (score descending, ties to the lower index), -1 padded."""
    xp = get_array_module(scores, keys)
    P, n_rows, _ = scores.shape
    s = scores.transpose(1, 0, 2).reshape(n_rows, P * m)
    j = keys.transpose(1, 0, 2).reshape(n_rows, P * m)
    by_key = xp.argsort(xp.where(j >= 0, j, np.iinfo(np.int64).max), axis=-1, kind="stable")  # ties: lower key
    s, j = xp.take_along_axis(s, by_key, axis=-1), xp.take_along_axis(j, by_key, axis=-1)
    cols = ranked_topm_xp(s, j >= 0, m)
    return xp.where(cols >= 0, xp.take_along_axis(j, xp.maximum(cols, 0), axis=-1), -1)

