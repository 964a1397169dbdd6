"""Sharded decoding against the single-process decode.

Runs in the plain test run with one rank and in CI under ``mpiexec -n 2 python -m pytest
tests/distributed`` (every rank decodes the same tokens and searches its own positions).
Needs mpi4py (``pip install -e ".[mpi]"``); skipped without it.
"""
import numpy as np
import pytest

pytest.importorskip("mpi4py")

from topkattn.decoding import ExactSelector, LorannSelector, decode_teacher_forced
from topkattn.decoding.runner import selector_factory
from topkattn.distributed import ShardedSelector, shard_positions, sharded_selector_factory, world
from topkattn.model import Transformer, TransformerConfig

COMM = world()
BLOCK = 4  # small blocks: every rank owns keys of a short sequence

CASES = [
    dict(),
    dict(persistent_tokens=2, window=3),
]


def _model(**kw):
    cfg = TransformerConfig(vocab_size=23, d_model=16, n_layers=2, n_heads=2, q_lora_rank=8, kv_lora_rank=8,
                            qk_nope_dim=4, qk_rope_dim=4, v_head_dim=4, d_ff=24, topk=4, seed=3, **kw)
    return Transformer(cfg)


def _tokens(B=2, T=22, seed=1):
    return np.random.default_rng(seed).integers(0, 23, size=(B, T))  # the same on every rank


def _decode(model, selectors, tokens, prompt_len=6):
    return decode_teacher_forced(model, tokens, selectors=selectors, prompt_len=prompt_len)


def _full_search_lorann():
    return LorannSelector(clusters_to_search=1.0, points_to_rerank=1000, quantization_bits=None, rank=4)


@pytest.mark.parametrize("kw", CASES)
def test_sharded_exact_equals_one_process_bit_for_bit(kw):
    model, tokens = _model(**kw), _tokens()
    ref_sels = [ExactSelector() for _ in model.blocks]
    ref = _decode(model, ref_sels, tokens)
    sels = [ShardedSelector(ExactSelector, COMM, block=BLOCK) for _ in model.blocks]
    got = _decode(model, sels, tokens)
    np.testing.assert_array_equal(got, ref)
    for s, r in zip(sels, ref_sels):  # stats of the merged selection: those of one process
        assert s.stats.to_dict() == r.stats.to_dict()
        assert s.stats.rows > 0 and s.stats.recall == 1.0


@pytest.mark.parametrize("kw", CASES)
def test_sharded_lorann_at_full_search_equals_exact(kw):
    model, tokens = _model(**kw), _tokens()
    ref = _decode(model, [ExactSelector() for _ in model.blocks], tokens)
    sels = [ShardedSelector(_full_search_lorann, COMM, block=BLOCK) for _ in model.blocks]
    got = _decode(model, sels, tokens)
    np.testing.assert_array_equal(got, ref)
    for s in sels:
        assert s.stats.recall == 1.0 and s.stats.wanted > 0
        assert s.inner.searches > 0  # the index was searched, not bypassed
        own = s._own  # the candidate positions this rank owns: its indexes hold exactly those
        np.testing.assert_array_equal(own, shard_positions(own.max() + 1, COMM.rank, COMM.size, BLOCK)[
            -len(own):] if kw else shard_positions(own.max() + 1, COMM.rank, COMM.size, BLOCK))
        assert all(len(ix) == len(own) for ix in s.inner.indexes)


def test_sharded_lorann_recall_is_measured_on_the_merged_selection():
    """A coarse index (one cluster of many searched, no reranking) misses keys: the recall every
    rank reports is the same, below 1, and that of the merged selection against exact top-k."""
    model, tokens = _model(), _tokens(T=40)

    def coarse():
        return LorannSelector(n_clusters=6, clusters_to_search=1, points_to_rerank=0, quantization_bits=8, rank=2)

    sels = [ShardedSelector(coarse, COMM, block=BLOCK) for _ in model.blocks]
    _decode(model, sels, tokens)
    recalls = COMM.allgather([(s.stats.hits, s.stats.wanted) for s in sels])
    assert all(r == recalls[0] for r in recalls)
    assert any(h < w for h, w in recalls[0])


def test_factory_wraps_every_layer_and_decodes_like_one_process():
    model, tokens = _model(persistent_tokens=1, window=2), _tokens()
    make = sharded_selector_factory(selector_factory("exact", len(model.blocks)), COMM, block=BLOCK)
    sels = make(0)
    assert len(sels) == len(model.blocks) and all(isinstance(s, ShardedSelector) for s in sels)
    np.testing.assert_array_equal(_decode(model, sels, tokens),
                                  _decode(model, [ExactSelector() for _ in model.blocks], tokens))


def test_a_second_decode_starts_a_fresh_shard():
    model = _model()
    sel = [ShardedSelector(_full_search_lorann, COMM, block=BLOCK) for _ in model.blocks]
    ref = _decode(model, [ExactSelector() for _ in model.blocks], _tokens(seed=5))
    _decode(model, sel, _tokens(seed=4))
    np.testing.assert_array_equal(_decode(model, sel, _tokens(seed=5)), ref)


def test_shard_positions_tile_the_cache():
    n, P = 301, COMM.size
    parts = [shard_positions(n, r, P, 64) for r in range(P)]
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 64
    with pytest.raises(ValueError, match="rank"):
        shard_positions(n, P, P)


def test_errors_name_the_argument():
    with pytest.raises(TypeError, match="inner_factory"):
        ShardedSelector(None, COMM)
    with pytest.raises(TypeError, match="comm"):
        ShardedSelector(ExactSelector, object())
    with pytest.raises(ValueError, match="block"):
        ShardedSelector(ExactSelector, COMM, block=0)
    with pytest.raises(ValueError, match="tail_bound"):
        ShardedSelector(lambda: ExactSelector(tail_bound=0.1), COMM)
    with pytest.raises(TypeError, match="inner_factory"):
        ShardedSelector(lambda: "exact", COMM)


def test_an_error_on_one_rank_is_raised_on_every_rank():
    """A shard whose inner selector fails does not leave the other ranks waiting."""
    model, tokens = _model(), _tokens()

    class Failing(LorannSelector):
        def _select(self, *a, **k):
            if COMM.rank == COMM.size - 1:
                raise ValueError("index broke")
            return super()._select(*a, **k)

    sels = [ShardedSelector(Failing, COMM, block=BLOCK) for _ in model.blocks]
    with pytest.raises((ValueError, RuntimeError), match="index broke"):
        _decode(model, sels, tokens)
