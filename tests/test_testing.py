"""topkattn.testing, the helpers the other tests trust, checked against hand computations."""
import subprocess
import sys

import numpy as np
import pytest

from topkattn.testing import (
    TOLERANCES,
    assert_grads_close,
    check_layer_grads,
    directional_grad_check,
    fuzz_profile,
    make_qkv,
    mask_from_idx,
    score_gap,
    tolerance,
)


def test_tolerance_by_dtype_type_or_name():
    assert tolerance(np.float64) == tolerance("float64") == tolerance(np.dtype(np.float64)) == \
        dict(rtol=1e-10, atol=1e-12)
    assert tolerance(np.float32) == dict(rtol=2e-5, atol=2e-6)
    t = tolerance(np.float32)
    t["rtol"] = 1.0  # a copy: the table is unchanged
    assert TOLERANCES[np.dtype(np.float32)]["rtol"] == 2e-5
    with pytest.raises(KeyError):
        tolerance(np.int64)


def test_make_qkv_shapes_dtypes_and_draw_order():
    q, k, v = make_qkv(7, 2, 4, 2, 5, 9, 3, 6, np.float32)
    assert (q.shape, k.shape, v.shape) == ((2, 4, 5, 3), (2, 2, 9, 3), (2, 2, 9, 6))
    assert q.dtype == k.dtype == v.dtype == np.float32
    rng = np.random.default_rng(7)  # q, k, v in that order, drawn in float64, then cast
    want = [rng.standard_normal(s).astype(np.float32) for s in ((2, 4, 5, 3), (2, 2, 9, 3), (2, 2, 9, 6))]
    for got, w in zip((q, k, v), want):
        np.testing.assert_array_equal(got, w)
    # defaults: B=1, H=2, G=2, T=5, S=9, D=8, Dv=6 in float64
    q, k, v = make_qkv(0)
    assert (q.shape, k.shape, v.shape, q.dtype) == ((1, 2, 5, 8), (1, 2, 9, 8), (1, 2, 9, 6), np.float64)


def test_make_qkv_draws_from_a_given_generator():
    rng = np.random.default_rng(3)
    a = make_qkv(rng, 1, 1, 1, 2, 3, 2, 2)
    b = make_qkv(rng, 1, 1, 1, 2, 3, 2, 2)  # the generator moved on
    assert not np.array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[0], make_qkv(3, 1, 1, 1, 2, 3, 2, 2)[0])


