"""Safe loading: every saved-dict layout and prefix round-trips; every bad input is a clear CheckpointError."""

from __future__ import annotations

import io
import os
import pickle
import zipfile

import pytest
import torch
from conftest import full_layout_config, save_bytes
from safetensors.torch import save as st_save

from flag_model import CheckpointError, build_model, load_checkpoint
from flag_model.config import ConfigError, infer_config
from flag_model.model import expected_shapes


def _layouts(sd: dict) -> dict[str, object]:
    cfg = {"num_heads": 4, "lora_alpha": 4, "lora_rank": 4}
    return {
        "bare": sd,
        "model+config": {"model": sd, "config": cfg},
        "training": {
            "epoch": 7,
            "model_state_dict": sd,
            "optimizer_state_dict": {"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 1e-3}]},
            "train_loss": 0.8,
            "val_loss": 0.9,
            "val_accuracy": 0.6142,
            "config": cfg,
        },
        "state_dict+model_config": {"state_dict": sd, "model_config": cfg},
        "module. prefix": {f"module.{k}": v for k, v in sd.items()},
        "model. prefix": {"model_state_dict": {f"model.{k}": v for k, v in sd.items()}},
        "_orig_mod. prefix": {f"_orig_mod.{k}": v for k, v in sd.items()},
        "module.model. prefixes": {f"module.model.{k}": v for k, v in sd.items()},
    }


@pytest.mark.parametrize("layout", list(_layouts({})))
def test_saved_dict_layouts_round_trip(layout, tiny_state_dict, tmp_path):
    obj = _layouts(tiny_state_dict)[layout]
    path = tmp_path / "ckpt.pt"
    torch.save(obj, path)
    for src in (path, path.read_bytes(), io.BytesIO(path.read_bytes())):
        ckpt = load_checkpoint(src)
        assert set(ckpt.state_dict) == set(tiny_state_dict)
        for k, v in tiny_state_dict.items():
            assert torch.equal(ckpt.state_dict[k], v)
        assert ckpt.config is not None and ckpt.config.n_blocks == 2
        assert len(ckpt.digest) == 64
        build_model(ckpt)
    if layout == "training":
        assert ckpt.meta["epoch"] == 7 and ckpt.meta["val_accuracy"] == 0.6142
        assert "not loaded" in ckpt.meta["optimizer_state_dict"]
        assert ckpt.state_dict_key == "model_state_dict"
        assert ckpt.config.num_heads == 4 and "stored config" in ckpt.config.provenance["num_heads"]
    if "prefix" in layout:
        assert ckpt.prefixes_stripped and any("prefix" in w for w in ckpt.warnings)


def test_legacy_and_safetensors_formats(tiny_state_dict, tmp_path):
    legacy = tmp_path / "legacy.pth"
    torch.save({"model_state_dict": tiny_state_dict}, legacy, _use_new_zipfile_serialization=False)
    ckpt = load_checkpoint(legacy)
    assert ckpt.format == "torch legacy" and ckpt.n_tensors == len(tiny_state_dict)
    data = st_save(tiny_state_dict, metadata={"config": '{"num_heads": 2}'})
    for src in (data, tmp_path / "m.safetensors"):
        if not isinstance(src, bytes):
            src.write_bytes(data)
        ckpt = load_checkpoint(src)
        assert ckpt.format == "safetensors" and ckpt.config.num_heads == 2


def test_same_bytes_same_digest_and_path_is_memory_mapped(tiny_ckpt_bytes, tmp_path):
    path = tmp_path / "a.pt"
    path.write_bytes(tiny_ckpt_bytes)
    assert load_checkpoint(path).digest == load_checkpoint(tiny_ckpt_bytes).digest


def test_half_precision_and_nan_load_with_warnings(tiny_state_dict):
    sd = {k: v.half() for k, v in tiny_state_dict.items()}
    sd["action_head.bias"] = torch.tensor([float("nan"), 0.0, 1.0], dtype=torch.float16)
    ckpt = load_checkpoint(save_bytes(sd))
    text = " ".join(ckpt.warnings)
    assert "float16" in text and "NaN or Inf" in text
    model = build_model(ckpt)
    assert model.action_head.weight.dtype == torch.float32


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["zip", "legacy", "raw pickle"])
def test_malicious_pickle_is_refused_without_running(kind, tmp_path):
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = marker
    path = tmp_path / "evil.pt"
    if kind == "zip":
        torch.save({"model_state_dict": {"w": torch.ones(1)}, "x": payload}, path)
    elif kind == "legacy":
        torch.save({"x": payload}, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps({"x": payload}, protocol=2))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert not marker.exists()
    msg = str(err.value)
    assert "system" in msg and "not" in msg and "executed" in msg


