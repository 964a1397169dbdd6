"""Head-parallel MLA against the single-process layer and model.

Runs in the plain test run with one rank and in CI under ``mpiexec -n 2 python -m pytest
tests/distributed`` (every rank runs every test, in the same order; each holds H / ranks
heads).  Needs mpi4py (``pip install -e ".[mpi]"``); skipped without it.
"""
import hashlib

import numpy as np
import pytest

pytest.importorskip("mpi4py")

from topkattn.distributed import world
from topkattn.distributed.head_parallel import (
    HeadParallelMLA,
    HeadSliceGenerator,
    clip_head_parallel_grad_norm,
    full_model_params,
    gather_model_grads,
    head_parallel,
    head_parallel_grad_norm,
)
from topkattn.layers.loss import softmax_cross_entropy
from topkattn.layers.mla import MLA
from topkattn.model import Transformer, TransformerConfig
from topkattn.ops.selection import forget_draws
from topkattn.training import optim
from topkattn.training.train import RowSliceGenerator

COMM = world()
RTOL, ATOL = 1e-10, 1e-12
H = 4  # divisible by 1, 2 and 4 ranks


def close(actual, desired, what):
    np.testing.assert_allclose(actual, desired, rtol=RTOL, atol=ATOL, err_msg=what)


def _mla(**kw):
    args = dict(d_model=12, n_heads=H, q_lora_rank=6, kv_lora_rank=5, qk_nope_dim=3, qk_rope_dim=4,
                v_head_dim=3, seed=3, dtype="float64")
    args.update(kw)
    return MLA(**args)


def _cfg(**kw):
    args = dict(vocab_size=13, d_model=12, n_layers=2, n_heads=H, q_lora_rank=6, kv_lora_rank=5,
                qk_nope_dim=3, qk_rope_dim=4, v_head_dim=3, d_ff=16, dtype="float64", seed=5)
    args.update(kw)
    return TransformerConfig(**args)


LAYER_CASES = [
    dict(topk=None),
    dict(topk=3),
    dict(topk=2, persistent_tokens=2, window=2),
    dict(topk=None, persistent_tokens=3),
    dict(topk="auto", tail_bound=0.2, max_topk=4),
]


@pytest.mark.parametrize("kw", LAYER_CASES)
def test_layer_forward_backward_equal_one_process(kw):
    ref = _mla(**kw)
    hp = HeadParallelMLA(ref, COMM)
    Hp = H // COMM.size
    assert hp.n_heads == Hp and hp.head_range == (COMM.rank * Hp, (COMM.rank + 1) * Hp)
    rng = np.random.default_rng(0)  # the same on every rank
    x, dy, dy2 = (rng.standard_normal((2, 7, 12)) for _ in range(3))
    close(hp.forward(x), ref.forward(x), "y")
    close(hp.backward(dy), ref.backward(dy), "dx")
    # a second backward accumulates: only the new partial sums may be reduced
    close(hp.backward(dy2), ref.backward(dy2), "dx (2nd)")
    full = hp.gather_grads()
    assert set(full) == set(ref.grads)
    for name, g in ref.grads.items():
        assert full[name].shape == g.shape, name
        close(full[name], g, f"grad {name}")
    for name, p in hp.full_params().items():
        np.testing.assert_array_equal(p, ref.params[name], err_msg=name)
    if COMM.size > 1:  # the local W_O columns really are a slice, not the full matrix
        assert hp.params["W_O"].shape[1] == ref.params["W_O"].shape[1] // COMM.size


def test_layer_with_batch_or_time_zero():
    ref = _mla(topk=2)
    hp = HeadParallelMLA(ref, COMM)
    x = np.zeros((2, 0, 12))
    assert hp.forward(x).shape == (2, 0, 12)
    assert hp.backward(np.zeros((2, 0, 12))).shape == (2, 0, 12)


