"""Multi-head Latent Attention (DeepSeek-V2/V3) over top-k or dense causal attention.

Shape letters: B batch, T queries, S = P + T keys (P persistent tokens first), H heads,
d model width, Lq query latent dim (q_lora_rank), C KV latent dim (kv_lora_rank), Dn =
qk_nope_dim, R = qk_rope_dim, Dv = v_head_dim, K index slots per query.

Training (``forward``/``backward``):
    cq = rms(W_DQ x)                     (B, T, Lq)
    q  = [W_UQ cq ; rope(W_QR cq)]       (B, H, T, Dn + R)  per-head nope and rope parts
    c  = rms(W_DKV x)                    (B, T, C)          the latent that decoding caches
    kr = rope(W_KR x)                    (B, T, R)          shared by all heads
    k  = [W_UK c ; kr],  v = W_UV c      (B, H, S, Dn + R), (B, H, S, Dv)
    y  = W_O attn(q, k, v)               scale 1/sqrt(Dn + R); top-k (or dense with topk=None)
Persistent tokens are learnable latents ``persist_c`` (P, C) and rope keys ``persist_kr``
(P, R) (no rotation) prepended to every sequence and passed as sinks=P, so every query
attends them; query t sits at position P + t.

Decoding (``init_cache``/``step``) with absorbed weights (:func:`absorb_mla_weights`):
    q_abs_h = [W_UK_h^T W_UQ_h cq ; rope(W_QR_h cq)]       (B, H, C + R)
    score_h(j) = scale * q_abs_h . [c_j ; kr_j]            (the cache holds only [c_j ; kr_j])
    y = sum_h (W_O_h W_UV_h) (sum_j p_h(j) c_j)

Variants (:mod:`topkattn.layers.mla_variants`, which runs them): ``kv_experts`` E expert pairs
(W_UK_e, W_UV_e) mixed by a top-``kv_experts_active`` router on the query's side over the one
shared latent cache (:mod:`topkattn.layers.kv_experts`); ``k_rank``/``v_rank`` separate key and
value latents (DiffQKV: the cache holds [ck_j ; kr_j] and cv_j, an index only the first);
``ternary`` (with ``act_bits``) BitNet b1.58 projections, packed at decode.
"""
from typing import Any

import numpy as np

from topkattn.backend import Array, get_array_module
from topkattn.checks import check_int, check_real, float_dtype, make_rng
from topkattn.layers import mla_variants
from topkattn.layers.attend import attention_backward, attention_forward, check_selection, check_tail
from topkattn.layers.cache import BlockMeans, MLACache, attend_step, check_step_input
from topkattn.layers.module import Module, as_input, check_grad_output, check_topk, normal
from topkattn.layers.rmsnorm import rms_norm_backward, rms_norm_forward
from topkattn.layers.rope import check_rope_base, rope_angles, rope_apply
from topkattn.ops.ternary import DEFAULT_EPS, check_act_bits


