"""Ternary projections (BitNet b1.58): quantisers, straight-through gradients, 2-bit packing, the
packed matmul kernel, Linear(ternary=True) and packed weights in files."""
import numpy as np
import pytest

from topkattn.layers import Linear, Module
from topkattn.layers.ternary_io import load_packed, load_packed_into, packed_weights, save_packed
from topkattn.ops import ternary as tr
from topkattn.ops.ternary_kernels import ternary_matmul_rows
from topkattn.storage import StorageError, load_container, save_container
from topkattn.testing import assert_grads_close, check_layer_grads, directional_grad_check, tolerance
from topkattn.training.checkpoint import load_checkpoint, save_checkpoint

ODD_WIDTHS = (1, 2, 3, 4, 5, 6, 7, 9, 13, 31, 33, 63, 64, 65)


# -- the weight quantiser ----------------------------------------------------------------------
def test_weight_quantiser_hand_computed():
    W = np.array([[0.5, -1.0, 0.0, 2.5]])  # mean|W| = 1
    Wq, s = tr.ternary_quantize(W, eps=1e-5)
    assert s == 1.0 + 1e-5
    np.testing.assert_array_equal(Wq, [[0, -1, 0, 1]])  # 0.499995 -> 0, -0.99999 -> -1, 2.499975 -> 2 -> 1
    assert Wq.dtype == np.int8


def test_weight_quantiser_rounds_half_to_even_and_clips():
    W = np.array([[1.5, -0.5, 0.5, -1.5]])  # mean|W| = 1, eps 1 -> s = 2: ratios 0.75 -0.25 0.25 -0.75
    Wq, s = tr.ternary_quantize(W, eps=1.0)
    assert s == 2.0
    np.testing.assert_array_equal(Wq, [[1, 0, 0, -1]])
    W = np.array([[0.5, -0.5, 1.5, 2.5, -2.5, 0.0]])  # mean|W| = 1.25, eps 0.75 -> s = 2
    Wq, s = tr.ternary_quantize(W, eps=0.75)
    assert s == 2.0
    np.testing.assert_array_equal(Wq, [[0, 0, 1, 1, -1, 0]])  # 1.25 -> 1, -1.25 -> -1
    W = np.array([[1.0, -1.0, 1.0, 1.0]])  # s = 2: ratios +-0.5 round half to even -> 0
    Wq, _ = tr.ternary_quantize(W, eps=1.0)
    np.testing.assert_array_equal(Wq, [[0, 0, 0, 0]])
    W = np.array([[3.0, -3.0, 0.0, 0.0]])  # mean 1.5, eps 0.5 -> s = 2: ratios +-1.5 -> +-2 -> clipped to +-1
    Wq, _ = tr.ternary_quantize(W, eps=0.5)
    np.testing.assert_array_equal(Wq, [[1, -1, 0, 0]])


def test_weight_quantiser_zero_matrix():
    Wq, s = tr.ternary_quantize(np.zeros((3, 5)), eps=1e-5)
    assert s == 1e-5 and not Wq.any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (16, 33)])
def test_weight_quantiser_matches_reference(dtype, shape):
    W = np.random.default_rng(1).standard_normal(shape).astype(dtype)
    Wq, s = tr.ternary_quantize(W)
    Wr, sr = tr.ternary_quantize_reference(W)
    np.testing.assert_array_equal(Wq, Wr)
    assert s == pytest.approx(sr, rel=1e-14)
    assert set(np.unique(Wq)) <= {-1, 0, 1}


