"""The built-in demo: deterministic synthetic 5-minute market data and a checkpoint trained on it.

The demo checkpoint has the documented layout (12 blocks, d=256, FFN 1024, LoRA rank 16, 60 features,
3 actions, max_length 256: 343 tensors) and is trained like the original: the base weights stay at their
random initialisation, only LoRA, embeddings, norms and the head learn. It is built once (about
30 s on 2 idle cores) and cached on disk outside the repository.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .config import BLOCK_LINEARS, ModelConfig
from .engine import cpu_bf16_native
from .features import SIMPLE60_NAMES, LabelRule, compute_labels, simple60
from .model import FlagTrader

Progress = Callable[[float, str], object]

# 3: simple-60 exactly as FEATURES.md; the bar interval stored. 4: built in under a minute, feature_clip stored.
# 5: cheaper (28 steps without dropout, fewer calibration and evaluation windows): about 55 s of CPU time.
DEMO_VERSION = 5
FEATURE_CLIP = 10.0  # normalised features are clipped to ±this in training; stored as "feature_clip"
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
    b_init: float = 1e-3  # std of LoRA B at the start of training (the LoRA paper starts at 0)
    # Query and key adapters of these blocks start large: a frozen random base attends almost uniformly
    # (scores of std ~0.3), and a one-minute training cannot change that, but a demo should show focused heads.
    focus_blocks: tuple[int, ...] = ()
    focus_b_init: float = 0.0
    calib_windows: int = 192  # training windows the class-share offsets are fitted on
    eval_windows: int = 256  # held-out windows for the stored val_accuracy
    dropout: float = 0.0  # in training; a run this short needs no regularisation, and dropout cost a tenth of it


DEMO_SIZES: dict[str, DemoSpec] = {
    # About 55 s of CPU time in all (28 steps of 1.4 s single-threaded; two idle cores: about 30 s): short windows,
    # few steps, adapters that start non-zero, and class shares matched afterwards (see train_demo).
    "full": DemoSpec(
        12,
        256,
        1024,
        16,
        256,
        8,
        n_bars=24_000,
        steps=28,
        batch=32,
        window=32,
        lr=3e-3,
        b_init=0.02,
        focus_blocks=(2, 5, 8, 11),
        focus_b_init=0.8,
    ),
    # Tests: not trained at all, seeded values in every trainable tensor (about a second).
    "tiny": DemoSpec(2, 32, 64, 4, 64, 4, n_bars=8_000, steps=0, batch=0, window=32, lr=0.0),
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
    var = 1.5e-3**2
    logp[0] = math.log(2500.0)
    for t in range(1, n):
        var = 1.2e-7 + 0.08 * ret[t - 1] ** 2 + 0.85 * var  # GARCH(1,1): volatility comes in clusters
        mean_dev = logp[t - 1] - logp[max(0, t - 50) : t].mean()
        ret[t] = drift[t] + ar[t] * ret[t - 1] - pull[t] * mean_dev + math.sqrt(var) * eps[t]
        logp[t] = logp[t - 1] + ret[t]
    close = np.exp(logp)
    open_ = np.r_[close[0], close[:-1]]
    wick = np.abs(rng.standard_normal((2, n))) * np.sqrt(2e-7 + 0.5 * ret**2)
    high = np.maximum(open_, close) * (1 + wick[0])
    low = np.minimum(open_, close) * (1 - wick[1])
    times = pd.date_range(START, periods=n, freq=BAR)
    hour = times.hour.to_numpy()
    seasonal = 1 + 0.5 * np.sin(2 * np.pi * (hour - 8) / 24)
    volume = 800 * seasonal * (1 + 40 * np.abs(ret)) * rng.lognormal(0, 0.3, n)
    return pd.DataFrame(
        {
            "datetime": times,
            "timestamp": (times - pd.Timestamp(0)) // pd.Timedelta(milliseconds=1),
            "open": open_,
            "high": high,
            "low": low,
            "close": close,
            "volume": volume,
        }
    )


def demo_config(spec: DemoSpec) -> ModelConfig:
    targets = tuple(f"transformer_blocks.{b}.{m}" for b in range(spec.n_blocks) for m in BLOCK_LINEARS)
    return ModelConfig(
        n_blocks=spec.n_blocks,
        d_model=spec.d_model,
        ffn_dim=spec.ffn_dim,
        state_dim=len(SIMPLE60_NAMES),
        n_actions=3,
        max_length=spec.max_length,
        lora_rank=spec.lora_rank,
        lora_targets=targets,
        num_heads=spec.num_heads,
    )


def cache_dir() -> Path:
    """Where built demos live: $FLAG_TRADER_CACHE, else the per-user cache ($XDG_CACHE_HOME or ~/.cache) /
    flag_trader; never inside the checkout or an installed package (site-packages may be read-only)."""
    if os.environ.get("FLAG_TRADER_CACHE"):
        return Path(os.environ["FLAG_TRADER_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flag_trader"


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


@dataclass(frozen=True)
class DemoData:
    """The demo market as the model sees it: normalised, clipped features x (n, 60), labels y (n,), and the
    training-split statistics stored in the checkpoint."""

    x: torch.Tensor
    y: torch.Tensor
    split: int  # rows before it are training data (chronological)
    mean: np.ndarray
    std: np.ndarray


def _demo_features(spec: DemoSpec) -> DemoData:
    bars = synthetic_ohlcv(spec.n_bars)
    feats = simple60(bars)
    labels = compute_labels(bars["close"].to_numpy(), LabelRule())[feats.index.to_numpy()]
    split = int(len(feats) * 0.8)  # chronological: the last 20 % is held out
    mean = feats.iloc[:split].mean().to_numpy(np.float64)
    std = feats.iloc[:split].std(ddof=0).to_numpy(np.float64)
    std = np.where(std > 1e-12, std, 1.0)
    x = ((feats.to_numpy(np.float64) - mean) / std).clip(-FEATURE_CLIP, FEATURE_CLIP)
    return DemoData(torch.tensor(x, dtype=torch.float32), torch.tensor(labels, dtype=torch.long), split, mean, std)


def _decisions(model: FlagTrader, x: torch.Tensor, ends: np.ndarray, w: int, batch: int = 64) -> torch.Tensor:
    """Logits (N, actions) of the deciding (last) position of the windows ending at `ends`."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(ends), batch):
            idx = torch.as_tensor(ends[i : i + batch] - (w - 1))[:, None] + torch.arange(w)
            out.append(model(x[idx])[:, -1].float())
    return torch.cat(out)


