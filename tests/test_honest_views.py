"""Words and figures that must not mislead: ordinals, LoRA flags on dead/NaN adapters, NaN counts, LoRA targets,
the prefix explanation, the per-tensor diff colours and complete error messages."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_model, save_bytes

from flag_model import layouts
from flag_model.analysis import lora
from flag_model.analysis.health import health_scan
from flag_model.analysis.summary import config_table, lora_targets_text
from flag_model.checkpoint import CheckpointError, load_checkpoint
from flag_model.config import BLOCK_LINEARS
from flag_model.plots import change_heatmap, lora_heatmap, ordinal


def test_ordinals():
    assert [ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 23, 101, 112)] == [
        "1st",
        "2nd",
        "3rd",
        "4th",
        "11th",
        "12th",
        "13th",
        "21st",
        "22nd",
        "23rd",
        "101st",
        "112th",
    ]


def test_dead_and_nan_adapters_are_flagged_for_what_they_are():
    model = make_model(seed=2)
    lins = model.linears()
    with torch.no_grad():
        for lin in lins.values():
            lin.lora.lora_B.zero_()  # every adapter dead
        lins["transformer_blocks.0.ffn.0"].base.weight[0, 0] = float("nan")
    m = lora.adapter_metrics(model)
    nan_row = m.set_index("path").loc["transformer_blocks.0.ffn.0"]
    assert bool(nan_row["bad_base"]) and not bool(nan_row["dominating"]) and np.isnan(nan_row["rel_norm"])
    assert "ΔW dominates W" not in nan_row["flags"] and "NaN" in nan_row["flags"]
    assert m["dead"].all() and not m["dominating"].any()  # B = 0 is dead whatever W holds
    lines = lora.flag_summary(m)
    assert len(lines) == 2  # one line per kind of flag, not one per adapter
    assert lines[0].startswith("base weight has NaN/Inf: 1 of 12 adapters")
    assert lines[1].startswith("dead (B ≈ 0): all 12 adapters")
    fig = lora_heatmap(lora.metric_grid(m, "rel_norm"), m, "rel", lora.METRICS, log=True)
    grey, symbols = fig.data[0], fig.data[-1]
    assert np.isfinite(np.asarray(grey.z, float)).sum() == len(m)  # every cell without a colour is grey
    assert len(fig.data) == 2  # nothing finite to colour: no colour bar of arbitrary range
    dark = [c for c, t in zip(symbols.textfont.color, symbols.text) if "✕" in t]
    assert dark and set(dark) == {"#1f2a36"}  # visible on the grey cell
    assert "?" in symbols.text[list(m["path"]).index("transformer_blocks.0.ffn.0")]


def test_nan_counts_and_lora_targets_in_words():
    sd = make_model().state_dict()
    sd["transformer_blocks.0.ffn.0.base.weight"][:2, :3] = float("nan")
    sd["action_head.bias"][0] = float("inf")
    finding = health_scan(sd)[0]
    assert finding.message == "2 tensors contain non-finite values: 6 NaN and 1 Inf of their 515 elements."
    targets = tuple(f"transformer_blocks.{b}.{m}" for b in range(12) for m in BLOCK_LINEARS)
    assert lora_targets_text(targets, 12) == "q, k, v, out, ffn.0, ffn.3 in all 12 blocks (72 adapters)"
    assert (
        lora_targets_text(("transformer_blocks.1.ffn.3", "transformer_blocks.0.attention.v_proj"), 2)
        == "v in block 0; ffn.3 in block 1 (2 adapters)"
    )
    table = config_table(make_model().config)
    assert {"norm_first", "causal", "lora_targets"} <= set(table["field"])


def test_prefix_explanation_counts_every_key_that_carries_it():
    sd = {f"base_model.model.{k}": v for k, v in make_model().state_dict().items()}
    target = layouts.shapes_of(make_model().state_dict())
    del target["action_head.bias"]  # only some prefixed keys match once stripped
    note = next(e for e in layouts.explain(sd, target) if e.rule == "prefix")
    assert note.message.startswith(f"all {len(sd)} file keys carry the prefix 'base_model.model.'")
    assert f"{len(sd) - 1} of them match" in note.message


def test_diff_colours_infinite_and_identical_distinctly():
    grid = pd.DataFrame([[0.0, 0.98], [np.inf, 0.01]], index=[0, 1], columns=["q", "k"])
    fig = change_heatmap(grid)
    special, scale = fig.data
    assert np.asarray(special.z, float)[1, 0] == 1.0 and special.text[1][0] == "∞"  # red, not the top colour
    assert np.isnan(np.asarray(scale.z, float)[1, 0]) and np.isnan(np.asarray(scale.z, float)[0, 0])
    same = change_heatmap(pd.DataFrame([[0.0, 0.0]], index=[0], columns=["q", "k"]))
    assert len(same.data) == 1 and not same.data[0].showscale  # no arbitrary colour bar
    assert "identical" in same.layout.annotations[0].text


def test_truncated_file_message_is_complete_sentences():
    data = save_bytes({"model_state_dict": make_model().state_dict()})
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(data[:1000], name="cut.pt")
    inner = str(err.value).split("(", 1)[1].rsplit(")", 1)[0]
    assert not inner.endswith(("is", "file", "the")) and (inner.endswith(("error", "…")) or len(inner) < 200)
    assert str(err.value).endswith("re-save it.")


def test_the_status_names_each_assumption_and_who_set_it():
    from flag_model.analysis.summary import assumptions_line

    cfg = make_model().config  # no stored config: everything assumed
    assert (
        assumptions_line(cfg, cfg)
        == "4 heads (assumed) · post-norm (assumed) · no mask (assumed) · LoRA scale 1 (assumed)"
    )
    changed = cfg.with_assumptions(num_heads=2, causal=True)
    assert (
        assumptions_line(cfg, changed)
        == "2 heads (set) · post-norm (assumed) · causal mask (set) · LoRA scale 1 (assumed)"
    )
    stored = load_checkpoint(
        save_bytes({"model_state_dict": make_model().state_dict(), "config": {"num_heads": 4, "norm_first": True}})
    ).config
    assert assumptions_line(stored, stored).startswith("4 heads (stored) · pre-norm (stored) · no mask (assumed)")
