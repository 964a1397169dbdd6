"""Block top-k attention (MoBA) in the layers, the model, the CLI: training equals the op's
reference, decode (block means kept in the cache) equals forward, float64 gradients, bad
arguments, hybrid configs (dense_layers), checkpoints, train-toy --attention block and eval."""
import copy
import json

import numpy as np
import pytest
from click.testing import CliRunner

from topkattn.cli.main import main
from topkattn.layers.attention import Attention
from topkattn.layers.cache import BlockMeans
from topkattn.layers.mla import MLA
from topkattn.model import Transformer, TransformerConfig
from topkattn.ops.block_selection import block_means
from topkattn.ops.reference import block_topk_attention_reference
from topkattn.testing import check_layer_grads

BS, KB = 4, 2  # block size, blocks per query
T = 13  # not a multiple of BS
MLA_DIMS = (16, 4, 8, 8, 4, 4, 6)  # d, H, Lq, C, Dn, R, Dv


def _attention(G=2, P=0, **kw):
    kw = {"selection": "block", "block_size": BS, "topk_blocks": KB, **kw}
    return Attention(16, 4, G, head_dim=8, seed=1, dtype="float64", persistent_tokens=P, **kw)


def _mla(P=0, **kw):
    kw = {"selection": "block", "block_size": BS, "topk_blocks": KB, **kw}
    return MLA(*MLA_DIMS, seed=1, dtype="float64", persistent_tokens=P, **kw)


def _decode(layer, x):
    """(B, T, d) outputs of feeding x one token at a time through the layer's cache."""
    cache = layer.init_cache(x.shape[0])
    ys = [layer.step(x[:, t:t + 1], cache) for t in range(x.shape[1])]
    return np.concatenate(ys, axis=1), cache


LAYERS = {
    "mha": lambda: _attention(G=4),
    "gqa": lambda: _attention(G=2),
    "mqa-persistent": lambda: _attention(G=1, P=2),
    "mla": lambda: _mla(),
    "mla-persistent": lambda: _mla(P=2),
    "mla-kv-experts": lambda: _mla(kv_experts=3),
    "mla-split-ranks": lambda: _mla(P=1, k_rank=6, v_rank=10),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_decode_equals_forward(name):
    layer = LAYERS[name]()
    layer.training = False
    x = np.random.default_rng(0).standard_normal((2, T, 16))
    y = layer.forward(x)
    ys, _ = _decode(layer, x)
    np.testing.assert_allclose(ys, y, rtol=1e-11, atol=1e-12)
    # block selection is not dense attention here: the same weights attending every key differ
    dense = copy.copy(layer)
    dense.selection, dense.block_size, dense.topk_blocks = "token", None, None
    assert np.abs(dense.forward(x) - y).max() > 1e-3


def test_attention_forward_equals_the_op_reference():
    layer = _attention(G=2, P=2)
    x = np.random.default_rng(1).standard_normal((2, T, 16))
    y = layer.forward(x)
    p = layer.params
    B, H, G, D = 2, 4, 2, 8
    from topkattn.layers.rope import rope_angles, rope_apply
    cs = rope_angles(np.arange(T), D, layer.rope_base, np, x.dtype)
    q = rope_apply((x @ p["W_Q"].T).reshape(B, T, H, D).transpose(0, 2, 1, 3), *cs)
    k = rope_apply((x @ p["W_K"].T).reshape(B, T, G, D).transpose(0, 2, 1, 3), *cs)
    v = (x @ p["W_V"].T).reshape(B, T, G, D).transpose(0, 2, 1, 3)
    k = np.concatenate([np.broadcast_to(p["persist_k"][None], (B, G, 2, D)), k], axis=2)
    v = np.concatenate([np.broadcast_to(p["persist_v"][None], (B, G, 2, D)), v], axis=2)
    o, mask, _, _ = block_topk_attention_reference(q, k, v, block_size=BS, topk_blocks=KB)
    assert not mask.all()  # blocks were left out
    want = o.transpose(0, 2, 1, 3).reshape(B, T, H * D) @ p["W_O"].T
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("P", [0, 2])
def test_mla_forward_equals_the_op_reference_on_unabsorbed_keys(P):
    layer = _mla(P=P)
    x = np.random.default_rng(2).standard_normal((2, T, 16))
    y = layer.forward(x)
    q, k, v = layer.project(x)
    o, mask, _, _ = block_topk_attention_reference(q, k, v, block_size=BS, topk_blocks=KB)
    assert not mask.all()
    want = o.transpose(0, 2, 1, 3).reshape(2, T, -1) @ layer.params["W_O"].T
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-13)


