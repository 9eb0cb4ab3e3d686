"""The FLAG-TRADER decision transformer, rebuilt so that module attribute names are the checkpoint keys.

    x (B, S, state_dim) -> state_embedding + pos_embedding[:, :S]
      -> n_blocks x TransformerBlock (post-norm by default: x = norm1(x + attn(x)); x = norm2(x + ffn(x)))
      -> output_norm -> action_head -> logits (B, S, n_actions); the decision is the last position.

Every projection is a LoRALinear: y = base(x) + scale * (x @ A @ B) with A [in, r] and B [r, out]
(not PEFT's [r, in] / [out, r]). Attention has no mask unless the `causal` assumption is set.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .config import ConfigError, ModelConfig, infer_config
from .limits import limits, too_big


class LoRA(nn.Module):
    """The low-rank update only: keys `lora_A` [in, r] and `lora_B` [r, out]."""

    def __init__(self, d_in: int, d_out: int, rank: int) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(d_in, rank))
        self.lora_B = nn.Parameter(torch.zeros(rank, d_out))  # zero B: a fresh adapter changes nothing
        nn.init.kaiming_uniform_(self.lora_A.T, a=math.sqrt(5))


def lora_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """scale·(A @ B)ᵀ [out, in] from A [in, r] and B [r, out], in float32 or wider (a half-precision file keeps the
    small update): the one formula for ΔW."""
    work = torch.promote_types(torch.promote_types(lora_A.dtype, lora_B.dtype), torch.float32)
    return scale * (lora_A.to(work) @ lora_B.to(work)).T


def merge_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale·(A @ B)ᵀ [out, in], computed in float32 or wider and returned in W's dtype."""
    work = torch.promote_types(
        torch.promote_types(weight.dtype, lora_A.dtype), torch.promote_types(lora_B.dtype, torch.float32)
    )
    return (weight.to(work) + lora_delta(lora_A.to(work), lora_B.to(work), scale)).to(weight.dtype)


