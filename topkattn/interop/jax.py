"""JAX bridge: top-k attention as a ``jax.custom_vjp`` function.

Shape letters: B batch, H query heads, G KV heads, T queries, S keys, D head dim, Dv value dim,
K index slots per query.

    f = lambda q, k, v: topkattn.interop.jax.topk_attention(q, k, v, topk=8).sum()
    jax.grad(f, argnums=(0, 1, 2))(q, k, v)          # eager: engine via DLPack
    jax.jit(jax.grad(f))(q, k, v)                    # traced: engine via jax.pure_callback

The forward calls ``topk_attention_forward`` and returns the output plus the residuals
backward needs (the selected indices (B, H, T, K) and the row logsumexp (B, H, T)); the
backward calls ``topk_attention_backward``.  On concrete arrays (eager mode) the engine
gets DLPack views (NumPy on CPU, CuPy on GPU); under tracing (``jit``, ``vmap``, ...) it
runs on the host through ``jax.pure_callback``.  Importing this module imports jax;
``import topkattn`` never does.  float64 needs ``jax_enable_x64``.
"""
from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from topkattn.backend import as_engine_array, to_numpy
from topkattn.checks import check_bool
from topkattn.ops.sparse_attention import SparseAttentionSaved
from topkattn.ops.topk_attention import check_inputs, topk_attention_backward, topk_attention_forward


def topk_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, topk: int, causal: bool = True,
                   scale: float | None = None, temperature: float = 1.0, forget_rate: float = 0.0,
                   seed: int | None = None, sinks: int = 0, window: int = 0,
                   chunk_size: int | None = None) -> jax.Array:
    """Top-k attention on JAX arrays, differentiable in q, k and v (reverse mode).

    Args:
      q: (B, H, T, D), k: (B, G, S, D), v: (B, G, S, Dv), float32 or float64, H a
        multiple of G.
      topk, causal, scale, temperature, forget_rate, sinks, window, chunk_size: as in
        :func:`topkattn.ops.topk_attention`.  seed: an int or None; with ``forget_rate > 0``
        pass an int, since a traced function must return the same value for the same
        inputs (the callback is pure only when the draws are reproducible).

    Returns:
      out: (B, H, T, Dv), a JAX array.
    """
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"seed must be an int or None in the JAX bridge, got {type(seed).__name__}")
    if forget_rate and seed is None:
        raise ValueError("forget_rate > 0 needs an int seed in the JAX bridge "
                         f"(got forget_rate={forget_rate!r}, seed=None)")
    opts = (("topk", topk), ("causal", check_bool("causal", causal)), ("scale", scale), ("temperature", temperature),
            ("forget_rate", forget_rate), ("seed", seed), ("sinks", sinks), ("window", window),
            ("chunk_size", chunk_size))
    # each value's type joins the cache key: 2 == 2.0 == True would otherwise share one cached
    # function, so a call would be checked with another call's values (refused or let through)
    return _op(tuple((name, type(val), val) for name, val in opts))(q, k, v)


@functools.lru_cache(maxsize=128)
def _op(opts):
    """One custom_vjp function per option set (options are static, not traced)."""
    kw = {name: val for name, _, val in opts}

    @jax.custom_vjp
    def attn(q, k, v):
        return _forward(q, k, v, kw)[0]

    def fwd(q, k, v):
        out, idx, lse = _forward(q, k, v, kw)
        return out, (q, k, v, out, idx, lse)

    def bwd(res, dout):
        return _backward(dout, *res, kw)

    attn.defvjp(fwd, bwd)
    return attn


def _forward(q, k, v, kw):
    """(out (B, H, T, Dv), idx (B, H, T, K) int32, lse (B, H, T)) as JAX arrays."""
    if _concrete(q, k, v):
        out, saved = topk_attention_forward(*(as_engine_array(a, n) for a, n in ((q, "q"), (k, "k"), (v, "v"))), **kw)
        return jnp.from_dlpack(out), jnp.from_dlpack(saved.idx.astype(np.int32)), jnp.from_dlpack(saved.lse)
    q, k, v = (jnp.asarray(a) for a in (q, k, v))
    # traced: check shapes, dtypes and options now, with the engine's own checks on zero-stride
    # stand-ins, so that a bad call fails at trace time naming the argument (not in the callback)
    if isinstance(kw["topk"], str):  # dynamic k has no static number of slots
        raise ValueError(f"topk must be an integer >= 1 in the JAX bridge, got {kw['topk']!r}")
    stand_ins = [np.broadcast_to(np.zeros((), a.dtype), a.shape) for a in (q, k, v)]
    check_inputs(*stand_ins, **{name: val for name, val in kw.items() if name != "causal"})
    K = _slots(k.shape[2], kw)
    B, H, T, _ = q.shape
    shapes = (jax.ShapeDtypeStruct((B, H, T, v.shape[-1]), q.dtype),
              jax.ShapeDtypeStruct((B, H, T, K), jnp.int32),
              jax.ShapeDtypeStruct((B, H, T), q.dtype))

    def host(qh, kh, vh):
        out, saved = topk_attention_forward(np.asarray(qh), np.asarray(kh), np.asarray(vh), **kw)
        return to_numpy(out), to_numpy(saved.idx).astype(np.int32), to_numpy(saved.lse)

    return jax.pure_callback(host, shapes, q, k, v, vmap_method="sequential")


def _backward(dout, q, k, v, out, idx, lse, kw):
    """(dq, dk, dv) from the residuals, calling the engine's backward."""
    D = q.shape[-1]
    scale = (1.0 / np.sqrt(D) if kw["scale"] is None else float(kw["scale"])) / float(kw["temperature"])

    def engine(dout, q, k, v, out, idx, lse):
        saved = SparseAttentionSaved(q, k, v, idx.astype(np.int64), out, lse, scale)
        return topk_attention_backward(dout, saved)

    if _concrete(dout, q, k, v, out, idx, lse):
        arrs = [as_engine_array(a) for a in (dout, q, k, v, out, idx, lse)]
        return tuple(jnp.from_dlpack(g) for g in engine(*arrs))
    shapes = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (q, k, v))

    def host(*arrs):
        return tuple(to_numpy(g) for g in engine(*(np.asarray(a) for a in arrs)))

    return jax.pure_callback(host, shapes, dout, q, k, v, out, idx, lse, vmap_method="sequential")


def _slots(S, kw):
    """K, the index slots per query the engine returns for S keys and the (checked) options ``kw``
    (so a traced call knows its shape)."""
    return min(int(kw["sinks"]), S) + min(int(kw["window"]), S) + min(int(kw["topk"]), S)


def _concrete(*arrays):
    return not any(isinstance(a, jax.core.Tracer) for a in arrays)
