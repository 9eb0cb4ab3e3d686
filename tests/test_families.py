"""Every layout family, written by our own generators at two or more sizes (tests/family_generators.py), opened
through load_checkpoint like a user's file: ranked first as its true family, with the right sizes and LoRA rank,
the same answer in `inspect` and `diff`; dataclass / Namespace / numpy objects read without calling anything."""

from __future__ import annotations

import json
import re
from pathlib import Path

import family_generators as gen
import pytest

from flag_model import layouts, load_checkpoint
from flag_model.__main__ import main

CASES = {
    "a2c 44→256, 4 layers": lambda: gen.make_a2c(44, 256, 8, 4, 100),
    "a2c 30→48, 2 layers, dataclass config": lambda: gen.make_a2c(30, 48, 4, 2, 20, dataclass_config=True),
    "a2c 12→96, 6 layers": lambda: gen.make_a2c(12, 96, 6, 6, 40),
    "ppo 49→64, 3 layers": lambda: gen.make_ppo(49, 64, 4, 3, 100),
    "ppo bare 20→32, 1 layer": lambda: gen.make_ppo(20, 32, 2, 1, 16, bare=True),
    "ppo 7→128, 5 layers": lambda: gen.make_ppo(7, 128, 8, 5, 50),
    "cgdt agent 60→64, 6 layers": lambda: gen.make_cgdt_agent(60, 64, 8, 6, 64),
    "cgdt agent 33→32, 2 layers, Namespace config": lambda: gen.make_cgdt_agent(33, 32, 4, 2, 10, namespace=True),
    "cgdt engine 60→64, 3 layers, dataclass config": lambda: gen.make_cgdt_engine(60, 64, 8, 3, 20),
    "cgdt engine 17→32, 1 layer": lambda: gen.make_cgdt_engine(17, 32, 2, 1, 8),
    "sketch 60→32, 3 blocks, r 4": lambda: gen.make_sketch(60, 32, 3, 4),
    "sketch 45→64, 12 blocks, r 16": lambda: gen.make_sketch(45, 64, 12, 16),
    "native 2 blocks d 16 r 4": lambda: gen.make_native(2, 16, 4),
    "native 5 blocks d 32 r 8, bare": lambda: gen.make_native(5, 32, 8, wrapper="bare"),
    "peft-wrapped native 2 blocks r 4": lambda: gen.make_peft_native(2, 16, 4),
    "peft-wrapped native 4 blocks r 2": lambda: gen.make_peft_native(4, 24, 2),
    "stock export 60→32, 2 layers": lambda: gen.make_stock(60, 32, 2),
    "stock export 10→16, 4 layers": lambda: gen.make_stock(10, 16, 4),
    "fallback MLP 60→256": lambda: gen.make_mlp(60, 256),
    "fallback MLP 13→32": lambda: gen.make_mlp(13, 32),
    "PEFT fallback 60→576, dataclass config": lambda: gen.make_mlp(60, 576, peft=True),
    "PEFT fallback 20→64": lambda: gen.make_mlp(20, 64, peft=True),
}
SIZE_FIELDS = ("n_blocks", "d_model", "ffn_dim", "state_dim", "n_actions", "lora_rank")


@pytest.mark.parametrize("case", list(CASES))
def test_each_family_is_ranked_first_with_its_sizes(case, tmp_path):
    name, data, facts = CASES[case]()
    path = tmp_path / name
    path.write_bytes(data)
    ckpt = load_checkpoint(path)
    rec = layouts.recognise_checkpoint(ckpt)
    best = rec.best
    assert best.family.name == facts["family"], rec.headline()
    assert best.score >= 0.99 and rec.confident, rec.headline()
    assert rec.matches[1].score < best.score
    for f in SIZE_FIELDS:
        if f in facts:
            assert getattr(best.size, f) == facts[f], (f, best.size.summary())
    if facts.get("heads"):
        assert best.size.num_heads == facts["heads"]
    if "dataclass" in case or "Namespace" in case:
        assert ckpt.read_mode == "restricted" and ckpt.foreign_objects
        assert any("restricted mode" in w for w in ckpt.warnings)
    if facts["family"] == "native":
        assert ckpt.config is not None and ckpt.read_mode == "weights_only"


