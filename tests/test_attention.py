"""Attention maps against stock nn.MultiheadAttention, rollout, and per-head statistics by direct formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_model
from torch import nn

from flag_model.analysis import attention
from flag_model.data import spread_starts


def window(s: int = 12, d: int = 60, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((s, d)).astype(np.float32)


def stock_mha(attn) -> nn.MultiheadAttention:
    """nn.MultiheadAttention carrying the block's merged (W + ΔW) q/k/v/out weights."""
    d = attn.q_proj.base.in_features
    mha = nn.MultiheadAttention(d, attn.num_heads, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(
            torch.cat([attn.q_proj.merged_weight(), attn.k_proj.merged_weight(), attn.v_proj.merged_weight()])
        )
        mha.in_proj_bias.copy_(torch.cat([attn.q_proj.base.bias, attn.k_proj.base.bias, attn.v_proj.base.bias]))
        mha.out_proj.weight.copy_(attn.out_proj.merged_weight())
        mha.out_proj.bias.copy_(attn.out_proj.base.bias)
    return mha.eval()


@pytest.mark.parametrize("kw", [{}, {"heads": 2}, {"norm_first": True}, {"causal": True}])
def test_maps_equal_stock_multihead_attention(kw):
    model = make_model(seed=1, n_blocks=3, **kw)
    x = window()
    result = attention.window_attention(model, x)
    assert result.maps.shape == (3, model.config.num_heads, 12, 12)
    with torch.no_grad():
        h = model.state_embedding(torch.from_numpy(x)[None]) + model.pos_embedding[:, :12]
        for layer, block in enumerate(model.transformer_blocks):
            inp = block.norm1(h) if block.norm_first else h
            mask = torch.ones(12, 12, dtype=torch.bool).triu(1) if kw.get("causal") else None
            _, expected = stock_mha(block.attention)(
                inp, inp, inp, need_weights=True, attn_mask=mask, average_attn_weights=False
            )
            np.testing.assert_allclose(result.maps[layer], expected[0].numpy(), rtol=1e-4, atol=1e-6)
            h, _ = block(h)
        np.testing.assert_allclose(
            result.probs, model(torch.from_numpy(x)[None])[0].softmax(-1).numpy(), rtol=1e-5, atol=1e-6
        )


def test_rows_sum_to_one():
    maps = attention.window_attention(make_model(seed=2), window(seed=2)).maps
    np.testing.assert_allclose(maps.sum(-1), 1.0, rtol=1e-5)
    assert (maps >= 0).all()


def test_changing_heads_changes_the_maps():
    a = attention.window_attention(make_model(seed=3, heads=4), window()).maps
    b = attention.window_attention(make_model(seed=3, heads=2), window()).maps
    assert a.shape[1] == 4 and b.shape[1] == 2


def test_rollout_of_identity_attention_is_identity():
    eye = np.broadcast_to(np.eye(7), (3, 2, 7, 7))
    np.testing.assert_allclose(attention.rollout(eye), np.eye(7))


def test_rollout_matches_the_recursion():
    rng = np.random.default_rng(0)
    maps = rng.random((2, 3, 5, 5))
    maps /= maps.sum(-1, keepdims=True)
    hat = [0.5 * m.mean(0) + 0.5 * np.eye(5) for m in maps]  # rows already sum to 1
    np.testing.assert_allclose(attention.rollout(maps), hat[1] @ hat[0])
    np.testing.assert_allclose(attention.rollout(maps).sum(-1), 1.0)


def test_head_stats_equal_direct_formulas():
    maps = attention.window_attention(make_model(seed=4), window(s=9)).maps.astype(np.float64)
    df = attention.head_stats(maps, last_k=3)
    assert len(df) == maps.shape[0] * maps.shape[1]
    for _, row in df.iterrows():
        p = maps[int(row["layer"]), int(row["head"])]
        S = len(p)
        ent = np.mean([-(q * np.log(q)).sum() for q in p])
        look = np.mean([sum(p[i, j] * (i - j) for j in range(S)) for i in range(S)])
        last = np.mean(p[:, S - 3 :].sum(1))
        fut = np.mean([p[i, i + 1 :].sum() for i in range(S)])
        assert row.entropy == pytest.approx(ent, rel=1e-6)
        assert row.lookback == pytest.approx(look, abs=1e-9)
        assert row.last_k_share == pytest.approx(last, rel=1e-9)
        assert row.future_share == pytest.approx(fut, rel=1e-9)
    assert (df.future_share > 0.05).all()  # no mask: every head leaks attention to the future


def test_causal_mask_gives_zero_future_share():
    model = make_model(seed=5, causal=True)
    maps = attention.window_attention(model, window()).maps
    assert (attention.head_stats(maps)["future_share"] == 0).all()
    assert (attention.future_by_query(maps) == 0).all()
    summary = attention.attention_summary(model, np.stack([window(seed=i) for i in range(4)]))
    assert (summary.stats["future_share"] == 0).all() and (summary.future_by_query == 0).all()


def test_summary_equals_mean_of_single_windows():
    model = make_model(seed=6)
    xs = np.stack([window(s=8, seed=i) for i in range(5)])
    calls = []
    summary = attention.attention_summary(model, xs, last_k=2, batch_size=2, progress=lambda f, m: calls.append(f))
    single = [attention.window_attention(model, x).maps for x in xs]
    per = [attention.head_stats(m, last_k=2) for m in single]
    cols = list(attention.STATS)
    np.testing.assert_allclose(
        summary.stats[cols].to_numpy(), np.mean([p[cols].to_numpy() for p in per], 0), rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(
        summary.stats[[c + "_std" for c in cols]].to_numpy(),
        np.std([p[cols].to_numpy() for p in per], 0),
        rtol=1e-3,
        atol=1e-6,
    )
    np.testing.assert_allclose(summary.mean_maps, np.mean(single, 0), rtol=1e-5, atol=1e-7)
    assert summary.n_windows == 5 and calls == [0.4, 0.8, 1.0]


def test_spread_starts():
    assert list(spread_starts(20, 5, 4)) == [0, 5, 10, 15]
    assert list(spread_starts(6, 5, 10)) == [0, 1]
    with pytest.raises(ValueError, match="needs at least 30 rows"):
        spread_starts(20, 30, 4)


def test_deciding_query_stats_equal_direct_formulas_and_the_summary():
    model = make_model(seed=7)
    xs = np.stack([window(s=10, seed=i) for i in range(3)])
    single = [attention.window_attention(model, x).maps.astype(np.float64) for x in xs]
    for maps in single:
        df = attention.head_stats(maps, last_k=4, query=-1)
        for _, row in df.iterrows():
            q = maps[int(row["layer"]), int(row["head"]), -1]  # the deciding bar's attention row
            assert row.entropy == pytest.approx(-(q * np.log(q)).sum(), rel=1e-6)
            assert row.lookback == pytest.approx(sum(q[j] * (9 - j) for j in range(10)), abs=1e-9)
            assert row.last_k_share == pytest.approx(q[-4:].sum(), rel=1e-9)
            assert row.future_share == 0  # nothing comes after the last position
    summary = attention.attention_summary(model, xs, last_k=4)
    cols = list(attention.STATS)
    expected = np.mean([attention.head_stats(m, 4, -1)[cols].to_numpy() for m in single], 0)
    np.testing.assert_allclose(summary.decision_stats[cols].to_numpy(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_uniform_baseline_by_direct_formulas(causal):
    S, k = 12, 3
    base = attention.uniform_baseline(S, k, causal)
    if causal:  # query i spreads over i + 1 keys
        assert base["entropy"] == pytest.approx(np.mean(np.log(np.arange(1, S + 1))))
        assert base["future_share"] == 0
        assert base["lookback"] == pytest.approx(np.mean(np.arange(S) / 2))
    else:
        assert base["entropy"] == pytest.approx(np.log(S))
        assert base["future_share"] == pytest.approx((S - 1) / (2 * S))
        assert base["lookback"] == pytest.approx(0, abs=1e-12)
        assert base["last_k_share"] == pytest.approx(k / S)
    last = attention.uniform_baseline(S, k, causal, query=-1)  # the last query sees every key either way
    assert last["entropy"] == pytest.approx(np.log(S)) and last["future_share"] == 0
    assert last["lookback"] == pytest.approx((S - 1) / 2)


def test_attention_grid_is_one_heatmap_of_every_map_at_its_tile():
    """Layers × heads drawn as one tiled heatmap: tile (layer i, head h) is maps[i, h] exactly (no downsampling at
    this size), tiles are separated by blank cells, and the axes name layer, head, query and key."""
    from flag_model import plots

    maps = np.random.default_rng(3).dirichlet(np.ones(5), size=(3, 2, 5))  # (L=3, H=2, S=5, S=5)
    fig = plots.attention_grid(maps)
    assert len(fig.data) == 1
    z, x, y = np.asarray(fig.data[0].z, float), list(fig.data[0].x), list(fig.data[0].y)
    assert z.shape == (3 * 6 - 1, 2 * 6 - 1) == (len(y), len(x))
    for i in range(3):
        for h in range(2):
            np.testing.assert_allclose(z[i * 6 : i * 6 + 5, h * 6 : h * 6 + 5], maps[i, h], rtol=1e-6)
    assert np.isnan(z[5]).all() and np.isnan(z[:, 5]).all()
    assert x[6 + 4] == "head 1, key 4" and y[12 + 2] == "layer 2, query 2"
    assert list(fig.layout.yaxis.ticktext) == ["L0", "L1", "L2"]