def test_decode_steps_equal_one_process():
    ref = _mla(topk=2, persistent_tokens=1, window=1)
    hp = HeadParallelMLA(ref, COMM)
    rng = np.random.default_rng(1)
    xs = rng.standard_normal((2, 5, 12))
    c_ref, c_hp = ref.init_cache(2), hp.init_cache(2)
    for t in range(xs.shape[1]):
        close(hp.step(xs[:, t:t + 1], c_hp), ref.step(xs[:, t:t + 1], c_ref), f"step {t}")


MODEL_CASES = [
    dict(topk=None),
    dict(topk=3),
    dict(topk=2, persistent_tokens=2, window=2),
    dict(topk=None, persistent_tokens=2, ffn="moe", n_experts=2, moe_topk=1),
]


def _tokens(cfg, B=2, T=8, seed=2):
    rng = np.random.default_rng(seed)
    return rng.integers(0, cfg.vocab_size, (B, T)), rng.integers(0, cfg.vocab_size, (B, T))


@pytest.mark.parametrize("kw", MODEL_CASES)
def test_model_forward_backward_equal_one_process(kw):
    cfg = _cfg(**kw)
    ref = Transformer(cfg)
    hp = head_parallel(Transformer(cfg), COMM)
    assert all(isinstance(b.attn, HeadParallelMLA) for b in hp.blocks)
    assert all(dict(b.children())["attn"] is b.attn for b in hp.blocks)
    tokens, targets = _tokens(cfg)
    logits_ref = ref.forward(tokens)
    logits = hp.forward(tokens)
    close(logits, logits_ref, "logits")
    _, dl = softmax_cross_entropy(logits_ref, targets)
    ref.backward(dl)
    hp.backward(dl)
    full = gather_model_grads(hp)
    assert set(full) == set(ref.grads)
    for name, g in ref.grads.items():
        assert full[name].shape == g.shape, name
        close(full[name], g, f"grad {name}")
    params = full_model_params(hp)
    assert set(params) == set(ref.params)
    for name, p in ref.params.items():
        np.testing.assert_array_equal(params[name], p, err_msg=name)
    close(head_parallel_grad_norm(hp), optim.global_grad_norm(ref.grads), "grad norm")


def _digest(arrays):
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(np.ascontiguousarray(arrays[name]).tobytes())
    return h.hexdigest()


def test_training_steps_keep_replicas_identical_and_match_one_process():
    cfg = _cfg(topk=3, persistent_tokens=1)
    ref = Transformer(cfg)
    hp = head_parallel(Transformer(cfg), COMM)
    opt_ref, opt = optim.AdamW(lr=1e-2), optim.AdamW(lr=1e-2)
    for step in range(3):
        tokens, targets = _tokens(cfg, seed=10 + step)
        for model, o, clip in ((ref, opt_ref, optim.clip_grad_norm), (hp, opt, None)):
            _, dl = softmax_cross_entropy(model.forward(tokens), targets)
            model.backward(dl)
            if clip is None:
                clip_head_parallel_grad_norm(model, 0.5)
            else:
                clip(model.grads, 0.5)
            o.step(model.params, model.grads)
    replicated = {n: p for n, p in hp.params.items()
                  if not any(n.endswith(f"attn.{w}") for w in ("W_UQ", "W_QR", "W_UK", "W_UV", "W_O"))}
    assert len(set(COMM.allgather(_digest(replicated)))) == 1  # bitwise equal on every rank
    for name, p in full_model_params(hp).items():
        close(p, ref.params[name], f"param {name} after 3 steps")


def test_heads_not_divisible_raise_on_every_rank():
    if COMM.size > 1:
        comm, bad = COMM, _mla(n_heads=COMM.size + 1)
    else:  # one rank divides every H: a two-rank stand-in (the check runs before any data moves)
        comm, bad = _TwoRanks(), _mla(n_heads=3)
    with pytest.raises(ValueError, match=r"n_heads=\d+ must be a multiple of the number of ranks"):
        HeadParallelMLA(bad, comm)
    with pytest.raises(ValueError, match="n_heads"):
        head_parallel(Transformer(_cfg(n_heads=bad.n_heads)), comm)


