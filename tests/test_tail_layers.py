"""Top-k attention with a mean tail (tail="mean") in the layers, the model and the CLI: training
equals the op's float64 reference, float64 central-difference gradients of every parameter,
decode equals forward (MHA, GQA, MQA, MLA and its variants, dynamic k), bad arguments, config
and checkpoint round trips, train-toy --tail mean and eval."""
import copy
import json

import numpy as np
import pytest
from click.testing import CliRunner

from topkattn.cli.main import main
from topkattn.decoding.selectors import ExactSelector, SimulatedRecallSelector
from topkattn.layers.attention import Attention
from topkattn.layers.cache import tail_attention_decode
from topkattn.layers.mla import MLA
from topkattn.layers.rope import rope_angles, rope_apply
from topkattn.model import Transformer, TransformerConfig
from topkattn.ops.reference import tail_topk_attention_reference
from topkattn.testing import check_layer_grads

T = 13
MLA_DIMS = (16, 4, 8, 8, 4, 4, 6)  # d, H, Lq, C, Dn, R, Dv


def _attention(G=2, P=0, **kw):
    kw = {"topk": 3, "tail": "mean", **kw}
    return Attention(16, 4, G, head_dim=8, seed=1, dtype="float64", persistent_tokens=P, **kw)


def _mla(P=0, **kw):
    kw = {"topk": 3, "tail": "mean", **kw}
    return MLA(*MLA_DIMS, seed=1, dtype="float64", persistent_tokens=P, **kw)


def _decode(layer, x):
    """(B, T, d) outputs of feeding x one token at a time through the layer's cache."""
    cache = layer.init_cache(x.shape[0])
    return np.concatenate([layer.step(x[:, t:t + 1], cache) for t in range(x.shape[1])], axis=1)


def _plain(layer):
    """The same weights without the tail (plain top-k)."""
    other = copy.copy(layer)
    other.tail = None
    return other