# -- the activation quantiser --------------------------------------------------------------------
def test_activation_quantiser_hand_computed():
    x = np.array([[1.0, -2.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]])
    xq, a = tr.quantize_activations(x, bits=8, eps=1e-5)
    np.testing.assert_array_equal(a[:, 0], [63.5, 127 / 1e-5])  # 127 / max|x|; zero row: 127 / eps
    np.testing.assert_array_equal(xq, [[64, -127, 32, 0], [0, 0, 0, 0]])  # 63.5 -> 64 (half to even), 31.75 -> 32
    xq, a = tr.quantize_activations(np.array([[0.4, -1.0, 0.6, 0.5]]), bits=2)
    np.testing.assert_array_equal(xq, [[0, -1, 1, 0]])  # Qp = 1: 0.5 -> 0 (half to even)
    assert a[0, 0] == 1.0


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_activation_quantiser_matches_reference(bits):
    x = np.random.default_rng(2).standard_normal((2, 3, 11)) * 3
    xq, a = tr.quantize_activations(x, bits=bits)
    xr, ar = tr.quantize_activations_reference(x, bits=bits)
    np.testing.assert_array_equal(xq, xr)
    np.testing.assert_array_equal(a, ar)
    qp = 2 ** (bits - 1) - 1
    assert np.abs(xq).max() == qp  # the absmax entry of every token lands on +-Qp
    assert np.abs(xq / a - x).max() <= (0.5 / a).max() * (1 + 1e-12)  # within half a step


# -- forward and the straight-through backward -------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("act_bits", [None, 8, 3])
def test_forward_matches_reference(dtype, act_bits):
    rng = np.random.default_rng(3)
    x, W = rng.standard_normal((2, 3, 9)).astype(dtype), rng.standard_normal((5, 9)).astype(dtype)
    y = tr.ternary_linear(x, W, act_bits=act_bits)
    assert y.dtype == dtype and y.shape == (2, 3, 5)
    np.testing.assert_allclose(y, tr.ternary_linear_reference(x, W, act_bits), **tolerance(dtype))


@pytest.mark.parametrize("act_bits", [None, 8])
def test_ste_rule_exactly(act_bits):
    """dW = sum_rows dy^T x~ and dx = dy W~, with W~, x~ from the quantisers: identity through round and clip."""
    rng = np.random.default_rng(4)
    x, W, dy = rng.standard_normal((4, 6)), rng.standard_normal((3, 6)) * 2, rng.standard_normal((4, 3))
    _, saved = tr.ternary_linear_forward(x, W, act_bits=act_bits)
    dx, dW = tr.ternary_linear_backward(dy, saved)
    Wq, s = tr.ternary_quantize(W)
    x_deq = x if act_bits is None else np.divide(*tr.quantize_activations(x, act_bits))
    np.testing.assert_array_equal(dW, dy.T @ x_deq)
    np.testing.assert_array_equal(dx, dy @ (Wq * s))
    clipped = np.abs(W / s) > 1.5  # the gradient reaches clipped weights too (no clip mask)
    assert clipped.any() and np.all(dW[clipped] != 0)
    rx, rW = tr.ternary_linear_backward_reference(dy, x, W, act_bits)
    np.testing.assert_allclose(dx, rx, **tolerance(np.float64))
    np.testing.assert_allclose(dW, rW, **tolerance(np.float64))


@pytest.mark.parametrize("act_bits", [None, 8])
def test_ste_gradient_is_the_surrogates_central_difference(act_bits):
    """The STE gradients are the float64 central-difference gradients of the surrogates
    L(W') = sum(R * (x~ W'^T)) at W' = W~ and L(x') = sum(R * (x' W~^T)) at x' = x~."""
    rng = np.random.default_rng(5)
    x, W = rng.standard_normal((2, 3, 7)), rng.standard_normal((4, 7))
    y, saved = tr.ternary_linear_forward(x, W, act_bits=act_bits)
    R = rng.standard_normal(y.shape)
    dx, dW = tr.ternary_linear_backward(R, saved)
    w_sur, x_sur = saved.w_deq.copy(), saved.x_deq.copy()
    res = directional_grad_check(lambda: float((R * (x_sur @ w_sur.T)).sum()),
                                 {"W": w_sur, "x": x_sur}, {"W": dW, "x": dx}, rng)
    assert_grads_close(res, rtol=1e-7, atol=1e-9)


