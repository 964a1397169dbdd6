"""Layers: values against independent formulas (torch where natural), float64 gradient checks."""
import re

import numpy as np
import pytest

from topkattn.layers import Attention, Embedding, Linear, MoE, RMSNorm, RoPE, SwiGLU, softmax_cross_entropy
from topkattn.ops.dense_attention import dense_attention, dense_attention_backward, dense_attention_forward
from topkattn.ops.reference import topk_attention_reference
from topkattn.testing import assert_grads_close, check_layer_grads, directional_grad_check


def _rng(s=0):
    return np.random.default_rng(s)


# ---------------------------------------------------------------- Linear, RMSNorm, SwiGLU

def test_linear_matches_torch_and_grads():
    torch = pytest.importorskip("torch")
    rng = _rng(1)
    lin = Linear(5, 3, bias=True, seed=2, dtype="float64")
    lin.params["bias"][:] = rng.standard_normal(3)
    x = rng.standard_normal((2, 4, 5))
    want = torch.nn.functional.linear(torch.tensor(x), torch.tensor(lin.params["weight"]),
                                      torch.tensor(lin.params["bias"])).numpy()
    np.testing.assert_allclose(lin.forward(x), want, rtol=1e-13)
    res = check_layer_grads(lin, x, rng)
    assert set(res) == {"weight", "bias", "x"}


def test_linear_backward_accumulates_and_init_is_seeded():
    a, b = Linear(4, 6, seed=3), Linear(4, 6, seed=3)
    np.testing.assert_array_equal(a.params["weight"], b.params["weight"])
    assert a.params["weight"].dtype == np.float32
    assert not np.array_equal(a.params["weight"], Linear(4, 6, seed=4).params["weight"])
    x = _rng().standard_normal((3, 4)).astype(np.float32)
    dy = np.ones((3, 6), np.float32)
    a.forward(x)
    a.backward(dy)
    g1 = a.grads["weight"].copy()
    a.backward(dy)
    np.testing.assert_allclose(a.grads["weight"], 2 * g1, rtol=1e-6)
    a.zero_grad()
    assert not a.grads["weight"].any()


def test_rmsnorm_matches_torch_and_grads():
    torch = pytest.importorskip("torch")
    rng = _rng(2)
    n = RMSNorm(6, eps=1e-6, dtype="float64")
    n.params["weight"][:] = rng.standard_normal(6)
    x = rng.standard_normal((3, 2, 6))
    want = torch.nn.functional.rms_norm(torch.tensor(x), (6,), torch.tensor(n.params["weight"]), eps=1e-6)
    np.testing.assert_allclose(n.forward(x), want.numpy(), rtol=1e-12)
    check_layer_grads(n, x, rng)


def test_rmsnorm_large_inputs_finite():
    n = RMSNorm(4, dtype="float32")
    y = n.forward(np.array([[1e4, -1e4, 3e4, 0.0]], np.float32))
    assert np.isfinite(y).all()
    np.testing.assert_allclose((y.astype(np.float64) ** 2).mean(), 1.0, rtol=1e-5)


def test_swiglu_matches_torch_and_grads():
    torch = pytest.importorskip("torch")
    rng = _rng(3)
    f = SwiGLU(5, 7, seed=1, dtype="float64")
    x = rng.standard_normal((2, 3, 5)) * 3
    t = {k: torch.tensor(v) for k, v in f.params.items()}
    xt = torch.tensor(x)
    want = (torch.nn.functional.silu(xt @ t["W1"].T) * (xt @ t["W3"].T)) @ t["W2"].T
    np.testing.assert_allclose(f.forward(x), want.numpy(), rtol=1e-12)
    check_layer_grads(f, x, rng)


def test_swiglu_extreme_preactivations_finite():
    f = SwiGLU(2, 3, seed=0, dtype="float32")
    y = f.forward(np.array([[1e4, -1e4]], np.float32))
    dx = f.backward(np.ones_like(y))
    assert np.isfinite(y).all() and np.isfinite(dx).all()


