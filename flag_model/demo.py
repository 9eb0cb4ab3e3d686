"""The built-in demo: deterministic synthetic 5-minute market data and a checkpoint trained on it.

The demo checkpoint has the documented layout (12 blocks, d=256, FFN 1024, LoRA rank 16, 60 features,
3 actions, max_length 256: 343 tensors) and is trained like the original: the base weights stay at their
random initialisation, only LoRA, embeddings, norms and the head learn. It is built once (about two
minutes on 2 cores) and cached on disk outside the repository.
"""
from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .config import BLOCK_LINEARS, ModelConfig
from .engine import cpu_bf16_native
from .features import SIMPLE60_NAMES, LabelRule, compute_labels, simple60
from .model import FlagTrader

Progress = Callable[[float, str], None]

DEMO_VERSION = 3  # 3: simple-60 exactly as FEATURES.md; the bar interval stored
START = pd.Timestamp("2025-01-06 00:00:00")
BAR = pd.Timedelta(minutes=5)

# Regimes of the synthetic market: drift per bar, AR(1) on returns, pull towards the 50-bar mean.
_REGIMES = (
    ("up-trend", 1.0e-3, 0.10, 0.0),
    ("down-trend", -1.0e-3, 0.10, 0.0),
    ("mean-reverting", 0.0, -0.25, 0.08),
    ("quiet", 0.0, 0.0, 0.0),
)


@dataclass(frozen=True)
class DemoSpec:
    """Size and training budget of a demo checkpoint."""

    n_blocks: int
    d_model: int
    ffn_dim: int
    lora_rank: int
    max_length: int
    num_heads: int
    n_bars: int
    steps: int
    batch: int
    window: int
    lr: float


DEMO_SIZES: dict[str, DemoSpec] = {
    "full": DemoSpec(12, 256, 1024, 16, 256, 8, n_bars=24_000, steps=200, batch=48, window=64, lr=2e-3),
    "tiny": DemoSpec(2, 32, 64, 4, 64, 4, n_bars=8_000, steps=300, batch=64, window=32, lr=1e-2),
}


def synthetic_ohlcv(n_bars: int = 24_000, seed: int = 7) -> pd.DataFrame:
    """Deterministic 5-minute OHLCV bars with regime switching, volatility clustering and intraday volume.

    Returns a DataFrame with columns datetime, timestamp (ms), open, high, low, close, volume.
    """
    rng = np.random.default_rng(seed)
    n = n_bars
    regime = np.empty(n, dtype=np.int64)
    state = 0
    for t in range(n):
        if rng.random() < 1 / 500:  # regimes last ~40 hours on average
            state = int(rng.integers(len(_REGIMES)))
        regime[t] = state
    drift = np.array([r[1] for r in _REGIMES])[regime]
    ar = np.array([r[2] for r in _REGIMES])[regime]
    pull = np.array([r[3] for r in _REGIMES])[regime]
    eps = rng.standard_normal(n)
    logp = np.empty(n)
    ret = np.zeros(n)
    var = 1.5e-3 ** 2
    logp[0] = math.log(2500.0)
    for t in range(1, n):
        var = 1.2e-7 + 0.08 * ret[t - 1] ** 2 + 0.85 * var  # GARCH(1,1): volatility comes in clusters
        mean_dev = logp[t - 1] - logp[max(0, t - 50):t].mean()
        ret[t] = drift[t] + ar[t] * ret[t - 1] - pull[t] * mean_dev + math.sqrt(var) * eps[t]
        logp[t] = logp[t - 1] + ret[t]
    close = np.exp(logp)
    open_ = np.r_[close[0], close[:-1]]
    wick = np.abs(rng.standard_normal((2, n))) * np.sqrt(2e-7 + 0.5 * ret ** 2)
    high = np.maximum(open_, close) * (1 + wick[0])
    low = np.minimum(open_, close) * (1 - wick[1])
    times = pd.date_range(START, periods=n, freq=BAR)
    hour = times.hour.to_numpy()
    seasonal = 1 + 0.5 * np.sin(2 * np.pi * (hour - 8) / 24)
    volume = 800 * seasonal * (1 + 40 * np.abs(ret)) * rng.lognormal(0, 0.3, n)
    return pd.DataFrame({
        "datetime": times, "timestamp": (times - pd.Timestamp(0)) // pd.Timedelta(milliseconds=1),
        "open": open_, "high": high, "low": low, "close": close, "volume": volume,
    })


def demo_config(spec: DemoSpec) -> ModelConfig:
    targets = tuple(f"transformer_blocks.{b}.{m}" for b in range(spec.n_blocks) for m in BLOCK_LINEARS)
    return ModelConfig(
        n_blocks=spec.n_blocks, d_model=spec.d_model, ffn_dim=spec.ffn_dim, state_dim=len(SIMPLE60_NAMES),
        n_actions=3, max_length=spec.max_length, lora_rank=spec.lora_rank, lora_targets=targets,
        num_heads=spec.num_heads,
    )


def cache_dir() -> Path:
    """Where built demos live: $FLAG_TRADER_CACHE, else ~/.cache/flag_trader (never inside the repo)."""
    return Path(os.environ.get("FLAG_TRADER_CACHE", Path.home() / ".cache" / "flag_trader"))


