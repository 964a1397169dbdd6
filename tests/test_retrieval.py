"""Retrieval-backed decoding: LoRANN selector vs exact top-k, incremental index vs rebuilt,
forced keys never indexed, prefill training queries, simulated recall, decode-time dynamic k;
synchronous index maintenance and the selectors' argument checks."""
import numpy as np
import pytest

from topkattn.ann import LorannIndex
from topkattn.decoding import (
    ExactSelector,
    LorannSelector,
    SimulatedRecallSelector,
    decode_teacher_forced,
    dynamic_k_from_ranked,
)
from topkattn.decoding.runner import selector_factory
from topkattn.decoding.selectors import _Context, recall_hits
from topkattn.model import Transformer, TransformerConfig
from topkattn.ops.reference import dynamic_topk_reference, rank_row
from topkattn.ops.selection import apply_forgetting, select_dynamic_topk

FULL = dict(clusters_to_search=1.0, points_to_rerank=10**6, quantization_bits=None)


def _model(**kw):
    cfg = dict(vocab_size=24, d_model=16, n_layers=2, n_heads=2, q_lora_rank=8, kv_lora_rank=8,
               qk_nope_dim=4, qk_rope_dim=4, v_head_dim=4, d_ff=16, topk=3, dtype="float64", seed=1)
    cfg.update(kw)
    return Transformer(TransformerConfig(**cfg))


def _tokens(B=2, T=26, seed=0, vocab=24):
    return np.random.default_rng(seed).integers(0, vocab, (B, T))


class _Recording:
    """Wraps a selector and keeps every (query, keys, idx) it saw and, after each decode step
    with LoRANN indexes, each index's (largest cluster, split threshold)."""

    def __init__(self, inner):
        self.inner, self.seen, self.sizes = inner, [], []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, query, cache, **kw):
        idx = self.inner(query, cache, **kw)
        self.seen.append((query.copy(), cache.keys.copy(), idx.copy(), self.inner.prefilling))
        indexes = getattr(self.inner, "indexes", None)
        if not self.inner.prefilling and indexes and indexes[0] is not None:
            self.sizes.append([(int(ix.cluster_sizes.max()), ix.max_cluster_size) for ix in indexes])
        return idx

    @property
    def idx(self):
        """Every idx returned, in order."""
        return [s[2] for s in self.seen]


@pytest.mark.parametrize("P,W", [(0, 0), (2, 3)])
def test_lorann_at_full_recall_equals_exact_decode(P, W):
    """All clusters searched + full re-rank: identical selections and logits to exact top-k."""
    m = _model(persistent_tokens=P, window=W)
    toks = _tokens()
    ex = [_Recording(ExactSelector()) for _ in range(2)]
    lo = [_Recording(LorannSelector(**FULL, n_clusters=3, refit_factor=1.5)) for _ in range(2)]
    a = decode_teacher_forced(m, toks, selectors=ex, prompt_len=8)
    b = decode_teacher_forced(m, toks, selectors=lo, prompt_len=8)
    for se, sl in zip(ex, lo):
        assert len(se.seen) == len(sl.seen) == toks.shape[1]
        for (_, _, ie, _), (_, _, il, _) in zip(se.seen, sl.seen):
            np.testing.assert_array_equal(np.sort(ie, -1), np.sort(il, -1))
        assert sl.inner.stats.recall == 1.0
        assert sl.inner.builds > toks.shape[0]  # the refit policy rebuilt indexes as the cache grew
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    # and decode equals the model's full (training-path) forward in eval mode
    np.testing.assert_allclose(a, m.eval().forward(toks), rtol=1e-9, atol=1e-10)


