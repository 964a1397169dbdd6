"""KV experts of MLA (and of :class:`~topkattn.layers.attention.Attention`): a router picks r of E
expert up-projection pairs (W_UK_e, W_UV_e) per token (Attention: expert K/V projections, mixed
on the key's own token by :func:`mix_rows`, see :mod:`topkattn.layers.attention_variants`).

Shape letters: N routed rows (B T in training, B at decode), E experts, r = kv_experts_active,
B batch, H heads, T queries, Dn nope head dim, Dv value head dim, C key latent rank, Cv value
latent rank, d model width.

Routing, as the MoE feed-forward (:mod:`topkattn.layers.moe`), on the layer input x:
    p     = softmax(x Wr^T)                   (N, E)   router probabilities
    sel   = the r most probable experts        (N, r)   ties to the lower expert index
    gates = p[sel] / sum p[sel] on sel, 0 off  (N, E)   renormalised over the chosen r
    aux   = E sum_e f_e pbar_e,  f_e = (rows routed to e) / (N r),  pbar_e = mean_rows p[:, e]
The selection and f are piecewise constant (no gradient); aux reaches Wr through pbar.

The experts act on the query's side over one shared latent cache (the design choice: a key's
score never depends on how the key's own token was routed, so cached latents need no per-key
expert weights and the LoRANN index holds one set of [c_j ; kr_j]).  Query t's gates mix the
absorbed projections of the experts:
    q_lat[t, h] = sum_e g[t, e] W_UK[e, h]^T qn[t, h]          (B, H, T, C)
    o[t, h]     = sum_e g[t, e] W_UV[e, h] o_lat[t, h]          (B, H, T, Dv)
with o_lat[t, h] = sum_j p_h(t, j) cv_j the attention-weighted value latents.  So query t scores
key j as qn[t, h] . (sum_e g[t, e] W_UK[e, h] c_j): key j projected by the QUERY's expert
mixture, the same in training and at decode.  W_UK (E, H, Dn, C), W_UV (E, H, Dv, Cv).

Backward:  d gates[t, e] = sum_h (W_UK[e, h]^T qn[t, h]) . dq_lat[t, h] + (W_UV[e, h] o_lat[t, h]) . do[t, h];
dsel -> dp: dp[sel] = (dgate - sum_r gate dgate) / sum p[sel];  dp += w_aux E f / N;
dlogits = p * (dp - sum_e p dp).  Experts a row did not choose get exactly zero gradient from it.
"""
from __future__ import annotations

import numpy as np

from topkattn.backend import Array, get_array_module


class RouterSaved:
    """What :func:`router_backward` needs: probabilities p (N, E), the selection sel (N, r), the
    dense gates (N, E), the chosen mass Z (N, 1) and the routed shares f (E,)."""

    __slots__ = ("p", "sel", "gates", "Z", "f")

    def __init__(self, p: Array, sel: Array, gates: Array, Z: Array, f: Array) -> None:
        self.p, self.sel, self.gates, self.Z, self.f = p, sel, gates, Z, f


def route(x: Array, Wr: Array, r: int) -> tuple[Array, float, RouterSaved]:
    """``(gates (N, E), aux, saved)`` of the top-``r`` router on rows x (N, d) with Wr (E, d).

    aux is the unweighted load-balancing loss (a float); gates are zero off the chosen experts.
    """
    xp = get_array_module(x)
    z = x @ Wr.T  # (N, E)
    z = z - z.max(-1, keepdims=True)
    p = xp.exp(z)
    p /= p.sum(-1, keepdims=True)
    N, E = p.shape
    sel = xp.argsort(-p, axis=-1, kind="stable")[:, :r]  # (N, r)
    ps = xp.take_along_axis(p, sel, axis=-1)  # (N, r)
    Z = ps.sum(-1, keepdims=True)  # (N, 1)
    gates = xp.zeros_like(p)
    xp.put_along_axis(gates, sel, ps / Z, axis=-1)
    counts = xp.zeros(E, dtype=p.dtype)
    for e in range(E):
        counts[e] = (sel == e).sum()
    f = counts / max(1, N * r)  # (E,)
    pbar = p.mean(0) if N else xp.zeros(E, dtype=p.dtype)
    aux = float(E * (f * pbar).sum())
    return gates, aux, RouterSaved(p, sel, gates, Z, f)


def router_backward(dgates: Array, saved: RouterSaved, aux_weight: float) -> Array:
    """dlogits (N, E) of the router from dgates (N, E) plus ``aux_weight`` times d(aux)."""
    xp = get_array_module(dgates)
    p, sel = saved.p, saved.sel
    N, E = p.shape
    dg = xp.take_along_axis(dgates, sel, axis=-1)  # (N, r)
    g = xp.take_along_axis(saved.gates, sel, axis=-1)  # (N, r)
    dps = (dg - (g * dg).sum(-1, keepdims=True)) / saved.Z  # (N, r)
    dp = xp.zeros_like(p)
    xp.put_along_axis(dp, sel, dps, axis=-1)
    if N:
        dp += p.dtype.type(aux_weight * E / N) * saved.f[None, :]
    return p * (dp - (p * dp).sum(-1, keepdims=True))  # (N, E)


