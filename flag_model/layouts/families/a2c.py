"""Transformer-A2C actor-critic (shared/layouts/transformer_a2c.txt): a pre-norm encoder of custom blocks with
nn.MultiheadAttention (`attention.in_proj_weight`), `ff.0`/`ff.3`, a LayerNorm'd input projection, a sinusoidal
`pos_encoding.pe` buffer, and actor/critic MLPs. Saved by its trainer under model_state_dict."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ..keys import Shape, lin, norm
from .base import Family, LayoutSize, mha, positional, read_trunk, sequential, sequential_keys


def infer(shapes: Mapping[str, Shape], stored: Mapping[str, Any]) -> LayoutSize:
    t = read_trunk(
        shapes,
        r"encoder\.input_proj\.0\.weight",
        "encoder.input_proj.0",
        "input_dim",
        "encoder.transformer_blocks",
        r"ff\.0\.weight",
    )
    root, d, prov = t.root, t.d_model, t.provenance
    length, prov["max_length"] = positional(shapes, rf"^{re.escape(root)}encoder\.pos_encoding\.pe$", d)
    actor = sequential(shapes, f"{root}actor.network.")
    critic = sequential(shapes, f"{root}critic.network.")
    actions = actor[-1][2] if actor else 3
    prov["n_actions"] = f"last layer of actor.network ({actions} outputs)" if actor else "default 3"
    return t.size(actions, length, stored, (("actor", actor), ("critic", critic), ("prefix", root)))


def expected(s: LayoutSize) -> dict[str, Shape]:
    root, d, f = s.get("prefix", ""), s.d_model, s.ffn_dim
    e = f"{root}encoder."
    out: dict[str, Shape] = {**lin(f"{e}input_proj.0", s.state_dim, d), **norm(f"{e}input_proj.1", d)}
    if s.max_length:
        out[f"{e}pos_encoding.pe"] = (1, s.max_length, d)
    for b in range(s.n_blocks):
        p = f"{e}transformer_blocks.{b}."
        out.update(
            {
                **norm(f"{p}norm1", d),
                **norm(f"{p}norm2", d),
                **mha(f"{p}attention", d),
                **lin(f"{p}ff.0", d, f),
                **lin(f"{p}ff.3", f, d),
            }
        )
    out.update(norm(f"{e}final_norm", d))
    actor = s.get("actor") or ((0, "linear", d // 2), (3, "linear", s.n_actions))
    critic = s.get("critic") or ((0, "linear", d // 2), (3, "linear", 1))
    return {
        **out,
        **sequential_keys(f"{root}actor.network.", actor, d),
        **sequential_keys(f"{root}critic.network.", critic, d),
    }


FAMILY = Family(
    name="a2c",
    title="Transformer-A2C",
    description="an actor-critic policy: pre-norm encoder blocks with fused nn.MultiheadAttention "
    "(attention.in_proj_weight [3d, d]), ff.0/ff.3, no LoRA, a sinusoidal pos_encoding buffer, "
    "and separate actor and critic networks — a different model, not FLAG-TRADER",
    converts_to="nothing: a different model (no LoRA, pre-norm, an actor-critic head); load it with its own class",
    convertible=False,
    carries_lora=False,
    signature=(
        r"encoder\.input_proj\.0\.weight$",
        r"encoder\.transformer_blocks\.\d+\.attention\.in_proj_weight$",
        r"actor\.network\.\d+\.weight$",
        r"encoder\.transformer_blocks\.\d+\.ff\.0\.weight$",
    ),
    infer=infer,
    expected=expected,
)
