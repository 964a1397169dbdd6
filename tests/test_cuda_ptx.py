"""Compile every CUDA kernel to PTX (sm_90) for the argument types the launchers pass.

The simulator runs kernels as Python and never type-checks them the way the real
compiler does; this test runs the real Numba CUDA compiler (NVVM via NVRTC, no GPU
needed) on each kernel specialisation, float32 and float64, in a subprocess with the
simulator off.  It is skipped where the CUDA compiler libraries are missing (install
``nvidia-cuda-nvrtc`` and ``nvidia-cuda-nvcc``/``nvidia-nvvm`` from PyPI to run it).

    python tests/test_cuda_ptx.py        # the check itself: prints one line per kernel
"""
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.cuda


def _signatures():
    """(name, kernel, argument types) for every kernel specialisation the launchers use."""
    import numba
    from numba import types

    from topkattn.cuda import block_attention, lorann_score, mla_decode, sparse_backward, topk_forward, topk_select

    i64, f64 = types.int64, types.float64

    def arr(dt, nd, layout="C"):
        return types.Array(dt, nd, layout)

    out = []
    for dchar, dt in (("f", types.float32), ("d", types.float64)):
        out.append((f"topm[{dchar}]", topk_select._topm_kernel(64, dchar),
                    (arr(dt, 2), arr(i64, 2), i64, arr(i64, 1), arr(i64, 1), arr(i64, 1), i64,
                     i64, i64, arr(dt, 2), arr(i64, 2))))
        out.append((f"forward[{dchar}]", topk_forward._forward_kernel(128, 64, 64, 64, 64, dchar),
                    (arr(dt, 4), arr(dt, 4), arr(dt, 4), f64, arr(i64, 1), arr(i64, 1),
                     arr(i64, 1), i64, i64, i64, i64, i64, arr(types.uint8, 4), i64, arr(dt, 4),
                     arr(i64, 4), arr(dt, 3))))
        out.append((f"bwd_rows[{dchar}]", sparse_backward._rows_kernel(64, 64, dchar),
                    (arr(dt, 4),) * 5 + (arr(i64, 4), arr(dt, 3), f64, arr(dt, 2), arr(dt, 2),
                                         arr(dt, 4))))
        out.append((f"bwd_pieces[{dchar}]", sparse_backward._pieces_kernel(dchar),
                    (arr(dt, 4), arr(dt, 4), arr(dt, 2), arr(dt, 2), arr(i64, 1), arr(i64, 1),
                     arr(i64, 1), arr(i64, 1), i64, i64, arr(dt, 2), arr(dt, 2))))
        out.append((f"bwd_keys[{dchar}]", sparse_backward._keys_kernel(dchar),
                    (arr(dt, 4), arr(dt, 4), arr(dt, 2), arr(dt, 2), arr(i64, 1), arr(i64, 1),
                     arr(i64, 1), i64, i64, arr(dt, 2), arr(dt, 2), arr(dt, 4), arr(dt, 4))))
        out.append((f"block_select[{dchar}]", block_attention._select_kernel(8, 64, 64, 64, dchar),
                    (arr(dt, 4), arr(dt, 4), arr(i64, 1), arr(i64, 1), i64, i64, arr(i64, 4))))
        out.append((f"block_forward[{dchar}]", block_attention._forward_kernel(64, 64, dchar),
                    (arr(dt, 4),) * 3 + (arr(i64, 4), arr(i64, 1), i64, f64, arr(dt, 4), arr(dt, 3))))
        for lay in ("C", "A"):  # the latent cache may be a strided view
            out.append((f"mla_scores[{dchar},{lay}]", mla_decode._scores_kernel(16, dchar),
                        (arr(dt, 3), arr(dt, 3, lay), f64, arr(dt, 3))))
            out.append((f"mla_sel[{dchar},{lay}]", mla_decode._sel_scores_kernel(dchar),
                        (arr(dt, 3), arr(dt, 3, lay), arr(i64, 3), f64, arr(dt, 3))))
            out.append((f"mla_attend[{dchar},{lay}]", mla_decode._attend_kernel(dchar),
                        (arr(dt, 3, lay), arr(dt, 3), arr(i64, 3), i64, arr(dt, 3), arr(dt, 2))))
    f32 = types.float32
    for bits, code in ((8, types.int8), (4, types.uint8), (0, f32)):
        out.append((f"lorann_score[{bits}]", lorann_score._score_kernel(32, bits),
                    (arr(f32, 2), arr(i64, 2), arr(code, 3), arr(f32, 2), arr(code, 2),
                     arr(f32, 1), arr(i64, 1), arr(i64, 1), arr(i64, 1), arr(f32, 1), i64, i64,
                     arr(f32, 3), arr(i64, 3))))
    out.append(("lorann_rerank", lorann_score._rerank_kernel(),
                (arr(f32, 2), arr(f32, 2), i64, arr(i64, 2), arr(f32, 2))))
    del numba
    return out


def main():
    from numba import cuda
    from numba.cuda import dispatcher

    class _Device:  # device functions ask the current device for its compute capability
        compute_capability = (9, 0)

    dispatcher.get_current_device = lambda: _Device  # compile for sm_90 without a GPU
    for name, kern, sig in _signatures():
        ptx, _ = cuda.compile_ptx(kern.py_func, sig, cc=(9, 0))
        assert ".entry" in ptx, name
        print(f"ok {name}: {len(ptx)} bytes of PTX")


def test_every_kernel_compiles_to_ptx():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    r = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True,
                       text=True, timeout=600)
    missing = ("DynamicLibNotFoundError", "NvvmSupportError", "libnvvm", "libnvrtc")
    if r.returncode != 0 and any(m in r.stderr for m in missing):
        pytest.skip("the CUDA compiler libraries (NVRTC/NVVM) are not installed")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("ok ") == len(r.stdout.strip().splitlines()) >= 20


if __name__ == "__main__":
    main()
