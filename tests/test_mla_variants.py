"""MLA variants (issue 15): KV experts, separate key/value latent ranks (DiffQKV), wider query heads,
ternary projections.  Float64 central-difference gradients for every new parameter (ternary through
the straight-through surrogate), decode equal to forward, the router's load-balancing loss and its
gradient, an independent per-query reference of the expert scores, the model config, bad arguments."""
import numpy as np
import pytest

from topkattn.layers import MLA
from topkattn.layers import mla_variants as mv
from topkattn.layers.kv_experts import route, router_backward
from topkattn.layers.projection import act_view, ternary_product, weight_view
from topkattn.model import Transformer, TransformerConfig
from topkattn.testing import assert_grads_close, check_layer_grads, directional_grad_check

DIMS = (16, 3, 8, 6, 4, 4, 5)  # d, H, Lq, C, Dn, R, Dv
VARIANTS = {
    "experts": dict(kv_experts=3, kv_experts_active=2),
    "experts-r1": dict(kv_experts=3, kv_experts_active=1),
    "split": dict(k_rank=3, v_rank=5),
    "split-experts": dict(k_rank=4, v_rank=6, kv_experts=2, kv_experts_active=2),
    "ternary": dict(ternary=True),
    "ternary-act8": dict(ternary=True, act_bits=8),  # ties within ops.ternary.tie_band round alike
    "all": dict(kv_experts=3, kv_experts_active=1, k_rank=4, v_rank=6, ternary=True),
}


def _mla(topk=None, P=0, seed=1, **kw):
    return MLA(*DIMS, topk=topk, seed=seed, dtype="float64", persistent_tokens=P, **kw)


def _decode(m, x):
    cache = m.init_cache(x.shape[0])
    return np.concatenate([m.step(x[:, t:t + 1], cache) for t in range(x.shape[1])], axis=1), cache


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("topk,P", [(None, 0), (3, 2)])
def test_decode_equals_forward(name, topk, P):
    rng = np.random.default_rng(3)
    m = _mla(topk, P, **VARIANTS[name])
    m.training = False
    x = rng.standard_normal((2, 9, DIMS[0]))
    y = m.forward(x)
    ys, cache = _decode(m, x)
    np.testing.assert_allclose(ys, y, rtol=1e-10, atol=1e-12)
    # the cache holds the index part [ck ; kr] (and the values apart with separate ranks)
    np.testing.assert_allclose(cache.keys, m.latent_keys(x), rtol=1e-12, atol=1e-14)
    assert cache.bytes_per_token == m.kv_bytes_per_token


