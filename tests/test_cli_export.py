"""`topkattn export` and Transformer.to_safetensors/from_safetensors: the exported model gives the
same logits, the config travels in the metadata, writes are atomic and refuse to overwrite,
bad files raise StorageError, and a missing safetensors names the extra."""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from topkattn import storage
from topkattn.cli.main import main
from topkattn.model import Transformer, TransformerConfig
from topkattn.storage import MissingFileError, StorageError
from topkattn.training.runs import load_run

safetensors = pytest.importorskip("safetensors")
from safetensors import safe_open  # noqa: E402  (after the skip)
from safetensors.numpy import save_file  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    r = CliRunner().invoke(main, ["train-toy", "--layers", "2", "--d-model", "16", "--heads", "2", "--steps", "4",
                                  "--seq-len", "16", "--num-kv-pairs", "2", "--vocab-size", "16", "--batch-size",
                                  "4", "--k", "3", "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    return str(out)


def _export(*args):
    return CliRunner().invoke(main, ["export", *args])


def _tokens(vocab, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=(3, 16))


def test_exported_model_gives_identical_logits(run, tmp_path):
    path = tmp_path / "model.safetensors"
    r = _export(run, str(path), "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    cfg, model = load_run(run)
    assert info["tensors"] == len(model.params) and info["parameters"] == model.n_params()
    assert info["bytes"] == os.path.getsize(path) and info["dtype"] == "float32"
    back = Transformer.from_safetensors(path)
    assert back.cfg == model.cfg
    x = _tokens(model.cfg.vocab_size)
    assert np.array_equal(back.eval().forward(x), model.eval().forward(x))  # bit for bit
    for name, p in model.params.items():
        assert np.array_equal(back.params[name], p) and back.params[name].dtype == p.dtype
    with safe_open(str(path), framework="numpy") as f:  # what another framework sees
        meta = f.metadata()
        assert set(f.keys()) == set(model.params)
    as_json = lambda d: json.loads(json.dumps(d))  # noqa: E731  (tuples such as dense_layers become lists)
    assert json.loads(meta["topkattn.config"]) == as_json(model.cfg.to_dict())
    assert json.loads(meta["topkattn.train_config"]) == as_json(cfg.to_dict())
    assert [n for n in os.listdir(tmp_path) if n.endswith(".tmp")] == []


@pytest.mark.parametrize("name", ["checkpoint.npz", "metrics.json", "history.json"])
def test_never_writes_over_the_runs_own_files_even_forced(run, tmp_path, name):
    before = (Path(run) / name).read_bytes()
    link = tmp_path / "link.safetensors"
    link.symlink_to(Path(run) / name)  # the same file by another name
    for out in (os.path.join(run, name), os.path.join(run, ".", name), str(link)):
        r = _export(run, out, "--force")
        assert r.exit_code == 2 and r.output.count("\n") == 1 and "is a file of the run" in r.output, r.output
    assert (Path(run) / name).read_bytes() == before


def test_refuses_to_overwrite_unless_forced_and_float16(run, tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"keep me")
    r = _export(run, str(path))
    assert r.exit_code == 2 and "--force" in r.output and r.output.count("\n") == 1
    assert path.read_bytes() == b"keep me"
    r = _export(run, str(path), "--force", "--dtype", "float16")
    assert r.exit_code == 0, r.output
    _, model = load_run(run)
    with safe_open(str(path), framework="numpy") as f:
        assert all(f.get_tensor(n).dtype == np.float16 for n in f.keys())
    back = Transformer.from_safetensors(path)  # widened to the config's float32
    for name, p in model.params.items():
        assert np.array_equal(back.params[name], p.astype(np.float16).astype(np.float32))
    x = _tokens(model.cfg.vocab_size, 1)
    np.testing.assert_allclose(back.forward(x), model.forward(x), atol=0.05)


def test_cli_errors(run, tmp_path, monkeypatch):
    r = _export(str(tmp_path / "nope"), str(tmp_path / "m.safetensors"))
    assert r.exit_code == 2 and "no checkpoint" in r.output and r.output.count("\n") == 1
    r = _export(run, str(tmp_path))  # a folder as OUT
    assert r.exit_code == 2 and r.output.count("\n") == 1
    r = _export(run, str(tmp_path / "m.safetensors"), "--dtype", "int8")
    assert r.exit_code == 2 and "--dtype" in r.output
    monkeypatch.setitem(sys.modules, "safetensors", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    r = _export(run, str(tmp_path / "m.safetensors"))
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "pip install 'topkattn[export]'" in r.output
    assert not (tmp_path / "m.safetensors").exists()
    h = _export("-h")
    assert h.exit_code == 0 and "--force" in h.output


def _small():
    return Transformer(TransformerConfig(vocab_size=8, d_model=8, n_layers=1, n_heads=2, q_lora_rank=4,
                                         kv_lora_rank=4, qk_nope_dim=2, qk_rope_dim=2, v_head_dim=2, d_ff=8,
                                         tie_embeddings=False, seed=5))


def test_from_safetensors_refuses_bad_files(tmp_path):
    model = _small()
    good = tmp_path / "good.safetensors"
    model.to_safetensors(good)
    with pytest.raises(MissingFileError):
        Transformer.from_safetensors(tmp_path / "missing.safetensors")
    with pytest.raises(StorageError, match=f"model {tmp_path} is a folder, not a safetensors file"):
        Transformer.from_safetensors(tmp_path)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(StorageError, match="not a readable safetensors file"):
        Transformer.from_safetensors(cut)
    tensors = {n: np.asarray(p) for n, p in model.params.items()}
    bare = tmp_path / "bare.safetensors"
    save_file(tensors, str(bare))
    with pytest.raises(StorageError, match="no 'topkattn.config' metadata"):
        Transformer.from_safetensors(bare)
    meta = {"topkattn.config": json.dumps(model.cfg.to_dict())}
    wrong = dict(tensors, **{"head.weight": np.zeros((3, 3), np.float32)})
    save_file(wrong, str(tmp_path / "shape.safetensors"), metadata=meta)
    with pytest.raises(StorageError, match="head.weight"):
        Transformer.from_safetensors(tmp_path / "shape.safetensors")
    save_file({n: t for n, t in tensors.items() if n != "norm.weight"}, str(tmp_path / "few.safetensors"),
              metadata=meta)
    with pytest.raises(StorageError, match="norm.weight"):
        Transformer.from_safetensors(tmp_path / "few.safetensors")
    bad_cfg = {"topkattn.config": json.dumps({**model.cfg.to_dict(), "d_model": -1})}
    save_file(tensors, str(tmp_path / "cfg.safetensors"), metadata=bad_cfg)
    with pytest.raises(StorageError, match="unusable"):
        Transformer.from_safetensors(tmp_path / "cfg.safetensors")
    with pytest.raises(TypeError, match="dtype"):
        model.to_safetensors(tmp_path / "x.safetensors", dtype="int32")
    with pytest.raises(ValueError, match="reserved"):
        model.to_safetensors(tmp_path / "x.safetensors", metadata={"topkattn.config": "{}"})


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    model = _small()
    path = tmp_path / "m.safetensors"
    model.to_safetensors(path)
    before = path.read_bytes()

    def broken(src, dst):  # the rename of the finished temporary file fails
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage.os, "replace", broken)
    with pytest.raises(OSError, match="No space"):
        _small().to_safetensors(path, dtype="float64")
    monkeypatch.undo()
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["m.safetensors"]  # temporary file removed
