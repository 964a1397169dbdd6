"""topkattn.storage: the atomic writer (npz and JSON), the checksummed container and its one
error class, and version-1 (pre-container) LorannIndex files still loading."""
import hashlib
import json
import os
import re

import numpy as np
import pytest

from topkattn.ann import LorannIndex
from topkattn.storage import (
    MissingFileError,
    StorageError,
    atomic_write,
    atomic_write_json,
    load_container,
    save_container,
)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_json_writer_format_and_mode(tmp_path):
    path = tmp_path / "m.json"
    obj = {"b": [1.5, 2], "a": {"z": None, "y": "x"}}
    atomic_write_json(path, obj, prefix=".t-")
    assert path.read_text() == json.dumps(obj, indent=1, sort_keys=True) + "\n"
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~_umask()
    assert os.listdir(tmp_path) == ["m.json"]


def test_failed_writes_keep_the_old_file_and_leave_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "m.json"
    atomic_write_json(path, {"step": 1}, prefix=".t-")
    before = path.read_bytes()
    with pytest.raises(TypeError):
        atomic_write_json(path, {"step": object()}, prefix=".t-")   # not serialisable

    def partial(f):
        f.write(b'{"step": 2')
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, partial, prefix=".t-")

    def boom(src, dst):
        raise OSError("rename failed")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="rename failed"):
        atomic_write_json(path, {"step": 3}, prefix=".t-")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["m.json"]
    assert path.read_bytes() == before


def _arrays():
    rng = np.random.default_rng(1)
    return {"x": rng.standard_normal((4, 3)).astype(np.float32),   # (4, 3)
            "scalar": np.array(2.5),                                  # ()
            "mask": np.array([True, False]),                          # (2,)
            "z": np.array([1 + 2j], np.complex64),                    # (1,)
            "ids": np.arange(5, dtype=np.int64).reshape(5, 1)[::-1]}  # (5, 1), not contiguous


def test_container_roundtrip(tmp_path):
    path = tmp_path / "c.npz"
    meta = {"n": 3, "name": "t", "nested": [1, {"a": None}]}
    save_container(path, _arrays(), meta, kind="thing", version=3, prefix=".t-")
    arrays, got, version = load_container(path, kind="thing", max_version=3)
    assert got == meta and version == 3
    ref = _arrays()
    assert set(arrays) == set(ref)
    for k, a in ref.items():
        assert arrays[k].dtype == a.dtype and arrays[k].shape == a.shape
        np.testing.assert_array_equal(arrays[k], a)
    assert os.listdir(tmp_path) == ["c.npz"]


def test_container_refuses_non_numeric_and_reserved(tmp_path):
    with pytest.raises(TypeError, match="must be numeric"):
        save_container(tmp_path / "c.npz", {"s": np.array(["a"])}, {}, kind="t", version=1, prefix=".t-")
    with pytest.raises(ValueError, match="reserved"):
        save_container(tmp_path / "c.npz", {"__header__": np.zeros(1)}, {}, kind="t", version=1, prefix=".t-")
    assert os.listdir(tmp_path) == []


def _members(path):
    with np.load(path, allow_pickle=False) as z:
        return {n: z[n] for n in z.files}


def _raises(path, pattern, **kw):
    """load_container fails with a one-line StorageError naming ``path`` and matching ``pattern``."""
    with pytest.raises(StorageError, match=re.escape(str(path)) + ".*" + pattern) as e:
        load_container(path, kind=kw.pop("kind", "thing"), max_version=kw.pop("max_version", 1), **kw)
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)


