"""The CUDA block top-k attention kernels against the float64 reference (simulator on tiny shapes, or a GPU).

Run alone with ``pytest -m cuda``.  Without a GPU, tests/conftest.py switches on the CUDA
simulator (NUMBA_ENABLE_CUDASIM=1) before numba.cuda is imported and the arrays are NumPy;
on a GPU the same tests run with CuPy arrays and larger shapes.
"""
import numpy as np
import pytest

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
from topkattn.cuda.block_attention import MAX_RANKED, block_forward, block_select  # noqa: E402
from topkattn.ops.block_selection import BlockBounds, block_means, select_blocks  # noqa: E402
from topkattn.ops.reference import block_topk_attention_reference, masked_attention_grad_reference  # noqa: E402
from topkattn.testing import make_qkv, mask_from_idx, tolerance  # noqa: E402

N_SCALE = 1 if SIM else 8  # real GPU: larger shapes


def dev(a):
    return xp.asarray(a)


def host(a):
    return to_numpy(a)


def gate_margin_inputs(seed, B, H, G, T, S, bs, kb, causal, dtype=np.float64, margin=1e-3):
    """Inputs whose block gates keep a margin at the selection boundary (rounding cannot flip it)."""
    rng = np.random.default_rng(seed)
    bounds = BlockBounds(S, T, block_size=bs, topk_blocks=kb, causal=causal)
    for _ in range(200):
        q, k, v = make_qkv(rng, B, H, G, T, S, 8, 6)
        means = block_means(k, bs)
        gap = np.inf
        for b in range(B):
            for h in range(H):
                gate = q[b, h] @ means[b, h // (H // G)].T  # (T, Nb)
                for t in range(T):
                    s = np.sort(gate[t, :bounds.n_cand[t]])[::-1]
                    if bounds.m and len(s) > bounds.m:
                        gap = min(gap, s[bounds.m - 1] - s[bounds.m])
        if gap > margin:
            return q.astype(dtype), k.astype(dtype), v.astype(dtype)
    raise RuntimeError("no draw keeps the gate margin")


CASES = [
    # B, H, G, T, S, block_size, topk_blocks, causal
    (1, 2, 1, 9, 9, 2, 3, True),      # T == S, MQA
    (2, 2, 2, 5, 13, 3, 2, True),     # T < S, partial last block
    (1, 2, 1, 11, 7, 2, 2, True),     # T > S: rows that see nothing
    (1, 2, 2, 6, 11, 4, 2, False),    # non-causal, partial last block
    (1, 1, 1, 4, 6, 2, 9, True),      # topk_blocks >= n_blocks: dense
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("B,H,G,T,S,bs,kb,causal", CASES)
def test_block_select_matches_reference(dtype, B, H, G, T, S, bs, kb, causal):
    T, S = T * N_SCALE, S * N_SCALE
    q, k, v = gate_margin_inputs(T + S, B, H, G, T, S, bs, kb, causal, dtype=dtype)
    bounds = BlockBounds(S, T, block_size=bs, topk_blocks=kb, causal=causal)
    got = host(block_select(dev(q), dev(k), bounds=bounds))
    want = block_topk_attention_reference(q, k, v, block_size=bs, topk_blocks=kb, causal=causal)[3]
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, select_blocks(q, k, block_size=bs, topk_blocks=kb, causal=causal))


def test_block_select_ties_and_nan_gate():
    rng = np.random.default_rng(3)
    q = rng.standard_normal((1, 1, 4, 5))
    k = np.tile(rng.standard_normal((1, 1, 2, 5)), (1, 1, 6, 1))  # 6 identical blocks of 2 keys
    bounds = BlockBounds(12, 4, block_size=2, topk_blocks=3, causal=False)
    got = host(block_select(dev(q), dev(k), bounds=bounds))
    np.testing.assert_array_equal(got[0, 0], np.broadcast_to([0, 1, 2], (4, 3)))  # ties to the lower block
    k[0, 0, 9, 2] = np.nan  # block 4's mean is NaN: it ranks first
    got = host(block_select(dev(q), dev(k), bounds=bounds))
    np.testing.assert_array_equal(got[0, 0], np.broadcast_to([4, 0, 1], (4, 3)))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("B,H,G,T,S,bs,kb,causal", CASES)
def test_block_forward_and_backward_match_reference(dtype, B, H, G, T, S, bs, kb, causal):
    T, S = T * N_SCALE, S * N_SCALE
    q, k, v = gate_margin_inputs(2 * T + S, B, H, G, T, S, bs, kb, causal, dtype=dtype)
    kw = dict(block_size=bs, topk_blocks=kb, causal=causal)
    out, saved = ta.block_topk_attention_forward(dev(q), dev(k), dev(v), impl="cuda", **kw)
    assert saved.route == "cuda"
    ref, mask, lse, blocks = block_topk_attention_reference(q, k, v, **kw)
    np.testing.assert_array_equal(host(saved.blocks), blocks)
    np.testing.assert_allclose(host(out), ref, **tolerance(dtype))
    np.testing.assert_allclose(host(saved.lse), lse, **tolerance(dtype))
    dout = np.random.default_rng(0).standard_normal(ref.shape).astype(dtype)
    got = ta.block_topk_attention_backward(dev(dout), saved)
    want = masked_attention_grad_reference(q, k, v, mask, 1 / np.sqrt(8), dout)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-4, atol=1e-5)
    for g, w in zip(got, want):
        np.testing.assert_allclose(host(g), w, **tol)
    np.testing.assert_array_equal(mask_from_idx(host(saved.indices()), S), mask)


