"""Top-k attention with a mean tail: against the float64 reference, dense at topk >= S,
central-difference gradients, large logits, bad input."""
import numpy as np
import pytest

import topkattn as ta
from topkattn.ops.dense_attention import dense_attention
from topkattn.ops.reference import tail_topk_attention_reference, topk_attention_reference

TOL = {np.float64: dict(rtol=1e-10, atol=1e-12), np.float32: dict(rtol=2e-4, atol=2e-5)}


def qkv(B=1, H=2, G=2, T=5, S=9, D=6, Dv=4, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, H, T, D)).astype(dtype), rng.standard_normal((B, G, S, D)).astype(dtype),
            rng.standard_normal((B, G, S, Dv)).astype(dtype))


GRID = [  # B, H, G, T, S, topk, sinks, window, causal
    (2, 4, 2, 5, 9, 3, 0, 0, True),     # T < S, GQA
    (1, 2, 2, 8, 8, 3, 0, 0, True),     # T == S
    (1, 4, 1, 1, 12, 4, 0, 0, True),    # T = 1, MQA
    (1, 2, 2, 7, 10, 2, 2, 1, True),    # sinks + window
    (2, 2, 1, 6, 6, 2, 1, 1, False),    # bidirectional (the encoder case)
    (1, 2, 2, 9, 6, 2, 0, 0, True),     # T > S: early rows see nothing
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("B,H,G,T,S,topk,sinks,window,causal", GRID)
def test_forward_matches_reference(dtype, B, H, G, T, S, topk, sinks, window, causal):
    q, k, v = qkv(B, H, G, T, S, dtype=dtype, seed=T * S + topk)
    kw = dict(topk=topk, causal=causal, sinks=sinks, window=window)
    out, saved = ta.tail_topk_attention_forward(q, k, v, chunk_size=2, **kw)
    assert out.dtype == dtype and out.shape == (B, H, T, v.shape[-1])
    np.testing.assert_allclose(out, tail_topk_attention_reference(q, k, v, **kw), **TOL[dtype])
    # the selection is top-k attention's, and differs from it in the output
    _, mask, _ = topk_attention_reference(q, k, v, **kw)
    assert (saved.idx >= 0).sum() == mask.sum()
    plain = ta.topk_attention(q, k, v, **kw)
    assert np.abs(out - plain).max() > 1e-3


@pytest.mark.parametrize("causal", [True, False])
def test_topk_covering_every_key_is_dense(causal):
    q, k, v = qkv(2, 4, 2, 6, 6, seed=3)
    np.testing.assert_allclose(ta.tail_topk_attention(q, k, v, topk=6, causal=causal),
                               dense_attention(q, k, v, causal=causal), rtol=1e-12, atol=1e-12)


def test_closer_to_dense_than_plain_topk_on_flat_rows():
    """Many near-equal scores (a flat head): the mean tail recovers most of the dropped mass."""
    q, k, v = qkv(1, 2, 2, 32, 32, D=4, seed=5)
    q *= 0.2
    dense = dense_attention(q, k, v, causal=False)
    err_tail = np.abs(ta.tail_topk_attention(q, k, v, topk=4, causal=False) - dense).mean()
    err_plain = np.abs(ta.topk_attention(q, k, v, topk=4, causal=False) - dense).mean()
    assert err_tail < 0.3 * err_plain


@pytest.mark.parametrize("causal,sinks,window", [(True, 0, 0), (True, 1, 2), (False, 0, 1)])
def test_gradients_by_central_differences(causal, sinks, window):
    """float64 central differences along random directions; the selection must not flip."""
    q, k, v = qkv(2, 4, 2, 6, 8, D=5, Dv=3, seed=11)
    kw = dict(topk=3, causal=causal, sinks=sinks, window=window)
    out, saved = ta.tail_topk_attention_forward(q, k, v, chunk_size=4, **kw)
    rng = np.random.default_rng(0)
    R = rng.standard_normal(out.shape)
    dq, dk, dv = ta.tail_topk_attention_backward(R, saved)
    eps = 1e-6
    for name, arr, grad in (("q", q, dq), ("k", k, dk), ("v", v, dv)):
        for _ in range(3):
            d = rng.standard_normal(arr.shape)
            plus, minus = arr + eps * d, arr - eps * d
            args_p = {"q": q, "k": k, "v": v, name: plus}
            args_m = {"q": q, "k": k, "v": v, name: minus}
            op, sp = ta.tail_topk_attention_forward(args_p["q"], args_p["k"], args_p["v"], **kw)
            om, sm = ta.tail_topk_attention_forward(args_m["q"], args_m["k"], args_m["v"], **kw)
            assert np.array_equal(sp.idx, saved.idx) and np.array_equal(sm.idx, saved.idx)
            num = ((op - om) * R).sum() / (2 * eps)
            np.testing.assert_allclose((grad * d).sum(), num, rtol=1e-6, atol=1e-8, err_msg=name)
    # unlike plain top-k, every visible key gets gradient: the tail weight depends on all scores
    assert (np.abs(dk).sum(-1) > 0).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_large_logits_are_finite(dtype):
    q, k, v = qkv(1, 2, 2, 6, 8, dtype=dtype, seed=4)
    q *= dtype(1e4)
    out, saved = ta.tail_topk_attention_forward(q, k, v, topk=3, scale=1.0)
    assert np.isfinite(out).all() and np.isfinite(saved.lse).all()
    np.testing.assert_allclose(out, tail_topk_attention_reference(q, k, v, topk=3, scale=1.0),
                               rtol=1e-4, atol=1e-4)
    assert all(np.isfinite(g).all() for g in ta.tail_topk_attention_backward(np.ones_like(out), saved))


def test_bad_input():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="topk"):
        ta.tail_topk_attention(q, k, v, topk=0)
    with pytest.raises(ValueError, match="window"):
        ta.tail_topk_attention(q, k, v, topk=2, window=-1)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        ta.tail_topk_attention(q[:, :1].repeat(3, 1), k, v, topk=2)
    with pytest.raises(TypeError, match="dtype"):
        ta.tail_topk_attention(q.astype(np.float32), k, v, topk=2)
    out, saved = ta.tail_topk_attention_forward(q, k, v, topk=2)
    with pytest.raises(ValueError, match="dout must have shape"):
        ta.tail_topk_attention_backward(out[..., :2], saved)
    with pytest.raises(TypeError, match="saved"):
        ta.tail_topk_attention_backward(out, ta.topk_attention_forward(q, k, v, topk=2)[1])
