"""AttentionStats: keys attended per query, index vs dense bytes, dense fallback, blocks; per update,
cumulative and merged across layers."""
import json

import numpy as np
import pytest

from topkattn.layers.attention_stats import AttentionStats
from topkattn.ops.block_attention import block_topk_attention_forward
from topkattn.ops.dense_attention import dense_attention_forward
from topkattn.ops.selection import select_decode
from topkattn.ops.topk_attention import topk_attention_forward


def test_hand_computed_update():
    idx = np.array([[[[0, -1], [0, 1], [2, 0]]]])  # (B=1, H=1, T=3, K=2); causal S=3 sees 1, 2, 3 keys
    st = AttentionStats()
    got = st.update(idx, n_keys=3)
    assert got == {
        "updates": 1, "queries": 3,
        "keys_per_query_mean": 5 / 3, "keys_per_query_min": 1, "keys_per_query_max": 2,
        "keys_per_query_hist": {"keys": [1, 2], "queries": [1, 2]},
        "visible_keys_per_query_mean": 2.0, "attended_fraction": 5 / 6,
        "index_bytes": 6 * 8, "dense_score_bytes": 3 * 3 * 4, "index_to_dense_bytes": 48 / 36,
        "dense_fallback_queries": 2, "dense_fallback_rate": 2 / 3, "dense_fallback_updates": 0,
    }
    assert st.as_dict() == {"updates": 1, "last": got, "total": got}
    noncausal = AttentionStats().update(idx, n_keys=3, causal=False, score_dtype=np.float64)
    assert noncausal["visible_keys_per_query_mean"] == 3.0 and noncausal["dense_fallback_queries"] == 0
    assert noncausal["dense_score_bytes"] == 3 * 3 * 8


@pytest.mark.parametrize("sinks,window", [(0, 0), (2, 1)])
def test_fixed_topk_forward(sinks, window):
    rng = np.random.default_rng(0)
    B, H, T, S, topk = 2, 3, 10, 12, 3  # S = 2 persistent + 10 tokens
    q, k = rng.standard_normal((B, H, T, 4)), rng.standard_normal((B, 1, S, 4))
    _, saved = topk_attention_forward(q, k, k, topk=topk, sinks=sinks, window=window)
    got = AttentionStats().update(saved.idx, n_keys=S, score_dtype=q.dtype)
    visible = np.arange(S - T + 1, S + 1)  # query t sees S - T + t + 1 keys
    per_row = np.minimum(visible, sinks + window + topk)  # forced + top-k, at most every visible key
    assert got["queries"] == B * H * T
    assert got["keys_per_query_mean"] == pytest.approx(per_row.mean())
    values, counts = np.unique(per_row, return_counts=True)
    assert got["keys_per_query_hist"] == {"keys": values.tolist(), "queries": (counts * B * H).tolist()}
    assert got["dense_fallback_queries"] == int((visible <= sinks + window + topk).sum()) * B * H
    assert got["index_bytes"] == saved.idx.nbytes and got["dense_score_bytes"] == B * H * T * S * 8
    assert got["visible_keys_per_query_mean"] == pytest.approx(visible.mean())


def test_dynamic_k_distribution():
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal((1, 2, 16, 8)) * 3, rng.standard_normal((1, 2, 16, 8))
    _, saved = topk_attention_forward(q, k, k, topk="auto", tail_bound=0.05)
    got = AttentionStats().update(saved.idx, n_keys=16)
    chosen = saved.info["k"]  # (B, H, T): the k dynamic k chose per query (no forced keys here)
    values, counts = np.unique(chosen, return_counts=True)
    assert got["keys_per_query_hist"] == {"keys": values.tolist(), "queries": counts.tolist()}
    assert got["keys_per_query_mean"] == pytest.approx(chosen.mean())
    assert len(values) > 2  # a real distribution, not one k


