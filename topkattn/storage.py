"""Every file topkattn writes: one atomic writer and one checksummed container.

Atomic writes (:func:`atomic_write`; :func:`atomic_savez` and :func:`atomic_write_json`
use it): the data goes to a temporary file ``<prefix>*.tmp`` in the target's folder, is
flushed and fsynced, then renamed over the target (``os.replace``, atomic on POSIX), and
the folder is fsynced so the rename survives a crash.  A failure at any point removes the
temporary file and leaves the old file untouched.

The container (:func:`save_container`, :func:`load_container`), shared by checkpoints and
ANN indexes, is an uncompressed NumPy ``.npz`` with

* ``__header__``: a UTF-8 JSON document stored as a 1-D uint8 array,
  ``{"kind": str, "version": int, "meta": <JSON>,
  "arrays": {name: {"dtype": str, "shape": [int], "sha256": hex}}}``;
* one entry per array, all numeric (bool, int, uint, float, complex): no pickles.

An array's SHA-256 covers its dtype string, its shape and its C-order bytes.  Loading
uses ``allow_pickle=False``, reads every member (checking the zip CRCs) and verifies every
checksum.  Any problem raises :class:`StorageError` with a one-line message naming the
file; a file from before the container (no ``kind`` in its header) goes to the caller's
``legacy`` reader.  This module imports nothing from ``topkattn`` but the backend.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

import numpy as np

from topkattn.backend import Array, to_numpy

# legacy(path, members) -> (arrays, meta, version), or None for a file it does not recognise either
LegacyReader = Callable[[str, dict[str, np.ndarray]], "tuple[dict[str, np.ndarray], Any, int] | None"]

HEADER_KEY = "__header__"
NUMERIC_KINDS = "biufc"  # numpy dtype kinds a container holds


class StorageError(ValueError):
    """A file is truncated, corrupted, of another kind, of a newer version, or not topkattn's."""


class MissingFileError(StorageError, FileNotFoundError):
    """The file to load does not exist (also a FileNotFoundError)."""


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object], *, prefix: str) -> None:
    """Create or replace ``path`` atomically; ``write(f)`` fills ``f``, the open binary temporary file.

    The file gets the permissions a plain ``open(path, "w")`` would give (0666 minus the
    umask), not the owner-only mode of a temporary file.  ``prefix`` names the temporary
    file (``<prefix>*.tmp`` in the same folder), so a killed writer's leftovers are
    recognisable (see :func:`remove_stale_temporaries`).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)


def atomic_savez(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], *, prefix: str) -> None:
    """Write ``arrays`` (name -> ndarray) as an uncompressed ``.npz`` at ``path``, atomically."""
    atomic_write(path, lambda f: np.savez(f, **arrays), prefix=prefix)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, prefix: str) -> None:
    """Write ``obj`` as JSON (indent 1, sorted keys, trailing newline) at ``path``, atomically."""
    text = json.dumps(obj, indent=1, sort_keys=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")), prefix=prefix)


def read_json(path: str | os.PathLike, kind: type | None = None) -> Any:
    """The JSON document in ``path`` (a ``kind``, dict or list, when given); ValueError naming the
    file when it cannot be read or parsed, or holds another kind."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"cannot read {os.fspath(path)} as JSON: {e}") from e
    if kind is not None and not isinstance(doc, kind):
        want = "object" if kind is dict else "list"
        raise ValueError(f"{os.fspath(path)} must hold a JSON {want}, got {type(doc).__name__}")
    return doc


def remove_stale_temporaries(folder: str | os.PathLike, prefix: str, also: re.Pattern[str] | None = None) -> list[str]:
    """Delete ``<prefix>*.tmp`` files in ``folder`` (left by a writer killed mid-save), and the
    names that the compiled regex ``also`` matches in full (an older writer's temporaries).

    Only for a folder this process owns (a training run's ``--out``): another writer's
    in-flight temporary file would be removed too.  Returns the names removed.
    """
    removed = []
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return removed
    for name in names:
        if (name.startswith(prefix) and name.endswith(".tmp")) or (also is not None and also.fullmatch(name)):
            try:
                os.unlink(os.path.join(folder, name))
                removed.append(name)
            except OSError:
                pass
    return removed


def array_digest(a: np.ndarray) -> str:
    """SHA-256 (hex) of an array's dtype string, shape and C-order bytes."""
    a = np.asarray(a, order="C")
    h = hashlib.sha256()
    h.update(a.dtype.str.encode())
    h.update(repr(tuple(a.shape)).encode())
    h.update(a)
    return h.hexdigest()


