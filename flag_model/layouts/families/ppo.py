"""PPO RegimeConditionedPolicy (shared/layouts/ppo_policy*.txt): feature projection, learned pos_encoding,
regime embedding, nn.TransformerEncoder of stock nn.TransformerEncoderLayer, actor and critic MLPs on the
[encoding, regime] concatenation (2·d inputs)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ..keys import Shape, find, lin
from .base import Family, LayoutSize, positional, read_trunk, sequential, sequential_keys
from .stock import stock_block


def infer(shapes: Mapping[str, Shape], stored: Mapping[str, Any]) -> LayoutSize:
    t = read_trunk(
        shapes, r"feature_proj\.weight", "feature_proj.weight", "feature_dim", "transformer.layers", r"linear1\.weight"
    )
    root, d, prov = t.root, t.d_model, t.provenance
    length, prov["max_length"] = positional(shapes, rf"^{re.escape(root)}pos_encoding$", d)
    reg = find(shapes, rf"^{re.escape(root)}regime_embed\.weight$", lambda s: len(s) == 2)
    regimes = reg[1][0] if reg else 0
    actor, critic = sequential(shapes, f"{root}actor."), sequential(shapes, f"{root}critic.")
    actions = actor[-1][2] if actor else 3
    prov["n_actions"] = f"last layer of actor ({actions} outputs)" if actor else "default 3"
    return t.size(
        actions, length, stored, (("actor", actor), ("critic", critic), ("prefix", root), ("regimes", regimes))
    )


def expected(s: LayoutSize) -> dict[str, Shape]:
    root, d = s.get("prefix", ""), s.d_model
    out: dict[str, Shape] = {f"{root}pos_encoding": (1, s.max_length, d)} if s.max_length else {}
    out.update(lin(f"{root}feature_proj", s.state_dim, d))
    if s.get("regimes"):
        out[f"{root}regime_embed.weight"] = (s.get("regimes"), d)
    for b in range(s.n_blocks):
        out.update(stock_block(f"{root}transformer.layers.{b}.", d, s.ffn_dim))
    actor = s.get("actor") or ((0, "linear", d), (3, "linear", s.n_actions))
    critic = s.get("critic") or ((0, "linear", d), (3, "linear", 1))
    return {**out, **sequential_keys(f"{root}actor.", actor, 2 * d), **sequential_keys(f"{root}critic.", critic, 2 * d)}


FAMILY = Family(
    name="ppo",
    title="PPO policy",
    description="a regime-conditioned PPO policy: feature_proj, regime_embed, a stock nn.TransformerEncoder "
    "(transformer.layers.N.self_attn.in_proj_weight, linear1/linear2), actor and critic on 2·d "
    "inputs — a different model, not FLAG-TRADER",
    converts_to="nothing: a different model (regime conditioning, actor-critic heads, no LoRA)",
    convertible=False,
    carries_lora=False,
    signature=(
        r"(^|\.)feature_proj\.weight$",
        r"(^|\.)regime_embed\.weight$",
        r"transformer\.layers\.\d+\.self_attn\.in_proj_weight$",
    ),
    infer=infer,
    expected=expected,
)
