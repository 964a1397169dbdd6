"""topkattn.cuda: Numba CUDA kernels, one module per op family, each naming its reference.

    launch          run a kernel on CuPy arrays on CuPy's current stream (NumPy under the simulator)
    topk_select     split-k top-m selection on a score matrix       (reference.rank_row)
    topk_forward    streaming top-k attention forward, fused; and a  (reference.topk_attention_reference)
                    tiled variant (matmul score tiles + CUDA top-m)
    sparse_backward dq, dk, dv from saved indices and logsumexp      (sparse_attention.sparse_attention_backward)
    mla_decode      MLA decode step against the latent cache         (reference with T = 1, G = 1)
    lorann_score    LoRANN batched query scoring, int8/4-bit models  (LorannIndex.search)

``topkattn.topk_attention_forward(..., impl="cuda")`` uses them (``impl="auto"`` does for
CuPy arrays on a GPU).  Nothing is imported here, so ``import topkattn`` never imports
numba.cuda: the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) can still be switched on
before the first kernel module is imported.
"""
