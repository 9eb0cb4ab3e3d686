"""Strict load, conversion to the native layout, LoRA merge, exports (native / merged / stock PyTorch) and the
targets a file is compared against."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..config import BLOCK_LINEARS, ConfigError, ModelConfig, fallback_heads, infer_config
from ..model import FlagTrader, expected_shapes
from .diff import KeyDiff, diff_keys
from .families import FAMILIES, LayoutSize
from .families import native as native_family
from .families.stock import expected as stock_expected
from .fixes import Fix, _native_to_stock, apply_fixes, merge_lora, suggest_fixes
from .keys import LayoutError, Shape, meta_like
from .recognize import CLOSE, GOOD, Recognition, recognise


@dataclass(frozen=True)
class StrictLoad:
    """Result of loading a state dict strictly into FlagTrader(config inferred from it)."""

    ok: bool
    message: str
    config: ModelConfig | None
    diff: KeyDiff | None


def strict_load(
    sd: Mapping[str, torch.Tensor], stored: Mapping[str, Any] | None = None, **assumptions: Any
) -> StrictLoad:
    """Infer the config from `sd`, build FlagTrader on the meta device and load `sd` with strict=True.

    Nothing is allocated: `assign=True` lets the model borrow the given tensors, and it is discarded.
    """
    try:
        cfg = infer_config(sd, stored)[0].with_assumptions(**assumptions)
    except ConfigError as exc:
        return StrictLoad(False, f"No configuration can be inferred: {exc}", None, None)
    with torch.device("meta"):
        model = FlagTrader(cfg)
    diff = diff_keys(sd, model.state_dict())
    if not diff.ok:
        return StrictLoad(False, f"Does not load strictly: {diff.summary()}.", cfg, diff)
    if any(t.device.type != "meta" for t in sd.values()):
        try:
            model.load_state_dict(dict(sd), strict=True, assign=True)
        except RuntimeError as exc:
            return StrictLoad(False, f"torch refused the strict load: {str(exc).splitlines()[0]}", cfg, diff)
    return StrictLoad(
        True,
        f"{len(sd)}/{len(sd)} tensors load strictly into FlagTrader "
        f"({cfg.n_blocks} blocks, d={cfg.d_model}, LoRA rank {cfg.lora_rank}).",
        cfg,
        diff,
    )


EXPORT_KINDS = ("native", "merged", "stock")
EXPORT_FORMATS = ("pt", "safetensors")


# Assumptions a family's own code fixes, applied when it is converted (the keys cannot tell them).
FAMILY_ASSUMPTIONS: dict[str, tuple[dict[str, Any], str]] = {
    "sketch": (
        {"norm_first": True, "lora_scale": 1.0},
        "the sketch's forward is pre-norm (x + attn(norm1(x))) and adds x @ A @ B unscaled",
    ),
}


def _native_size(size: LayoutSize) -> LayoutSize:
    """A FLAG-TRADER-family size re-rooted for the native layout (no prefix, no PEFT adapter name)."""
    return replace(size, extra=(("adapter", ""), ("prefix", "")))


def infer_sizes(sd: Mapping[str, Any], recognition: Recognition | None = None) -> LayoutSize:
    """Sizes of the family the file is (or resembles most), inferred from its shapes.

    Raises LayoutError when no family can read even the hidden size.
    """
    rec = recognition or recognise(sd)
    sizes = [m.size for m in rec.matches if m.size is not None]
    if not sizes:
        raise LayoutError(
            "cannot tell the hidden size: no embedding, attention projection, LayerNorm or MLP layer of "
            "a known family found. This does not look like a model checkpoint."
        )
    return sizes[0]


def native_layout(s: LayoutSize) -> dict[str, Shape]:
    """FLAG-TRADER's own keys at these sizes (FlagTrader.state_dict() order)."""
    return native_family.FAMILY.expected(s)


def stock_layout(s: LayoutSize) -> dict[str, Shape]:
    """The stock-PyTorch export's keys at these sizes."""
    return stock_expected(s)


