"""LayerNorm and GELU (the BERT encoder's layers): values against formulas, float64 grad checks."""
import math

import numpy as np
import pytest

from topkattn.layers.gelu import gelu, gelu_backward, gelu_forward
from topkattn.layers.layernorm import LayerNorm, layer_norm, layer_norm_backward, layer_norm_forward
from topkattn.testing import assert_grads_close, directional_grad_check

# ---------------------------------------------------------------- GELU

def test_gelu_matches_erf_formula_elementwise():
    x = np.linspace(-8, 8, 101)
    want = np.array([0.5 * t * (1 + math.erf(t / math.sqrt(2))) for t in x])
    np.testing.assert_allclose(gelu(x), want, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(gelu(x.astype(np.float32)), want, rtol=1e-6, atol=1e-6)
    assert gelu(x.astype(np.float32)).dtype == np.float32


def test_gelu_tanh_matches_formula():
    x = np.linspace(-6, 6, 61)
    want = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    np.testing.assert_allclose(gelu(x, approximate="tanh"), want, rtol=1e-14, atol=1e-15)
    # the two forms agree to ~1e-3 (the known size of the tanh approximation's error)
    assert np.max(np.abs(gelu(x, "tanh") - gelu(x))) < 1e-3


def test_gelu_extreme_inputs_finite():
    x = np.array([-1e4, -50.0, 0.0, 50.0, 1e4], dtype=np.float32)
    y = gelu(x)
    np.testing.assert_array_equal(y, np.array([0.0, 0.0, 0.0, 50.0, 1e4], dtype=np.float32))
    dx = gelu_backward(np.ones_like(x), gelu_forward(x)[1])
    np.testing.assert_allclose(dx, [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-7)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_gradient_central_differences(approximate):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 7)) * 2
    w = rng.standard_normal((3, 7))
    _, saved = gelu_forward(x, approximate)
    dx = gelu_backward(w, saved)
    for _ in range(3):
        res = directional_grad_check(lambda: float((gelu(x, approximate) * w).sum()), dict(x=x), dict(x=dx), rng)
        assert_grads_close(res, rtol=5e-9, atol=5e-9)  # 5e-9 (1 + |num|) <= 1e-8 max(1, |num|)


def test_gelu_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(1).standard_normal((4, 9))
    for approx in ("none", "tanh"):
        want = torch.nn.functional.gelu(torch.from_numpy(x), approximate=approx).numpy()
        np.testing.assert_allclose(gelu(x, approx), want, rtol=1e-12, atol=1e-14)


def test_gelu_bad_input():
    with pytest.raises(TypeError, match="x must be float32 or float64"):
        gelu(np.arange(3))
    with pytest.raises(ValueError, match="approximate"):
        gelu(np.zeros(3), approximate="sigmoid")
    with pytest.raises(ValueError, match="dy must have the shape"):
        gelu_backward(np.zeros(2), gelu_forward(np.zeros(3))[1])


# ---------------------------------------------------------------- LayerNorm

def _ln_reference(x, g, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


def test_layer_norm_matches_formula():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 16)) * 3 + 5
    g, b = rng.standard_normal(16), rng.standard_normal(16)
    np.testing.assert_allclose(layer_norm(x, g, b, 1e-12), _ln_reference(x, g, b, 1e-12), rtol=1e-12, atol=1e-12)
    y32 = layer_norm(x.astype(np.float32), g.astype(np.float32), b.astype(np.float32), 1e-12)
    assert y32.dtype == np.float32
    np.testing.assert_allclose(y32, _ln_reference(x, g, b, 1e-12), rtol=1e-4, atol=1e-5)


def test_layer_norm_large_values_no_nan():
    x = np.array([[1e4, -1e4, 3e4, 0.0]], dtype=np.float32)
    y = layer_norm(x, np.ones(4, np.float32), np.zeros(4, np.float32))
    np.testing.assert_allclose(y, _ln_reference(x.astype(np.float64), 1, 0, 1e-5), rtol=1e-5)
    # a constant row normalises to exactly beta
    y = layer_norm(np.full((1, 4), 7.0), np.ones(4), np.arange(4.0))
    np.testing.assert_array_equal(y, [[0.0, 1.0, 2.0, 3.0]])


def test_layer_norm_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    x, g, b = rng.standard_normal((5, 12)), rng.standard_normal(12), rng.standard_normal(12)
    want = torch.nn.functional.layer_norm(torch.from_numpy(x), (12,), torch.from_numpy(g),
                                          torch.from_numpy(b), eps=1e-12).numpy()
    np.testing.assert_allclose(layer_norm(x, g, b, 1e-12), want, rtol=1e-12, atol=1e-12)


def test_layer_norm_gradient_central_differences():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 8)) * 2 + 1
    g, b = rng.standard_normal(8), rng.standard_normal(8)
    w = rng.standard_normal(x.shape)
    _, saved = layer_norm_forward(x, g, b, 1e-5)
    dx, dg, db = layer_norm_backward(w, saved)

    def loss():
        return float((layer_norm(x, g, b, 1e-5) * w).sum())

    for _ in range(3):
        res = directional_grad_check(loss, dict(x=x, gamma=g, beta=b), dict(x=dx, gamma=dg, beta=db), rng)
        assert_grads_close(res, rtol=5e-8, atol=5e-8)  # 5e-8 (1 + |num|) <= 1e-7 max(1, |num|)


def test_layer_norm_layer_accumulates_grads():
    rng = np.random.default_rng(5)
    ln = LayerNorm(6, eps=1e-5, dtype=np.float64)
    ln.params["weight"][:] = rng.standard_normal(6)
    x, dy = rng.standard_normal((4, 6)), rng.standard_normal((4, 6))
    y = ln.forward(x)
    np.testing.assert_allclose(y, _ln_reference(x, ln.params["weight"], 0.0, 1e-5), rtol=1e-12, atol=1e-12)
    dx = ln.backward(dy)
    ln.backward(dy)
    _, dg, db = layer_norm_backward(dy, layer_norm_forward(x, ln.params["weight"], ln.params["bias"], 1e-5)[1])
    np.testing.assert_allclose(ln.grads["weight"], 2 * dg, rtol=1e-12)
    np.testing.assert_allclose(ln.grads["bias"], 2 * db, rtol=1e-12)
    assert dx.shape == x.shape


def test_layer_norm_bad_input():
    x = np.zeros((2, 4))
    with pytest.raises(ValueError, match=r"gamma must have shape \(d,\) = \(4,\), got \(3,\)"):
        layer_norm(x, np.ones(3), np.zeros(4))
    with pytest.raises(TypeError, match="beta must be float32 or float64"):
        layer_norm(x, np.ones(4), np.zeros(4, dtype=np.int64))
    with pytest.raises(ValueError, match="eps"):
        layer_norm(x, np.ones(4), np.zeros(4), eps=-1.0)
    with pytest.raises(ValueError, match="dim must be an integer"):
        LayerNorm(0)
    with pytest.raises(RuntimeError, match="before forward"):
        LayerNorm(3).backward(np.zeros((1, 3)))
