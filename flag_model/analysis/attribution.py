"""Feature attributions with Captum: which features and which moments drove a SELL / HOLD / BUY.

Every method explains one scalar: the model's output for class `target` at the deciding position
`position` of a window, f(x) = model(x)[:, position, target]. By default that is the **logit** (additive,
so Integrated Gradients' completeness f(x) - f(baseline) = sum of attributions is in logit units);
`output="probability"` explains the softmax probability instead.

Methods (all from Captum; attributions are always (S, state_dim), time x feature):
- Integrated Gradients, GradientSHAP, DeepLift: path/reference methods with a convergence delta
  delta = sum(attributions) - (f(x) - f(baseline)); `relative_delta` = |delta| / |f(x) - f(baseline)|.
- Saliency: the signed gradient (Captum's abs=False), no baseline.
- Input x Gradient: x * gradient, no baseline.
- Occlusion: non-overlapping time x feature patches set to the baseline; each cell holds its patch's
  effect f(x) - f(x with the patch at baseline) divided by the patch's cell count, so sums add up effects.
- Feature Ablation: one feature over the whole window set to the baseline; the effect is spread evenly
  over the feature's S cells, so a feature's total is exactly its ablation effect.

Safety: the shared, cached model is never mutated. Gradient and perturbation methods only read it
(no hooks, no parameter writes, no mode change); DeepLift, which attaches hooks while it runs, works on
a private deep copy. Everything runs with gradients enabled, outside inference mode, on fresh tensors.
"""

from __future__ import annotations

import copy
import math
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from captum.attr import (
    DeepLift,
    FeatureAblation,
    GradientShap,
    InputXGradient,
    IntegratedGradients,
    Occlusion,
    Saliency,
)
from captum.attr._core.deep_lift import SUPPORTED_NON_LINEAR
from torch import nn

from ..data import FeatureMatrix, stored_stats
from ..features import action_names, feature_names_or_default
from ..model import FlagTrader
from .attention import rollout, window_attention

# Captum warns on every DeepLift call that it sets hooks; they live on our private copy only.
warnings.filterwarnings("ignore", message="Setting forward, backward hooks", category=UserWarning)

IG, SALIENCY, IXG, DEEPLIFT, SHAP, OCCLUSION, ABLATION = (
    "Integrated Gradients",
    "Saliency",
    "Input × Gradient",
    "DeepLift",
    "GradientSHAP",
    "Occlusion",
    "Feature Ablation",
)

ZEROS, MEANS, WINDOW_MEAN, FLAT = "zeros", "feature means", "window mean", "flat market"
BASELINES: tuple[str, ...] = (ZEROS, MEANS, WINDOW_MEAN, FLAT)
BASELINE_NOTES = {
    ZEROS: "every input 0 (after the checkpoint's normalisation this equals the training mean).",
    MEANS: "each feature at its mean (see `feature_means`) at every step.",
    WINDOW_MEAN: "each feature at its own average over this window: credits moments that deviate from it.",
    FLAT: "every step equal to the window's last bar (a market that did not move): credits the history "
    "only; the last bar itself gets zero attribution.",
}
OUTPUTS = ("logit", "probability")

Progress = Callable[[int, int], object]


@dataclass(frozen=True)
class AttributionResult:
    """One method's attributions for one window. `attributions` (S, state_dim), time x feature."""

    method: str
    attributions: np.ndarray
    target: int
    target_name: str
    position: int  # non-negative index of the deciding step in the window
    baseline: str
    output: str  # "logit" or "probability": what f is
    probabilities: np.ndarray  # (n_actions,) softmax at the deciding position
    f_input: float  # f(x)
    f_baseline: float  # f(baseline)
    delta: float | None  # Captum's convergence delta (IG, DeepLift, GradientSHAP)
    relative_delta: float | None  # |delta| / |f(x) - f(baseline)|; None if undefined
    steps: int | None  # path points (IG, GradientSHAP)
    seconds: float
    feature_names: tuple[str, ...]
    notes: tuple[str, ...] = ()

    @property
    def per_feature(self) -> np.ndarray:
        """(state_dim,) signed sum over time."""
        return self.attributions.sum(axis=0)

    @property
    def per_time(self) -> np.ndarray:
        """(S,) signed sum over features."""
        return self.attributions.sum(axis=1)

    @property
    def offsets(self) -> np.ndarray:
        """(S,) each step's offset from the deciding step: -position .. S-1-position (0 = the deciding bar)."""
        return np.arange(len(self.attributions)) - self.position


