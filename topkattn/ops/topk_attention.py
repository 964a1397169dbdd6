"""Forgetful causal top-k attention: the public op (select, then sparse attend).

Shape letters: B batch, H query heads, G KV heads (H % G == 0), T queries, S keys,
D head dim, Dv value dim, K index slots per query.
"""

from __future__ import annotations

import numpy as np

from topkattn.backend import FLOAT_DTYPES, Array, as_engine_array, get_array_module, to_caller_kind
from topkattn.checks import check_bool, check_choice, check_int, check_real, make_rng
from topkattn.ops.dense_attention import check_dout, default_scale
from topkattn.ops.selection import check_head_slice, select_dynamic_topk, select_topk
from topkattn.ops.sparse_attention import (
    SparseAttentionSaved,
    sparse_attention_backward,
    sparse_attention_forward,
)


def topk_attention(q: Array, k: Array, v: Array, *, topk: int | str, causal: bool = True, scale: float | None = None,
                   temperature: float = 1.0, forget_rate: float = 0.0, seed: int | np.random.Generator | None = None,
                   sinks: int = 0, window: int = 0, chunk_size: int | None = None, tail_bound: float | None = None,
                   max_topk: int | None = None, impl: str = "auto",
                   head_slice: tuple[int, int, int] | None = None) -> Array:
    """Top-k attention: each query attends softmax-weighted to its ``topk`` best keys.

    Args:
      q: (B, H, T, D) queries; k: (B, G, S, D) keys; v: (B, G, S, Dv) values, with H a
        multiple of G (MHA G=H, GQA, MQA G=1).  float32 or float64, all the same dtype.
        NumPy or CuPy arrays, or anything with ``__dlpack__`` (PyTorch, JAX): the result
        comes back in the caller's kind.
      topk: keys kept per query among those it may see (ties to the lower key index);
        ``topk >= S`` is exactly dense attention.  ``topk="auto"``: dynamic k, the
        smallest k per query whose left-out softmax mass is provably <= ``tail_bound``
        (capped at ``max_topk``, default S); see ``selection.select_dynamic_topk``.
      causal: query t sits at absolute position S - T + t and sees keys j <= S - T + t.
      scale: multiplies q.k (default 1/sqrt(D), 1 for D = 0); temperature divides it.
      forget_rate: training-time forgetful masking: each selected key is dropped with this
        probability and refilled from the next-ranked keys (as an ANN index of recall
        1 - forget_rate would); ``seed`` (int or numpy Generator) makes it reproducible.
      head_slice: ``(h0, h1, H_all)`` when q holds heads h0 .. h1-1 (h1 - h0 == H) of a layer
        of H_all heads (head parallelism): the forgetful draws are those the call on all
        H_all heads makes for these heads, so the result is that call's heads h0 .. h1-1.
        Default None: the draws are made for the H heads given.
      sinks: the first ``sinks`` keys are always attended, in addition to the top-k.
      window: the ``window`` most recent visible keys are always attended, in addition.
      chunk_size: queries per chunk (default: automatic, about 16 MiB of scores per chunk);
        peak extra memory is O(chunk_size * S + T * K).
      impl: "auto", "numba" (CPU kernel), "numpy" (vectorised NumPy/CuPy) or "cuda" (the
        fused Numba CUDA kernels of ``topkattn.cuda``: CuPy arrays, or NumPy arrays under
        NUMBA_ENABLE_CUDASIM=1).  "auto" picks "cuda" for CuPy arrays when numba.cuda sees
        a GPU and topk, D, Dv are within the kernel's limits.  "cuda" without a usable GPU
        (or the simulator) raises RuntimeError, for ``topk="auto"`` too.

    Returns:
      out: (B, H, T, Dv).  Rows that see no key give zeros; a NaN (or +inf) among the scores
      a row attends, or a NaN/inf among the values it attends, gives a non-finite row (and
      only that row; the rule is written out in :mod:`topkattn.ops.reference`).  Backward
      gives such a row a NaN dq and lets it send nothing to dk, dv.
    """
    out, _ = topk_attention_forward(q, k, v, topk=topk, causal=causal, scale=scale,
                                    temperature=temperature, forget_rate=forget_rate, seed=seed,
                                    sinks=sinks, window=window, chunk_size=chunk_size,
                                    tail_bound=tail_bound, max_topk=max_topk, impl=impl, head_slice=head_slice)
    return out


