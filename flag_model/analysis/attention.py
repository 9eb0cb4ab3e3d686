"""Attention maps, rollout and per-head statistics for one window and over many windows.

Maps are the model's own softmax probabilities (B, heads, S, S): row i = query position i, column j = key
position j, each row sums to 1. Without a causal mask position i also attends to j > i (the future); the
`future_share` statistic measures that leak. Everything runs under inference mode on the shared model,
which is only read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..model import FlagTrader

Progress = Callable[[float, str], object]

# Column -> label of the per-head statistics (each averaged over query positions).
STATS: dict[str, str] = {
    "entropy": "entropy (nats)",
    "lookback": "mean look-back distance (steps; < 0 looks ahead)",
    "last_k_share": "share on the last k steps",
    "future_share": "share on future positions (j > i)",
}
MAP_BUDGET = 64 * 2**20  # bytes of attention maps held per batch in attention_summary


@dataclass(frozen=True)
class WindowAttention:
    """Attention of one window: maps (layers, heads, S, S) and decision probabilities per position (S, A)."""

    maps: np.ndarray
    probs: np.ndarray


def _as_batch(windows: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(windows, dtype=np.float32))


def window_attention(model: FlagTrader, window: np.ndarray) -> WindowAttention:
    """window (S, state_dim) -> its attention maps and per-position probabilities."""
    with torch.inference_mode():
        logits, maps = model(_as_batch(window)[None], return_attention=True)
        return WindowAttention(maps=torch.stack(maps, 1)[0].float().numpy(), probs=logits[0].softmax(-1).numpy())


def rollout(maps: np.ndarray) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema 2020): maps (layers, heads, S, S) -> (S, S).

    Per layer: mean over heads, add the residual as 0.5·A + 0.5·I, renormalise rows; then multiply
    through the layers, R = Â_L ··· Â_1. Row i says how much input position j flows into output i.
    """
    a = np.asarray(maps, dtype=np.float64).mean(axis=1)  # (L, S, S)
    eye = np.eye(a.shape[-1])
    result = eye
    for layer in a:
        layer = 0.5 * layer + 0.5 * eye
        layer = layer / layer.sum(axis=-1, keepdims=True)
        result = layer @ result
    return result


def _stats(p: torch.Tensor, last_k: int, query: int | None = None) -> torch.Tensor:
    """p (..., S, S) -> (..., 4): entropy, look-back, last-k share, future share, averaged over queries
    (query None) or of one query row (e.g. -1: the deciding bar)."""
    S = p.shape[-1]
    pos = torch.arange(S, dtype=p.dtype)
    dist = pos[:, None] - pos[None, :]  # i - j: > 0 looks back, < 0 looks ahead
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
    lookback = (p * dist).sum(-1)
    recent = p[..., max(S - last_k, 0) :].sum(-1)
    future = (p * (dist < 0)).sum(-1)
    out = torch.stack([entropy, lookback, recent, future], -1)
    return out.mean(-2) if query is None else out[..., query, :]


def _frame(values: np.ndarray, suffix: str = "") -> pd.DataFrame:
    """values (L, H, 4) -> long table with layer, head and the STATS columns."""
    L, H, _ = values.shape
    layer, head = np.meshgrid(np.arange(L), np.arange(H), indexing="ij")
    df = pd.DataFrame({"layer": layer.ravel(), "head": head.ravel()})
    for i, col in enumerate(STATS):
        df[col + suffix] = values[..., i].ravel()
    return df


def head_stats(maps: np.ndarray, last_k: int = 8, query: int | None = None) -> pd.DataFrame:
    """maps (layers, heads, S, S) -> one row per (layer, head) with the STATS columns, averaged over every
    query (query None) or for one query position (-1: the deciding bar)."""
    return _frame(_stats(torch.as_tensor(maps, dtype=torch.float64), last_k, query).numpy())


