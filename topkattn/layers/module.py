"""The layer base: ``params``/``grads`` dicts, child layers, flat dotted names, devices.

A layer owns ``params`` (name -> array) and ``grads`` (the same keys, same shapes).
``forward`` keeps what ``backward`` needs; ``backward`` returns the input gradient and
**accumulates** into ``grads`` (call :meth:`Module.zero_grad` between steps).  Children
are registered with :meth:`Module.add` and named ``child.param`` in :meth:`named_params`.
"""
from __future__ import annotations

from collections.abc import ItemsView, Iterator
from types import ModuleType
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from topkattn.backend import Array, as_engine_array, get_array_module
from topkattn.checks import check_int, check_real


class Module:
    """Base of every layer: own params/grads plus named children."""

    def __init__(self) -> None:
        self.params: dict[str, Array] = {}
        self.grads: dict[str, Array] = {}
        self._children: dict[str, Module] = {}

    # -- registration ------------------------------------------------------------------
    def add_param(self, name: str, value: Array) -> Array:
        self.params[name] = value
        self.grads[name] = get_array_module(value).zeros_like(value)
        return value

    def add(self, name: str, child: Module) -> Module:
        self._children[name] = child
        return child

    def children(self) -> ItemsView[str, Module]:
        return self._children.items()

    def step(self, x: Array) -> Array:
        """Forward of one decode step for a position-wise layer, keeping nothing for backward."""
        y = self.forward(x)
        self._saved = None
        return y

    # -- flat views ----------------------------------------------------------------------
    def named_params(self, prefix: str = "") -> Iterator[tuple[str, Array]]:
        """Yield ``(dotted name, param array)`` for this layer and all descendants."""
        for n, p in self.params.items():
            yield prefix + n, p
        for cn, c in self._children.items():
            yield from c.named_params(f"{prefix}{cn}.")

    def named_grads(self, prefix: str = "") -> Iterator[tuple[str, Array]]:
        for n, g in self.grads.items():
            yield prefix + n, g
        for cn, c in self._children.items():
            yield from c.named_grads(f"{prefix}{cn}.")

    def zero_grad(self) -> None:
        """Set every gradient to zero in place (the arrays keep their identity)."""
        for g in self.grads.values():
            g[...] = 0
        for c in self._children.values():
            c.zero_grad()

    def to_device(self, xp: ModuleType) -> Module:
        """Move params and grads to ``xp`` (numpy or cupy); returns self."""
        for n in list(self.params):
            self.params[n] = _move(self.params[n], xp)
            self.grads[n] = _move(self.grads[n], xp)
        for c in self._children.values():
            c.to_device(xp)
        return self

    @property
    def xp(self) -> ModuleType:
        for _, p in self.named_params():
            return get_array_module(p)
        return np


class FlatParameters:
    """Every parameter of a module tree in one contiguous buffer, every gradient in another; the
    layers hold views into them (same names, shapes and values as before).

    ``params``, ``grads``: the flat buffers (N,); ``names``: dotted names in buffer order;
    ``slices``: name -> (start, stop) in the buffers; ``views``: name -> (param view, grad view).
    An optimizer or a gradient reduction works on the two buffers in one pass each instead of
    one small operation per array.
    """

    def __init__(self, names: list[str], params: Array, grads: Array, slices: dict[str, tuple[int, int]],
                 views: dict[str, tuple[Array, Array]]) -> None:
        self.names, self.params, self.grads, self.slices, self.views = names, params, grads, slices, views

    def holds(self, params: dict[str, Array], grads: dict[str, Array]) -> bool:
        """True when the dicts ``params`` and ``grads`` (name -> array) are exactly these views."""
        if len(params) != len(self.views) or len(grads) != len(self.views):
            return False
        for name, (pv, gv) in self.views.items():
            if params.get(name) is not pv or grads.get(name) is not gv:
                return False
        return True


def flatten_parameters(root: Module) -> FlatParameters | None:
    """Move every parameter and gradient of the module tree ``root`` into one buffer each (in
    ``named_params`` order) and make the layers' arrays views into them; returns a
    :class:`FlatParameters`, or None (nothing moved) when the parameters differ in dtype or
    array library or there are none.  Values are copied exactly; the params/grads dicts keep
    their keys and order.  Arrays replaced later (a device move, a layer swap) are no longer views:
    :meth:`FlatParameters.holds` then says so.
    """
    named = list(root.named_params())
    if not named:
        return None
    grads = dict(root.named_grads())
    first = named[0][1]
    xp = get_array_module(first)
    if any(a.dtype != first.dtype or get_array_module(a) is not xp for _, a in named):
        return None
    total = sum(int(a.size) for _, a in named)
    flat_p = xp.empty(total, dtype=first.dtype)
    flat_g = xp.empty(total, dtype=first.dtype)
    slices, views, start = {}, {}, 0
    for name, a in named:
        owner, key = _owner(root, name)
        stop = start + int(a.size)
        pv = flat_p[start:stop].reshape(a.shape)
        gv = flat_g[start:stop].reshape(a.shape)
        pv[...] = a
        gv[...] = grads[name]
        owner.params[key], owner.grads[key] = pv, gv
        slices[name], views[name] = (start, stop), (pv, gv)
        start = stop
    if root.params is not None:  # a root that caches the dotted dicts (the Transformer): refresh them
        for name, (pv, gv) in views.items():
            if name in root.params and root.params[name] is not pv:
                root.params[name], root.grads[name] = pv, gv
    return FlatParameters([n for n, _ in named], flat_p, flat_g, slices, views)