def topk_attention_forward(q: Array, k: Array, v: Array, *, topk: int | str, causal: bool = True,
                           scale: float | None = None, temperature: float = 1.0, forget_rate: float = 0.0,
                           seed: int | np.random.Generator | None = None, sinks: int = 0, window: int = 0,
                           chunk_size: int | None = None, tail_bound: float | None = None, max_topk: int | None = None,
                           impl: str = "auto",
                           head_slice: tuple[int, int, int] | None = None) -> tuple[Array, SparseAttentionSaved]:
    """Forward pass of :func:`topk_attention`: returns ``(out, saved)``.

    ``saved`` (a :class:`TopkAttentionSaved`) keeps only what backward needs: q, k, v,
    the output, the selected indices ``saved.idx`` (B, H, T, K; -1 = empty slot, the
    first sinks + window slots hold the forced keys) and the row logsumexp
    ``saved.lse`` (B, H, T).  No (T, S) matrix is kept.  With ``topk="auto"``,
    ``saved.info`` holds the dynamic-k report: ``k``, ``certified`` and ``bound`` (B, H, T).
    """
    like = q
    q, k, v = (as_engine_array(a, n) for a, n in ((q, "q"), (k, "k"), (v, "v")))
    causal = check_bool("causal", causal)
    check_inputs(q, k, v, topk=topk, scale=scale, temperature=temperature,
                  forget_rate=forget_rate, sinks=sinks, window=window, chunk_size=chunk_size,
                  tail_bound=tail_bound, max_topk=max_topk, impl=impl, seed=seed, head_slice=head_slice)
    D = q.shape[-1]
    if impl == "cuda":  # refuse here, before any work, whichever topk: backward would need the GPU
        from topkattn.cuda.launch import array_module

        array_module(q, k, v)  # RuntimeError naming the reason (no GPU, wrong array kind)
    scale = default_scale(D) if scale is None else float(scale)
    eff_scale = scale / float(temperature)
    common = dict(causal=bool(causal), scale=eff_scale, sinks=int(sinks), window=int(window),
                  chunk_size=chunk_size, impl=impl)
    info = None
    if topk == "auto":
        idx, info = select_dynamic_topk(q, k, tail_bound=float(tail_bound), max_topk=max_topk, **common)
    elif _use_cuda(impl, q, v, min(int(topk), k.shape[2])):
        from topkattn.cuda.topk_forward import topk_forward_auto

        out, idx, lse = topk_forward_auto(q, k, v, topk=int(topk), scale=eff_scale,
                                     forget_rate=float(forget_rate), seed=seed, head_slice=head_slice,
                                     **{n: common[n] for n in ("causal", "sinks", "window")})
        saved = TopkAttentionSaved(q, k, v, idx, out, lse, eff_scale)
        saved.like, saved.info, saved.impl = like, None, "cuda"
        return to_caller_kind(out, like), saved
    else:
        idx = select_topk(q, k, topk=int(topk), forget_rate=float(forget_rate), seed=seed, head_slice=head_slice,
                          **common)
    out, s = sparse_attention_forward(q, k, v, idx, eff_scale, impl="numpy" if impl == "numpy" else "auto")
    saved = TopkAttentionSaved(s.q, s.k, s.v, s.idx, s.out, s.lse, s.scale)
    saved.impl = "cuda" if impl == "cuda" else None
    saved.like = like
    saved.info = info
    return to_caller_kind(out, like), saved


