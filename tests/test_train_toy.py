"""train-toy: the CLI through CliRunner, the loop against a hand-written step, exact resume
(in-process and after SIGKILL), checkpoint errors, one-line usage errors."""
import dataclasses
import errno
import importlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

from topkattn.cli.main import main
from topkattn.layers.loss import softmax_cross_entropy
from topkattn.layers.module import flatten_parameters
from topkattn.model import Transformer
from topkattn.training.checkpoint import TEMP_PREFIX, CheckpointError, ConfigMismatchError, load_training_state
from topkattn.training.optim import AdamW, clip_grad_norm, warmup_cosine_lr
from topkattn.training.tasks import IGNORE
from topkattn.training.train import (
    FORGET_STREAM,
    OutDirError,
    RunExistsError,
    RunTooLargeError,
    SaveError,
    TrainConfig,
    check_memory,
    heldout_set,
    make_task,
    model_config,
    n_model_params,
    step_memory_estimate,
    step_seed,
    train,
    train_batch,
)

TINY = ["--d-model", "16", "--heads", "2", "--seq-len", "12", "--num-kv-pairs", "3",
        "--vocab-size", "16", "--batch-size", "4", "--quiet"]


def tiny_cfg(**kw):
    base = dict(d_model=16, heads=2, seq_len=12, num_kv_pairs=3, vocab_size=16, batch_size=4,
                steps=6, warmup_steps=2, eval_size=32, k=4)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("batch_size,forget_rate", [(4, 0.0), (5, 0.25)])
def test_halves_equal_the_whole_batch(batch_size, forget_rate):
    """A step in two halves (the model and its replica, gradients summed by scored targets) gives
    the whole batch's loss and gradients in float64, with an odd batch and forgetful masking."""
    from topkattn.training.train import _step_in_halves, model_replica

    cfg = tiny_cfg(batch_size=batch_size, forget_rate=forget_rate)
    task = make_task(cfg)
    model = Transformer(dataclasses.replace(model_config(cfg, task.vocab_size), dtype="float64"))
    x, y = train_batch(task, cfg, 2)
    seed = step_seed(cfg.seed, FORGET_STREAM, 2)
    loss, d = softmax_cross_entropy(model.forward(x, seed=seed), y)
    model.backward(d)
    want = {n: g.copy() for n, g in model.grads.items()}
    flat = flatten_parameters(model)
    replica, flat_r = model_replica(model)
    assert all(replica.params[n] is p for n, p in model.params.items())  # shared, not copied
    for parallel in (False, True):
        got_loss = _step_in_halves(model, (replica, flat.grads, flat_r.grads), x, y, seed, 0, batch_size, parallel)
        assert got_loss == pytest.approx(loss, rel=1e-13)
        for n, g in want.items():
            np.testing.assert_allclose(model.grads[n], g, rtol=1e-10, atol=1e-13, err_msg=n)


def test_loop_matches_hand_written_steps():
    cfg = tiny_cfg(forget_rate=0.25, steps=4, clip_norm=0.05)
    res = train(cfg)
    task = make_task(cfg)
    model = Transformer(model_config(cfg, task.vocab_size))
    opt = AdamW(lr=cfg.lr, betas=(0.9, cfg.beta2), eps=1e-8, weight_decay=cfg.weight_decay)
    ref = []
    for step in range(cfg.steps):
        x, y = train_batch(task, cfg, step)
        logits = model.forward(x, seed=step_seed(cfg.seed, FORGET_STREAM, step))
        loss, d = softmax_cross_entropy(logits, y)
        model.backward(d)
        clip_grad_norm(model.grads, 0.05)
        opt.step(model.params, model.grads,
                 lr=warmup_cosine_lr(step, base_lr=cfg.lr, warmup_steps=2, total_steps=4,
                                     min_lr=cfg.lr * cfg.min_lr_ratio))
        ref.append(loss)
    # train() sums the two halves' gradients (test_halves_equal_the_whole_batch): float rounding
    np.testing.assert_allclose(res.losses, ref, rtol=2e-6)
    for name, p in model.params.items():
        np.testing.assert_allclose(res.model.params[name], p, rtol=1e-5, atol=1e-7, err_msg=name)
    assert res.metrics["train_loss"] == pytest.approx(np.mean(ref))
    # held-out accuracy recomputed from the trained weights
    x, y = heldout_set(task, cfg)
    model.eval()
    pred = model.forward(x).argmax(-1)
    keep = y != IGNORE
    assert res.metrics["accuracy"] == pytest.approx(np.mean(pred[keep] == y[keep]))


