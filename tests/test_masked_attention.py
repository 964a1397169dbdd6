"""ops.masked_attention (the dense-tile attend stage for short sequences) against the float64
reference and the gather path (sparse_attention), forward and backward, with non-finite
inputs, empty slots, GQA and chunking; central differences in float64."""
import numpy as np
import pytest

from topkattn.ops import masked_attention as ma
from topkattn.ops import sparse_attention as sa
from topkattn.ops.reference import masked_attention_grad_reference, masked_attention_reference
from topkattn.ops.selection import select_topk
from topkattn.testing import assert_grads_close, directional_grad_check, make_qkv, mask_from_idx, tolerance


def selection(q, k, topk, sinks=0, window=0, forget_rate=0.0, seed=None):
    return select_topk(q, k, topk=topk, causal=True, scale=1 / np.sqrt(q.shape[-1]), sinks=sinks,
                       window=window, forget_rate=forget_rate, seed=seed)


CASES = [  # B, H, G, T, S, D, Dv, topk, sinks, window, forget_rate
    (2, 4, 4, 9, 9, 6, 5, 3, 0, 0, 0.0),
    (1, 4, 2, 7, 11, 8, 8, 4, 2, 1, 0.0),   # GQA, S > T (queries at the end), sinks and window
    (2, 2, 1, 6, 6, 4, 3, 2, 0, 0, 0.5),    # MQA, forgetful masking
    (1, 2, 2, 5, 5, 4, 4, 8, 0, 0, 0.0),    # topk > S: empty slots in every row
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_forward_backward_match_reference_and_gather_path(case, dtype, chunk_size):
    B, H, G, T, S, D, Dv, topk, sinks, window, fr = case
    rng = np.random.default_rng(sum(case[:8]))
    q, k, v = make_qkv(rng, B, H, G, T, S, D, Dv, dtype=dtype)
    idx = selection(q, k, topk, sinks, window, fr, seed=3)
    scale = 1 / np.sqrt(D)
    out, saved = ma.masked_attention_forward(q, k, v, idx, scale, chunk_size=chunk_size)
    mask = mask_from_idx(idx, S)
    tol = tolerance(dtype)
    np.testing.assert_allclose(out, masked_attention_reference(q, k, v, mask, scale), **tol)
    g_out, g_saved = sa.sparse_attention_forward(q, k, v, idx, scale)
    np.testing.assert_allclose(out, g_out, **tol)
    np.testing.assert_allclose(saved.lse, g_saved.lse, **tol)
    assert out.dtype == dtype and saved.lse.dtype == dtype
    dout = rng.standard_normal(out.shape).astype(dtype)
    grads = ma.masked_attention_backward(dout, saved)
    want = masked_attention_grad_reference(q, k, v, mask, scale, dout)
    gather = sa.sparse_attention_backward(dout, g_saved)
    for name, g, w, gg in zip("qkv", grads, want, gather):
        assert g.dtype == dtype, name
        np.testing.assert_allclose(g, w, err_msg=f"d{name}", **tol)
        np.testing.assert_allclose(g, gg, err_msg=f"d{name} vs gather", **tol)
    sel_keys = mask.any((1, 2)) if G == 1 else None
    if sel_keys is not None:  # keys no row selected get exactly zero gradient
        assert not grads[1][:, 0][~sel_keys].any() and not grads[2][:, 0][~sel_keys].any()


def test_central_differences_float64():
    rng = np.random.default_rng(7)
    B, H, G, T, S, D, Dv, topk = 1, 2, 2, 6, 6, 5, 4, 3
    q, k, v = make_qkv(rng, B, H, G, T, S, D, Dv)
    idx = selection(q, k, topk)  # the selection is held fixed: the op's gradient is w.r.t. q, k, v
    dout = rng.standard_normal((B, H, T, Dv))

    def loss():
        return float(np.sum(ma.masked_attention_forward(q, k, v, idx, 0.4)[0] * dout))

    _, saved = ma.masked_attention_forward(q, k, v, idx, 0.4)
    dq, dk, dv = ma.masked_attention_backward(dout, saved)
    res = directional_grad_check(loss, {"q": q, "k": k, "v": v}, {"q": dq, "k": dk, "v": dv}, rng)
    assert_grads_close(res, rtol=1e-6, atol=1e-9)


def test_non_finite_inputs_follow_the_reference_rule():
    rng = np.random.default_rng(11)
    B, H, G, T, S, D, Dv = 1, 2, 2, 6, 6, 4, 3
    q, k, v = make_qkv(rng, B, H, G, T, S, D, Dv)
    idx = selection(q, k, 2)
    v[0, 0, 3] = np.nan  # only rows selecting key 3 of head 0 may see it
    k[0, 1, 4, 0] = np.inf  # head 1's key 4 scores +-inf
    q[0, 0, 5, 1] = np.nan  # a NaN query row
    idx[0, 1, 2] = [1, -1]  # an empty slot
    idx[0, 1, 1] = [-1, -1]  # a row that selects nothing
    mask = mask_from_idx(idx, S)
    with np.errstate(invalid="ignore", over="ignore"):
        out, saved = ma.masked_attention_forward(q, k, v, idx, 0.5)
        want = masked_attention_reference(q, k, v, mask, 0.5)
        np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)  # NaN where the reference has NaN
        g_out, g_saved = sa.sparse_attention_forward(q, k, v, idx, 0.5)
        np.testing.assert_array_equal(np.isnan(saved.lse), np.isnan(g_saved.lse))
        assert saved.lse[0, 1, 1] == -np.inf and not out[0, 1, 1].any()
        dout = rng.standard_normal(out.shape)
        grads = ma.masked_attention_backward(dout, saved)
        want_g = masked_attention_grad_reference(q, k, v, mask, 0.5, dout)
    for name, g, w in zip("qkv", grads, want_g):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12, err_msg=f"d{name}")
    assert np.isnan(grads[0][0, 0, 5]).all()  # the NaN row's dq is NaN ...
    assert np.isfinite(grads[1]).all() and np.isfinite(grads[2]).all()  # ... and it sends nothing


