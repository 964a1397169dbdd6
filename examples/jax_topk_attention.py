"""Top-k attention in JAX: eager calls, jax.jit and jax.grad through the engine.

Run: python examples/jax_topk_attention.py
"""
import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402

from topkattn.interop.jax import topk_attention  # noqa: E402

B, H, T, D, K = 2, 4, 40, 16, 6
kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
q = jax.random.normal(kq, (B, H, T, D), jnp.float64)
k = jax.random.normal(kk, (B, H, T, D), jnp.float64)
v = jax.random.normal(kv, (B, H, T, D), jnp.float64)


def reference(q, k, v):
    """Causal scores, keep each row's K largest, softmax over them (plain jax.numpy)."""
    s = q @ jnp.swapaxes(k, -1, -2) / jnp.sqrt(D)
    s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, -jnp.inf)
    kth = jax.lax.top_k(s, K)[0][..., -1:]
    s = jnp.where(s >= kth, s, -jnp.inf)
    return jax.nn.softmax(s, axis=-1) @ v


def loss(fn):
    return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))


def ours(q, k, v):
    return topk_attention(q, k, v, topk=K, causal=True)
err = float(jnp.max(jnp.abs(ours(q, k, v) - reference(q, k, v))))
g_eager = jax.grad(loss(ours), argnums=(0, 1, 2))(q, k, v)  # engine via DLPack
g_jit = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(q, k, v)  # engine via pure_callback
g_ref = jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)
gerr = max(float(jnp.max(jnp.abs(a - b))) for g in (g_eager, g_jit) for a, b in zip(g, g_ref))
assert err < 1e-12 and gerr < 1e-12, (err, gerr)
print(f"OK jax: forward max abs diff {err:.1e}, eager and jit gradients vs reference {gerr:.1e}")
