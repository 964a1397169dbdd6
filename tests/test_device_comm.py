"""The NCCL transport for CuPy buffers (topkattn.distributed.device_comm) and the dispatch of the
array collectives (comm.device_route), in one process, without a GPU.

A fake ``cupy`` (NumPy memory behind CuPy's ``.data.ptr``, ``.device.id``, ``.get()``) and a fake
``cupy.cuda.nccl`` (collectives on raw pointers, like the real library) are put in
``sys.modules``; two ranks are simulated with two threads that share a fake MPI world and a
fake NCCL clique.  The real NCCL path is still to be verified on GPUs (docs/distributed.md).
"""
import ctypes
import subprocess
import sys
import threading
import types
from types import SimpleNamespace

import numpy as np
import pytest

from topkattn.distributed import comm as comm_mod
from topkattn.distributed import device_comm as dc
from topkattn.distributed.data_parallel import GradientReducer
from topkattn.distributed.exchange import allgather_fields

NCCL_ENUM = {"NCCL_UINT8": 1, "NCCL_INT32": 2, "NCCL_INT64": 4, "NCCL_FLOAT16": 6, "NCCL_FLOAT32": 7,
             "NCCL_FLOAT64": 8}  # ncclDataType_t values of nccl.h
DTYPE_OF = {v: np.dtype(k[5:].lower()) for k, v in NCCL_ENUM.items()}


# ---------------------------------------------------------------- fake MPI, fake cupy, fake nccl

class Clique:
    """n threads meeting in a collective: each posts a value, all read all of them."""

    def __init__(self, n):
        self.n, self.barrier, self.posted = n, threading.Barrier(n, timeout=20), [None] * n

    def exchange(self, rank, value):
        self.posted[rank] = value
        self.barrier.wait()
        got = list(self.posted)
        self.barrier.wait()  # nobody posts the next collective before all have read this one
        return got


IN_PLACE = object()
FAKE_MPI = SimpleNamespace(SUM="sum", IN_PLACE=IN_PLACE)


class ThreadComm:
    """mpi4py's interface for one of the ranks of a :class:`Clique` (records its calls)."""

    def __init__(self, clique, rank):
        self.clique, self.rank, self.size, self.calls = clique, rank, clique.n, []

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def allgather(self, obj):
        self.calls.append("allgather")
        return self.clique.exchange(self.rank, obj)

    def bcast(self, obj, root=0):
        self.calls.append(("bcast", root))
        return self.clique.exchange(self.rank, obj)[root]

    def Allgather(self, send, recv):
        self.calls.append("Allgather")
        recv[...] = np.stack(self.clique.exchange(self.rank, np.array(send)))

    def Allreduce(self, send, recv, op):
        assert op == "sum"
        self.calls.append("Allreduce")
        mine = np.array(recv if send is IN_PLACE else send)
        recv[...] = sum(self.clique.exchange(self.rank, mine))


class ScriptedComm(ThreadComm):
    """Rank ``rank`` of ``size``, alone: ``allgather`` answers with ``others(obj)`` for the other ranks."""

    def __init__(self, rank, size, others):
        self.rank, self.size, self.others, self.calls = rank, size, others, []

    def allgather(self, obj):
        self.calls.append("allgather")
        got = [self.others(obj, r) for r in range(self.size)]
        got[self.rank] = obj
        return got

    def bcast(self, obj, root=0):
        self.calls.append(("bcast", root))
        return obj if self.rank == root else ("uid", "from rank", root)

    def Allreduce(self, send, recv, op):
        self.calls.append("Allreduce")
        recv[...] = self.size * np.array(recv if send is IN_PLACE else send)


class DevArray(np.ndarray):
    """A 'device' array: NumPy memory with CuPy's ``.data.ptr``, ``.device.id`` and ``.get()``."""

    def __array_finalize__(self, obj):
        self.dev = getattr(obj, "dev", STATE.device)

    @property
    def data(self):
        return SimpleNamespace(ptr=self.__array_interface__["data"][0])

    @property
    def device(self):
        return SimpleNamespace(id=self.dev)

    def get(self):
        return np.array(self)


