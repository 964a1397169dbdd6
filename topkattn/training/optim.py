"""Optimisation on flat ``name -> array`` dicts: AdamW, global-norm clipping, LR schedule.

Works in place on NumPy or CuPy arrays (the library of each parameter array); no
autograd engine, no PyTorch.  The layers own ``params``/``grads`` dicts with the same
keys; the training loop calls, per step::

    norm = clip_grad_norm(grads, max_norm)          # scales grads in place, returns the pre-clip norm
    opt.step(params, grads, lr=warmup_cosine_lr(step, ...))
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from topkattn.backend import Array, get_array_module, to_numpy
from topkattn.checks import check_int, check_real
from topkattn.layers.module import FlatParameters


def warmup_cosine_lr(step: int, *, base_lr: float, warmup_steps: int, total_steps: int,
                     min_lr: float = 0.0) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine decay.

    Steps 0 .. warmup_steps-1 ramp linearly from base_lr/warmup_steps to base_lr; from
    warmup_steps to total_steps the rate follows half a cosine from base_lr down to
    min_lr, and stays at min_lr after total_steps.
    """
    for name, val in (("step", step), ("warmup_steps", warmup_steps), ("total_steps", total_steps)):
        check_int(name, val, 0)
    check_real("base_lr", base_lr, 0.0)
    check_real("min_lr", min_lr, 0.0, base_lr)
    if step < warmup_steps:
        return float(base_lr) * (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0:
        return float(base_lr)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return float(min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress)))


def global_grad_norm(grads: Mapping[str, Array]) -> float:
    """The L2 norm of all gradient arrays together, as a Python float (accumulated in float64).

    The sum stays on the arrays' device; only the final scalar crosses to the host (one
    synchronisation per call on a GPU, not one per parameter).
    """
    total = None
    for g in grads.values():
        xp = get_array_module(g)
        g64 = g.astype(xp.float64, copy=False).ravel()
        sq = xp.vdot(g64, g64).real
        total = sq if total is None else total + sq
    return 0.0 if total is None else math.sqrt(float(total))


def clip_grad_norm(grads: Mapping[str, Array], max_norm: float) -> float:
    """Scale every gradient in place so the global L2 norm is at most ``max_norm``.

    Returns the norm before clipping (a float).  A non-finite norm leaves the gradients
    untouched and is returned as is, so the caller can skip the step.
    """
    check_real("max_norm", max_norm, 0.0, lo_open=True)
    norm = global_grad_norm(grads)
    if math.isfinite(norm) and norm > max_norm:
        factor = max_norm / (norm + 1e-6)
        for g in grads.values():
            g *= g.dtype.type(factor)
    return norm


def default_decay_filter(name: str, param: Array) -> bool:
    """Decay matrices (embeddings, projections); leave vectors (norm gains, biases) alone."""
    return param.ndim >= 2


