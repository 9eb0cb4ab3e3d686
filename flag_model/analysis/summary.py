"""What a checkpoint is: format, metadata, configuration with provenance, counts — for the Overview and `inspect`."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import pandas as pd

from ..checkpoint import Checkpoint
from ..config import SHORT_NAMES, ModelConfig
from ..layouts import recognise_checkpoint
from ..model import expected_shapes, find_mismatch
from .health import dtype_counts, findings_frame, health_scan, parameter_counts

_SHAPE_FIELDS = ("n_blocks", "d_model", "ffn_dim", "state_dim", "n_actions", "max_length", "lora_rank")


def config_table(cfg: ModelConfig) -> pd.DataFrame:
    """One row per field: value, whether inferred from the weights or assumed, and where it came from."""
    rows = []
    for name in (*_SHAPE_FIELDS, "lora_targets", *ModelConfig.ASSUMPTIONS):
        value = getattr(cfg, name)
        if name == "lora_targets":
            value = lora_targets_text(value, cfg.n_blocks)
        prov = cfg.provenance.get(name, "")
        kind = "assumption" if name in ModelConfig.ASSUMPTIONS else "inferred"
        rows.append({"field": name, "value": str(value), "kind": kind, "source": prov.removeprefix("assumption: ")})
    return pd.DataFrame(rows)


def assumptions_line(file_config: ModelConfig, current: ModelConfig) -> str:
    """The assumptions in use, each marked with where its value comes from, for the load status:
    "8 heads (assumed) · post-norm (assumed) · no mask (assumed) · LoRA scale 1 (assumed)". A value the user
    changed from the file's default is marked "(set)", one read from the stored training config "(stored)"."""
    words = {
        "num_heads": f"{current.num_heads} heads",
        "norm_first": "pre-norm" if current.norm_first else "post-norm",
        "causal": "causal mask" if current.causal else "no mask",
        "lora_scale": f"LoRA scale {current.lora_scale:g}",
    }
    parts = []
    for name in ("num_heads", "norm_first", "causal", "lora_scale"):
        if getattr(current, name) != getattr(file_config, name):
            mark = "set"
        elif "stored config" in file_config.provenance.get(name, ""):
            mark = "stored"
        else:
            mark = "assumed"
        parts.append(f"{words[name]} ({mark})")
    return " · ".join(parts)


def lora_targets_text(targets: tuple[str, ...], n_blocks: int) -> str:
    """Which projections carry LoRA, in words: "q, k, v, out, ffn.0, ffn.3 in all 12 blocks (72 adapters)";
    blocks are named when the projections differ between them."""
    if not targets:
        return "none (no LoRA adapters)"
    by_block: dict[int, list[str]] = {}
    for t in targets:
        _, index, module = t.split(".", 2)
        by_block.setdefault(int(index), []).append(SHORT_NAMES.get(module, module))
    order = list(SHORT_NAMES.values())
    groups: dict[tuple[str, ...], list[int]] = {}
    for block, mods in sorted(by_block.items()):
        groups.setdefault(tuple(sorted(mods, key=lambda m: order.index(m) if m in order else len(order))), []).append(
            block
        )
    parts = []
    for names, blocks in groups.items():
        where = (
            f"all {n_blocks} blocks"
            if len(blocks) == n_blocks
            else f"block{'s' if len(blocks) > 1 else ''} {', '.join(map(str, blocks))}"
        )
        parts.append(f"{', '.join(names)} in {where}")
    return "; ".join(parts) + f" ({len(targets)} adapters)"


def file_table(ckpt: Checkpoint) -> pd.DataFrame:
    """Format facts of the file as (property, value) rows."""
    rows = {
        "source": ckpt.source,
        "format": ckpt.format,
        "size": f"{ckpt.size_bytes / 2**20:.1f} MiB ({ckpt.size_bytes:,} bytes)",
        "wrapper keys": ", ".join(ckpt.wrapper_keys) or "(bare state dict)",
        "weights under": ckpt.state_dict_key or "(top level)",
        "prefixes removed": ", ".join(ckpt.prefixes_stripped) or "none",
        "tensors": f"{ckpt.n_tensors:,}",
        "parameters": f"{ckpt.n_params:,}",
        "sha256": ckpt.digest,
    }
    return pd.DataFrame({"property": list(rows), "value": list(rows.values())})


def metadata_table(ckpt: Checkpoint) -> pd.DataFrame:
    """Scalar metadata (epoch, losses, accuracy, ...) as rows; long lists are summarised."""
    rows = []
    for k, v in ckpt.meta.items():
        if isinstance(v, list) and len(v) > 8:
            v = f"list of {len(v)} values"
        elif isinstance(v, dict):
            v = ", ".join(f"{a}={b}" for a, b in list(v.items())[:12])
        rows.append({"key": k, "value": str(v)})
    return pd.DataFrame(rows, columns=["key", "value"])


def foreign_table(ckpt: Checkpoint) -> pd.DataFrame:
    """Objects of foreign classes the restricted reader turned into inert records: where, class, stored fields."""
    rows = []
    for where, cls in ckpt.foreign_objects.items():
        value: Any = ckpt.meta
        for part in where.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        fields = (
            ", ".join(f"{k}={v}" for k, v in value.items() if k != "__class__")
            if isinstance(value, dict)
            else ("" if value is None else str(value))
        )
        rows.append({"where": where, "class": cls, "read as": fields[:300]})
    return pd.DataFrame(rows, columns=["where", "class", "read as"])


def inspect_dict(ckpt: Checkpoint) -> dict[str, Any]:
    """Everything `python -m flag_model inspect --json` prints; plain JSON values only."""
    counts = parameter_counts(ckpt.state_dict)
    rec = recognise_checkpoint(ckpt)
    out: dict[str, Any] = {
        "source": ckpt.source,
        "format": ckpt.format,
        "size_bytes": ckpt.size_bytes,
        "sha256": ckpt.digest,
        "wrapper_keys": list(ckpt.wrapper_keys),
        "state_dict_key": ckpt.state_dict_key,
        "prefixes_stripped": list(ckpt.prefixes_stripped),
        "tensors": ckpt.n_tensors,
        "parameters": {g: int(counts.loc[g, "parameters"]) for g in counts.index},
        "dtypes": {k: int(v) for k, v in dtype_counts(ckpt.state_dict)["tensors"].items()},
        "metadata": {r.key: r.value for r in metadata_table(ckpt).itertuples()},
        "warnings": list(ckpt.warnings),
        "read_mode": ckpt.read_mode,
        "foreign_objects": dict(ckpt.foreign_objects),
        "family": rec.to_dict(),
        "health": findings_frame(health_scan(ckpt.state_dict)).drop(columns="examples").to_dict("records"),
    }
    if ckpt.config is None or rec.confident and rec.best.family.name != "native":
        out["fits"] = False
        out["config_error"] = ckpt.config_error or (
            f"this is a {rec.best.family.title} file, not FLAG-TRADER's own layout; it converts to "
            f"{rec.best.family.converts_to} (see `diff --against reconstruction`)."
        )
        return out
    cfg = ckpt.config
    mismatch = find_mismatch(expected_shapes(cfg), ckpt.state_dict)
    out["fits"] = mismatch is None
    if mismatch is not None:
        out["config_error"] = str(mismatch)
    out["config"] = {k: v for k, v in asdict(cfg).items() if k not in ("provenance", "lora_targets")}
    out["config"]["lora_targets"] = len(cfg.lora_targets)
    out["provenance"] = dict(cfg.provenance)
    out["assumptions"] = {k: getattr(cfg, k) for k in ModelConfig.ASSUMPTIONS}
    return out
