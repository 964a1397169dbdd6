"""The BERT encoder against an independent PyTorch implementation, on a small random model
written to disk (safetensors + tokenizer.json) so it runs without the MiniLM package."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

from topkattn.pretrained.bert import BertConfig, BertEncoder, SentenceEncoder  # noqa: E402

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "cat", "sat", "on", "mat", "a", "dog", "ran",
         "far", "away", ",", ".", "and", "then", "slept", "##s", "big", "red", "ball"]


def torch_bert(weights, cfg, ids, topk=None, dense_layers=(), tail=None, tail_bound=None, block=None):
    """Hidden states (B, T, C) of a BERT encoder in plain torch.nn.functional (the oracle).

    With ``topk`` every query keeps its ``topk`` highest scores (torch.topk) and the
    softmax runs over those (except in ``dense_layers``, non-negative indices): the same
    math as the engine, written independently.  ``tail="mean"``: the dense softmax weights
    of the kept keys, plus the dropped mass times the mean value of the dropped keys.
    ``topk="auto"``: each row keeps its k best scores, k the smallest with
    (T - k) * exp(s_(k) - logsumexp(s_(1..k))) <= tail_bound (all T when tail_bound = 0).
    ``block=(block_size, topk_blocks)``: each row keeps the keys of its ``topk_blocks`` blocks
    (consecutive keys; the last may be partial) with the highest q . (mean key of the block).
    """
    F = torch.nn.functional
    W = {k: torch.as_tensor(np.asarray(v)) for k, v in weights.items()}
    ids = torch.as_tensor(ids)
    B, T = ids.shape
    C, H = cfg.hidden_size, cfg.num_attention_heads
    D, eps = C // H, cfg.layer_norm_eps
    e = "embeddings."
    x = W[e + "word_embeddings.weight"][ids] + W[e + "position_embeddings.weight"][:T] \
        + W[e + "token_type_embeddings.weight"][0]
    x = F.layer_norm(x, (C,), W[e + "LayerNorm.weight"], W[e + "LayerNorm.bias"], eps)
    for i in range(cfg.num_hidden_layers):
        p = f"encoder.layer.{i}."

        def lin(t, name):
            return F.linear(t, W[p + name + ".weight"], W[p + name + ".bias"])

        q, k, v = (lin(x, f"attention.self.{n}").view(B, T, H, D).transpose(1, 2) for n in ("query", "key", "value"))
        s = q @ k.transpose(-1, -2) / D ** 0.5  # (B, H, T, T)
        if block is not None and block[0] * block[1] < T and i not in dense_layers:
            bs, nb = block
            starts = range(0, T, bs)
            means = torch.stack([k[:, :, j:j + bs].mean(2) for j in starts], 2)  # (B, H, blocks, D)
            chosen = (q @ means.transpose(-1, -2)).topk(nb, -1).indices  # (B, H, T, nb)
            block_of_key = torch.arange(T) // bs
            keep = (block_of_key[None, None, None, :, None] == chosen[..., None, :]).any(-1)
        elif topk == "auto" and i not in dense_layers:
            srt, order = s.sort(dim=-1, descending=True, stable=True)
            n_rest = T - torch.arange(1, T + 1)
            bound = n_rest * torch.exp(srt - torch.logcumsumexp(srt, -1))  # (B, H, T, T) per k = 1..T
            ok = (n_rest == 0) | ((tail_bound > 0) & (bound <= tail_bound))
            k_row = ok.int().argmax(-1, keepdim=True) + 1  # the first k that meets the bound
            keep = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, order, torch.arange(T) < k_row)
        elif topk is not None and topk != "auto" and topk < T and i not in dense_layers:
            keep = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, s.topk(topk, -1).indices, True)
        else:
            keep = None
        if keep is not None:
            if tail == "mean":
                pk = torch.softmax(s, -1) * keep
                rest = (~keep).to(v.dtype)
                vmean = (rest @ v) / rest.sum(-1, keepdim=True).clamp(min=1)  # 0 where every key is kept
                a = pk @ v + (1 - pk.sum(-1, keepdim=True)) * vmean
            else:
                a = torch.softmax(s.masked_fill(~keep, float("-inf")), -1) @ v
        else:
            a = torch.softmax(s, -1) @ v
        a = a.transpose(1, 2).reshape(B, T, C)
        x = F.layer_norm(x + lin(a, "attention.output.dense"), (C,), W[p + "attention.output.LayerNorm.weight"],
                         W[p + "attention.output.LayerNorm.bias"], eps)
        h = F.gelu(lin(x, "intermediate.dense"))
        x = F.layer_norm(x + lin(h, "output.dense"), (C,), W[p + "output.LayerNorm.weight"],
                         W[p + "output.LayerNorm.bias"], eps)
    return x


def random_bert(rng, C=16, H=4, F_=32, L=2, P=40):
    cfg = BertConfig(vocab_size=len(VOCAB), hidden_size=C, num_hidden_layers=L, num_attention_heads=H,
                     intermediate_size=F_, max_position_embeddings=P, layer_norm_eps=1e-12)
    w = {"embeddings.word_embeddings.weight": rng.standard_normal((len(VOCAB), C)),
         "embeddings.position_embeddings.weight": rng.standard_normal((P, C)),
         "embeddings.token_type_embeddings.weight": rng.standard_normal((2, C)),
         "embeddings.LayerNorm.weight": 1 + 0.1 * rng.standard_normal(C),
         "embeddings.LayerNorm.bias": 0.1 * rng.standard_normal(C)}
    for i in range(L):
        p = f"encoder.layer.{i}."
        for name, shape in (("attention.self.query", (C, C)), ("attention.self.key", (C, C)),
                            ("attention.self.value", (C, C)), ("attention.output.dense", (C, C)),
                            ("intermediate.dense", (F_, C)), ("output.dense", (C, F_))):
            w[p + name + ".weight"] = rng.standard_normal(shape) / np.sqrt(shape[1])
            w[p + name + ".bias"] = 0.1 * rng.standard_normal(shape[0])
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            w[p + ln + ".weight"] = 1 + 0.1 * rng.standard_normal(C)
            w[p + ln + ".bias"] = 0.1 * rng.standard_normal(C)
    return cfg, w


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A sentence-transformers style folder holding a random 2-layer BERT and a WordPiece tokenizer."""
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    d = tmp_path_factory.mktemp("bert")
    cfg, w = random_bert(np.random.default_rng(0))
    save_file({k: v.astype(np.float32) for k, v in w.items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({**cfg.__dict__, "model_type": "bert"}))
    (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 12}))
    tok = Tokenizer(WordPiece({t: i for i, t in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.enable_padding(length=20)  # the loader must switch this off
    tok.save(str(d / "tokenizer.json"))
    return d


def test_from_dir_loads_config_tokenizer_and_truncation(model_dir):
    enc = SentenceEncoder.from_dir(model_dir, dtype=np.float64)
    assert enc.max_seq_length == 12 and enc.normalize
    ids = enc.tokenize(["The cat sat on the mat.", "dogs ran far away and then slept, " * 3])
    np.testing.assert_array_equal(ids[0], [2, 4, 5, 6, 7, 4, 8, 15, 3])  # no padding
    assert len(ids[1]) == 12 and ids[1][0] == 2 and ids[1][-1] == 3  # truncated, [SEP] kept
    np.testing.assert_array_equal(ids[1][1:3], [10, 19])  # "dogs" -> dog ##s


@pytest.mark.parametrize("topk", [None, 3, 6])
def test_encoder_matches_torch_oracle_float64(model_dir, topk):
    enc = SentenceEncoder.from_dir(model_dir, dtype=np.float64)
    cfg = enc.encoder.config
    from safetensors.numpy import load_file

    w = {k: v.astype(np.float64) for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    ids = np.stack([enc.tokenize(["the big red dog ran far away and slept"])[0]] * 2)  # (2, 10)
    ids[1, 3] = 22
    got = enc.encoder(ids, topk=topk)
    want = torch_bert(w, cfg, ids, topk=topk).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    if topk is not None:  # top-k really changes the result
        assert np.max(np.abs(got - torch_bert(w, cfg, ids).numpy())) > 1e-3


@pytest.mark.parametrize("topk", [3, 6])
def test_mean_tail_matches_torch_oracle_float64(model_dir, topk):
    enc = SentenceEncoder.from_dir(model_dir, dtype=np.float64)
    from safetensors.numpy import load_file

    w = {k: v.astype(np.float64) for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    ids = enc.tokenize(["the big red dog ran far away and slept"])[0][None]
    got = enc.encoder(ids, topk=topk, tail="mean")
    np.testing.assert_allclose(got, torch_bert(w, enc.encoder.config, ids, topk=topk, tail="mean").numpy(),
                               rtol=1e-10, atol=1e-10)
    assert np.max(np.abs(got - enc.encoder(ids, topk=topk))) > 1e-3  # not plain top-k
    with pytest.raises(ValueError, match="tail must be one of"):
        enc.encoder(ids, topk=topk, tail="median")


def test_dense_layers_keep_chosen_layers_dense(model_dir):
    enc = SentenceEncoder.from_dir(model_dir, dtype=np.float64)
    from safetensors.numpy import load_file

    w = {k: v.astype(np.float64) for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    ids = enc.tokenize(["the big red dog ran far away and slept"])[0][None]
    got = enc.encoder(ids, topk=3, dense_layers=(-1,))
    np.testing.assert_allclose(got, torch_bert(w, enc.encoder.config, ids, topk=3, dense_layers=(1,)).numpy(),
                               rtol=1e-10, atol=1e-10)
    assert np.max(np.abs(got - enc.encoder(ids, topk=3))) > 1e-3
    np.testing.assert_array_equal(enc.encoder(ids, topk=3, dense_layers=(0, 1)), enc.encoder(ids))
    with pytest.raises(ValueError, match=r"dense_layers must hold layer indices in \[-2, 2\), got \(2,\)"):
        enc.encoder(ids, topk=3, dense_layers=(2,))


def test_encode_mean_pools_normalises_and_buckets_without_padding(model_dir):
    enc = SentenceEncoder.from_dir(model_dir, dtype=np.float64)
    from safetensors.numpy import load_file

    w = {k: v.astype(np.float64) for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    texts = ["the cat sat", "a big red ball and a dog", "the dog sat", "cat"]
    got = enc.encode(texts, topk=2, batch_size=1)
    for text, row in zip(texts, got):
        ids = enc.tokenize([text])[0][None]
        h = torch_bert(w, enc.encoder.config, ids, topk=2).numpy()[0].mean(0)
        np.testing.assert_allclose(row, h / np.linalg.norm(h), rtol=1e-10, atol=1e-12)
    # same-length texts batched together give the same vectors as one at a time
    np.testing.assert_allclose(enc.encode(texts, topk=2), got, rtol=1e-12, atol=1e-13)


def test_float32_model_close_to_float64(model_dir):
    e32 = SentenceEncoder.from_dir(model_dir).encode(["the cat sat on the mat"])
    e64 = SentenceEncoder.from_dir(model_dir, dtype=np.float64).encode(["the cat sat on the mat"])
    assert e32.dtype == np.float32
    np.testing.assert_allclose(e32, e64, rtol=0, atol=1e-5)


def test_bad_inputs(model_dir, tmp_path):
    enc = SentenceEncoder.from_dir(model_dir)
    with pytest.raises(TypeError, match="texts must be a list of strings, got a single str"):
        enc.encode("the cat")
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str, got int"):
        enc.encode(["the cat", 3])
    with pytest.raises(ValueError, match="topk must be an integer >= 1 or None, got 0"):
        enc.encode(["the cat"], topk=0)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        enc.encode(["the cat"], batch_size=0)
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 23\)"):
        enc.encoder(np.array([[2, 99]]))
    for bad in (-1, 2):  # -1 silently read type 1 (a negative index wraps), 2 was a bare IndexError
        with pytest.raises(ValueError, match=rf"token_type_ids must lie in \[0, 2\), got range \[{bad}, {bad}\]"):
            enc.encoder(np.array([[2, 3]]), token_type_ids=np.full((1, 2), bad))
    with pytest.raises(ValueError, match="T=41 tokens, more than max_position_embeddings 40"):
        enc.encoder(np.zeros((1, 41), dtype=np.int64))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        SentenceEncoder.from_dir(tmp_path)
    with pytest.raises(ValueError, match="device must be .cpu. or .cuda.") as e:  # not blamed on the weights file
        SentenceEncoder.from_dir(model_dir, device="tpu")
    assert "does not fit" not in str(e.value)
    cfg, w = random_bert(np.random.default_rng(1))
    del w["encoder.layer.1.output.dense.bias"]
    with pytest.raises(ValueError, match="weights lack 'encoder.layer.1.output.dense.bias'"):
        BertEncoder(cfg, w)
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'"):
        BertEncoder(cfg, w, device="tpu")
