"""The variants of plain attention (:class:`topkattn.layers.attention.Attention`): KV experts and
ternary projections.

:class:`~topkattn.layers.attention.Attention` runs these functions when ``kv_experts`` or
``ternary`` is set (the plain layer keeps its own path; with neither option this path computes
the same numbers, a test checks it).

Shape letters: B batch, T queries, N = B T rows, S = P + T keys (P persistent tokens first), H query
heads, G KV heads, D query/key head dim, Dv value head dim, d model width, E experts, r active experts.

Training (W~: the weight, or its ternary view; x~, o~: the per-token absmax-quantised activations
with ``act_bits``, else x and o; :func:`topkattn.layers.projection.ternary_product`):
    q = rope(x~ W~_Q^T)                                            (B, H, T, D)
  no experts:  k = rope(x~ W~_K^T),  v = x~ W~_V^T                   (B, G, T, D), (B, G, T, Dv)
  experts:     gates = route(x) (N, E), renormalised over the top r (topkattn.layers.kv_experts)
               k_t = rope(sum_e gates[t, e] x~_t W~_K[e]^T),  v_t = sum_e gates[t, e] x~_t W~_V[e]^T
               W_K (E G D, d), W_V (E G Dv, d): expert e's rows e G D .. (e + 1) G D - 1
    k, v = [persist_k ; k], [persist_v ; v]
    y = o~ W~_O^T,  o = attn(q, k, v)                               scale 1/sqrt(D)
``aux_loss`` is the router's load-balancing loss; backward adds ``aux_loss_weight`` times its gradient.
Cost: every expert's K and V projection is computed for every token (E times plain attention's K/V
projection work, one matmul each); the gates zero the unchosen experts' rows.

**Cached keys across experts.**  A key is mixed by the gates of its OWN token (the token whose x made
it), so k_j and v_j are fixed once token j is seen: the decode cache stores the mixed k_j, v_j (G (D +
Dv) numbers per token, as plain MHA) and a step computes this token's gates, mixes its key and value
and appends them; every later query scores the same k_j as in training.  (MLA routes on the query's
side instead, over one shared latent cache: :mod:`topkattn.layers.kv_experts`.)

Backward (the chain rule; ternary weights and quantised activations pass the gradient straight
through to the float master weights and to x): dk_t, dv_t of the mixed rows give
d rows[t, e] = gates[t, e] dk_t, d gates[t, e] = (x~_t W~_K[e]^T) . dk_t (+ the same for v), then
:func:`topkattn.layers.kv_experts.router_backward`; a row's unchosen experts get zero gradient.

Decoding: the cache (a :class:`topkattn.layers.cache.KVCache`) carries ``weights``, the snapshot of
:func:`decode_weights`: with ternary W_Q, W_K, W_V, W_O are :class:`topkattn.ops.ternary.PackedTernary`
(2 bits per weight), multiplied directly by :func:`topkattn.layers.projection.decode_project`.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from topkattn.backend import Array, get_array_module
from topkattn.checks import check_int, check_real
from topkattn.layers.attend import attention_backward, attention_forward
from topkattn.layers.cache import attend_step
from topkattn.layers.kv_experts import mix_rows, mix_rows_backward, route, router_backward
from topkattn.layers.module import check_grad_output
from topkattn.layers.projection import decode_project, decode_weight, ternary_product
from topkattn.layers.rope import rope_angles, rope_apply
from topkattn.ops.ternary import DEFAULT_EPS, check_act_bits

PROJECTIONS = ("W_Q", "W_K", "W_V", "W_O")  # ternary with ``ternary``; packed at decode


def init_options(layer: Any, kv_experts: int, kv_experts_active: int | None, aux_loss_weight: float,
                 ternary: bool, act_bits: int | None) -> None:
    """Check the variant options and set them on ``layer`` (ValueError/TypeError naming the argument).

    kv_experts: E >= 0 (0: none); kv_experts_active: r in [1, E] (None: min(2, E)); aux_loss_weight
    >= 0; ternary: a bool; act_bits: None or an int in [2, 8], ternary only.
    """
    layer.kv_experts = E = check_int("kv_experts", kv_experts, 0)
    r = check_int("kv_experts_active", kv_experts_active, 1, optional=True)
    if r is not None and not E:
        raise ValueError(f"kv_experts_active needs kv_experts >= 1, got kv_experts_active={r} with kv_experts=0")
    if r is not None and r > E:
        raise ValueError(f"kv_experts_active must be <= kv_experts={E}, got {r}")
    layer.kv_experts_active = (min(2, E) if r is None else r) if E else 0
    layer.aux_loss_weight = check_real("aux_loss_weight", aux_loss_weight, 0.0)
    layer.aux_loss = 0.0
    if not isinstance(ternary, bool):
        raise TypeError(f"ternary must be True or False, got {type(ternary).__name__} {ternary!r}")
    if act_bits is not None and not ternary:
        raise ValueError(f"act_bits applies only with ternary=True, got act_bits={act_bits!r}")
    layer.ternary = ternary
    layer.act_bits = check_act_bits(act_bits)
    layer.quant_eps = DEFAULT_EPS


def forward(layer: Any, x: Array, seed: Any = None) -> Array:
    """y (B, T, d) of the variant path (x checked by the caller); sets ``layer.aux_loss`` (0 without experts)."""
    p = layer.params
    xp = get_array_module(x)
    B, T, d = x.shape
    H, G, D, Dv, P, E = (layer.n_heads, layer.n_kv_heads, layer.head_dim, layer.v_head_dim,
                         layer.persistent_tokens, layer.kv_experts)
    N = B * T
    xf = x.reshape(N, d)
    W = {}
    proj = _projector(layer, W)
    qf, xa = proj(xf, "W_Q")  # (N, H*D), x~ (N, d)
    kf, vf = proj(xf, "W_K")[0], proj(xf, "W_V")[0]  # (N, E'*G*D), (N, E'*G*Dv)
    saved = dict(x=x, xa=xa, W=W)
    if E:
        gates, layer.aux_loss, router = route(xf, p["W_router"], layer.kv_experts_active)  # (N, E)
        k_rows, v_rows = kf.reshape(N, E, G * D), vf.reshape(N, E, G * Dv)
        kf, vf = mix_rows(k_rows, gates), mix_rows(v_rows, gates)  # (N, G*D), (N, G*Dv)
        saved.update(gates=gates, router=router, k_rows=k_rows, v_rows=v_rows)
    else:
        layer.aux_loss = 0.0
    cs = rope_angles(np.arange(T), D, layer.rope_base, xp, x.dtype) if layer.rope else None
    q = _rot(layer, qf.reshape(B, T, H, D).transpose(0, 2, 1, 3), cs)  # (B, H, T, D)
    k = _rot(layer, kf.reshape(B, T, G, D).transpose(0, 2, 1, 3), cs)  # (B, G, T, D)
    v = vf.reshape(B, T, G, Dv).transpose(0, 2, 1, 3)  # (B, G, T, Dv)
    if P:
        k = xp.concatenate([xp.broadcast_to(p["persist_k"][None], (B, G, P, D)), k], axis=2)
        v = xp.concatenate([xp.broadcast_to(p["persist_v"][None], (B, G, P, Dv)), v], axis=2)
    o, att = attention_forward(layer, q, k, v, seed)  # (B, H, T, Dv)
    y, ofa = proj(o.transpose(0, 2, 1, 3).reshape(N, H * Dv), "W_O")  # (N, d), o~ (N, H*Dv)
    saved.update(cs=cs, att=att, ofa=ofa)
    layer._saved = saved
    return y.reshape(B, T, d)


def backward(layer: Any, dy: Array) -> Array:
    """dx (B, T, d) of the variant path; accumulates into ``layer.grads`` (router: + aux gradient)."""
    s = layer._saved
    p, g, W = layer.params, layer.grads, s["W"]
    x, xa = s["x"], s["xa"]
    B, T, d = x.shape
    H, G, D, Dv, P, E = (layer.n_heads, layer.n_kv_heads, layer.head_dim, layer.v_head_dim,
                         layer.persistent_tokens, layer.kv_experts)
    N = B * T
    dy = check_grad_output(dy, x.shape, x).reshape(N, d)  # (N, d)
    g["W_O"] += dy.T @ s["ofa"]
    do = (dy @ W["W_O"]).reshape(B, T, H, Dv).transpose(0, 2, 1, 3)  # (B, H, T, Dv), straight through act
    dq, dk, dv = attention_backward(do, s["att"])
    if P:
        g["persist_k"] += dk[:, :, :P].sum(0)
        g["persist_v"] += dv[:, :, :P].sum(0)
        dk, dv = dk[:, :, P:], dv[:, :, P:]
    cs = s["cs"]
    dqf = _rot(layer, dq, cs, inverse=True).transpose(0, 2, 1, 3).reshape(N, H * D)
    dkf = _rot(layer, dk, cs, inverse=True).transpose(0, 2, 1, 3).reshape(N, G * D)
    dvf = dv.transpose(0, 2, 1, 3).reshape(N, G * Dv)
    dx = 0.0
    if E:
        dk_rows, dgk = mix_rows_backward(dkf, s["k_rows"], s["gates"])  # (N, E, G*D), (N, E)
        dv_rows, dgv = mix_rows_backward(dvf, s["v_rows"], s["gates"])
        dz = router_backward(dgk + dgv, s["router"], layer.aux_loss_weight)  # (N, E)
        g["W_router"] += dz.T @ x.reshape(N, d)
        dx = dz @ p["W_router"]
        dkf, dvf = dk_rows.reshape(N, E * G * D), dv_rows.reshape(N, E * G * Dv)
    g["W_Q"] += dqf.T @ xa
    g["W_K"] += dkf.T @ xa
    g["W_V"] += dvf.T @ xa
    dx = dx + dqf @ W["W_Q"] + dkf @ W["W_K"] + dvf @ W["W_V"]  # straight through x~
    return dx.reshape(B, T, d)


# -- decoding ------------------------------------------------------------------------------
def decode_weights(layer: Any) -> dict[str, Any]:
    """The decode-time snapshot: W_Q, W_K, W_V, W_O packed (ternary) or copied, and the router."""
    p = layer.params
    w = {n: decode_weight(p[n], layer.ternary, layer.quant_eps) for n in PROJECTIONS}
    if layer.kv_experts:
        w["W_router"] = p["W_router"].copy()
    return w


def step(layer: Any, x_t: Array, cache: Any) -> Array:
    """y_t (B, 1, d) of one decode step (x_t checked by the caller); appends this token's mixed k, v."""
    w = getattr(cache, "weights", None)
    if w is None:
        raise ValueError("cache has no decode weights for this layer's variant options: make it with the "
                         "layer's init_cache after setting them")
    xp = get_array_module(x_t)
    B = x_t.shape[0]
    H, G, D, Dv, E = layer.n_heads, layer.n_kv_heads, layer.head_dim, layer.v_head_dim, layer.kv_experts
    ab, eps = layer.act_bits, layer.quant_eps
    x1 = x_t[:, 0]  # (B, d)
    qf = decode_project(x1, w["W_Q"], ab, eps)  # (B, H*D)
    kf, vf = decode_project(x1, w["W_K"], ab, eps), decode_project(x1, w["W_V"], ab, eps)
    if E:
        gates = route(x1, w["W_router"], layer.kv_experts_active)[0]  # (B, E)
        kf, vf = mix_rows(kf.reshape(B, E, G * D), gates), mix_rows(vf.reshape(B, E, G * Dv), gates)
    cs = rope_angles([cache.n_tokens], D, layer.rope_base, xp, x_t.dtype) if layer.rope else None
    q = _rot(layer, qf.reshape(B, H, 1, D), cs)[:, :, 0]  # (B, H, D)
    cache.kbuf.append(_rot(layer, kf.reshape(B, G, 1, D), cs))  # (B, G, 1, D)
    cache.vbuf.append(vf.reshape(B, G, 1, Dv))
    o = attend_step(layer, q, cache, cache.keys, cache.values)  # (B, H, Dv): dense, top-k or block
    return decode_project(o.reshape(B, H * Dv), w["W_O"], ab, eps)[:, None]  # (B, 1, d)


def _projector(layer, W):
    """proj(a, name) -> (y, a~) of the projection ``name`` (:func:`ternary_product`); W~ into ``W[name]``."""
    def proj(a, name):
        y, a_view, W[name] = ternary_product(a, layer.params[name], layer.ternary, layer.act_bits, layer.quant_eps)
        return y, a_view
    return proj


def _rot(layer, a, cs, inverse=False):
    return rope_apply(a, *cs, inverse=inverse) if layer.rope else a
