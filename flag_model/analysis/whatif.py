"""What-if: edit a window and watch the decision, the smallest edit that flips it, and how stable it is.

Everything works on the model inputs exactly as the model sees them: a window (S, state_dim) float32 after
the checkpoint's normalisation ("normalised feature space"), deciding at the last position (the decision bar).

- `apply_edit` / `evaluate_edits`: set, add, multiply, zero, copy the same cells from another window, or
  replace by the training mean, for chosen features over a time range; probabilities before and after.
- `smallest_flip`: a gradient search for a sparse perturbation δ (restricted to chosen features and time
  steps) that makes the model decide `target`: gradient steps on the hinge loss max(0, κ - margin), scaled
  so the steepest cell moves `lr`, each followed by a proximal L1 step (soft-thresholding, so cells become
  exactly zero) with a weight that grows while flipped and shrinks while not; the smallest-L1 δ that flipped
  is kept; then cells are pruned and δ is scaled down while the flip holds. A result counts as a flip only if a plain
  forward of the final float32 window decides `target` with logit margin ≥ κ/2.
- `random_flip`: the baseline with the same budget: random Gaussian directions inside the same cells, each
  scaled by doubling then bisection to the smallest flipping size.
- `decision_stability`: the share of decisions unchanged under Gaussian noise k·σ_j per feature j.

Budgets are counted in forward-pass equivalents: a forward is 1, a forward with a backward is 3.
The shared, cached model is only read (no hooks, no parameter writes, no mode change).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..features import action_names, feature_names_or_default
from ..model import FlagTrader
from .lora import decision_probs

SET, ADD, MULTIPLY, ZERO, COPY, MEAN = "set", "add", "multiply", "zero", "copy from another window", "training mean"
EDIT_OPS: tuple[str, ...] = (SET, ADD, MULTIPLY, ZERO, COPY, MEAN)
EDIT_NOTES = {
    SET: "every chosen cell becomes the value (in normalised units: 0 is the training mean, 1 one σ above)",
    ADD: "the value is added to every chosen cell (a shift, in σ of the training data after normalisation)",
    MULTIPLY: "every chosen cell is multiplied by the value (a scale about the training mean)",
    ZERO: "every chosen cell becomes 0",
    COPY: "the chosen cells are copied from the same steps of another window",
    MEAN: "every chosen cell becomes the feature's training mean",
}
FORWARD, FORWARD_BACKWARD = 1, 3  # cost in forward-pass equivalents
DEFAULT_KS: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)

Progress = Callable[[int, int], object]


@dataclass(frozen=True)
class Edit:
    """One edit: `op` on features `features` (indices) over steps start..stop-1 of the window."""

    op: str
    features: tuple[int, ...]
    start: int
    stop: int
    value: float = 0.0


@dataclass(frozen=True)
class EditResult:
    """A window before and after edits. window/edited (S, state_dim) float32; before/after (n_actions,)."""

    window: np.ndarray
    edited: np.ndarray
    before: np.ndarray
    after: np.ndarray
    action_names: tuple[str, ...]

    @property
    def changed_cells(self) -> int:
        return int((self.edited != self.window).sum())

    @property
    def decision_before(self) -> str:
        return self.action_names[int(self.before.argmax())]

    @property
    def decision_after(self) -> str:
        return self.action_names[int(self.after.argmax())]


@dataclass(frozen=True)
class FlipResult:
    """The smallest edit found that makes the model decide `target`. delta = edited - window (S, state_dim)."""

    method: str  # "gradient" or "random directions"
    target: int
    flipped: bool  # verified by a plain forward of `edited`
    window: np.ndarray
    edited: np.ndarray
    before: np.ndarray  # (n_actions,) probabilities of the window
    after: np.ndarray  # (n_actions,) probabilities of `edited` (plain forward)
    margin: float  # logit[target] - max other logit of `edited`
    evaluations: int  # forward-pass equivalents used
    seconds: float
    action_names: tuple[str, ...]
    feature_names: tuple[str, ...]
    notes: tuple[str, ...] = ()

    @property
    def delta(self) -> np.ndarray:
        return self.edited.astype(np.float64) - self.window.astype(np.float64)

    @property
    def l1(self) -> float:
        return float(np.abs(self.delta).sum())

    @property
    def linf(self) -> float:
        return float(np.abs(self.delta).max()) if self.delta.size else 0.0

    @property
    def n_cells(self) -> int:
        return int((self.edited != self.window).sum())

    @property
    def target_name(self) -> str:
        return self.action_names[self.target]

    def cells(self) -> pd.DataFrame:
        """Edited cells, largest change first: step, offset (0 = decision bar), feature, before, after, change."""
        steps, feats = np.nonzero(self.edited != self.window)
        d = self.delta[steps, feats]
        order = np.argsort(-np.abs(d), kind="stable")
        s, f = steps[order], feats[order]
        return pd.DataFrame(
            {
                "step": s,
                "offset": s - (len(self.window) - 1),
                "feature": [self.feature_names[j] for j in f],
                "before": self.window[s, f].astype(np.float64),
                "after": self.edited[s, f].astype(np.float64),
                "change": d[order],
            }
        )


def _window(window: np.ndarray, model: FlagTrader) -> np.ndarray:
    w = np.array(window, dtype=np.float32)  # a private copy
    model.config.check_windows((1, *w.shape), bool(np.isfinite(w).all()))
    return w


def cell_mask(
    shape: tuple[int, int], features: Sequence[int] | None = None, steps: tuple[int, int] | None = None
) -> np.ndarray:
    """(S, D) bool: True on the chosen features (default all) over steps start..stop-1 (default all)."""
    length, width = shape
    start, stop = steps if steps is not None else (0, length)
    if not 0 <= start < stop <= length:
        raise ValueError(f"time range {start}..{stop - 1} is outside the window's steps 0..{length - 1}.")
    feats = np.arange(width) if features is None else np.asarray(list(features), dtype=int)
    if len(feats) == 0:
        raise ValueError("choose at least one feature to edit.")
    if feats.min() < 0 or feats.max() >= width:
        raise ValueError(f"feature indices must be within 0..{width - 1}.")
    mask = np.zeros(shape, dtype=bool)
    mask[start:stop, feats] = True
    return mask


def apply_edit(
    window: np.ndarray, edit: Edit, source: np.ndarray | None = None, feature_mean: np.ndarray | None = None
) -> np.ndarray:
    """A copy of `window` (S, D) with `edit` applied. `source` (S, D) is the other window for COPY;
    `feature_mean` (D,) the training mean in the units of the window for MEAN (0 after normalisation)."""
    out = np.array(window, dtype=np.float32)
    mask = cell_mask(out.shape, edit.features, (edit.start, edit.stop))
    value = float(edit.value)
    if edit.op in (SET, ADD, MULTIPLY) and not abs(value) <= float(np.finfo(np.float32).max):  # NaN fails too
        raise ValueError("the edit value must be a finite number within the float32 range.")
    v = np.float32(value if edit.op in (SET, ADD, MULTIPLY) else 0.0)
    if edit.op == SET:
        out[mask] = v
    elif edit.op == ADD:
        out[mask] += v
    elif edit.op == MULTIPLY:
        out[mask] *= v
    elif edit.op == ZERO:
        out[mask] = 0
    elif edit.op == COPY:
        if source is None or np.shape(source) != out.shape:
            raise ValueError(f"copying needs another window of the same shape {out.shape}.")
        out[mask] = np.asarray(source, dtype=np.float32)[mask]
    elif edit.op == MEAN:
        mean = np.zeros(out.shape[1], np.float32) if feature_mean is None else np.asarray(feature_mean, np.float32)
        if mean.shape != (out.shape[1],):
            raise ValueError(f"feature_mean must have {out.shape[1]} values.")
        out[mask] = np.broadcast_to(mean, out.shape)[mask]
    else:
        raise ValueError(f"unknown edit {edit.op!r}; choose one of {EDIT_OPS}")
    if not np.isfinite(out).all():
        raise ValueError("the edit produced infinite values; use a smaller value.")
    return out


def evaluate_edits(
    model: FlagTrader,
    window: np.ndarray,
    edits: Sequence[Edit],
    source: np.ndarray | None = None,
    feature_mean: np.ndarray | None = None,
) -> EditResult:
    """Apply `edits` in order to a copy of `window` (S, D) and return the probabilities before and after."""
    w = _window(window, model)
    edited = w
    for e in edits:
        edited = apply_edit(edited, e, source, feature_mean)
    probs = decision_probs(model, np.stack([w, edited]))
    return EditResult(w, edited, probs[0], probs[1], action_names(model.config.n_actions))


def runner_up(model: FlagTrader, window: np.ndarray) -> int:
    """The second most probable class at the decision bar of window (S, D): the natural flip target."""
    return int(np.argsort(_logits(model, _window(window, model)[None])[0])[-2])


def _logits(model: FlagTrader, x: np.ndarray) -> np.ndarray:
    """Plain forward: x (B, S, D) -> decision logits (B, A), float32, no gradients."""
    with torch.inference_mode():
        return model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))[:, -1].numpy()


def _margin(logits: np.ndarray, target: int) -> np.ndarray:
    """logit[target] - max other logit, for logits (B, A)."""
    others = np.delete(logits, target, axis=-1)
    return logits[..., target] - others.max(axis=-1)


def _prepare(
    model: FlagTrader, window: np.ndarray, target: int, features: Sequence[int] | None, steps: tuple[int, int] | None
) -> tuple[np.ndarray, np.ndarray]:
    """The checked window (S, D) and its editable-cell mask; refuses a target the model already decides."""
    w = _window(window, model)
    n_actions = model.config.n_actions
    if not 0 <= target < n_actions:
        raise ValueError(f"target class {target} is outside 0..{n_actions - 1}.")
    if int(_logits(model, w[None])[0].argmax()) == target:
        raise ValueError(
            f"the model already decides {action_names(n_actions)[target]} on this window; choose another target class."
        )
    return w, cell_mask(w.shape, features, steps)


def _result(
    model: FlagTrader,
    method: str,
    w: np.ndarray,
    edited: np.ndarray,
    target: int,
    min_margin: float,
    evaluations: int,
    t0: float,
    feature_names: Sequence[str] | None,
    notes: list[str],
) -> FlipResult:
    """Verify `edited` with a plain forward of exactly these float32 values and package the result."""
    logits = _logits(model, np.stack([w, edited]))
    margin = float(_margin(logits[1:], target)[0])
    flipped = bool(int(logits[1].argmax()) == target and margin >= min_margin / 2)
    if not flipped:
        notes.append(
            "no edit within the budget made the model decide the target: shown is the closest attempt; "
            "allow more features, more steps or a larger budget."
        )
    names = feature_names_or_default(feature_names, w.shape[1])
    probs = torch.from_numpy(logits).softmax(-1).numpy()
    return FlipResult(
        method,
        target,
        flipped,
        w,
        edited,
        probs[0],
        probs[1],
        margin,
        evaluations + FORWARD,
        time.perf_counter() - t0,
        action_names(model.config.n_actions),
        names,
        tuple(notes),
    )


def _shrink(
    model: FlagTrader, w: np.ndarray, delta: np.ndarray, target: int, min_margin: float
) -> tuple[np.ndarray, int]:
    """Make a flipping delta sparser, then smaller, while w + delta still decides `target` with min_margin.
    Returns the new delta and the forward evaluations used."""
    evals = 0

    def ok(d: np.ndarray) -> bool:
        nonlocal evals
        evals += FORWARD
        return bool(_margin(_logits(model, (w + d)[None]), target)[0] >= min_margin)

    nz = np.flatnonzero(delta)
    order = nz[np.argsort(np.abs(delta.ravel()[nz]), kind="stable")]  # smallest cells first
    lo, hi = 0, len(order)  # drop the `lo` smallest cells: known fine; `hi`: upper bound to try
    while hi - lo > 1:  # bisection on how many of the smallest cells can go
        mid = (lo + hi) // 2
        trial = delta.copy()
        trial.ravel()[order[:mid]] = 0
        if ok(trial):
            lo = mid
        else:
            hi = mid
    delta = delta.copy()
    delta.ravel()[order[:lo]] = 0
    a, b = 0.0, 1.0  # scale of delta: b known to flip
    for _ in range(12):
        scale = (a + b) / 2
        if ok((delta * scale).astype(np.float32)):
            b = scale
        else:
            a = scale
    return (delta * b).astype(np.float32), evals


def smallest_flip(
    model: FlagTrader,
    window: np.ndarray,
    target: int,
    features: Sequence[int] | None = None,
    steps: tuple[int, int] | None = None,
    iterations: int = 300,
    lr: float = 0.1,
    l1_weight: float = 0.3,
    min_margin: float = 0.05,
    feature_names: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> FlipResult:
    """Gradient search for the smallest (L1) perturbation of `window` (S, D) that makes the decision `target`.

    features/steps restrict the editable cells (feature indices; steps (start, stop), stop exclusive).
    Each iteration is one forward + backward; `min_margin` is the logit margin the search asks for (the
    verification accepts half of it, so tiny numeric differences between machines cannot undo the flip).
    """
    t0 = time.perf_counter()
    w, mask = _prepare(model, window, target, features, steps)
    x = torch.from_numpy(w)[None]
    m = torch.from_numpy(mask.astype(np.float32))[None]
    best: np.ndarray | None = None
    best_l1, closest, closest_margin = np.inf, np.zeros_like(w), -np.inf
    evals = 0
    with torch.inference_mode(False), torch.enable_grad():
        delta = torch.zeros_like(x, requires_grad=True)
        weight = l1_weight
        for it in range(iterations):
            logits = model(x + m * delta)[0, -1]
            evals += FORWARD_BACKWARD
            others = torch.cat([logits[:target], logits[target + 1 :]])
            margin = logits[target] - others.max()
            d_now = (m * delta).detach()[0].numpy().copy()
            if margin.item() >= min_margin:
                l1 = float(np.abs(d_now).sum())
                if l1 < best_l1:
                    best, best_l1 = d_now, l1
                weight *= 1.1  # flipped: push harder towards a smaller edit
            else:
                weight /= 1.1
                if margin.item() > closest_margin:
                    closest, closest_margin = d_now, margin.item()
            # autograd.grad, not backward(): no .grad is ever written on the shared model's parameters
            (grad,) = torch.autograd.grad(torch.relu(min_margin - margin), delta)
            with torch.no_grad():
                # A step of at most lr on the cell with the largest gradient (others in proportion, so cells
                # that matter little barely move), then the proximal L1 step: soft-thresholding makes
                # unneeded cells exactly 0.
                step = delta - lr * m * grad / grad.abs().max().clamp(min=1e-12)
                delta.copy_(m * step.sign() * (step.abs() - lr * weight).clamp(min=0))
            if progress is not None and (it % 10 == 0 or it == iterations - 1):
                progress(it + 1, iterations)
    notes = [
        f"{iterations} gradient steps (largest step {lr:g}) with an adaptive L1 weight (start {l1_weight:g}), "
        f"then pruning and scaling down while the logit margin stays ≥ {min_margin:g}."
    ]
    if best is None:
        return _result(
            model, "gradient", w, (w + closest).astype(np.float32), target, min_margin, evals, t0, feature_names, notes
        )
    delta_np, used = _shrink(model, w, best, target, min_margin)
    return _result(
        model,
        "gradient",
        w,
        (w + delta_np).astype(np.float32),
        target,
        min_margin,
        evals + used,
        t0,
        feature_names,
        notes,
    )


def random_flip(
    model: FlagTrader,
    window: np.ndarray,
    target: int,
    features: Sequence[int] | None = None,
    steps: tuple[int, int] | None = None,
    budget: int = 900,
    min_margin: float = 0.05,
    seed: int = 0,
    max_scale: float = 16.0,
    feature_names: Sequence[str] | None = None,
) -> FlipResult:
    """The baseline search: random Gaussian directions u on the editable cells, each scaled to the smallest
    t (u has unit RMS per editable cell, t in σ: doubling from 1/64 up to max_scale, then 8 bisection steps)
    with w + t·u deciding `target`.
    Keeps the smallest-L1 flip; stops when `budget` forward evaluations are spent."""
    t0 = time.perf_counter()
    w, mask = _prepare(model, window, target, features, steps)
    rng = np.random.default_rng(seed)
    grid = 2.0 ** np.arange(-6, np.log2(max_scale) + 1)  # (K,) sizes tried at once per direction
    best, best_l1, closest, closest_margin, evals = None, np.inf, np.zeros_like(w), -np.inf, 0
    n_dirs = 0
    while evals + len(grid) + 8 <= budget:
        n_dirs += 1
        u = (rng.standard_normal(w.shape) * mask).astype(np.float32)
        u /= max(float(np.sqrt((u[mask] ** 2).mean())), 1e-12)  # unit RMS per editable cell: t is in σ
        margins = _margin(_logits(model, w[None] + grid[:, None, None].astype(np.float32) * u[None]), target)
        evals += len(grid) * FORWARD
        hits = np.flatnonzero(margins >= min_margin)
        if not len(hits):
            k = int(margins.argmax())
            if margins[k] > closest_margin:
                closest, closest_margin = (grid[k] * u).astype(np.float32), float(margins[k])
            continue
        k = int(hits[0])
        lo, hi = (grid[k - 1] if k else 0.0), grid[k]
        l1_u = float(np.abs(u).sum())
        if hi * l1_u >= best_l1:
            continue  # cannot beat the best: skip the bisection
        for _ in range(8):
            mid = (lo + hi) / 2
            evals += FORWARD
            if _margin(_logits(model, (w + mid * u)[None]), target)[0] >= min_margin:
                hi = mid
            else:
                lo = mid
        if hi * l1_u < best_l1:
            best, best_l1 = (hi * u).astype(np.float32), hi * l1_u
    notes = [
        f"{n_dirs} random Gaussian directions on the editable cells, each scaled to the smallest flipping "
        f"size ({budget} forward evaluations)."
    ]
    delta = best if best is not None else closest
    return _result(
        model,
        "random directions",
        w,
        (w + delta).astype(np.float32),
        target,
        min_margin,
        evals,
        t0,
        feature_names,
        notes,
    )


def feature_sigma(values: np.ndarray) -> np.ndarray:
    """(D,) standard deviation of each model input over a feature matrix (n, D): the σ of the noise."""
    return np.asarray(values, dtype=np.float64).std(axis=0).astype(np.float32)


@dataclass(frozen=True)
class Stability:
    """Share of noisy copies whose decision equals the clean one. unchanged (N windows, K noise levels)."""

    ks: np.ndarray  # (K,) noise sizes in σ per feature
    unchanged: np.ndarray  # (N, K) share per window
    decisions: np.ndarray  # (N,) the clean decision of each window
    window_index: np.ndarray  # (N,) which windows (caller's indices)
    n_samples: int
    action_names: tuple[str, ...]

    def curve(self) -> pd.DataFrame:
        """Per k: mean share unchanged over the windows, and the 10th percentile and minimum over windows."""
        return pd.DataFrame(
            {
                "k": self.ks,
                "share unchanged": self.unchanged.mean(axis=0),
                "p10 over windows": np.quantile(self.unchanged, 0.1, axis=0),
                "min over windows": self.unchanged.min(axis=0),
            }
        )


def decision_stability(
    model: FlagTrader,
    windows: np.ndarray,
    sigma: np.ndarray,
    ks: Sequence[float] = DEFAULT_KS,
    n_samples: int = 32,
    indices: Sequence[int] | None = None,
    seed: int = 0,
    batch_size: int = 256,
    progress: Progress | None = None,
) -> Stability:
    """Decision stability of windows (N, S, D) (or one window (S, D)) under Gaussian noise k·σ_j on feature j.

    For each window and k, `n_samples` noisy copies are decided; the share equal to the clean decision is
    reported. Forward passes hold at most `batch_size` windows. progress(done, total) per window.
    """
    windows = np.asarray(windows)
    if windows.ndim == 2:
        windows = windows[None]
    idx = np.arange(len(windows)) if indices is None else np.asarray(indices, dtype=int)
    sigma = np.asarray(sigma, dtype=np.float32)
    ks_arr = np.asarray(ks, dtype=np.float64)
    if len(idx) == 0 or len(ks_arr) == 0 or n_samples < 1:
        raise ValueError("stability needs at least one window, one noise level and one sample.")
    if sigma.shape != (windows.shape[-1],) or not np.isfinite(sigma).all() or (sigma < 0).any():
        raise ValueError(f"sigma must be {windows.shape[-1]} finite, non-negative values.")
    rng = np.random.default_rng(seed)
    rows_per_window = len(ks_arr) * n_samples
    unchanged, decisions = np.zeros((len(idx), len(ks_arr))), np.zeros(len(idx), dtype=int)
    for n, i in enumerate(idx):
        w = _window(windows[i], model)
        clean = int(_logits(model, w[None])[0].argmax())
        scale = np.repeat(ks_arr, n_samples).astype(np.float32)[:, None, None]  # (K * n_samples, 1, 1)
        got = np.empty(rows_per_window, dtype=int)
        for j in range(0, rows_per_window, batch_size):  # noise is drawn per batch: memory stays bounded
            s = scale[j : j + batch_size]
            noise = rng.standard_normal((len(s), *w.shape)).astype(np.float32) * sigma
            got[j : j + len(s)] = _logits(model, w[None] + s * noise).argmax(-1)
        unchanged[n] = (got == clean).reshape(len(ks_arr), n_samples).mean(axis=1)
        decisions[n] = clean
        if progress is not None:
            progress(n + 1, len(idx))
    return Stability(ks_arr, unchanged, decisions, idx, n_samples, action_names(model.config.n_actions))
