"""Data-parallel toy training against the single-process loop.

Runs in the plain test run with one rank and in CI under ``mpiexec -n 2 python -m pytest
tests/distributed`` (every rank runs every test in the same order; the single-process
reference is computed on every rank).  Needs mpi4py; skipped without it.
"""
import json
import os

import numpy as np
import pytest

pytest.importorskip("mpi4py")

from topkattn.distributed.comm import launched_world, world
from topkattn.distributed.data_parallel import (
    GradientReducer,
    PeerError,
    check_data_parallel,
    check_replicas,
    params_checksum,
    split_rows,
    train_data_parallel,
)
from topkattn.layers.loss import IGNORE, softmax_cross_entropy
from topkattn.ops.selection import forget_draws
from topkattn.training.checkpoint import load_training_state
from topkattn.training.train import METRICS_NAME, OutDirError, RowSliceGenerator, TrainConfig, train

COMM = world()
RTOL, ATOL = 2e-5, 2e-6  # float32 rounding: the reduced gradient sums in another order


def tiny_cfg(**kw):
    base = dict(d_model=16, heads=2, seq_len=12, num_kv_pairs=3, vocab_size=16, batch_size=4,
                steps=6, warmup_steps=2, eval_size=16, k=4)
    base.update(kw)
    return TrainConfig(**base)


def shared_dir(tmp_path):
    """Rank 0's tmp_path, the same folder on every rank."""
    return COMM.bcast(str(tmp_path) if COMM.rank == 0 else None, root=0)


class CountingComm:
    """``comm`` counting its Allreduce calls; ``crash_at``: the n-th Allreduce raises Crash on
    every rank alike (a collective crash, no rank left waiting)."""

    def __init__(self, comm, crash_at=None):
        self.comm, self.crash_at, self.allreduces = comm, crash_at, 0

    def __getattr__(self, name):
        return getattr(self.comm, name)

    def Allreduce(self, *args, **kw):
        self.allreduces += 1
        if self.allreduces == self.crash_at:
            raise Crash
        return self.comm.Allreduce(*args, **kw)


class Crash(Exception):
    pass


def test_row_slice_generator_draws_the_whole_batch_rows():
    shape = (6, 2, 5, 3)  # (B, H, T, K')
    seed = 2**64 - 5      # per-layer seeds are 64-bit
    full = forget_draws(seed, shape, 0.3)
    for start, stop in ((0, 3), (2, 4), (5, 6)):
        part = forget_draws(RowSliceGenerator(seed, start, 6), (stop - start,) + shape[1:], 0.3)
        np.testing.assert_array_equal(part, full[start:stop])
    assert full.any() and not full.all()
    with pytest.raises(ValueError, match="do not fit in a batch of 6"):
        RowSliceGenerator(seed, 5, 6).random((2, 2, 5, 3))