def test_block_means_kept_in_the_cache_equal_the_op_means():
    layer = _mla(P=2)
    layer.training = False
    x = np.random.default_rng(3).standard_normal((2, T, 16))
    _, cache = _decode(layer, x)
    keys = cache.keys[:, None]  # (B, 1, P + T, C + R)
    assert isinstance(cache.block_means, BlockMeans) and cache.block_means.n == 2 + T
    np.testing.assert_allclose(cache.block_means.means, block_means(keys, BS), rtol=1e-13, atol=1e-14)
    # a cache fed in uneven chunks folds each row in once and ends at the same means
    bm = BlockMeans(np, 2, 1, keys.shape[-1], keys.dtype, BS)
    for n in (3, 4, 9, 15):
        bm.update(keys[:, :, :n])
    np.testing.assert_allclose(bm.means, block_means(keys, BS), rtol=1e-13, atol=1e-14)
    with pytest.raises(ValueError, match="fewer than"):
        bm.update(keys[:, :, :4])


@pytest.mark.parametrize("make", [lambda: _attention(G=2, P=1), lambda: _mla(P=1)], ids=["attention", "mla"])
def test_float64_gradients_through_the_layer(make):
    layer = make()
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 10, 16))
    res = check_layer_grads(layer, x, rng, rtol=1e-6, atol=1e-8)
    assert set(res) == set(layer.params) | {"x"}


@pytest.mark.parametrize("cls", ["attention", "mla"])
@pytest.mark.parametrize("kw,err,needle", [
    ({"block_size": 0}, ValueError, "block_size"),
    ({"topk_blocks": 0}, ValueError, "topk_blocks"),
    ({"block_size": 2.5}, TypeError, "block_size"),
    ({"topk_blocks": None}, TypeError, "topk_blocks"),
    ({"topk": 4}, ValueError, "topk"),
    ({"window": 2}, ValueError, "window"),
    ({"forget_rate": 0.1}, ValueError, "forget_rate"),
    ({"selection": "blocks"}, ValueError, "selection"),
    ({"selection": "token"}, ValueError, "block_size and topk_blocks apply only"),
])
def test_bad_arguments(cls, kw, err, needle):
    with pytest.raises(err, match=needle):
        (_attention if cls == "attention" else _mla)(**kw)


# -- the model -----------------------------------------------------------------------------
def _cfg(**kw):
    base = dict(vocab_size=16, d_model=16, n_layers=3, n_heads=2, q_lora_rank=8, kv_lora_rank=8, qk_nope_dim=8,
                qk_rope_dim=4, v_head_dim=8, d_ff=32, dtype="float64")
    return TransformerConfig(**{**base, **kw})


def test_hybrid_config_layers_and_json_round_trip():
    cfg = _cfg(selection="block", block_size=4, topk_blocks=2, dense_layers=[2, 0])
    assert cfg.dense_layers == (0, 2)
    model = Transformer(cfg)
    kinds = [(b.attn.selection, b.attn.topk, b.attn.block_size) for b in model.blocks]
    assert kinds == [("token", None, None), ("block", None, 4), ("token", None, None)]
    again = TransformerConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    token = Transformer(_cfg(topk=3, dense_layers=(1,), attention="mha"))
    assert [b.attn.topk for b in token.blocks] == [3, None, 3]
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("selection", "block_size", "topk_blocks",
                                                                "dense_layers")}
    legacy = TransformerConfig.from_dict(old)  # a config from before these fields
    assert (legacy.selection, legacy.block_size, legacy.topk_blocks, legacy.dense_layers) == ("token", None, None, ())


@pytest.mark.parametrize("kw,err,needle", [
    ({"dense_layers": (3,)}, ValueError, "dense_layers"),
    ({"dense_layers": (-1,)}, ValueError, "dense_layers"),
    ({"dense_layers": (0, 0)}, ValueError, "repeat"),
    ({"dense_layers": "0"}, TypeError, "dense_layers"),
    ({"selection": "block", "block_size": 4}, TypeError, "topk_blocks"),
    ({"selection": "block", "block_size": 4, "topk_blocks": 2, "topk": 8}, ValueError, "topk"),
    ({"block_size": 4}, ValueError, "selection='block'"),
])
def test_bad_configs(kw, err, needle):
    with pytest.raises(err, match=needle):
        _cfg(**kw)


@pytest.mark.parametrize("attention", ["mla", "mha"])
def test_model_decode_equals_forward_hybrid_block(attention):
    cfg = _cfg(attention=attention, n_kv_heads=1 if attention == "mha" else None, selection="block",
               block_size=3, topk_blocks=2, dense_layers=(0,), token_shift=True)
    model = Transformer(cfg).eval()
    tokens = np.random.default_rng(5).integers(0, 16, size=(2, 11))
    logits = model.forward(tokens)
    cache = model.init_cache(2)
    steps = np.concatenate([model.step(tokens[:, t:t + 1], cache) for t in range(11)], axis=1)
    np.testing.assert_allclose(steps, logits, rtol=1e-10, atol=1e-11)