def _hand_gap(q, k, topk, cand):
    """Row by row with Python sorts: the smallest (topk-th - (topk+1)-th) candidate score."""
    B, H, T, D = q.shape
    rep = H // k.shape[1]
    gaps = []
    for b in range(B):
        for h in range(H):
            for t in range(T):
                keys = np.flatnonzero(cand[t])
                s = sorted((float(q[b, h, t] @ k[b, h // rep, j]) / np.sqrt(D) for j in keys), reverse=True)
                if len(s) > topk:
                    gaps.append(s[topk - 1] - s[topk])
    return min(gaps) if gaps else np.inf


@pytest.mark.parametrize("topk", [1, 2, 3])
def test_make_qkv_margin_holds_in_every_candidate_row(topk):
    T, S = 6, 9
    cand = np.arange(S)[None, :] <= np.arange(T)[:, None] + S - T  # causal
    cand[:, 0] = False  # a sink
    q, k, v = make_qkv(1, 2, 4, 2, T, S, 4, 3, topk=topk, margin=0.05, candidates=cand)
    gap = _hand_gap(q, k, topk, cand)
    assert gap > 0.05
    assert score_gap(q, k, topk, cand) == pytest.approx(gap, rel=1e-12)
    first = make_qkv(1, 2, 4, 2, T, S, 4, 3)  # the first draw misses the margin: re-drawn
    assert _hand_gap(first[0], first[1], topk, cand) <= 0.05 and not np.array_equal(first[0], q)


def test_make_qkv_margin_ignores_non_candidates_and_short_rows():
    q = np.zeros((1, 1, 2, 2))
    q[..., 0] = 1.0
    k = np.zeros((1, 1, 4, 2))
    k[0, 0, :, 0] = [1.0, 1.0, 0.0, 5.0]  # keys 0 and 1 tie
    cand = np.array([[True, True, False, False], [False, True, True, True]])
    assert score_gap(q, k, 1, cand) == 0.0  # row 0: the tie
    assert score_gap(q, k, 1, cand[1:]) == pytest.approx((5.0 - 1.0) / np.sqrt(2))  # row 1 only
    assert score_gap(q, k, 2, cand[:1]) == np.inf  # row 0 has only 2 candidates: no gap to keep
    with pytest.raises(RuntimeError, match="score margin"):
        make_qkv(0, 1, 1, 1, 2, 4, 2, 2, topk=1, margin=1e9)
    with pytest.raises(ValueError, match="margin needs topk"):
        make_qkv(0, margin=1e-3)


def test_mask_from_idx_ignores_empty_slots():
    idx = np.array([[[3, -1, 0], [-1, -1, -1]], [[1, 1, 4], [2, -1, -1]]])  # (2, 2, 3)
    m = mask_from_idx(idx, 5)
    want = np.zeros((2, 2, 5), dtype=bool)
    want[0, 0, [0, 3]] = True
    want[1, 0, [1, 4]] = True
    want[1, 1, 2] = True
    np.testing.assert_array_equal(m, want)
    assert mask_from_idx(np.array([2, -1]), 3).tolist() == [False, False, True]


def _quadratic():
    """L(a, b) = sum(c a^2) + sum(a) * sum(b): dL/da = 2 c a + sum(b), dL/db = sum(a)."""
    rng = np.random.default_rng(0)
    a, b, c = rng.standard_normal((3, 4)), rng.standard_normal(5), rng.standard_normal((3, 4))
    arrays = dict(a=a, b=b)
    grads = dict(a=2 * c * a + b.sum(), b=np.full(5, a.sum()))
    return (lambda: float((c * a * a).sum() + a.sum() * b.sum())), arrays, grads


def test_directional_check_passes_the_right_gradient_and_restores_inputs():
    loss, arrays, grads = _quadratic()
    before = {n: a.copy() for n, a in arrays.items()}
    res = directional_grad_check(loss, arrays, grads, np.random.default_rng(1))
    assert set(res) == {"a", "b"}
    assert_grads_close(res)
    for n, a in arrays.items():
        np.testing.assert_array_equal(a, before[n])
    # a unit direction gives one partial derivative
    e = np.zeros((3, 4))
    e[1, 2] = 1.0
    num, ana = directional_grad_check(loss, {"a": arrays["a"]}, grads, None, directions={"a": e})["a"]
    assert ana == grads["a"][1, 2] and num == pytest.approx(ana, rel=1e-8)


@pytest.mark.parametrize("name,wrong", [
    ("a", lambda g: g * 1.001),  # 0.1% off
    ("a", lambda g: g.T.reshape(g.shape)),  # entries in the wrong places
    ("b", lambda g: np.where(np.arange(5) == 3, 0.0, g)),  # one entry missing
])
def test_directional_check_catches_a_wrong_gradient(name, wrong):
    loss, arrays, grads = _quadratic()
    grads[name] = wrong(grads[name])
    res = directional_grad_check(loss, arrays, grads, np.random.default_rng(2))
    with pytest.raises(AssertionError, match=f"gradient mismatch .*{name}: "):
        assert_grads_close(res)


def test_directional_check_bad_input():
    loss, arrays, grads = _quadratic()
    with pytest.raises(TypeError, match="need float64 arrays, got a float32"):
        directional_grad_check(loss, {"a": arrays["a"].astype(np.float32)}, grads, None)
    with pytest.raises(ValueError, match=r"analytic\['b'\] has shape \(4,\), expected \(5,\)"):
        directional_grad_check(loss, {"b": arrays["b"]}, {"b": np.zeros(4)}, None)


def test_assert_grads_close_bound():
    assert_grads_close({"x": (100.0, 100.0 + 0.9e-4)}, rtol=1e-6, atol=0.0)  # within rtol |numerical|
    assert_grads_close({"x": (0.0, 0.9e-8)})  # within atol
    with pytest.raises(AssertionError, match="x: 100 vs 100.00011"):
        assert_grads_close({"x": (100.0, 100.00011), "y": (1.0, 1.0)}, rtol=1e-6, atol=0.0)
    with pytest.raises(AssertionError, match="nan"):
        assert_grads_close({"x": (np.nan, 1.0)})


class _Scale:
    """y = x * w (w broadcast over the last axis), with a switchable bug in dw."""

    def __init__(self, bug=False, return_dx=True):
        self.params = {"w": np.random.default_rng(4).standard_normal(3)}
        self.grads = {"w": np.zeros(3)}
        self.bug, self.return_dx = bug, return_dx

    def named_params(self):
        return self.params.items()

    def named_grads(self):
        return self.grads.items()

    def zero_grad(self):
        self.grads["w"][...] = 0.0

    def forward(self, x):
        self._x = x.copy()
        return x * self.params["w"]

    def backward(self, dy):
        self.grads["w"] += (dy * self._x).reshape(-1, 3).sum(0) * (2.0 if self.bug else 1.0)
        return dy * self.params["w"] if self.return_dx else None


def test_check_layer_grads_checks_input_and_params():
    x = np.random.default_rng(5).standard_normal((2, 3))
    assert set(check_layer_grads(_Scale(), x, np.random.default_rng(6))) == {"w", "x"}
    assert set(check_layer_grads(_Scale(return_dx=False), x, np.random.default_rng(6))) == {"w"}
    with pytest.raises(AssertionError, match="w: "):
        check_layer_grads(_Scale(bug=True), x, np.random.default_rng(6))


def test_importing_testing_needs_no_test_extras():
    code = ("import sys, topkattn.testing\n"
            "print(sorted(m for m in ('pytest', 'torch', 'jax') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_fuzz_profile_is_selected_by_the_environment(monkeypatch):
    monkeypatch.delenv("TOPKATTN_FUZZ", raising=False)
    assert fuzz_profile(50) == dict(max_examples=50, derandomize=True)
    monkeypatch.setenv("TOPKATTN_FUZZ", "long")
    assert fuzz_profile(50) == dict(max_examples=2000)
    monkeypatch.setenv("TOPKATTN_FUZZ", "300")
    assert fuzz_profile(50) == dict(max_examples=300)
    monkeypatch.setenv("TOPKATTN_FUZZ", "forever")
    with pytest.raises(ValueError, match="TOPKATTN_FUZZ"):
        fuzz_profile(50)