def share_parameters(src: Module, dst: Module) -> None:
    """Make the layers of ``dst`` (a copy of ``src``: the same parameter names and shapes) hold
    ``src``'s parameter arrays themselves, so an in-place update of ``src``'s parameters is
    ``dst``'s too; ``dst`` keeps its own gradients.  ValueError naming the first parameter
    that differs."""
    mine = dict(src.named_params())
    theirs = dict(dst.named_params())
    if list(mine) != list(theirs) or any(mine[n].shape != theirs[n].shape for n in mine):
        bad = next((n for n in mine if n not in theirs or mine[n].shape != theirs[n].shape), None)
        raise ValueError(f"dst must have src's parameters (names and shapes); they differ at {bad!r}")
    for name, a in mine.items():
        owner, key = _owner(dst, name)
        owner.params[key] = a
    if dst.params is not None:  # a root that caches the dotted dicts (the Transformer): refresh them
        for name, a in mine.items():
            if name in dst.params:
                dst.params[name] = a


def _owner(module, dotted):
    """The module owning the parameter ``dotted`` (a name of ``named_params``) and its own key."""
    while True:
        for cn, child in module._children.items():
            if dotted.startswith(cn + "."):
                module, dotted = child, dotted[len(cn) + 1:]
                break
        else:
            return module, dotted


def _move(a, xp):
    if xp is np:
        return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else a
    return xp.asarray(a)


def check_topk(topk: int | str | None, tail_bound: float | None = None, max_topk: int | None = None,
               forget_rate: float = 0.0) -> tuple[int | str | None, float | None, int | None]:
    """Validated ``(topk, tail_bound, max_topk)`` of an attention layer.

    topk: None (dense), an integer >= 1, or "auto" (dynamic k: per query the smallest k whose
    left-out softmax mass is provably <= ``tail_bound``, at most ``max_topk`` keys; see
    :func:`topkattn.ops.topk_attention`).  tail_bound and max_topk apply only to "auto".
    """
    if topk == "auto":
        if tail_bound is None:
            raise ValueError("topk='auto' needs tail_bound in [0, 1), got None")
        tail_bound = check_real("tail_bound", tail_bound, 0.0, 1.0, hi_open=True)
        if forget_rate:
            raise ValueError(f"forget_rate must be 0 with topk='auto', got {forget_rate!r}")
        return "auto", tail_bound, check_int("max_topk", max_topk, 1, optional=True)
    if tail_bound is not None or max_topk is not None:
        raise ValueError("tail_bound and max_topk apply only with topk='auto'")
    if topk is None:
        return None, None, None
    if isinstance(topk, str):
        raise ValueError(f"topk must be None, an integer >= 1 or 'auto', got {topk!r}")
    return check_int("topk", topk, 1), None, None


def normal(rng: np.random.Generator, shape: int | tuple[int, ...], std: float, dtype: DTypeLike) -> np.ndarray:
    return (rng.standard_normal(shape) * std).astype(dtype)


def check_grad_output(dy: Any, shape: tuple[int, ...], like: Array, name: str = "dy") -> Array:
    """The gradient ``dy`` a backward pass receives, checked against its forward.

    ``shape``: the shape of the forward's output (``dy`` must have exactly that shape: a
    transposed (T, B, d) for (B, T, d) is refused even when the sizes match); ``like``: an
    array of the forward, whose dtype and device the returned ``dy`` gets.  TypeError
    naming ``name`` for a non-float array, ValueError naming it with the expected and the
    received shapes.
    """
    dy = as_engine_array(dy, name)
    if dy.dtype.kind != "f":
        raise TypeError(f"{name} must be a float array, got {dy.dtype}")
    shape = tuple(int(n) for n in shape)
    if tuple(dy.shape) != shape:
        raise ValueError(f"{name} must have the shape of the forward output, {shape}, got {tuple(dy.shape)}")
    xp = get_array_module(like)
    if get_array_module(dy) is not xp:  # the gradient follows the forward's device
        dy = xp.asarray(dy) if xp is not np else dy.get()
    return dy.astype(like.dtype, copy=False)


def as_input(x: Any, name: str, dtype: DTypeLike, last_dim: int | None = None, ndim: int | None = None,
             letters: str | None = None) -> Array:
    """Engine array of float ``dtype``; ValueError naming ``name`` on a bad shape."""
    x = as_engine_array(x, name)
    if x.dtype.kind != "f":
        raise TypeError(f"{name} must be a float array, got {x.dtype}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D {letters or ''}, got shape {tuple(x.shape)}")
    if last_dim is not None and (x.ndim == 0 or x.shape[-1] != last_dim):
        raise ValueError(f"{name} must have last axis {last_dim} {letters or ''}, got shape {tuple(x.shape)}")
    return x.astype(dtype, copy=False)