def test_incremental_index_matches_rebuilt_index():
    """An index grown with add() returns what one rebuilt from scratch at every step returns."""
    m = _model(topk=4)
    toks = _tokens(T=30, seed=3)
    inc = [_Recording(LorannSelector(**FULL, n_clusters=2, refit_factor=None)) for _ in range(2)]
    reb = [_Recording(LorannSelector(**FULL, n_clusters=2, refit_factor=1.000001)) for _ in range(2)]
    a = decode_teacher_forced(m, toks, selectors=inc, prompt_len=6)
    b = decode_teacher_forced(m, toks, selectors=reb, prompt_len=6)
    for si, sr in zip(inc, reb):
        assert si.inner.builds == toks.shape[0]  # built once per batch element at prefill
        assert sr.inner.builds > 10 * toks.shape[0]
        for (_, _, i1, _), (_, _, i2, _) in zip(si.seen, sr.seen):
            np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(a, b)


def test_index_add_equals_build_on_same_points():
    """Index level: build on X0 then add X1 == build on X0 + X1 when every cluster is searched
    and every point re-ranked (the same single cluster), for every query."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 12)).astype(np.float32)
    q = rng.standard_normal((9, 12)).astype(np.float32)
    a = LorannIndex(x[:30], 1, rank=4, train_size=1, quantization_bits=8, seed=0)
    a.build(training_queries=q)
    a.add(x[30:])
    b = LorannIndex(x, 1, rank=4, train_size=1, quantization_bits=8, seed=0)
    b.build(training_queries=q)
    ia, da = a.search(q, 7, 1, 60, return_distances=True)
    ib, db = b.search(q, 7, 1, 60, return_distances=True)
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_allclose(da, db, rtol=1e-6)
    ref = np.argsort(-(q.astype(np.float64) @ x.T.astype(np.float64)), axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(ia, ref)


@pytest.mark.parametrize("P,W", [(0, 0), (2, 2), (1, 4)])
def test_index_holds_exactly_the_candidates(P, W):
    """Forced keys (sinks, window) are never indexed; the index grows with each step's new candidate."""
    m = _model(persistent_tokens=P, window=W, topk=2)
    toks = _tokens(T=20, seed=5)
    sels = [LorannSelector(n_clusters=2, clusters_to_search=1, refit_factor=None) for _ in range(2)]
    seen = []
    sel = sels[0]
    orig = sel._select

    def spy(query, keys, cache, ctx):
        out = orig(query, keys, cache, ctx)
        if sel.indexes and sel.indexes[0] is not None:
            for b in range(keys.shape[0]):
                seen.append((keys[b, ctx.sinks:ctx.cand_end].copy(), sel.indexes[b].data.copy(), ctx))
        return out

    sel._select = spy
    decode_teacher_forced(m, toks, selectors=sels, prompt_len=5)
    assert len(seen) > 10
    for cand, data, ctx in seen:
        assert ctx.cand_end == max(ctx.S - W, P)
        np.testing.assert_array_equal(data, cand.astype(np.float32))


def test_prefill_builds_on_absorbed_queries(monkeypatch):
    """The index is built once at the end of prefill, over the prompt's candidate latents,
    with the prefill's absorbed queries (every head of every prompt position) as training queries."""
    calls = []
    orig = LorannIndex.build

    def build(self, approximate=True, training_queries=None, verbose=False):
        calls.append((self.data.copy(), None if training_queries is None else np.array(training_queries)))
        return orig(self, approximate=approximate, training_queries=training_queries, verbose=verbose)

    monkeypatch.setattr(LorannIndex, "build", build)
    m = _model(topk=2)
    toks = _tokens(B=1, T=9, seed=7)
    rec = [_Recording(ExactSelector()) for _ in range(2)]
    decode_teacher_forced(m, toks, selectors=rec, prompt_len=6)
    sels = [LorannSelector(n_clusters=2, refit_factor=None) for _ in range(2)]
    decode_teacher_forced(m, toks[:, :6], selectors=sels, prompt_len=6)
    assert len(calls) == 2  # one index per layer (batch of one), built once
    for layer, (data, tq) in enumerate(calls):
        qs = np.concatenate([q[0] for q, _, _, _ in rec[layer].seen[:6]], axis=0)  # (6 * H, C + R)
        keys = rec[layer].seen[5][1][0]  # the cache after the prompt (S = 6, no sinks)
        np.testing.assert_allclose(tq, qs.astype(np.float32), rtol=1e-6)
        np.testing.assert_allclose(data, keys.astype(np.float32), rtol=1e-6)


