"""How far to trust each attribution method on this model: perturbation tests and a randomisation check.

- Deletion / insertion (Petsiuk et al., RISE): cells are set to the baseline (deletion, starting from the
  window) or copied in from the window (insertion, starting from the baseline) in the method's order, most
  positive attribution first; the curve is the probability of the explained class at the deciding step. A
  faithful method's deletion curve falls faster (smaller area) and its insertion curve rises faster (larger
  area) than random orders of the same cells.
- Captum's `infidelity` (Yeh et al.): E[(Σ_cells I·attribution − (f(x) − f(x − I)))²] over random perturbations
  I that set a random share of cells to the baseline. For methods whose attributions are in output units per
  cell (all but Saliency) I is the 0/1 cell indicator, for Saliency (a gradient) I = indicator · (x − baseline),
  so each term compares the attributed change with the real change of the explained output. Lower is better.
- Captum's `sensitivity_max`: the largest relative change ‖attr(x + ε) − attr(x)‖ / ‖attr(x)‖ over uniform
  noise ε of a given radius (in the model's normalised units). Lower is more stable.
- Randomisation sanity check (Adebayo et al.): on a private copy, the LoRA adapters are re-initialised from the
  top block down (cascading), and each method's attributions are rank-correlated (Spearman, |cells|) with the
  original ones. A method that keeps a high correlation after the learned adapters are destroyed explains the
  input more than the model. The cached, shared model is never touched.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from captum.metrics import infidelity, sensitivity_max

from ..features import action_names
from ..model import FlagTrader, LoRALinear
from .attribution import (
    IG,
    IXG,
    SALIENCY,
    ZEROS,
    AttributionResult,
    DecisionOutput,
    _run,
    _worker,
    attribute,
    make_baseline,
    rank_agreement,
)

Progress = Callable[[float, str], object]
DEFAULT_METHODS: tuple[str, ...] = (IG, SALIENCY, IXG)


@dataclass(frozen=True)
class Curves:
    """Deletion and insertion curves of one method. fractions (P,); deletion/insertion (P,) probabilities of the
    explained class; random_* (R, P) for R random orders of the same cells."""

    method: str
    fractions: np.ndarray
    deletion: np.ndarray
    insertion: np.ndarray
    random_deletion: np.ndarray
    random_insertion: np.ndarray

    @staticmethod
    def area(curve: np.ndarray, fractions: np.ndarray) -> float:
        """Trapezoid area under a curve over fractions 0..1 (for (R, P) the mean of the R areas)."""
        c = np.atleast_2d(curve)
        return float(np.mean(((c[:, 1:] + c[:, :-1]) / 2 * np.diff(fractions)).sum(axis=1)))

    @property
    def areas(self) -> dict[str, float]:
        f = self.fractions
        return {
            "deletion area": self.area(self.deletion, f),
            "random deletion area": self.area(self.random_deletion, f),
            "insertion area": self.area(self.insertion, f),
            "random insertion area": self.area(self.random_insertion, f),
        }

    def frame(self) -> pd.DataFrame:
        """Long form for plotting: fraction, curve (deletion/insertion), order (method or 'random (mean)'), p."""
        rows = []
        for curve, ours, rand in (
            ("deletion", self.deletion, self.random_deletion),
            ("insertion", self.insertion, self.random_insertion),
        ):
            rows.append(
                pd.DataFrame({"fraction": self.fractions, "curve": curve, "order": self.method, "probability": ours})
            )
            rows.append(
                pd.DataFrame(
                    {
                        "fraction": self.fractions,
                        "curve": curve,
                        "order": "random (mean)",
                        "probability": rand.mean(axis=0),
                    }
                )
            )
        return pd.concat(rows, ignore_index=True)


def _target_probs(model: FlagTrader, windows: np.ndarray, target: int, position: int, batch_size: int) -> np.ndarray:
    """Probability of `target` at `position` for windows (N, S, D) -> (N,); plain forward, no gradients."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(windows), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(windows[i : i + batch_size], dtype=np.float32))
            out.append(model(x)[:, position].softmax(-1)[:, target].numpy())
    return np.concatenate(out)