def test_general_path_equals_plain_mla():
    """With no variant option the general path computes plain MLA's numbers (forward and grads)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 7, DIMS[0]))
    dy = rng.standard_normal((2, 7, DIMS[0]))
    Forced = type("Forced", (MLA,), {"variant": property(lambda self: True)})
    for topk, P in [(None, 0), (3, 2)]:
        a = _mla(topk, P)
        b = Forced(*DIMS, topk=topk, seed=1, dtype="float64", persistent_tokens=P)
        np.testing.assert_allclose(b.forward(x), a.forward(x), rtol=1e-12, atol=1e-14)
        a.zero_grad()
        b.zero_grad()
        np.testing.assert_allclose(b.backward(dy), a.backward(dy), rtol=1e-10, atol=1e-12)
        for n, g in a.grads.items():
            np.testing.assert_allclose(b.grads[n], g, rtol=1e-10, atol=1e-12, err_msg=n)


@pytest.mark.parametrize("name", ["experts", "experts-r1", "split", "split-experts"])
@pytest.mark.parametrize("topk,P", [(None, 0), (4, 2)])
def test_gradients(name, topk, P):
    """Every parameter (router W_router, expert W_UK/W_UV, W_DV, v_norm, persist_cv) and x."""
    rng = np.random.default_rng(5)
    m = _mla(topk, P, aux_loss_weight=0.0, **VARIANTS[name])
    assert {"W_router"} <= set(m.params) or "kv_experts" not in VARIANTS[name]
    x = rng.standard_normal((2, 6, DIMS[0]))
    check_layer_grads(m, x, rng, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("act_bits", [None, 8])
@pytest.mark.parametrize("extra", [{}, dict(kv_experts=2, kv_experts_active=1, k_rank=3, v_rank=5)])
def test_ternary_gradients_of_the_ste_surrogate(monkeypatch, act_bits, extra):
    """Ternary master weights: the gradient of the surrogate w + (q(w) - w).detach() (and
    x + (q(x) - x).detach() for activations), with the quantisation offsets frozen at the base point."""
    rng = np.random.default_rng(7)
    m = _mla(None, 2, ternary=True, act_bits=act_bits, aux_loss_weight=0.0, **extra)
    x = rng.standard_normal((2, 5, DIMS[0]))
    w_off, a_off, calls = {}, [], [0]

    def surrogate_product(a, W, ternary, act_bits_, eps):
        Wt = W + w_off.setdefault(id(W), weight_view(W, True, eps) - W)
        return surrogate_act(a, act_bits_, eps) @ Wt.T, surrogate_act(a, act_bits_, eps, count=False), Wt

    def surrogate_act(a, bits, eps=1e-5, count=True):
        if bits is None:
            return a
        i = calls[0] - (0 if count else 1)
        if count:
            calls[0] += 1
            if i == len(a_off):
                a_off.append(act_view(a, bits, eps) - a)
        return a + a_off[i]

    def surrogate_weight(W, ternary, eps):
        return W + w_off.setdefault(id(W), weight_view(W, True, eps) - W)

    monkeypatch.setattr(mv, "ternary_product", surrogate_product)
    monkeypatch.setattr(mv, "act_view", surrogate_act)
    monkeypatch.setattr(mv, "weight_view", surrogate_weight)

    def forward(x_):
        calls[0] = 0
        return m.forward(x_)

    y0 = forward(x)
    # the surrogate's value at the base point is the quantised forward
    monkeypatch.undo()
    np.testing.assert_allclose(y0, m.forward(x), rtol=1e-9, atol=1e-12)
    for name, fn in (("ternary_product", surrogate_product), ("act_view", surrogate_act),
                     ("weight_view", surrogate_weight)):
        monkeypatch.setattr(mv, name, fn)
    check_layer_grads(m, x, rng, forward=forward, rtol=1e-5, atol=1e-8)


def test_ternary_product_values():
    """ternary_product: y = x~ W~^T with W~ = s Wq (absmean s) and x~ the 8-bit per-token quantised x."""
    rng = np.random.default_rng(2)
    x, W = rng.standard_normal((5, 7)), rng.standard_normal((3, 7))
    s = np.abs(W).mean() + 1e-5
    Wt = s * np.clip(np.round(W / s), -1, 1)
    a = 127 / np.abs(x).max(-1, keepdims=True)
    xt = np.clip(np.round(x * a), -128, 127) / a
    y, x_view, W_view = ternary_product(x, W, True, 8)
    np.testing.assert_allclose(W_view, Wt, rtol=1e-15)
    np.testing.assert_allclose(x_view, xt, rtol=1e-15)
    np.testing.assert_allclose(y, xt @ Wt.T, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(ternary_product(x, W, False)[0], x @ W.T)


def test_router_values_and_aux_loss():
    rng = np.random.default_rng(4)
    x, Wr = rng.standard_normal((40, 6)), rng.standard_normal((5, 6))
    gates, aux, saved = route(x, Wr, 2)
    z = x @ Wr.T
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    top = np.argsort(-p, axis=-1, kind="stable")[:, :2]
    want = np.zeros_like(p)
    for i, (e1, e2) in enumerate(top):
        want[i, [e1, e2]] = p[i, [e1, e2]] / (p[i, e1] + p[i, e2])
    np.testing.assert_allclose(gates, want, rtol=1e-13)
    f = np.array([(top == e).sum() for e in range(5)]) / (40 * 2)
    assert aux == pytest.approx(5 * (f * p.mean(0)).sum(), rel=1e-13)
    assert (np.count_nonzero(gates, axis=1) == 2).all()


def test_router_gradient_with_aux_loss():
    """d(sum(gates * G) + w aux)/dWr through router_backward against central differences."""
    rng = np.random.default_rng(6)
    x, Wr = rng.standard_normal((30, 6)), rng.standard_normal((4, 6))
    G = rng.standard_normal((30, 4))
    w = 0.3

    def loss():
        gates, aux, _ = route(x, Wr, 2)
        return float((gates * G).sum() + w * aux)

    gates, aux, saved = route(x, Wr, 2)
    dz = router_backward(G, saved, w)
    res = directional_grad_check(loss, {"Wr": Wr}, {"Wr": dz.T @ x}, rng)
    assert_grads_close(res, rtol=1e-6, atol=1e-9)
    # the aux loss alone: its gradient reaches the router through pbar
    dz0 = router_backward(np.zeros_like(G), saved, 1.0)
    res = directional_grad_check(lambda: route(x, Wr, 2)[1], {"Wr": Wr}, {"Wr": dz0.T @ x}, rng)
    assert_grads_close(res, rtol=1e-6, atol=1e-10)
    assert abs(res["Wr"][1]) > 1e-6


def test_layer_aux_loss_gradient():
    """The layer's backward adds aux_loss_weight * d(aux) to W_router: sum(y R) + w aux checked."""
    rng = np.random.default_rng(8)
    w = 0.5
    m = _mla(None, 0, kv_experts=3, kv_experts_active=2, aux_loss_weight=w)
    x = rng.standard_normal((2, 6, DIMS[0]))
    R = rng.standard_normal((2, 6, DIMS[0]))
    m.forward(x)
    m.zero_grad()
    m.backward(R)
    res = directional_grad_check(lambda: float((m.forward(x) * R).sum() + w * m.aux_loss),
                                 {"W_router": m.params["W_router"]}, {"W_router": m.grads["W_router"]}, rng)
    assert_grads_close(res, rtol=1e-5, atol=1e-8)


