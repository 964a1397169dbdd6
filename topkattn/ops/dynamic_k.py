"""Dynamic k: the one tail-bound computation, for training-time selection and for decoding.

Shape letters: rows (one per (batch, head, query), spelled out), M ranked candidates per row
(``m`` in code once capped at ``max_topk``).

A row has forced keys (sinks, window) with logsumexp ``lse_forced`` and ``n_cand``
selectable candidates, of which the retriever returned ``n_ret`` with exact scores,
ranked ``vals[:, 0] >= vals[:, 1] >= ...``.  Selecting the first k of them:

    lse_k   = logsumexp(forced scores, vals[:, :k])
    nominal = (n_cand - k) * exp(vals[:, k-1] - lse_k)

``nominal`` bounds the softmax mass outside the selection **if** every unselected
candidate scores at most s_(k) = vals[:, k-1]: true for exact selection (every
candidate ranked, :func:`topkattn.ops.selection.select_dynamic_topk`), only hoped for
with an ANN index.  k is the smallest value (1 <= k <= max_topk) with nominal <=
tail_bound (tail_bound = 0: every candidate); :func:`choose_k` computes it.
For a retriever, :func:`dynamic_k_from_ranked` also certifies the ``n_cand - n_ret``
candidates it did not return, each scoring at most ``outside_upper`` (e.g. a
Cauchy-Schwarz bound):

    rigorous = (n_ret - k) * exp(s_(k) - lse_k) + (n_cand - n_ret) * exp(outside_upper - lse_k)

which holds whatever the index missed (the outside mass over all keys is at most the
outside mass measured against the selected keys alone).  A row is ``certified`` when
rigorous <= tail_bound or k takes every candidate.
"""
from __future__ import annotations

import numpy as np

from topkattn.backend import Array, get_array_module
from topkattn.checks import check_int, check_real


def dynamic_k_from_ranked(vals: Array, lse_forced: Array, n_cand: Array, *, tail_bound: float, max_topk: int,
                          n_ret: Array | None = None,
                          outside_upper: Array | None = None) -> tuple[Array, Array, Array, Array]:
    """Choose k per row from exact ranked scores and certify the left-out softmax mass.

    Args:
      vals: (rows, M) exact scores of the returned candidates in descending order, -inf padded.
      lse_forced: (rows,) logsumexp of the forced keys' scores (-inf when there are none).
      n_cand: (rows,) int, every selectable candidate of the row (returned or not).
      tail_bound: eps in [0, 1): the mass left out may be at most eps.
      max_topk: cap on k (int >= 1).
      n_ret: (rows,) int candidates returned (default: the finite entries of ``vals``).
      outside_upper: (rows,) upper bound on the score of any candidate not returned
        (needed only where n_ret < n_cand; default +inf: nothing certified there).

    Returns ``(k, certified, nominal, rigorous)``, each (rows,): the chosen k (int64), the
    certificate (bool), the bound that chose k and the bound that holds regardless of
    what the retriever missed (float64).
    """
    tail_bound = check_real("tail_bound", tail_bound, 0.0, 1.0, hi_open=True)
    max_topk = check_int("max_topk", max_topk, 1)
    xp = get_array_module(vals)
    n_rows, M = vals.shape
    vals = vals.astype(xp.float64)
    lse_forced = xp.asarray(lse_forced, dtype=xp.float64).reshape(n_rows)
    n_cand = xp.asarray(n_cand, dtype=xp.int64).reshape(n_rows)
    if n_ret is None:
        n_ret = xp.isfinite(vals).sum(axis=1)
    n_ret = xp.minimum(xp.asarray(n_ret, dtype=xp.int64).reshape(n_rows), n_cand)
    if outside_upper is None:
        outside_upper = xp.full(n_rows, xp.inf)
    outside_upper = xp.asarray(outside_upper, dtype=xp.float64).reshape(n_rows)
    m = min(M, max_topk)
    n_out = n_cand - n_ret
    if m == 0:  # no candidate returned (M = 0)
        with np.errstate(over="ignore", invalid="ignore"):
            rig = xp.where(n_out > 0, n_out * xp.exp(outside_upper - lse_forced), 0.0)
        rig = xp.where(xp.isnan(rig), xp.inf, rig)
        return xp.zeros(n_rows, dtype=xp.int64), (n_cand == 0) | (rig <= tail_bound), xp.zeros(n_rows), rig
    kc, _, nominal, s_k, lse_sel = choose_k(vals[:, :m], lse_forced, n_cand, n_ret, tail_bound)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        in_part = xp.where(n_ret - kc > 0, (n_ret - kc) * xp.exp(s_k - lse_sel), 0.0)
        lse_den = xp.where(kc > 0, lse_sel, lse_forced)
        out_part = xp.where(n_out > 0, n_out * xp.exp(outside_upper - lse_den), 0.0)
        rigorous = in_part + out_part
    rigorous = xp.where(xp.isnan(rigorous), xp.inf, rigorous)
    certified = (kc >= n_cand) | (rigorous <= tail_bound)
    return kc, certified, nominal, rigorous


def choose_k(vals: Array, lse_forced: Array, n_cand: Array, n_ret: Array,
             tail_bound: float) -> tuple[Array, Array, Array, Array, Array]:
    """The smallest k whose nominal bound is at most ``tail_bound``, per row.

    vals (rows, m) ranked exact scores (float64, -inf padded, m >= 1); lse_forced (rows,);
    n_cand, n_ret (rows,) int with n_ret <= n_cand.  k is searched among 1 .. min(m, n_ret);
    a row with no such k takes min(m, n_ret) (``found`` False).
    Returns ``(k, found, nominal, s_k, lse_k)``, each (rows,): the chosen k (int64), whether
    the bound was met, the nominal bound at k (0 for k = 0), the k-th score and the
    logsumexp over the forced keys and the first k candidates.
    """
    xp = get_array_module(vals)
    m = vals.shape[1]
    top = xp.maximum(lse_forced, vals[:, 0])
    top = xp.where(xp.isfinite(top), top, 0.0)[:, None]  # row max (vals are sorted)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        lse_k = top + xp.log(xp.exp(lse_forced[:, None] - top) + xp.cumsum(xp.exp(vals - top), axis=1))
        ks = xp.arange(1, m + 1)[None, :]  # (1, m)
        n_rest = n_cand[:, None] - ks  # (rows, m)
        nom = xp.where(n_rest > 0, n_rest * xp.exp(vals - lse_k), 0.0)  # (rows, m)
    ok = (ks <= n_ret[:, None]) & ((n_rest <= 0) | ((tail_bound > 0) & (nom <= tail_bound)))
    found = ok.any(axis=1)
    k = xp.where(found, xp.argmax(ok, axis=1) + 1, xp.minimum(m, n_ret))  # (rows,)
    j = xp.maximum(k - 1, 0)[:, None]
    s_k = xp.take_along_axis(vals, j, axis=1)[:, 0]
    lse_sel = xp.take_along_axis(lse_k, j, axis=1)[:, 0]
    nominal = xp.where(k > 0, xp.take_along_axis(nom, j, axis=1)[:, 0], 0.0)
    return k.astype(xp.int64), found, nominal, s_k, lse_sel