def deletion_insertion(
    model: FlagTrader,
    window: np.ndarray,
    attributions: np.ndarray,
    target: int,
    baseline: np.ndarray,
    method: str = "attribution",
    position: int = -1,
    n_points: int = 21,
    n_random: int = 8,
    seed: int = 0,
    batch_size: int = 64,
) -> Curves:
    """Deletion and insertion curves of window (S, D) in the order of `attributions` (S, D), most positive first,
    against `n_random` random orders. `baseline` (S, D) is what deleted cells become. n_points fractions 0..1."""
    w, b = np.asarray(window, np.float32), np.asarray(baseline, np.float32)
    if np.shape(attributions) != w.shape or b.shape != w.shape:
        raise ValueError(f"attributions and baseline must have the window's shape {w.shape}.")
    if n_points < 2:
        raise ValueError("a curve needs at least 2 points.")
    n_cells = w.size
    counts = np.unique(np.round(np.linspace(0, n_cells, n_points)).astype(int))
    rng = np.random.default_rng(seed)
    orders = [
        np.argsort(-np.asarray(attributions, np.float64).ravel(), kind="stable"),
        *(rng.permutation(n_cells) for _ in range(n_random)),
    ]
    batch = []
    for order in orders:
        rank = np.empty(n_cells, dtype=np.int64)
        rank[order] = np.arange(n_cells)
        taken = (rank[None, :] < counts[:, None]).reshape(len(counts), *w.shape)  # (P, S, D) cells moved so far
        batch.append(np.where(taken, b, w))  # deletion
        batch.append(np.where(taken, w, b))  # insertion
    probs = _target_probs(model, np.concatenate(batch), target, position, batch_size).reshape(len(orders), 2, -1)
    return Curves(method, counts / n_cells, probs[0, 0], probs[0, 1], probs[1:, 0], probs[1:, 1])