def test_infinite_dout_reaches_only_the_selected_keys_of_its_row():
    rng = np.random.default_rng(13)
    q, k, v = make_qkv(rng, 1, 2, 2, 6, 6, 4, 3)
    idx = selection(q, k, 2)
    _, saved = ma.masked_attention_forward(q, k, v, idx, 0.5)
    _, g_saved = sa.sparse_attention_forward(q, k, v, idx, 0.5)
    dout = rng.standard_normal((1, 2, 6, 3))
    dout[0, 1, 4, 0] = np.inf
    with np.errstate(invalid="ignore", over="ignore"):
        grads = ma.masked_attention_backward(dout, saved)
        want = masked_attention_grad_reference(q, k, v, mask_from_idx(idx, 6), 0.5, dout)
        gather = sa.sparse_attention_backward(dout, g_saved)
    for name, g, w, gg in zip("qkv", grads, want, gather):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12, err_msg=f"d{name}")
        np.testing.assert_allclose(g, gg, rtol=1e-12, atol=1e-12, err_msg=f"d{name} vs gather")
    unselected = ~mask_from_idx(idx, 6)[0, 1].any(0)  # keys row (1, *) never selects: gradient exactly 0
    assert not grads[1][0, 1, unselected].any() and not grads[2][0, 1, unselected].any()


def test_finite_inputs_with_a_row_selecting_nothing():
    rng = np.random.default_rng(17)
    q, k, v = make_qkv(rng, 2, 2, 1, 6, 6, 4, 3)
    idx = selection(q, k, 3)
    idx[1, 0, 4] = -1  # selects nothing: out 0, lse -inf, no gradient anywhere
    out, saved = ma.masked_attention_forward(q, k, v, idx, 0.5)
    mask = mask_from_idx(idx, 6)
    np.testing.assert_allclose(out, masked_attention_reference(q, k, v, mask, 0.5), rtol=1e-12, atol=1e-12)
    assert saved.lse[1, 0, 4] == -np.inf and not out[1, 0, 4].any()
    dout = rng.standard_normal(out.shape)
    for g, w in zip(ma.masked_attention_backward(dout, saved),
                    masked_attention_grad_reference(q, k, v, mask, 0.5, dout)):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)


def test_gather_backward_accepts_the_saved_state():
    rng = np.random.default_rng(5)
    q, k, v = make_qkv(rng, 2, 2, 2, 5, 5, 4, 4)
    idx = selection(q, k, 2)
    out, saved = ma.masked_attention_forward(q, k, v, idx, 0.5)
    dout = rng.standard_normal(out.shape)
    for a, b in zip(sa.sparse_attention_backward(dout, saved), ma.masked_attention_backward(dout, saved)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_backward_refuses_foreign_saved_state():
    rng = np.random.default_rng(5)
    q, k, v = make_qkv(rng, 1, 2, 2, 4, 4, 4, 4)
    _, g_saved = sa.sparse_attention_forward(q, k, v, selection(q, k, 2), 0.5)
    with pytest.raises(TypeError, match="masked_attention_forward"):
        ma.masked_attention_backward(np.zeros((1, 2, 4, 4)), g_saved)


def test_masked_is_cheaper_rule():
    assert ma.masked_is_cheaper(64, 8, 24, 16)  # train-toy default: S = 64, K (D + Dv) = 320
    assert ma.masked_is_cheaper(256, 8, 48, 32)  # --d-model 256 --heads 8 --seq-len 256
    assert not ma.masked_is_cheaper(192, 4, 48, 32)  # few slots: gathering them is cheaper
    assert not ma.masked_is_cheaper(512, 8, 48, 32)
    assert not ma.masked_is_cheaper(4096, 8, 48, 32)  # long context: the gather path
