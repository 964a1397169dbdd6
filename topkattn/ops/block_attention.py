"""Block top-k attention (MoBA, Lu et al. 2025): the public op (select blocks, then attend).

Shape letters: B batch, H query heads, G KV heads (H % G == 0), T queries, S keys,
D head dim, Dv value dim, Kb selected blocks per query, K = Kb * block_size index slots.

Selection (:mod:`topkattn.ops.block_selection`): the keys are cut into blocks of
``block_size``; each query ranks the blocks by q . (mean of the block's keys) and keeps
its ``topk_blocks`` best (under ``causal`` its own block always, counted, and never a
block after it).  The gate has no gradient.  Attend, by one of two routes with the same
results (to rounding):

    "gather"     the blocks expanded into token indices (B, H, T, K) and attended by the
                 one sparse attend, :mod:`topkattn.ops.sparse_attention` (gathers K keys per query)
    "blockwise"  the selections grouped by key block, one GEMM per (key block, the query rows
                 that chose it), online-softmax merge: :mod:`topkattn.ops.blockwise_attention`

"auto" takes "blockwise", except for decode-like calls with at most ``GATHER_MAX_SLOTS``
index slots in all (B * H * T * K: a few query rows), and whenever a key or value is not
finite, where "gather" follows the non-finite rule of :mod:`topkattn.ops.reference` exactly.
Measured on 2 CPU cores (H = 8, D = 64, 4 blocks of 64): block-wise fwd+bwd 11x and 10x
faster than gather at T = S = 2048 and 8192 (``benchmarks/bench_block_attention.py``); at
S = 8192 already faster from T = 4 queries, gather faster at T <= 2 (milliseconds either way).
``impl="cuda"`` runs the Numba CUDA selection and fused forward of
:mod:`topkattn.cuda.block_attention`, and the backward of :mod:`topkattn.cuda.sparse_backward`
on the expanded indices.
"""
from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from topkattn.backend import FLOAT_DTYPES, Array, as_engine_array, get_array_module, to_caller_kind
from topkattn.checks import check_bool, check_choice, check_int, check_real
from topkattn.ops.block_selection import BlockBounds, block_means, expand_blocks, select_blocks
from topkattn.ops.blockwise_attention import blockwise_attention_backward, blockwise_attention_forward
from topkattn.ops.dense_attention import check_dout, default_scale
from topkattn.ops.sparse_attention import (
    SparseAttentionSaved,
    sparse_attention_backward,
    sparse_attention_forward,
)

ROUTES = ("auto", "gather", "blockwise")
GATHER_MAX_SLOTS = 4096  # "auto" gathers when B * H * T * K is at most this (decode-like calls)


def block_topk_attention(q: Array, k: Array, v: Array, *, block_size: int = 64, topk_blocks: int = 4,
                         causal: bool = True, scale: float | None = None, chunk_size: int | None = None,
                         route: str = "auto", impl: str = "auto") -> Array:
    """Block top-k attention: each query attends, with one softmax, its ``topk_blocks`` best key blocks.

    Args:
      q: (B, H, T, D) queries; k: (B, G, S, D) keys; v: (B, G, S, Dv) values, with H a
        multiple of G (MHA G=H, GQA, MQA G=1).  float32 or float64, all the same dtype.
        NumPy or CuPy arrays, or anything with ``__dlpack__`` (PyTorch, JAX): the result
        comes back in the caller's kind.
      block_size: keys per block (consecutive positions; the last block may be partial and
        its mean is over the keys it has).
      topk_blocks: blocks each query attends (ties to the lower block index); under
        ``causal`` the own block counts toward it.  ``topk_blocks >= ceil(S / block_size)``
        is exactly dense attention.
      causal: query t sits at absolute position S - T + t and sees keys j <= S - T + t; its
        own block (holding that position) is always selected and masked inside; blocks
        after it are never selected.
      scale: multiplies q.k in the attention (default 1/sqrt(D), 1 for D = 0); the gate
        ranks by the unscaled q . mean.
      chunk_size: queries per gate tile (default: about 16 MiB per tile).
      route: "auto", "gather" or "blockwise" (module docstring: "auto" is "blockwise" but for
        decode-like calls; a non-finite key or value takes "gather"); ignored by ``impl="cuda"``.
      impl: "auto", "numba" (the Numba CPU kernels: block ranking and the block-wise group
        kernels of ``ops/block_kernels.py``; "auto" on NumPy), "numpy" (vectorised NumPy/CuPy)
        or "cuda" (the Numba CUDA kernels: CuPy arrays, or NumPy under NUMBA_ENABLE_CUDASIM=1).
        "auto" picks "cuda" for CuPy arrays when numba.cuda sees a GPU, D, Dv <= 256 and
        topk_blocks <= 1024.

    Returns:
      out: (B, H, T, Dv).  A row that sees no key gives zeros; a NaN (or +inf) among the
      scores a row attends, or a NaN/inf among the values it attends, gives a non-finite row.
      Memory O(chunk * S / block_size + T * topk_blocks * block_size): no (T, S) matrix.
    """
    out, _ = block_topk_attention_forward(q, k, v, block_size=block_size, topk_blocks=topk_blocks,
                                          causal=causal, scale=scale, chunk_size=chunk_size,
                                          route=route, impl=impl)
    return out


