"""Decode caches sharded by position over MPI ranks: each rank stores only the rows it owns.

Shape letters: B batch, G KV heads, S cached positions in all (every rank's together,
persistent rows first), Sp the rows this rank stores, C latent dim, R rope dim, D key dim,
Dv value dim.

**Ownership: round-robin blocks.**  Position j (persistent rows included) belongs to rank
``(j // block) % ranks``.  Rank r therefore stores the positions

    (i * ranks + r) * block + o        for i = 0, 1, ... and 0 <= o < block

in increasing order, and local row ``i * block + o`` holds exactly that position; both maps
are closed forms (:func:`local_row`, :func:`global_position`), so no position table is kept.
Why blocks dealt round-robin rather than one contiguous slice per rank: the cache grows at
its end during decoding, so contiguous slices would put every new token on the last rank;
round-robin keeps the ranks within one block of each other at every length (``S / P`` rows
each, to ``block``).  ``block`` keeps neighbouring positions together (a sliding window of W
keys falls on about W / block ranks).

A rank computes and stores only the latents of its own positions (the layer skips the others'
projections); the forced keys (persistent-token sinks, the sliding window) are stored, like
every key, by their owner, and that owner attends them.

A block top-k layer (``selection="block"``) needs ``block`` to be a multiple of its
``block_size``: then every selection block lies inside one sharding block, this rank's rows
fall into whole selection blocks, and ``block_means`` (a
:class:`~topkattn.layers.cache.BlockMeans` over this rank's rows) keeps the means of exactly
the selection blocks it owns.
"""
from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from topkattn.backend import Array, get_array_module
from topkattn.checks import check_int
from topkattn.layers.cache import GrowingBuffer


