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


@pytest.mark.parametrize("where", ["k", "v"])
@pytest.mark.parametrize("special", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_future_nonfinite_stays_in_the_rows_that_see_it(where, special, chunk_size):
    """The reported leak: a NaN in the value of key 4 made every earlier row NaN (0 * NaN
    under the causal mask, and in the prefix sums of the tail mean).  Rows 0-3 and their
    gradients must equal the clean run; dk, dv stay finite."""
    q, k, v = make_qkv(31, 1, 2, 1, 6, 6, 4, 4)
    (k if where == "k" else v)[0, 0, 4, 0] = special
    out, saved = ta.tail_topk_attention_forward(q, k, v, topk=2, chunk_size=chunk_size)
    want = tail_topk_attention_reference(q, k, v, topk=2)
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-14, equal_nan=True)
    assert np.isfinite(out[:, :, :4]).all()
    clean = [a.copy() for a in (q, k, v)]
    clean[1 if where == "k" else 2][0, 0, 4, 0] = 0.0
    np.testing.assert_allclose(out[:, :, :4], tail_topk_attention_reference(*clean, topk=2)[:, :, :4],
                               rtol=1e-12)
    dout = np.random.default_rng(0).standard_normal(out.shape)
    dq, dk, dv = ta.tail_topk_attention_backward(dout, saved)
    live = np.isfinite(out).all(-1)  # (B, H, T)
    assert np.isnan(dq[~live]).all() and np.isfinite(dq[live]).all()
    assert np.isfinite(dk).all() and np.isfinite(dv).all()
    _, s_clean = ta.tail_topk_attention_forward(*clean, topk=2, chunk_size=chunk_size)
    cq, ck, cv = ta.tail_topk_attention_backward(np.where(live[..., None], dout, 0.0), s_clean)
    np.testing.assert_allclose(dq[:, :, :4], cq[:, :, :4], rtol=1e-11, atol=1e-13)
    if not live[:, :, 4:].any():  # rows 4, 5 are NaN rows: they send nothing, as if absent
        np.testing.assert_allclose(dk, ck, rtol=1e-11, atol=1e-13)
        np.testing.assert_allclose(dv, cv, rtol=1e-11, atol=1e-13)


def test_nan_query_row_stays_in_its_row():
    q, k, v = make_qkv(32, 1, 2, 2, 5, 7, 4, 3)
    q[0, 1, 2, 0] = np.nan
    out, saved = ta.tail_topk_attention_forward(q, k, v, topk=2)
    np.testing.assert_allclose(out, tail_topk_attention_reference(q, k, v, topk=2), rtol=1e-12,
                               equal_nan=True)
    bad = np.zeros(out.shape[:3], dtype=bool)
    bad[0, 1, 2] = True
    assert np.isnan(out[bad]).all() and np.isfinite(out[~bad]).all()
    dq, dk, dv = ta.tail_topk_attention_backward(np.where(bad[..., None], np.nan, np.ones_like(out)), saved)
    assert np.isnan(dq[bad]).all() and np.isfinite(dq[~bad]).all()
    assert np.isfinite(dk).all() and np.isfinite(dv).all()


def test_rows_whose_scores_are_all_minus_inf_give_zeros():
    q, k, v = make_qkv(33, 1, 1, 1, 4, 4, 3, 2)
    q[0, 0, 3] = [-np.inf, 0.0, 0.0]
    k[0, 0, :, 0] = np.abs(k[0, 0, :, 0]) + 0.1  # every score of row 3 is -inf
    out, saved = ta.tail_topk_attention_forward(q, k, v, topk=2)
    np.testing.assert_allclose(out, tail_topk_attention_reference(q, k, v, topk=2), rtol=1e-12)
    assert (out[0, 0, 3] == 0).all() and saved.lse[0, 0, 3] == -np.inf
    grads = ta.tail_topk_attention_backward(np.ones_like(out), saved)
    assert all(np.isfinite(g).all() for g in grads) and (grads[0][0, 0, 3] == 0).all()