@pytest.mark.parametrize(
    "layers, hidden, kv, rank, targets",
    [
        (30, 576, 192, 16, ("q_proj", "v_proj")),
        (4, 64, 32, 8, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
        (7, 96, 96, 2, ("o_proj",)),
    ],
)
@pytest.mark.parametrize("open_as", ["folder", "parent folder", "adapter_config.json", "adapter_model.safetensors"])
def test_peft_llm_adapter_folder_with_its_config(layers, hidden, kv, rank, targets, open_as, tmp_path, capsys):
    _, write, facts = gen.make_peft_llm(layers, hidden, kv, rank, targets, alpha=32, rslora=True)
    lora = write(tmp_path)
    path = {"folder": lora, "parent folder": tmp_path}.get(open_as, lora / open_as)
    ckpt = load_checkpoint(path)
    assert ckpt.adapter_config["r"] == rank and ckpt.adapter_config["use_rslora"] is True
    rec = layouts.recognise_checkpoint(ckpt)
    assert rec.best.family.name == "peft_llm" and rec.confident
    assert rec.best.lora_rank == rank and rec.best.lora_targets() == facts["targets"]
    assert (rec.best.size.n_blocks, rec.best.size.d_model) == (layers, hidden)
    scale, how = layouts.lora_scale_for(rec)
    assert scale == pytest.approx(32 / rank**0.5) and "rsLoRA" in how
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"]["family"] == "peft_llm" and info["family"]["lora_rank"] == rank
    assert info["family"]["adapter_config"]["base_model_name_or_path"].endswith("SmolLM2-135M-Instruct")
    assert main(["diff", str(path), "--against", "reconstruction", "--json"]) == 1
    rep = json.loads(capsys.readouterr().out)
    assert rep["family"]["family"] == "peft_llm" and rep["suggested_fixes"] == [] and rep["no_fixes_because"]
    heads = load_checkpoint(tmp_path / "heads.pt")  # its config is a dataclass instance
    assert heads.read_mode == "restricted" and heads.meta["config"]["lora_r"] == rank
    assert layouts.recognise_checkpoint(heads).best.family.name == "mlp"


@pytest.mark.parametrize(
    "case",
    [
        "a2c 44→256, 4 layers",
        "cgdt agent 60→64, 6 layers",
        "cgdt engine 60→64, 3 layers, dataclass config",
        "ppo 49→64, 3 layers",
        "fallback MLP 60→256",
    ],
)
def test_inspect_and_diff_agree_and_foreign_files_get_no_fix_chain(case, tmp_path, capsys):
    name, data, facts = CASES[case]()
    path = tmp_path / name
    path.write_bytes(data)
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert main(["diff", str(path), "--against", "reconstruction", "--json"]) == 1
    rep = json.loads(capsys.readouterr().out)
    assert info["family"] == rep["family"] and rep["family"]["family"] == facts["family"]
    assert rep["suggested_fixes"] == [] and "different model" in rep["no_fixes_because"]
    assert any(e["rule"] == "layout" for e in rep["explanations"])
    assert main(["diff", str(path), "--against", facts["family"]]) == 0  # its own family at its own sizes
    assert "loads strictly" in capsys.readouterr().out
    assert main(["convert", str(path), str(tmp_path / "out.pt"), "--to", "native"]) == 2
    assert "cannot convert" in capsys.readouterr().err


def test_mlp_is_called_an_mlp_not_a_transformer(tmp_path, capsys):
    name, data, _ = gen.make_mlp(60, 256)
    (tmp_path / name).write_bytes(data)
    assert main(["inspect", str(tmp_path / name)]) == 0
    out = capsys.readouterr().out
    assert "MLP policy" in out and "not a transformer" in out and "cannot tell the hidden size" not in out


def test_unknown_file_names_the_closest_family_and_unexplained_groups():
    import torch

    sd = {f"encoder.layer.{i}.conv.weight": torch.zeros(8, 8, 3) for i in range(4)} | {"head.weight": torch.zeros(3, 8)}
    rec = layouts.recognise(sd)
    assert not rec.confident
    assert rec.headline().startswith("This file matches no known layout well")
    assert "encoder.layer.0" in rec.headline() or "encoder.layer" in rec.headline()


def test_shared_real_layouts_are_recognised():
    """The real instances listed entry by entry in ../shared/layouts (skipped when absent)."""
    root = Path(__file__).resolve().parents[2] / "shared" / "layouts"
    if not root.is_dir():
        pytest.skip(f"{root} not found (it lives beside the repository)")
    want = {
        "cgdt_agent": "cgdt_agent",
        "cgdt_engine": "cgdt_engine",
        "fallback_mlp": "mlp",
        "peft_fallback": "mlp",
        "peft_smollm2_adapter": "peft_llm",
        "ppo_policy": "ppo",
        "ppo_policy_bare": "ppo",
        "sketch": "sketch",
        "transformer_a2c": "a2c",
    }
    for f in sorted(root.glob("*.txt")):
        shapes = {
            m.group(1): tuple(int(x) for x in m.group(2).split(",") if x.strip())
            for line in f.read_text().splitlines()
            if (m := re.match(r"^(\S+)\s+\[([\d, ]*)\]\s+\w+$", line))
        }
        for wrapper in ("model_state_dict.", "model."):
            if all(k.startswith(wrapper) or k.startswith(("optimizer", "actor_opt", "critic_opt")) for k in shapes):
                shapes = {k[len(wrapper) :]: s for k, s in shapes.items() if k.startswith(wrapper)}
        rec = layouts.recognise(shapes)
        assert rec.best.family.name == want[f.stem] and rec.confident, (f.name, rec.headline())
        if f.stem in ("sketch", "peft_smollm2_adapter"):
            assert rec.best.lora_rank == 16


def test_sketch_converts_to_native_pre_norm_and_diff_agrees_with_convert(tmp_path, capsys):
    name, data, _ = gen.make_sketch(60, 32, 3, 4)
    path = tmp_path / name
    path.write_bytes(data)
    assert main(["inspect", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["family"]["lora_rank"] == 4
    assert main(["diff", str(path), "--against", "reconstruction", "--json"]) == 1
    rep = json.loads(capsys.readouterr().out)
    assert "LoRA rank 4 on 18 modules" in rep["target_description"] and "pre-norm" in rep["target_description"]
    assert rep["after_fixes"]["matched"] == rep["n_target"] == 3 * 28 + 7
    assert "norm_placement" in {e["rule"] for e in rep["explanations"]}
    out = tmp_path / "native.pt"
    assert main(["convert", str(path), str(out), "--to", "native"]) == 0
    assert "pre-norm" in capsys.readouterr().out
    ckpt = load_checkpoint(out)
    assert ckpt.config.norm_first is True and ckpt.config.lora_scale == 1.0 and ckpt.config.lora_rank == 4
    assert ckpt.stored_config["norm_first"] is True
    sketch = load_checkpoint(path).state_dict
    assert set(ckpt.state_dict) == set(layouts.native_layout(layouts.infer_sizes(sketch)))
    a = ckpt.state_dict["transformer_blocks.2.attention.q_proj.lora.lora_A"]
    assert a.equal(sketch["transformer_blocks.2.q_proj.lora_A"])


def test_stock_export_stores_what_a_rebuild_needs_and_reloads_exactly(tmp_path):
    import torch
    from conftest import make_model
    from torch import nn

    model = make_model(seed=2, lora_scale=0.5, norm_first=True)
    data = layouts.export_file(model.state_dict(), "stock", "pt", lora_scale=0.5, num_heads=4, norm_first=True)
    ckpt = load_checkpoint(data)
    c = ckpt.stored_config
    assert (c["activation"], c["norm_first"], c["batch_first"], c["layer_norm_eps"], c["nhead"]) == (
        "gelu",
        True,
        True,
        1e-5,
        4,
    )
    # Rebuilt from the stored values alone with stock modules (an independent oracle), the logits are the same;
    # with nn.TransformerEncoderLayer's defaults (ReLU, post-norm) they are not.
    layer = nn.TransformerEncoderLayer(
        c["d_model"],
        c["nhead"],
        c["dim_feedforward"],
        dropout=0.0,
        activation=c["activation"],
        layer_norm_eps=c["layer_norm_eps"],
        batch_first=c["batch_first"],
        norm_first=c["norm_first"],
    )
    encoder = nn.TransformerEncoder(layer, c["n_blocks"], enable_nested_tensor=False)
    sd = ckpt.state_dict
    enc_sd = {k[len("encoder.") :]: v for k, v in sd.items() if k.startswith("encoder.")}
    encoder.load_state_dict(enc_sd, strict=True)
    x = torch.randn(2, 5, 60)
    with torch.no_grad():
        h = (
            torch.nn.functional.linear(x, sd["state_embedding.weight"], sd["state_embedding.bias"])
            + sd["pos_embedding"][:, :5]
        )
        h = torch.nn.functional.layer_norm(
            encoder.eval()(h), (c["d_model"],), sd["output_norm.weight"], sd["output_norm.bias"]
        )
        logits = torch.nn.functional.linear(h, sd["action_head.weight"], sd["action_head.bias"])
        torch.testing.assert_close(logits, model(x), rtol=0, atol=1e-5)
    check = layouts.stock_reload_check(model.state_dict(), None, lora_scale=0.5, num_heads=4, norm_first=True)
    assert check.max_abs_logit_diff < 1e-5 and check.loaded_strictly
    ns: dict = {}
    snippet = layouts.stock_snippet(str(tmp_path / "m.pt"))
    (tmp_path / "m.pt").write_bytes(data)
    exec(compile(snippet, "snippet", "exec"), ns)  # noqa: S102 - our own generated snippet, run as a user would
    with torch.no_grad():
        torch.testing.assert_close(ns["model"](x), model(x), rtol=0, atol=1e-5)
