"""Block selection (MoBA, Lu et al. 2025): each query picks whole blocks of keys.

Shape letters: B batch, H query heads, G KV heads (H % G == 0), T queries, S keys, D head
dim, Nb key blocks (ceil(S / block_size)), Kb selected blocks per query (min(topk_blocks, Nb)),
K = Kb * block_size index slots per query, c queries per chunk; flattened (b, h, t) rows
are written ``rows``.

The keys are cut into blocks of ``block_size`` consecutive positions; block n holds keys
n * block_size .. min((n + 1) * block_size, S) - 1 (the last block may be partial).

    mean_n   = mean of the keys block n holds                       (B, G, Nb, D)
    gate     = q_t . mean_n      (unscaled; NaN ranks above every number)
    blocks_t = the Kb best candidate blocks by gate, ties to the lower block index

Causal alignment is the token op's: query t sits at pos = S - T + t and sees keys j <= pos.
Under ``causal`` the block holding pos (the *own* block, pos // block_size) is always
selected, takes slot 0 and counts toward ``topk_blocks``; the other Kb - 1 slots rank the
blocks strictly before it (blocks after the query are never candidates).  A row that sees
no key (pos < 0) selects nothing.  Without ``causal`` every block is a candidate.

The result is a block index tensor ``blocks`` (B, H, T, Kb), -1 = empty slot, in rank order
(own block first).  :func:`expand_blocks` turns it into the token index tensor
idx (B, H, T, K) that :mod:`topkattn.ops.sparse_attention` consumes: slot s * block_size + i
holds key blocks[s] * block_size + i when the query may see it, else -1.  The gate is a
selection: it carries no gradient.  Memory: one (B, H, c, Nb) gate tile per chunk plus the
(B, H, T, Kb) result; no (T, S) matrix.
Reference: :func:`topkattn.ops.reference.block_topk_attention_reference`.
"""
from __future__ import annotations

import numpy as np

from topkattn.backend import Array, get_array_module
from topkattn.ops.selection import ranked_topm_xp
from topkattn.threads import blas_single_thread, n_workers, pool

try:  # Numba CPU kernels are optional at run time: the NumPy path needs no compiler.
    from topkattn.ops import cpu_kernels as _cpu_kernels
except Exception:  # pragma: no cover - numba missing or broken
    _cpu_kernels = None

TILE_BYTES = 16 * 2**20  # budget for one chunk's (B, H, c, Nb) gate tile


