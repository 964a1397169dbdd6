"""Sharded decoding of block top-k layers (MoBA: selection="block") against one process.

Each rank keeps the means of the selection blocks it owns (the sharding block a multiple of
the layer's block_size), ranks them with the step's query, and one Allgather of (score, block)
candidates chooses the global blocks; the attention over their keys is merged by log-sum-exp.
Runs in the plain test run with one rank and in CI under ``mpiexec -n 2 python -m pytest
tests/distributed``.  Needs mpi4py; skipped without it.
"""
import numpy as np
import pytest

pytest.importorskip("mpi4py")

from topkattn.decoding import ExactSelector, decode_teacher_forced
from topkattn.distributed import ShardedAttention, ShardedKVCache, ShardedMLA, shard_decoding, shard_positions, world
from topkattn.distributed.exchange import spec_bytes
from topkattn.distributed.sharded_decoding import ShardedSelector, select_blocks_sharded
from topkattn.distributed.sharded_layers import attend_selection, sharding_block
from topkattn.layers import cache as cache_module
from topkattn.layers.attention import Attention
from topkattn.layers.attention_stats import AttentionStats
from topkattn.layers.cache import BlockMeans
from topkattn.layers.mla import MLA
from topkattn.model import Transformer, TransformerConfig
from topkattn.ops.block_selection import BlockBounds, block_means, expand_blocks, select_blocks
from topkattn.ops.sparse_attention import sparse_attention_decode
from topkattn.testing import tolerance

COMM = world()
BS = 4  # selection block size
STEPS = 29  # crosses many selection and sharding block boundaries


def _mla(P=0, topk_blocks=2, dtype="float64", **kw):
    return MLA(16, 4, 8, 8, 4, 4, 6, seed=1, dtype=dtype, persistent_tokens=P, selection="block", block_size=BS,
               topk_blocks=topk_blocks, **kw)


def _gqa(P=0, topk_blocks=2, dtype="float64", **kw):
    return Attention(16, 4, 2, head_dim=8, seed=1, dtype=dtype, persistent_tokens=P, selection="block",
                     block_size=BS, topk_blocks=topk_blocks, **kw)


LAYERS = {"mla": _mla, "gqa": _gqa}
SHARDED = {"mla": ShardedMLA, "gqa": ShardedAttention}


def _x(T=STEPS, seed=0, dtype="float64"):
    return np.random.default_rng(seed).standard_normal((2, T, 16)).astype(dtype)  # the same on every rank


class _RecordBlocks:
    """Record the blocks every single-process block step chooses (wraps cache.select_block_step)."""

    def __init__(self, monkeypatch):
        self.seen = []
        real = cache_module.select_block_step

        def rec(*a, **k):
            idx, blocks = real(*a, **k)
            self.seen.append((np.array(idx), np.array(blocks)))
            return idx, blocks

        monkeypatch.setattr(cache_module, "select_block_step", rec)


def _step_both(name, x, monkeypatch, block, **kw):
    """(ref outputs, sharded outputs, ref (idx, blocks) per step, sharded (idx, blocks) per step, caches)."""
    ref, layer = LAYERS[name](**kw), LAYERS[name](**kw)
    ref.stats, layer.stats = AttentionStats(), AttentionStats()
    sharded = SHARDED[name](layer, COMM, block=block)
    rec = _RecordBlocks(monkeypatch)
    ref_cache, cache = ref.init_cache(x.shape[0]), sharded.init_cache(x.shape[0])
    ys, ref_ys, got = [], [], []
    for t in range(x.shape[1]):
        ref_ys.append(ref.step(x[:, t:t + 1], ref_cache))
        ys.append(sharded.step(x[:, t:t + 1], cache))
        got.append(np.array(sharded.last_selection.idx))
    return np.concatenate(ref_ys, 1), np.concatenate(ys, 1), rec.seen, got, (ref, sharded, ref_cache, cache)


@pytest.mark.parametrize("block", [BS, 3 * BS])
@pytest.mark.parametrize("P", [0, 3])
@pytest.mark.parametrize("name", ["mla", "gqa"])
def test_block_decode_equals_one_process(name, P, block, monkeypatch):
    """Every step: the output to float64 rounding, the token positions attended exactly, the
    stats (blocks per query, keys attended) equal; the gate ranks blocks on every rank."""
    x = _x()
    ref_y, y, ref_sel, got, (ref, sharded, _, _) = _step_both(name, x, monkeypatch, block, P=P, topk_blocks=3)
    np.testing.assert_allclose(y, ref_y, rtol=1e-11, atol=1e-12)
    assert len(ref_sel) == len(got) == STEPS
    for (idx, _), g in zip(ref_sel, got):
        np.testing.assert_array_equal(g, idx)
    assert sharded.stats.as_dict() == ref.stats.as_dict()
    assert ref.stats.as_dict()["total"]["blocks_per_query_mean"] > 2  # more than the own block and one other
    assert np.abs(ref_y - ref_y[:, :1]).max() > 1e-3  # not a constant output


