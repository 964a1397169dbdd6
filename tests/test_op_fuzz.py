"""Property-based (hypothesis) fuzzing of the public attention ops over their argument space.

Ops: ``topkattn.topk_attention`` / ``topk_attention_forward`` / ``topk_attention_backward``
(fixed ``topk`` and ``topk="auto"``), ``tail_topk_attention_forward``/``_backward`` and
``topkattn.ops.dense_attention.dense_attention_forward``/``_backward``.

Each example draws small shapes (zero-size B, H, T, S, D, Dv included; G divides H, or
deliberately not), a dtype (float32/float64, or a wrong one), inputs from a seeded normal
draw, optionally with special values (NaN, +-inf in q, k or v; logits of order 1e4), and
argument values (topk ints, 0, negative, bool, float, "auto"; sinks; window; causal;
scale; temperature; forget_rate; seed; chunk_size; impl in numpy/numba/auto/cuda -- the
CUDA simulator when it is on, and "cuda" with no GPU, where numba.cuda is made to report
none).  At most one argument is made invalid per example.  The property:

* an invalid argument raises the documented exception (TypeError for a wrong type,
  ValueError for a wrong value; RuntimeError for impl="cuda" without a GPU) whose message
  names the offending argument;
* otherwise the output equals the float64 reference (``topkattn.ops.reference``) within
  ``topkattn.testing.tolerance(dtype)`` (widened in proportion to the logits' size, the
  conditioning of softmax), on the op's own selection (a selection may differ from the
  reference's only by swapping keys whose scores tie to rounding); the gradients equal
  ``masked_attention_grad_reference`` (top-k, dense) or follow the rule (tail);
* non-finite inputs follow the documented rule (``topkattn.ops.reference``): compared with
  ``equal_nan`` against the reference, NaN stays in the rows that attend it, its rows get a
  NaN dq and dk, dv stay finite whenever dout is finite on the other rows.

Run length: ``TOPKATTN_FUZZ`` selects the profile (the same variable as tests/test_ann_fuzz.py):
unset (or ``short``/``ci``) runs 50 examples per test, derandomised, so CI is fast and
stable; ``TOPKATTN_FUZZ=long`` runs 2000 random examples per test; an integer runs that many.

    TOPKATTN_FUZZ=long pytest tests/test_op_fuzz.py
"""
import re
from contextlib import nullcontext
from unittest import mock

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import topkattn as ta  # noqa: E402
from topkattn.ops.dense_attention import dense_attention_backward, dense_attention_forward  # noqa: E402
from topkattn.ops.reference import (  # noqa: E402
    causal_mask,
    dense_attention_reference,
    masked_attention_grad_reference,
    masked_attention_reference,
    tail_topk_attention_reference,
    topk_attention_reference,
    visible_and_forced,
)
from topkattn.testing import fuzz_profile, mask_from_idx, tolerance  # noqa: E402

FUZZ = settings(deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], **fuzz_profile(50))

try:
    from numba.core import config as _numba_config

    SIM = bool(_numba_config.ENABLE_CUDASIM)
except ImportError:  # pragma: no cover - numba is a dependency
    SIM = False

NO_GPU = "numba.cuda finds no usable CUDA GPU"


# ----------------------------------------------------------------------------- strategies
# (value, exception, the argument the message must name) for each argument's invalid values
INVALID = {
    "topk": [(0, ValueError), (-1, ValueError), (True, TypeError), (2.0, TypeError),
             ("two", ValueError), (None, TypeError)],
    "scale": [(True, TypeError), ("1", TypeError), (float("nan"), ValueError), (float("inf"), ValueError)],
    "temperature": [(0.0, ValueError), (-1.0, ValueError), (True, TypeError), (float("nan"), ValueError)],
    "forget_rate": [(1.0, ValueError), (-0.1, ValueError), (True, TypeError)],
    "seed": [(-1, ValueError), ("x", TypeError), (1.5, TypeError), ([1, -2], ValueError)],
    "sinks": [(-1, ValueError), (True, TypeError), (1.0, TypeError)],
    "window": [(-2, ValueError), (False, TypeError), (2.0, TypeError)],
    "chunk_size": [(0, ValueError), (-1, ValueError), (2.5, TypeError), (True, TypeError)],
    "impl": [("fast", ValueError), (3, TypeError)],
    "tail_bound": [(None, ValueError), (1.0, ValueError), (-0.1, ValueError), (True, TypeError)],
    "max_topk": [(0, ValueError), (2.5, TypeError)],
}
ARGS = {  # the arguments each op takes (besides q, k, v)
    "topk": ["topk", "causal", "scale", "temperature", "forget_rate", "seed", "sinks", "window",
             "chunk_size", "impl"],
    "tail": ["topk", "causal", "scale", "sinks", "window", "chunk_size"],
    "dense": ["causal", "scale", "chunk_size"],
}
IMPLS = ["numpy", "numba", "auto", "cuda-nogpu"] + (["cuda-sim"] if SIM else [])


