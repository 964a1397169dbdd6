"""PyTorch bridge: values against the float64 reference, gradients against torch autograd
on the same mask, torch.autograd.gradcheck in float64, zero-copy DLPack boundaries."""
import numpy as np
import pytest

import topkattn as ta
from topkattn.testing import make_qkv

torch = pytest.importorskip("torch")

from topkattn.interop.torch import from_engine, to_engine, topk_attention  # noqa: E402
from topkattn.ops.reference import topk_attention_reference  # noqa: E402

SHAPE = dict(B=2, H=4, G=2, T=5, S=9, D=6, Dv=5)


def _inputs(seed, dtype=torch.float64, topk=3, **shape):
    """q, k, v leaf tensors with a score margin at ``topk`` (gradcheck cannot flip the selection)."""
    q, k, v = make_qkv(seed, **{**SHAPE, **shape}, topk=topk, margin=1e-3)
    return tuple(torch.tensor(a, dtype=dtype, requires_grad=True) for a in (q, k, v))


def _torch_masked_attention(q, k, v, mask, scale):
    """Dense softmax over ``mask`` (B, H, T, S) with torch autograd: the gradient oracle."""
    H, G = q.shape[1], k.shape[1]
    kh, vh = k.repeat_interleave(H // G, 1), v.repeat_interleave(H // G, 1)
    s = torch.einsum("bhtd,bhsd->bhts", q, kh) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhts,bhsd->bhtd", torch.softmax(s, -1), vh)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("causal, sinks, window", [(True, 0, 0), (False, 0, 0), (True, 1, 2)])
def test_forward_matches_reference(dtype, tol, causal, sinks, window):
    q, k, v = _inputs(0, dtype=dtype)
    out = topk_attention(q, k, v, topk=3, causal=causal, sinks=sinks, window=window)
    assert isinstance(out, torch.Tensor) and out.dtype == dtype and out.shape == (2, 4, 5, 5)
    ref, _, _ = topk_attention_reference(q.detach().numpy(), k.detach().numpy(), v.detach().numpy(),
                                         topk=3, causal=causal, sinks=sinks, window=window)
    np.testing.assert_allclose(out.detach().numpy(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("causal", [True, False])
def test_gradients_match_torch_autograd_on_the_same_mask(causal):
    q, k, v = _inputs(1)
    w = torch.randn(2, 4, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    (topk_attention(q, k, v, topk=3, causal=causal) * w).sum().backward()
    got = [t.grad.clone() for t in (q, k, v)]
    _, mask, _ = topk_attention_reference(*(t.detach().numpy() for t in (q, k, v)), topk=3, causal=causal)
    q2, k2, v2 = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    (_torch_masked_attention(q2, k2, v2, torch.from_numpy(mask), 6 ** -0.5) * w).sum().backward()
    for a, b in zip(got, (q2.grad, k2.grad, v2.grad)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # keys no query selected get exactly zero gradient
    G, rep = k.shape[1], q.shape[1] // k.shape[1]
    chosen = mask.reshape(2, G, rep, 5, 9).any(axis=(2, 3))  # (B, G, S)
    if causal:  # the late keys are seen by few queries
        assert (~chosen).any()
    assert torch.all(k.grad[torch.from_numpy(~chosen)] == 0)
    assert torch.all(v.grad[torch.from_numpy(~chosen)] == 0)


@pytest.mark.parametrize("opts", [dict(topk=3, causal=True), dict(topk=2, causal=False, sinks=1),
                                  dict(topk=3, causal=True, forget_rate=0.3, seed=7),
                                  dict(topk=6, causal=True)])
def test_gradcheck_float64(opts):
    q, k, v = _inputs(2, B=1, H=2, G=1, T=4, S=6, D=3, Dv=2, topk=opts["topk"])
    assert torch.autograd.gradcheck(lambda a, b, c: topk_attention(a, b, c, **opts), (q, k, v),
                                    eps=1e-6, atol=1e-8, rtol=1e-6)


def test_forgetful_selection_is_reproducible_and_reused_by_backward():
    q, k, v = _inputs(3)
    a = topk_attention(q, k, v, topk=3, forget_rate=0.5, seed=11)
    b = topk_attention(q, k, v, topk=3, forget_rate=0.5, seed=11)
    c = topk_attention(q, k, v, topk=3, forget_rate=0.0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    ref, _, _ = topk_attention_reference(*(t.detach().numpy() for t in (q, k, v)), topk=3,
                                         forget_rate=0.5, seed=11)
    np.testing.assert_allclose(a.detach().numpy(), ref, rtol=1e-12, atol=1e-12)


def test_dlpack_boundaries_are_zero_copy():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float32)
    a = to_engine(x)
    assert isinstance(a, np.ndarray) and a.ctypes.data == x.data_ptr() and a.shape == (2, 3, 4, 5)
    a[0, 0, 0, 0] = 42.0  # one buffer: the write is visible through the tensor
    assert x[0, 0, 0, 0].item() == 42.0
    y = np.arange(6.0).reshape(2, 3)
    t = from_engine(y)
    assert t.data_ptr() == y.ctypes.data and t.dtype == torch.float64
    # a tensor that requires grad is detached, not copied
    r = torch.randn(3, requires_grad=True)
    assert to_engine(r).ctypes.data == r.data_ptr()


def test_non_contiguous_inputs_and_grad_of_expanded_dout():
    q, k, v = _inputs(4)
    qt = q.detach().transpose(2, 3).contiguous().transpose(2, 3).requires_grad_(True)  # strided view
    assert not qt.is_contiguous()
    out = topk_attention(qt, k, v, topk=3)
    np.testing.assert_allclose(out.detach().numpy(), topk_attention(q, k, v, topk=3).detach().numpy(),
                               rtol=0, atol=0)
    out.sum().backward()  # dout is an expanded (stride 0) tensor
    q.grad = None
    topk_attention(q, k, v, topk=3).sum().backward()
    torch.testing.assert_close(qt.grad, q.grad, rtol=0, atol=0)


def test_in_place_edit_after_forward_is_detected():
    q, k, v = _inputs(5)
    kk = k.detach().clone()
    out = topk_attention(q, kk, v, topk=3)
    kk.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    out = topk_attention(q, k, v, topk=3)  # the output shares memory with the engine's saved copy
    out.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_bad_inputs():
    q, k, v = _inputs(6)
    with pytest.raises(TypeError, match="k must be a torch.Tensor, got ndarray"):
        topk_attention(q, k.detach().numpy(), v, topk=3)
    with pytest.raises(ValueError, match="topk must be an integer >= 1"):
        topk_attention(q, k, v, topk=0)
    with pytest.raises(TypeError, match="q must be float32 or float64 .*got torch.int32"):
        topk_attention(q.int(), k.int(), v.int(), topk=2)
    with pytest.raises(TypeError, match="q, k, v must share one dtype"):
        topk_attention(q.half(), k, v, topk=2)
    with pytest.raises(TypeError, match="seed must be an integer or None"):
        topk_attention(q, k, v, topk=2, forget_rate=0.5, seed=np.random.default_rng(0))
    with pytest.raises(ValueError, match="temperature must be"):
        topk_attention(q, k, v, topk=2, temperature=0.0)
    with pytest.raises(ValueError, match="query heads H=4 must be a multiple of KV heads G=3"):
        topk_attention(q, torch.cat([k, k[:, :1]], 1), torch.cat([v, v[:, :1]], 1), topk=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device for torch")
def test_cuda_matches_cpu():
    pytest.importorskip("cupy")
    q, k, v = _inputs(7, dtype=torch.float32)
    qc, kc, vc = (t.detach().cuda().requires_grad_(True) for t in (q, k, v))
    out = topk_attention(qc, kc, vc, topk=3)
    assert out.is_cuda and to_engine(qc).data.ptr == qc.data_ptr()
    out.square().sum().backward()
    topk_attention(q, k, v, topk=3).square().sum().backward()
    for a, b in zip((qc, kc, vc), (q, k, v)):
        torch.testing.assert_close(a.grad.cpu(), b.grad, rtol=1e-4, atol=1e-5)


# --- the custom ops: opcheck, torch.compile, torch.func, low precision -----------------------

from topkattn.interop.torch import topk_attention_bwd, topk_attention_fwd  # noqa: E402

_FWD_CASES = [dict(topk=3, causal=True, sinks=0, window=0), dict(topk=2, causal=False, sinks=1, window=2),
              dict(topk=20, causal=True, sinks=12, window=0)]  # topk, sinks > S: K clipped to S


def _fwd_args(q, k, v, topk, causal, sinks, window, forget_rate=0.0, seed=None):
    return (q, k, v, topk, causal, None, 1.0, forget_rate, seed, sinks, window, None)


@pytest.mark.parametrize("opts", _FWD_CASES)
def test_forward_op_outputs_match_the_engine_and_pass_opcheck(opts):
    q, k, v = _inputs(8)
    out, idx, lse = topk_attention_fwd(*_fwd_args(q.detach(), k.detach(), v.detach(), **opts))
    ref_out, mask, _ = topk_attention_reference(*(t.detach().numpy() for t in (q, k, v)), **opts)
    S = k.shape[2]
    K = sum(min(opts[n], S) for n in ("sinks", "window", "topk"))
    assert idx.dtype == torch.int64 and idx.shape == (2, 4, 5, K)
    np.testing.assert_allclose(out.numpy(), ref_out, rtol=1e-12, atol=1e-12)
    # idx names exactly the reference mask's keys; lse is the logsumexp of their scores
    got = np.zeros(mask.shape, bool)
    b, h, t, j = np.nonzero(idx.numpy() >= 0)
    got[b, h, t, idx.numpy()[b, h, t, j]] = True
    np.testing.assert_array_equal(got, mask)
    s = np.einsum("bhtd,bhsd->bhts", q.detach().numpy(), np.repeat(k.detach().numpy(), 2, 1)) * 6 ** -0.5
    np.testing.assert_allclose(lse.numpy(), np.logaddexp.reduce(np.where(mask, s, -np.inf), -1), rtol=1e-12)
    torch.library.opcheck(topk_attention_fwd, _fwd_args(q, k, v, **opts))
    torch.library.opcheck(topk_attention_fwd, _fwd_args(q, k, v, **opts, forget_rate=0.4, seed=3))


def test_backward_op_matches_autograd_and_passes_opcheck():
    q, k, v = _inputs(9)
    opts = dict(topk=3, causal=True, sinks=1, window=1)
    out, idx, lse = topk_attention_fwd(*_fwd_args(q.detach(), k.detach(), v.detach(), **opts))
    dout = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = topk_attention_bwd(dout, q.detach(), k.detach(), v.detach(), idx, out, lse, None, 1.0)
    (topk_attention(q, k, v, **opts) * dout).sum().backward()
    for a, b in zip(grads, (q, k, v)):
        torch.testing.assert_close(a, b.grad, rtol=0, atol=0)
    torch.library.opcheck(topk_attention_bwd, (dout, q.detach(), k.detach(), v.detach(), idx, out, lse, 0.3, 2.0))


@pytest.mark.parametrize("fullgraph", [False, True])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_matches_eager(fullgraph, backend):
    torch._dynamo.reset()
    q, k, v = _inputs(10)

    def loss(q, k, v):
        o = topk_attention(q * 1.5, k, v, topk=3, causal=True, sinks=1, window=1, temperature=0.8)
        return o.square().sum(), o

    got_loss, got = torch.compile(loss, fullgraph=fullgraph, backend=backend)(q, k, v)
    got_grads = torch.autograd.grad(got_loss, (q, k, v))
    ref_loss, ref = loss(q, k, v)
    ref_grads = torch.autograd.grad(ref_loss, (q, k, v))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_torch_func_grad_and_vmap_match_eager_and_loops():
    q, k, v = _inputs(11)
    q, k, v = q.detach(), k.detach(), v.detach()

    def f(q, k, v):
        return topk_attention(q, k, v, topk=3, causal=True, window=1)

    def loss(q, k, v):
        return f(q, k, v).square().sum()

    grads = torch.func.grad(loss, argnums=(0, 1, 2))(q, k, v)
    qa, ka, va = (t.clone().requires_grad_(True) for t in (q, k, v))
    loss(qa, ka, va).backward()
    for a, b in zip(grads, (qa, ka, va)):
        torch.testing.assert_close(a, b.grad, rtol=0, atol=0)
    qs, ks = torch.stack([q, -0.5 * q, 2 * q]), torch.stack([k, k.flip(2), 3 * k])
    looped = torch.stack([f(qs[i], ks[i], v) for i in range(3)])
    torch.testing.assert_close(torch.func.vmap(f, in_dims=(0, 0, None))(qs, ks, v), looped, rtol=0, atol=0)
    vm = torch.func.vmap(f, in_dims=(1, None, None), out_dims=2)(qs.movedim(0, 1), k, v)
    torch.testing.assert_close(vm, torch.stack([f(qs[i], k, v) for i in range(3)], 2), rtol=0, atol=0)
    # vmap of grad: per-sample gradients through the backward op's vmap rule
    per = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(0, 0, None))(qs, ks, v)
    for i in range(3):
        gi = torch.func.grad(loss, argnums=(0, 1))(qs[i], ks[i], v)
        for a, b in zip(per, gi):
            torch.testing.assert_close(a[i], b, rtol=1e-12, atol=1e-12)


def test_vmap_with_forget_rate_needs_a_randomness_choice():
    q, k, v = (t.detach() for t in _inputs(12))
    qs = torch.stack([q, q])

    def f(q):
        return topk_attention(q, k, v, topk=3, forget_rate=0.5, seed=5)

    with pytest.raises(RuntimeError, match="randomness='different'"):
        torch.func.vmap(f)(qs)
    same = torch.func.vmap(f, randomness="same")(qs)  # each sample draws what one call draws
    torch.testing.assert_close(same, torch.stack([f(q), f(q)]), rtol=0, atol=0)
    diff = torch.func.vmap(f, randomness="different")(qs)  # samples fold into the batch: other draws
    folded = topk_attention(torch.cat([q, q]), torch.cat([k, k]), torch.cat([v, v]), topk=3,
                            forget_rate=0.5, seed=5)
    torch.testing.assert_close(diff, folded.reshape(qs.shape[:2] + folded.shape[1:]), rtol=0, atol=0)
    assert not torch.equal(diff[0], diff[1])


def test_double_backward_is_refused():
    q, k, v = _inputs(13)
    (gq,) = torch.autograd.grad(topk_attention(q, k, v, topk=3).square().sum(), (q,), create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        gq.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_is_computed_in_float32_and_cast_back(dtype):
    q, k, v = (t.detach().to(dtype).requires_grad_(True) for t in _inputs(14))
    out = topk_attention(q, k, v, topk=3, sinks=1)
    out.float().square().sum().backward()
    q32, k32, v32 = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    ref = topk_attention(q32, k32, v32, topk=3, sinks=1)
    ref.to(dtype).float().square().sum().backward()
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref.to(dtype), rtol=0, atol=0)
    for a, b in zip((q, k, v), (q32, k32, v32)):
        assert a.grad.dtype == dtype
        torch.testing.assert_close(a.grad, b.grad.to(dtype), rtol=0, atol=0)
    np.testing.assert_allclose(ref.detach().numpy(), topk_attention_reference(
        *(t.detach().numpy() for t in (q32, k32, v32)), topk=3, sinks=1)[0], rtol=2e-5, atol=2e-5)


def test_plain_op_names_a_bfloat16_tensor_numpy_cannot_import():
    # the engine's ops (not the torch bridge) read tensors through DLPack: bfloat16 gets a TypeError
    # naming the argument and the dtype, not DLPack's bare RuntimeError
    q, k, v = (t.detach() for t in _inputs(15))
    with pytest.raises(TypeError, match=r"^q must be float32 or float64.*bfloat16"):
        ta.topk_attention(q.bfloat16(), k, v, topk=3)
    with pytest.raises(TypeError, match=r"^v must be float32 or float64.*bfloat16"):
        ta.block_topk_attention(q, k, v.bfloat16(), block_size=2, topk_blocks=1)


def test_bridge_clamps_ints_beyond_int64_like_the_engine():
    # topk / sinks / window above S mean every key (chunk_size above T: one chunk), as in the NumPy
    # op; the schema's int64 would overflow on 10**30 without the clamp
    q, k, v = (t.detach() for t in _inputs(16))
    dense = topk_attention(q, k, v, topk=k.shape[-2])
    for kw in (dict(topk=10**30), dict(topk=2, window=10**30), dict(topk=2, sinks=10**30),
               dict(topk=k.shape[-2], chunk_size=10**30)):
        torch.testing.assert_close(topk_attention(q, k, v, **kw), dense, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*63\) for the torch bridge"):
        topk_attention(q, k, v, topk=2, forget_rate=0.5, seed=10**30)
    with pytest.raises(TypeError, match="causal must be True or False"):
        topk_attention(q, k, v, topk=2, causal="yes")


def test_a_dlpack_failure_that_is_not_the_dtype_keeps_its_own_error(monkeypatch):
    # a float32 tensor NumPy cannot import for another reason: DLPack's error, not a dtype message
    from topkattn import backend

    def refuse(x):
        raise BufferError("not on the CPU")

    monkeypatch.setattr(backend.np, "from_dlpack", refuse)
    with pytest.raises(BufferError, match="not on the CPU"):
        backend.as_engine_array(torch.zeros(2), "q")
    with pytest.raises(TypeError, match=r"^q must be float32 or float64.*bfloat16"):
        backend.as_engine_array(torch.zeros(2, dtype=torch.bfloat16), "q")
