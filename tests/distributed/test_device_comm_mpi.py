"""The routed collectives on NumPy arrays over real MPI: unchanged by the NCCL transport.

Runs in the plain test run with one rank and in CI under ``mpiexec -n 2 python -m pytest
tests/distributed`` (every rank runs every test in the same order).  NumPy buffers always
travel through MPI, whatever ``TOPKATTN_DEVICE_COMM`` says, and never make a transport choice
(so never touch CuPy).  Needs mpi4py; skipped without it.
"""
import numpy as np
import pytest

pytest.importorskip("mpi4py")

from topkattn.distributed import device_comm as dc
from topkattn.distributed.comm import allgather_rows, allreduce_sum, device_route, world
from topkattn.distributed.data_parallel import GradientReducer
from topkattn.distributed.exchange import allgather_fields

COMM = world()
P, R = COMM.size, COMM.rank


class CountingComm:
    """COMM, counting the array collectives this rank calls."""

    def __init__(self):
        self.counts = {}

    def __getattr__(self, name):
        return getattr(COMM, name)

    def _count(self, name):
        self.counts[name] = self.counts.get(name, 0) + 1

    def Allreduce(self, *args, **kw):
        self._count("Allreduce")
        return COMM.Allreduce(*args, **kw)

    def Allgather(self, *args, **kw):
        self._count("Allgather")
        return COMM.Allgather(*args, **kw)


def _rank_data(rank, dtype=np.float64):
    return (np.arange(12).reshape(3, 4) * (rank + 1) + rank).astype(dtype)


@pytest.mark.parametrize("mode", ["auto", "nccl", "mpi"])
def test_numpy_collectives_are_mpi_whatever_the_mode(monkeypatch, mode):
    monkeypatch.setenv(dc.ENV_VAR, mode)
    comm = CountingComm()
    everyone = [_rank_data(r) for r in range(P)]
    a = _rank_data(R)
    assert device_route(comm, a) is None
    np.testing.assert_array_equal(allreduce_sum(comm, a), sum(everyone))
    np.testing.assert_array_equal(allgather_rows(comm, a), np.stack(everyone))
    b = a.copy()
    assert allreduce_sum(comm, b, inplace=True) is b
    np.testing.assert_array_equal(b, sum(everyone))
    s = _rank_data(R)[:, ::2]  # a strided array is summed into itself through a contiguous copy
    allreduce_sum(comm, s, inplace=True)
    np.testing.assert_array_equal(s, sum(e[:, ::2] for e in everyone))
    assert comm.counts == {"Allreduce": 3, "Allgather": 1}
    assert id(comm) not in dc._CHOSEN  # no transport choice: nothing asked CuPy


def test_zero_d_arrays_keep_their_shape():
    # a 0-d sum is 0-d and a 0-d gather is (ranks,), as the 1-d ones are (n,) and (ranks, n)
    out = allreduce_sum(COMM, np.array(2.0 + R))
    assert out.shape == () and out == sum(2.0 + r for r in range(P))
    a = np.array(1.0 + R)
    assert allreduce_sum(COMM, a, inplace=True) is a and a.shape == () and a == sum(1.0 + r for r in range(P))
    got = allgather_rows(COMM, np.array(R))
    assert got.shape == (P,)
    np.testing.assert_array_equal(got, np.arange(P))


def test_integer_and_float32_sums_are_exact():
    for dtype in (np.int32, np.int64, np.float32):
        out = allreduce_sum(COMM, _rank_data(R, dtype))
        assert out.dtype == dtype
        np.testing.assert_array_equal(out, sum(_rank_data(r, dtype) for r in range(P)))


def test_allgather_fields_numpy_is_one_mpi_allgather():
    comm = CountingComm()
    spec = [("s", (2, 3), np.float32), ("j", (4,), np.int64)]
    got = allgather_fields(comm, spec, {"s": np.full((2, 3), R, np.float32), "j": np.arange(4) + 10 * R})
    assert comm.counts == {"Allgather": 1}
    assert all(type(v) is np.ndarray for v in got.values())
    np.testing.assert_array_equal(got["s"], np.stack([np.full((2, 3), r, np.float32) for r in range(P)]))
    np.testing.assert_array_equal(got["j"], np.stack([np.arange(4) + 10 * r for r in range(P)]))


def test_gradient_reducer_numpy_is_one_mpi_allreduce_a_step(monkeypatch):
    monkeypatch.setenv(dc.ENV_VAR, "nccl")
    comm = CountingComm()
    reducer = GradientReducer(comm)
    weights = [(r + 1) / sum(range(1, P + 1)) for r in range(P)]
    for step in range(2):
        grads = {"w": _rank_data(R) + step, "b": np.full(5, float(R))}
        loss, aux = reducer(None, grads, 2.0 + R, 0.5 * R, weights[R])
        np.testing.assert_allclose(grads["w"], sum(w * (_rank_data(r) + step) for r, w in enumerate(weights)),
                                   rtol=1e-14)
        np.testing.assert_allclose(grads["b"], np.full(5, sum(w * r for r, w in enumerate(weights))), rtol=1e-14)
        assert loss == pytest.approx(sum(w * (2.0 + r) for r, w in enumerate(weights)), rel=1e-14)
        assert aux == pytest.approx(sum(w * 0.5 * r for r, w in enumerate(weights)), rel=1e-14, abs=1e-15)
    assert comm.counts == {"Allreduce": 2} and reducer.allreduces == 2


def test_mpi_mode_is_chosen_collectively_without_cupy():
    assert dc.select_device_comm(COMM, "mpi") is None
    assert dc.device_comm_for(COMM) is None  # remembered
    dc.forget_device_comm(COMM)
    assert id(COMM) not in dc._CHOSEN


@pytest.mark.skipif(P < 2, reason="needs two ranks to disagree")
def test_ranks_disagreeing_on_the_mode_raise_on_every_rank():
    with pytest.raises(RuntimeError, match="the ranks disagree on TOPKATTN_DEVICE_COMM"):
        dc.select_device_comm(COMM, "mpi" if R == 0 else "auto")
    assert id(COMM) not in dc._CHOSEN


def _usable_cupy():
    """CuPy with a GPU, or skip (the same answer on every rank of one machine)."""
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no GPU")
    except Exception as e:  # no driver
        pytest.skip(f"no usable GPU: {e}")
    return cupy


@pytest.mark.cuda
def test_cupy_arrays_over_real_mpi(recwarn):
    """On a GPU machine: each rank on GPU local rank % count; CuPy sums are right whichever transport
    ``auto`` picks, and with more ranks than GPUs (shared GPU) it is MPI with a warning on rank 0."""
    cupy = _usable_cupy()
    dc.forget_device_comm(COMM)
    dc.use_local_device(COMM)
    out = allreduce_sum(COMM, cupy.asarray(_rank_data(R)))
    assert isinstance(out, cupy.ndarray)
    np.testing.assert_array_equal(out.get(), sum(_rank_data(r) for r in range(P)))
    chosen = dc.device_comm_for(COMM)
    fallback = [w for w in recwarn if issubclass(w.category, dc.DeviceCommFallback)]
    if P > cupy.cuda.runtime.getDeviceCount():  # one host: some ranks share a GPU
        assert chosen is None and len(fallback) == (R == 0)
    if chosen is not None:
        assert chosen.calls == 1 and not fallback
    dc.forget_device_comm(COMM)
