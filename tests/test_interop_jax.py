"""JAX bridge: values against the float64 reference, eager (DLPack) and jit (pure_callback)
paths agree, gradients match jax autograd on the same mask, check_grads in float64."""
import numpy as np
import pytest

from topkattn.testing import make_qkv

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

import topkattn.interop.jax as tj  # noqa: E402
from topkattn.ops.reference import topk_attention_reference  # noqa: E402

SHAPE = dict(B=2, H=4, G=2, T=5, S=9, D=6, Dv=5)


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def _inputs(seed, dtype=np.float64, topk=3, **shape):
    """q, k, v with a score margin at ``topk`` (finite differences cannot flip the selection)."""
    q, k, v = make_qkv(seed, **{**SHAPE, **shape}, dtype=dtype, topk=topk, margin=1e-3)
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


def _jax_masked_attention(q, k, v, mask, scale):
    """Dense softmax restricted to ``mask`` (B, H, T, S), differentiated by JAX: the oracle."""
    H, G = q.shape[1], k.shape[1]
    kh, vh = jnp.repeat(k, H // G, axis=1), jnp.repeat(v, H // G, axis=1)
    s = jnp.einsum("bhtd,bhsd->bhts", q, kh) * scale
    s = jnp.where(mask, s, -jnp.inf)
    return jnp.einsum("bhts,bhsd->bhtd", jax.nn.softmax(s, axis=-1), vh)


@pytest.mark.parametrize("causal, sinks, window", [(True, 0, 0), (False, 0, 0), (True, 1, 2)])
def test_forward_eager_and_jit_match_reference(causal, sinks, window):
    q, k, v = _inputs(0)
    ref, _, _ = topk_attention_reference(*(np.asarray(a) for a in (q, k, v)), topk=3, causal=causal,
                                         sinks=sinks, window=window)
    def f(a, b, c):
        return tj.topk_attention(a, b, c, topk=3, causal=causal, sinks=sinks, window=window)
    eager, jitted = f(q, k, v), jax.jit(f)(q, k, v)
    assert eager.dtype == jnp.float64 and eager.shape == (2, 4, 5, 5)
    np.testing.assert_allclose(np.asarray(eager), ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(jitted), ref, rtol=1e-12, atol=1e-12)


def test_float32_forward():
    q, k, v = _inputs(1, dtype=np.float32)
    out = tj.topk_attention(q, k, v, topk=3)
    assert out.dtype == jnp.float32
    ref, _, _ = topk_attention_reference(*(np.asarray(a) for a in (q, k, v)), topk=3)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_gradients_match_jax_autograd_on_the_same_mask(causal):
    q, k, v = _inputs(2)
    w = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 5, 5)))
    _, mask, _ = topk_attention_reference(*(np.asarray(a) for a in (q, k, v)), topk=3, causal=causal)
    def ours(a, b, c):
        return (tj.topk_attention(a, b, c, topk=3, causal=causal) * w).sum()
    def oracle(a, b, c):
        return (_jax_masked_attention(a, b, c, jnp.asarray(mask), 6 ** -0.5) * w).sum()
    want = jax.grad(oracle, argnums=(0, 1, 2))(q, k, v)
    for got in (jax.grad(ours, argnums=(0, 1, 2))(q, k, v), jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(q, k, v)):
        for a, b in zip(got, want):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-11, atol=1e-12)
    # keys no query selected get exactly zero gradient (causal: the late keys are seen by few queries)
    dk = np.asarray(jax.grad(ours, argnums=1)(q, k, v))
    chosen = mask.reshape(2, 2, 2, 5, 9).any(axis=(2, 3))  # (B, G, S)
    assert np.all(dk[~chosen] == 0)
    if causal:
        assert (~chosen).any()


@pytest.mark.parametrize("opts", [dict(topk=3), dict(topk=2, causal=False, sinks=1),
                                  dict(topk=3, forget_rate=0.3, seed=5)])
def test_check_grads_float64(opts):
    q, k, v = _inputs(3, B=1, H=2, G=1, T=4, S=6, D=3, Dv=2, topk=opts["topk"])
    def f(a, b, c):
        return tj.topk_attention(a, b, c, **opts)
    check_grads(f, (q, k, v), order=1, modes=("rev",), eps=1e-6, atol=1e-6, rtol=1e-6)
    check_grads(jax.jit(f), (q, k, v), order=1, modes=("rev",), eps=1e-6, atol=1e-6, rtol=1e-6)