@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-13), ("float32", 1e-6)])
def test_swiglu_kernels_equal_the_numpy_path(dtype, rtol, monkeypatch):
    """The fused Numba passes (contiguous NumPy input) against the NumPy formulas: output, input
    gradient and weight gradients, pre-activations from -100 to 100 and a NaN row."""
    import sys

    swiglu = sys.modules["topkattn.layers.swiglu"]
    rng = _rng(5)
    x = (rng.standard_normal((3, 9, 6)) * np.array([1, 3, 30])[:, None, None]).astype(dtype)
    x[2, 4] = np.nan
    dy = rng.standard_normal((3, 9, 6)).astype(dtype)

    def run():
        f = SwiGLU(6, 10, seed=2, dtype=dtype)
        y = f.forward(x)
        dx = f.backward(dy)
        return y, dx, {k: g.copy() for k, g in f.grads.items()}

    got = run()
    monkeypatch.setattr(swiglu, "_kernels", None)
    want = run()
    for a, b in [(got[0], want[0]), (got[1], want[1])] + [(got[2][k], want[2][k]) for k in want[2]]:
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
        scale = np.nanmax(np.abs(b))
        np.testing.assert_allclose(a, b, rtol=0, atol=rtol * scale, equal_nan=True)
    assert np.isnan(got[0][2, 4]).all() and np.isfinite(got[0][:2]).all()


# ---------------------------------------------------------------- RoPE

