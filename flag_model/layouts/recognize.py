"""Which family a file is: every family scored on the file at the sizes it infers from the file itself.

One `Recognition` feeds `inspect`, `diff`, the Overview and the Architecture page, so they never disagree.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from .families import FAMILIES, Family, LayoutSize
from .keys import LayoutError, Shape, key_pattern, shapes_of

GOOD = 0.9  # share above which a file *is* the family
CLOSE = 0.5  # share above which it resembles it


@dataclass(frozen=True)
class FamilyMatch:
    """One family scored on one file. `score` is the Dice share of exact key+shape matches between the file and
    the family's expected keys at the sizes inferred from the file; `evidence` are signature keys found."""

    family: Family
    size: LayoutSize | None
    score: float
    matched: int
    expected: int
    file_keys: int
    evidence: tuple[str, ...]
    error: str | None  # why sizes could not be inferred

    @property
    def lora_rank(self) -> int:
        return self.size.lora_rank if self.size else 0

    def lora_targets(self) -> tuple[str, ...]:
        """Modules carrying LoRA: FLAG-TRADER module kinds ('attention.q_proj', 'ffn.0'...) or PEFT module names."""
        if self.size is None or not self.size.lora_rank:
            return ()
        if self.size.get("peft_targets"):
            return tuple(self.size.get("peft_targets"))
        return tuple(sorted({t.split(".", 2)[2] for t in self.size.native_targets()}))


@dataclass(frozen=True)
class Recognition:
    """All families ranked on one file, best first, and the file's largest unexplained key groups."""

    matches: tuple[FamilyMatch, ...]
    unexplained: tuple[tuple[str, int], ...]  # (key pattern group, number of keys) the best family does not expect
    adapter_config: Mapping[str, Any] | None = None

    @property
    def best(self) -> FamilyMatch:
        return self.matches[0]

    @property
    def confident(self) -> bool:
        return self.best.score >= GOOD

    def headline(self) -> str:
        """'This file is the FLAG-TRADER LoRA layout: 343/343 keys (...)'; or the closest family and what is left."""
        top = self.best
        others = "; ".join(f"{m.family.title}: {m.score:.0%}" for m in self.matches[1:4] if m.score > 0)
        tail = f" Next: {others}." if others else ""
        if top.score >= GOOD:
            head = (
                f"This file is the {top.family.title} layout: {top.matched}/{top.expected} keys "
                f"({top.size.summary() if top.size else ''})."
            )
        elif top.score >= CLOSE:
            head = (
                f"This file resembles the {top.family.title} layout ({top.score:.0%} of keys match; "
                f"{top.matched}/{top.expected})."
            )
        else:
            groups = ", ".join(f"{g} ({n})" for g, n in self.unexplained[:3])
            head = (
                f"This file matches no known layout well (closest: {top.family.title}, {top.score:.0%}). "
                f"Largest unexplained key groups: {groups or 'none'}."
            )
        return head + tail

    def to_dict(self) -> dict[str, Any]:
        """The recognised family as plain JSON values (shared by `inspect --json` and `diff --json`)."""
        best = self.best
        scale, scale_how = lora_scale_for(self)
        out = {
            "family": best.family.name,
            "title": best.family.title,
            "score": round(best.score, 4),
            "matched": best.matched,
            "expected": best.expected,
            "confident": self.confident,
            "description": best.family.description,
            "converts_to": best.family.converts_to,
            "sizes": best.size.summary() if best.size else None,
            "lora_rank": best.lora_rank,
            "lora_targets": list(best.lora_targets()),
            "heads": best.size.num_heads if best.size else None,
            "evidence": list(best.evidence[:5]),
            "headline": self.headline(),
            "unexplained": [{"group": g, "keys": n} for g, n in self.unexplained],
        }
        if best.size is not None:
            out["size_fields"] = {
                k: getattr(best.size, k)
                for k in ("n_blocks", "d_model", "ffn_dim", "state_dim", "n_actions", "max_length", "lora_rank")
            }
        if self.adapter_config:
            out["adapter_config"] = dict(self.adapter_config)
            out["lora_scale"] = scale
            out["lora_scale_source"] = scale_how
        return out

    def table(self) -> pd.DataFrame:
        """One row per family: layout, title, score, matched, layout_keys, file_keys, sizes, LoRA, evidence..."""
        rows = [
            {
                "layout": m.family.name,
                "title": m.family.title,
                "score": m.score,
                "matched": m.matched,
                "layout_keys": m.expected,
                "file_keys": m.file_keys,
                "convertible": m.family.convertible,
                "sizes": m.size.summary() if m.size else (m.error or ""),
                "lora_rank": m.lora_rank,
                "lora_targets": ", ".join(m.lora_targets()),
                "evidence": ", ".join(m.evidence[:3]),
                "note": m.family.description,
            }
            for m in self.matches
        ]
        return pd.DataFrame(rows)


