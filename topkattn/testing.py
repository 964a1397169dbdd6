"""Gradient checking by float64 central differences along random directions.

    d/de L(a + e u) at e = 0  ~  (L(a + h u) - L(a - h u)) / (2 h)   must equal  <dL/da, u>
A random direction u per array checks every entry at once (big tensors included).
"""
import numpy as np


def directional_grad_check(loss, arrays, analytic, rng, h=1e-6):
    """Compare numerical and analytic directional derivatives.

    loss: callable () -> float that reads ``arrays`` (perturbed in place, then restored).
    arrays: name -> float64 array; analytic: name -> gradient of the same shape.
    Returns name -> (numerical, analytic) directional derivatives.
    """
    out = {}
    for name, a in arrays.items():
        if a.dtype != np.float64:
            raise TypeError(f"gradient checks need float64 arrays, got {name} {a.dtype}")
        g = analytic[name]
        if g.shape != a.shape:
            raise ValueError(f"analytic[{name!r}] has shape {g.shape}, expected {a.shape}")
        u = rng.standard_normal(a.shape)
        orig = a.copy()
        a += h * u
        lp = loss()
        a[...] = orig - h * u
        lm = loss()
        a[...] = orig
        out[name] = ((lp - lm) / (2 * h), float((np.asarray(g) * u).sum()))
    return out


def assert_grads_close(results, rtol=1e-6, atol=1e-8):
    """Raise AssertionError naming every array whose derivatives disagree."""
    bad = {n: v for n, v in results.items() if not abs(v[0] - v[1]) <= atol + rtol * abs(v[0])}
    if bad:
        raise AssertionError("gradient mismatch (numerical, analytic): " + ", ".join(
            f"{n}: {v[0]:.10g} vs {v[1]:.10g}" for n, v in bad.items()))