class _TwoRanks:
    """Rank 0 of two for the checks that precede communication; the other rank agrees."""
    size, rank = 2, 0

    def allgather(self, obj):
        return [obj, obj]

    def Allreduce(self, *a, **k):
        raise AssertionError("no data may move")

    Allgather = Allreduce


def test_refusals():
    with pytest.raises(TypeError, match="layer must be an MLA"):
        HeadParallelMLA(object(), COMM)
    with pytest.raises(TypeError, match="comm must be an mpi4py communicator"):
        HeadParallelMLA(_mla(), object())
    for kw in (dict(selection="block", block_size=2, topk_blocks=1), dict(kv_experts=2), dict(ternary=True),
               dict(k_rank=4, v_rank=5)):  # options the head slicing does not carry over
        with pytest.raises(ValueError, match="head-parallel MLA supports plain MLA"):
            HeadParallelMLA(_mla(**kw), COMM)
    with pytest.raises(ValueError, match="no MLA"):
        head_parallel(Transformer(_cfg(attention="mha", head_dim=4)), COMM)
    hp = HeadParallelMLA(_mla(), COMM)
    with pytest.raises(TypeError, match="already a HeadParallelMLA"):
        HeadParallelMLA(hp, COMM)
    if COMM.size > 1:  # a layer that differs between the ranks is refused on every rank
        with pytest.raises(ValueError, match="head-parallel MLA needs the same params on every rank"):
            HeadParallelMLA(_mla(seed=COMM.rank), COMM)


@pytest.mark.parametrize("name,mine", [("topk", lambda r: 2 + r), ("window", lambda r: r),
                                       ("persistent_tokens", lambda r: r), ("forget_rate", lambda r: 0.2 * r)])
def test_settings_differing_across_ranks_fail_every_rank_naming_them(name, mine):
    # the params alone were compared: another topk (window, ...) on a rank gave a silently wrong output
    kw = {"topk": 2, name: mine(COMM.rank)}
    if COMM.size == 1:  # one rank agrees with itself
        HeadParallelMLA(_mla(**kw), COMM)
        head_parallel(Transformer(_cfg(**kw)), COMM)
        return
    named = f"needs the same ([a-z_]+, )*{name}(, [a-z_]+)* on every rank, got rank 0: .*{name}="  # (params too)
    with pytest.raises(ValueError, match="head-parallel MLA " + named):
        HeadParallelMLA(_mla(**kw), COMM)
    with pytest.raises(ValueError, match="head_parallel " + named):
        head_parallel(Transformer(_cfg(**kw)), COMM)
    model = Transformer(_cfg(topk=2))
    model.blocks[1].attn.scale *= 1 + COMM.rank  # a layer changed after construction: its own check names it
    with pytest.raises(ValueError, match="head-parallel MLA needs the same scale on every rank"):
        head_parallel(model, COMM)
    assert not isinstance(model.blocks[0].attn, HeadParallelMLA)  # refused: the model is left as it was


@pytest.mark.parametrize("mine", [lambda r: dict(n_layers=2 + r), lambda r: dict(attention="mha" if r else "mla",
                                                                                 head_dim=4)])
def test_models_of_another_structure_fail_every_rank(mine):
    # a rank with more MLA layers, or none, raised alone and left the others waiting in an allgather
    if COMM.size == 1:
        return
    with pytest.raises(ValueError, match="head_parallel needs the same .* on every rank"):
        head_parallel(Transformer(_cfg(**mine(COMM.rank))), COMM)


# ---------------------------------------------------------------- forgetful masking
FORGET_CASES = [
    dict(T=7, topk=2, forget_rate=0.5),  # short: the layer attends through select_topk + the dense tile
    dict(T=20, topk=2, forget_rate=0.5),  # long: through topk_attention_forward
    dict(T=9, topk=2, persistent_tokens=2, window=1, forget_rate=0.6),
]