def owner_of(positions: int | Array, ranks: int, block: int) -> int | Array:
    """The rank owning each global position (int or int array)."""
    return (positions // block) % ranks


def owned_below(x: int | Array, rank: int, ranks: int, block: int) -> int | Array:
    """How many of the positions 0 .. x - 1 rank ``rank`` owns (= its local row of the first
    position >= x it owns); int or int array ``x`` >= 0."""
    period = block * ranks
    return (x // period) * block + np.clip(x % period - rank * block, 0, block)


def local_row(positions: Array, rank: int, ranks: int, block: int) -> Array:
    """Local rows of global ``positions`` (int array, -1 = empty): the row where rank ``rank``
    stores each, or -1 where it does not own it (or the slot is empty)."""
    xp = get_array_module(positions)
    period = block * ranks
    j = xp.maximum(positions, 0)
    row = (j // period) * block + j % block
    mine = (positions >= 0) & ((j // block) % ranks == rank)
    return xp.where(mine, row, -1)


def global_position(rows: Array, rank: int, ranks: int, block: int) -> Array:
    """Global positions of rank ``rank``'s local ``rows`` (int array, -1 stays -1)."""
    xp = get_array_module(rows)
    r = xp.maximum(rows, 0)
    pos = ((r // block) * ranks + rank) * block + r % block
    return xp.where(rows >= 0, pos, -1)


def shard_positions(n: int, rank: int, ranks: int, block: int = 64) -> np.ndarray:
    """The positions 0 .. n - 1 that rank ``rank`` of ``ranks`` owns, ascending (int64)."""
    n, rank, ranks, block = (check_int(a, v, lo) for a, v, lo in
                             (("n", n, 0), ("rank", rank, 0), ("ranks", ranks, 1), ("block", block, 1)))
    if rank >= ranks:
        raise ValueError(f"rank must be below ranks ({ranks}), got {rank}")
    positions = np.arange(n, dtype=np.int64)
    return positions[owner_of(positions, ranks, block) == rank]


class _ShardedRows:
    """Position bookkeeping shared by the sharded caches (``n_rows`` global positions so far)."""

    def _init_shard(self, rank, ranks, block):
        self.ranks = check_int("ranks", ranks, 1)
        self.rank = check_int("rank", rank, 0, self.ranks - 1)
        self.block = check_int("block", block, 1)
        self.n_rows = 0  # S: positions cached on all ranks together
        self.prefix = 0
        self.block_means = None  # block top-k layers: a BlockMeans of this rank's rows (its own selection blocks)

    @property
    def n_tokens(self):
        """Tokens decoded so far (every rank's, persistent rows excluded): the next token's position."""
        return self.n_rows - self.prefix

    @property
    def n_local(self):
        """Sp: the rows this rank stores."""
        return int(owned_below(self.n_rows, self.rank, self.ranks, self.block))

    def owns_next(self):
        """Whether this rank stores the next position (``n_rows``)."""
        return int(owner_of(self.n_rows, self.ranks, self.block)) == self.rank

    def local_range(self, lo, hi):
        """``(a, b)``: this rank's rows holding the positions lo .. hi - 1 are rows a .. b - 1."""
        own = owned_below(np.array([lo, hi]), self.rank, self.ranks, self.block)
        return int(own[0]), int(own[1])

    def local_rows(self, positions):
        """This rank's rows of global ``positions`` (-1 where another rank owns it or empty)."""
        return local_row(positions, self.rank, self.ranks, self.block)

    def positions_of(self, rows):
        """Global positions of this rank's ``rows``."""
        return global_position(rows, self.rank, self.ranks, self.block)

    @property
    def positions(self):
        """(Sp,) int64: the global position of every stored row, ascending."""
        return self.positions_of(np.arange(self.n_local, dtype=np.int64))

    def _mine(self, m):
        """Bool (m,): which of the next m positions this rank owns; advances ``n_rows``."""
        pos = np.arange(self.n_rows, self.n_rows + m, dtype=np.int64)
        self.n_rows += m
        return owner_of(pos, self.ranks, self.block) == self.rank


class ShardedMLACache(_ShardedRows):
    """This rank's rows of an MLA latent cache ``[c_j ; kr_j]`` sharded by position.

    ``keys`` (B, Sp, C + R): the rows of the positions this rank owns, ascending (``positions``);
    ``n_rows`` = S counts every rank's positions.  ``weights``: the absorbed decode weights,
    ``owner``: the layer, as on :class:`topkattn.layers.cache.MLACache`.
    """

    def __init__(self, xp: ModuleType, batch: int, C: int, R: int, dtype: DTypeLike, weights: Any, owner: Any, *,
                 rank: int, ranks: int, block: int) -> None:
        self.batch, self.C, self.R = batch, C, R
        self.buf = GrowingBuffer(xp, (batch, 0, C + R), axis=1, dtype=dtype)
        self.weights = weights
        self.owner = owner
        self._init_shard(rank, ranks, block)

    @property
    def keys(self) -> Array:
        return self.buf.view()

    def extend(self, rows: Array) -> None:
        """Append positions n_rows .. n_rows + m - 1 from ``rows`` (B, m, C + R): only the owned are kept."""
        mine = self._mine(rows.shape[1])
        if mine.any():
            self.buf.append(rows[:, get_array_module(rows).asarray(np.flatnonzero(mine))])

    def push(self, row: Array | None) -> None:
        """Append the next position: ``row`` (B, 1, C + R) when this rank owns it, else None."""
        if (row is not None) != self.owns_next():
            raise ValueError(f"position {self.n_rows} belongs to rank "
                             f"{int(owner_of(self.n_rows, self.ranks, self.block))}; rank {self.rank} "
                             f"got {'a row' if row is not None else 'None'}")
        self.n_rows += 1
        if row is not None:
            self.buf.append(row)

    @property
    def floats_per_token(self) -> int:
        return self.buf.data.shape[-1]

    @property
    def bytes_per_token(self) -> int:
        return self.floats_per_token * self.buf.data.dtype.itemsize


class ShardedKVCache(_ShardedRows):
    """This rank's rows of a full KV cache (plain attention) sharded by position: ``keys``
    (B, G, Sp, D) and ``values`` (B, G, Sp, Dv) of the positions it owns, ascending."""

    def __init__(self, xp: ModuleType, batch: int, G: int, D: int, Dv: int, dtype: DTypeLike, owner: Any, *, rank: int,
                 ranks: int, block: int) -> None:
        self.batch = batch
        self.kbuf = GrowingBuffer(xp, (batch, G, 0, D), axis=2, dtype=dtype)
        self.vbuf = GrowingBuffer(xp, (batch, G, 0, Dv), axis=2, dtype=dtype)
        self.owner = owner
        self._init_shard(rank, ranks, block)

    @property
    def keys(self) -> Array:
        return self.kbuf.view()

    @property
    def values(self) -> Array:
        return self.vbuf.view()

    def extend(self, k: Array, v: Array) -> None:
        """Append positions n_rows .. n_rows + m - 1 from k (B, G, m, D), v (B, G, m, Dv): the owned ones."""
        mine = self._mine(k.shape[2])
        if mine.any():
            sel = get_array_module(k).asarray(np.flatnonzero(mine))
            self.kbuf.append(k[:, :, sel])
            self.vbuf.append(v[:, :, sel])

    def push(self, k: Array | None, v: Array | None) -> None:
        """Append the next position: k (B, G, 1, D), v (B, G, 1, Dv) when this rank owns it, else None, None."""
        if (k is not None) != self.owns_next():
            raise ValueError(f"position {self.n_rows} belongs to rank "
                             f"{int(owner_of(self.n_rows, self.ranks, self.block))}; rank {self.rank} "
                             f"got {'keys' if k is not None else 'None'}")
        self.n_rows += 1
        if k is not None:
            self.kbuf.append(k)
            self.vbuf.append(v)

    @property
    def floats_per_token(self) -> int:
        k, v = self.kbuf.data, self.vbuf.data
        return k.shape[1] * k.shape[3] + v.shape[1] * v.shape[3]

    @property
    def bytes_per_token(self) -> int:
        return self.floats_per_token * self.kbuf.data.dtype.itemsize


__all__ = ["ShardedKVCache", "ShardedMLACache", "global_position", "local_row", "owned_below", "owner_of",
           "shard_positions"]
