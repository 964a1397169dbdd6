"""Plain causal self-attention (MHA / GQA / MQA) over top-k or dense attention.

Shape letters: B batch, T queries, S = P + T keys (P persistent tokens first), H query
heads, G = n_kv_heads (H % G == 0: G = H MHA, 1 < G < H GQA, G = 1 MQA), D = head_dim
(query/key width), Dv = v_head_dim (value width; Sigma-style D > Dv allowed), d model width,
K index slots per query.

    q = rope(W_Q x) (B, H, T, D);  k = rope(W_K x) (B, G, T, D);  v = W_V x (B, G, T, Dv)
    k, v = [persist_k ; k], [persist_v ; v]      learnable (G, P, D), (G, P, Dv), not rotated
    y = W_O attn(q, k, v)                          scale 1/sqrt(D), sinks=P
Decoding keeps the full key and value cache: G (D + Dv) numbers per token.
"""
from typing import Any

import numpy as np

from topkattn.backend import Array, get_array_module
from topkattn.checks import check_int, check_real, float_dtype, make_rng
from topkattn.layers import attention_variants
from topkattn.layers.attend import attention_backward, attention_forward, check_selection, check_tail
from topkattn.layers.cache import BlockMeans, KVCache, attend_step, check_step_input
from topkattn.layers.module import Module, as_input, check_grad_output, check_topk, normal
from topkattn.layers.rope import check_rope_base, rope_angles, rope_apply


