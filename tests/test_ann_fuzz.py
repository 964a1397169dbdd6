"""Property-based (hypothesis) fuzzing of topkattn.ann.LorannIndex over its argument space.

Each example draws a tiny index (n = 1..50 points, dim 2..10, every constructor argument:
n_clusters, global_dim, quantization_bits, rank, train_size, distance, balanced, some of
them invalid), data and queries as float32/float64/int/uint8 (or a refused dtype: complex,
object; or a NaN/inf among the values), optional adds before and after ``build`` (one point
or several), an optional save/load round trip, and the search arguments (k, including
k > n and non-integers; clusters_to_search; points_to_rerank, including 0 and >> n), with
the fused and the GEMM-block CPU paths.  The property:

* an invalid argument raises the documented exception (TypeError for a wrong type,
  ValueError for a wrong value, RuntimeError for a search before ``build``) whose message
  starts with the name of an argument that was invalid;
* otherwise the result has the right shape and dtype, each row holds distinct ids in
  [0, n) then -1 padding (distance inf), distances ascending; at least min(k, n) ids when
  every cluster is searched; and with every cluster searched and points_to_rerank >= n the
  result equals ``exact_search`` (integer-valued data: float32 arithmetic is exact, so ids
  and distances are equal; real-valued data: distances within rounding).

Run length: ``TOPKATTN_FUZZ`` selects the profile (the same variable as
tests/test_op_fuzz.py): unset (or ``short``/``ci``) runs 40 examples per test, derandomised,
so CI is fast and stable; ``TOPKATTN_FUZZ=long`` runs 2000 random examples per test; an
integer runs that many.

    TOPKATTN_FUZZ=long pytest tests/test_ann_fuzz.py
"""
import os
import re
import tempfile
from unittest import mock

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from topkattn.ann import LorannIndex  # noqa: E402
from topkattn.ann import index as index_module  # noqa: E402
from topkattn.testing import fuzz_profile  # noqa: E402

FUZZ = settings(deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], **fuzz_profile(40))

DTYPES = ["float32", "float64", "int64", "int32", "uint8"]
BAD_DTYPES = [("complex64", TypeError), ("object", TypeError), ("nan", ValueError),
              ("inf", ValueError)]
ARGUMENTS = ["data", "distance", "n_clusters", "global_dim", "rank", "train_size",
             "quantization_bits", "balanced", "q", "k", "clusters_to_search", "points_to_rerank"]


def _array(draw, rng, shape, integer, name, bad):
    """(array, (expected error, name) or None) for ``name``: a good dtype, or with ``bad`` a
    refused dtype or a non-finite value."""
    kind = draw(st.sampled_from([b[0] for b in BAD_DTYPES] if bad else DTYPES))
    x = rng.integers(-3, 4, shape).astype(np.float64) if integer else rng.standard_normal(shape)
    err = dict(BAD_DTYPES).get(kind)
    if kind == "uint8":
        x = np.abs(x) if integer else np.abs(np.round(3 * x))
    if kind in ("nan", "inf"):
        x = x.astype(np.float32)
        x.flat[draw(st.integers(0, x.size - 1))] = np.nan if kind == "nan" else -np.inf
    elif kind == "object":
        x = x.astype(object)
    else:
        x = x.astype(kind)
    return x, (err, name) if err else None


def _int_arg(draw, valid_lo, valid_hi, bad, extra=()):
    """A value for an integer argument: in [valid_lo, valid_hi], or with ``bad`` an edge (out
    of range, bool, float, str; ``extra`` values too)."""
    if not bad:
        return draw(st.integers(valid_lo, valid_hi))
    return draw(st.sampled_from([valid_lo - 1, valid_hi + 1, True, 2.0, "3", *extra]))


def _int_error(value, lo, hi):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        return TypeError
    if value < lo or (hi is not None and value > hi):
        return ValueError
    return None


