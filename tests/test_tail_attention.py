"""Top-k attention with a mean tail: against the float64 reference, dense at topk >= S,
central-difference gradients, large logits, bad input."""
import numpy as np
import pytest

import topkattn as ta
from topkattn.ops.dense_attention import dense_attention
from topkattn.ops.reference import tail_topk_attention_reference, topk_attention_reference
from topkattn.testing import assert_grads_close, directional_grad_check, make_qkv, tolerance

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
    q, k, v = make_qkv(T * S + topk, B, H, G, T, S, 6, 4, dtype)
    kw = dict(topk=topk, causal=causal, sinks=sinks, window=window)
    out, saved = ta.tail_topk_attention_forward(q, k, v, chunk_size=2, **kw)
    assert out.dtype == dtype and out.shape == (B, H, T, v.shape[-1])
    np.testing.assert_allclose(out, tail_topk_attention_reference(q, k, v, **kw), **tolerance(dtype))
    # the selection is top-k attention's, and differs from it in the output
    _, mask, _ = topk_attention_reference(q, k, v, **kw)
    assert (saved.idx >= 0).sum() == mask.sum()
    plain = ta.topk_attention(q, k, v, **kw)
    assert np.abs(out - plain).max() > 1e-3


@pytest.mark.parametrize("causal", [True, False])
def test_topk_covering_every_key_is_dense(causal):
    q, k, v = make_qkv(3, 2, 4, 2, 6, 6, 6, 4)
    np.testing.assert_allclose(ta.tail_topk_attention(q, k, v, topk=6, causal=causal),
                               dense_attention(q, k, v, causal=causal), rtol=1e-12, atol=1e-12)


def test_closer_to_dense_than_plain_topk_on_flat_rows():
    """Many near-equal scores (a flat head): the mean tail recovers most of the dropped mass."""
    q, k, v = make_qkv(5, 1, 2, 2, 32, 32, 4, 4)
    q *= 0.2
    dense = dense_attention(q, k, v, causal=False)
    err_tail = np.abs(ta.tail_topk_attention(q, k, v, topk=4, causal=False) - dense).mean()
    err_plain = np.abs(ta.topk_attention(q, k, v, topk=4, causal=False) - dense).mean()
    assert err_tail < 0.3 * err_plain


@pytest.mark.parametrize("causal,sinks,window", [(True, 0, 0), (True, 1, 2), (False, 0, 1)])
def test_gradients_by_central_differences(causal, sinks, window):
    """float64 central differences along random directions; the selection must not flip."""
    q, k, v = make_qkv(11, 2, 4, 2, 6, 8, 5, 3)
    kw = dict(topk=3, causal=causal, sinks=sinks, window=window)
    out, saved = ta.tail_topk_attention_forward(q, k, v, chunk_size=4, **kw)
    rng = np.random.default_rng(0)
    R = rng.standard_normal(out.shape)
    dq, dk, dv = ta.tail_topk_attention_backward(R, saved)

    def loss():
        o, s = ta.tail_topk_attention_forward(q, k, v, **kw)
        assert np.array_equal(s.idx, saved.idx)
        return float((o * R).sum())

    for _ in range(3):
        assert_grads_close(directional_grad_check(loss, dict(q=q, k=k, v=v), dict(q=dq, k=dk, v=dv), rng))
    # unlike plain top-k, every visible key gets gradient: the tail weight depends on all scores
    assert (np.abs(dk).sum(-1) > 0).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_large_logits_are_finite(dtype):
    q, k, v = make_qkv(4, 1, 2, 2, 6, 8, 6, 4, dtype)
    q *= dtype(1e4)
    out, saved = ta.tail_topk_attention_forward(q, k, v, topk=3, scale=1.0)
    assert np.isfinite(out).all() and np.isfinite(saved.lse).all()
    np.testing.assert_allclose(out, tail_topk_attention_reference(q, k, v, topk=3, scale=1.0),
                               rtol=1e-4, atol=1e-4)
    assert all(np.isfinite(g).all() for g in ta.tail_topk_attention_backward(np.ones_like(out), saved))


def test_bad_input():
    q, k, v = make_qkv(0, D=6, Dv=4)
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
