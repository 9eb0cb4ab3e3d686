"""A PEFT LoRA adapter of an LLM (shared/layouts/peft_smollm2_adapter.txt: the SmolLM2-135M FLAGTrader variant),
as save_pretrained writes it: adapter_model.safetensors with only `base_model.model.model.layers.N.{self_attn,mlp}.
<proj>.lora_{A,B}.weight` (A [r, in], B [out, r]) and adapter_config.json (r, lora_alpha, use_rslora, targets,
base model). Any targets, rank and layer count; the base model's weights are not in the folder."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

from ..keys import LayoutError, Shape
from .base import Family, LayoutSize

_KEY = re.compile(
    r"^(.*?)layers\.(\d+)\.((?:self_attn|mlp|attention|feed_forward)\.)?(\w+)\.lora_([AB])"
    r"(\.[^.]+)?\.weight$"
)


def infer(shapes: Mapping[str, Shape], stored: Mapping[str, Any]) -> LayoutSize:
    hits = [(m, s) for k, s in shapes.items() if (m := _KEY.match(k)) and len(s) == 2]
    if not hits:
        raise LayoutError("no layers.N.<module>.lora_A.weight keys")
    root = Counter(m.group(1) for m, _ in hits).most_common(1)[0][0]
    layers = sorted({int(m.group(2)) for m, _ in hits if m.group(1) == root})
    modules: dict[str, list[Any]] = {}  # name -> [parent (str), in, out]
    ranks: Counter = Counter()
    adapter = ""
    for m, s in hits:
        entry = modules.setdefault(m.group(4), [m.group(3) or "", 0, 0])
        if m.group(5) == "A":
            entry[1], ranks[s[0]] = s[1], ranks[s[0]] + 1
        else:
            entry[2] = s[0]
        adapter = m.group(6) or ""
    rank = ranks.most_common(1)[0][0]
    d = Counter(v[1] for v in modules.values() if v[1]).most_common(1)[0][0]
    cfg = dict(stored or {})
    prov = {
        "n_blocks": f"{len(layers)} distinct layers.N indices (max {max(layers)})",
        "d_model": "most common input size of the lora_A matrices [r, in]",
        "lora_rank": f"lora_A.weight [r, in] of {sum(ranks.values())} adapters"
        + (f"; adapter_config.json says r={cfg['r']}" if "r" in cfg else ""),
    }
    targets = tuple(sorted(modules))
    spec = tuple((n, modules[n][0], modules[n][1], modules[n][2]) for n in targets)
    contiguous = layers == list(range(len(layers)))
    return LayoutSize(
        len(layers),
        d,
        0,
        0,
        0,
        0,
        rank,
        (),
        None,
        (
            ("adapter", adapter),
            ("layers", () if contiguous else tuple(layers)),
            ("modules", spec),
            ("peft_targets", targets),
            ("prefix", root),
        ),
        prov,
    )


def expected(s: LayoutSize) -> dict[str, Shape]:
    root, adapter, r = s.get("prefix", "base_model.model.model."), s.get("adapter", ""), s.lora_rank
    layers = s.get("layers") or range(s.n_blocks)
    spec = s.get("modules") or tuple((n, "self_attn.", s.d_model, s.d_model) for n in ("q_proj", "v_proj"))
    out: dict[str, Shape] = {}
    for b in layers:
        for name, parent, d_in, d_out in spec:
            p = f"{root}layers.{b}.{parent}{name}"
            out[f"{p}.lora_A{adapter}.weight"] = (r, d_in)
            out[f"{p}.lora_B{adapter}.weight"] = (d_out, r)
    return out


FAMILY = Family(
    name="peft_llm",
    title="PEFT LLM adapter (SmolLM2 style)",
    description="a PEFT LoRA adapter for a causal language model (e.g. SmolLM2-135M, hidden 576): only "
    "lora_A.weight [r, in] / lora_B.weight [out, r] on the LLM's projections; the base model's "
    "weights are not in the file — not FLAG-TRADER",
    converts_to="nothing here: it needs its base LLM (adapter_config.json names it) and PEFT to run",
    convertible=False,
    carries_lora=True,
    signature=(r"layers\.\d+\.(self_attn|mlp)\.\w+\.lora_A(\.[^.]+)?\.weight$",),
    infer=infer,
    expected=expected,
)