def demo_path(size: str = "full") -> Path:
    spec = DEMO_SIZES[size]
    tag = hashlib.sha256(f"{DEMO_VERSION}{spec}".encode()).hexdigest()[:10]
    return cache_dir() / f"demo-{size}-{tag}.pt"


def demo_data(size: str = "full") -> pd.DataFrame:
    """The synthetic market the demo checkpoint was trained on (deterministic)."""
    return synthetic_ohlcv(DEMO_SIZES[size].n_bars)


def _windows(x: torch.Tensor, y: torch.Tensor, starts: np.ndarray, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.as_tensor(starts)[:, None] + torch.arange(w)  # (B, w)
    return x[idx], y[idx]


def train_demo(size: str = "full", progress: Progress | None = None, seed: int = 0) -> dict:
    """Train the demo checkpoint; returns the dict that `build_demo` saves."""
    spec = DEMO_SIZES[size]
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    report = progress or (lambda f, m: None)
    report(0.0, "generating synthetic market data")
    bars = synthetic_ohlcv(spec.n_bars)
    feats = simple60(bars)
    labels = compute_labels(bars["close"].to_numpy(), LabelRule())[feats.index.to_numpy()]
    n = len(feats)
    split = int(n * 0.8)  # chronological: the last 20 % is held out
    mean = feats.iloc[:split].mean().to_numpy(np.float64)
    std = feats.iloc[:split].std(ddof=0).to_numpy(np.float64)
    std = np.where(std > 1e-12, std, 1.0)
    x = torch.tensor(((feats.to_numpy(np.float64) - mean) / std).clip(-10, 10), dtype=torch.float32)
    y = torch.tensor(labels, dtype=torch.long)

    cfg = demo_config(spec)
    model = FlagTrader(cfg, dropout=0.1)
    for name, p in model.named_parameters():
        p.requires_grad = ".base." not in name  # the original froze its randomly initialised base
    for mod in model.linears().values():
        if mod.lora is not None:  # LoRA-paper init of B is zero; a small start lets every adapter learn
            torch.nn.init.normal_(mod.lora.lora_B, std=1e-3)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.01)
    counts = torch.bincount(y[:split], minlength=3).float()
    weight = (counts.sum() / (3 * counts)).clamp(max=3.0)
    w = spec.window
    bf16 = cpu_bf16_native()[0]
    t0 = time.perf_counter()
    model.train()
    for step in range(spec.steps):
        lr = spec.lr * min(1.0, (step + 1) / 20) * (0.5 + 0.5 * math.cos(math.pi * step / spec.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        xb, yb = _windows(x, y, rng.integers(0, split - w, spec.batch), w)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # ~2x faster where bf16 is native
            logits = model(xb)
        # The decision is the last position; training every position would reward looking at the
        # future bars that earlier positions can see (the model has no mask).
        loss = F.cross_entropy(logits[:, -1].float(), yb[:, -1], weight=weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 5 == 0 or step == spec.steps - 1:
            report(0.05 + 0.85 * (step + 1) / spec.steps,
                   f"training step {step + 1}/{spec.steps}, loss {loss.item():.3f}, {time.perf_counter() - t0:.0f} s")
    model.eval()
    report(0.92, "evaluating on held-out data")
    ends = np.arange(split + w - 1, n, 4)  # rolling windows over the held-out 20 %, decision = last bar
    with torch.inference_mode():
        xb, yb = _windows(x, y, ends - (w - 1), w)
        pred = model(xb).argmax(-1)
    val_acc = (pred[:, -1] == yb[:, -1]).float().mean().item()
    all_acc = (pred == yb).float().mean().item()
    baseline = (torch.bincount(yb[:, -1], minlength=3).max() / len(yb)).item()
    report(1.0, f"held-out accuracy {val_acc:.3f} (last position) vs majority baseline {baseline:.3f}")
    return {
        "model_state_dict": model.state_dict(),
        "config": {**cfg.to_dict(), "dropout": 0.1, "window": w},
        "feature_set": "simple-60",
        "feature_names": list(SIMPLE60_NAMES),
        "feature_mean": mean.tolist(),
        "feature_std": std.tolist(),
        "label_rule": {"horizon": LabelRule().horizon, "threshold": LabelRule().threshold},
        "bar_interval": "5min",  # the synthetic market's BAR; pages compare uploaded data against it
        "epoch": spec.steps,
        "train_loss": loss.item(),
        "val_accuracy": val_acc,
        "val_accuracy_all_positions": all_acc,
        "majority_baseline": baseline,
        "val_windows": len(ends),
        "data": f"synthetic demo market, seed 7, {spec.n_bars} bars; last 20 % held out",
        "demo_version": DEMO_VERSION,
    }


def build_demo(size: str = "full", progress: Progress | None = None, force: bool = False) -> Path:
    """Path of the cached demo checkpoint, training and saving it first if needed."""
    if size not in DEMO_SIZES:
        raise ValueError(f"unknown demo size {size!r}; choose one of {sorted(DEMO_SIZES)}")
    path = demo_path(size)
    if path.exists() and not force:
        return path
    ckpt = train_demo(size, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(ckpt, tmp)
    tmp.replace(path)  # atomic: a concurrent reader never sees half a file
    return path
