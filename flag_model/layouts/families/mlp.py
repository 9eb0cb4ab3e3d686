"""MLP policies: the untrained fallback a loader silently used (shared/layouts/fallback_mlp.txt: net.0/3/6), the
PEFT FLAGTrader class's fallback {'fallback': encoder.0/2 + policy_head + value_head} and its heads.pt
(policy_head/value_head only). No attention, no blocks: an MLP on one feature vector, not a transformer."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

from ..keys import LayoutError, Shape, find, lin
from .base import Family, LayoutSize, sequential, sequential_keys

_LAYER = re.compile(r"^(.*?)(\d+)\.weight$")
_HEADS = ("policy_head", "action_head", "value_head")
_TRANSFORMER = re.compile(r"attn|attention|transformer|blocks\.|layers\.\d+\.|in_proj|lora")


def infer(shapes: Mapping[str, Shape], stored: Mapping[str, Any]) -> LayoutSize:
    if any(_TRANSFORMER.search(k) for k in shapes):
        raise LayoutError("the file has attention or transformer blocks")
    groups = Counter(m.group(1) for k, s in shapes.items() if (m := _LAYER.match(k)) and len(s) == 2)
    chain_prefix = groups.most_common(1)[0][0] if groups else ""
    chain = sequential(shapes, chain_prefix) if groups else ()
    root = chain_prefix.rsplit(".", 2)[0] + "." if chain_prefix.count(".") >= 2 else ""
    if not groups:
        head = find(shapes, r"^(.*?)(policy_head|action_head)\.weight$", lambda s: len(s) == 2)
        if head is None:
            raise LayoutError("no Linear chain and no policy head")
        root = head[2].group(1)
    heads = tuple((n, shapes[f"{root}{n}.weight"][0]) for n in _HEADS if f"{root}{n}.weight" in shapes)
    first = shapes.get(f"{chain_prefix}{chain[0][0]}.weight") if chain else None
    hidden = chain[0][2] if chain else shapes[f"{root}{heads[0][0]}.weight"][1]  # the first hidden width
    state_dim = first[1] if first else hidden
    policy = next((n for n, out in heads if n != "value_head"), None)
    actions = dict(heads)[policy] if policy else (chain[-1][2] if chain else 0)
    prov = {
        "state_dim": f"{chain_prefix}{chain[0][0]}.weight {list(first)} = [hidden, inputs]"
        if first
        else "no input layer in the file (heads only)",
        "d_model": f"width of the first hidden layer ({hidden})",
        "n_actions": f"{policy or 'last layer'} outputs",
        "n_blocks": "an MLP has no transformer blocks",
    }
    return LayoutSize(
        0,
        hidden,
        0,
        state_dim,
        actions,
        0,
        0,
        (),
        None,
        (("chain", chain), ("chain_prefix", chain_prefix), ("heads", heads), ("prefix", root)),
        prov,
    )


def expected(s: LayoutSize) -> dict[str, Shape]:
    chain, prefix, root = s.get("chain"), s.get("chain_prefix", "net."), s.get("prefix", "")
    if chain is None:  # not read from a file: the fallback MLP's shape (Linear, ReLU, Dropout) x 3
        chain = ((0, "linear", s.d_model), (3, "linear", s.d_model // 2), (6, "linear", s.n_actions))
    out = sequential_keys(prefix, chain, s.state_dim) if chain else {}
    hidden = chain[-1][2] if chain else s.d_model
    for name, n_out in s.get("heads", ()):
        out.update(lin(f"{root}{name}", hidden, n_out))
    return out


FAMILY = Family(
    name="mlp",
    title="MLP policy / fallback",
    description="an MLP policy (nn.Sequential of Linear layers, optional policy/value heads) on one feature vector: "
    "no attention, no positions, no LoRA — this is an MLP policy, not a transformer (the untrained "
    "fallback that loaders silently used looks like this)",
    converts_to="nothing: an MLP is not a transformer; there is no FLAG-TRADER model in the file",
    convertible=False,
    carries_lora=False,
    signature=(
        r"^[\w.]*?(net|encoder|network|mlp|fc|policy|fallback)\.\d+\.weight$",
        r"(^|\.)(policy_head|value_head)\.weight$",
    ),
    infer=infer,
    expected=expected,
)