STATE = threading.local()  # the current device of each thread (rank)


def _mem(ptr, count, dtype):
    """``count`` elements of ``dtype`` at address ``ptr`` (writable; what NCCL sees)."""
    nbytes = count * dtype.itemsize
    return np.frombuffer((ctypes.c_char * nbytes).from_address(ptr), dtype=dtype, count=count) if nbytes else \
        np.empty(0, dtype)


class FakeNccl(types.ModuleType):
    """``cupy.cuda.nccl``: the constants, get_unique_id and NcclCommunicator over raw pointers."""

    def __init__(self, available=True):
        super().__init__("cupy.cuda.nccl")
        self.available, self.uids, self.inits, self.ops, self.cliques = available, [], [], [], {}
        self.NCCL_SUM = 0
        for name, value in NCCL_ENUM.items():
            setattr(self, name, value)
        self.lock = threading.Lock()
        nccl = self

        class NcclCommunicator:
            def __init__(self, ndev, uid, rank):
                with nccl.lock:
                    nccl.inits.append((ndev, uid, rank, STATE.device))
                    self.clique = nccl.cliques.setdefault(uid, Clique(ndev))
                self.rank = rank

            def _run(self, name, send, recv, count, datatype, stream, combine, *extra):
                nccl.ops.append((name, self.rank, count, datatype, stream) + extra)
                dt = DTYPE_OF[datatype]
                parts = self.clique.exchange(self.rank, _mem(send, count, dt).copy())
                out = combine(parts)
                if out is not None:
                    _mem(recv, out.size, dt)[...] = out

            def allReduce(self, send, recv, count, datatype, op, stream):
                assert op == nccl.NCCL_SUM
                self._run("allReduce", send, recv, count, datatype, stream, lambda p: sum(p))

            def allGather(self, send, recv, count, datatype, stream):
                self._run("allGather", send, recv, count, datatype, stream, np.concatenate)

            def bcast(self, buf, count, datatype, root, stream):
                self._run("bcast", buf, buf, count, datatype, stream, lambda p: p[root], root)

            def reduce(self, send, recv, count, datatype, op, root, stream):
                assert op == nccl.NCCL_SUM
                self._run("reduce", send, recv, count, datatype, stream,
                          lambda p: sum(p) if self.rank == root else None, root)

        self.NcclCommunicator = NcclCommunicator

    def get_unique_id(self):
        uid = tuple(range(len(self.uids), len(self.uids) + 128))  # NCCL's is 128 bytes
        self.uids.append(uid)
        return uid


class FakeCupy(types.ModuleType):
    """``cupy``: NumPy's functions returning :class:`DevArray`, and ``cupy.cuda``."""

    ndarray = DevArray

    def __init__(self, nccl, bus_ids=("0000:01:00.0", "0000:02:00.0")):
        super().__init__("cupy")
        self.bus_ids = list(bus_ids)
        cupy = self

        class Device:
            def __init__(self, device=None):
                self.id = STATE.device if device is None else device
                self.pci_bus_id = cupy.bus_ids[self.id]

            def use(self):
                STATE.device = self.id

            def __enter__(self):
                self.previous, STATE.device = STATE.device, self.id
                return self

            def __exit__(self, *exc):
                STATE.device = self.previous

        self.cuda = types.ModuleType("cupy.cuda")
        self.cuda.nccl = nccl
        self.cuda.Device = Device
        self.cuda.runtime = SimpleNamespace(getDeviceCount=lambda: len(cupy.bus_ids))
        self.cuda.get_current_stream = lambda: SimpleNamespace(ptr=4242)

    def asarray(self, a, dtype=None):
        return a if isinstance(a, DevArray) and dtype in (None, a.dtype) else np.array(a, dtype=dtype).view(DevArray)

    def __getattr__(self, name):
        f = getattr(np, name)
        if isinstance(f, type) or not callable(f):
            return f

        def on_device(*args, **kw):
            r = f(*args, **kw)
            return r.view(DevArray) if isinstance(r, np.ndarray) and not isinstance(r, DevArray) else r
        return on_device