@pytest.mark.parametrize("seed_kind", ["int", "generator"])
@pytest.mark.parametrize("kw", FORGET_CASES)
def test_layer_with_forgetting_equals_one_process(kw, seed_kind):
    kw = dict(kw)
    T = kw.pop("T")
    ref = _mla(**kw)
    hp = HeadParallelMLA(ref, COMM)
    assert hp.forget_rate == ref.forget_rate
    rng = np.random.default_rng(3)
    x, dy = (rng.standard_normal((2, T, 12)) for _ in range(2))
    seeds = (11, 11) if seed_kind == "int" else (np.random.default_rng(11), np.random.default_rng(11))
    exact = _mla(**{**kw, "forget_rate": 0.0}).forward(x)
    for call in range(2):  # a Generator seed: the second call draws where the first left it
        y_ref = ref.forward(x, seed=seeds[0])
        close(hp.forward(x, seed=seeds[1]), y_ref, f"y (call {call})")
        close(hp.backward(dy), ref.backward(dy), f"dx (call {call})")
        assert not np.allclose(y_ref, exact)  # forgetting changed the selection
    full = hp.gather_grads()
    for name, g in ref.grads.items():
        close(full[name], g, f"grad {name}")
    if seed_kind == "generator":
        assert seeds[0].random() == seeds[1].random()  # both generators advanced alike
    ref.training = hp.training = False  # eval: no forgetting, whatever the seed
    close(hp.forward(x, seed=5), exact, "y (eval)")


def test_model_with_forgetting_trains_as_one_process():
    cfg = _cfg(topk=2, persistent_tokens=1, forget_rate=0.5)
    ref = Transformer(cfg)
    hp = head_parallel(Transformer(cfg), COMM)
    opt_ref, opt = optim.AdamW(lr=1e-2), optim.AdamW(lr=1e-2)
    for step in range(2):
        tokens, targets = _tokens(cfg, T=12, seed=20 + step)
        logits_ref = ref.forward(tokens, seed=100 + step)
        close(hp.forward(tokens, seed=100 + step), logits_ref, f"logits (step {step})")
        _, dl = softmax_cross_entropy(logits_ref, targets)
        ref.backward(dl)
        hp.backward(dl)
        full = gather_model_grads(hp)
        for name, g in ref.grads.items():
            close(full[name], g, f"grad {name} (step {step})")
        opt_ref.step(ref.params, ref.grads)
        opt.step(hp.params, hp.grads)
    for name, p in full_model_params(hp).items():
        close(p, ref.params[name], f"param {name} after 2 steps")


def test_head_slice_generator_draws_the_all_heads_block():
    full = np.random.default_rng(7).random((2, 4, 3, 5))
    g = HeadSliceGenerator(7, 1, 4)
    np.testing.assert_array_equal(g.random((2, 2, 3, 5)), full[:, 1:3])
    np.testing.assert_array_equal(forget_draws(HeadSliceGenerator(7, 2, 4), (2, 2, 3, 5), 0.4),
                                  forget_draws(7, (2, 2, 3, 5), 0.4, head_slice=(2, 4, 4)))
    # rows of a data-parallel batch, then heads: the (rows, heads) block of the whole draw
    both = HeadSliceGenerator(RowSliceGenerator(7, 1, 2), 3, 4)
    np.testing.assert_array_equal(both.random((1, 1, 3, 5)), full[1:2, 3:4])
    with pytest.raises(ValueError, match=r"heads \[3, 5\) do not fit in a layer of 4 heads"):
        HeadSliceGenerator(7, 3, 4).random((2, 2, 3, 5))
    with pytest.raises(TypeError, match="needs a shape tuple"):
        HeadSliceGenerator(7, 0, 4).random()
    with pytest.raises(TypeError, match="seed must be an int seed"):
        HeadSliceGenerator("7", 0, 4)