def test_corrupted_container_is_one_error_naming_the_file(tmp_path):
    path = tmp_path / "c.npz"
    save_container(path, _arrays(), {"n": 1}, kind="thing", version=1, prefix=".t-")
    raw = path.read_bytes()
    members = _members(path)

    changed = tmp_path / "changed.npz"
    np.savez(changed, **{**members, "x": members["x"] + 1})      # valid zip, wrong content
    _raises(changed, "array 'x' fails its checksum")
    dropped = tmp_path / "dropped.npz"
    np.savez(dropped, **{n: a for n, a in members.items() if n != "mask"})
    _raises(dropped, r"arrays missing \['mask'\]")
    for keep in (0, len(raw) // 2, len(raw) - 1):
        cut = tmp_path / f"cut{keep}.npz"
        cut.write_bytes(raw[:keep])
        _raises(cut, "truncated or corrupted")
    flipped = tmp_path / "flipped.npz"
    data = bytearray(raw)
    pos = data.find(members["x"].tobytes())
    data[pos + 5] ^= 0x10
    flipped.write_bytes(bytes(data))
    _raises(flipped, "corrupted")
    garbled = tmp_path / "garbled.npz"
    np.savez(garbled, **{**members, "__header__": np.frombuffer(b"{not json", np.uint8)})
    _raises(garbled, "unreadable __header__")

    _raises(path, "holds a topkattn 'thing', not a other", kind="other")
    _raises(path, "format version 1; this topkattn reads versions <= 0: upgrade topkattn", max_version=0)
    plain = tmp_path / "plain.npz"
    np.savez(plain, a=np.zeros(2))
    _raises(plain, "not a topkattn thing file")
    _raises(plain, "not a topkattn thing file", legacy=lambda p, m: None)
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(2))
    _raises(single, "single .npy array")
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, o=np.array([{"a": 1}], dtype=object))
    _raises(pickled, "truncated or corrupted")                   # never unpickled
    _raises(tmp_path, "is a folder, not a topkattn thing file")

    with pytest.raises(MissingFileError, match="does not exist") as e:
        load_container(tmp_path / "missing.npz", kind="thing", max_version=1)
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, StorageError)


def _legacy_index_digest(header_bytes, arrays):
    h = hashlib.sha256()
    h.update(header_bytes)
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode())
        h.update(str(a.dtype.str).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _write_legacy_index(path, arrays, params):
    """A LorannIndex in the version-1 layout (``__header__`` + ``__checksum__``), written by hand."""
    header = {"format": "topkattn.ann.LorannIndex", "version": 1, "params": params,
              "arrays": {k: [v.dtype.str, list(v.shape)] for k, v in arrays.items()}}
    hb = json.dumps(header, sort_keys=True).encode()
    np.savez(path, __header__=np.frombuffer(hb, np.uint8),
             __checksum__=np.frombuffer(_legacy_index_digest(hb, arrays).encode(), np.uint8), **arrays)


@pytest.mark.parametrize("bits", [8, None])
def test_version1_index_still_loads(tmp_path, bits):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 16)).astype(np.float32)   # (n, dim)
    q = rng.standard_normal((20, 16)).astype(np.float32)    # (queries, dim)
    ix = LorannIndex(x, 4, 8, bits, 4, 2, "l2")
    ix.build()
    ix.add(x[:3] + 0.5)
    new = tmp_path / "new.npz"
    ix.save(new)
    arrays, params, version = load_container(new, kind="LorannIndex", max_version=2)
    assert version == 2
    old = tmp_path / "old.npz"
    _write_legacy_index(old, arrays, params)
    back = LorannIndex.load(old)
    assert len(back) == len(ix) and back.quantization_bits == bits
    for rr in (0, 30):
        a = ix.search(q, 10, 3, rr, return_distances=True)
        b = back.search(q, 10, 3, rr, return_distances=True)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])

    tampered = tmp_path / "tampered.npz"
    members = _members(old)
    members["cent"] = members["cent"] + 1e-3
    np.savez(tampered, **members)
    with pytest.raises(StorageError, match=re.escape(str(tampered)) + ".*checksum mismatch"):
        LorannIndex.load(tampered)


def test_corrupted_index_names_the_file(tmp_path):
    rng = np.random.default_rng(2)
    ix = LorannIndex(rng.standard_normal((300, 8)).astype(np.float32), 2, None, 8, 2, 1, "ip")
    ix.build()
    path = tmp_path / "ix.npz"
    ix.save(path)
    members = _members(path)
    header = json.loads(members["__header__"].tobytes())
    del header["meta"]["rank"]                               # checksums intact, parameters not
    np.savez(path, **{**members, "__header__": np.frombuffer(json.dumps(header).encode(), np.uint8)})
    with pytest.raises(StorageError, match=re.escape(str(path)) + r".*parameters lack \['rank'\]"):
        LorannIndex.load(path)
    np.savez(path, **{n: a for n, a in members.items() if n != "bcodes"})
    with pytest.raises(StorageError, match="array"):
        LorannIndex.load(path)
