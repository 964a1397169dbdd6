"""Numba kernels made by topkattn.threads.njit: cached on disk (a second process compiles
nothing) and one stderr line only when a process really compiles."""
import os
import subprocess
import sys

import pytest

from topkattn.threads import COMPILE_NOTICE, compile_count, is_package_kernel, njit

SCRIPT = """
import numpy as np
from topkattn.ops.cpu_kernels import scatter_add_rows
from topkattn.threads import compile_count
out = np.zeros((3, 2))
scatter_add_rows(out, np.array([0, 2, -1, 2]), np.ones((4, 2)))
assert out.tolist() == [[1, 1], [0, 0], [2, 2]], out
print("compiles", compile_count())
"""


def _run(cache_dir, **env):
    full = {k: v for k, v in os.environ.items() if k != "TOPKATTN_COMPILE_NOTICE"}
    full.update(NUMBA_CACHE_DIR=str(cache_dir), **env)
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=full, timeout=600)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.split()[-1]), r.stderr


def test_first_process_compiles_once_with_one_line_then_the_cache_serves(tmp_path):
    n, err = _run(tmp_path)
    assert n >= 1
    assert err.count(COMPILE_NOTICE) == 1 and err.strip() == COMPILE_NOTICE
    assert any(tmp_path.rglob("*.nbi")), "no index written to the cache folder"
    n2, err2 = _run(tmp_path)  # a second process: loads from the cache, compiles nothing, says nothing
    assert n2 == 0 and err2 == ""


def test_notice_can_be_silenced(tmp_path):
    n, err = _run(tmp_path, TOPKATTN_COMPILE_NOTICE="0")
    assert n >= 1 and err == ""


def test_only_package_kernels_count_and_announce(capfd):
    import numba
    import numpy as np

    before = compile_count()

    @numba.njit
    def foreign(x):  # not made by threads.njit: never announced nor counted
        return x + 1

    assert foreign(1) == 2 and compile_count() == before
    assert not is_package_kernel(foreign)

    @njit(cache=False)
    def ours(x):
        return x * 2

    assert is_package_kernel(ours)
    assert ours(np.float64(2.0)) == 4.0 and compile_count() == before + 1
    assert ours(np.float64(3.0)) == 6.0 and compile_count() == before + 1  # same signature: no compile
    err = capfd.readouterr().err
    assert err.count(COMPILE_NOTICE) <= 1  # at most once per process (another test may have printed it)


def test_njit_rejects_positional_options():
    with pytest.raises(TypeError, match="keywords"):
        njit(True, False)