@dataclass(frozen=True)
class GlobalImportance:
    """Per-feature totals of many windows: `totals` (N, state_dim) signed, one row per window."""

    method: str
    baseline: str
    output: str
    position: int
    totals: np.ndarray
    window_index: np.ndarray  # (N,) index of each window in the caller's window array
    predicted: np.ndarray  # (N,) predicted class at the deciding position
    targets: np.ndarray  # (N,) class each window was explained for
    feature_names: tuple[str, ...]
    action_names: tuple[str, ...]
    seconds: float

    def table(self) -> pd.DataFrame:
        """One row per feature, ranked by mean |total|; per predicted class mean |total| columns."""
        mag = np.abs(self.totals)
        df = pd.DataFrame(
            {"feature": self.feature_names, "mean_abs": mag.mean(axis=0), "mean_signed": self.totals.mean(axis=0)}
        )
        for c, name in enumerate(self.action_names):
            rows = self.predicted == c
            df[f"mean_abs_{name}"] = mag[rows].mean(axis=0) if rows.any() else np.nan
        df = df.sort_values("mean_abs", ascending=False, ignore_index=True)
        df.insert(0, "rank", np.arange(1, len(df) + 1))
        return df

    def class_counts(self) -> dict[str, int]:
        return {name: int((self.predicted == c).sum()) for c, name in enumerate(self.action_names)}


class DecisionOutput(nn.Module):
    """(B, S, state_dim) -> (B, n_actions): logits (or probabilities) of the deciding position only.
    `on_rows(n)`, if given, is told the number of windows of every forward pass (progress of Captum's loops)."""

    def __init__(
        self, model: FlagTrader, position: int, output: str = "logit", on_rows: Callable[[int], object] | None = None
    ) -> None:
        super().__init__()
        self.model = model
        self.position = position
        self.output = output
        self.on_rows = on_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model(x)[:, self.position, :]
        if self.on_rows is not None:
            self.on_rows(x.shape[0])
        return y.softmax(-1) if self.output == "probability" else y


def forward_rows(method: str, n_windows: int, length: int, width: int, steps: int, patch: tuple[int, int]) -> int:
    """Windows Captum passes through the model for one `_run` of `method` on n_windows windows (for progress)."""
    return METHOD_SPECS[method].rows(n_windows, length, width, steps, patch)


def feature_means(fm: FeatureMatrix, meta: Mapping[str, object]) -> tuple[np.ndarray, str]:
    """(state_dim,) the "feature means" baseline in the units the model sees, and where it comes from.

    Normalised inputs ("checkpoint" or "data"): zeros, the mean the normalisation subtracted. Unscaled
    inputs ("none"): the checkpoint's stored training means if it has them, else this data's means.
    Padded columns get 0.
    """
    width = fm.values.shape[1]
    if fm.normalisation == "checkpoint":
        return np.zeros(width, np.float32), "training means (0 after the checkpoint's normalisation)"
    if fm.normalisation == "data":
        return np.zeros(width, np.float32), "this data's means (0 after z-scoring with this data)"
    n_real = sum(not n.startswith("pad_") for n in fm.names)
    stats = stored_stats(meta, n_real) if n_real else None
    if stats is not None:
        mean = np.zeros(width, np.float64)
        mean[:n_real] = stats[0][:n_real]
        return mean.astype(np.float32), "the checkpoint's stored training means (unscaled features)"
    return fm.values.mean(axis=0).astype(np.float32), "the mean of each feature over this data (unscaled)"


