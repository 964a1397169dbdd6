"""Persistence of a LorannIndex in the :mod:`topkattn.storage` container.

An index is a container of kind ``"LorannIndex"`` (uncompressed, pickle-free ``.npz``;
``__header__`` JSON with the index parameters as ``meta`` and every array's dtype, shape
and SHA-256), written atomically.  Loading raises :class:`topkattn.storage.StorageError`
(a ValueError) for a truncated, corrupted, foreign or newer file, FileNotFoundError
(:class:`topkattn.storage.MissingFileError`) for a missing one.

Version 1 (before the container) had a ``__header__`` with ``"format":
"topkattn.ann.LorannIndex"`` and a ``__checksum__`` entry, one SHA-256 over the header and
every array; it still loads.
"""
import hashlib
import json

import numpy as np

from topkattn.ann import quant
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


def save_index(index, path):
    """Atomically write ``index`` to ``path``."""
    c = index.n_clusters
    order = np.concatenate([np.arange(index._start[i], index._start[i] + index._size[i])
                            for i in range(c)]).astype(np.int64) if c else np.zeros(0, np.int64)
    arrays = {
        "data": index.data,
        "cent": index._cent,
        "P": index._P,
        "gram": index._gram,
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
    }
    save_container(path, arrays, params, kind=KIND, version=VERSION, prefix=TEMP_PREFIX)


def load_index(cls, path):
    """Read an index written by :func:`save_index` (or a version-1 one)."""
    files, p, _ = load_container(path, kind=KIND, max_version=VERSION, legacy=_load_legacy)
    lacking = sorted(set(PARAMS) - set(p)) if isinstance(p, dict) else list(PARAMS)
    if lacking:
        raise StorageError(f"{KIND} {path} is corrupted: its parameters lack {lacking}")
    missing = sorted(set(BASE_ARRAYS + (DENSE_ARRAYS if p["quantization_bits"] is None
                                        else QUANTISED_ARRAYS)) - set(files))
    if missing:
        raise StorageError(f"{KIND} {path} is corrupted: arrays {missing} are missing")
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
    self._gram = files["gram"]
    self._size = files["size"].astype(np.int64)
    self._fit_size = files["fit_size"].astype(np.int64)
    self._cap = self._size.copy()
    self._start = np.zeros(self.n_clusters, np.int64)
    self._start[1:] = np.cumsum(self._size)[:-1]
    self._used = int(self._size.sum())
    self._assign = files["assign"]
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
    over = np.flatnonzero(self._size > self._fit_size * (1 + (self.refit_growth or np.inf)))
    self._overgrown = set(int(c) for c in over)
    self.built = True
    self._device = {}
    self._init_mirror()
    return self


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
