"""topkattn: forgetful causal top-k attention, MLA and a LoRANN index in NumPy/CuPy.

Shape letters (docs/architecture.md has the table): B batch, H query heads, G KV heads,
T queries, S keys, D head dim, Dv value dim, K index slots per query (forced + selected).
"""
from topkattn.ops.block_attention import (
    block_topk_attention,
    block_topk_attention_backward,
    block_topk_attention_forward,
)
from topkattn.ops.tail_attention import (
    tail_topk_attention,
    tail_topk_attention_backward,
    tail_topk_attention_forward,
)
from topkattn.ops.topk_attention import (
    topk_attention,
    topk_attention_backward,
    topk_attention_forward,
)

__version__ = "0.1.0"
__all__ = ["topk_attention", "topk_attention_forward", "topk_attention_backward",
           "tail_topk_attention", "tail_topk_attention_forward", "tail_topk_attention_backward"]
__all__ += ["block_topk_attention", "block_topk_attention_forward", "block_topk_attention_backward"]
