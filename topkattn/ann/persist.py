"""Persistence of a LorannIndex in the :mod:`topkattn.storage` container.

An index is a container of kind ``"LorannIndex"`` (uncompressed, pickle-free ``.npz``;
``__header__`` JSON with the index parameters as ``meta`` and every array's dtype, shape
and SHA-256), written atomically.  Loading raises :class:`topkattn.storage.StorageError`
(a ValueError) for a truncated, corrupted, foreign or newer file, FileNotFoundError
(:class:`topkattn.storage.MissingFileError`) for a missing one.  Checksums only prove the
file is the one written; :func:`check_index` then checks its meaning (a crafted file with
valid checksums must not reach the unchecked Numba kernels): parameters of the right types
and ranges, arrays of the right dtypes and shapes for them, finite floats, every point id
in exactly one slot, cluster sizes that sum to the points.

Version 1 (before the container) had a ``__header__`` with ``"format":
"topkattn.ann.LorannIndex"`` and a ``__checksum__`` entry, one SHA-256 over the header and
every array; it still loads.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from topkattn.ann import kernels, quant
from topkattn.ann.index import LorannIndex  # (index imports this module only inside save / load)
from topkattn.checks import check_choice, check_int, check_real
from topkattn.storage import HEADER_KEY, StorageError, load_container, save_container

KIND = "LorannIndex"
VERSION = 2  # 1: the pre-container layout, read by _load_legacy
LEGACY_FORMAT = "topkattn.ann.LorannIndex"
LEGACY_CHECKSUM_KEY = "__checksum__"
TEMP_PREFIX = ".lorann-"
PARAMS = ("n_clusters", "global_dim", "quantization_bits", "rank", "train_size", "distance",
          "balanced", "refit_growth", "approximate", "n", "dim")
BASE_ARRAYS = ("data", "cent", "P", "gram", "size", "fit_size", "slot_id", "assign")  # + optional "T"
DENSE_ARRAYS = ("adeq", "bdeq")
QUANTISED_ARRAYS = ("acodes", "ascale", "bcodes", "bscale")


def save_index(index: LorannIndex, path: str | os.PathLike) -> None:
    """Atomically write ``index`` to ``path``."""
    c = index.n_clusters
    order = np.concatenate([np.arange(index._start[i], index._start[i] + index._size[i])
                            for i in range(c)]).astype(np.int64) if c else np.zeros(0, np.int64)
    arrays = {
        "data": index.data,
        "cent": index._cent,
        "P": index._P,
        "gram": np.stack(index._gram).astype(np.float32),  # a list (splits append clusters)
        "size": index._size,
        "fit_size": index._fit_size,
        "slot_id": index._slot_id[order],
        "assign": index._assign[: len(index)],
    }
    if index._T is not None:
        arrays["T"] = index._T
    if index.quantization_bits is None:
        arrays["adeq"] = index._adeq
        arrays["bdeq"] = index._bdeq[order]
    else:
        arrays.update(acodes=index._acodes, ascale=index._ascale,
                      bcodes=index._bcodes[order], bscale=index._bscale[order])
    params = {
        "n_clusters": index.n_clusters, "global_dim": index.global_dim,
        "quantization_bits": index.quantization_bits, "rank": index.rank,
        "train_size": index.train_size, "distance": index.distance,
        "balanced": index.balanced, "refit_growth": index.refit_growth,
        "approximate": index._approximate, "n": len(index), "dim": index.dim,
        "max_cluster_size": index.max_cluster_size,  # optional (absent before it existed: None)
    }
    save_container(path, arrays, params, kind=KIND, version=VERSION, prefix=TEMP_PREFIX)


def load_index(cls: type[LorannIndex], path: str | os.PathLike) -> LorannIndex:
    """Read an index written by :func:`save_index` (or a version-1 one)."""
    files, p, _ = load_container(path, kind=KIND, max_version=VERSION, legacy=_load_legacy)
    lacking = sorted(set(PARAMS) - set(p)) if isinstance(p, dict) else list(PARAMS)
    if lacking:
        raise StorageError(f"{KIND} {path} is corrupted: its parameters lack {lacking}")
    check_index(path, p, files)
    self = cls.__new__(cls)
    self.n_clusters = p["n_clusters"]
    self.global_dim = p["global_dim"]
    self.quantization_bits = p["quantization_bits"]
    self.rank = p["rank"]
    self.train_size = p["train_size"]
    self.distance = p["distance"]
    self.balanced = p["balanced"]
    self.refit_growth = p["refit_growth"]
    self._approximate = p["approximate"]
    self._rng = np.random.default_rng(0)
    self._data = np.ascontiguousarray(files["data"], np.float32)
    self._n = p["n"]
    self._norms = np.einsum("nd,nd->n", self._data, self._data)
    self._T = files.get("T")
    self._cent = files["cent"]
    self._cnorm = np.einsum("cg,cg->c", self._cent, self._cent)
    self._P = files["P"]
    self._gram = list(files["gram"])
    self._cgen = np.zeros(self.n_clusters, np.int64)
    self.max_cluster_size = p.get("max_cluster_size")
    self.background = False
    self._size = files["size"].astype(np.int64)
    self._n_live = int(np.count_nonzero(self._size))
    self._fit_size = files["fit_size"].astype(np.int64)
    self._cap = self._size.copy()
    self._start = np.zeros(self.n_clusters, np.int64)
    self._start[1:] = np.cumsum(self._size)[:-1]
    self._used = int(self._size.sum())
    self._assign = files["assign"].astype(np.int64)
    self._slot_id = files["slot_id"].astype(np.int64)
    bits = self.quantization_bits
    if bits is None:
        self._acodes = self._bcodes = None
        self._ascale = np.zeros((self.n_clusters, self.rank), np.float32)
        self._bscale = np.zeros(self._used, np.float32)
        self._adeq = files["adeq"]
        self._bdeq = files["bdeq"]
    else:
        self._acodes, self._ascale = files["acodes"], files["ascale"]
        self._bcodes, self._bscale = files["bcodes"], files["bscale"]
        c, r, g = self.n_clusters, self.rank, self.global_dim
        self._adeq = np.ascontiguousarray(quant.dequantize_rows(
            self._acodes.reshape(c * r, -1), self._ascale.ravel(), bits, g
        ).reshape(c, r, g).transpose(0, 2, 1))
        self._bdeq = quant.dequantize_rows(self._bcodes, self._bscale, bits, r)
    self._adeq_t = np.ascontiguousarray(self._adeq.transpose(0, 2, 1))
    self._apair = None if bits != 8 else np.stack([kernels.a_pairs(a) for a in self._acodes])
    over = np.flatnonzero(self._size > self._fit_size * (1 + (self.refit_growth or np.inf)))
    self._overgrown = set(int(c) for c in over)
    self.built = True
    self._device = {}
    self._init_runtime()
    return self


def check_index(path: str | os.PathLike, p: Mapping[str, Any], files: Mapping[str, np.ndarray]) -> None:
    """StorageError naming ``path`` unless the parameters ``p`` and arrays ``files`` of an
    index fit together (see the module docstring)."""
    def bad(what):
        return StorageError(f"{KIND} {path} is inconsistent: {what}")

    try:  # parameters: the constructor's rules
        dim = check_int("dim", p["dim"], 1)
        n = check_int("n", p["n"], 1)
        nc = check_int("n_clusters", p["n_clusters"], 1, n)
        g = check_int("global_dim", p["global_dim"], 1, dim)
        r = check_int("rank", p["rank"], 1, min(g, dim - 1))
        check_int("train_size", p["train_size"], 1, nc)
        check_choice("distance", p["distance"], ("ip", "l2"))
        bits = p["quantization_bits"]
        if bits is not None and (check_int("quantization_bits", bits) not in (4, 8)):
            raise ValueError(f"quantization_bits must be None, 4 or 8, got {bits!r}")
        for name in ("balanced", "approximate"):
            if not isinstance(p[name], bool):
                raise TypeError(f"{name} must be a bool, got {p[name]!r}")
        if p["refit_growth"] is not None:
            check_real("refit_growth", p["refit_growth"], 0.0, lo_open=True)
        check_int("max_cluster_size", p.get("max_cluster_size"), 2, optional=True)
    except (TypeError, ValueError) as e:
        raise bad(f"parameter {e}") from None
    missing = sorted(set(BASE_ARRAYS + (DENSE_ARRAYS if bits is None else QUANTISED_ARRAYS))
                     - set(files))
    if missing:
        raise StorageError(f"{KIND} {path} is corrupted: arrays {missing} are missing")
    code = {None: None, 8: (np.int8, r), 4: (np.uint8, (r + 1) // 2)}[bits]
    acode = None if bits is None else (code[0], g if bits == 8 else (g + 1) // 2)
    want = {  # name: (dtype ("int": any integer), shape)
        "data": (np.float32, (n, dim)), "cent": (np.float32, (nc, g)),
        "P": (np.float32, (nc, r, g)), "gram": (np.float32, (nc, g, g)),
        "size": ("int", (nc,)), "fit_size": ("int", (nc,)), "slot_id": ("int", (n,)),
        "assign": ("int", (n,)),
    }
    if g < dim:
        want["T"] = (np.float32, (dim, g))
    elif "T" in files:
        raise bad(f"array 'T' is present but global_dim={g} equals dim={dim}")
    if bits is None:
        want.update(adeq=(np.float32, (nc, g, r)), bdeq=(np.float32, (n, r)))
    else:
        want.update(acodes=(acode[0], (nc, r, acode[1])), ascale=(np.float32, (nc, r)),
                    bcodes=(code[0], (n, code[1])), bscale=(np.float32, (n,)))
    if sorted(set(want) - set(files)):
        raise bad(f"arrays {sorted(set(want) - set(files))} are missing")
    for name, (dtype, shape) in want.items():
        a = files[name]
        ok = a.dtype.kind in "iu" if dtype == "int" else a.dtype == dtype
        if not ok or a.shape != shape:
            kind = "an integer dtype" if dtype == "int" else np.dtype(dtype).name
            raise bad(f"array {name!r} has dtype {a.dtype} and shape {a.shape}; the parameters "
                      f"need {kind} and shape {shape}")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise bad(f"array {name!r} has non-finite values")
    size, fit_size = files["size"], files["fit_size"]
    if (size < 0).any() or (fit_size < 0).any() or (fit_size > size).any():
        raise bad("cluster sizes must satisfy 0 <= fit_size <= size")
    if int(size.sum(dtype=np.int64)) != n:
        raise bad(f"the cluster sizes sum to {int(size.sum(dtype=np.int64))}, not n={n}")
    slot_id, assign = files["slot_id"], files["assign"]
    if ((slot_id < 0) | (slot_id >= n)).any():
        raise bad(f"slot_id holds ids outside [0, {n})")
    if (np.bincount(slot_id.astype(np.int64), minlength=n) != 1).any():
        raise bad("slot_id does not hold every point id exactly once")
    cluster_of_slot = np.repeat(np.arange(nc), size.astype(np.int64))
    if (assign[slot_id] != cluster_of_slot).any():
        raise bad("assign disagrees with the cluster each point is stored in")


def _load_legacy(path, members):
    """A version-1 index: ``(arrays, params, 1)``, or None if ``members`` is not one."""
    if HEADER_KEY not in members or LEGACY_CHECKSUM_KEY not in members:
        return None
    arrays = {n: a for n, a in members.items() if n not in (HEADER_KEY, LEGACY_CHECKSUM_KEY)}
    header_bytes = members[HEADER_KEY].tobytes()
    header = json.loads(header_bytes)  # load_container has parsed it: a JSON object
    if header.get("format") != LEGACY_FORMAT:
        return None
    if header.get("version") != 1:
        raise StorageError(f"{KIND} {path} is a {LEGACY_FORMAT} file of version "
                           f"{header.get('version')!r}; only version 1 used that layout")
    stored = members[LEGACY_CHECKSUM_KEY].tobytes().decode("ascii", "replace")
    if _legacy_digest(header_bytes, arrays) != stored or "params" not in header:
        raise StorageError(f"{KIND} {path} is corrupted: checksum mismatch")
    return arrays, header["params"], 1


def _legacy_digest(header_bytes, arrays):
    """Version 1's SHA-256 over the header bytes and every array's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    h.update(header_bytes)
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode())
        h.update(a.dtype.str.encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()
