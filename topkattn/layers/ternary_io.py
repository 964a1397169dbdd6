"""Packed ternary weights in files: the inference form of ternary projections, in the storage container.

Training checkpoints hold the float master weights (``params``), unchanged; the packed form
(:class:`topkattn.ops.ternary.PackedTernary`, 2 bits per weight plus one scale) is for
inference and goes in its own container of kind ``"ternary-weights"`` (version 1), written
atomically and checksummed by :mod:`topkattn.storage`:

* arrays ``<name>/codes`` (Dout, nb) uint8, ``<name>/scale`` (1,) float64, ``<name>/shape`` (2,) int64
  for every packed weight ``name`` (the dotted parameter name, e.g. ``blocks.0.proj.weight``);
* meta ``{"names": [...], "user": <the caller's JSON meta or None>}``.

The same arrays (``PackedTernary.to_arrays(prefix)``) also fit in a training checkpoint
(:func:`topkattn.training.checkpoint.save_checkpoint` takes any numeric arrays).

Which layers carry packed weights: a layer's ``packed`` attribute is a ``PackedTernary``
for its ``weight`` parameter (:class:`topkattn.layers.Linear`), or a dict ``{param name:
PackedTernary}`` (layers with several projections).
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

from topkattn.layers.module import Module
from topkattn.ops.ternary import PackedTernary
from topkattn.storage import StorageError, load_container, save_container

KIND = "ternary-weights"
VERSION = 1
TEMP_PREFIX = ".ternary-"


def packed_weights(module: Module, prefix: str = "") -> dict[str, PackedTernary]:
    """``{dotted param name: PackedTernary}`` of every packed weight in ``module`` and its children."""
    out = {}
    packed = getattr(module, "packed", None)
    if isinstance(packed, PackedTernary):
        out[prefix + "weight"] = packed
    elif isinstance(packed, dict):
        out.update({prefix + n: p for n, p in packed.items() if isinstance(p, PackedTernary)})
    for name, child in module.children():
        out.update(packed_weights(child, f"{prefix}{name}."))
    return out


def save_packed(path: str | os.PathLike, packed: Mapping[str, PackedTernary], meta: Any = None) -> None:
    """Atomically write ``packed`` ({name: PackedTernary}) and the JSON-able ``meta`` to ``path``."""
    arrays = {}
    for name, p in packed.items():
        if not isinstance(p, PackedTernary):
            raise TypeError(f"packed[{name!r}] must be a PackedTernary, got {type(p).__name__}")
        arrays.update(p.to_arrays(prefix=f"{name}/"))
    save_container(path, arrays, {"names": sorted(packed), "user": meta}, kind=KIND, version=VERSION,
                   prefix=TEMP_PREFIX)


def load_packed(path: str | os.PathLike) -> tuple[dict[str, PackedTernary], Any]:
    """Read :func:`save_packed`'s file: ``({name: PackedTernary}, meta)``.

    :class:`topkattn.storage.StorageError` naming the file if it is missing, corrupted, of
    another kind or newer, or if an entry is not a valid packed ternary weight.
    """
    arrays, doc, _ = load_container(path, kind=KIND, max_version=VERSION)
    names = doc.get("names") if isinstance(doc, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise StorageError(f"{KIND} {path} is corrupted: its meta lacks the list of names")
    out = {}
    for name in names:
        try:
            out[name] = PackedTernary.from_arrays(arrays, prefix=f"{name}/")
        except (TypeError, ValueError) as e:
            raise StorageError(f"{KIND} {path} holds an invalid packed weight {name!r}: {e}") from e
    return out, doc.get("user")


def load_packed_into(module: Module, packed: Mapping[str, PackedTernary]) -> None:
    """Set the packed weights of ``module``'s ternary layers from ``packed`` ({name: PackedTernary}).

    Every ternary :class:`topkattn.layers.Linear` under ``module`` must find ``<path>weight``
    with its shape; ValueError naming the missing, unexpected or mis-shaped entries.
    """
    wanted = dict(_ternary_linears(module))
    missing = sorted(set(wanted) - set(packed))
    unexpected = sorted(set(packed) - set(wanted))
    if missing or unexpected:
        raise ValueError(f"packed weights do not match the model: missing {missing}, unexpected {unexpected}")
    for name, layer in wanted.items():
        p = packed[name]
        if p.shape != (layer.d_out, layer.d_in):
            raise ValueError(f"packed[{name!r}] has shape {p.shape}, the layer wants {(layer.d_out, layer.d_in)}")
    for name, layer in wanted.items():
        layer.packed = packed[name]


def _ternary_linears(module: Module, prefix: str = "") -> Iterator[tuple[str, Module]]:
    if getattr(module, "ternary", False) is True and hasattr(module, "d_in") and "weight" in module.params:
        yield prefix + "weight", module
    for name, child in module.children():
        yield from _ternary_linears(child, f"{prefix}{name}.")
