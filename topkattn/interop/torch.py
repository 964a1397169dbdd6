"""PyTorch bridge: top-k attention as a ``torch.library`` custom op.

Shape letters: B batch, H query heads, G KV heads, T queries, S keys, D head dim, Dv value dim.

    out = topkattn.interop.torch.topk_attention(q, k, v, topk=8, causal=True)
    out.sum().backward()      # q.grad, k.grad, v.grad from the engine's backward

Two custom ops (they mutate nothing):

* ``torch.ops.topkattn.topk_attention_fwd(q, k, v, topk, causal, scale, temperature,
  forget_rate, seed, sinks, window, chunk_size) -> (out, idx, lse)`` calls
  ``topk_attention_forward``; ``idx`` (B, H, T, K) int64 holds the selection (-1 = empty slot,
  K = min(sinks, S) + min(window, S) + min(topk, S)) and ``lse`` (B, H, T) the row logsumexp.
* ``torch.ops.topkattn.topk_attention_bwd(dout, q, k, v, idx, out, lse, scale, temperature)
  -> (dq, dk, dv)`` calls ``topk_attention_backward`` on that saved selection.

Each has a fake (meta) implementation, so ``torch.compile`` traces through them (also with
``fullgraph=True``), and a vmap rule that folds the vmapped dimension into B.  The forward
op's autograd formula (``register_autograd``) calls the backward op; ``idx`` and ``lse`` are
not differentiable.  ``torch.func.grad``, ``vmap`` and ``torch.library.opcheck`` work.

Tensors cross by DLPack without copies: CPU tensors become NumPy arrays, CUDA tensors
become CuPy arrays (CuPy runs on the current PyTorch stream).  float16 and bfloat16 inputs
are computed in float32 and the output cast back.  Importing this module imports torch;
``import topkattn`` never does.
"""
import contextlib
import numbers
from typing import Any

import numpy as np
import torch
from torch import Tensor

from topkattn.checks import check_bool, check_int
from topkattn.ops.sparse_attention import SparseAttentionSaved
from topkattn.ops.topk_attention import check_inputs, topk_attention_backward, topk_attention_forward

_ENGINE_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
_LOW_PRECISION = (torch.float16, torch.bfloat16)  # computed in float32 by topk_attention


def topk_attention(q: Tensor, k: Tensor, v: Tensor, *, topk: int, causal: bool = True, scale: float | None = None,
                   temperature: float = 1.0, forget_rate: float = 0.0, seed: int | None = None, sinks: int = 0,
                   window: int = 0, chunk_size: int | None = None) -> Tensor:
    """Top-k attention on PyTorch tensors, differentiable in q, k and v.

    Args:
      q: (B, H, T, D), k: (B, G, S, D), v: (B, G, S, Dv) tensors of one dtype, float32 or
        float64 (float16 and bfloat16 are computed in float32 and the output cast back),
        all on one device (CPU, or CUDA with CuPy installed).  H a multiple of G.
      topk, causal, scale, temperature, forget_rate, seed, sinks, window, chunk_size: as in
        :func:`topkattn.ops.topk_attention` (``topk`` an integer, ``seed`` an integer or
        None).  With ``forget_rate > 0`` the selection is drawn once in forward and reused
        by backward.

    Returns:
      out: (B, H, T, Dv) tensor on q's device, of q's dtype.  Gradients reach only the
      selected keys.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    low = q.dtype in _LOW_PRECISION
    if not low:
        _check_dtypes(q, k, v)
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    opts = _op_options(topk=topk, causal=causal, scale=scale, temperature=temperature,
                       forget_rate=forget_rate, seed=seed, sinks=sinks, window=window,
                       chunk_size=chunk_size, T=q.shape[-2], S=k.shape[-2])
    if low:
        out, _, _ = _TopkAttention.apply(q.float(), k.float(), v.float(), *opts)
        return out.to(q.dtype)
    out, _, _ = _TopkAttention.apply(q, k, v, *opts)
    return out


def _op_options(*, topk, causal, scale, temperature, forget_rate, seed, sinks, window, chunk_size, T, S):
    """The forward op's scalar arguments in schema order, checked (errors name the argument).
    topk, sinks and window above S (and chunk_size above T) mean what S (T) means: clamped, so
    that any Python int fits the schema's int64."""
    if isinstance(topk, str):
        raise ValueError(f"topk must be an integer >= 1 (the torch bridge has no 'auto'), got {topk!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an integer or None for the torch bridge, got {type(seed).__name__}")
    if seed is not None and not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63) for the torch bridge, got {seed!r}")
    chunk = check_int("chunk_size", chunk_size, 1, optional=True)
    return (min(check_int("topk", topk, 1), max(S, 1)), check_bool("causal", causal),
            None if scale is None else _real("scale", scale), _real("temperature", temperature),
            _real("forget_rate", forget_rate), seed, min(check_int("sinks", sinks, 0), S),
            min(check_int("window", window, 0), S), None if chunk is None else min(chunk, max(T, 1)))


