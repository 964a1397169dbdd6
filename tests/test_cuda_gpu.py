"""Real-GPU checks of the CUDA path with CuPy arrays (skipped without a GPU or under the simulator).

The whole op runs on the device: ``impl="auto"`` picks the fused kernels for CuPy arrays,
forward and backward never synchronise with the host (``cupyx.allow_synchronize(False)``
raises on any device-to-host copy), kernels follow CuPy's current stream, and results
match the NumPy path at realistic shapes.  Run alone with ``pytest -m cuda``.
"""
import warnings

import numpy as np
import pytest

from topkattn.testing import make_qkv

pytestmark = pytest.mark.cuda

from numba.core import config  # noqa: E402

if config.ENABLE_CUDASIM:
    pytest.skip("real-GPU tests (the simulator is on)", allow_module_level=True)
cp = pytest.importorskip("cupy", reason="the GPU path needs CuPy")
try:
    if cp.cuda.runtime.getDeviceCount() < 1:
        raise RuntimeError("no device")
except Exception as e:  # pragma: no cover - depends on the machine
    pytest.skip(f"no usable CUDA GPU: {e}", allow_module_level=True)
import cupyx  # noqa: E402

import topkattn as ta  # noqa: E402
from topkattn.cuda.launch import cuda_usable  # noqa: E402

SHAPE = dict(B=2, H=8, G=2, T=384, S=512, D=64, Dv=64)  # realistic sizes, in float32
SHORT = dict(SHAPE, T=256, S=256)


def test_auto_picks_cuda_and_matches_numpy_path():
    assert cuda_usable()
    q, k, v = make_qkv(0, **SHAPE, dtype=np.float32)
    kw = dict(topk=32, sinks=4, window=16)
    out, saved = ta.topk_attention_forward(cp.asarray(q), cp.asarray(k), cp.asarray(v), **kw)
    assert saved.impl == "cuda" and isinstance(out, cp.ndarray)
    o_np, s_np = ta.topk_attention_forward(q, k, v, impl="numpy", **kw)
    np.testing.assert_allclose(out.get(), o_np, rtol=1e-4, atol=1e-5)
    # float32 near-ties may order differently; the selected sets must agree almost everywhere
    same = (np.sort(saved.idx.get(), -1) == np.sort(s_np.idx, -1)).all(-1).mean()
    assert same > 0.99
    dout = np.random.default_rng(1).standard_normal(o_np.shape).astype(np.float32)
    g_gpu = ta.topk_attention_backward(cp.asarray(dout), saved)
    g_np = ta.topk_attention_backward(dout, s_np)
    for a, b in zip(g_gpu, g_np):
        assert isinstance(a, cp.ndarray)
        np.testing.assert_allclose(a.get(), b, rtol=2e-3, atol=2e-4)


def test_forward_backward_never_synchronise_with_host():
    q, k, v = (cp.asarray(a) for a in make_qkv(2, **SHORT, dtype=np.float32))
    dout = cp.ones((2, 8, 256, 64), dtype=cp.float32)
    ta.topk_attention_forward(q, k, v, topk=16)  # compile outside the guarded region
    if not hasattr(cupyx, "allow_synchronize"):
        pytest.skip("this CuPy has no cupyx.allow_synchronize (removed after its deprecation)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        guard = cupyx.allow_synchronize(False)
    with guard:
        out, saved = ta.topk_attention_forward(q, k, v, topk=16, sinks=2, window=8)
        grads = ta.topk_attention_backward(dout, saved)
    cp.cuda.get_current_stream().synchronize()
    assert all(isinstance(g, cp.ndarray) for g in grads) and isinstance(saved.idx, cp.ndarray)


def test_kernels_follow_cupys_current_stream():
    q, k, v = (cp.asarray(a) for a in make_qkv(3, **SHORT, dtype=np.float32))
    ref = ta.topk_attention(q, k, v, topk=16).get()
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        q2, k2, v2 = q * 1, k * 1, v * 1  # produced on this stream
        out = ta.topk_attention(q2, k2, v2, topk=16)
    stream.synchronize()
    np.testing.assert_array_equal(out.get(), ref)


def test_gpu_long_rows_split_topk_matches_numpy():
    from topkattn.cuda.topk_select import topk_select
    from topkattn.ops.selection import ranked_topm_xp

    rng = np.random.default_rng(4)
    s = rng.standard_normal((6, 200_000)).astype(np.float32)
    got = topk_select(cp.asarray(s), 64).get()
    want = ranked_topm_xp(s, np.ones_like(s, dtype=bool), 64)
    np.testing.assert_array_equal(got, want)


def test_eval_decodes_on_the_gpu_as_on_the_cpu(tmp_path):
    """`topkattn eval --device gpu`: the decode runs on CuPy arrays and scores what the CPU scores."""
    import json

    from click.testing import CliRunner

    from topkattn.cli.main import main
    from topkattn.training.train import TrainConfig, train

    cfg = TrainConfig(task="mqar", k=3, layers=1, d_model=16, heads=2, seq_len=16, steps=3, batch_size=4,
                      vocab_size=16, num_kv_pairs=2, eval_size=6, warmup_steps=1)
    train(cfg, out_dir=str(tmp_path))
    outs = {}
    for device in ("cpu", "gpu"):
        r = CliRunner().invoke(main, ["eval", str(tmp_path), "--device", device, "--json", "--quiet"])
        assert r.exit_code == 0, r.output
        outs[device] = json.loads(r.stdout)
    assert outs["gpu"]["device"] == "gpu"
    assert outs["gpu"]["accuracy"] == pytest.approx(outs["cpu"]["accuracy"], abs=1e-12)
    assert outs["gpu"]["loss"] == pytest.approx(outs["cpu"]["loss"], rel=1e-4)