def test_safetensors_round_trip(tmp_path):
    pytest.importorskip("safetensors")
    cfg = _cfg(selection="block", block_size=4, topk_blocks=2, dense_layers=(1,))
    model = Transformer(cfg)
    model.to_safetensors(tmp_path / "m.safetensors")
    back = Transformer.from_safetensors(tmp_path / "m.safetensors")
    assert back.cfg == cfg
    tokens = np.arange(10)[None] % 16
    np.testing.assert_array_equal(back.forward(tokens), model.forward(tokens))


# -- training, checkpoints, the CLI -----------------------------------------------------------
TINY = ["--d-model", "16", "--heads", "2", "--seq-len", "16", "--num-kv-pairs", "3", "--vocab-size", "16",
        "--batch-size", "4", "--quiet"]


def test_train_toy_block_run_checkpoint_and_eval(tmp_path):
    from topkattn.decoding.runner import decode_teacher_forced, selector_factory
    from topkattn.training.runs import load_run
    from topkattn.training.train import heldout_set, make_task

    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["train-toy", *TINY, "--steps", "3", "--attention", "block", "--block-size", "4",
                                  "--topk-blocks", "2", "--dense-layers", "1", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.output)
    assert m["attention"] == "block" and m["config"]["dense_layers"] == [1]
    layers = m["attention_stats"]["layers"]
    assert [s["selection"] for s in layers] == ["block", "dense"]
    # block layer on held-out windows of 16 tokens, blocks of 4, 2 per query: the own block's
    # t % 4 + 1 keys plus one earlier block of 4 when there is one
    t = np.arange(16)
    want = (t % 4 + 1 + 4 * (t >= 4)).mean()
    assert layers[0]["total"]["keys_per_query_mean"] == pytest.approx(want)
    assert layers[1]["total"]["keys_per_query_mean"] == pytest.approx((t + 1).mean())
    cfg, model = load_run(out)  # the checkpoint round trip: the same layers
    assert (cfg.attention, cfg.block_size, cfg.topk_blocks, cfg.dense_layers) == ("block", 4, 2, [1])
    assert [b.attn.selection for b in model.blocks] == ["block", "token"]
    # decoding the run token by token gives its forward's logits
    inputs, _ = heldout_set(make_task(cfg), cfg)
    x = inputs[:4]
    want_logits = model.eval().forward(x)
    got = decode_teacher_forced(model, x, selectors=selector_factory("exact", 2)(0), prompt_len=0)
    np.testing.assert_allclose(got, want_logits, rtol=1e-4, atol=1e-4)
    r = CliRunner().invoke(main, ["eval", str(out), "--n-sequences", "8", "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    ev = json.loads(r.output)
    assert ev["train_block"] == [4, 2] and ev["train_dense_layers"] == [1] and ev["recall"] is None
    dec = ev["attention_stats"]["layers"]
    assert dec[0]["total"]["queries"] == 8 * 2 * 16  # every decode step of every head
    assert dec[0]["total"]["keys_per_query_mean"] == pytest.approx(want)
    assert dec[0]["total"]["blocks_per_query_mean"] == pytest.approx((1 + (t >= 4)).mean())
    for args, needle in ((["--k", "4"], "--k applies to token top-k"),
                         (["--retriever", "lorann"], "--retriever exact")):
        r = CliRunner().invoke(main, ["eval", str(out), *args])
        assert r.exit_code == 2 and needle in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_old_checkpoint_config_takes_the_new_defaults():
    from topkattn.training.train import TrainConfig, saved_config

    old = {k: v for k, v in TrainConfig().to_dict().items() if k not in ("block_size", "topk_blocks", "dense_layers")}
    cfg = saved_config({"config": old})
    assert (cfg["block_size"], cfg["topk_blocks"], cfg["dense_layers"]) == (16, 2, [])
    assert TrainConfig.from_dict(cfg) == TrainConfig()


@pytest.mark.parametrize("args,needle", [
    (["--dense-layers", "2"], "--dense-layers: layer 2 does not exist"),
    (["--dense-layers", "0,x"], "--dense-layers must be comma-separated"),
    (["--dense-layers", "1,1"], "--dense-layers repeats"),
    (["--block-size", "4"], "--block-size applies only with --attention block"),
    (["--attention", "block", "--k", "3"], "--k applies to --attention topk"),
    (["--attention", "dense", "--k", "3"], "--k applies to --attention topk; --attention dense attends every key"),
    (["--attention", "dense", "--forget-rate", "0.5"], "--forget-rate applies to --attention topk"),
    (["--attention", "block", "--topk-blocks", "0"], "--topk-blocks"),
])
def test_train_toy_usage_errors(args, needle):
    r = CliRunner().invoke(main, ["train-toy", *TINY, "--steps", "1", *args])
    assert r.exit_code == 2 and needle in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
