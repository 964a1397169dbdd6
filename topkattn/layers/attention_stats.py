"""Attention statistics: what an attention layer's key selection did, per forward and cumulatively.

Shape letters: B batch, H query heads, T queries, S keys, K index slots per query, Nb block slots
per query (block attention).  A "row" is one (batch, head, query): B * H * T rows per update.

One :meth:`AttentionStats.update` records one top-k forward (idx (B, H, T, K)) or one decode
step (idx (B, H, K), T = 1); :meth:`AttentionStats.update_dense` records a dense forward.
Counted per update and summed over updates:

    queries          rows, B * H * T
    keys attended    per row, the index slots holding a key (idx >= 0): mean, min, max and the
                     histogram {keys per query: rows} (the distribution dynamic k produces)
    keys visible     per row, the keys it may see: causal query t sees S - T + t + 1 (query t at
                     absolute position S - T + t), every row sees S otherwise
    index bytes      idx.nbytes, against the bytes of a dense (B, H, T, S) score matrix in the
                     scores' dtype (what dense attention would materialise)
    dense fallback   rows that attended every visible key (topk >= visible keys: top-k was dense
                     attention there), and updates in which every row did (dense layers too)
    blocks           block attention: blocks chosen per query (slots >= 0 of blocks (B, H, T, Nb)),
                     mean and histogram

An attention layer records with one call: ``stats.record_forward(saved)`` after its training
attention op (any op's saved state: dense, top-k, masked, dynamic k, block) and
``stats.record_step(query, S, idx)`` in a decode step (idx None for a dense step).

``as_dict()`` is JSON-able: ``{"updates", "last": {...}, "total": {...}}`` with the same keys in
``last`` (the latest update) and ``total``.  :meth:`merged` sums several layers' statistics.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from topkattn.backend import Array, as_engine_array, get_array_module, to_numpy
from topkattn.checks import check_int


class AttentionStats:
    """Per-update and cumulative statistics of one attention layer (see the module docstring).

    ``last``: the latest update's counts (None before any); ``total``: the sum over updates.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget every update."""
        self.last = None
        self.total = _Counts()

    # -- recording -----------------------------------------------------------------------
    def update(self, idx: Array, *, n_keys: int, causal: bool = True, score_dtype: DTypeLike = "float32",
               blocks: Array | None = None, index_bytes: int | None = None) -> dict[str, Any]:
        """Record one top-k forward or decode step; returns this update's summary (as in ``as_dict``).

        idx: (B, H, T, K) or, for a decode step, (B, H, K) integer key indices, -1 = empty slot.
        n_keys: S, the keys of the sequence (sinks included).  causal: query t sees keys
        j <= S - T + t (a decode step sees all S).  score_dtype: the dtype a dense (T, S) score
        matrix would have.  blocks: block attention's chosen blocks, (B, H, T, Nb) (or (B, H, Nb)
        for a decode step), -1 = empty slot.  index_bytes: the bytes of the index the op keeps,
        when it is not ``idx`` (block attention keeps ``blocks``); default idx.nbytes.
        """
        idx = as_engine_array(idx, "idx")
        if idx.dtype.kind not in "iu":
            raise TypeError(f"idx must be an integer array, got dtype {idx.dtype}")
        if idx.ndim not in (3, 4):
            raise ValueError(f"idx must be (B, H, T, K) or, for a decode step, (B, H, K), got shape {tuple(idx.shape)}")
        decode = idx.ndim == 3
        S = check_int("n_keys", n_keys, 0)
        itemsize = _itemsize(score_dtype)
        xp = get_array_module(idx)
        B, H = idx.shape[:2]
        T = 1 if decode else idx.shape[2]
        visible = _visible(T, S, bool(causal) and not decode)  # (T,) host
        attended = (idx >= 0).sum(axis=-1).reshape(B, H, T)  # (B, H, T)
        c = _Counts()
        c.updates, c.queries = 1, B * H * T
        c.keys_attended = int(attended.sum())
        c.keys_visible = int(visible.sum()) * B * H
        c.hist = to_numpy(xp.bincount(attended.ravel().astype(xp.int64))).astype(np.int64)
        c.index_bytes = int(idx.nbytes) if index_bytes is None else check_int("index_bytes", index_bytes, 0)
        c.dense_bytes = B * H * T * S * itemsize
        dense_rows = int((attended >= xp.asarray(visible)).sum())
        c.dense_rows, c.dense_updates = dense_rows, int(dense_rows == c.queries)
        if blocks is not None:
            c.add_blocks(_check_blocks(blocks, (B, H) + (() if decode else (T,))))
        self._record(c)
        return c.summary()

    def update_dense(self, batch: int, heads: int, queries: int, *, n_keys: int, causal: bool = True,
                     score_dtype: DTypeLike = "float32") -> dict[str, Any]:
        """Record one dense forward (every row attends every visible key; no index tensor)."""
        B, H = check_int("batch", batch, 1), check_int("heads", heads, 1)
        T, S = check_int("queries", queries, 1), check_int("n_keys", n_keys, 0)
        visible = _visible(T, S, bool(causal))  # (T,)
        c = _Counts()
        c.updates, c.queries = 1, B * H * T
        c.keys_attended = c.keys_visible = int(visible.sum()) * B * H
        c.hist = np.bincount(visible).astype(np.int64) * (B * H)
        c.index_bytes, c.dense_bytes = 0, B * H * T * S * _itemsize(score_dtype)
        c.dense_rows, c.dense_updates = c.queries, 1
        self._record(c)
        return c.summary()

    def record_forward(self, saved: Any) -> dict[str, Any]:
        """Record a training forward from the ``saved`` state its attention op returned.

        Any saved state with ``q`` (B, H, T, D) and ``k`` (B, G, S, D): with an ``idx`` (top-k,
        masked top-k, dynamic k) it is :meth:`update`; block attention's (``blocks`` and
        ``indices()``) records the keys its blocks stand for, the blocks chosen and the bytes
        of ``blocks``; without either (dense) it is :meth:`update_dense`.
        """
        q, k = getattr(saved, "q", None), getattr(saved, "k", None)
        if q is None or k is None or q.ndim != 4 or k.ndim != 4:
            raise TypeError(f"saved must be an attention op's saved state with q (B, H, T, D) and k (B, G, S, D), "
                            f"got {type(saved).__name__}")
        idx = getattr(saved, "idx", None)
        causal = bool(getattr(saved, "causal", getattr(getattr(saved, "bounds", None), "causal", True)))
        blocks = getattr(saved, "blocks", None)
        if idx is None and blocks is not None and callable(getattr(saved, "indices", None)):
            return self.update(saved.indices(), n_keys=k.shape[2], causal=causal, score_dtype=q.dtype,
                               blocks=blocks, index_bytes=int(blocks.nbytes))
        if idx is None:
            return self.update_dense(*q.shape[:3], n_keys=k.shape[2], causal=causal, score_dtype=q.dtype)
        return self.update(idx, n_keys=k.shape[2], causal=causal, score_dtype=q.dtype)

    def record_step(self, query: Array, n_keys: int, idx: Array | None = None) -> dict[str, Any]:
        """Record one decode step: query (B, H, D) (its batch, heads and dtype), the S cached keys,
        and idx (B, H, K) of a top-k step (None: a dense step)."""
        if getattr(query, "ndim", None) != 3:
            raise ValueError(f"query must be (B, H, D), got shape {tuple(getattr(query, 'shape', ()))}")
        if idx is None:
            return self.update_dense(query.shape[0], query.shape[1], 1, n_keys=n_keys, causal=False,
                                     score_dtype=query.dtype)
        return self.update(idx, n_keys=n_keys, score_dtype=query.dtype)

    def _record(self, c):
        self.last = c
        self.total.add(c)

    # -- combining and reporting ---------------------------------------------------------
    def merge(self, other: AttentionStats) -> AttentionStats:
        """Add ``other``'s counts (its latest update and its total) to this one; returns self."""
        if not isinstance(other, AttentionStats):
            raise TypeError(f"other must be an AttentionStats, got {type(other).__name__}")
        if other.last is not None:
            if self.last is None:
                self.last = _Counts()
            self.last.add(other.last)
        self.total.add(other.total)
        return self

    @classmethod
    def merged(cls, stats: Iterable[AttentionStats]) -> AttentionStats:
        """One AttentionStats holding the sums of ``stats`` (e.g. every layer of a model)."""
        out = cls()
        for s in stats:
            out.merge(s)
        return out

    @property
    def updates(self) -> int:
        return self.total.updates

    def as_dict(self) -> dict[str, Any]:
        """``{"updates": n, "last": summary or None, "total": summary}`` (JSON-able)."""
        return {"updates": self.total.updates, "last": None if self.last is None else self.last.summary(),
                "total": self.total.summary()}

    def __repr__(self):
        t = self.total
        mean = t.keys_attended / t.queries if t.queries else 0.0
        return f"AttentionStats(updates={t.updates}, queries={t.queries}, keys_per_query_mean={mean:.4g})"


