"""Known layouts, ranking, explanations, fixes, conversions and the `diff` / `convert` commands.

Broken files are built here by hand-written key rewrites (not by the library's own fixes), and repaired
files are checked against the original tensors and logits; stock exports are checked against stock
torch.nn.TransformerEncoderLayer modules.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO, full_layout_config, make_config, make_model, save_bytes
from torch import nn

from flag_model import build_model, layouts, load_checkpoint
from flag_model.__main__ import main
from flag_model.layouts import LAYOUTS, LayoutError, LayoutSize
from flag_model.model import expected_shapes

X = torch.randn(3, 7, 60, generator=torch.Generator().manual_seed(1))


def _logits(sd, **kw) -> torch.Tensor:
    with torch.no_grad():
        return build_model(sd, **kw)(X)


def _same_tensors(a, b) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------ layouts, ranking


@pytest.mark.parametrize(
    "cfg", [make_config(), make_config(targets=()), full_layout_config(768, 3072)], ids=["tiny", "no-lora", "d768"]
)
def test_native_layout_is_the_model_state_dict(cfg):
    size = LayoutSize.from_config(cfg)
    native = layouts.native_layout(size)
    assert list(native.items()) == list(expected_shapes(cfg).items())
    if cfg.d_model == 768:  # the documented original: 343 tensors, 87,955,971 parameters
        assert len(native) == 343
        assert sum(torch.Size(s).numel() for s in native.values()) == 87_955_971 == cfg.param_count()


@pytest.mark.parametrize("name", [n for n in LAYOUTS if n not in ("peft_llm", "mlp")])
@pytest.mark.parametrize(
    "size", [LayoutSize(2, 16, 32, 60, 3, 32, 4), LayoutSize(12, 768, 3072, 45, 3, 256, 16)], ids=["tiny", "d768"]
)
def test_ranking_picks_each_layout_and_sizes_are_recovered(name, size):
    keys = LAYOUTS[name].keys(size)
    ranking = layouts.rank_layouts(keys)
    top = ranking.iloc[0]
    assert top.layout == name and top.score == 1.0 and top.matched == len(keys)
    assert ranking.iloc[1].score < 0.6
    got = layouts.infer_sizes(keys)
    for attr in ("n_blocks", "d_model", "ffn_dim", "state_dim", "n_actions"):
        assert getattr(got, attr) == getattr(size, attr), attr
    if name in ("native", "peft", "sketch"):
        assert got.lora_rank == size.lora_rank
    if name != "ppo":  # PPO has no positional table
        assert got.max_length == size.max_length
    assert layouts.ranking_headline(ranking).startswith(f"This file is the {LAYOUTS[name].title} layout")


def test_ranking_through_the_checkpoint_loader():
    size = LayoutSize(2, 16, 32, 60, 3, 32, 0)
    cgdt = {k: torch.zeros(s) for k, s in LAYOUTS["cgdt_agent"].keys(size).items()}
    nested = {
        "dt": {k[3:]: v for k, v in cgdt.items() if k.startswith("dt.")},
        "critic": {k[7:]: v for k, v in cgdt.items() if k.startswith("critic.")},
        "epoch": 3,
    }
    ckpt = load_checkpoint(save_bytes(nested))
    assert ckpt.config is None
    assert layouts.rank_layouts(ckpt.state_dict).iloc[0].layout == "cgdt_agent"


# ------------------------------------------------------------------------------------------ key diff


def test_diff_keys_and_aligned_table():
    file = {"a.weight": (2, 3), "b.weight": (4,), "extra": (1,)}
    target = {"a.weight": (2, 3), "b.weight": (5,), "c.bias": (2,)}
    d = layouts.diff_keys(file, target)
    assert d.matched == ("a.weight",) and d.missing == ("c.bias",) and d.unexpected == ("extra",)
    assert d.mismatched == (("b.weight", (4,), (5,)),) and not d.ok
    assert d.counts() == {"matched": 1, "missing": 1, "unexpected": 1, "mis-shaped": 1}
    table = layouts.diff_table(file, target).set_index("key")
    assert table.loc["b.weight", "status"] == "mis-shaped"
    assert (table.loc["b.weight", "file_shape"], table.loc["b.weight", "target_shape"]) == ("[4]", "[5]")
    assert table.loc["c.bias", "file_shape"] == "" and table.loc["extra", "target_shape"] == ""
    assert layouts.diff_keys(target, target).ok


# ------------------------------------------------------------------------ broken files and their fixes


def _peft_by_hand(sd):
    """HF PEFT naming written out directly: base_layer, lora_A.default.weight [r, in], lora_B [out, r]."""
    out = {}
    for k, v in sd.items():
        k2 = "base_model.model." + k
        if k.endswith(".lora.lora_A") or k.endswith(".lora.lora_B"):
            out[re.sub(r"\.lora\.lora_([AB])$", r".lora_\1.default.weight", k2)] = v.T.clone()
        else:
            out[k2.replace(".base.", ".base_layer.")] = v
    return out


def _sketch_by_hand(sd):
    out = {}
    for k, v in sd.items():
        k = k.replace(".attention.", ".").replace(".base.", ".").replace(".lora.", ".")
        k = re.sub(r"\.norm1\.", ".ln1.", re.sub(r"\.norm2\.", ".ln2.", k))
        out[k.replace("output_norm.", "ln_f.")] = v
    return out


def _fused_by_hand(sd):
    """CGDT-like: `dt.` prefix, nn.MultiheadAttention in_proj, plain nn.Linear names, plus a critic."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"(transformer_blocks\.\d+\.attention\.)([qkv])_proj\.base\.(weight|bias)$", k)
        if m:
            if m.group(2) == "q":
                p, kind = m.group(1), m.group(3)
                out[f"dt.{p}in_proj_{kind}"] = torch.cat([sd[f"{p}{n}_proj.base.{kind}"] for n in "qkv"])
            continue
        out["dt." + k.replace(".base.", ".")] = v
    out["critic.q_net.0.weight"] = torch.randn(8, 63)
    return out