def test_simulated_recall_follows_the_forgetting_rule():
    """Drops use the selector's seeded draws and the training refill rule; measured recall ~ R."""
    rng = np.random.default_rng(0)
    B, H, S, D, K = 3, 4, 40, 6, 8
    q = rng.standard_normal((B, H, D))

    class Cache:
        keys = rng.standard_normal((B, S, D))

    sel = SimulatedRecallSelector(0.7, seed=11)
    idx = sel(q, Cache, topk=K, sinks=0, window=0, scale=0.5)
    drop = np.random.default_rng(11).random((B * H, K)) < 0.3
    s = np.einsum("bhd,bsd->bhs", q, Cache.keys) * 0.5
    ranked = np.stack([rank_row(s[b, h], np.ones(S, bool)) for b in range(B) for h in range(H)])
    ref = apply_forgetting(ranked, drop, K)
    np.testing.assert_array_equal(idx.reshape(B * H, K), ref)
    expect = (~drop).sum() / drop.size
    assert sel.stats.recall == pytest.approx(expect)
    np.testing.assert_allclose(sel.stats.recall_by_rank, (~drop).mean(0))  # drops are uniform over ranks
    # over many rows the measured recall approaches R
    big = SimulatedRecallSelector(0.8, seed=2)
    for _ in range(30):
        big(q, Cache, topk=K, scale=0.5)
    assert abs(big.stats.recall - 0.8) < 3 * np.sqrt(0.16 / big.stats.wanted) + 1e-3


def test_recall_hits_counts_exact_topk_members():
    q = np.array([[[1.0, 0.0]]])  # (1, 1, 2)
    keys = np.array([[[5, 0], [1, 0], [4, 0], [3, 0], [2, 0]]], float)  # scores 5 1 4 3 2
    ctx = _Context(S=5, topk=3, k_cap=3, sinks=0, window=0, scale=1.0, xp=np)
    idx = np.array([[[0, 4, -1]]])  # exact top-3 = {0, 2, 3}
    hits, wanted = recall_hits(q, keys, idx, np.array([[3]]), ctx)
    assert int(hits[0]) == 1 and int(wanted[0]) == 3
    hits, wanted, rank_hits, rank_wanted = recall_hits(q, keys, idx, np.array([[3]]), ctx, by_rank=True)
    np.testing.assert_array_equal(rank_hits, [1, 0, 0])  # found the best key, missed ranks 1 and 2
    np.testing.assert_array_equal(rank_wanted, [1, 1, 1])


# -- dynamic k ------------------------------------------------------------------------------
def _random_cache(rng, B, H, S, D, spread):
    return rng.standard_normal((B, H, D)) * spread, rng.standard_normal((B, S, D))


class _C:
    def __init__(self, keys, C=None):
        self.keys = keys
        if C is not None:
            self.C = C


