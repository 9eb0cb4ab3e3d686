"""Block-bootstrap confidence intervals for scores of time-ordered predictions.

Consecutive bars are not independent (overlapping windows, overlapping label horizons), so samples are
resampled in blocks: either moving blocks of `block` consecutive samples (rolling mode: any start), or
whole given groups (blocks mode: one group per scored window, so accuracy by position keeps its windows).
Every score is a ratio of sums, so each unit is reduced to its per-sample contribution sums once and a
replicate is the sum of the units it draws.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd

N_BOOT = 1000
LEVEL = 0.95
_CHUNK_CELLS = 4_000_000  # gathered unit sums held per chunk of replicates (float64 cells)


def unit_sums(values: np.ndarray, block: int | None = None, groups: np.ndarray | None = None) -> np.ndarray:
    """values (n, m) per-sample contributions in time order -> (U, m) sums per resampling unit.

    groups (n,) int: one unit per distinct group id (whole windows); else moving blocks of `block`
    consecutive samples, one unit per start 0..n-block (U = n - block + 1)."""
    values = np.asarray(values, dtype=np.float64)
    if groups is not None:
        _, inverse = np.unique(groups, return_inverse=True)
        out = np.zeros((inverse.max() + 1, values.shape[1]))
        np.add.at(out, inverse, values)
        return out
    b = max(1, min(int(block or 1), len(values)))
    csum = np.concatenate([np.zeros((1, values.shape[1])), np.cumsum(values, axis=0)])
    return csum[b:] - csum[:-b]


def draws(n_units: int, k: int, n_boot: int = N_BOOT, seed: int = 0, chunk: int = 64) -> Iterator[np.ndarray]:
    """Unit indices of each replicate, (≤chunk, k) int64 at a time: k units drawn with replacement."""
    rng = np.random.default_rng(seed)
    for i in range(0, n_boot, chunk):
        yield rng.integers(0, n_units, size=(min(chunk, n_boot - i), k))


def replicate_sums(units: np.ndarray, k: int, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """(U, m) unit sums -> (n_boot, m): each replicate the sum of k units drawn with replacement."""
    chunk = max(1, _CHUNK_CELLS // max(1, k * units.shape[1]))
    return np.concatenate([units[idx].sum(axis=1) for idx in draws(len(units), k, n_boot, seed, chunk)])


def f1_macro(confusion: np.ndarray) -> np.ndarray:
    """confusion (..., K, K) counts (true rows, predicted columns) -> (...) F1-macro over the classes present
    in the labels or the predictions (as scikit-learn does)."""
    tp = np.diagonal(confusion, axis1=-2, axis2=-1)
    support, predicted = confusion.sum(-1), confusion.sum(-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    present = (support > 0) | (predicted > 0)
    return (f1 * present).sum(-1) / np.maximum(present.sum(-1), 1)


@dataclass(frozen=True)
class Intervals:
    """Percentile intervals at `level` from `n_boot` block-bootstrap replicates."""

    accuracy: tuple[float, float]
    f1_macro: tuple[float, float]
    by_position: pd.DataFrame | None  # position, lo, hi (whole-window resampling only)
    level: float
    n_boot: int
    method: str  # in words, for captions


def score_intervals(
    labels: np.ndarray,
    actions: np.ndarray,
    n_classes: int,
    block: int = 1,
    groups: np.ndarray | None = None,
    position: np.ndarray | None = None,
    window: int = 0,
    n_boot: int = N_BOOT,
    level: float = LEVEL,
    seed: int = 0,
) -> Intervals:
    """Intervals for accuracy, F1-macro and (given groups and positions) accuracy by position.

    labels, actions (n,) int in time order, every sample labelled. Without groups: moving blocks of
    `block` samples, round(n / block) of them per replicate. With groups (n,): whole groups resampled,
    as many as there are."""
    y, p, k = np.asarray(labels), np.asarray(actions), n_classes
    n = len(y)
    units = unit_sums(np.eye(k * k)[y * k + p], block, groups)
    if groups is not None and position is not None:  # per window: hits and samples at each position
        _, g = np.unique(groups, return_inverse=True)
        cell = g * window + np.asarray(position)
        size = len(units) * window
        hits = np.bincount(cell, weights=(y == p).astype(np.float64), minlength=size).reshape(-1, window)
        units = np.hstack([units, hits, np.bincount(cell, minlength=size).reshape(-1, window)])
    n_draw = len(units) if groups is not None else max(1, round(n / max(1, min(block, n))))
    reps = replicate_sums(units, n_draw, n_boot, seed)
    cm = reps[:, : k * k].reshape(-1, k, k)
    acc = np.trace(cm, axis1=1, axis2=2) / cm.sum((1, 2))
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    by_position = None
    if groups is not None and position is not None:
        hits, count = reps[:, k * k : k * k + window], reps[:, k * k + window :]
        with np.errstate(invalid="ignore", divide="ignore"):
            lo, hi = np.nanpercentile(hits / count, q, axis=0) if n_boot else (np.nan, np.nan)
        by_position = pd.DataFrame({"position": np.arange(window), "lo": lo, "hi": hi})
        method = f"whole windows resampled ({len(units)} windows)"
    else:
        method = f"moving blocks of {max(1, min(block, n))} bars"
    a_lo, a_hi = np.percentile(acc, q)
    f_lo, f_hi = np.percentile(f1_macro(cm), q)
    return Intervals((float(a_lo), float(a_hi)), (float(f_lo), float(f_hi)), by_position, level, n_boot, method)