def test_dense_fallback_when_topk_covers_every_key():
    rng = np.random.default_rng(2)
    q, k = rng.standard_normal((1, 2, 5, 4)), rng.standard_normal((1, 2, 5, 4))
    _, saved = topk_attention_forward(q, k, k, topk=5)
    st = AttentionStats()
    got = st.update(saved.idx, n_keys=5)
    assert got["dense_fallback_queries"] == 10 and got["dense_fallback_updates"] == 1
    assert got["attended_fraction"] == 1.0
    dense = st.update_dense(1, 2, 5, n_keys=5)
    assert dense["dense_fallback_updates"] == 1 and dense["index_bytes"] == 0
    assert dense["keys_per_query_hist"] == got["keys_per_query_hist"]
    assert st.as_dict()["total"]["dense_fallback_updates"] == 2


def test_decode_step():
    rng = np.random.default_rng(3)
    query, keys = rng.standard_normal((2, 4, 6)), rng.standard_normal((2, 1, 20, 6))
    idx, _, _ = select_decode(query, keys, topk=5, sinks=1, window=2, scale=1.0)  # (B, H, K)
    got = AttentionStats().update(idx, n_keys=20)
    assert got["queries"] == 8 and got["keys_per_query_mean"] == 8.0
    assert got["visible_keys_per_query_mean"] == 20.0 and got["dense_fallback_queries"] == 0
    assert got["dense_score_bytes"] == 8 * 20 * 4 and got["index_bytes"] == idx.nbytes
    idx_all, _, _ = select_decode(query, keys[:, :, :4], topk=5, scale=1.0)  # 4 keys, topk 5: dense
    assert AttentionStats().update(idx_all, n_keys=4)["dense_fallback_updates"] == 1


def test_cumulative_reset_and_json():
    st = AttentionStats()
    a = np.array([[[[0, -1], [0, 1]]]])  # T=2, S=2: 1 + 2 keys
    b = np.array([[[[0, 1, 2]], [[0, -1, -1]]]])  # (1, 2, 1, 3), S=3: 3 + 1 keys
    st.update(a, n_keys=2)
    last = st.update(b, n_keys=3)
    d = st.as_dict()
    assert d["updates"] == 2 and d["last"] == last
    t = d["total"]
    assert t["queries"] == 4 and t["keys_per_query_mean"] == 7 / 4
    assert t["keys_per_query_hist"] == {"keys": [1, 2, 3], "queries": [2, 1, 1]}
    assert t["index_bytes"] == a.nbytes + b.nbytes and t["dense_score_bytes"] == (4 + 6) * 4
    assert t["dense_fallback_queries"] == 3 and t["dense_fallback_updates"] == 1
    assert json.loads(json.dumps(d)) == d
    st.reset()
    assert st.as_dict()["last"] is None and st.updates == 0 and st.as_dict()["total"]["queries"] == 0


def test_merge_across_layers_equals_one_stream():
    rng = np.random.default_rng(4)
    updates = [(rng.integers(-1, 6, (1, 2, 4, 3)), 6) for _ in range(5)]
    layers = [AttentionStats(), AttentionStats()]
    one = AttentionStats()
    for i, (idx, S) in enumerate(updates):
        layers[i % 2].update(idx, n_keys=S, blocks=idx[..., :2])
        one.update(idx, n_keys=S, blocks=idx[..., :2])
    merged = AttentionStats.merged(layers)
    assert merged.as_dict()["total"] == one.as_dict()["total"]
    assert merged.updates == 5
    last_sum = AttentionStats().merge(layers[0])  # "last" adds each layer's latest update
    assert last_sum.as_dict()["last"] == layers[0].as_dict()["last"]
    assert merged.as_dict()["last"]["queries"] == 16


def test_blocks_chosen():
    idx = np.zeros((1, 1, 3, 2), dtype=np.int64)
    blocks = np.array([[[[0, -1, -1], [0, 1, -1], [2, 0, 1]]]])  # 1, 2, 3 blocks chosen
    got = AttentionStats().update(idx, n_keys=8, blocks=blocks)
    assert got["blocks_per_query_mean"] == 2.0
    assert got["blocks_per_query_hist"] == {"blocks": [1, 2, 3], "queries": [1, 1, 1]}
    assert "blocks_per_query_mean" not in AttentionStats().update(idx, n_keys=8)
    dec = AttentionStats().update(np.zeros((1, 2, 4), dtype=np.int64), n_keys=8, blocks=np.array([[[0, 1], [1, -1]]]))
    assert dec["blocks_per_query_mean"] == 1.5


