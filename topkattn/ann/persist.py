"""Persistence of a LorannIndex: a versioned, pickle-free .npz with a JSON header and a SHA-256.

Layout (an uncompressed NumPy .npz, read with ``allow_pickle=False``):
``__header__`` (uint8 JSON: format, version, parameters, array manifest),
``__checksum__`` (uint8 hex SHA-256 over the header and every array's name,
dtype, shape and bytes), and the arrays.  Saving writes a temporary file in the
target's directory, fsyncs it and renames it over the target (atomic on POSIX).
Loading raises ValueError for a truncated, corrupted, foreign or newer file.
"""
import hashlib
import json
import os
import zipfile

import numpy as np

from topkattn.ann import quant
from topkattn.storage import atomic_savez

FORMAT = "topkattn.ann.LorannIndex"
VERSION = 1


def _digest(header_bytes, arrays):
    h = hashlib.sha256()
    h.update(header_bytes)
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode())
        h.update(str(a.dtype.str).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_index(index, path):
    """Atomically write ``index`` to ``path``."""
    path = os.fspath(path)
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
    header = {
        "format": FORMAT,
        "version": VERSION,
        "params": {
            "n_clusters": index.n_clusters, "global_dim": index.global_dim,
            "quantization_bits": index.quantization_bits, "rank": index.rank,
            "train_size": index.train_size, "distance": index.distance,
            "balanced": index.balanced, "refit_growth": index.refit_growth,
            "approximate": index._approximate, "n": len(index), "dim": index.dim,
        },
        "arrays": {k: [np.asarray(v).dtype.str, list(np.shape(v))] for k, v in arrays.items()},
    }
    hb = json.dumps(header, sort_keys=True).encode()
    checksum = _digest(hb, arrays).encode()
    payload = dict(arrays)
    payload["__header__"] = np.frombuffer(hb, np.uint8)
    payload["__checksum__"] = np.frombuffer(checksum, np.uint8)
    atomic_savez(path, payload, prefix=".lorann-")


def load_index(cls, path):
    """Read an index written by :func:`save_index`."""
    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            files = {name: z[name] for name in z.files}
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, KeyError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path!r} is truncated, corrupted or not a LorannIndex file: {e}") from e
    if "__header__" not in files or "__checksum__" not in files:
        raise ValueError(f"{path!r} is not a LorannIndex file (no header)")
    hb = files.pop("__header__").tobytes()
    stored = files.pop("__checksum__").tobytes().decode("ascii", "replace")
    try:
        header = json.loads(hb)
    except ValueError as e:
        raise ValueError(f"{path!r} has a corrupted header") from e
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a LorannIndex file (format {header.get('format')!r})"
                         if isinstance(header, dict) else f"{path!r} has a corrupted header")
    version = header.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise ValueError(f"{path!r} has format version {version!r}; this topkattn reads "
                         f"versions <= {VERSION}: upgrade topkattn")
    if _digest(hb, files) != stored:
        raise ValueError(f"{path!r} is corrupted: checksum mismatch")
    for name, (dtype, shape) in header["arrays"].items():
        a = files.get(name)
        if a is None or a.dtype.str != dtype or list(a.shape) != shape:
            raise ValueError(f"{path!r} is corrupted: array {name!r} does not match the header")
    p = header["params"]
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