def make_baseline(x: np.ndarray, name: str, feature_mean: np.ndarray | None = None) -> np.ndarray:
    """Baseline like `x` ((S, D) or (B, S, D)); see BASELINE_NOTES. "flat market" repeats the last step."""
    x = np.asarray(x, dtype=np.float32)
    if name == ZEROS:
        return np.zeros_like(x)
    if name == MEANS:
        if feature_mean is None or np.shape(feature_mean) != (x.shape[-1],):
            raise ValueError(
                f"the 'feature means' baseline needs a feature_mean vector of length {x.shape[-1]}; "
                "get one from feature_means(feature_matrix, checkpoint.meta)."
            )
        return np.broadcast_to(np.asarray(feature_mean, np.float32), x.shape).copy()
    if name == WINDOW_MEAN:
        return np.broadcast_to(x.mean(axis=-2, keepdims=True), x.shape).copy()
    if name == FLAT:
        return np.broadcast_to(x[..., -1:, :], x.shape).copy()
    raise ValueError(f"unknown baseline {name!r}; choose one of {BASELINES}")


def _check(model: FlagTrader, x: np.ndarray, method: str, baseline: str, output: str, steps: int) -> None:
    cfg = model.config
    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; choose one of {METHODS}")
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; choose one of {BASELINES}")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, not {output!r}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, not {steps}")
    cfg.check_windows(x.shape, bool(np.isfinite(x).all()))


def position_of_offset(length: int, offset: int) -> int:
    """The deciding step's index in a window of `length` from its offset to the last bar (0 = last, -1 = one before)."""
    return _position(length - 1 + int(offset), length)


def _position(pos: int, length: int) -> int:
    if not -length <= pos < length:
        raise ValueError(f"position {pos} is outside a window of length {length} (use -1 for the last step).")
    return pos % length