@st.composite
def cases(draw):
    """One example: data, constructor arguments, adds, queries, search arguments and the
    errors expected of the constructor and of the search (name -> exception type)."""
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    victim = draw(st.sampled_from([None] * 8 + ARGUMENTS))  # at most one argument made invalid
    n = draw(st.integers(1, 50))
    dim = draw(st.integers(2, 10))
    integer = draw(st.booleans())
    data, data_err = _array(draw, rng, (n, dim), integer, "data", victim == "data")
    ctor = {}
    ctor["distance"] = draw(st.sampled_from(["cos", 3, 1.0] if victim == "distance"
                                            else ["ip", "l2", "L2", 0, 1]))  # 0, 1: IP, L2
    ctor["n_clusters"] = _int_arg(draw, 1, min(n, 8), victim == "n_clusters")
    if victim == "global_dim":
        ctor["global_dim"] = draw(st.sampled_from([0, dim + 1, 2.0, True]))
    else:
        ctor["global_dim"] = draw(st.one_of(st.none(), st.integers(min(2, dim - 1), dim)))
    hi_rank = max(1, min(dim - 1, ctor["global_dim"] if isinstance(ctor["global_dim"], int) and
                         ctor["global_dim"] >= 1 else dim))
    ctor["rank"] = _int_arg(draw, 1, hi_rank, victim == "rank")
    nc_ok = _int_error(ctor["n_clusters"], 1, n) is None
    ctor["train_size"] = (_int_arg(draw, 1, ctor["n_clusters"], True) if victim == "train_size" and nc_ok
                          else draw(st.one_of(st.none(), st.integers(1, ctor["n_clusters"] if nc_ok else 1))))
    ctor["quantization_bits"] = draw(st.sampled_from(
        [5, 8.0, True, 0] if victim == "quantization_bits" else [8, 4, None]))
    ctor["balanced"] = draw(st.sampled_from(["yes", 1] if victim == "balanced" else [False, True]))
    errors = {}  # argument -> expected exception type, in the constructor's check order
    if data_err:
        errors["data"] = data_err[0]
    d = ctor["distance"]
    errors["distance"] = (None if (d in (0, 1) if isinstance(d, int) else d.lower() in ("ip", "l2")
                                   if isinstance(d, str) else False)
                          else ValueError if isinstance(d, (str, int)) else TypeError)
    errors["n_clusters"] = _int_error(ctor["n_clusters"], 1, n)
    gd = ctor["global_dim"]
    errors["global_dim"] = None if gd is None else _int_error(gd, 1, dim)
    r = ctor["rank"]
    errors["rank"] = _int_error(r, 1, None) or (
        ValueError if r >= dim or (errors["global_dim"] is None and r > (gd or dim)) else None)
    ts = ctor["train_size"]
    errors["train_size"] = None if ts is None or not nc_ok else _int_error(ts, 1, ctor["n_clusters"])
    qb = ctor["quantization_bits"]
    errors["quantization_bits"] = None if qb is None else (_int_error(qb, 0, None)
                                                           or (None if qb in (4, 8) else ValueError))
    errors["balanced"] = None if isinstance(ctor["balanced"], bool) else TypeError
    assert set(k for k, v in errors.items() if v) <= {victim}, (victim, errors)  # the oracle
    ctor_errors = {k: v for k, v in errors.items() if v is not None}

    n_before = draw(st.integers(0, 3))
    n_after = draw(st.sampled_from([0, 0, 1, 2, 7]))
    adds = [rng.integers(-3, 4, (m, dim)).astype(np.float32) if integer
            else rng.standard_normal((m, dim)).astype(np.float32) for m in (n_before, n_after)]
    n_total = n + n_before + n_after
    nq = draw(st.sampled_from([1, 2, 5, 17, 24]))
    one_d = nq == 1 and draw(st.booleans())
    q, q_err = _array(draw, rng, (dim,) if one_d else (nq, dim), integer, "q", victim == "q")
    nc = ctor["n_clusters"] if nc_ok else 1
    search = {
        "k": _int_arg(draw, 1, n_total + 5, victim == "k", extra=(10 ** 15,)),
        "clusters_to_search": (nc if draw(st.booleans()) and victim != "clusters_to_search"
                               else _int_arg(draw, 1, nc, victim == "clusters_to_search")),
        "points_to_rerank": (draw(st.sampled_from([n_total, n_total + 3, 10 ** 6]))
                             if draw(st.booleans()) and victim != "points_to_rerank"
                             else _int_arg(draw, 0, n_total + 5, victim == "points_to_rerank")),
    }
    s_errors = {}
    if q_err:
        s_errors["q"] = q_err[0]
    s_errors["k"] = _int_error(search["k"], 1, None)
    s_errors["clusters_to_search"] = _int_error(search["clusters_to_search"], 1, None)  # > nc: clamped
    s_errors["points_to_rerank"] = _int_error(search["points_to_rerank"], 0, None)
    s_errors = {k: v for k, v in s_errors.items() if v is not None}
    extra = dict(block=draw(st.booleans()), roundtrip=draw(st.integers(0, 4)) == 0,
                 search_first=draw(st.integers(0, 9)) == 0, integer=integer)
    return data, ctor, ctor_errors, adds, q, search, s_errors, extra


def _assert_documented_error(exc, expected):
    """exc is the expected type for an invalid argument its message starts with."""
    name = re.match(r"\w*", str(exc)).group()
    assert name in expected, f"{type(exc).__name__} names {name!r}, invalid were {expected}: {exc}"
    assert isinstance(exc, expected[name]), (
        f"{name}: {type(exc).__name__}, documented {expected[name].__name__}: {exc}")


