"""Forgetful masking on a head slice: ``head_slice=(h0, h1, H_all)`` makes the op on heads
h0 .. h1-1 equal to those heads of the op on all H_all heads (the draws of head parallelism).

Every implementation: NumPy, Numba, the CUDA kernels (fused and tiled; the simulator without
a GPU, CuPy arrays on one), and ``select_topk`` alone (the selection the layers call).
"""
import numpy as np
import pytest

import topkattn as ta
from topkattn.ops.reference import topk_attention_reference
from topkattn.ops.selection import forget_draws, select_topk
from topkattn.testing import make_qkv, mask_from_idx

B, H, T, S, D, Dv = 2, 4, 7, 12, 5, 3
KW = dict(topk=3, forget_rate=0.5, sinks=1, window=1)
SLICES = [(0, 2), (2, 4), (1, 3), (3, 4), (0, 4)]


def _mha(seed=0):
    """q, k, v with one KV head per query head (G = H): any head slice is a valid op input."""
    return make_qkv(seed, B, H, H, T, S, D, Dv)


def _full_and_slice(q, k, v, h0, h1, impl, seed=123):
    full, fs = ta.topk_attention_forward(q, k, v, seed=seed, impl=impl, **KW)
    part, ps = ta.topk_attention_forward(q[:, h0:h1], k[:, h0:h1], v[:, h0:h1], seed=seed, impl=impl,
                                         head_slice=(h0, h1, H), **KW)
    return (full, fs), (part, ps)