def test_eager_uses_dlpack_and_jit_uses_pure_callback(monkeypatch):
    calls = []
    real = jax.pure_callback
    monkeypatch.setattr(tj.jax, "pure_callback", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = _inputs(4)
    def f(a, b, c):
        return (tj.topk_attention(a, b, c, topk=3) ** 2).sum()
    g_eager = jax.grad(f, argnums=(0, 1, 2))(q, k, v)
    assert calls == []
    g_jit = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)
    assert len(calls) == 2  # one forward, one backward callback
    for a, b in zip(g_eager, g_jit):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-13, atol=1e-14)


def test_vmap_matches_per_example_calls():
    q, k, v = _inputs(5)
    batched = jax.vmap(lambda a, b, c: tj.topk_attention(a, b, c, topk=3))(q[:, None], k[:, None], v[:, None])
    np.testing.assert_allclose(np.asarray(batched[:, 0]), np.asarray(tj.topk_attention(q, k, v, topk=3)),
                               rtol=1e-13, atol=1e-14)


def test_bad_options():
    q, k, v = _inputs(6)
    with pytest.raises(ValueError, match="forget_rate > 0 needs an int seed"):
        tj.topk_attention(q, k, v, topk=3, forget_rate=0.2)
    with pytest.raises(TypeError, match="seed must be an int or None"):
        tj.topk_attention(q, k, v, topk=3, seed=np.random.default_rng(0))
    with pytest.raises(ValueError, match="topk must be an integer >= 1"):
        tj.topk_attention(q, k, v, topk=0)
    with pytest.raises(TypeError, match="topk must be an integer, got float"):
        jax.jit(lambda a, b, c: tj.topk_attention(a, b, c, topk=2.5))(q, k, v)
    with pytest.raises(ValueError, match="topk must be an integer >= 1 in the JAX bridge"):
        jax.jit(lambda a, b, c: tj.topk_attention(a, b, c, topk="auto"))(q, k, v)


def test_eager_forward_hands_the_engine_zero_copy_views(monkeypatch):
    seen = []
    real = tj.topk_attention_forward

    def spy(q, k, v, **kw):
        seen.append((type(q), q.ctypes.data))
        return real(q, k, v, **kw)

    monkeypatch.setattr(tj, "topk_attention_forward", spy)
    q, k, v = _inputs(7)
    out = tj.topk_attention(q, k, v, topk=3, window=1)
    assert seen == [(np.ndarray, q.unsafe_buffer_pointer())]
    ref, _, _ = topk_attention_reference(*(np.asarray(a) for a in (q, k, v)), topk=3, window=1)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-12, atol=1e-12)


def test_jit_checks_shapes_and_dtypes_at_trace_time():
    # the engine's own errors, raised while tracing (not a host-callback failure at run time)
    q, k, v = _inputs(7)
    f = jax.jit(lambda a, b, c: tj.topk_attention(a, b, c, topk=2))
    with pytest.raises(ValueError, match="query heads H=3 must be a multiple of KV heads G=2"):
        f(jnp.ones((1, 3, 4, 4)), jnp.ones((1, 2, 5, 4)), jnp.ones((1, 2, 5, 4)))
    for dtype in (jnp.int32, jnp.bfloat16):
        with pytest.raises(TypeError, match=f"q must be float32 or float64, got {jnp.dtype(dtype).name}"):
            f(*(jnp.ones((1, 2, 4, 4), dtype),) * 3)
    with pytest.raises(ValueError, match="window must be an integer >= 0"):
        jax.jit(lambda a, b, c: tj.topk_attention(a, b, c, topk=2, window=-1))(q, k, v)
    with pytest.raises(TypeError, match="causal must be True or False"):
        tj.topk_attention(q, k, v, topk=2, causal="yes")
    np.testing.assert_array_equal(np.asarray(f(q, k, v)), np.asarray(tj.topk_attention(q, k, v, topk=2)))


def test_options_equal_in_value_but_not_in_type_are_checked_on_their_own():
    """The bridge caches one function per option set; 2 == 2.0 and 0 == False made one call
    reuse another's cached options: a valid call refused after a bad one, a bad one let through
    after a valid one."""
    q, k, v = _inputs(6)
    with pytest.raises(TypeError, match="topk must be an integer, got float"):
        tj.topk_attention(q, k, v, topk=2.0)
    want = topk_attention_reference(*(np.asarray(a) for a in (q, k, v)), topk=2)[0]
    np.testing.assert_allclose(np.asarray(tj.topk_attention(q, k, v, topk=2)), want, rtol=1e-12, atol=1e-12)
    tj.topk_attention(q, k, v, topk=3, sinks=0)
    with pytest.raises(TypeError, match="topk must be an integer, got float"):
        tj.topk_attention(q, k, v, topk=3.0, sinks=0)
    with pytest.raises(TypeError, match="sinks"):
        tj.topk_attention(q, k, v, topk=3, sinks=False)
