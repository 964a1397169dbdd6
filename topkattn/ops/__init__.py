"""Ops: select -> attend.  Forward/backward pairs, their float64 references, CPU kernels.

    selection         RowBounds; select_topk, select_dynamic_topk (T queries); select_decode (one query)
    dynamic_k         the one tail-bound computation behind dynamic k (training and decoding)
    sparse_attention  attend T queries, or one decode query, over selected keys (fwd/bwd)
    topk_attention    select + attend: the public top-k op
    dense_attention   chunked dense attention (fwd/bwd), the dense baseline
    tail_attention    top-k attention with the unselected mass given to their mean value
    block_selection   MoBA block selection: block means, gate ranking, expansion to token indices
    blockwise_attention  the block-wise attend (per key-block GEMMs, online-softmax merge; fwd/bwd)
    block_attention   select blocks + attend: the public block top-k op (MoBA)
    reference         slow, obviously correct float64 references every path is tested against
    cpu_kernels       Numba CPU kernels (row top-m, scatter-add), each naming its reference
"""
from topkattn.ops.block_attention import (
    block_topk_attention,
    block_topk_attention_backward,
    block_topk_attention_forward,
)
from topkattn.ops.dense_attention import dense_attention, dense_attention_backward, dense_attention_forward
from topkattn.ops.tail_attention import (
    tail_topk_attention,
    tail_topk_attention_backward,
    tail_topk_attention_forward,
)
from topkattn.ops.topk_attention import topk_attention, topk_attention_backward, topk_attention_forward

__all__ = ["dense_attention", "dense_attention_backward", "dense_attention_forward",
           "tail_topk_attention", "tail_topk_attention_backward", "tail_topk_attention_forward",
           "topk_attention", "topk_attention_backward", "topk_attention_forward"]
__all__ += ["block_topk_attention", "block_topk_attention_forward", "block_topk_attention_backward"]