class _Counts:
    """Summed counts of one or more updates."""

    __slots__ = ("updates", "queries", "keys_attended", "keys_visible", "hist", "index_bytes", "dense_bytes",
                 "dense_rows", "dense_updates", "block_queries", "blocks_chosen", "block_hist")

    def __init__(self):
        self.updates = self.queries = self.keys_attended = self.keys_visible = 0
        self.index_bytes = self.dense_bytes = self.dense_rows = self.dense_updates = 0
        self.block_queries = self.blocks_chosen = 0
        self.hist = np.zeros(0, dtype=np.int64)  # hist[n]: rows attending n keys
        self.block_hist = np.zeros(0, dtype=np.int64)  # block_hist[n]: rows choosing n blocks

    def add(self, o):
        for name in ("updates", "queries", "keys_attended", "keys_visible", "index_bytes", "dense_bytes",
                     "dense_rows", "dense_updates", "block_queries", "blocks_chosen"):
            setattr(self, name, getattr(self, name) + getattr(o, name))
        self.hist = _add_hist(self.hist, o.hist)
        self.block_hist = _add_hist(self.block_hist, o.block_hist)

    def add_blocks(self, chosen):
        """chosen: host int array of blocks chosen per row."""
        self.block_queries += int(chosen.size)
        self.blocks_chosen += int(chosen.sum())
        self.block_hist = _add_hist(self.block_hist, np.bincount(chosen.ravel()).astype(np.int64))

    def summary(self):
        q = self.queries
        seen = np.nonzero(self.hist)[0]
        out = {
            "updates": self.updates,
            "queries": q,
            "keys_per_query_mean": self.keys_attended / q if q else 0.0,
            "keys_per_query_min": int(seen[0]) if seen.size else 0,
            "keys_per_query_max": int(seen[-1]) if seen.size else 0,
            "keys_per_query_hist": _hist_dict(self.hist, "keys"),
            "visible_keys_per_query_mean": self.keys_visible / q if q else 0.0,
            "attended_fraction": self.keys_attended / self.keys_visible if self.keys_visible else 1.0,
            "index_bytes": self.index_bytes,
            "dense_score_bytes": self.dense_bytes,
            "index_to_dense_bytes": self.index_bytes / self.dense_bytes if self.dense_bytes else 0.0,
            "dense_fallback_queries": self.dense_rows,
            "dense_fallback_rate": self.dense_rows / q if q else 0.0,
            "dense_fallback_updates": self.dense_updates,
        }
        if self.block_queries:
            out["blocks_per_query_mean"] = self.blocks_chosen / self.block_queries
            out["blocks_per_query_hist"] = _hist_dict(self.block_hist, "blocks")
        return out


