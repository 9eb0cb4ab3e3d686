"""Model configuration: what the weights tell (shapes) and what they cannot (assumptions).

Every size is read from tensor shapes; nothing is hard-coded to d=256 or d=768. The four things the
weights cannot prove -- number of heads, LoRA scale, norm placement and the attention mask -- are kept
apart as *assumptions*, each with the place its value came from.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

# Sub-modules of one block that can carry a LoRA adapter, in display order.
BLOCK_LINEARS: tuple[str, ...] = (
    "attention.q_proj",
    "attention.k_proj",
    "attention.v_proj",
    "attention.out_proj",
    "ffn.0",
    "ffn.3",
)
SHORT_NAMES: dict[str, str] = {
    "attention.q_proj": "q",
    "attention.k_proj": "k",
    "attention.v_proj": "v",
    "attention.out_proj": "out",
    "ffn.0": "ffn.0",
    "ffn.3": "ffn.3",
}

DEFAULT_HEADS = 8


def linear_shapes(d_model: int, ffn_dim: int) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear of a block, in BLOCK_LINEARS order: the one per-projection table."""
    d, f = d_model, ffn_dim
    return {**{m: (d, d) for m in BLOCK_LINEARS[:4]}, "ffn.0": (d, f), "ffn.3": (f, d)}


DEFAULT_LORA_SCALE = 1.0

_BLOCK_KEY = re.compile(r"^transformer_blocks\.(\d+)\.")

# Keys a stored config may use for the values we read from it (training code varied).
STORED_HEADS = ("num_heads", "n_heads", "nhead", "n_head", "heads", "num_attention_heads")  # stored-config names
_STORED_ALPHA = ("lora_alpha", "alpha")
_STORED_RANK = ("lora_rank", "lora_r", "rank", "r")
_STORED_NORM_FIRST = ("norm_first", "pre_norm", "prenorm")
_STORED_CAUSAL = ("causal", "causal_mask", "use_causal_mask")


class ConfigError(ValueError):
    """The state dict does not have the shape of a FLAG-TRADER checkpoint."""


@dataclass(frozen=True)
class Sizes:
    """The sizes read from tensor shapes, shared by the model's config and every layout family's sizes."""

    n_blocks: int
    d_model: int
    ffn_dim: int
    state_dim: int
    n_actions: int
    max_length: int
    lora_rank: int


SIZE_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Sizes))


