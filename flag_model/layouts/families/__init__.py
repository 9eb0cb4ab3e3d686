"""The registry of layout families, one module each; order breaks ties (FLAG-TRADER's own namings first)."""

from __future__ import annotations

from . import a2c, cgdt_agent, cgdt_engine, mlp, native, peft_llm, peft_native, ppo, sketch, stock
from .base import Family, LayoutSize

FAMILIES: dict[str, Family] = {
    m.FAMILY.name: m.FAMILY
    for m in (native, peft_native, stock, sketch, a2c, ppo, cgdt_agent, cgdt_engine, peft_llm, mlp)
}

__all__ = ["FAMILIES", "Family", "LayoutSize"]
