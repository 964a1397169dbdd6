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
* ``selection="block"``: block top-k attention (MoBA), :func:`topkattn.ops.block_topk_attention_forward`
  with the layer's ``block_size`` and ``topk_blocks`` (the persistent tokens open block 0).
* ``tail="mean"`` (token top-k, fixed or dynamic k): :func:`topkattn.ops.tail_attention.tail_topk_attention_forward`,
  the softmax mass the selection drops goes to the mean unselected value (every score is
  computed, so it never takes the masked or gather shortcut; no forgetful masking).

With ``layer.stats`` set (an :class:`topkattn.layers.attention_stats.AttentionStats`), every
forward is recorded from the op's saved state (``stats.record_forward``).
"""
from typing import Any

import numpy as np

from topkattn.backend import Array, get_array_module
from topkattn.checks import check_choice, check_int
from topkattn.ops.block_attention import (
    BlockAttentionSaved,
    block_topk_attention_backward,
    block_topk_attention_forward,
)
from topkattn.ops.dense_attention import DenseAttentionSaved, dense_attention_backward, dense_attention_forward
from topkattn.ops.masked_attention import (
    MaskedAttentionSaved,
    masked_attention_backward,
    masked_attention_forward,
    masked_is_cheaper,
)
from topkattn.ops.selection import select_topk
from topkattn.ops.tail_attention import TailAttentionSaved, tail_topk_attention_backward, tail_topk_attention_forward
from topkattn.ops.topk_attention import topk_attention_backward, topk_attention_forward

TAILS = (None, "mean")  # the layers' ``tail`` choices


def attention_forward(layer: Any, q: Array, k: Array, v: Array, seed: int | None = None) -> tuple[Array, Any]:
    """``(o (B, H, T, Dv), saved)`` of causal attention with ``layer``'s settings (topk, scale,
    persistent_tokens as sinks, window, forget_rate while training, tail_bound, max_topk, tail; or
    selection="block" with block_size, topk_blocks); recorded in ``layer.stats`` when set."""
    o, saved = _attend(layer, q, k, v, seed)
    stats = getattr(layer, "stats", None)
    if stats is not None:
        stats.record_forward(saved)
    return o, saved


def _attend(layer, q, k, v, seed):
    if getattr(layer, "selection", "token") == "block":
        return block_topk_attention_forward(q, k, v, block_size=layer.block_size, topk_blocks=layer.topk_blocks,
                                            causal=True, scale=layer.scale)
    if layer.topk is None:
        return dense_attention_forward(q, k, v, causal=True, scale=layer.scale)
    fr = layer.forget_rate if layer.training else 0.0
    sinks, window = layer.persistent_tokens, layer.window
    if getattr(layer, "tail", None) == "mean":
        return tail_topk_attention_forward(q, k, v, topk=layer.topk, causal=True, scale=layer.scale, sinks=sinks,
                                           window=window, tail_bound=layer.tail_bound, max_topk=layer.max_topk)
    if use_masked(layer, q, k, v):
        idx = select_topk(q, k, topk=int(layer.topk), causal=True, scale=float(layer.scale), sinks=sinks,
                          window=window, forget_rate=float(fr), seed=seed)  # (B, H, T, K)
        return masked_attention_forward(q, k, v, idx, float(layer.scale))
    return topk_attention_forward(q, k, v, topk=layer.topk, causal=True, scale=layer.scale, forget_rate=fr,
                                  seed=seed, sinks=sinks, window=window, tail_bound=layer.tail_bound,
                                  max_topk=layer.max_topk)


def attention_backward(do: Array, saved: Any) -> tuple[Array, Array, Array]:
    """``(dq, dk, dv)`` from do (B, H, T, Dv) and the ``saved`` of :func:`attention_forward`."""
    if isinstance(saved, DenseAttentionSaved):
        return dense_attention_backward(do, saved)
    if isinstance(saved, MaskedAttentionSaved):
        return masked_attention_backward(do, saved)
    if isinstance(saved, BlockAttentionSaved):
        return block_topk_attention_backward(do, saved)
    if isinstance(saved, TailAttentionSaved):
        return tail_topk_attention_backward(do, saved)
    return topk_attention_backward(do, saved)


def check_selection(selection: str, block_size: int | None, topk_blocks: int | None, *, topk: int | str | None,
                    window: int, forget_rate: float) -> tuple[str, int | None, int | None]:
    """Validated ``(selection, block_size, topk_blocks)`` of an attention layer.

    selection: "token" (top-k over single keys, or dense with topk=None; block_size and
    topk_blocks must be None) or "block" (block top-k: block_size and topk_blocks integers
    >= 1; topk None, window 0 and forget_rate 0, which apply to token selection only).
    """
    check_choice("selection", selection, ("token", "block"))
    if selection == "token":
        if block_size is not None or topk_blocks is not None:
            raise ValueError(f"block_size and topk_blocks apply only with selection='block', got "
                             f"block_size={block_size!r}, topk_blocks={topk_blocks!r}")
        return "token", None, None
    block_size, topk_blocks = check_int("block_size", block_size, 1), check_int("topk_blocks", topk_blocks, 1)
    if topk is not None:
        raise ValueError(f"topk applies to selection='token'; selection='block' attends topk_blocks blocks, "
                         f"got topk={topk!r}")
    if window:
        raise ValueError(f"window applies to selection='token', got window={window!r} with selection='block'")
    if forget_rate:
        raise ValueError(f"forget_rate applies to selection='token', got forget_rate={forget_rate!r} with "
                         f"selection='block'")
    return "block", block_size, topk_blocks


def check_tail(tail: str | None, *, selection: str, topk: int | str | None, forget_rate: float) -> str | None:
    """Validated ``tail`` of an attention layer: None (plain top-k: softmax over the selected
    keys) or "mean" (the dropped softmax mass goes to the mean unselected value, as in
    :func:`topkattn.ops.tail_attention.tail_topk_attention`).  "mean" needs token top-k
    (selection="token" with topk an int or "auto") and forget_rate 0 (the tail op draws no
    forgetting); ValueError naming ``tail`` and the value received otherwise.
    """
    if not (tail is None or (isinstance(tail, str) and tail in TAILS)):
        raise ValueError(f"tail must be None or 'mean', got {tail!r}")
    if tail is None:
        return None
    if selection != "token":
        raise ValueError(f"tail={tail!r} applies to token top-k (selection='token'); selection={selection!r} "
                         f"attends whole blocks and has no tail")
    if topk is None:
        raise ValueError(f"tail={tail!r} needs token top-k (topk an int or 'auto'): with topk=None attention "
                         f"is dense and drops no softmax mass")
    if forget_rate:
        raise ValueError(f"tail={tail!r} does not combine with forgetful masking (the tail op draws no "
                         f"forgetting), got forget_rate={forget_rate!r}")
    return tail


def use_masked(layer: Any, q: Array, k: Array, v: Array) -> bool:
    """Whether :func:`attention_forward` attends ``layer``'s fixed-k selection through the dense
    tile: NumPy arrays, an integer topk, and :func:`masked_is_cheaper` for the slots per row."""
    if isinstance(layer.topk, str) or get_array_module(q) is not np:
        return False
    S = k.shape[2]
    K = min(layer.persistent_tokens, S) + min(layer.window, S) + min(int(layer.topk), S)  # slots per row
    return masked_is_cheaper(S, K, q.shape[-1], v.shape[-1])
