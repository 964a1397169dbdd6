"""Shared pytest setup: the ``cuda`` marker and the choice of CUDA simulator or real GPU.

The CUDA kernel tests (tests/test_cuda*.py, marked ``cuda``: run them alone with
``pytest -m cuda``) run on a real GPU when one is present and on Numba's CPU simulator
otherwise.  The simulator must be switched on before ``numba.cuda`` is first imported,
so it is decided here, when pytest imports this file (before any test module):

* ``NUMBA_ENABLE_CUDASIM`` already set by the caller: left as is (``=1`` forces the
  simulator even on a GPU machine, ``=0`` forbids it);
* otherwise a real GPU (the CUDA driver loads and reports a device) keeps the simulator
  off, and without one ``NUMBA_ENABLE_CUDASIM=1`` is set.

The probe talks to the driver through ctypes, so numba.cuda is not imported here.
The simulator only affects ``numba.cuda``; Numba's CPU kernels are unchanged.
"""
import ctypes
import os
import sys


def _real_gpu_present():
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        try:
            if lib.cuInit(0) != 0:
                return False
            n = ctypes.c_int(0)
            return lib.cuDeviceGetCount(ctypes.byref(n)) == 0 and n.value > 0
        except (AttributeError, OSError):
            return False
    return False


if "NUMBA_ENABLE_CUDASIM" not in os.environ and "numba.cuda" not in sys.modules:
    if not _real_gpu_present():
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cuda: Numba CUDA kernel tests (simulator without a GPU); run alone with -m cuda")
