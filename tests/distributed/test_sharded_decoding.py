"""Sharded decoding (the cache sharded by position) against the single-process decode.

Runs in the plain test run with one rank and in CI under ``mpiexec -n 2 python -m pytest
tests/distributed`` (every rank decodes the same tokens, stores and searches its own positions).
Needs mpi4py (``pip install -e ".[mpi]"``); skipped without it.
"""
import numpy as np
import pytest

pytest.importorskip("mpi4py")

from topkattn.decoding import ExactSelector, LorannSelector, decode_teacher_forced
from topkattn.decoding.runner import selector_factory
from topkattn.distributed import (
    ShardedMLA,
    ShardedMLACache,
    ShardedSelector,
    head_parallel,
    shard_decoding,
    shard_positions,
    sharded_layers,
    sharded_selector_factory,
    world,
)
from topkattn.distributed.exchange import spec_bytes
from topkattn.distributed.sharded_layers import attend_selection
from topkattn.layers import MLA
from topkattn.model import Transformer, TransformerConfig
from topkattn.ops.selection import select_decode
from topkattn.ops.sparse_attention import sparse_attention_decode
from topkattn.testing import tolerance

COMM = world()
BLOCK = 4  # small blocks: every rank owns keys of a short sequence
PROMPT = 6

CASES = {
    "mla": dict(),
    "sinks+window": dict(persistent_tokens=2, window=3),
    "dense": dict(topk=None),
    "mha-gqa": dict(attention="mha", n_heads=4, n_kv_heads=2, head_dim=4, persistent_tokens=1, window=2),
}


def _model(**kw):
    cfg = dict(vocab_size=23, d_model=16, n_layers=2, n_heads=2, q_lora_rank=8, kv_lora_rank=8, qk_nope_dim=4,
               qk_rope_dim=4, v_head_dim=4, d_ff=24, topk=4, seed=3)
    cfg.update(kw)
    return Transformer(TransformerConfig(**cfg))


def _sharded(**kw):
    return shard_decoding(_model(**kw), COMM, block=BLOCK)


def _tokens(B=2, T=22, seed=1):
    return np.random.default_rng(seed).integers(0, 23, size=(B, T))  # the same on every rank


class Recording(ExactSelector):
    """The single-process exact selector, keeping every step's index tensor."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.seen = []

    def __call__(self, *a, **k):
        idx = super().__call__(*a, **k)
        self.seen.append(np.array(idx))
        return idx


class RecordingSharded(ShardedSelector):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.seen = []

    def select(self, *a, **k):
        sel = super().select(*a, **k)
        self.seen.append(np.array(sel.idx))
        return sel


def _decode(model, selectors, tokens, prompt_len=PROMPT):
    return decode_teacher_forced(model, tokens, selectors=selectors, prompt_len=prompt_len)


def _full_search_lorann(**kw):
    return LorannSelector(clusters_to_search=1.0, points_to_rerank=1000, quantization_bits=None, rank=4, **kw)


def _assert_same_selections(got, ref):
    assert len(got) == len(ref) > 0
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(g, r)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", list(CASES))
def test_exact_decode_equals_one_process(case, dtype):
    """Logits to the dtype's tolerance, the selected global positions and the stats exactly."""
    kw = dict(CASES[case], dtype=dtype)
    ref_sels = [Recording() for _ in range(2)]
    ref = _decode(_model(**kw), ref_sels, _tokens())
    sels = [RecordingSharded(ExactSelector, COMM) for _ in range(2)]
    got = _decode(_sharded(**kw), sels, _tokens())
    np.testing.assert_allclose(got, ref, **tolerance(dtype))
    if kw.get("topk", 4) is None:
        return  # dense: no selection
    for s, r in zip(sels, ref_sels):
        _assert_same_selections(s.seen, r.seen)
        assert s.stats.to_dict() == r.stats.to_dict()
        assert s.stats.rows > 0 and s.stats.recall == 1.0