def save_container(path: str | os.PathLike, arrays: Mapping[str, Array], meta: Any, *, kind: str, version: int,
                   prefix: str) -> None:
    """Atomically write ``arrays`` (name -> numeric array, NumPy or CuPy) and the JSON-able
    ``meta`` to ``path`` as a container of ``kind`` at format ``version``.

    TypeError for a non-numeric array, ValueError for the reserved name ``__header__``.
    """
    if HEADER_KEY in arrays:
        raise ValueError(f"arrays must not use the reserved name {HEADER_KEY!r}")
    host = {}
    for name, a in arrays.items():
        a = np.asarray(to_numpy(a), order="C")
        if a.dtype.kind not in NUMERIC_KINDS:
            raise TypeError(f"arrays[{name!r}] must be numeric, got dtype {a.dtype}")
        host[name] = a
    header = {"kind": kind, "version": int(version), "meta": meta,
              "arrays": {n: {"dtype": a.dtype.str, "shape": list(a.shape), "sha256": array_digest(a)}
                         for n, a in host.items()}}
    blob = json.dumps(header, sort_keys=True).encode("utf-8")
    atomic_savez(path, {HEADER_KEY: np.frombuffer(blob, np.uint8), **host}, prefix=prefix)


def load_container(path: str | os.PathLike, *, kind: str, max_version: int,
                   legacy: LegacyReader | None = None) -> tuple[dict[str, np.ndarray], Any, int]:
    """Read a container of ``kind`` written by :func:`save_container`: ``(arrays, meta, version)``.

    ``legacy(path, members)`` reads a file without a container header (``members``: every
    entry of the archive, name -> array) and returns ``(arrays, meta, version)``, or None
    when it does not recognise the file either.  Raises :class:`StorageError` naming the
    file when it is missing (:class:`MissingFileError`), truncated, corrupted, of another
    kind, newer than ``max_version`` or not a topkattn file.
    """
    path = os.fspath(path)
    members = _read_members(path, kind)
    doc = _parse_header(path, kind, members[HEADER_KEY]) if HEADER_KEY in members else None
    if doc is None or "kind" not in doc:
        found = legacy(path, members) if legacy is not None else None
        if found is None:
            raise StorageError(f"{kind} {path} is not a topkattn {kind} file (no container header)")
        return found
    version = doc.get("version")
    if doc["kind"] != kind:
        raise StorageError(f"{kind} {path} holds a topkattn {doc['kind']!r}, not a {kind}")
    if not isinstance(version, int) or isinstance(version, bool) or "meta" not in doc:
        raise StorageError(f"{kind} {path} is corrupted: its header lacks a version or meta")
    if version > max_version:
        raise StorageError(f"{kind} {path} has format version {version}; this topkattn reads "
                           f"versions <= {max_version}: upgrade topkattn")
    arrays = {n: a for n, a in members.items() if n != HEADER_KEY}
    verify_arrays(path, kind, arrays, doc.get("arrays"))
    return arrays, doc["meta"], version


def verify_arrays(path: str | os.PathLike, kind: str, arrays: Mapping[str, np.ndarray], listed: Any) -> None:
    """Check ``arrays`` (name -> ndarray) against a header's ``{name: {"dtype", "shape",
    "sha256"}}``; :class:`StorageError` naming ``path`` on any difference."""
    if not isinstance(listed, dict):
        raise StorageError(f"{kind} {path} is corrupted: its header has no array list")
    if set(listed) != set(arrays):
        raise StorageError(f"{kind} {path} is corrupted: arrays missing "
                           f"{sorted(set(listed) - set(arrays))}, unlisted {sorted(set(arrays) - set(listed))}")
    for name, a in arrays.items():
        info = listed[name]
        if (not isinstance(info, dict) or a.dtype.str != info.get("dtype")
                or list(a.shape) != info.get("shape") or array_digest(a) != info.get("sha256")):
            raise StorageError(f"{kind} {path} is corrupted: array {name!r} fails its checksum "
                               f"(dtype/shape/SHA-256)")


def _read_members(path, kind):
    """Every entry of the ``.npz`` at ``path`` (name -> ndarray), read without pickles."""
    try:
        with open(path, "rb") as f:
            try:
                z = np.load(f, allow_pickle=False)
                members = None  # a single .npy array
                if isinstance(z, np.lib.npyio.NpzFile):
                    with z:
                        members = {n: z[n] for n in z.files}  # reading a member checks its zip CRC
            except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, KeyError,
                    RuntimeError) as e:  # RuntimeError: zipfile on a flipped "encrypted" flag
                raise StorageError(f"{kind} {path} is truncated or corrupted "
                                   f"({type(e).__name__}: {e})") from e
    except FileNotFoundError:
        raise MissingFileError(f"{kind} {path} does not exist") from None
    except IsADirectoryError:
        raise StorageError(f"{kind} {path} is a folder, not a topkattn {kind} file") from None
    if members is None:
        raise StorageError(f"{kind} {path} is a single .npy array, not a topkattn {kind} file")
    return members


def _parse_header(path, kind, raw):
    try:
        doc = json.loads(raw.tobytes().decode("utf-8"))
    except ValueError as e:
        raise StorageError(f"{kind} {path} is corrupted: unreadable {HEADER_KEY} ({e})") from e
    if not isinstance(doc, dict):
        raise StorageError(f"{kind} {path} is corrupted: its {HEADER_KEY} is not a JSON object")
    return doc


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder):
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