def test_loss_decreases_on_mqar():
    res = train(tiny_cfg(steps=60, lr=1e-2, warmup_steps=5))
    assert np.mean(res.losses[-10:]) < np.mean(res.losses[:10]) - 0.3


def test_resume_after_crash_is_exact(tmp_path):
    cfg = tiny_cfg(steps=9, forget_rate=0.3)
    full = train(cfg)

    class Crash(Exception):
        pass

    def crash_at_7(step, loss, lr, tok_s):
        if step == 7:
            raise Crash
    with pytest.raises(Crash):
        train(cfg, out_dir=str(tmp_path), checkpoint_every=3, progress=crash_at_7)
    assert load_training_state(str(tmp_path / "checkpoint.npz"))["step"] == 6
    resumed = train(cfg, out_dir=str(tmp_path), resume=True, checkpoint_every=3)
    assert resumed.metrics["resumed_from"] == 6 and resumed.metrics["steps_this_run"] == 3
    np.testing.assert_array_equal(resumed.losses, full.losses)
    for name, p in full.model.params.items():
        np.testing.assert_array_equal(resumed.model.params[name], p)
    with pytest.raises(ConfigMismatchError) as e:
        train(tiny_cfg(steps=9, forget_rate=0.3, k=3, lr=1e-2), out_dir=str(tmp_path), resume=True)
    assert e.value.fields == ["k", "lr"]


