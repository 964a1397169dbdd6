"""Softmax cross-entropy over the last axis, mean over non-ignored targets.

Shape letters: logits (..., V), targets (...) int.
    loss = mean_{i: target_i != ignore} [ logsumexp(logits_i) - logits_i[target_i] ]
    dlogits_i = (softmax(logits_i) - onehot(target_i)) / n   (n the non-ignored targets; zero rows
                for ignored targets)
"""
from __future__ import annotations

import numpy as np

from topkattn.backend import Array, as_engine_array, get_array_module

IGNORE = -100  # the target of a position nothing is scored at (tasks, losses, evaluation)


def softmax_cross_entropy(logits: Array, targets: Array, ignore_index: int = IGNORE) -> tuple[float, Array]:
    """``(loss, dlogits)``: the mean loss (Python float) and its gradient (logits' shape/dtype).

    Row maxima are subtracted before exp, so logits of 1e4 stay finite.  With no
    non-ignored target the loss is 0.0 and dlogits is zero.
    """
    logits = as_engine_array(logits, "logits")
    targets = as_engine_array(targets, "targets")
    if logits.dtype.kind != "f":
        raise TypeError(f"logits must be a float array, got {logits.dtype}")
    if targets.dtype.kind not in "iu":
        raise TypeError(f"targets must be an integer array, got {targets.dtype}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"targets must have shape {tuple(logits.shape[:-1])} (logits without the "
                         f"vocab axis), got {tuple(targets.shape)}")
    xp = get_array_module(logits)
    if get_array_module(targets) is not xp:  # targets follow the logits' device
        targets = xp.asarray(targets) if xp is not np else targets.get()
    V = logits.shape[-1]
    z = logits.reshape(-1, V)  # (rows, V)
    t = targets.reshape(-1).astype(xp.int64)  # (rows,)
    keep = t != ignore_index
    if bool(((t[keep] < 0) | (t[keep] >= V)).any()):
        raise ValueError(f"targets must lie in [0, {V}) or equal ignore_index={ignore_index}")
    n = int(keep.sum())
    m = z.max(-1, keepdims=True)
    e = xp.exp(z - m)
    s = e.sum(-1, keepdims=True)
    lse = (m + xp.log(s))[:, 0]  # (rows,)
    tc = xp.where(keep, t, 0)
    picked = xp.take_along_axis(z, tc[:, None], axis=-1)[:, 0]
    if n == 0:
        return 0.0, xp.zeros_like(logits)
    loss = float(((lse - picked) * keep).sum() / n)
    d = e / s
    d[xp.arange(z.shape[0]), tc] -= 1.0
    d *= (keep[:, None] / n).astype(z.dtype)
    return loss, d.reshape(logits.shape).astype(logits.dtype, copy=False)
