"""Transformer layers with hand-written forward/backward pairs (MLA, RMSNorm, RoPE, FFN, ...).

Every layer owns ``params`` and ``grads`` dicts (same keys), ``forward`` keeps what
``backward`` needs, ``backward`` returns the input gradient and accumulates into
``grads``; layers with a decode path have ``init_cache``/``step``.
"""
from topkattn.layers.attention import Attention, KVCache
from topkattn.layers.block import Block
from topkattn.layers.decode import attend_all, attend_selected, exact_topk_selector
from topkattn.layers.embedding import Embedding
from topkattn.layers.linear import Linear
from topkattn.layers.loss import softmax_cross_entropy
from topkattn.layers.mla import MLA, MLACache, absorb_mla_weights
from topkattn.layers.module import Module
from topkattn.layers.moe import MoE
from topkattn.layers.rmsnorm import RMSNorm
from topkattn.layers.rope import RoPE
from topkattn.layers.swiglu import SwiGLU

__all__ = ["Attention", "Block", "Embedding", "KVCache", "Linear", "MLA", "MLACache", "Module", "MoE",
           "RMSNorm", "RoPE", "SwiGLU", "absorb_mla_weights", "attend_all", "attend_selected",
           "exact_topk_selector", "softmax_cross_entropy"]
