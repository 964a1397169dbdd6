"""Token embedding, optionally tied with the output head.

Shape letters: tokens (B, T) int, W_E (V, d) weight, x (B, T, d), logits (B, T, V).
    forward:  x = W_E[tokens]          backward: dW_E[tokens] += dx  (scatter-add)
    logits:   logits = h W_E^T         backward: dh = dlogits W_E;  dW_E += dlogits^T h
"""
from __future__ import annotations

import numpy as np
from numpy.typing import DTypeLike

from topkattn.backend import Array, as_engine_array, get_array_module
from topkattn.checks import check_int, float_dtype, make_rng
from topkattn.layers.module import Module, as_input, check_grad_output, normal

try:  # the Numba scatter-add; numpy.add.at without Numba
    from topkattn.ops import cpu_kernels as _cpu_kernels
except Exception:  # pragma: no cover - numba missing or broken
    _cpu_kernels = None


class Embedding(Module):
    """``params`` {"weight" (V, d)}, init N(0, 1/d).  backward/backward_logits accumulate."""

    def __init__(self, vocab_size: int, dim: int, seed: int | np.random.Generator = 0, dtype: DTypeLike = "float32",
                 std: float | None = None) -> None:
        super().__init__()
        self.vocab_size = check_int("vocab_size", vocab_size, 1)
        self.dim = check_int("dim", dim, 1)
        std = 1.0 / np.sqrt(dim) if std is None else std
        self.add_param("weight", normal(make_rng(seed), (vocab_size, dim), std, float_dtype(dtype)))
        self._tokens = None
        self._h = None

    def check_tokens(self, tokens: Array) -> Array:
        tokens = as_engine_array(tokens, "tokens")
        xp = get_array_module(self.params["weight"])
        if get_array_module(tokens) is not xp:  # index on the weight's device
            tokens = xp.asarray(tokens) if xp is not np else tokens.get()
        if tokens.dtype.kind not in "iu":
            raise TypeError(f"tokens must be an integer array, got {tokens.dtype}")
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be 2-D (B, T), got shape {tuple(tokens.shape)}")
        if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ValueError(f"tokens must lie in [0, {self.vocab_size}), got values in "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")
        return tokens

    def forward(self, tokens: Array) -> Array:
        tokens = self.check_tokens(tokens)
        self._tokens = tokens
        return self.params["weight"][tokens]  # (B, T, d)

    def step(self, tokens: Array) -> Array:
        return self.params["weight"][self.check_tokens(tokens)]

    def backward(self, dy: Array) -> None:
        """Scatter-add dy (B, T, d), the gradient of forward's output, into the rows of the tokens."""
        if self._tokens is None:
            raise RuntimeError("Embedding.backward called before forward")
        W = self.params["weight"]
        dy = check_grad_output(dy, self._tokens.shape + (self.dim,), W)  # (B, T, d)
        xp = get_array_module(dy)
        rows = self._tokens.reshape(-1)
        vals = dy.reshape(-1, self.dim)
        if xp is np and _cpu_kernels is not None:  # numpy.add.at's result (rows in order), ~100x faster
            _cpu_kernels.scatter_add_rows(self.grads["weight"], rows.astype(np.int64, copy=False),
                                          np.ascontiguousarray(vals))
        elif xp is np:
            np.add.at(self.grads["weight"], rows, vals)
        else:  # pragma: no cover - GPU
            import cupyx
            cupyx.scatter_add(self.grads["weight"], rows, vals)
        return None

    # -- tied output head -----------------------------------------------------------------
    def logits(self, h: Array) -> Array:
        """Tied head: logits (B, T, V) = h W_E^T; keeps h for :meth:`backward_logits`."""
        W = self.params["weight"]
        h = as_input(h, "h", W.dtype, last_dim=self.dim)
        self._h = h
        return h @ W.T

    def logits_step(self, h: Array) -> Array:
        return h @ self.params["weight"].T

    def backward_logits(self, dlogits: Array) -> Array:
        if self._h is None:
            raise RuntimeError("Embedding.backward_logits called before logits")
        W = self.params["weight"]
        dlogits = check_grad_output(dlogits, self._h.shape[:-1] + (self.vocab_size,), W, "dlogits")  # (B, T, V)
        self.grads["weight"] += dlogits.reshape(-1, self.vocab_size).T @ self._h.reshape(-1, self.dim)
        return dlogits @ W  # (B, T, d)
