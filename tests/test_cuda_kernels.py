"""Numba CUDA kernels against the NumPy references (simulator on tiny shapes, or a real GPU).

Run alone with ``pytest -m cuda``.  Without a GPU, tests/conftest.py switches on the CUDA
simulator (NUMBA_ENABLE_CUDASIM=1) before numba.cuda is imported and the arrays are NumPy;
on a GPU the same tests run with CuPy arrays and larger shapes.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from topkattn.testing import assert_grads_close, directional_grad_check, make_qkv, mask_from_idx, tolerance

pytestmark = pytest.mark.cuda

from numba.core import config  # noqa: E402

SIM = bool(config.ENABLE_CUDASIM)
if SIM:
    xp = np
else:
    xp = pytest.importorskip("cupy", reason="the CUDA kernels take CuPy arrays on a GPU")
    from numba import cuda as _cuda

    if not _cuda.is_available():
        pytest.skip("no CUDA GPU and the simulator is off", allow_module_level=True)

import topkattn as ta  # noqa: E402
from topkattn.backend import to_numpy  # noqa: E402
from topkattn.cuda.lorann_score import lorann_arrays, lorann_score, lorann_search  # noqa: E402
from topkattn.cuda.mla_decode import attend_selected, mla_decode, mla_select  # noqa: E402
from topkattn.cuda.sparse_backward import sparse_backward  # noqa: E402
from topkattn.cuda.topk_forward import MAX_RANKED, topk_forward, topk_forward_auto, topk_forward_tiled  # noqa: E402
from topkattn.cuda.topk_select import topk_select  # noqa: E402
from topkattn.decoding import ExactSelector  # noqa: E402
from topkattn.ops.reference import masked_attention_reference, rank_row, topk_attention_reference  # noqa: E402
from topkattn.ops.selection import RowBounds, select_decode  # noqa: E402

N_SCALE = 1 if SIM else 8  # real GPU: larger shapes


def dev(a):
    return xp.asarray(a)


def host(a):
    return to_numpy(a)


# ----------------------------------------------------------------------------- top-k selection
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("per_thread", [None, 3])
def test_topk_select_matches_rank_row(dtype, per_thread):
    rng = np.random.default_rng(0)
    R, N, m = 7, 30 * N_SCALE, 5
    s = rng.standard_normal((R, N)).astype(dtype)
    s[0, 4] = np.nan  # NaN ranks first
    s[1, :12] = 0.5  # ties go to the lower column
    s[2] = 1.0  # a whole row tied
    s[3, 7] = np.inf
    ids, vals = topk_select(dev(s), m, return_scores=True, _per_thread=per_thread)
    ids, vals = host(ids), host(vals)
    for r in range(R):
        ref = rank_row(s[r], np.ones(N, bool))[:m]
        np.testing.assert_array_equal(ids[r], ref)
        want = np.where(np.isnan(s[r, ref]), np.inf, s[r, ref])
        np.testing.assert_array_equal(vals[r], want)


def test_topk_select_bounds_and_short_rows():
    rng = np.random.default_rng(1)
    R, N, m, sinks = 6, 20, 6, 2
    s = rng.standard_normal((R, N))
    end = np.array([0, 2, 5, 9, 20, 14])  # rows 0-2 have fewer than m candidates
    lo = np.array([0, 0, 3, 6, 15, 10])
    hi = np.array([0, 0, 4, 9, 18, 10])  # row 5: empty window
    ids = host(topk_select(dev(s), m, end=dev(end), win_lo=dev(lo), win_hi=dev(hi), sinks=sinks,
                           _per_thread=4))
    js = np.arange(N)
    for r in range(R):
        cand = (js >= sinks) & (js < end[r]) & ~((js >= lo[r]) & (js < hi[r]))
        ref = rank_row(s[r], cand)[:m]
        np.testing.assert_array_equal(ids[r, :len(ref)], ref)
        assert (ids[r, len(ref):] == -1).all()
    assert (ids[0] == -1).all() and (ids[1] == -1).all()


def test_topk_select_bad_input():
    s = dev(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="m must be"):
        topk_select(s, 0)
    with pytest.raises(ValueError, match="2-D"):
        topk_select(dev(np.zeros(3)), 1)
    with pytest.raises(TypeError, match="float32 or float64"):
        topk_select(dev(np.zeros((2, 3), np.int32)), 1)
    with pytest.raises(ValueError, match="go together"):
        topk_select(s, 1, end=dev(np.array([1, 1])))


# ----------------------------------------------------------------------------- fused forward
FORWARD_CASES = [
    dict(B=1, H=2, G=1, T=7, S=11, D=5, Dv=3, topk=3),  # MQA, T < S
    dict(B=2, H=4, G=2, T=6, S=9, D=4, Dv=6, topk=2, sinks=1, window=2),  # GQA, forced keys
    dict(B=1, H=2, G=2, T=1, S=13, D=4, Dv=4, topk=4, sinks=2, window=3),  # T = 1 (decode)
    dict(B=1, H=1, G=1, T=5, S=5, D=3, Dv=2, topk=8),  # topk >= S: dense; short rows
    dict(B=1, H=2, G=1, T=5, S=8, D=4, Dv=4, topk=3, causal=False),
    dict(B=1, H=2, G=2, T=6, S=10, D=4, Dv=4, topk=3, sinks=1, window=1, forget_rate=0.4, seed=11),
]


def _scaled(case):
    c = dict(case)
    if not SIM:
        c["T"] = c["T"] * 40 if c["T"] > 1 else 1
        c["S"] = c["S"] * 40
        c["D"], c["Dv"] = c["D"] * 8, c["Dv"] * 8
    return c


def _split(case):
    shape = {n: case[n] for n in ("B", "H", "G", "T", "S", "D", "Dv")}
    kw = {n: case[n] for n in case if n not in shape}
    return shape, kw


@pytest.mark.parametrize("case", FORWARD_CASES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_forward_matches_reference(case, dtype):
    shape, kw = _split(_scaled(case))
    rng = np.random.default_rng(2)
    q, k, v = make_qkv(rng, dtype=dtype, **shape)
    out, saved = ta.topk_attention_forward(dev(q), dev(k), dev(v), impl="cuda", **kw)
    assert saved.impl == "cuda" and saved.out.dtype == dtype and saved.idx.dtype == np.int64
    ro, rmask, rlse = topk_attention_reference(q, k, v, **kw)
    np.testing.assert_allclose(host(out), ro, **tolerance(dtype))
    np.testing.assert_allclose(host(saved.lse), rlse, **tolerance(dtype))
    idx = host(saved.idx)
    np.testing.assert_array_equal(mask_from_idx(idx, shape["S"]), rmask)
    if dtype == np.float64:  # the same slots in the same order as the vectorised path
        _, s_np = ta.topk_attention_forward(q, k, v, impl="numpy", **kw)
        np.testing.assert_array_equal(idx, s_np.idx)


@pytest.mark.parametrize("case", FORWARD_CASES)
def test_tiled_forward_matches_fused(case):
    shape, kw = _split(_scaled(case))
    rng = np.random.default_rng(19)
    q, k, v = make_qkv(rng, dtype=np.float64, **shape)
    scale = 1 / np.sqrt(shape["D"])
    fused = topk_forward(dev(q), dev(k), dev(v), scale=scale, **kw)
    tile_bytes = 8 * shape["B"] * shape["H"] * shape["S"] * 2  # two queries per chunk
    tiled = topk_forward_tiled(dev(q), dev(k), dev(v), scale=scale, tile_bytes=tile_bytes, **kw)
    np.testing.assert_array_equal(host(tiled[1]), host(fused[1]))
    for a, b in ((tiled[0], fused[0]), (tiled[2], fused[2])):
        np.testing.assert_allclose(host(a), host(b), rtol=1e-12, atol=1e-13)


def test_auto_forward_picks_tiled_for_few_long_rows(monkeypatch):
    import topkattn.cuda.topk_forward as tf

    calls = []
    monkeypatch.setattr(tf, "topk_forward_tiled",
                        lambda *a, **kw: calls.append("tiled") or topk_forward_tiled(*a, **kw))
    rng = np.random.default_rng(20)
    q, k, v = make_qkv(rng, 1, 2, 1, 1, 40, 4, 4, np.float64)  # decode-like: 2 rows, 40 keys
    kw = dict(topk=3, sinks=1, scale=0.5)
    want = topk_forward(dev(q), dev(k), dev(v), **kw)
    for few, long_, path in ((16, 32, ["tiled"]), (1, 1000, [])):
        calls.clear()
        got = topk_forward_auto(dev(q), dev(k), dev(v), few_rows=few, long_rows=long_, **kw)
        assert calls == path
        np.testing.assert_array_equal(host(got[1]), host(want[1]))
        np.testing.assert_allclose(host(got[0]), host(want[0]), rtol=1e-12, atol=1e-13)


def test_forward_topk_at_least_S_is_dense_causal():
    rng = np.random.default_rng(3)
    B, H, G, T, S, D = 1, 2, 1, 6, 9, 4
    q, k, v = make_qkv(rng, B, H, G, T, S, D, D, np.float64)
    out = host(ta.topk_attention(dev(q), dev(k), dev(v), topk=S, impl="cuda"))
    pos = np.arange(T)[:, None] + S - T
    mask = np.broadcast_to(np.arange(S)[None, :] <= pos, (B, H, T, S))
    np.testing.assert_allclose(out, masked_attention_reference(q, k, v, mask, 1 / np.sqrt(D)),
                               rtol=1e-12, atol=1e-13)


def test_forward_ties_go_to_lower_key():
    rng = np.random.default_rng(4)
    B, H, G, T, S, D = 1, 2, 1, 4, 12, 3
    q, k, v = make_qkv(rng, B, H, G, T, S, D, D, np.float64)
    k[0, 0, 1::2] = k[0, 0, 0]  # every odd key duplicates key 0: exact score ties
    _, saved = ta.topk_attention_forward(dev(q), dev(k), dev(v), topk=4, impl="cuda")
    _, s_np = ta.topk_attention_forward(q, k, v, topk=4, impl="numpy")
    np.testing.assert_array_equal(host(saved.idx), s_np.idx)
    _, rmask, _ = topk_attention_reference(q, k, v, topk=4)
    np.testing.assert_array_equal(mask_from_idx(host(saved.idx), S), rmask)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_forward_large_logits_stay_finite(dtype):
    rng = np.random.default_rng(5)
    q, k, v = make_qkv(rng, 1, 2, 1, 5, 9, 4, 4, dtype)
    q *= dtype(3e3)  # scores of order 1e4
    out, saved = ta.topk_attention_forward(dev(q), dev(k), dev(v), topk=3, sinks=1, impl="cuda")
    out = host(out)
    assert np.isfinite(out).all() and np.isfinite(host(saved.lse)).all()
    ro, _, rlse = topk_attention_reference(q, k, v, topk=3, sinks=1)
    np.testing.assert_allclose(out, ro, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(host(saved.lse), rlse, rtol=1e-6)


def test_forward_nan_row_stays_in_its_row():
    rng = np.random.default_rng(6)
    q, k, v = make_qkv(rng, 1, 2, 1, 5, 9, 4, 4, np.float64)
    q[0, 1, 2, 0] = np.nan
    out, saved = ta.topk_attention_forward(dev(q), dev(k), dev(v), topk=3, window=1, impl="cuda")
    o_np, s_np = ta.topk_attention_forward(q, k, v, topk=3, window=1, impl="numpy")
    out = host(out)
    assert np.isnan(out[0, 1, 2]).all() and np.isnan(host(saved.lse)[0, 1, 2])
    np.testing.assert_allclose(out, o_np, rtol=1e-12, atol=1e-13, equal_nan=True)
    assert np.isfinite(np.delete(out.reshape(-1, 4), 1 * 5 + 2, axis=0)).all()


def test_forward_forgetting_reproducible_and_differs_from_exact():
    rng = np.random.default_rng(7)
    q, k, v = make_qkv(rng, 1, 2, 1, 6, 12, 4, 4, np.float64)
    kw = dict(topk=3, forget_rate=0.5, impl="cuda")
    _, s1 = ta.topk_attention_forward(dev(q), dev(k), dev(v), seed=3, **kw)
    _, s2 = ta.topk_attention_forward(dev(q), dev(k), dev(v), seed=np.random.default_rng(3), **kw)
    _, s0 = ta.topk_attention_forward(dev(q), dev(k), dev(v), topk=3, impl="cuda")
    np.testing.assert_array_equal(host(s1.idx), host(s2.idx))
    assert (host(s1.idx) != host(s0.idx)).any()


def test_forward_limits_raise():
    q = dev(np.zeros((1, 1, 1, 2)))
    k = dev(np.zeros((1, 1, MAX_RANKED + 8, 2)))
    with pytest.raises(ValueError, match="ranked keys"):
        topk_forward(q, k, k, topk=MAX_RANKED + 4, scale=1.0)


# ----------------------------------------------------------------------------- backward
@pytest.mark.parametrize("case", FORWARD_CASES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_backward_matches_vectorised_path(case, dtype):
    shape, kw = _split(_scaled(case))
    rng = np.random.default_rng(8)
    q, k, v = make_qkv(rng, dtype=dtype, **shape)
    q[0, 0, -1, 0] = np.nan  # a NaN row: NaN dq, nothing sent to dk/dv
    o_np, s_np = ta.topk_attention_forward(q, k, v, impl="numpy", **kw)
    dout = rng.standard_normal(o_np.shape).astype(dtype)
    got = sparse_backward(dev(dout), dev(q), dev(k), dev(v), dev(s_np.idx), dev(s_np.out),
                          dev(s_np.lse), s_np.scale)
    want_dq = ta.topk_attention_backward(dout, s_np)[0]
    s_np.idx = s_np.idx.copy()
    s_np.idx[0, 0, -1] = -1  # the NaN row must send nothing to dk, dv
    want = (want_dq,) + ta.topk_attention_backward(dout, s_np)[1:]
    assert np.isnan(host(got[0])[0, 0, -1]).all() and np.isfinite(host(got[1])).all()
    for g, w in zip(got, want):
        np.testing.assert_allclose(host(g), w, equal_nan=True, **tolerance(dtype))


def test_backward_float64_central_differences():
    rng = np.random.default_rng(9)
    B, H, G, T, S, D, Dv = 1, 4, 2, 5, 10, 4, 3
    q, k, v = make_qkv(rng, B, H, G, T, S, D, Dv, np.float64)
    kw = dict(topk=3, sinks=1, window=1, impl="cuda")
    w = rng.standard_normal((B, H, T, Dv))
    out, saved = ta.topk_attention_forward(dev(q), dev(k), dev(v), **kw)
    dq, dk, dv = (host(g) for g in ta.topk_attention_backward(dev(w), saved))
    idx0 = host(saved.idx)

    def loss():
        o, s = ta.topk_attention_forward(dev(q), dev(k), dev(v), **kw)
        np.testing.assert_array_equal(host(s.idx), idx0)  # the selection does not flip
        return float((host(o) * w).sum())

    for _ in range(2):
        assert_grads_close(directional_grad_check(loss, dict(q=q, k=k, v=v), dict(q=dq, k=dk, v=dv), rng))
    # keys no query selected get exactly zero gradient
    used = np.zeros((B, G, S), dtype=bool)
    for h in range(H):
        for j in idx0[0, h][idx0[0, h] >= 0]:
            used[0, h // (H // G), j] = True
    assert (dk[~used] == 0).all() and (dv[~used] == 0).all()
    assert (np.abs(dk[used]).sum(-1) > 0).all()


def test_backward_is_deterministic():
    rng = np.random.default_rng(10)
    q, k, v = make_qkv(rng, 1, 4, 1, 6 * N_SCALE, 9 * N_SCALE, 4, 4, np.float32)
    _, saved = ta.topk_attention_forward(dev(q), dev(k), dev(v), topk=3, sinks=2, impl="cuda")
    dout = dev(rng.standard_normal(saved.out.shape).astype(np.float32))
    g1 = [host(g) for g in ta.topk_attention_backward(dout, saved)]
    g2 = [host(g) for g in ta.topk_attention_backward(dout, saved)]
    for a, b in zip(g1, g2):
        np.testing.assert_array_equal(a, b)  # bitwise: no atomics


def test_dynamic_topk_with_cuda_impl_uses_cuda_backward():
    rng = np.random.default_rng(11)
    q, k, v = make_qkv(rng, 1, 2, 1, 5, 9, 4, 4, np.float64)
    o, s = ta.topk_attention_forward(dev(q), dev(k), dev(v), topk="auto", tail_bound=0.05, impl="cuda")
    o2, s2 = ta.topk_attention_forward(q, k, v, topk="auto", tail_bound=0.05, impl="numpy")
    assert s.impl == "cuda"
    np.testing.assert_allclose(host(o), o2, rtol=1e-12)
    dout = rng.standard_normal(o2.shape)
    for g, w in zip(ta.topk_attention_backward(dev(dout), s), ta.topk_attention_backward(dout, s2)):
        np.testing.assert_allclose(host(g), w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("where,topk", [("q", 2), ("v", 4), ("k", 2)])
def test_backward_nan_rows_send_nothing_to_shared_keys(where, topk):
    """The reported case (a NaN query row sharing keys 0, 1 with clean rows), a NaN value
    (NaN output, finite lse) and a NaN key: the kernel follows the reference's rule --
    NaN dq on the NaN rows, nothing from them in dk, dv -- like the vectorised path."""
    from topkattn.ops.reference import masked_attention_grad_reference

    q, k, v = make_qkv(np.random.default_rng(21), 1, 1, 1, 4, 4, 4, 4, np.float64)
    {"q": q, "k": k, "v": v}[where][0, 0, 3 if where == "q" else 2, 1] = np.nan
    out, saved = ta.topk_attention_forward(dev(q), dev(k), dev(v), topk=topk, impl="cuda")
    o_np, s_np = ta.topk_attention_forward(q, k, v, topk=topk, impl="numpy")
    np.testing.assert_allclose(host(out), o_np, rtol=1e-12, atol=1e-14, equal_nan=True)
    nan_rows = np.isnan(o_np).any(-1)
    assert nan_rows.any() and not nan_rows.all()
    dout = np.ones_like(o_np)
    got = [host(g) for g in ta.topk_attention_backward(dev(dout), saved)]
    want = masked_attention_grad_reference(q, k, v, mask_from_idx(s_np.idx, 4), 0.5, dout)
    vec = ta.topk_attention_backward(dout, s_np)
    for g, w, x in zip(got, want, vec):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-14, equal_nan=True)
        np.testing.assert_allclose(x, w, rtol=1e-12, atol=1e-14, equal_nan=True)
    assert np.isfinite(got[1]).all() and np.isfinite(got[2]).all()
    assert np.isnan(got[0][nan_rows]).all() and np.isfinite(got[0][~nan_rows]).all()


@pytest.mark.parametrize("special", [np.inf, -np.inf])
def test_backward_infinite_scores_follow_the_reference(special):
    from topkattn.ops.reference import masked_attention_grad_reference

    q, k, v = make_qkv(np.random.default_rng(23), 1, 2, 1, 5, 6, 3, 3, np.float64)
    k[0, 0, 2] = [special, 0.0, 0.0]
    q[0, 1, 4] = [special, 0.0, 0.0]
    out, saved = ta.topk_attention_forward(dev(q), dev(k), dev(v), topk=3, impl="cuda")
    ro, rmask, rlse = topk_attention_reference(q, k, v, topk=3)
    np.testing.assert_allclose(host(out), ro, rtol=1e-12, atol=1e-14, equal_nan=True)
    np.testing.assert_allclose(host(saved.lse), rlse, rtol=1e-12, equal_nan=True)
    dout = np.ones_like(ro)
    got = [host(g) for g in ta.topk_attention_backward(dev(dout), saved)]
    want = masked_attention_grad_reference(q, k, v, rmask, 1 / np.sqrt(3), dout)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-14, equal_nan=True)


# ----------------------------------------------------------------------------- MLA decode
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("sinks,window", [(0, 0), (2, 3)])
def test_mla_decode_matches_reference(dtype, sinks, window):
    rng = np.random.default_rng(12)
    B, H, S, C, R = 2, 3, 23 * N_SCALE, 6, 2
    q = rng.standard_normal((B, H, C + R)).astype(dtype)
    keys = rng.standard_normal((B, S, C + R)).astype(dtype)
    keys[0, 5] = keys[0, 4]  # a tie
    o, idx, lse = mla_decode(dev(q), dev(keys), topk=4, C=C, scale=0.3, sinks=sinks, window=window)
    ro, rmask, rlse = topk_attention_reference(q[:, :, None], keys[:, None], keys[:, None, :, :C],
                                               topk=4, scale=0.3, sinks=sinks, window=window)
    np.testing.assert_allclose(host(o), ro[:, :, 0], **tolerance(dtype))
    np.testing.assert_allclose(host(lse), rlse[:, :, 0], **tolerance(dtype))
    np.testing.assert_array_equal(mask_from_idx(host(idx)[:, :, None], S), rmask)


def test_mla_selector_matches_exact_selector_on_strided_cache():
    rng = np.random.default_rng(13)
    B, H, S, Dk = 2, 4, 17, 6

    keys = dev(rng.standard_normal((B, S + 9, Dk)))[:, :S]  # a view into a larger buffer, like MLACache.keys
    q = dev(rng.standard_normal((B, H, Dk)))
    for kw in (dict(topk=3), dict(topk=5, sinks=2, window=2), dict(topk=40)):
        got = host(mla_select(q, keys, scale=0.7, **kw))
        want = host(select_decode(q, keys, scale=0.7, **kw)[0])
        np.testing.assert_array_equal(got, want)


@pytest.mark.skipif(not SIM, reason="MLA layers hold NumPy parameters in this test")
def test_mla_layer_decodes_with_cuda_selector():
    from topkattn.layers import MLA

    x = np.random.default_rng(14).standard_normal((2, 7, 16))
    kw = dict(topk=3, seed=0, dtype="float64", persistent_tokens=1, window=1)
    m = MLA(16, 2, 8, 6, 4, 2, 4, **kw)
    y = m.forward(x)
    m.selector = ExactSelector(impl="cuda")
    cache = m.init_cache(2)
    ys = np.concatenate([m.step(x[:, t:t + 1], cache) for t in range(7)], axis=1)
    np.testing.assert_allclose(ys, y, rtol=1e-6, atol=1e-10)


def test_attend_selected_takes_any_selectors_indices():
    rng = np.random.default_rng(18)
    B, H, S, C, R = 2, 3, 11, 5, 2
    q = rng.standard_normal((B, H, C + R))
    keys = rng.standard_normal((B, S, C + R))
    idx = np.array([[[7, -1, 2, 9], [0, 1, 2, 3], [-1, -1, -1, -1]],
                    [[10, 4, -1, 5], [6, 6 - 6, 8, -1], [3, 2, 1, 0]]], dtype=np.int64)
    o, lse = attend_selected(dev(q), dev(keys), dev(idx), C=C, scale=0.4)
    mask = mask_from_idx(idx[:, :, None], S)  # (B, H, 1, S)
    ref = masked_attention_reference(q[:, :, None], keys[:, None], keys[:, None, :, :C], mask, 0.4)
    np.testing.assert_allclose(host(o), ref[:, :, 0], rtol=1e-12, atol=1e-13)
    assert (host(o)[0, 2] == 0).all() and host(lse)[0, 2] == -np.inf  # a row with no key
    s = 0.4 * np.einsum("bhd,bsd->bhs", q, keys)
    has = mask[:, :, 0].any(-1)
    want = np.log(np.where(mask[:, :, 0], np.exp(s), 0).sum(-1)[has])
    np.testing.assert_allclose(host(lse)[has], want, rtol=1e-12)


def test_mla_decode_bad_input():
    with pytest.raises(ValueError, match="keys must have shape"):
        mla_decode(dev(np.zeros((1, 2, 4))), dev(np.zeros((1, 3, 5))), topk=1, C=2, scale=1.0)
    with pytest.raises(ValueError, match="C must be"):
        mla_decode(dev(np.zeros((1, 2, 4))), dev(np.zeros((1, 3, 4))), topk=1, C=5, scale=1.0)


# ----------------------------------------------------------------------------- LoRANN scoring
def _lorann(bits, distance, n=300):
    from topkattn.ann import LorannIndex

    X = np.random.default_rng(15).standard_normal((n * N_SCALE, 16)).astype(np.float32)
    index = LorannIndex(X, n_clusters=6, global_dim=12, quantization_bits=bits, rank=4,
                        distance=distance, seed=0)
    index.build()
    return index


@pytest.mark.parametrize("bits,distance", [(8, "ip"), (4, "l2"), (None, "ip")])
def test_lorann_search_matches_index(bits, distance):
    index = _lorann(bits, distance)
    q = np.random.default_rng(16).standard_normal((3, 16)).astype(np.float32)
    arr = lorann_arrays(index, xp)
    for rr in (0, 40):
        ids, scores = lorann_search(arr, dev(q), 5, 3, rr)
        want_ids, want_d = index.search(q, 5, 3, rr, return_distances=True)
        np.testing.assert_array_equal(host(ids), want_ids)
        np.testing.assert_allclose(host(scores), -want_d, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [8, 4])
def test_lorann_score_dequantises_like_float64_reference(bits):
    index = _lorann(bits, "ip")
    arr = lorann_arrays(index, np)
    rng = np.random.default_rng(17)
    qr = rng.standard_normal((2, 12)).astype(np.float32)
    clusters = np.array([[0, 3, 5], [2, 1, 4]], dtype=np.int64)
    s, ids = lorann_score(lorann_arrays(index, xp), dev(qr), dev(clusters), 8)
    s, ids = host(s), host(ids)
    # explicit dequantisation in float64: A_c[u, v] = code[c, v, u] ascale[c, v], B[z] = code[z] bscale[z]
    a, b = arr.a.astype(np.int64), arr.b.astype(np.int64)
    if bits == 4:
        a = np.stack([(a & 15) - 8, (a >> 4) - 8], -1).reshape(a.shape[0], a.shape[1], -1)[..., :12]
        b = np.stack([(b & 15) - 8, (b >> 4) - 8], -1).reshape(b.shape[0], -1)[:, :4]
    A = a.transpose(0, 2, 1) * arr.ascale.astype(np.float64)[:, None, :]  # (NC, G, R)
    Bm = b * arr.bscale.astype(np.float64)[:, None]  # (Z, R)
    for qi in range(2):
        ref = {}
        for c in clusters[qi]:
            tq = qr[qi].astype(np.float64) @ A[c]
            for z in range(arr.start[c], arr.start[c] + arr.size[c]):
                ref[int(arr.slot_id[z])] = float(tq @ Bm[z])
        ref_ids = sorted(ref, key=lambda i: (-ref[i], i))[:8]
        np.testing.assert_allclose(s[qi], [ref[i] for i in ref_ids], rtol=1e-4, atol=1e-5)
        assert set(ids[qi]) == set(ref_ids)


# ----------------------------------------------------------------------------- launcher errors
@pytest.mark.skipif(not SIM, reason="checks the no-GPU error; this machine has a GPU")
def test_cuda_impl_without_gpu_raises_clear_error():
    code = ("import numpy as np, topkattn as ta\n"
            "a = np.zeros((1, 1, 2, 4))\n"
            "try:\n"
            "    ta.topk_attention(a, a, a, topk=1, impl='cuda')\n"
            "except RuntimeError as e:\n"
            "    print('RuntimeError', e)\n")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    assert "RuntimeError" in r.stdout and "no usable CUDA GPU" in r.stdout, r.stdout + r.stderr


@pytest.mark.skipif(not SIM, reason="checks the no-GPU error; this machine has a GPU")
def test_cuda_impl_with_dynamic_topk_without_gpu_is_refused_in_forward():
    """topk='auto' with impl='cuda' ran the forward on the CPU, marked saved.impl='cuda' and
    failed only in backward; it must be refused in forward, like an integer topk."""
    code = ("import numpy as np, topkattn as ta\n"
            "a = np.zeros((1, 1, 2, 4))\n"
            "for kw in (dict(topk='auto', tail_bound=0.1), dict(topk=1)):\n"
            "    try:\n"
            "        out, s = ta.topk_attention_forward(a, a, a, impl='cuda', **kw)\n"
            "        print('forward ran', kw['topk'])\n"
            "    except RuntimeError as e:\n"
            "        print('RuntimeError', kw['topk'], e)\n")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    lines = r.stdout.splitlines()
    assert len(lines) == 2, r.stdout + r.stderr
    for line, topk in zip(lines, ("auto", "1")):
        assert line.startswith(f"RuntimeError {topk} ") and "no usable CUDA GPU" in line, r.stdout


@pytest.mark.skipif(not SIM, reason="simulator-only check")
def test_simulator_rejects_foreign_arrays_and_geometry_matches_rowbounds():
    from topkattn.cuda.launch import array_module

    assert array_module(np.zeros(2)) is np
    b = RowBounds(10, 4, topk=2, causal=True, sinks=1, window=2)
    _, idx, _ = topk_forward(np.ones((1, 1, 4, 2)), np.ones((1, 1, 10, 2)), np.ones((1, 1, 10, 2)),
                             topk=2, scale=1.0, sinks=1, window=2)
    np.testing.assert_array_equal(idx[0, 0, :, :3], b.forced_indices())