LAYERS = {
    "mha": lambda: _attention(G=4),
    "gqa-window": lambda: _attention(G=2, window=2),
    "mqa-persistent": lambda: _attention(G=1, P=2),
    "gqa-dynamic-k": lambda: _attention(G=2, topk="auto", tail_bound=0.2, max_topk=6),
    "mla": lambda: _mla(),
    "mla-persistent-window": lambda: _mla(P=2, window=1),
    "mla-dynamic-k": lambda: _mla(topk="auto", tail_bound=0.2, max_topk=6),
    "mla-kv-experts": lambda: _mla(kv_experts=3),
    "mla-split-ranks": lambda: _mla(P=1, k_rank=6, v_rank=10),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_decode_equals_forward(name):
    layer = LAYERS[name]()
    layer.training = False
    x = np.random.default_rng(0).standard_normal((2, T, 16))
    y = layer.forward(x)
    np.testing.assert_allclose(_decode(layer, x), y, rtol=1e-11, atol=1e-12)
    assert np.abs(_plain(layer).forward(x) - y).max() > 1e-3  # the tail changes the output
    layer.selector = ExactSelector(tail_bound=layer.tail_bound)  # an exact selector: the same steps
    np.testing.assert_allclose(_decode(layer, x), y, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("make", [lambda: _attention(G=2), lambda: _mla()], ids=["attention", "mla"])
def test_decode_refuses_an_approximate_selector(make):
    layer = make()
    layer.training = False
    layer.selector = SimulatedRecallSelector(0.5, seed=0)
    with pytest.raises(ValueError, match="tail='mean' decodes with exact selection only.*SimulatedRecallSelector"):
        _decode(layer, np.ones((1, 2, 16)))


def _attention_qkv(layer, x):
    """The op inputs q, k, v of an :class:`Attention` layer, built here from its params."""
    p, (B, T_, _) = layer.params, x.shape
    H, G, D, P = layer.n_heads, layer.n_kv_heads, layer.head_dim, layer.persistent_tokens
    cs = rope_angles(np.arange(T_), D, layer.rope_base, np, x.dtype)
    q = rope_apply((x @ p["W_Q"].T).reshape(B, T_, H, D).transpose(0, 2, 1, 3), *cs)
    k = rope_apply((x @ p["W_K"].T).reshape(B, T_, G, D).transpose(0, 2, 1, 3), *cs)
    v = (x @ p["W_V"].T).reshape(B, T_, G, D).transpose(0, 2, 1, 3)
    if P:
        k = np.concatenate([np.broadcast_to(p["persist_k"][None], (B, G, P, D)), k], axis=2)
        v = np.concatenate([np.broadcast_to(p["persist_v"][None], (B, G, P, D)), v], axis=2)
    return q, k, v


@pytest.mark.parametrize("G,P,window", [(2, 2, 0), (1, 0, 2), (4, 1, 1)])
def test_attention_forward_equals_the_op_reference(G, P, window):
    layer = _attention(G=G, P=P, window=window)
    x = np.random.default_rng(1).standard_normal((2, T, 16))
    q, k, v = _attention_qkv(layer, x)
    o = tail_topk_attention_reference(q, k, v, topk=3, causal=True, sinks=P, window=window)
    want = o.transpose(0, 2, 1, 3).reshape(2, T, -1) @ layer.params["W_O"].T
    np.testing.assert_allclose(layer.forward(x), want, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("P,window", [(0, 0), (2, 1)])
def test_mla_forward_equals_the_op_reference_on_unabsorbed_keys(P, window):
    layer = _mla(P=P, window=window)
    x = np.random.default_rng(2).standard_normal((2, T, 16))
    q, k, v = layer.project(x)
    o = tail_topk_attention_reference(q, k, v, topk=3, causal=True, sinks=P, window=window)
    want = o.transpose(0, 2, 1, 3).reshape(2, T, -1) @ layer.params["W_O"].T
    np.testing.assert_allclose(layer.forward(x), want, rtol=1e-12, atol=1e-13)


def test_decode_kernel_equals_the_reference_at_the_last_row():
    """tail_attention_decode (every cached key visible) is the op's formula at position S - 1."""
    rng = np.random.default_rng(3)
    B, H, G, S, D, Dv = 2, 4, 2, 9, 5, 3
    q, k, v = rng.standard_normal((B, H, 1, D)), rng.standard_normal((B, G, S, D)), rng.standard_normal((B, G, S, Dv))
    from topkattn.ops.selection import select_topk
    idx = select_topk(q, k, topk=3, causal=True, scale=0.4)[:, :, 0]  # (B, H, K)
    got = tail_attention_decode(q[:, :, 0], k, v, idx, 0.4)
    want = tail_topk_attention_reference(q, k, v, topk=3, causal=True, scale=0.4)[:, :, 0]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)
    # every key selected: dense attention (no tail left)
    full = np.broadcast_to(np.arange(S), (B, H, S))
    s = np.einsum("bgrd,bgsd->bgrs", q[:, :, 0].reshape(B, G, 2, D), k) * 0.4
    p = np.exp(s - s.max(-1, keepdims=True))
    dense = np.einsum("bgrs,bgsv->bgrv", p / p.sum(-1, keepdims=True), v).reshape(B, H, Dv)
    np.testing.assert_allclose(tail_attention_decode(q[:, :, 0], k, v, full, 0.4), dense, rtol=1e-12)


@pytest.mark.parametrize("make", [
    lambda: _attention(G=2, P=1, window=1),
    lambda: _attention(G=1, topk="auto", tail_bound=0.3, max_topk=4),
    lambda: _mla(P=1),
    lambda: _mla(topk="auto", tail_bound=0.3, max_topk=4),
    lambda: _mla(kv_experts=2),
], ids=["gqa", "mqa-dynamic-k", "mla", "mla-dynamic-k", "mla-kv-experts"])
def test_float64_gradients_through_the_layer(make):
    layer = make()
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 10, 16))
    res = check_layer_grads(layer, x, rng, rtol=1e-6, atol=1e-8)
    assert set(res) == set(layer.params) | {"x"}


