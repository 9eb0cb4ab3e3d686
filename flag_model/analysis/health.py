"""Parameter counts, dtypes and a health scan of a state dict (no model needed)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import pandas as pd
import torch

from ..checkpoint import nonfinite_scan
from .tensors import init_guess

_B_ZERO = 1e-8  # |lora_B| below this everywhere: the adapter has not learned


def param_group(key: str) -> str:
    """base / LoRA / other, the three groups the Overview counts."""
    if ".lora." in key or re.search(r"lora_[AB]", key):
        return "LoRA"
    if ".base." in key:
        return "base"
    return "other"


def parameter_counts(state_dict: Mapping[str, torch.Tensor]) -> pd.DataFrame:
    """Rows base / LoRA / other / total with tensors, parameters, bytes and share of parameters."""
    rows: dict[str, list[int]] = {g: [0, 0, 0] for g in ("base", "LoRA", "other")}
    for k, t in state_dict.items():
        r = rows[param_group(k)]
        r[0] += 1
        r[1] += t.numel()
        r[2] += t.numel() * t.element_size()
    df = pd.DataFrame.from_dict(rows, orient="index", columns=["tensors", "parameters", "bytes"])
    df.loc["total"] = df.sum()
    df["share"] = df["parameters"] / max(int(df.loc["total", "parameters"]), 1)
    return df


def dtype_counts(state_dict: Mapping[str, torch.Tensor]) -> pd.DataFrame:
    """Tensors and parameters per dtype."""
    rows: dict[str, list[int]] = {}
    for t in state_dict.values():
        r = rows.setdefault(str(t.dtype).removeprefix("torch."), [0, 0])
        r[0] += 1
        r[1] += t.numel()
    return pd.DataFrame.from_dict(rows, orient="index", columns=["tensors", "parameters"])


@dataclass(frozen=True)
class Finding:
    level: str  # error / warning / info / ok
    check: str
    message: str
    keys: tuple[str, ...] = ()


def _looks_like_init(key: str, w: torch.Tensor) -> bool:
    """A cheap screen against the key's default init (analysis.tensors.init_guess, e.g. nn.Linear's U(±1/√in)):
    entry std within 3 %, no value beyond the bound, mean near 0. The Tensor tree adds the spectrum test."""
    guess = init_guess(key, tuple(w.shape))
    if w.dim() != 2 or w.numel() < 256 or guess is None or guess.bound is None or guess.sigma == 0:
        return False
    w, bound = w.float(), guess.bound
    std_ratio = w.std().item() / guess.sigma
    return 0.97 < std_ratio < 1.03 and w.abs().max().item() <= bound * 1.0001 and abs(w.mean().item()) < 0.05 * bound


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def health_scan(state_dict: Mapping[str, torch.Tensor]) -> list[Finding]:
    """NaN/Inf, all-zero tensors, dead LoRA adapters (B ~ 0), head at init, base weights at random init."""
    sd = state_dict
    out: list[Finding] = []
    floats = {k: t for k, t in sd.items() if t.is_floating_point()}
    scan = nonfinite_scan(sd)
    bad, nan, inf, total = scan.keys, scan.nan, scan.inf, scan.elements
    if bad:
        out.append(
            Finding(
                "error",
                "NaN / Inf",
                f"{_count(len(bad), 'tensor')} {'contains' if len(bad) == 1 else 'contain'} "
                f"non-finite values: {nan:,} NaN and {inf:,} Inf of their {total:,} elements.",
                bad,
            )
        )
    else:
        out.append(Finding("ok", "NaN / Inf", "every tensor is finite."))
    # native `…lora_B` and PEFT `…lora_B.weight` / `…lora_B.<adapter>.weight`
    is_b = {k: bool(re.search(r"lora_B(\.[^.]+)?(\.weight)?$", k)) for k in floats}
    zero = tuple(k for k, t in floats.items() if t.numel() and not t.any() and not is_b[k])
    out.append(
        Finding(
            "warning",
            "all-zero tensors",
            f"{_count(len(zero), 'tensor')} {'is' if len(zero) == 1 else 'are'} all zeros.",
            zero,
        )
        if zero
        else Finding("ok", "all-zero tensors", "no tensor is all zeros (LoRA B checked separately).")
    )
    b_keys = [k for k in floats if is_b[k]]
    dead = tuple(k for k in b_keys if floats[k].abs().max().item() < _B_ZERO)
    if not b_keys:
        out.append(Finding("info", "LoRA adapters", "the file has no LoRA adapters."))
    elif dead:
        out.append(
            Finding(
                "warning",
                "LoRA adapters",
                f"{len(dead)}/{len(b_keys)} adapters have lora_B ≈ 0: they change nothing "
                "(untrained, or saved before training).",
                dead,
            )
        )
    else:
        out.append(Finding("ok", "LoRA adapters", f"all {len(b_keys)} adapters have non-zero lora_B."))
    head = floats.get("action_head.weight")
    if head is not None:
        if _looks_like_init("action_head.weight", head):
            out.append(
                Finding(
                    "warning",
                    "action head",
                    "action_head.weight looks like its random initialisation.",
                    ("action_head.weight",),
                )
            )
        else:
            out.append(Finding("ok", "action head", "action_head.weight does not look like its initialisation."))
    bases = [k for k in floats if k.endswith(".base.weight")]
    init = tuple(k for k in bases if _looks_like_init(k, floats[k]))
    if bases:
        share = len(init) / len(bases)
        level = "info" if share > 0.5 else "ok"
        msg = (
            f"{len(init)}/{len(bases)} base weights look like untrained nn.Linear initialisation "
            "(uniform ±1/√in). Expected for FLAG-TRADER: only LoRA, embeddings, norms and the head were trained."
            if init
            else "no base weight looks like untrained initialisation."
        )
        out.append(Finding(level, "base weights", msg, init))
    return out


def findings_frame(findings: list[Finding]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "level": f.level,
                "check": f.check,
                "message": f.message,
                "tensors": len(f.keys),
                "examples": ", ".join(f.keys[:3]),
            }
            for f in findings
        ]
    )
