"""CGDT agent (shared/layouts/cgdt_agent.txt), saved as {'dt', 'critic', 'config'}: a decision transformer with
state/action/return/timestep encoders, a sinusoidal pos_encoding buffer over 3·max_length tokens, blocks of
nn.MultiheadAttention + `ffn.0`/`ffn.3` (the same stems as FLAG-TRADER, without LoRA), and a critic MLP."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ..keys import Shape, find, lin, norm
from .base import Family, LayoutSize, mha, positional, read_trunk, sequential, sequential_keys


def infer(shapes: Mapping[str, Shape], stored: Mapping[str, Any]) -> LayoutSize:
    t = read_trunk(
        shapes,
        r"state_encoder\.weight",
        "state_encoder.weight",
        "state_dim",
        "transformer_blocks",
        r"ffn\.0\.weight",
        True,
    )
    dt, d, prov = t.root, t.d_model, t.provenance
    act = find(shapes, rf"^{re.escape(dt)}action_encoder\.weight$", lambda s: len(s) == 2)
    actions = act[1][0] if act else 3
    prov["n_actions"] = f"{act[0]} {list(act[1])} = [actions, d]" if act else "default 3"
    ts = find(shapes, rf"^{re.escape(dt)}timestep_encoder\.weight$", lambda s: len(s) == 2)
    length = ts[1][0] if ts else 0
    prov["max_length"] = f"{ts[0]} {list(ts[1])} = [max_length, d]" if ts else "no timestep table"
    pe, _ = positional(shapes, rf"^{re.escape(dt)}pos_encoding\.pe$", d)
    root = dt[: -len("dt.")] if dt.endswith("dt.") else ""
    critic = sequential(shapes, f"{root}critic.network.")
    return t.size(actions, length, stored, (("critic", critic), ("dt", dt), ("pe_length", pe), ("prefix", root)))


def expected(s: LayoutSize) -> dict[str, Shape]:
    dt, root, d, f = s.get("dt", "dt."), s.get("prefix", ""), s.d_model, s.ffn_dim
    out: dict[str, Shape] = {
        **lin(f"{dt}state_encoder", s.state_dim, d),
        f"{dt}action_encoder.weight": (s.n_actions, d),
        **lin(f"{dt}return_encoder", 1, d),
        f"{dt}timestep_encoder.weight": (s.max_length, d),
        f"{dt}pos_encoding.pe": (1, s.get("pe_length") or 3 * s.max_length, d),
    }
    for b in range(s.n_blocks):
        p = f"{dt}transformer_blocks.{b}."
        out.update(
            {
                **mha(f"{p}attention", d),
                **norm(f"{p}norm1", d),
                **norm(f"{p}norm2", d),
                **lin(f"{p}ffn.0", d, f),
                **lin(f"{p}ffn.3", f, d),
            }
        )
    out.update({**norm(f"{dt}action_predictor.0", d), **lin(f"{dt}action_predictor.1", d, s.n_actions)})
    critic = s.get("critic") or ((0, "linear", d), (1, "norm", d), (4, "linear", d // 2), (6, "linear", 1))
    return {**out, **sequential_keys(f"{root}critic.network.", critic, s.state_dim)}


FAMILY = Family(
    name="cgdt_agent",
    title="CGDT agent",
    description="a critic-guided decision transformer agent {'dt', 'critic', 'config'}: state/action/return/"
    "timestep encoders, fused nn.MultiheadAttention blocks whose ffn.0/ffn.3 share FLAG-TRADER's "
    "stems but carry no LoRA, an action predictor and a separate critic — a different model",
    converts_to="nothing: a different model (return/timestep conditioning, interleaved tokens, a critic)",
    convertible=False,
    carries_lora=False,
    signature=(
        r"(^|\.)state_encoder\.weight$",
        r"(^|\.)return_encoder\.weight$",
        r"(^|\.)timestep_encoder\.weight$",
        r"(^|\.)action_predictor\.\d+\.weight$",
    ),
    infer=infer,
    expected=expected,
)
