"""Checkpoints: atomic, checksummed, pickle-free ``.npz`` files.

A checkpoint is an uncompressed ``.npz`` archive of plain numeric arrays plus one
``__meta__`` entry, a UTF-8 JSON document stored as a uint8 array, holding the format
tag, the step, the config, the RNG state, scalars, and for every array its dtype,
shape and SHA-256.  Writing goes to a temporary file in the target folder, is fsynced,
then renamed over the target (and the folder fsynced), so a crash at any moment leaves
either the old checkpoint or the new one, never a mix.  Reading uses
``allow_pickle=False`` and checks every checksum: a truncated or corrupted file raises
:class:`CheckpointError`, never returns partial state.
"""
import hashlib
import json
import os
import zipfile
import zlib

import numpy as np

from topkattn.storage import atomic_savez
from topkattn.backend import to_numpy

FORMAT = "topkattn-checkpoint"
VERSION = 1
META_KEY = "__meta__"
TEMP_PREFIX = ".ckpt-"  # temporary files of an interrupted save: <TEMP_PREFIX>*.tmp


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupted or not a topkattn checkpoint."""


class ConfigMismatchError(ValueError):
    """The config of a run does not match its checkpoint's; ``fields`` names the differences."""

    def __init__(self, message, fields):
        super().__init__(message)
        self.fields = fields


def _digest(a):
    h = hashlib.sha256()
    h.update(str(a.dtype.str).encode())
    h.update(repr(tuple(a.shape)).encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def save_checkpoint(path, arrays, meta):
    """Write ``arrays`` (name -> numeric array, NumPy or CuPy) and the JSON-able ``meta`` to ``path``.

    Atomic: temporary file in the same folder, fsync, rename, fsync of the folder.
    """
    if META_KEY in arrays:
        raise ValueError(f"arrays must not use the reserved name {META_KEY!r}")
    host = {}
    for name, a in arrays.items():
        a = np.ascontiguousarray(to_numpy(a))
        if a.dtype.hasobject or a.dtype.kind not in "biufc":
            raise TypeError(f"arrays[{name!r}] must be numeric, got dtype {a.dtype}")
        host[name] = a
    doc = {"format": FORMAT, "version": VERSION, "meta": meta,
           "arrays": {n: {"dtype": a.dtype.str, "shape": list(a.shape), "sha256": _digest(a)}
                      for n, a in host.items()}}
    blob = json.dumps(doc, sort_keys=True).encode("utf-8")
    doc_bytes = np.frombuffer(blob, dtype=np.uint8)
    atomic_savez(path, {META_KEY: doc_bytes, **host}, prefix=TEMP_PREFIX)


def load_checkpoint(path):
    """Read a checkpoint written by :func:`save_checkpoint`: returns ``(arrays, meta)``.

    Raises :class:`CheckpointError` naming the file if it is missing, truncated,
    corrupted (a checksum differs) or not a topkattn checkpoint.
    """
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            names = list(z.files)
            if META_KEY not in names:
                raise CheckpointError(f"checkpoint {path} has no {META_KEY} entry: "
                                      f"not a topkattn checkpoint")
            raw = {n: z[n] for n in names}  # reading every member checks the zip CRCs
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, KeyError,
            UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted "
                              f"({type(e).__name__}: {e})") from e
    try:
        doc = json.loads(raw.pop(META_KEY).tobytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} has an unreadable {META_KEY} entry ({e})") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a {FORMAT} file")
    if doc.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {doc.get('version')!r}; "
                              f"this topkattn reads version {VERSION}")
    listed = doc.get("arrays", {})
    if set(listed) != set(raw):
        missing = sorted(set(listed) - set(raw))
        extra = sorted(set(raw) - set(listed))
        raise CheckpointError(f"checkpoint {path} is corrupted: arrays missing {missing}, "
                              f"unlisted {extra}")
    for name, a in raw.items():
        info = listed[name]
        if a.dtype.str != info["dtype"] or list(a.shape) != info["shape"] or _digest(a) != info["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupted: array {name!r} fails its "
                                  f"checksum (dtype/shape/SHA-256)")
    return raw, doc["meta"]


def config_differences(saved, current):
    """Sorted ``(field, saved_value, current_value)`` for fields that differ between two dicts."""
    diffs = []
    for key in sorted(set(saved) | set(current), key=str):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if a != b:
            diffs.append((key, a, b))
    return diffs


def check_config(saved, current, *, path="checkpoint"):
    """Raise :class:`ConfigMismatchError` naming every field where ``current`` differs from ``saved``."""
    diffs = config_differences(saved, current)
    if diffs:
        detail = ", ".join(f"{k} (checkpoint {a!r}, now {b!r})" for k, a, b in diffs)
        raise ConfigMismatchError(f"config does not match {path}: {detail}",
                                  [k for k, _, _ in diffs])


def save_training_state(path, *, params, optimizer, step, config, rng, history=None):
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


def load_training_state(path):
    """Read :func:`save_training_state`'s file: a dict with params, optimizer (state dict),
    step, config, rng and history."""
    arrays, meta = load_checkpoint(path)
    for key in ("step", "config", "rng", "optimizer"):
        if key not in meta:
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