def test_true_derivative_differs_from_ste():
    """Away from rounding boundaries the quantised forward moves with W only through the scale
    s (Wq is locally constant): the STE is a surrogate, not that derivative."""
    rng = np.random.default_rng(6)
    x, W, R = rng.standard_normal((3, 5)), rng.standard_normal((2, 5)), rng.standard_normal((3, 2))
    u, h = rng.standard_normal(W.shape), 1e-7
    Wq, s = tr.ternary_quantize(W)
    assert np.min(np.abs(np.abs(W / s) - 0.5)) > 1e-3  # no entry near a rounding boundary
    true = (np.sum(R * tr.ternary_linear(x, W + h * u)) - np.sum(R * tr.ternary_linear(x, W - h * u))) / (2 * h)
    ds = np.sum(np.sign(W) * u) / W.size  # d s along u
    np.testing.assert_allclose(true, np.sum(R * (x @ (Wq * ds).T)), rtol=1e-5)
    _, saved = tr.ternary_linear_forward(x, W)
    _, dW = tr.ternary_linear_backward(R, saved)
    assert abs(np.sum(dW * u) - true) > 1e-3


def test_ternary_training_learns_a_ternary_map():
    """SGD on the master weights through the STE fits a map whose weights are ternary."""
    rng = np.random.default_rng(7)
    target = rng.integers(-1, 2, (4, 16)) * 0.5
    layer = Linear(16, 4, seed=1, dtype="float64", ternary=True)
    losses = []
    for _ in range(300):
        x = rng.standard_normal((32, 16))
        y = layer.forward(x)
        err = y - x @ target.T
        losses.append(float(np.mean(err ** 2)))
        layer.zero_grad()
        layer.backward(2 * err / err.size)
        layer.params["weight"] -= 0.5 * layer.grads["weight"]
    assert losses[-1] < 0.01 * losses[0]
    Wq, s = tr.ternary_quantize(layer.params["weight"])
    np.testing.assert_array_equal(Wq, np.sign(target).astype(np.int8))