def _visible(T, S, causal):
    """(T,) int64 keys visible to each query: causal min(S, max(0, S - T + t + 1)), else S."""
    if not causal:
        return np.full(T, S, dtype=np.int64)
    return np.clip(S - T + 1 + np.arange(T, dtype=np.int64), 0, S)


def _check_blocks(blocks, lead):
    blocks = as_engine_array(blocks, "blocks")
    if blocks.dtype.kind not in "iu":
        raise TypeError(f"blocks must be an integer array, got dtype {blocks.dtype}")
    if blocks.ndim != len(lead) + 1 or tuple(blocks.shape[:-1]) != lead:
        raise ValueError(f"blocks must have shape {lead + ('Nb',)} like idx, got {tuple(blocks.shape)}")
    return to_numpy((blocks >= 0).sum(axis=-1)).astype(np.int64)


def _itemsize(score_dtype):
    try:
        dt = np.dtype(score_dtype)
    except TypeError as e:
        raise TypeError(f"score_dtype must be a NumPy dtype, got {score_dtype!r}") from e
    if dt.kind != "f":
        raise TypeError(f"score_dtype must be a float dtype, got {dt}")
    return dt.itemsize


def _add_hist(a, b):
    n = max(a.size, b.size)
    out = np.zeros(n, dtype=np.int64)
    out[:a.size] += a
    out[:b.size] += b
    return out


def _hist_dict(h, label):
    """{label: [values that occur], "queries": [rows with each]} of a histogram array (zeros left out)."""
    nz = np.nonzero(h)[0]
    return {label: [int(v) for v in nz], "queries": [int(h[v]) for v in nz]}