@pytest.mark.parametrize("eps", [0.0, 1e-3, 0.05, 0.3])
@pytest.mark.parametrize("P,W", [(0, 0), (2, 3)])
@pytest.mark.parametrize("seed,spread", [(4, 2.0), (5, 0.5), (6, 6.0)])
def test_exact_dynamic_k_matches_reference_and_bound_holds(eps, P, W, seed, spread):
    rng = np.random.default_rng(seed)
    B, H, S, D = 2, 3, 30, 8
    q, keys = _random_cache(rng, B, H, S, D, spread=spread)
    sel = ExactSelector(tail_bound=eps, max_topk=S)
    idx = sel(q, _C(keys), topk=4, sinks=P, window=W, scale=0.7)
    k_ref, cert_ref, bound_ref, true_out = dynamic_topk_reference(
        q[:, :, None], keys[:, None], tail_bound=eps, max_topk=S, scale=0.7, sinks=P, window=W)
    n_forced = P + W
    k_got = (idx[..., n_forced:] >= 0).sum(-1)
    np.testing.assert_array_equal(k_got, k_ref[..., 0])
    assert sel.stats.certified == int(cert_ref.sum())
    cert = cert_ref[..., 0]
    assert np.all(true_out[..., 0][cert] <= bound_ref[..., 0][cert] + 1e-12)
    assert np.all(true_out[..., 0][cert] <= eps + 1e-12)
    # the selector's own rows: the mass outside what it selected obeys its certificate, row by row
    own_out = _dense_out_mass(q, keys, idx, 0.7)
    assert np.all(own_out[cert] <= eps + 1e-12)
    np.testing.assert_allclose(own_out, true_out[..., 0], rtol=1e-9, atol=1e-15)
    if eps == 0.0:
        assert np.all(k_got == S - P - W) and cert.all()


def _dense_out_mass(q, keys, idx, scale):
    """True softmax mass (B, H) outside the selected keys, in float64."""
    s = np.einsum("bhd,bsd->bhs", q, keys) * scale
    s -= s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    sel = np.zeros_like(p, dtype=bool)
    for b in range(idx.shape[0]):
        for h in range(idx.shape[1]):
            j = idx[b, h][idx[b, h] >= 0]
            sel[b, h, j] = True
    return np.where(sel, 0.0, p).sum(-1)


@pytest.mark.parametrize("eps", [0.0, 0.01, 0.2])
@pytest.mark.parametrize("spread", [0.5, 3.0, 1e4])
def test_lorann_dynamic_k_certificate_holds_on_every_row(eps, spread):
    """With an index that misses keys, the rigorous bound still covers the true outside mass on
    every row, certified rows have true mass <= eps, and nothing is NaN even for logits ~1e4."""
    rng = np.random.default_rng(int(spread * 10) % 97)
    B, H, S, D, P, W = 2, 4, 48, 10, 1, 2
    q, keys = _random_cache(rng, B, H, S, D, spread=spread)
    sel = LorannSelector(n_clusters=6, clusters_to_search=2, points_to_rerank=8, rank=4,
                         tail_bound=eps, max_topk=S - 8, seed=0)
    cache = _C(keys, C=6)
    sel.begin_prefill()
    sel(q, cache, topk=4, sinks=P, window=W, scale=0.3)  # records queries; exact
    sel.end_prefill()
    idx = sel(q * 1.1, cache, topk=4, sinks=P, window=W, scale=0.3)
    info = sel.last_info
    true_out = _dense_out_mass(q * 1.1, keys, idx, 0.3)
    assert np.isfinite(true_out).all() and not np.isnan(info["certified_bound"]).any()
    assert np.all(true_out <= info["certified_bound"] * (1 + 1e-9) + 1e-12)
    cert = info["certified"]
    assert np.all(true_out[cert] <= eps + 1e-12)
    k = info["k"]
    assert np.all((k >= 1) & (k <= S - 8))
    if eps == 0.0:  # eps = 0 takes every key the index returned (up to the cap)
        np.testing.assert_array_equal(k, np.minimum(info["n_returned"], S - 8))
    np.testing.assert_array_equal((idx[..., P + W:] >= 0).sum(-1), k)