def _real(name, value):
    """``float(value)`` of a real number, TypeError naming ``name`` otherwise.  The ranges are the
    engine's checks, run by both implementations of the op (the fake one at trace time)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def _check_dtypes(*named):
    """TypeError naming the first tensor that is not float32 or float64."""
    for name, t in zip(("q", "k", "v"), named):
        if t.dtype not in _ENGINE_DTYPES:
            raise TypeError(f"{name} must be float32 or float64 (float16 and bfloat16 are computed in "
                            f"float32 by topk_attention), got {t.dtype}")


def _check_device(q, k, v):
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.device.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"q must be on a CPU or CUDA device, got {q.device}")


@torch.library.custom_op("topkattn::topk_attention_fwd", mutates_args=())
def topk_attention_fwd(q: Tensor, k: Tensor, v: Tensor, topk: int, causal: bool, scale: float | None,
                       temperature: float, forget_rate: float, seed: int | None, sinks: int,
                       window: int, chunk_size: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """Engine forward: (out (B, H, T, Dv), idx (B, H, T, K) int64, lse (B, H, T))."""
    _check_dtypes(q, k, v)
    _check_device(q, k, v)
    with _stream_of(q):
        out, saved = topk_attention_forward(to_engine(q), to_engine(k), to_engine(v), topk=topk,
                                            causal=causal, scale=scale, temperature=temperature,
                                            forget_rate=forget_rate, seed=seed, sinks=sinks,
                                            window=window, chunk_size=chunk_size)
        return from_engine(out), from_engine(saved.idx).to(torch.int64), from_engine(saved.lse)


@topk_attention_fwd.register_fake
def _fwd_fake(q, k, v, topk, causal, scale, temperature, forget_rate, seed, sinks, window, chunk_size):
    _check_dtypes(q, k, v)
    _check_device(q, k, v)
    _check_shapes(q, k, v, topk=topk, scale=scale, temperature=temperature, forget_rate=forget_rate,
                  sinks=sinks, window=window, chunk_size=chunk_size, seed=seed)
    B, H, T = q.shape[:3]
    S, Dv = k.shape[2], v.shape[3]
    K = torch.sym_min(sinks, S) + torch.sym_min(window, S) + torch.sym_min(topk, S)
    return q.new_empty((B, H, T, Dv)), q.new_empty((B, H, T, K), dtype=torch.int64), q.new_empty((B, H, T))


def _check_shapes(q, k, v, **opts):
    """The engine's own checks on zero-memory NumPy stand-ins (static shapes only): a fake
    call refuses exactly what the real one would."""
    shapes = [t.shape for t in (q, k, v)]
    symbolic = any(isinstance(x, (torch.SymInt, torch.SymFloat)) for x in opts.values())
    if symbolic or not all(isinstance(n, int) for s in shapes for n in s):
        return  # symbolic shapes or options: the real call checks
    check_inputs(*(np.broadcast_to(np.zeros((), _ENGINE_DTYPES[t.dtype]), tuple(t.shape)) for t in (q, k, v)),
                 **opts)


@torch.library.custom_op("topkattn::topk_attention_bwd", mutates_args=())
def topk_attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, idx: Tensor, out: Tensor, lse: Tensor,
                       scale: float | None, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """Engine backward from the forward's selection: (dq, dk, dv)."""
    _check_dtypes(q, k, v)
    _check_device(q, k, v)
    D = q.shape[-1]
    eff_scale = (1.0 / np.sqrt(max(D, 1)) if scale is None else float(scale)) / float(temperature)
    with _stream_of(q):
        saved = SparseAttentionSaved(*(to_engine(t) for t in (q, k, v, idx, out, lse)), eff_scale)
        grads = topk_attention_backward(to_engine(dout.contiguous()), saved)
        return tuple(from_engine(g) for g in grads)


