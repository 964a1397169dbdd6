"""Block top-k attention (MoBA): selection, both attend routes and gradients against the float64 reference."""
import tracemalloc

import numpy as np
import pytest

import topkattn as ta
from topkattn.ops.block_selection import BlockBounds, block_means, expand_blocks, select_blocks
from topkattn.ops.dense_attention import dense_attention
from topkattn.ops.reference import (
    block_topk_attention_reference,
    dense_attention_reference,
    masked_attention_grad_reference,
    masked_attention_reference,
)
from topkattn.testing import assert_grads_close, directional_grad_check, make_qkv, mask_from_idx, tolerance

IMPLS = ["numpy", "numba"]
ROUTES = ["gather", "blockwise"]

GRID = [
    # B, H, G, T, S, block_size, topk_blocks, causal
    (2, 4, 2, 7, 23, 4, 3, True),     # T < S, GQA, partial last block
    (1, 2, 2, 24, 24, 4, 2, True),    # T == S, MHA, whole blocks
    (1, 4, 1, 1, 30, 7, 3, True),     # T = 1 (decode), MQA
    (1, 2, 2, 13, 13, 3, 1, True),    # topk_blocks = 1: the own block alone
    (1, 2, 1, 9, 9, 2, 50, True),     # topk_blocks >= n_blocks: dense
    (1, 3, 1, 20, 11, 3, 2, True),    # T > S: the first rows see nothing
    (2, 2, 1, 6, 17, 5, 2, False),    # non-causal, partial last block
    (1, 2, 2, 5, 8, 16, 2, False),    # one partial block
]