class Attention(Module):
    """``params``: W_Q (H*D, d), W_K (G*D, d), W_V (G*Dv, d), W_O (d, H*Dv), and with P
    persistent tokens persist_k (G, P, D), persist_v (G, P, Dv).

    ``topk=None`` is dense causal attention; an int is top-k attention (sinks=P, window,
    forget_rate passed to :func:`topkattn.ops.topk_attention`); ``window`` only matters with
    top-k; ``topk="auto"`` is dynamic k (``tail_bound``, ``max_topk``, as in :class:`MLA`).
    ``rope=False`` leaves q and k unrotated.  ``selection="block"`` is block top-k attention
    (MoBA): each query attends its ``topk_blocks`` best blocks of ``block_size`` keys (own block
    included), ranked by q . mean(block keys); decode keeps the block means in the cache
    (:func:`topkattn.layers.cache.attend_step`); topk stays None, window and forget_rate 0.
    backward accumulates into ``grads``.  ``selector`` picks each decode step's keys (token top-k).
    ``stats``: None, or an :class:`~topkattn.layers.attention_stats.AttentionStats` recording
    every forward and decode step.  ``tail="mean"``: top-k with a mean tail, as in :class:`MLA`.

    Variants (:mod:`topkattn.layers.attention_variants` runs them): ``kv_experts`` E >= 1 expert K/V
    projections W_K (E*G*D, d), W_V (E*G*Dv, d) and W_router (E, d), each token's key and value
    mixed by its ``kv_experts_active`` r best experts (default min(2, E)); ``aux_loss`` and
    ``aux_loss_weight`` as in :class:`MLA`.  ``ternary``: W_Q, W_K, W_V, W_O BitNet b1.58 ternary
    (``act_bits``: per-token absmax activations), packed at 2 bits per weight at decode.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None, head_dim: int | None = None,
                 v_head_dim: int | None = None, topk: int | str | None = None,
                 seed: int | np.random.Generator | None = 0, dtype: Any = "float32", *, persistent_tokens: int = 0,
                 window: int = 0, forget_rate: float = 0.0, rope: bool = True, rope_base: float = 10000.0,
                 tail_bound: float | None = None, max_topk: int | None = None, selection: str = "token",
                 block_size: int | None = None, topk_blocks: int | None = None, tail: str | None = None,
                 kv_experts: int = 0, kv_experts_active: int | None = None, aux_loss_weight: float = 0.01,
                 ternary: bool = False, act_bits: int | None = None) -> None:
        super().__init__()
        attention_variants.init_options(self, kv_experts, kv_experts_active, aux_loss_weight, ternary, act_bits)
        self.d_model = d = check_int("d_model", d_model, 1)
        self.n_heads = H = check_int("n_heads", n_heads, 1)
        self.n_kv_heads = G = H if n_kv_heads is None else check_int("n_kv_heads", n_kv_heads, 1)
        if H % G:
            raise ValueError(f"n_heads={H} must be a multiple of n_kv_heads, got n_kv_heads={G}")
        if head_dim is None:
            if d % H:
                raise ValueError(f"d_model={d} must be divisible by n_heads={H} when head_dim is None")
            head_dim = d // H
        self.head_dim = D = check_int("head_dim", head_dim, 1)
        self.v_head_dim = Dv = D if v_head_dim is None else check_int("v_head_dim", v_head_dim, 1)
        self.rope = bool(rope)
        if self.rope and D % 2:
            raise ValueError(f"head_dim must be even for rotary embedding, got {D}")
        self.persistent_tokens = P = check_int("persistent_tokens", persistent_tokens, 0)
        self.window = check_int("window", window, 0)
        self.forget_rate = check_real("forget_rate", forget_rate, 0.0, 1.0, hi_open=True)
        self.topk, self.tail_bound, self.max_topk = check_topk(topk, tail_bound, max_topk, self.forget_rate)
        self.selection, self.block_size, self.topk_blocks = check_selection(
            selection, block_size, topk_blocks, topk=self.topk, window=self.window, forget_rate=self.forget_rate)
        self.tail = check_tail(tail, selection=self.selection, topk=self.topk, forget_rate=self.forget_rate)
        self.stats = None  # an AttentionStats to record forwards and decode steps
        self.rope_base = check_rope_base("rope_base", rope_base)
        self.scale = 1.0 / np.sqrt(D)
        self.training = True
        self.selector = None  # decode-step selection: None = exact (see topkattn.layers.cache)
        dt = float_dtype(dtype)
        rng = make_rng(seed)
        self.add_param("W_Q", normal(rng, (H * D, d), 1 / np.sqrt(d), dt))
        nE = max(1, self.kv_experts)
        self.add_param("W_K", normal(rng, (nE * G * D, d), 1 / np.sqrt(d), dt))
        self.add_param("W_V", normal(rng, (nE * G * Dv, d), 1 / np.sqrt(d), dt))
        self.add_param("W_O", normal(rng, (d, H * Dv), 1 / np.sqrt(H * Dv), dt))
        if P:
            self.add_param("persist_k", normal(rng, (G, P, D), 1.0, dt))
            self.add_param("persist_v", normal(rng, (G, P, Dv), 1.0, dt))
        if self.kv_experts:
            self.add_param("W_router", normal(rng, (self.kv_experts, d), 1 / np.sqrt(d), dt))
        self._saved = None

    @property
    def variant(self) -> bool:
        """Whether ``kv_experts`` or ``ternary`` is set (:mod:`topkattn.layers.attention_variants` runs)."""
        return bool(self.kv_experts or self.ternary)

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes the decode cache holds per token: G (D + Dv) floats."""
        return self.n_kv_heads * (self.head_dim + self.v_head_dim) * self.params["W_Q"].dtype.itemsize

    def _check_x(self, x):
        d = self.d_model
        return as_input(x, "x", self.params["W_Q"].dtype, ndim=3, letters=f"(B, T, d_model={d})",
                        last_dim=d)

    def _rot(self, a, cs, inverse=False):
        return rope_apply(a, *cs, inverse=inverse) if self.rope else a

    def forward(self, x: Array, seed: int | None = None) -> Array:
        """y (B, T, d) from x (B, T, d), causal.  ``seed`` drives forgetful masking."""
        x = self._check_x(x)
        if self.variant:
            return attention_variants.forward(self, x, seed)
        xp = get_array_module(x)
        p = self.params
        B, T, _ = x.shape
        H, G, D, Dv, P = self.n_heads, self.n_kv_heads, self.head_dim, self.v_head_dim, self.persistent_tokens
        cs = rope_angles(np.arange(T), D, self.rope_base, xp, x.dtype) if self.rope else None
        q = self._rot((x @ p["W_Q"].T).reshape(B, T, H, D).transpose(0, 2, 1, 3), cs)
        k = self._rot((x @ p["W_K"].T).reshape(B, T, G, D).transpose(0, 2, 1, 3), cs)
        v = (x @ p["W_V"].T).reshape(B, T, G, Dv).transpose(0, 2, 1, 3)
        if P:
            k = xp.concatenate([xp.broadcast_to(p["persist_k"][None], (B, G, P, D)), k], axis=2)
            v = xp.concatenate([xp.broadcast_to(p["persist_v"][None], (B, G, P, Dv)), v], axis=2)
        o, att = attention_forward(self, q, k, v, seed)  # (B, H, T, Dv); the op chosen per shape
        of = o.transpose(0, 2, 1, 3).reshape(B, T, H * Dv)
        self._saved = (x, cs, att, of)
        return of @ p["W_O"].T

    def backward(self, dy: Array) -> Array:
        """dx (B, T, d) from dy (B, T, d); accumulates parameter gradients into ``grads``."""
        if self._saved is None:
            raise RuntimeError("Attention.backward called before forward")
        if self.variant:
            return attention_variants.backward(self, dy)
        x, cs, att, of = self._saved
        p, g = self.params, self.grads
        B, T, d = x.shape
        H, G, D, Dv, P = self.n_heads, self.n_kv_heads, self.head_dim, self.v_head_dim, self.persistent_tokens
        dy = check_grad_output(dy, x.shape, x)  # (B, T, d)
        g["W_O"] += dy.reshape(-1, d).T @ of.reshape(-1, H * Dv)
        do = (dy @ p["W_O"]).reshape(B, T, H, Dv).transpose(0, 2, 1, 3)
        dq, dk, dv = attention_backward(do, att)
        if P:
            g["persist_k"] += dk[:, :, :P].sum(0)
            g["persist_v"] += dv[:, :, :P].sum(0)
            dk, dv = dk[:, :, P:], dv[:, :, P:]
        dqf = self._rot(dq, cs, inverse=True).transpose(0, 2, 1, 3).reshape(B * T, H * D)
        dkf = self._rot(dk, cs, inverse=True).transpose(0, 2, 1, 3).reshape(B * T, G * D)
        dvf = dv.transpose(0, 2, 1, 3).reshape(B * T, G * Dv)
        xf = x.reshape(-1, d)
        g["W_Q"] += dqf.T @ xf
        g["W_K"] += dkf.T @ xf
        g["W_V"] += dvf.T @ xf
        return (dqf @ p["W_Q"] + dkf @ p["W_K"] + dvf @ p["W_V"]).reshape(B, T, d)

    def with_kv_heads(self, n_kv_heads: int) -> "Attention":
        """A copy converted to ``n_kv_heads`` KV heads (MHA -> GQA -> MQA) by mean-pooling
        each group of KV heads (the GQA paper's uptraining start point).

        The new KV head g is the mean of the old heads g*r .. g*r + r - 1 (r = G / n_kv_heads);
        queries and W_O are kept.  Exact when the pooled heads were equal.
        """
        G2 = check_int("n_kv_heads", n_kv_heads, 1)
        if self.variant:
            raise ValueError("with_kv_heads converts plain attention; this layer has kv_experts or ternary")
        G, H, D, Dv = self.n_kv_heads, self.n_heads, self.head_dim, self.v_head_dim
        if G % G2 or H % G2:
            raise ValueError(f"n_kv_heads must divide the current n_kv_heads={G}, got {G2}")
        p = self.params
        new = Attention(self.d_model, H, G2, D, Dv, topk=self.topk, seed=0, dtype=p["W_Q"].dtype,
                        persistent_tokens=self.persistent_tokens, window=self.window,
                        forget_rate=self.forget_rate, rope=self.rope, rope_base=self.rope_base,
                        tail_bound=self.tail_bound, max_topk=self.max_topk, selection=self.selection,
                        block_size=self.block_size, topk_blocks=self.topk_blocks, tail=self.tail)
        new.to_device(get_array_module(p["W_Q"]))
        r = G // G2
        pooled = {
            "W_Q": p["W_Q"], "W_O": p["W_O"],
            "W_K": p["W_K"].reshape(G2, r, D, -1).mean(1).reshape(G2 * D, -1),
            "W_V": p["W_V"].reshape(G2, r, Dv, -1).mean(1).reshape(G2 * Dv, -1),
        }
        if self.persistent_tokens:
            pooled["persist_k"] = p["persist_k"].reshape(G2, r, self.persistent_tokens, D).mean(1)
            pooled["persist_v"] = p["persist_v"].reshape(G2, r, self.persistent_tokens, Dv).mean(1)
        for name, val in pooled.items():
            new.params[name][...] = val
        new.selector = self.selector
        return new

    # -- decoding ------------------------------------------------------------------------
    def init_cache(self, batch: int) -> KVCache:
        """An empty :class:`KVCache` (full keys and values) for ``batch`` rows."""
        batch = check_int("batch", batch, 1)
        p = self.params
        xp = get_array_module(p["W_Q"])
        cache = KVCache(xp, batch, self.n_kv_heads, self.head_dim, self.v_head_dim, p["W_Q"].dtype, self)
        if self.selection == "block":
            cache.block_means = BlockMeans(xp, batch, self.n_kv_heads, self.head_dim, p["W_Q"].dtype, self.block_size)
        if self.persistent_tokens:
            P, G = self.persistent_tokens, self.n_kv_heads
            cache.kbuf.append(xp.broadcast_to(p["persist_k"][None], (batch, G, P, self.head_dim)))
            cache.vbuf.append(xp.broadcast_to(p["persist_v"][None], (batch, G, P, self.v_head_dim)))
            cache.prefix = P
        if self.variant:  # packed (ternary) or copied projections and the router, taken now
            cache.weights = attention_variants.decode_weights(self)
        return cache

    def step(self, x_t: Array, cache: KVCache) -> Array:
        """y_t (B, 1, d) for x_t (B, 1, d); appends this token's keys and values to ``cache``."""
        x_t = check_step_input(self, self._check_x(x_t), cache)
        if self.variant:
            return attention_variants.step(self, x_t, cache)
        B = x_t.shape[0]
        xp = get_array_module(x_t)
        p = self.params
        H, G, D, Dv = self.n_heads, self.n_kv_heads, self.head_dim, self.v_head_dim
        x1 = x_t[:, 0]
        cs = rope_angles([cache.n_tokens], D, self.rope_base, xp, x_t.dtype) if self.rope else None
        q = self._rot((x1 @ p["W_Q"].T).reshape(B, H, 1, D), cs)[:, :, 0]  # (B, H, D)
        k = self._rot((x1 @ p["W_K"].T).reshape(B, G, 1, D), cs)  # (B, G, 1, D)
        cache.kbuf.append(k)
        cache.vbuf.append((x1 @ p["W_V"].T).reshape(B, G, 1, Dv))
        o = attend_step(self, q, cache, cache.keys, cache.values)  # (B, H, Dv): dense, top-k or block
        return (o.reshape(B, H * Dv) @ p["W_O"].T)[:, None]
