"""The top-k attention op against the dense float64 reference."""
import tracemalloc

import numpy as np
import pytest

import topkattn as ta
from topkattn.ops.cpu_kernels import ranked_topm_rows
from topkattn.ops.reference import masked_attention_reference, rank_row, topk_attention_reference
from topkattn.ops.selection import RowBounds, ranked_topm_xp
from topkattn.testing import assert_grads_close, directional_grad_check, make_qkv, mask_from_idx, tolerance

IMPLS = ["numpy", "numba"]


GRID = [
    # B, H, G, T, S, topk, sinks, window, temperature, causal
    (2, 4, 2, 5, 9, 3, 0, 0, 1.0, True),      # T < S, GQA
    (1, 2, 2, 8, 8, 3, 0, 0, 1.0, True),      # T == S, MHA
    (1, 4, 1, 1, 12, 4, 0, 0, 1.0, True),     # T = 1 (decode), MQA
    (1, 2, 2, 6, 6, 1, 0, 0, 1.0, True),      # topk = 1
    (1, 2, 1, 6, 6, 50, 0, 0, 1.0, True),     # topk >= S: dense
    (1, 2, 2, 7, 10, 2, 2, 0, 1.0, True),     # sinks
    (1, 2, 2, 7, 10, 2, 0, 3, 1.0, True),     # window
    (1, 2, 2, 7, 10, 2, 1, 2, 0.5, True),     # sinks + window + temperature
    (2, 2, 1, 4, 7, 3, 1, 1, 2.0, False),     # non-causal
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("B,H,G,T,S,topk,sinks,window,temp,causal", GRID)
def test_forward_matches_reference(impl, dtype, B, H, G, T, S, topk, sinks, window, temp, causal):
    q, k, v = make_qkv(T * S + topk, B, H, G, T, S, dtype=dtype)
    kw = dict(topk=topk, causal=causal, sinks=sinks, window=window, temperature=temp)
    out, saved = ta.topk_attention_forward(q, k, v, impl=impl, chunk_size=3, **kw)
    ref, ref_mask, ref_lse = topk_attention_reference(q, k, v, **kw)
    assert out.dtype == dtype and out.shape == (B, H, T, v.shape[-1])
    np.testing.assert_allclose(out, ref, **tolerance(dtype))
    np.testing.assert_allclose(saved.lse, ref_lse, **tolerance(dtype))
    if dtype == np.float64:  # float32 rounding may legitimately reorder near-ties
        np.testing.assert_array_equal(mask_from_idx(saved.idx, S), ref_mask)


@pytest.mark.parametrize("causal", [True, False])
def test_topk_at_least_S_is_dense_attention(causal):
    q, k, v = make_qkv(3, 1, 4, 2, 6, 6)
    out = ta.topk_attention(q, k, v, topk=6, causal=causal)
    T, S = 6, 6
    allowed = np.tril(np.ones((T, S), dtype=bool)) if causal else np.ones((T, S), dtype=bool)
    dense = masked_attention_reference(q, k, v, np.broadcast_to(allowed, (1, 4, T, S)), 1 / np.sqrt(8))
    np.testing.assert_allclose(out, dense, rtol=1e-12, atol=1e-12)


def test_chunk_size_and_impl_do_not_change_results():
    q, k, v = make_qkv(5, 2, 4, 2, 33, 40)
    outs = [ta.topk_attention_forward(q, k, v, topk=5, sinks=1, window=2, impl=impl, chunk_size=c)
            for impl in IMPLS for c in (1, 7, None)]
    for out, saved in outs[1:]:
        np.testing.assert_array_equal(saved.idx, outs[0][1].idx)
        np.testing.assert_allclose(out, outs[0][0], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("impl", IMPLS)
def test_ties_go_to_lower_key_index(impl):
    # q = 0 makes every score equal: the selection must be the lowest visible indices.
    q, k, v = make_qkv(1, 1, 1, 1, 4, 10)
    q[:] = 0.0
    _, saved = ta.topk_attention_forward(q, k, v, topk=3, impl=impl)
    sel = np.sort(saved.idx[0, 0], axis=-1)
    # query t sits at position 6 + t and sees keys 0..6+t: lowest three are 0, 1, 2
    np.testing.assert_array_equal(sel, np.tile([0, 1, 2], (4, 1)))


@pytest.mark.parametrize("m", [2, 5, 9, 12])
def test_candidates_scoring_minus_inf_rank_like_the_reference(m):
    """A candidate scoring -inf still ranks above every non-candidate (xp path, Numba kernel)."""
    rng = np.random.default_rng(7)
    tile = rng.standard_normal((40, 9))
    tile[rng.random(tile.shape) < 0.4] = -np.inf
    tile[rng.random(tile.shape) < 0.05] = np.nan
    bounds = RowBounds(9, 40, topk=m, causal=True, sinks=2, window=1)
    cand = bounds.candidate_mask(0, 40, 9)  # (rows, 9)
    want = np.full((40, m), -1, dtype=np.int64)
    for r in range(40):
        ranked = rank_row(tile[r], cand[r])[:m]
        want[r, :len(ranked)] = ranked
    np.testing.assert_array_equal(ranked_topm_xp(tile, cand, m), want)
    got = np.full((40, m), -1, dtype=np.int64)
    ranked_topm_rows(tile, got, bounds.end, bounds.win_lo, bounds.win_hi, bounds.sinks, m)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("impl", IMPLS)
def test_rows_with_fewer_than_k_candidates(impl):
    q, k, v = make_qkv(2, 1, 2, 2, 6, 6)
    out, saved = ta.topk_attention_forward(q, k, v, topk=4, impl=impl)
    assert np.isfinite(out).all()
    n_valid = (saved.idx[0, 0] >= 0).sum(-1)
    np.testing.assert_array_equal(n_valid, [1, 2, 3, 4, 4, 4])
    ref, _, _ = topk_attention_reference(q, k, v, topk=4)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)


def test_rows_that_see_no_key_give_zeros():
    q, k, v = make_qkv(2, 1, 1, 1, 6, 3)  # T > S: the first 3 queries see nothing
    out, saved = ta.topk_attention_forward(q, k, v, topk=2)
    np.testing.assert_array_equal(out[0, 0, :3], 0.0)
    assert np.all(np.isneginf(saved.lse[0, 0, :3]))
    dq, dk, dv = ta.topk_attention_backward(np.ones_like(out), saved)
    np.testing.assert_array_equal(dq[0, 0, :3], 0.0)
    assert np.isfinite(dk).all() and np.isfinite(dv).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_large_logits_are_finite(impl, dtype):
    q, k, v = make_qkv(4, 1, 2, 2, 6, 8, dtype=dtype)
    q *= dtype(1e4)
    out, saved = ta.topk_attention_forward(q, k, v, topk=3, scale=1.0, impl=impl)
    assert np.isfinite(out).all() and np.isfinite(saved.lse).all()
    ref, _, _ = topk_attention_reference(q, k, v, topk=3, scale=1.0)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    grads = ta.topk_attention_backward(np.ones_like(out), saved)
    assert all(np.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_query_affects_only_its_row(impl):
    q, k, v = make_qkv(6, 1, 2, 2, 5, 8)
    q[0, 1, 2, 3] = np.nan
    out = ta.topk_attention(q, k, v, topk=3, impl=impl)
    assert np.isnan(out[0, 1, 2]).all()
    bad = np.zeros(out.shape, dtype=bool)
    bad[0, 1, 2] = True
    assert np.isfinite(out[~bad]).all()
    clean = q.copy()
    clean[0, 1, 2] = 0.0
    ref, _, _ = topk_attention_reference(clean, k, v, topk=3)
    np.testing.assert_allclose(out[~bad], ref[~bad], rtol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_key_reaches_only_the_rows_that_see_it(impl):
    q, k, v = make_qkv(7, 1, 1, 1, 6, 6)
    k[0, 0, 4, 0] = np.nan  # key 4: visible to queries 4 and 5 only
    out = ta.topk_attention(q, k, v, topk=2, impl=impl)
    assert np.isnan(out[0, 0, 4:]).all()
    assert np.isfinite(out[0, 0, :4]).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("where", ["k", "v"])
def test_nan_in_first_key_stays_in_its_batch(impl, where):
    """Early causal rows have empty slots; they must not pick up batch 0's key 0."""
    q, k, v = make_qkv(8, 2, 2, 1, 5, 5)
    (k if where == "k" else v)[0, 0, 0, 0] = np.nan
    out, saved = ta.topk_attention_forward(q, k, v, topk=3, impl=impl)
    assert np.isnan(out[0, :, :3]).any(-1).all()  # rows 0-2 attend to all they see, key 0 too
    ref, _, _ = topk_attention_reference(q[1:], k[1:], v[1:], topk=3)
    np.testing.assert_allclose(out[1], ref[0], rtol=1e-12)
    dq, dk, dv = ta.topk_attention_backward(np.ones_like(out), saved)
    clean = ta.topk_attention_forward(q[1:], k[1:], v[1:], topk=3, impl=impl)[1]
    for got, want in zip((dq, dk, dv), ta.topk_attention_backward(np.ones_like(out[1:]), clean)):
        np.testing.assert_allclose(got[1:], want, rtol=1e-12)


# ---------------------------------------------------------------- gradients

def margin_inputs(B=1, H=4, G=2, T=6, S=10, D=5, Dv=3, topk=3, causal=True, sinks=0, window=0):
    """float64 inputs whose k-th and (k+1)-th candidate scores differ by a margin."""
    cand = RowBounds(S, T, topk=topk, causal=causal, sinks=sinks, window=window).candidate_mask(0, T, S)
    return make_qkv(0, B, H, G, T, S, D, Dv, topk=topk, margin=1e-3, candidates=cand)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kw", [dict(), dict(sinks=1, window=2), dict(causal=False),
                                dict(temperature=0.7, scale=0.9)])
def test_gradients_central_differences(impl, kw):
    rng = np.random.default_rng(0)
    topk = 3
    sel_kw = {k_: v_ for k_, v_ in kw.items() if k_ in ("causal", "sinks", "window")}
    q, k, v = margin_inputs(topk=topk, **sel_kw)
    dout = rng.standard_normal((1, 4, 6, 3))
    out, saved = ta.topk_attention_forward(q, k, v, topk=topk, impl=impl, **kw)
    dq, dk, dv = ta.topk_attention_backward(dout, saved)

    def f():
        return np.sum(ta.topk_attention(q, k, v, topk=topk, impl=impl, **kw) * dout)

    for _ in range(3):
        assert_grads_close(directional_grad_check(f, dict(q=q, k=k, v=v), dict(q=dq, k=dk, v=dv), rng))
    # every coordinate of dv for a couple of entries, to catch a misplaced scatter
    for entry in [(0, 0, 2, 1), (0, 1, 7, 0)]:
        e = np.zeros_like(v)
        e[entry] = 1.0
        res = directional_grad_check(f, {"v": v}, {"v": dv}, rng, directions={"v": e})
        assert_grads_close(res, atol=1e-9)


def test_unselected_keys_get_exactly_zero_gradient():
    q, k, v = margin_inputs(T=4, S=12, topk=2)
    out, saved = ta.topk_attention_forward(q, k, v, topk=2)
    dq, dk, dv = ta.topk_attention_backward(np.ones_like(out), saved)
    # a key is used if any head of its group selected it
    used = np.zeros(k.shape[:3], dtype=bool)
    m = mask_from_idx(saved.idx, 12)  # (B, H, T, S)
    used[:, :] = m.reshape(1, 2, 2, 4, 12).any(axis=(2, 3))
    assert (~used).any()
    assert np.all(dk[~used] == 0.0) and np.all(dv[~used] == 0.0)
    assert np.all(np.abs(dk[used]).sum(-1) > 0)


def test_backward_matches_gradient_of_masked_reference():
    """The backward equals the exact gradient of softmax attention restricted to the selection."""
    q, k, v = make_qkv(11, 1, 4, 2, 5, 9, 6, 4)
    rng = np.random.default_rng(1)
    dout = rng.standard_normal((1, 4, 5, 4))
    out, saved = ta.topk_attention_forward(q, k, v, topk=3, sinks=1, window=1)
    mask = mask_from_idx(saved.idx, 9)
    dq, dk, dv = ta.topk_attention_backward(dout, saved)

    def f():
        return np.sum(masked_attention_reference(q, k, v, mask, 1 / np.sqrt(6)) * dout)

    assert_grads_close(directional_grad_check(f, dict(q=q, k=k, v=v), dict(q=dq, k=dk, v=dv), rng))


def test_gradients_match_torch_autograd_on_the_reference():
    torch = pytest.importorskip("torch")
    q, k, v = make_qkv(13, 2, 4, 2, 6, 10, 8, 5)
    rng = np.random.default_rng(2)
    dout = rng.standard_normal((2, 4, 6, 5))
    kw = dict(topk=3, sinks=1, window=1, forget_rate=0.3, seed=9)
    out, saved = ta.topk_attention_forward(q, k, v, **kw)
    dq, dk, dv = ta.topk_attention_backward(dout, saved)
    _, mask, _ = topk_attention_reference(q, k, v, **kw)

    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    kh = tk.repeat_interleave(2, dim=1)
    vh = tv.repeat_interleave(2, dim=1)
    s = torch.einsum("bhtd,bhsd->bhts", tq, kh) / np.sqrt(8)
    s = s.masked_fill(~torch.tensor(mask), float("-inf"))
    tout = torch.softmax(s, dim=-1) @ vh
    (tout * torch.tensor(dout)).sum().backward()
    np.testing.assert_allclose(out, tout.detach().numpy(), rtol=1e-12, atol=1e-12)
    for mine, theirs in ((dq, tq.grad), (dk, tk.grad), (dv, tv.grad)):
        np.testing.assert_allclose(mine, theirs.numpy(), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- forgetful masking

@pytest.mark.parametrize("impl", IMPLS)
def test_forgetting_is_reproducible_and_matches_reference(impl):
    q, k, v = make_qkv(8, 1, 2, 2, 12, 16)
    kw = dict(topk=4, forget_rate=0.4, sinks=1, window=1)
    o1, s1 = ta.topk_attention_forward(q, k, v, seed=123, impl=impl, chunk_size=5, **kw)
    o2, s2 = ta.topk_attention_forward(q, k, v, seed=123, impl=impl, **kw)
    o3, s3 = ta.topk_attention_forward(q, k, v, seed=124, impl=impl, **kw)
    np.testing.assert_array_equal(s1.idx, s2.idx)
    np.testing.assert_array_equal(o1, o2)
    assert not np.array_equal(s1.idx, s3.idx)
    ref, mask, _ = topk_attention_reference(q, k, v, seed=123, **kw)
    np.testing.assert_array_equal(mask_from_idx(s1.idx, 16), mask)
    np.testing.assert_allclose(o1, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rate", [0.1, 0.3])
def test_forgetting_recall_matches_rate(rate):
    # many rows, each with plenty of candidates so refills always exist
    q, k, v = make_qkv(21, 2, 4, 4, 256, 512, D=16, Dv=4, dtype=np.float32)
    topk = 8
    _, exact = ta.topk_attention_forward(q, k, v, topk=topk)
    _, forgot = ta.topk_attention_forward(q, k, v, topk=topk, forget_rate=rate, seed=0)
    e = np.sort(exact.idx, -1)
    hits = [np.isin(forgot.idx[b, h, t], e[b, h, t]).sum()
            for b in range(2) for h in range(4) for t in range(256)]
    recall = np.sum(hits) / (2 * 4 * 256 * topk)
    assert abs(recall - (1 - rate)) < 0.02
    assert np.all((forgot.idx >= 0).sum(-1) == topk)  # every dropped slot was refilled


def test_forgetting_never_drops_forced_keys():
    q, k, v = make_qkv(3, 1, 2, 2, 20, 40)
    _, s = ta.topk_attention_forward(q, k, v, topk=2, sinks=3, window=4, forget_rate=0.9, seed=0)
    pos = 40 - 20 + np.arange(20)
    np.testing.assert_array_equal(s.idx[0, 0, :, :3], np.tile([0, 1, 2], (20, 1)))
    np.testing.assert_array_equal(s.idx[0, 0, :, 3:7], pos[:, None] - np.arange(4)[None, :])


# ---------------------------------------------------------------- memory, interop, bad input

def test_forward_never_materialises_the_full_score_matrix():
    T = S = 2048
    q, k, v = make_qkv(0, 1, 1, 1, T, S, D=16, Dv=16, dtype=np.float32)
    ta.topk_attention(q[:, :, :8], k[:, :, :8], v[:, :, :8], topk=4)  # compile outside the trace
    ta.topk_attention(q[:, :, :300], k[:, :, :300], v[:, :, :300], topk=4)  # rows > SHORT_KEYS: the fused scan
    tracemalloc.start()
    out, saved = ta.topk_attention_forward(q, k, v, topk=4, chunk_size=32)
    ta.topk_attention_backward(np.ones_like(out), saved)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    full = T * S * 4
    assert peak < full / 4, f"peak {peak} bytes vs a full score matrix of {full}"


def test_torch_tensors_in_torch_tensors_out():
    torch = pytest.importorskip("torch")
    q, k, v = make_qkv(0, 1, 2, 1, 4, 6)
    out = ta.topk_attention(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), topk=2)
    assert isinstance(out, torch.Tensor)
    np.testing.assert_allclose(out.numpy(), ta.topk_attention(q, k, v, topk=2), rtol=1e-14)


BAD = [
    (dict(q=np.zeros((2, 3, 4))), ValueError, "q must be 4-D"),
    (dict(k=np.zeros((1, 2, 9, 7))), ValueError, "k head dim"),
    (dict(k=np.zeros((2, 2, 9, 8))), ValueError, "batch sizes differ"),
    (dict(v=np.zeros((1, 2, 8, 6))), ValueError, "v must have shape"),
    (dict(k=np.zeros((1, 3, 9, 8)), v=np.zeros((1, 3, 9, 6))), ValueError, "multiple of KV heads"),
    (dict(topk=0), ValueError, "topk must be an integer >= 1"),
    (dict(topk=2.5), TypeError, "topk must be an integer, got float"),
    (dict(q=np.zeros((1, 4, 5, 8), dtype=np.int64)), TypeError, "q must be float32 or float64"),
    (dict(v=np.zeros((1, 2, 9, 6), dtype=np.float32)), TypeError, "share one dtype"),
    (dict(forget_rate=1.0), ValueError, "forget_rate"),
    (dict(forget_rate=-0.1), ValueError, "forget_rate"),
    (dict(sinks=-1), ValueError, "sinks"),
    (dict(window=-2), ValueError, "window"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(impl="fast"), ValueError, "impl"),
]


@pytest.mark.parametrize("override,exc,msg", BAD)
def test_bad_input_raises_a_clear_error(override, exc, msg):
    q, k, v = make_qkv(0, 1, 4, 2, 5, 9, 8, 6)
    args = dict(q=q, k=k, v=v, topk=3)
    args.update(override)
    with pytest.raises(exc, match=msg):
        ta.topk_attention(**args)


def test_backward_rejects_wrong_dout_shape():
    q, k, v = make_qkv(0)
    out, saved = ta.topk_attention_forward(q, k, v, topk=2)
    with pytest.raises(ValueError, match=r"dout must have shape \(1, 2, 5, 6\)"):
        ta.topk_attention_backward(np.zeros((1, 2, 5, 5)), saved)
    with pytest.raises(TypeError, match="saved must come from"):
        ta.topk_attention_backward(np.zeros(out.shape), {"idx": 1})


# ---------------------------------------------------------------- dynamic k

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("eps,max_topk,kw", [
    (1e-2, None, dict()), (1e-1, 6, dict(sinks=1, window=2)), (1e-2, 8, dict(causal=False)),
])
def test_dynamic_k_matches_reference_and_bound_holds(impl, eps, max_topk, kw):
    from topkattn.ops.reference import dynamic_topk_reference

    q, k, v = make_qkv(17, 2, 4, 2, 16, 24, D=8)
    q *= 3.0  # peaked rows need few keys, flat rows many
    out, saved = ta.topk_attention_forward(q, k, v, topk="auto", tail_bound=eps, max_topk=max_topk,
                                           impl=impl, chunk_size=5, **kw)
    k_ref, cert_ref, bound_ref, true_out = dynamic_topk_reference(
        q, k, tail_bound=eps, max_topk=max_topk, **kw)
    info = saved.info
    np.testing.assert_array_equal(info["k"], k_ref)
    np.testing.assert_array_equal(info["certified"], cert_ref)
    np.testing.assert_allclose(info["bound"], bound_ref, rtol=1e-9, atol=1e-15)
    # the certificate is sound: on every certified row the true left-out mass is within the bound
    c = info["certified"]
    assert c.any() and (info["k"] > 1).any()
    assert np.all(true_out[c] <= info["bound"][c] * (1 + 1e-9) + 1e-15)
    assert np.all(info["bound"][c] <= eps)
    # and the output is top-k attention at each row's own k
    ref = np.zeros_like(out)
    for kk in np.unique(info["k"]):
        o, _, _ = topk_attention_reference(q, k, v, topk=max(int(kk), 1), **kw)
        ref[info["k"] == kk] = o[info["k"] == kk]
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-12)


def test_dynamic_k_with_zero_bound_takes_every_key():
    q, k, v = make_qkv(4, 1, 2, 2, 8, 8)
    out, saved = ta.topk_attention_forward(q, k, v, topk="auto", tail_bound=0.0)
    dense = ta.topk_attention(q, k, v, topk=8)
    np.testing.assert_allclose(out, dense, rtol=1e-13)
    np.testing.assert_array_equal(saved.info["k"][0, 0], np.arange(1, 9))
    assert saved.info["certified"].all()


def test_dynamic_k_cap_reports_uncertified_rows():
    q, k, v = make_qkv(2, 1, 1, 1, 1, 64)
    q[:] = 0.0  # flat row: the bound needs every key
    _, saved = ta.topk_attention_forward(q, k, v, topk="auto", tail_bound=1e-3, max_topk=8)
    assert saved.info["k"][0, 0, 0] == 8 and not saved.info["certified"][0, 0, 0]
    np.testing.assert_allclose(saved.info["bound"][0, 0, 0], 56 / 8)


@pytest.mark.parametrize("dtype,gain", [(np.float32, 2.0), (np.float64, 1.0), (np.float32, 1e4)])
def test_dynamic_selection_numba_rows_equal_the_vectorised_path(dtype, gain):
    """The Numba row kernel that picks each row's k (stopping at it) chooses what the vectorised
    choose_k chooses, and idx keeps only the slots some row uses (the forced ones + the largest k)."""
    from topkattn.ops.selection import select_dynamic_topk

    q, k, _ = make_qkv(5, 2, 4, 2, 40, 40, D=8, dtype=dtype)
    q *= dtype(gain)
    for eps, kw in [(0.0, {}), (0.05, dict(sinks=2, window=3)), (0.5, dict(causal=False)), (0.2, dict(max_topk=6))]:
        a_idx, a = select_dynamic_topk(q, k, tail_bound=eps, scale=0.3, impl="numba", chunk_size=7, **kw)
        b_idx, b = select_dynamic_topk(q, k, tail_bound=eps, scale=0.3, impl="numpy", chunk_size=7, **kw)
        np.testing.assert_array_equal(a["k"], b["k"])
        np.testing.assert_array_equal(a["certified"], b["certified"])
        np.testing.assert_allclose(a["bound"], b["bound"], rtol=1e-12, atol=1e-300)
        np.testing.assert_array_equal(a_idx, b_idx)
        forced = kw.get("sinks", 0) + kw.get("window", 0)
        assert a_idx.shape[-1] == forced + a["k"].max()


@pytest.mark.parametrize("kw,msg", [
    (dict(topk="auto"), "tail_bound"),
    (dict(topk="auto", tail_bound=1.5), "tail_bound"),
    (dict(topk="auto", tail_bound=0.1, max_topk=0), "max_topk"),
    (dict(topk="auto", tail_bound=0.1, forget_rate=0.2), "forget_rate"),
    (dict(topk=3, tail_bound=0.1), "only with topk='auto'"),
])
def test_dynamic_k_bad_input(kw, msg):
    q, k, v = make_qkv(0)
    with pytest.raises(ValueError, match=msg):
        ta.topk_attention(q, k, v, **kw)


@pytest.mark.parametrize("impl", IMPLS)
def test_window_is_the_most_recent_visible_keys(impl):
    """causal: keys pos-W+1..pos; causal=False: the last W keys (e.g. BERT's [SEP] with W=1)."""
    q, k, v = make_qkv(9, 1, 1, 1, 6, 6)
    _, saved = ta.topk_attention_forward(q, k, v, topk=1, window=2, causal=True, impl=impl)
    m = mask_from_idx(saved.idx, 6)[0, 0]
    for t in range(6):
        assert m[t, max(0, t - 1):t + 1].all() and m[t].sum() == min(t + 1, 3)
    _, saved = ta.topk_attention_forward(q, k, v, topk=1, window=2, causal=False, impl=impl)
    m = mask_from_idx(saved.idx, 6)[0, 0]
    assert m[:, 4:].all() and (m.sum(1) == 3).all()
    _, saved = ta.topk_attention_forward(q, k, v, topk=1, sinks=1, window=1, causal=False, impl=impl)
    m = mask_from_idx(saved.idx, 6)[0, 0]
    assert m[:, 0].all() and m[:, 5].all() and (m.sum(1) == 3).all()


def test_chunks_on_worker_threads_equal_inline_and_nested_calls_do_not_deadlock():
    """The Numba path runs query chunks on the shared pool; from inside a pool worker it runs
    them inline.  Both give the same indices as the NumPy path."""
    from topkattn.threads import pool

    q, k, v = make_qkv(12, 2, 4, 2, 40, 40)
    want = ta.topk_attention_forward(q, k, v, topk=5, impl="numpy", chunk_size=7)[1].idx
    got = ta.topk_attention_forward(q, k, v, topk=5, impl="numba", chunk_size=7)[1].idx
    np.testing.assert_array_equal(got, want)
    jobs = [pool().submit(lambda: ta.topk_attention_forward(q, k, v, topk=5, impl="numba", chunk_size=7)[1].idx)
            for _ in range(4)]  # more jobs than workers, each with nested chunk work
    for job in jobs:
        np.testing.assert_array_equal(job.result(timeout=60), want)


_FORK_SCRIPT = """
import os, select, numpy as np, topkattn as ta
rng = np.random.default_rng(13)
q, k, v = (rng.standard_normal((1, 2, 30, 8)) for _ in range(3))
want = ta.topk_attention(q, k, v, topk=4, impl="numba", chunk_size=5)  # creates the pool
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    try:
        got = ta.topk_attention(q, k, v, topk=4, impl="numba", chunk_size=5)
        os.write(w, b"ok" if np.array_equal(got, want) else b"bad")
    finally:
        os._exit(0)
os.close(w)
ready, _, _ = select.select([r], [], [], 60)
msg = os.read(r, 8) if ready else b"hang"
if not ready:
    os.kill(pid, 9)  # a child stuck on the parent's dead pool threads
os.waitpid(pid, 0)
print(msg.decode())
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_worker_pool_works_in_a_forked_child():
    """A child forked after the pool exists gets a fresh pool (the parent's threads are gone).
    Run in a fresh interpreter: this test process holds other libraries' threads (JAX)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _FORK_SCRIPT], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "ok"


# ---------------------------------------------------------------- non-finite rows in backward

def _nan_row_inputs(where):
    """(1, 1, 4, 4) inputs with one NaN: in query row 3 ('q'), or in the value of key 2 ('v',
    which rows 2 and 3 attend at topk=4: a NaN output with a finite lse)."""
    q, k, v = make_qkv(21, 1, 1, 1, 4, 4, 4, 4)
    if where == "q":
        q[0, 0, 3, 0] = np.nan
    else:
        v[0, 0, 2, 1] = np.nan
    return q, k, v


@pytest.mark.parametrize("scatter", ["numba", "numpy.add.at"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("where,topk", [("q", 2), ("v", 4)])
def test_nan_row_sends_nothing_to_shared_keys(monkeypatch, scatter, impl, where, topk):
    """The reported case: a NaN query row selected keys 0 and 1, which clean rows share; its
    NaN must stay in its own dq (every scatter implementation, the reference's rule)."""
    import topkattn.ops.sparse_attention as sa
    from topkattn.ops.reference import masked_attention_grad_reference

    if scatter == "numpy.add.at":
        monkeypatch.setattr(sa, "_cpu_kernels", None)
    q, k, v = _nan_row_inputs(where)
    out, saved = ta.topk_attention_forward(q, k, v, topk=topk, impl=impl)
    nan_rows = np.isnan(out).any(-1)[0, 0]
    assert nan_rows.any() and not nan_rows.all()
    dout = np.ones_like(out)
    dq, dk, dv = ta.topk_attention_backward(dout, saved)
    assert np.isfinite(dk).all() and np.isfinite(dv).all()
    assert np.isnan(dq[0, 0, nan_rows]).all() and np.isfinite(dq[0, 0, ~nan_rows]).all()
    mask = mask_from_idx(saved.idx, 4)
    for got, want in zip((dq, dk, dv), masked_attention_grad_reference(q, k, v, mask, 0.5, dout)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14, equal_nan=True)
    # = the clean gradient with the NaN rows' dout set to 0 (they contribute nothing)
    clean_dout = np.where(nan_rows[None, None, :, None], 0.0, dout)
    qc, vc = np.nan_to_num(q), np.nan_to_num(v)
    _, s_clean = sa.sparse_attention_forward(qc, k, vc, saved.idx, saved.scale)  # same selection
    want = sa.sparse_attention_backward(clean_dout, s_clean)
    np.testing.assert_allclose(dq[0, 0, ~nan_rows], want[0][0, 0, ~nan_rows], rtol=1e-12)
    np.testing.assert_allclose(dk, want[1], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(dv, want[2], rtol=1e-12, atol=1e-15)


def test_nan_row_with_nan_dout_sends_nothing():
    """Upstream of a NaN row the incoming gradient is NaN too: it must not reach dk, dv."""
    q, k, v = _nan_row_inputs("q")
    out, saved = ta.topk_attention_forward(q, k, v, topk=2)
    dout = np.where(np.isnan(out), np.nan, 1.0)
    dq, dk, dv = ta.topk_attention_backward(dout, saved)
    assert np.isfinite(dk).all() and np.isfinite(dv).all() and np.isfinite(dq[0, 0, :3]).all()


def test_masked_grad_reference_is_the_gradient_of_the_masked_reference():
    from topkattn.ops.reference import masked_attention_grad_reference

    q, k, v = make_qkv(22, 2, 4, 2, 5, 9, 6, 4)
    rng = np.random.default_rng(3)
    mask = rng.random((2, 4, 5, 9)) < 0.5
    mask[0, 0, 0] = False  # a row with no key
    dout = rng.standard_normal((2, 4, 5, 4))
    g = masked_attention_grad_reference(q, k, v, mask, 0.4, dout)

    def f():
        return np.sum(masked_attention_reference(q, k, v, mask, 0.4) * dout)

    assert_grads_close(directional_grad_check(f, dict(q=q, k=k, v=v), dict(q=g[0], k=g[1], v=g[2]), rng))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("special", [np.inf, -np.inf])
def test_infinite_scores_follow_the_reference(impl, special):
    """+inf among a row's scores: a NaN row; -inf: weight 0 (a row of only -inf: zeros)."""
    from topkattn.ops.reference import masked_attention_grad_reference

    q, k, v = make_qkv(23, 1, 2, 1, 5, 6, 3, 3)
    q[0, 0, 1] = 1.0
    k[0, 0, 2] = [special, 0.0, 0.0]  # scores +-inf for rows of head 0 that see key 2
    q[0, 1, 4] = [special, 0.0, 0.0]  # head 1, row 4: inf query
    out, saved = ta.topk_attention_forward(q, k, v, topk=3, impl=impl)
    ro, rmask, rlse = topk_attention_reference(q, k, v, topk=3)
    np.testing.assert_array_equal(mask_from_idx(saved.idx, 6), rmask)
    np.testing.assert_allclose(out, ro, rtol=1e-12, atol=1e-14, equal_nan=True)
    np.testing.assert_allclose(saved.lse, rlse, rtol=1e-12, equal_nan=True)
    dout = np.ones_like(out)
    got = ta.topk_attention_backward(dout, saved)
    want = masked_attention_grad_reference(q, k, v, rmask, 1 / np.sqrt(3), dout)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14, equal_nan=True)
    assert np.isfinite(got[1]).all() and np.isfinite(got[2]).all()


# ---------------------------------------------------------------- dense attention

@pytest.mark.parametrize("where", ["k", "v"])
@pytest.mark.parametrize("special", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_dense_future_nonfinite_stays_in_the_rows_that_see_it(where, special, chunk_size):
    """The reported leak: a NaN in the value of key 4 made every earlier row NaN (0 * NaN
    under the causal mask).  Rows 0-3 (and their gradients) must equal the clean run."""
    from topkattn.ops.dense_attention import dense_attention_backward, dense_attention_forward
    from topkattn.ops.reference import causal_mask, dense_attention_reference, masked_attention_grad_reference

    q, k, v = make_qkv(24, 1, 2, 1, 6, 6, 4, 4)
    (k if where == "k" else v)[0, 0, 4, 0] = special
    out, saved = dense_attention_forward(q, k, v, causal=True, chunk_size=chunk_size)
    ro, rlse = dense_attention_reference(q, k, v)
    np.testing.assert_allclose(out, ro, rtol=1e-12, atol=1e-14, equal_nan=True)
    np.testing.assert_allclose(saved.lse, rlse, rtol=1e-12, equal_nan=True)
    assert np.isfinite(out[:, :, :4]).all()
    clean = [a.copy() for a in (q, k, v)]
    clean[1 if where == "k" else 2][0, 0, 4, 0] = 0.0
    np.testing.assert_allclose(out[:, :, :4], dense_attention_reference(*clean)[0][:, :, :4], rtol=1e-12)
    dout = np.random.default_rng(0).standard_normal(out.shape)
    dq, dk, dv = dense_attention_backward(dout, saved)
    want = masked_attention_grad_reference(q, k, v, causal_mask(q.shape, k.shape), 0.5, dout)
    for a, b in zip((dq, dk, dv), want):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-13, equal_nan=True)
    assert np.isfinite(dq[:, :, :4]).all() and np.isfinite(dk).all() and np.isfinite(dv).all()
    # earlier rows' own gradients equal the clean run's; only rows 4, 5 differ
    live = np.isfinite(out).all(-1)
    _, s_clean = dense_attention_forward(*clean, chunk_size=chunk_size)
    cq, _, _ = dense_attention_backward(np.where(live[..., None], dout, 0.0), s_clean)
    np.testing.assert_allclose(dq[:, :, :4], cq[:, :, :4], rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("causal", [True, False])
def test_dense_matches_reference_and_gradients(causal):
    from topkattn.ops.dense_attention import dense_attention_backward, dense_attention_forward
    from topkattn.ops.reference import causal_mask, dense_attention_reference, masked_attention_grad_reference

    q, k, v = make_qkv(25, 2, 4, 2, 7, 9, 5, 3)
    out, saved = dense_attention_forward(q, k, v, causal=causal, chunk_size=3)
    np.testing.assert_allclose(out, dense_attention_reference(q, k, v, causal=causal)[0], rtol=1e-12, atol=1e-14)
    dout = np.random.default_rng(1).standard_normal(out.shape)
    want = masked_attention_grad_reference(q, k, v, causal_mask(q.shape, k.shape, causal), 1 / np.sqrt(5), dout)
    for a, b in zip(dense_attention_backward(dout, saved), want):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-13)


DENSE_KERNEL_CASES = {  # name: (B, H, G, T, S, D, Dv, causal, chunk_size)
    "gqa": (2, 4, 2, 7, 9, 5, 3, True, None),
    "chunks": (2, 4, 2, 7, 9, 5, 3, True, 2),
    "not-causal": (1, 3, 1, 6, 4, 4, 2, False, 4),
    "T>S": (1, 2, 2, 6, 3, 4, 3, True, 2),  # the first 3 rows see no key
    "T=1": (2, 2, 1, 1, 5, 3, 3, True, None),
}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", list(DENSE_KERNEL_CASES))
def test_dense_kernels_equal_reference_and_numpy_path(case, dtype, monkeypatch):
    """The Numba dense kernels (finite NumPy inputs) against the float64 reference and the
    NumPy chunk loop, forward (out, lse) and backward, with logits up to 1e4."""
    import sys

    from topkattn.ops.dense_attention import dense_attention_backward, dense_attention_forward
    from topkattn.ops.reference import causal_mask, dense_attention_reference, masked_attention_grad_reference

    dense = sys.modules["topkattn.ops.dense_attention"]
    B, H, G, T, S, D, Dv, causal, chunk = DENSE_KERNEL_CASES[case]
    q, k, v = make_qkv(28, B, H, G, T, S, D, Dv)
    for big in (1.0, 1e4 / 3):  # scores of order 1 and 1e4
        qb, kb, vb = (a.astype(dtype) for a in (q * big, k, v))
        out, saved = dense_attention_forward(qb, kb, vb, causal=causal, chunk_size=chunk)
        assert saved.kernel_chunk is not None  # the kernels ran
        ro, rlse = dense_attention_reference(qb.astype(np.float64), kb, vb, causal=causal)
        tol = tolerance(dtype)
        np.testing.assert_allclose(out, ro, **tol)
        np.testing.assert_allclose(saved.lse, rlse, rtol=tol["rtol"], atol=tol["atol"] * big)
        dout = np.random.default_rng(2).standard_normal(out.shape).astype(dtype)
        grads = dense_attention_backward(dout, saved)
        if big == 1.0:
            want = masked_attention_grad_reference(q, k, v, causal_mask(q.shape, k.shape, causal), 1 / np.sqrt(D),
                                                   dout.astype(np.float64))
            for a, b in zip(grads, want):
                np.testing.assert_allclose(a, b, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10)
        assert all(np.isfinite(g).all() for g in grads)
        with monkeypatch.context() as m:
            m.setattr(dense, "_kernels", None)
            out_n, saved_n = dense_attention_forward(qb, kb, vb, causal=causal, chunk_size=chunk)
            assert saved_n.kernel_chunk is None
            grads_n = dense_attention_backward(dout, saved_n)
        np.testing.assert_allclose(out, out_n, **tol)
        for a, b in zip(grads, grads_n):
            np.testing.assert_allclose(a, b, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10 * big)


def test_dense_kernels_central_differences():
    from topkattn.ops.dense_attention import dense_attention_backward, dense_attention_forward

    q, k, v = make_qkv(29, 1, 4, 2, 5, 7, 3, 2)
    rng = np.random.default_rng(3)
    w = rng.standard_normal((1, 4, 5, 2))
    out, saved = dense_attention_forward(q, k, v, chunk_size=2)
    assert saved.kernel_chunk is not None
    dq, dk, dv = dense_attention_backward(w, saved)

    def loss():
        return float((dense_attention_forward(q, k, v, chunk_size=2)[0] * w).sum())

    assert_grads_close(directional_grad_check(loss, {"q": q, "k": k, "v": v}, {"q": dq, "k": dk, "v": dv}, rng))


def test_dense_nonfinite_inputs_take_the_numpy_path():
    from topkattn.ops.dense_attention import dense_attention_forward

    q, k, v = make_qkv(30, 1, 2, 1, 4, 4, 3, 3)
    v[0, 0, 3, 0] = np.nan
    assert dense_attention_forward(q, k, v)[1].kernel_chunk is None
    assert dense_attention_forward(q, k, np.nan_to_num(v))[1].kernel_chunk is not None


@pytest.mark.parametrize("special", [np.nan, np.inf])
def test_dense_decode_nonfinite_rule(special):
    from topkattn.ops.dense_attention import dense_attention_decode
    from topkattn.ops.reference import masked_attention_reference

    q, k, v = make_qkv(26, 2, 2, 1, 1, 5, 3, 3)
    k[1, 0, 2, 0] = special  # batch 1 only
    want = masked_attention_reference(q, k, v, np.ones((2, 2, 1, 5), dtype=bool), 0.5)[:, :, 0]
    got = dense_attention_decode(q[:, :, 0], k, v, 0.5)
    np.testing.assert_allclose(got, want, rtol=1e-12, equal_nan=True)
    assert np.isfinite(got[0]).all()
    assert dense_attention_decode(q[:, :, 0], k[:, :, :0], v[:, :, :0], 0.5).shape == (2, 2, 3)


# ---------------------------------------------------------------- empty dimensions

EMPTY = {  # name: (B, H, G, T, S, D, Dv)
    "B=0": (0, 2, 1, 3, 4, 4, 3), "H=0": (1, 0, 1, 3, 4, 4, 3), "D=0": (1, 2, 1, 3, 4, 0, 3),
    "Dv=0": (1, 2, 1, 3, 4, 4, 0), "T=0": (1, 2, 1, 0, 4, 4, 3), "S=0": (1, 2, 1, 3, 0, 4, 3),
}


def _empty_op_pairs():
    from topkattn.ops.dense_attention import dense_attention_backward, dense_attention_forward

    return {
        "topk": (lambda q, k, v, impl: ta.topk_attention_forward(q, k, v, topk=2, impl=impl),
                 ta.topk_attention_backward),
        "auto": (lambda q, k, v, impl: ta.topk_attention_forward(q, k, v, topk="auto", tail_bound=0.1,
                                                                 impl=impl), ta.topk_attention_backward),
        "tail": (lambda q, k, v, impl: ta.tail_topk_attention_forward(q, k, v, topk=2),
                 ta.tail_topk_attention_backward),
        "dense": (lambda q, k, v, impl: dense_attention_forward(q, k, v), dense_attention_backward),
    }


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["topk", "auto", "tail", "dense"])
@pytest.mark.parametrize("case", list(EMPTY))
def test_empty_dimensions(impl, op, case):
    """B, H, T, S, D or Dv = 0: correctly shaped results (what plain top-k returns) and
    gradients of the inputs' shapes, equal to the reference; no internal reshape error."""
    from topkattn.ops.reference import dense_attention_reference, tail_topk_attention_reference

    B, H, G, T, S, D, Dv = EMPTY[case]
    q, k, v = make_qkv(27, B, H, G, T, S, D, Dv)
    fwd, bwd = _empty_op_pairs()[op]
    with np.errstate(all="raise"):  # no 0 * inf from a 1/sqrt(0) scale either
        out, saved = fwd(q, k, v, impl)
    assert out.shape == (B, H, T, Dv) and out.dtype == q.dtype
    if op == "tail":
        want = tail_topk_attention_reference(q, k, v, topk=2)
    elif op == "dense":
        want = dense_attention_reference(q, k, v)[0]
    else:
        want = topk_attention_reference(q, k, v, topk=2 if op == "topk" else S)[0]
    if op == "auto" and S:
        want = None  # dynamic k: the rows' own k is checked by the dynamic-k tests
    if want is not None:
        np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-14)
    rng = np.random.default_rng(0)
    dout = rng.standard_normal(out.shape)
    grads = bwd(dout, saved)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    assert all(g.dtype == q.dtype and np.isfinite(g).all() for g in grads)
    arrays = {n: a for n, a in zip("qkv", (q, k, v)) if a.size}
    if arrays and out.size:
        def loss():
            return float((fwd(q, k, v, impl)[0] * dout).sum())

        analytic = {n: g for n, g in zip("qkv", grads) if n in arrays}
        assert_grads_close(directional_grad_check(loss, arrays, analytic, rng))


# ---------------------------------------------------------------- argument types

@pytest.mark.parametrize("name", ["scale", "temperature"])
@pytest.mark.parametrize("value", [True, np.bool_(False)])
def test_bool_scale_and_temperature_are_refused(name, value):
    from topkattn.ops.dense_attention import dense_attention

    q, k, v = make_qkv(0)
    with pytest.raises(TypeError, match=f"{name} must be a real number, got bool"):
        ta.topk_attention(q, k, v, topk=2, **{name: value})
    if name == "scale":
        with pytest.raises(TypeError, match="scale must be a real number, got bool"):
            dense_attention(q, k, v, scale=value)
        with pytest.raises(TypeError, match="scale must be a real number, got bool"):
            ta.tail_topk_attention(q, k, v, topk=2, scale=value)


@pytest.mark.parametrize("dtype", [np.complex128, object, bool, np.int64])
@pytest.mark.parametrize("op", ["topk", "auto", "tail", "dense"])
def test_backward_refuses_a_dout_that_is_not_real_floating(dtype, op):
    q, k, v = make_qkv(0)
    fwd, bwd = _empty_op_pairs()[op]
    out, saved = fwd(q, k, v, "numpy")
    with pytest.raises(TypeError, match=r"dout must be a real floating-point array .*got dtype"):
        bwd(np.ones(out.shape, dtype=dtype), saved)
    bwd(np.ones(out.shape, dtype=np.float32), saved)  # another float dtype is cast


@pytest.mark.parametrize("seed,exc,msg", [
    (-1, ValueError, "seed must be a non-negative int seed, got -1"),
    ([3, -2], ValueError, r"seed must hold non-negative ints, got \[3, -2\]"),
    ("7", TypeError, "seed must be an int seed"),
    (1.5, TypeError, "seed must be an int seed"),
])
@pytest.mark.parametrize("forget_rate", [0.0, 0.3])
def test_bad_seed_names_seed(seed, exc, msg, forget_rate):
    q, k, v = make_qkv(0)
    with pytest.raises(exc, match=msg):
        ta.topk_attention(q, k, v, topk=2, forget_rate=forget_rate, seed=seed)


def test_make_rng_refuses_negative_seeds_naming_the_argument():
    from topkattn.checks import make_rng

    with pytest.raises(ValueError, match="rng must be a non-negative int seed, got -3"):
        make_rng(-3, "rng")
    with pytest.raises(ValueError, match="seed must hold non-negative ints"):
        make_rng((1, -1))
    assert make_rng(0).random() == np.random.default_rng(0).random()


def test_dense_nonfinite_value_in_one_kv_head_stays_in_its_head():
    """(found by tests/test_op_fuzz.py) a NaN value in KV head 0 must not count key j twice
    for KV head 1, where it is finite."""
    from topkattn.ops.dense_attention import dense_attention_forward
    from topkattn.ops.reference import dense_attention_reference

    q, k, v = make_qkv(28, 2, 4, 2, 3, 5, 3, 2)
    v[0, 0, 1, 0] = np.nan
    v[1, 1, 3, 1] = np.inf
    for causal in (True, False):
        out, saved = dense_attention_forward(q, k, v, causal=causal, chunk_size=2)
        want, lse = dense_attention_reference(q, k, v, causal=causal)
        np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-14, equal_nan=True)
        np.testing.assert_allclose(saved.lse, lse, rtol=1e-12)


@pytest.mark.parametrize("name", ["sinks", "window"])
def test_sinks_or_window_beyond_any_int64_mean_every_key(name):
    # 10**30 (a valid int, too big for int64) attends every key, as S does: dense attention
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((1, 2, 5, 4)), rng.standard_normal((1, 2, 7, 4)), rng.standard_normal((1, 2, 7, 3))
    dense = ta.topk_attention(q, k, v, topk=7)
    for op in (ta.topk_attention, ta.tail_topk_attention):
        np.testing.assert_allclose(op(q, k, v, topk=2, **{name: 10**30}), dense, atol=1e-12)
    out, saved = ta.topk_attention_forward(q, k, v, topk=2, **{name: 10**30})
    ref_out, ref_saved = ta.topk_attention_forward(q, k, v, topk=2, **{name: 7})
    dout = rng.standard_normal(out.shape)
    for g, r in zip(ta.topk_attention_backward(dout, saved), ta.topk_attention_backward(dout, ref_saved)):
        np.testing.assert_allclose(g, r, atol=1e-12)


@pytest.mark.parametrize("causal", ["no", None, 1, 0.0])
def test_causal_must_be_a_bool_in_every_op(causal):
    from topkattn.ops.dense_attention import dense_attention

    q = np.zeros((1, 1, 2, 2))
    calls = [lambda c: ta.topk_attention(q, q, q, topk=1, causal=c),
             lambda c: ta.tail_topk_attention(q, q, q, topk=1, causal=c),
             lambda c: ta.block_topk_attention(q, q, q, block_size=1, topk_blocks=1, causal=c),
             lambda c: dense_attention(q, q, q, causal=c)]
    for call in calls:
        with pytest.raises(TypeError, match=f"causal must be True or False, got {type(causal).__name__}"):
            call(causal)
        np.testing.assert_array_equal(call(np.bool_(False)), call(False))


def test_masked_array_is_refused_and_other_ndarray_subclasses_are_read_as_plain_arrays(tmp_path):
    q, k, v = make_qkv(0)
    with pytest.raises(TypeError, match=r"^q must be a plain array, not a masked array"):
        ta.topk_attention(np.ma.masked_array(q, mask=q > 0), k, v, topk=2)
    mm = np.memmap(tmp_path / "q.dat", dtype=q.dtype, mode="w+", shape=q.shape)
    mm[:] = q
    out = ta.topk_attention(mm, k, v, topk=2)
    assert type(out) is np.ndarray
    np.testing.assert_array_equal(out, ta.topk_attention(q, k, v, topk=2))