def test_lorann_dynamic_k_at_full_recall_equals_exact_dynamic_k():
    rng = np.random.default_rng(9)
    B, H, S, D = 2, 3, 40, 8
    q, keys = _random_cache(rng, B, H, S, D, spread=2.0)
    for eps in (0.0, 0.02):
        ex = ExactSelector(tail_bound=eps, max_topk=12)
        lo = LorannSelector(**FULL, n_clusters=4, tail_bound=eps, max_topk=12, refit_factor=2.0)
        cache = _C(keys[:, :20], C=5)  # one cache that grows: prefill over 20 keys, decode over 40
        lo.begin_prefill()
        lo(q, cache, topk=3, sinks=1, window=2, scale=0.5)
        lo.end_prefill()
        assert lo.builds == B  # prefill built one index per batch element...
        cache.keys = keys
        a = ex(q, _C(keys), topk=3, sinks=1, window=2, scale=0.5)
        b = lo(q, cache, topk=3, sinks=1, window=2, scale=0.5)
        assert lo.builds == 2 * B  # ...and the doubled cache (refit_factor 2) rebuilt them
        np.testing.assert_array_equal(a, b)
        _, info = select_dynamic_topk(q[:, :, None], keys[:, None], tail_bound=eps, max_topk=12,
                                      causal=True, scale=0.5, sinks=1, window=2, impl="numpy")
        np.testing.assert_array_equal(lo.last_info["certified"], info["certified"][:, :, 0])
        np.testing.assert_array_equal(lo.last_info["k"], info["k"][:, :, 0])


def test_dynamic_k_from_ranked_edge_cases():
    vals = np.array([[2.0, 1.0, 0.0, -np.inf], [-np.inf] * 4, [1e4, 1e4 - 1, 0.0, -5.0]])
    k, cert, nom, rig = dynamic_k_from_ranked(vals, np.full(3, -np.inf), np.array([3, 0, 4]),
                                              tail_bound=0.0, max_topk=4)
    np.testing.assert_array_equal(k, [3, 0, 4])
    assert cert.all() and np.isfinite(rig).all()
    # a row whose unreturned keys are unbounded is never certified
    k, cert, nom, rig = dynamic_k_from_ranked(vals[:1], np.full(1, -np.inf), np.array([10]),
                                              tail_bound=0.5, max_topk=4, n_ret=np.array([3]))
    assert not cert[0] and rig[0] == np.inf
    # ...but is once they are bounded far below the selection
    k, cert, nom, rig = dynamic_k_from_ranked(vals[:1], np.full(1, -np.inf), np.array([10]),
                                              tail_bound=0.5, max_topk=4, n_ret=np.array([3]),
                                              outside_upper=np.array([-50.0]))
    assert cert[0] and rig[0] <= 0.5


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="recall"):
        SimulatedRecallSelector(0.0)
    with pytest.raises(ValueError, match="tail_bound"):
        ExactSelector(tail_bound=1.0)
    with pytest.raises(ValueError, match="max_topk"):
        ExactSelector(max_topk=3)
    with pytest.raises(ValueError, match="clusters_to_search"):
        LorannSelector(clusters_to_search=1.5)
    with pytest.raises(ValueError, match="refit_factor"):
        LorannSelector(refit_factor=1.0)
    with pytest.raises(TypeError, match="n_clusters"):
        LorannSelector(n_clusters=2.5)
    m = _model(attention="mha", n_kv_heads=1, head_dim=4)
    with pytest.raises(TypeError, match="MLA latent cache"):
        decode_teacher_forced(m, _tokens(T=6), selectors=[LorannSelector(), LorannSelector()], prompt_len=2)
    with pytest.raises(ValueError, match="prompt_len"):
        decode_teacher_forced(_model(), _tokens(T=6), selectors=[ExactSelector()] * 2, prompt_len=9)