def test_expert_scores_against_a_per_query_reference():
    """Query t scores key j with key j projected by the QUERY's expert mixture (dense, float64 loops)."""
    rng = np.random.default_rng(9)
    m = _mla(None, 0, kv_experts=3, kv_experts_active=2)
    p = m.params
    d, H, Lq, C, Dn, R, Dv = DIMS
    E = 3
    x = rng.standard_normal((1, 5, d))
    y = m.forward(x)
    rms = lambda a, g: a / np.sqrt((a * a).mean(-1, keepdims=True) + 1e-6) * g  # noqa: E731
    T = 5
    cq = rms(x[0] @ p["W_DQ"].T, p["q_norm"])
    c = rms(x[0] @ p["W_DKV"].T, p["kv_norm"])
    q_ref, k_ref = m._saved["qn"], None
    qr_all = np.stack([mv.rope_apply((cq @ p["W_QR"].T).reshape(T, H, R).transpose(1, 0, 2),
                                     *mv.rope_angles(np.arange(T), R, m.rope_base, np, x.dtype))])[0]
    kr = mv.rope_apply(x[0] @ p["W_KR"].T, *mv.rope_angles(np.arange(T), R, m.rope_base, np, x.dtype))
    gates = route(x[0], p["W_router"], 2)[0]  # (T, E)
    UK, UV = p["W_UK"].reshape(E, H, Dn, C), p["W_UV"].reshape(E, H, Dv, C)
    out = np.zeros((T, H * Dv))
    for t in range(T):
        for h in range(H):
            qn = (cq[t] @ p["W_UQ"].T).reshape(H, Dn)[h]
            s = np.array([(qn @ sum(gates[t, e] * UK[e, h] for e in range(E)) @ c[j]) + qr_all[h, t] @ kr[j]
                          for j in range(t + 1)]) / np.sqrt(Dn + R)
            a = np.exp(s - s.max())
            a /= a.sum()
            v = [sum(gates[t, e] * UV[e, h] for e in range(E)) @ c[j] for j in range(t + 1)]
            out[t, h * Dv:(h + 1) * Dv] = sum(a[j] * v[j] for j in range(t + 1))
    del q_ref, k_ref
    np.testing.assert_allclose(y[0], out @ p["W_O"].T, rtol=1e-10, atol=1e-12)


