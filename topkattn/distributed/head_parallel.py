"""Head-parallel Multi-head Latent Attention: the heads split over MPI ranks (model parallelism).

Shape letters: B batch, T queries, S = P + T keys, H heads in all, P ranks, Hp = H / P heads
per rank, d model width, Lq query latent dim, C KV latent dim, Dn = qk_nope_dim, R =
qk_rope_dim, Dv = v_head_dim (the letters of :mod:`topkattn.layers.mla`).

Rank r of a communicator of P ranks holds heads h in [r Hp, (r + 1) Hp) (H % P == 0):

    sliced (local rows/columns of head h):  W_UQ (Hp*Dn, Lq), W_QR (Hp*R, Lq), W_UK (Hp*Dn, C),
                                            W_UV (Hp*Dv, C), W_O (d, Hp*Dv) (its columns)
    replicated (the same on every rank):    W_DQ, q_norm, W_DKV, kv_norm, W_KR,
                                            persist_c, persist_kr

Forward: every rank gets the same x (B, T, d) and computes the shared latents cq = rms(W_DQ x),
c = rms(W_DKV x), kr = rope(W_KR x) itself, then its heads' queries, keys, values and attention
o_h, and its partial output

    y_r = sum_{h of rank r} W_O[:, h] o_h           y = sum_r y_r     (one allreduce, B*T*d numbers)

Top-k selection (and dynamic k) is decided per head from that head's scores, so a rank
holding a head slice selects exactly the keys the single process selects for those heads.
Forgetful masking (``forget_rate > 0`` while training) draws (B, H, T, K') per layer from the
seed (:func:`topkattn.ops.selection.forget_draws`); rank r draws the same block for all H heads
and keeps its heads' part (the seed goes to the layer as a :class:`HeadSliceGenerator`, what
the op's ``head_slice=(h0, h1, H)`` does), so it drops and refills the single process's keys.

Backward: every rank gets the same dy.  do_h = W_O[:, h]^T dy is local, so are the
gradients of the sliced weights (W_O's columns, W_UQ, W_QR, W_UK, W_UV rows of rank r's
heads): they stay on their rank.  Everything upstream of the per-head projections is
linear in the per-head gradients (the RMSNorm backward with its saved statistics, the
inverse rotation, the products with x), so the gradients of the replicated parameters
and of x are sums over heads of per-rank partial sums:

    g_rep = sum_r g_rep,r        dx = sum_r dx_r

They travel packed in one buffer: one allreduce per layer backward of
Lq*d + Lq + C*d + C + R*d (+ P*(C + R)) + B*T*d numbers.  So per layer and training step:
two allreduces (forward y, backward the packed buffer), no all-gathers, and every rank ends
with identical replicated parameters and gradients, so an optimizer step (AdamW) on each
rank keeps the replicated parameters identical.

Decoding (``step``) works the same way: every rank caches the replicated latents [c ; kr]
and its heads' absorbed partial output is summed over the ranks (one allreduce of B*d).

Gradient clipping must use the norm over every rank's slices:
:func:`head_parallel_grad_norm` (and :func:`clip_head_parallel_grad_norm`) here, not the single-process ones.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from topkattn.backend import Array, get_array_module
from topkattn.checks import check_real, make_rng, plain_value
from topkattn.distributed.comm import agree_settings, allgather_rows, allreduce_sum
from topkattn.distributed.data_parallel import params_checksum
from topkattn.layers.cache import MLACache
from topkattn.layers.mla import MLA
from topkattn.layers.module import Module
from topkattn.model import Transformer

# param name -> (head axis, per-head size attribute) of the head-sliced weights
SLICED = {"W_UQ": (0, "qk_nope_dim"), "W_QR": (0, "qk_rope_dim"), "W_UK": (0, "qk_nope_dim"),
          "W_UV": (0, "v_head_dim"), "W_O": (1, "v_head_dim")}
REPLICATED = ("W_DQ", "q_norm", "W_DKV", "kv_norm", "W_KR", "persist_c", "persist_kr")
# the settings of an attention layer that every rank must share (those the layer has): compared
# across the ranks by HeadParallelMLA and the sharded decode layers before any data moves
LAYER_SETTINGS = ("d_model", "n_heads", "n_kv_heads", "head_dim", "q_lora_rank", "kv_lora_rank", "qk_nope_dim",
                  "qk_rope_dim", "v_head_dim", "rope", "topk", "tail_bound", "max_topk", "persistent_tokens",
                  "window", "forget_rate", "selection", "block_size", "topk_blocks", "tail", "rope_base", "eps",
                  "scale", "training", "kv_experts", "kv_experts_active", "aux_loss_weight", "k_rank", "v_rank",
                  "ternary", "act_bits")


def layer_settings(layer: Module) -> dict[str, Any]:
    """``{name: value}`` of ``layer``'s :data:`LAYER_SETTINGS` (plain Python values), its class,
    dtype and selector class, and ``params``: a fingerprint of its parameters."""
    out = {"layer": type(layer).__name__}
    out.update((n, plain_value(getattr(layer, n))) for n in LAYER_SETTINGS if hasattr(layer, n))
    out["dtype"] = str(next(iter(layer.params.values())).dtype) if layer.params else None
    out["selector"] = None if getattr(layer, "selector", None) is None else type(layer.selector).__name__
    out["params"] = params_checksum(layer.params)[:16]
    return out


def model_settings(model: Module, skip: tuple[type, ...] = ()) -> dict[str, Any]:
    """``{name: value}`` every rank must share for ``model``: a Transformer's config fields, the
    model's class and ``params``, a fingerprint of the params of every module but those of a
    ``skip`` class (e.g. head-parallel layers, whose slices differ by rank)."""
    cfg = getattr(model, "cfg", None)
    out = {n: plain_value(v) for n, v in cfg.to_dict().items()} if hasattr(cfg, "to_dict") else {}
    out["model"] = type(model).__name__
    params = {prefix + n: a for prefix, m in _modules(model) if not isinstance(m, (Transformer, *skip))
              for n, a in m.params.items()}
    out["params"] = params_checksum(params)[:16]
    return out


def _check_comm(comm):
    for attr in ("size", "rank", "allgather", "Allreduce", "Allgather"):
        if not hasattr(comm, attr):
            raise TypeError(f"comm must be an mpi4py communicator, got {type(comm).__name__} "
                            f"(no {attr!r})")
    return comm


def _head_slice(a, axis, lo, hi):
    idx = [slice(None)] * a.ndim
    idx[axis] = slice(lo, hi)
    return get_array_module(a).ascontiguousarray(a[tuple(idx)])


class HeadSliceGenerator(np.random.Generator):
    """A Generator whose :meth:`random` of shape (B, Hp, ...) returns heads [head0, head0 + Hp)
    of the (B, heads_total, ...) block the generator of ``seed`` draws.

    The seed a :class:`HeadParallelMLA` hands its layer: the layer passes only ``seed`` on to
    :func:`topkattn.ops.selection.forget_draws` (one ``random((B, Hp, T, K'))`` per forward),
    which then returns what ``head_slice=(head0, head0 + Hp, heads_total)`` would.  ``seed``:
    anything :func:`topkattn.checks.make_rng` takes; a Generator is drawn from (advanced as by
    the all-heads call), so a data-parallel ``RowSliceGenerator`` composes (rows, then heads).
    Only :meth:`random` slices; it is the one draw forgetful masking makes.
    """

    def __init__(self, seed: int | np.random.Generator, head0: int, heads_total: int) -> None:
        inner = make_rng(seed)
        super().__init__(inner.bit_generator)  # one stream: a draw through either advances both
        self._inner = inner
        self.head0, self.heads_total = int(head0), int(heads_total)

    def random(self, size: Any = None, dtype: Any = np.float64, out: Any = None) -> np.ndarray:
        if size is None or out is not None or np.ndim(size) == 0 or len(size) < 2:
            raise TypeError(f"HeadSliceGenerator.random needs a shape tuple (B, heads, ...) and no out, "
                            f"got size={size!r}")
        size = tuple(int(n) for n in size)
        h1 = self.head0 + size[1]
        if h1 > self.heads_total:
            raise ValueError(f"heads [{self.head0}, {h1}) do not fit in a layer of {self.heads_total} heads")
        full = self._inner.random((size[0], self.heads_total, *size[2:]), dtype=dtype)  # (B, heads_total, ...)
        return full[:, self.head0:h1]


class HeadParallelMLA(MLA):
    """An :class:`~topkattn.layers.mla.MLA` of ``n_heads = H / P`` heads that is rank ``r``'s
    share of a full ``layer`` of H heads on ``comm`` (P ranks).

    Built by slicing ``layer``'s params (copies; ``layer`` itself is left alone): ``params``
    and ``grads`` hold the rank's slices of W_UQ, W_QR, W_UK, W_UV, W_O and the full
    replicated down-projections, norms and persistent tokens.  ``forward``/``backward``/
    ``step`` are the MLA's own, with the output summed over the ranks and the replicated
    gradients and dx summed in one packed allreduce (see the module docstring), so the
    results equal the single-process ``layer``.  Every rank must pass the same ``layer``
    (checked: its :func:`layer_settings` and params are compared, a ValueError naming what
    differs on every rank).  ``project`` returns this rank's heads only.

    With ``forget_rate > 0`` the rank's heads drop, for a seed, what the single-process layer
    drops for them (see :meth:`forward`).

    Raises ValueError (on every rank) when H % P != 0.
    """

    def __init__(self, layer: MLA, comm: Any) -> None:
        _check_comm(comm)
        error = settings = None
        try:
            if not isinstance(layer, MLA):
                raise TypeError(f"layer must be an MLA, got {type(layer).__name__}")
            if isinstance(layer, HeadParallelMLA):
                raise TypeError("layer is already a HeadParallelMLA")
            H, n_ranks = layer.n_heads, comm.size
            if layer.variant or layer.selection != "token" or layer.tail is not None:
                raise ValueError(f"head-parallel MLA supports plain MLA with token or dense attention, got "
                                 f"selection={layer.selection!r}, tail={layer.tail!r}, kv_experts={layer.kv_experts}, "
                                 f"k_rank={layer.k_rank}, v_rank={layer.v_rank}, ternary={layer.ternary}")
            if H % n_ranks:
                raise ValueError(f"layer.n_heads={H} must be a multiple of the number of ranks "
                                 f"comm.size={n_ranks} (each rank holds n_heads / ranks heads)")
            settings = layer_settings(layer)
        except (TypeError, ValueError) as e:
            error = e
        # one collective: the same settings and params (build the layer from the same seed or
        # broadcast it) and no rank's check failed, else the same error on every rank
        agree_settings(comm, "head-parallel MLA", settings, error)
        Hp = H // n_ranks
        p0 = layer.params["W_DQ"]
        super().__init__(layer.d_model, Hp, layer.q_lora_rank, layer.kv_lora_rank, layer.qk_nope_dim,
                         layer.qk_rope_dim, layer.v_head_dim, topk=layer.topk, seed=0, dtype=p0.dtype,
                         persistent_tokens=layer.persistent_tokens, window=layer.window, forget_rate=layer.forget_rate,
                         rope_base=layer.rope_base, eps=layer.eps, tail_bound=layer.tail_bound,
                         max_topk=layer.max_topk)
        self.comm = comm
        self.n_heads_total = H
        self.head_range = (comm.rank * Hp, (comm.rank + 1) * Hp)
        self.training = layer.training
        self.selector = layer.selector
        self.scale = layer.scale
        xp = get_array_module(p0)
        for name, value in layer.params.items():
            if name in SLICED:
                axis, dim = SLICED[name]
                per = getattr(layer, dim)
                value = _head_slice(value, axis, self.head_range[0] * per, self.head_range[1] * per)
            else:
                value = xp.array(value, copy=True)
            self.add_param(name, value)

    # -- training ----------------------------------------------------------------------
    def forward(self, x: Array, seed: int | np.random.Generator | None = None) -> Array:
        """y (B, T, d), the full output (equal on every rank): the rank's partial output summed.

        Forgetful masking (``forget_rate > 0``, training): ``seed`` (the same on every rank, a
        Generator in the same state) becomes a :class:`HeadSliceGenerator` of the rank's heads,
        so the draws are the single process's.  ``seed=None`` draws fresh entropy on each rank:
        valid forgetting, reproducible by nobody, as in one process.
        """
        if seed is not None and self.forget_rate > 0 and self.training:
            seed = HeadSliceGenerator(seed, self.head_range[0], self.n_heads_total)
        return allreduce_sum(self.comm, super().forward(x, seed=seed))

    def backward(self, dy: Array) -> Array:
        """dx (B, T, d) (full, equal on every rank) from dy (B, T, d), the same on every rank.

        Accumulates the rank's sliced gradients locally and the replicated ones summed over
        the ranks (one packed allreduce with dx).
        """
        if self._saved is None:
            raise RuntimeError("MLA.backward called before forward")
        x = self._saved[0]
        xp = get_array_module(x)
        names = [n for n in REPLICATED if n in self.grads]
        sizes = [self.grads[n].size for n in names]
        total = sum(sizes)
        buf = xp.zeros(total + x.size, dtype=self.grads["W_DQ"].dtype)
        own = {n: self.grads[n] for n in names}
        views, off = {}, 0
        for n, s in zip(names, sizes):
            views[n] = buf[off:off + s].reshape(own[n].shape)
            off += s
        self.grads.update(views)  # the MLA backward accumulates the partial sums into buf
        try:
            dx = super().backward(dy)
        finally:
            self.grads.update(own)
        buf[total:] = dx.reshape(-1)
        buf = allreduce_sum(self.comm, buf)
        off = 0
        for n, s in zip(names, sizes):
            own[n] += buf[off:off + s].reshape(own[n].shape)
            off += s
        return buf[total:].reshape(x.shape)

    # -- decoding ------------------------------------------------------------------------
    def step(self, x_t: Array, cache: MLACache) -> Array:
        """y_t (B, 1, d), the full output: the rank's heads' absorbed output summed over the ranks."""
        return allreduce_sum(self.comm, super().step(x_t, cache))

    # -- comparison with the single process --------------------------------------------
    def _gather(self, arrays):
        out = {}
        for name, a in arrays.items():
            if name in SLICED:
                axis = SLICED[name][0]
                parts = allgather_rows(self.comm, a)  # (P, ...) of the ranks' slices
                out[name] = get_array_module(a).concatenate(list(parts), axis=axis)
            else:
                out[name] = a
        return out

    def full_params(self) -> dict[str, Array]:
        """The full layer's params (H heads), gathered from every rank (a collective call)."""
        return self._gather(self.params)

    def gather_grads(self) -> dict[str, Array]:
        """The full layer's gradients (H heads), gathered from every rank (a collective call)."""
        return self._gather(self.grads)


def _modules(module, prefix=""):
    yield prefix, module
    for name, child in module.children():
        yield from _modules(child, f"{prefix}{name}.")


def layers_of(model: Module, kinds: tuple[type, ...]) -> list[tuple[Module, str, Module, str]]:
    """Every layer of ``model`` that is one of ``kinds``, as (parent, name, layer, dotted path), in
    walk order; TypeError when ``model`` is not a module."""
    if not hasattr(model, "children"):
        raise TypeError(f"model must be a Transformer or a layer, got {type(model).__name__}")
    return [(module, name, child, prefix + name) for prefix, module in list(_modules(model))
            for name, child in module.children() if isinstance(child, kinds)]


def replace_layers(model: Module, replaced: list[tuple[Module, str, Module, Module]]) -> None:
    """Put each (parent, name, old, new) layer in its parent's place (and ``attn``), then rebuild a
    Transformer's flat parameter views."""
    for module, name, old, new in replaced:
        module._children[name] = new
        if getattr(module, "attn", None) is old:
            module.attn = new
    if isinstance(model, Transformer):
        model._rebuild()


def head_parallel(model: Transformer | Module, comm: Any) -> Transformer | Module:
    """Convert every MLA of ``model`` (a :class:`~topkattn.model.Transformer` or a module
    holding MLA children) into a :class:`HeadParallelMLA` on ``comm``, in place; returns ``model``.

    The flat ``params``/``grads`` keep their names (``blocks.i.attn.W_UQ`` is now the rank's
    slice).  Every rank must pass the same model: its config, its MLA layers, their settings
    (:func:`layer_settings`) and its params are compared across the ranks first, a ValueError
    naming what differs on every rank.  ValueError (on every rank) when it has no MLA (e.g.
    ``attention="mha"``) or an MLA's heads do not divide over the ranks.
    """
    _check_comm(comm)
    error = settings = None
    try:  # the local checks and the model's description, agreed before any collective depends on them
        found = layers_of(model, (MLA,))
        layers = [(path, type(child).__name__) for _, _, child, path in found]
        todo = [(module, name, child) for module, name, child, _ in found if not isinstance(child, HeadParallelMLA)]
        settings = dict(model_settings(model, skip=(HeadParallelMLA,)), mla_layers=layers)
        if not layers:
            raise ValueError("model has no MLA layer to split over heads (head-parallel needs attention='mla')")
    except (TypeError, ValueError) as e:
        error = e
    agree_settings(comm, "head_parallel", settings, error)
    # all built first: a refusal leaves the model as it was
    replace_layers(model, [(module, name, child, HeadParallelMLA(child, comm)) for module, name, child in todo])
    return model


def _own(module, which):
    """A module's own params or grads (a Transformer's dicts are flat views of its children's)."""
    if isinstance(module, Transformer):
        return {}
    if isinstance(module, HeadParallelMLA):
        return module.full_params() if which == "params" else module.gather_grads()
    return module.params if which == "params" else module.grads


def _full(model, which):
    return {prefix + name: a for prefix, module in _modules(model) for name, a in _own(module, which).items()}


def full_model_params(model: Transformer | Module) -> dict[str, Array]:
    """Flat ``name -> array`` of ``model``'s params with every head-parallel MLA gathered to full
    shape: the names and shapes of the single-process model (a collective call)."""
    return _full(model, "params")


def gather_model_grads(model: Transformer | Module) -> dict[str, Array]:
    """Flat ``name -> array`` of ``model``'s gradients, head-sliced ones gathered to full shape
    (a collective call); equal to the single-process model's ``grads``."""
    return _full(model, "grads")


def head_parallel_grad_norm(model: Transformer | Module) -> float:
    """The L2 norm of the full model's gradients (float64 accumulation), equal on every rank
    and to the single-process :func:`topkattn.training.optim.global_grad_norm`: replicated
    gradients counted once, the head slices' squares summed over the ranks (one allreduce)."""
    rep, loc = 0.0, 0.0
    comm = None
    for _, module in _modules(model):
        grads = {} if isinstance(module, Transformer) else module.grads
        for name, g in grads.items():
            xp = get_array_module(g)
            g64 = g.astype(xp.float64, copy=False).ravel()
            sq = float(xp.vdot(g64, g64).real)
            if isinstance(module, HeadParallelMLA) and name in SLICED:
                loc += sq
                comm = module.comm
            else:
                rep += sq
    if comm is not None:
        loc = float(allreduce_sum(comm, np.array([loc]))[0])
    return math.sqrt(rep + loc)


def clip_head_parallel_grad_norm(model: Transformer | Module, max_norm: float) -> float:
    """Scale every gradient of ``model`` in place so the full model's norm is at most ``max_norm``
    (the same factor on every rank); returns the norm before clipping, as
    :func:`topkattn.training.optim.clip_grad_norm` does for one process."""
    check_real("max_norm", max_norm, 0.0, lo_open=True)
    norm = head_parallel_grad_norm(model)
    if math.isfinite(norm) and norm > max_norm:
        factor = max_norm / (norm + 1e-6)
        for _, module in _modules(model):
            for g in ({} if isinstance(module, Transformer) else module.grads).values():
                g *= g.dtype.type(factor)
    return norm
