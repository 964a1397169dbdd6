"""Toy tasks generated locally (no download), deterministic from a seed or Generator.

Each task yields ``(inputs, targets)``: int64 arrays (B, T); ``targets[b, t]`` is the
token the model must predict after reading ``inputs[b, :t+1]``, or ``IGNORE`` (-100)
where no prediction is scored.

- :class:`MQAR`: multi-query associative recall (Arora et al., "Zoology", 2023).
- :class:`TextCorpus`: byte-level language modelling on the Python standard library's
  own source files, read from the running interpreter's installation.
"""
from __future__ import annotations

import os
import sysconfig
from collections.abc import Iterable
from typing import Any

import numpy as np

from topkattn.checks import check_int, make_rng
from topkattn.layers.loss import IGNORE


class MQAR:
    """Multi-query associative recall.

    A sequence opens with ``num_kv_pairs`` key-value pairs ``k1 v1 k2 v2 ...`` (distinct
    keys); the rest holds each key queried once, in random order at random slots,
    followed by its value, with the filler token 0 between queries::

        k1 v1 k2 v2 k3 v3 | 0 0 k2 v2 0 0 k1 v1 k3 v3 0 ...

    Inputs are the sequence without its last token, targets the sequence shifted by one;
    only the positions holding a queried key are scored (target = that key's value),
    so the model must recall, for every query, the value bound to the key earlier in
    the same sequence.  Keys come from ``1 .. vocab_size//2 - 1``, values from
    ``vocab_size//2 .. vocab_size - 1``.  Accuracy = fraction of scored positions
    whose arg-max prediction equals the target.
    """

    name = "mqar"

    def __init__(self, *, vocab_size: int = 64, seq_len: int = 64, num_kv_pairs: int = 8) -> None:
        self.vocab_size = check_int("vocab_size", vocab_size, 4)
        self.seq_len = check_int("seq_len", seq_len, 4)
        self.num_kv_pairs = check_int("num_kv_pairs", num_kv_pairs, 1)
        n_keys = self.vocab_size // 2 - 1
        n_values = self.vocab_size - self.vocab_size // 2
        if self.num_kv_pairs > n_keys:
            raise ValueError(f"num_kv_pairs must be at most vocab_size//2 - 1 = {n_keys} "
                             f"(distinct keys), got {num_kv_pairs}")
        # Query region: seq_len + 1 - 2N tokens, split into (query, value) slots.
        slots = (self.seq_len + 1 - 2 * self.num_kv_pairs) // 2
        if slots < self.num_kv_pairs:
            raise ValueError(f"seq_len must be at least 4 * num_kv_pairs - 1 = "
                             f"{4 * self.num_kv_pairs - 1} to hold {num_kv_pairs} pairs and their "
                             f"queries, got {seq_len}")
        self._n_keys, self._n_values, self._slots = n_keys, n_values, slots

    def batch(self, rng: Any, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """A batch ``(inputs, targets)``, int64 (B, T) with T = seq_len, from ``rng``."""
        rng = make_rng(rng, "rng")
        B = check_int("batch_size", batch_size, 1)
        n_pairs, T, V = self.num_kv_pairs, self.seq_len, self.vocab_size
        half = V // 2
        # distinct keys per row: the first n_pairs of a random permutation of 1..half-1
        keys = np.argsort(rng.random((B, self._n_keys)), axis=1)[:, :n_pairs] + 1       # (B, n_pairs)
        values = rng.integers(half, V, size=(B, n_pairs))                                # (B, n_pairs)
        seq = np.zeros((B, T + 1), dtype=np.int64)
        seq[:, 0:2 * n_pairs:2] = keys
        seq[:, 1:2 * n_pairs:2] = values
        # queries: a random order of the n_pairs keys placed at n_pairs random, increasing slots
        order = np.argsort(rng.random((B, n_pairs)), axis=1)                             # (B, n_pairs)
        slot = np.sort(np.argsort(rng.random((B, self._slots)), axis=1)[:, :n_pairs], axis=1)
        qpos = 2 * n_pairs + 2 * slot                                                    # (B, n_pairs)
        rows = np.arange(B)[:, None]
        seq[rows, qpos] = np.take_along_axis(keys, order, axis=1)
        seq[rows, qpos + 1] = np.take_along_axis(values, order, axis=1)
        inputs = seq[:, :-1]
        targets = np.full((B, T), IGNORE, dtype=np.int64)
        targets[rows, qpos] = seq[rows, qpos + 1]
        return np.ascontiguousarray(inputs), targets

    def config(self) -> dict[str, int]:
        return {"vocab_size": self.vocab_size, "seq_len": self.seq_len,
                "num_kv_pairs": self.num_kv_pairs}


def stdlib_source_files() -> list[str]:
    """The ``.py`` files directly in the running interpreter's standard-library folder, sorted."""
    root = sysconfig.get_paths()["stdlib"]
    try:
        names = sorted(n for n in os.listdir(root) if n.endswith(".py"))
    except OSError as e:
        raise RuntimeError(f"cannot read the standard library folder {root!r}: {e}") from e
    if not names:
        raise RuntimeError(f"no .py files in the standard library folder {root!r}")
    return [os.path.join(root, n) for n in names]


class TextCorpus:
    """Byte-level language modelling on the standard library's top-level ``.py`` files.

    Vocabulary: the 256 byte values (the sources are almost all ASCII, so bits per byte
    is bits per character).  Split: the files are sorted by name and every
    ``heldout_every``-th file (the 0th, the ``heldout_every``-th, ...) is held out, the
    rest is training text; at most ``max_bytes`` of each split are kept.  Training
    batches are random windows of the training text; :meth:`heldout` cuts the held-out
    text into consecutive windows.
    """

    name = "text"
    vocab_size = 256

    def __init__(self, *, seq_len: int = 128, heldout_every: int = 10, max_bytes: int = 4_000_000,
                 files: Iterable[str] | None = None) -> None:
        self.seq_len = check_int("seq_len", seq_len, 1)
        self.heldout_every = check_int("heldout_every", heldout_every, 2)
        self.max_bytes = check_int("max_bytes", max_bytes, 2)
        files = stdlib_source_files() if files is None else list(files)
        train, held = [], []
        for i, path in enumerate(files):
            with open(path, "rb") as f:
                (held if i % self.heldout_every == 0 else train).append(f.read())
        self.train_data = np.frombuffer(b"\n".join(train)[:self.max_bytes], dtype=np.uint8)
        self.heldout_data = np.frombuffer(b"\n".join(held)[:self.max_bytes], dtype=np.uint8)
        for name, data in (("training", self.train_data), ("held-out", self.heldout_data)):
            if data.size < self.seq_len + 1:
                raise ValueError(f"the {name} text has {data.size} bytes, fewer than "
                                 f"seq_len + 1 = {self.seq_len + 1}")

    def batch(self, rng: Any, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Random training windows ``(inputs, targets)``, int64 (B, T)."""
        rng = make_rng(rng, "rng")
        B = check_int("batch_size", batch_size, 1)
        T = self.seq_len
        start = rng.integers(0, self.train_data.size - T, size=B)                  # (B,)
        win = self.train_data[start[:, None] + np.arange(T + 1)].astype(np.int64)  # (B, T+1)
        return win[:, :-1].copy(), win[:, 1:].copy()

    def heldout(self, num_windows: int) -> tuple[np.ndarray, np.ndarray]:
        """The first ``num_windows`` consecutive held-out windows (fewer if the text is short)."""
        n = check_int("num_windows", num_windows, 1)
        T = self.seq_len
        n = min(n, (self.heldout_data.size - 1) // T)
        start = np.arange(n) * T
        win = self.heldout_data[start[:, None] + np.arange(T + 1)].astype(np.int64)
        return win[:, :-1].copy(), win[:, 1:].copy()

    def config(self) -> dict[str, int]:
        return {"seq_len": self.seq_len, "heldout_every": self.heldout_every,
                "max_bytes": self.max_bytes}
