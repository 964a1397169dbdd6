"""Context-parallel top-k attention against the single-process op.

Runs in the plain test run with one rank and in CI under ``mpiexec -n 2 python -m pytest
tests/distributed`` (every rank runs every test, in the same order; each holds a slice of
the keys).  Needs mpi4py (``pip install -e ".[mpi]"``); skipped without it.
"""
import sys

import numpy as np
import pytest

pytest.importorskip("mpi4py")

import topkattn as ta
from topkattn.distributed import topk_attention, topk_attention_backward, topk_attention_forward, world
from topkattn.testing import tolerance

COMM = world()


def _shard(S, uneven=False):
    """(lo, hi) of this rank's keys; ``uneven``: rank 0 holds none, the last rank the rest."""
    P, r = COMM.size, COMM.rank
    if uneven and P > 1:
        cuts = [0] + [min(S, (i * S) // (P - 1)) for i in range(P)]
        return cuts[r], cuts[r + 1]
    cuts = np.linspace(0, S, P + 1).astype(int)
    return int(cuts[r]), int(cuts[r + 1])


def _inputs(dtype, B=2, H=4, G=2, T=9, S=31, D=8, Dv=5, seed=0):
    rng = np.random.default_rng(seed)  # the same on every rank
    return [rng.standard_normal(shape).astype(dtype)
            for shape in ((B, H, T, D), (B, G, S, D), (B, G, S, Dv), (B, H, T, Dv))]


CASES = [
    dict(topk=3),
    dict(topk=4, causal=False),
    dict(topk=4, sinks=2, window=3),
    dict(topk=5, sinks=1, window=2, causal=False),
    dict(topk=3, forget_rate=0.3, seed=11),
    dict(topk=40),  # more than every row's candidates: rows with fewer than k keys
    dict(topk=3, temperature=0.5, scale=0.7),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("uneven", [False, True])
@pytest.mark.parametrize("kw", CASES)
def test_forward_and_backward_equal_one_process(kw, uneven, dtype):
    q, k, v, dout = _inputs(dtype)
    lo, hi = _shard(k.shape[2], uneven)
    ref, saved_ref = ta.topk_attention_forward(q, k, v, **kw)
    rdq, rdk, rdv = ta.topk_attention_backward(dout, saved_ref)
    out, saved = topk_attention_forward(q, k[:, :, lo:hi], v[:, :, lo:hi], comm=COMM, key_offset=lo, **kw)
    dq, dk, dv = topk_attention_backward(dout, saved)
    tol = tolerance(dtype)
    if dtype == np.float64:  # the selection itself is exact: the same keys in the same slots
        np.testing.assert_array_equal(saved.global_idx, saved_ref.idx)
    np.testing.assert_allclose(out, ref, **tol)
    np.testing.assert_allclose(dq, rdq, **tol)
    np.testing.assert_allclose(dk, rdk[:, :, lo:hi], **tol)
    np.testing.assert_allclose(dv, rdv[:, :, lo:hi], **tol)
    np.testing.assert_allclose(topk_attention(q, k[:, :, lo:hi], v[:, :, lo:hi], comm=COMM, key_offset=lo, **kw),
                               out, rtol=0, atol=0)


def test_nan_key_stays_in_the_rows_that_select_it():
    q, k, v, dout = _inputs(np.float64)
    k[0, 0, 2, 0] = np.nan  # NaN ranks above every number: every row of (b=0, g=0) that sees key 2 takes it
    lo, hi = _shard(k.shape[2])
    ref, _ = ta.topk_attention_forward(q, k, v, topk=3)
    out, _ = topk_attention_forward(q, k[:, :, lo:hi], v[:, :, lo:hi], comm=COMM, key_offset=lo, topk=3)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
    np.testing.assert_allclose(out[~np.isnan(ref)], ref[~np.isnan(ref)], rtol=1e-12, atol=1e-12)


class _CountingComm:
    """The world communicator, counting the bytes each rank contributes to collectives."""

    def __init__(self, comm):
        self.comm, self.size, self.rank, self.sent = comm, comm.size, comm.rank, 0

    def allgather(self, obj):
        return self.comm.allgather(obj)  # small metadata (shapes, error messages)

    def Allgather(self, send, recv):
        self.sent += send.nbytes
        return self.comm.Allgather(send, recv)

    def Allreduce(self, send, recv, op):
        self.sent += send.nbytes
        return self.comm.Allreduce(send, recv, op=op)


def test_traffic_does_not_grow_with_the_context():
    sent = []
    for S in (64, 512):
        q, k, v, dout = _inputs(np.float64, B=1, H=2, G=1, T=6, S=S)
        lo, hi = _shard(S)
        counting = _CountingComm(COMM)
        _, saved = topk_attention_forward(q, k[:, :, lo:hi], v[:, :, lo:hi], comm=counting, key_offset=lo, topk=4)
        topk_attention_backward(dout, saved)
        sent.append(counting.sent)
    assert sent[0] == sent[1]  # O(T * K * ranks + T * (D + Dv)) bytes: nothing proportional to S
    rows, m, D, Dv = 1 * 2 * 6, 4, 8, 5
    assert sent[0] == rows * m * (8 + 8) + rows * 8 + rows * Dv * 8 + rows * D * 8


def test_bad_shards_raise_on_every_rank():
    q, k, v, _ = _inputs(np.float64)
    lo, hi = _shard(k.shape[2])
    with pytest.raises(ValueError, match="tile"):  # every rank claims to start at 1: a gap at 0
        topk_attention(q, k[:, :, lo:hi], v[:, :, lo:hi], comm=COMM, key_offset=lo + 1, topk=3)


def test_one_ranks_bad_input_fails_every_rank_naming_it():
    q, k, v, _ = _inputs(np.float64)
    lo, hi = _shard(k.shape[2])
    bad = COMM.size - 1
    kk = k[:, :, lo:hi].astype(np.float32) if COMM.rank == bad else k[:, :, lo:hi]
    expected = (TypeError, "share one dtype") if COMM.rank == bad else (RuntimeError, f"rank {bad} failed")
    with pytest.raises(expected[0], match=expected[1]):
        topk_attention(q, kk, v[:, :, lo:hi], comm=COMM, key_offset=lo, topk=3)


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(topk="auto"), ValueError, "topk must be an integer"),
    (dict(topk=3, forget_rate=0.2), ValueError, "needs a seed"),
    (dict(topk=3, key_offset=-1), ValueError, "key_offset"),
    (dict(topk=0), ValueError, "topk must be an integer >= 1"),
    (dict(topk=3, causal=None), TypeError, "causal must be True or False, got NoneType"),
])
def test_bad_arguments(kw, exc, msg):
    q, k, v, _ = _inputs(np.float64)
    lo, hi = _shard(k.shape[2])
    kw = {"key_offset": lo, **kw}
    with pytest.raises(exc, match=msg):
        topk_attention(q, k[:, :, lo:hi], v[:, :, lo:hi], comm=COMM, **kw)