def _infidelity(
    model: FlagTrader,
    method: str,
    x: torch.Tensor,
    base: torch.Tensor,
    attr: torch.Tensor,
    target: int,
    position: int,
    output: str,
    share: float,
    n_samples: int,
    seed: int,
) -> float:
    gen = torch.Generator().manual_seed(seed)

    def perturb(inputs: torch.Tensor, baselines: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = (torch.rand(inputs.shape, generator=gen) < share).to(inputs.dtype)
        perturbed = inputs + mask * (baselines - inputs)  # chosen cells set to the baseline
        return (mask * (inputs - baselines) if method == SALIENCY else mask), perturbed

    f = DecisionOutput(model, position, output)  # the output the attributions explain (their units)
    with torch.no_grad():
        value = infidelity(f, perturb, x, attr, baselines=base, target=target, n_perturb_samples=n_samples)
    return float(value[0])


def _sensitivity(
    model: FlagTrader,
    method: str,
    x: torch.Tensor,
    target: int,
    position: int,
    baseline: str,
    feature_mean: np.ndarray | None,
    output: str,
    steps: int,
    radius: float,
    n_samples: int,
    seed: int,
) -> float:
    worker = _worker(model, method)

    def explain(inputs: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor | tuple[torch.Tensor, ...]:
        x_in = inputs[0] if isinstance(inputs, tuple) else inputs  # Captum passes a tuple of one tensor
        base = torch.from_numpy(make_baseline(x_in.detach().numpy(), baseline, feature_mean))
        tgt = torch.full((len(x_in),), target, dtype=torch.long)
        attr = _run(
            worker, method, x_in.detach().clone().requires_grad_(True), base, tgt, position, output, steps, 64, (8, 1)
        )[0].detach()
        return (attr,) if isinstance(inputs, tuple) else attr

    torch.manual_seed(seed)  # Captum's default perturbation draws from torch's global generator
    return float(sensitivity_max(explain, x, perturb_radius=radius, n_perturb_samples=n_samples)[0])


@dataclass(frozen=True)
class Faithfulness:
    """Per method: deletion/insertion areas against random orders, infidelity, sensitivity (`table`), and
    the curves of each method."""

    table: pd.DataFrame
    curves: dict[str, Curves]
    target: int
    target_name: str
    seconds: float


def faithfulness(
    model: FlagTrader,
    window: np.ndarray,
    methods: Sequence[str] = DEFAULT_METHODS,
    target: int | None = None,
    position: int = -1,
    baseline: str = ZEROS,
    feature_mean: np.ndarray | None = None,
    output: str = "logit",
    steps: int = 32,
    n_points: int = 16,
    n_random: int = 4,
    infidelity_share: float = 0.1,
    infidelity_samples: int = 16,
    sensitivity_radius: float = 0.1,
    sensitivity_samples: int = 4,
    seed: int = 0,
    progress: Progress | None = None,
) -> Faithfulness:
    """Faithfulness of `methods` on one window (S, D) for class `target` (None: the predicted class).

    Curves use the probability of the class and delete cells to `baseline` (the attribution baseline);
    sensitivity is measured with `sensitivity_samples` noisy copies of radius `sensitivity_radius`.
    """
    t0 = time.perf_counter()
    w = np.asarray(window, np.float32)
    pos = position % len(w)
    with torch.inference_mode():
        logits = model(torch.from_numpy(w)[None])[0, pos]
    tgt = int(logits.argmax()) if target is None else int(target)
    base_np = make_baseline(w, baseline, feature_mean)
    rows, curves = [], {}
    for i, method in enumerate(methods):
        if progress is not None:
            progress(i / len(methods), f"{method}: attributions and curves")
        t1 = time.perf_counter()
        res = attribute(
            model,
            w,
            method,
            target=tgt,
            position=pos,
            baseline=baseline,
            feature_mean=feature_mean,
            steps=steps,
            output=output,
        )
        cv = deletion_insertion(model, w, res.attributions, tgt, base_np, method, pos, n_points, n_random, seed)
        curves[method] = cv
        with torch.inference_mode(False), torch.enable_grad():
            x, base = torch.from_numpy(w.copy())[None], torch.from_numpy(base_np)[None]
            attr = torch.from_numpy(res.attributions)[None]
            infid = _infidelity(
                model, method, x, base, attr, tgt, pos, output, infidelity_share, infidelity_samples, seed
            )
            if progress is not None:
                progress((i + 0.5) / len(methods), f"{method}: sensitivity")
            sens = _sensitivity(
                model,
                method,
                x,
                tgt,
                pos,
                baseline,
                feature_mean,
                output,
                steps,
                sensitivity_radius,
                sensitivity_samples,
                seed,
            )
        a = cv.areas
        rows.append(
            {
                "method": method,
                **a,
                "deletion beats random": a["deletion area"] < a["random deletion area"],
                "insertion beats random": a["insertion area"] > a["random insertion area"],
                "infidelity": infid,
                "sensitivity max": sens,
                "seconds": time.perf_counter() - t1,
            }
        )
    if progress is not None:
        progress(1.0, "done")
    return Faithfulness(
        pd.DataFrame(rows), curves, tgt, action_names(model.config.n_actions)[tgt], time.perf_counter() - t0
    )


def randomised_copy(model: FlagTrader, n_top_blocks: int, seed: int = 0) -> FlagTrader:
    """A private deep copy of `model` whose LoRA adapters in the top `n_top_blocks` blocks are re-initialised:
    A as at creation (Kaiming uniform), B Gaussian with the trained B's standard deviation, so the adapter keeps
    its size but loses what it learned. The original is not touched."""
    clone = copy.deepcopy(model).eval()
    blocks = clone.blocks()
    with torch.no_grad():
        for b in range(len(blocks) - n_top_blocks, len(blocks)):
            block = blocks[b]
            gen = torch.Generator().manual_seed(seed * 1000 + b)  # per block: cascades share their re-inits
            for mod in block.modules():
                lora = mod.lora if isinstance(mod, LoRALinear) else None
                if lora is None:
                    continue
                fan_in = lora.lora_A.shape[0]  # kaiming_uniform_(A.T, a=sqrt(5)) as at creation: U(±1/sqrt(fan_in))
                bound = 1 / math.sqrt(fan_in)
                lora.lora_A.copy_((torch.rand(lora.lora_A.shape, generator=gen) * 2 - 1) * bound)
                lora.lora_B.copy_(torch.randn(lora.lora_B.shape, generator=gen) * lora.lora_B.std())
    return clone


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(rank_agreement({"a": np.abs(a).ravel(), "b": np.abs(b).ravel()}).iloc[0, 1])


def randomisation_check(
    model: FlagTrader,
    window: np.ndarray,
    methods: Sequence[str] = DEFAULT_METHODS,
    target: int | None = None,
    position: int = -1,
    baseline: str = ZEROS,
    feature_mean: np.ndarray | None = None,
    output: str = "logit",
    steps: int = 32,
    seed: int = 0,
    progress: Progress | None = None,
) -> pd.DataFrame:
    """Cascading randomisation of the LoRA adapters, top block first, on private copies.

    Returns one row per (blocks randomised k = 0..n_blocks, method): `randomised` names the blocks, `spearman`
    the rank correlation of |attributions| with the original (k = 0 gives 1), `decision` the copy's decision.
    """
    w = np.asarray(window, np.float32)
    n_blocks = len(model.blocks())
    names = action_names(model.config.n_actions)

    def run(mdl: FlagTrader, method: str, tgt: int | None) -> AttributionResult:
        return attribute(
            mdl,
            w,
            method,
            target=tgt,
            position=position,
            baseline=baseline,
            feature_mean=feature_mean,
            steps=steps,
            output=output,
        )

    original = {m: run(model, m, target) for m in methods}
    tgt = next(iter(original.values())).target if original else 0
    rows = []
    for k in range(n_blocks + 1):
        if progress is not None:
            progress(k / (n_blocks + 1), f"adapters of the top {k} block(s) re-initialised")
        clone = randomised_copy(model, k, seed) if k else model
        label = "none" if k == 0 else f"blocks {n_blocks - 1}…{n_blocks - k}" if k > 1 else f"block {n_blocks - 1}"
        for m in methods:
            res = original[m] if k == 0 else run(clone, m, tgt)
            rows.append(
                {
                    "blocks randomised": k,
                    "randomised": label,
                    "method": m,
                    "spearman": _spearman(original[m].attributions, res.attributions),
                    "decision": names[int(np.argmax(res.probabilities))],
                }
            )
    if progress is not None:
        progress(1.0, "done")
    return pd.DataFrame(rows)
