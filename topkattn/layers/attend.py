"""The attention stage of the attention layers (:class:`MLA`, :class:`Attention`) in training:
one choice of op per shape, the same result whichever runs.

Shape letters: B batch, H query heads, G KV heads, T queries, S keys, D head dim, Dv value
dim, K index slots per query.

* ``topk=None``: dense causal attention (:mod:`topkattn.ops.dense_attention`).
* ``topk`` an int, NumPy arrays, and a dense tile cheaper than gathering the selected keys
  (:func:`topkattn.ops.masked_attention.masked_is_cheaper`: short sequences, e.g. train-toy's):
  the op's own selection (:func:`topkattn.ops.selection.select_topk`, the call
  ``topk_attention_forward`` makes, so the same keys), attended through a dense score tile
  (:mod:`topkattn.ops.masked_attention`).  Equal to the top-k op up to the order of float sums.
* otherwise (long sequences, CuPy arrays, ``topk="auto"``): :func:`topkattn.ops.topk_attention_forward`.
"""
import numpy as np

from topkattn.backend import get_array_module
from topkattn.ops.dense_attention import DenseAttentionSaved, dense_attention_backward, dense_attention_forward
from topkattn.ops.masked_attention import (
    MaskedAttentionSaved,
    masked_attention_backward,
    masked_attention_forward,
    masked_is_cheaper,
)
from topkattn.ops.selection import select_topk
from topkattn.ops.topk_attention import topk_attention_backward, topk_attention_forward


def attention_forward(layer, q, k, v, seed=None):
    """``(o (B, H, T, Dv), saved)`` of causal attention with ``layer``'s settings (topk, scale,
    persistent_tokens as sinks, window, forget_rate while training, tail_bound, max_topk)."""
    if layer.topk is None:
        return dense_attention_forward(q, k, v, causal=True, scale=layer.scale)
    fr = layer.forget_rate if layer.training else 0.0
    sinks, window = layer.persistent_tokens, layer.window
    if use_masked(layer, q, k, v):
        idx = select_topk(q, k, topk=int(layer.topk), causal=True, scale=float(layer.scale), sinks=sinks,
                          window=window, forget_rate=float(fr), seed=seed)  # (B, H, T, K)
        return masked_attention_forward(q, k, v, idx, float(layer.scale))
    return topk_attention_forward(q, k, v, topk=layer.topk, causal=True, scale=layer.scale, forget_rate=fr,
                                  seed=seed, sinks=sinks, window=window, tail_bound=layer.tail_bound,
                                  max_topk=layer.max_topk)


def attention_backward(do, saved):
    """``(dq, dk, dv)`` from do (B, H, T, Dv) and the ``saved`` of :func:`attention_forward`."""
    if isinstance(saved, DenseAttentionSaved):
        return dense_attention_backward(do, saved)
    if isinstance(saved, MaskedAttentionSaved):
        return masked_attention_backward(do, saved)
    return topk_attention_backward(do, saved)


def use_masked(layer, q, k, v):
    """Whether :func:`attention_forward` attends ``layer``'s fixed-k selection through the dense
    tile: NumPy arrays, an integer topk, and :func:`masked_is_cheaper` for the slots per row."""
    if isinstance(layer.topk, str) or get_array_module(q) is not np:
        return False
    S = k.shape[2]
    K = min(layer.persistent_tokens, S) + min(layer.window, S) + min(int(layer.topk), S)  # slots per row
    return masked_is_cheaper(S, K, q.shape[-1], v.shape[-1])