def block_topk_attention_forward(q: Array, k: Array, v: Array, *, block_size: int = 64, topk_blocks: int = 4,
                                 causal: bool = True, scale: float | None = None, chunk_size: int | None = None,
                                 route: str = "auto", impl: str = "auto") -> tuple[Array, BlockAttentionSaved]:
    """Forward pass of :func:`block_topk_attention`: returns ``(out, saved)``.

    ``saved`` (a :class:`BlockAttentionSaved`) keeps q, k, v, the output, the selected
    blocks ``saved.blocks`` (B, H, T, Kb; rank order, own block first under causal, -1 =
    empty), the row logsumexp ``saved.lse`` (B, H, T) and ``saved.route`` (the route taken:
    "gather", "blockwise" or "cuda").  ``saved.indices()`` gives the token indices
    (B, H, T, K) the blocks stand for.
    """
    like = q
    q, k, v = (as_engine_array(a, n) for a, n in ((q, "q"), (k, "k"), (v, "v")))
    causal = check_bool("causal", causal)
    check_inputs(q, k, v, block_size=block_size, topk_blocks=topk_blocks, scale=scale,
                 chunk_size=chunk_size, route=route, impl=impl)
    xp = get_array_module(q, k, v)
    B, H, T, D = q.shape
    S = k.shape[2]
    if impl == "cuda":  # refuse here, before any work: backward would need the GPU too
        from topkattn.cuda.launch import array_module

        array_module(q, k, v)
    scale = default_scale(D) if scale is None else float(scale)
    causal = bool(causal)
    bounds = BlockBounds(S, T, block_size=int(block_size), topk_blocks=int(topk_blocks), causal=causal)
    if _use_cuda(impl, q, v, bounds.m):
        from topkattn.cuda.block_attention import block_forward

        out, blocks, lse = block_forward(q, k, v, bounds=bounds, scale=scale)
        saved = BlockAttentionSaved(q, k, v, blocks, out, lse, scale, bounds, "cuda", like, impl)
        return to_caller_kind(out, like), saved
    means = block_means(k, bounds.block_size)
    blocks = select_blocks(q, k, block_size=bounds.block_size, topk_blocks=int(topk_blocks), causal=causal,
                           chunk_size=chunk_size, impl=impl, means=means)
    route = choose_route(route, xp, k, v, means, n_slots=B * H * T * bounds.n_slots)
    if route == "blockwise":
        out, lse = blockwise_attention_forward(q, k, v, blocks, bounds, scale, impl=impl)
    else:
        out, s = sparse_attention_forward(q, k, v, expand_blocks(blocks, bounds), scale)
        lse = s.lse
    saved = BlockAttentionSaved(q, k, v, blocks, out, lse, scale, bounds, route, like, impl)
    return to_caller_kind(out, like), saved


def block_topk_attention_backward(dout: Array, saved: BlockAttentionSaved) -> tuple[Array, Array, Array]:
    """Gradients ``(dq, dk, dv)`` of :func:`block_topk_attention` from ``dout`` (B, H, T, Dv).

    The block selection is constant (the gate has no gradient): only the keys of the
    selected blocks a query sees receive gradient from it.  A row whose output is not
    finite gets a NaN dq and sends nothing to dk, dv.  Cost O(T * K * D).
    """
    if not isinstance(saved, BlockAttentionSaved):
        raise TypeError(f"saved must come from block_topk_attention_forward, got {type(saved).__name__}")
    dout = check_dout(dout, saved.out)
    q, k, v = saved.q, saved.k, saved.v
    if saved.route == "blockwise":
        grads = blockwise_attention_backward(dout, q, k, v, saved.blocks, saved.bounds, saved.out,
                                             saved.lse, saved.scale, impl=saved.impl)
    elif saved.route == "cuda":
        from topkattn.cuda.sparse_backward import sparse_backward

        grads = sparse_backward(dout, q, k, v, saved.indices(), saved.out, saved.lse, saved.scale)
    else:
        s = SparseAttentionSaved(q, k, v, saved.indices(), saved.out, saved.lse, saved.scale)
        grads = sparse_attention_backward(dout, s)
    return tuple(to_caller_kind(g, saved.like) for g in grads)


