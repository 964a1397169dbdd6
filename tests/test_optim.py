"""AdamW, global-norm clipping and the warmup+cosine schedule against hand-computed values and torch."""
import math

import numpy as np
import pytest

from topkattn.training.optim import AdamW, clip_grad_norm, global_grad_norm, warmup_cosine_lr


def test_adamw_two_steps_by_hand():
    # p0 = 1, lr = 0.1, betas (0.9, 0.999), eps 1e-8, weight_decay 0.1 (decayed: ndim 2)
    # step 1, g = 0.5:  p <- 1 * (1 - 0.01) = 0.99;  m = 0.05, v = 0.00025
    #   mhat = 0.05 / 0.1 = 0.5, vhat = 0.00025 / 0.001 = 0.25, update = 0.1 * 0.5 / (0.5 + 1e-8)
    #   p1 = 0.99 - 0.0999999980 = 0.8900000020
    # step 2, g = -1:  p <- p1 * 0.99 = 0.88110000198;  m = 0.045 - 0.1 = -0.055
    #   v = 0.00024975 + 0.001 = 0.00124975;  bc1 = 0.19, bc2 = 0.001999
    #   mhat = -0.289473684210526, vhat = 0.625187593796898, sqrt = 0.790688050875...
    #   update = 0.1 * mhat / (sqrt + 1e-8) = -0.0366103522...;  p2 = 0.9177103542...
    p = {"w": np.array([[1.0]])}
    opt = AdamW(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    opt.step(p, {"w": np.array([[0.5]])})
    assert p["w"][0, 0] == pytest.approx(0.99 - 0.1 * 0.5 / (0.5 + 1e-8), abs=1e-15)
    assert p["w"][0, 0] == pytest.approx(0.8900000020, abs=1e-10)
    opt.step(p, {"w": np.array([[-1.0]])})
    assert opt.m["w"][0, 0] == pytest.approx(-0.055, abs=1e-15)
    assert opt.v["w"][0, 0] == pytest.approx(0.00124975, abs=1e-15)
    mhat = -0.055 / 0.19
    vhat = 0.00124975 / 0.001999
    assert mhat == pytest.approx(-0.289473684210526, abs=1e-12)
    assert vhat == pytest.approx(0.625187593796898, abs=1e-12)
    expected = 0.8900000020 * 0.99 - 0.1 * mhat / (math.sqrt(vhat) + 1e-8)
    assert expected == pytest.approx(0.9177103542, abs=1e-9)
    assert p["w"][0, 0] == pytest.approx(expected, abs=1e-9)
    assert opt.t == 2


def test_adamw_matches_torch_over_several_steps():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    shapes = {"a": (3, 4), "b": (5,)}
    params = {k: rng.standard_normal(s) for k, s in shapes.items()}
    tp = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in params.items()}
    # torch: weight decay on the matrix only, as our default filter does
    topt = torch.optim.AdamW([{"params": [tp["a"]], "weight_decay": 0.05},
                              {"params": [tp["b"]], "weight_decay": 0.0}],
                             lr=3e-2, betas=(0.8, 0.95), eps=1e-6)
    opt = AdamW(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05)
    for step in range(6):
        grads = {k: rng.standard_normal(s) for k, s in shapes.items()}
        lr = 3e-2 * (0.5 + 0.1 * step)
        for group in topt.param_groups:
            group["lr"] = lr
        for k in shapes:
            tp[k].grad = torch.tensor(grads[k].copy())
        topt.step()
        opt.step(params, grads, lr=lr)
        for k in shapes:
            np.testing.assert_allclose(params[k], tp[k].detach().numpy(), rtol=1e-12, atol=1e-13)


def test_adamw_decays_matrices_not_vectors():
    p = {"W": np.full((2, 2), 2.0), "g": np.full(3, 2.0)}
    opt = AdamW(lr=0.5, weight_decay=0.2)
    opt.step(p, {"W": np.zeros((2, 2)), "g": np.zeros(3)})  # zero grads: only the decay acts
    np.testing.assert_array_equal(p["W"], np.full((2, 2), 2.0 * (1 - 0.5 * 0.2)))
    np.testing.assert_array_equal(p["g"], np.full(3, 2.0))


def test_adamw_float32_stays_float32_and_in_place():
    w = np.ones((2, 3), dtype=np.float32)
    p = {"w": w}
    AdamW(lr=0.1).step(p, {"w": np.ones((2, 3), dtype=np.float32)})
    assert p["w"] is w and w.dtype == np.float32
    np.testing.assert_allclose(w, 1.0 * (1 - 0.1 * 0.01) - 0.1 / (1 + 1e-8), rtol=1e-6)