def to_native(
    sd: Mapping[str, torch.Tensor], recognition: Recognition | None = None
) -> tuple[dict[str, torch.Tensor], list[Fix]]:
    """The file in the native layout (fixes chosen against the native layout at the family's own sizes).

    Raises LayoutError naming what is still wrong when no chain of fixes makes it load strictly, and at once when
    the file is recognised as a different model.
    """
    if strict_load(meta_like(sd)).ok:
        return dict(sd), []
    rec = recognition or recognise(sd)
    best = rec.best
    if best.score >= CLOSE and not best.family.convertible:
        raise LayoutError(
            f"cannot convert to the native layout: the file is a {best.family.title} checkpoint "
            f"({best.score:.0%} of its keys), {best.family.converts_to}."
        )
    size = next((m.size for m in rec.matches if m.size is not None and m.family.convertible), None)
    if size is None:
        raise LayoutError(
            "cannot convert to the native layout: no FLAG-TRADER naming (native, PEFT, stock, sketch) "
            "fits this file's keys."
        )
    fixes = suggest_fixes(sd, native_layout(_native_size(size)))
    out = apply_fixes(sd, fixes)
    res = strict_load(meta_like(out))
    if not res.ok:
        done = ", ".join(f.title for f in fixes) or "none applied"
        extra = ""
        if res.diff is not None:
            extra = "; ".join(
                f"{n}: {', '.join(ks[:4])}"
                for n, ks in (
                    ("unexpected", res.diff.unexpected),
                    ("missing", res.diff.missing),
                    ("mis-shaped", [k for k, _, _ in res.diff.mismatched]),
                )
                if ks
            )
        raise LayoutError(f"cannot convert to the native layout (fixes: {done}). {res.message} {extra}".strip())
    return out, fixes


def family_assumptions(sd: Mapping[str, Any], recognition: Recognition | None = None) -> tuple[dict[str, Any], str]:
    """Assumptions the recognised family's own code fixes (the sketch: pre-norm, scale 1) and why; {} otherwise."""
    rec = recognition or recognise(sd)
    if rec.best.score >= GOOD and rec.best.family.name in FAMILY_ASSUMPTIONS:
        return FAMILY_ASSUMPTIONS[rec.best.family.name]
    return {}, ""


def convert(sd: Mapping[str, torch.Tensor], kind: str, lora_scale: float) -> tuple[dict[str, torch.Tensor], list[Fix]]:
    """Convert any convertible layout to 'native', 'merged' (LoRA folded in, native names) or 'stock'."""
    if kind not in EXPORT_KINDS:
        raise LayoutError(f"unknown export kind '{kind}'; choose one of {EXPORT_KINDS}")
    native, fixes = to_native(sd)
    if kind == "native":
        return native, fixes
    merged = merge_lora(native, lora_scale)
    if kind == "merged":
        return merged, fixes
    stock = _native_to_stock(merged)
    size = LayoutSize.from_config(infer_config(merged)[0])
    check = diff_keys(stock, stock_layout(size))
    if not check.ok:  # e.g. LoRA on only some blocks' projections cannot leave holes in a stock layer
        raise LayoutError(f"the stock export does not match nn.TransformerEncoderLayer keys: {check.summary()}.")
    return stock, fixes


def export_config(cfg: ModelConfig, kind: str) -> dict[str, Any]:
    """Plain-value config stored with an export, so it reopens (or, for 'stock', rebuilds) with the same
    assumptions: a stock export records everything nn.TransformerEncoderLayer needs."""
    out = cfg.to_dict()
    if kind != "native":
        out.pop("lora_alpha", None)
        out.pop("lora_rank", None)
        out["lora_merged_with_scale"] = cfg.lora_scale
    if kind == "stock":
        out.update(
            {
                "activation": "gelu",
                "batch_first": True,
                "layer_norm_eps": cfg.ln_eps,
                "nhead": cfg.num_heads,
                "dim_feedforward": cfg.ffn_dim,
                "dropout": 0.0,
            }
        )
    out["layout"] = kind
    return out


def export_bytes(sd: Mapping[str, torch.Tensor], fmt: str = "pt", config: Mapping[str, Any] | None = None) -> bytes:
    """File bytes: .pt holds {'model_state_dict', 'config'} (loads with weights_only=True); .safetensors holds
    the tensors with the config as JSON metadata."""
    tensors = {k: v.detach().contiguous().clone() for k, v in sd.items()}
    if fmt == "pt":
        buf = io.BytesIO()
        torch.save({"model_state_dict": tensors, "config": dict(config or {})}, buf)
        return buf.getvalue()
    if fmt == "safetensors":
        from safetensors.torch import save

        return save(tensors, metadata={"config": json.dumps(dict(config or {}))})
    raise LayoutError(f"unknown format '{fmt}'; choose one of {EXPORT_FORMATS}")


