"""`topkattn eval`: accuracy of token-by-token decoding against the model's own forward pass,
LoRANN at full recall == exact, simulated recall, dynamic k, and one-line errors."""
import io
import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from topkattn.cli.main import main
from topkattn.training.tasks import IGNORE
from topkattn.training.train import TrainConfig, heldout_set, make_task, train

N_SEQ = 6


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(task="mqar", k=3, layers=1, d_model=16, heads=2, seq_len=16, steps=3,
                      batch_size=4, vocab_size=16, num_kv_pairs=2, eval_size=N_SEQ, warmup_steps=1)
    res = train(cfg, out_dir=str(out))
    return str(out), cfg, res.model


def _eval(args):
    r = CliRunner().invoke(main, ["eval", *args])
    return r


def _json(args):
    r = _eval([*args, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)  # the progress bar is on stderr


def _forward_accuracy(model, cfg, topk):
    """Accuracy of the full (training-path) forward in eval mode: the reference for exact decode."""
    x, y = heldout_set(make_task(cfg), cfg)
    layer = model.blocks[0].attn
    old = layer.topk
    layer.topk = topk
    try:
        logits = model.eval().forward(x[:N_SEQ])
    finally:
        layer.topk = old
    keep = y[:N_SEQ] != IGNORE
    return float((logits.argmax(-1)[keep] == y[:N_SEQ][keep]).mean())


def test_exact_decode_accuracy_equals_forward(run):
    path, cfg, model = run
    out = _json([path, "--retriever", "exact", "--n-sequences", str(N_SEQ), "--batch-size", "4"])
    for key in ("retriever", "k", "accuracy", "recall", "mean_k", "seconds"):
        assert key in out
    assert out["retriever"] == "exact" and out["k"] == cfg.k
    assert out["recall"] == 1.0
    assert out["accuracy"] == pytest.approx(_forward_accuracy(model, cfg, cfg.k), abs=1e-12)
    # decode steps after the prompt (4 tokens): rows see t + 1 keys, k = 3 -> every row takes 3
    assert out["mean_k"] == pytest.approx(3.0)


def test_lorann_full_recall_and_simulated_recall_one_equal_exact(run):
    path, cfg, _ = run
    base = [path, "--n-sequences", str(N_SEQ)]
    ex = _json([*base, "--retriever", "exact"])
    lo = _json([*base, "--retriever", "lorann", "--clusters-to-search", "1.0", "--rerank", "100000",
                "--clusters", "2"])
    sim = _json([*base, "--retriever", "simulated", "--recall", "1.0"])
    assert lo["accuracy"] == ex["accuracy"] and lo["recall"] == 1.0
    assert sim["accuracy"] == ex["accuracy"] and sim["recall"] == 1.0
    assert lo["index"]["rerank"] == 100000


def test_simulated_recall_is_measured(run):
    path, _, _ = run
    out = _json([path, "--retriever", "simulated", "--recall", "0.5", "--n-sequences", str(N_SEQ)])
    # rows x 3 slots (~300 draws): the measured recall is within 4 sigma of 0.5
    assert abs(out["recall"] - 0.5) < 4 * np.sqrt(0.25 / 300)
    assert out["target_recall"] == 0.5


def test_dynamic_k_zero_tail_is_dense_attention(run):
    """tail_bound 0 with a cap above the sequence takes every key: dense attention accuracy."""
    path, cfg, model = run
    out = _json([path, "--retriever", "exact", "--k", "64", "--tail-bound", "0", "--n-sequences", str(N_SEQ)])
    T, prompt = cfg.seq_len, 2 * cfg.num_kv_pairs
    assert out["mean_k"] == pytest.approx(np.mean(np.arange(prompt, T) + 1))
    assert out["certified_fraction"] == 1.0
    assert out["accuracy"] == pytest.approx(_forward_accuracy(model, cfg, None), abs=1e-12)


def test_table_output(run):
    path, _, _ = run
    r = _eval([path, "--retriever", "simulated", "--recall", "0.9", "--n-sequences", "2"])
    assert r.exit_code == 0, r.output
    lines = dict(line.split(None, 1) if len(line.split(None, 1)) == 2 else (line, "")
                 for line in r.stdout.splitlines())
    assert lines["retriever"].strip() == "simulated"
    assert "accuracy" in lines


@pytest.mark.parametrize("args,msg", [
    (["--retriever", "simulated"], "needs --recall"),
    (["--retriever", "exact", "--recall", "0.5"], "applies only"),
    (["--retriever", "lorann", "--clusters", "zero"], "clusters"),
    (["--retriever", "lorann", "--clusters-to-search", "1.5"], "fraction"),
    # index settings were ignored without lorann (the defaults given explicitly too)
    (["--clusters", "4"], "--clusters applies only to --retriever lorann, not exact"),
    (["--retriever", "simulated", "--recall", "0.5", "--rerank", "2", "--rank", "32"],
     "--rerank, --rank apply only to --retriever lorann, not simulated"),
    (["--clusters-to-search", "auto"], "--clusters-to-search applies only to --retriever lorann"),
    (["--refit-factor", "2"], "--refit-factor applies only to --retriever lorann"),
    (["--no-refit"], "--no-refit applies only to --retriever lorann"),
    (["--retriever", "lorann", "--refit-factor", "2", "--no-refit"], "give one of them"),
])
def test_usage_errors_are_one_line(run, args, msg):
    path, _, _ = run
    r = _eval([path, *args])
    assert r.exit_code == 2
    assert msg in r.output and len(r.output.strip().splitlines()) == 1


def test_device_is_reported_and_gpu_without_cupy_is_a_usage_error(run):
    path, _, _ = run
    assert _json([path, "--n-sequences", "2"])["device"] == "cpu"
    try:
        from topkattn.backend import require_cupy

        require_cupy()
        pytest.skip("a GPU is usable here: tests/test_cuda_gpu.py decodes on it")
    except RuntimeError:
        pass
    r = _eval([path, "--device", "gpu"])
    assert r.exit_code == 2 and r.output.startswith("Error: --device gpu: ") and r.output.count("\n") == 1


def test_missing_and_corrupt_checkpoint(tmp_path):
    r = _eval([str(tmp_path / "nope")])
    assert r.exit_code == 2 and "no checkpoint" in r.output
    (tmp_path / "checkpoint.npz").write_bytes(b"not a zip")
    r = _eval([str(tmp_path)])
    assert r.exit_code == 1 and "corrupted" in r.output


def _forward_logits(model, cfg, n=N_SEQ):
    x, y = heldout_set(make_task(cfg), cfg)
    return model.eval().forward(x[:n]), y[:n]


def _nll(logits, y):
    z = logits.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return -(z - np.log(np.exp(z).sum(-1, keepdims=True)))[np.arange(len(y)), y]


def test_auto_k_is_dynamic_k_with_a_cap(run):
    path, cfg, model = run
    base = [path, "--retriever", "exact", "--n-sequences", str(N_SEQ)]
    dense = _json([*base, "--k", "auto", "--tail-bound", "0"])  # no cap: every visible key
    assert dense["k"] == "auto" and dense["max_k"] == cfg.seq_len
    assert dense["accuracy"] == pytest.approx(_forward_accuracy(model, cfg, None), abs=1e-12)
    capped = _json([*base, "--k", "auto", "--tail-bound", "0.05", "--max-k", "2"])
    same = _json([*base, "--k", "2", "--tail-bound", "0.05"])
    assert capped["max_k"] == 2 and capped["mean_k"] <= 2
    for key in ("accuracy", "mean_k", "k_hist", "certified_fraction", "loss"):
        assert capped[key] == same[key], key


def test_loss_is_the_forward_cross_entropy_after_the_prompt(run):
    path, cfg, model = run
    out = _json([path, "--retriever", "exact", "--n-sequences", str(N_SEQ)])
    layer = model.blocks[0].attn
    logits, y = _forward_logits(model, cfg)
    keep = y != IGNORE
    want = _nll(logits[keep], y[keep]).mean()
    assert out["loss"] == pytest.approx(want, rel=1e-6)
    assert out["bits_per_token"] == pytest.approx(want / np.log(2), rel=1e-6)
    assert layer.topk == cfg.k  # eval restored the layer


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("text_run")
    cfg = TrainConfig(task="text", k=3, layers=1, d_model=16, heads=2, seq_len=12, steps=2,
                      batch_size=2, eval_size=4, warmup_steps=1)
    res = train(cfg, out_dir=str(out))
    return str(out), cfg, res.model


def test_text_eval_scores_only_decoded_positions(text_run):
    path, cfg, model = text_run
    out = _json([path, "--retriever", "exact", "--n-sequences", "4", "--prompt-len", "5"])
    logits, y = _forward_logits(model, cfg, 4)
    assert (y != IGNORE).all()
    assert out["n_scored"] == 4 * (cfg.seq_len - 5) and out["prompt_len"] == 5
    y_dec, l_dec = y[:, 5:], logits[:, 5:]
    want_acc = float((l_dec.argmax(-1) == y_dec).mean())
    want_bits = _nll(l_dec.reshape(-1, l_dec.shape[-1]), y_dec.ravel()).mean() / np.log(2)
    assert out["accuracy"] == pytest.approx(want_acc, abs=1e-12)
    assert out["bits_per_char"] == pytest.approx(want_bits, rel=1e-6)


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dense_run")
    cfg = TrainConfig(task="mqar", attention="dense", layers=1, d_model=16, heads=2, seq_len=16, steps=2,
                      batch_size=4, vocab_size=16, num_kv_pairs=2, eval_size=N_SEQ, warmup_steps=1)
    res = train(cfg, out_dir=str(out))
    return str(out), cfg, res.model


def test_dense_run_decodes_dense_unless_given_k(dense_run):
    path, cfg, model = dense_run
    out = _json([path, "--retriever", "exact", "--n-sequences", str(N_SEQ)])
    assert out["k"] is None and out["mean_k"] is None and out["train_attention"] == "dense"
    assert out["accuracy"] == pytest.approx(_forward_accuracy(model, cfg, None), abs=1e-12)
    topk = _json([path, "--retriever", "exact", "--k", "3", "--n-sequences", str(N_SEQ)])
    assert topk["k"] == 3 and topk["mean_k"] == pytest.approx(3.0)
    r = _eval([path, "--retriever", "simulated", "--recall", "0.9"])
    assert r.exit_code == 2 and "trained with dense attention" in r.output
    assert len(r.output.strip().splitlines()) == 1


@pytest.mark.parametrize("args,msg", [
    (["--k", "auto"], "needs --tail-bound"),
    (["--k", "0"], "'auto'"),
    (["--k", "3", "--max-k", "4"], "cap of --k auto"),
])
def test_k_usage_errors(run, args, msg):
    path, _, _ = run
    r = _eval([path, *args])
    assert r.exit_code == 2 and msg in r.output and len(r.output.strip().splitlines()) == 1


def test_progress_bar_on_stderr_json_alone_on_stdout(run):
    path, _, _ = run
    args = ["eval", path, "--n-sequences", str(N_SEQ), "--batch-size", "4", "--json"]
    r = CliRunner().invoke(main, [*args, "--progress"])  # CliRunner's stderr is not a terminal: forced
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["n_sequences"] == N_SEQ  # stdout: the JSON object and nothing else
    assert f"{N_SEQ}/{N_SEQ}" in r.stderr and "eval exact" in r.stderr  # the tqdm bar, per sequence
    for extra in ([], ["--quiet"], ["--quiet", "--progress"]):  # not a terminal: no bar; --quiet wins
        other = CliRunner().invoke(main, [*args, *extra])
        assert other.exit_code == 0 and other.stderr == "", (extra, other.stderr)
        assert json.loads(other.stdout)["accuracy"] == json.loads(r.stdout)["accuracy"]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("is_tty,quiet,drawn", [(True, False, True), (True, True, False), (False, False, False)])
def test_progress_bar_is_drawn_on_a_terminal_only(monkeypatch, is_tty, quiet, drawn):
    from topkattn.cli import common
    err = _Terminal() if is_tty else io.StringIO()
    monkeypatch.setattr(common.sys, "stderr", err)
    with common.progress_bar(3, "demo", "it", quiet) as bar:
        bar.update(3)
    assert ("3/3" in err.getvalue()) == drawn, err.getvalue()


def test_progress_callback_counts_sequences(run):
    from topkattn.decoding.runner import evaluate_decoding, selector_factory
    _, cfg, model = run
    x, y = heldout_set(make_task(cfg), cfg)
    done = []
    evaluate_decoding(model, x[:5], y[:5], make_selectors=selector_factory("exact", 1), prompt_len=4,
                      batch_size=2, progress=done.append)
    assert done == [2, 4, 5]


@pytest.mark.parametrize("args,msg", [
    (["--retriever", "simulated", "--recall", "nan"], "'--recall': 'nan' is not a finite number."),
    (["--retriever", "simulated", "--recall", "inf"], "'--recall'"),
    (["--tail-bound", "nan"], "'--tail-bound': 'nan' is not a finite number."),
    (["--retriever", "lorann", "--clusters-to-search", "inf"], "--clusters-to-search must be an integer >= 1"),
    (["--retriever", "lorann", "--clusters-to-search", "nan"], "--clusters-to-search must be an integer >= 1"),
    (["--retriever", "lorann", "--clusters-to-search", "-inf"], "--clusters-to-search must be an integer >= 1"),
    (["--retriever", "lorann", "--refit-factor", "inf"], "'--refit-factor': 'inf' is not a finite number."),
    (["--prompt-len", "1000000000"], "--prompt-len must be below the run's sequence length 16"),
    (["--prompt-len", "16"], "--prompt-len must be below the run's sequence length 16"),
])
def test_non_finite_numbers_and_a_prompt_past_the_sequence_are_usage_errors(run, args, msg):
    """--recall/--tail-bound nan gave a ValueError traceback, --clusters-to-search inf an
    OverflowError, --prompt-len 1000000000 exit 0 with accuracy NaN."""
    path, _, _ = run
    r = _eval([path, *args, "--quiet"])
    assert r.exit_code == 2, (r.output, r.exception)
    assert r.output.startswith("Error: ") and r.output.count("\n") == 1, r.output
    assert msg in r.output



def test_a_prompt_past_the_last_scored_target_is_a_usage_error(tmp_path):
    # MQAR scores no target at its last positions: a prompt covering them left n_scored 0 and
    # NaN (invalid JSON) metrics; the last scored position as the prompt's end still scores one
    out = tmp_path / "run"
    cfg = TrainConfig(task="mqar", k=3, layers=1, d_model=16, heads=2, seq_len=12, steps=2, batch_size=4,
                      num_kv_pairs=3, eval_size=N_SEQ, warmup_steps=1)
    train(cfg, out_dir=str(out))
    _, targets = heldout_set(make_task(cfg), cfg)
    last = int(np.flatnonzero((targets != IGNORE).any(axis=0))[-1])
    assert last < cfg.seq_len - 1  # the case: positions after the last scored one exist
    r = _eval([str(out), "--prompt-len", str(last + 1), "--quiet", "--json"])
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    assert f"--prompt-len {last + 1} leaves no scored target after it" in r.output
    got = _json([str(out), "--prompt-len", str(last), "--quiet"])
    assert got["n_scored"] > 0 and math.isfinite(got["accuracy"])


def diverged_copy(run_dir, dest, how="nan"):
    """A copy of the run folder holding a diverged run: "nan": a NaN parameter; "huge": every
    parameter 1e10 times larger (finite, but every forward overflows)."""
    import shutil

    from topkattn.training.checkpoint import load_checkpoint, save_checkpoint

    shutil.copytree(run_dir, dest)
    arrays, meta = load_checkpoint(dest / "checkpoint.npz")
    if how == "nan":
        arrays["param/embed.weight"][0, 0] = np.nan
    else:
        for name in arrays:
            if name.startswith("param/"):
                arrays[name] *= np.float32(1e10)
    save_checkpoint(dest / "checkpoint.npz", arrays, meta)
    return str(dest)


@pytest.mark.parametrize("how,why", [("nan", "its parameter 'embed.weight' holds NaN or infinite values"),
                                     ("huge", "its parameters are finite but so large that its logits are not")])
@pytest.mark.parametrize("args", [["--json"], ["--retriever", "lorann"]])
def test_a_diverged_run_is_refused_in_one_line(run, tmp_path, args, how, why):
    # --json printed NaN (invalid JSON) and RuntimeWarnings; lorann a ValueError traceback
    path = diverged_copy(run[0], tmp_path / "diverged", how)
    r = _eval([path, "--quiet", *args])
    assert r.exit_code == 1 and r.output.count("\n") == 1, (r.output, r.exception)
    assert r.output == f"Error: the run in {path} diverged: {why}\n"
