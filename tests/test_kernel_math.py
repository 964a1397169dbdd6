"""ops.kernel_math.fast_exp (the kernels' vectorised float32 exp) against the float64 exp."""
import numpy as np
import pytest

from topkattn.ops.kernel_math import fast_exp
from topkattn.threads import njit


@njit(fastmath={"nsz", "arcp", "contract", "afn", "reassoc"})
def _loop(x, out):  # the way the kernels call it: a vectorised loop under their fast-math flags
    for i in range(x.size):
        out[i] = fast_exp(x[i])


def _exp(x):
    out = np.empty_like(x)
    _loop(x, out)
    return out


def test_float32_within_3e7_relative_of_the_float64_exp():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-87, 0, 100_000), rng.uniform(-1, 1, 10_000), rng.uniform(0, 87.9, 10_000),
                        [0.0, -0.0, 1e-30, -1e-30, np.log(2), -np.log(2)]]).astype(np.float32)
    got = _exp(x)
    want = np.exp(x.astype(np.float64))
    assert got.dtype == np.float32
    assert np.max(np.abs(got - want) / want) < 3e-7
    assert _exp(np.zeros(5, np.float32))[0] == 1.0


def test_float32_edges():
    x = np.array([-np.inf, np.nan, -87.5, -1000.0, 88.0, 100.0, np.inf], np.float32)
    got = _exp(x)
    assert got[0] == 0.0 and np.isnan(got[1])
    assert got[2] == 0.0 and got[3] == 0.0  # below the normal range: 0, not a subnormal
    assert np.isposinf(got[4:]).all()  # x >= 88: +inf (documented; the kernels take x <= 0)


@pytest.mark.parametrize("x", [np.array([-700.0, -3.5, 0.0, 2.0, 700.0, -np.inf, np.nan])])
def test_float64_is_numpys_exp(x):
    np.testing.assert_array_equal(_exp(x), np.exp(x))
