"""Checkpoints: exact round trip, atomic replace, clear errors for corrupt/truncated files and config
mismatch, version-1 (pre-container) files still loading."""
import hashlib
import json
import os
import re

import numpy as np
import pytest

from topkattn.storage import StorageError
from topkattn.training import checkpoint as ck
from topkattn.training.optim import AdamW


def _arrays():
    rng = np.random.default_rng(0)
    return {"param/w": rng.standard_normal((3, 4)).astype(np.float32),
            "param/b": rng.standard_normal(5),
            "history/loss": np.arange(4.0), "idx": np.arange(6, dtype=np.int64)}


def _assert_same_arrays(arrays, ref):
    assert set(arrays) == set(ref)
    for k in ref:
        assert arrays[k].dtype == ref[k].dtype
        np.testing.assert_array_equal(arrays[k], ref[k])


def test_roundtrip_exact(tmp_path):
    path = tmp_path / "c.npz"
    meta = {"step": 3, "config": {"k": 8, "task": "mqar"}, "rng": {"seed": 1}}
    ck.save_checkpoint(path, _arrays(), meta)
    arrays, got = ck.load_checkpoint(path)
    assert got == meta
    _assert_same_arrays(arrays, _arrays())
    with np.load(path, allow_pickle=False) as z:        # a plain npz, readable without topkattn
        np.testing.assert_array_equal(z["param/w"], _arrays()["param/w"])


def test_atomic_replace_leaves_no_temp_and_survives_failure(tmp_path, monkeypatch):
    path = tmp_path / "c.npz"
    ck.save_checkpoint(path, {"a": np.zeros(3)}, {"step": 1})
    ck.save_checkpoint(path, {"a": np.ones(3)}, {"step": 2})
    assert os.listdir(tmp_path) == ["c.npz"]
    np.testing.assert_array_equal(ck.load_checkpoint(path)[0]["a"], np.ones(3))

    def boom(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", boom)  # as called by topkattn.storage.atomic_write
    with pytest.raises(OSError, match="disk full"):
        ck.save_checkpoint(path, {"a": np.full(3, 7.0)}, {"step": 3})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["c.npz"]               # temp file removed
    arrays, meta = ck.load_checkpoint(path)                 # old checkpoint intact
    assert meta == {"step": 2}
    np.testing.assert_array_equal(arrays["a"], np.ones(3))


@pytest.mark.parametrize("keep", [0.0, 0.3, 0.9, 0.999])
def test_truncated_is_an_error(tmp_path, keep):
    path = tmp_path / "c.npz"
    ck.save_checkpoint(path, _arrays(), {"step": 1})
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(ck.CheckpointError, match="truncated or corrupted"):
        ck.load_checkpoint(path)


def test_flipped_byte_is_an_error(tmp_path):
    path = tmp_path / "c.npz"
    arrays = {"w": np.zeros(1000)}
    ck.save_checkpoint(path, arrays, {"step": 1})
    data = bytearray(path.read_bytes())
    pos = data.find(np.zeros(1000).tobytes()[:64])          # inside the array payload
    assert pos > 0
    data[pos + 100] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(ck.CheckpointError, match="corrupted"):
        ck.load_checkpoint(path)


def test_rewritten_member_fails_checksum(tmp_path):
    path = tmp_path / "c.npz"
    ck.save_checkpoint(path, {"w": np.zeros(4), "v": np.ones(2)}, {"step": 1})
    with np.load(path, allow_pickle=False) as z:
        members = {n: z[n] for n in z.files}
    members["w"] = np.array([0.0, 0.0, 1.0, 0.0])          # a valid zip, wrong content
    np.savez(path, **members)
    with pytest.raises(ck.CheckpointError, match="array 'w' fails its checksum"):
        ck.load_checkpoint(path)


def test_not_a_checkpoint_and_missing(tmp_path):
    with pytest.raises(ck.CheckpointError, match="does not exist"):
        ck.load_checkpoint(tmp_path / "nope.npz")
    plain = tmp_path / "plain.npz"
    np.savez(plain, a=np.zeros(2))
    with pytest.raises(ck.CheckpointError, match="not a topkattn checkpoint"):
        ck.load_checkpoint(plain)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"hello world" * 10)
    with pytest.raises(ck.CheckpointError, match="truncated or corrupted"):
        ck.load_checkpoint(junk)


def test_object_arrays_refused(tmp_path):
    with pytest.raises(TypeError, match="must be numeric"):
        ck.save_checkpoint(tmp_path / "c.npz", {"o": np.array([{"a": 1}], dtype=object)}, {})


