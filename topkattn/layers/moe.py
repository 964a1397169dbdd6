"""Top-k routed mixture-of-experts feed-forward with a load-balancing auxiliary loss.

Shape letters: x (..., d) flattened to n rows (written ``rows`` below), E experts,
k = moe_topk experts per row, Wr (E, d) the router.
    p      = softmax(x Wr^T)                        (rows, E) router probabilities
    sel    = the k most probable experts per row    (ties to the lower expert index)
    gate   = p[sel] / sum p[sel]                    (renormalised over the chosen k)
    y      = sum_k gate_k * expert_{sel_k}(x)       each expert a SwiGLU
    aux    = E * sum_e f_e * pbar_e,  f_e = (rows routed to e) / (n k),  pbar_e = mean_i p[i, e]
The selection and f are piecewise constant (no gradient); aux reaches Wr through pbar.
Backward: dgate_k = dy . expert_k(x);  dp[sel] = (dgate - sum_j gate_j dgate_j) / sum p[sel];
dp += aux_loss_weight * E f_e / n;  dlogits = p * (dp - sum_e p dp).
"""
from __future__ import annotations

import numpy as np
from numpy.typing import DTypeLike

from topkattn.backend import Array, get_array_module
from topkattn.checks import check_int, check_real, float_dtype, make_rng
from topkattn.layers.module import Module, as_input, check_grad_output, normal
from topkattn.layers.swiglu import SwiGLU


class MoE(Module):
    """``params`` {"router" (E, d)} plus children "experts.{e}" (SwiGLU).

    ``forward`` sets ``aux_loss`` (the unweighted auxiliary loss, a float); ``backward``
    adds ``aux_loss_weight * d(aux)`` to the router gradient, so the caller's loss is
    ``task_loss + aux_loss_weight * aux_loss``.  Gradients accumulate into ``grads``.
    """

    def __init__(self, d_model: int, d_ff: int, n_experts: int = 4, moe_topk: int = 2, aux_loss_weight: float = 0.01,
                 seed: int | np.random.Generator = 0, dtype: DTypeLike = "float32") -> None:
        super().__init__()
        self.d_model = check_int("d_model", d_model, 1)
        self.n_experts = check_int("n_experts", n_experts, 1)
        self.moe_topk = check_int("moe_topk", moe_topk, 1)
        if moe_topk > n_experts:
            raise ValueError(f"moe_topk must be <= n_experts={n_experts}, got {moe_topk}")
        self.aux_loss_weight = check_real("aux_loss_weight", aux_loss_weight, 0.0)
        rng = make_rng(seed)
        self.add_param("router", normal(rng, (n_experts, d_model), 1 / np.sqrt(d_model),
                                        float_dtype(dtype)))
        self.experts = [self.add(f"experts.{e}", SwiGLU(d_model, d_ff, seed=rng, dtype=dtype))
                        for e in range(n_experts)]
        self.aux_loss = 0.0
        self._saved = None

    def _route(self, x):
        xp = get_array_module(x)
        Wr = self.params["router"]
        z = x @ Wr.T  # (rows, E)
        z = z - z.max(-1, keepdims=True)
        p = xp.exp(z)
        p /= p.sum(-1, keepdims=True)
        sel = xp.argsort(-p, axis=-1, kind="stable")[:, :self.moe_topk]  # (rows, k)
        ps = xp.take_along_axis(p, sel, axis=-1)  # (rows, k)
        Z = ps.sum(-1, keepdims=True)
        return p, sel, ps / Z, Z

    def forward(self, x: Array) -> Array:
        d = self.d_model
        x = as_input(x, "x", self.params["router"].dtype, last_dim=d, letters=f"(..., d={d})")
        xp = get_array_module(x)
        shape = x.shape
        xf = x.reshape(-1, d)  # (rows, d)
        n_rows, E, k = xf.shape[0], self.n_experts, self.moe_topk
        p, sel, gate, Z = self._route(xf)
        out = xp.zeros_like(xf)
        per_expert = []
        for e, ex in enumerate(self.experts):
            rows, slot = xp.nonzero(sel == e)
            if rows.size == 0:
                per_expert.append(None)
                continue
            ye = ex.forward(xf[rows])  # (n_e, d)
            out[rows] += gate[rows, slot][:, None] * ye
            per_expert.append((rows, slot, ye))
        counts = xp.zeros(E, dtype=xf.dtype)
        for e in range(E):
            counts[e] = (sel == e).sum()
        f = counts / max(1, n_rows * k)  # (E,)
        pbar = p.mean(0) if n_rows else xp.zeros(E, dtype=xf.dtype)
        self.aux_loss = float(E * (f * pbar).sum())
        self._saved = (shape, xf, p, sel, gate, Z, f, per_expert)
        return out.reshape(shape)

    def backward(self, dy: Array) -> Array:
        if self._saved is None:
            raise RuntimeError("MoE.backward called before forward")
        shape, xf, p, sel, gate, Z, f, per_expert = self._saved
        xp = get_array_module(xf)
        n_rows, E = p.shape
        dyf = check_grad_output(dy, shape, xf).reshape(-1, self.d_model)  # (rows, d)
        dx = xp.zeros_like(xf)
        dgate = xp.zeros_like(gate)  # (rows, k)
        for e, saved in enumerate(per_expert):
            if saved is None:
                continue
            rows, slot, ye = saved
            dx[rows] += self.experts[e].backward(dyf[rows] * gate[rows, slot][:, None])
            dgate[rows, slot] = (dyf[rows] * ye).sum(-1)
        dps = (dgate - (gate * dgate).sum(-1, keepdims=True)) / Z  # (rows, k)
        dp = xp.zeros_like(p)
        dp[xp.arange(n_rows)[:, None], sel] = dps
        if n_rows:
            dp += xf.dtype.type(self.aux_loss_weight * E / n_rows) * f[None, :]
        dz = p * (dp - (p * dp).sum(-1, keepdims=True))  # (rows, E)
        self.grads["router"] += dz.T @ xf
        dx += dz @ self.params["router"]
        return dx.reshape(shape)
