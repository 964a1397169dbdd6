"""`topkattn generate` and Transformer.generate: greedy decoding through the latent cache equals
a greedy loop over the full forward pass, sampling follows temperature/top-p, LoRANN at full
recall equals exact, and one-line usage errors."""
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from topkattn.cli.main import main
from topkattn.decoding import ExactSelector, LorannSelector
from topkattn.model import Transformer, TransformerConfig, sample_next_tokens
from topkattn.training.runs import load_run

TINY = ["--layers", "1", "--d-model", "16", "--heads", "2", "--batch-size", "4", "--quiet"]


def _train(out, *args):
    r = CliRunner().invoke(main, ["train-toy", *TINY, "--out", str(out), *args])
    assert r.exit_code == 0, r.output
    return str(out)


@pytest.fixture(scope="module")
def mqar_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("mqar"), "--steps", "6", "--seq-len", "16", "--num-kv-pairs", "2",
                  "--vocab-size", "16", "--k", "3")


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("text"), "--task", "text", "--steps", "4", "--seq-len", "24", "--k", "4")


def _greedy_by_forward(model, prompt, n):
    """The reference: the whole sequence through model.forward (eval mode) each step, arg-max."""
    seq = [int(t) for t in prompt]
    model.eval()
    for _ in range(n):
        seq.append(int(np.argmax(model.forward(np.array([seq]))[0, -1])))
    return seq


def _generate(args):
    return CliRunner().invoke(main, ["generate", *args])


