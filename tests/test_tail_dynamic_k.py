"""Top-k attention with a mean tail and the certified dynamic k (tail_topk_attention(topk="auto")):
the selection is select_dynamic_topk's (k per row as the float64 reference chooses it), the output
equals the tail reference on that selection, the dropped mass is certified, tail_bound = 0 is dense,
float64 central-difference gradients, bad arguments."""
import numpy as np
import pytest

import topkattn as ta
from topkattn.ops.dense_attention import dense_attention
from topkattn.ops.reference import dynamic_topk_reference, tail_topk_attention_reference
from topkattn.testing import assert_grads_close, directional_grad_check, make_qkv, mask_from_idx, tolerance

GRID = [  # B, H, G, T, S, tail_bound, max_topk, sinks, window, causal
    (2, 2, 1, 6, 6, 0.3, None, 0, 0, False),   # bidirectional (the encoder case), MQA
    (1, 4, 2, 7, 12, 0.1, 5, 1, 1, False),     # cap, sinks + window, GQA
    (2, 4, 2, 5, 9, 0.2, None, 0, 0, True),    # causal, T < S
    (1, 2, 2, 9, 6, 0.05, 3, 1, 0, True),      # T > S: early rows see nothing
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("B,H,G,T,S,eps,max_topk,sinks,window,causal", GRID)
def test_forward_matches_reference(dtype, B, H, G, T, S, eps, max_topk, sinks, window, causal):
    q, k, v = make_qkv(T * S + 7, B, H, G, T, S, 6, 4, dtype)
    kw = dict(causal=causal, sinks=sinks, window=window)
    out, saved = ta.tail_topk_attention_forward(q, k, v, topk="auto", tail_bound=eps, max_topk=max_topk,
                                                chunk_size=2, **kw)
    k_ref, certified, _, true_out = dynamic_topk_reference(q, k, tail_bound=eps, max_topk=max_topk, **kw)
    mask = mask_from_idx(saved.idx, S)  # (B, H, T, S)
    n_forced = min(sinks, S) + min(window, S)
    selected = (saved.idx[..., n_forced:] >= 0).sum(-1)  # (B, H, T)
    np.testing.assert_array_equal(selected, k_ref)
    np.testing.assert_allclose(out, tail_topk_attention_reference(q, k, v, topk=1, mask=mask, **kw),
                               **tolerance(dtype))
    # the kept mass is certified: the dropped one is at most eps wherever the row is certified
    assert (true_out[certified] <= eps * (1 + 1e-5) + 1e-7).all()
    if max_topk is None:
        assert certified.all()
    # the same selection as plain dynamic k
    _, plain = ta.topk_attention_forward(q, k, v, topk="auto", tail_bound=eps, max_topk=max_topk, **kw)
    np.testing.assert_array_equal(saved.idx, plain.idx)


@pytest.mark.parametrize("causal", [True, False])
def test_zero_tail_bound_is_dense(causal):
    q, k, v = make_qkv(3, 2, 4, 2, 6, 6, 6, 4)
    np.testing.assert_allclose(ta.tail_topk_attention(q, k, v, topk="auto", tail_bound=0.0, causal=causal),
                               dense_attention(q, k, v, causal=causal), rtol=1e-12, atol=1e-12)


def test_closer_to_dense_than_plain_dynamic_k():
    """A loose bound keeps few keys; the mean tail recovers most of what plain dynamic k drops."""
    q, k, v = make_qkv(5, 1, 2, 2, 32, 32, 4, 4)
    q *= 0.5
    dense = dense_attention(q, k, v, causal=False)
    kw = dict(topk="auto", tail_bound=0.6, causal=False)
    _, saved = ta.topk_attention_forward(q, k, v, **kw)
    assert (saved.idx >= 0).sum(-1).mean() < 0.75 * 32  # the bound dropped keys
    err_tail = np.abs(ta.tail_topk_attention(q, k, v, **kw) - dense).mean()
    err_plain = np.abs(ta.topk_attention(q, k, v, **kw) - dense).mean()
    assert err_tail < 0.5 * err_plain


@pytest.mark.parametrize("causal", [True, False])
def test_gradients_by_central_differences(causal):
    """float64 central differences along random directions; the dynamic selection must not flip."""
    q, k, v = make_qkv(11, 2, 4, 2, 6, 8, 5, 3)
    kw = dict(topk="auto", tail_bound=0.3, causal=causal, sinks=1)
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


def test_bad_arguments():
    q, k, v = make_qkv(1, 1, 2, 2, 4, 4, 4, 4)
    with pytest.raises(ValueError, match="needs tail_bound"):
        ta.tail_topk_attention(q, k, v, topk="auto")
    with pytest.raises(ValueError, match="tail_bound must be"):
        ta.tail_topk_attention(q, k, v, topk="auto", tail_bound=-0.1)
    with pytest.raises(ValueError, match="tail_bound must be"):
        ta.tail_topk_attention(q, k, v, topk="auto", tail_bound=1.0)
    with pytest.raises(ValueError, match="max_topk must be"):
        ta.tail_topk_attention(q, k, v, topk="auto", tail_bound=0.1, max_topk=0)
    with pytest.raises(ValueError, match="apply only with topk='auto'"):
        ta.tail_topk_attention(q, k, v, topk=2, tail_bound=0.1)
    with pytest.raises(TypeError, match="topk must be an integer"):
        ta.tail_topk_attention(q, k, v, topk="many")
