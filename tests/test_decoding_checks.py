"""Decoding selectors: synchronous index maintenance, and argument checks (selector calls,
LorannSelector settings, dynamic_k_from_ranked)."""
import numpy as np
import pytest

from topkattn.decoding import (
    ExactSelector,
    LorannSelector,
    SimulatedRecallSelector,
    decode_teacher_forced,
    dynamic_k_from_ranked,
)
from topkattn.decoding.runner import selector_factory
from topkattn.model import Transformer, TransformerConfig

FULL = dict(clusters_to_search=1.0, points_to_rerank=10**6, quantization_bits=None)


def _model(**kw):
    cfg = dict(vocab_size=24, d_model=16, n_layers=2, n_heads=2, q_lora_rank=8, kv_lora_rank=8,
               qk_nope_dim=4, qk_rope_dim=4, v_head_dim=4, d_ff=16, topk=3, dtype="float64", seed=1)
    cfg.update(kw)
    return Transformer(TransformerConfig(**cfg))


class _Recording:
    """Wraps a selector; keeps every idx and, after each decode step, each index's largest
    cluster and split threshold."""

    def __init__(self, inner):
        self.inner, self.idx, self.sizes = inner, [], []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, query, cache, **kw):
        out = self.inner(query, cache, **kw)
        self.idx.append(out.copy())
        indexes = getattr(self.inner, "indexes", None)
        if not self.inner.prefilling and indexes and indexes[0] is not None:
            self.sizes.append([(int(ix.cluster_sizes.max()), ix.max_cluster_size) for ix in indexes])
        return out


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