@pytest.mark.parametrize("case", ["mla", "sinks+window", "mha-gqa"])
def test_each_rank_stores_only_its_positions(case, monkeypatch):
    """Memory per rank ~ S / ranks: the cache's rows are exactly this rank's positions (within
    a block of S / ranks), holding the single-process cache's rows; the latents of the others'
    positions are never computed here."""
    kw = CASES[case]
    ref_model, model = _model(**kw), _sharded(**kw)
    latents = []
    real = sharded_layers.rope_apply
    monkeypatch.setattr(sharded_layers, "rope_apply", lambda *a, **k: latents.append(1) or real(*a, **k))
    tokens = _tokens(B=2, T=30)
    ref_cache, cache = ref_model.init_cache(2), model.init_cache(2)
    for t in range(tokens.shape[1]):
        ref_model.step(tokens[:, t:t + 1], ref_cache)
        model.step(tokens[:, t:t + 1], cache)
    P = kw.get("persistent_tokens", 0)
    S = P + tokens.shape[1]
    mine = shard_positions(S, COMM.rank, COMM.size, BLOCK)
    for layer, (rc, c) in enumerate(zip(ref_cache, cache)):
        assert c.n_rows == S and c.n_tokens == tokens.shape[1]
        assert c.keys.shape[-2] == len(mine) <= -(-S // (BLOCK * COMM.size)) * BLOCK  # ~ S / ranks rows
        np.testing.assert_array_equal(c.positions, mine)
        if kw.get("attention") == "mha":
            np.testing.assert_allclose(c.keys, rc.keys[:, :, mine], **tolerance(np.float32))
            np.testing.assert_allclose(c.values, rc.values[:, :, mine], **tolerance(np.float32))
        elif layer == 0:  # the first layer's latents come from the same embedding: bit for bit
            np.testing.assert_array_equal(c.keys, rc.keys[:, mine])
        else:
            np.testing.assert_allclose(c.keys, rc.keys[:, mine], **tolerance(np.float32))
    assert sum(COMM.allgather(cache[0].keys.shape[-2])) == S  # the ranks' rows partition the cache
    if kw.get("attention") != "mha":  # MLA: one latent computed per owned token position and layer
        assert len(latents) == 2 * int((mine >= P).sum())


@pytest.mark.parametrize("kw", [dict(), dict(persistent_tokens=2, window=3)])
def test_lorann_per_shard_index_at_full_search_equals_exact(kw):
    ref_sels = [Recording() for _ in range(2)]
    ref = _decode(_model(**kw), ref_sels, _tokens())
    sels = [RecordingSharded(_full_search_lorann, COMM) for _ in range(2)]
    got = _decode(_sharded(**kw), sels, _tokens())
    np.testing.assert_allclose(got, ref, **tolerance(np.float32))
    for s, r in zip(sels, ref_sels):
        _assert_same_selections(s.seen, r.seen)
        assert s.stats.recall == 1.0 and s.stats.wanted > 0
        assert s.inner.searches > 0  # the index was searched, not bypassed
        view = s._view  # the candidates this rank owns: its indexes hold exactly those, no other rank's
        own = shard_positions(view.cache.n_rows, COMM.rank, COMM.size, BLOCK)
        S = view.cache.n_rows
        P, W = kw.get("persistent_tokens", 0), kw.get("window", 0)
        n_own_cand = int(((own >= P) & (own < S - 1 - W + 1)).sum())  # the last step's candidates
        assert view.hi - view.lo == n_own_cand
        assert all(len(ix) == n_own_cand for ix in s.inner.indexes)


def test_lorann_recall_is_measured_on_the_merged_selection():
    """A coarse index (one cluster of many searched, no reranking) misses keys: the recall every
    rank reports is the same, below 1, and that of the merged selection against exact top-k."""
    def coarse():
        return LorannSelector(n_clusters=6, clusters_to_search=1, points_to_rerank=0, quantization_bits=8, rank=2)

    sels = [ShardedSelector(coarse, COMM) for _ in range(2)]
    _decode(_sharded(), sels, _tokens(T=40))
    recalls = COMM.allgather([(s.stats.hits, s.stats.wanted, list(s.stats.rank_hits)) for s in sels])
    assert all(r == recalls[0] for r in recalls)
    assert any(h < w for h, w, _ in recalls[0])


@pytest.mark.parametrize("first", [1, 3, 32])
def test_dynamic_k_equals_one_process(first):
    """Dynamic k after the merge: the same k, selection, certificates and logits as one process,
    whether the first exchange offers enough candidates or more rounds are needed."""
    ref_sels = [Recording(tail_bound=0.05, max_topk=8) for _ in range(2)]
    ref = _decode(_model(persistent_tokens=1, window=2), ref_sels, _tokens(T=26))
    sels = [RecordingSharded(lambda: ExactSelector(tail_bound=0.05, max_topk=8), COMM, dynamic_first=first)
            for _ in range(2)]
    got = _decode(_sharded(persistent_tokens=1, window=2), sels, _tokens(T=26))
    np.testing.assert_allclose(got, ref, **tolerance(np.float32))
    for s, r in zip(sels, ref_sels):
        _assert_same_selections(s.seen, r.seen)
        assert s.stats.to_dict() == r.stats.to_dict()
    assert 0 < sels[0].stats.certified < sels[0].stats.rows  # some rows certified, some at the cap
    if first < 8:  # some row chose more keys than the first exchange offered: a second round ran
        assert sels[0].stats.k_hist[first + 1:].sum() > 0


def test_dynamic_k_lorann_at_full_search_equals_exact():
    ref_sels = [Recording(tail_bound=0.05, max_topk=8) for _ in range(2)]
    ref = _decode(_model(), ref_sels, _tokens())
    sels = [RecordingSharded(lambda: _full_search_lorann(tail_bound=0.05, max_topk=8), COMM, dynamic_first=2)
            for _ in range(2)]
    got = _decode(_sharded(), sels, _tokens())
    np.testing.assert_allclose(got, ref, **tolerance(np.float32))
    for s, r in zip(sels, ref_sels):
        _assert_same_selections(s.seen, r.seen)
        assert s.stats.to_dict() == r.stats.to_dict()  # k, certificates (every key accounted for), recall


def test_dynamic_k_lorann_certificate_is_conservative():
    """A coarse index: the certified fraction (Cauchy-Schwarz for the keys no rank returned) is
    at most the exact one, the same on every rank, and the k of each row at most the cap."""
    def coarse():
        return LorannSelector(n_clusters=4, clusters_to_search=1, points_to_rerank=0, rank=2, tail_bound=0.05,
                              max_topk=8)

    sels = [ShardedSelector(coarse, COMM) for _ in range(2)]
    _decode(_sharded(), sels, _tokens(T=40))
    ref_sels = [ExactSelector(tail_bound=0.05, max_topk=8) for _ in range(2)]
    _decode(_model(), ref_sels, _tokens(T=40))
    got = COMM.allgather([s.stats.to_dict() for s in sels])
    assert all(g == got[0] for g in got)
    for s, r in zip(sels, ref_sels):
        assert s.stats.rows == r.stats.rows > 0 and s.stats.dynamic_rows == s.stats.rows
        assert s.stats.certified <= r.stats.certified
        assert len(s.stats.k_hist) <= 9


def test_layer_dynamic_k_without_selector_equals_one_process():
    """topk='auto' on the layer and no selector: exact dynamic k under the layer's tail_bound."""
    rng = np.random.default_rng(4)
    layer = MLA(12, 2, 6, 6, 4, 4, 4, topk="auto", seed=5, persistent_tokens=1, window=1, tail_bound=0.02,
                max_topk=6)
    ref_layer = MLA(12, 2, 6, 6, 4, 4, 4, topk="auto", seed=5, persistent_tokens=1, window=1, tail_bound=0.02,
                    max_topk=6)
    sharded = ShardedMLA(layer, COMM, block=3)
    ref_cache, cache = ref_layer.init_cache(2), sharded.init_cache(2)
    ks = []
    for _ in range(20):
        x = rng.standard_normal((2, 1, 12)).astype(np.float32)
        np.testing.assert_allclose(sharded.step(x, cache), ref_layer.step(x, ref_cache), **tolerance(np.float32))
        ks.append(np.array(sharded.last_selection.k))
        assert sharded.last_selection.certified is not None
    assert len(np.unique(ks)) > 1  # k varies per row: dynamic


def test_factory_wraps_every_layer_and_decodes_like_one_process():
    model, tokens = _sharded(persistent_tokens=1, window=2), _tokens()
    make = sharded_selector_factory(selector_factory("exact", 2), COMM)
    sels = make(0)
    assert len(sels) == 2 and all(isinstance(s, ShardedSelector) for s in sels)
    np.testing.assert_allclose(_decode(model, sels, tokens),
                               _decode(_model(persistent_tokens=1, window=2), [ExactSelector() for _ in range(2)],
                                       tokens), **tolerance(np.float32))


def test_a_second_decode_starts_a_fresh_shard():
    model = _sharded()
    sel = [ShardedSelector(_full_search_lorann, COMM) for _ in range(2)]
    ref = _decode(_model(), [ExactSelector() for _ in range(2)], _tokens(seed=5))
    _decode(model, sel, _tokens(seed=4))
    first = sel[0].inner
    np.testing.assert_allclose(_decode(model, sel, _tokens(seed=5)), ref, **tolerance(np.float32))
    assert sel[0].inner is not first


class _CountingComm:
    """COMM, counting the bytes this rank hands to each kind of collective."""

    def __init__(self):
        self.sent = {}

    def __getattr__(self, name):
        return getattr(COMM, name)

    def _add(self, kind, n):
        c, b = self.sent.get(kind, (0, 0))
        self.sent[kind] = (c + 1, b + n)

    def Allgather(self, send, recv):
        self._add("Allgather", send.nbytes)
        return COMM.Allgather(send, recv)

    def Allreduce(self, send, recv, op=None):
        self._add("Allreduce", send.nbytes)
        return COMM.Allreduce(send, recv, op=op)

    def allgather(self, obj):
        self._add("allgather", 0)
        return COMM.allgather(obj)


@pytest.mark.parametrize("kw", [dict(), dict(topk=None)])
def test_bytes_per_step_do_not_grow_with_the_cache(kw):
    """Per layer and step: one Allgather of 8 + B*H*(8 + K'*(4 + 4)) bytes (status, forced
    logsumexp, candidate scores and int32 positions) and one Allreduce of B*H*C*4 (dense: the
    logsumexp and the Allreduce), the same for a cache of 24 and of 96 positions."""
    per_step = []
    for T in (24, 96):
        cc = _CountingComm()
        model = shard_decoding(_model(**kw), cc, block=BLOCK)
        sels = [ShardedSelector(ExactSelector, cc) for _ in range(2)]
        tokens = _tokens(B=2, T=T)
        for layer, s in zip(model.blocks, sels):
            layer.attn.selector = s
        cache = model.init_cache(2)
        for t in range(T - 1):
            model.step(tokens[:, t:t + 1], cache)
        cc.sent = {}
        model.step(tokens[:, T - 1:], cache)
        per_step.append(cc.sent)
    n, K, C = 2 * 2, 4, 8
    gather = spec_bytes([("lse", (n,), np.float64)] + ([] if kw else [("s", (n, K), np.float32),
                                                                        ("j", (n, K), np.int32)]))
    assert per_step[0] == per_step[1] == {"Allgather": (2, 2 * gather), "Allreduce": (2, 2 * n * C * 4)}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_attention_merge_matches_one_process_with_nan_and_huge_logits(dtype):
    """attend_selection over a shard against select_decode + sparse_attention_decode on the whole
    cache: a NaN key gives NaN in its batch row only; logits near 1e4 do not overflow."""
    rng = np.random.default_rng(7)
    B, H, S, C, R = 3, 4, 37, 6, 2
    full = rng.standard_normal((B, S, C + R)).astype(dtype)
    full[1, 9, 0] = np.nan
    full[2] *= 300.0  # scores up to ~1e4
    query = rng.standard_normal((B, H, C + R)).astype(dtype)
    query[2] *= 30.0
    cache = ShardedMLACache(np, B, C, R, dtype, {}, owner=None, rank=COMM.rank, ranks=COMM.size, block=5)
    cache.extend(full)
    scale = 0.3
    sel = ShardedSelector(ExactSelector, COMM).select(query, cache, topk=6, sinks=2, window=3, scale=scale)
    out = attend_selection(COMM, query, cache.keys, cache.keys[..., :C], sel)
    idx, _, _ = select_decode(query, full, topk=6, sinks=2, window=3, scale=scale)
    np.testing.assert_array_equal(sel.idx, idx)
    ref = sparse_attention_decode(query, full[:, None], full[:, None, :, :C], idx, scale)
    assert np.isnan(out[1]).all() and np.isnan(ref[1]).all()
    assert np.isfinite(out[[0, 2]]).all()
    np.testing.assert_allclose(out[[0, 2]], ref[[0, 2]], **tolerance(dtype))


def test_errors_name_the_argument():
    with pytest.raises(TypeError, match="inner_factory"):
        ShardedSelector(None, COMM)
    with pytest.raises(TypeError, match="comm"):
        ShardedSelector(ExactSelector, object())
    with pytest.raises(TypeError, match="inner_factory"):
        ShardedSelector(lambda: "exact", COMM)
    with pytest.raises(ValueError, match="dynamic_first"):
        ShardedSelector(ExactSelector, COMM, dynamic_first=0)
    with pytest.raises(ValueError, match="block"):
        shard_decoding(_model(), COMM, block=0)
    with pytest.raises(TypeError, match="comm"):
        shard_decoding(_model(), object())
    with pytest.raises(TypeError, match="layer"):
        ShardedMLA("mla", COMM)
    if 2 % COMM.size == 0:
        with pytest.raises(ValueError, match="head_parallel"):
            shard_decoding(head_parallel(_model(), COMM), COMM)
    plain = _model()  # a ShardedSelector needs a sharded cache
    with pytest.raises(TypeError, match="shard_decoding"):
        _decode(plain, [ShardedSelector(ExactSelector, COMM) for _ in range(2)], _tokens())
    with pytest.raises(TypeError, match="ShardedSelector"):  # a sharded layer needs a sharded selector
        _decode(_sharded(), [ExactSelector() for _ in range(2)], _tokens())


def test_an_error_on_one_rank_is_raised_on_every_rank():
    """A shard whose inner selector fails does not leave the other ranks waiting."""
    class Failing(LorannSelector):
        def _select(self, *a, **k):
            if COMM.rank == COMM.size - 1:
                raise ValueError("index broke")
            return super()._select(*a, **k)

    sels = [ShardedSelector(Failing, COMM) for _ in range(2)]
    with pytest.raises((ValueError, RuntimeError), match="index broke"):
        _decode(_sharded(), sels, _tokens())


@pytest.mark.parametrize("kw,needle", [({"topk": 0}, "topk must be an integer >= 1"),
                                       ({"topk": 2.5}, "topk must be an integer"),
                                       ({"topk": 2, "sinks": -1}, "sinks must be an integer >= 0"),
                                       ({"topk": 2, "window": -1}, "window must be an integer >= 0")])
def test_sharded_selector_checks_topk_sinks_window(kw, needle):
    # checked before anything else (on every rank alike: no rank is left waiting in a collective)
    with pytest.raises((TypeError, ValueError), match=needle):
        ShardedSelector(ExactSelector, COMM)(np.zeros((1, 2, 4)), None, **kw)


@pytest.mark.parametrize("name,mine", [("block", lambda r: dict(block=BLOCK + r)), ("topk", lambda r: dict(topk=4 + r)),
                                       ("seed", lambda r: dict(seed=3 + r)), ("window", lambda r: dict(window=r)),
                                       ("n_layers", lambda r: dict(n_layers=2 + r))])
def test_models_differing_across_ranks_fail_every_rank_naming_them(name, mine):
    # nothing was compared: another block, seed or window decoded silently wrong, another topk or
    # n_layers broke a collective ("Message truncated") or left a rank waiting
    kw = dict(block=BLOCK) | mine(COMM.rank)
    block = kw.pop("block")
    if COMM.size == 1:  # one rank agrees with itself
        shard_decoding(_model(**kw), COMM, block=block)
        return
    with pytest.raises(ValueError, match=f"shard_decoding needs the same ([a-z_]+, )*{name}(, [a-z_]+)* on every "
                                         f"rank, got rank 0: .*{name}="):
        shard_decoding(_model(**kw), COMM, block=block)
    model = _model()
    model.blocks[1].attn.topk = 4 + COMM.rank  # a layer changed after construction: its own check names it
    with pytest.raises(ValueError, match="sharded decoding needs the same topk on every rank, got rank 0: topk=4"):
        shard_decoding(model, COMM, block=BLOCK)


def test_a_batch_differing_across_ranks_fails_every_rank():
    # another batch broke the first step's exchange (its size): init_cache compares it, once per cache
    model = _sharded()
    if COMM.size == 1:
        model.init_cache(2 + COMM.rank)
        return
    with pytest.raises(ValueError, match="sharded decoding needs the same batch on every rank, got rank 0: batch=2"):
        model.init_cache(2 + COMM.rank)
    bad = 0 if COMM.rank == COMM.size - 1 else 2  # one rank's invalid batch: every rank raises
    expected = (ValueError, "batch must be") if COMM.rank == COMM.size - 1 else (RuntimeError, "failed: ValueError")
    with pytest.raises(expected[0], match=expected[1]):
        model.init_cache(bad)