def topk_attention_backward(dout: Array, saved: SparseAttentionSaved) -> tuple[Array, Array, Array]:
    """Gradients ``(dq, dk, dv)`` of :func:`topk_attention` from ``dout`` (B, H, T, Dv).

    The selection is constant: gradients reach only the selected keys; every other key
    gets exactly zero.  A row whose output is not finite gets a NaN dq and sends nothing
    to dk, dv (every implementation: NumPy/CuPy, the Numba scatter, the CUDA kernel).
    Cost O(T * K * D).
    """
    if not isinstance(saved, SparseAttentionSaved):
        raise TypeError(f"saved must come from topk_attention_forward, got {type(saved).__name__}")
    dout = check_dout(dout, saved.out)
    D, Dv = saved.q.shape[-1], saved.v.shape[-1]
    kernel_dims = 1 <= D <= 256 and 1 <= Dv <= 256  # the CUDA backward's limits
    if kernel_dims and (getattr(saved, "impl", None) == "cuda" or _use_cuda("auto", saved.q, saved.v, 0)):
        from topkattn.cuda.sparse_backward import sparse_backward

        grads = sparse_backward(dout, saved.q, saved.k, saved.v, saved.idx, saved.out,
                                saved.lse, saved.scale)
    else:
        grads = sparse_attention_backward(dout, saved)
    like = getattr(saved, "like", None)
    return tuple(to_caller_kind(g, like) for g in grads) if like is not None else grads


class TopkAttentionSaved(SparseAttentionSaved):
    """Saved state of :func:`topk_attention_forward` (see its docstring)."""

    __slots__ = ("like", "info", "impl")


def _use_cuda(impl, q, v, n_sel):
    """Run the fused CUDA kernels? Always for impl='cuda'; for 'auto', CuPy arrays on a usable GPU."""
    if impl == "cuda":
        return True
    if impl != "auto" or get_array_module(q) is np:
        return False
    from topkattn.cuda.launch import cuda_usable
    from topkattn.cuda.topk_forward import fits

    return cuda_usable() and fits(2 * n_sel, q.shape[-1], v.shape[-1])


def check_inputs(q: Array, k: Array, v: Array, *, topk: int | str, scale: float | None, temperature: float,
                 forget_rate: float, sinks: int, window: int, chunk_size: int | None, tail_bound: float | None = None,
                 max_topk: int | None = None, impl: str = "auto",
                 seed: int | np.random.Generator | None = None,
                 head_slice: tuple[int, int, int] | None = None) -> None:
    """Validate the arguments of :func:`topk_attention_forward` (shared with the context-parallel op):
    TypeError for a wrong type, ValueError for a wrong value or shape, naming the argument."""
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
        raise ValueError(f"v must have shape (B, G, S, Dv) = ({B}, {G}, {S}, Dv) like k, "
                         f"got {tuple(v.shape)}")
    if G == 0 or H % G != 0:
        raise ValueError(f"query heads H={H} must be a multiple of KV heads G={G}")
    if topk == "auto":
        if tail_bound is None:
            raise ValueError("topk='auto' needs tail_bound in [0, 1), got None")
        check_real("tail_bound", tail_bound, 0.0, 1.0, hi_open=True)
        check_int("max_topk", max_topk, 1, optional=True)
        if forget_rate != 0:
            raise ValueError(f"forget_rate must be 0 with topk='auto', got {forget_rate!r}")
    else:
        if isinstance(topk, str):
            raise ValueError(f"topk must be an integer >= 1 or 'auto', got {topk!r}")
        check_int("topk", topk, 1)
        if tail_bound is not None or max_topk is not None:
            raise ValueError("tail_bound and max_topk apply only with topk='auto'")
    check_real("forget_rate", forget_rate, 0.0, 1.0, hi_open=True)
    check_int("sinks", sinks, 0)
    check_int("window", window, 0)
    check_real("temperature", temperature, 0.0, lo_open=True)
    if scale is not None:
        check_real("scale", scale)
    check_int("chunk_size", chunk_size, 1, optional=True)
    check_choice("impl", impl, ("auto", "numba", "numpy", "cuda"))
    if seed is not None:  # checked whatever forget_rate is (a Generator is taken as is, not drawn from)
        make_rng(seed, "seed")
    if head_slice is not None:  # checked whatever forget_rate is
        check_head_slice(head_slice, H)