class BlockBounds:
    """Per-query block geometry shared by every implementation.

    Attributes: ``S``, ``T``, ``block_size``, ``n_blocks`` (Nb), ``n_sel`` (Kb), ``causal``,
    and int64 arrays of shape (T,):
      end     -- one past the last key the query sees (pos + 1 if causal else S, in [0, S])
      own     -- the own block under causal (-1 for a row that sees no key, and without causal)
      n_cand  -- ranked candidate blocks 0 .. n_cand - 1 (causal: the blocks before the own one)
    ``m``: ranked slots per row (Kb - 1 under causal, the own block taking slot 0; else Kb).
    """

    def __init__(self, S: int, T: int, *, block_size: int, topk_blocks: int, causal: bool) -> None:
        self.S, self.T, self.causal = int(S), int(T), bool(causal)
        self.block_size = min(int(block_size), max(self.S, 1))  # one block of all S keys either way
        self.n_blocks = -(-self.S // self.block_size)
        self.n_sel = min(int(topk_blocks), self.n_blocks)
        pos = np.arange(T, dtype=np.int64) + (S - T)  # (T,)
        if causal:
            self.end = np.clip(pos + 1, 0, S)
            self.own = np.where(self.end > 0, (self.end - 1) // self.block_size, -1)
            self.n_cand = np.maximum(self.own, 0)
            self.m = max(self.n_sel - 1, 0)
        else:
            self.end = np.full(T, S, dtype=np.int64)
            self.own = np.full(T, -1, dtype=np.int64)
            self.n_cand = np.full(T, self.n_blocks, dtype=np.int64)
            self.m = self.n_sel

    @property
    def n_slots(self) -> int:
        """K = Kb * block_size token index slots per query."""
        return self.n_sel * self.block_size


def block_means(k: Array, block_size: int) -> Array:
    """(B, G, Nb, D): the mean of the keys each block holds (the last block may be partial).

    Computed in k's dtype (a sum over the block, then one division).
    """
    xp = get_array_module(k)
    B, G, S, D = k.shape
    n_full = S // block_size
    parts = []
    if n_full:
        full = k[:, :, :n_full * block_size].reshape(B, G, n_full, block_size, D)
        parts.append(full.sum(-2) / k.dtype.type(block_size))
    if S > n_full * block_size:  # partial last block
        rest = S - n_full * block_size
        parts.append(k[:, :, n_full * block_size:].sum(-2, keepdims=True) / k.dtype.type(rest))
    if not parts:
        return xp.zeros((B, G, 0, D), dtype=k.dtype)
    return parts[0] if len(parts) == 1 else xp.concatenate(parts, axis=2)


def select_blocks(q: Array, k: Array, *, block_size: int, topk_blocks: int, causal: bool = True,
                  chunk_size: int | None = None, impl: str = "auto", means: Array | None = None) -> Array:
    """Block index tensor (B, H, T, Kb) int64 of the blocks each query attends, -1 padded.

    q (B, H, T, D), k (B, G, S, D); ``means`` (B, G, Nb, D) may be passed when already
    computed (:func:`block_means`).  Gate tiles are computed ``chunk_size`` queries at a
    time (default: about 16 MiB per tile).  ``impl``: "auto" (the Numba row top-m on
    NumPy arrays when Numba is importable), "numba" or "numpy" (vectorised NumPy/CuPy).
    Inputs are validated by :func:`topkattn.ops.block_attention.block_topk_attention_forward`.
    """
    xp = get_array_module(q, k)
    B, H, T, D = q.shape
    G, S = k.shape[1], k.shape[2]
    rep = H // G
    bounds = BlockBounds(S, T, block_size=block_size, topk_blocks=topk_blocks, causal=causal)
    Nb, Kb, m = bounds.n_blocks, bounds.n_sel, bounds.m
    blocks = xp.full((B, H, T, Kb), -1, dtype=xp.int64)
    if Kb == 0 or T == 0 or B * H == 0:
        return blocks
    n_own = 1 if causal else 0
    if causal:
        blocks[..., 0] = xp.asarray(bounds.own)
    if m == 0:
        return blocks
    if means is None:
        means = block_means(k, block_size)
    use_numba = _choose_numba(impl, xp)
    if chunk_size is None:
        chunk_size = max(1, TILE_BYTES // max(1, B * H * Nb * q.dtype.itemsize))
    qg = q.reshape(B, G, rep, T, D)
    mt = means.swapaxes(-1, -2)  # (B, G, D, Nb)
    spans = [(t0, min(T, t0 + chunk_size)) for t0 in range(0, T, chunk_size)]

    def ranked_chunk(t0, t1):
        c = t1 - t0
        n_cols = int(bounds.n_cand[t1 - 1])  # n_cand is non-decreasing in t
        if n_cols == 0:
            return t0, t1, None
        qc = qg[:, :, :, t0:t1].reshape(B, G, rep * c, D)
        gate = xp.matmul(qc, mt[..., :n_cols]).reshape(B * H * c, n_cols)  # (rows, n_cols)
        n_cand = np.tile(bounds.n_cand[t0:t1], B * H)  # (rows,)
        if use_numba:
            ranked = np.full((B * H * c, m), -1, dtype=np.int64)
            zeros = np.zeros(B * H * c, dtype=np.int64)
            _cpu_kernels.ranked_topm_rows(np.ascontiguousarray(gate), ranked, n_cand, zeros, zeros, 0, m)
        else:
            cand = xp.arange(n_cols)[None, :] < xp.asarray(n_cand)[:, None]  # (rows, n_cols)
            ranked = ranked_topm_xp(gate, cand, m)
        return t0, t1, ranked.reshape(B, H, c, m)

    def store(t0, t1, ranked):
        if ranked is not None:
            blocks[:, :, t0:t1, n_own:] = ranked

    nw = n_workers() if use_numba and len(spans) > 1 else 1
    if nw == 1:
        for span in spans:
            store(*ranked_chunk(*span))
        return blocks
    with blas_single_thread():  # one BLAS thread per worker
        for i in range(0, len(spans), nw):  # nw chunks in flight: memory stays O(nw * chunk * Nb)
            for job in [pool().submit(ranked_chunk, *span) for span in spans[i:i + nw]]:
                store(*job.result())
    return blocks


def expand_blocks(blocks: Array, bounds: BlockBounds) -> Array:
    """Token index tensor idx (B, H, T, K) from blocks (B, H, T, Kb), K = Kb * block_size.

    Slot s * block_size + i holds key blocks[s] * block_size + i, or -1 where the block slot
    is empty or the key lies past what the query sees (its causal end, or S).
    """
    xp = get_array_module(blocks)
    B, H, T, Kb = blocks.shape
    bs = bounds.block_size
    j = blocks[..., None] * bs + xp.arange(bs, dtype=xp.int64)  # (B, H, T, Kb, bs)
    end = xp.asarray(bounds.end)[:, None, None]  # (T, 1, 1)
    ok = (blocks[..., None] >= 0) & (j < end)
    return xp.where(ok, j, -1).reshape(B, H, T, Kb * bs)


def _choose_numba(impl, xp):
    """Rank with the Numba row top-m? "auto": NumPy arrays with Numba importable."""
    if impl in ("numpy", "cuda") or xp is not np:
        if impl == "numba":
            raise ValueError("impl='numba' runs on the CPU; got CuPy arrays")
        return False
    if _cpu_kernels is None:
        if impl == "numba":
            raise RuntimeError("impl='numba' requested but numba is not importable")
        return False
    return True


__all__ = ["BlockBounds", "block_means", "select_blocks", "expand_blocks"]