@pytest.mark.parametrize("name", ["mla", "gqa"])
def test_float32_block_decode_equals_one_process(name, monkeypatch):
    x = _x(dtype="float32")
    ref_y, y, ref_sel, got, _ = _step_both(name, x, monkeypatch, 2 * BS, P=1, topk_blocks=2, dtype="float32")
    np.testing.assert_allclose(y, ref_y, **tolerance(np.float32))
    for (idx, _), g in zip(ref_sel, got):
        np.testing.assert_array_equal(g, idx)


@pytest.mark.parametrize("name", ["mla", "gqa"])
def test_topk_blocks_at_least_the_block_count_is_dense(name, monkeypatch):
    """topk_blocks >= every block: each step attends every cached key, as dense attention does."""
    x = _x()
    ref_y, y, _, got, _ = _step_both(name, x, monkeypatch, BS, P=2, topk_blocks=100)
    np.testing.assert_allclose(y, ref_y, rtol=1e-11, atol=1e-12)
    dense = LAYERS[name](P=2, topk_blocks=100)
    dense.selection, dense.block_size, dense.topk_blocks = "token", None, None
    dense_cache = dense.init_cache(2)
    dense_y = np.concatenate([dense.step(x[:, t:t + 1], dense_cache) for t in range(STEPS)], 1)
    np.testing.assert_allclose(y, dense_y, rtol=1e-10, atol=1e-12)
    assert (got[-1] >= 0).sum(-1).min() == 2 + STEPS  # every key, persistent ones included