def test_bad_arguments():
    st = AttentionStats()
    with pytest.raises(TypeError, match="idx must be an integer array, got dtype float64"):
        st.update(np.zeros((1, 1, 2, 2)), n_keys=2)
    with pytest.raises(ValueError, match=r"idx must be \(B, H, T, K\) or, for a decode step, \(B, H, K\), "
                                         r"got shape \(2, 2\)"):
        st.update(np.zeros((2, 2), dtype=np.int64), n_keys=2)
    with pytest.raises(ValueError, match="n_keys must be an integer >= 0, got -1"):
        st.update(np.zeros((1, 1, 2, 2), dtype=np.int64), n_keys=-1)
    with pytest.raises(TypeError, match="score_dtype must be a float dtype, got int32"):
        st.update(np.zeros((1, 1, 2, 2), dtype=np.int64), n_keys=2, score_dtype="int32")
    with pytest.raises(ValueError, match=r"blocks must have shape \(1, 1, 2, 'Nb'\) like idx, got \(1, 2, 2\)"):
        st.update(np.zeros((1, 1, 2, 2), dtype=np.int64), n_keys=2, blocks=np.zeros((1, 2, 2), dtype=np.int64))
    with pytest.raises(TypeError, match="other must be an AttentionStats, got dict"):
        st.merge({})
    with pytest.raises(ValueError, match="queries must be an integer >= 1, got 0"):
        st.update_dense(1, 1, 0, n_keys=3)
    assert st.updates == 0  # refused updates leave no trace


def test_record_forward_and_step_from_the_ops():
    rng = np.random.default_rng(5)
    q, k = rng.standard_normal((2, 2, 6, 4)).astype(np.float32), rng.standard_normal((2, 1, 8, 4)).astype(np.float32)
    _, sparse = topk_attention_forward(q, k, k, topk=3, sinks=2)
    _, dense = dense_attention_forward(q, k, k, causal=True)
    st = AttentionStats()
    assert st.record_forward(sparse) == AttentionStats().update(sparse.idx, n_keys=8)
    assert st.record_forward(dense) == AttentionStats().update_dense(2, 2, 6, n_keys=8)
    query = q[:, :, 0]  # (B, H, D)
    idx, _, _ = select_decode(query, k, topk=3, scale=0.5)
    assert st.record_step(query, 8, idx) == AttentionStats().update(idx, n_keys=8)
    dense_step = st.record_step(query, 8)
    assert dense_step["visible_keys_per_query_mean"] == 8.0 and dense_step["dense_fallback_updates"] == 1
    assert st.updates == 4
    with pytest.raises(TypeError, match="saved must be an attention op's saved state"):
        st.record_forward((q, k))
    with pytest.raises(ValueError, match=r"query must be \(B, H, D\), got shape \(2, 2, 6, 4\)"):
        st.record_step(q, 8)


@pytest.mark.parametrize("causal", [True, False])
def test_record_block_attention_forward(causal):
    rng = np.random.default_rng(6)
    q, k = rng.standard_normal((1, 2, 10, 4)), rng.standard_normal((1, 2, 10, 4))
    _, saved = block_topk_attention_forward(q, k, k, block_size=3, topk_blocks=2, causal=causal)
    got = AttentionStats().record_forward(saved)
    chosen = (saved.blocks >= 0).sum(-1)  # (B, H, T) blocks per query
    attended = (saved.indices() >= 0).sum(-1)  # keys those blocks give each query
    assert got["blocks_per_query_mean"] == pytest.approx(chosen.mean())
    assert got["keys_per_query_mean"] == pytest.approx(attended.mean())
    assert got["index_bytes"] == saved.blocks.nbytes and got["dense_score_bytes"] == 2 * 10 * 10 * 8
    visible = np.arange(1, 11) if causal else np.full(10, 10)
    assert got["visible_keys_per_query_mean"] == pytest.approx(visible.mean())
    assert got["dense_fallback_queries"] == int((attended >= visible).sum())
