"""Attention statistics recorded by the layers (forward and decode steps) and the model
(Transformer.attention_stats): the keys attended per query equal what the selection says."""
import numpy as np
import pytest

from topkattn.layers import attend
from topkattn.layers.attention import Attention
from topkattn.layers.attention_stats import AttentionStats
from topkattn.layers.mla import MLA
from topkattn.model import Transformer, TransformerConfig

B, T = 2, 12


def _layer(kind, **kw):
    if kind == "mla":
        layer = MLA(16, 4, 8, 8, 4, 4, 6, seed=1, dtype="float64", **kw)
    else:
        layer = Attention(16, 4, 2, head_dim=8, seed=1, dtype="float64", **kw)
    layer.training = False
    layer.stats = AttentionStats()
    return layer


def _x():
    return np.random.default_rng(0).standard_normal((B, T, 16))


def _decode_stats(layer, x):
    layer.stats = AttentionStats()
    cache = layer.init_cache(x.shape[0])
    for t in range(x.shape[1]):
        layer.step(x[:, t:t + 1], cache)
    return layer.stats.as_dict()["total"]


@pytest.mark.parametrize("kind", ["mla", "attention"])
@pytest.mark.parametrize("gather", [False, True], ids=["dense-tile", "gather"])
def test_token_topk_keys_per_query(kind, gather, monkeypatch):
    if gather:  # the top-k op's own path instead of the masked dense tile
        monkeypatch.setattr(attend, "masked_is_cheaper", lambda *a: False)
    P, k = 1, 3
    layer = _layer(kind, topk=k, persistent_tokens=P)
    layer.forward(_x())
    got = layer.stats.as_dict()["last"]
    visible = np.arange(T) + 1 + P  # query t sees its P + t + 1 keys
    per_row = np.minimum(visible, P + k)  # the sink plus k selected
    assert got["queries"] == B * 4 * T
    assert got["keys_per_query_mean"] == pytest.approx(per_row.mean())
    assert got["dense_fallback_queries"] == int((visible <= P + k).sum()) * B * 4
    values, counts = np.unique(per_row, return_counts=True)
    assert got["keys_per_query_hist"] == {"keys": values.tolist(), "queries": (counts * B * 4).tolist()}
    assert got["visible_keys_per_query_mean"] == pytest.approx(visible.mean())
    dec = _decode_stats(layer, _x())  # decode rows select the same counts
    assert dec["keys_per_query_hist"] == got["keys_per_query_hist"]
    assert dec["dense_fallback_queries"] == got["dense_fallback_queries"]


@pytest.mark.parametrize("kind", ["mla", "attention"])
def test_block_keys_and_blocks_per_query(kind):
    bs, kb = 4, 2
    layer = _layer(kind, selection="block", block_size=bs, topk_blocks=kb)
    layer.forward(_x())
    got = layer.stats.as_dict()["last"]
    t = np.arange(T)
    keys = t % bs + 1 + bs * np.minimum(kb - 1, t // bs)  # own block up to t, plus full earlier blocks
    blocks = 1 + np.minimum(kb - 1, t // bs)
    assert got["keys_per_query_mean"] == pytest.approx(keys.mean())
    assert got["blocks_per_query_mean"] == pytest.approx(blocks.mean())
    vals, counts = np.unique(blocks, return_counts=True)
    assert got["blocks_per_query_hist"] == {"blocks": vals.tolist(), "queries": (counts * B * 4).tolist()}
    assert got["index_bytes"] == B * 4 * T * kb * 8  # the (B, H, T, Kb) int64 blocks, not the token indices
    dec = _decode_stats(layer, _x())
    assert dec["keys_per_query_hist"] == got["keys_per_query_hist"]
    assert dec["blocks_per_query_hist"] == got["blocks_per_query_hist"]


def test_dense_layer_and_topk_covering_every_key_count_as_dense():
    dense = _layer("mla")
    dense.forward(_x())
    d = dense.stats.as_dict()["last"]
    assert d["dense_fallback_updates"] == 1 and d["dense_fallback_rate"] == 1.0 and d["index_bytes"] == 0
    assert d["keys_per_query_mean"] == pytest.approx((np.arange(T) + 1).mean())
    full = _layer("mla", topk=T)  # k >= every visible key: top-k is dense attention
    full.forward(_x())
    f = full.stats.as_dict()["last"]
    assert f["dense_fallback_updates"] == 1 and f["keys_per_query_hist"] == d["keys_per_query_hist"]
    dec = _decode_stats(dense, _x())
    assert dec["dense_fallback_updates"] == T and dec["keys_per_query_hist"] == d["keys_per_query_hist"]


def test_dynamic_k_distribution_recorded():
    layer = _layer("attention", topk="auto", tail_bound=0.05)
    layer.forward(_x() * 3)
    got = layer.stats.as_dict()["last"]
    chosen = (layer._saved[2].idx >= 0).sum(-1)  # (B, H, T) keys the op attended
    vals, counts = np.unique(chosen, return_counts=True)
    assert got["keys_per_query_hist"] == {"keys": vals.tolist(), "queries": counts.tolist()}


def test_no_stats_by_default_and_model_merges_layers():
    cfg = TransformerConfig(vocab_size=16, d_model=16, n_layers=3, n_heads=2, q_lora_rank=8, kv_lora_rank=8,
                            qk_nope_dim=8, qk_rope_dim=4, v_head_dim=8, d_ff=32, topk=3, dense_layers=(0,))
    model = Transformer(cfg)
    assert all(b.attn.stats is None for b in model.blocks)
    assert model.attention_stats() == {"layers": [None, None, None], "all": None}
    tokens = np.random.default_rng(1).integers(0, 16, size=(2, 10))
    model.enable_attention_stats()
    model.forward(tokens)
    model.forward(tokens)
    st = model.attention_stats()
    assert [s["selection"] for s in st["layers"]] == ["dense", "topk", "topk"]
    assert [s["updates"] for s in st["layers"]] == [2, 2, 2]
    t = np.arange(10)
    assert st["layers"][0]["total"]["keys_per_query_mean"] == pytest.approx((t + 1).mean())
    assert st["layers"][1]["total"]["keys_per_query_mean"] == pytest.approx(np.minimum(t + 1, 3).mean())
    total = st["all"]["total"]
    assert total["queries"] == 3 * 2 * 2 * 2 * 10  # layers x forwards x batch x heads x tokens
    assert total["keys_per_query_mean"] == pytest.approx(((t + 1).mean() + 2 * np.minimum(t + 1, 3).mean()) / 3)
    model.enable_attention_stats(False)
    model.forward(tokens)
    assert model.attention_stats()["all"] is None
