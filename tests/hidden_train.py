"""Tiny checkpoints trained with hidden assumptions (heads, mask, norm placement, LoRA scale), for the hypotheses
tests: seeded, a few seconds each on synthetic OHLCV, saved like the training code but without the hidden values."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from flag_model.config import BLOCK_LINEARS, ModelConfig
from flag_model.demo import synthetic_ohlcv
from flag_model.features import LabelRule, compute_labels, simple60
from flag_model.model import FlagTrader


def hidden_bars(n_bars: int = 800, seed: int = 3) -> pd.DataFrame:
    return synthetic_ohlcv(n_bars, seed=seed)


def train_hidden(
    bars: pd.DataFrame,
    num_heads: int,
    causal: bool,
    norm_first: bool,
    lora_scale: float,
    seed: int = 0,
    d: int = 32,
    blocks: int = 2,
    ffn: int = 64,
    rank: int = 4,
    window: int = 16,
    steps: int = 500,
    batch: int = 64,
    lr: float = 1e-2,
) -> dict:
    """Train like the original (base frozen at random init; LoRA, embeddings, norms, head learn; loss at the
    decision position) and return the saved dict; its config names no head count, alpha, norm or mask."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    feats = simple60(bars)
    labels = compute_labels(bars["close"].to_numpy(), LabelRule())[feats.index.to_numpy()]
    mean, std = feats.mean().to_numpy(np.float64), feats.std(ddof=0).to_numpy(np.float64)
    std = np.where(std > 1e-12, std, 1.0)
    x = torch.tensor((feats.to_numpy(np.float64) - mean) / std, dtype=torch.float32)
    y = torch.tensor(labels, dtype=torch.long)
    targets = tuple(f"transformer_blocks.{b}.{m}" for b in range(blocks) for m in BLOCK_LINEARS)
    cfg = ModelConfig(
        n_blocks=blocks,
        d_model=d,
        ffn_dim=ffn,
        state_dim=60,
        n_actions=3,
        max_length=64,
        lora_rank=rank,
        lora_targets=targets,
        num_heads=num_heads,
        lora_scale=lora_scale,
        norm_first=norm_first,
        causal=causal,
    )
    model = FlagTrader(cfg, dropout=0.0)
    for name, p in model.named_parameters():
        p.requires_grad = ".base." not in name
    for mod in model.linears().values():
        if mod.lora is not None:
            torch.nn.init.normal_(mod.lora.lora_B, std=0.02)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    n = len(x)
    model.train()
    for _ in range(steps):
        ends = torch.as_tensor(rng.integers(window - 1, n - 5, batch))
        idx = ends[:, None] - (window - 1) + torch.arange(window)
        loss = F.cross_entropy(model(x[idx])[:, -1], y[ends])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {
        "model_state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "config": {"d_model": d, "n_layers": blocks, "lora_rank": rank, "window": window},
        "feature_set": "simple-60",
        "feature_mean": mean.tolist(),
        "feature_std": std.tolist(),
        "train_loss": float(loss.detach()),
    }
