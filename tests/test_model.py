"""The Transformer: whole-stack float64 gradient checks, decoding equal to the causal forward,
config round trip, seeded init, flat param names shared with the layers, bad input."""
import json
import re

import numpy as np
import pytest

from topkattn.layers import softmax_cross_entropy
from topkattn.model import Transformer, TransformerConfig
from topkattn.testing import assert_grads_close, directional_grad_check

V = 13
BASE = dict(vocab_size=V, d_model=16, n_layers=2, n_heads=4, q_lora_rank=8, kv_lora_rank=8,
            qk_nope_dim=4, qk_rope_dim=4, v_head_dim=4, d_ff=20, dtype="float64")
CONFIGS = {
    "mla-dense": dict(),
    "mla-topk-persistent-window-forget": dict(topk=3, persistent_tokens=2, window=2, forget_rate=0.3),
    "gqa-moe-untied": dict(attention="mha", n_kv_heads=2, ffn="moe", tie_embeddings=False, topk=4,
                           aux_loss_weight=0.5),
    "mqa-dense-sigma": dict(attention="mha", n_kv_heads=1, head_dim=6, v_head_dim=3),
}


def _model(name, **over):
    return Transformer(TransformerConfig(**{**BASE, **CONFIGS[name], **over}))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_model_gradients_through_the_whole_stack(name):
    rng = np.random.default_rng(0)
    m = _model(name)
    tok = rng.integers(0, V, (2, 7))
    tgt = rng.integers(0, V, (2, 7))
    tgt[0, 0] = -100

    def loss():
        logits = m.forward(tok, seed=11)
        return softmax_cross_entropy(logits, tgt)[0] + m.aux_loss

    logits = m.forward(tok, seed=11)
    _, dlogits = softmax_cross_entropy(logits, tgt)
    assert m.backward(dlogits) is None
    analytic = {n: g.copy() for n, g in m.grads.items()}
    res = directional_grad_check(loss, m.params, analytic, rng)
    assert_grads_close(res, rtol=1e-6, atol=1e-9)
    assert set(res) == set(m.params)
    if CONFIGS[name].get("ffn") == "moe":
        assert m.aux_loss > 0
        np.testing.assert_allclose(m.aux_loss, 0.5 * sum(b.ffn.aux_loss for b in m.blocks), rtol=1e-14)
    else:
        assert m.aux_loss == 0.0


@pytest.mark.parametrize("name", list(CONFIGS))
def test_model_decode_equals_forward(name):
    m = _model(name).eval()  # decoding never forgets; compare with a forward that does not either
    tok = np.random.default_rng(1).integers(0, V, (2, 8))
    logits = m.forward(tok)
    cache = m.init_cache(2)
    steps = np.concatenate([m.step(tok[:, t:t + 1], cache) for t in range(8)], axis=1)
    np.testing.assert_allclose(steps, logits, rtol=1e-5, atol=1e-12)
    if m.cfg.attention == "mla":
        assert all(c.floats_per_token == m.cfg.kv_lora_rank + m.cfg.qk_rope_dim for c in cache)


def test_backward_overwrites_grads_and_params_are_shared():
    m = _model("mla-dense")
    tok = np.random.default_rng(2).integers(0, V, (1, 5))
    d = np.random.default_rng(3).standard_normal((1, 5, V))
    m.forward(tok)
    m.backward(d)
    g1 = {n: g.copy() for n, g in m.grads.items()}
    m.forward(tok)
    m.backward(d)
    for n in g1:
        np.testing.assert_array_equal(m.grads[n], g1[n])
    # the flat dict holds the layers' own arrays: an in-place update changes the model
    assert m.params["blocks.0.attn.W_DQ"] is m.blocks[0].attn.params["W_DQ"]
    assert m.grads["blocks.1.ffn.W2"] is m.blocks[1].ffn.grads["W2"]
    before = m.forward(tok)
    m.params["embed.weight"] *= 2.0
    assert np.abs(m.forward(tok) - before).max() > 1e-3


def test_param_names_and_seeded_init():
    m = _model("mla-dense")
    names = list(m.params)
    assert names[0] == "embed.weight" and "head.weight" not in names
    assert {"blocks.0.attn.W_DQ", "blocks.0.attn.W_UK", "blocks.1.attn_norm.weight", "blocks.1.ffn.W1",
            "norm.weight"} <= set(names)
    assert "head.weight" in _model("gqa-moe-untied").params
    assert "blocks.0.ffn.experts.3.W2" in _model("gqa-moe-untied").params
    assert set(m.grads) == set(m.params)
    same = _model("mla-dense")
    other = _model("mla-dense", seed=1)
    for n, p in m.params.items():
        np.testing.assert_array_equal(p, same.params[n])
        assert p.dtype == np.float64
    assert not np.array_equal(m.params["blocks.0.attn.W_DQ"], other.params["blocks.0.attn.W_DQ"])
    # every layer gets its own stream: the two blocks' weights differ
    assert not np.array_equal(m.params["blocks.0.attn.W_DQ"], m.params["blocks.1.attn.W_DQ"])
    assert m.n_params() == sum(p.size for p in m.params.values())


def test_forgetting_seeded_per_call_and_off_in_eval():
    m = _model("mla-topk-persistent-window-forget")
    tok = np.random.default_rng(4).integers(0, V, (2, 9))
    a, b, c = m.forward(tok, seed=3), m.forward(tok, seed=3), m.forward(tok, seed=4)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-8
    s = m.layer_seeds(3)
    assert len(set(s)) == 2 and s == m.layer_seeds(3)
    m.eval()
    np.testing.assert_array_equal(m.forward(tok, seed=3), m.forward(tok, seed=4))
    ref = _model("mla-topk-persistent-window-forget", forget_rate=0.0)
    np.testing.assert_allclose(m.forward(tok, seed=3), ref.forward(tok), rtol=1e-13)