def test_adamw_state_roundtrip_continues_identically():
    rng = np.random.default_rng(1)
    grads = [{"w": rng.standard_normal((4, 2))} for _ in range(5)]
    p1 = {"w": np.ones((4, 2))}
    o1 = AdamW(lr=0.01, weight_decay=0.1)
    for g in grads:
        o1.step(p1, g)
    p2 = {"w": np.ones((4, 2))}
    o2 = AdamW(lr=0.01, weight_decay=0.1)
    for g in grads[:2]:
        o2.step(p2, g)
    state = o2.state_dict()
    o3 = AdamW(lr=123.0)
    o3.load_state_dict(state, like=p2)
    assert o3.lr == 0.01 and o3.t == 2
    for g in grads[2:]:
        o3.step(p2, g)
    np.testing.assert_array_equal(p1["w"], p2["w"])


def test_adamw_bad_input():
    with pytest.raises(ValueError, match="betas"):
        AdamW(betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr"):
        AdamW(lr=-1)
    with pytest.raises(ValueError, match="missing \\['b'\\]"):
        AdamW().step({"a": np.ones(2), "b": np.ones(2)}, {"a": np.ones(2)})
    with pytest.raises(ValueError, match=r"grads\['a'\] must have shape \(2,\), got \(3,\)"):
        AdamW().step({"a": np.ones(2)}, {"a": np.ones(3)})


def test_clip_grad_norm():
    rng = np.random.default_rng(2)
    grads = {"a": rng.standard_normal((3, 3)), "b": rng.standard_normal(7).astype(np.float32)}
    full = np.concatenate([grads["a"].ravel(), grads["b"].astype(np.float64).ravel()])
    ref = float(np.linalg.norm(full))
    assert global_grad_norm(grads) == pytest.approx(ref, rel=1e-7)
    before = {k: v.copy() for k, v in grads.items()}
    norm = clip_grad_norm(grads, ref * 2)          # under the limit: untouched
    assert norm == pytest.approx(ref, rel=1e-7)
    for k in grads:
        np.testing.assert_array_equal(grads[k], before[k])
    norm = clip_grad_norm(grads, 1.0)              # over: scaled to norm 1, direction kept
    assert norm == pytest.approx(ref, rel=1e-7)
    assert global_grad_norm(grads) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(grads["a"], before["a"] / ref, rtol=1e-5)
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm(grads, 0.0)


def test_warmup_cosine_lr_values():
    kw = dict(base_lr=1.0, warmup_steps=4, total_steps=14, min_lr=0.1)
    assert warmup_cosine_lr(0, **kw) == pytest.approx(0.25)
    assert warmup_cosine_lr(2, **kw) == pytest.approx(0.75)
    assert warmup_cosine_lr(3, **kw) == pytest.approx(1.0)
    assert warmup_cosine_lr(4, **kw) == pytest.approx(1.0)
    assert warmup_cosine_lr(9, **kw) == pytest.approx(0.55)            # halfway: (1 + 0.1) / 2
    assert warmup_cosine_lr(6, **kw) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.2)))
    assert warmup_cosine_lr(14, **kw) == pytest.approx(0.1)
    assert warmup_cosine_lr(100, **kw) == pytest.approx(0.1)
    assert warmup_cosine_lr(5, base_lr=2.0, warmup_steps=0, total_steps=0) == 2.0
    with pytest.raises(ValueError, match="min_lr"):
        warmup_cosine_lr(0, base_lr=1.0, warmup_steps=1, total_steps=2, min_lr=2.0)
    with pytest.raises(ValueError, match="step"):
        warmup_cosine_lr(-1, base_lr=1.0, warmup_steps=1, total_steps=2)


def _tiny_model(seed=0):
    from topkattn.model import Transformer, TransformerConfig

    return Transformer(TransformerConfig(vocab_size=11, d_model=8, n_layers=2, n_heads=2, q_lora_rank=4,
                                         kv_lora_rank=4, qk_nope_dim=4, qk_rope_dim=2, v_head_dim=4, d_ff=12,
                                         token_shift=True, seed=seed))