@dataclass(frozen=True)
class ModelConfig(Sizes):
    """Everything needed to rebuild the model.

    Shape fields (Sizes) are inferred from tensors; `num_heads`, `lora_scale`, `norm_first` and `causal` are
    assumptions. `provenance` maps each field name to where its value came from.
    """

    lora_targets: tuple[str, ...]  # full module paths carrying LoRA, e.g. "transformer_blocks.0.ffn.0"
    num_heads: int = DEFAULT_HEADS
    lora_scale: float = DEFAULT_LORA_SCALE
    norm_first: bool = False
    causal: bool = False
    ln_eps: float = 1e-5
    provenance: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)

    ASSUMPTIONS = ("num_heads", "lora_scale", "norm_first", "causal")

    def __post_init__(self) -> None:
        if self.num_heads < 1 or self.d_model % self.num_heads:
            divisors = [h for h in range(1, min(self.d_model, 64) + 1) if self.d_model % h == 0]
            raise ConfigError(
                f"{self.num_heads} heads do not divide the hidden size d={self.d_model}; choose one of {divisors}."
            )

    def check_windows(self, shape: tuple[int, ...], finite: bool = True) -> None:
        """Raise ValueError naming the problem when windows of `shape` (batch, window, state_dim) do not fit this
        model, or (`finite` False) hold NaN/Inf: the one input validation of the model, the engine and the analyses."""
        if len(shape) != 3 or shape[-1] != self.state_dim:
            raise ValueError(
                f"input must be (batch, window, {self.state_dim}) features; got {tuple(shape)}. "
                "Pad or select features so the last dimension matches state_dim."
            )
        if not 1 <= shape[1] <= self.max_length:
            raise ValueError(f"window length {shape[1]} is outside 1..{self.max_length} (the model's max_length).")
        if not finite:
            raise ValueError("the window contains NaN or infinite values; clean the features first.")

    @property
    def assumption_key(self) -> tuple[int, float, bool, bool]:
        """(num_heads, lora_scale, norm_first, causal): what a cached result depends on besides the file."""
        return (self.num_heads, self.lora_scale, self.norm_first, self.causal)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    def with_assumptions(self, **changes: Any) -> ModelConfig:
        """A copy with some assumptions changed (None values are ignored); provenance marks them as user-set."""
        changes = {k: v for k, v in changes.items() if v is not None}
        unknown = set(changes) - set(self.ASSUMPTIONS)
        if unknown:
            raise TypeError(f"not assumptions: {sorted(unknown)}; assumptions are {self.ASSUMPTIONS}")
        prov = dict(self.provenance)
        for k, v in changes.items():
            if v != getattr(self, k):
                prov[k] = "assumption: set by user"
        return replace(self, **changes, provenance=prov)

    def param_count(self) -> int:
        """Parameters of the model this config describes (a direct formula, independent of nn.Module)."""
        d, f, r = self.d_model, self.ffn_dim, self.lora_rank
        shapes = linear_shapes(d, f)
        per_block = sum(i * o + o for i, o in shapes.values()) + 4 * d
        lora = sum(r * (shapes[t.split(".", 2)[2]][0] + shapes[t.split(".", 2)[2]][1]) for t in self.lora_targets)
        top = self.max_length * d + self.state_dim * d + d + 2 * d + self.n_actions * (d + 1)
        return self.n_blocks * per_block + lora + top

    def to_dict(self) -> dict[str, Any]:
        """Plain values, safe to store in a checkpoint dict (loads with weights_only=True)."""
        return {
            "n_blocks": self.n_blocks,
            "d_model": self.d_model,
            "ffn_dim": self.ffn_dim,
            "state_dim": self.state_dim,
            "n_actions": self.n_actions,
            "max_length": self.max_length,
            "lora_rank": self.lora_rank,
            "lora_alpha": self.lora_scale * self.lora_rank,
            "num_heads": self.num_heads,
            "norm_first": self.norm_first,
            "causal": self.causal,
        }


def fallback_heads(d_model: int, wanted: int = DEFAULT_HEADS) -> int:
    """`wanted` when it divides d_model, else the largest divisor of d_model up to DEFAULT_HEADS: the one fallback
    for a head count that cannot be used (stored value, default 8, or a resized target)."""
    if wanted >= 1 and d_model % wanted == 0:
        return wanted
    return max(h for h in range(1, min(d_model, DEFAULT_HEADS) + 1) if d_model % h == 0)


def _first(stored: Mapping[str, Any], names: tuple[str, ...]) -> tuple[str, Any] | None:
    for n in names:
        if n in stored and stored[n] is not None:
            return n, stored[n]
    return None


