"""Helpers shared by the tests: tolerances per dtype, one q/k/v maker, the index -> mask
conversion and one gradient check (like ``cupy.testing``).  NumPy only: importing this
module needs neither pytest nor torch/jax.

Conventions

* Values are compared with ``np.testing.assert_allclose(got, want, **tolerance(dtype))``:
  ``TOLERANCES`` holds rtol/atol for results computed in that dtype and compared with a
  float64 reference.
* Inputs: ``make_qkv(rng, B, H, G, T, S, D, Dv, dtype)`` draws q (B, H, T, D), k (B, G, S, D)
  and v (B, G, S, Dv) from a standard normal, in that order, in float64 and casts them to
  ``dtype``; ``rng`` is a ``numpy.random.Generator`` (drawn from and left advanced) or an
  int seed.  ``margin=`` re-draws until the selection is stable, see :func:`make_qkv`.
* Selections: index arrays (..., K) hold key indices, -1 for an empty slot;
  ``mask_from_idx`` turns them into the (..., S) bool mask the references return.
* Gradients are checked in float64 by central differences along random directions:

      d/de L(a + e u) at e = 0  ~  (L(a + h u) - L(a - h u)) / (2 h)   must equal  <dL/da, u>

  A random direction u per array checks every entry at once (big tensors included).
  ``directional_grad_check`` returns name -> (numerical, analytic), ``assert_grads_close``
  compares them, ``check_layer_grads`` does both for a layer's input and parameters.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from topkattn.checks import make_rng

TOLERANCES = {
    np.dtype(np.float64): dict(rtol=1e-10, atol=1e-12),
    np.dtype(np.float32): dict(rtol=2e-5, atol=2e-6),
}


def tolerance(dtype: DTypeLike) -> dict[str, float]:
    """``dict(rtol=..., atol=...)`` for results computed in ``dtype`` (a dtype, type or name)."""
    return dict(TOLERANCES[np.dtype(dtype)])


def make_qkv(rng: int | np.random.Generator, B: int = 1, H: int = 2, G: int = 2, T: int = 5, S: int = 9, D: int = 8,
             Dv: int = 6, dtype: DTypeLike = np.float64, *, topk: int | None = None, margin: float | None = None,
             candidates: ArrayLike | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Standard-normal q (B, H, T, D), k (B, G, S, D), v (B, G, S, Dv) cast to ``dtype``.

    With ``margin``: re-draws (from the same generator) until, in every row, the ``topk``-th
    and (topk+1)-th largest candidate scores q.k / sqrt(D) differ by more than ``margin``,
    so that a finite-difference step cannot flip the top-k selection.  ``candidates``:
    (T, S) bool, the keys a row selects among (sinks, window and invisible keys excluded;
    default every key); rows with at most ``topk`` candidates select them all.
    """
    if margin is not None and topk is None:
        raise ValueError("margin needs topk")
    rng = make_rng(rng, "rng")
    cand = np.ones((T, S), dtype=bool) if candidates is None else np.asarray(candidates, dtype=bool)
    for _ in range(200):
        q = rng.standard_normal((B, H, T, D))
        k = rng.standard_normal((B, G, S, D))
        v = rng.standard_normal((B, G, S, Dv))
        if margin is None or score_gap(q, k, topk, cand) > margin:
            return q.astype(dtype), k.astype(dtype), v.astype(dtype)
    raise RuntimeError(f"no draw in 200 keeps a score margin of {margin} at topk={topk}")