def export_plan(
    sd: Mapping[str, torch.Tensor],
    stored: Mapping[str, Any] | None = None,
    family_wins: bool = True,
    **assumptions: Any,
) -> tuple[dict[str, torch.Tensor], ModelConfig, list[Fix], str]:
    """(native dict, config with the assumptions, fixes, note): what every export starts from.

    The recognised family's own assumptions (the sketch: pre-norm, scale 1) replace the defaults; with
    `family_wins` they also replace the caller's values for those keys (the sidebar's defaults for a file that has
    no config of its own). None values are ignored.
    """
    rec = recognise(sd)
    native, fixes = to_native(sd, rec)
    fam, why = family_assumptions(sd, rec)
    cfg = infer_config(native, stored)[0].with_assumptions(**fam)
    if fam:
        cfg = replace(cfg, provenance={**cfg.provenance, **{k: f"assumption: {why}" for k in fam}})
    cfg = cfg.with_assumptions(**{k: v for k, v in assumptions.items() if not (family_wins and k in fam)})
    note = f"set {', '.join(f'{k}={v}' for k, v in fam.items())} because {why}" if fam else ""
    return native, cfg, fixes, note


def export_file(
    sd: Mapping[str, torch.Tensor], kind: str, fmt: str, stored: Mapping[str, Any] | None = None, **assumptions: Any
) -> bytes:
    """Convert (any convertible layout) and serialise, with the config and assumptions stored beside the weights.

    `assumptions` are ModelConfig assumptions (num_heads, lora_scale, norm_first, causal); lora_scale is the
    scale a merge uses.
    """
    native, cfg, _, _ = export_plan(sd, stored, **assumptions)
    out, _ = convert(native, kind, cfg.lora_scale)
    return export_bytes(out, fmt, export_config(cfg, kind))


def export_problem(sd: Mapping[str, Any], kind: str) -> str | None:
    """Why this export would fail (checked on shapes only, instantly), or None when it will work."""
    try:
        convert(meta_like(sd), kind, 1.0)
    except (LayoutError, ConfigError) as exc:
        return str(exc)
    return None


# ----------------------------------------------------------------------------------- stock rebuild