@pytest.mark.parametrize("name", ["mla", "gqa"])
def test_each_rank_keeps_the_means_of_its_own_blocks(name, monkeypatch):
    """The block means on a rank are exactly the single-process means of the blocks it owns."""
    block = 2 * BS
    *_, (_, sharded, ref_cache, cache) = _step_both(name, _x(), monkeypatch, block, P=3)
    S = cache.n_rows
    mine = shard_positions(S, COMM.rank, COMM.size, block)
    owned_blocks = np.unique(mine // BS)
    means, ref_means = cache.block_means.means, ref_cache.block_means.means
    assert means.shape[2] == len(owned_blocks) and ref_means.shape[2] == -(-S // BS)
    np.testing.assert_array_equal(means, ref_means[:, :, owned_blocks])
    assert sum(COMM.allgather(means.shape[2])) == ref_means.shape[2]  # the ranks' blocks partition them


def _cache_with(keys, values, block):
    """A ShardedKVCache holding keys (B, G, S, D), values (B, G, S, Dv) (this rank's share), with block means."""
    B, G, S, D = keys.shape
    cache = ShardedKVCache(np, B, G, D, values.shape[-1], keys.dtype, None, rank=COMM.rank, ranks=COMM.size,
                           block=block)
    cache.block_means = BlockMeans(np, B, G, D, keys.dtype, BS)
    cache.extend(keys, values)
    return cache


@pytest.mark.parametrize("topk_blocks", [1, 2, 3, 5])
def test_selection_with_ties_and_a_partial_block_equals_select_blocks(topk_blocks):
    """Blocks with equal means tie: the lower block wins on every rank, as in one process; the
    query's own (partial) block comes first.  Outputs equal sparse attention over the whole cache."""
    rng = np.random.default_rng(3)
    B, H, G, D, S = 2, 4, 2, 6, 27  # 7 blocks, the last one partial
    keys = rng.standard_normal((B, G, S, D))
    keys[:, :, 12:16] = keys[:, :, 4:8]  # blocks 1 and 3 tie, and 2 and 5
    keys[:, :, 20:24] = keys[:, :, 8:12]
    values = rng.standard_normal((B, G, S, 5))
    query = rng.standard_normal((B, H, D))
    query[1] = 0.0  # every gate 0: a full tie, ranked by block index
    cache = _cache_with(keys, values, 2 * BS)
    sel, blocks = select_blocks_sharded(COMM, query, cache, block_size=BS, topk_blocks=topk_blocks, scale=0.4)
    ref_blocks = select_blocks(query[:, :, None], keys, block_size=BS, topk_blocks=topk_blocks, causal=True,
                               means=block_means(keys, BS))[:, :, 0]
    np.testing.assert_array_equal(blocks, ref_blocks)
    assert (blocks[..., 0] == (S - 1) // BS).all()
    if topk_blocks >= 3:
        assert list(blocks[1, 0, 1:3]) == [0, 1]
    bounds = BlockBounds(S, 1, block_size=BS, topk_blocks=topk_blocks, causal=True)
    idx = expand_blocks(ref_blocks[:, :, None], bounds)[:, :, 0]
    np.testing.assert_array_equal(sel.idx, idx)
    out = attend_selection(COMM, query, cache.keys, cache.values, sel)
    np.testing.assert_allclose(out, sparse_attention_decode(query, keys, values, idx, 0.4), rtol=1e-12, atol=1e-13)


def _model(**kw):
    cfg = dict(vocab_size=23, d_model=16, n_layers=2, n_heads=2, q_lora_rank=8, kv_lora_rank=8, qk_nope_dim=4,
               qk_rope_dim=4, v_head_dim=4, d_ff=24, topk=None, selection="block", block_size=BS, topk_blocks=2,
               seed=3)
    cfg.update(kw)
    return Transformer(TransformerConfig(**cfg))


def _tokens(B=2, T=26, seed=1):
    return np.random.default_rng(seed).integers(0, 23, size=(B, T))


@pytest.mark.parametrize("kw", [dict(), dict(attention="mha", n_heads=4, n_kv_heads=2, head_dim=4),
                                dict(persistent_tokens=2, dense_layers=(0,)), dict(dtype="float64")])
def test_model_decode_equals_one_process(kw):
    """Teacher-forced decode of a block model (MLA, GQA, hybrid with a dense layer): the logits
    of shard_decoding's model equal one process's; the layers' attention stats too."""
    tokens = _tokens()
    ref_model = _model(**kw).enable_attention_stats()
    ref = decode_teacher_forced(ref_model, tokens, selectors=[ExactSelector() for _ in range(2)], prompt_len=6)
    model = shard_decoding(_model(**kw), COMM)
    model.enable_attention_stats()
    got = decode_teacher_forced(model, tokens, selectors=[ShardedSelector(ExactSelector, COMM) for _ in range(2)],
                                prompt_len=6)
    np.testing.assert_allclose(got, ref, **tolerance(kw.get("dtype", "float32")))
    assert model.attention_stats() == ref_model.attention_stats()
    assert all(b.attn.block == 64 for b in model.blocks)  # the default: 64, a multiple of block_size 4


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


def test_bytes_per_step_do_not_grow_with_the_cache():
    """Per layer and step: one Allgather of the (score, block) candidates, 8 + B*H*(Kb-1)*(4 + 4)
    bytes, one of the logsumexp, 8 + B*H*8, one Allreduce of B*H*C*4: the same at 24 and 96 positions."""
    per_step = []
    for T in (24, 96):
        cc = _CountingComm()
        model = shard_decoding(_model(topk_blocks=3), cc, block=BS)
        tokens = _tokens(T=T)
        cache = model.init_cache(2)
        for t in range(T - 1):
            model.step(tokens[:, t:t + 1], cache)
        cc.sent = {}
        model.step(tokens[:, T - 1:], cache)
        per_step.append(cc.sent)
    n, m, C = 2 * 2, 2, 8
    cand = spec_bytes([("s", (n, m), np.float32), ("j", (n, m), np.int32)])
    lse = spec_bytes([("lse", (n,), np.float64)])
    assert per_step[0] == per_step[1] == {"Allgather": (4, 2 * (cand + lse)), "Allreduce": (2, 2 * n * C * 4)}


def test_sharding_block_must_be_a_multiple_of_block_size():
    with pytest.raises(ValueError, match=r"multiple of the layer's block_size=4.*got block=6"):
        ShardedMLA(_mla(), COMM, block=6)
    with pytest.raises(ValueError, match=r"multiple of the layer's block_size=4.*got block=2"):
        ShardedAttention(_gqa(), COMM, block=2)
    with pytest.raises(ValueError, match="block_size=4"):
        shard_decoding(_model(), COMM, block=10)
    with pytest.raises(ValueError, match="block"):
        ShardedMLA(_mla(), COMM, block=0)
    # the default block: 64 rounded up to a multiple of the block size; any block for token layers
    assert sharding_block(MLA(16, 4, 8, 8, 4, 4, 6, selection="block", block_size=48, topk_blocks=2)) == 96
    assert sharding_block(_mla()) == 64 and sharding_block(MLA(16, 4, 8, 8, 4, 4, 6)) == 64
    assert sharding_block(MLA(16, 4, 8, 8, 4, 4, 6), 6) == 6
    assert ShardedMLA(MLA(16, 4, 8, 8, 4, 4, 6, selection="block", block_size=48, topk_blocks=2), COMM).block == 96


def test_an_error_on_one_rank_is_raised_on_every_rank(monkeypatch):
    """A rank whose block means fail does not leave the others waiting in the exchange."""
    real = BlockMeans.update

    def failing(self, keys):
        if COMM.rank == COMM.size - 1 and self.n >= 4:
            raise ValueError("means broke")
        return real(self, keys)

    monkeypatch.setattr(BlockMeans, "update", failing)
    sharded = ShardedMLA(_mla(topk_blocks=1), COMM, block=BS)  # Kb = 1: no candidate exchange, the error still agreed
    cache = sharded.init_cache(2)
    x = _x()
    with pytest.raises((ValueError, RuntimeError), match="means broke"):
        for t in range(STEPS):
            sharded.step(x[:, t:t + 1], cache)