def _json(args):
    r = _generate([*args, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_mqar_greedy_ids_equal_a_greedy_loop_over_forward(mqar_run):
    _, model = load_run(mqar_run)
    prompt = [3, 9, 5, 12, 3]
    out = _json([mqar_run, "--prompt-ids", "3 9 5,12 3", "--max-new-tokens", "12"])
    want = _greedy_by_forward(model, prompt, 12)
    assert out["prompt_ids"] == prompt and out["generated_ids"] == want[5:]
    assert out["k"] == 3 and out["retriever"] == "exact" and out["recall"] == 1.0 and "text" not in out
    plain = _generate([mqar_run, "--prompt-ids", "3 9 5 12 3", "--max-new-tokens", "12"])
    assert plain.exit_code == 0 and plain.stdout.strip() == "3 9 5 12 3 | " + " ".join(map(str, want[5:]))


def test_text_run_reads_and_prints_characters(text_run):
    _, model = load_run(text_run)
    out = _json([text_run, "--prompt", "def f(x):", "--max-new-tokens", "10"])
    want = _greedy_by_forward(model, list(b"def f(x):"), 10)
    assert out["prompt_ids"] == list(b"def f(x):") and out["generated_ids"] == want[9:]
    assert out["prompt"] == "def f(x):"
    r = _generate([text_run, "--prompt", "def f(x):", "--max-new-tokens", "10"])
    assert r.exit_code == 0 and r.stdout.startswith("def f(x):")


def test_library_generate_batch_equals_forward_loop():
    cfg = TransformerConfig(vocab_size=20, d_model=16, n_layers=2, n_heads=2, q_lora_rank=8, kv_lora_rank=8,
                            qk_nope_dim=4, qk_rope_dim=4, v_head_dim=4, d_ff=16, topk=3, token_shift=True, seed=3)
    model = Transformer(cfg).train()
    prompts = np.array([[1, 5, 7, 2], [9, 9, 3, 0]])
    out = model.generate(prompts, 9)
    assert out.shape == (2, 13) and out.dtype == np.int64
    for row, p in zip(out, prompts):
        assert row.tolist() == _greedy_by_forward(model, p, 9)
    assert model.training is False  # _greedy_by_forward left it in eval
    model.train()
    one = model.generate(prompts[0], 9, selectors=[ExactSelector(), ExactSelector()])
    assert one.tolist() == out[0].tolist() and model.training  # mode and selectors restored
    assert all(blk.attn.selector is None and blk.attn.topk == 3 for blk in model.blocks)
    assert model.generate(prompts[0], 0).tolist() == prompts[0].tolist()


def test_sampling_is_seeded_and_stays_in_the_nucleus(mqar_run):
    base = [mqar_run, "--prompt-ids", "3 9 5 12", "--max-new-tokens", "8", "--temperature", "1.5"]
    a, b = _json([*base, "--seed", "7"]), _json([*base, "--seed", "7"])
    assert a["generated_ids"] == b["generated_ids"]
    assert all(0 <= t < 16 for t in a["generated_ids"])
    c = _json([*base, "--seed", "8", "--top-p", "1e-9"])  # the nucleus is the arg-max alone: greedy
    assert c["generated_ids"] == _json(base[:-2])["generated_ids"]


def test_sample_next_tokens_follows_temperature_and_top_p():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.tile(np.log(probs), (40000, 1))
    rng = np.random.default_rng(0)
    n = len(logits)
    tok = sample_next_tokens(logits, temperature=1.0, rng=rng)
    freq = np.bincount(tok, minlength=4) / n
    assert np.all(np.abs(freq - probs) < 4 * np.sqrt(probs * (1 - probs) / n))
    tok = sample_next_tokens(logits, temperature=1.0, top_p=0.75, rng=rng)  # 0.5 + 0.3 is the first to reach it
    want = np.array([0.5, 0.3, 0, 0]) / 0.8
    freq = np.bincount(tok, minlength=4) / n
    assert freq[2] == 0 and freq[3] == 0 and np.all(np.abs(freq - want) < 4 * np.sqrt(want * (1 - want) / n) + 1e-12)
    tok = sample_next_tokens(logits, temperature=0.5, rng=rng)  # p ** 2, renormalised
    want = probs ** 2 / (probs ** 2).sum()
    freq = np.bincount(tok, minlength=4) / n
    assert np.all(np.abs(freq - want) < 4 * np.sqrt(want * (1 - want) / n))
    big = np.array([[1e4, 1e4 - 1, -1e4]])  # large logits: no overflow, ties resolved by the first
    assert sample_next_tokens(big, temperature=0.0).tolist() == [0]
    assert sample_next_tokens(np.array([[2.0, 2.0]]), temperature=0.0).tolist() == [0]
    assert sample_next_tokens(big, temperature=1e-300, rng=rng).tolist() == [0]
    with pytest.raises(FloatingPointError):
        sample_next_tokens(np.array([[0.0, np.nan]]), temperature=1.0, rng=rng)


def test_lorann_at_full_recall_equals_exact(text_run):
    base = [text_run, "--prompt", "import os\nimport sys\n", "--max-new-tokens", "12"]
    ex = _json(base)
    lo = _json([*base, "--retriever", "lorann", "--clusters-to-search", "1", "--rerank", "100000"])
    assert lo["generated_ids"] == ex["generated_ids"] and lo["recall"] == 1.0 and lo["retriever"] == "lorann"
    _, model = load_run(text_run)
    sels = [LorannSelector(clusters_to_search=1.0, points_to_rerank=100000)]
    ids = list(b"import os\nimport sys\n")
    assert model.generate(ids, 12, selectors=sels)[len(ids):].tolist() == ex["generated_ids"]
    assert sels[0].stats.rows > 0 and sels[0].stats.recall == 1.0  # the index did select the keys


def test_progress_bar_only_when_asked_on_a_non_terminal(mqar_run):
    args = [mqar_run, "--prompt-ids", "1 2", "--max-new-tokens", "3", "--json"]
    quiet = _generate(args)
    assert quiet.exit_code == 0 and quiet.stderr == ""
    shown = _generate([*args, "--progress"])
    assert shown.exit_code == 0 and "3/3" in shown.stderr and json.loads(shown.stdout)["generated_ids"]


@pytest.mark.parametrize("args,msg", [
    ([], "exactly one of --prompt"),
    (["--prompt", "ab", "--prompt-ids", "1"], "exactly one of --prompt"),
    (["--prompt", "ab"], "needs a text run"),
    (["--prompt-ids", "1 x"], "--prompt-ids must be token ids"),
    (["--prompt-ids", "1 16"], "--prompt-ids must lie in [0, 16)"),
    (["--prompt-ids", "1", "--top-p", "0.5"], "--top-p applies only with --temperature"),
    (["--prompt-ids", "1", "--temperature", "nan"], "not a finite number"),
    (["--prompt-ids", "1", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["--prompt-ids", "1", "--retriever", "faiss"], "--retriever"),
    # a MemoryError traceback: the tokens' array was allocated before the first step
    (["--prompt-ids", "1", "--max-new-tokens", "99999999999"], "--max-new-tokens 99999999999: generating needs"),
    # index settings were ignored with the exact retriever
    (["--prompt-ids", "1", "--rerank", "3"], "--rerank applies only to --retriever lorann, not exact"),
    (["--prompt-ids", "1", "--clusters-to-search", "0.25", "--rerank", "0"],
     "--clusters-to-search, --rerank apply only to --retriever lorann"),
])
def test_usage_errors_are_one_line(mqar_run, args, msg):
    r = _generate([mqar_run, *args])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("Error: ") and r.output.count("\n") == 1 and msg in r.output, r.output


def test_missing_run_and_help(tmp_path):
    r = _generate([str(tmp_path / "nope"), "--prompt-ids", "1"])
    assert r.exit_code == 2 and "no checkpoint" in r.output and r.output.count("\n") == 1
    h = _generate(["-h"])
    assert h.exit_code == 0 and "--max-new-tokens" in h.output and "--retriever" in h.output


def test_generate_checks_its_arguments():
    model = Transformer(TransformerConfig(vocab_size=8, d_model=8, n_layers=1, n_heads=2, q_lora_rank=4,
                                          kv_lora_rank=4, qk_nope_dim=2, qk_rope_dim=2, v_head_dim=2, d_ff=8))
    with pytest.raises(ValueError, match="prompt_ids"):
        model.generate(np.array([], dtype=np.int64), 2)
    with pytest.raises(ValueError, match="prompt_ids"):
        model.generate(np.array([1.0, 2.0]), 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate([1, 2], -1)
    with pytest.raises(ValueError, match="top_p"):
        model.generate([1, 2], 1, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="tokens must lie in"):
        model.generate([1, 9], 1)
    with pytest.raises(ValueError, match="one selector per layer"):
        model.generate([1, 2], 1, selectors=[ExactSelector(), ExactSelector()])


@pytest.mark.parametrize("how", ["nan", "huge"])  # not finite; finite but every forward overflows
@pytest.mark.parametrize("retriever", ["exact", "lorann"])
def test_a_diverged_run_is_refused_in_one_line(mqar_run, tmp_path, retriever, how):
    # a FloatingPointError (exact) or ValueError (lorann) traceback
    from test_eval_cli import diverged_copy

    path = diverged_copy(mqar_run, tmp_path / "diverged", how)
    r = _generate([path, "--prompt-ids", "1 2", "--retriever", retriever])
    assert r.exit_code == 1 and r.output.count("\n") == 1, (r.output, r.exception)
    assert r.output.startswith(f"Error: the run in {path} diverged: ")


def test_non_utf8_prompt_bytes_are_kept(text_run):
    # '?' (63) stood for each: argv's undecodable bytes arrive as surrogate escapes
    out = _json([text_run, "--prompt", os.fsdecode(b"\xff\xfe"), "--max-new-tokens", "1"])
    assert out["prompt_ids"] == [255, 254] and out["prompt"] == "\ufffd\ufffd"
    assert _json([text_run, "--prompt", "h\u00e9", "--max-new-tokens", "1"])["prompt_ids"] == list("h\u00e9".encode())


@pytest.fixture(scope="module")
def block_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("block"), "--steps", "2", "--seq-len", "16", "--num-kv-pairs", "2",
                  "--vocab-size", "16", "--attention", "block", "--block-size", "4")


@pytest.fixture(scope="module")
def tail_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("tail"), "--steps", "2", "--seq-len", "16", "--num-kv-pairs", "2",
                  "--vocab-size", "16", "--tail", "mean")


@pytest.mark.parametrize("which,args,msg", [
    # eval's refusals: --k was ignored on a block run; lorann on a block or tail run a traceback
    ("block", ["--k", "3"], "--k applies to token top-k; {run} was trained with block top-k attention"),
    ("block", ["--retriever", "lorann"], "{run} was trained with block top-k attention: it decodes with its block "
                                         "means (--retriever exact), not --retriever lorann"),
    ("tail", ["--retriever", "lorann"], "{run} was trained with --tail mean: its decode scores every cached key"),
])
def test_runs_that_decode_one_way_refuse_the_others_as_eval_does(block_run, tail_run, which, args, msg):
    run = block_run if which == "block" else tail_run
    r = _generate([run, "--prompt-ids", "1 2", "--max-new-tokens", "2", *args])
    assert r.exit_code == 2 and r.output.startswith(f"Error: {msg.format(run=run)}"), r.output
    assert r.output.count("\n") == 1
    e = CliRunner().invoke(main, ["eval", run, *args])
    assert e.exit_code == 2 and msg.format(run=run) in e.output
    assert _generate([run, "--prompt-ids", "1 2", "--max-new-tokens", "2"]).exit_code == 0