def test_config_round_trip_and_validation():
    cfg = TransformerConfig(**{**BASE, **CONFIGS["gqa-moe-untied"]})
    d = json.loads(json.dumps(cfg.to_dict()))
    assert TransformerConfig.from_dict(d) == cfg
    m1, m2 = Transformer(cfg), Transformer(d)
    for n in m1.params:
        np.testing.assert_array_equal(m1.params[n], m2.params[n])
    with pytest.raises(ValueError, match=r"unknown TransformerConfig keys: \['bogus'\]"):
        TransformerConfig.from_dict({**d, "bogus": 1})
    with pytest.raises(ValueError, match="attention must be 'mla' or 'mha', got 'gpt'"):
        TransformerConfig(vocab_size=5, attention="gpt")
    with pytest.raises(ValueError, match="topk must be an integer >= 1, got 0"):
        TransformerConfig(vocab_size=5, topk=0)
    with pytest.raises(ValueError, match=r"forget_rate must be in \[0, 1\), got 1.0"):
        TransformerConfig(vocab_size=5, forget_rate=1.0)
    with pytest.raises(TypeError, match="dtype must be 'float32' or 'float64'"):
        TransformerConfig(vocab_size=5, dtype="int8")


def test_model_bad_input():
    m = _model("mla-dense")
    with pytest.raises(ValueError, match="tokens must be 2-D"):
        m.forward(np.zeros(4, dtype=np.int64))
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, 13\)"):
        m.forward(np.full((1, 2), 13))
    cache = m.init_cache(2)
    with pytest.raises(ValueError, match="x_t has batch 1 but the cache was made for batch 2"):
        m.step(np.zeros((1, 1), dtype=np.int64), cache)
    with pytest.raises(ValueError, match=r"tokens_t must have shape \(B, 1\)"):
        m.step(np.zeros((2, 3), dtype=np.int64), cache)
    with pytest.raises(TypeError, match="cache must come from this model's init_cache"):
        m.step(np.zeros((2, 1), dtype=np.int64), cache[:1])


def test_to_device_numpy_and_float32_forward():
    m = Transformer(TransformerConfig(**{**BASE, "dtype": "float32", "topk": 2}))
    tok = np.random.default_rng(5).integers(0, V, (1, 6))
    before = m.forward(tok)
    assert before.dtype == np.float32
    m.to_device(np)
    np.testing.assert_array_equal(m.forward(tok), before)
    assert m.params["embed.weight"] is m.embed.params["weight"]


def test_to_device_cupy_matches_numpy():
    cp = pytest.importorskip("cupy")
    try:
        cp.cuda.runtime.getDeviceCount()
    except Exception:
        pytest.skip("no CUDA device")
    m = _model("mla-topk-persistent-window-forget").eval()
    tok = np.random.default_rng(6).integers(0, V, (2, 6))
    want = m.forward(tok)
    _, d = softmax_cross_entropy(want, tok)
    m.backward(d)
    g = {n: x.copy() for n, x in m.grads.items()}
    m.to_device(cp)
    got = m.forward(cp.asarray(tok))
    np.testing.assert_allclose(cp.asnumpy(got), want, rtol=1e-10, atol=1e-12)
    m.backward(cp.asarray(d))
    for n in g:
        np.testing.assert_allclose(cp.asnumpy(m.grads[n]), g[n], rtol=1e-8, atol=1e-10)
    cache = m.init_cache(2)
    steps = cp.concatenate([m.step(cp.asarray(tok[:, t:t + 1]), cache) for t in range(6)], axis=1)
    np.testing.assert_allclose(cp.asnumpy(steps), want, rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("name", ["mla-dense", "gqa-moe-untied"])
def test_backward_checks_dlogits_against_the_logits(name):
    """A transposed (T, B, V) dlogits used to fail deep in a layer (or, with other sizes, give
    wrong gradients); now a ValueError naming dlogits, before any gradient is touched."""
    m = _model(name)
    tokens = np.random.default_rng(1).integers(0, V, (2, 3))
    logits = m.forward(tokens)
    m.backward(np.ones_like(logits))
    before = {n: g.copy() for n, g in m.grads.items()}
    with pytest.raises(ValueError, match=re.escape(f"dlogits must have the shape of the forward output, (2, 3, {V}), "
                                                   f"got (3, 2, {V})")):
        m.backward(np.ascontiguousarray(logits.swapaxes(0, 1)))
    with pytest.raises(TypeError, match="dlogits must be a float array, got int64"):
        m.backward(np.ones(logits.shape, np.int64))
    assert all(np.array_equal(before[n], g) for n, g in m.grads.items())  # not zeroed by the refused call
    with pytest.raises(RuntimeError, match="Transformer.backward called before forward"):
        _model(name).backward(logits)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("shape", [(0, 4), (2, 0), (0, 0)])
def test_empty_batch_or_sequence_through_the_model(name, shape):
    m = _model(name)
    logits = m.forward(np.zeros(shape, np.int64), seed=3)
    assert logits.shape == (*shape, V)
    loss, dlogits = softmax_cross_entropy(logits, np.zeros(shape, np.int64))
    assert loss == 0.0
    m.backward(dlogits)
    assert all(not g.any() for g in m.grads.values())


@pytest.mark.parametrize("value, exc", [(0, ValueError), (-5, ValueError), (1, ValueError),
                                        (float("nan"), ValueError), (float("inf"), ValueError), ("1e4", TypeError)])
def test_config_refuses_a_bad_rope_base(value, exc):
    with pytest.raises(exc, match="rope_base must be"):
        TransformerConfig(vocab_size=5, rope_base=value)