def test_flatten_parameters_makes_views_of_one_buffer_with_the_same_values():
    from topkattn.layers.module import Module, flatten_parameters

    model = _tiny_model()
    before = {n: a.copy() for n, a in model.params.items()}
    flat = flatten_parameters(model)
    assert flat.names == list(before) and flat.params.size == model.n_params()
    for n, a in model.params.items():
        np.testing.assert_array_equal(a, before[n])
        assert np.shares_memory(a, flat.params) and np.shares_memory(model.grads[n], flat.grads)
        a0, a1 = flat.slices[n]
        np.testing.assert_array_equal(flat.params[a0:a1], before[n].ravel())
    assert flat.holds(model.params, model.grads)
    # the layers use the views: a change through the buffer reaches the layer's own dict
    flat.params[flat.slices["norm.weight"][0]] = 5.0
    assert model.norm.params["weight"][0] == 5.0 and model.params["norm.weight"][0] == 5.0
    x = np.random.default_rng(0).integers(0, 11, (2, 5))
    model.backward(np.ones_like(model.forward(x)))
    assert flat.grads.any() and np.shares_memory(model.blocks[0].attn.grads["W_O"], flat.grads)
    mixed = Module()
    mixed.add_param("a", np.zeros(3, np.float32))
    mixed.add_param("b", np.zeros(3, np.float64))
    assert flatten_parameters(mixed) is None and flatten_parameters(Module()) is None


def test_flat_adamw_equals_the_per_array_loop_bit_for_bit():
    from topkattn.layers.module import flatten_parameters

    flat_model, loop_model = _tiny_model(), _tiny_model()
    flat = flatten_parameters(flat_model)
    kw = dict(lr=3e-2, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.1)
    opt_flat, opt_loop = AdamW(**kw, flat=flat), AdamW(**kw)
    rng = np.random.default_rng(1)
    for step in range(4):
        for n in flat_model.grads:
            g = rng.standard_normal(flat_model.grads[n].shape).astype(np.float32)
            flat_model.grads[n][...] = g
            loop_model.grads[n][...] = g
        opt_flat.step(flat_model.params, flat_model.grads, lr=1e-2 * (step + 1))
        opt_loop.step(loop_model.params, loop_model.grads, lr=1e-2 * (step + 1))
    assert opt_flat.m["embed.weight"].base is opt_flat._m_flat  # the flat path ran
    for n in loop_model.params:
        np.testing.assert_array_equal(flat_model.params[n], loop_model.params[n], err_msg=n)
        np.testing.assert_array_equal(opt_flat.m[n], opt_loop.m[n], err_msg=n)
        np.testing.assert_array_equal(opt_flat.v[n], opt_loop.v[n], err_msg=n)
    # vectors (norm gains) are not decayed: a zero gradient leaves them where Adam's moments put them
    assert any(opt_flat.decay_filter(n, a) for n, a in flat_model.params.items())
    assert not all(opt_flat.decay_filter(n, a) for n, a in flat_model.params.items())


def test_flat_adamw_state_roundtrip_keeps_the_flat_moments():
    from topkattn.layers.module import flatten_parameters

    model = _tiny_model()
    opt = AdamW(lr=1e-2, weight_decay=0.1, flat=flatten_parameters(model))
    rng = np.random.default_rng(2)
    for n in model.grads:
        model.grads[n][...] = rng.standard_normal(model.grads[n].shape)
    opt.step(model.params, model.grads)
    state = opt.state_dict()
    other_model = _tiny_model()
    other = AdamW(lr=1e-2, weight_decay=0.1, flat=flatten_parameters(other_model))
    other.load_state_dict(state, like=other_model.params)
    assert other.t == 1 and other.m["embed.weight"].base is other._m_flat
    for n in state["m"]:
        np.testing.assert_array_equal(other.m[n], state["m"][n])
        np.testing.assert_array_equal(other.v[n], state["v"][n])
    bad = dict(state, m=dict(state["m"]), v=dict(state["v"]))
    bad["m"]["norm.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="norm.weight"):
        other.load_state_dict(bad)


def test_flat_adamw_falls_back_to_the_loop_for_other_arrays():
    from topkattn.layers.module import flatten_parameters

    model = _tiny_model()
    opt = AdamW(lr=1e-2, flat=flatten_parameters(model))
    params = {n: a.copy() for n, a in model.params.items()}  # not the views
    grads = {n: np.ones_like(a) for n, a in params.items()}
    opt.step(params, grads)
    assert not np.array_equal(params["norm.weight"], model.params["norm.weight"])  # the copies moved
    np.testing.assert_array_equal(model.params["norm.weight"], np.ones(8, np.float32))  # the model did not
