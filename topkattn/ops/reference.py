"""Slow, obviously correct reference implementations every fast path is tested against.

Shape letters: B batch, H query heads, G KV heads, T queries, S keys, D head dim, Dv value dim.
Everything is computed in float64 with full (T, S) score matrices and plain loops.

The non-finite rule every implementation follows (:func:`attend_row` writes it out):
a NaN or +inf among the scores a row attends makes that row's output and logsumexp NaN;
an -inf score gets weight 0; a row that attends no key, or only keys scoring -inf, gives
zeros and logsumexp -inf; otherwise out = sum_j p_j v_j over the attended keys only (a NaN
or inf value makes the rows attending it non-finite, and no other row).  Backward
(:func:`masked_attention_grad_reference`): a row whose output is not finite (a "NaN row")
gets a NaN dq and sends nothing to dk, dv; a row with logsumexp -inf gets zero dq.
The default scale is 1 / sqrt(D) (1 for D = 0, where every score is 0).
"""
from __future__ import annotations

import numpy as np

from topkattn.backend import Array, to_numpy
from topkattn.ops.selection import forget_draws


def rank_row(scores: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Candidate key indices of one row sorted by score, descending; ties to the lower index.

    NaN ranks above every number (so NaN inputs reach the output).
    scores: (S,) float; candidates: (S,) bool.  Returns an int64 array.
    """
    js = np.flatnonzero(candidates)
    key = np.where(np.isnan(scores[js]), np.inf, scores[js])
    return js[np.argsort(-key, kind="stable")]


def default_scale(D: int) -> float:
    """1 / sqrt(D), the default score scale (1 for D = 0: an empty dot product scores 0)."""
    return 1.0 / np.sqrt(max(int(D), 1))


def attend_row(s: np.ndarray, vv: np.ndarray) -> tuple[np.ndarray, float, np.ndarray | None]:
    """Softmax attention of one row over its attended keys, by the non-finite rule above.

    s: (n,) float64 attended scores; vv: (n, Dv) their values.
    Returns (out (Dv,), lse, p (n,)): p is None for a NaN row (out, lse NaN) and all zeros
    for a row with nothing to attend (out 0, lse -inf).
    """
    Dv = vv.shape[1]
    if np.isnan(s).any() or (s == np.inf).any():
        return np.full(Dv, np.nan), np.nan, None
    if not (s > -np.inf).any():
        return np.zeros(Dv), -np.inf, np.zeros(len(s))
    m = s.max()
    e = np.exp(s - m)  # -inf scores give 0
    p = e / e.sum()
    with np.errstate(invalid="ignore", over="ignore"):
        out = (p[:, None] * vv).sum(0)  # every attended key, so 0 * NaN stays NaN
    return out, m + np.log(e.sum()), p


def visible_and_forced(S: int, T: int, t: int, causal: bool, sinks: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """(S,) bool masks of query row t: the keys it may see, and those it always attends.

    Query t sits at position S - T + t; causal rows see keys 0..pos, others all S keys.
    Forced: the first ``sinks`` keys and the ``window`` most recent visible keys.
    """
    js = np.arange(S)
    pos = S - T + t
    visible = js <= pos if causal else np.ones(S, dtype=bool)
    forced = visible & (js < sinks)
    if window > 0:
        forced[np.flatnonzero(visible)[-window:]] = True
    return visible, forced


def topk_attention_reference(q: Array, k: Array, v: Array, *, topk: int, causal: bool = True,
                             scale: float | None = None, temperature: float = 1.0, forget_rate: float = 0.0,
                             seed: int | np.random.Generator | None = None, sinks: int = 0,
                             window: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dense reference of ``topk_attention_forward``.

    Returns (out (B, H, T, Dv), mask (B, H, T, S) bool of attended keys, lse (B, H, T)),
    all float64 / bool NumPy arrays.  Uses the same forgetting draws as the fast paths.
    The row geometry is written out here from the definition, not taken from the fast
    paths' ``RowBounds``.
    """
    q, k, v = (to_numpy(a).astype(np.float64) for a in (q, k, v))
    B, H, T, D = q.shape
    G, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    rep = H // G if G else 1
    scale = default_scale(D) if scale is None else scale
    n_sel = min(topk, S)
    drop = forget_draws(seed, (B, H, T, n_sel), forget_rate)
    out = np.zeros((B, H, T, Dv))
    lse = np.full((B, H, T), -np.inf)
    mask = np.zeros((B, H, T, S), dtype=bool)
    for b in range(B):
        for h in range(H):
            g = h // rep
            with np.errstate(invalid="ignore", over="ignore"):
                scores = (q[b, h] @ k[b, g].T) * (scale / temperature)  # (T, S)
            for t in range(T):
                visible, forced = visible_and_forced(S, T, t, causal, sinks, window)
                ranked = rank_row(scores[t], visible & ~forced)
                n = n_sel
                if drop is None:
                    chosen = ranked[:n]
                else:
                    d = drop[b, h, t]
                    head = ranked[:n]
                    kept = head[~d[:len(head)]]
                    chosen = np.concatenate([kept, ranked[n:n + int(d.sum())]])
                row = forced.copy()
                row[chosen] = True
                mask[b, h, t] = row
                out[b, h, t], lse[b, h, t], _ = attend_row(scores[t, row], v[b, g][row])
    return out, mask, lse


def masked_attention_reference(q: Array, k: Array, v: Array, mask: np.ndarray, scale: float) -> np.ndarray:
    """Softmax attention restricted to ``mask`` (B, H, T, S) in float64: out (B, H, T, Dv).

    Each row attends only its masked keys (:func:`attend_row`): a NaN or inf in a key or
    value outside a row's mask never reaches that row.
    """
    return _masked_rows(q, k, v, mask, scale)[0]


def masked_attention_grad_reference(q: Array, k: Array, v: Array, mask: np.ndarray, scale: float,
                                    dout: Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients (dq, dk, dv) in float64 of sum(out * dout), out = masked_attention_reference.

    The rule of the fast backward passes: a NaN row (output not finite) gets a NaN dq and
    sends nothing to dk, dv, so it never poisons keys other rows share; a row with nothing
    to attend gets zeros; a key a row weighs 0 (score -inf) gets nothing from that row.
    """
    out, _, probs, (q, k, v) = _masked_rows(q, k, v, mask, scale)
    dout = to_numpy(dout).astype(np.float64)
    H, G = q.shape[1], k.shape[1]
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for (b, h, t), (js, p) in probs.items():
        g = h // (H // G)
        if p is None or not np.isfinite(out[b, h, t]).all():
            dq[b, h, t] = np.nan
            continue
        w = p > 0  # keys with weight: only they receive (or send) gradient
        js, p = js[w], p[w]
        go = dout[b, h, t]
        dv[b, g, js] += p[:, None] * go
        ds = p * (v[b, g, js] @ go - go @ out[b, h, t]) * scale
        dq[b, h, t] = ds @ k[b, g, js]
        dk[b, g, js] += ds[:, None] * q[b, h, t]
    return dq, dk, dv


def _masked_rows(q, k, v, mask, scale):
    """out, lse (B, H, T) and {(b, h, t): (attended key indices, p or None)} of masked attention."""
    q, k, v = (to_numpy(a).astype(np.float64) for a in (q, k, v))
    mask = np.asarray(mask, dtype=bool)
    B, H, T, _ = q.shape
    G, Dv = k.shape[1], v.shape[3]
    out = np.zeros((B, H, T, Dv))
    lse = np.full((B, H, T), -np.inf)
    probs = {}
    for b in range(B):
        for h in range(H):
            g = h // (H // G)
            for t in range(T):
                js = np.flatnonzero(mask[b, h, t])
                with np.errstate(invalid="ignore", over="ignore"):
                    s = (k[b, g, js] @ q[b, h, t]) * scale
                out[b, h, t], lse[b, h, t], p = attend_row(s, v[b, g, js])
                probs[b, h, t] = (js, p)
    return out, lse, probs, (q, k, v)


def dense_attention_reference(q: Array, k: Array, v: Array, *, causal: bool = True,
                              scale: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Dense reference of ``dense_attention_forward``: (out (B, H, T, Dv), lse (B, H, T)), float64."""
    mask = causal_mask(q.shape, k.shape, causal)
    scale = default_scale(q.shape[-1]) if scale is None else scale
    out, lse, _, _ = _masked_rows(q, k, v, mask, scale)
    return out, lse


def causal_mask(q_shape: tuple[int, ...], k_shape: tuple[int, ...], causal: bool = True) -> np.ndarray:
    """(B, H, T, S) bool: the keys each query may see (query t sits at S - T + t)."""
    B, H, T = q_shape[:3]
    S = k_shape[2]
    vis = np.ones((T, S), dtype=bool)
    if causal:
        vis = np.arange(S)[None, :] <= (np.arange(T) + S - T)[:, None]
    return np.broadcast_to(vis, (B, H, T, S))


def dynamic_topk_reference(q: Array, k: Array, *, tail_bound: float, max_topk: int | None = None, causal: bool = True,
                           scale: float | None = None, sinks: int = 0,
                           window: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Dense reference of ``selection.select_dynamic_topk`` with the true left-out mass.

    Returns (k_chosen, certified, bound, true_out_mass), each (B, H, T): for every row the
    smallest k (1 <= k <= max_topk) with n_rest * exp(s_(k) - lse(selected)) <= tail_bound
    (tail_bound = 0: all candidates), and the exact softmax mass of the unselected keys.
    """
    q, k = (to_numpy(a).astype(np.float64) for a in (q, k))
    B, H, T, D = q.shape
    G, S = k.shape[1], k.shape[2]
    scale = default_scale(D) if scale is None else scale
    max_topk = S if max_topk is None else max_topk
    n_sel = min(max_topk, S)
    out = [np.zeros((B, H, T), dtype=t) for t in (np.int64, bool, np.float64, np.float64)]
    for b in range(B):
        for h in range(H):
            scores = q[b, h] @ k[b, h // (H // G)].T * scale
            for t in range(T):
                visible, forced = visible_and_forced(S, T, t, causal, sinks, window)
                ranked = rank_row(scores[t], visible & ~forced)
                n = len(ranked)
                chosen, ok, bnd = min(n, n_sel), False, 0.0
                for kk in range(1, min(n, n_sel) + 1):
                    sel = np.concatenate([scores[t, forced], scores[t, ranked[:kk]]])
                    lse = np.logaddexp.reduce(sel)
                    bnd = (n - kk) * np.exp(scores[t, ranked[kk - 1]] - lse)
                    if n - kk == 0 or (tail_bound > 0 and bnd <= tail_bound):
                        chosen, ok = kk, True
                        break
                attended = forced.copy()
                attended[ranked[:chosen]] = True
                total = np.logaddexp.reduce(scores[t, visible]) if visible.any() else 0.0
                true_out = np.exp(scores[t, visible & ~attended] - total).sum()
                out[0][b, h, t], out[1][b, h, t] = chosen, ok or chosen >= n
                out[2][b, h, t], out[3][b, h, t] = (bnd if n else 0.0), true_out
    return tuple(out)


def tail_topk_attention_reference(q: Array, k: Array, v: Array, *, topk: int, causal: bool = True,
                                  scale: float | None = None, sinks: int = 0, window: int = 0,
                                  mask: np.ndarray | None = None) -> np.ndarray:
    """Dense reference of ``tail_topk_attention``: out (B, H, T, Dv) float64.

    Per row: p = softmax over the visible keys, A = the keys top-k attention attends
    (``topk_attention_reference``'s mask, or ``mask`` (B, H, T, S) bool when given: e.g. a
    fast path's own selection), U = visible keys outside A;
    out = sum_A p_j v_j + (1 - sum_A p_j) * mean_U v_j (the last term 0 when U is empty).
    """
    if mask is None:
        _, mask, _ = topk_attention_reference(q, k, v, topk=topk, causal=causal, scale=scale,
                                              sinks=sinks, window=window)
    q, k, v = (to_numpy(a).astype(np.float64) for a in (q, k, v))
    B, H, T, D = q.shape
    G, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    scale = default_scale(D) if scale is None else scale
    out = np.zeros((B, H, T, Dv))
    for b in range(B):
        for h in range(H):
            g = h // (H // G)
            with np.errstate(invalid="ignore", over="ignore"):
                scores = (q[b, h] @ k[b, g].T) * scale
            for t in range(T):
                visible, _ = visible_and_forced(S, T, t, causal, sinks, window)
                s = scores[t, visible]
                vv = v[b, g][visible]
                a = mask[b, h, t][visible]
                _, _, p = attend_row(s, vv)  # the dense softmax over every visible key
                if p is None:
                    out[b, h, t] = np.nan
                    continue
                if not (p > 0).any():
                    continue  # nothing to attend: zeros
                with np.errstate(invalid="ignore", over="ignore"):
                    out[b, h, t] = (p[a, None] * vv[a]).sum(0)
                    if (~a).any():
                        out[b, h, t] += (1.0 - p[a].sum()) * vv[~a].mean(0)
    return out


def block_topk_attention_reference(q: Array, k: Array, v: Array, *, block_size: int, topk_blocks: int,
                                   causal: bool = True,
                                   scale: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Brute-force reference of ``block_topk_attention_forward`` (MoBA block selection), float64.

    For each query row: the mean of every block's keys (block n holds keys n * block_size ..
    min((n + 1) * block_size, S) - 1), the gate q . mean_n, the candidate blocks ranked by
    :func:`rank_row` (gate descending, ties to the lower block, NaN first); under ``causal``
    the own block (holding position S - T + t) first, then the best topk_blocks - 1 blocks
    before it; without, the best topk_blocks blocks.  The row attends every key of its
    blocks that it may see (:func:`attend_row`).  The row geometry is written out here from
    the definition, not taken from the fast paths' ``BlockBounds``.

    Returns (out (B, H, T, Dv), mask (B, H, T, S) bool, lse (B, H, T), blocks (B, H, T, Kb)
    int64 in rank order, -1 padded), Kb = min(topk_blocks, number of blocks).
    """
    q, k, v = (to_numpy(a).astype(np.float64) for a in (q, k, v))
    B, H, T, D = q.shape
    G, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    rep = H // G if G else 1
    scale = default_scale(D) if scale is None else scale
    n_blocks = -(-S // block_size)
    n_sel = min(topk_blocks, n_blocks)
    first = np.arange(n_blocks) * block_size  # first key of each block
    out = np.zeros((B, H, T, Dv))
    lse = np.full((B, H, T), -np.inf)
    mask = np.zeros((B, H, T, S), dtype=bool)
    blocks = np.full((B, H, T, n_sel), -1, dtype=np.int64)
    for b in range(B):
        for h in range(H):
            g = h // rep
            means = np.array([k[b, g, j0:j0 + block_size].mean(0) for j0 in first]).reshape(n_blocks, D)
            for t in range(T):
                pos = S - T + t
                visible = np.arange(S) <= pos if causal else np.ones(S, dtype=bool)
                if not visible.any():
                    continue  # sees no key: selects nothing, attends nothing
                with np.errstate(invalid="ignore", over="ignore"):
                    gate = means @ q[b, h, t]  # (n_blocks,)
                if causal:
                    own = pos // block_size
                    chosen = np.concatenate([[own], rank_row(gate, np.arange(n_blocks) < own)[:n_sel - 1]])
                else:
                    chosen = rank_row(gate, np.ones(n_blocks, dtype=bool))[:n_sel]
                blocks[b, h, t, :len(chosen)] = chosen
                row = np.zeros(S, dtype=bool)
                for n in chosen:
                    row[first[n]:first[n] + block_size] = True
                row &= visible
                mask[b, h, t] = row
                with np.errstate(invalid="ignore", over="ignore"):
                    s = (k[b, g, row] @ q[b, h, t]) * scale
                out[b, h, t], lse[b, h, t], _ = attend_row(s, v[b, g][row])
    return out, mask, lse, blocks
