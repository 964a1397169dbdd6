"""Plain attention (``Attention``, attention="mha") variants (issue 15): KV experts (expert K/V projections
mixed per token by a top-r router) and ternary projections (W_Q, W_K, W_V, W_O; act_bits), packed at decode.
Float64 central-difference gradients (router, experts, ternary master weights through the straight-through
surrogate), decode equal to forward for every variant (and MLA ternary with act_bits=8 in a model, the
quantiser's tie band), the load-balancing loss gradient, the model config, a train run, bad arguments."""
import numpy as np
import pytest

from topkattn.layers import Attention
from topkattn.layers import attention_variants as av
from topkattn.layers.kv_experts import mix_rows, mix_rows_backward, route
from topkattn.layers.projection import ternary_product, weight_view
from topkattn.model import Transformer, TransformerConfig
from topkattn.ops import ternary as tr
from topkattn.ops.ternary import PackedTernary
from topkattn.testing import assert_grads_close, check_layer_grads, directional_grad_check

D_MODEL, H = 16, 4
VARIANTS = {
    "experts": dict(kv_experts=3, kv_experts_active=2),
    "experts-r1": dict(kv_experts=4, kv_experts_active=1),
    "experts-gqa": dict(n_kv_heads=2, kv_experts=3, kv_experts_active=2),
    "ternary": dict(ternary=True),
    "ternary-act8": dict(ternary=True, act_bits=8),
    "ternary-act4-gqa": dict(n_kv_heads=1, ternary=True, act_bits=4),
    "all": dict(n_kv_heads=2, kv_experts=3, kv_experts_active=2, ternary=True, act_bits=8),
}


def _attn(topk=None, P=0, seed=1, n_kv_heads=None, **kw):
    return Attention(D_MODEL, H, n_kv_heads, topk=topk, seed=seed, dtype="float64", persistent_tokens=P, **kw)


def _decode(m, x):
    cache = m.init_cache(x.shape[0])
    return np.concatenate([m.step(x[:, t:t + 1], cache) for t in range(x.shape[1])], axis=1), cache


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("topk,P,sel", [(None, 0, {}), (3, 2, {}),
                                        (None, 1, dict(selection="block", block_size=3, topk_blocks=2)),
                                        (3, 0, dict(tail="mean"))])