def block_gate_gap(q, k, block_size, topk_blocks, causal):
    """Smallest gap between the m-th and (m+1)-th candidate gate of any row (inf if none)."""
    B, H, T, _ = q.shape
    G, S = k.shape[1], k.shape[2]
    bounds = BlockBounds(S, T, block_size=block_size, topk_blocks=topk_blocks, causal=causal)
    means = block_means(k.astype(np.float64), block_size)
    gap = np.inf
    for b in range(B):
        for h in range(H):
            gate = q[b, h] @ means[b, h // (H // G)].T  # (T, Nb)
            for t in range(T):
                s = np.sort(gate[t, :bounds.n_cand[t]])[::-1]
                if len(s) > bounds.m:
                    gap = min(gap, s[bounds.m - 1] - s[bounds.m] if bounds.m else np.inf)
    return gap


def margin_inputs(seed, B, H, G, T, S, D, Dv, block_size, topk_blocks, causal, margin=1e-3, dtype=np.float64):
    """Inputs whose block gates keep a margin at the selection boundary (finite differences
    and float32 rounding cannot flip the selection)."""
    rng = np.random.default_rng(seed)
    for _ in range(200):
        q, k, v = make_qkv(rng, B, H, G, T, S, D, Dv)
        if block_gate_gap(q, k, block_size, topk_blocks, causal) > margin:
            return q.astype(dtype), k.astype(dtype), v.astype(dtype)
    raise RuntimeError("no draw keeps the gate margin")


# ---------------------------------------------------------------- forward against the reference

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("B,H,G,T,S,bs,kb,causal", GRID)
def test_forward_matches_reference(impl, route, dtype, B, H, G, T, S, bs, kb, causal):
    q, k, v = margin_inputs(T * S + kb, B, H, G, T, S, 8, 6, bs, kb, causal, dtype=dtype)
    kw = dict(block_size=bs, topk_blocks=kb, causal=causal)
    out, saved = ta.block_topk_attention_forward(q, k, v, impl=impl, route=route, chunk_size=3, **kw)
    ref, mask, lse, blocks = block_topk_attention_reference(q, k, v, **kw)
    assert out.dtype == dtype and out.shape == (B, H, T, 6) and saved.route == route
    np.testing.assert_array_equal(saved.blocks, blocks)
    np.testing.assert_array_equal(mask_from_idx(saved.indices(), S), mask)
    np.testing.assert_allclose(out, ref, **tolerance(dtype))
    np.testing.assert_allclose(saved.lse, lse, **tolerance(dtype))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("B,H,G,T,S,bs,kb", [(2, 4, 2, 19, 37, 4, 3), (1, 6, 3, 40, 40, 3, 5),
                                             (1, 2, 1, 8, 50, 6, 4), (2, 2, 2, 30, 12, 5, 2)])
def test_selection_equals_brute_force(causal, B, H, G, T, S, bs, kb):
    """Every implementation and chunking selects the reference's blocks, in rank order."""
    q, k, v = make_qkv(S + T, B, H, G, T, S)
    want = block_topk_attention_reference(q, k, v, block_size=bs, topk_blocks=kb, causal=causal)[3]
    for impl in IMPLS:
        for chunk in (1, 4, None):
            got = select_blocks(q, k, block_size=bs, topk_blocks=kb, causal=causal, impl=impl, chunk_size=chunk)
            np.testing.assert_array_equal(got, want)


def test_causal_geometry_own_block_first_and_no_future_blocks():
    q, k, v = make_qkv(3, 1, 2, 1, 12, 20)  # T < S: query t sits at 8 + t
    bs, kb = 3, 3
    blocks = select_blocks(q, k, block_size=bs, topk_blocks=kb)
    for t in range(12):
        own = (8 + t) // bs
        row = blocks[0, :, t]  # (H, Kb)
        assert (row[:, 0] == own).all()
        chosen = row[row >= 0].reshape(2, -1)
        assert chosen.shape[1] == min(kb, own + 1)  # the own block counts toward topk_blocks
        assert (chosen <= own).all() and len(set(chosen[0])) == chosen.shape[1]
    idx = expand_blocks(blocks, BlockBounds(20, 12, block_size=bs, topk_blocks=kb, causal=True))
    pos = 8 + np.arange(12)
    assert (idx.max(-1) == pos).all()  # the own key is attended, nothing after it


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", [True, False])
def test_ties_go_to_lower_block_index(impl, causal):
    rng = np.random.default_rng(4)
    q = rng.standard_normal((1, 2, 6, 4))
    k = np.tile(rng.standard_normal((1, 1, 3, 4)), (1, 1, 6, 1))  # 6 identical blocks of 3 keys
    v = rng.standard_normal((1, 1, 18, 3))
    blocks = select_blocks(q, k, block_size=3, topk_blocks=3, causal=causal, impl=impl)
    if causal:  # queries 12..17 sit in blocks 4 and 5
        own = (12 + np.arange(6)) // 3
        want = np.stack([own, np.zeros(6, int), np.ones(6, int)], -1)
    else:
        want = np.broadcast_to([0, 1, 2], (6, 3))
    np.testing.assert_array_equal(blocks[0, 0], want)
    np.testing.assert_array_equal(blocks[0, 1], want)
    ref = block_topk_attention_reference(q, k, v, block_size=3, topk_blocks=3, causal=causal)
    np.testing.assert_array_equal(blocks, ref[3])


@pytest.mark.parametrize("impl", IMPLS)
def test_partial_last_block_is_ranked_by_the_mean_of_the_keys_it_has(impl):
    S, bs, D = 10, 4, 3  # blocks: 0..3, 4..7, 8..9
    k = np.zeros((1, 1, S, D))
    k[0, 0, :8, 0] = 0.6  # full blocks: mean 0.6 along q
    k[0, 0, 8:, 0] = 1.0  # partial block: mean 1.0 (0.5 if divided by block_size)
    q = np.zeros((1, 1, 1, D))
    q[0, 0, 0, 0] = 1.0
    np.testing.assert_allclose(block_means(k, bs)[0, 0, :, 0], [0.6, 0.6, 1.0])
    blocks = select_blocks(q, k, block_size=bs, topk_blocks=1, causal=False, impl=impl)
    assert blocks[0, 0, 0, 0] == 2
    v = np.arange(S, dtype=float).reshape(1, 1, S, 1)
    out = ta.block_topk_attention(q, k, v, block_size=bs, topk_blocks=1, causal=False)
    np.testing.assert_allclose(out[0, 0, 0, 0], 8.5)  # equal scores over keys 8 and 9 only


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T,S,bs", [(9, 9, 2), (5, 11, 3), (4, 7, 16)])
def test_topk_blocks_at_least_n_blocks_is_dense_attention(route, causal, T, S, bs):
    q, k, v = make_qkv(T + S, 1, 4, 2, T, S)
    out, saved = ta.block_topk_attention_forward(q, k, v, block_size=bs, topk_blocks=-(-S // bs),
                                                 causal=causal, route=route)
    want, lse = dense_attention_reference(q, k, v, causal=causal)
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(saved.lse, lse, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out, dense_attention(q, k, v, causal=causal), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("route", ROUTES)
def test_implementations_and_chunks_agree(route):
    q, k, v = margin_inputs(5, 2, 4, 2, 33, 40, 8, 6, 4, 3, True)
    runs = [ta.block_topk_attention_forward(q, k, v, block_size=4, topk_blocks=3, impl=impl, route=r, chunk_size=c)
            for impl in IMPLS for c in (1, 7, None) for r in (route, "auto")]
    for out, saved in runs[1:]:
        np.testing.assert_array_equal(saved.blocks, runs[0][1].blocks)
        np.testing.assert_allclose(out, runs[0][0], rtol=1e-12, atol=1e-13)


def test_segment_pieces_equal_whole_segments(monkeypatch):
    """The NumPy block-wise loop cuts long segments into pieces: same results as whole ones."""
    from topkattn.ops import blockwise_attention

    q, k, v = margin_inputs(8, 1, 4, 1, 24, 24, 8, 6, 4, 3, True)
    dout = np.random.default_rng(2).standard_normal((1, 4, 24, 6))
    runs = []
    for tile in (blockwise_attention.TILE_BYTES, 3 * 4 * 8):  # pieces of 3 rows
        monkeypatch.setattr(blockwise_attention, "TILE_BYTES", tile)
        out, saved = ta.block_topk_attention_forward(q, k, v, block_size=4, topk_blocks=3, route="blockwise",
                                                     impl="numpy")
        runs.append((out,) + ta.block_topk_attention_backward(dout, saved))
    for a, b in zip(*runs):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)


def test_auto_route_by_shape_and_finiteness():
    """"auto": block-wise, gather for decode-like calls (B*H*T*K <= GATHER_MAX_SLOTS) and for
    a non-finite key or value (also when "blockwise" is asked for)."""
    from topkattn.ops.block_attention import GATHER_MAX_SLOTS

    q, k, v = make_qkv(6, 1, 2, 1, 96, 96)
    assert 2 * 96 * 32 > GATHER_MAX_SLOTS
    assert ta.block_topk_attention_forward(q, k, v, block_size=8, topk_blocks=4)[1].route == "blockwise"
    small = ta.block_topk_attention_forward(q[:, :, -1:], k, v, block_size=8, topk_blocks=4)[1]
    assert small.route == "gather"  # one query row (decode-like): 2 * 1 * 32 slots
    assert ta.block_topk_attention_forward(q[:, :, -1:], k, v, block_size=8, topk_blocks=4,
                                           route="blockwise")[1].route == "blockwise"
    v[0, 0, 5, 1] = np.nan
    for route in ("auto", "blockwise"):
        assert ta.block_topk_attention_forward(q, k, v, block_size=8, topk_blocks=4, route=route)[1].route == "gather"


# ---------------------------------------------------------------- non-finite inputs, large logits

@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_large_logits_are_finite(route, impl, dtype):
    q, k, v = margin_inputs(4, 1, 2, 2, 12, 12, 8, 6, 3, 2, True, dtype=dtype)
    q *= dtype(1e4)
    out, saved = ta.block_topk_attention_forward(q, k, v, block_size=3, topk_blocks=2, scale=1.0,
                                                 route=route, impl=impl)
    assert np.isfinite(out).all() and np.isfinite(saved.lse).all()
    ref, _, lse, _ = block_topk_attention_reference(q, k, v, block_size=3, topk_blocks=2, scale=1.0)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(saved.lse, lse, rtol=1e-12 if dtype == np.float64 else 1e-5, atol=1e-8)
    grads = ta.block_topk_attention_backward(np.ones_like(out), saved)
    assert all(np.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("route", ROUTES)
def test_nan_query_affects_only_its_row(route):
    q, k, v = make_qkv(6, 1, 2, 2, 9, 9)
    q[0, 1, 4, 3] = np.nan
    out, saved = ta.block_topk_attention_forward(q, k, v, block_size=3, topk_blocks=2, route=route)
    assert saved.route == route
    bad = np.zeros(out.shape[:3], dtype=bool)
    bad[0, 1, 4] = True
    assert np.isnan(out[bad]).all() and np.isfinite(out[~bad]).all()
    ref = block_topk_attention_reference(q, k, v, block_size=3, topk_blocks=2)[0]
    np.testing.assert_allclose(out, ref, rtol=1e-12, equal_nan=True)
    dq, dk, dv = ta.block_topk_attention_backward(np.ones_like(out), saved)
    assert np.isnan(dq[bad]).all() and np.isfinite(dq[~bad]).all()
    clean = q.copy()
    clean[0, 1, 4] = 0.0
    dout = np.where(bad[..., None], 0.0, np.ones_like(out))  # the NaN row sends nothing: as if its dout were 0
    mask = mask_from_idx(saved.indices(), 9)
    _, dk_ref, dv_ref = masked_attention_grad_reference(clean, k, v, mask, 1 / np.sqrt(8), dout)
    np.testing.assert_allclose(dk, dk_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dv, dv_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # inf - inf inside the NaN rows
@pytest.mark.parametrize("where", ["k", "v"])
@pytest.mark.parametrize("special", [np.nan, np.inf])
def test_nonfinite_key_or_value_follows_the_reference(where, special):
    """A NaN/inf key ranks its block first where it is a candidate; inside the own block a
    key after the query stays hidden; every row equals the reference (the gather route)."""
    q, k, v = make_qkv(9, 1, 2, 1, 12, 12)
    (k if where == "k" else v)[0, 0, 7, 1] = special  # block 2 (keys 6..8) with bs = 3
    out, saved = ta.block_topk_attention_forward(q, k, v, block_size=3, topk_blocks=2)
    assert saved.route == "gather"
    ref = block_topk_attention_reference(q, k, v, block_size=3, topk_blocks=2)[0]
    np.testing.assert_allclose(out, ref, rtol=1e-12, equal_nan=True)
    assert np.isfinite(out[0, :, :7]).all()  # rows before key 7 never see it
    grads = ta.block_topk_attention_backward(np.ones_like(out), saved)
    assert np.isfinite(grads[0][0, :, :7]).all()


def test_rows_that_see_no_key_give_zeros():
    q, k, v = make_qkv(2, 1, 1, 1, 7, 4)  # T > S: the first 3 queries see nothing
    for route in ROUTES:
        out, saved = ta.block_topk_attention_forward(q, k, v, block_size=2, topk_blocks=2, route=route)
        np.testing.assert_array_equal(out[0, 0, :3], 0.0)
        assert np.all(np.isneginf(saved.lse[0, 0, :3])) and (saved.blocks[0, 0, :3] == -1).all()
        dq, dk, dv = ta.block_topk_attention_backward(np.ones_like(out), saved)
        np.testing.assert_array_equal(dq[0, 0, :3], 0.0)
        assert np.isfinite(dk).all() and np.isfinite(dv).all()


# ---------------------------------------------------------------- gradients

@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kw", [dict(causal=True), dict(causal=False), dict(causal=True, scale=0.7)])
def test_gradients_central_differences(route, impl, kw):
    rng = np.random.default_rng(0)
    bs, kb = 3, 2
    q, k, v = margin_inputs(1, 1, 4, 2, 8, 11, 5, 3, bs, kb, kw["causal"], margin=1e-3)
    dout = rng.standard_normal((1, 4, 8, 3))
    out, saved = ta.block_topk_attention_forward(q, k, v, block_size=bs, topk_blocks=kb, route=route,
                                                 impl=impl, **kw)
    dq, dk, dv = ta.block_topk_attention_backward(dout, saved)

    def f():
        return np.sum(ta.block_topk_attention(q, k, v, block_size=bs, topk_blocks=kb, route=route,
                                              impl=impl, **kw) * dout)

    for _ in range(3):
        assert_grads_close(directional_grad_check(f, dict(q=q, k=k, v=v), dict(q=dq, k=dk, v=dv), rng))
    for entry in [(0, 0, 2, 1), (0, 1, 9, 0)]:  # single coordinates of dk and dv
        e = np.zeros_like(k)
        e[entry[:3] + (0,)] = 1.0
        res = directional_grad_check(f, {"k": k}, {"k": dk}, rng, directions={"k": e})
        assert_grads_close(res, atol=1e-9)
        e = np.zeros_like(v)
        e[entry] = 1.0
        res = directional_grad_check(f, {"v": v}, {"v": dv}, rng, directions={"v": e})
        assert_grads_close(res, atol=1e-9)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("causal", [True, False])
def test_backward_matches_gradient_of_masked_reference(route, dtype, causal):
    q, k, v = margin_inputs(11, 2, 4, 2, 10, 14, 6, 4, 4, 2, causal, dtype=dtype)
    dout = np.random.default_rng(1).standard_normal((2, 4, 10, 4)).astype(dtype)
    out, saved = ta.block_topk_attention_forward(q, k, v, block_size=4, topk_blocks=2, causal=causal, route=route)
    _, mask, _, _ = block_topk_attention_reference(q, k, v, block_size=4, topk_blocks=2, causal=causal)
    got = ta.block_topk_attention_backward(dout, saved)
    want = masked_attention_grad_reference(q, k, v, mask, 1 / np.sqrt(6), dout)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-4, atol=1e-5)
    for g, w in zip(got, want):
        assert g.dtype == dtype
        np.testing.assert_allclose(g, w, **tol)
    np.testing.assert_allclose(out, masked_attention_reference(q, k, v, mask, 1 / np.sqrt(6)), **tolerance(dtype))


def test_unselected_blocks_get_exactly_zero_gradient():
    q, k, v = margin_inputs(2, 1, 2, 1, 3, 24, 5, 3, 4, 2, True)  # 3 queries in the last block
    out, saved = ta.block_topk_attention_forward(q, k, v, block_size=4, topk_blocks=2)
    dq, dk, dv = ta.block_topk_attention_backward(np.ones_like(out), saved)
    used = mask_from_idx(saved.indices(), 24).any(axis=(1, 2))  # (B, S): G = 1
    assert (~used).sum() >= 8
    assert np.all(dk[0, 0, ~used[0]] == 0.0) and np.all(dv[0, 0, ~used[0]] == 0.0)
    assert np.all(np.abs(dv[0, 0, used[0]]).sum(-1) > 0)


# ---------------------------------------------------------------- memory, interop, shapes, bad input

@pytest.mark.parametrize("route", ROUTES)
def test_never_materialises_the_full_score_matrix(route):
    """Peak memory: the gate tiles (16 MiB budget) and, on the gather route, the (T, K, D)
    gathered keys in 8 MiB chunks; far below one (T, S) score matrix."""
    T = S = 4096
    bs, kb = 8, 2
    q, k, v = make_qkv(0, 1, 1, 1, T, S, D=16, Dv=16, dtype=np.float32)
    ta.block_topk_attention(q[:, :, :64], k[:, :, :64], v[:, :, :64], block_size=bs, topk_blocks=kb)  # compile
    tracemalloc.start()
    out, saved = ta.block_topk_attention_forward(q, k, v, block_size=bs, topk_blocks=kb, route=route)
    ta.block_topk_attention_backward(np.ones_like(out), saved)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    full = T * S * 4
    assert peak < full / 3, f"peak {peak} bytes vs a full score matrix of {full}"


def test_torch_tensors_in_torch_tensors_out():
    torch = pytest.importorskip("torch")
    q, k, v = make_qkv(0, 1, 2, 1, 6, 6)
    out, saved = ta.block_topk_attention_forward(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v),
                                                 block_size=2, topk_blocks=2)
    assert isinstance(out, torch.Tensor)
    np.testing.assert_allclose(out.numpy(), ta.block_topk_attention(q, k, v, block_size=2, topk_blocks=2),
                               rtol=1e-14)
    grads = ta.block_topk_attention_backward(torch.ones_like(out), saved)
    assert all(isinstance(g, torch.Tensor) for g in grads)


EMPTY = {  # name: (B, H, G, T, S, D, Dv)
    "B=0": (0, 2, 1, 3, 4, 4, 3), "H=0": (1, 0, 1, 3, 4, 4, 3), "D=0": (1, 2, 1, 3, 4, 0, 3),
    "Dv=0": (1, 2, 1, 3, 4, 4, 0), "T=0": (1, 2, 1, 0, 4, 4, 3), "S=0": (1, 2, 1, 3, 0, 4, 3),
}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", list(EMPTY))
def test_empty_dimensions(route, case):
    B, H, G, T, S, D, Dv = EMPTY[case]
    q, k, v = make_qkv(27, B, H, G, T, S, D, Dv)
    with np.errstate(all="raise"):
        out, saved = ta.block_topk_attention_forward(q, k, v, block_size=2, topk_blocks=2, route=route)
    assert out.shape == (B, H, T, Dv) and out.dtype == q.dtype
    want = block_topk_attention_reference(q, k, v, block_size=2, topk_blocks=2)[0]
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-14)
    grads = ta.block_topk_attention_backward(np.ones(out.shape), saved)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    assert all(g.dtype == q.dtype and np.isfinite(g).all() for g in grads)


BAD = [
    (dict(block_size=0), ValueError, "block_size must be an integer >= 1, got 0"),
    (dict(topk_blocks=0), ValueError, "topk_blocks must be an integer >= 1, got 0"),
    (dict(block_size=2.5), TypeError, "block_size must be an integer, got float 2.5"),
    (dict(topk_blocks=2.0), TypeError, "topk_blocks must be an integer, got float 2.0"),
    (dict(topk_blocks="4"), TypeError, "topk_blocks must be an integer, got str"),
    (dict(block_size=True), TypeError, "block_size must be an integer, got bool"),
    (dict(topk_blocks=np.bool_(True)), TypeError, "topk_blocks must be an integer, got bool"),
    (dict(scale=True), TypeError, "scale must be a real number, got bool"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(route="fast"), ValueError, "route must be 'auto', 'gather' or 'blockwise', got 'fast'"),
    (dict(impl="fast"), ValueError, "impl must be"),
    (dict(impl="cuda", route="gather"), ValueError, "impl='cuda' takes route='auto'"),
    (dict(q=np.zeros((2, 3, 4))), ValueError, "q must be 4-D"),
    (dict(k=np.zeros((1, 2, 9, 7))), ValueError, "k head dim"),
    (dict(k=np.zeros((2, 2, 9, 8))), ValueError, "batch sizes differ"),
    (dict(v=np.zeros((1, 2, 8, 6))), ValueError, "v must have shape"),
    (dict(k=np.zeros((1, 3, 9, 8)), v=np.zeros((1, 3, 9, 6))), ValueError, "multiple of KV heads"),
    (dict(q=np.zeros((1, 4, 5, 8), dtype=np.int64)), TypeError, "q must be float32 or float64"),
    (dict(v=np.zeros((1, 2, 9, 6), dtype=np.float32)), TypeError, "share one dtype"),
]


@pytest.mark.parametrize("override,exc,msg", BAD)
def test_bad_input_raises_a_clear_error(override, exc, msg):
    q, k, v = make_qkv(0, 1, 4, 2, 5, 9, 8, 6)
    args = dict(q=q, k=k, v=v, block_size=2, topk_blocks=3)
    args.update(override)
    with pytest.raises(exc, match=msg):
        ta.block_topk_attention(**args)


def test_backward_rejects_wrong_dout_and_foreign_saved():
    q, k, v = make_qkv(0)
    out, saved = ta.block_topk_attention_forward(q, k, v, block_size=2, topk_blocks=2)
    with pytest.raises(ValueError, match=r"dout must have shape \(1, 2, 5, 6\)"):
        ta.block_topk_attention_backward(np.ones((1, 2, 5, 5)), saved)
    with pytest.raises(TypeError, match="saved must come from block_topk_attention_forward"):
        ta.block_topk_attention_backward(out, ta.topk_attention_forward(q, k, v, topk=2)[1])


@pytest.mark.parametrize("causal", [True, False])
def test_block_size_beyond_any_int64_is_one_block_of_every_key(causal):
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((1, 2, 5, 4)), rng.standard_normal((1, 2, 7, 4)), rng.standard_normal((1, 2, 7, 3))
    out, saved = ta.block_topk_attention_forward(q, k, v, block_size=10**30, topk_blocks=1, causal=causal)
    np.testing.assert_allclose(out, ta.topk_attention(q, k, v, topk=7, causal=causal), atol=1e-12)
    assert saved.indices().shape[-1] == 7  # K = one block of S keys, not 10**30 slots
    dout = rng.standard_normal(out.shape)
    ref = ta.block_topk_attention_forward(q, k, v, block_size=7, topk_blocks=1, causal=causal)[1]
    for g, r in zip(ta.block_topk_attention_backward(dout, saved), ta.block_topk_attention_backward(dout, ref)):
        np.testing.assert_allclose(g, r, atol=1e-12)