def _group(key: str) -> str:
    parts = key_pattern(key).split(".")
    return ".".join(parts[:3] if "N" in parts[:3] else parts[:2]) if len(parts) > 2 else ".".join(parts[:-1]) or key


def score_family(family: Family, shapes: Mapping[str, Shape], stored: Mapping[str, Any] | None = None) -> FamilyMatch:
    """The family at the sizes inferred from `shapes` and how well the file matches it."""
    evidence = tuple(family.evidence(shapes))
    if not evidence:
        return FamilyMatch(family, None, 0.0, 0, 0, len(shapes), (), "none of its signature keys")
    try:
        size = family.infer(shapes, dict(stored or {}))
        exp = family.expected(size)
    except (LayoutError, KeyError, IndexError, TypeError, ValueError, ZeroDivisionError) as exc:
        return FamilyMatch(family, None, 0.0, 0, 0, len(shapes), evidence, f"sizes not inferable: {exc}")
    matched = sum(1 for k, s in exp.items() if shapes.get(k) == s)
    score = 2 * matched / (len(exp) + len(shapes)) if exp or shapes else 0.0
    return FamilyMatch(family, size, score, matched, len(exp), len(shapes), evidence, None)


def recognise(
    sd: Mapping[str, Any], stored: Mapping[str, Any] | None = None, adapter_config: Mapping[str, Any] | None = None
) -> Recognition:
    """Rank every family on the file (shapes only; `stored`: the stored config and top-level metadata, read only
    for the head count; `adapter_config`: a PEFT folder's config)."""
    shapes = shapes_of(sd)
    extra = {**dict(stored or {}), **dict(adapter_config or {})}
    order = list(FAMILIES)
    matches = sorted(
        (score_family(f, shapes, extra) for f in FAMILIES.values()),
        key=lambda m: (-m.score, -m.matched, order.index(m.family.name)),
    )
    best = matches[0]
    exp = best.family.expected(best.size) if best.size else {}
    left = Counter(_group(k) for k, s in shapes.items() if exp.get(k) != s)
    return Recognition(tuple(matches), tuple(left.most_common(6)), adapter_config)


def recognise_checkpoint(ckpt: Any) -> Recognition:
    """recognise() with what a Checkpoint stores beside the weights (stored config, top-level values, adapter)."""
    top = {k: v for k, v in ckpt.meta.items() if isinstance(v, (int, float, str, bool))}
    return recognise(ckpt.state_dict, {**top, **(ckpt.stored_config or {})}, ckpt.adapter_config)


def rank_layouts(sd: Mapping[str, Any], stored: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """recognise(sd).table(): the families ranked on the file, best first."""
    return recognise(sd, stored).table()


def ranking_headline(ranking: pd.DataFrame | Recognition) -> str:
    """The headline of a Recognition (or of a ranking table, for old callers)."""
    if isinstance(ranking, Recognition):
        return ranking.headline()
    top = ranking.iloc[0]
    if top.score >= GOOD:
        return f"This file is the {top.title} layout: {top.matched}/{top.layout_keys} keys."
    if top.score >= CLOSE:
        return f"This file resembles the {top.title} layout ({top.score:.0%} of keys match)."
    return f"This file matches no known layout well (closest: {top.title}, {top.score:.0%})."


def lora_scale_for(rec: Recognition) -> tuple[float | None, str]:
    """LoRA scale a recognised adapter implies: PEFT alpha/r (alpha/√r with rsLoRA) from adapter_config.json."""
    cfg = rec.adapter_config or {}
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if isinstance(r, int) and r > 0 and isinstance(alpha, (int, float)):
        if cfg.get("use_rslora"):
            return alpha / r**0.5, f"adapter_config.json: lora_alpha {alpha} / √r (rsLoRA, r={r})"
        return alpha / r, f"adapter_config.json: lora_alpha {alpha} / r {r}"
    return None, "no adapter config"


__all__ = [
    "CLOSE",
    "GOOD",
    "FamilyMatch",
    "Recognition",
    "lora_scale_for",
    "rank_layouts",
    "ranking_headline",
    "recognise",
    "recognise_checkpoint",
    "score_family",
]