@FUZZ
@given(cases())
def test_index_api_raises_documented_errors_or_returns_valid_results(case):
    data, ctor, ctor_errors, adds, q, search, s_errors, extra = case
    try:
        ix = LorannIndex(data, ctor["n_clusters"], ctor["global_dim"], ctor["quantization_bits"],
                         ctor["rank"], ctor["train_size"], ctor["distance"], ctor["balanced"],
                         seed=0)
    except (TypeError, ValueError) as e:
        assert ctor_errors, f"valid arguments refused: {e}"
        _assert_documented_error(e, ctor_errors)
        event("constructor refused")
        return
    assert not ctor_errors, f"accepted invalid {ctor_errors}"
    if extra["search_first"] and not s_errors:
        with pytest.raises(RuntimeError, match="build"):
            ix.search(q, search["k"], search["clusters_to_search"], search["points_to_rerank"])
    if len(adds[0]):
        ix.add(adds[0])
    ix.build()
    if len(adds[1]):
        ix.add(adds[1][0])  # the one-point (decoding) path
        if len(adds[1]) > 1:
            ix.add(adds[1][1:])  # the batched path
    if extra["roundtrip"]:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "ix.npz")
            ix.save(path)
            ix = LorannIndex.load(path)
    k, w, rr = search["k"], search["clusters_to_search"], search["points_to_rerank"]
    try:
        group = 0 if extra["block"] else 4
        with mock.patch.object(index_module, "BLOCK_MIN_GROUP", group), \
                mock.patch.object(index_module, "BLOCK_MIN_GROUP_INT8", group if extra["block"] else 4096):
            ids, dist = ix.search(q, k, w, rr, return_distances=True)
    except (TypeError, ValueError) as e:
        assert s_errors or k == 10 ** 15, f"valid search refused: {e}"
        expected = dict(s_errors)
        if not s_errors:  # k = 10**15 is fine unless the (Q, k) result cannot be allocated
            expected["k"] = ValueError
        _assert_documented_error(e, expected)
        event("search refused")
        return
    assert not s_errors, f"accepted invalid {s_errors}"
    n = len(ix)
    assert n == len(data) + sum(len(a) for a in adds)
    nq = 1 if q.ndim == 1 else len(q)
    assert ids.shape == dist.shape == ((k,) if q.ndim == 1 else (nq, k))
    assert ids.dtype == np.int64 and dist.dtype == np.float32
    ids2, dist2 = ids.reshape(nq, k), dist.reshape(nq, k)
    full = w >= ix.n_clusters
    for i in range(nq):
        valid = ids2[i] >= 0
        m = int(valid.sum())
        assert valid[:m].all() and not valid[m:].any(), ids2[i]  # padding only at the end
        assert np.isinf(dist2[i, m:]).all() and np.isfinite(dist2[i, :m]).all()
        assert len(set(ids2[i, :m].tolist())) == m and (ids2[i, :m] < n).all()
        assert m >= 1 and m <= min(k, n)
        if full:
            assert m == min(k, n)
        assert (np.diff(dist2[i, :m]) >= -1e-4 * (1 + np.abs(dist2[i, 1:m]))).all(), dist2[i]
    event("searched, every cluster" if full else "searched")
    if full and rr >= n:
        event("compared with exact_search")
        want_ids, want_dist = ix.exact_search(q, k, return_distances=True)
        if extra["integer"]:
            np.testing.assert_array_equal(ids, want_ids)
            np.testing.assert_array_equal(dist, want_dist)
        else:
            np.testing.assert_allclose(dist, want_dist, rtol=1e-4, atol=1e-4)


@FUZZ
@given(st.integers(1, 50), st.integers(2, 8), st.integers(0, 2 ** 32 - 1), st.sampled_from(["ip", "l2"]))
def test_full_search_with_duplicates_equals_exact_search(n, dim, seed, distance):
    """Few distinct integer points, many copies (empty, unsplittable clusters), searched
    fully: the same ids and distances as brute force."""
    rng = np.random.default_rng(seed)
    distinct = rng.integers(-2, 3, (int(rng.integers(1, 4)), dim))
    x = distinct[rng.integers(0, len(distinct), n)].astype(np.float32)
    nc = int(rng.integers(1, min(n, 8) + 1))
    ix = LorannIndex(x, nc, rank=1, quantization_bits=8, distance=distance, seed=seed)
    ix.build()
    q = rng.integers(-2, 3, (3, dim)).astype(np.float32)
    for w in range(1, nc + 1):
        ids = ix.search(q, 3, w, 0)
        assert ((ids >= 0).sum(axis=1) >= 1).all()  # never routed to empty clusters only
    ids, dist = ix.search(q, n + 2, nc, n, return_distances=True)
    want_ids, want_dist = ix.exact_search(q, n + 2, return_distances=True)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(dist, want_dist)