def test_refused_class_is_named(tmp_path):
    path = tmp_path / "odict.pt"
    torch.save({"model": torch.nn.Linear(2, 2)}, path)  # a whole module: needs torch.nn classes
    with pytest.raises(CheckpointError, match=r"torch\.nn\.modules\.linear\.Linear"):
        load_checkpoint(path)


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda d: b"", "empty"),
        (_truncated, "damaged or truncated"),
        (lambda d: os.urandom(4096), "not a PyTorch or safetensors checkpoint"),
        (lambda d: b'{"model": "flag_trader", "epoch": 3}', "JSON file"),
        (lambda d: b"epoch,loss\n1,0.5\n", "text file"),
        (lambda d: save_bytes({"epoch": 3, "note": "no weights"}), "holds no tensors"),
        (lambda d: save_bytes([1, 2, 3]), "not a dict of tensors"),
        (lambda d: st_save({"a": torch.ones(4)})[:40], "damaged or truncated"),
    ],
)
def test_bad_inputs_give_clear_errors(make, needle, tiny_ckpt_bytes):
    with pytest.raises(CheckpointError, match=needle):
        load_checkpoint(make(tiny_ckpt_bytes))


def test_zip_with_a_missing_member(tiny_ckpt_bytes):
    src = zipfile.ZipFile(io.BytesIO(tiny_ckpt_bytes))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist()[:-3]:
            dst.writestr(info, src.read(info))
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(out.getvalue())


def test_missing_path_and_folder(tmp_path):
    with pytest.raises(CheckpointError, match="(?i)no such file"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="is a folder"):
        load_checkpoint(tmp_path)


def test_other_layout_loads_but_has_no_config(tiny_state_dict):
    a2c = {"encoder.input_proj.0.weight": torch.zeros(8, 60), "actor.network.0.weight": torch.zeros(3, 8)}
    ckpt = load_checkpoint(save_bytes(a2c))
    assert ckpt.config is None and "state_embedding.weight" in ckpt.config_error
    with pytest.raises(ConfigError):
        build_model(ckpt)


def _expanded(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Tensors of the right shapes backed by one element each: a d=768 file in a few kilobytes."""
    return {k: torch.full((1,), 0.01).expand(s) for k, s in shapes.items()}


@pytest.mark.parametrize("d, f, params", [(256, 1024, 10_444_291), (768, 3072, 87_955_971)])
def test_config_inferred_from_shapes(d, f, params):
    sd = _expanded(expected_shapes(full_layout_config(d, f)))
    cfg, warnings = infer_config(sd, {"n_heads": 16})
    assert (cfg.n_blocks, cfg.d_model, cfg.ffn_dim, cfg.lora_rank) == (12, d, f, 16)
    assert (cfg.state_dim, cfg.n_actions, cfg.max_length, len(cfg.lora_targets)) == (60, 3, 256, 72)
    assert cfg.num_heads == 16 and cfg.provenance["num_heads"] == "assumption: stored config['n_heads']"
    assert cfg.param_count() == params and not warnings
    default, _ = infer_config(sd)
    assert default.num_heads == 8 and "default" in default.provenance["num_heads"]
    assert default.lora_scale == 1.0 and not default.norm_first and not default.causal


def test_stored_config_that_contradicts_shapes_is_a_warning(tiny_state_dict):
    cfg, warnings = infer_config(tiny_state_dict, {"d_model": 768, "num_heads": 5, "lora_alpha": 8})
    assert cfg.d_model == 16 and cfg.lora_scale == 2.0
    assert cfg.num_heads == 8 and any("768" in w for w in warnings) and any("rejected" in w for w in warnings)