class MLA(Module):
    """MLA layer.  ``params``: W_DQ (Lq, d), q_norm (Lq,), W_UQ (H*Dn, Lq), W_QR (H*R, Lq),
    W_DKV (C, d), kv_norm (C,), W_UK (H*Dn, C), W_UV (H*Dv, C), W_KR (R, d), W_O (d, H*Dv),
    and with P persistent tokens persist_c (P, C), persist_kr (P, R).

    ``topk=None`` is dense causal attention; an int is top-k attention (sinks=P, window,
    forget_rate passed to :func:`topkattn.ops.topk_attention`).  ``window`` only matters with
    top-k (dense attention already sees every key).  ``topk="auto"`` is dynamic k: each query
    attends the fewest keys whose left-out softmax mass is provably <= ``tail_bound`` (at most
    ``max_topk``), in training and at decode.  backward accumulates into ``grads``.
    ``selector`` picks each decode step's keys (the protocol of :mod:`topkattn.decoding.selectors`;
    None, the default, selects exactly: :func:`topkattn.layers.cache.select_step`).
    ``selection="block"``: block top-k attention (MoBA), each query attends its ``topk_blocks``
    best blocks of ``block_size`` keys (own block included) ranked by q . mean(block keys);
    decode keeps the means of the latent key blocks [c ; kr] in the cache, and the absorbed
    query scores them: q_abs . mean([c ; kr]) = q . mean(k) by linearity (persistent rows
    open block 0 in both).  topk stays None, window and forget_rate 0.  ``stats``: None, or an
    :class:`~topkattn.layers.attention_stats.AttentionStats` recording forwards and decode steps.
    ``tail="mean"`` (token top-k only, fixed or dynamic k, forget_rate 0): the softmax mass the
    selection drops goes to the mean value of the unselected keys
    (:func:`topkattn.ops.tail_attention.tail_topk_attention`), in training and at decode (there
    with exact selection only: :func:`topkattn.layers.cache.attend_step`).

    Variants (any of them runs :mod:`topkattn.layers.mla_variants`):
    ``kv_experts`` E >= 1 (0: none): W_UK (E*H*Dn, C), W_UV (E*H*Dv, C) and W_router (E, d);
    each query token mixes its ``kv_experts_active`` r best experts (default min(2, E));
    ``forward`` sets ``aux_loss`` (the load-balancing loss) and ``backward`` adds
    ``aux_loss_weight`` times its gradient.  ``k_rank``/``v_rank``: separate key and value
    latent ranks (either given: W_DKV (Ck, d), kv_norm (Ck,), W_DV (Cv, d), v_norm (Cv,),
    W_UK (.., Ck), W_UV (.., Cv), persist_c (P, Ck), persist_cv (P, Cv); the missing one is
    kv_lora_rank; ``kv_lora_rank`` becomes Ck).  ``ternary``: every projection (W_DQ, W_UQ,
    W_QR, W_DKV, W_DV, W_UK, W_UV, W_KR, W_O) quantised to {-1, 0, +1} * absmean in the forward,
    straight-through backward; ``act_bits`` (ternary only): per-token absmax activations.
    """

    def __init__(self, d_model: int, n_heads: int, q_lora_rank: int, kv_lora_rank: int, qk_nope_dim: int,
                 qk_rope_dim: int, v_head_dim: int, topk: int | str | None = None,
                 seed: int | np.random.Generator | None = 0, dtype: Any = "float32", *, persistent_tokens: int = 0,
                 window: int = 0, forget_rate: float = 0.0, rope_base: float = 10000.0, eps: float = 1e-6,
                 tail_bound: float | None = None, max_topk: int | None = None, kv_experts: int = 0,
                 kv_experts_active: int | None = None, aux_loss_weight: float = 0.01, k_rank: int | None = None,
                 v_rank: int | None = None, ternary: bool = False, act_bits: int | None = None,
                 selection: str = "token", block_size: int | None = None, topk_blocks: int | None = None,
                 tail: str | None = None) -> None:
        super().__init__()
        self.d_model = check_int("d_model", d_model, 1)
        self.n_heads = H = check_int("n_heads", n_heads, 1)
        self.q_lora_rank = Lq = check_int("q_lora_rank", q_lora_rank, 1)
        C = check_int("kv_lora_rank", kv_lora_rank, 1)
        self._init_variants(C, kv_experts, kv_experts_active, aux_loss_weight, k_rank, v_rank, ternary, act_bits)
        self.kv_lora_rank = C = self.k_rank
        E, Cv = max(1, self.kv_experts), self.v_rank
        self.qk_nope_dim = Dn = check_int("qk_nope_dim", qk_nope_dim, 1)
        self.qk_rope_dim = R = check_int("qk_rope_dim", qk_rope_dim, 2)
        if R % 2:
            raise ValueError(f"qk_rope_dim must be even (rotary pairs), got {R}")
        self.v_head_dim = Dv = check_int("v_head_dim", v_head_dim, 1)
        self.persistent_tokens = P = check_int("persistent_tokens", persistent_tokens, 0)
        self.window = check_int("window", window, 0)
        self.forget_rate = check_real("forget_rate", forget_rate, 0.0, 1.0, hi_open=True)
        self.topk, self.tail_bound, self.max_topk = check_topk(topk, tail_bound, max_topk, self.forget_rate)
        self.selection, self.block_size, self.topk_blocks = check_selection(
            selection, block_size, topk_blocks, topk=self.topk, window=self.window, forget_rate=self.forget_rate)
        self.tail = check_tail(tail, selection=self.selection, topk=self.topk, forget_rate=self.forget_rate)
        self.stats = None  # an AttentionStats to record forwards and decode steps
        self.rope_base = check_rope_base("rope_base", rope_base)
        self.eps = check_real("eps", eps, 0.0)  # of the q and kv RMSNorms
        self.scale = 1.0 / np.sqrt(Dn + R)
        self.training = True
        self.selector = None  # decode-step selection: None = exact (see topkattn.layers.cache)
        dt = float_dtype(dtype)
        rng = make_rng(seed)
        d = d_model
        self.add_param("W_DQ", normal(rng, (Lq, d), 1 / np.sqrt(d), dt))
        self.add_param("q_norm", np.ones(Lq, dtype=dt))
        self.add_param("W_UQ", normal(rng, (H * Dn, Lq), 1 / np.sqrt(Lq), dt))
        self.add_param("W_QR", normal(rng, (H * R, Lq), 1 / np.sqrt(Lq), dt))
        self.add_param("W_DKV", normal(rng, (C, d), 1 / np.sqrt(d), dt))
        self.add_param("kv_norm", np.ones(C, dtype=dt))
        self.add_param("W_UK", normal(rng, (E * H * Dn, C), 1 / np.sqrt(C), dt))
        self.add_param("W_UV", normal(rng, (E * H * Dv, Cv), 1 / np.sqrt(Cv), dt))
        self.add_param("W_KR", normal(rng, (R, d), 1 / np.sqrt(d), dt))
        self.add_param("W_O", normal(rng, (d, H * Dv), 1 / np.sqrt(H * Dv), dt))
        if P:
            self.add_param("persist_c", normal(rng, (P, C), 1.0, dt))
            self.add_param("persist_kr", normal(rng, (P, R), 1.0, dt))
        if self.split_latents:  # drawn after plain MLA's params: plain models keep their seeds' weights
            self.add_param("W_DV", normal(rng, (Cv, d), 1 / np.sqrt(d), dt))
            self.add_param("v_norm", np.ones(Cv, dtype=dt))
            if P:
                self.add_param("persist_cv", normal(rng, (P, Cv), 1.0, dt))
        if self.kv_experts:
            self.add_param("W_router", normal(rng, (self.kv_experts, d), 1 / np.sqrt(d), dt))
        self._saved = None

    def _init_variants(self, C, kv_experts, kv_experts_active, aux_loss_weight, k_rank, v_rank, ternary, act_bits):
        """Check and set the variant options (see the class docstring)."""
        self.kv_experts = E = check_int("kv_experts", kv_experts, 0)
        r = check_int("kv_experts_active", kv_experts_active, 1, optional=True)
        if r is not None and not E:
            raise ValueError(f"kv_experts_active needs kv_experts >= 1, got kv_experts_active={r} with kv_experts=0")
        if r is not None and r > E:
            raise ValueError(f"kv_experts_active must be <= kv_experts={E}, got {r}")
        self.kv_experts_active = (min(2, E) if r is None else r) if E else 0
        self.aux_loss_weight = check_real("aux_loss_weight", aux_loss_weight, 0.0)
        self.aux_loss = 0.0
        self.split_latents = k_rank is not None or v_rank is not None
        self.k_rank = C if k_rank is None else check_int("k_rank", k_rank, 1)
        self.v_rank = C if v_rank is None else check_int("v_rank", v_rank, 1)
        if not isinstance(ternary, bool):
            raise TypeError(f"ternary must be True or False, got {type(ternary).__name__} {ternary!r}")
        if act_bits is not None and not ternary:
            raise ValueError(f"act_bits applies only with ternary=True, got act_bits={act_bits!r}")
        self.ternary = ternary
        self.act_bits = check_act_bits(act_bits)
        self.quant_eps = DEFAULT_EPS

    @property
    def variant(self) -> bool:
        """Whether a variant option is set (the general path of :mod:`topkattn.layers.mla_variants` runs)."""
        return bool(self.kv_experts or self.split_latents or self.ternary)

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes the decode cache holds per token: (Ck + R (+ Cv with separate ranks)) floats."""
        floats = self.k_rank + self.qk_rope_dim + (self.v_rank if self.split_latents else 0)
        return floats * self.params["W_DQ"].dtype.itemsize

    # -- training ----------------------------------------------------------------------
    def _check_x(self, x):
        d = self.d_model
        return as_input(x, "x", self.params["W_DQ"].dtype, ndim=3, letters=f"(B, T, d_model={d})",
                        last_dim=d)

    def _queries(self, x, positions):
        """q (B, H, T, Dn+R) and what backward needs."""
        p = self.params
        B, T, _ = x.shape
        H, Dn, R = self.n_heads, self.qk_nope_dim, self.qk_rope_dim
        cq, sq = rms_norm_forward(x @ p["W_DQ"].T, p["q_norm"], self.eps)  # (B, T, Lq)
        qn = (cq @ p["W_UQ"].T).reshape(B, T, H, Dn).transpose(0, 2, 1, 3)  # (B, H, T, Dn)
        cs = rope_angles(positions, R, self.rope_base, get_array_module(x), x.dtype)
        qr = rope_apply((cq @ p["W_QR"].T).reshape(B, T, H, R).transpose(0, 2, 1, 3), *cs)
        xp = get_array_module(x)
        return xp.concatenate([qn, qr], axis=-1), (cq, sq, cs)

    def _latents(self, x, cs):
        """c (B, T, C) normalised latent, kr (B, T, R) rotated rope key."""
        p = self.params
        c, skv = rms_norm_forward(x @ p["W_DKV"].T, p["kv_norm"], self.eps)
        kr = rope_apply(x @ p["W_KR"].T, *cs)  # (B, T, R)
        return c, kr, skv

    def latent_keys(self, x: Array) -> Array:
        """Cached-key form [c_j ; kr_j] (B, P + T, C + R) of a sequence x (B, T, d), no state kept."""
        x = self._check_x(x)
        if self.variant:  # the index part [ck_j ; kr_j] (values apart with separate ranks)
            return mla_variants.latent_rows(self, x)[0]
        xp = get_array_module(x)
        cs = rope_angles(np.arange(x.shape[1]), self.qk_rope_dim, self.rope_base, xp, x.dtype)
        c, kr, _ = self._latents(x, cs)
        c_all, kr_all = self._with_persistent(c, kr)
        return xp.concatenate([c_all, kr_all], axis=-1)

    def _with_persistent(self, c, kr):
        if not self.persistent_tokens:
            return c, kr
        xp = get_array_module(c)
        B, P = c.shape[0], self.persistent_tokens
        pc = xp.broadcast_to(self.params["persist_c"][None], (B, P, c.shape[2]))
        pk = xp.broadcast_to(self.params["persist_kr"][None], (B, P, kr.shape[2]))
        return xp.concatenate([pc, c], axis=1), xp.concatenate([pk, kr], axis=1)

    def project(self, x: Array) -> tuple[Array, Array, Array]:
        """Unabsorbed q (B, H, T, Dn+R), k (B, H, S, Dn+R), v (B, H, S, Dv) of x (B, T, d) (plain MLA)."""
        if self.variant:
            raise ValueError("project() gives plain MLA's unabsorbed q, k, v; this layer has variant options "
                             "(kv_experts, k_rank/v_rank or ternary)")
        x = self._check_x(x)
        q, (_, _, cs) = self._queries(x, np.arange(x.shape[1]))
        c, kr, _ = self._latents(x, cs)
        k, v = self._keys_values(*self._with_persistent(c, kr))
        return q, k, v

    def _keys_values(self, c_all, kr_all):
        p = self.params
        xp = get_array_module(c_all)
        B, S, _ = c_all.shape
        H, Dn, R, Dv = self.n_heads, self.qk_nope_dim, self.qk_rope_dim, self.v_head_dim
        kn = (c_all @ p["W_UK"].T).reshape(B, S, H, Dn).transpose(0, 2, 1, 3)  # (B, H, S, Dn)
        v = (c_all @ p["W_UV"].T).reshape(B, S, H, Dv).transpose(0, 2, 1, 3)  # (B, H, S, Dv)
        krh = xp.broadcast_to(kr_all[:, None], (B, H, S, R))
        return xp.concatenate([kn, krh], axis=-1), v

    def forward(self, x: Array, seed: int | None = None) -> Array:
        """y (B, T, d) from x (B, T, d), causal.  ``seed`` drives forgetful masking."""
        x = self._check_x(x)
        if self.variant:
            return mla_variants.forward(self, x, seed)
        B, T, _ = x.shape
        q, (cq, sq, cs) = self._queries(x, np.arange(T))
        c, kr, skv = self._latents(x, cs)
        c_all, kr_all = self._with_persistent(c, kr)
        k, v = self._keys_values(c_all, kr_all)
        o, att = attention_forward(self, q, k, v, seed)  # (B, H, T, Dv); the op chosen per shape
        of = o.transpose(0, 2, 1, 3).reshape(B, T, self.n_heads * self.v_head_dim)  # (B, T, H*Dv)
        self._saved = (x, cq, sq, cs, c_all, kr_all, skv, att, of)
        return of @ self.params["W_O"].T

    def backward(self, dy: Array) -> Array:
        """dx (B, T, d) from dy (B, T, d); accumulates parameter gradients into ``grads``."""
        if self._saved is None:
            raise RuntimeError("MLA.backward called before forward")
        if self.variant:
            return mla_variants.backward(self, dy)
        x, cq, sq, cs, c_all, kr_all, skv, att, of = self._saved
        p, g = self.params, self.grads
        B, T, d = x.shape
        H, Dn, R, Dv, P = self.n_heads, self.qk_nope_dim, self.qk_rope_dim, self.v_head_dim, self.persistent_tokens
        S = P + T
        C = self.kv_lora_rank
        dy = check_grad_output(dy, x.shape, x)  # (B, T, d)
        g["W_O"] += dy.reshape(-1, d).T @ of.reshape(-1, H * Dv)
        do = (dy @ p["W_O"]).reshape(B, T, H, Dv).transpose(0, 2, 1, 3)  # (B, H, T, Dv)
        dq, dk, dv = attention_backward(do, att)
        # keys and values -> latents
        dkn = dk[..., :Dn].transpose(0, 2, 1, 3).reshape(B * S, H * Dn)
        dvf = dv.transpose(0, 2, 1, 3).reshape(B * S, H * Dv)
        cf = c_all.reshape(B * S, C)
        g["W_UK"] += dkn.T @ cf
        g["W_UV"] += dvf.T @ cf
        dc_all = (dkn @ p["W_UK"] + dvf @ p["W_UV"]).reshape(B, S, C)  # (B, S, C)
        dkr_all = dk[..., Dn:].sum(1)  # (B, S, R)
        if P:
            g["persist_c"] += dc_all[:, :P].sum(0)
            g["persist_kr"] += dkr_all[:, :P].sum(0)
        dckv, dg = rms_norm_backward(dc_all[:, P:], skv)
        g["kv_norm"] += dg
        dkr = rope_apply(dkr_all[:, P:], *cs, inverse=True)  # (B, T, R)
        xf = x.reshape(-1, d)
        g["W_DKV"] += dckv.reshape(-1, C).T @ xf
        g["W_KR"] += dkr.reshape(-1, R).T @ xf
        # queries
        dqn = dq[..., :Dn].transpose(0, 2, 1, 3).reshape(B * T, H * Dn)
        dqr = rope_apply(dq[..., Dn:], *cs, inverse=True).transpose(0, 2, 1, 3).reshape(B * T, H * R)
        cqf = cq.reshape(B * T, self.q_lora_rank)
        g["W_UQ"] += dqn.T @ cqf
        g["W_QR"] += dqr.T @ cqf
        dcq = (dqn @ p["W_UQ"] + dqr @ p["W_QR"]).reshape(B, T, self.q_lora_rank)
        dcq_raw, dgq = rms_norm_backward(dcq, sq)
        g["q_norm"] += dgq
        g["W_DQ"] += dcq_raw.reshape(-1, self.q_lora_rank).T @ xf
        return dckv @ p["W_DKV"] + dkr @ p["W_KR"] + dcq_raw @ p["W_DQ"]

    # -- decoding ------------------------------------------------------------------------
    def decode_weights(self) -> dict[str, Array]:
        """The absorbed (decode-mode) weights, see :func:`absorb_mla_weights` (variants:
        :func:`topkattn.layers.mla_variants.decode_weights`)."""
        if self.variant:
            return mla_variants.decode_weights(self)
        w = absorb_mla_weights(self.params, self.n_heads, self.qk_nope_dim, self.qk_rope_dim, self.v_head_dim)
        return dict(w, **decode_factors(self.params, self.n_heads, self.qk_nope_dim, self.v_head_dim))

    def init_cache(self, batch: int) -> MLACache:
        """An empty :class:`MLACache` for ``batch`` rows; absorbs the current weights."""
        batch = check_int("batch", batch, 1)
        if self.variant:
            return self._with_block_state(mla_variants.init_cache(self, batch))
        p = self.params
        xp = get_array_module(p["W_DQ"])
        cache = self._with_block_state(MLACache(xp, batch, self.kv_lora_rank, self.qk_rope_dim, p["W_DQ"].dtype,
                                                self.decode_weights(), owner=self))
        if self.persistent_tokens:
            rows = xp.concatenate([p["persist_c"], p["persist_kr"]], axis=-1)  # (P, C + R)
            cache.buf.append(xp.broadcast_to(rows[None], (batch,) + rows.shape))
            cache.prefix = self.persistent_tokens
        return cache

    def _with_block_state(self, cache):
        """``cache`` with a :class:`BlockMeans` of its latent keys (B, 1, Nb, C + R) for a block layer."""
        if self.selection == "block":
            keys = cache.buf.data
            cache.block_means = BlockMeans(get_array_module(keys), cache.batch, 1, keys.shape[-1], keys.dtype,
                                           self.block_size)
        return cache

    def absorbed_query(self, x_t: Array, position: int, weights: dict[str, Array]) -> Array:
        """q_abs (B, H, C + R) for x_t (B, d) at token ``position``."""
        if self.variant:
            return mla_variants.absorbed_query(self, x_t, position, weights)[0]
        B = x_t.shape[0]
        H, C, R = self.n_heads, self.kv_lora_rank, self.qk_rope_dim
        cq = rms_norm_forward(x_t @ weights["W_DQ"].T, weights["q_norm"], self.eps)[0]  # (B, Lq)
        if "W_UKh" in weights:  # W_UK_h^T (W_UQ_h cq): the factors, fewer bytes than W_QK (see decode_factors)
            qn = (cq @ weights["W_UQ"].T).reshape(B, H, 1, -1)  # (B, H, 1, Dn)
            q_lat = get_array_module(x_t).matmul(qn, weights["W_UKh"])[:, :, 0]  # (B, H, C)
        else:
            q_lat = (cq @ weights["W_QK"].T).reshape(B, H, C)
        cs = rope_angles([position], R, self.rope_base, get_array_module(x_t), x_t.dtype)
        qr = rope_apply((cq @ weights["W_QR"].T).reshape(B, H, R), *cs)
        return get_array_module(x_t).concatenate([q_lat, qr], axis=-1)

    def step(self, x_t: Array, cache: MLACache) -> Array:
        """y_t (B, 1, d) for x_t (B, 1, d); appends [c ; kr] (C + R floats) per row to ``cache``."""
        x_t = check_step_input(self, self._check_x(x_t), cache)
        if self.variant:
            return mla_variants.step(self, x_t, cache)
        B = x_t.shape[0]
        w = cache.weights
        xp = get_array_module(x_t)
        x1 = x_t[:, 0]  # (B, d)
        pos = cache.n_tokens
        q_abs = self.absorbed_query(x1, pos, w)  # (B, H, C + R)
        c = rms_norm_forward(x1 @ w["W_DKV"].T, w["kv_norm"], self.eps)[0]  # (B, C)
        cs = rope_angles([pos], self.qk_rope_dim, self.rope_base, xp, x_t.dtype)
        kr = rope_apply((x1 @ w["W_KR"].T)[:, None], *cs)[:, 0]  # (B, R)
        cache.buf.append(xp.concatenate([c, kr], axis=-1)[:, None])
        keys = cache.keys[:, None]  # (B, 1, S, C + R)
        # (B, H, C) dense, (B, H, C + R) top-k or block: one gather of [c ; kr] rows
        o = attend_step(self, q_abs, cache, keys, keys, dense_values=keys[..., :self.kv_lora_rank])
        o_lat = o[..., :self.kv_lora_rank]  # (B, H, C)
        if "W_UVh" in w:  # W_O (W_UV_h o_lat_h): the factors of W_OV
            ov = xp.matmul(o_lat[:, :, None, :], w["W_UVh"])[:, :, 0]  # (B, H, Dv)
            return (ov.reshape(B, -1) @ w["W_O"].T)[:, None]  # (B, 1, d)
        return (o_lat.reshape(B, -1) @ w["W_OV"].T)[:, None]  # (B, 1, d)


def decode_factors(params: dict[str, Array], n_heads: int, qk_nope_dim: int, v_head_dim: int) -> dict[str, Array]:
    """The factors of the absorbed products, laid out for one decode step (copies: a snapshot).

    W_UQ (H*Dn, Lq), W_UKh (H, Dn, C), W_UVh (H, C, Dv) = W_UV_h^T, W_O (d, H*Dv).  A step
    multiplies them in turn: q_lat_h = W_UK_h^T (W_UQ_h cq) equals W_QK_h cq and
    W_O (W_UV_h o_h) equals W_OV_h o_h.  With C > Dn, Dv the factors are smaller than the
    products (H=16, Dn=Dv=64, C=256, Lq=512, d=1024: 8 MB of float32 against 24 MB), and a
    decode step reads every weight once, so it reads less.
    """
    H, Dn, Dv = n_heads, qk_nope_dim, v_head_dim
    C = params["W_UK"].shape[1]
    return {"W_UQ": params["W_UQ"].copy(), "W_UKh": params["W_UK"].reshape(H, Dn, C).copy(),
            "W_UVh": params["W_UV"].reshape(H, Dv, C).swapaxes(1, 2).copy(), "W_O": params["W_O"].copy()}


def absorb_mla_weights(params: dict[str, Array], n_heads: int, qk_nope_dim: int, qk_rope_dim: int,
                       v_head_dim: int) -> dict[str, Array]:
    """Convert training-mode MLA params to decode mode (weight absorption).

    Returns a dict with W_DQ, q_norm, W_QR, W_DKV, kv_norm, W_KR unchanged and
      W_QK (H*C, Lq):  block h = W_UK_h^T W_UQ_h   (so q_lat_h = W_QK_h cq = W_UK_h^T q_nope_h)
      W_OV (d, H*C):   block h = W_O_h W_UV_h      (so y = sum_h W_OV_h o_lat_h)
    """
    H, Dn, Dv = n_heads, qk_nope_dim, v_head_dim
    W_UK, W_UQ, W_UV, W_O = params["W_UK"], params["W_UQ"], params["W_UV"], params["W_O"]
    C, Lq, d = W_UK.shape[1], W_UQ.shape[1], W_O.shape[0]
    xp = get_array_module(W_UK)
    uk = W_UK.reshape(H, Dn, C)
    uq = W_UQ.reshape(H, Dn, Lq)
    W_QK = xp.matmul(uk.swapaxes(1, 2), uq).reshape(H * C, Lq)  # (H*C, Lq)
    o = W_O.reshape(d, H, Dv).transpose(1, 0, 2)  # (H, d, Dv)
    W_OV = xp.matmul(o, W_UV.reshape(H, Dv, C)).transpose(1, 0, 2).reshape(d, H * C)  # (d, H*C)
    out = {k: params[k] for k in ("W_DQ", "q_norm", "W_QR", "W_DKV", "kv_norm", "W_KR")}
    out.update(W_QK=W_QK, W_OV=W_OV)
    return out