@pytest.mark.parametrize("bits,gdim", [(8, 10), (4, 12), (None, 10)])
def test_index_grown_by_add_then_refit_equals_a_build_on_the_same_clusters(monkeypatch, bits, gdim):
    """Approximate scores (no re-rank), several clusters, quantised: build on X0, add X1 one point
    at a time (the decoding case) and refit == build on X0 + X1 with the same centroids."""
    from topkattn.ann import index as index_mod

    rng = np.random.default_rng(1)
    x = rng.standard_normal((400, 12)).astype(np.float32)
    tq = (rng.standard_normal((300, 12)) @ rng.standard_normal((12, 12)) * 0.5).astype(np.float32)
    q = tq[:20] + 0.1
    kw = dict(global_dim=gdim, rank=4, train_size=2, quantization_bits=bits, seed=0)
    a = LorannIndex(x[:250], 5, refit_growth=None, **kw)  # no lazy refit: only refit() below
    a.build(training_queries=tq)
    for row in x[250:]:
        a.add(row)
    assert len(a.stale_clusters) > 0
    a.refit()
    cent = a._cent.copy()
    monkeypatch.setattr(index_mod.kmeans, "kmeans", lambda *args, **kws: cent.copy())
    b = LorannIndex(x, 5, **kw)
    b.build(training_queries=tq)
    np.testing.assert_array_equal(a.cluster_sizes, b.cluster_sizes)
    for w in (2, 5):
        ia, da = a.search(q, 8, w, 0, return_distances=True)
        ib, db = b.search(q, 8, w, 0, return_distances=True)
        np.testing.assert_allclose(da, db, rtol=1e-4, atol=1e-4)
        assert (ia == ib).mean() > 0.97  # ids agree but for float32 near-ties


# -- synchronous index maintenance and argument checks --------------------------------------------
def test_lorann_synchronous_maintenance_splits_in_the_decode_step():
    """background=False: a cluster grown past max_cluster_size is split in the step that grew it
    (it used to grow without bound: 4 clusters, the largest 86 keys over a threshold of 35),
    and the selection at full recall settings still equals exact top-k."""
    m = _model(topk=4)
    toks = np.random.default_rng(0).integers(0, 24, (1, 310))
    ex = [_Recording(ExactSelector()) for _ in range(2)]
    lo = [_Recording(LorannSelector(**FULL, background=False, split_factor=2.0)) for _ in range(2)]
    a = decode_teacher_forced(m, toks, selectors=ex, prompt_len=10)
    b = decode_teacher_forced(m, toks, selectors=lo, prompt_len=10)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    for se, sl in zip(ex, lo):
        for ie, il in zip(se.idx, sl.idx):
            np.testing.assert_array_equal(np.sort(ie, -1), np.sort(il, -1))
        assert len(sl.sizes) == 300
        assert all(big <= cap for step in sl.sizes for big, cap in step)  # after every decode step
        idx = sl.inner.indexes[0]
        assert not idx.maintenance_pending
        assert idx.maintenance_jobs["split"] > 0 and idx.n_clusters > 4
        assert idx.cluster_sizes.max() <= idx.max_cluster_size
        assert sl.inner.stats.recall == 1.0


class _Cache:
    def __init__(self, keys):
        self.keys = keys


@pytest.mark.parametrize("make", [ExactSelector, lambda: SimulatedRecallSelector(0.9), LorannSelector],
                         ids=["exact", "simulated", "lorann"])
@pytest.mark.parametrize("kw,err,name", [
    (dict(topk=0), ValueError, "topk"), (dict(topk=-1), ValueError, "topk"),
    (dict(topk=2.5), TypeError, "topk"), (dict(topk="auto"), TypeError, "topk"),
    (dict(topk=True), TypeError, "topk"),
    (dict(sinks=-1), ValueError, "sinks"), (dict(sinks=1.0), TypeError, "sinks"),
    (dict(window=-1), ValueError, "window"), (dict(window=None), TypeError, "window"),
])
def test_selector_call_checks_topk_sinks_window(make, kw, err, name):
    rng = np.random.default_rng(0)
    q, cache = rng.standard_normal((1, 2, 6)), _Cache(rng.standard_normal((1, 9, 6)))
    args = dict(topk=3, sinks=1, window=2, scale=0.5)
    sel = make()
    with pytest.raises(err, match=name):
        sel(q, cache, **{**args, **kw})
    out = make()(q, cache, **{**args, "topk": np.int64(3)})  # NumPy ints are fine
    assert out.shape == (1, 2, 6)