@pytest.fixture
def fake(monkeypatch):
    """A fake CuPy with NCCL in sys.modules, the fake MPI constants, no remembered choices."""
    nccl = FakeNccl()
    cupy = FakeCupy(nccl)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "cupy.cuda", cupy.cuda)
    monkeypatch.setitem(sys.modules, "cupy.cuda.nccl", nccl)
    monkeypatch.setattr(comm_mod, "require_mpi", lambda: FAKE_MPI)
    monkeypatch.setattr(dc, "_CHOSEN", {})
    monkeypatch.delenv(dc.ENV_VAR, raising=False)
    STATE.device = 0
    return SimpleNamespace(cupy=cupy, nccl=nccl)


def dev(a, device=None):
    """A fake device copy of ``a`` on the current (or the given) device."""
    out = np.array(a).view(DevArray)
    out.dev = STATE.device if device is None else device
    return out


def run_ranks(n, fn):
    """``fn(comm, rank)`` on ``n`` threads sharing one world, each on device ``rank``; their results."""
    clique, results, errors = Clique(n), [None] * n, []

    def body(rank):
        STATE.device = rank
        try:
            results[rank] = fn(ThreadComm(clique, rank), rank)
        except BaseException as e:  # re-raised in the main thread
            errors.append((rank, e))
            clique.barrier.abort()
    threads = [threading.Thread(target=body, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0][1]
    return results


# ---------------------------------------------------------------- dtype mapping, mode


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int32, np.int64, np.uint8])
def test_dtype_maps_to_its_nccl_type(fake, dtype):
    assert dc.nccl_datatype(fake.nccl, dtype) == NCCL_ENUM["NCCL_" + np.dtype(dtype).name.upper()]


@pytest.mark.parametrize("dtype", [np.bool_, np.int8, np.complex64, np.uint32])
def test_unsupported_dtype_is_a_clear_error(fake, dtype):
    with pytest.raises(TypeError, match=rf"NCCL has no datatype for dtype {np.dtype(dtype)} \(supported: float16"):
        dc.nccl_datatype(fake.nccl, dtype)
    device = dc.select_device_comm(ThreadComm(Clique(1), 0))
    with pytest.raises(TypeError, match="NCCL has no datatype"):
        device.allreduce_sum(dev(np.zeros(3, dtype)))
    assert not [op for op in fake.nccl.ops if op[0] == "allReduce"]


def test_transport_mode_reads_the_environment_and_rejects_other_values():
    assert dc.transport_mode(environ={}) == "auto"
    assert dc.transport_mode(environ={dc.ENV_VAR: "NCCL"}) == "nccl"
    assert dc.transport_mode("mpi", environ={dc.ENV_VAR: "nccl"}) == "mpi"  # the argument wins
    with pytest.raises(ValueError, match=r"TOPKATTN_DEVICE_COMM must be one of auto\|nccl\|mpi, got 'gloo'"):
        dc.transport_mode(environ={dc.ENV_VAR: "gloo"})
    with pytest.raises(ValueError, match=r"mode must be one of auto\|nccl\|mpi, got 3"):
        dc.transport_mode(3)


def test_bad_environment_value_fails_the_first_device_collective(fake, monkeypatch):
    monkeypatch.setenv(dc.ENV_VAR, "ucx")
    comm = ThreadComm(Clique(1), 0)
    with pytest.raises(ValueError, match=r"TOPKATTN_DEVICE_COMM must be one of auto\|nccl\|mpi, got 'ucx'"):
        comm_mod.allreduce_sum(comm, dev(np.ones(2)))
    np.testing.assert_array_equal(comm_mod.allreduce_sum(comm, np.ones(2)), np.ones(2))  # NumPy: MPI, no choice