def uniform_baseline(length: int, last_k: int = 8, causal: bool = False, query: int | None = None) -> dict[str, float]:
    """The STATS of uniform attention over the keys a query may see (all S, or 0..i with a causal mask),
    averaged over queries like `head_stats`: what "no preference" looks like, e.g. future share
    (S-1)/(2S) ≈ 0.5 without a mask, entropy ln S."""
    eye = np.tril(np.ones((length, length))) if causal else np.ones((length, length))
    return dict(zip(STATS, _stats(torch.as_tensor(eye / eye.sum(-1, keepdims=True)), last_k, query).tolist()))


def head_map(maps: np.ndarray, layer: int, head: int | None) -> np.ndarray:
    """maps (L, H, S, S) -> (S, S): one head of one layer, or (head None) the mean over that layer's heads."""
    return maps[layer].mean(0) if head is None else maps[layer, head]


def future_by_query(maps: np.ndarray) -> np.ndarray:
    """maps (..., S, S) -> (..., S): share of each query position's attention on later positions."""
    p = np.asarray(maps, dtype=np.float64)
    return np.triu(p, k=1).sum(-1)


def future_by_layer(maps: np.ndarray) -> np.ndarray:
    """maps (L, H, S, S) -> (L, S): `future_by_query`, mean over each layer's heads (the per-layer curves)."""
    return future_by_query(maps).mean(1)


@dataclass(frozen=True)
class AttentionSummary:
    """Statistics over many windows: `stats` per (layer, head) with the mean of each STATS column and its
    standard deviation (`<col>_std`); `mean_maps` (L, H, S, S); `future_by_query` (L, S) mean over heads."""

    stats: pd.DataFrame
    decision_stats: pd.DataFrame  # the same for the deciding bar's query (the last position) only
    mean_maps: np.ndarray
    future_by_query: np.ndarray
    n_windows: int


def attention_summary(
    model: FlagTrader,
    windows: np.ndarray,
    last_k: int = 8,
    batch_size: int | None = None,
    progress: Progress | None = None,
) -> AttentionSummary:
    """windows (N, S, state_dim) -> AttentionSummary; `progress(fraction, message)` after every batch.

    batch_size None keeps the attention maps of one batch near MAP_BUDGET bytes (they grow with S²).
    """
    n = len(windows)
    if n == 0:
        raise ValueError("no windows to summarise; choose a shorter window or more data.")
    cfg = model.config
    S = windows.shape[1]
    if batch_size is None:
        batch_size = max(1, MAP_BUDGET // (cfg.n_blocks * cfg.num_heads * S * S * 4))
    per_window, per_decision, map_sum = [], [], torch.zeros(cfg.n_blocks, cfg.num_heads, S, S, dtype=torch.float64)
    with torch.inference_mode():
        for i in range(0, n, batch_size):
            _, maps = model(_as_batch(windows[i : i + batch_size]), return_attention=True)
            per_window.append(torch.stack([_stats(p, last_k) for p in maps], 1))  # (B, L, H, 4)
            per_decision.append(torch.stack([_stats(p, last_k, -1) for p in maps], 1))
            for layer, p in enumerate(maps):
                map_sum[layer] += p.sum(0, dtype=torch.float64)
            if progress is not None:
                done = min(i + batch_size, n)
                progress(done / n, f"attention over {done}/{n} windows")
    values = torch.cat(per_window).double().numpy()  # (N, L, H, 4)
    stats = _frame(values.mean(0)).merge(_frame(values.std(0), "_std"), on=["layer", "head"])
    dec = torch.cat(per_decision).double().numpy()
    decision_stats = _frame(dec.mean(0)).merge(_frame(dec.std(0), "_std"), on=["layer", "head"])
    mean_maps = (map_sum / n).numpy()
    return AttentionSummary(
        stats=stats,
        decision_stats=decision_stats,
        mean_maps=mean_maps.astype(np.float32),
        future_by_query=future_by_layer(mean_maps),
        n_windows=n,
    )