def score_gap(q: np.ndarray, k: np.ndarray, topk: int, candidates: np.ndarray) -> float:
    """Smallest gap between the ``topk``-th and (topk+1)-th candidate score q.k / sqrt(D)
    over all rows with more than ``topk`` candidates (inf if there is none)."""
    H, G, D = q.shape[1], k.shape[1], q.shape[-1]
    rows = np.broadcast_to(candidates.sum(-1) > topk, q.shape[:-1])
    if not rows.any():
        return np.inf
    s = np.einsum("bhtd,bhsd->bhts", q, np.repeat(k, H // G, axis=1)) / np.sqrt(D)
    srt = -np.sort(np.where(candidates, -s, np.inf), axis=-1)  # descending, non-candidates last
    top = srt[rows]  # (rows, S): every one has a finite (topk+1)-th score
    return float(np.min(top[:, topk - 1] - top[:, topk]))


def mask_from_idx(idx: ArrayLike, S: int) -> np.ndarray:
    """(..., S) bool mask with True at every key index in ``idx`` (..., K); -1 slots are ignored."""
    idx = np.asarray(idx)
    m = np.zeros(idx.shape[:-1] + (S,), dtype=bool)
    *lead, slot = np.nonzero(idx >= 0)
    m[(*lead, idx[(*lead, slot)])] = True
    return m


def directional_grad_check(loss: Callable[[], float], arrays: Mapping[str, np.ndarray],
                           analytic: Mapping[str, ArrayLike], rng: np.random.Generator, h: float = 1e-6,
                           directions: Mapping[str, np.ndarray] | None = None) -> dict[str, tuple[float, float]]:
    """Compare numerical and analytic directional derivatives.

    loss: callable () -> float that reads ``arrays`` (perturbed in place, then restored).
    arrays: name -> float64 array; analytic: name -> gradient of the same shape.
    directions: name -> direction u (default: a standard normal draw from ``rng``).
    Returns name -> (numerical, analytic) directional derivatives.
    """
    out = {}
    for name, a in arrays.items():
        if a.dtype != np.float64:
            raise TypeError(f"gradient checks need float64 arrays, got {name} {a.dtype}")
        g = analytic[name]
        if g.shape != a.shape:
            raise ValueError(f"analytic[{name!r}] has shape {g.shape}, expected {a.shape}")
        u = rng.standard_normal(a.shape) if directions is None else directions[name]
        orig = a.copy()
        a += h * u
        lp = loss()
        a[...] = orig - h * u
        lm = loss()
        a[...] = orig
        out[name] = ((lp - lm) / (2 * h), float((np.asarray(g) * u).sum()))
    return out


def assert_grads_close(results: Mapping[str, tuple[float, float]], rtol: float = 1e-6, atol: float = 1e-8) -> None:
    """Raise AssertionError naming every array whose derivatives disagree:
    ``|numerical - analytic| <= atol + rtol * |numerical|`` must hold."""
    bad = {n: v for n, v in results.items() if not abs(v[0] - v[1]) <= atol + rtol * abs(v[0])}
    if bad:
        raise AssertionError("gradient mismatch (numerical, analytic): " + ", ".join(
            f"{n}: {v[0]:.10g} vs {v[1]:.10g}" for n, v in bad.items()))


def check_layer_grads(layer: Any, x: np.ndarray, rng: np.random.Generator,
                      forward: Callable[[np.ndarray], np.ndarray] | None = None,
                      backward: Callable[[np.ndarray], np.ndarray | None] | None = None,
                      **tol: float) -> dict[str, tuple[float, float]]:
    """Gradient check of sum(forward(x) * R) with respect to ``x`` and every parameter.

    layer: has ``named_params``, ``named_grads``, ``zero_grad``; forward/backward default to
    the layer's own (``backward`` returning None: ``x`` is not checked, e.g. token ids).
    R is drawn from ``rng``; ``tol`` goes to :func:`assert_grads_close`.  Returns the results.
    """
    forward = forward or layer.forward
    backward = backward or layer.backward
    R = rng.standard_normal(forward(x).shape)
    layer.zero_grad()
    dx = backward(R)
    arrays = dict(layer.named_params())
    analytic = dict(layer.named_grads())
    if dx is not None:
        arrays["x"], analytic["x"] = x, dx
    res = directional_grad_check(lambda: float((forward(x) * R).sum()), arrays, analytic, rng)
    assert_grads_close(res, **tol)
    return res


def fuzz_profile(default_examples: int) -> dict[str, Any]:
    """Keyword arguments for ``hypothesis.settings`` from ``TOPKATTN_FUZZ``: unset (or "short")
    runs ``default_examples`` derandomised examples (CI), "long" 2000 random ones, a number
    that many.  ValueError for anything else."""
    value = os.environ.get("TOPKATTN_FUZZ", "").strip().lower()
    if value in ("", "short", "ci", "default"):
        return dict(max_examples=default_examples, derandomize=True)
    if value == "long":
        return dict(max_examples=2000)
    if value.isdigit() and int(value) > 0:
        return dict(max_examples=int(value))
    raise ValueError(f"TOPKATTN_FUZZ must be 'long', 'short' or a number of examples, got {value!r}")