def test_decode_equals_forward(name, topk, P, sel):
    rng = np.random.default_rng(3)
    m = _attn(topk, P, **VARIANTS[name], **sel)
    m.training = False
    x = rng.standard_normal((2, 10, D_MODEL))
    y = m.forward(x)
    ys, cache = _decode(m, x)
    np.testing.assert_allclose(ys, y, rtol=1e-10, atol=1e-12)
    # the cache holds the mixed keys and values per token: plain MHA's G (D + Dv) numbers
    assert cache.bytes_per_token == m.kv_bytes_per_token == m.n_kv_heads * 2 * (D_MODEL // H) * 8
    if m.ternary:  # decode multiplies the 2-bit packed projections
        assert all(isinstance(cache.weights[n], PackedTernary) for n in av.PROJECTIONS)


def test_cached_keys_are_mixed_by_their_own_token():
    """Key j is sum_e g_j[e] W_K[e] x_j (its OWN token's gates), rotated: an independent reference."""
    rng = np.random.default_rng(0)
    m = _attn(None, 0, kv_experts=3, kv_experts_active=2, rope=False)
    x = rng.standard_normal((1, 6, D_MODEL))
    _, cache = _decode(m, x)
    E, Dh = 3, D_MODEL // H
    WK = m.params["W_K"].reshape(E, H * Dh, D_MODEL)
    for j in range(6):
        z = m.params["W_router"] @ x[0, j]
        p = np.exp(z - z.max())
        p /= p.sum()
        top = np.argsort(-p, kind="stable")[:2]
        k = sum(p[e] * WK[e] @ x[0, j] for e in top) / p[top].sum()
        np.testing.assert_allclose(cache.keys[0, :, j].ravel(), k, rtol=1e-12, atol=1e-14)


def test_variant_path_equals_plain_attention():
    """With no option set the variant path computes plain attention's numbers (forward and grads)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 7, D_MODEL))
    dy = rng.standard_normal((2, 7, D_MODEL))
    Forced = type("Forced", (Attention,), {"variant": property(lambda self: True)})
    for topk, P, G in [(None, 0, None), (3, 2, 2)]:
        a = _attn(topk, P, n_kv_heads=G)
        b = Forced(D_MODEL, H, G, topk=topk, seed=1, dtype="float64", persistent_tokens=P)
        np.testing.assert_allclose(b.forward(x), a.forward(x), rtol=1e-12, atol=1e-14)
        a.zero_grad()
        b.zero_grad()
        np.testing.assert_allclose(b.backward(dy), a.backward(dy), rtol=1e-10, atol=1e-12)
        for n, g in a.grads.items():
            np.testing.assert_allclose(b.grads[n], g, rtol=1e-10, atol=1e-12, err_msg=n)
        a.training = b.training = False
        np.testing.assert_allclose(_decode(b, x)[0], _decode(a, x)[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["experts", "experts-r1", "experts-gqa"])
@pytest.mark.parametrize("topk,P", [(None, 0), (4, 2)])
def test_gradients(name, topk, P):
    """Every parameter (router W_router, expert W_K/W_V, W_Q, W_O, persistent rows) and x."""
    rng = np.random.default_rng(5)
    m = _attn(topk, P, aux_loss_weight=0.0, **VARIANTS[name])
    assert m.params["W_K"].shape == (m.kv_experts * m.n_kv_heads * 4, D_MODEL) and "W_router" in m.params
    x = rng.standard_normal((2, 6, D_MODEL))
    check_layer_grads(m, x, rng, rtol=1e-5, atol=1e-8)


def test_layer_aux_loss_gradient():
    """backward adds aux_loss_weight * d(aux) to W_router: sum(y R) + w aux checked."""
    rng = np.random.default_rng(8)
    w = 0.5
    m = _attn(None, 0, kv_experts=3, kv_experts_active=2, aux_loss_weight=w)
    x = rng.standard_normal((2, 6, D_MODEL))
    R = rng.standard_normal((2, 6, D_MODEL))
    m.forward(x)
    assert m.aux_loss > 0
    m.zero_grad()
    m.backward(R)
    res = directional_grad_check(lambda: float((m.forward(x) * R).sum() + w * m.aux_loss),
                                 {"W_router": m.params["W_router"]}, {"W_router": m.grads["W_router"]}, rng)
    assert_grads_close(res, rtol=1e-5, atol=1e-8)


def test_mix_rows_and_its_gradient():
    rng = np.random.default_rng(2)
    rows, gates, dout = rng.standard_normal((5, 3, 4)), rng.random((5, 3)), rng.standard_normal((5, 4))
    np.testing.assert_allclose(mix_rows(rows, gates), np.einsum("ne,nef->nf", gates, rows), rtol=1e-13)
    drows, dgates = mix_rows_backward(dout, rows, gates)
    res = directional_grad_check(lambda: float((mix_rows(rows, gates) * dout).sum()),
                                 {"rows": rows, "gates": gates}, {"rows": drows, "gates": dgates}, rng)
    assert_grads_close(res, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("act_bits", [None, 8])
@pytest.mark.parametrize("extra", [{}, dict(kv_experts=2, kv_experts_active=1, n_kv_heads=2)])
def test_ternary_gradients_of_the_ste_surrogate(monkeypatch, act_bits, extra):
    """Ternary master weights W_Q, W_K, W_V, W_O (and x): the gradient of the surrogate
    w + (q(w) - w).detach() (x + (q(x) - x).detach() for activations), offsets frozen at the base point."""
    rng = np.random.default_rng(7)
    m = _attn(None, 2, ternary=True, act_bits=act_bits, aux_loss_weight=0.0, **extra)
    x = rng.standard_normal((2, 5, D_MODEL))
    w_off, a_off, calls = {}, [], [0]

    def surrogate_product(a, W, ternary, bits, eps):
        Wt = W + w_off.setdefault(id(W), weight_view(W, True, eps) - W)
        i = calls[0]
        calls[0] += 1
        if i == len(a_off):
            a_off.append(0.0 if bits is None else ternary_product(a, W, True, bits, eps)[1] - a)
        at = a + a_off[i]
        return at @ Wt.T, at, Wt

    monkeypatch.setattr(av, "ternary_product", surrogate_product)

    def forward(x_):
        calls[0] = 0
        return m.forward(x_)

    y0 = forward(x)
    monkeypatch.undo()
    np.testing.assert_allclose(y0, m.forward(x), rtol=1e-9, atol=1e-12)  # the surrogate's value is the forward
    monkeypatch.setattr(av, "ternary_product", surrogate_product)
    res = check_layer_grads(m, x, rng, forward=forward, rtol=1e-5, atol=1e-8)
    assert {"W_Q", "W_K", "W_V", "W_O"} <= set(res)


def test_model_mha_variants_decode_and_aux_loss():
    base = dict(vocab_size=32, d_model=32, n_layers=2, n_heads=4, attention="mha", topk=4, dtype="float64")
    tok = np.random.default_rng(0).integers(0, 32, (2, 12))
    for kw in [dict(kv_experts=3), dict(kv_experts=4, kv_experts_active=1, n_kv_heads=2), dict(ternary=True),
               dict(ternary=True, act_bits=8), dict(kv_experts=2, ternary=True, act_bits=8)]:
        m = Transformer(TransformerConfig(**base, **kw)).eval()
        assert m.kv_bytes_per_token() == Transformer(TransformerConfig(**base, n_kv_heads=kw.get("n_kv_heads"))
                                                     ).kv_bytes_per_token()
        logits = m.forward(tok)
        cache = m.init_cache(2)
        steps = np.concatenate([m.step(tok[:, t:t + 1], cache) for t in range(12)], axis=1)
        np.testing.assert_allclose(steps, logits, rtol=1e-9, atol=1e-10, err_msg=str(kw))
    m = Transformer(TransformerConfig(**base, kv_experts=3, aux_loss_weight=0.1))
    m.forward(tok)
    assert m.aux_loss == pytest.approx(0.1 * sum(b.attn.aux_loss for b in m.blocks)) and m.aux_loss > 0


@pytest.mark.parametrize("seed", [0, 7, 8])
def test_mla_ternary_act8_model_decode_equals_forward(seed):
    """MLA ternary + act_bits=8, 2 layers, float64: these seeds decoded 6.5e-3 .. 9.3e-3 away from the
    forward before the quantiser's tie band (an attention output one key carries is an integer-derived
    value: 127 n / 2n = 63.5 exactly, evaluated an ulp either side by the batched forward and the step)."""
    cfg = TransformerConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, q_lora_rank=16, kv_lora_rank=16,
                            qk_nope_dim=8, qk_rope_dim=4, v_head_dim=8, topk=4, ternary=True, act_bits=8,
                            dtype="float64", seed=seed)
    m = Transformer(cfg).eval()
    tok = np.random.default_rng(seed).integers(0, 32, (2, 16))
    logits = m.forward(tok)
    cache = m.init_cache(2)
    steps = np.concatenate([m.step(tok[:, t:t + 1], cache) for t in range(16)], axis=1)
    np.testing.assert_allclose(steps, logits, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_quantiser_tie_band(dtype):
    """Exact ties and values an ulp or a few either side quantise alike (half to even); outside the
    band the quantiser is round-to-nearest; the loop reference agrees."""
    band = tr.tie_band(dtype)
    assert band == 2048 * np.finfo(dtype).eps
    # row max 2 -> a = 63.5: x = 1 gives 63.5 exactly (tie -> 64); k ulps off still 64
    xs = [np.nextafter(dtype(1.0), dtype(2.0) * s) for s in (1, -1)] + [dtype(1.0)]
    xs += [dtype(1.0) * (1 + s * 8 * np.finfo(dtype).eps) for s in (1, -1)]
    x = np.array([[2.0, v] for v in xs], dtype=dtype)
    xq, _ = tr.quantize_activations(x, bits=8)
    assert (xq[:, 1] == 64).all()
    np.testing.assert_array_equal(tr.quantize_activations_reference(x, bits=8)[0], xq)
    # 62.5 + just past the band rounds to nearest (63); inside the band, to even (62)
    off = 4 * band
    x = np.array([[127.0, 62.5 + off], [127.0, 62.5 + band / 2]], dtype=np.float64).astype(dtype)
    xq, _ = tr.quantize_activations(x, bits=8)
    assert xq[0, 1] == 63 and xq[1, 1] == 62
    np.testing.assert_array_equal(tr.quantize_activations_reference(x, bits=8)[0], xq)


@pytest.mark.parametrize("kw,err,match", [
    (dict(kv_experts=2, kv_experts_active=3), ValueError, "kv_experts_active must be <= kv_experts=2, got 3"),
    (dict(kv_experts_active=1), ValueError, "kv_experts_active needs kv_experts"),
    (dict(kv_experts=-1), ValueError, "kv_experts"),
    (dict(kv_experts=2, kv_experts_active=0), ValueError, "kv_experts_active"),
    (dict(aux_loss_weight=-1.0), ValueError, "aux_loss_weight"),
    (dict(ternary="yes"), TypeError, "ternary must be True or False"),
    (dict(act_bits=8), ValueError, "act_bits applies only with ternary=True"),
    (dict(ternary=True, act_bits=9), ValueError, "act_bits"),
    (dict(ternary=True, act_bits=1), ValueError, "act_bits"),
])
def test_bad_arguments(kw, err, match):
    with pytest.raises(err, match=match):
        _attn(**kw)


def test_bad_config_and_uses():
    base = dict(vocab_size=32, d_model=32, n_layers=1, n_heads=4, attention="mha")
    with pytest.raises(ValueError, match="k_rank and v_rank are MLA's .* need attention='mla'"):
        TransformerConfig(**base, k_rank=4)
    with pytest.raises(ValueError, match="need attention='mla'"):
        TransformerConfig(**base, v_rank=4)
    with pytest.raises(ValueError, match="kv_experts_active must be <= kv_experts=2, got 3"):
        TransformerConfig(**base, kv_experts=2, kv_experts_active=3)
    with pytest.raises(ValueError, match="kv_experts_active needs kv_experts"):
        TransformerConfig(**base, kv_experts_active=1)
    with pytest.raises(ValueError, match="act_bits applies only with ternary=True"):
        TransformerConfig(**base, act_bits=8)
    m = _attn(kv_experts=2)
    with pytest.raises(ValueError, match="with_kv_heads converts plain attention"):
        m.with_kv_heads(2)
    cache = m.init_cache(1)
    cache.weights = None
    with pytest.raises(ValueError, match="cache has no decode weights"):
        m.step(np.zeros((1, 1, D_MODEL)), cache)
    with pytest.raises(RuntimeError, match="before forward"):
        _attn(ternary=True).backward(np.zeros((1, 2, D_MODEL)))


def test_router_is_the_mla_one():
    """One router: the variant path imports kv_experts.route (no copy)."""
    assert av.route is route


@pytest.mark.parametrize("kw", [dict(kv_experts=4, kv_experts_active=2), dict(ternary=True)])
def test_train_toy_mha_variants(kw):
    """A tiny train-toy run (the train API of ``topkattn train-toy --attention-layer mha``): the model is
    plain attention with the variant, the loss falls, the parameter count the memory estimate uses is exact."""
    from topkattn.training.train import TrainConfig, model_config, n_model_params, train

    cfg = TrainConfig(attention_layer="mha", steps=25, eval_size=32, **kw)
    res = train(cfg)
    attn = res.model.blocks[0].attn
    assert isinstance(attn, Attention) and attn.variant
    assert attn.kv_experts == kw.get("kv_experts", 0) and attn.ternary == kw.get("ternary", False)
    assert np.isfinite(res.losses).all() and res.losses[-5:].mean() < res.losses[:5].mean() - 0.2
    assert n_model_params(model_config(cfg, 64)) == res.model.n_params()
    with pytest.raises(ValueError, match="attention_layer"):
        TrainConfig(attention_layer="gqa")


def test_sharded_decoding_refuses_variants():
    """The position-sharded decode steps are plain attention's: a variant layer is refused, not mis-decoded."""
    from topkattn.distributed.sharded_layers import ShardedAttention

    class FakeComm:
        def Get_size(self):
            return 1

        def Get_rank(self):
            return 0

        def allgather(self, obj):  # construction agrees its checks and settings (one rank here)
            return [obj]

        Allgather = Allreduce = None

    for kw in (dict(kv_experts=2), dict(ternary=True)):
        with pytest.raises(ValueError, match="sharded decoding runs plain MLA or attention"):
            ShardedAttention(_attn(**kw), FakeComm())
    ShardedAttention(_attn(), FakeComm())  # plain attention still shards


@pytest.mark.parametrize("flags", [["--kv-experts", "4", "--kv-experts-active", "2"], ["--ternary", "--act-bits", "8"]])
def test_cli_train_toy_attention_layer_mha(flags):
    """``topkattn train-toy --attention-layer mha`` with the variant flags: the run's config and cache bytes."""
    import json

    from click.testing import CliRunner

    from topkattn.cli.main import main

    r = CliRunner().invoke(main, ["train-toy", "--d-model", "16", "--heads", "2", "--seq-len", "12",
                                  "--num-kv-pairs", "3", "--steps", "4", "--attention-layer", "mha", *flags, "--json",
                                  "--quiet"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    assert out["config"]["attention_layer"] == "mha"
    assert out["kv_bytes_per_token"] == 2 * 2 * 16 * 4  # layers x (K + V) x d_model floats x 4 bytes
    r = CliRunner().invoke(main, ["train-toy", "--attention-layer", "gqa"])
    assert r.exit_code != 0 and "--attention-layer" in r.output
