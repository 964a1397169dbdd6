"""The fused exact decode selection (ops.selection.fused_decode_ranking, cpu_kernels.decode_topm_scan)
against the float64 reference ranking: ties, NaN/inf, sinks, window, GQA/MLA, both kernels, chunked merges."""
import numpy as np
import pytest

import topkattn.ops.selection as selection
from topkattn.ops import cpu_kernels
from topkattn.ops.reference import rank_row
from topkattn.ops.selection import RowBounds, rank_decode_candidates, select_decode


def _expected(query, keys, *, topk, sinks, window, scale):
    """(B, H, K) by the reference: forced keys, then rank_row over float64 scores, -1 padded."""
    kg = keys[:, None] if keys.ndim == 3 else keys
    B, H, _ = query.shape
    G, S = kg.shape[1], kg.shape[2]
    bounds = RowBounds(S, 1, topk=topk, causal=True, sinks=sinks, window=window)
    forced = bounds.forced_indices()[0]
    cand = bounds.candidate_mask(0, 1, S)[0]
    out = np.full((B, H, bounds.n_slots), -1, dtype=np.int64)
    for b in range(B):
        for h in range(H):
            s = (kg[b, h // (H // G)].astype(np.float64) @ query[b, h].astype(np.float64)) * scale
            ranked = rank_row(s, cand)[:bounds.n_sel]
            out[b, h, :len(forced)] = forced
            out[b, h, len(forced):len(forced) + len(ranked)] = ranked
    return out


def _integer_case(rng, B, G, rep, S, D, dtype, ties=True):
    """Small-integer queries and keys: every score is exact in float32 too, so exact ties exist."""
    keys = rng.integers(-3, 4, (B, G, S + 5, D)).astype(dtype)[:, :, :S]  # a view with spare rows
    if ties and S > 2:
        src = rng.integers(0, S, S // 2)
        keys[:, :, rng.integers(0, S, S // 2)] = keys[:, :, src]  # duplicates at every offset
    query = rng.integers(-2, 3, (B, G * rep, D)).astype(dtype)
    return query, keys


@pytest.fixture(params=["one_task", "chunked"])
def tasks(request, monkeypatch):
    """Run every test once on the calling thread and once split into many chunks on 2 workers."""
    if request.param == "chunked":
        monkeypatch.setattr(selection, "FUSED_TASK_WORK", 32)
        monkeypatch.setattr(selection, "n_workers", lambda: 2)
    return request.param


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("G,rep", [(1, 16), (1, 8), (2, 3), (4, 1), (1, 5), (1, 20), (2, 4)])
def test_fused_equals_reference_with_ties_sinks_window(tasks, dtype, G, rep):
    """Both kernels (vector panels for >= half a vector of heads, dot products for fewer),
    GQA and MLA-like sharing, exact ties (duplicated keys, integer scores): the reference order."""
    rng = np.random.default_rng(100 * G + rep)
    for S, D, topk, sinks, window in [(300, 13, 7, 2, 3), (150, 8, 40, 0, 0), (97, 5, 1, 1, 0),
                                      (64, 16, 64, 0, 5), (9, 3, 20, 2, 2), (530, 31, 16, 4, 17)]:
        query, keys = _integer_case(rng, 2, G, rep, S, D, dtype)
        kw = dict(topk=topk, sinks=sinks, window=window, scale=0.5)
        got = select_decode(query, keys, impl="numba", **kw)[0]
        np.testing.assert_array_equal(got, _expected(query, keys, **kw))
        if G == 1:  # the MLA cache layout (B, S, D), shared by every head
            np.testing.assert_array_equal(select_decode(query, keys[:, 0], impl="numba", **kw)[0], got)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rep", [1, 16])
def test_equal_keys_score_equal_at_every_offset(dtype, rep):
    """One key copied to offsets 0..70 of its block and panel positions: ranked together, lowest first."""
    rng = np.random.default_rng(7)
    S, D = 200, 29
    keys = rng.standard_normal((1, S, D)).astype(dtype)
    query = rng.standard_normal((1, rep, D)).astype(dtype)
    best = np.argmax((keys[0] @ query[0].T)[:, 0])
    copies = np.array(sorted({3, 8, 9, 15, 63, 64, 65, 71, 130, 131, 199} - {best}))
    keys[0, copies] = keys[0, best]
    idx = select_decode(query, keys, topk=len(copies) + 1, impl="numba")[0]
    np.testing.assert_array_equal(idx[0, 0], np.sort(np.append(copies, best)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rep", [2, 16])
def test_nan_and_inf_scores_follow_the_rule(tasks, dtype, rep):
    """NaN ranks above every number (ties with +inf to the lower key); -inf scores are still
    candidates, selected when fewer than k keys score higher."""
    rng = np.random.default_rng(3)
    S, D = 140, 6
    keys = rng.integers(-3, 4, (1, 1, S, D)).astype(dtype)
    query = np.abs(rng.integers(1, 3, (1, rep, D))).astype(dtype)  # positive: +inf keys score +inf
    keys[0, 0, 100, 2] = np.nan
    keys[0, 0, 40, 1] = np.inf
    keys[0, 0, 7, 0] = -np.inf
    keys[0, 0, 120, 3] = -np.inf
    for topk, sinks, window in [(5, 0, 0), (S, 1, 2), (3, 41, 0)]:
        kw = dict(topk=topk, sinks=sinks, window=window, scale=1.0)
        with np.errstate(invalid="ignore"):
            want = _expected(query, keys, **kw)
            got = select_decode(query, keys, impl="numba", **kw)[0]
        np.testing.assert_array_equal(got, want)
    assert list(got[0, 0, :2]) == [100, 40] or sinks  # NaN key first, then +inf


def test_fewer_candidates_than_k_pad_with_minus_one(tasks):
    rng = np.random.default_rng(4)
    query, keys = _integer_case(rng, 1, 1, 16, 12, 4, np.float32, ties=False)
    kw = dict(topk=30, sinks=3, window=4, scale=0.25)
    got = select_decode(query, keys[:, 0], impl="numba", **kw)[0]
    np.testing.assert_array_equal(got, _expected(query, keys, **kw))
    assert (got[..., 3 + 4 + 5:] == -1).all()  # 12 keys - 3 sinks - 4 window = 5 candidates
    empty = select_decode(query, keys[:, 0, :2], impl="numba", topk=4, sinks=3)[0]
    np.testing.assert_array_equal(empty, [[[0, 1, -1, -1]] * 16])  # P' = 2 sinks, K' = min(4, S) = 2 empty


def test_rank_decode_candidates_fused_equals_xp_path():
    """The ranking (used by recall measurement and simulated recall) agrees with the NumPy path
    where the scores are exact (integers), m larger than k included."""
    rng = np.random.default_rng(5)
    query, keys = _integer_case(rng, 2, 2, 4, 90, 7, np.float32)
    bounds = RowBounds(90, 1, topk=10, causal=True, sinks=2, window=3)
    for m in (1, 10, 37, 200):
        got = rank_decode_candidates(query, keys, bounds, m, 0.5, impl="numba")
        want = rank_decode_candidates(query, keys, bounds, m, 0.5, impl="numpy")
        np.testing.assert_array_equal(got, want)


def test_merge_topm_equals_one_ranking():
    """Ranked lists of disjoint key ranges merge into the ranking of their union (ties, padding)."""
    rng = np.random.default_rng(6)
    rep, m = 3, 6
    scores = rng.integers(-2, 3, (rep, 40)).astype(np.float64)
    scores[1, 5] = np.inf
    parts_v, parts_i = [], []
    for j0, j1 in [(0, 4), (4, 25), (25, 40)]:
        v = np.full((rep, m), -np.inf)
        i = np.full((rep, m), -1, dtype=np.int64)
        for h in range(rep):
            r = j0 + rank_row(scores[h, j0:j1], np.ones(j1 - j0, bool))[:m]
            v[h, :len(r)], i[h, :len(r)] = scores[h, r], r
        parts_v.append(v)
        parts_i.append(i)
    vals, ids = np.empty((rep, m)), np.empty((rep, m), dtype=np.int64)
    cpu_kernels.merge_topm(np.stack(parts_v), np.stack(parts_i), vals, ids)
    for h in range(rep):
        np.testing.assert_array_equal(ids[h], rank_row(scores[h], np.ones(40, bool))[:m])


def test_select_decode_auto_uses_the_fused_path(monkeypatch):
    """impl='auto' on NumPy arrays runs the fused scan (the old path is impl='numpy')."""
    calls = []
    real = selection.fused_decode_ranking
    monkeypatch.setattr(selection, "fused_decode_ranking", lambda *a: calls.append(1) or real(*a))
    rng = np.random.default_rng(8)
    query, keys = _integer_case(rng, 1, 1, 4, 30, 4, np.float32)
    a = select_decode(query, keys[:, 0], topk=3)[0]
    assert calls
    np.testing.assert_array_equal(a, select_decode(query, keys[:, 0], topk=3, impl="numpy")[0])
    with pytest.raises(ValueError, match="impl must be"):
        select_decode(query, keys[:, 0], topk=3, impl="fast")


@pytest.mark.parametrize("tail_bound", [None, 0.05])
def test_exact_selector_reads_the_cache_once_and_reports_the_measured_recall(monkeypatch, tail_bound):
    """ExactSelector's recall bookkeeping (exact_recall) equals recall_hits' re-ranked
    measurement, without the second scoring pass."""
    from topkattn.decoding import ExactSelector
    from topkattn.decoding import selectors as sel_mod

    class Cache:
        def __init__(self, keys):
            self.keys = keys

    rng = np.random.default_rng(9)
    query, keys = _integer_case(rng, 2, 1, 4, 60, 5, np.float64)
    cache = Cache(keys[:, 0])
    kw = dict(topk=6, sinks=2, window=3, scale=0.5)
    measured = ExactSelector(tail_bound=tail_bound, max_topk=6 if tail_bound else None)
    measured.selects_exactly = False  # the base class's measurement: re-rank and compare
    idx_m = measured(query, cache, **kw)
    calls = []
    real = sel_mod.recall_hits
    monkeypatch.setattr(sel_mod, "recall_hits", lambda *a, **k: calls.append(1) or real(*a, **k))
    fast = ExactSelector(tail_bound=tail_bound, max_topk=6 if tail_bound else None)
    np.testing.assert_array_equal(fast(query, cache, **kw), idx_m)
    assert not calls
    assert fast.stats.to_dict() == measured.stats.to_dict()
    assert fast.stats.recall == 1.0 and fast.stats.hits > 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shared", [True, False])
def test_sparse_attention_decode_kernel_equals_reference(dtype, shared):
    """The Numba attend of a decode step (sparse_attend_rows per KV head) against attend_row and
    the NumPy path: empty slots, -inf scores, a NaN key, a NaN value in an attended row only."""
    from topkattn.ops.reference import attend_row
    from topkattn.ops.sparse_attention import sparse_attention_decode

    rng = np.random.default_rng(12)
    B, G, rep, S, D = 2, 2, 3, 30, 6
    H = G * rep
    keys = rng.standard_normal((B, G, S + 4, D)).astype(dtype)[:, :, :S]  # a cache view
    values = keys if shared else rng.standard_normal((B, G, S + 4, 5)).astype(dtype)[:, :, :S]
    query = rng.standard_normal((B, H, D)).astype(dtype)
    idx = rng.integers(0, S, (B, H, 7))
    idx[0, 0, 3:] = -1  # empty slots
    idx[0, 1, :] = -1  # nothing to attend: zeros
    keys[1, 1, 5, 2] = np.nan  # NaN score for the rows selecting key 5 of (b=1, g=1)
    idx[1, 4, 2] = 5
    keys[0, 1, 7, :] = -np.inf  # a -inf score (positive query): weight 0 (its -inf value: NaN if shared)
    query[0, 3] = np.abs(query[0, 3]) + 0.1
    idx[0, 3, 0] = 7
    want = np.empty((B, H, values.shape[-1]))
    for b in range(B):
        for h in range(H):
            sel = idx[b, h][idx[b, h] >= 0]
            g = h // rep
            with np.errstate(over="ignore", invalid="ignore"):
                s = (keys[b, g, sel].astype(np.float64) @ query[b, h].astype(np.float64)) * 0.7
            want[b, h] = attend_row(s, values[b, g, sel].astype(np.float64))[0]
    with np.errstate(over="ignore", invalid="ignore"):
        got = sparse_attention_decode(query, keys, values, idx, 0.7)
        xp_path = sparse_attention_decode(query, keys, values, idx, 0.7, impl="numpy")
    np.testing.assert_allclose(got, want, rtol=1e-4 if dtype == np.float32 else 1e-10, atol=1e-6)
    np.testing.assert_allclose(got, xp_path, rtol=1e-4 if dtype == np.float32 else 1e-10, atol=1e-6)
    assert np.isnan(got[1, 4]).all() and (got[0, 1] == 0).all()
    assert np.isnan(got[0, 3]).all() == shared  # weight 0 times a -inf value is NaN; else finite