@pytest.mark.parametrize("impl", ["numpy", "numba"])
@pytest.mark.parametrize("h0,h1", SLICES)
def test_slice_forward_backward_equal_the_all_heads_op(impl, h0, h1):
    q, k, v = _mha()
    (full, fs), (part, ps) = _full_and_slice(q, k, v, h0, h1, impl)
    np.testing.assert_array_equal(ps.idx, fs.idx[:, h0:h1])
    np.testing.assert_allclose(part, full[:, h0:h1], rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(ps.lse, fs.lse[:, h0:h1], rtol=1e-13, atol=1e-14)
    dout = np.random.default_rng(4).standard_normal(full.shape)
    g_full = ta.topk_attention_backward(dout, fs)
    g_part = ta.topk_attention_backward(dout[:, h0:h1], ps)
    for name, gf, gp in zip(("dq", "dk", "dv"), g_full, g_part):
        np.testing.assert_allclose(gp, gf[:, h0:h1], rtol=1e-12, atol=1e-13, err_msg=name)
    # against the float64 reference of the all-heads op (its mask and output)
    ref, mask, _ = topk_attention_reference(q, k, v, seed=123, **KW)
    np.testing.assert_array_equal(mask_from_idx(ps.idx, S), mask[:, h0:h1])
    np.testing.assert_allclose(part, ref[:, h0:h1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["numpy", "numba"])
def test_gqa_slice_of_whole_kv_groups(impl):
    q, k, v = make_qkv(1, B, H, 2, T, S, D, Dv)  # heads 0, 1 read KV head 0; heads 2, 3 read KV head 1
    full, fs = ta.topk_attention_forward(q, k, v, seed=9, impl=impl, **KW)
    part, ps = ta.topk_attention_forward(q[:, 2:], k[:, 1:], v[:, 1:], seed=9, impl=impl,
                                         head_slice=(2, 4, 4), **KW)
    np.testing.assert_array_equal(ps.idx, fs.idx[:, 2:])
    np.testing.assert_allclose(part, full[:, 2:], rtol=1e-13, atol=1e-14)


def test_without_head_slice_a_slice_draws_other_drops():
    """The keyword is what makes the slice agree: without it heads 2, 3 get heads 0, 1's draws."""
    q, k, v = _mha()
    _, fs = ta.topk_attention_forward(q, k, v, seed=123, **KW)
    _, plain = ta.topk_attention_forward(q[:, 2:], k[:, 2:], v[:, 2:], seed=123, **KW)
    assert not np.array_equal(plain.idx, fs.idx[:, 2:])


@pytest.mark.parametrize("impl", ["numpy", "numba"])
def test_generator_seed_advances_as_the_all_heads_call(impl):
    q, k, v = _mha(2)
    g_full, g_part = np.random.default_rng(5), np.random.default_rng(5)
    for _ in range(2):  # two calls: the second draws from where the first left each generator
        _, fs = ta.topk_attention_forward(q, k, v, seed=g_full, impl=impl, **KW)
        _, ps = ta.topk_attention_forward(q[:, 1:3], k[:, 1:3], v[:, 1:3], seed=g_part, impl=impl,
                                          head_slice=(1, 3, H), **KW)
        np.testing.assert_array_equal(ps.idx, fs.idx[:, 1:3])
    assert g_full.random() == g_part.random()


@pytest.mark.parametrize("impl", ["numpy", "numba"])
def test_select_topk_takes_head_slice(impl):
    q, k, _ = _mha(3)
    kw = dict(topk=3, scale=0.4, forget_rate=0.6, seed=17, impl=impl, sinks=1)
    full = select_topk(q, k, **kw)
    part = select_topk(q[:, 1:2], k[:, 1:2], head_slice=(1, 2, H), **kw)
    np.testing.assert_array_equal(part, full[:, 1:2])


def test_default_and_whole_slice_leave_results_unchanged():
    q, k, v = _mha(4)
    _, plain = ta.topk_attention_forward(q, k, v, seed=31, **KW)
    _, whole = ta.topk_attention_forward(q, k, v, seed=31, head_slice=(0, H, H), **KW)
    np.testing.assert_array_equal(whole.idx, plain.idx)
    draws = forget_draws(31, (B, H, T, 3), 0.5)
    np.testing.assert_array_equal(draws, np.random.default_rng(31).random((B, H, T, 3)) < 0.5)
    np.testing.assert_array_equal(forget_draws(31, (B, 2, T, 3), 0.5, (2, 4, 4)), draws[:, 2:])
    assert forget_draws(31, (B, 2, T, 3), 0.0, (2, 4, 4)) is None  # no forgetting: nothing drawn


BAD = [
    ([0, 2], TypeError, r"head_slice must be a tuple \(h0, h1, H_all\) of 3 ints, got list \[0, 2\]"),
    ("0:2", TypeError, "head_slice must be a tuple"),
    ((0, 2.0, 4), TypeError, r"head_slice\[1\] must be an integer, got float 2.0"),
    ((0, True, 4), TypeError, r"head_slice\[1\] must be an integer, got bool"),
    ((0, 3, 4), ValueError, r"h1 - h0 == H = 2 .* got \(0, 3, 4\)"),
    ((3, 5, 4), ValueError, r"h1 <= H_all, got \(3, 5, 4\)"),
    ((-1, 1, 4), ValueError, r"0 <= h0, .* got \(-1, 1, 4\)"),
]


@pytest.mark.parametrize("forget_rate", [0.0, 0.3])
@pytest.mark.parametrize("head_slice,exc,msg", BAD)
def test_bad_head_slice_raises_a_clear_error(head_slice, exc, msg, forget_rate):
    q, k, v = make_qkv(0, 1, 2, 2, 5, 9)
    with pytest.raises(exc, match=msg):
        ta.topk_attention(q, k, v, topk=2, forget_rate=forget_rate, seed=1, head_slice=head_slice)
    with pytest.raises(exc, match=msg):
        select_topk(q, k, topk=2, scale=1.0, forget_rate=forget_rate, seed=1, head_slice=head_slice)


# ----------------------------------------------------------------------------- CUDA kernels
def _cuda_xp():
    from numba.core import config

    if config.ENABLE_CUDASIM:
        return np
    cupy = pytest.importorskip("cupy", reason="the CUDA kernels take CuPy arrays on a GPU")
    from numba import cuda

    if not cuda.is_available():
        pytest.skip("no CUDA GPU and the simulator is off")
    return cupy


@pytest.mark.cuda
@pytest.mark.parametrize("h0,h1", [(0, 2), (1, 3)])
def test_cuda_op_slice_equals_all_heads_op(h0, h1):
    xp = _cuda_xp()
    q, k, v = (xp.asarray(a) for a in _mha(5))
    (full, fs), (part, ps) = _full_and_slice(q, k, v, h0, h1, "cuda")
    host = np.asarray if xp is np else xp.asnumpy
    np.testing.assert_array_equal(host(ps.idx), host(fs.idx)[:, h0:h1])
    np.testing.assert_allclose(host(part), host(full)[:, h0:h1], rtol=1e-12, atol=1e-13)
    _, ref_s = ta.topk_attention_forward(*(host(a) for a in (q, k, v)), seed=123, impl="numpy", **KW)
    np.testing.assert_array_equal(host(ps.idx), ref_s.idx[:, h0:h1])  # the CPU op's selection
    dout = xp.asarray(np.random.default_rng(6).standard_normal(full.shape))
    g_full = ta.topk_attention_backward(dout, fs)
    g_part = ta.topk_attention_backward(dout[:, h0:h1], ps)
    for name, gf, gp in zip(("dq", "dk", "dv"), g_full, g_part):
        np.testing.assert_allclose(host(gp), host(gf)[:, h0:h1], rtol=1e-12, atol=1e-13, err_msg=name)


@pytest.mark.cuda
@pytest.mark.parametrize("which", ["fused", "tiled"])
def test_cuda_forwards_take_head_slice(which):
    from topkattn.cuda.topk_forward import topk_forward, topk_forward_tiled

    xp = _cuda_xp()
    fwd = topk_forward if which == "fused" else topk_forward_tiled
    q, k, v = (xp.asarray(a) for a in _mha(6))
    kw = dict(topk=3, scale=0.5, sinks=1, forget_rate=0.5, seed=77)
    _, idx_full, _ = fwd(q, k, v, **kw)
    out, idx, lse = fwd(q[:, 2:], k[:, 2:], v[:, 2:], head_slice=(2, 4, H), **kw)
    host = np.asarray if xp is np else xp.asnumpy
    np.testing.assert_array_equal(host(idx), host(idx_full)[:, 2:])
    ref = ta.topk_attention(*(host(a) for a in (q, k, v)), scale=0.5, topk=3, sinks=1, forget_rate=0.5, seed=77)
    np.testing.assert_allclose(host(out), ref[:, 2:], rtol=1e-12, atol=1e-13)