def test_split_rows_and_launch_detection():
    assert split_rows(8, 0, 2) == (0, 4) and split_rows(8, 1, 2) == (4, 8)
    assert split_rows(6, 2, 3) == (4, 6)
    with pytest.raises(ValueError, match=r"batch_size \(5\) must be a multiple of the number of MPI ranks \(2\)"):
        split_rows(5, 0, 2)
    assert launched_world({"PMI_RANK": "1", "PMI_SIZE": "2"}) == (1, 2)
    assert launched_world({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4"}) == (0, 4)
    assert launched_world({"PMI_RANK": "0", "PMI_SIZE": "1"}) is None
    assert launched_world({}) is None


def test_reducer_weights_ranks_by_their_scored_targets():
    """One linear layer, ranks with different numbers of ignored targets: the reduced gradient
    and loss equal the whole batch's, which the plain mean of the ranks' gradients does not."""
    rng = np.random.default_rng(0)  # the same on every rank
    P = COMM.size
    n, d, V = 3 * P, 5, 7
    x = rng.standard_normal((n, d))
    W = rng.standard_normal((d, V))
    y = rng.integers(0, V, n)
    y[[i for i in range(n) if i % 3 == 0 and i < 3 * (P - 1)]] = IGNORE  # fewer targets on the first ranks
    y[1] = IGNORE
    loss_all, d_all = softmax_cross_entropy(x @ W, y)
    grad_all = x.T @ d_all
    lo, hi = split_rows(n, COMM.rank, P)
    loss_r, d_r = softmax_cross_entropy(x[lo:hi] @ W, y[lo:hi])
    grads = {"W": x[lo:hi].T @ d_r, "b": d_r.sum(0)}
    weight = int((y[lo:hi] != IGNORE).sum()) / int((y != IGNORE).sum())
    plain_mean = COMM.allreduce(grads["W"]) / P
    reducer = GradientReducer(COMM)
    loss, aux = reducer({"W": W}, grads, loss_r, 0.5, weight)
    assert reducer.allreduces == 1
    np.testing.assert_allclose(grads["W"], grad_all, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grads["b"], d_all.sum(0), rtol=1e-12, atol=1e-12)
    assert loss == pytest.approx(loss_all, rel=1e-12) and aux == pytest.approx(0.5, rel=1e-12)
    if P > 1:
        assert not np.allclose(plain_mean, grad_all)


@pytest.mark.parametrize("forget_rate", [0.0, 0.3])
def test_loss_history_equals_one_process(forget_rate):
    cfg = tiny_cfg(forget_rate=forget_rate, steps=6)
    ref = train(cfg)  # the single-process reference, on every rank
    comm = CountingComm(COMM)
    res = train_data_parallel(cfg, comm, check_every=2)
    assert comm.allreduces == cfg.steps  # one fused buffer a step
    np.testing.assert_allclose(res.losses, ref.losses, rtol=RTOL, atol=ATOL)
    sums = COMM.allgather(params_checksum(res.model.params))
    assert len(set(sums)) == 1  # replicas bit-identical
    for name, p in ref.model.params.items():
        np.testing.assert_allclose(res.model.params[name], p, rtol=1e-4, atol=1e-5)
    assert res.metrics["accuracy"] == pytest.approx(ref.metrics["accuracy"], abs=1 / 16)


def test_forget_draws_follow_the_global_rows():
    """With forgetting, a rank that drew its own (B/N, ...) block would select other keys: the
    first step's loss would differ from the single-process one beyond float32 rounding."""
    cfg = tiny_cfg(forget_rate=0.5, steps=1, batch_size=2 * COMM.size)
    ref = train(cfg)
    res = train_data_parallel(cfg, COMM)
    np.testing.assert_allclose(res.losses, ref.losses, rtol=RTOL, atol=ATOL)
    assert train(tiny_cfg(forget_rate=0.0, steps=1, batch_size=2 * COMM.size)).losses[0] != ref.losses[0]


def test_check_replicas_finds_a_diverged_rank():
    params = {"w": np.full(3, 1.0, np.float32)}
    check_replicas(COMM, params)
    if COMM.size > 1:
        if COMM.rank == 1:
            params["w"][0] = np.nextafter(np.float32(1), np.float32(2))
        with pytest.raises(RuntimeError, match=r"rank\(s\) \[1\] differ"):
            check_replicas(COMM, params)


def test_rank0_writes_the_files_and_resume_equals_uninterrupted(tmp_path):
    out = shared_dir(tmp_path)
    cfg = tiny_cfg(steps=9, forget_rate=0.3)
    full = train_data_parallel(cfg, COMM)
    crashing = CountingComm(COMM, crash_at=8)  # every rank crashes in step 8's reduction
    with pytest.raises(Crash):
        train_data_parallel(cfg, crashing, out_dir=os.path.join(out, "run"), checkpoint_every=3)
    COMM.Barrier()
    assert load_training_state(os.path.join(out, "run", "checkpoint.npz"))["step"] == 6
    resumed = train_data_parallel(cfg, COMM, out_dir=os.path.join(out, "run"), resume=True, checkpoint_every=3)
    assert resumed.metrics["resumed_from"] == 6 and resumed.metrics["steps_this_run"] == 3
    np.testing.assert_array_equal(resumed.losses, full.losses)
    assert params_checksum(resumed.model.params) == params_checksum(full.model.params)
    COMM.Barrier()
    with open(os.path.join(out, "run", METRICS_NAME)) as f:
        assert json.load(f)["last_loss"] == resumed.losses[-1]
    assert sorted(os.listdir(os.path.join(out, "run"))) == ["checkpoint.npz", "history.json", "metrics.json"]


def test_a_non_writer_writes_nothing(tmp_path):
    out = tmp_path / "quiet"
    os.makedirs(out)
    res = train(tiny_cfg(steps=2), out_dir=str(out), is_writer=False, checkpoint_every=1)
    assert os.listdir(out) == [] and len(res.losses) == 2


def test_batch_size_not_a_multiple_of_the_ranks_fails_on_every_rank():
    cfg = tiny_cfg(batch_size=COMM.size + 1) if COMM.size > 1 else None
    if cfg is None:
        with pytest.raises(ValueError, match="must be a multiple of the number of MPI ranks"):
            split_rows(3, 0, 2)
        return
    with pytest.raises(ValueError, match=rf"batch_size \({COMM.size + 1}\) must be a multiple of the number "
                                         rf"of MPI ranks \({COMM.size}\)"):
        train_data_parallel(cfg, COMM)


def test_a_setup_error_on_rank0_is_raised_on_every_rank(tmp_path):
    out = shared_dir(tmp_path)
    blocker = os.path.join(out, "file")
    if COMM.rank == 0:
        with open(blocker, "w") as f:
            f.write("not a folder")
    COMM.Barrier()
    if COMM.rank == 0:
        with pytest.raises(OutDirError, match="is not a writable folder"):
            train_data_parallel(tiny_cfg(steps=2), COMM, out_dir=blocker)
    else:
        with pytest.raises(PeerError, match="rank 0: OutDirError: out_dir .* is not a writable folder"):
            train_data_parallel(tiny_cfg(steps=2), COMM, out_dir=blocker)


def test_kv_experts_are_refused_over_several_ranks():
    cfg = tiny_cfg(kv_experts=2, kv_experts_active=1)
    check_data_parallel(cfg, 1)  # one rank: the whole batch, nothing split
    with pytest.raises(ValueError, match=r"kv_experts \(2\): the experts' load-balancing loss is one over the whole"):
        check_data_parallel(cfg, 2)
    if COMM.size > 1:
        with pytest.raises(ValueError, match="train KV experts in one process"):
            train_data_parallel(cfg, COMM)


@pytest.mark.parametrize("name,mine", [("steps", lambda r: 2 + r), ("k", lambda r: 4 + r),
                                       ("forget_rate", lambda r: 0.3 * r), ("batch_size", lambda r: 4 + 2 * r)])
def test_configs_differing_across_ranks_fail_every_rank_naming_them(name, mine):
    # other steps left a rank waiting in an all-reduce; another k or forget_rate trained silently apart
    cfg = tiny_cfg(**{"steps": 2, name: mine(COMM.rank)})
    if COMM.size == 1:  # one rank agrees with itself
        train_data_parallel(cfg, COMM)
        return
    with pytest.raises(ValueError, match=f"train_data_parallel needs the same {name} on every rank, "
                                         f"got rank 0: {name}="):
        train_data_parallel(cfg, COMM)