def _share_offsets(logits: torch.Tensor, target: torch.Tensor, iters: int = 60) -> torch.Tensor:
    """Per-class offsets b (actions,) so that argmax(logits + b) predicts each class about as often as
    `target` (shares summing to 1) says: a short training run leans towards one class, and a demo
    whose predictions collapse would show nothing on the Predictions page."""
    b = torch.zeros(logits.shape[1])
    for _ in range(iters):
        counts = torch.bincount((logits + b).argmax(-1), minlength=logits.shape[1]).float()
        share = (counts + 0.5) / (counts.sum() + 0.5 * logits.shape[1])
        b += 0.5 * (target / share).log()
    return b - b.mean()


def _seeded_like_trained(model: FlagTrader, seed: int) -> None:
    """Give every trainable tensor of a freshly initialised model (LoRA, embeddings, norms, head) seeded
    values that no longer look like initialisation: its init plus a rank-2 structure for matrices, a spread
    around 1 / 0 for norms, small non-zero LoRA B. The frozen base keeps its random init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".base." in name:
                continue
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif p.dim() >= 2:
                m = p.view(-1, p.shape[-1])
                u, v = torch.randn(m.shape[0], 2, generator=g), torch.randn(2, m.shape[1], generator=g)
                m += (u @ v) * (4 * float(m.std()) / math.sqrt(m.shape[1]))
            elif name.endswith("weight"):  # LayerNorm gains
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def train_demo(size: str = "full", progress: Progress | None = None, seed: int = 0) -> dict:
    """Build the demo checkpoint; returns the dict that `build_demo` saves.

    Sizes with `steps > 0` are trained like the original (frozen random base; LoRA, embeddings, norms and
    head learn) on the decision position, then the head bias is shifted so the predicted class shares match
    the training labels' (see `_share_offsets`). `steps == 0` ("tiny", for tests) trains nothing: seeded
    values in every trainable tensor, in about a second.
    """
    spec = DEMO_SIZES[size]
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    report = progress or (lambda f, m: None)
    report(0.0, "generating synthetic market data")
    data = _demo_features(spec)
    x, y, split, n = data.x, data.y, data.split, len(data.x)
    cfg = demo_config(spec)
    model = FlagTrader(cfg, dropout=spec.dropout)
    w = spec.window
    loss = float("nan")
    if spec.steps == 0:
        _seeded_like_trained(model, seed)
    else:
        for name, p in model.named_parameters():
            p.requires_grad = ".base." not in name  # the original froze its randomly initialised base
        focus = tuple(f"transformer_blocks.{b}.attention.{m}" for b in spec.focus_blocks for m in ("q_proj", "k_proj"))
        for name, mod in model.linears().items():
            if mod.lora is not None:  # LoRA-paper init of B is zero; a non-zero start lets every adapter learn
                torch.nn.init.normal_(mod.lora.lora_B, std=spec.focus_b_init if name in focus else spec.b_init)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.01)
        counts = torch.bincount(y[:split], minlength=3).float()
        weight = (counts.sum() / (3 * counts)).clamp(max=3.0)
        bf16 = cpu_bf16_native()[0]
        t0 = time.perf_counter()
        model.train()
        for step in range(spec.steps):
            lr = spec.lr * min(1.0, (step + 1) / 10) * (0.5 + 0.5 * math.cos(math.pi * step / spec.steps))
            for g in opt.param_groups:
                g["lr"] = lr
            xb, yb = _windows(x, y, rng.integers(0, split - w, spec.batch), w)
            # The decision is the last position; training every position would reward looking at the
            # future bars that earlier positions can see (the model has no mask).
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # ~2x faster where bf16 is native
                logits = model(xb)
            out = F.cross_entropy(logits[:, -1].float(), yb[:, -1], weight=weight)
            opt.zero_grad(set_to_none=True)
            out.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            loss = out.item()
            report(
                0.05 + 0.83 * (step + 1) / spec.steps,
                f"training step {step + 1}/{spec.steps}, loss {loss:.3f}, {time.perf_counter() - t0:.0f} s",
            )
        model.eval()
        report(0.9, "matching the predicted class shares to the training labels")
        calib = np.linspace(w - 1, split - 1, spec.calib_windows).astype(np.int64)
        target = torch.bincount(y[calib], minlength=3).float() / len(calib)
        with torch.no_grad():
            model.action_head.bias.add_(_share_offsets(_decisions(model, x, calib, w), target))
    model.eval()
    report(0.95, "evaluating on held-out data")
    ends = np.linspace(split + w - 1, n - 1, spec.eval_windows).astype(np.int64)  # held-out 20 %, last bar decides
    pred = _decisions(model, x, ends, w).argmax(-1)
    truth = y[torch.as_tensor(ends)]
    val_acc = (pred == truth).float().mean().item()
    baseline = (torch.bincount(truth, minlength=3).max() / len(truth)).item()
    report(1.0, f"held-out accuracy {val_acc:.3f} (last position) vs majority baseline {baseline:.3f}")
    return {
        "model_state_dict": model.state_dict(),
        "config": {**cfg.to_dict(), "dropout": spec.dropout, "window": w},
        "feature_set": "simple-60",
        "feature_names": list(SIMPLE60_NAMES),
        "feature_mean": data.mean.tolist(),
        "feature_std": data.std.tolist(),
        "feature_clip": FEATURE_CLIP,
        "label_rule": {"horizon": LabelRule().horizon, "threshold": LabelRule().threshold},
        "bar_interval": "5min",  # the synthetic market's BAR; pages compare uploaded data against it
        "epoch": spec.steps,
        "train_loss": loss,
        "val_accuracy": val_acc,
        "majority_baseline": baseline,
        "val_windows": len(ends),
        "data": f"synthetic demo market, seed 7, {spec.n_bars} bars; last 20 % held out"
        + ("" if spec.steps else "; not trained: seeded test weights"),
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


@dataclass(frozen=True)
class BuildStatus:
    """Where a background demo build stands. `seconds_left` is estimated from the progress rate since the
    first progress report after data generation; None until it can be estimated."""

    size: str
    fraction: float
    message: str
    elapsed: float
    seconds_left: float | None
    done: bool
    error: str | None


class DemoBuild:
    """One build of a demo size on a daemon thread; `status()` is safe to call from any thread."""

    def __init__(self, size: str) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._t0 = time.monotonic()
        self._anchor: tuple[float, float] | None = None  # (time, fraction) when training started
        self._fraction, self._message = 0.0, "starting"
        self._done = False
        self._error: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"demo-build-{size}", daemon=True)
        self._thread.start()

    def _progress(self, fraction: float, message: str) -> None:
        with self._lock:
            now = time.monotonic()
            if self._anchor is None and fraction >= 0.05:
                self._anchor = (now, fraction)
            self._fraction, self._message = fraction, message

    def _run(self) -> None:
        try:
            build_demo(self.size, progress=self._progress)
        except Exception as exc:  # noqa: BLE001 - shown to every session; the next start_build retries
            with self._lock:
                self._error = f"{type(exc).__name__}: {exc}"
        with self._lock:
            self._done = True

    def status(self) -> BuildStatus:
        with self._lock:
            now = time.monotonic()
            left = None
            if self._anchor is not None and self._fraction > self._anchor[1] + 0.01:
                rate = (self._fraction - self._anchor[1]) / (now - self._anchor[0])
                left = (1.0 - self._fraction) / rate
            return BuildStatus(self.size, self._fraction, self._message, now - self._t0, left, self._done, self._error)


_builds: dict[str, DemoBuild] = {}
_builds_lock = threading.Lock()


def start_build(size: str = "full") -> DemoBuild:
    """The background build of `size` in this process, started if none is running or finished well.
    One build per process: every caller (every app session) gets the same one. A failed build is
    restarted by the next call."""
    with _builds_lock:
        build = _builds.get(size)
        if build is None or (build.status().done and (build.status().error or not demo_path(size).exists())):
            build = _builds[size] = DemoBuild(size)
        return build


def running_builds() -> list[BuildStatus]:
    """Status of the builds started in this process that have not finished, or that failed."""
    with _builds_lock:
        builds = list(_builds.values())
    return [s for s in (b.status() for b in builds) if not s.done or s.error]