def _flag(value: Any) -> bool:
    """A stored yes/no value; strings such as "false" or "0" are read as such, not as a non-empty string."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _shape(sd: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise ConfigError(
            f"missing '{key}', which every FLAG-TRADER checkpoint has; this file has another layout. "
            "Open the Architecture page (or run `python -m flag_model diff`) to see which one."
        )
    return tuple(sd[key].shape)


def infer_config(
    state_dict: Mapping[str, torch.Tensor],
    stored: Mapping[str, Any] | None = None,
) -> tuple[ModelConfig, list[str]]:
    """Infer the configuration from tensor shapes; take assumptions from `stored` config if present.

    Returns the config and a list of warnings (e.g. a stored value the shapes contradict).
    Raises ConfigError when a tensor the family always has is missing.
    """
    sd, stored, warnings = state_dict, dict(stored or {}), []
    prov: dict[str, str] = {}

    d, state_dim = _shape(sd, "state_embedding.weight")
    prov["d_model"] = prov["state_dim"] = "shape of state_embedding.weight [d, state_dim]"
    pos = _shape(sd, "pos_embedding")
    if len(pos) != 3 or pos[2] != d:
        raise ConfigError(f"pos_embedding has shape {list(pos)}; expected [1, max_length, {d}].")
    max_length = pos[1]
    prov["max_length"] = "shape of pos_embedding [1, max_length, d]"
    n_actions = _shape(sd, "action_head.weight")[0]
    prov["n_actions"] = "shape of action_head.weight [actions, d]"

    blocks = sorted({int(m.group(1)) for k in sd if (m := _BLOCK_KEY.match(k))})
    if not blocks:
        raise ConfigError("no 'transformer_blocks.N.' keys; this is not the FLAG-TRADER layout.")
    if blocks != list(range(len(blocks))):
        raise ConfigError(f"block indices are not contiguous from 0: {blocks}.")
    n_blocks = len(blocks)
    prov["n_blocks"] = f"count of transformer_blocks.N ({n_blocks} distinct N)"
    ffn_dim = _shape(sd, "transformer_blocks.0.ffn.0.base.weight")[0]
    prov["ffn_dim"] = "shape of transformer_blocks.0.ffn.0.base.weight [F, d]"

    targets = tuple(
        f"transformer_blocks.{b}.{m}"
        for b in blocks
        for m in BLOCK_LINEARS
        if f"transformer_blocks.{b}.{m}.lora.lora_A" in sd
    )
    ranks = Counter(sd[f"{t}.lora.lora_A"].shape[-1] for t in targets)
    rank = ranks.most_common(1)[0][0] if ranks else 0
    if len(ranks) > 1:  # the strict load then names the adapters whose shapes differ
        warnings.append(f"LoRA adapters have different ranks {sorted(ranks)}; assuming the most common, {rank}.")
    prov["lora_rank"] = "shape of lora_A [in, r]" if rank else "no lora_A tensors: no LoRA"
    prov["lora_targets"] = f"{len(targets)} modules have lora.lora_A"

    hit = _first(stored, STORED_HEADS)
    heads = int(hit[1]) if hit else DEFAULT_HEADS
    prov["num_heads"] = (
        f"assumption: stored config['{hit[0]}']"
        if hit
        else f"assumption: default {DEFAULT_HEADS} (not recoverable from weights)"
    )
    alpha, r_stored = _first(stored, _STORED_ALPHA), _first(stored, _STORED_RANK)
    if alpha and rank:
        scale = float(alpha[1]) / rank
        prov["lora_scale"] = f"assumption: stored config['{alpha[0]}'] / rank {rank}"
    else:
        scale = DEFAULT_LORA_SCALE
        prov["lora_scale"] = "assumption: default 1.0 (alpha = r = 16 in the training code)"
    if r_stored and rank and int(r_stored[1]) != rank:
        warnings.append(f"stored config says LoRA rank {r_stored[1]}, tensors say {rank}; using the tensors.")
    nf = _first(stored, _STORED_NORM_FIRST)
    norm_first = _flag(nf[1]) if nf else False
    prov["norm_first"] = (
        f"assumption: stored config['{nf[0]}']" if nf else "assumption: default post-norm (training code)"
    )
    ca = _first(stored, _STORED_CAUSAL)
    causal = _flag(ca[1]) if ca else False
    prov["causal"] = (
        f"assumption: stored config['{ca[0]}']" if ca else "assumption: default no mask (bidirectional, training code)"
    )

    for names, value, what in (
        (("d_model", "hidden_dim", "hidden_size", "embed_dim"), d, "hidden size"),
        (("n_layers", "num_layers", "n_blocks"), n_blocks, "block count"),
        (("state_dim", "input_dim"), state_dim, "state_dim"),
    ):
        hit = _first(stored, names)
        if hit and isinstance(hit[1], (int, float)) and int(hit[1]) != value:
            warnings.append(f"stored config says {what} {hit[1]} ('{hit[0]}'), tensors say {value}; using the tensors.")

    usable = fallback_heads(d, heads)
    if usable != heads:
        warnings.append(
            f"head count {heads} ({'stored' if hit else 'default'}) rejected: it does not divide the hidden size "
            f"d={d}. Falling back to {usable}."
        )
        prov["num_heads"] = f"assumption: default {usable} ({heads} did not divide d)"
    cfg = ModelConfig(
        n_blocks=n_blocks,
        d_model=d,
        ffn_dim=ffn_dim,
        state_dim=state_dim,
        n_actions=n_actions,
        max_length=max_length,
        lora_rank=rank,
        lora_targets=targets,
        num_heads=usable,
        lora_scale=scale,
        norm_first=norm_first,
        causal=causal,
        provenance=prov,
    )
    return cfg, warnings