@pytest.mark.parametrize("cls", ["attention", "mla"])
@pytest.mark.parametrize("kw,needle", [
    ({"tail": "median"}, "tail must be None or 'mean', got 'median'"),
    ({"tail": "none"}, "tail must be None or 'mean', got 'none'"),
    ({"tail": True}, "tail must be None or 'mean', got True"),
    ({"topk": None}, "tail='mean' needs token top-k.*topk=None"),
    ({"topk": None, "selection": "block", "block_size": 4, "topk_blocks": 2}, "tail='mean' applies to token top-k"),
    ({"forget_rate": 0.1}, "tail='mean' does not combine with forgetful masking.*forget_rate=0.1"),
])
def test_bad_arguments(cls, kw, needle):
    with pytest.raises(ValueError, match=needle):
        (_attention if cls == "attention" else _mla)(**kw)


def test_with_kv_heads_keeps_the_tail():
    layer = _attention(G=4)
    assert layer.with_kv_heads(2).tail == "mean"


# -- the model -----------------------------------------------------------------------------
def _cfg(**kw):
    base = dict(vocab_size=16, d_model=16, n_layers=3, n_heads=2, q_lora_rank=8, kv_lora_rank=8, qk_nope_dim=8,
                qk_rope_dim=4, v_head_dim=8, d_ff=32, dtype="float64")
    return TransformerConfig(**{**base, **kw})


def test_config_layers_and_json_round_trip():
    cfg = _cfg(topk=3, tail="mean", dense_layers=(1,))
    model = Transformer(cfg)
    assert [(b.attn.topk, b.attn.tail) for b in model.blocks] == [(3, "mean"), (None, None), (3, "mean")]
    again = TransformerConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.tail == "mean"
    legacy = TransformerConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "tail"})
    assert legacy.tail is None  # a config from before the field
    mha = Transformer(_cfg(attention="mha", n_kv_heads=1, topk=2, tail="mean"))
    assert all(b.attn.tail == "mean" for b in mha.blocks)


@pytest.mark.parametrize("kw,needle", [
    ({"tail": "mean"}, "topk=None"),
    ({"tail": "mean", "topk": 2, "forget_rate": 0.2}, "forget_rate"),
    ({"tail": "mean", "selection": "block", "block_size": 4, "topk_blocks": 2}, "selection='block'"),
    ({"tail": "max", "topk": 2}, "tail must be None or 'mean', got 'max'"),
])
def test_bad_configs(kw, needle):
    with pytest.raises(ValueError, match=needle):
        _cfg(**kw)


@pytest.mark.parametrize("attention", ["mla", "mha"])
def test_model_decode_equals_forward(attention):
    cfg = _cfg(attention=attention, n_kv_heads=1 if attention == "mha" else None, topk=3, tail="mean",
               dense_layers=(0,), persistent_tokens=1, token_shift=True)
    model = Transformer(cfg).eval()
    tokens = np.random.default_rng(5).integers(0, 16, size=(2, 11))
    logits = model.forward(tokens)
    cache = model.init_cache(2)
    steps = np.concatenate([model.step(tokens[:, t:t + 1], cache) for t in range(11)], axis=1)
    np.testing.assert_allclose(steps, logits, rtol=1e-10, atol=1e-11)


def test_safetensors_round_trip(tmp_path):
    pytest.importorskip("safetensors")
    cfg = _cfg(topk=2, tail="mean")
    model = Transformer(cfg)
    model.to_safetensors(tmp_path / "m.safetensors")
    back = Transformer.from_safetensors(tmp_path / "m.safetensors")
    assert back.cfg == cfg and all(b.attn.tail == "mean" for b in back.blocks)
    tokens = np.arange(10)[None] % 16
    np.testing.assert_array_equal(back.forward(tokens), model.forward(tokens))


# -- training, checkpoints, the CLI -----------------------------------------------------------
TINY = ["--d-model", "16", "--heads", "2", "--seq-len", "16", "--num-kv-pairs", "3", "--vocab-size", "16",
        "--batch-size", "4", "--quiet"]


def test_train_config():
    from topkattn.training.train import TrainConfig, model_config, saved_config

    cfg = TrainConfig(tail="mean", k=4)
    assert model_config(cfg, 16).tail == "mean"
    for kw, needle in (({"attention": "dense"}, "attention='dense'"), ({"attention": "block"}, "attention='block'"),
                       ({"forget_rate": 0.1}, "forget_rate")):
        with pytest.raises(ValueError, match=needle):
            TrainConfig(tail="mean", **kw)
    old = {k: v for k, v in TrainConfig().to_dict().items() if k != "tail"}
    assert TrainConfig.from_dict(saved_config({"config": old})).tail is None


