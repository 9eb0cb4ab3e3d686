"""Shared by the three namings of the FLAG-TRADER model itself (native, PEFT-wrapped, the sketch): one size
inference and one key generator, parameterised by how each names a projection, its base and its LoRA matrices."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ...config import BLOCK_LINEARS, linear_shapes
from ..keys import LayoutError, Shape, find, indices, lin, norm
from .base import LayoutSize, lora_rank_of, need, positional, stored_heads


@dataclass(frozen=True)
class Naming:
    """How a variant names things. `module(m)`: block path of native module m ('attention.q_proj', 'ffn.0');
    `base(adapted)`: the level holding the nn.Linear; `lora(which, adapter)`: the key suffix of A or B;
    `peft_orientation`: A stored [r, in] and B [out, r] instead of [in, r] / [r, out]."""

    module: Callable[[str], str]
    base: Callable[[bool], str]
    lora: Callable[[str, str], str]
    peft_orientation: bool
    norms_first: bool  # block keys start with norm1/norm2 (the sketch registers them first)
    default_prefix: str = ""  # the root prefix when none was read from a file


NATIVE = Naming(lambda m: m, lambda adapted: ".base", lambda w, a: f".lora.lora_{w}", False, False)
PEFT = Naming(
    lambda m: m,
    lambda adapted: ".base_layer" if adapted else "",
    lambda w, a: f".lora_{w}{a}.weight",
    True,
    False,
    "base_model.model.",
)
SKETCH = Naming(lambda m: m.removeprefix("attention."), lambda adapted: ".base", lambda w, a: f".lora_{w}", False, True)


def infer(naming: Naming, shapes: Mapping[str, Shape], stored: Mapping[str, Any]) -> LayoutSize:
    """Every size from shapes; LoRA targets are exactly the modules that carry an A matrix."""
    emb = need(
        find(shapes, r"^(.*?)state_embedding(\.base_layer|\.base)?\.weight$", lambda s: len(s) == 2),
        "state_embedding.weight",
    )
    root = emb[2].group(1)
    (d, state_dim), prov = emb[1], {}
    prov["d_model"] = prov["state_dim"] = f"{emb[0]} {list(emb[1])} = [d, state_dim]"
    blocks = indices(shapes, rf"^{re.escape(root)}transformer_blocks\.(\d+)\.")
    if not blocks:
        raise LayoutError("no transformer_blocks.N keys")
    n_blocks = max(blocks) + 1
    prov["n_blocks"] = f"{len(blocks)} distinct transformer_blocks.N indices"
    ffn_mod = f"{root}transformer_blocks\\.\\d+\\.{re.escape(naming.module('ffn.0'))}"
    hit = find(shapes, rf"^{ffn_mod}(\.base_layer|\.base)?\.weight$", lambda s: len(s) == 2)
    ffn = hit[1][0] if hit else 4 * d
    prov["ffn_dim"] = f"{hit[0]} {list(hit[1])} = [F, d]" if hit else "default 4·d (no FFN weight found)"
    length, prov["max_length"] = positional(shapes, rf"^{re.escape(root)}pos_embedding$", d)
    head = find(shapes, rf"^{re.escape(root)}action_head(\.base_layer|\.base)?\.weight$", lambda s: len(s) == 2)
    actions = head[1][0] if head else 3
    prov["n_actions"] = f"{head[0]} {list(head[1])} = [actions, d]" if head else "default 3 (no action head found)"
    a_suffix = re.escape(naming.lora("A", "")).replace(r"\.weight", r"(\.[^.]+)?\.weight")
    rank, n = lora_rank_of(shapes, a_suffix + "$", 0 if naming.peft_orientation else 1)
    adapter = ""
    if naming.peft_orientation and (m := find(shapes, r"\.lora_A(\.[^.]+)\.weight$")):
        adapter = m[2].group(1)
    targets = tuple(
        f"transformer_blocks.{b}.{m}"
        for b in blocks
        for m in BLOCK_LINEARS
        if f"{root}transformer_blocks.{b}.{naming.module(m)}{naming.lora('A', adapter)}" in shapes
    )
    prov["lora_rank"] = f"{n} LoRA A matrices" if rank else "no LoRA A matrices: no LoRA"
    heads, prov["num_heads"] = stored_heads(stored)
    return LayoutSize(
        n_blocks,
        d,
        ffn,
        state_dim,
        actions,
        length,
        rank,
        targets,
        heads,
        (("adapter", adapter), ("prefix", root)),
        prov,
    )


def expected(naming: Naming, s: LayoutSize) -> dict[str, Shape]:
    """Keys and shapes in the variant's state_dict order."""
    root, adapter = s.get("prefix", naming.default_prefix), s.get("adapter", "")
    d, f, r = s.d_model, s.ffn_dim, s.lora_rank
    targets = set(s.native_targets())
    dims = linear_shapes(d, f)
    out: dict[str, Shape] = {}
    if s.max_length:
        out[f"{root}pos_embedding"] = (1, s.max_length, d)
    out.update(lin(f"{root}state_embedding", s.state_dim, d))
    for b in range(s.n_blocks):
        p = f"{root}transformer_blocks.{b}."
        if naming.norms_first:
            out.update({**norm(f"{p}norm1", d), **norm(f"{p}norm2", d)})
        for m, (i, o) in dims.items():
            adapted = f"transformer_blocks.{b}.{m}" in targets
            key = f"{p}{naming.module(m)}"
            lora = {}
            if adapted:
                a, bb = ((r, i), (o, r)) if naming.peft_orientation else ((i, r), (r, o))
                lora = {f"{key}{naming.lora('A', adapter)}": a, f"{key}{naming.lora('B', adapter)}": bb}
            base = lin(f"{key}{naming.base(adapted)}", i, o)
            out.update({**lora, **base} if naming.norms_first else {**base, **lora})
            if m == "attention.out_proj" and not naming.norms_first:
                out.update(norm(f"{p}norm1", d))
        if not naming.norms_first:
            out.update(norm(f"{p}norm2", d))
    return {**out, **norm(f"{root}output_norm", d), **lin(f"{root}action_head", d, s.n_actions)}