# ---------------------------------------------------------------- communicator set-up


def test_unique_id_from_rank_0_is_broadcast_over_mpi(fake):
    def rank_fn(comm, rank):
        device = dc.use_local_device(comm)  # local rank % 2 devices
        return device, dc.select_device_comm(comm), comm.calls

    got = run_ranks(2, rank_fn)
    assert [g[0] for g in got] == [0, 1]
    assert len(fake.nccl.uids) == 1  # made once, on rank 0
    uid = fake.nccl.uids[0]
    assert sorted(fake.nccl.inits, key=lambda i: i[2]) == [(2, uid, 0, 0), (2, uid, 1, 1)]
    for rank, (_, device, calls) in enumerate(got):
        assert isinstance(device, dc.DeviceComm) and (device.rank, device.size, device.device) == (rank, 2, rank)
        assert calls == ["allgather", "allgather", ("bcast", 0)]  # host names, device infos, the id


def test_rank_1_joins_with_the_broadcast_id(fake):
    def other(obj, r):
        return {**obj, "bus": f"bus-{r}"}
    comm = ScriptedComm(1, 2, other)
    device = dc.select_device_comm(comm)
    assert fake.nccl.uids == []  # rank 1 never makes an id
    assert fake.nccl.inits == [(2, ("uid", "from rank", 0), 1, 0)] and device.rank == 1


def test_collectives_on_two_ranks_match_numpy(fake):
    rng = np.random.default_rng(0)
    data = {r: {"f32": rng.standard_normal((3, 4)).astype(np.float32),
                "i64": rng.integers(-9, 9, 5).astype(np.int64),
                "f16": rng.standard_normal(6).astype(np.float16),
                "u8": rng.integers(0, 255, 7).astype(np.uint8),
                "f64": rng.standard_normal((2, 3))} for r in range(2)}

    def rank_fn(comm, rank):
        device = dc.select_device_comm(comm, "nccl")
        d = data[rank]
        inplace = dev(d["i64"])
        out = {"sum": device.allreduce_sum(dev(d["f32"])).get(),
               "sum_inplace": device.allreduce_sum(inplace, out=inplace),
               "gather": device.allgather(dev(d["f16"])[::2]).get(),  # a strided input is sent contiguous
               "bcast": device.bcast(dev(d["u8"]), root=1).get(),
               "reduce": device.reduce_sum(dev(d["f64"]), out=dev(np.full((2, 3), -1.0)), root=1).get()}
        return out, device.calls

    got = run_ranks(2, rank_fn)
    for rank, (out, calls) in enumerate(got):
        assert calls == 5
        np.testing.assert_array_equal(out["sum"], data[0]["f32"] + data[1]["f32"])
        np.testing.assert_array_equal(out["sum_inplace"], data[0]["i64"] + data[1]["i64"])
        assert isinstance(out["sum_inplace"], DevArray)
        np.testing.assert_array_equal(out["gather"], np.stack([data[0]["f16"][::2], data[1]["f16"][::2]]))
        np.testing.assert_array_equal(out["bcast"], data[1]["u8"])
        expect = data[0]["f64"] + data[1]["f64"] if rank == 1 else np.full((2, 3), -1.0)
        np.testing.assert_array_equal(out["reduce"], expect)
    ops = sorted((op[0], op[1], op[2], op[3], op[4]) for op in fake.nccl.ops)
    assert ("allReduce", 0, 12, NCCL_ENUM["NCCL_FLOAT32"], 4242) in ops  # count, datatype, current stream
    assert ("allGather", 1, 3, NCCL_ENUM["NCCL_FLOAT16"], 4242) in ops
    assert ("reduce", 0, 6, NCCL_ENUM["NCCL_FLOAT64"], 4242) in ops


