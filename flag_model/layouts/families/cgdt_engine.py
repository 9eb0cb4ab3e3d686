"""The other CGDT, the decision engine (shared/layouts/cgdt_engine.txt): GPT-style blocks `blocks.N` with ln_1,
attn.{query,key,value,proj}, a causal `attn.mask` buffer [1, 1, T, T], ln_2, mlp.0/mlp.2; return, action and
critic heads. The real trainer checkpoint {'model','optimizer','step','config'} pickles its config as a dataclass,
which the restricted reader turns into fields."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ..keys import Shape, find, lin, norm
from .base import Family, LayoutSize, positional, read_trunk


def infer(shapes: Mapping[str, Shape], stored: Mapping[str, Any]) -> LayoutSize:
    t = read_trunk(shapes, r"state_embed\.weight", "state_embed.weight", "state_dim", "blocks", r"mlp\.0\.weight")
    root, d, prov = t.root, t.d_model, t.provenance
    length, prov["max_length"] = positional(shapes, rf"^{re.escape(root)}pos_embed$", d)
    head = find(shapes, rf"^{re.escape(root)}action_head\.weight$", lambda s: len(s) == 2)
    actions = head[1][0] if head else 3
    prov["n_actions"] = f"{head[0]} {list(head[1])}" if head else "default 3"
    ts = find(shapes, rf"^{re.escape(root)}timestep_embed\.weight$", lambda s: len(s) == 2)
    mask = find(shapes, r"blocks\.\d+\.attn\.mask$", lambda s: len(s) == 4)
    return t.size(
        actions,
        length,
        stored,
        (("mask", mask[1][-1] if mask else 0), ("prefix", root), ("timesteps", ts[1][0] if ts else 0)),
    )


def expected(s: LayoutSize) -> dict[str, Shape]:
    root, d, f = s.get("prefix", ""), s.d_model, s.ffn_dim
    out: dict[str, Shape] = {f"{root}pos_embed": (1, s.max_length, d)} if s.max_length else {}
    out.update(
        {
            **lin(f"{root}state_embed", s.state_dim, d),
            f"{root}action_embed.weight": (s.n_actions, d),
            **lin(f"{root}return_embed", 1, d),
        }
    )
    if s.get("timesteps"):
        out[f"{root}timestep_embed.weight"] = (s.get("timesteps"), d)
    for b in range(s.n_blocks):
        p = f"{root}blocks.{b}."
        out.update(norm(f"{p}ln_1", d))
        if s.get("mask"):
            out[f"{p}attn.mask"] = (1, 1, s.get("mask"), s.get("mask"))
        for n in ("query", "key", "value", "proj"):
            out.update(lin(f"{p}attn.{n}", d, d))
        out.update({**norm(f"{p}ln_2", d), **lin(f"{p}mlp.0", d, f), **lin(f"{p}mlp.2", f, d)})
    return {
        **out,
        **norm(f"{root}ln_f", d),
        **lin(f"{root}action_head", d, s.n_actions),
        **lin(f"{root}return_head", d, 1),
        **lin(f"{root}critic_head", d, s.n_actions),
    }


FAMILY = Family(
    name="cgdt_engine",
    title="CGDT decision engine",
    description="a GPT-style decision transformer: blocks.N with ln_1/ln_2 (pre-norm), attn.query/key/value/proj, "
    "a causal attn.mask buffer, mlp.0/mlp.2, and action/return/critic heads — a different model",
    converts_to="nothing: a different model (causal, interleaved return/state/action tokens, three heads)",
    convertible=False,
    carries_lora=False,
    signature=(
        r"blocks\.\d+\.attn\.(query|key|value)\.weight$",
        r"blocks\.\d+\.attn\.mask$",
        r"(^|\.)state_embed\.weight$",
        r"(^|\.)critic_head\.weight$",
    ),
    infer=infer,
    expected=expected,
)