def _patch_cells(length: int, width: int, patch: tuple[int, int]) -> np.ndarray:
    """(S, D) number of cells in the non-overlapping occlusion patch each cell belongs to (edges are smaller)."""

    def sizes(n: int, w: int) -> np.ndarray:
        start = (np.arange(n) // w) * w
        return np.minimum(w, n - start)

    return np.outer(sizes(length, patch[0]), sizes(width, patch[1])).astype(np.float32)


def _run(
    model: FlagTrader,
    method: str,
    x: torch.Tensor,
    base: torch.Tensor,
    target: torch.Tensor,
    position: int,
    output: str,
    steps: int,
    batch: int,
    patch: tuple[int, int],
    on_rows: Callable[[int], object] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Captum on a batch x (B, S, D) -> attributions (B, S, D) and per-window delta (B,) or None."""
    f = DecisionOutput(model, position, output, on_rows)
    return METHOD_SPECS[method].run(f, x, base, target, steps, batch, patch)


_Run = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, int, int, tuple[int, int]], tuple]


def _ig(f, x, base, target, steps, batch, patch):
    return IntegratedGradients(f).attribute(
        x, base, target=target, n_steps=steps, internal_batch_size=max(batch, x.shape[0]), return_convergence_delta=True
    )


def _shap(f, x, base, target, steps, batch, patch):
    chunk = max(1, batch // steps)  # NoiseTunnel expands to examples x steps rows at once: chunk the examples
    attrs, deltas = [], []
    for i in range(0, x.shape[0], chunk):
        a, d = GradientShap(f).attribute(
            x[i : i + chunk],
            base[i : i + chunk],
            n_samples=steps,
            target=target[i : i + chunk],
            return_convergence_delta=True,
        )
        attrs.append(a)
        deltas.append(d.view(-1, steps).mean(dim=1))  # ordered by example, then sample
    return torch.cat(attrs), torch.cat(deltas)


def _occlusion(f, x, base, target, steps, batch, patch):
    length, width = x.shape[1:]
    patch = (min(patch[0], length), min(patch[1], width))
    attr = Occlusion(f).attribute(
        x,
        sliding_window_shapes=patch,
        strides=patch,
        baselines=base,
        target=target,
        perturbations_per_eval=max(1, batch // x.shape[0]),  # each perturbation is evaluated for every example
    )
    return attr / torch.from_numpy(_patch_cells(length, width, patch)), None


def _ablation(f, x, base, target, steps, batch, patch):
    length, width = x.shape[1:]
    mask = torch.arange(width).expand(1, length, width).contiguous()  # one group per feature, whole window
    attr = FeatureAblation(f).attribute(
        x, baselines=base, target=target, feature_mask=mask, perturbations_per_eval=max(1, batch // x.shape[0])
    )
    return attr / length, None


def _occlusion_rows(n, length, width, steps, patch):
    p = (min(patch[0], length), min(patch[1], width))
    return n * (1 + math.ceil(length / p[0]) * math.ceil(width / p[1]))


@dataclass(frozen=True)
class MethodSpec:
    """One attribution method: what applies to it, how to run it on a batch, and its cost in model passes."""

    note: str
    run: _Run
    rows: Callable[[int, int, int, int, tuple[int, int]], int]  # (windows, length, width, steps, patch) -> passes
    path: bool = False  # `steps` applies (path points or samples)
    delta: bool = False  # Captum returns a convergence delta
    baseline: bool = True  # a baseline is used
    private_copy: bool = False  # sets hooks: runs on a private model copy


METHOD_SPECS: dict[str, MethodSpec] = {
    IG: MethodSpec(
        "Path integral of gradients from the baseline to the window (Gauss-Legendre, `steps` points).",
        _ig,
        lambda n, length, width, steps, patch: n * (steps + 2),  # path points, then f(x) and f(baseline)
        path=True,
        delta=True,
    ),
    SALIENCY: MethodSpec(
        "Signed gradient of the output with respect to each input; no baseline.",
        lambda f, x, base, target, *_: (Saliency(f).attribute(x, target=target, abs=False), None),
        lambda n, *_: n,
        baseline=False,
    ),
    IXG: MethodSpec(
        "Input times gradient; no baseline (an implicit all-zero reference).",
        lambda f, x, base, target, *_: (InputXGradient(f).attribute(x, target=target), None),
        lambda n, *_: n,
        baseline=False,
    ),
    DEEPLIFT: MethodSpec(
        "DeepLift rescale rule relative to the baseline, on a private model copy (it sets hooks).",
        lambda f, x, base, target, *_: DeepLift(f).attribute(x, base, target=target, return_convergence_delta=True),
        lambda n, *_: n * 4,  # x with its baseline, then both for the delta
        delta=True,
        private_copy=True,
    ),
    SHAP: MethodSpec(
        "GradientSHAP with the baseline as reference: gradients at `steps` random points on the path "
        "times (x − baseline); its delta is the mean over the samples. Stochastic: numbers vary between runs.",
        _shap,
        lambda n, length, width, steps, patch: n * steps * 3,  # samples, then f(x) and f(baseline) per sample
        path=True,
        delta=True,
    ),
    OCCLUSION: MethodSpec(
        "Patches of time × features set to the baseline; effect per patch spread over its cells.",
        _occlusion,
        _occlusion_rows,
    ),
    ABLATION: MethodSpec(
        "One feature over the whole window set to the baseline; effect spread over its time steps.",
        _ablation,
        lambda n, length, width, steps, patch: n * (1 + width),
    ),
}
# Views of the table for widgets and tests.
METHODS: tuple[str, ...] = tuple(METHOD_SPECS)
PATH_METHODS = frozenset(m for m, s in METHOD_SPECS.items() if s.path)
DELTA_METHODS = frozenset(m for m, s in METHOD_SPECS.items() if s.delta)
BASELINE_METHODS = frozenset(m for m, s in METHOD_SPECS.items() if s.baseline)
METHOD_NOTES = {m: s.note for m, s in METHOD_SPECS.items()}


def _worker(model: FlagTrader, method: str) -> FlagTrader:
    """DeepLift (hooks) or a model in training mode: a fresh private eval copy. Every other method: the
    cached merged copy (see `_merged_copy`), shared read-only like the model itself."""
    if not METHOD_SPECS[method].private_copy and not model.training:
        return _merged_copy(model)
    private = copy.deepcopy(model).eval()
    for p in private.parameters():
        p.requires_grad_(False)  # only input gradients are needed
    return private


_MERGED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (tensor versions, merged copy)
_MERGED_LOCK = threading.Lock()


def _versions(model: FlagTrader) -> tuple[int, ...]:
    """Version counters of every tensor: any in-place change of a weight changes them."""
    return tuple(t._version for t in (*model.parameters(), *model.buffers()))


def _merged_copy(model: FlagTrader) -> FlagTrader:
    """A private eval copy of `model` computing the same function, with each LoRA adapter merged into its base
    weight (one matmul per projection instead of three) and no parameter gradients: Integrated Gradients'
    batched steps run about a fifth faster. Kept per model while its weights are unchanged."""
    with _MERGED_LOCK:
        hit = _MERGED.get(model)
        if hit is not None and hit[0] == _versions(model):
            return hit[1]
    private = copy.deepcopy(model).eval()
    linears = private.linears() if hasattr(private, "linears") else {}
    with torch.no_grad():
        for lin in linears.values():
            lin.base.weight.copy_(lin.merged_weight())  # W + scale (A B)^T, or W where the adapter is off
            lin.lora_enabled = False
    for p in private.parameters():
        p.requires_grad_(False)
    with _MERGED_LOCK:
        _MERGED[model] = (_versions(model), private)
    return private


def _relative(delta: float | None, change: float) -> float | None:
    if delta is None or not np.isfinite(delta):
        return None
    if abs(change) < 1e-8:
        return None if abs(delta) >= 1e-8 else 0.0
    return abs(delta) / abs(change)


def attribute(
    model: FlagTrader,
    window: np.ndarray,
    method: str = IG,
    target: int | None = None,
    position: int = -1,
    baseline: str = ZEROS,
    feature_mean: np.ndarray | None = None,
    steps: int = 50,
    internal_batch_size: int = 64,
    output: str = "logit",
    occlusion_patch: tuple[int, int] = (8, 1),
    feature_names: Sequence[str] | None = None,
    auto_threshold: float | None = None,
    max_steps: int = 800,
    progress: Callable[[float, str], object] | None = None,
) -> AttributionResult:
    """Attribute the deciding output of one window (S, state_dim) to its inputs with one Captum method.

    target: class index, or None for the class the model predicts at `position`. internal_batch_size:
    rows (windows) per forward pass inside path and perturbation methods. auto_threshold (Integrated
    Gradients only): double `steps` until relative_delta < auto_threshold or steps would exceed max_steps.
    progress(fraction, message) is called after every forward pass Captum makes (fraction of this round).
    """
    x_np = np.asarray(window, dtype=np.float32)[None]
    _check(model, x_np, method, baseline, output, steps)
    length, width = x_np.shape[1:]
    pos = _position(position, length)
    names = feature_names_or_default(feature_names, width)
    if len(names) != width:
        raise ValueError(f"{len(names)} feature names for {width} features.")
    n_actions = model.config.n_actions
    notes: list[str] = [METHOD_NOTES[method]]
    t0 = time.perf_counter()
    with torch.inference_mode(False), torch.enable_grad():
        x = torch.tensor(x_np, requires_grad=True)  # fresh, not an inference tensor: Captum needs its gradient
        base = torch.tensor(make_baseline(x_np, baseline, feature_mean))
        worker = _worker(model, method)
        with torch.no_grad():
            logits = worker(torch.cat([x, base]))[:, pos, :]  # (2, n_actions): window, baseline
        probs = logits[0].softmax(-1)
        tgt = int(logits[0].argmax()) if target is None else int(target)
        if not 0 <= tgt < n_actions:
            raise ValueError(f"target class {tgt} is outside 0..{n_actions - 1}.")
        fx, fb = (probs[tgt], logits[1].softmax(-1)[tgt]) if output == "probability" else logits[:, tgt]
        change = float(fx - fb)
        tgt_t = torch.tensor([tgt])
        n = steps if method in PATH_METHODS else None
        while True:
            total, done = forward_rows(method, 1, length, width, n or 1, occlusion_patch), 0

            def on_rows(rows: int, n: int | None = n, total: int = total) -> None:
                nonlocal done
                done += rows
                if progress is not None:
                    label = f"{method}" + (f", {n} steps" if n else "")
                    progress(min(done / total, 1.0), f"{label}: {min(done, total):,} / {total:,} model passes")

            attr, delta = _run(
                worker, method, x, base, tgt_t, pos, output, n or 1, internal_batch_size, occlusion_patch, on_rows
            )
            d = None if delta is None else float(delta.view(-1)[0])
            rel = _relative(d, change)
            if n is None or method != IG or auto_threshold is None or rel is None or rel < auto_threshold:
                break
            if n * 2 > max_steps:
                notes.append(
                    f"relative delta still {rel:.1%} at the step cap of {max_steps}; "
                    "the attributions may not add up to f(x) − f(baseline)."
                )
                break
            notes.append(f"{n} steps: relative delta {rel:.1%} ≥ {auto_threshold:.1%}, doubling")
            n *= 2
        seconds = time.perf_counter() - t0
    if method == DEEPLIFT:
        notes.append(deeplift_caveat(model))
    return AttributionResult(
        method=method,
        attributions=attr[0].detach().float().numpy(),
        target=tgt,
        target_name=action_names(n_actions)[tgt],
        position=pos,
        baseline=baseline,
        output=output,
        probabilities=probs.float().numpy(),
        f_input=float(fx),
        f_baseline=float(fb),
        delta=d,
        relative_delta=rel,
        steps=n,
        seconds=seconds,
        feature_names=names,
        notes=tuple(notes),
    )


def deeplift_caveat(model: FlagTrader) -> str:
    """Which non-linearities DeepLift's rescale rule does not cover in this model (they get plain gradients)."""
    kinds = sorted(
        {
            type(m).__name__
            for m in model.modules()
            if type(m) not in SUPPORTED_NON_LINEAR
            and type(m).__module__ in ("torch.nn.modules.activation", "torch.nn.modules.normalization")
        }
    )
    return (
        "Captum's DeepLift rescale rule covers only "
        + ", ".join(sorted(t.__name__ for t in SUPPORTED_NON_LINEAR))
        + f"; this model's {', '.join(kinds) or 'layers'} and the softmax inside attention (a function, not a "
        "module) get plain gradients, so completeness is not guaranteed: read the delta."
    )


def completeness(result: AttributionResult, threshold: float = 0.05) -> tuple[str, str]:
    """(level, message): level "good" (relative delta < threshold), "fair" (< 4 x threshold), "poor", or "n/a"
    for methods without a convergence delta."""
    rel = result.relative_delta
    if result.delta is None:
        return "n/a", f"{result.method} has no completeness check (no convergence delta)."
    if rel is None:
        return "n/a", (
            f"f(x) − f(baseline) is 0, so the relative delta is undefined; delta {result.delta:+.2e}. "
            "Choose another baseline."
        )
    level = "good" if rel < threshold else "fair" if rel < 4 * threshold else "poor"
    return level, (
        f"**Completeness {level}**: delta {result.delta:+.2e} = Σ attributions − (f(x) − f(baseline)); "
        f"relative delta {100 * rel:.3g} % of |f(x) − f(baseline)| (threshold {threshold:.1%})."
    )


def feature_table(result: AttributionResult, top_k: int | None = None) -> pd.DataFrame:
    """Per-feature signed totals ranked by magnitude: columns feature, total, abs_total, share."""
    tot = result.per_feature
    df = pd.DataFrame({"feature": result.feature_names, "total": tot, "abs_total": np.abs(tot)})
    df["share"] = df["abs_total"] / max(float(df["abs_total"].sum()), 1e-30)
    df = df.sort_values("abs_total", ascending=False, ignore_index=True)
    return df.head(top_k) if top_k else df


def attribution_matrix(result: AttributionResult, times: pd.DatetimeIndex) -> pd.DataFrame:
    """The time × feature attributions as a table: one row per bar of the window (datetime, offset from the
    deciding step), one column per feature."""
    df = pd.DataFrame(result.attributions, columns=list(result.feature_names))
    df.insert(0, "offset", result.offsets)
    df.insert(0, "datetime", pd.DatetimeIndex(times)[: len(df)])
    return df


def rank_agreement(vectors: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """Spearman rank correlation between importance vectors of equal length (e.g. |per-feature totals|)."""
    lengths = {len(v) for v in vectors.values()}
    if len(lengths) > 1:
        raise ValueError(f"importance vectors differ in length: {sorted(lengths)}")
    return pd.DataFrame({k: np.asarray(v, np.float64) for k, v in vectors.items()}).corr(method="spearman")


def agreement(
    results: Sequence[AttributionResult], by: str = "feature", extra: Mapping[str, np.ndarray] | None = None
) -> pd.DataFrame:
    """Spearman correlation of |per-feature| (by="feature") or |per-time| (by="time") totals between results,
    plus any `extra` importance vectors (e.g. attention rollout of the deciding step, by="time").
    By time, Feature Ablation is left out: it spreads each effect evenly over time, so its steps are all equal."""
    if by not in ("feature", "time"):
        raise ValueError(f"by must be 'feature' or 'time', not {by!r}")
    vecs = {
        r.method: np.abs(r.per_feature if by == "feature" else r.per_time)
        for r in results
        if by == "feature" or r.method != ABLATION
    }
    vecs.update(extra or {})
    return rank_agreement(vecs)


def rollout_importance(model: FlagTrader, window: np.ndarray, position: int = -1) -> np.ndarray:
    """(S,) attention rollout row of the deciding step: how much each input step flows into it."""
    maps = window_attention(model, np.asarray(window, dtype=np.float32)).maps
    return rollout(maps)[_position(position, maps.shape[-1])]


def global_importance(
    model: FlagTrader,
    windows: np.ndarray,
    indices: Sequence[int] | np.ndarray | None = None,
    method: str = IXG,
    target: int | None = None,
    position: int = -1,
    baseline: str = ZEROS,
    feature_mean: np.ndarray | None = None,
    steps: int = 16,
    batch_size: int = 16,
    internal_batch_size: int = 64,
    output: str = "logit",
    occlusion_patch: tuple[int, int] = (8, 1),
    feature_names: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> GlobalImportance:
    """Per-feature totals of `method` over many windows ((N, S, D), e.g. a rolling_windows view).

    indices: which windows (default all). target None explains each window's predicted class.
    progress(done, total) is called after every batch of `batch_size` windows.
    """
    windows = np.asarray(windows)
    idx = np.arange(len(windows)) if indices is None else np.asarray(indices, dtype=int)
    if len(idx) == 0:
        raise ValueError("no windows selected for global importance.")
    _check(model, windows[idx[:1]].astype(np.float32), method, baseline, output, steps)
    length, width = windows.shape[1:]
    pos = _position(position, length)
    names = feature_names_or_default(feature_names, width)
    totals, predicted, targets = [], [], []
    t0 = time.perf_counter()
    with torch.inference_mode(False), torch.enable_grad():
        worker = _worker(model, method)
        for start in range(0, len(idx), batch_size):
            x_np = np.ascontiguousarray(windows[idx[start : start + batch_size]], dtype=np.float32)
            model.config.check_windows(x_np.shape, bool(np.isfinite(x_np).all()))
            x = torch.tensor(x_np, requires_grad=True)
            base = torch.tensor(make_baseline(x_np, baseline, feature_mean))
            with torch.no_grad():
                pred = model(x)[:, pos, :].argmax(-1)
            tgt = pred if target is None else torch.full_like(pred, int(target))
            attr, _ = _run(worker, method, x, base, tgt, pos, output, steps, internal_batch_size, occlusion_patch)
            totals.append(attr.detach().float().sum(dim=1).numpy())
            predicted.append(pred.numpy())
            targets.append(tgt.numpy())
            if progress is not None:
                progress(min(start + batch_size, len(idx)), len(idx))
    return GlobalImportance(
        method=method,
        baseline=baseline,
        output=output,
        position=pos,
        totals=np.concatenate(totals).astype(np.float32),
        window_index=idx,
        predicted=np.concatenate(predicted),
        targets=np.concatenate(targets),
        feature_names=names,
        action_names=action_names(model.config.n_actions),
        seconds=time.perf_counter() - t0,
    )
