"""The fused training selection (ops.selection.fused_ranked_rows, cpu_kernels.rows_topm_scan)
against the float64 reference ranking: exact ties, NaN/inf, causal or not, sinks, window,
GQA, rows that fill a vector only in part, several pieces per head, forgetful masking."""
import numpy as np
import pytest

import topkattn.ops.selection as selection
from topkattn.ops.reference import rank_row
from topkattn.ops.selection import RowBounds, fused_ranked_rows, select_topk


def _reference_ranked(q, k, bounds, m, scale):
    """(B, H, T, m) by rank_row over float64 scores of each row's candidates, -1 padded."""
    B, H, T, _ = q.shape
    G, S = k.shape[1], k.shape[2]
    out = np.full((B, H, T, m), -1, dtype=np.int64)
    cand = bounds.candidate_mask(0, T, S)
    for b in range(B):
        for h in range(H):
            s = q[b, h].astype(np.float64) @ k[b, h // (H // G)].astype(np.float64).T * scale  # (T, S)
            for t in range(T):
                r = rank_row(s[t], cand[t])[:m]
                out[b, h, t, :len(r)] = r
    return out


@pytest.fixture(params=["one_piece", "pieces"])
def pieces(request, monkeypatch):
    if request.param == "pieces":  # 2 workers: every head cut into several row pieces on the pool
        monkeypatch.setattr(selection, "n_workers", lambda: 2)
    return request.param


def _integer_qk(rng, B, H, G, T, S, D, dtype):
    q = rng.integers(-2, 3, (B, H, T, D)).astype(dtype)
    k = rng.integers(-3, 4, (B, G, S, D)).astype(dtype)
    if S > 2:  # duplicated keys at every offset: exact ties
        k[:, :, rng.integers(0, S, S // 2)] = k[:, :, rng.integers(0, S, S // 2)]
    return q, k


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("B,H,G,T,S,D", [(1, 2, 2, 37, 37, 5), (2, 4, 2, 20, 90, 8), (1, 3, 1, 70, 70, 16),
                                         (1, 1, 1, 1, 200, 3), (1, 2, 1, 33, 33, 1)])
@pytest.mark.parametrize("causal,sinks,window,m", [(True, 0, 0, 4), (True, 2, 3, 7), (False, 1, 0, 5),
                                                   (False, 0, 4, 3), (True, 0, 0, 100), (True, 5, 9, 1)])
def test_fused_rows_equal_reference(pieces, dtype, B, H, G, T, S, D, causal, sinks, window, m):
    rng = np.random.default_rng(T * 7 + S + D)
    q, k = _integer_qk(rng, B, H, G, T, S, D, dtype)
    bounds = RowBounds(S, T, topk=m, causal=causal, sinks=sinks, window=window)
    got = fused_ranked_rows(q, k, bounds, m, 0.5)
    np.testing.assert_array_equal(got, _reference_ranked(q, k, bounds, m, 0.5))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_and_inf_scores_follow_the_rule(pieces, dtype):
    """NaN ranks above every number, ties with +inf go to the lower key, -inf is a candidate."""
    rng = np.random.default_rng(2)
    B, H, T, D = 1, 2, 40, 4
    q = rng.integers(1, 3, (B, H, T, D)).astype(dtype)  # positive: an inf key scores +inf
    k = rng.integers(-3, 4, (B, 1, T, D)).astype(dtype)
    k[0, 0, 30, 1] = np.nan
    k[0, 0, 12, 2] = np.inf
    k[0, 0, 3, 0] = -np.inf
    k[0, 0, 25, 3] = -np.inf
    for m in (3, T):
        bounds = RowBounds(T, T, topk=m, causal=True, sinks=1, window=2)
        with np.errstate(invalid="ignore"):
            want = _reference_ranked(q, k, bounds, m, 1.0)
        np.testing.assert_array_equal(fused_ranked_rows(q, k, bounds, m, 1.0), want)
    assert list(want[0, 0, -1, :2]) == [12, 30]  # +inf (key 12) and NaN (key 30) tie: lower key first


def test_select_topk_with_forgetting_equals_the_numpy_path(pieces):
    """Forgetful masking on the fused ranking: the same keys as the tile path for one seed."""
    rng = np.random.default_rng(3)
    q, k = _integer_qk(rng, 2, 4, 2, 50, 50, 6, np.float64)
    kw = dict(topk=5, causal=True, scale=0.5, sinks=1, window=2, forget_rate=0.3, seed=11)
    np.testing.assert_array_equal(select_topk(q, k, impl="numba", **kw), select_topk(q, k, impl="numpy", **kw))


def test_select_topk_auto_uses_the_fused_path(monkeypatch):
    calls = []
    real = selection.fused_ranked_rows
    monkeypatch.setattr(selection, "fused_ranked_rows", lambda *a: calls.append(1) or real(*a))
    rng = np.random.default_rng(4)
    q, k = _integer_qk(rng, 1, 2, 2, 10, 10, 3, np.float32)
    got = select_topk(q, k, topk=2, scale=1.0)
    assert calls
    np.testing.assert_array_equal(got, select_topk(q, k, topk=2, scale=1.0, impl="numpy"))