def _env():
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cli_cmd(out, *extra):
    return [sys.executable, "-c", "from topkattn.cli.main import main; main()", "train-toy",
            *TINY, "--k", "4", "--forget-rate", "0.2", "--steps", "60", "--checkpoint-every", "5",
            "--out", str(out), *extra]


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref = subprocess.run(_cli_cmd(ref_dir, "--json"), env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert ref.returncode == 0, ref.stderr
    proc = subprocess.Popen(_cli_cmd(run_dir), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = run_dir / "checkpoint.npz"
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "metrics.json").exists()            # killed mid-run, not after
    killed_at = load_training_state(str(ckpt))["step"]
    assert 5 <= killed_at < 60 and killed_at % 5 == 0
    res = subprocess.run(_cli_cmd(run_dir, "--resume", "--json"), env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    m = json.loads(res.stdout)
    assert m["resumed_from"] == killed_at and m["steps_this_run"] == 60 - killed_at
    want = json.loads((ref_dir / "history.json").read_text())
    got = json.loads((run_dir / "history.json").read_text())
    assert got["loss"][killed_at:] == want["loss"][killed_at:]   # exact, from the resumed step on
    assert got["loss"] == want["loss"] and got["lr"] == want["lr"]
    assert m["accuracy"] == json.loads(ref.stdout)["accuracy"]


def test_cli_runs_and_writes_metrics(tmp_path):
    out = tmp_path / "o"
    r = CliRunner().invoke(main, ["train-toy", *TINY, "--steps", "5", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert len(r.stdout.strip().splitlines()) == 1
    m = json.loads(r.stdout)
    assert m == json.loads((out / "metrics.json").read_text())
    for key in ("task", "attention", "k", "forget_rate", "steps", "train_loss", "accuracy",
                "tokens_per_s", "seconds"):
        assert key in m
    assert (m["task"], m["attention"], m["k"], m["steps"]) == ("mqar", "topk", 8, 5)
    hist = json.loads((out / "history.json").read_text())
    assert len(hist["loss"]) == 5
    assert m["train_loss"] == pytest.approx(np.mean(hist["loss"]))
    assert m["tokens_per_s"] > 0 and m["seconds"] > 0 and 0.0 <= m["accuracy"] <= 1.0
    # warmup default: 5% of steps, at least 1; then cosine to lr/10
    want_lr = [warmup_cosine_lr(s, base_lr=3e-3, warmup_steps=1, total_steps=5, min_lr=3e-4)
               for s in range(5)]
    np.testing.assert_allclose(hist["lr"], want_lr, rtol=1e-12)
    state = load_training_state(str(out / "checkpoint.npz"))
    assert state["step"] == 5 and state["config"]["k"] == 8 and state["optimizer"]["t"] == 5


def test_cli_table_dense_and_text(tmp_path):
    r = CliRunner().invoke(main, ["train-toy", *TINY, "--steps", "3", "--attention", "dense",
                                  "--blas-threads", "0"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["task", "attention", "k"]
    assert lines[2].split()[:4] == ["mqar", "dense", "-", "0"]
    r = CliRunner().invoke(main, ["train-toy", "--task", "text", "--d-model", "16", "--heads", "2",
                                  "--seq-len", "16", "--batch-size", "2", "--steps", "2", "--quiet",
                                  "--json", "--k", "4"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    assert m["task"] == "text" and "accuracy" not in m
    assert m["bits_per_char"] == pytest.approx(m["heldout_loss"] / math.log(2))
    assert 5.0 < m["bits_per_char"] < 9.0                     # ~8 bits: untrained on 256 bytes


def test_cli_resume_fills_options_and_refuses_mismatch(tmp_path):
    out = str(tmp_path / "o")
    r = CliRunner().invoke(main, ["train-toy", *TINY, "--steps", "4", "--k", "3", "--out", out])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["train-toy", "--out", out, "--resume", "--json", "--quiet"])
    assert r.exit_code == 0, r.output                         # options come from the checkpoint
    m = json.loads(r.stdout)
    assert (m["k"], m["steps"], m["config"]["d_model"], m["steps_this_run"]) == (3, 4, 16, 0)
    r = CliRunner().invoke(main, ["train-toy", "--out", out, "--resume", "--k", "5", "--d-model", "32"])
    assert r.exit_code == 2
    assert r.output.count("\n") == 1
    assert "--k (checkpoint 3, now 5)" in r.output and "--d-model (checkpoint 16, now 32)" in r.output


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_cli_corrupt_checkpoint_is_an_error(tmp_path, damage):
    out = tmp_path / "o"
    r = CliRunner().invoke(main, ["train-toy", *TINY, "--steps", "4", "--out", str(out)])
    assert r.exit_code == 0
    ck = out / "checkpoint.npz"
    data = ck.read_bytes()
    ck.write_bytes(data[:len(data) // 2] if damage == "truncate" else b"\0" * len(data))
    (out / "metrics.json").unlink()
    r = CliRunner().invoke(main, ["train-toy", *TINY, "--steps", "4", "--out", str(out), "--resume"])
    assert r.exit_code == 1
    assert r.output.startswith("Error: checkpoint ") and "truncated or corrupted" in r.output
    assert r.output.count("\n") == 1
    assert not (out / "metrics.json").exists()                # no silent restart
    assert ck.read_bytes() != data                            # left as found
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        train(tiny_cfg(steps=4), out_dir=str(out), resume=True)


@pytest.mark.parametrize("args, needle", [
    (["--k", "0"], "'--k': 0 is not in the range x>=1"),
    (["--task", "images"], "'--task'"),
    (["--heads", "5"], "d_model (64) must be a multiple of heads (5)"),
    (["--forget-rate", "1.0"], "'--forget-rate'"),
    (["--steps", "ten"], "'--steps'"),
    (["--bogus"], "--bogus"),
    (["--resume"], "--resume needs --out"),
    (["--num-kv-pairs", "40"], "num_kv_pairs must be at most"),
    # MQAR's options were ignored by the text task (its default values given explicitly too)
    (["--task", "text", "--vocab-size", "64"], "--vocab-size applies only to --task mqar"),
    (["--task", "text", "--num-kv-pairs", "4"], "--num-kv-pairs applies only to --task mqar"),
])
def test_cli_bad_options_exit_2_one_line(args, needle):
    r = CliRunner().invoke(main, ["train-toy", *args])
    assert r.exit_code == 2
    assert r.output.startswith("Error: ") and r.output.count("\n") == 1
    assert needle in r.output
    assert "Traceback" not in r.output


def test_cli_resume_without_checkpoint(tmp_path):
    r = CliRunner().invoke(main, ["train-toy", "--out", str(tmp_path), "--resume"])
    assert r.exit_code == 2 and r.output.count("\n") == 1
    assert f"--resume: no checkpoint at {tmp_path}" in r.output


def test_cli_gpu_without_cupy():
    try:
        from topkattn.backend import require_cupy
        require_cupy()
        pytest.skip("a usable GPU is present")
    except RuntimeError:
        pass
    r = CliRunner().invoke(main, ["train-toy", "--device", "gpu", *TINY, "--steps", "1"])
    assert r.exit_code == 2 and r.output.count("\n") == 1
    assert r.output.startswith("Error: --device gpu: ")


def _tiny_model(token_shift=True, topk=3):
    import dataclasses

    from topkattn.model import TransformerConfig
    cfg = TransformerConfig(vocab_size=11, d_model=16, n_layers=2, n_heads=2, q_lora_rank=8,
                            kv_lora_rank=8, qk_nope_dim=8, qk_rope_dim=4, v_head_dim=8, d_ff=32,
                            topk=topk, dtype="float64", seed=1)
    return Transformer(dataclasses.replace(cfg, token_shift=token_shift)), cfg


def test_token_shift_gradients_by_central_differences():
    m, _ = _tiny_model()
    rng = np.random.default_rng(0)
    m.params["shift.weight"][...] = rng.standard_normal((16, 16)) * 0.3
    x, y = rng.integers(0, 11, (2, 7)), rng.integers(0, 11, (2, 7))
    loss, d = softmax_cross_entropy(m.forward(x), y)
    m.backward(d)
    for name in ("shift.weight", "embed.weight", "blocks.0.attn.W_DKV"):
        p, g = m.params[name], m.grads[name].copy()
        u = rng.standard_normal(p.shape)
        eps = 1e-5
        p += eps * u
        lp = softmax_cross_entropy(m.forward(x), y)[0]
        p -= 2 * eps * u
        lm = softmax_cross_entropy(m.forward(x), y)[0]
        p += eps * u
        assert (lp - lm) / (2 * eps) == pytest.approx(float((g * u).sum()), rel=1e-5, abs=1e-9)


def test_token_shift_forward_formula_decode_and_off_switch():
    from topkattn.layers import TokenShift
    rng = np.random.default_rng(1)
    ts = TokenShift(4, dtype="float64")
    ts.params["weight"][...] = rng.standard_normal((4, 4))
    xin = rng.standard_normal((2, 5, 4))
    out = ts.forward(xin)
    np.testing.assert_allclose(out[:, 0], xin[:, 0])
    for t in range(1, 5):
        np.testing.assert_allclose(out[:, t], xin[:, t] + xin[:, t - 1] @ ts.params["weight"].T)
    m, cfg = _tiny_model()
    m.params["shift.weight"][...] = rng.standard_normal((16, 16)) * 0.3
    toks = rng.integers(0, 11, (2, 6))
    m.eval()
    full = m.forward(toks)
    cache = m.init_cache(2)
    steps = np.concatenate([m.step(toks[:, t:t + 1], cache) for t in range(6)], axis=1)
    np.testing.assert_allclose(steps, full, rtol=1e-10, atol=1e-12)
    plain, _ = _tiny_model(token_shift=False)
    base = Transformer(cfg)
    assert set(plain.params) == set(base.params) and "shift.weight" in m.params
    np.testing.assert_array_equal(plain.forward(toks), base.forward(toks))
    m0, _ = _tiny_model()                                     # zero init: the plain model at step 0
    np.testing.assert_array_equal(m0.forward(toks), base.forward(toks))


def _rewrite_checkpoint(path, edit):
    """Re-save a training checkpoint after ``edit(arrays, meta)`` (valid checksums, bad content)."""
    from topkattn.training.checkpoint import load_checkpoint, save_checkpoint

    arrays, meta = load_checkpoint(path)
    edit(arrays, meta)
    save_checkpoint(path, arrays, meta)


@pytest.mark.parametrize("damage,needle", [
    ("no_t", "optimizer entry lacks ['t']"),
    ("bad_t", "corrupted optimizer state"),
    ("moment_shape", "optimizer m["),
])
def test_cli_bad_optimizer_state_is_one_line(tmp_path, damage, needle):
    out = tmp_path / "o"
    assert CliRunner().invoke(main, ["train-toy", *TINY, "--steps", "3", "--out", str(out)]).exit_code == 0

    def edit(arrays, meta):
        if damage == "no_t":
            del meta["optimizer"]["t"]
        elif damage == "bad_t":
            meta["optimizer"]["t"] = -4
        else:
            name = next(n for n in arrays if n.startswith("opt_m/"))
            arrays[name] = np.zeros((2, 3), arrays[name].dtype)

    _rewrite_checkpoint(str(out / "checkpoint.npz"), edit)
    r = CliRunner().invoke(main, ["train-toy", *TINY, "--steps", "3", "--out", str(out), "--resume"])
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert r.output.startswith("Error: checkpoint ") and needle in r.output


def test_stale_temporary_files_are_removed_and_files_keep_umask_permissions(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / ".ckpt-abc123.tmp").write_bytes(b"half a checkpoint")  # as a SIGKILL mid-save leaves it
    (out / "notes.tmp").write_text("a user's file")
    logs = []
    train(tiny_cfg(steps=2), out_dir=str(out), log=logs.append)
    assert not (out / ".ckpt-abc123.tmp").exists() and (out / "notes.tmp").exists()
    assert any(".ckpt-abc123.tmp" in line for line in logs)
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(out / "checkpoint.npz").st_mode & 0o777 == 0o666 & ~mask


def test_cli_progress_bar_on_stderr_json_alone_on_stdout(tmp_path):
    args = [a for a in TINY if a != "--quiet"]
    out = str(tmp_path / "o")
    r = CliRunner().invoke(main, ["train-toy", *args, "--steps", "3", "--json", "--out", out, "--progress"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)  # stdout: the JSON object and nothing else
    assert m["steps"] == 3
    assert "3/3" in r.stderr and "loss=" in r.stderr  # the tqdm bar with the running loss


def test_cli_resumes_a_checkpoint_from_before_token_shift(tmp_path):
    """Older checkpoints have no token_shift field: they were runs without one, for --resume
    (CLI and library) as for eval."""
    out = tmp_path / "o"
    args = [*TINY, "--steps", "3", "--out", str(out), "--no-token-shift"]
    assert CliRunner().invoke(main, ["train-toy", *args]).exit_code == 0
    _rewrite_checkpoint(str(out / "checkpoint.npz"), lambda arrays, meta: meta["config"].pop("token_shift"))
    r = CliRunner().invoke(main, ["train-toy", "--out", str(out), "--resume", "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["config"]["token_shift"] is False


# ---------------------------------------------------------------- --out, memory, divergence, leftovers

def _one_line_error(r, code):
    assert r.exit_code == code, (r.exit_code, r.output, r.exception)
    assert r.output.startswith("Error: ") and r.output.count("\n") == 1, r.output
    assert "Traceback" not in r.output


def _unusable_out(tmp_path, kind):
    if kind == "file-child":
        (tmp_path / "f").write_text("a user's file")
        return str(tmp_path / "f" / "x"), "Not a directory"
    if kind == "proc":
        if not os.path.isdir("/proc/self"):
            pytest.skip("no /proc on this system")
        return "/proc/x", "No such file or directory"
    if _permissions_bind(tmp_path):
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o500)
        return str(folder), "Permission denied"
    pytest.skip("running as root: a read-only folder is still writable (the mid-run write failure "
                "is simulated in test_cli_write_failure_mid_run_keeps_the_last_checkpoint)")


@pytest.mark.parametrize("kind", ["file-child", "proc", "read-only"])
def test_unusable_out_is_refused_before_the_first_step(tmp_path, kind):
    """An unusable --out gave a traceback at the first checkpoint, after up to 100 steps of work."""
    out, reason = _unusable_out(tmp_path, kind)
    r = CliRunner().invoke(main, ["train-toy", *TINY, "--steps", "4", "--out", out])
    _one_line_error(r, 2)
    assert f"--out {out} is not a writable folder ({reason})" in r.output
    steps = []
    with pytest.raises(OutDirError, match=re.escape(f"out_dir {out} is not a writable folder ({reason})")) as e:
        train(tiny_cfg(), out_dir=out, progress=lambda *a: steps.append(a))
    assert isinstance(e.value, OSError) and steps == []  # no step was run
    if kind == "file-child":
        assert (tmp_path / "f").read_text() == "a user's file"


def test_out_is_created_with_its_parents_and_the_probe_leaves_nothing(tmp_path):
    out = tmp_path / "a" / "b"
    train(tiny_cfg(steps=2), out_dir=out)  # a path-like object works too
    assert sorted(os.listdir(out)) == ["checkpoint.npz", "history.json", "metrics.json"]


def _failing_writer(monkeypatch, fail_from):
    """storage.atomic_write raising PermissionError from its ``fail_from``-th call on (what a folder
    made read-only mid-run does for a user who is not root)."""
    from topkattn import storage
    real, calls = storage.atomic_write, []

    def atomic_write(path, write, *, prefix):
        calls.append(path)
        if len(calls) >= fail_from:
            raise PermissionError(errno.EACCES, "Permission denied", os.path.dirname(path))
        return real(path, write, prefix=prefix)

    monkeypatch.setattr(storage, "atomic_write", atomic_write)
    return calls


def test_cli_write_failure_mid_run_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "o"
    calls = _failing_writer(monkeypatch, fail_from=2)
    r = CliRunner().invoke(main, ["train-toy", *TINY, "--steps", "6", "--checkpoint-every", "2", "--out", str(out)])
    _one_line_error(r, 1)
    assert f"cannot write the checkpoint of step 4 in {out} (Permission denied); the checkpoint of step 2 is kept" \
        in r.output
    assert len(calls) == 2 and load_training_state(str(out / "checkpoint.npz"))["step"] == 2
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    # the final JSON files: the same one-line error, the final checkpoint kept
    monkeypatch.undo()
    _failing_writer(monkeypatch, fail_from=2)
    with pytest.raises(SaveError, match="cannot write history.json in .*; the checkpoint of step 6 is kept"):
        train(tiny_cfg(steps=6), out_dir=str(tmp_path / "p"), checkpoint_every=100)
    assert load_training_state(str(tmp_path / "p" / "checkpoint.npz"))["step"] == 6


def _permissions_bind(tmp_path):
    """Whether a read-only folder refuses this process's writes (not for root)."""
    folder = tmp_path / "perm-probe"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        (folder / "x").write_text("")
        return False
    except PermissionError:
        return True
    finally:
        folder.chmod(0o700)


def test_folder_made_read_only_mid_run(tmp_path):
    """The real thing where permissions bind: chmod after the first checkpoint."""
    if not _permissions_bind(tmp_path):
        pytest.skip("running as root: chmod does not stop writes (simulated in the test above)")
    out = tmp_path / "o"

    def progress(step, *_):  # called after each step, before that step's checkpoint
        if step == 3:
            out.chmod(0o500)

    try:
        with pytest.raises(SaveError, match=rf"cannot write the checkpoint of step 4 in {re.escape(str(out))} "
                                            r"\(Permission denied\); the checkpoint of step 2 is kept"):
            train(tiny_cfg(steps=6), out_dir=str(out), checkpoint_every=2, progress=progress)
        assert load_training_state(str(out / "checkpoint.npz"))["step"] == 2
    finally:
        out.chmod(0o700)


def test_memory_estimate_refuses_impossible_sizes(monkeypatch):
    """--batch-size 1000000000 gave a MemoryError traceback, --seq-len 10000000 ran without end."""
    train_mod = importlib.import_module("topkattn.training.train")  # the package exports train()
    monkeypatch.setattr(train_mod, "machine_memory", lambda device="cpu": 4 * 2**30)  # a small laptop
    for args, size, lower in ((["--batch-size", "1000000000"], "TiB", "--batch-size or --seq-len"),
                              (["--seq-len", "10000000"], "TiB", "--batch-size or --seq-len"),
                              (["--vocab-size", "99999999999"], "PiB", "--vocab-size"),  # blamed the batch
                              (["--d-model", "1048576"], "TiB", "--d-model"),
                              (["--layers", "10000000"], "TiB", "--layers")):
        r = CliRunner().invoke(main, ["train-toy", *args, "--quiet"])
        _one_line_error(r, 2)
        assert "the run needs at least " in r.output and size in r.output
        assert r.output.endswith(f"more than this machine's 4.0 GiB: lower {lower}\n")
        assert " ".join(args) in r.output
    with pytest.raises(RunTooLargeError, match="batch_size=1000000000"):
        train(TrainConfig(batch_size=10**9))
    check_memory(TrainConfig())                                   # the defaults
    check_memory(TrainConfig(d_model=256, heads=8, seq_len=256))  # the README's larger run
    check_memory(TrainConfig(task="text", seq_len=128, steps=500))


@pytest.mark.parametrize("kw", [dict(), dict(attention="dense"), dict(token_shift=False, k=2)])
def test_memory_estimate_is_a_lower_bound(kw):
    import tracemalloc
    cfg = tiny_cfg(steps=2, **kw)
    mc = model_config(cfg, make_task(cfg).vocab_size)
    assert n_model_params(mc) == Transformer(mc).n_params()
    tracemalloc.start()
    try:
        train(cfg)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert 0 < step_memory_estimate(cfg) <= peak


def test_divergence_says_whether_the_state_was_saved(tmp_path):
    """Without --out the message said "last good state saved at step 1" though nothing was saved;
    NumPy's overflow warnings came first (the loop checks the loss and gradient norm itself)."""
    r = CliRunner().invoke(main, ["train-toy", *TINY, "--steps", "6", "--lr", "1e30"])
    _one_line_error(r, 1)
    assert "step 2: non-finite loss" in r.output and "the state was not saved (no out_dir)" in r.output
    assert "saved at step" not in r.output
    out = tmp_path / "o"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(FloatingPointError, match=f"last good state saved at step 1 in {re.escape(str(out))}"):
            train(tiny_cfg(steps=6, lr=1e30), out_dir=str(out))
    assert load_training_state(str(out / "checkpoint.npz"))["step"] == 1


def test_a_diverged_update_is_never_saved(tmp_path, monkeypatch):
    """--lr 1e308: step 1's update made every parameter NaN and that was saved as the "last good
    state", after NumPy's overflow warnings; a checkpoint is a state whose parameters are finite."""
    out = tmp_path / "o"
    r = CliRunner().invoke(main, ["train-toy", *TINY, "--steps", "3", "--lr", "1e308", "--out", str(out)])
    _one_line_error(r, 1)  # no RuntimeWarning lines
    assert "the parameters after step 1 are not finite, not saved; no checkpoint was written" in r.output
    assert not (out / "checkpoint.npz").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(FloatingPointError, match="no checkpoint was written"):
            train(tiny_cfg(steps=3, lr=1e308), out_dir=str(tmp_path / "lib"), threads=1)
    step = AdamW.step
    calls = []

    def overflowing_third_update(self, params, grads, lr=None):  # a loss still finite, a parameter not
        step(self, params, grads, lr=lr)
        calls.append(1)
        if len(calls) == 3:
            params["embed.weight"][0, 0] = np.inf

    monkeypatch.setattr(AdamW, "step", overflowing_third_update)
    out = tmp_path / "every"
    with pytest.raises(FloatingPointError, match="step 3: parameter 'embed.weight' is no longer finite .*the "
                                                 "checkpoint of step 2 is kept"):
        train(tiny_cfg(steps=5), out_dir=str(out), threads=1, checkpoint_every=1)
    state = load_training_state(str(out / "checkpoint.npz"))
    assert state["step"] == 2 and all(np.isfinite(v).all() for v in state["params"].values())


def test_leftover_json_temporaries_are_removed_at_the_next_run(tmp_path):
    """A kill -9 during the final JSON write leaves <TEMP_PREFIX>*.tmp (the atomic writer's name);
    the next run in the folder removes it, and the older writer's <name>.json.tmp-<pid> too."""
    out = tmp_path / "o"
    script = (
        "import os, signal, sys\n"
        "import topkattn.storage as st\n"
        "real = st.atomic_write\n"
        "def atomic_write(path, write, *, prefix):\n"
        "    def killed(f):\n"
        "        write(f); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(path, killed if path.endswith('metrics.json') else write, prefix=prefix)\n"
        "st.atomic_write = atomic_write\n"
        "from topkattn.training.train import TrainConfig, train\n"
        "train(TrainConfig(d_model=16, heads=2, seq_len=12, num_kv_pairs=3, vocab_size=16, batch_size=4,\n"
        "                  steps=2, warmup_steps=1, eval_size=32, k=4), out_dir=sys.argv[1])\n")
    p = subprocess.run([sys.executable, "-c", script, str(out)], env=_env(), capture_output=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr.decode()
    left = [n for n in os.listdir(out) if n.endswith(".tmp")]
    assert len(left) == 1 and left[0].startswith(TEMP_PREFIX) and not (out / "metrics.json").exists()
    (out / "history.json.tmp-4242").write_text("{")   # the pre-storage writer's names
    (out / "metrics.json.tmp-17").write_text("{")
    theirs = ["notes.tmp", "metrics.json.tmp-old", "history.json.tmp-12.bak", ".ckpt-notes.txt"]
    for name in theirs:
        (out / name).write_text("a user's file")
    r = CliRunner().invoke(main, ["train-toy", "--out", str(out), "--resume", "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(out)) == sorted(["checkpoint.npz", "history.json", "metrics.json", *theirs])
    assert all((out / n).read_text() == "a user's file" for n in theirs)
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2


@pytest.mark.parametrize("value", [0.5, 1.0, float("nan"), float("inf")])
def test_config_refuses_a_rope_base_the_layers_cannot_use(value):
    with pytest.raises(ValueError, match="rope_base must be > 1, got "):
        TrainConfig(rope_base=value)


def test_a_new_run_refuses_forgetting_with_dense_attention(tmp_path):
    # dense attention drops no key: a forget_rate there would be recorded yet do nothing.  The
    # config itself stays valid, so that a run saved so by an older version still loads and resumes
    cfg = TrainConfig(attention="dense", forget_rate=0.5, d_model=16, heads=2, seq_len=12, num_kv_pairs=3,
                      steps=2, batch_size=4, eval_size=8)
    with pytest.raises(ValueError, match="forget_rate applies to attention='topk'.*got forget_rate=0.5 with "
                                         "attention='dense'"):
        train(cfg, threads=1)
    assert not (tmp_path / "run").exists()
    assert TrainConfig(attention="topk", forget_rate=0.5, dense_layers=[0]).forget_rate == 0.5


def test_a_new_run_refuses_a_folder_holding_another_runs_checkpoint(tmp_path):
    # nothing a user wrote is lost: a second run into the same --out neither resuming nor
    # overwriting is refused before it touches a file; --overwrite starts over in its place
    out = tmp_path / "run"
    cfg = TrainConfig(d_model=16, heads=2, seq_len=12, num_kv_pairs=3, steps=2, batch_size=4, eval_size=8)
    train(cfg, out_dir=out, threads=1)
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    with pytest.raises(RunExistsError, match="already holds a run's checkpoint") as e:
        train(dataclasses.replace(cfg, seed=1), out_dir=out, threads=1)
    assert e.value.path == str(out / "checkpoint.npz")
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
    r = CliRunner().invoke(main, ["train-toy", *TINY, "--steps", "2", "--out", str(out)])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "already holds a run" in r.output and "--resume continues it, --overwrite starts over" in r.output
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
    r = CliRunner().invoke(main, ["train-toy", "--out", str(out), "--resume", "--overwrite"])
    assert r.exit_code == 2 and "--resume continues the run in --out, --overwrite starts over" in r.output
    r = CliRunner().invoke(main, ["train-toy", *TINY, "--steps", "2", "--seed", "1", "--out", str(out),
                                  "--overwrite", "--quiet", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "metrics.json").read_text())["config"]["seed"] == 1
    train(dataclasses.replace(cfg, seed=2), out_dir=out, threads=1, overwrite=True)
    assert json.loads((out / "metrics.json").read_text())["config"]["seed"] == 2


@pytest.mark.parametrize("name", ["metrics.json", "history.json"])
def test_a_new_run_refuses_a_folder_holding_files_it_would_write(tmp_path, name):
    # a folder without a checkpoint but with a file train-toy writes (the user's, or a run whose
    # checkpoint was deleted): refused before the first step, kept; --overwrite replaces it
    out = tmp_path / "run"
    out.mkdir()
    (out / name).write_text("mine")
    cfg = TrainConfig(d_model=16, heads=2, seq_len=12, num_kv_pairs=3, steps=2, batch_size=4, eval_size=8)
    with pytest.raises(RunExistsError, match="exists and a new run would replace it") as e:
        train(cfg, out_dir=out, threads=1)
    assert e.value.path == str(out / name) and os.listdir(out) == [name]
    r = CliRunner().invoke(main, ["train-toy", *TINY, "--steps", "2", "--out", str(out), "--quiet"])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert f"already holds {name}, which this run would replace: --overwrite" in r.output
    assert os.listdir(out) == [name] and (out / name).read_text() == "mine"
    r = CliRunner().invoke(main, ["train-toy", *TINY, "--steps", "2", "--out", str(out), "--quiet", "--overwrite"])
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(out)) == ["checkpoint.npz", "history.json", "metrics.json"]


def test_config_numpy_scalars_are_stored_as_python_values(tmp_path):
    """check_int/check_real accept NumPy scalars; the configs kept them as they were, so the
    metrics and the checkpoint's config were not JSON-serialisable (the save failed after every
    step had run, leaving out_dir empty)."""
    cfg = tiny_cfg(k=np.int64(2), lr=np.float32(0.01), steps=np.int64(2), seed=np.uint8(3))
    assert type(cfg.k) is int and type(cfg.steps) is int and type(cfg.seed) is int and type(cfg.lr) is float
    assert cfg.lr == float(np.float32(0.01))
    result = train(cfg, out_dir=tmp_path / "run")
    json.dumps(result.metrics, allow_nan=False)
    assert (tmp_path / "run" / "checkpoint.npz").exists()
    from topkattn.model import TransformerConfig
    mcfg = TransformerConfig(vocab_size=np.int64(11), topk=np.int32(2))
    assert type(mcfg.vocab_size) is int and type(mcfg.topk) is int
    json.dumps(mcfg.to_dict())


@pytest.mark.parametrize("kw,err,needle", [
    (dict(beta2=1.0), ValueError, r"beta2 must be .*\[0, 1\)"),  # AdamW's own check named betas[1]
    (dict(dense_layers=None), TypeError, "dense_layers must be a sequence of layer indices, got None"),
])
def test_config_fields_are_checked_by_name(kw, err, needle):
    with pytest.raises(err, match=needle):
        tiny_cfg(**kw)


@pytest.mark.parametrize("bad,err", [(-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_eval_every_is_checked(bad, err):
    """-1 evaluated every step (done % -1 == 0); 1.5 and True were accepted silently."""
    with pytest.raises(err, match="eval_every"):
        train(tiny_cfg(steps=2), eval_every=bad)