def test_model_config_variants_and_cache_bytes():
    base = dict(vocab_size=32, d_model=32, n_layers=2, n_heads=4, q_lora_rank=16, kv_lora_rank=16,
                qk_nope_dim=8, qk_rope_dim=4, v_head_dim=8, topk=4, dtype="float64")
    rng = np.random.default_rng(0)
    tok = rng.integers(0, 32, (2, 8))
    for kw, per_layer in [({}, 16 + 4), (dict(k_rank=4, v_rank=8, q_head_dim=16), 4 + 4 + 8),
                          (dict(kv_experts=3), 16 + 4), (dict(ternary=True), 16 + 4),
                          (dict(ternary=True, act_bits=8), 16 + 4)]:
        m = Transformer(TransformerConfig(**base, **kw)).eval()
        assert m.kv_bytes_per_token() == 2 * 8 * per_layer
        logits = m.forward(tok)
        cache = m.init_cache(2)
        steps = np.concatenate([m.step(tok[:, t:t + 1], cache) for t in range(8)], axis=1)
        np.testing.assert_allclose(steps, logits, rtol=1e-9, atol=1e-10)
    wide = Transformer(TransformerConfig(**base, q_head_dim=16))
    assert wide.blocks[0].attn.qk_nope_dim == 12
    # a config dict without the new fields (an older checkpoint's) still loads as plain MLA
    old = TransformerConfig(**base).to_dict()
    for k in ("kv_experts", "kv_experts_active", "k_rank", "v_rank", "q_head_dim", "ternary", "act_bits"):
        old.pop(k)
    assert not Transformer(TransformerConfig.from_dict(old)).blocks[0].attn.variant
    # the experts' aux loss reaches the model's
    m = Transformer(TransformerConfig(**base, kv_experts=3, aux_loss_weight=0.1))
    m.forward(tok)
    assert m.aux_loss == pytest.approx(0.1 * sum(b.attn.aux_loss for b in m.blocks)) and m.aux_loss > 0


@pytest.mark.parametrize("kw,err,match", [
    (dict(kv_experts=2, kv_experts_active=3), ValueError, "kv_experts_active must be <= kv_experts=2, got 3"),
    (dict(kv_experts_active=1), ValueError, "kv_experts_active needs kv_experts"),
    (dict(kv_experts=-1), ValueError, "kv_experts"),
    (dict(k_rank=0), ValueError, "k_rank"),
    (dict(v_rank=0), ValueError, "v_rank"),
    (dict(k_rank=2.5), TypeError, "k_rank"),
    (dict(act_bits=8), ValueError, "act_bits applies only with ternary=True"),
    (dict(ternary=True, act_bits=9), ValueError, "act_bits"),
    (dict(ternary=1), TypeError, "ternary must be True or False"),
])
def test_bad_arguments(kw, err, match):
    with pytest.raises(err, match=match):
        _mla(**kw)


def test_bad_config_and_project():
    with pytest.raises(ValueError, match="kv_experts_active must be <= kv_experts=1"):
        TransformerConfig(vocab_size=8, kv_experts=1, kv_experts_active=2)
    with pytest.raises(ValueError, match="q_head_dim must exceed qk_rope_dim=8"):
        TransformerConfig(vocab_size=8, q_head_dim=8)
    with pytest.raises(ValueError, match="need attention='mla'"):
        TransformerConfig(vocab_size=8, attention="mha", k_rank=4)
    with pytest.raises(ValueError, match="project"):
        _mla(kv_experts=2).project(np.zeros((1, 2, DIMS[0])))