BROKEN = {
    "unknown prefix": (lambda sd: {"net." + k: v for k, v in sd.items()}, {}),
    "PEFT": (_peft_by_hand, {}),
    "sketch": (_sketch_by_hand, {}),
    "transposed LoRA": (lambda sd: {k: (v.T.clone() if "lora_" in k else v) for k, v in sd.items()}, {}),
    "no attention level": (lambda sd: {k.replace(".attention.", "."): v for k, v in sd.items()}, {}),
    "fused, dt prefix, critic": (_fused_by_hand, {"targets": ()}),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_each_fix_turns_a_broken_file_into_one_that_loads_strictly(case):
    breaker, kw = BROKEN[case]
    model = make_model(**kw)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    broken = breaker(sd)
    assert not layouts.strict_load(broken).ok
    target = expected_shapes(model.config)
    fixes = layouts.suggest_fixes(broken, target)
    assert fixes, "no fix found"
    notes = layouts.explain(broken, target)
    assert notes and all(e.message for e in notes)
    fixed = layouts.fix_for_target(broken, fixes, target, drop_extra=True)
    res = layouts.strict_load(fixed, num_heads=4)
    assert res.ok, res.message
    _same_tensors(fixed, sd)
    torch.testing.assert_close(_logits(fixed, num_heads=4), model(X), rtol=0, atol=0)


def test_fixes_never_change_the_input_dict(tiny_state_dict):
    broken = _peft_by_hand(tiny_state_dict)
    keys, first = list(broken), {k: v.clone() for k, v in broken.items()}
    layouts.apply_fixes(broken, ["strip_prefix:base_model.model.", "peft_to_native", "transpose_lora"])
    assert list(broken) == keys
    _same_tensors(broken, first)


def test_to_native_accepts_peft_with_adapter_names(tiny_state_dict):
    native, fixes = layouts.to_native(_peft_by_hand(tiny_state_dict))
    assert [f.id for f in fixes] == ["strip_prefix:base_model.model.", "peft_to_native"]
    _same_tensors(native, tiny_state_dict)


EXPECTED_RULES = {
    "unknown prefix": {"prefix"},
    "PEFT": {"prefix", "peft_orientation"},
    "sketch": {"attention_level", "base_level", "lora_level", "norm_naming"},
    "transposed LoRA": {"peft_orientation"},
    "no attention level": {"attention_level"},
    "fused, dt prefix, critic": {"prefix", "fused_qkv", "base_level"},
}


@pytest.mark.parametrize("case", list(EXPECTED_RULES))
def test_explanations_name_the_cause(case):
    breaker, kw = BROKEN[case]
    model = make_model(**kw)
    notes = layouts.explain(breaker(model.state_dict()), expected_shapes(model.config))
    assert EXPECTED_RULES[case] <= {e.rule for e in notes}


def test_explanations_for_size_layout_and_lora():
    small, big = LayoutSize(2, 16, 32, 60, 3, 32, 4), LayoutSize(2, 768, 3072, 60, 3, 32, 4)
    notes = layouts.explain(layouts.native_layout(small), layouts.native_layout(big))
    msgs = " ".join(e.message for e in notes if e.rule == "size")
    assert "Different hidden size: the file has 16" in msgs and "the target 768" in msgs
    a2c = LAYOUTS["a2c"].keys(LayoutSize(2, 16, 32, 60, 3, 32, 0))
    notes = layouts.explain(a2c, layouts.native_layout(small))
    assert {"layout", "fused_qkv", "no_lora"} <= {e.rule for e in notes}
    assert "Transformer-A2C" in next(e.message for e in notes if e.rule == "layout")
    assert layouts.explain(layouts.native_layout(small), layouts.native_layout(small)) == []


def test_fuse_refuses_lora_and_a_different_model_cannot_become_native(tiny_state_dict):
    with pytest.raises(LayoutError, match="merge LoRA first"):
        layouts.apply_fix(tiny_state_dict, "fuse_qkv")
    a2c = {k: torch.zeros(s) for k, s in LAYOUTS["a2c"].keys(LayoutSize(2, 16, 32, 60, 3, 32, 0)).items()}
    with pytest.raises(LayoutError, match="cannot convert to the native layout"):
        layouts.to_native(a2c)
    assert "cannot convert" in layouts.export_problem(a2c, "merged")
    assert layouts.export_problem(tiny_state_dict, "stock") is None


def test_renames_that_collide_and_shapes_that_say_nothing_are_errors():
    with pytest.raises(LayoutError, match="two tensors"):
        layouts.apply_fix({"a.x": torch.zeros(1), "x": torch.zeros(1)}, "strip_prefix:a.")
    with pytest.raises(LayoutError, match="hidden size"):
        layouts.infer_sizes({"foo": torch.zeros(3, 5)})


# ---------------------------------------------------------------------------------------- conversions


def test_native_peft_native_round_trip(tiny_state_dict):
    peft = layouts.apply_fixes(tiny_state_dict, ["native_to_peft", "add_prefix:base_model.model."])
    assert layouts.rank_layouts(peft).iloc[0].layout == "peft"
    a = peft["base_model.model.transformer_blocks.0.ffn.3.lora_A.weight"]
    assert tuple(a.shape) == (4, 32)  # PEFT [r, in] for ffn.3 (in = F = 32)
    back = layouts.apply_fixes(peft, ["strip_prefix:base_model.model.", "peft_to_native"])
    _same_tensors(back, tiny_state_dict)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_merged_export_gives_the_same_logits(fmt):
    model = make_model(seed=3, lora_scale=0.5)
    ref = model(X)
    data = layouts.export_file(model.state_dict(), "merged", fmt, lora_scale=0.5, num_heads=4)
    ckpt = load_checkpoint(data, name=f"merged.{fmt}")
    assert not any("lora" in k for k in ckpt.state_dict)
    assert set(ckpt.state_dict) == {k for k in model.state_dict() if ".lora." not in k}
    assert ckpt.config.lora_rank == 0 and ckpt.config.num_heads == 4
    merged = build_model(ckpt)
    assert all(m.lora is None for m in merged.linears().values())
    with torch.no_grad():
        torch.testing.assert_close(merged(X), ref, rtol=0, atol=1e-5)
    w = model.transformer_blocks[1].ffn[3]
    expected = w.base.weight + 0.5 * (w.lora.lora_A @ w.lora.lora_B).T  # direct formula W + scale·(A@B)ᵀ
    torch.testing.assert_close(ckpt.state_dict["transformer_blocks.1.ffn.3.base.weight"], expected, rtol=0, atol=1e-6)


class StockFlagTrader(nn.Module):
    """The oracle: stock torch modules only (TransformerEncoderLayer, post-norm, exact GELU, no dropout)."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.zeros(1, cfg.max_length, cfg.d_model))
        self.state_embedding = nn.Linear(cfg.state_dim, cfg.d_model)
        layer = nn.TransformerEncoderLayer(
            cfg.d_model, cfg.num_heads, cfg.ffn_dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=False
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.n_blocks, enable_nested_tensor=False)
        self.output_norm = nn.LayerNorm(cfg.d_model)
        self.action_head = nn.Linear(cfg.d_model, cfg.n_actions)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.state_embedding(x) + self.pos_embedding[:, : x.shape[1]]
        return self.action_head(self.output_norm(self.encoder(h)))


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_stock_export_loads_strictly_into_stock_modules(fmt):
    model = make_model(seed=5, lora_scale=2.0)
    data = layouts.export_file(model.state_dict(), "stock", fmt, lora_scale=2.0)
    sd = load_checkpoint(data).state_dict
    stock = StockFlagTrader(model.config).eval()
    stock.load_state_dict(sd, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(stock(X), model(X), rtol=0, atol=1e-5)
    assert layouts.rank_layouts(sd).iloc[0].layout == "stock"
    native, fixes = layouts.to_native(sd)  # and back: the merged native file
    assert [f.id for f in fixes] == ["stock_to_native"]
    _same_tensors(native, layouts.merge_lora(model.state_dict(), 2.0))


def test_native_export_keeps_lora_and_assumptions(tiny_model):
    data = layouts.export_file(tiny_model.state_dict(), "native", "pt", num_heads=2, norm_first=True)
    ckpt = load_checkpoint(data)
    _same_tensors(ckpt.state_dict, tiny_model.state_dict())
    assert (ckpt.config.num_heads, ckpt.config.norm_first) == (2, True)


def test_strict_load_on_shapes_and_on_tensors(tiny_state_dict):
    assert layouts.strict_load(layouts.meta_like(tiny_state_dict)).ok
    assert layouts.strict_load(tiny_state_dict).ok
    res = layouts.strict_load({k: v for k, v in tiny_state_dict.items() if k != "action_head.bias"})
    assert not res.ok and res.diff.missing == ("action_head.bias",)
    assert "No configuration" in layouts.strict_load({"x": torch.zeros(2)}).message


# ------------------------------------------------------------------------------------------------ CLI


@pytest.fixture
def files(tmp_path, tiny_ckpt_bytes, tiny_state_dict):
    good = tmp_path / "good.pt"
    good.write_bytes(tiny_ckpt_bytes)
    peft = tmp_path / "peft.pt"
    peft.write_bytes(save_bytes(_peft_by_hand(tiny_state_dict)))
    return good, peft


def test_cli_diff(files, capsys):
    good, peft = files
    assert main(["diff", str(good), "--against", "reconstruction"]) == 0
    out = capsys.readouterr().out
    assert "63/63 matched" in out and "loads strictly" in out and "FLAG-TRADER LoRA layout" in out
    assert main(["diff", str(peft), "--against", "reconstruction"]) == 1
    out = capsys.readouterr().out
    assert (
        "PEFT-wrapped FLAG-TRADER layout" in out
        and "suggested fixes" in out
        and "after the fixes: 63/63 matched" in out
    )
    assert main(["diff", str(good), "--against", str(peft), "--json"]) == 1
    rep = json.loads(capsys.readouterr().out)
    assert rep["counts"]["matched"] == 0 and rep["counts"]["missing"] == 63
    assert {e["rule"] for e in rep["explanations"]} >= {"prefix", "peft_orientation"}
    for target in layouts.TARGETS[2:]:
        assert main(["diff", str(good), "--against", target, "--json"]) == 1
        assert json.loads(capsys.readouterr().out)["target"] == target


def test_cli_convert(files, tmp_path, tiny_model, capsys):
    good, peft = files
    for kind in ("native", "merged", "stock"):
        for fmt in ("pt", "safetensors"):
            out = tmp_path / f"out-{kind}.{fmt}"
            assert main(["convert", str(peft), str(out), "--to", kind]) == 0
            assert "fixes applied" in capsys.readouterr().out
            sd = load_checkpoint(out).state_dict
            if kind == "stock":
                StockFlagTrader(tiny_model.config).load_state_dict(sd, strict=True)
            else:
                torch.testing.assert_close(_logits(sd, num_heads=4), tiny_model(X), rtol=0, atol=1e-5)


def test_cli_errors_are_one_line_without_traceback(files, tmp_path, capsys):
    good, _ = files
    bad = tmp_path / "a2c.pt"
    bad.write_bytes(
        save_bytes({k: torch.zeros(s) for k, s in LAYOUTS["a2c"].keys(LayoutSize(2, 16, 32, 60, 3, 32, 0)).items()})
    )
    for argv, says in (
        (["diff", str(good), "--against", "nonsense"], "neither a known target"),
        (["convert", str(bad), str(tmp_path / "x.pt"), "--to", "stock"], "cannot convert"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and says in err
    assert not (tmp_path / "x.pt").exists()
    proc = subprocess.run(
        [sys.executable, "-m", "flag_model", "diff", str(tmp_path / "missing.pt"), "--against", "reconstruction"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
