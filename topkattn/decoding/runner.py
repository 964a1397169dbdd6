"""Token-by-token decoding of a :class:`topkattn.model.Transformer` with a chosen selector.

Shape letters: B batch, T tokens, V vocabulary, L layers.

:func:`decode_teacher_forced` feeds the given tokens one at a time through ``model.step``
(the incremental, latent-cache path): the first ``prompt_len`` tokens are the prefill,
selected exactly while each layer's selector records the absorbed queries; then
``end_prefill`` lets the selectors build their indexes, and the remaining tokens are
decoded with the selector (LoRANN, simulated recall, exact).  The logits of every step
come back, so accuracy can be scored at any position.  :func:`evaluate_decoding` runs it
over a data set in batches and sums accuracy, recall and the chosen k.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from topkattn.backend import get_array_module, to_numpy
from topkattn.checks import check_choice, check_int
from topkattn.decoding.lorann import LorannSelector
from topkattn.decoding.selectors import DecodeStats, ExactSelector, SimulatedRecallSelector
from topkattn.layers.loss import IGNORE

if TYPE_CHECKING:
    from topkattn.decoding.selectors import DecodeSelector
    from topkattn.model import Transformer


def selector_factory(retriever: str, n_layers: int, *, recall: float | None = None, tail_bound: float | None = None,
                     seed: int = 0, **lorann: Any) -> Callable[[int], list[DecodeSelector]]:
    """``make(batch_number) -> [selector per layer]`` for :func:`evaluate_decoding`.

    retriever: "exact", "simulated" (needs ``recall``; draws from
    ``SeedSequence([seed, batch_number, layer])``) or "lorann" (``lorann`` keyword
    arguments go to :class:`LorannSelector`).  ``tail_bound``: dynamic k (exact, lorann).
    """
    check_choice("retriever", retriever, ("exact", "simulated", "lorann"))
    seed = check_int("seed", seed, 0)
    if retriever == "simulated" and recall is None:
        raise ValueError("retriever='simulated' needs recall")
    if retriever == "simulated" and tail_bound is not None:
        raise ValueError("tail_bound (dynamic k) works with retriever 'exact' or 'lorann'")
    if lorann and retriever != "lorann":
        raise ValueError(f"index settings {sorted(lorann)} apply only to retriever='lorann'")

    def make(batch_no):
        sels = []
        for layer in range(n_layers):
            if retriever == "exact":
                sels.append(ExactSelector(tail_bound=tail_bound))
            elif retriever == "simulated":
                rng = np.random.default_rng([seed, int(batch_no), layer])
                sels.append(SimulatedRecallSelector(recall, seed=rng))
            else:
                sels.append(LorannSelector(tail_bound=tail_bound, seed=seed * 1000 + layer, **lorann))
        return sels

    return make


def attention_layers(model: Transformer) -> list[Any]:
    """The attention layer of every block (MLA or Attention), in order."""
    return [blk.attn for blk in model.blocks]


def decode_teacher_forced(model: Transformer, tokens: Any, *, selectors: Sequence[DecodeSelector], prompt_len: int,
                          topk: int | None = None) -> np.ndarray:
    """Logits (B, T, V) of ``model`` fed ``tokens`` (B, T) one step at a time.

    ``selectors``: one per layer (see :mod:`topkattn.decoding.selectors`); the layers'
    own selectors are restored afterwards.  ``prompt_len``: tokens prefilled with exact
    selection before the selectors take over.  ``topk``: decode with this k (default:
    each layer's own ``topk``; a dense-trained model needs one to use a selector).
    """
    layers = attention_layers(model)
    if len(selectors) != len(layers):
        raise ValueError(f"selectors must hold one selector per layer ({len(layers)}), got {len(selectors)}")
    tokens = np.asarray(to_numpy(tokens))
    if tokens.ndim != 2 or tokens.dtype.kind not in "iu":
        raise ValueError(f"tokens must be an int array (B, T), got {tokens.dtype} shape {tokens.shape}")
    B, T = tokens.shape
    check_int("prompt_len", prompt_len, 0, T)
    xp = get_array_module(next(iter(model.params.values())))
    out = []
    with model.decoding(selectors, topk=topk):  # eval mode, selectors in prefill; all restored after
        cache = model.init_cache(B)
        for t in range(T):
            if t == prompt_len:
                for sel in selectors:
                    sel.end_prefill()
            out.append(to_numpy(model.step(xp.asarray(tokens[:, t:t + 1]), cache)))
        if prompt_len == T:
            for sel in selectors:
                sel.end_prefill()
    return np.concatenate(out, axis=1)  # (B, T, V)


def evaluate_decoding(model: Transformer, inputs: Any, targets: Any, *,
                      make_selectors: Callable[[int], Sequence[DecodeSelector]], prompt_len: int,
                      topk: int | None = None, batch_size: int = 32,
                      progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Accuracy of token-by-token decoding and what the selectors did.

    ``inputs``/``targets`` (N, T) int (targets ``IGNORE`` where nothing is scored);
    ``make_selectors(batch_number) -> list`` gives fresh per-layer selectors per batch.
    Only positions from ``prompt_len`` on are scored (the prompt is decoded exactly, so
    its predictions say nothing of the selectors).
    ``progress``: called after each batch with the number of sequences decoded so far.
    Returns a dict: accuracy, n_scored, loss (mean cross-entropy in nats over the scored
    targets) and bits_per_token, recall (of the selection against exact top-k,
    over decode steps, all layers), recall_by_rank (per exact rank, 0 = best), mean_k, k_quantiles (10/50/90 %), k_hist,
    certified_fraction (dynamic k), per_layer (recall and mean_k), seconds.
    """
    inputs = np.asarray(inputs)
    targets = np.asarray(targets)
    if inputs.shape != targets.shape or inputs.ndim != 2:
        raise ValueError(f"inputs and targets must both be (N, T), got {inputs.shape} and {targets.shape}")
    check_int("batch_size", batch_size, 1)
    total = DecodeStats()
    per_layer = None
    correct = scored = 0
    nll = 0.0
    t0 = time.perf_counter()
    for i, b0 in enumerate(range(0, len(inputs), batch_size)):
        x, y = inputs[b0:b0 + batch_size], targets[b0:b0 + batch_size]
        sels = make_selectors(i)
        logits = decode_teacher_forced(model, x, selectors=sels, prompt_len=prompt_len, topk=topk)
        mask = y != IGNORE
        mask[:, :prompt_len] = False  # the prompt is decoded exactly: not the selectors' result
        correct += int((logits.argmax(-1)[mask] == y[mask]).sum())
        scored += int(mask.sum())
        nll += _target_nll(logits[mask], y[mask])
        if per_layer is None:
            per_layer = [DecodeStats() for _ in sels]
        for acc, sel in zip(per_layer, sels):
            acc.merge(sel.stats)
            total.merge(sel.stats)
        if progress is not None:
            progress(b0 + len(x))
    seconds = time.perf_counter() - t0
    loss = nll / scored if scored else float("nan")
    return {
        "accuracy": correct / scored if scored else float("nan"),
        "n_scored": scored,
        "loss": loss,
        "bits_per_token": loss / np.log(2.0),
        "recall": total.recall,
        "mean_k": total.mean_k,
        "k_quantiles": dict(zip(("p10", "p50", "p90"), total.k_quantiles())),
        "k_hist": total.to_dict()["k_hist"],
        "certified_fraction": total.certified_fraction,
        "recall_by_rank": total.recall_by_rank,
        "per_layer": [{"recall": s.recall, "mean_k": s.mean_k} for s in (per_layer or [])],
        "seconds": seconds,
    }


def _target_nll(logits, targets):
    """Summed cross-entropy (nats) of ``logits`` (M, V) at ``targets`` (M,), in float64."""
    z = logits.astype(np.float64)
    mx = z.max(-1, keepdims=True)
    lse = mx[:, 0] + np.log(np.exp(z - mx).sum(-1))
    return float((lse - z[np.arange(len(targets)), targets]).sum())