def test_block_forward_equals_the_numpy_routes():
    q, k, v = gate_margin_inputs(5, 1, 4, 2, 10 * N_SCALE, 10 * N_SCALE, 3, 2, True)
    out, blocks, lse = block_forward(dev(q), dev(k), dev(v), scale=0.3,
                                     bounds=BlockBounds(10 * N_SCALE, 10 * N_SCALE, block_size=3,
                                                        topk_blocks=2, causal=True))
    for route in ("gather", "blockwise"):
        want, saved = ta.block_topk_attention_forward(q, k, v, block_size=3, topk_blocks=2, scale=0.3, route=route)
        np.testing.assert_array_equal(host(blocks), saved.blocks)
        np.testing.assert_allclose(host(out), want, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(host(lse), saved.lse, rtol=1e-12, atol=1e-13)


def test_block_forward_nonfinite_rule_and_large_logits():
    q, k, v = make_qkv(7, 1, 2, 1, 8, 8, 4, 3)
    q[0, 1, 6, 0] = np.nan  # a NaN query: its row only
    v[0, 0, 5, 1] = np.nan  # a NaN value: the rows that attend key 5 (positions 5..7 see it in block 2)
    out, saved = ta.block_topk_attention_forward(dev(q), dev(k), dev(v), block_size=2, topk_blocks=2, impl="cuda")
    ref = block_topk_attention_reference(q, k, v, block_size=2, topk_blocks=2)[0]
    np.testing.assert_allclose(host(out), ref, rtol=1e-12, atol=1e-13, equal_nan=True)
    assert np.isfinite(host(out)[0, :, :5]).all()
    q, k, v = make_qkv(8, 1, 2, 1, 8, 8, 4, 3, dtype=np.float32)
    q *= np.float32(1e4)
    out, saved = ta.block_topk_attention_forward(dev(q), dev(k), dev(v), block_size=2, topk_blocks=2,
                                                 scale=1.0, impl="cuda")
    assert np.isfinite(host(out)).all() and np.isfinite(host(saved.lse)).all()
    ref = block_topk_attention_reference(q, k, v, block_size=2, topk_blocks=2, scale=1.0)[0]
    np.testing.assert_allclose(host(out), ref, rtol=1e-4, atol=1e-4)


def test_limits_raise_clearly():
    q, k, v = make_qkv(0, 1, 1, 1, 3, 4, 300, 3)
    with pytest.raises(ValueError, match="head dims 1..256, got D=300"):
        ta.block_topk_attention(dev(q), dev(k), dev(v), block_size=2, topk_blocks=2, impl="cuda")
    q, k, v = make_qkv(0, 1, 1, 1, 2, MAX_RANKED + 3, 2, 2)
    with pytest.raises(ValueError, match=f"at most {MAX_RANKED} blocks"):
        ta.block_topk_attention(dev(q), dev(k), dev(v), block_size=1, topk_blocks=MAX_RANKED + 2,
                                causal=False, impl="cuda")


@pytest.mark.parametrize("route", ["gather", "blockwise"])
def test_xp_routes_on_device_arrays(route):
    """impl='numpy' on the kernels' array kind (CuPy on a GPU): both routes, fwd and bwd, equal the reference."""
    T = S = 12 * N_SCALE
    q, k, v = gate_margin_inputs(21, 1, 4, 2, T, S, 3, 3, True)
    out, saved = ta.block_topk_attention_forward(dev(q), dev(k), dev(v), block_size=3, topk_blocks=3, route=route,
                                                 impl="numpy")
    assert saved.route == route
    ref, mask, lse, blocks = block_topk_attention_reference(q, k, v, block_size=3, topk_blocks=3)
    np.testing.assert_array_equal(host(saved.blocks), blocks)
    np.testing.assert_allclose(host(out), ref, rtol=1e-12, atol=1e-13)
    dout = np.random.default_rng(1).standard_normal(ref.shape)
    got = ta.block_topk_attention_backward(dev(dout), saved)
    for g, w in zip(got, masked_attention_grad_reference(q, k, v, mask, 1 / np.sqrt(8), dout)):
        np.testing.assert_allclose(host(g), w, rtol=1e-10, atol=1e-12)
