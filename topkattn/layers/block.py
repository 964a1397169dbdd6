"""Pre-norm decoder block: h = x + attn(norm1(x));  y = h + ffn(norm2(h)).

Shape letters: x, h, y (B, T, d).  Backward: dh = dy + ffn'(norm2'(dy));  dx = dh + attn'(norm1'(dh)).
"""
from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from topkattn.backend import Array, get_array_module
from topkattn.layers.attention import Attention
from topkattn.layers.mla import MLA
from topkattn.layers.module import Module, check_grad_output
from topkattn.layers.moe import MoE
from topkattn.layers.rmsnorm import RMSNorm
from topkattn.layers.swiglu import SwiGLU


class Block(Module):
    """Children "attn_norm", "attn" (MLA or Attention), "ffn_norm", "ffn" (SwiGLU or MoE).

    backward accumulates into every child's ``grads``.  The decode cache is the attention layer's
    (:class:`~topkattn.layers.cache.MLACache`, :class:`~topkattn.layers.cache.KVCache`, or a sharded one).
    """

    def __init__(self, attn: MLA | Attention, ffn: SwiGLU | MoE, d_model: int, dtype: DTypeLike = "float32",
                 eps: float = 1e-6) -> None:
        super().__init__()
        self.attn_norm = self.add("attn_norm", RMSNorm(d_model, eps=eps, dtype=dtype))
        self.attn = self.add("attn", attn)
        self.ffn_norm = self.add("ffn_norm", RMSNorm(d_model, eps=eps, dtype=dtype))
        self.ffn = self.add("ffn", ffn)
        self._out = None  # (shape, array) of the last forward's output, for backward's check

    @property
    def aux_loss(self) -> float:
        return getattr(self.ffn, "aux_loss", 0.0) + getattr(self.attn, "aux_loss", 0.0)  # MoE, KV experts

    def forward(self, x: Array, seed: int | np.random.Generator | None = None) -> Array:
        h = x + self.attn.forward(self.attn_norm.forward(x), seed=seed)
        y = h + self.ffn.forward(self.ffn_norm.forward(h))
        self._out = (y.shape, get_array_module(y).empty(0, y.dtype))  # not y itself: no memory kept
        return y

    def backward(self, dy: Array) -> Array:
        if self._out is None:
            raise RuntimeError("Block.backward called before forward")
        dy = check_grad_output(dy, *self._out)  # (B, T, d)
        dh = dy + self.ffn_norm.backward(self.ffn.backward(dy))
        return dh + self.attn_norm.backward(self.attn.backward(dh))

    def init_cache(self, batch: int) -> Any:
        return self.attn.init_cache(batch)

    def step(self, x_t: Array, cache: Any) -> Array:
        h = x_t + self.attn.step(self.attn_norm.step(x_t), cache)
        return h + self.ffn.step(self.ffn_norm.step(h))
