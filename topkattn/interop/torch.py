"""PyTorch bridge: top-k attention as a differentiable ``torch`` function.

Shape letters: B batch, H query heads, G KV heads, T queries, S keys, D head dim, Dv value dim.

    out = topkattn.interop.torch.topk_attention(q, k, v, topk=8, causal=True)
    out.sum().backward()      # q.grad, k.grad, v.grad from the engine's backward

A ``torch.autograd.Function`` whose forward calls ``topk_attention_forward`` and whose
backward calls ``topk_attention_backward``.  Tensors cross by DLPack without copies:
CPU tensors become NumPy arrays, CUDA tensors become CuPy arrays (CuPy runs on the
current PyTorch stream), and the engine's results come back as tensors sharing memory.
Importing this module imports torch; ``import topkattn`` never does.
"""
import contextlib

import numpy as np
import torch

from topkattn.ops.topk_attention import topk_attention_backward, topk_attention_forward

_OPTION_NAMES = ("topk", "causal", "scale", "temperature", "forget_rate", "seed", "sinks", "window",
                 "chunk_size")


def topk_attention(q, k, v, *, topk, causal=True, scale=None, temperature=1.0, forget_rate=0.0,
                   seed=None, sinks=0, window=0, chunk_size=None):
    """Top-k attention on PyTorch tensors, differentiable in q, k and v.

    Args:
      q: (B, H, T, D), k: (B, G, S, D), v: (B, G, S, Dv) tensors, float32 or float64, all
        on one device (CPU, or CUDA with CuPy installed).  H a multiple of G.
      topk, causal, scale, temperature, forget_rate, seed, sinks, window, chunk_size: as in
        :func:`topkattn.ops.topk_attention`.  With ``forget_rate > 0`` the selection is drawn
        once in forward and reused by backward.

    Returns:
      out: (B, H, T, Dv) tensor on q's device.  Gradients reach only the selected keys.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.device.type not in ("cpu", "cuda"):
        raise ValueError(f"q must be on a CPU or CUDA device, got {q.device}")
    opts = dict(topk=topk, causal=causal, scale=scale, temperature=temperature,
                forget_rate=forget_rate, seed=seed, sinks=sinks, window=window, chunk_size=chunk_size)
    return _TopkAttention.apply(q, k, v, opts)


class _TopkAttention(torch.autograd.Function):
    """forward: engine forward on DLPack views; backward: engine backward from the saved selection."""

    @staticmethod
    def forward(ctx, q, k, v, opts):
        with _stream_of(q):
            qe, ke, ve = to_engine(q), to_engine(k), to_engine(v)
            out, saved = topk_attention_forward(qe, ke, ve, **opts)
        ctx.engine_saved = saved  # views of q, k, v and out, plus idx (B, H, T, K) and lse (B, H, T)
        result = from_engine(out)  # shares memory with saved.out
        ctx.save_for_backward(q, k, v, result)  # lets autograd detect in-place edits of any of them
        return result

    @staticmethod
    def backward(ctx, dout):
        q = ctx.saved_tensors[0]  # raises if q, k, v or out were modified in place since forward
        with _stream_of(q):
            dq, dk, dv = topk_attention_backward(to_engine(dout.contiguous()), ctx.engine_saved)
            grads = tuple(from_engine(g) for g in (dq, dk, dv))
        return grads + (None,)


def to_engine(t):
    """A NumPy (CPU) or CuPy (CUDA) array sharing memory with tensor ``t`` (detached)."""
    t = t.detach()
    if t.device.type == "cuda":
        from topkattn.backend import require_cupy

        return require_cupy().from_dlpack(t)
    if t.device.type != "cpu":
        raise ValueError(f"tensor must be on a CPU or CUDA device, got {t.device}")
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()
    return np.from_dlpack(t)


def from_engine(a):
    """A tensor sharing memory with the engine's NumPy or CuPy array ``a``."""
    if isinstance(a, np.ndarray) and not a.flags.writeable:
        a = a.copy()  # DLPack refuses read-only NumPy buffers
    return torch.from_dlpack(a)


def _stream_of(t):
    """Run CuPy work on the current PyTorch CUDA stream of ``t``'s device (no-op on CPU)."""
    if t.device.type != "cuda":
        return contextlib.nullcontext()
    from topkattn.backend import require_cupy

    cp = require_cupy()
    stream = torch.cuda.current_stream(t.device)
    stack = contextlib.ExitStack()
    stack.enter_context(cp.cuda.Device(t.device.index or 0))
    stack.enter_context(cp.cuda.ExternalStream(stream.cuda_stream))
    return stack
