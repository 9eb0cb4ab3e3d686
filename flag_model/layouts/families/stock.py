"""FLAG-TRADER exported for stock PyTorch: `encoder` = nn.TransformerEncoder of nn.TransformerEncoderLayer,
LoRA merged. The export stores what a rebuild needs (activation, norm_first, batch_first, eps, heads)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ..keys import Shape, find, lin, norm
from .base import Family, LayoutSize, mha, positional, read_trunk


def stock_block(p: str, d: int, f: int) -> dict[str, Shape]:
    """nn.TransformerEncoderLayer keys, in its state_dict order."""
    return {
        **mha(f"{p}self_attn", d),
        **lin(f"{p}linear1", d, f),
        **lin(f"{p}linear2", f, d),
        **norm(f"{p}norm1", d),
        **norm(f"{p}norm2", d),
    }


def infer(shapes: Mapping[str, Shape], stored: Mapping[str, Any]) -> LayoutSize:
    t = read_trunk(
        shapes, r"state_embedding\.weight", "state_embedding.weight", "state_dim", "encoder.layers", r"linear1\.weight"
    )
    root, d, prov = t.root, t.d_model, t.provenance
    length, prov["max_length"] = positional(shapes, rf"^{re.escape(root)}pos_embedding$", d)
    head = find(shapes, rf"^{re.escape(root)}action_head\.weight$", lambda s: len(s) == 2)
    actions = head[1][0] if head else 3
    prov["n_actions"] = f"{head[0]} {list(head[1])}" if head else "default 3"
    return t.size(actions, length, stored, (("prefix", root),))


def expected(s: LayoutSize) -> dict[str, Shape]:
    root, d = s.get("prefix", ""), s.d_model
    out: dict[str, Shape] = {f"{root}pos_embedding": (1, s.max_length, d)} if s.max_length else {}
    out.update(lin(f"{root}state_embedding", s.state_dim, d))
    for b in range(s.n_blocks):
        out.update(stock_block(f"{root}encoder.layers.{b}.", d, s.ffn_dim))
    return {**out, **norm(f"{root}output_norm", d), **lin(f"{root}action_head", d, s.n_actions)}


FAMILY = Family(
    name="stock",
    title="FLAG-TRADER, stock PyTorch export",
    description="FLAG-TRADER with LoRA merged, as nn.TransformerEncoderLayer names (encoder.layers.N.self_attn."
    "in_proj_weight [3d, d], linear1/linear2); rebuild with activation='gelu', norm_first as stored",
    converts_to="native FLAG-TRADER without LoRA (split in_proj into q/k/v, linear1/2 → ffn.0/ffn.3)",
    convertible=True,
    carries_lora=False,
    signature=(
        r"encoder\.layers\.\d+\.self_attn\.in_proj_weight$",
        r"encoder\.layers\.\d+\.linear1\.weight$",
        r"(^|\.)state_embedding\.weight$",
    ),
    infer=infer,
    expected=expected,
)