class AdamW:
    """Adam with bias correction and decoupled weight decay (Loshchilov & Hutter, 2019).

    One step t (1-based) for a parameter p with gradient g, at learning rate lr::

        p <- p - lr * weight_decay * p                 (decoupled; only where decay_filter says so)
        m <- beta1 * m + (1 - beta1) * g
        v <- beta2 * v + (1 - beta2) * g^2
        p <- p - lr * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)

    The moments live in the parameter's dtype and library (NumPy or CuPy); updates are in place.

    ``flat``: a :class:`topkattn.layers.module.FlatParameters` (every parameter and gradient a
    view into one buffer each).  While ``step`` receives exactly those views, the update runs
    over the whole buffers -- one pass per operation, the moments in flat buffers too, work
    buffers reused -- with the same numbers as the per-array loop (the same operations on each
    entry); other dicts take the per-array loop.  ``m``/``v`` stay name -> array (views of the
    flat moments), so :meth:`state_dict` and checkpoints are unchanged.
    """

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, decay_filter: Callable[[str, Array], bool] = default_decay_filter,
                 flat: FlatParameters | None = None) -> None:
        check_real("lr", lr, 0.0)
        if len(betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        for i, b in enumerate(betas):
            check_real(f"betas[{i}]", b, 0.0, 1.0, hi_open=True)
        check_real("eps", eps, 0.0, lo_open=True)
        check_real("weight_decay", weight_decay, 0.0)
        self.lr = float(lr)
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.decay_filter = decay_filter
        self.t = 0        # number of steps taken
        self.m = {}       # name -> first moment
        self.v = {}       # name -> second moment
        self.flat = flat
        if flat is not None:
            self._init_flat()

    def _init_flat(self):
        """Flat moments (views per name in ``m``/``v``), work buffers and the decayed runs."""
        flat = self.flat
        xp = get_array_module(flat.params)
        self._m_flat, self._v_flat = xp.zeros_like(flat.params), xp.zeros_like(flat.params)
        self._work = (xp.empty_like(flat.params), xp.empty_like(flat.params))
        runs = []  # (start, stop) of the decayed parameters, adjacent ones merged
        for name in flat.names:
            a, b = flat.slices[name]
            pv = flat.views[name][0]
            self.m[name] = self._m_flat[a:b].reshape(pv.shape)
            self.v[name] = self._v_flat[a:b].reshape(pv.shape)
            if self.decay_filter(name, pv):
                if runs and runs[-1][1] == a:
                    runs[-1] = (runs[-1][0], b)
                else:
                    runs.append((a, b))
        self._decay_runs = runs

    def step(self, params: dict[str, Array], grads: dict[str, Array], lr: float | None = None) -> None:
        """Update ``params`` in place from ``grads`` (same keys); ``lr`` overrides ``self.lr``."""
        if set(params) != set(grads):
            missing = sorted(set(params) - set(grads))
            extra = sorted(set(grads) - set(params))
            raise ValueError(f"grads must have the keys of params; missing {missing}, extra {extra}")
        lr = self.lr if lr is None else float(lr)
        self.t += 1
        b1, b2, t = self.beta1, self.beta2, self.t
        bc1 = 1.0 - b1 ** t
        bc2 = 1.0 - b2 ** t
        if self.flat is not None and self.flat.holds(params, grads) and self._flat_moments_in_use():
            self._step_flat(lr, bc1, bc2)
            return
        for name, p in params.items():
            g = grads[name]
            if g.shape != p.shape:
                raise ValueError(f"grads[{name!r}] must have shape {p.shape}, got {g.shape}")
            xp = get_array_module(p)
            m = self.m.get(name)
            if m is None:
                m = self.m[name] = xp.zeros_like(p)
                self.v[name] = xp.zeros_like(p)
            v = self.v[name]
            dt = p.dtype.type
            if self.weight_decay and self.decay_filter(name, p):
                p *= dt(1.0 - lr * self.weight_decay)
            m *= dt(b1)
            m += dt(1.0 - b1) * g
            v *= dt(b2)
            v += dt(1.0 - b2) * (g * g)
            denom = xp.sqrt(v / dt(bc2))
            denom += dt(self.eps)
            p -= dt(lr / bc1) * m / denom

    def _flat_moments_in_use(self):
        """The m/v dicts still hold the flat moments' views (no one replaced them)."""
        flat = self.flat
        return all(self.m.get(n) is not None and self.m[n].base is self._m_flat
                   and self.v.get(n) is not None and self.v[n].base is self._v_flat for n in flat.names)

    def _step_flat(self, lr, bc1, bc2):
        """The update of :meth:`step` over the flat buffers: the per-array formulas, one pass each."""
        P, G = self.flat.params, self.flat.grads
        M, V = self._m_flat, self._v_flat
        w1, w2 = self._work
        xp = get_array_module(P)
        dt = P.dtype.type
        if self.weight_decay:
            f = dt(1.0 - lr * self.weight_decay)
            for a, b in self._decay_runs:
                P[a:b] *= f
        M *= dt(self.beta1)
        xp.multiply(G, dt(1.0 - self.beta1), out=w1)
        M += w1
        V *= dt(self.beta2)
        xp.multiply(G, G, out=w1)
        w1 *= dt(1.0 - self.beta2)
        V += w1
        xp.divide(V, dt(bc2), out=w1)
        xp.sqrt(w1, out=w1)
        w1 += dt(self.eps)  # denominator
        xp.multiply(M, dt(lr / bc1), out=w2)
        w2 /= w1
        P -= w2

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state as host arrays and scalars (for checkpoints)."""
        return {
            "t": self.t,
            "m": {k: to_numpy(a) for k, a in self.m.items()},
            "v": {k: to_numpy(a) for k, a in self.v.items()},
            "hyper": {"lr": self.lr, "beta1": self.beta1, "beta2": self.beta2,
                      "eps": self.eps, "weight_decay": self.weight_decay},
        }

    def load_state_dict(self, state: Mapping[str, Any], like: Mapping[str, Array] | None = None) -> None:
        """Restore from :meth:`state_dict`; ``like`` (a params dict) picks the array library."""
        t = state["t"]
        check_int("state['t']", t, 0)
        if set(state["m"]) != set(state["v"]):
            raise ValueError("state['m'] and state['v'] must have the same keys")
        self.t = int(t)
        if self.flat is not None and set(state["m"]) == set(self.flat.names):  # into the flat moments
            for key in state["m"]:
                for slot, dst in ((state["m"], self.m), (state["v"], self.v)):
                    if tuple(slot[key].shape) != tuple(dst[key].shape):
                        raise ValueError(f"state[{key!r}] has shape {tuple(slot[key].shape)}, "
                                         f"the parameter has {tuple(dst[key].shape)}")
                    dst[key][...] = get_array_module(dst[key]).asarray(slot[key])
            self._load_hyper(state)
            return
        self.m, self.v = {}, {}
        for key in state["m"]:
            xp = get_array_module(like[key]) if like is not None and key in like else np
            self.m[key] = xp.asarray(state["m"][key])
            self.v[key] = xp.asarray(state["v"][key])
        self._load_hyper(state)

    def _load_hyper(self, state):
        hyper = state.get("hyper")
        if hyper:
            self.lr, self.beta1, self.beta2 = hyper["lr"], hyper["beta1"], hyper["beta2"]
            self.eps, self.weight_decay = hyper["eps"], hyper["weight_decay"]