class StockFlagTrader(nn.Module):
    """FLAG-TRADER rebuilt from stock torch modules and the config a stock export stores (the loading snippet)."""

    def __init__(self, c: Mapping[str, Any]) -> None:
        super().__init__()
        d = int(c["d_model"])
        self.causal = bool(c.get("causal", False))
        self.pos_embedding = nn.Parameter(torch.zeros(1, int(c["max_length"]), d))
        self.state_embedding = nn.Linear(int(c["state_dim"]), d)
        layer = nn.TransformerEncoderLayer(
            d,
            int(c["nhead"]),
            int(c["dim_feedforward"]),
            dropout=0.0,
            activation=c["activation"],
            layer_norm_eps=float(c["layer_norm_eps"]),
            batch_first=bool(c["batch_first"]),
            norm_first=bool(c["norm_first"]),
        )
        self.encoder = nn.TransformerEncoder(layer, int(c["n_blocks"]), enable_nested_tensor=False)
        self.output_norm = nn.LayerNorm(d, eps=float(c["layer_norm_eps"]))
        self.action_head = nn.Linear(d, int(c["n_actions"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, S, state_dim) -> logits (B, S, actions)."""
        h = self.state_embedding(x) + self.pos_embedding[:, : x.shape[1]]
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1]) if self.causal else None
        return self.action_head(self.output_norm(self.encoder(h, mask=mask, is_causal=self.causal)))


STOCK_SNIPPET = """import torch
from torch import nn

ckpt = torch.load("{name}", weights_only=True)
c, sd = ckpt["config"], ckpt["model_state_dict"]   # safetensors: json.loads(metadata["config"])


class StockFlagTrader(nn.Module):
    def __init__(self, c):
        super().__init__()
        d = c["d_model"]
        self.pos_embedding = nn.Parameter(torch.zeros(1, c["max_length"], d))
        self.state_embedding = nn.Linear(c["state_dim"], d)
        layer = nn.TransformerEncoderLayer(d, c["nhead"], c["dim_feedforward"], dropout=0.0,
                                           activation=c["activation"], layer_norm_eps=c["layer_norm_eps"],
                                           batch_first=c["batch_first"], norm_first=c["norm_first"])
        self.encoder = nn.TransformerEncoder(layer, c["n_blocks"], enable_nested_tensor=False)
        self.output_norm = nn.LayerNorm(d, eps=c["layer_norm_eps"])
        self.action_head = nn.Linear(d, c["n_actions"])

    def forward(self, x):  # x (B, S, state_dim) -> logits (B, S, actions); the decision is [:, -1]
        h = self.state_embedding(x) + self.pos_embedding[:, : x.shape[1]]
        return self.action_head(self.output_norm(self.encoder(h)))


model = StockFlagTrader(c).eval()
model.load_state_dict(sd, strict=True)
"""


def stock_snippet(name: str = "model-stock.pt") -> str:
    """Python that rebuilds a stock export from its stored config with stock torch modules only."""
    return STOCK_SNIPPET.replace("{name}", name)


@dataclass(frozen=True)
class ReloadCheck:
    """A stock export rebuilt with StockFlagTrader from its stored config, against the reconstruction."""

    max_abs_logit_diff: float
    windows: int
    length: int
    loaded_strictly: bool


def stock_reload_check(
    sd: Mapping[str, torch.Tensor],
    stored: Mapping[str, Any] | None = None,
    windows: int = 4,
    length: int = 16,
    seed: int = 0,
    **assumptions: Any,
) -> ReloadCheck:
    """Export as stock, rebuild from the stored config, and compare logits with FlagTrader on random windows."""
    from ..model import build_model

    native, cfg, _, _ = export_plan(sd, stored, **assumptions)
    stock_sd, _ = convert(native, "stock", cfg.lora_scale)
    stock = StockFlagTrader(export_config(cfg, "stock")).eval()
    stock.load_state_dict(stock_sd, strict=True)
    ref = build_model(
        native, num_heads=cfg.num_heads, lora_scale=cfg.lora_scale, norm_first=cfg.norm_first, causal=cfg.causal
    )
    length = max(1, min(length, cfg.max_length))
    x = torch.randn(windows, length, cfg.state_dim, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        diff = (stock(x) - ref(x)).abs().max().item()
    return ReloadCheck(diff, windows, length, True)


# ------------------------------------------------------------------------------------------- targets

TARGETS: tuple[str, ...] = ("reconstruction",) + tuple(FAMILIES)
ALIASES = {"cgdt": "cgdt_agent"}  # target names of earlier versions


def reconstruction_config(
    cfg: ModelConfig | None, sd: Mapping[str, Any], recognition: Recognition | None = None
) -> tuple[ModelConfig, str]:
    """The config of the reconstruction target, and how it was found: the file's inferred config, else the
    recognised family's sizes (a FLAG-TRADER naming keeps its LoRA rank and targets and its own assumptions)."""
    rec = recognition or recognise(sd)
    if cfg is not None and (rec.best.family.name == "native" or not rec.confident):
        return cfg, "the file's inferred configuration with the current assumptions"
    sized = next(((m, m.size) for m in rec.matches if m.size is not None), None)
    if sized is None:
        raise LayoutError("cannot tell the hidden size: no family of known layouts reads this file's shapes.")
    best, size = sized
    if not best.family.convertible:
        size = replace(size, lora_rank=0, lora_targets=())
    if best.family.name == "peft_llm" or best.family.name == "mlp":
        size = replace(
            size,
            lora_rank=0,
            lora_targets=(),
            n_blocks=max(size.n_blocks, 1),
            ffn_dim=size.ffn_dim or 4 * size.d_model,
            state_dim=size.state_dim or size.d_model,
            n_actions=size.n_actions or 3,
        )
    fam, why = FAMILY_ASSUMPTIONS.get(best.family.name, ({}, ""))
    out = replace(size, max_length=size.max_length or 1).to_config(**fam)
    how = (
        f"sizes of the recognised family ({best.family.title}: {size.summary()})"
        + (f"; {why}" if fam else "")
        + ("" if best.family.convertible else " — what FLAG-TRADER at this file's sizes would hold")
    )
    return out, how


def _resized(
    current: ModelConfig | LayoutSize, n_blocks: int | None, d_model: int | None, ffn_dim: int | None
) -> tuple[int, int, int, list[str]]:
    """The sizes after the changes (None keeps one) and the names of those that differ."""
    n, d, f = (
        current.n_blocks if n_blocks is None else n_blocks,
        current.d_model if d_model is None else d_model,
        current.ffn_dim if ffn_dim is None else ffn_dim,
    )
    changed = [k for k, v in (("n_blocks", n), ("d_model", d), ("ffn_dim", f)) if v != getattr(current, k)]
    return n, d, f, changed


def resize_config(
    cfg: ModelConfig, n_blocks: int | None = None, d_model: int | None = None, ffn_dim: int | None = None
) -> ModelConfig:
    """A copy with n_blocks / d_model / ffn_dim replaced (what another loader assumed); LoRA stays on the same
    modules of every block, and the head count falls back to a divisor of the new d."""
    n, d, f, changed = _resized(cfg, n_blocks, d_model, ffn_dim)
    if not changed:
        return cfg
    mods = {t.split(".", 2)[2] for t in cfg.lora_targets}
    targets = tuple(f"transformer_blocks.{b}.{m}" for b in range(n) for m in BLOCK_LINEARS if m in mods)
    heads = fallback_heads(d, cfg.num_heads)
    prov = {**cfg.provenance, **{k: "set by user (what another loader assumed)" for k in changed}}
    return replace(cfg, n_blocks=n, d_model=d, ffn_dim=f, lora_targets=targets, num_heads=heads, provenance=prov)


def with_sizes(
    size: LayoutSize, n_blocks: int | None = None, d_model: int | None = None, ffn_dim: int | None = None
) -> LayoutSize:
    """A copy with some sizes replaced (e.g. the hidden size another loader assumed)."""
    n, d, f, changed = _resized(size, n_blocks, d_model, ffn_dim)
    if not changed:
        return size
    prov = {**size.provenance, **{k: "set by user" for k in changed}}
    targets = size.lora_targets
    if "n_blocks" in changed and targets and targets[0].startswith("transformer_blocks."):
        mods = sorted({t.split(".", 2)[2] for t in targets})
        targets = tuple(f"transformer_blocks.{b}.{m}" for b in range(n) for m in mods)
    return replace(size, n_blocks=n, d_model=d, ffn_dim=f, lora_targets=targets, provenance=prov)


def target_shapes(
    target: str,
    sd: Mapping[str, Any],
    cfg: ModelConfig | None = None,
    recognition: Recognition | None = None,
    **sizes: int | None,
) -> tuple[dict[str, Shape], str]:
    """Expected keys and shapes of a named target, and a sentence saying how they were derived.

    'reconstruction' is FlagTrader(cfg) (cfg: the file's config with the current assumptions, else the recognised
    family's sizes); a family name generates that family at the sizes it infers from the file (or, when it reads
    nothing there, at the best family's sizes). `sizes` (n_blocks, d_model, ffn_dim) override, e.g. to see a
    wrong guess.
    """
    rec = recognition or recognise(sd)
    target = ALIASES.get(target, target)
    if target == "reconstruction":
        cfg, how = reconstruction_config(cfg, sd, rec)
        cfg = resize_config(cfg, **sizes)
        return expected_shapes(cfg), (
            f"FlagTrader with {cfg.n_blocks} blocks, d={cfg.d_model}, F={cfg.ffn_dim}, LoRA rank {cfg.lora_rank} on "
            f"{len(cfg.lora_targets)} modules — {how}"
        )
    if target not in FAMILIES:
        raise LayoutError(f"unknown target '{target}'; choose one of {TARGETS} or give a checkpoint path.")
    fam = FAMILIES[target]
    own = next(m for m in rec.matches if m.family.name == target)
    if own.size is not None:
        size, whose = own.size, "the sizes it reads from this file"
    else:
        base = infer_sizes(sd, rec)
        size = LayoutSize(
            base.n_blocks or 1,
            base.d_model,
            base.ffn_dim or 4 * base.d_model,
            base.state_dim or 60,
            base.n_actions or 3,
            base.max_length,
            base.lora_rank,
            (),
            base.num_heads,
            (),
            base.provenance,
        )
        whose = "the file's sizes (it reads none of its own keys there)"
    size = with_sizes(size, **sizes)
    return fam.expected(size), f"{fam.title} at {whose}: {size.summary()} — {fam.description}"


__all__ = [
    "EXPORT_FORMATS",
    "EXPORT_KINDS",
    "FAMILY_ASSUMPTIONS",
    "ReloadCheck",
    "StockFlagTrader",
    "StrictLoad",
    "TARGETS",
    "convert",
    "export_bytes",
    "export_config",
    "export_file",
    "export_plan",
    "export_problem",
    "family_assumptions",
    "infer_sizes",
    "native_layout",
    "reconstruction_config",
    "resize_config",
    "stock_layout",
    "stock_reload_check",
    "stock_snippet",
    "strict_load",
    "target_shapes",
    "to_native",
    "with_sizes",
]