@topk_attention_bwd.register_fake
def _bwd_fake(dout, q, k, v, idx, out, lse, scale, temperature):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, _, _, scale, temperature = inputs[:7]
    out, idx, lse = output
    ctx.save_for_backward(q, k, v, out, idx, lse)  # autograd detects in-place edits of any of them
    ctx.scale, ctx.temperature = scale, temperature
    ctx.mark_non_differentiable(idx, lse)


def _backward(ctx, dout, _didx, _dlse):
    q, k, v, out, idx, lse = ctx.saved_tensors
    dq, dk, dv = _TopkAttentionBackward.apply(dout, q, k, v, idx, out, lse, ctx.scale, ctx.temperature)
    return (dq, dk, dv) + (None,) * 9


class _TopkAttentionBackward(torch.autograd.Function):
    """The backward op, once differentiable: double backward raises instead of returning zeros."""

    generate_vmap_rule = True

    @staticmethod
    def forward(dout, q, k, v, idx, out, lse, scale, temperature):
        return topk_attention_bwd(dout, q, k, v, idx, out, lse, scale, temperature)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("topk_attention has no second derivative (double backward is not supported)")


torch.library.register_autograd("topkattn::topk_attention_fwd", _backward, setup_context=_setup_context)


class _TopkAttention(torch.autograd.Function):
    """The forward op with the same autograd formula as an autograd.Function: torch.func.grad,
    jacrev and vmap of them work through it (custom ops alone support only vmap)."""

    generate_vmap_rule = True  # forward and backward are the custom ops, which have vmap rules

    @staticmethod
    def forward(q, k, v, topk, causal, scale, temperature, forget_rate, seed, sinks, window, chunk_size):
        return topk_attention_fwd(q, k, v, topk, causal, scale, temperature, forget_rate, seed, sinks,
                                  window, chunk_size)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)


def _fold(info, in_dims, tensors):
    """Each tensor with its vmapped dim (or a broadcast one) folded into dim 0 (B): N*B rows."""
    n = info.batch_size
    folded = []
    for t, d in zip(tensors, in_dims):
        t = t.expand(n, *t.shape) if d is None else t.movedim(d, 0)
        folded.append(t.reshape(n * t.shape[1], *t.shape[2:]))
    return folded


def _unfold(n, outputs):
    return tuple(o.reshape(n, o.shape[0] // n, *o.shape[1:]) for o in outputs), (0,) * len(outputs)


def _fwd_vmap(info, in_dims, q, k, v, topk, causal, scale, temperature, forget_rate, seed, sinks, window,
              chunk_size):
    rest = (topk, causal, scale, temperature, forget_rate, seed, sinks, window, chunk_size)
    if forget_rate > 0 and info.randomness == "error":
        raise RuntimeError("forget_rate > 0 draws a random selection: vmap it with randomness='different' "
                           "(the vmapped samples fold into the batch) or randomness='same'")
    if forget_rate > 0 and info.randomness == "same":  # every sample draws what a single call would
        per = [tuple(t.select(d, i) if d is not None else t for t, d in zip((q, k, v), in_dims[:3]))
               for i in range(info.batch_size)]
        outs = [topk_attention_fwd(*p, *rest) for p in per]
        return tuple(torch.stack(o) for o in zip(*outs)), (0, 0, 0)
    return _unfold(info.batch_size, topk_attention_fwd(*_fold(info, in_dims[:3], (q, k, v)), *rest))


def _bwd_vmap(info, in_dims, dout, q, k, v, idx, out, lse, scale, temperature):
    tensors = _fold(info, in_dims[:7], (dout, q, k, v, idx, out, lse))
    return _unfold(info.batch_size, topk_attention_bwd(*tensors, scale, temperature))


torch.library.register_vmap("topkattn::topk_attention_fwd", _fwd_vmap)
torch.library.register_vmap("topkattn::topk_attention_bwd", _bwd_vmap)


def to_engine(t: Tensor) -> Any:
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


def from_engine(a: Any) -> Tensor:
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
