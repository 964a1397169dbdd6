"""The general MLA path: KV experts, separate key and value latent ranks (DiffQKV), ternary projections.

:class:`topkattn.layers.mla.MLA` runs these functions when any of its options ``kv_experts``,
``k_rank``/``v_rank`` or ``ternary`` is set (plain MLA keeps its own stacked-product path; with
none of the options this path computes the same numbers, a test checks it).

Shape letters: B batch, T queries, S = P + T keys (P persistent tokens first), H heads, d model
width, Lq query latent, Ck key latent rank, Cv value latent rank (both C = kv_lora_rank without
separate ranks), Dn nope dim, R rope dim, Dv value head dim, E experts, K index slots.

Training (W~: the weight, or its ternary view; act: per-token absmax quantisation with act_bits):
    x~ = act(x)
    cq = rms(x~ W~_DQ^T);  cq~ = act(cq)                        (B, T, Lq)
    qn = cq~ W~_UQ^T;  qr = rope(cq~ W~_QR^T)                    (B, H, T, Dn), (B, H, T, R)
    ck = rms(x~ W~_DKV^T)  (B, T, Ck);  cv = rms(x~ W~_DV^T) (B, T, Cv) (cv = ck without split)
    kr = rope(x~ W~_KR^T)                                        (B, T, R)
    ck~, cv~ = act([persist_c ; ck]), act([persist_cv ; cv])     (B, S, Ck), (B, S, Cv): what decoding caches
  no experts:  q = [qn ; qr],  k = [ck~ W~_UK^T ; kr],  v = cv~ W~_UV^T       per head
  experts:     q = [expert_query(qn) ; qr],  k = [ck~ ; kr],  v = cv~          one shared KV head
               o = expert_values(o_lat)                                       (topkattn.layers.kv_experts)
    y = act(o) W~_O^T                                            scale 1/sqrt(Dn + R) throughout
Backward: the formulas' chain rule; ternary weights and quantised activations pass the gradient
straight through (topkattn.layers.projection).

Decoding: the cache holds keys [ck~_j ; kr_j] (B, S, Ck + R) (the part an index searches) and,
with separate ranks, values cv~_j (B, S, Cv) (without them the values are the keys' first C
numbers).  q_abs_h = [W~_UK_h^T qn_h (the expert mix with experts) ; qr_h], o_lat_h = sum_j
p_h(j) cv~_j, o_h = W~_UV_h o_lat_h (the mix), y = W~_O act(o).  With ternary the non-absorbed
projections (W_DQ, W_UQ, W_QR, W_DKV, W_DV, W_KR, W_O) are packed at 2 bits per weight; W_UK
and W_UV are used dequantised (they multiply the absorbed query and the attended latent).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from topkattn.backend import Array, get_array_module
from topkattn.layers.attend import attention_backward, attention_forward
from topkattn.layers.cache import MLACache, attend_step
from topkattn.layers.kv_experts import (
    expert_query,
    expert_query_backward,
    expert_values,
    expert_values_backward,
    route,
    router_backward,
)
from topkattn.layers.module import check_grad_output
from topkattn.layers.projection import act_view, decode_project, decode_weight, ternary_product, weight_view
from topkattn.layers.rmsnorm import rms_norm_backward, rms_norm_forward
from topkattn.layers.rope import rope_angles, rope_apply
from topkattn.ops.ternary import PackedTernary

if TYPE_CHECKING:  # mla imports this module
    from topkattn.layers.mla import MLA

PACKED = ("W_DQ", "W_UQ", "W_QR", "W_DKV", "W_DV", "W_KR", "W_O")  # packed at decode with ternary


def projection_names(layer: MLA) -> tuple[str, ...]:
    """The learned projections of ``layer`` (ternary with ``layer.ternary``)."""
    names = ("W_DQ", "W_UQ", "W_QR", "W_DKV", "W_UK", "W_UV", "W_KR", "W_O")
    return names + (("W_DV",) if layer.split_latents else ())


def forward(layer: MLA, x: Array, seed: int | None = None) -> Array:
    """y (B, T, d) of the general path; sets ``layer.aux_loss`` (the router's, 0 without experts)."""
    p = layer.params
    xp = get_array_module(x)
    B, T, d = x.shape
    H, Dn, R, Dv, P = layer.n_heads, layer.qk_nope_dim, layer.qk_rope_dim, layer.v_head_dim, layer.persistent_tokens
    Ck, Cv, E, eps = layer.k_rank, layer.v_rank, layer.kv_experts, layer.eps
    S = P + T
    W = {n: weight_view(p[n], layer.ternary, layer.quant_eps) for n in ("W_UK", "W_UV")}
    proj = _projector(layer, W)  # proj(a, name) -> (a~ W~^T, a~); W~ into W
    dq, xa = proj(x, "W_DQ")  # (B, T, Lq), x~ (B, T, d)
    cq, sq = rms_norm_forward(dq, p["q_norm"], eps)  # (B, T, Lq)
    uq, cqa = proj(cq, "W_UQ")
    qn = uq.reshape(B, T, H, Dn).transpose(0, 2, 1, 3)  # (B, H, T, Dn)
    cs = rope_angles(np.arange(T), R, layer.rope_base, xp, x.dtype)
    qr = rope_apply(proj(cq, "W_QR")[0].reshape(B, T, H, R).transpose(0, 2, 1, 3), *cs)  # (B, H, T, R)
    ck, cka, cva, kr_all, norms = _latents(layer, x, proj, cs)  # (B, T, Ck), (B, S, Ck), (B, S, Cv), (B, S, R)
    saved = dict(x=x, xa=xa, W=W, cq=cq, sq=sq, cqa=cqa, qn=qn, cs=cs, cka=cka, cva=cva, norms=norms)
    if E:
        gates, layer.aux_loss, router = route(x.reshape(B * T, d), p["W_router"], layer.kv_experts_active)
        gates = gates.reshape(B, T, E)
        q = xp.concatenate([expert_query(qn, W["W_UK"].reshape(E, H, Dn, Ck), gates), qr], axis=-1)
        k = xp.concatenate([cka, kr_all], axis=-1)[:, None]  # (B, 1, S, Ck + R)
        o_lat, att = attention_forward(layer, q, k, cva[:, None], seed)  # (B, H, T, Cv)
        o = expert_values(o_lat, W["W_UV"].reshape(E, H, Dv, Cv), gates)  # (B, H, T, Dv)
        saved.update(gates=gates, router=router, o_lat=o_lat)
    else:
        layer.aux_loss = 0.0
        kn = (cka @ W["W_UK"].T).reshape(B, S, H, Dn).transpose(0, 2, 1, 3)  # (B, H, S, Dn)
        v = (cva @ W["W_UV"].T).reshape(B, S, H, Dv).transpose(0, 2, 1, 3)  # (B, H, S, Dv)
        k = xp.concatenate([kn, xp.broadcast_to(kr_all[:, None], (B, H, S, R))], axis=-1)
        o, att = attention_forward(layer, xp.concatenate([qn, qr], axis=-1), k, v, seed)  # (B, H, T, Dv)
    y, ofa = proj(o.transpose(0, 2, 1, 3).reshape(B, T, H * Dv), "W_O")  # (B, T, d), act(o) (B, T, H*Dv)
    saved.update(att=att, ofa=ofa)
    layer._saved = saved
    return y


def backward(layer: MLA, dy: Array) -> Array:
    """dx (B, T, d) of the general path; accumulates into ``layer.grads`` (router: + aux gradient)."""
    s = layer._saved
    p, g, W = layer.params, layer.grads, s["W"]
    x, xa = s["x"], s["xa"]
    B, T, d = x.shape
    H, Dn, R, Dv, P = layer.n_heads, layer.qk_nope_dim, layer.qk_rope_dim, layer.v_head_dim, layer.persistent_tokens
    Ck, Cv, E, Lq = layer.k_rank, layer.v_rank, layer.kv_experts, layer.q_lora_rank
    S = P + T
    dy = check_grad_output(dy, x.shape, x)  # (B, T, d)
    g["W_O"] += dy.reshape(-1, d).T @ s["ofa"].reshape(-1, H * Dv)
    do = (dy @ W["W_O"]).reshape(B, T, H, Dv).transpose(0, 2, 1, 3)  # (B, H, T, Dv), straight through act
    dx = 0.0
    if E:
        gates = s["gates"]
        do_lat, dW_UV, dg_v = expert_values_backward(do, s["o_lat"], W["W_UV"].reshape(E, H, Dv, Cv), gates)
        g["W_UV"] += dW_UV.reshape(E * H * Dv, Cv)
        dq, dk, dv = attention_backward(do_lat, s["att"])  # (B, H, T, Ck+R), (B, 1, S, Ck+R), (B, 1, S, Cv)
        dqn, dW_UK, dg_q = expert_query_backward(dq[..., :Ck], s["qn"], W["W_UK"].reshape(E, H, Dn, Ck), gates)
        g["W_UK"] += dW_UK.reshape(E * H * Dn, Ck)
        dqr = dq[..., Ck:]
        dz = router_backward((dg_q + dg_v).reshape(B * T, E), s["router"], layer.aux_loss_weight)  # (B*T, E)
        g["W_router"] += dz.T @ x.reshape(B * T, d)
        dx = (dz @ p["W_router"]).reshape(B, T, d)
        dcka, dkr_all, dcva = dk[:, 0, :, :Ck], dk[:, 0, :, Ck:], dv[:, 0]
    else:
        dq, dk, dv = attention_backward(do, s["att"])
        dkn = dk[..., :Dn].transpose(0, 2, 1, 3).reshape(B * S, H * Dn)
        dvf = dv.transpose(0, 2, 1, 3).reshape(B * S, H * Dv)
        g["W_UK"] += dkn.T @ s["cka"].reshape(B * S, Ck)
        g["W_UV"] += dvf.T @ s["cva"].reshape(B * S, Cv)
        dcka = (dkn @ W["W_UK"]).reshape(B, S, Ck)
        dcva = (dvf @ W["W_UV"]).reshape(B, S, Cv)
        dkr_all = dk[..., Dn:].sum(1)  # (B, S, R)
        dqn, dqr = dq[..., :Dn], dq[..., Dn:]
    dxa = _latents_backward(layer, s, dcka, dcva, dkr_all)  # (B, T, d)
    dqn = dqn.transpose(0, 2, 1, 3).reshape(B * T, H * Dn)
    dqr = rope_apply(dqr, *s["cs"], inverse=True).transpose(0, 2, 1, 3).reshape(B * T, H * R)
    cqa = s["cqa"].reshape(B * T, Lq)
    g["W_UQ"] += dqn.T @ cqa
    g["W_QR"] += dqr.T @ cqa
    dcq = (dqn @ W["W_UQ"] + dqr @ W["W_QR"]).reshape(B, T, Lq)
    dcq_raw, dgq = rms_norm_backward(dcq, s["sq"])
    g["q_norm"] += dgq
    g["W_DQ"] += dcq_raw.reshape(-1, Lq).T @ xa.reshape(-1, d)
    return dxa + dcq_raw @ W["W_DQ"] + dx


def _latents(layer, x, proj, cs):
    """``(ck, ck~, cv~, kr_all, norms)``: the key latent (B, T, Ck), the quantised key and value
    latents with the persistent rows (B, S, Ck), (B, S, Cv), the rope keys (B, S, R), and the
    RMSNorm states (key, value)."""
    p, eps = layer.params, layer.eps
    ck, skv = rms_norm_forward(proj(x, "W_DKV")[0], p["kv_norm"], eps)  # (B, T, Ck)
    kr = rope_apply(proj(x, "W_KR")[0], *cs)  # (B, T, R)
    ck_all, kr_all = _with_rows(ck, p.get("persist_c")), _with_rows(kr, p.get("persist_kr"))
    cka = _act(layer, ck_all)
    if not layer.split_latents:
        return ck, cka, cka, kr_all, (skv, None)
    cv, sv = rms_norm_forward(proj(x, "W_DV")[0], p["v_norm"], eps)  # (B, T, Cv)
    return ck, cka, _act(layer, _with_rows(cv, p.get("persist_cv"))), kr_all, (skv, sv)


def _latents_backward(layer, s, dcka, dcva, dkr_all):
    """dx~ (B, T, d) from the latents' gradients; accumulates the latent projections' grads."""
    g, W, xa, cs = layer.grads, s["W"], s["xa"], s["cs"]
    P, d = layer.persistent_tokens, xa.shape[-1]
    skv, sv = s["norms"]
    dck_all = dcka if layer.split_latents else dcka + dcva  # (B, S, Ck); straight through act
    xf = xa.reshape(-1, d)
    if P:
        g["persist_c"] += dck_all[:, :P].sum(0)
        g["persist_kr"] += dkr_all[:, :P].sum(0)
    dck, dg = rms_norm_backward(dck_all[:, P:], skv)
    g["kv_norm"] += dg
    g["W_DKV"] += dck.reshape(-1, layer.k_rank).T @ xf
    dkr = rope_apply(dkr_all[:, P:], *cs, inverse=True)  # (B, T, R)
    g["W_KR"] += dkr.reshape(-1, layer.qk_rope_dim).T @ xf
    dxa = dck @ W["W_DKV"] + dkr @ W["W_KR"]
    if layer.split_latents:
        if P:
            g["persist_cv"] += dcva[:, :P].sum(0)
        dcv, dgv = rms_norm_backward(dcva[:, P:], sv)
        g["v_norm"] += dgv
        g["W_DV"] += dcv.reshape(-1, layer.v_rank).T @ xf
        dxa = dxa + dcv @ W["W_DV"]
    return dxa


def latent_rows(layer: MLA, x: Array) -> tuple[Array, Array]:
    """``(keys (B, S, Ck + R), values (B, S, Cv))``: the rows decoding caches for a sequence x (B, T, d)."""
    xp = get_array_module(x)
    cs = rope_angles(np.arange(x.shape[1]), layer.qk_rope_dim, layer.rope_base, xp, x.dtype)
    _, cka, cva, kr_all, _ = _latents(layer, x, _projector(layer, {}), cs)
    return xp.concatenate([cka, kr_all], axis=-1), cva


# -- decoding ------------------------------------------------------------------------------
def decode_weights(layer: MLA) -> dict[str, Array | PackedTernary]:
    """The decode-time weights: packed (ternary) or copied projections, the norms, W~_UK and W~_UV
    per head (W_UKh (H, Dn, Ck), W_UVh (H, Cv, Dv)) or per expert (W_UKe (E, H, Dn, Ck),
    W_UVe (E, H, Dv, Cv)) and the router."""
    p = layer.params
    H, Dn, Dv, E = layer.n_heads, layer.qk_nope_dim, layer.v_head_dim, layer.kv_experts
    Ck, Cv = layer.k_rank, layer.v_rank
    w = {n: decode_weight(p[n], layer.ternary, layer.quant_eps) for n in PACKED if n in p}
    for n in ("q_norm", "kv_norm", "v_norm", "W_router"):
        if n in p:
            w[n] = p[n].copy()
    uk = weight_view(p["W_UK"], layer.ternary, layer.quant_eps)
    uv = weight_view(p["W_UV"], layer.ternary, layer.quant_eps)
    if E:
        w["W_UKe"] = uk.reshape(E, H, Dn, Ck).copy()
        w["W_UVe"] = uv.reshape(E, H, Dv, Cv).copy()
    else:
        w["W_UKh"] = uk.reshape(H, Dn, Ck).copy()
        w["W_UVh"] = uv.reshape(H, Dv, Cv).swapaxes(1, 2).copy()
    return w


def init_cache(layer: MLA, batch: int) -> MLACache:
    """An empty :class:`MLACache` (values apart with separate ranks), persistent rows first."""
    p = layer.params
    xp = get_array_module(p["W_DQ"])
    Cv = layer.v_rank if layer.split_latents else 0
    cache = MLACache(xp, batch, layer.k_rank, layer.qk_rope_dim, p["W_DQ"].dtype, decode_weights(layer),
                     owner=layer, v_rank=Cv)
    P = layer.persistent_tokens
    if P:
        keys = xp.concatenate([_act(layer, p["persist_c"]), p["persist_kr"]], axis=-1)  # (P, Ck + R)
        values = _act(layer, p["persist_cv"])[None] if Cv else None
        cache.append(xp.broadcast_to(keys[None], (batch,) + keys.shape),
                     None if values is None else xp.broadcast_to(values, (batch,) + values.shape[1:]))
        cache.prefix = P
    return cache


def absorbed_query(layer: MLA, x1: Array, position: int,
                   w: Mapping[str, Array | PackedTernary]) -> tuple[Array, Array | None]:
    """``(q_abs (B, H, Ck + R), gates (B, E) or None)`` of one decode step's input x1 (B, d)."""
    xp = get_array_module(x1)
    B = x1.shape[0]
    H, R, ab, eps = layer.n_heads, layer.qk_rope_dim, layer.act_bits, layer.quant_eps
    cq = rms_norm_forward(decode_project(x1, w["W_DQ"], ab, eps), w["q_norm"], layer.eps)[0]  # (B, Lq)
    qn = decode_project(cq, w["W_UQ"], ab, eps).reshape(B, H, 1, -1)  # (B, H, 1, Dn)
    gates = None
    if layer.kv_experts:
        gates = route(x1, w["W_router"], layer.kv_experts_active)[0]  # (B, E)
        q_lat = expert_query(qn, w["W_UKe"], gates[:, None])[:, :, 0]  # (B, H, Ck)
    else:
        q_lat = xp.matmul(qn, w["W_UKh"])[:, :, 0]  # (B, H, Ck)
    cs = rope_angles([position], R, layer.rope_base, xp, x1.dtype)
    qr = rope_apply(decode_project(cq, w["W_QR"], ab, eps).reshape(B, H, R), *cs)
    return xp.concatenate([q_lat, qr], axis=-1), gates


def step(layer: MLA, x_t: Array, cache: MLACache) -> Array:
    """y_t (B, 1, d) of one decode step (x_t checked by the caller); appends the token's rows."""
    xp = get_array_module(x_t)
    w, B = cache.weights, x_t.shape[0]
    ab, eps = layer.act_bits, layer.quant_eps
    x1 = x_t[:, 0]  # (B, d)
    pos = cache.n_tokens
    q_abs, gates = absorbed_query(layer, x1, pos, w)  # (B, H, Ck + R)
    ck = rms_norm_forward(decode_project(x1, w["W_DKV"], ab, eps), w["kv_norm"], layer.eps)[0]  # (B, Ck)
    cs = rope_angles([pos], layer.qk_rope_dim, layer.rope_base, xp, x_t.dtype)
    kr = rope_apply(decode_project(x1, w["W_KR"], ab, eps)[:, None], *cs)[:, 0]  # (B, R)
    values = None
    if layer.split_latents:
        cv = rms_norm_forward(decode_project(x1, w["W_DV"], ab, eps), w["v_norm"], layer.eps)[0]  # (B, Cv)
        values = _act(layer, cv)[:, None]
    cache.append(xp.concatenate([_act(layer, ck), kr], axis=-1)[:, None], values)
    keys, vals = cache.keys[:, None], cache.values[:, None]  # (B, 1, S, Ck + R), (B, 1, S, Cv)
    o = attend_step(layer, q_abs, cache, keys, vals)  # (B, H, Cv): dense, top-k or block
    o_lat = o[..., :layer.v_rank]
    if layer.kv_experts:
        o = expert_values(o_lat[:, :, None], w["W_UVe"], gates[:, None])[:, :, 0]  # (B, H, Dv)
    else:
        o = xp.matmul(o_lat[:, :, None, :], w["W_UVh"])[:, :, 0]  # (B, H, Dv)
    return decode_project(o.reshape(B, -1), w["W_O"], ab, eps)[:, None]  # (B, 1, d)


def _projector(layer, W):
    """proj(a, name) -> (y, a~): the layer's projection ``name`` of a (:func:`ternary_product`);
    stores W~ in ``W[name]`` for the backward."""
    def proj(a, name):
        y, a_view, W[name] = ternary_product(a, layer.params[name], layer.ternary, layer.act_bits, layer.quant_eps)
        return y, a_view
    return proj


def _act(layer, a):
    return act_view(a, layer.act_bits, layer.quant_eps)


def _with_rows(a, rows):
    """[rows ; a] along the token axis: a (B, T, n), rows (P, n) or None."""
    if rows is None:
        return a
    xp = get_array_module(a)
    return xp.concatenate([xp.broadcast_to(rows[None], (a.shape[0],) + rows.shape), a], axis=1)