def dim(hi):
    """A dimension in 0..hi, 0 about one time in 3 * hi + 1 (most examples have no empty axis)."""
    return st.sampled_from(list(range(1, hi + 1)) * 3 + [0])  # 0 last: not the "simplest" value


@st.composite
def cases(draw, op):
    """One example: shapes, dtype, inputs, arguments and the expected error (or None)."""
    c = dict(op=op, error=None)
    B = draw(dim(2))
    G = draw(st.integers(1, 2))
    H = G * draw(dim(2))
    T, S = draw(dim(5)), draw(dim(6))
    D, Dv = draw(dim(4)), draw(dim(3))
    args = {}
    if op != "dense":
        args["topk"] = draw(st.sampled_from([1, 2, 3, 8, np.int64(2)]) if op == "tail" else
                            st.sampled_from([1, 2, 3, 8, np.int64(2), "auto", "auto"]))
    args["causal"] = draw(st.booleans())
    args["scale"] = draw(st.sampled_from([None, None, 0.3, 1.0, np.float32(0.7)]))
    if op == "topk":
        args["temperature"] = draw(st.sampled_from([1.0, 0.5, 2]))
        auto = args["topk"] == "auto"
        args["forget_rate"] = 0.0 if auto else draw(st.sampled_from([0.0, 0.0, 0.3, 0.6]))
        args["seed"] = draw(st.sampled_from([None, 0, 7, 2**40, [1, 2], "generator"]))
        args["impl"] = draw(st.sampled_from(IMPLS))
        if auto:
            args["tail_bound"] = draw(st.sampled_from([0.0, 0.01, 0.2]))
            args["max_topk"] = draw(st.sampled_from([None, 1, 3]))
    if op != "dense":
        args["sinks"] = draw(st.integers(0, 3))
        args["window"] = draw(st.integers(0, 3))
    args["chunk_size"] = draw(st.sampled_from([None, 1, 2, 4]))

    # at most one invalid choice per example (about half the examples stay valid)
    names = [n for n in ARGS[op] if n in INVALID] + (["tail_bound", "max_topk"] if op == "topk" else [])
    bad = draw(st.sampled_from([None] * len(names) + names + ["dtype", "heads", "dout"]))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    dtypes = [dtype] * 3
    if bad == "dtype":
        which = draw(st.integers(0, 2))
        wrong = draw(st.sampled_from([np.int64, np.float16, np.complex64, "other-float"]))
        dtypes[which] = (np.float64 if dtype == np.float32 else np.float32) if wrong == "other-float" else wrong
        c["error"] = (TypeError, r"\b[qkv]\b")
    elif bad == "heads":
        G, H = 2, draw(st.sampled_from([1, 3]))
        c["error"] = (ValueError, "multiple of KV heads")
    elif bad == "dout":
        c["dout_dtype"] = draw(st.sampled_from([np.complex128, np.int64, object, bool]))
    elif bad == "tail_bound" and args["topk"] != "auto":
        args["tail_bound"] = 0.1  # only with topk="auto"
        c["error"] = (ValueError, "tail_bound")
    elif bad == "max_topk" and args["topk"] != "auto":
        args["max_topk"] = 3
        c["error"] = (ValueError, "max_topk")
    elif bad == "forget_rate" and args.get("topk") == "auto":
        args["forget_rate"] = 0.2  # must be 0 with topk="auto"
        c["error"] = (ValueError, "forget_rate")
    elif bad == "topk" and op == "tail":
        args["topk"], exc = draw(st.sampled_from([(0, ValueError), (True, TypeError), ("auto", ValueError)]))
        c["error"] = (exc, "topk")  # "auto" needs tail_bound (dynamic k: tests/test_tail_dynamic_k.py)
    elif bad is not None:
        args[bad], exc = draw(st.sampled_from(INVALID[bad]))
        c["error"] = (exc, bad)

    mode = draw(st.sampled_from(["normal", "normal", "large", "special", "special"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q = rng.standard_normal((B, H, T, D))
    k = rng.standard_normal((B, G, S, D))
    v = rng.standard_normal((B, G, S, Dv))
    if mode == "large":  # logits of order 1e4
        q *= 100.0
        k *= 100.0
    elif mode == "special":
        for _ in range(draw(st.integers(1, 3))):
            a = draw(st.sampled_from([q, k, v]))
            if a.size:
                a.reshape(-1)[draw(st.integers(0, a.size - 1))] = draw(
                    st.sampled_from([np.nan, np.inf, -np.inf]))
    cast = [np.asarray(a).astype(t) if not isinstance(t, str) else a for a, t in zip((q, k, v), dtypes)]
    c.update(q=cast[0], k=cast[1], v=cast[2], dtype=np.dtype(dtype), args=args, mode=mode,
             nan_dout=draw(st.booleans()), dout_seed=draw(st.integers(0, 2**16)))
    return c


# ----------------------------------------------------------------------------- helpers
def _call_args(c):
    """The arguments as passed to the op (a fresh Generator for seed="generator")."""
    a = dict(c["args"])
    if a.get("seed") == "generator":
        a["seed"] = np.random.default_rng(123)
    if a.get("impl") in ("cuda-nogpu", "cuda-sim"):
        a["impl"] = "cuda"
    return a


def _no_gpu(c):
    """numba.cuda reporting no GPU, for impl='cuda-nogpu' (the simulator is on in this session)."""
    if c["args"].get("impl") != "cuda-nogpu":
        return nullcontext()

    def no_cuda():
        raise RuntimeError(NO_GPU + " (simulated for the fuzz test)")

    return mock.patch("topkattn.cuda.launch.get_cuda", no_cuda)


def _forward(c):
    a = _call_args(c)
    q, k, v = c["q"], c["k"], c["v"]
    if c["op"] == "topk":
        return ta.topk_attention_forward(q, k, v, **a)
    if c["op"] == "tail":
        return ta.tail_topk_attention_forward(q, k, v, **a)
    return dense_attention_forward(q, k, v, **a)


def _backward(c, dout, saved):
    bwd = {"topk": ta.topk_attention_backward, "tail": ta.tail_topk_attention_backward,
           "dense": dense_attention_backward}[c["op"]]
    return bwd(dout, saved)


def _eff_scale(c):
    D = c["q"].shape[-1]
    scale = c["args"].get("scale")
    scale = 1.0 / np.sqrt(max(D, 1)) if scale is None else float(scale)
    return scale / float(c["args"].get("temperature", 1.0))


def _scores64(c, scale):
    """float64 scores (B, H, T, S) of every query against every key of its KV head."""
    q, k = (np.asarray(a, dtype=np.float64) for a in (c["q"], c["k"]))
    H, G = q.shape[1], k.shape[1]
    kh = np.repeat(k, H // G, axis=1) if H else k[:, :0]
    with np.errstate(invalid="ignore", over="ignore"):
        return np.einsum("bhtd,bhsd->bhts", q, kh) * scale


def _widened(c, scores):
    """tolerance(dtype), widened in proportion to the largest finite logit (softmax conditioning)."""
    tol = tolerance(c["dtype"])
    finite = np.abs(scores[np.isfinite(scores)])
    smax = float(finite.max()) if finite.size else 0.0
    f = 1.0 + 16 * smax * np.finfo(c["dtype"]).eps / tol["rtol"]
    return dict(rtol=tol["rtol"] * f, atol=tol["atol"] * f)


def _assert_close(got, want, tol, what):
    got = np.asarray(got, dtype=np.float64)
    scale = np.abs(want[np.isfinite(want)]).max(initial=1.0)
    np.testing.assert_allclose(got, want, rtol=tol["rtol"], atol=tol["atol"] * max(1.0, scale),
                               equal_nan=True, err_msg=what)


def _assert_same_selection_up_to_ties(fast, ref, scores, tol):
    """The op's selection may differ from the reference's only by keys whose scores tie
    (to rounding): per differing row the swapped keys' sorted scores must agree."""
    rows = np.argwhere((fast != ref).any(-1))
    s = np.where(np.isnan(scores), np.inf, scores)
    for r in map(tuple, rows):
        a = np.sort(s[r][fast[r] & ~ref[r]])
        b = np.sort(s[r][ref[r] & ~fast[r]])
        assert a.shape == b.shape, f"row {r}: {a} vs {b}"
        atol = tol["atol"] * (1 + np.abs(b[np.isfinite(b)]).max(initial=0))
        np.testing.assert_allclose(a, b, rtol=tol["rtol"], atol=atol,
                                   err_msg=f"selection of row {r} differs beyond a tie")


def _visible(c):
    """(B, H, T, S) bool: the keys each query may see."""
    return causal_mask(c["q"].shape, c["k"].shape, bool(c["args"].get("causal", True)))


def _check_nan_rule(c, out, lse, grads, dout, attended):
    """NaN stays in its rows: a row whose query and attended keys and values are finite has
    a finite output; every row whose output is not finite (or whose lse is NaN: Dv may be
    0) gets a NaN dq; dk, dv are finite (dout is finite on the finite rows)."""
    q, k, v = c["q"], c["k"], c["v"]
    H, G = q.shape[1], k.shape[1]
    k_ok = np.isfinite(k).all(-1)  # (B, G, S)
    v_ok = np.isfinite(v).all(-1)
    for b, h, t in np.ndindex(*out.shape[:3]):
        js = attended[b, h, t]
        g = h // (H // G)
        if np.isfinite(q[b, h, t]).all() and k_ok[b, g, js].all() and v_ok[b, g, js].all():
            assert np.isfinite(out[b, h, t]).all() and not np.isnan(lse[b, h, t]), \
                f"row {(b, h, t)} sees only finite inputs but is not finite"
    dq, dk, dv = grads
    bad = ~np.isfinite(out).all(-1) | np.isnan(lse)  # (B, H, T)
    if dq.size:
        assert np.isnan(dq[bad]).all(), "a non-finite row must get a NaN dq"
        assert np.isfinite(dq[~bad]).all() or not np.isfinite(dout[~bad]).all(), "a finite row got a NaN dq"
    assert np.isfinite(dk).all() and np.isfinite(dv).all(), "a non-finite row poisoned dk or dv"


def _make_dout(c, out, live):
    rng = np.random.default_rng(c["dout_seed"])
    dout = rng.standard_normal(out.shape).astype(out.dtype)
    if c["nan_dout"]:  # upstream of a NaN row the incoming gradient is NaN too
        dout = np.where(live[..., None], dout, np.nan).astype(out.dtype)
    return dout


def _run(c):
    """The property for one example (see the module docstring)."""
    event(f"error: {c['error'][1]}" if c["error"] else "arguments valid")
    event(f"inputs: {c['mode']}" + (", empty" if not (c["q"].size and c["k"].size and c["v"].size) else ""))
    if "impl" in c["args"]:
        event(f"impl: {c['args']['impl']}")
    expected_runtime = c["op"] == "topk" and c["args"].get("impl") == "cuda-nogpu"
    with _no_gpu(c):
        if c["error"] is not None:
            exc, name = c["error"]
            with pytest.raises(exc, match=name):
                _forward(c)
            return
        if expected_runtime:
            with pytest.raises(RuntimeError, match=re.escape(NO_GPU)):
                _forward(c)
            return
        D, Dv = c["q"].shape[-1], c["v"].shape[-1]
        kernel = (c["op"] == "topk" and c["args"].get("impl") == "cuda-sim"
                  and c["args"]["topk"] != "auto")
        if kernel and (D == 0 or Dv == 0):
            with pytest.raises(ValueError, match="head dims"):
                _forward(c)
            return
        out, saved = _forward(c)
        assert out.shape == c["q"].shape[:3] + (Dv,) and out.dtype == c["dtype"]
        if "dout_dtype" in c:
            with pytest.raises(TypeError, match="dout"):
                _backward(c, np.ones(out.shape, dtype=c["dout_dtype"]), saved)
            return
        dout = _make_dout(c, out, np.isfinite(out).all(-1) & ~np.isnan(saved.lse))
        grads = _backward(c, dout, saved)
    for g, a in zip(grads, (c["q"], c["k"], c["v"])):
        assert g.shape == a.shape and g.dtype == c["dtype"]
    scale = _eff_scale(c)
    scores = _scores64(c, scale)
    tol = _widened(c, scores)
    vis = _visible(c)
    live = (np.isfinite(out).all(-1) & ~np.isnan(saved.lse))[..., None]
    dout64 = np.where(live, dout.astype(np.float64), 0.0)
    if c["op"] == "dense":
        want, _ = dense_attention_reference(c["q"], c["k"], c["v"], causal=c["args"]["causal"],
                                            scale=c["args"]["scale"])
        _assert_close(out, want, tol, "dense out")
        want_g = masked_attention_grad_reference(c["q"], c["k"], c["v"], vis, scale, dout64)
        for name, g, w in zip("qkv", grads, want_g):
            _assert_close(g, w, tol, f"dense d{name}")
    else:
        fast = mask_from_idx(saved.idx, c["k"].shape[2])
        assert not (fast & ~vis).any(), "a query attends a key it may not see"
        sel = {n: c["args"][n] for n in ("causal", "sinks", "window")}
        if c["op"] == "tail":
            _, ref_mask, _ = topk_attention_reference(c["q"], c["k"], c["v"], topk=int(c["args"]["topk"]),
                                                      scale=scale, **sel)
            _assert_same_selection_up_to_ties(fast, ref_mask, scores, tol)
            want = tail_topk_attention_reference(c["q"], c["k"], c["v"], topk=int(c["args"]["topk"]),
                                                 scale=scale, mask=fast, **sel)
            _assert_close(out, want, tol, "tail out")
        else:
            _check_topk_selection(c, saved, fast, scores, vis, tol)
            want = masked_attention_reference(c["q"], c["k"], c["v"], fast, scale)
            _assert_close(out, want, tol, "top-k out")
            if not (c["args"]["forget_rate"] > 0 and c["args"]["seed"] is None):  # else: fresh draws
                again = ta.topk_attention(c["q"], c["k"], c["v"], **_call_args(c))
                np.testing.assert_array_equal(again, out)
            want_g = masked_attention_grad_reference(c["q"], c["k"], c["v"], fast, scale, dout64)
            for name, g, w in zip("qkv", grads, want_g):
                _assert_close(g, w, tol, f"top-k d{name}")
    attended = vis if c["op"] != "topk" else mask_from_idx(saved.idx, c["k"].shape[2])
    _check_nan_rule(c, out, saved.lse, grads, dout, attended)


def _check_topk_selection(c, saved, fast, scores, vis, tol):
    a = c["args"]
    S = c["k"].shape[2]
    if a["topk"] != "auto":
        if a["forget_rate"] > 0 and a["seed"] is None:  # fresh entropy: not reproducible, but
            n_forced = saved.idx.shape[-1] - min(int(a["topk"]), S)  # slots keep their layout
            assert (saved.idx[..., n_forced:] >= 0).sum(-1).max(initial=0) <= min(int(a["topk"]), S)
            return
        ref = topk_attention_reference(c["q"], c["k"], c["v"], topk=int(a["topk"]), scale=_eff_scale(c),
                                       causal=a["causal"], sinks=a["sinks"], window=a["window"],
                                       forget_rate=a["forget_rate"], seed=_call_args(c)["seed"])[1]
        _assert_same_selection_up_to_ties(fast, ref, scores, tol)
        return
    # dynamic k: forced keys always in, k selected keys besides them, and the certificate is
    # sound on every row whose scores are finite: the true outside mass is within the bound
    info = saved.info
    max_topk = S if a["max_topk"] is None else a["max_topk"]
    assert (info["k"] <= max_topk).all()
    B, H, T = fast.shape[:3]
    for b, h, t in np.ndindex(B, H, T):
        visible, forced = visible_and_forced(S, T, t, a["causal"], a["sinks"], a["window"])
        assert (fast[b, h, t] >= forced).all()
        assert (fast[b, h, t] & ~forced).sum() == info["k"][b, h, t]
        s = scores[b, h, t][visible]
        if not info["certified"][b, h, t] or not np.isfinite(s).all() or not s.size:
            continue
        p = np.exp(s - s.max())
        p /= p.sum()
        outside = p[~fast[b, h, t][visible]].sum()
        slack = 1e-6 if c["dtype"] == np.float64 else 1e-2
        assert outside <= info["bound"][b, h, t] * (1 + slack) + slack * 1e-3
        assert info["bound"][b, h, t] <= a["tail_bound"] * (1 + 1e-6) or info["k"][b, h, t] >= (
            (visible & ~forced).sum())


# ----------------------------------------------------------------------------- the tests
@FUZZ
@given(c=cases("topk"))
def test_topk_attention_fuzz(c):
    _run(c)


@FUZZ
@given(c=cases("tail"))
def test_tail_topk_attention_fuzz(c):
    _run(c)


@FUZZ
@given(c=cases("dense"))
def test_dense_attention_fuzz(c):
    _run(c)
