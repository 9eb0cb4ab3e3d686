"""Keys and shapes: the vocabulary every other layouts module works in.

Everything that compares layouts works on shapes only (plain tuples or `meta` tensors), so an 88 M-parameter
file is recognised, diffed and repaired without touching its data; only the final conversion moves real tensors.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..checkpoint import KNOWN_PREFIXES, strip_prefixes

Shape = tuple[int, ...]


class LayoutError(ValueError):
    """A conversion or inference that cannot be done; the message says why and what to do instead."""


def shapes_of(sd: Mapping[str, Any]) -> dict[str, Shape]:
    """{key: shape} from tensors (real or meta) or shapes."""
    return {k: tuple(v.shape) if hasattr(v, "shape") else tuple(int(x) for x in v) for k, v in sd.items()}


def meta_like(sd: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Shape-only stand-ins (device `meta`), so conversions can be tried on an 88 M-parameter file for free."""
    return {k: torch.empty(s, device="meta") for k, s in shapes_of(sd).items()}


_BLOCK_INDEX = re.compile(r"(transformer_blocks|layers|blocks|h)\.\d+\.")


def key_pattern(key: str) -> str:
    """Key with the block index and a PEFT adapter name generalised: `transformer_blocks.N.ffn.0...`."""
    key = _BLOCK_INDEX.sub(lambda m: f"{m.group(1)}.N.", key)
    return re.sub(r"\.(lora_[AB])\.(?!weight$)[^.]+\.weight$", r".\1.weight", key)


def natural_key(key: str) -> tuple:
    """Sort key that orders `blocks.2` before `blocks.10`."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in key.split("."))


def lin(prefix: str, d_in: int, d_out: int, bias: bool = True) -> dict[str, Shape]:
    """nn.Linear(d_in, d_out) keys under `prefix`."""
    return {f"{prefix}.weight": (d_out, d_in), **({f"{prefix}.bias": (d_out,)} if bias else {})}


def norm(prefix: str, d: int) -> dict[str, Shape]:
    """nn.LayerNorm(d) keys under `prefix`."""
    return {f"{prefix}.weight": (d,), f"{prefix}.bias": (d,)}


def find(
    shapes: Mapping[str, Shape], pattern: str, ok: Callable[[Shape], bool] = lambda s: True
) -> tuple[str, Shape, re.Match] | None:
    """First key matching `pattern` (searched) whose shape passes `ok`: (key, shape, match)."""
    rx = re.compile(pattern)
    for k, s in shapes.items():
        m = rx.search(k)
        if m and ok(s):
            return k, s, m
    return None


def indices(shapes: Mapping[str, Shape], pattern: str) -> list[int]:
    """Sorted distinct integers captured by group 1 of `pattern` over all keys (block indices)."""
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes if (m := rx.search(k))})


def has(keys, pattern: str) -> list[str]:
    rx = re.compile(pattern)
    return [k for k in keys if rx.search(k)]


__all__ = [
    "KNOWN_PREFIXES",
    "LayoutError",
    "Shape",
    "find",
    "has",
    "indices",
    "key_pattern",
    "lin",
    "meta_like",
    "natural_key",
    "norm",
    "shapes_of",
    "strip_prefixes",
]