class LoRALinear(nn.Module):
    """nn.Linear `base` plus an optional LoRA adapter `lora`. `lora_enabled=False` (on a copy) ablates it."""

    def __init__(self, d_in: int, d_out: int, rank: int, scale: float) -> None:
        super().__init__()
        self.base = nn.Linear(d_in, d_out)
        self.lora = LoRA(d_in, d_out, rank) if rank > 0 else None
        self.scale = scale
        self.lora_enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.lora is not None and self.lora_enabled:
            y = y + self.scale * ((x @ self.lora.lora_A) @ self.lora.lora_B)
        return y

    def delta_weight(self) -> torch.Tensor | None:
        """scale * (A @ B)^T, shaped like base.weight [out, in]; None without an (enabled) adapter."""
        if self.lora is None or not self.lora_enabled:
            return None
        return lora_delta(self.lora.lora_A, self.lora.lora_B, self.scale)

    def merged_weight(self) -> torch.Tensor:
        """W + scale * (A @ B)^T [out, in]: the plain weight an exported, merged file stores."""
        if self.lora is None or not self.lora_enabled:
            return self.base.weight
        return merge_weight(self.base.weight, self.lora.lora_A, self.lora.lora_B, self.scale)


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out projections (keys attention.{q,k,v,out}_proj)."""

    def __init__(self, cfg: ModelConfig, dropout: float) -> None:
        super().__init__()
        d, r, s = cfg.d_model, cfg.lora_rank, cfg.lora_scale
        self.q_proj = LoRALinear(d, d, r, s)
        self.k_proj = LoRALinear(d, d, r, s)
        self.v_proj = LoRALinear(d, d, r, s)
        self.out_proj = LoRALinear(d, d, r, s)
        self.num_heads = cfg.num_heads
        self.causal = cfg.causal
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, S, d) -> (y (B, S, d), probabilities (B, heads, S, S) or None)."""
        B, S, d = x.shape
        h = self.num_heads
        # (B, S, d) -> (B, h, S, d/h)
        q = self.q_proj(x).view(B, S, h, d // h).transpose(1, 2)
        k = self.k_proj(x).view(B, S, h, d // h).transpose(1, 2)
        v = self.v_proj(x).view(B, S, h, d // h).transpose(1, 2)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(d // h)  # (B, h, S, S)
        if self.causal:
            future = torch.ones(S, S, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        probs = scores.softmax(dim=-1)
        y = self.dropout(probs) @ v  # (B, h, S, d/h)
        y = y.transpose(1, 2).reshape(B, S, d)  # (B, h, S, d/h) -> (B, S, d)
        return self.out_proj(y), (probs if need_weights else None)


class TransformerBlock(nn.Module):
    """attention, norm1, ffn = Sequential(LoRALinear, GELU, Dropout, LoRALinear, Dropout), norm2."""

    def __init__(self, cfg: ModelConfig, dropout: float) -> None:
        super().__init__()
        d, f, r, s = cfg.d_model, cfg.ffn_dim, cfg.lora_rank, cfg.lora_scale
        self.attention = Attention(cfg, dropout)
        self.norm1 = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.ffn = nn.Sequential(
            LoRALinear(d, f, r, s), nn.GELU(), nn.Dropout(dropout), LoRALinear(f, d, r, s), nn.Dropout(dropout)
        )
        self.norm2 = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.norm_first = cfg.norm_first
        self.dropout = nn.Dropout(dropout)

    def ffn_linears(self) -> tuple[LoRALinear, LoRALinear]:
        """`ffn.0` (d -> F) and `ffn.3` (F -> d), typed (indexing nn.Sequential gives a plain Module)."""
        first, second = self.ffn[0], self.ffn[3]
        if not (isinstance(first, LoRALinear) and isinstance(second, LoRALinear)):
            raise TypeError("ffn.0 and ffn.3 must be LoRALinear")
        return first, second

    def forward(self, x: torch.Tensor, need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.norm_first:
            a, probs = self.attention(self.norm1(x), need_weights)
            x = x + self.dropout(a)
            return x + self.ffn(self.norm2(x)), probs
        a, probs = self.attention(x, need_weights)
        x = self.norm1(x + self.dropout(a))
        return self.norm2(x + self.ffn(x)), probs


class FlagTrader(nn.Module):
    """The reconstruction. forward(x (B, S, state_dim)) -> logits (B, S, n_actions)."""

    def __init__(self, cfg: ModelConfig, dropout: float = 0.1) -> None:
        super().__init__()
        self.config = cfg
        d = cfg.d_model
        self.pos_embedding = nn.Parameter(torch.zeros(1, cfg.max_length, d))
        nn.init.normal_(self.pos_embedding, std=0.02)
        self.state_embedding = nn.Linear(cfg.state_dim, d)
        self.transformer_blocks = nn.ModuleList(TransformerBlock(cfg, dropout) for _ in range(cfg.n_blocks))
        self.output_norm = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.action_head = nn.Linear(d, cfg.n_actions)
        # Adapters live only where the checkpoint has them; the rest are plain LoRALinear bases.
        targets = set(cfg.lora_targets)
        for name, mod in self.named_modules():
            if isinstance(mod, LoRALinear) and name not in targets:
                mod.lora = None

    def check_input(self, x: torch.Tensor) -> None:
        self.config.check_windows(tuple(x.shape))

    def forward(self, x: torch.Tensor, return_attention: bool = False) -> Any:
        """x (B, S, state_dim) -> logits (B, S, n_actions); with return_attention also a list of
        n_blocks attention probability tensors (B, heads, S, S)."""
        self.check_input(x)
        h = self.state_embedding(x) + self.pos_embedding[:, : x.shape[1]]
        maps = []
        for block in self.transformer_blocks:
            h, probs = block(h, return_attention)
            maps.append(probs)
        logits = self.action_head(self.output_norm(h))
        return (logits, maps) if return_attention else logits

    def blocks(self) -> list[TransformerBlock]:
        """`transformer_blocks`, typed (iterating nn.ModuleList gives plain Modules)."""
        return [b for b in self.transformer_blocks if isinstance(b, TransformerBlock)]

    def linears(self) -> dict[str, LoRALinear]:
        """Every LoRALinear by its module path (the checkpoint key stem)."""
        return {n: m for n, m in self.named_modules() if isinstance(m, LoRALinear)}


class ModelMismatchError(ValueError):
    """A state dict that does not load strictly; lists every missing, unexpected and mis-shaped key."""

    def __init__(
        self, missing: list[str], unexpected: list[str], mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]
    ) -> None:
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        lines = [
            f"checkpoint does not fit the reconstruction: {len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(mismatched)} mis-shaped keys."
        ]
        lines += [f"  missing: {k}" for k in missing[:20]]
        lines += [f"  unexpected: {k}" for k in unexpected[:20]]
        lines += [f"  shape: {k} file {list(a)} vs model {list(b)}" for k, a, b in mismatched[:20]]
        lines.append("See the Architecture page or `python -m flag_model diff` for the cause and a fix.")
        super().__init__("\n".join(lines))


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the reconstruction for `cfg`, built on the meta device (no memory for weights)."""
    with torch.device("meta"):
        model = FlagTrader(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def find_mismatch(
    expected: Mapping[str, tuple[int, ...]], state_dict: Mapping[str, torch.Tensor]
) -> ModelMismatchError | None:
    """The error a strict load would raise (keys sorted), or None when keys and shapes match exactly."""
    from .layouts.diff import (
        diff_keys,  # the one key diff; imported here because flag_model.layouts imports this module
    )

    diff = diff_keys(state_dict, expected)
    if diff.ok:
        return None
    return ModelMismatchError(sorted(diff.missing), sorted(diff.unexpected), sorted(diff.mismatched))


def build_model(
    ckpt: Any,
    num_heads: int | None = None,
    lora_scale: float | None = None,
    norm_first: bool | None = None,
    causal: bool | None = None,
) -> FlagTrader:
    """Rebuild the model from a Checkpoint (or a bare state dict), load it strictly, return it in eval mode.

    Assumptions left as None keep the checkpoint's values (stored config, else the documented defaults).
    Raises ConfigError / ModelMismatchError with a readable message when the file does not fit.
    """
    if isinstance(ckpt, Mapping):
        state_dict, cfg = ckpt, infer_config(ckpt)[0]
    else:
        state_dict, cfg = ckpt.state_dict, ckpt.require_config()
    cfg = cfg.with_assumptions(num_heads=num_heads, lora_scale=lora_scale, norm_first=norm_first, causal=causal)
    # Shapes first, on the meta device: a small file whose shapes claim a huge model is refused before any
    # weight is allocated (the model is about as large as the file's declared values, bounded by max_params).
    expected = expected_shapes(cfg)
    error = find_mismatch(expected, state_dict)
    if error is not None:
        raise error
    params = sum(math.prod(s) for s in expected.values())
    if params > limits().max_params:
        raise ConfigError(too_big("the model's parameter count", params, "max_params"))
    try:
        model = FlagTrader(cfg)
        model.load_state_dict(state_dict, strict=True)
    except (MemoryError, RuntimeError) as exc:  # allocation failure, or a storage that cannot be read
        raise ConfigError(
            f"the model could not be built: {type(exc).__name__}: {str(exc)[:200]}. The machine may "
            "be short of memory; close other sessions or ask the operator."
        ) from None
    return model.eval()
