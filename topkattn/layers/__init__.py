"""Transformer layers with hand-written forward/backward pairs (MLA, RMSNorm, RoPE, FFN, ...).

Every layer owns ``params`` and ``grads`` dicts (same keys), ``forward`` keeps what
``backward`` needs, ``backward`` returns the input gradient and accumulates into
``grads``; layers with a decode path have ``init_cache``/``step`` (caches in ``cache``;
each decode step's keys come from the layer's ``selector``, None = exact).
"""
from topkattn.layers.attention import Attention
from topkattn.layers.attention_stats import AttentionStats
from topkattn.layers.block import Block
from topkattn.layers.cache import GrowingBuffer, KVCache, MLACache
from topkattn.layers.embedding import Embedding
from topkattn.layers.linear import Linear
from topkattn.layers.loss import softmax_cross_entropy
from topkattn.layers.mla import MLA, absorb_mla_weights
from topkattn.layers.module import Module
from topkattn.layers.moe import MoE
from topkattn.layers.rmsnorm import RMSNorm
from topkattn.layers.rope import RoPE
from topkattn.layers.swiglu import SwiGLU
from topkattn.layers.ternary_io import load_packed, load_packed_into, packed_weights, save_packed
from topkattn.layers.token_shift import TokenShift

__all__ = ["Attention", "Block", "Embedding", "GrowingBuffer", "KVCache", "Linear", "MLA", "MLACache", "Module",
           "MoE", "RMSNorm", "RoPE", "SwiGLU", "TokenShift", "absorb_mla_weights", "softmax_cross_entropy"]
__all__ += ["AttentionStats", "load_packed", "load_packed_into", "packed_weights", "save_packed"]
