"""Slow, obviously correct reference implementations every fast path is tested against.

Shape letters: B batch, H query heads, G KV heads, T queries, S keys, D head dim, Dv value dim.
Everything is computed in float64 with full (T, S) score matrices and plain loops.
"""
import numpy as np

from topkattn.backend import to_numpy
from topkattn.ops.selection import forget_draws


def rank_row(scores, candidates):
    """Candidate key indices of one row sorted by score, descending; ties to the lower index.

    NaN ranks above every number (so NaN inputs reach the output).
    scores: (S,) float; candidates: (S,) bool.  Returns an int64 array.
    """
    js = np.flatnonzero(candidates)
    key = np.where(np.isnan(scores[js]), np.inf, scores[js])
    return js[np.argsort(-key, kind="stable")]


def visible_and_forced(S, T, t, causal, sinks, window):
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


def topk_attention_reference(q, k, v, *, topk, causal=True, scale=None, temperature=1.0,
                             forget_rate=0.0, seed=None, sinks=0, window=0):
    """Dense reference of ``topk_attention_forward``.

    Returns (out (B, H, T, Dv), mask (B, H, T, S) bool of attended keys, lse (B, H, T)),
    all float64 / bool NumPy arrays.  Uses the same forgetting draws as the fast paths.
    The row geometry is written out here from the definition, not taken from the fast
    paths' ``RowBounds``.
    """
    q, k, v = (to_numpy(a).astype(np.float64) for a in (q, k, v))
    B, H, T, D = q.shape
    G, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    rep = H // G
    scale = 1.0 / np.sqrt(D) if scale is None else scale
    n_sel = min(topk, S)
    drop = forget_draws(seed, (B, H, T, n_sel), forget_rate)
    out = np.zeros((B, H, T, Dv))
    lse = np.full((B, H, T), -np.inf)
    mask = np.zeros((B, H, T, S), dtype=bool)
    for b in range(B):
        for h in range(H):
            g = h // rep
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
                if not row.any():
                    continue
                s = scores[t, row]
                if np.isnan(s).any():
                    out[b, h, t] = np.nan
                    lse[b, h, t] = np.nan
                    continue
                m = s.max()
                p = np.exp(s - m)
                lse[b, h, t] = m + np.log(p.sum())
                out[b, h, t] = (p / p.sum()) @ v[b, g][row]
    return out, mask, lse


def masked_attention_reference(q, k, v, mask, scale):
    """Softmax attention restricted to ``mask`` (B, H, T, S) in float64: out (B, H, T, Dv)."""
    q, k, v = (to_numpy(a).astype(np.float64) for a in (q, k, v))
    H, G = q.shape[1], k.shape[1]
    kh = np.repeat(k, H // G, axis=1)
    vh = np.repeat(v, H // G, axis=1)
    s = np.einsum("bhtd,bhsd->bhts", q, kh) * scale
    s = np.where(mask, s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.where(mask, np.exp(s - m), 0.0)
    denom = p.sum(-1, keepdims=True)
    return np.einsum("bhts,bhsd->bhtd", p / np.where(denom > 0, denom, 1.0), vh)


def dynamic_topk_reference(q, k, *, tail_bound, max_topk=None, causal=True, scale=None,
                           sinks=0, window=0):
    """Dense reference of ``selection.select_dynamic_topk`` with the true left-out mass.

    Returns (k_chosen, certified, bound, true_out_mass), each (B, H, T): for every row the
    smallest k (1 <= k <= max_topk) with n_rest * exp(s_(k) - lse(selected)) <= tail_bound
    (tail_bound = 0: all candidates), and the exact softmax mass of the unselected keys.
    """
    q, k = (to_numpy(a).astype(np.float64) for a in (q, k))
    B, H, T, D = q.shape
    G, S = k.shape[1], k.shape[2]
    scale = 1.0 / np.sqrt(D) if scale is None else scale
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


def tail_topk_attention_reference(q, k, v, *, topk, causal=True, scale=None, sinks=0, window=0):
    """Dense reference of ``tail_topk_attention``: out (B, H, T, Dv) float64.

    Per row: p = softmax over the visible keys, A = the keys top-k attention attends
    (``topk_attention_reference``'s mask), U = visible keys outside A;
    out = sum_A p_j v_j + (1 - sum_A p_j) * mean_U v_j (the last term 0 when U is empty).
    """
    _, mask, _ = topk_attention_reference(q, k, v, topk=topk, causal=causal, scale=scale,
                                          sinks=sinks, window=window)
    q, k, v = (to_numpy(a).astype(np.float64) for a in (q, k, v))
    B, H, T, D = q.shape
    G, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    scale = 1.0 / np.sqrt(D) if scale is None else scale
    out = np.zeros((B, H, T, Dv))
    for b in range(B):
        for h in range(H):
            g = h // (H // G)
            scores = (q[b, h] @ k[b, g].T) * scale
            for t in range(T):
                visible, _ = visible_and_forced(S, T, t, causal, sinks, window)
                if not visible.any():
                    continue
                s = scores[t, visible]
                p = np.exp(s - s.max())
                p /= p.sum()
                a = mask[b, h, t][visible]
                vv = v[b, g][visible]
                out[b, h, t] = p[a] @ vv[a]
                if (~a).any():
                    out[b, h, t] += (1.0 - p[a].sum()) * vv[~a].mean(0)
    return out