@pytest.mark.parametrize("kw,err", [
    (dict(refit_growth=-1), ValueError), (dict(refit_growth=0), ValueError), (dict(refit_growth="x"), TypeError),
    (dict(refit_growth=float("nan")), ValueError),
    (dict(seed=-1), ValueError), (dict(seed="a"), TypeError), (dict(seed=1.5), TypeError),
    (dict(seed=None), TypeError), (dict(seed=True), TypeError),
    (dict(quantization_bits=8.0), TypeError), (dict(quantization_bits=6), ValueError),
    (dict(measure_recall="no"), TypeError),
])
def test_lorann_selector_checks_settings_at_construction(kw, err):
    name = next(iter(kw))
    with pytest.raises(err, match=name):
        LorannSelector(**kw)


def test_lorann_selector_settings_accepted():
    sel = LorannSelector(refit_growth=None, seed=np.int64(7), quantization_bits=np.int64(4))
    assert sel.refit_growth is None and sel.seed == 7 and type(sel.seed) is int and sel.quantization_bits == 4
    assert LorannSelector(refit_growth=1).refit_growth == 1.0


def test_selector_factory_checks_seed():
    with pytest.raises(ValueError, match="seed"):
        selector_factory("lorann", 2, seed=-1)
    with pytest.raises(TypeError, match="seed"):
        selector_factory("exact", 2, seed="a")


@pytest.mark.parametrize("kw,err,name", [
    (dict(max_topk=0), ValueError, "max_topk"), (dict(max_topk=-3), ValueError, "max_topk"),
    (dict(max_topk=2.7), TypeError, "max_topk"), (dict(max_topk=None), TypeError, "max_topk"),
    (dict(tail_bound=-1), ValueError, "tail_bound"), (dict(tail_bound=1.5), ValueError, "tail_bound"),
    (dict(tail_bound=1.0), ValueError, "tail_bound"), (dict(tail_bound=float("nan")), ValueError, "tail_bound"),
    (dict(tail_bound="0.1"), TypeError, "tail_bound"), (dict(tail_bound=None), TypeError, "tail_bound"),
])
def test_dynamic_k_from_ranked_checks_tail_bound_and_max_topk(kw, err, name):
    vals = np.array([[3.0, 1.0, -np.inf]])
    args = dict(tail_bound=0.1, max_topk=2)
    with pytest.raises(err, match=name):
        dynamic_k_from_ranked(vals, np.full(1, -np.inf), np.array([3]), **{**args, **kw})
    k, cert, _, _ = dynamic_k_from_ranked(vals, np.full(1, -np.inf), np.array([2]), tail_bound=np.float32(0.0),
                                          max_topk=np.int64(2))
    assert k.tolist() == [2] and cert.tolist() == [True]


@pytest.mark.parametrize("refit_factor", [None, 1.2])
def test_lorann_non_finite_query_is_refused_without_poisoning_later_builds(refit_factor):
    """A NaN query used to join the training queries before any check, so every later build
    (on the next clean query, or the next rebuild) failed with an error naming training_queries."""
    keys = np.random.default_rng(0).standard_normal((1, 40, 6)).astype(np.float32)
    s = LorannSelector(n_clusters=3, refit_factor=refit_factor, **{k: v for k, v in FULL.items()
                                                                  if k != "quantization_bits"})
    ref = ExactSelector()
    q = np.random.default_rng(1).standard_normal((1, 2, 6)).astype(np.float32)
    if refit_factor is not None:  # an index built first; the rebuild comes after the bad step
        s(q, _Cache(keys), topk=3)
    bad = q.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="query contains non-finite"):
        s(bad, _Cache(keys), topk=3)
    grown = np.concatenate([keys, np.random.default_rng(2).standard_normal((1, 11, 6)).astype(np.float32)], 1)
    for kk in (keys, grown):  # the grown cache (51 keys) makes refit_factor=1.2 rebuild
        got = s(q, _Cache(kk), topk=3)
        want = ref(q, _Cache(kk), topk=3)
        np.testing.assert_array_equal(np.sort(got, -1), np.sort(want, -1))