# -- packing -----------------------------------------------------------------------------------
@pytest.mark.parametrize("d_in", ODD_WIDTHS)
def test_pack_unpack_round_trip(d_in):
    Wq = np.random.default_rng(d_in).integers(-1, 2, (5, d_in)).astype(np.int8)
    codes = tr.pack_ternary(Wq)
    assert codes.dtype == np.uint8 and codes.shape == (5, (d_in + 3) // 4)
    np.testing.assert_array_equal(codes, tr.pack_reference(Wq))
    np.testing.assert_array_equal(tr.unpack_ternary(codes, d_in), Wq)
    np.testing.assert_array_equal(tr.unpack_reference(codes, d_in), Wq)


def test_pack_layout_by_hand():
    """Weight j of a row goes to byte j % nb at bits 2 * (j // nb); +1 -> 01, -1 -> 10."""
    codes = tr.pack_ternary(np.array([[1, -1, 0, 1, -1, 1]]))  # nb = 2: planes {0,1} {2,3} {4,5}
    assert codes.tolist() == [[0b00_10_00_01, 0b00_01_01_10]]
    assert tr.pack_ternary(np.array([1, 1, 1, 1, 1, 1, 1, 1])).tolist() == [0b01010101, 0b01010101]


def test_pack_leading_dims():
    Wq = np.random.default_rng(8).integers(-1, 2, (2, 3, 10))
    codes = tr.pack_ternary(Wq)
    assert codes.shape == (2, 3, 3)
    np.testing.assert_array_equal(tr.unpack_ternary(codes, 10), Wq)


def test_pack_bad_arguments():
    with pytest.raises(TypeError, match="Wq must be an integer array"):
        tr.pack_ternary(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"Wq must hold only -1, 0, \+1, got 1 other value\(s\), e.g. 2"):
        tr.pack_ternary(np.array([[0, 2, 1]]))
    with pytest.raises(ValueError, match="non-empty last axis"):
        tr.pack_ternary(np.zeros((2, 0), dtype=np.int8))
    codes = tr.pack_ternary(np.ones((2, 5), dtype=np.int8))
    with pytest.raises(TypeError, match="codes must be uint8, got int64"):
        tr.unpack_ternary(codes.astype(np.int64), 5)
    with pytest.raises(ValueError, match=r"last axis ceil\(d_in / 4\) = 3 for d_in=9, got shape \(2, 2\)"):
        tr.unpack_ternary(codes, 9)
    with pytest.raises(ValueError, match="d_in must be an integer >= 1, got 0"):
        tr.unpack_ternary(codes, 0)
    with pytest.raises(ValueError, match="invalid 2-bit code 3"):
        tr.unpack_ternary(codes | np.uint8(0b11), 5)


# -- the packed matmul -------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["numba", "numpy"])
@pytest.mark.parametrize("d_in", [1, 5, 13, 64, 67])
def test_packed_matmul_equals_unpacked_exactly_on_integers(impl, d_in):
    """Integer-valued float64 inputs make every sum exact: packed == x @ Wq^T * s bit for bit."""
    rng = np.random.default_rng(d_in)
    W = rng.standard_normal((9, d_in))
    P = tr.pack_weight(W)
    Wq, s = tr.ternary_quantize(W)
    for n_rows in (1, 32):
        x = rng.integers(-50, 50, (n_rows, d_in)).astype(np.float64)
        np.testing.assert_array_equal(tr.packed_matmul(x, P, impl=impl), (x @ Wq.T.astype(np.float64)) * s)


@pytest.mark.parametrize("impl", ["auto", "numba", "numpy"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("act_bits", [None, 8])
def test_packed_matmul_equals_forward(impl, dtype, act_bits):
    rng = np.random.default_rng(9)
    W = rng.standard_normal((6, 11)).astype(dtype)
    x = rng.standard_normal((2, 3, 11)).astype(dtype)
    P = tr.pack_weight(W)
    y = tr.packed_matmul(x, P, act_bits=act_bits, impl=impl)
    assert y.dtype == dtype and y.shape == (2, 3, 6)
    np.testing.assert_allclose(y, tr.ternary_linear(x, W, act_bits=act_bits), **tolerance(dtype))
    want = tr.packed_matmul_reference(x, P.codes, P.scale, 11, act_bits=act_bits)
    np.testing.assert_allclose(y, want, **tolerance(dtype))


def test_packed_matmul_on_worker_threads_equals_unpacked():
    """A product above the threading threshold (rows split over the worker pool)."""
    rng = np.random.default_rng(10)
    W = rng.standard_normal((300, 257)).astype(np.float32)
    x = rng.standard_normal((32, 257)).astype(np.float32)
    assert x.shape[0] * W.shape[0] * W.shape[1] >= tr._PARALLEL_MIN_WORK
    P = tr.pack_weight(W)
    np.testing.assert_allclose(tr.packed_matmul(x, P), tr.ternary_linear(x, W), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_rows", [3, 6])  # the few-rows path and the four-rows-at-a-time path
@pytest.mark.parametrize("o0,o1", [(2, 5), (1, 7), (0, 8)])
def test_kernel_adds_only_its_row_range(n_rows, o0, o1):
    rng = np.random.default_rng(11)
    Wq = rng.integers(-1, 2, (8, 10))
    x = rng.integers(-5, 5, (n_rows, 10)).astype(np.float64)
    out = np.full((n_rows, 8), 100.0)
    ternary_matmul_rows(x, tr.pack_ternary(Wq), out, o0, o1)
    want = np.full((n_rows, 8), 100.0)
    want[:, o0:o1] += x @ Wq[o0:o1].T
    np.testing.assert_array_equal(out, want)


def test_packed_matmul_bad_arguments():
    P = tr.pack_weight(np.ones((3, 5)))
    with pytest.raises(TypeError, match="packed must be a PackedTernary, got ndarray"):
        tr.packed_matmul(np.ones((1, 5)), np.ones((3, 5)))
    with pytest.raises(ValueError, match=r"x must have last axis Din=5 \(..., Din\), got shape \(1, 4\)"):
        tr.packed_matmul(np.ones((1, 4)), P)
    with pytest.raises(TypeError, match="x must be float32 or float64, got int64"):
        tr.packed_matmul(np.ones((1, 5), dtype=np.int64), P)
    with pytest.raises(ValueError, match="impl must be 'auto', 'numba' or 'numpy', got 'cuda'"):
        tr.packed_matmul(np.ones((1, 5)), P, impl="cuda")
    with pytest.raises(ValueError, match=r"act_bits must be an integer in \[2, 8\] or None, got 9"):
        tr.packed_matmul(np.ones((1, 5)), P, act_bits=9)


def test_quantiser_and_forward_bad_arguments():
    W = np.ones((3, 4))
    with pytest.raises(TypeError, match="W must be float32 or float64, got int64"):
        tr.ternary_quantize(np.ones((3, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="eps must be > 0, got 0"):
        tr.ternary_quantize(W, eps=0)
    with pytest.raises(TypeError, match="act_bits must be an integer or None, got float 8.0"):
        tr.ternary_linear(np.ones((2, 4)), W, act_bits=8.0)
    with pytest.raises(ValueError, match=r"act_bits must be an integer in \[2, 8\] or None, got 1"):
        tr.ternary_linear(np.ones((2, 4)), W, act_bits=1)
    with pytest.raises(ValueError, match=r"^bits must be an integer in \[2, 8\], got 16"):
        tr.quantize_activations(np.ones((2, 4)), bits=16)
    with pytest.raises(ValueError, match=r"W must be 2-D \(Dout, Din\), got shape \(4,\)"):
        tr.ternary_linear(np.ones((2, 4)), np.ones(4))
    with pytest.raises(ValueError, match=r"x must have last axis Din=4 \(..., Din\), got shape \(2, 3\)"):
        tr.ternary_linear(np.ones((2, 3)), W)
    with pytest.raises(TypeError, match="x and W must share one dtype, got x float32, W float64"):
        tr.ternary_linear(np.ones((2, 4), dtype=np.float32), W)
    _, saved = tr.ternary_linear_forward(np.ones((2, 4)), W)
    with pytest.raises(ValueError, match=r"dy must have the shape of the forward output, \(2, 3\), got \(3, 2\)"):
        tr.ternary_linear_backward(np.ones((3, 2)), saved)
    with pytest.raises(TypeError, match="saved must come from ternary_linear_forward, got tuple"):
        tr.ternary_linear_backward(np.ones((2, 3)), (1, 2))


# -- the Linear layer --------------------------------------------------------------------------
def test_default_linear_unchanged():
    """ternary=False is the plain layer: same init, y = x W^T bit for bit, the plain gradients."""
    rng = np.random.default_rng(12)
    plain, tern = Linear(7, 3, bias=True, seed=4), Linear(7, 3, bias=True, seed=4, ternary=True)
    np.testing.assert_array_equal(plain.params["weight"], tern.params["weight"])
    x = rng.standard_normal((2, 5, 7)).astype(np.float32)
    W = plain.params["weight"]
    np.testing.assert_array_equal(plain.forward(x), x @ W.T + plain.params["bias"])
    np.testing.assert_array_equal(plain.step(x), x @ W.T + plain.params["bias"])
    dy = rng.standard_normal((2, 5, 3)).astype(np.float32)
    np.testing.assert_array_equal(plain.backward(dy), dy @ W)
    np.testing.assert_array_equal(plain.grads["weight"], dy.reshape(-1, 3).T @ x.reshape(-1, 7))
    assert not plain.ternary and plain.packed is None


@pytest.mark.parametrize("act_bits", [None, 8])
def test_ternary_linear_layer_forward_backward(act_bits):
    rng = np.random.default_rng(13)
    layer = Linear(9, 4, bias=True, seed=2, dtype="float64", ternary=True, act_bits=act_bits)
    layer.params["bias"][...] = rng.standard_normal(4)
    x = rng.standard_normal((2, 3, 9))
    y = layer.forward(x)
    W = layer.params["weight"]
    np.testing.assert_allclose(y, tr.ternary_linear_reference(x, W, act_bits) + layer.params["bias"],
                               **tolerance(np.float64))
    dy = rng.standard_normal(y.shape)
    layer.zero_grad()
    dx = layer.backward(dy)
    rx, rW = tr.ternary_linear_backward_reference(dy, x, W, act_bits)
    np.testing.assert_allclose(dx, rx, **tolerance(np.float64))
    np.testing.assert_allclose(layer.grads["weight"], rW, **tolerance(np.float64))
    np.testing.assert_allclose(layer.grads["bias"], dy.reshape(-1, 4).sum(0), **tolerance(np.float64))
    assert [n for n, _ in layer.named_params()] == ["weight", "bias"]  # master weights only


@pytest.mark.parametrize("act_bits", [None, 8])
def test_ternary_linear_layer_grads_are_the_ste_surrogates(act_bits):
    """check_layer_grads on the STE surrogate of the layer, written as BitNet's detach trick
    w + (q(w) - w).detach(): y = (x~0 + x - x0) (W~0 + W - W0)^T + b around the checked point."""
    rng = np.random.default_rng(17)
    layer = Linear(6, 5, bias=True, seed=5, dtype="float64", ternary=True, act_bits=act_bits)
    x = rng.standard_normal((2, 3, 6))
    layer.forward(x)  # the state backward reads
    x0, W0 = x.copy(), layer.params["weight"].copy()
    w_deq0 = tr.ternary_quantize(W0)[0] * tr.ternary_quantize(W0)[1]
    x_deq0 = x0 if act_bits is None else np.divide(*tr.quantize_activations(x0, act_bits))

    def surrogate(xx):
        p = layer.params
        return (x_deq0 + xx - x0) @ (w_deq0 + p["weight"] - W0).T + p["bias"]

    res = check_layer_grads(layer, x, rng, forward=surrogate, rtol=1e-7, atol=1e-9)
    assert set(res) == {"weight", "bias", "x"}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_ternary_linear_step_uses_packed_weights(dtype):
    rng = np.random.default_rng(14)
    layer = Linear(13, 6, bias=True, seed=3, dtype=dtype, ternary=True, act_bits=8)
    x = rng.standard_normal((4, 1, 13)).astype(dtype)
    y = layer.forward(x)
    assert layer.packed is None
    y_step = layer.step(x)
    assert layer.packed is not None and layer.packed.shape == (6, 13)
    np.testing.assert_allclose(y_step, y, **tolerance(dtype))
    layer.packed.scale *= 2  # the step reads the packed form (not the master weight) ...
    np.testing.assert_allclose(layer.step(x) - layer.params["bias"], 2 * (y - layer.params["bias"]),
                               **tolerance(dtype))
    layer.forward(x)  # ... and a training forward drops it
    assert layer.packed is None
    assert layer.pack() is layer.packed and layer.packed.nbytes == 6 * 4 + 8


def test_linear_bad_arguments():
    with pytest.raises(TypeError, match="ternary must be True or False, got int 1"):
        Linear(4, 2, ternary=1)
    with pytest.raises(ValueError, match="act_bits applies only with ternary=True, got act_bits=8"):
        Linear(4, 2, act_bits=8)
    with pytest.raises(ValueError, match=r"act_bits must be an integer in \[2, 8\] or None, got 16"):
        Linear(4, 2, ternary=True, act_bits=16)
    with pytest.raises(ValueError, match="eps must be > 0, got -1"):
        Linear(4, 2, ternary=True, eps=-1)
    with pytest.raises(ValueError, match=r"pack\(\) needs a ternary Linear"):
        Linear(4, 2).pack()


# -- packed weights in files -------------------------------------------------------------------
class _TwoProjections(Module):
    def __init__(self):
        super().__init__()
        self.add("up", Linear(10, 7, seed=1, ternary=True))
        self.add("down", Linear(7, 10, seed=2, ternary=True, act_bits=8))
        self.add("plain", Linear(10, 3, seed=3))


def test_packed_arrays_round_trip(tmp_path):
    P = tr.pack_weight(np.random.default_rng(15).standard_normal((5, 9)))
    back = tr.PackedTernary.from_arrays(P.to_arrays("w/"), "w/")
    np.testing.assert_array_equal(back.codes, P.codes)
    assert back.scale == P.scale and back.shape == P.shape == (5, 9)
    path = tmp_path / "ckpt.npz"  # the arrays fit a training checkpoint as they are
    save_checkpoint(path, {"param/w": np.ones(3), **P.to_arrays("packed/w/")}, {"step": 1})
    arrays, meta = load_checkpoint(path)
    again = tr.PackedTernary.from_arrays(arrays, "packed/w/")
    np.testing.assert_array_equal(again.unpack(), P.unpack())
    assert again.scale == P.scale and meta == {"step": 1}
    with pytest.raises(ValueError, match="packed ternary arrays lack 'w/scale'"):
        tr.PackedTernary.from_arrays({"w/codes": P.codes}, "w/")


def test_save_and_load_packed_model(tmp_path):
    model = _TwoProjections()
    x = np.random.default_rng(16).standard_normal((2, 10)).astype(np.float32)
    want = model._children["down"].step(model._children["up"].step(x))
    packed = packed_weights(model)
    assert sorted(packed) == ["down.weight", "up.weight"]
    path = tmp_path / "ternary.npz"
    save_packed(path, packed, meta={"d_model": 10})
    loaded, meta = load_packed(path)
    assert meta == {"d_model": 10} and sorted(loaded) == ["down.weight", "up.weight"]
    fresh = _TwoProjections()
    for layer in (fresh._children["up"], fresh._children["down"]):
        layer.params["weight"][...] = 0  # the packed weights alone reproduce the steps
    load_packed_into(fresh, loaded)
    np.testing.assert_array_equal(fresh._children["down"].step(fresh._children["up"].step(x)), want)
    with pytest.raises(ValueError, match=r"missing \['up.weight'\], unexpected \[\]"):
        load_packed_into(_TwoProjections(), {"down.weight": loaded["down.weight"]})
    with pytest.raises(ValueError, match=r"packed\['up.weight'\] has shape \(10, 7\), the layer wants \(7, 10\)"):
        load_packed_into(_TwoProjections(), {"up.weight": loaded["down.weight"], "down.weight": loaded["down.weight"]})


def test_load_packed_refuses_bad_files(tmp_path):
    P = tr.pack_weight(np.ones((2, 5)))
    bad = P.to_arrays("w/")
    bad["w/codes"] = bad["w/codes"] | np.uint8(0b11)  # a code 3, checksummed but invalid
    path = tmp_path / "bad.npz"
    save_container(path, bad, {"names": ["w"], "user": None}, kind="ternary-weights", version=1, prefix=".t-")
    with pytest.raises(StorageError, match="invalid packed weight 'w'.*code 3"):
        load_packed(path)
    ckpt = tmp_path / "ckpt.npz"
    save_checkpoint(ckpt, {"a": np.ones(2)}, {})
    with pytest.raises(StorageError, match="holds a topkattn 'checkpoint', not a ternary-weights"):
        load_packed(ckpt)
    good = tmp_path / "good.npz"
    save_packed(good, {"w": P})
    arrays, meta, version = load_container(good, kind="ternary-weights", max_version=1)
    assert version == 1 and meta == {"names": ["w"], "user": None}
    assert arrays["w/codes"].dtype == np.uint8 and arrays["w/codes"].shape == (2, 2)
    with pytest.raises(TypeError, match=r"packed\['w'\] must be a PackedTernary, got ndarray"):
        save_packed(good, {"w": np.ones(2)})


def test_empty_inputs_follow_the_zero_conventions_and_a_0d_x_is_refused():
    # an empty W: mean|W| taken as 0 (s = eps, not NaN); Din = 0: rows of zeros (a = Qp / eps);
    # both quantisers equal their loop references there, and the linear map gives zeros
    Wq, s = tr.ternary_quantize(np.zeros((0, 3)), eps=1e-3)
    assert Wq.shape == (0, 3) and s == pytest.approx(1e-3)
    assert tr.ternary_quantize_reference(np.zeros((0, 3)), 1e-3)[1] == s
    xq, a = tr.quantize_activations(np.zeros((2, 0)), bits=8, eps=1e-3)
    ref_q, ref_a = tr.quantize_activations_reference(np.zeros((2, 0)), bits=8, eps=1e-3)
    assert xq.shape == ref_q.shape == (2, 0)
    np.testing.assert_array_equal(a, np.full((2, 1), 127 / 1e-3))
    np.testing.assert_array_equal(ref_a, a)
    for act_bits in (None, 8):
        np.testing.assert_array_equal(tr.ternary_linear(np.ones((2, 0)), np.ones((3, 0)), act_bits=act_bits),
                                      np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"x must have a last axis \(\.\.\., Din\), got a 0-d array"):
        tr.quantize_activations(np.float64(2.0))