def test_device_comm_checks_its_arguments(fake):
    device = dc.select_device_comm(ThreadComm(Clique(1), 0))
    with pytest.raises(ValueError, match="a is on GPU 1, the NCCL communicator on GPU 0"):
        device.allreduce_sum(dev(np.ones(3), device=1))
    with pytest.raises(ValueError, match=r"out must have shape \(1, 3\) and dtype float64"):
        device.allgather(dev(np.ones(3)), out=dev(np.ones(3)))
    with pytest.raises(ValueError, match="out must be C-contiguous"):
        device.allreduce_sum(dev(np.ones(3)), out=dev(np.ones(6))[::2])
    with pytest.raises(ValueError, match=r"root must be a rank in \[0, 1\), got 1"):
        device.bcast(dev(np.ones(3)), root=1)
    assert fake.nccl.ops == []


# ---------------------------------------------------------------- dispatch


def test_numpy_goes_through_mpi_even_with_nccl_asked(fake, monkeypatch):
    monkeypatch.setenv(dc.ENV_VAR, "nccl")
    comm = ThreadComm(Clique(1), 0)
    a = np.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(comm_mod.allreduce_sum(comm, a), a)
    np.testing.assert_array_equal(comm_mod.allgather_rows(comm, a), a[None])
    assert comm.calls == ["Allreduce", "Allgather"]
    assert fake.nccl.inits == [] and fake.nccl.ops == [] and dc._CHOSEN == {}


def test_cupy_goes_through_nccl(fake):
    comm = ThreadComm(Clique(1), 0)
    a = dev(np.arange(6.0).reshape(2, 3))
    s = comm_mod.allreduce_sum(comm, a)
    g = comm_mod.allgather_rows(comm, a)
    assert isinstance(s, DevArray) and isinstance(g, DevArray)
    np.testing.assert_array_equal(s.get(), a.get())
    np.testing.assert_array_equal(g.get(), a.get()[None])
    assert [op[0] for op in fake.nccl.ops] == ["allReduce", "allGather"]
    assert "Allreduce" not in comm.calls and "Allgather" not in comm.calls
    assert comm.calls == ["allgather", ("bcast", 0)]  # the choice, once: device infos and the unique id
    comm_mod.allreduce_sum(comm, a, inplace=True)
    assert comm.calls == ["allgather", ("bcast", 0)] and len(fake.nccl.inits) == 1


def _same_gpu(obj, r):
    return dict(obj)  # every rank reports this rank's host and PCI bus id


def test_ranks_sharing_a_gpu_fall_back_to_mpi_with_one_warning(fake):
    comm = ScriptedComm(0, 2, _same_gpu)
    a = dev(np.arange(4.0))
    with pytest.warns(dc.DeviceCommFallback, match=r"ranks \[0, 1\] share the GPU 0000:01:00.0") as record:
        out = comm_mod.allreduce_sum(comm, a)
        out2 = comm_mod.allreduce_sum(comm, a, inplace=True)
    assert len([w for w in record if issubclass(w.category, dc.DeviceCommFallback)]) == 1
    assert isinstance(out, DevArray) and out2 is a
    np.testing.assert_array_equal(out.get(), 2 * np.arange(4.0))  # the scripted world doubles
    np.testing.assert_array_equal(a.get(), 2 * np.arange(4.0))
    assert comm.calls == ["allgather", "Allreduce", "Allreduce"] and fake.nccl.inits == [] and fake.nccl.ops == []


def test_same_bus_id_on_two_hosts_is_two_gpus(fake):
    comm = ScriptedComm(0, 2, lambda obj, r: {**obj, "host": f"other-{r}"})
    assert isinstance(dc.select_device_comm(comm), dc.DeviceComm)


def test_nccl_asked_but_impossible_is_an_error(fake):
    with pytest.raises(RuntimeError, match=r"TOPKATTN_DEVICE_COMM=nccl cannot run: ranks \[0, 1\] share the GPU"):
        dc.select_device_comm(ScriptedComm(0, 2, _same_gpu), "nccl")
    fake.nccl.available = False
    with pytest.raises(RuntimeError, match="cannot run: rank 0: CuPy was built or installed without NCCL"):
        dc.select_device_comm(ThreadComm(Clique(1), 0), "nccl")
    with pytest.warns(dc.DeviceCommFallback, match="without NCCL"):
        assert dc.select_device_comm(ThreadComm(Clique(1), 0), "auto") is None


