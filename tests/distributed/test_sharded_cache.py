"""The sharded caches' position maps and the packed exchange.

The maps are pure functions (checked for several rank counts in one process); the cache and
exchange tests run with the communicator's ranks (one in the plain test run, two under
``mpiexec -n 2 python -m pytest tests/distributed``).
"""
import numpy as np
import pytest

pytest.importorskip("mpi4py")

from topkattn.distributed import ShardedKVCache, ShardedMLACache, shard_positions, world
from topkattn.distributed.exchange import allgather_fields, spec_bytes
from topkattn.distributed.sharded_cache import global_position, local_row, owned_below, owner_of

COMM = world()


@pytest.mark.parametrize("ranks,block", [(1, 4), (2, 4), (3, 5), (4, 1), (2, 64)])
def test_maps_are_the_round_robin_rule(ranks, block):
    n = 157
    pos = np.arange(n)
    seen = []
    for r in range(ranks):
        mine = shard_positions(n, r, ranks, block)
        np.testing.assert_array_equal(mine, pos[(pos // block) % ranks == r])  # the rule, spelled out
        np.testing.assert_array_equal(owner_of(mine, ranks, block), r)
        rows = np.arange(len(mine))
        np.testing.assert_array_equal(global_position(rows, r, ranks, block), mine)  # row i holds mine[i]
        np.testing.assert_array_equal(local_row(mine, r, ranks, block), rows)
        others = np.setdiff1d(pos, mine)
        assert (local_row(others, r, ranks, block) == -1).all()
        assert local_row(np.array([-1]), r, ranks, block)[0] == -1
        assert global_position(np.array([-1]), r, ranks, block)[0] == -1
        for x in (0, 1, block, block * ranks + 1, n):  # owned_below counts the owned positions < x
            assert owned_below(x, r, ranks, block) == int((mine < x).sum())
        seen.append(mine)
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), pos)  # a partition of the cache
    sizes = [len(s) for s in seen]
    assert max(sizes) - min(sizes) <= block  # balanced to one block


def test_shard_positions_checks_its_arguments():
    with pytest.raises(ValueError, match="rank"):
        shard_positions(10, 2, 2)
    with pytest.raises(ValueError, match="block"):
        shard_positions(10, 0, 2, 0)
    with pytest.raises(TypeError, match="n"):
        shard_positions(1.5, 0, 2)


def test_mla_cache_keeps_only_this_ranks_rows():
    rank, ranks, block = COMM.rank, COMM.size, 3
    rng = np.random.default_rng(0)
    full = rng.standard_normal((2, 20, 5)).astype(np.float32)  # (B, S, C + R), the same on every rank
    cache = ShardedMLACache(np, 2, 3, 2, np.float32, {}, owner=None, rank=rank, ranks=ranks, block=block)
    cache.extend(full[:, :7])
    for j in range(7, 20):
        cache.push(full[:, j:j + 1] if cache.owns_next() else None)
    mine = shard_positions(20, rank, ranks, block)
    assert cache.n_rows == 20 and cache.n_local == len(mine) == cache.keys.shape[1]
    np.testing.assert_array_equal(cache.positions, mine)
    np.testing.assert_array_equal(cache.keys, full[:, mine])
    assert cache.local_range(4, 11) == (int((mine < 4).sum()), int((mine < 11).sum()))
    assert cache.floats_per_token == 5 and cache.bytes_per_token == 20
    with pytest.raises(ValueError, match="belongs to rank"):  # a row for a position another rank owns
        if cache.owns_next():
            cache.push(None)
        else:
            cache.push(full[:, :1])


def test_kv_cache_keeps_only_this_ranks_rows():
    rank, ranks = COMM.rank, COMM.size
    rng = np.random.default_rng(1)
    k = rng.standard_normal((1, 2, 9, 4))
    v = rng.standard_normal((1, 2, 9, 3))
    cache = ShardedKVCache(np, 1, 2, 4, 3, np.float64, owner=None, rank=rank, ranks=ranks, block=2)
    cache.extend(k[:, :, :5], v[:, :, :5])
    for j in range(5, 9):
        cache.push(*((k[:, :, j:j + 1], v[:, :, j:j + 1]) if cache.owns_next() else (None, None)))
    mine = shard_positions(9, rank, ranks, 2)
    np.testing.assert_array_equal(cache.keys, k[:, :, mine])
    np.testing.assert_array_equal(cache.values, v[:, :, mine])
    assert cache.floats_per_token == 2 * (4 + 3)


def test_exchange_packs_the_fields_in_one_allgather():
    spec = [("a", (3, 2), np.float32), ("b", (3,), np.int32), ("c", (3,), np.float64)]
    r = COMM.rank
    vals = {"a": np.full((3, 2), r + 0.5), "b": np.arange(3) + 10 * r, "c": np.full(3, -r - 0.25)}
    calls = []

    class Counting:
        def __getattr__(self, name):
            return getattr(COMM, name)

        def Allgather(self, send, recv):
            calls.append(send.nbytes)
            return COMM.Allgather(send, recv)

    got = allgather_fields(Counting(), spec, vals)
    assert calls == [spec_bytes(spec)] and spec_bytes(spec) == 8 + 24 + 12 + 24
    for p in range(COMM.size):
        np.testing.assert_array_equal(got["a"][p], np.full((3, 2), p + 0.5, dtype=np.float32))
        np.testing.assert_array_equal(got["b"][p], np.arange(3) + 10 * p)
        np.testing.assert_array_equal(got["c"][p], np.full(3, -p - 0.25))
        assert got["a"].dtype == np.float32 and got["b"].dtype == np.int32


def test_exchange_raises_on_every_rank_when_one_fails():
    spec = [("a", (2,), np.float64)]
    last = COMM.size - 1
    error = ValueError("shard broke") if COMM.rank == last else None
    with pytest.raises((ValueError, RuntimeError), match="shard broke"):
        allgather_fields(COMM, spec, {"a": np.zeros(2)}, error)
    with pytest.raises((ValueError, RuntimeError), match="spec says"):  # a wrong shape is agreed too
        allgather_fields(COMM, spec, {"a": np.zeros(3 if COMM.rank == last else 2)})