@pytest.mark.parametrize("name,mine", [("topk", lambda r: 3 + r), ("causal", lambda r: r == 0),
                                       ("window", lambda r: r), ("seed", lambda r: 7 + r),
                                       ("seed", lambda r: np.int64(7 + r))])
def test_options_differing_across_ranks_fail_every_rank_naming_them(name, mine):
    # each rank would select differently (or abort in a collective of mismatched sizes): refused
    q, k, v, _ = _inputs(np.float64)
    lo, hi = _shard(k.shape[2])
    kw = {"topk": 3, "key_offset": lo, "forget_rate": 0.2 if name == "seed" else 0.0, "seed": 7, name: mine(COMM.rank)}
    if COMM.size == 1:  # one rank agrees with itself
        topk_attention(q, k[:, :, lo:hi], v[:, :, lo:hi], comm=COMM, **kw)
        return
    with pytest.raises(ValueError, match=f"needs the same {name} on every rank, got rank 0: {name}="):
        topk_attention(q, k[:, :, lo:hi], v[:, :, lo:hi], comm=COMM, **kw)


def test_seeds_may_differ_without_forgetting_and_numpy_ints_equal_ints():
    # the seed draws nothing when forget_rate is 0; np.int64(7) and 7 are the same seed
    q, k, v, _ = _inputs(np.float64)
    lo, hi = _shard(k.shape[2])
    out = topk_attention(q, k[:, :, lo:hi], v[:, :, lo:hi], comm=COMM, key_offset=lo, topk=3, seed=COMM.rank)
    np.testing.assert_allclose(out, ta.topk_attention(q, k, v, topk=3), atol=1e-12)
    seed = np.int64(7) if COMM.rank == 0 else 7
    out = topk_attention(q, k[:, :, lo:hi], v[:, :, lo:hi], comm=COMM, key_offset=lo, topk=3, forget_rate=0.3,
                         seed=seed)
    np.testing.assert_allclose(out, ta.topk_attention(q, k, v, topk=3, forget_rate=0.3, seed=7), atol=1e-12)


def test_missing_mpi4py_says_what_to_install(monkeypatch):
    from topkattn.distributed import comm

    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[mpi\]"'):
        comm.require_mpi()