class BlockAttentionSaved:
    """Saved state of :func:`block_topk_attention_forward` (see its docstring)."""

    __slots__ = ("q", "k", "v", "blocks", "out", "lse", "scale", "bounds", "route", "like", "impl")

    def __init__(self, q: Array, k: Array, v: Array, blocks: Array, out: Array, lse: Array, scale: float,
                 bounds: BlockBounds, route: str, like: Any, impl: str = "auto") -> None:
        self.q, self.k, self.v, self.blocks, self.out, self.lse = q, k, v, blocks, out, lse
        self.scale, self.bounds, self.route, self.like, self.impl = scale, bounds, route, like, impl

    def indices(self) -> Array:
        """(B, H, T, K) int64 token indices of the attended keys, -1 = empty slot."""
        return expand_blocks(self.blocks, self.bounds)


def choose_route(route: str, xp: ModuleType, k: Array, v: Array, means: Array | None = None,
                 n_slots: int | None = None) -> str:
    """The attend route taken for ``route`` ("auto", "gather" or "blockwise").

    "auto": "gather" when ``n_slots`` (B * H * T * K) is at most ``GATHER_MAX_SLOTS``, else
    "blockwise".  A non-finite key or value always takes "gather" (the block-wise GEMMs would
    carry a hidden NaN into other rows).  ``means`` (the block means, NaN/inf wherever a key
    is) saves a pass over k.
    """
    if route == "gather" or (route == "auto" and n_slots is not None and n_slots <= GATHER_MAX_SLOTS):
        return "gather"
    finite_k = bool(xp.isfinite(means).all()) if means is not None else bool(xp.isfinite(k).all())
    return "blockwise" if finite_k and bool(xp.isfinite(v).all()) else "gather"


def _use_cuda(impl, q, v, m):
    """Run the CUDA kernels? Always for impl='cuda'; for 'auto', CuPy arrays on a usable GPU
    within the kernels' limits (head dims, ``m`` ranked blocks per query)."""
    if impl == "cuda":
        return True
    if impl != "auto" or get_array_module(q) is np:
        return False
    from topkattn.cuda.launch import cuda_usable

    if not cuda_usable():
        return False
    from topkattn.cuda.block_attention import MAX_DIM, MAX_RANKED

    return m <= MAX_RANKED and 1 <= q.shape[-1] <= MAX_DIM and 1 <= v.shape[-1] <= MAX_DIM


def check_inputs(q: Array, k: Array, v: Array, *, block_size: int, topk_blocks: int, scale: float | None,
                 chunk_size: int | None, route: str, impl: str) -> None:
    """Validate the arguments of :func:`block_topk_attention_forward`: TypeError for a wrong
    type, ValueError for a wrong value or shape, naming the argument."""
    for name, a in (("q", q), ("k", k), ("v", v)):
        if a.ndim != 4:
            letters = {"q": "(B, H, T, D)", "k": "(B, G, S, D)", "v": "(B, G, S, Dv)"}[name]
            raise ValueError(f"{name} must be 4-D {letters}, got shape {tuple(a.shape)}")
        if a.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32 or float64, got {a.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if len({get_array_module(a).__name__ for a in (q, k, v)}) != 1:
        raise TypeError("q, k, v must all be NumPy arrays or all CuPy arrays")
    B, H, T, D = q.shape
    Bk, G, S, Dk = k.shape
    if Bk != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {B}, k {Bk}, v {v.shape[0]}")
    if Dk != D:
        raise ValueError(f"k head dim must equal q's ({D}), got k shape {tuple(k.shape)}")
    if v.shape[1] != G or v.shape[2] != S:
        raise ValueError(f"v must have shape (B, G, S, Dv) = ({B}, {G}, {S}, Dv) like k, got {tuple(v.shape)}")
    if G == 0 or H % G != 0:
        raise ValueError(f"query heads H={H} must be a multiple of KV heads G={G}")
    check_int("block_size", block_size, 1)
    check_int("topk_blocks", topk_blocks, 1)
    if scale is not None:
        check_real("scale", scale)
    check_int("chunk_size", chunk_size, 1, optional=True)
    check_choice("route", route, ROUTES)
    check_choice("impl", impl, ("auto", "numba", "numpy", "cuda"))
    if impl == "cuda" and route != "auto":
        raise ValueError(f"route applies to the CPU/xp paths; impl='cuda' takes route='auto', got {route!r}")


__all__ = ["block_topk_attention", "block_topk_attention_forward", "block_topk_attention_backward",
           "BlockAttentionSaved", "choose_route", "GATHER_MAX_SLOTS"]
