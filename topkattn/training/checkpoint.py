"""Checkpoints: named numeric arrays plus a JSON ``meta``, in the :mod:`topkattn.storage` container.

A checkpoint is a container of kind ``"checkpoint"``: an uncompressed, pickle-free
``.npz`` with a ``__header__`` JSON entry (kind, version, meta, every array's dtype,
shape and SHA-256).  Saving is atomic (temporary file, fsync, rename, folder fsync), so a
crash leaves either the old checkpoint or the new one.  Loading checks every checksum: a
missing, truncated or corrupted file raises :class:`CheckpointError` (the one
:class:`topkattn.storage.StorageError`), never returns partial state.

Version 1 (before the container) kept the document in a ``__meta__`` entry with
``"format": "topkattn-checkpoint"`` and the same per-array SHA-256; it still loads.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from topkattn.storage import StorageError, load_container, save_container, verify_arrays

KIND = "checkpoint"
VERSION = 2  # 1: the pre-container layout, read by _load_legacy
LEGACY_FORMAT = "topkattn-checkpoint"
LEGACY_KEY = "__meta__"
TEMP_PREFIX = ".ckpt-"  # temporary files of an interrupted save: <TEMP_PREFIX>*.tmp

CheckpointError = StorageError  # a checkpoint file is missing, truncated, corrupted or not a checkpoint


class ConfigMismatchError(ValueError):
    """The config of a run does not match its checkpoint's; ``fields`` names the differences."""

    def __init__(self, message: str, fields: list[str]) -> None:
        super().__init__(message)
        self.fields = fields


def save_checkpoint(path: str | os.PathLike, arrays: Mapping[str, Any], meta: Any) -> None:
    """Atomically write ``arrays`` (name -> numeric array, NumPy or CuPy) and the JSON-able
    ``meta`` to ``path``."""
    save_container(path, arrays, meta, kind=KIND, version=VERSION, prefix=TEMP_PREFIX)


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (or a version-1 one): ``(arrays, meta)``.

    Raises :class:`CheckpointError` naming the file if it is missing, truncated,
    corrupted (a checksum differs), newer than this topkattn or not a checkpoint.
    """
    arrays, meta, _ = load_container(path, kind=KIND, max_version=VERSION, legacy=_load_legacy)
    return arrays, meta


def _load_legacy(path, members):
    """A version-1 checkpoint: ``(arrays, meta, 1)``, or None if ``members`` has no ``__meta__``."""
    if LEGACY_KEY not in members:
        return None
    arrays = {n: a for n, a in members.items() if n != LEGACY_KEY}
    try:
        doc = json.loads(members[LEGACY_KEY].tobytes().decode("utf-8"))
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path} has an unreadable {LEGACY_KEY} entry ({e})") from e
    if not isinstance(doc, dict) or doc.get("format") != LEGACY_FORMAT:
        raise CheckpointError(f"checkpoint {path} has a {LEGACY_KEY} entry but is not a {LEGACY_FORMAT} file")
    if doc.get("version") != 1:
        raise CheckpointError(f"checkpoint {path} is a {LEGACY_FORMAT} file of version "
                              f"{doc.get('version')!r}; only version 1 used that layout")
    if "meta" not in doc:
        raise CheckpointError(f"checkpoint {path} is corrupted: its {LEGACY_KEY} entry has no meta")
    verify_arrays(path, KIND, arrays, doc.get("arrays"))
    return arrays, doc["meta"], 1


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """Sorted ``(field, saved_value, current_value)`` for fields that differ between two dicts."""
    diffs = []
    for key in sorted(set(saved) | set(current), key=str):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if a != b:
            diffs.append((key, a, b))
    return diffs


def check_config(saved: Mapping[str, Any], current: Mapping[str, Any], *, path: str = "checkpoint") -> None:
    """Raise :class:`ConfigMismatchError` naming every field where ``current`` differs from ``saved``."""
    diffs = config_differences(saved, current)
    if diffs:
        detail = ", ".join(f"{k} (checkpoint {a!r}, now {b!r})" for k, a, b in diffs)
        raise ConfigMismatchError(f"config does not match {path}: {detail}",
                                  [k for k, _, _ in diffs])


def save_training_state(path: str | os.PathLike, *, params: Mapping[str, Any], optimizer: Any, step: int,
                        config: Mapping[str, Any], rng: Any, history: Mapping[str, Any] | None = None) -> None:
    """Checkpoint a training run: parameters, AdamW state, step, RNG state, config, loss history.

    ``optimizer`` is a :class:`topkattn.training.optim.AdamW`; ``rng`` a JSON-able dict;
    ``history`` a dict of name -> 1-D array (e.g. per-step losses).
    """
    opt = optimizer.state_dict()
    arrays = {f"param/{k}": a for k, a in params.items()}
    arrays.update({f"opt_m/{k}": a for k, a in opt["m"].items()})
    arrays.update({f"opt_v/{k}": a for k, a in opt["v"].items()})
    for k, a in (history or {}).items():
        arrays[f"history/{k}"] = np.asarray(a)
    meta = {"step": int(step), "config": config, "rng": rng,
            "optimizer": {"t": opt["t"], "hyper": opt["hyper"]}}
    save_checkpoint(path, arrays, meta)


def load_training_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read :func:`save_training_state`'s file: a dict with params, optimizer (state dict),
    step, config, rng and history."""
    arrays, meta = load_checkpoint(path)
    for key in ("step", "config", "rng", "optimizer"):
        if not isinstance(meta, dict) or key not in meta:
            raise CheckpointError(f"checkpoint {path} is not a training checkpoint (no {key!r})")
    out = {"params": {}, "m": {}, "v": {}, "history": {}}
    prefixes = {"param/": "params", "opt_m/": "m", "opt_v/": "v", "history/": "history"}
    for name, a in arrays.items():
        for pre, slot in prefixes.items():
            if name.startswith(pre):
                out[slot][name[len(pre):]] = a
                break
    o = meta["optimizer"]
    if not isinstance(o, dict) or not {"t", "hyper"} <= set(o):
        raise CheckpointError(f"checkpoint {path} is corrupted: its optimizer entry lacks "
                              f"{sorted({'t', 'hyper'} - set(o if isinstance(o, dict) else ()))}")
    opt = {"t": o["t"], "hyper": o["hyper"], "m": out["m"], "v": out["v"]}
    return {"params": out["params"], "optimizer": opt, "step": meta["step"],
            "config": meta["config"], "rng": meta["rng"], "history": out["history"]}