def test_config_mismatch_names_fields():
    saved = {"k": 8, "task": "mqar", "d_model": 64, "lr": 1e-3}
    ck.check_config(saved, dict(saved))
    with pytest.raises(ck.ConfigMismatchError) as e:
        ck.check_config(saved, {"k": 4, "task": "mqar", "d_model": 128, "lr": 1e-3, "new": 1},
                        path="run/checkpoint.npz")
    assert e.value.fields == ["d_model", "k", "new"]
    msg = str(e.value)
    assert "k (checkpoint 8, now 4)" in msg and "d_model (checkpoint 64, now 128)" in msg
    assert "new (checkpoint '<absent>', now 1)" in msg and "run/checkpoint.npz" in msg


def test_training_state_roundtrip(tmp_path):
    rng = np.random.default_rng(4)
    params = {"a.W": rng.standard_normal((3, 2)).astype(np.float32), "a.g": np.ones(2, np.float32)}
    opt = AdamW(lr=0.01, weight_decay=0.1)
    for _ in range(3):
        opt.step(params, {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()})
    path = tmp_path / "s.npz"
    ck.save_training_state(path, params=params, optimizer=opt, step=3, config={"k": 8},
                           rng={"seed": 5, "scheme": "x"}, history={"loss": np.array([3.0, 2.0, 1.0])})
    st = ck.load_training_state(path)
    assert st["step"] == 3 and st["config"] == {"k": 8} and st["rng"] == {"seed": 5, "scheme": "x"}
    np.testing.assert_array_equal(st["history"]["loss"], [3.0, 2.0, 1.0])
    for k in params:
        np.testing.assert_array_equal(st["params"][k], params[k])
    opt2 = AdamW()
    opt2.load_state_dict(st["optimizer"])
    assert opt2.t == 3 and opt2.lr == 0.01 and opt2.weight_decay == 0.1
    for k in params:
        np.testing.assert_array_equal(opt2.m[k], opt.m[k])
        np.testing.assert_array_equal(opt2.v[k], opt.v[k])
    meta_only = tmp_path / "m.npz"
    ck.save_checkpoint(meta_only, {"a": np.zeros(1)}, {"step": 1})
    with pytest.raises(ck.CheckpointError, match="not a training checkpoint"):
        ck.load_training_state(meta_only)


def _legacy_digest(a):
    """Version 1's per-array SHA-256 (dtype string, shape repr, C-order bytes)."""
    h = hashlib.sha256()
    h.update(a.dtype.str.encode())
    h.update(repr(tuple(a.shape)).encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _write_legacy(path, arrays, meta, version=1):
    """A checkpoint in the version-1 layout (``__meta__`` entry), written by hand."""
    doc = {"format": "topkattn-checkpoint", "version": version, "meta": meta,
           "arrays": {n: {"dtype": a.dtype.str, "shape": list(a.shape), "sha256": _legacy_digest(a)}
                      for n, a in arrays.items()}}
    np.savez(path, __meta__=np.frombuffer(json.dumps(doc, sort_keys=True).encode(), np.uint8), **arrays)


def test_version1_checkpoint_still_loads(tmp_path):
    path = tmp_path / "old.npz"
    meta = {"step": 3, "config": {"k": 8}, "rng": {"seed": 1}}
    _write_legacy(path, _arrays(), meta)
    arrays, got = ck.load_checkpoint(path)
    assert got == meta
    _assert_same_arrays(arrays, _arrays())
    ck.save_checkpoint(path, arrays, got)                   # rewritten in the container
    with np.load(path, allow_pickle=False) as z:
        assert "__meta__" not in z.files and "__header__" in z.files
    assert ck.load_checkpoint(path)[1] == meta


def test_version1_checkpoint_errors(tmp_path):
    tampered = tmp_path / "tampered.npz"
    arrays = {"w": np.zeros(4)}
    _write_legacy(tampered, arrays, {"step": 1})
    with np.load(tampered, allow_pickle=False) as z:
        members = {n: z[n] for n in z.files}
    members["w"] = np.ones(4)
    np.savez(tampered, **members)
    with pytest.raises(ck.CheckpointError, match=re.escape(str(tampered)) + ".*array 'w' fails its checksum"):
        ck.load_checkpoint(tampered)
    odd = tmp_path / "odd.npz"
    _write_legacy(odd, arrays, {"step": 1}, version=7)
    with pytest.raises(ck.CheckpointError, match="version 7; only version 1 used that layout") as e:
        ck.load_checkpoint(odd)
    assert "\n" not in str(e.value)


def test_checkpoint_error_is_the_storage_error(tmp_path):
    assert ck.CheckpointError is StorageError and issubclass(ck.CheckpointError, ValueError)
    path = tmp_path / "ix.npz"
    np.savez(path, __header__=np.frombuffer(json.dumps(
        {"kind": "LorannIndex", "version": 2, "meta": {}, "arrays": {}}).encode(), np.uint8))
    with pytest.raises(ck.CheckpointError, match="holds a topkattn 'LorannIndex', not a checkpoint"):
        ck.load_checkpoint(path)
