"""Tensor statistics, roles, tree, random-init spectrum check and state-dict diff, against direct formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import full_layout_config, make_model
from torch import nn

from flag_model import layouts, load_checkpoint
from flag_model.analysis import tensors as T
from flag_model.model import FlagTrader, LoRA


def test_statistics_match_numpy():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(7, 5, generator=g)
    a[0, :2] = 0
    b = torch.tensor([1.0, float("nan"), -2.0, float("inf"), 0.0])
    sd = {
        "a": a,
        "b": b,
        "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "h": a.half(),
        "ln.weight": 1 + 1e-3 * torch.randn(64, generator=g),
    }
    df = T.tensor_stats(sd).set_index("name")
    for name, ref in (
        ("a", a.numpy()),
        ("c", np.arange(6.0)),
        ("h", a.half().float().numpy()),
        ("ln.weight", sd["ln.weight"].numpy()),
    ):
        row = df.loc[name]
        assert row["mean"] == pytest.approx(ref.mean(dtype=np.float64), rel=1e-5, abs=1e-6)
        assert row["std"] == pytest.approx(ref.std(dtype=np.float64), rel=1e-4)
        assert (row["min"], row["max"]) == (pytest.approx(ref.min()), pytest.approx(ref.max()))
        assert row["fro_norm"] == pytest.approx(np.linalg.norm(ref.astype(np.float64)), rel=1e-6)
        assert row["zeros_share"] == pytest.approx((ref == 0).mean())
        assert row["nonfinite"] == 0 and row["elements"] == ref.size
    finite = np.array([1.0, -2.0, 0.0])
    assert df.loc["b", "nonfinite"] == 2
    assert df.loc["b", "mean"] == pytest.approx(finite.mean()) and df.loc["b", "max"] == 1.0
    assert df.loc["b", "zeros_share"] == pytest.approx(1 / 5)
    assert df.loc["h", "bytes"] == 70 and df.loc["h", "dtype"] == "float16" and df.loc["a", "shape"] == "7×5"


def test_roles_of_every_key_family():
    sd = make_model().state_dict()
    roles = {k: T.tensor_role(k) for k in sd}
    assert roles["pos_embedding"] == "positional" and roles["state_embedding.weight"] == "embedding"
    assert roles["transformer_blocks.1.ffn.3.base.weight"] == "base"
    assert roles["transformer_blocks.0.attention.q_proj.lora.lora_A"] == "lora_A"
    assert roles["transformer_blocks.0.attention.q_proj.lora.lora_B"] == "lora_B"
    assert roles["transformer_blocks.0.norm2.bias"] == "norm" and roles["output_norm.weight"] == "norm"
    assert roles["action_head.bias"] == "head"
    assert set(roles.values()) == {"positional", "embedding", "base", "lora_A", "lora_B", "norm", "head"}
    foreign = {
        "encoder.layers.0.attention.in_proj_weight": "base",
        "actor.network.2.weight": "head",
        "encoder.input_proj.0.weight": "embedding",
        "encoder.pos_encoding.pe": "positional",
        "ln_f.weight": "norm",
        "transformer_blocks.0.ln1.bias": "norm",
        "regime_embed.weight": "embedding",
        "base_model.model.transformer_blocks.0.ffn.0.lora_A.weight": "lora_A",
        "transformer.layers.1.linear2.weight": "base",
        "encoder.layers.0.norm1.weight": "norm",
    }
    assert {k: T.tensor_role(k) for k in foreign} == foreign


def test_tree_of_the_343_tensor_layout():
    sd = FlagTrader(full_layout_config(d=16, f=32)).state_dict()  # the documented key layout, small data
    stats = T.tensor_stats(sd)
    assert len(stats) == 343
    tree = T.tensor_tree(stats, "abs_max").set_index("id")
    leaves = tree.loc[[k for k in sd]]
    assert (leaves["n_tensors"] == 1).all()
    assert tree.loc["checkpoint", "elements"] == sum(t.numel() for t in sd.values())
    assert tree.loc["checkpoint", "color"] == pytest.approx(stats["abs_max"].max())
    assert set(tree["parent"]) - {""} <= set(tree.index)
    children = tree.groupby("parent")["elements"].sum()
    for node, total in children.items():
        if node:
            assert tree.loc[node, "elements"] == total
    assert tree.loc["transformer_blocks.11/", "n_tensors"] == 28
    w = T.tensor_tree(stats, "std").set_index("id").loc["transformer_blocks.3.attention/"]
    sub = stats[stats["name"].str.startswith("transformer_blocks.3.attention.")]
    assert w["color"] == pytest.approx((sub["std"] * sub["elements"]).sum() / sub["elements"].sum())


@pytest.mark.parametrize("rows,cols", [(200, 100), (100, 100), (64, 128)])
def test_marchenko_pastur_against_monte_carlo(rows, cols):
    g = torch.Generator().manual_seed(2)
    sigma = 0.05
    sample = np.mean(
        [torch.linalg.svdvals(torch.randn(rows, cols, generator=g) * sigma).numpy() for _ in range(8)], axis=0
    )
    expected = T.marchenko_pastur_singular_values(rows, cols, sigma)
    assert expected.shape == (min(rows, cols),) and np.all(np.diff(expected) <= 0)
    assert np.abs(sample - expected).max() / expected[0] < 0.03
    assert expected[0] <= sigma * (math.sqrt(max(rows, cols)) + math.sqrt(min(rows, cols)))


@pytest.mark.parametrize("d_in,d_out", [(32, 32), (32, 64), (64, 32), (256, 128)])
def test_fresh_linear_weights_look_like_init_and_trained_ones_do_not(d_in, d_out):
    torch.manual_seed(d_in + d_out)
    w = nn.Linear(d_in, d_out).weight.detach()
    check = T.spectrum_check("transformer_blocks.0.ffn.0.base.weight", w)
    assert check.looks_like_init and "looks like untrained initialisation" in check.verdict
    u, v = torch.randn(d_out, 1), torch.randn(1, d_in)
    spiked = w + 2 * check.edge * (u @ v) / (u.norm() * v.norm())  # one learned direction
    c2 = T.spectrum_check("x.base.weight", spiked)
    assert not c2.looks_like_init and c2.n_above_edge >= 1 and "above the random-init edge" in c2.verdict
    assert not T.spectrum_check("x.base.weight", 1.5 * w).looks_like_init
    gauss = torch.randn(d_out, d_in) / math.sqrt(3 * d_in)  # right std, wrong distribution: exceeds the bound
    assert not T.spectrum_check("x.base.weight", gauss).looks_like_init


def test_init_expectations_of_lora_and_positional_tensors():
    torch.manual_seed(0)
    lora = LoRA(48, 24, 8)
    assert T.spectrum_check("m.lora.lora_A", lora.lora_A.detach()).looks_like_init
    zero = T.spectrum_check("m.lora.lora_B", lora.lora_B.detach())
    assert zero.looks_like_init and "never trained" in zero.verdict
    trained = T.spectrum_check("m.lora.lora_B", torch.full((8, 24), 0.01))
    assert not trained.looks_like_init and "trained" in trained.verdict
    pos = nn.init.normal_(torch.empty(1, 128, 64), std=0.02)
    assert T.spectrum_check("pos_embedding", pos).looks_like_init
    assert T.spectrum_check("norm1.weight", torch.ones(8)) is None


def test_demo_base_weights_are_untrained_init_and_trained_tensors_are_not(tiny_demo_path):
    sd = load_checkpoint(tiny_demo_path).state_dict
    verdicts = {k: T.spectrum_check(k, v) for k, v in sd.items() if v.dim() >= 2}
    for k, c in verdicts.items():
        role = T.tensor_role(k)
        if role == "base":
            assert c.looks_like_init, (k, c.verdict)
        elif role in ("lora_A", "lora_B", "embedding", "head"):
            assert not c.looks_like_init, (k, c.verdict)


def test_tensor_detail():
    t = torch.randn(1, 40, 8)
    d = T.tensor_detail("pos_embedding", t)
    assert d.matrix.shape == (40, 8) and d.hist_counts.sum() == 320 and len(d.hist_edges) == 61
    assert d.spectrum is not None and len(d.spectrum.singular_values) == 8
    v = T.tensor_detail("norm1.bias", torch.tensor([1.0, float("nan"), 3.0]))
    assert v.matrix is None and v.spectrum is None and v.hist_counts.sum() == 2
    const = T.tensor_detail("x.weight", torch.zeros(4, 4))
    assert const.hist_counts.sum() == 16
    big = torch.randn(301, 77)
    small = T.tensor_detail("x.weight", big, max_cells=1000)
    assert small.matrix_step == 5 and small.matrix.shape == (61, 16)
    assert small.matrix[0, 0] == pytest.approx(big[:5, :5].mean().item(), abs=1e-6)
    assert small.matrix[-1, -1] == pytest.approx(big[300:, 75:].mean().item(), abs=1e-6)  # partial edge block


def test_state_dict_diff_and_grid():
    a = make_model(seed=1).state_dict()
    b = {k: v.clone() for k, v in a.items()}
    k = "transformer_blocks.1.ffn.0.lora.lora_B"
    b[k] = b[k] + 0.1
    b["transformer_blocks.0.norm1.weight"] = torch.ones(5)
    del b["action_head.bias"]
    b["extra"] = torch.zeros(2)
    a2 = dict(a, **{"transformer_blocks.0.norm2.bias": torch.zeros(16)})
    b["transformer_blocks.0.norm2.bias"] = torch.ones(16)
    diff = T.state_dict_diff(a2, b).set_index("name")
    assert diff.loc[k, "status"] == "changed"
    assert diff.loc[k, "rel_change"] == pytest.approx(float((b[k] - a[k]).norm() / a[k].norm()), rel=1e-6)
    assert diff.loc[k, "max_abs_change"] == pytest.approx(0.1, rel=1e-5)
    assert diff.loc["transformer_blocks.0.norm1.weight", "status"] == "reshaped"
    assert diff.loc["action_head.bias", "status"] == "removed" and diff.loc["extra", "status"] == "added"
    assert math.isinf(diff.loc["transformer_blocks.0.norm2.bias", "rel_change"])
    assert (diff["status"] == "same").sum() == len(a) - 4
    grid = T.diff_grid(diff.reset_index())
    assert list(grid.index) == [0, 1] and grid.loc[1, "ffn.0.lora_B"] == pytest.approx(diff.loc[k, "rel_change"])
    assert grid.loc[0, "q_proj.weight"] == 0.0 and "q_proj.lora_A" in grid.columns


def test_key_status_tree_counts_and_colours():
    table = layouts.diff_table({"a.x": (1,), "a.y": (2,), "b.z": (3,)}, {"a.x": (1,), "a.y": (3,), "c": (1,)})
    tree = T.key_status_tree(table).set_index("id")
    assert tree.loc["a/", "status"] == "mixed" and "1 matched, 1 mis-shaped" in tree.loc["a/", "label"]
    assert tree.loc["b.z", "status"] == "unexpected" and tree.loc["c", "status"] == "missing"
    assert tree.loc["keys", ["matched", "mis-shaped", "missing", "unexpected"]].tolist() == [1, 1, 1, 1]
