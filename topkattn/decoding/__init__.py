"""Decoding with retrieval: LoRANN-backed and simulated-recall selectors, decode-time dynamic k.

Shape letters: B batch, H query heads, S cached keys, D key dim (C + R for MLA), K index slots
per query.

A layer's ``selector`` picks the keys of each decode step (the protocol is documented in
:mod:`topkattn.decoding.selectors`); the selectors here add what retrieval-backed decoding needs:

- :class:`ExactSelector`: exact top-k (or exact dynamic k), with recall bookkeeping;
- :class:`SimulatedRecallSelector`: exact top-k with each key dropped with probability
  1 - recall and refilled from the next-ranked keys (training's forgetful masking);
- :class:`LorannSelector`: one LoRANN index per batch element over the cached MLA latents
  [c_j ; kr_j], built at prefill on the prefill's absorbed queries, grown with ``add``,
  rebuilt when the cache has grown by a factor; forced keys are never looked up;
- :func:`dynamic_k_from_ranked`: per-row k with a certified bound on the left-out mass;
- :func:`decode_teacher_forced`, :func:`evaluate_decoding`: run a model token by token.
"""
from topkattn.decoding.lorann import LorannSelector
from topkattn.decoding.runner import decode_teacher_forced, evaluate_decoding
from topkattn.decoding.selectors import DecodeSelector, DecodeStats, ExactSelector, SimulatedRecallSelector
from topkattn.ops.dynamic_k import dynamic_k_from_ranked

__all__ = ["DecodeSelector", "DecodeStats", "ExactSelector", "LorannSelector", "SimulatedRecallSelector",
           "decode_teacher_forced", "dynamic_k_from_ranked", "evaluate_decoding"]