def expert_query(qn: Array, W_UK: Array, gates: Array) -> Array:
    """q_lat (B, H, T, C) = sum_e gates[..., e] W_UK[e, h]^T qn[..., h, t, :].

    qn (B, H, T, Dn); W_UK (E, H, Dn, C); gates (B, T, E).  Experts no row chose are skipped.
    """
    xp = get_array_module(qn)
    B, H, T, _ = qn.shape
    out = xp.zeros((B, H, T, W_UK.shape[-1]), dtype=qn.dtype)
    for e in _used(gates):
        out += gates[:, None, :, e, None] * xp.matmul(qn, W_UK[e])  # (B, H, T, C)
    return out


def expert_query_backward(dq_lat: Array, qn: Array, W_UK: Array, gates: Array) -> tuple[Array, Array, Array]:
    """``(dqn (B, H, T, Dn), dW_UK (E, H, Dn, C), dgates (B, T, E))`` of :func:`expert_query`."""
    xp = get_array_module(qn)
    dqn = xp.zeros_like(qn)
    dW = xp.zeros_like(W_UK)
    dgates = xp.zeros_like(gates)
    for e in _used(gates):
        ge = gates[:, None, :, e, None]  # (B, 1, T, 1)
        dge = ge * dq_lat  # (B, H, T, C)
        dqn += xp.matmul(dge, W_UK[e].swapaxes(-1, -2))
        dW[e] = xp.matmul(qn.transpose(1, 3, 0, 2).reshape(qn.shape[1], qn.shape[3], -1),
                          dge.transpose(1, 0, 2, 3).reshape(dge.shape[1], -1, dge.shape[3]))  # (H, Dn, C)
        dgates[..., e] = (xp.matmul(qn, W_UK[e]) * dq_lat).sum((1, 3))  # (B, T)
    return dqn, dW, dgates


def expert_values(o_lat: Array, W_UV: Array, gates: Array) -> Array:
    """o (B, H, T, Dv) = sum_e gates[..., e] W_UV[e, h] o_lat[..., h, t, :].

    o_lat (B, H, T, Cv); W_UV (E, H, Dv, Cv); gates (B, T, E).
    """
    xp = get_array_module(o_lat)
    B, H, T, _ = o_lat.shape
    out = xp.zeros((B, H, T, W_UV.shape[2]), dtype=o_lat.dtype)
    for e in _used(gates):
        out += gates[:, None, :, e, None] * xp.matmul(o_lat, W_UV[e].swapaxes(-1, -2))  # (B, H, T, Dv)
    return out


def expert_values_backward(do: Array, o_lat: Array, W_UV: Array, gates: Array) -> tuple[Array, Array, Array]:
    """``(do_lat (B, H, T, Cv), dW_UV (E, H, Dv, Cv), dgates (B, T, E))`` of :func:`expert_values`."""
    xp = get_array_module(o_lat)
    do_lat = xp.zeros_like(o_lat)
    dW = xp.zeros_like(W_UV)
    dgates = xp.zeros_like(gates)
    H, Dv = do.shape[1], do.shape[3]
    for e in _used(gates):
        dge = gates[:, None, :, e, None] * do  # (B, H, T, Dv)
        do_lat += xp.matmul(dge, W_UV[e])
        dW[e] = xp.matmul(dge.transpose(1, 3, 0, 2).reshape(H, Dv, -1),
                          o_lat.transpose(1, 0, 2, 3).reshape(H, -1, o_lat.shape[3]))  # (H, Dv, Cv)
        dgates[..., e] = (xp.matmul(o_lat, W_UV[e].swapaxes(-1, -2)) * do).sum((1, 3))  # (B, T)
    return do_lat, dW, dgates


def _used(gates):
    """The experts with a non-zero gate somewhere in ``gates`` (..., E), as Python ints."""
    xp = get_array_module(gates)
    used = (gates != 0).reshape(-1, gates.shape[-1]).any(0)
    return [int(e) for e in np.flatnonzero(np.asarray(used.get() if xp is not np else used))]


def mix_rows(rows: Array, gates: Array) -> Array:
    """out (N, F) = sum_e gates[n, e] rows[n, e] of per-expert rows (N, E, F) (Attention's KV experts:
    each token's key or value is its experts' projections mixed by its own gates)."""
    xp = get_array_module(rows)
    return xp.matmul(gates[:, None, :], rows)[:, 0]  # (N, F)


def mix_rows_backward(dout: Array, rows: Array, gates: Array) -> tuple[Array, Array]:
    """``(drows (N, E, F), dgates (N, E))`` of :func:`mix_rows` from dout (N, F); experts with a zero
    gate get zero row gradient."""
    xp = get_array_module(rows)
    return gates[:, :, None] * dout[:, None, :], xp.matmul(rows, dout[:, :, None])[..., 0]