def test_train_toy_tail_run_checkpoint_and_eval(tmp_path):
    from topkattn.decoding.runner import decode_teacher_forced, selector_factory
    from topkattn.training.runs import load_run
    from topkattn.training.train import heldout_set, make_task

    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["train-toy", *TINY, "--steps", "3", "--k", "3", "--tail", "mean",
                                  "--dense-layers", "1", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.output)
    assert m["attention"] == "topk" and m["config"]["tail"] == "mean" and np.isfinite(m["train_loss"])
    cfg, model = load_run(out)  # the checkpoint round trip: the same layers
    assert cfg.tail == "mean" and [b.attn.tail for b in model.blocks] == ["mean", None]
    inputs, _ = heldout_set(make_task(cfg), cfg)
    x = inputs[:4]
    want = model.eval().forward(x)
    got = decode_teacher_forced(model, x, selectors=selector_factory("exact", 2)(0), prompt_len=0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    r = CliRunner().invoke(main, ["eval", str(out), "--n-sequences", "8", "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    ev = json.loads(r.output)
    assert ev["train_tail"] == "mean" and ev["k"] == 3 and 0 <= ev["accuracy"] <= 1
    r = CliRunner().invoke(main, ["eval", str(out), "--retriever", "simulated", "--recall", "0.5"])
    assert r.exit_code == 2 and "--retriever exact" in r.output and len(r.output.strip().splitlines()) == 1
    # resuming with a different --tail is refused; without --tail the checkpoint's is taken
    r = CliRunner().invoke(main, ["train-toy", *TINY, "--steps", "3", "--tail", "none", "--out", str(out),
                                  "--resume"])
    assert r.exit_code == 2 and "--tail (checkpoint 'mean', now None)" in r.output, r.output
    r = CliRunner().invoke(main, ["train-toy", *TINY, "--steps", "3", "--out", str(out), "--resume", "--json"])
    assert r.exit_code == 0, r.output  # stdout's JSON, then the "resumed from" note (stderr)
    assert json.loads(r.output.splitlines()[0])["config"]["tail"] == "mean"


@pytest.mark.parametrize("args,needle", [
    (["--attention", "dense", "--tail", "mean"], "--tail mean applies to --attention topk (token top-k), got "
                                                 "--attention dense"),
    (["--attention", "block", "--tail", "mean"], "--tail mean applies to --attention topk"),
    (["--tail", "mean", "--forget-rate", "0.1"], "--tail mean does not combine with --forget-rate"),
    (["--tail", "max"], "--tail"),
])
def test_train_toy_usage_errors(args, needle):
    r = CliRunner().invoke(main, ["train-toy", *TINY, "--steps", "1", *args])
    assert r.exit_code == 2 and needle in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1, r.output


def test_train_toy_table_shows_the_tail():
    from topkattn.cli.train_toy import format_table

    m = {"task": "mqar", "attention": "topk", "k": 8, "forget_rate": 0.0, "steps": 1, "train_loss": 1.0,
         "accuracy": 0.5, "tokens_per_s": None, "seconds": 1.0, "config": {"tail": "mean"}}
    assert "8 mean-tail" in format_table([m])


def test_distributed_layers_refuse_the_tail():
    """Head-parallel MLA and sharded decoding carry no tail: refused, never silently plain top-k."""
    pytest.importorskip("mpi4py")
    from topkattn.distributed import shard_decoding, world
    from topkattn.distributed.head_parallel import HeadParallelMLA

    comm = world()
    with pytest.raises(ValueError, match="head-parallel MLA supports plain MLA.*tail='mean'"):
        HeadParallelMLA(_mla(), comm)
    model = Transformer(_cfg(topk=2, tail="mean"))
    with pytest.raises(ValueError, match="sharded decoding attends plain top-k; layer has tail='mean'"):
        shard_decoding(model, comm)
    assert all(type(b.attn) is MLA for b in model.blocks)  # left as it was
