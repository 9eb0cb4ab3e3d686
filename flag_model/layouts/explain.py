"""Explanations: why a file's keys differ from a target's, as a table of rules. Each rule looks at the diff (and
the recognised families) and says the cause in words, with the fix ids that address it."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .diff import KeyDiff, diff_keys
from .fixes import (
    _BARE_LORA,
    _FINAL_NORM_NAMES,
    _IN_BLOCK,
    _IN_BLOCK_BASE,
    _NATIVE_LORA,
    _PEFT_LORA,
    _PRE_NORM_NAMES,
    _prefixes,
)
from .keys import Shape, has, shapes_of
from .recognize import CLOSE, Recognition, recognise


@dataclass(frozen=True)
class Explanation:
    """A mismatch cause a rule recognised, in words, with the fixes (ids) that address it."""

    rule: str
    message: str
    fixes: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Case:
    fs: dict[str, Shape]
    ts: dict[str, Shape]
    diff: KeyDiff
    file: Recognition
    target: Recognition

    @property
    def F(self) -> list[str]:
        return list(self.fs)

    @property
    def T(self) -> list[str]:
        return list(self.ts)


def _layout(c: _Case) -> list[Explanation]:
    top = c.file.best
    if top.score < CLOSE or top.family.convertible:
        return []
    return [
        Explanation(
            "layout",
            f"The file is a {top.family.title} checkpoint ({top.score:.0%} of its keys match "
            f"that family at {top.size.summary() if top.size else 'its sizes'}): {top.family.description}. "
            f"Converts to: {top.family.converts_to}. Renaming can align parts of it, but it is not "
            "FLAG-TRADER and cannot be loaded as such.",
        )
    ]


def _prefix(c: _Case) -> list[Explanation]:
    out = []
    unexpected, missing = list(c.diff.unexpected), list(c.diff.missing)
    for p in sorted(_prefixes(unexpected), key=len, reverse=True):
        hits = [k for k in unexpected if k.startswith(p) and k[len(p) :] in c.ts]
        if hits:
            carrying = sum(1 for k in c.fs if k.startswith(p))
            who = f"all {carrying}" if carrying == len(c.fs) else f"{carrying} of the {len(c.fs)}"
            out.append(
                Explanation(
                    "prefix",
                    f"{who} file keys carry the prefix '{p}' that the target does not have; "
                    f"without it {len(hits)} of them match a target key (e.g. '{hits[0]}').",
                    (f"strip_prefix:{p}",),
                )
            )
            break
    for p in sorted(_prefixes(missing), key=len, reverse=True):
        n = sum(1 for k in missing if k.startswith(p) and k[len(p) :] in c.fs)
        if n:
            out.append(
                Explanation(
                    "prefix", f"{n} target keys have the prefix '{p}' that the file's keys lack.", (f"add_prefix:{p}",)
                )
            )
            break
    return out


def _attention_level(c: _Case) -> list[Explanation]:
    if has(c.F, r"transformer_blocks\.\d+\.(q|k|v|out)_proj\.") and has(c.T, r"transformer_blocks\.\d+\.attention\."):
        return [
            Explanation(
                "attention_level",
                "The file has q/k/v/out_proj directly on the block "
                "(transformer_blocks.N.q_proj); the target nests them under `attention.`.",
                ("add_attention_level",),
            )
        ]
    if has(c.F, r"transformer_blocks\.\d+\.attention\.") and has(c.T, r"transformer_blocks\.\d+\.(q|k|v|out)_proj\."):
        return [
            Explanation(
                "attention_level",
                "The file nests projections under `attention.`; the target has them directly on the block.",
                ("remove_attention_level",),
            )
        ]
    return []


def _peft_orientation(c: _Case) -> list[Explanation]:
    out = []
    peft_f, peft_t = has(c.F, _PEFT_LORA.pattern) + has(c.F, r"\.base_layer\."), has(c.T, _PEFT_LORA.pattern)
    if peft_f and not peft_t:
        out.append(
            Explanation(
                "peft_orientation",
                f"{len(peft_f)} keys use the PEFT / HF layout: `base_layer`, "
                "lora_A.weight [r, in] and lora_B.weight [out, r]. Native LoRA is lora.lora_A [in, r] "
                "and lora.lora_B [r, out]: the same numbers, transposed.",
                ("peft_to_native",),
            )
        )
    elif peft_t and not peft_f and has(c.F, _NATIVE_LORA.pattern):
        out.append(
            Explanation(
                "peft_orientation",
                "The target is the PEFT layout: native lora.lora_A [in, r] must "
                "become lora_A.weight [r, in] (transposed), base → base_layer.",
                ("native_to_peft",),
            )
        )
    flipped = [k for k, a, b in c.diff.mismatched if a == b[::-1] and re.search(r"lora_[AB]", k)]
    if flipped:
        out.append(
            Explanation(
                "peft_orientation",
                f"{len(flipped)} LoRA matrices are stored transposed (e.g. "
                f"{flipped[0]}: file {list(c.fs[flipped[0]])}, target {list(c.ts[flipped[0]])}) — "
                "PEFT's [r, in] / [out, r] orientation under native names.",
                ("transpose_lora",),
            )
        )
    return out


def _fused_qkv(c: _Case) -> list[Explanation]:
    fused_f, fused_t = has(c.F, r"in_proj_weight$"), has(c.T, r"in_proj_weight$")
    if fused_f and not fused_t and has(c.T, r"q_proj"):
        return [
            Explanation(
                "fused_qkv",
                f"{len(fused_f)} attention layers store q, k, v fused in in_proj_weight "
                f"{list(c.fs[fused_f[0]])} (nn.MultiheadAttention); the target has separate "
                "q_proj/k_proj/v_proj.",
                ("stock_to_native",) if has(c.F, r"self_attn\.in_proj") else ("split_qkv",),
            )
        ]
    if fused_t and not fused_f and has(c.F, r"q_proj"):
        return [
            Explanation(
                "fused_qkv",
                "The target fuses q, k, v into in_proj_weight [3d, d]; the file keeps them "
                "separate. LoRA on q/k/v must be merged first.",
                ("native_to_stock",) if has(c.T, r"self_attn\.in_proj") else ("fuse_qkv",),
            )
        ]
    return []


def _base_level(c: _Case) -> list[Explanation]:
    plain = has(c.diff.unexpected, _IN_BLOCK.pattern)
    if plain and has(c.T, _IN_BLOCK_BASE.pattern):
        return [
            Explanation(
                "base_level",
                f"{len(plain)} projections use plain nn.Linear names ({plain[0]}); "
                "FLAG-TRADER wraps each in a LoRALinear (`…base.weight`).",
                ("add_base_level",),
            )
        ]
    return []


def _lora_level(c: _Case) -> list[Explanation]:
    if has(c.F, _BARE_LORA.pattern) and has(c.T, _NATIVE_LORA.pattern):
        return [
            Explanation(
                "lora_level",
                "LoRA matrices sit directly on the projection (q_proj.lora_A); the target "
                "keeps them in a `lora.` sub-module (q_proj.lora.lora_A).",
                ("add_lora_level",),
            )
        ]
    return []


def _norm_naming(c: _Case) -> list[Explanation]:
    pre = sorted({p for k in c.F for p in k.split(".") if p in _PRE_NORM_NAMES or p in _FINAL_NORM_NAMES})
    if pre and has(c.T, r"(norm1|norm2|output_norm)\.weight$"):
        return [
            Explanation(
                "norm_naming",
                f"LayerNorms are named {', '.join(pre)} — pre-norm naming; the target "
                "uses norm1/norm2/output_norm (post-norm in the training code). Renaming fixes the keys; "
                "the norm placement is an assumption: choose 'pre-norm' in the sidebar if this file "
                "was trained pre-norm.",
                ("rename_norms",),
            )
        ]
    return []


def _norm_placement(c: _Case) -> list[Explanation]:
    if c.file.best.family.name == "sketch" and c.file.confident and c.target.best.family.name == "native":
        return [
            Explanation(
                "norm_placement",
                "The sketch's forward is pre-norm (x + attn(norm1(x))), the FLAG-TRADER "
                "training code post-norm; the keys cannot tell. Converting sets and records pre-norm "
                "(norm_first=True) and LoRA scale 1 (the sketch adds x @ A @ B unscaled) as assumptions.",
            )
        ]
    return []


def _lora_presence(c: _Case) -> list[Explanation]:
    lora_f, lora_t = has(c.F, r"lora_A"), has(c.T, r"lora_A")
    if lora_t and not lora_f:
        return [
            Explanation(
                "no_lora",
                f"The file has no LoRA adapters; the target expects {len(lora_t)} lora_A "
                "tensors. A merged or LoRA-free file loads into the reconstruction built without LoRA.",
            )
        ]
    if lora_f and not lora_t:
        return [
            Explanation(
                "no_lora",
                f"The file has {len(lora_f)} LoRA adapters; the target has none. Export it "
                "'merged' (W + scale·(A@B)ᵀ) to load it into a model without LoRA.",
            )
        ]
    return []


_SIZE_NAMES = {
    "d_model": "hidden size",
    "ffn_dim": "FFN width",
    "n_blocks": "number of blocks",
    "state_dim": "input features",
    "n_actions": "actions",
    "max_length": "max_length",
    "lora_rank": "LoRA rank",
}


def _sizes(c: _Case) -> list[Explanation]:
    a, b = c.file.best, c.target.best
    if (
        a.size is None
        or b.size is None
        or a.family.name != b.family.name
        and not (a.family.convertible and b.family.convertible)
    ):
        return []
    out = []
    for attr, what in _SIZE_NAMES.items():
        x, y = getattr(a.size, attr), getattr(b.size, attr)
        if x != y and x and y:
            out.append(
                Explanation(
                    "size",
                    f"Different {what}: the file has {x} ({a.size.provenance.get(attr, '')}), "
                    f"the target {y}. No renaming changes a size; build the target from the file's "
                    "shapes (the reconstruction does).",
                )
            )
    return out


# The table of rules, in the order their explanations are shown: (id, what it recognises, rule).
RULES: tuple[tuple[str, str, Callable[[_Case], list[Explanation]]], ...] = (
    ("layout", "the file is a different model family", _layout),
    ("prefix", "a key prefix on one side only", _prefix),
    ("attention_level", "projections with or without the `attention.` level", _attention_level),
    ("peft_orientation", "PEFT naming or transposed LoRA matrices", _peft_orientation),
    ("fused_qkv", "q/k/v fused in in_proj_weight on one side", _fused_qkv),
    ("base_level", "plain nn.Linear names where LoRALinear has `base.`", _base_level),
    ("lora_level", "LoRA matrices without the `lora.` sub-module", _lora_level),
    ("norm_naming", "pre-norm LayerNorm names", _norm_naming),
    ("norm_placement", "the sketch's pre-norm forward", _norm_placement),
    ("no_lora", "LoRA on one side only", _lora_presence),
    ("size", "the same family at different sizes", _sizes),
)


def explain(
    file: Mapping[str, Any], target: Mapping[str, Any], recognition: Recognition | None = None
) -> list[Explanation]:
    """Rule-based causes of the differences between file and target keys (empty when they match)."""
    fs, ts = shapes_of(file), shapes_of(target)
    diff = diff_keys(fs, ts)
    if diff.ok:
        return []
    rec = recognition if isinstance(recognition, Recognition) else recognise(fs)
    case = _Case(fs, ts, diff, rec, recognise(ts))
    return [e for _, _, rule in RULES for e in rule(case)]


__all__ = ["Explanation", "RULES", "explain"]
