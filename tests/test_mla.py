"""MLA: forward against a per-formula reference, float64 gradient checks, latent-cache decoding
equal to the causal forward, absorbed scores equal to unabsorbed ones, the selector hook, bad input."""
import re

import numpy as np
import pytest

from topkattn.layers import MLA, MLACache, absorb_mla_weights
from topkattn.ops.reference import topk_attention_reference
from topkattn.ops.selection import select_decode
from topkattn.testing import check_layer_grads

# d, H, Lq, C, N, R, V  (V != N: value head dim independent of the qk head dim)
DIMS = (16, 3, 8, 6, 4, 4, 5)


def _mla(topk=None, P=0, W=0, fr=0.0, dtype="float64", seed=1):
    return MLA(*DIMS, topk=topk, seed=seed, dtype=dtype, persistent_tokens=P, window=W, forget_rate=fr)


def _rms(x, g, eps=1e-6):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g


def _rope(x, pos, base=10000.0):
    R = x.shape[-1]
    th = base ** (-np.arange(R // 2) / (R // 2))
    z = (x[..., :R // 2] + 1j * x[..., R // 2:]) * np.exp(1j * np.asarray(pos)[:, None] * th)
    return np.concatenate([z.real, z.imag], -1)


def _mla_reference(m, x, seed=None):
    """Straight from the DeepSeek-V2 equations, head by head, with the reference top-k op."""
    p = m.params
    B, T, _ = x.shape
    H, N, R, V, P = m.n_heads, m.qk_nope_dim, m.qk_rope_dim, m.v_head_dim, m.persistent_tokens
    pos = np.arange(T)
    cq = _rms(x @ p["W_DQ"].T, p["q_norm"])
    c = _rms(x @ p["W_DKV"].T, p["kv_norm"])
    kr = _rope(x @ p["W_KR"].T, pos)
    if P:
        c = np.concatenate([np.repeat(p["persist_c"][None], B, 0), c], 1)
        kr = np.concatenate([np.repeat(p["persist_kr"][None], B, 0), kr], 1)
    q = np.zeros((B, H, T, N + R))
    k = np.zeros((B, H, P + T, N + R))
    v = np.zeros((B, H, P + T, V))
    for h in range(H):
        q[:, h, :, :N] = cq @ p["W_UQ"][h * N:(h + 1) * N].T
        q[:, h, :, N:] = _rope(cq @ p["W_QR"][h * R:(h + 1) * R].T, pos)
        k[:, h, :, :N] = c @ p["W_UK"][h * N:(h + 1) * N].T
        k[:, h, :, N:] = kr
        v[:, h] = c @ p["W_UV"][h * V:(h + 1) * V].T
    topk = m.topk or (P + T)
    o, _, _ = topk_attention_reference(q, k, v, topk=topk, scale=1 / np.sqrt(N + R), sinks=P,
                                       window=m.window, forget_rate=m.forget_rate, seed=seed)
    return o.transpose(0, 2, 1, 3).reshape(B, T, H * V) @ p["W_O"].T


VARIANTS = [dict(), dict(topk=3), dict(topk=3, P=2), dict(topk=2, W=2), dict(topk=2, P=1, W=2), dict(P=2)]


@pytest.mark.parametrize("kw", VARIANTS)
def test_mla_forward_matches_equations(kw):
    m = _mla(**kw)
    x = np.random.default_rng(2).standard_normal((2, 8, DIMS[0]))
    np.testing.assert_allclose(m.forward(x), _mla_reference(m, x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kw", VARIANTS + [dict(topk=3, P=1, fr=0.4)])
def test_mla_gradients(kw):
    rng = np.random.default_rng(3)
    m = _mla(**kw)
    x = rng.standard_normal((2, 7, DIMS[0]))
    res = check_layer_grads(m, x, rng, forward=lambda z: m.forward(z, seed=5))
    assert set(res) == set(m.params) | {"x"}


def test_mla_forgetful_masking_reproducible_and_off_in_eval():
    m = _mla(topk=2, P=1, fr=0.5)
    x = np.random.default_rng(4).standard_normal((1, 9, DIMS[0]))
    a, b, c = m.forward(x, seed=7), m.forward(x, seed=7), m.forward(x, seed=8)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-6
    np.testing.assert_allclose(a, _mla_reference(m, x, seed=7), rtol=1e-10, atol=1e-12)
    m.training = False
    m0 = _mla(topk=2, P=1)
    np.testing.assert_allclose(m.forward(x, seed=7), m0.forward(x), rtol=1e-13)


@pytest.mark.parametrize("kw", VARIANTS)
def test_mla_decode_equals_forward(kw):
    m = _mla(**kw)
    B, T = 2, 9
    x = np.random.default_rng(5).standard_normal((B, T, DIMS[0]))
    y = m.forward(x)
    cache = m.init_cache(B)
    ys = np.concatenate([m.step(x[:, t:t + 1], cache) for t in range(T)], axis=1)
    np.testing.assert_allclose(ys, y, rtol=1e-5, atol=1e-12)
    C, R, P = m.kv_lora_rank, m.qk_rope_dim, m.persistent_tokens
    # the cache holds exactly C + R numbers per token (plus the P persistent rows)
    assert cache.floats_per_token == C + R
    assert cache.bytes_per_token == 8 * (C + R)
    assert cache.keys.shape == (B, P + T, C + R)
    assert cache.n_tokens == T
    np.testing.assert_allclose(cache.keys, m.latent_keys(x), rtol=1e-13)


def test_mla_decode_float32():
    m = _mla(topk=3, P=1, dtype="float32")
    x = np.random.default_rng(6).standard_normal((1, 6, DIMS[0])).astype(np.float32)
    y = m.forward(x)
    cache = m.init_cache(1)
    ys = np.concatenate([m.step(x[:, t:t + 1], cache) for t in range(6)], axis=1)
    assert ys.dtype == np.float32 and cache.bytes_per_token == 4 * (DIMS[3] + DIMS[5])
    np.testing.assert_allclose(ys, y, rtol=1e-4, atol=1e-5)


def test_absorbed_scores_equal_unabsorbed():
    m = _mla(P=2)
    T = 6
    x = np.random.default_rng(7).standard_normal((2, T, DIMS[0]))
    q, k, _ = m.project(x)  # (B, H, T, N+R), (B, H, S, N+R)
    full = q @ k.swapaxes(-1, -2)  # (B, H, T, S)
    keys = m.latent_keys(x)  # (B, S, C+R)
    w = m.decode_weights()
    q_abs = np.stack([m.absorbed_query(x[:, t], t, w) for t in range(T)], axis=2)  # (B, H, T, C+R)
    absorbed = q_abs @ keys[:, None].swapaxes(-1, -2)
    np.testing.assert_allclose(absorbed, full, rtol=1e-10, atol=1e-12)


def test_absorb_converter_blocks():
    m = _mla()
    p, w = m.params, m.decode_weights()
    H, N, V, C = m.n_heads, m.qk_nope_dim, m.v_head_dim, m.kv_lora_rank
    for h in range(H):
        np.testing.assert_allclose(w["W_QK"][h * C:(h + 1) * C],
                                   p["W_UK"][h * N:(h + 1) * N].T @ p["W_UQ"][h * N:(h + 1) * N], rtol=1e-13)
        np.testing.assert_allclose(w["W_OV"][:, h * C:(h + 1) * C],
                                   p["W_O"][:, h * V:(h + 1) * V] @ p["W_UV"][h * V:(h + 1) * V], rtol=1e-13)
    w2 = absorb_mla_weights(p, H, N, m.qk_rope_dim, V)
    assert set(w2) == {"W_DQ", "q_norm", "W_QR", "W_DKV", "kv_norm", "W_KR", "W_QK", "W_OV"}


def test_selector_hook_receives_absorbed_query_and_latent_keys():
    m = _mla(topk=2, P=1, W=1)
    B, T = 2, 6
    x = np.random.default_rng(8).standard_normal((B, T, DIMS[0]))
    y = m.forward(x)
    seen = []

    def brute_force(query, cache, *, topk, sinks, window, scale):
        # an independent selector: python loops over the absorbed scores
        keys = cache.keys
        S = keys.shape[1]
        seen.append((query.shape, keys.shape, topk, sinks, window))
        idx = np.full((B, m.n_heads, sinks + window + topk), -1)
        for b in range(B):
            for h in range(m.n_heads):
                forced = list(range(min(sinks, S))) + [j for j in range(S - 1, S - 1 - window, -1) if j >= sinks]
                rest = [j for j in range(sinks, S) if j not in forced]
                s = [scale * query[b, h] @ keys[b, j] for j in rest]
                best = [rest[i] for i in sorted(range(len(rest)), key=lambda i: (-s[i], rest[i]))[:topk]]
                row = forced + best
                idx[b, h, :len(row)] = row
        return idx

    m.selector = brute_force
    cache = m.init_cache(B)
    ys = np.concatenate([m.step(x[:, t:t + 1], cache) for t in range(T)], axis=1)
    np.testing.assert_allclose(ys, y, rtol=1e-5, atol=1e-12)
    C, R = m.kv_lora_rank, m.qk_rope_dim
    assert seen[0] == ((B, m.n_heads, C + R), (B, 1 + 1, C + R), 2, 1, 1)
    assert seen[-1][1] == (B, 1 + T, C + R)


def test_selector_restricting_keys_changes_output():
    m = _mla(topk=1)
    x = np.random.default_rng(9).standard_normal((1, 5, DIMS[0]))
    cache = m.init_cache(1)
    m.selector = lambda q, c, **kw: np.zeros((1, m.n_heads, 1), np.int64)  # always key 0
    ys = [m.step(x[:, t:t + 1], cache) for t in range(5)]
    # attending key 0 alone: the output is W_OV applied to c_0 for every step
    c0 = cache.keys[0, 0, :m.kv_lora_rank]
    want = np.tile(c0, m.n_heads) @ cache.weights["W_OV"].T
    for y in ys:
        np.testing.assert_allclose(y[0, 0], want, rtol=1e-12)


def test_exact_selector_matches_op_selection():
    rng = np.random.default_rng(10)
    B, H, S, D = 2, 3, 11, 5
    keys = rng.standard_normal((B, S, D))
    query = rng.standard_normal((B, H, D))

    idx, k, certified = select_decode(query, keys, topk=3, sinks=2, window=2, scale=0.5)
    _, mask, _ = topk_attention_reference(query[:, :, None], keys[:, None], keys[:, None], topk=3,
                                          scale=0.5, sinks=2, window=2)
    assert idx.shape == (B, H, 7)
    for b in range(B):
        for h in range(H):
            assert sorted(idx[b, h].tolist()) == sorted(np.flatnonzero(mask[b, h, 0]).tolist())
            assert idx[b, h, :2].tolist() == [0, 1] and idx[b, h, 2:4].tolist() == [10, 9]


def test_mla_bad_input():
    m = _mla(topk=2)
    with pytest.raises(ValueError, match=r"x must have last axis 16 \(B, T, d_model=16\), got shape \(2, 3, 15\)"):
        m.forward(np.zeros((2, 3, 15)))
    with pytest.raises(ValueError, match="x must be 3-D"):
        m.forward(np.zeros((3, 16)))
    with pytest.raises(ValueError, match="topk must be an integer >= 1, got 0"):
        _mla(topk=0)
    with pytest.raises(ValueError, match="qk_rope_dim must be even"):
        MLA(16, 2, 8, 6, 4, 3, 4)
    cache = m.init_cache(2)
    with pytest.raises(ValueError, match="x_t has batch 3 but the cache was made for batch 2"):
        m.step(np.zeros((3, 1, 16)), cache)
    with pytest.raises(ValueError, match=r"x_t must have shape \(B, 1, d_model\)"):
        m.step(np.zeros((2, 2, 16)), cache)
    with pytest.raises(TypeError, match="cache must come from this layer's init_cache"):
        m.step(np.zeros((2, 1, 16)), _mla(topk=2).init_cache(2))
    with pytest.raises(RuntimeError, match="backward called before forward"):
        _mla().backward(np.zeros((1, 1, 16)))
    assert isinstance(cache, MLACache)


def test_mla_decode_past_initial_cache_capacity():
    # the cache buffer starts with room for 64 rows and doubles: decode 70 tokens through it
    m = MLA(8, 2, 4, 4, 2, 2, 2, topk=3, seed=3, dtype="float64", persistent_tokens=1, window=2)
    x = np.random.default_rng(11).standard_normal((1, 70, 8))
    y = m.forward(x)
    cache = m.init_cache(1)
    ys = np.concatenate([m.step(x[:, t:t + 1], cache) for t in range(70)], axis=1)
    np.testing.assert_allclose(ys, y, rtol=1e-5, atol=1e-12)
    assert cache.buf.data.shape[1] == 128 and cache.keys.shape == (1, 71, 6)


# ---------------------------------------------------------------- dynamic k ("auto")
def _auto(P=0, W=0, eps=0.05, max_topk=4, seed=1):
    return MLA(*DIMS, topk="auto", tail_bound=eps, max_topk=max_topk, seed=seed, dtype="float64",
               persistent_tokens=P, window=W)


@pytest.mark.parametrize("P,W", [(0, 0), (1, 2)])
def test_mla_auto_forward_is_the_dynamic_k_op_and_decode_matches(P, W):
    import topkattn as ta

    m = _auto(P, W)
    x = np.random.default_rng(6).standard_normal((2, 9, DIMS[0]))
    y = m.forward(x)
    q, k, v = m.project(x)
    o, saved = ta.topk_attention_forward(q, k, v, topk="auto", tail_bound=0.05, max_topk=4, scale=m.scale,
                                         sinks=P, window=W)
    B, T = x.shape[:2]
    want = o.transpose(0, 2, 1, 3).reshape(B, T, -1) @ m.params["W_O"].T
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
    k_rows = saved.info["k"]
    assert k_rows.max() <= 4 and k_rows.min() < 4  # some rows certify with fewer keys
    cache = m.init_cache(B)
    ys = np.concatenate([m.step(x[:, t:t + 1], cache) for t in range(T)], axis=1)
    np.testing.assert_allclose(ys, y, rtol=1e-5, atol=1e-12)


def test_mla_auto_with_zero_tail_is_dense():
    m, d = _auto(eps=0.0, max_topk=None), _mla()
    x = np.random.default_rng(7).standard_normal((1, 8, DIMS[0]))
    np.testing.assert_allclose(m.forward(x), d.forward(x), rtol=1e-10, atol=1e-12)


def test_mla_auto_gradients():
    rng = np.random.default_rng(8)
    m = _auto(P=1)
    x = rng.standard_normal((2, 7, DIMS[0]))
    check_layer_grads(m, x, rng)


def test_attention_layer_auto_decode_matches_forward():
    from topkattn.layers import Attention

    a = Attention(16, 4, 2, topk="auto", tail_bound=0.05, max_topk=3, seed=2, dtype="float64",
                  persistent_tokens=1, window=1)
    x = np.random.default_rng(9).standard_normal((2, 8, 16))
    y = a.forward(x)
    cache = a.init_cache(2)
    ys = np.concatenate([a.step(x[:, t:t + 1], cache) for t in range(8)], axis=1)
    np.testing.assert_allclose(ys, y, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("kw,msg", [
    (dict(topk="auto"), "needs tail_bound"),
    (dict(topk=3, tail_bound=0.1), "only with topk='auto'"),
    (dict(topk="auto", tail_bound=0.1, forget_rate=0.2), "forget_rate must be 0"),
    (dict(topk="many"), "'auto'"),
    (dict(topk="auto", tail_bound=0.1, max_topk=0), "max_topk"),
])
def test_auto_bad_arguments(kw, msg):
    with pytest.raises(ValueError, match=msg):
        MLA(*DIMS, **kw)


# ---------------------------------------------------------------- rope_base, eps; empty inputs

@pytest.mark.parametrize("kw, exc, needle", [
    (dict(rope_base=0), ValueError, "rope_base must be > 1, got 0"),
    (dict(rope_base=-5), ValueError, "rope_base must be > 1, got -5"),
    (dict(rope_base=1.0), ValueError, "rope_base must be > 1, got 1.0"),
    (dict(rope_base=float("nan")), ValueError, "rope_base must be > 1, got nan"),
    (dict(rope_base=float("inf")), ValueError, "rope_base must be > 1, got inf"),
    (dict(rope_base="10000"), TypeError, "rope_base must be a real number"),
    (dict(eps=-1), ValueError, "eps must be >= 0, got -1"),
    (dict(eps=float("nan")), ValueError, "eps must be >= 0, got nan"),
    (dict(eps=float("inf")), ValueError, "eps must be >= 0, got inf"),
])
def test_mla_and_attention_refuse_a_bad_rope_base_or_eps(kw, exc, needle):
    """rope_base 0, NaN or -5 and eps=-1 were accepted and gave an all-NaN output."""
    from topkattn.layers import Attention
    with pytest.raises(exc, match=re.escape(needle)):
        MLA(*DIMS, **kw)
    if "rope_base" in kw:
        with pytest.raises(exc, match=re.escape(needle)):
            Attention(8, 2, **kw)
    m = MLA(*DIMS, rope_base=2.0, eps=0.0, dtype="float64")  # the edges that work
    assert np.isfinite(m.forward(np.random.default_rng(0).standard_normal((1, 4, DIMS[0])))).all()


def _zero_grads(layer):
    return all(not g.any() for _, g in layer.named_grads())


EMPTY_SHAPES = [(0, 5), (2, 0), (0, 0)]


@pytest.mark.parametrize("shape", EMPTY_SHAPES)
@pytest.mark.parametrize("kw", [dict(), dict(topk=3), dict(topk=3, P=2, W=1), dict(P=2)])
@pytest.mark.parametrize("layer", ["mla", "attention"])
def test_empty_batch_or_sequence(layer, kw, shape):
    """B = 0 or T = 0 raised an internal reshape error in MLA; now an empty output and zero gradients."""
    from topkattn.layers import Attention
    B, T = shape
    if layer == "mla":
        m = _mla(**kw)
    else:
        m = Attention(16, 2, topk=kw.get("topk"), dtype="float64", persistent_tokens=kw.get("P", 0),
                      window=kw.get("W", 0))
    x = np.zeros((B, T, 16))
    y = m.forward(x, seed=1)
    assert y.shape == (B, T, 16) and y.dtype == np.float64
    dx = m.backward(np.zeros_like(y))
    assert dx.shape == (B, T, 16) and dx.dtype == np.float64
    assert _zero_grads(m)


@pytest.mark.parametrize("layer", ["mla", "attention"])
@pytest.mark.parametrize("shape", [(2, 0), (0, 5)])
def test_empty_batch_or_sequence_with_dynamic_k(layer, shape):
    """T = 0 or B = 0 with topk="auto": empty outputs, zero gradients."""
    from topkattn.layers import Attention
    m = _auto(P=1) if layer == "mla" else Attention(16, 2, topk="auto", tail_bound=0.05, dtype="float64",
                                                      persistent_tokens=1)
    y = m.forward(np.zeros(shape + (DIMS[0],)))
    assert y.shape == shape + (DIMS[0],)
    assert m.backward(np.zeros_like(y)).shape == y.shape and _zero_grads(m)