def test_rope_is_complex_rotation_and_relative():
    rng = _rng(4)
    R, T, base = 8, 5, 100.0
    rope = RoPE(R, base=base)
    x = rng.standard_normal((2, T, R))
    y = rope.forward(x, np.arange(T))
    z = x[..., :R // 2] + 1j * x[..., R // 2:]
    theta = base ** (-np.arange(R // 2) / (R // 2))
    zr = z * np.exp(1j * np.arange(T)[:, None] * theta[None, :])
    np.testing.assert_allclose(y, np.concatenate([zr.real, zr.imag], -1), rtol=1e-12, atol=1e-14)
    # scores depend only on the offset: <rope(q, m), rope(k, n)> == <rope(q, m+3), rope(k, n+3)>
    q, k = rng.standard_normal(R), rng.standard_normal(R)
    def s(m, n):
        return rope.step(q[None], [m]) @ rope.step(k[None], [n]).T
    np.testing.assert_allclose(s(4, 1), s(7, 4), rtol=1e-12)
    # backward is the transpose of the rotation
    res = directional_grad_check(lambda: float((rope.forward(x, np.arange(T)) * y).sum()),
                                 {"x": x}, {"x": rope.backward(y)}, rng)
    assert_grads_close(res)


# ---------------------------------------------------------------- Embedding

def test_embedding_gather_scatter_and_tied_head():
    rng = _rng(5)
    e = Embedding(7, 4, seed=0, dtype="float64")
    tok = np.array([[1, 3, 1], [6, 1, 0]])
    np.testing.assert_array_equal(e.forward(tok), e.params["weight"][tok])
    dx = rng.standard_normal((2, 3, 4))
    e.backward(dx)
    onehot = np.eye(7)[tok.reshape(-1)]  # (6, 7)
    np.testing.assert_allclose(e.grads["weight"], onehot.T @ dx.reshape(-1, 4), rtol=1e-13)
    e.zero_grad()
    h = rng.standard_normal((2, 3, 4))
    check_layer_grads(e, h, rng, forward=e.logits, backward=e.backward_logits)


def test_embedding_bad_tokens():
    e = Embedding(5, 3)
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, 5\)"):
        e.forward(np.array([[0, 5]]))
    with pytest.raises(TypeError, match="tokens must be an integer"):
        e.forward(np.zeros((1, 2)))
    with pytest.raises(ValueError, match="tokens must be 2-D"):
        e.forward(np.zeros(3, dtype=np.int64))


# ---------------------------------------------------------------- MoE

def _moe_reference(m, x):
    """Per-token loop: softmax router, top-k (lower index on ties), renormalised gates."""
    W = m.params["router"]
    E, k = m.n_experts, m.moe_topk
    xf = x.reshape(-1, x.shape[-1])
    out = np.zeros_like(xf)
    counts = np.zeros(E)
    P = np.zeros(E)
    for n, xn in enumerate(xf):
        z = W @ xn
        p = np.exp(z - z.max())
        p /= p.sum()
        P += p / len(xf)
        order = sorted(range(E), key=lambda e: (-p[e], e))[:k]
        for e in order:
            ex = m.experts[e].params
            a, b = ex["W1"] @ xn, ex["W3"] @ xn
            out[n] += p[e] / p[order].sum() * (ex["W2"] @ (a / (1 + np.exp(-a)) * b))
            counts[e] += 1
    aux = E * (counts / (len(xf) * k) * P).sum()
    return out.reshape(x.shape), aux


def test_moe_matches_per_token_reference_and_grads():
    rng = _rng(6)
    m = MoE(6, 5, n_experts=4, moe_topk=2, aux_loss_weight=0.3, seed=1, dtype="float64")
    x = rng.standard_normal((2, 5, 6))
    want, aux = _moe_reference(m, x)
    np.testing.assert_allclose(m.forward(x), want, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(m.aux_loss, aux, rtol=1e-12)
    # loss = sum(y * R) + w * aux: backward includes the weighted aux gradient
    R = rng.standard_normal(x.shape)
    m.forward(x)
    m.zero_grad()
    dx = m.backward(R)
    arrays = dict(m.named_params(), x=x)
    analytic = dict(m.named_grads(), x=dx)

    def loss():
        y = m.forward(x)
        return float((y * R).sum() + m.aux_loss_weight * m.aux_loss)
    assert_grads_close(directional_grad_check(loss, arrays, analytic, rng))


def test_moe_ties_go_to_lower_expert_and_balanced_aux_is_one():
    m = MoE(3, 4, n_experts=4, moe_topk=2, seed=0, dtype="float64")
    m.params["router"][:] = 0.0  # all probabilities 1/4
    x = _rng(7).standard_normal((5, 3))
    y = m.forward(x)
    ex = m.experts
    want = 0.5 * (ex[0].forward(x) + ex[1].forward(x))
    np.testing.assert_allclose(y, want, rtol=1e-12)
    # f = (1/2, 1/2, 0, 0), P = 1/4 each: aux = 4 * (1/8 + 1/8) = 1
    np.testing.assert_allclose(m.aux_loss, 1.0, rtol=1e-12)


def test_moe_bad_args():
    with pytest.raises(ValueError, match="moe_topk must be <= n_experts=2"):
        MoE(4, 4, n_experts=2, moe_topk=3)


# ---------------------------------------------------------------- loss

def test_cross_entropy_matches_torch_with_ignore_and_grads():
    torch = pytest.importorskip("torch")
    rng = _rng(8)
    logits = rng.standard_normal((2, 5, 7)) * 3
    tgt = rng.integers(0, 7, (2, 5))
    tgt[0, 1] = tgt[1, 4] = -100
    loss, d = softmax_cross_entropy(logits, tgt)
    lt = torch.tensor(logits, requires_grad=True)
    ref = torch.nn.functional.cross_entropy(lt.reshape(-1, 7), torch.tensor(tgt).reshape(-1), ignore_index=-100)
    ref.backward()
    np.testing.assert_allclose(loss, ref.item(), rtol=1e-13)
    np.testing.assert_allclose(d, lt.grad.numpy(), rtol=1e-12, atol=1e-15)
    assert not d[0, 1].any()
    res = directional_grad_check(lambda: softmax_cross_entropy(logits, tgt)[0], {"logits": logits},
                                 {"logits": d}, rng)
    assert_grads_close(res)


def test_cross_entropy_large_logits_and_all_ignored():
    logits = np.array([[1e4, 0.0, -1e4], [0.0, 1e4, 1e4]], np.float32)
    loss, d = softmax_cross_entropy(logits, np.array([1, 2]))
    np.testing.assert_allclose(loss, (1e4 + np.log(2)) / 2, rtol=1e-6)
    assert np.isfinite(d).all()
    loss0, d0 = softmax_cross_entropy(logits, np.array([-100, -100]))
    assert loss0 == 0.0 and not d0.any()
    with pytest.raises(ValueError, match="targets must have shape"):
        softmax_cross_entropy(logits, np.array([1, 2, 0]))
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 3\)"):
        softmax_cross_entropy(logits, np.array([1, 3]))


# ---------------------------------------------------------------- dense attention op

@pytest.mark.parametrize("shape", [(2, 4, 6, 6, 2), (1, 4, 3, 9, 1), (2, 2, 7, 7, 2)])
@pytest.mark.parametrize("chunk", [None, 2])
def test_dense_attention_matches_reference_and_grads(shape, chunk):
    B, H, T, S, G = shape
    rng = _rng(9)
    q, k = rng.standard_normal((B, H, T, 5)), rng.standard_normal((B, G, S, 5))
    v = rng.standard_normal((B, G, S, 3))
    out, saved = dense_attention_forward(q, k, v, scale=0.7, chunk_size=chunk)
    want, _, lse = topk_attention_reference(q, k, v, topk=S, scale=0.7)
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(saved.lse, lse, rtol=1e-12)
    R = rng.standard_normal(out.shape)
    dq, dk, dv = dense_attention_backward(R, saved)
    def f():
        return float((dense_attention(q, k, v, scale=0.7, chunk_size=chunk) * R).sum())
    assert_grads_close(directional_grad_check(f, {"q": q, "k": k, "v": v}, {"q": dq, "k": dk, "v": dv}, rng))


def test_dense_attention_large_logits_and_empty_rows():
    q = np.full((1, 1, 3, 2), 100.0, np.float32)
    k = np.full((1, 1, 2, 2), 100.0, np.float32)  # scores 1e4 * scale
    v = np.arange(4, dtype=np.float32).reshape(1, 1, 2, 2)
    out = dense_attention(q, k, v, scale=1.0)  # T=3 > S=2: query 0 sees no key
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[0, 0, 0], 0.0)
    np.testing.assert_allclose(out[0, 0, 2], v[0, 0].mean(0), rtol=1e-6)


def test_dense_attention_bad_input():
    q = np.zeros((1, 3, 2, 4))
    with pytest.raises(ValueError, match="H=3 must be a multiple of KV heads G=2"):
        dense_attention(q, np.zeros((1, 2, 2, 4)), np.zeros((1, 2, 2, 4)))
    with pytest.raises(ValueError, match="k must be 4-D"):
        dense_attention(q, np.zeros((2, 4)), np.zeros((1, 3, 2, 4)))
    with pytest.raises(TypeError, match="q, k, v must share one dtype"):
        dense_attention(q.astype(np.float32), np.zeros((1, 3, 2, 4)), np.zeros((1, 3, 2, 4)))


# ---------------------------------------------------------------- plain attention layer

def _attention_reference(a, x):
    """Per-head loop with explicit rope, persistent keys and the top-k reference op."""
    p = a.params
    B, T, d = x.shape
    H, G, D, Dv, P = a.n_heads, a.n_kv_heads, a.head_dim, a.v_head_dim, a.persistent_tokens
    rope = RoPE(D, a.rope_base)
    q = rope.step((x @ p["W_Q"].T).reshape(B, T, H, D).transpose(0, 2, 1, 3), np.arange(T))
    k = rope.step((x @ p["W_K"].T).reshape(B, T, G, D).transpose(0, 2, 1, 3), np.arange(T))
    v = (x @ p["W_V"].T).reshape(B, T, G, Dv).transpose(0, 2, 1, 3)
    if P:
        k = np.concatenate([np.repeat(p["persist_k"][None], B, 0), k], 2)
        v = np.concatenate([np.repeat(p["persist_v"][None], B, 0), v], 2)
    topk = a.topk or (P + T)
    o, _, _ = topk_attention_reference(q, k, v, topk=topk, scale=1 / np.sqrt(D), sinks=P, window=a.window)
    return o.transpose(0, 2, 1, 3).reshape(B, T, H * Dv) @ p["W_O"].T


@pytest.mark.parametrize("G,topk,P,W", [(4, None, 0, 0), (2, 3, 0, 0), (1, 3, 2, 2), (2, None, 2, 0)])
def test_attention_layer_reference_grads_and_decode(G, topk, P, W):
    rng = _rng(10)
    # Sigma-style: query/key head dim 6 wider than value head dim 3
    a = Attention(12, 4, n_kv_heads=G, head_dim=6, v_head_dim=3, topk=topk, seed=1, dtype="float64",
                  persistent_tokens=P, window=W)
    x = rng.standard_normal((2, 7, 12))
    y = a.forward(x)
    np.testing.assert_allclose(y, _attention_reference(a, x), rtol=1e-10, atol=1e-12)
    check_layer_grads(a, x, rng)
    cache = a.init_cache(2)
    ys = np.concatenate([a.step(x[:, t:t + 1], cache) for t in range(7)], axis=1)
    np.testing.assert_allclose(ys, y, rtol=1e-5, atol=1e-12)
    assert cache.floats_per_token == G * (6 + 3)
    assert cache.keys.shape == (2, G, P + 7, 6)


def test_attention_layer_bad_input():
    a = Attention(8, 4, n_kv_heads=2, topk=2)
    with pytest.raises(ValueError, match=r"x must have last axis 8 \(B, T, d_model=8\), got shape \(1, 3, 9\)"):
        a.forward(np.zeros((1, 3, 9), np.float32))
    with pytest.raises(ValueError, match="n_heads=4 must be a multiple of n_kv_heads"):
        Attention(8, 4, n_kv_heads=3)
    with pytest.raises(ValueError, match="topk must be an integer >= 1, got 0"):
        Attention(8, 4, topk=0)
    cache = a.init_cache(2)
    with pytest.raises(ValueError, match="x_t has batch 3 but the cache was made for batch 2"):
        a.step(np.zeros((3, 1, 8), np.float32), cache)


def test_embedding_lookup_gradient():
    rng = _rng(11)
    e = Embedding(6, 3, seed=1, dtype="float64")
    tok = np.array([[0, 2, 2, 5]])
    assert set(check_layer_grads(e, tok, rng)) == {"weight"}


@pytest.mark.parametrize("ffn", ["swiglu", "moe"])
def test_block_gradients_and_step(ffn):
    from topkattn.layers import Block
    rng = _rng(12)
    attn = Attention(8, 2, head_dim=4, topk=2, seed=0, dtype="float64", persistent_tokens=1)
    f = SwiGLU(8, 12, seed=1, dtype="float64") if ffn == "swiglu" else MoE(8, 6, 3, 2, 0.0, seed=1, dtype="float64")
    blk = Block(attn, f, 8, dtype="float64")
    assert blk.params == {}  # everything lives in the children
    x = rng.standard_normal((2, 5, 8))
    names = [n for n, _ in blk.named_params()]
    assert names[0] == "attn_norm.weight" and "ffn_norm.weight" in names and "attn.W_Q" in names
    check_layer_grads(blk, x, rng)
    y = blk.forward(x)
    cache = blk.init_cache(2)
    ys = np.concatenate([blk.step(x[:, t:t + 1], cache) for t in range(5)], axis=1)
    np.testing.assert_allclose(ys, y, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("G2", [2, 1])
def test_attention_kv_head_conversion(G2):
    rng = _rng(13)
    mha = Attention(8, 4, head_dim=4, topk=3, seed=2, dtype="float64", persistent_tokens=1)
    x = rng.standard_normal((2, 6, 8))
    # the pooled conversion is exact when each group's KV heads are equal
    r = 4 // G2
    for name, width in (("W_K", 4), ("W_V", 4)):
        w = mha.params[name].reshape(4, width, 8)
        w[...] = np.repeat(w[::r], r, axis=0)
    for name in ("persist_k", "persist_v"):
        mha.params[name][...] = np.repeat(mha.params[name][::r], r, axis=0)
    conv = mha.with_kv_heads(G2)
    assert conv.n_kv_heads == G2 and conv.params["W_K"].shape == (G2 * 4, 8)
    np.testing.assert_allclose(conv.forward(x), mha.forward(x), rtol=1e-12, atol=1e-13)
    # in general each new head is the group mean
    mha2 = Attention(8, 4, head_dim=4, seed=3, dtype="float64")
    c2 = mha2.with_kv_heads(G2)
    np.testing.assert_allclose(c2.params["W_V"][:4], mha2.params["W_V"][:4 * r].reshape(r, 4, 8).mean(0),
                               rtol=1e-14)
    with pytest.raises(ValueError, match="n_kv_heads must divide the current n_kv_heads=4, got 3"):
        mha2.with_kv_heads(3)


# ---------------------------------------------------------------- the gradient a backward receives

def _grad_output_cases():
    """(name, forward() -> output, backward(dy), the layer whose grads must stay untouched, dy's name)."""
    from topkattn.layers import MLA, Block, TokenShift
    from topkattn.layers.gelu import gelu_backward, gelu_forward
    from topkattn.layers.layernorm import LayerNorm
    rng = _rng(20)
    x = rng.standard_normal((2, 3, 8))  # B=2, T=3: a transposed (T, B, ...) gradient has the same size
    tok = np.array([[1, 3, 1], [6, 1, 0]])
    cases = []

    def add(name, layer, forward, backward=None, dy_name="dy"):
        cases.append((name, layer, forward, backward or layer.backward, dy_name))

    lin = Linear(8, 5, bias=True, dtype="float64")
    add("Linear", lin, lambda: lin.forward(x))
    emb = Embedding(7, 4, dtype="float64")
    add("Embedding", emb, lambda: emb.forward(tok))
    head = Embedding(7, 8, dtype="float64")
    add("Embedding.logits", head, lambda: head.logits(x), head.backward_logits, "dlogits")
    rms = RMSNorm(8, dtype="float64")
    add("RMSNorm", rms, lambda: rms.forward(x))
    rope = RoPE(8)
    add("RoPE", rope, lambda: rope.forward(x, np.arange(3)))
    sw = SwiGLU(8, 6, dtype="float64")
    add("SwiGLU", sw, lambda: sw.forward(x))
    moe = MoE(8, 6, 3, 2, dtype="float64")
    add("MoE", moe, lambda: moe.forward(x))
    for topk in (None, 2):
        att = Attention(8, 2, topk=topk, dtype="float64", persistent_tokens=1)
        add(f"Attention topk={topk}", att, lambda att=att: att.forward(x))
        mla = MLA(8, 2, 4, 4, 4, 2, 4, topk=topk, dtype="float64", persistent_tokens=1)
        add(f"MLA topk={topk}", mla, lambda mla=mla: mla.forward(x))
    ts = TokenShift(8, dtype="float64")
    add("TokenShift", ts, lambda: ts.forward(x))
    blk = Block(Attention(8, 2, topk=2, dtype="float64"), SwiGLU(8, 6, dtype="float64"), 8, dtype="float64")
    add("Block", blk, lambda: blk.forward(x))
    ln = LayerNorm(8, dtype=np.float64)
    add("LayerNorm", ln, lambda: ln.forward(x))
    saved = {}

    def gelu_fwd():
        y, saved["s"] = gelu_forward(x)
        return y

    add("gelu", None, gelu_fwd, lambda dy: gelu_backward(dy, saved["s"]))
    return cases


def _grads(layer):
    if layer is None:
        return {}
    if hasattr(layer, "named_grads"):
        return {n: g.copy() for n, g in layer.named_grads()}
    return {n: g.copy() for n, g in layer.grads.items()}


@pytest.mark.parametrize("case", _grad_output_cases(), ids=lambda c: c[0])
def test_backward_checks_the_gradient_against_the_forward_output(case):
    """A transposed (T, B, ...) gradient has the right size and used to give wrong gradients
    silently; another shape gave a raw NumPy error; an integer one was cast."""
    _, layer, forward, backward, name = case
    y = forward()
    before = _grads(layer)
    want = tuple(y.shape)
    for bad in (y.swapaxes(0, 1), y[:, :-1], y[..., None]):
        with pytest.raises(ValueError, match=rf"{name} must have the shape of the forward output, "
                                             rf"{re.escape(str(want))}, got {re.escape(str(tuple(bad.shape)))}"):
            backward(np.ascontiguousarray(bad))
    with pytest.raises(TypeError, match=rf"{name} must be a float array, got int64"):
        backward(np.ones(want, np.int64))
    with pytest.raises(TypeError, match=rf"{name} must be a float array, got bool"):
        backward(np.ones(want, bool))
    after = _grads(layer)
    assert all(np.array_equal(before[n], after[n]) for n in before)  # nothing accumulated
    backward(np.ones(want, np.float32))  # a float gradient of the right shape is cast to the forward's dtype


@pytest.mark.parametrize("value", [-1, float("nan"), float("inf")])
def test_rmsnorm_refuses_a_negative_or_non_finite_eps(value):
    with pytest.raises(ValueError, match=r"eps must be >= 0, got "):
        RMSNorm(4, eps=value)
    from topkattn.layers.layernorm import LayerNorm
    with pytest.raises(ValueError, match=r"eps must be >= 0, got "):
        LayerNorm(4, eps=value)
    with pytest.raises(TypeError, match="eps must be a real number"):
        RMSNorm(4, eps="1e-6")


@pytest.mark.parametrize("base", [0, -5, 1, float("nan"), float("inf")])
def test_rope_refuses_a_base_that_is_not_finite_and_above_one(base):
    with pytest.raises(ValueError, match=r"base must be > 1, got "):
        RoPE(4, base=base)


def test_moe_and_token_shift_empty_inputs_and_bad_aux_weight():
    from topkattn.layers import TokenShift
    for layer in (MoE(4, 6, 3, 2, dtype="float64"), TokenShift(4, dtype="float64")):
        for shape in ((0, 3, 4), (2, 0, 4)):
            y = layer.forward(np.zeros(shape))
            assert y.shape == shape and layer.backward(np.zeros(shape)).shape == shape
    with pytest.raises(ValueError, match="aux_loss_weight must be >= 0, got nan"):
        MoE(4, 6, aux_loss_weight=float("nan"))
    with pytest.raises(ValueError, match=r"x must be 3-D \(B, T, d=4\)"):
        TokenShift(4).forward(np.zeros((3, 4), np.float32))


def test_swiglu_sigmoid_blend_equals_the_two_branches():
    from topkattn.layers.swiglu import _sigmoid

    a = np.array([-1e4, -100.0, -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.5, 100.0, 1e4, np.inf, -np.inf, np.nan],
                 dtype=np.float32)
    e = np.exp(-np.abs(a))
    with np.errstate(invalid="ignore"):
        want = np.where(a >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    got = _sigmoid(np, a)
    np.testing.assert_array_equal(got, want)  # bit for bit, NaN where a is NaN
    assert got.dtype == np.float32 and got[-2] == 0.0 and got[-3] == 1.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rope_and_rmsnorm_in_place_passes_give_the_formula_bit_for_bit(dtype):
    from topkattn.layers.rmsnorm import rms_norm_backward, rms_norm_forward
    from topkattn.layers.rope import rope_angles, rope_apply

    rng = _rng(9)
    x = rng.standard_normal((2, 3, 5, 8)).astype(np.float32)
    c, s = rope_angles(np.arange(5), 8, 100.0, np, dtype)
    for inverse in (False, True):
        sn = -s if inverse else s
        want = np.concatenate([x[..., :4] * c - x[..., 4:] * sn, x[..., :4] * sn + x[..., 4:] * c], axis=-1)
        got = rope_apply(x, c, s, inverse=inverse)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    h = rng.standard_normal((4, 6, 7)).astype(dtype)
    g = rng.standard_normal(7).astype(dtype)
    dy = rng.standard_normal((4, 6, 7)).astype(dtype)
    _, saved = rms_norm_forward(h, g)
    xhat, rstd, _ = saved
    u = dy * g
    want_dx = rstd * (u - xhat * (u * xhat).mean(-1, keepdims=True))
    dx, dg = rms_norm_backward(dy, saved)
    np.testing.assert_array_equal(dx, want_dx)
    np.testing.assert_array_equal(dg, (dy * xhat).reshape(-1, 7).sum(0))


def test_embedding_scatter_equals_numpy_add_at_bit_for_bit():
    rng = _rng(12)
    e = Embedding(7, 5, seed=0, dtype="float32")
    tokens = rng.integers(0, 7, (6, 9)).astype(np.int32)  # repeated rows, a narrow int dtype
    e.forward(tokens)
    dy = rng.standard_normal((6, 9, 5)).astype(np.float32)
    e.backward(dy)
    want = np.zeros((7, 5), np.float32)
    np.add.at(want, tokens.reshape(-1), dy.reshape(-1, 5))
    np.testing.assert_array_equal(e.grads["weight"], want)