def test_environment_mpi_keeps_cupy_on_the_host_path(fake, monkeypatch, recwarn):
    monkeypatch.setenv(dc.ENV_VAR, "mpi")
    comm = ThreadComm(Clique(1), 0)
    out = comm_mod.allgather_rows(comm, dev(np.arange(3, dtype=np.int32)))
    assert isinstance(out, DevArray) and out.shape == (1, 3)
    assert comm.calls == ["allgather", "Allgather"] and fake.nccl.inits == []
    assert not [w for w in recwarn if issubclass(w.category, dc.DeviceCommFallback)]


def test_ranks_must_agree_on_the_mode(fake):
    comm = ScriptedComm(0, 2, lambda obj, r: {**obj, "mode": "mpi"})
    match = r"the ranks disagree on TOPKATTN_DEVICE_COMM: \{'mpi': \[1\], 'nccl': \[0\]\}"
    with pytest.raises(RuntimeError, match=match):
        dc.select_device_comm(comm, "nccl")


def test_library_import_does_not_import_cupy():
    code = ("import sys, topkattn, topkattn.distributed, topkattn.distributed.device_comm; "
            "assert 'cupy' not in sys.modules and 'mpi4py' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- the users: data parallel, exchange


def test_fused_gradient_allreduce_goes_through_nccl_once_a_step(fake):
    rng = np.random.default_rng(1)
    grads = {r: {"w": rng.standard_normal((3, 2)), "b": rng.standard_normal(4)} for r in range(2)}
    weights, losses = (0.25, 0.75), (1.5, 0.5)

    def rank_fn(comm, rank):
        reducer = GradientReducer(comm)
        out = []
        for step in range(3):
            g = {name: dev(v * (step + 1)) for name, v in grads[rank].items()}
            loss, aux = reducer(None, g, losses[rank], 0.1 * rank, weights[rank])
            out.append(({k: v.get() for k, v in g.items()}, loss, aux))
        return out, reducer.allreduces, list(comm.calls)

    got = run_ranks(2, rank_fn)
    for out, allreduces, calls in got:
        assert allreduces == 3 and "Allreduce" not in calls
        for step, (g, loss, aux) in enumerate(out):
            for name in ("w", "b"):
                expect = sum(w * grads[r][name] * (step + 1) for r, w in enumerate(weights))
                np.testing.assert_allclose(g[name], expect, rtol=1e-15, atol=1e-15)
            assert loss == pytest.approx(0.25 * 1.5 + 0.75 * 0.5) and aux == pytest.approx(0.75 * 0.1)
    steps = [op for op in fake.nccl.ops if op[0] == "allReduce"]
    assert len(steps) == 2 * 3  # one fused all-reduce per rank and step
    assert {op[2:4] for op in steps} == {(6 + 4 + 2, NCCL_ENUM["NCCL_FLOAT64"])}  # grads + loss + aux


def test_fused_gradient_allreduce_numpy_path_is_one_mpi_allreduce(fake):
    comm = ThreadComm(Clique(1), 0)
    reducer = GradientReducer(comm)
    g = {"w": np.arange(4.0)}
    assert reducer(None, g, 2.0, 1.0, 0.5) == (1.0, 0.5)
    np.testing.assert_array_equal(g["w"], 0.5 * np.arange(4.0))
    assert comm.calls == ["allgather", "Allreduce"] and fake.nccl.ops == []  # layout check, then the data


def test_allgather_fields_on_device_is_one_nccl_allgather(fake):
    spec = [("s", (2, 3), np.float32), ("j", (4,), np.int64)]

    def rank_fn(comm, rank):
        vals = {"s": dev(np.full((2, 3), rank, np.float32)), "j": np.arange(4) + 10 * rank}  # device and host
        got = allgather_fields(comm, spec, vals, xp=fake.cupy)
        return {k: (type(v), v.get()) for k, v in got.items()}, list(comm.calls)

    for got, calls in run_ranks(2, rank_fn):
        assert got["s"][0] is DevArray and got["j"][0] is DevArray
        np.testing.assert_array_equal(got["s"][1], np.stack([np.zeros((2, 3)), np.ones((2, 3))]).astype(np.float32))
        np.testing.assert_array_equal(got["j"][1], np.stack([np.arange(4), np.arange(4) + 10]))
        assert "Allgather" not in calls
    gathers = [op for op in fake.nccl.ops if op[0] == "allGather"]
    assert len(gathers) == 2 and {op[2:4] for op in gathers} == {(8 + 24 + 32, NCCL_ENUM["NCCL_UINT8"])}


def test_allgather_fields_error_on_one_rank_raises_on_every_rank(fake):
    spec = [("s", (2,), np.float64)]

    def rank_fn(comm, rank):
        error = ValueError("rank 1 broke") if rank == 1 else None
        with pytest.raises((ValueError, RuntimeError)) as info:
            allgather_fields(comm, spec, {"s": dev(np.zeros(2))}, error, xp=fake.cupy)
        return str(info.value)

    assert run_ranks(2, rank_fn) == ["rank 1 failed: ValueError: rank 1 broke", "rank 1 broke"]


# ---------------------------------------------------------------- real CuPy and NCCL (GPU machines only)


def _real_cupy_with_nccl():
    """CuPy with a GPU and NCCL, or skip (this machine may have none: the fakes above cover the logic)."""
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no GPU")
        from cupy.cuda import nccl
    except Exception as e:  # no driver, CuPy without NCCL
        pytest.skip(f"no usable GPU or NCCL: {e}")
    if not getattr(nccl, "available", False):
        pytest.skip("CuPy without NCCL")
    return cupy


@pytest.mark.cuda
def test_real_nccl_one_rank_collectives_and_fused_allreduce(monkeypatch):
    """The real ``cupy.cuda.nccl`` on one GPU (a one-rank communicator; MPI replaced by the fake
    world for control): pointers, counts, datatypes and the stream as NCCL takes them."""
    cupy = _real_cupy_with_nccl()
    monkeypatch.setattr(dc, "_CHOSEN", {})
    comm = ThreadComm(Clique(1), 0)
    device = dc.select_device_comm(comm, "nccl")
    assert isinstance(device, dc.DeviceComm)
    for dtype in (np.float16, np.float32, np.float64, np.int32, np.int64, np.uint8):
        host = (np.arange(24) % 7).astype(dtype).reshape(4, 6)
        a = cupy.asarray(host)
        np.testing.assert_array_equal(device.allreduce_sum(a).get(), host)
        np.testing.assert_array_equal(device.allgather(a[:, ::2]).get(), host[None, :, ::2])
        np.testing.assert_array_equal(device.bcast(a.copy()).get(), host)
        np.testing.assert_array_equal(device.reduce_sum(a).get(), host)
    calls = device.calls
    g = {"w": cupy.ones((3, 5)), "b": cupy.full(4, 2.0)}
    assert GradientReducer(comm)(None, g, 1.5, 0.25, 0.5) == (0.75, 0.125)
    np.testing.assert_array_equal(g["w"].get(), np.full((3, 5), 0.5))
    assert device.calls == calls + 1 and "Allreduce" not in comm.calls


def test_local_rank_and_size_count_the_ranks_of_one_host(monkeypatch):
    hosts = ["a", "b", "a", "a"]  # rank r runs on hosts[r]
    for rank in range(4):
        monkeypatch.setattr(dc.socket, "gethostname", lambda r=rank: hosts[r])
        comm = ScriptedComm(rank, 4, lambda obj, r: hosts[r])
        assert dc.local_size(comm) == (3 if hosts[rank] == "a" else 1)
        assert dc.local_rank(comm) == hosts[:rank].count(hosts[rank])
