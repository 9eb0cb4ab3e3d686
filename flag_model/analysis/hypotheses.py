"""Which architecture was this checkpoint trained with? Rank what the weights cannot prove on labelled data.

Heads, attention mask, norm placement and LoRA scale are invisible in the weights, and a wrong choice still
loads strictly. On labelled windows the checkpoint can tell: under the settings it was trained with, its loss
is clearly lower. Every combination is scored at each window's decision (last) position -- NLL, accuracy,
F1-macro, Brier score, ECE -- and ranked by mean NLL, with circular block-bootstrap intervals (windows are
resampled in blocks of consecutive windows, so autocorrelated market data does not narrow them falsely) and
the share of resamples in which each entry has the lowest NLL. All entries are scored on the same windows and
resampled with the same draws (a paired comparison).

Work shared between combinations: the LoRA merge is done once per scale (`InferenceEngine`), and heads, mask
and norm placement are variants over those merged weights (`InferenceEngine.variant`); the embedding of a batch
is computed once for all variants of a scale. Nothing after the embedding can be shared: every block's input
already depends on all four assumptions.

Precision: the final numbers always come from the float32 engine (merged weights; equal to the reference
model to ~1e-5 in the logits, see tests). The fast engine (bfloat16 where the CPU or GPU does it natively) is
used only for the optional screening stage, which only decides which combinations go on to the full set.

`score_combination` is a pure function of (state dict, config, hypothesis, windows), so the scoring of one
combination can run anywhere; `rank_scores` turns any set of logits into a ranking. `rank_hypotheses` takes a
`scorer` to score elsewhere: `flag_model.distributed.hypotheses_scorer` runs the same `score_hypotheses` on a Dask
cluster in chunks of whole engine batches, so its logits, and the ranking, are identical to one process.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..config import ModelConfig
from ..data import DataError, FeatureMatrix, check_interval, checkpoint_features, default_window, evenly_spaced
from ..engine import InferenceEngine, forward_flops
from ..features import LabelRule, action_names
from ..model import build_model
from .bootstrap import f1_macro
from .predict import NO_LABEL, evaluate_arrays, row_labels

Progress = Callable[[int, int, str], object]  # (window passes done, total, what is running)
Cancel = Callable[[], bool]  # True: stop at the next batch
EngineOf = Callable[[float, str], InferenceEngine]  # (LoRA scale, precision) -> engine with those merged weights

MIN_HEAD_WIDTH = 8
FIXED_SCALES = (0.5, 1.0, 2.0)
DEFAULT_ALPHA = 16.0  # the original LoRA class's default alpha (DESIGN §2)
DEFAULT_WINDOWS = 512
DEFAULT_RESAMPLES = 1000
ECE_BINS = 10


class Cancelled(RuntimeError):
    """The user stopped the ranking."""


@dataclass(frozen=True)
class Hypothesis:
    """One combination of the assumptions the weights cannot prove, and the window length it is scored at."""

    num_heads: int
    causal: bool
    norm_first: bool
    lora_scale: float
    window: int
    scale_source: str = field(default="", compare=False)

    def label(self) -> str:
        return (
            f"{self.num_heads} heads · {'pre' if self.norm_first else 'post'}-norm · "
            f"{'causal' if self.causal else 'no mask'} · LoRA ×{self.lora_scale:g} · window {self.window}"
        )


@dataclass(frozen=True)
class SearchSpace:
    """The candidates per assumption; `hypotheses()` is their product."""

    heads: tuple[int, ...]
    causal: tuple[bool, ...]
    norm_first: tuple[bool, ...]
    scales: tuple[tuple[float, str], ...]  # (value, where it comes from)
    windows: tuple[int, ...]

    def hypotheses(self) -> list[Hypothesis]:
        return [
            Hypothesis(h, c, n, s, w, src)
            for w in self.windows
            for s, src in self.scales
            for n in self.norm_first
            for c in self.causal
            for h in self.heads
        ]

    def table(self) -> pd.DataFrame:
        """One row per assumption: its candidates and where they come from."""
        return pd.DataFrame(
            [
                (
                    "heads",
                    ", ".join(map(str, self.heads)),
                    f"divisors of d with head width >= {MIN_HEAD_WIDTH}, and a stored count",
                ),
                ("causal mask", ", ".join("on" if c else "off" for c in self.causal), "both"),
                ("norm placement", ", ".join("pre" if n else "post" for n in self.norm_first), "both"),
                (
                    "LoRA scale",
                    ", ".join(f"{s:g}" for s, _ in self.scales),
                    "; ".join(f"{s:g}: {src}" for s, src in self.scales),
                ),
                ("window length", ", ".join(map(str, self.windows)), "stored in the checkpoint, else 64, or chosen"),
            ],
            columns=["assumption", "candidates", "source"],
        )

    def __len__(self) -> int:
        return len(self.heads) * len(self.causal) * len(self.norm_first) * len(self.scales) * len(self.windows)


def candidate_heads(cfg: ModelConfig) -> tuple[int, ...]:
    """Divisors of d with head width >= 8, plus a stored head count (which may be narrower)."""
    heads = {h for h in range(1, cfg.d_model + 1) if cfg.d_model % h == 0 and cfg.d_model // h >= MIN_HEAD_WIDTH}
    if "stored config" in cfg.provenance.get("num_heads", ""):
        heads.add(cfg.num_heads)
    return tuple(sorted(heads or {1}))


def candidate_scales(cfg: ModelConfig) -> tuple[tuple[float, str], ...]:
    """LoRA scales: the stored alpha/r if any, 0.5, 1, 2, the default alpha 16 / r, and rsLoRA's alpha/sqrt(r)
    when alpha is stored. Equal values are merged (their sources joined). Without LoRA the scale has no effect."""
    r = cfg.lora_rank
    if r == 0:
        return ((1.0, "no LoRA tensors: the scale has no effect"),)
    found: dict[float, list[str]] = {}
    stored = "stored config" in cfg.provenance.get("lora_scale", "")
    if stored:
        found.setdefault(round(cfg.lora_scale, 9), []).append(f"stored alpha {cfg.lora_scale * r:g} / r {r}")
    for s in FIXED_SCALES:
        found.setdefault(round(s, 9), []).append("fixed candidate")
    found.setdefault(round(DEFAULT_ALPHA / r, 9), []).append(f"default alpha {DEFAULT_ALPHA:g} / r {r}")
    if stored:
        found.setdefault(round(cfg.lora_scale * r / math.sqrt(r), 9), []).append(
            f"rsLoRA: stored alpha {cfg.lora_scale * r:g} / sqrt(r {r})"
        )
    return tuple((s, "; ".join(src)) for s, src in sorted(found.items()))


def search_space(
    cfg: ModelConfig,
    meta: Mapping[str, Any],
    windows: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    scales: Sequence[float] | None = None,
) -> SearchSpace:
    """The default search space of a checkpoint; `windows`/`heads`/`scales` replace a dimension's candidates.
    Window lengths default to the one the checkpoint's metadata names (else 64). Raises ValueError on values
    the model cannot take."""
    wins = tuple(sorted(set(int(w) for w in windows))) if windows else (default_window(meta, cfg.max_length),)
    bad = [w for w in wins if not 1 <= w <= cfg.max_length]
    if bad:
        raise ValueError(f"window length(s) {bad} outside 1..{cfg.max_length} (max_length).")
    hs = tuple(sorted(set(int(h) for h in heads))) if heads else candidate_heads(cfg)
    bad = [h for h in hs if h < 1 or cfg.d_model % h]
    if bad:
        raise ValueError(f"{bad} heads do not divide the hidden size d={cfg.d_model}.")
    known = dict(candidate_scales(cfg))
    sc = (
        tuple((float(s), known.get(round(float(s), 9), "given")) for s in sorted(set(scales)))
        if scales
        else tuple(known.items())
    )
    if any(not math.isfinite(s) or s < 0 for s, _ in sc):
        raise ValueError("LoRA scales must be finite and >= 0.")
    return SearchSpace(hs, (False, True), (False, True), sc, wins)


# Labelled windows


@dataclass(frozen=True)
class LabelledData:
    """Windows ending at `ends` (ascending feature rows) with the label of each decision row."""

    values: np.ndarray  # (n_rows, state_dim) float32 features of every row
    ends: np.ndarray  # (n,) int64 decision row of each window
    labels: np.ndarray  # (n,) int64 label at each decision row (0..n_actions-1)
    times: pd.DatetimeIndex  # (n,) time of each decision row
    rule: LabelRule
    normalisation: str
    warnings: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.ends)

    def windows(self, length: int, index: np.ndarray) -> np.ndarray:
        """Windows number `index` as one float32 array (len(index), length, state_dim) (a copy)."""
        rows = self.ends[index][:, None] - (length - 1) + np.arange(length)  # (k, length)
        return self.values[rows]


def labelled_windows(fm: FeatureMatrix, n_windows: int, longest: int, rule: LabelRule) -> LabelledData:
    """`n_windows` decision rows spread evenly over the rows that have a label and `longest - 1` rows before
    them (so every window length scores the same rows). Raises DataError when there are none."""
    if n_windows < 1:
        raise ValueError("the number of windows must be at least 1.")
    labels = row_labels(fm.close, rule)
    rows = np.flatnonzero(labels != NO_LABEL)
    rows = rows[rows >= longest - 1]
    if len(rows) == 0:
        raise DataError(
            f"no labelled window: windows of {longest} rows need {longest + rule.horizon} feature rows "
            f"with prices; the data has {len(fm.values)}. Use more data or a shorter window."
        )
    ends = np.unique(rows[evenly_spaced(len(rows), n_windows)])
    return LabelledData(fm.values, ends, labels[ends], fm.times[ends], rule, fm.normalisation, fm.warnings)


def labelled_data(
    ohlcv: pd.DataFrame,
    meta: Mapping[str, Any],
    state_dim: int,
    n_windows: int,
    longest: int,
    rule: LabelRule | None = None,
    normalisation: str = "auto",
) -> LabelledData:
    """OHLCV bars -> the checkpoint's features and labelled windows (labels by `rule`, default the checkpoint's
    stored rule, else simple-60's; a bar interval unlike training's is a warning). normalisation "auto": the stored
    feature statistics when the checkpoint has them, else z-scores of this data (a model trained on raw
    simple-60 values is rare; said in the warnings)."""
    rule = rule or LabelRule.from_meta(meta)[0]
    fm = checkpoint_features(ohlcv, meta, state_dim, "checkpoint" if normalisation == "auto" else normalisation)
    if normalisation == "auto" and fm.normalisation != "checkpoint":
        fm = checkpoint_features(ohlcv, meta, state_dim, "data")
        fm = replace(
            fm,
            warnings=(
                "the checkpoint stores no feature statistics: features are z-scored with this data's mean and std",
                *fm.warnings,
            ),
        )
    interval = check_interval(fm.times, meta, rule.horizon)
    if not interval.matches:  # the ranking is only as good as the match between this data and training's
        fm = replace(fm, warnings=(interval.message.replace("**", ""), *fm.warnings))
    return labelled_windows(fm, n_windows, longest, rule)


# Scoring

# (hypotheses, window numbers, precision) -> decision logits (len(index), n_actions) of each hypothesis
Scorer = Callable[[Sequence[Hypothesis], np.ndarray, str], dict[Hypothesis, np.ndarray]]


def merged_engine(
    state_dict: Mapping[str, torch.Tensor],
    cfg: ModelConfig,
    scale: float,
    precision: str,
    device: str | None = None,
    batch_size: int | None = None,
) -> InferenceEngine:
    """An engine holding the weights merged with LoRA scale `scale` (the model itself is dropped); batches of
    `batch_size` windows, else the engine's choice."""
    model = build_model(
        state_dict, num_heads=cfg.num_heads, lora_scale=scale, norm_first=cfg.norm_first, causal=cfg.causal
    )  # strict, shapes checked before allocating
    return InferenceEngine(model, precision, device, batch_size)


def score_combination(
    state_dict: Mapping[str, torch.Tensor],
    cfg: ModelConfig,
    hyp: Hypothesis,
    windows: np.ndarray,
    precision: str = "exact",
    device: str | None = None,
) -> np.ndarray:
    """Decision-position logits (n, n_actions) float32 of windows (n, hyp.window, state_dim) under `hyp`.
    A pure function of its arguments, for running one combination anywhere."""
    engine = merged_engine(state_dict, cfg, hyp.lora_scale, precision, device)
    variant = engine.variant(hyp.num_heads, hyp.norm_first, hyp.causal)
    bs = engine.batch_size(hyp.window)
    out = np.empty((len(windows), cfg.n_actions), dtype=np.float32)
    for start in range(0, len(windows), bs):
        x = torch.from_numpy(np.array(windows[start : start + bs], dtype=np.float32))
        out[start : start + bs] = variant.forward_embedded(engine.embed(x)).cpu().numpy()
    return out


def score_hypotheses(
    state_dict: Mapping[str, torch.Tensor],
    cfg: ModelConfig,
    hyps: Sequence[Hypothesis],
    data: LabelledData,
    index: np.ndarray,
    precision: str = "exact",
    progress: Progress | None = None,
    cancel: Cancel | None = None,
    done: int = 0,
    total: int | None = None,
    device: str | None = None,
    batch_size: int | None = None,
    engine_of: EngineOf | None = None,
) -> dict[Hypothesis, np.ndarray]:
    """Logits (len(index), n_actions) of windows `index` under each hypothesis, sharing the merge per scale
    and the embedding per batch. Equal to `score_combination` per hypothesis (same engine, same batches).
    `done`/`total` place this call's progress inside a larger run. Raises Cancelled when `cancel()` is true.
    `engine_of(scale, precision)` supplies the merged engines (a cluster worker keeps them between tasks);
    by default each is built here with `batch_size`."""
    total = total if total is not None else len(hyps) * len(index)
    out: dict[Hypothesis, np.ndarray] = {}
    for scale in sorted({h.lora_scale for h in hyps}):
        if cancel is not None and cancel():
            raise Cancelled("stopped by the user")
        engine = (
            engine_of(scale, precision)
            if engine_of is not None
            else merged_engine(state_dict, cfg, scale, precision, device, batch_size)
        )
        for length in sorted({h.window for h in hyps if h.lora_scale == scale}):
            group = [h for h in hyps if h.lora_scale == scale and h.window == length]
            variants = [engine.variant(h.num_heads, h.norm_first, h.causal) for h in group]
            bs = engine.batch_size(length)  # the same batches as score_combination: identical logits
            logits = {h: np.empty((len(index), cfg.n_actions), dtype=np.float32) for h in group}
            for start in range(0, len(index), bs):
                sel = index[start : start + bs]
                emb = engine.embed(torch.from_numpy(data.windows(length, sel)))
                for h, v in zip(group, variants):
                    if cancel is not None and cancel():
                        raise Cancelled("stopped by the user")
                    logits[h][start : start + len(sel)] = v.forward_embedded(emb).cpu().numpy()
                    done += len(sel)
                    if progress is not None:
                        progress(done, total, f"LoRA ×{scale:g}, window {length}: {h.label()}")
            out.update(logits)
    return out


# Ranking


@dataclass(frozen=True)
class Ranking:
    """The ranking, best first. `table` columns: rank, num_heads, causal, norm_first, lora_scale, window,
    nll, nll_low, nll_high, accuracy, accuracy_low, accuracy_high, f1, f1_low, f1_high, brier, ece,
    share_best, windows, stage ("final" or "screened out"), scale_source, label."""

    table: pd.DataFrame
    n_windows: int
    resamples: int
    block_length: int
    level: float
    precision: str
    rule: LabelRule
    normalisation: str
    seconds: float = 0.0
    warnings: tuple[str, ...] = ()

    def records(self) -> list[dict[str, Any]]:
        """JSON-ready entries, best first (the CLI's --json)."""
        out = []
        for r in self.table.itertuples(index=False):
            out.append(
                {
                    "rank": int(r.rank),
                    "num_heads": int(r.num_heads),
                    "causal": bool(r.causal),
                    "norm_first": bool(r.norm_first),
                    "lora_scale": float(r.lora_scale),
                    "window": int(r.window),
                    "nll": float(r.nll),
                    "nll_interval": [float(r.nll_low), float(r.nll_high)],
                    "accuracy": float(r.accuracy),
                    "accuracy_interval": [float(r.accuracy_low), float(r.accuracy_high)],
                    "f1": float(r.f1),
                    "f1_interval": [float(r.f1_low), float(r.f1_high)],
                    "brier": float(r.brier),
                    "ece": float(r.ece),
                    "share_best": float(r.share_best),
                    "windows": int(r.windows),
                    "stage": r.stage,
                    "lora_scale_source": r.scale_source,
                }
            )
        return out


def block_length(n: int, window: int, ends: np.ndarray) -> int:
    """Bootstrap block length: n^(1/3), and at least the number of consecutive windows that overlap."""
    stride = float(np.median(np.diff(ends))) if len(ends) > 1 else 1.0
    return int(max(1, min(max(round(n ** (1 / 3)), math.ceil(window / max(stride, 1.0))), max(1, n // 2))))


def bootstrap_weights(n: int, block: int, resamples: int, seed: int = 0) -> np.ndarray:
    """(resamples, n) counts of each window in circular block-bootstrap resamples of n windows."""
    rng = np.random.default_rng(seed)
    n_blocks = -(-n // block)
    starts = rng.integers(0, n, size=(resamples, n_blocks))
    idx = ((starts[:, :, None] + np.arange(block)) % n).reshape(resamples, -1)[:, :n]
    w = np.zeros((resamples, n), dtype=np.float64)
    np.add.at(w, (np.arange(resamples)[:, None], idx), 1.0)
    return w


def window_scores(logits: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Per window: nll, correct, predicted class, Brier term and confidence from logits (n, A), labels (n,)."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    p = np.exp(logp)
    pred = p.argmax(axis=1)
    onehot = np.eye(logits.shape[1])[labels]
    return {
        "nll": -logp[np.arange(len(labels)), labels],
        "correct": (pred == labels).astype(np.float64),
        "pred": pred,
        "brier": ((p - onehot) ** 2).sum(axis=1),
        "confidence": p.max(axis=1),
    }


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """sum over equal-width confidence bins of (share of windows) * |accuracy - mean confidence|."""
    b = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    n = np.bincount(b, minlength=bins)
    gap = np.abs(np.bincount(b, correct, bins) - np.bincount(b, confidence, bins))
    return float(gap.sum() / max(n.sum(), 1))


def _summaries(
    logits: Mapping[Hypothesis, np.ndarray],
    labels: np.ndarray,
    weights: np.ndarray,
    level: float,
    names: tuple[str, ...],
) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Point scores and bootstrap intervals per hypothesis; also the (resamples, entries) mean NLLs."""
    k, n = len(names), len(labels)
    lo_q, hi_q = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    rows, means = [], []
    for h, lg in logits.items():
        s = window_scores(lg, labels)
        metrics = evaluate_arrays(labels, s["pred"], names)
        conf = weights @ np.eye(k * k)[labels * k + s["pred"]]  # (resamples, k*k) resampled confusion counts
        boot_nll = weights @ s["nll"] / n
        boot_acc = weights @ s["correct"] / n
        boot_f1 = f1_macro(conf.reshape(-1, k, k))
        means.append(boot_nll)
        rows.append(
            {
                "num_heads": h.num_heads,
                "causal": h.causal,
                "norm_first": h.norm_first,
                "lora_scale": h.lora_scale,
                "window": h.window,
                "nll": float(s["nll"].mean()),
                "nll_low": float(np.percentile(boot_nll, lo_q)),
                "nll_high": float(np.percentile(boot_nll, hi_q)),
                "accuracy": metrics.accuracy if metrics else float("nan"),
                "accuracy_low": float(np.percentile(boot_acc, lo_q)),
                "accuracy_high": float(np.percentile(boot_acc, hi_q)),
                "f1": metrics.f1_macro if metrics else float("nan"),
                "f1_low": float(np.percentile(boot_f1, lo_q)),
                "f1_high": float(np.percentile(boot_f1, hi_q)),
                "brier": float(s["brier"].mean()),
                "ece": expected_calibration_error(s["confidence"], s["correct"]),
                "windows": n,
                "scale_source": h.scale_source,
                "label": h.label(),
            }
        )
    return rows, np.stack(means, axis=1)


def rank_scores(
    final: Mapping[Hypothesis, np.ndarray],
    data: LabelledData,
    screened: Mapping[Hypothesis, np.ndarray] | None = None,
    screen_index: np.ndarray | None = None,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = 0.95,
    seed: int = 0,
    precision: str = "exact",
) -> Ranking:
    """Rank hypotheses by mean NLL over all windows of `data` (`final`: logits (n, A) each). Entries dropped by
    screening (`screened`, logits on windows `screen_index` only) follow, marked, with their screening scores."""
    names = action_names(next(iter(final.values())).shape[1])
    n = len(data)
    longest = max(h.window for h in final)
    block = block_length(n, longest, data.ends)
    rows, boot = _summaries(final, data.labels, bootstrap_weights(n, block, resamples, seed), level, names)
    best = np.bincount(boot.argmin(axis=1), minlength=boot.shape[1]) / resamples
    for r, share in zip(rows, best):
        r["share_best"], r["stage"] = float(share), "final"
    table = pd.DataFrame(rows).sort_values("nll", kind="stable")
    if screened:
        if screen_index is None:
            raise ValueError("screened scores need screen_index, the windows they were computed on")
        m = len(screen_index)
        srows, _ = _summaries(
            screened,
            data.labels[screen_index],
            bootstrap_weights(m, block_length(m, longest, data.ends[screen_index]), resamples, seed),
            level,
            names,
        )
        for r in srows:
            r["share_best"], r["stage"] = 0.0, "screened out"
        table = pd.concat([table, pd.DataFrame(srows).sort_values("nll", kind="stable")], ignore_index=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    cols = [
        "rank",
        "num_heads",
        "causal",
        "norm_first",
        "lora_scale",
        "window",
        "nll",
        "nll_low",
        "nll_high",
        "accuracy",
        "accuracy_low",
        "accuracy_high",
        "f1",
        "f1_low",
        "f1_high",
        "brier",
        "ece",
        "share_best",
        "windows",
        "stage",
        "scale_source",
        "label",
    ]
    return Ranking(
        table[cols].reset_index(drop=True),
        n,
        resamples,
        block,
        level,
        precision,
        data.rule,
        data.normalisation,
        warnings=data.warnings,
    )


# Cost and the whole run


@dataclass(frozen=True)
class CostEstimate:
    """What a ranking will cost before it runs."""

    hypotheses: int
    windows: int
    window_passes: int  # forward passes of one window under one hypothesis, both stages
    merges: int  # LoRA merges (one per scale and stage)
    gflop: float
    seconds: float | None  # from a timed probe on this machine; None without a probe

    def text(self) -> str:
        t = f", about {self.seconds:,.0f} s here" if self.seconds is not None else ""
        return (
            f"{self.hypotheses} combinations × {self.windows:,} windows: {self.window_passes:,} window passes, "
            f"{self.gflop:,.0f} GFLOP{t}"
        )


AUTO_SCREEN_GFLOP = 1500.0  # above this (minutes on a laptop CPU) "auto" screens first
AUTO_SCREEN_WINDOWS = 64


def auto_screen(cfg: ModelConfig, space: SearchSpace, n_windows: int) -> int:
    """Windows of the screening stage "auto" chooses: none when scoring everything everywhere stays under
    AUTO_SCREEN_GFLOP, else AUTO_SCREEN_WINDOWS (a rule on the work, not on this machine's speed, so the
    same command ranks the same way everywhere)."""
    per = sum(forward_flops(cfg, w, last_only=True) for w in space.windows) / len(space.windows)
    exhaustive = len(space) * n_windows * per / 1e9
    return AUTO_SCREEN_WINDOWS if exhaustive > AUTO_SCREEN_GFLOP and n_windows > AUTO_SCREEN_WINDOWS else 0


def plan_stages(n_hyps: int, n_windows: int, screen: int, keep: int) -> tuple[int, int]:
    """(windows in the screening stage, combinations kept); (0, n_hyps) when screening would not save work."""
    if screen <= 0 or screen >= n_windows or keep >= n_hyps:
        return 0, n_hyps
    return screen, max(1, keep)


def estimate_cost(
    state_dict: Mapping[str, torch.Tensor],
    cfg: ModelConfig,
    space: SearchSpace,
    n_windows: int,
    screen: int = 0,
    keep: int = 8,
    probe: bool = True,
) -> CostEstimate:
    """Passes, merges and GFLOP of a ranking (decision position only in the last block, as the engine runs),
    and seconds extrapolated from a timed probe of a few random windows through one merged engine."""
    hyps = space.hypotheses()
    m, kept = plan_stages(len(hyps), n_windows, screen, keep)
    flops = {w: forward_flops(cfg, w, last_only=True) for w in space.windows}
    per_hyp = sum(flops.values()) / len(flops)
    passes = len(hyps) * (m or n_windows) + (kept * (n_windows - m) if m else 0)
    gflop = passes * per_hyp / 1e9
    merges = len(space.scales) * (2 if m else 1)
    seconds = None
    if probe:
        engine = merged_engine(state_dict, cfg, space.scales[0][0], "exact")
        w = max(space.windows)
        # A real-sized batch (per-call overhead dominates small models), capped at about 2 GFLOP of work.
        k = int(max(1, min(engine.batch_size(w), n_windows, 2e9 // flops[w])))
        x = torch.randn(k, w, cfg.state_dim, generator=torch.Generator().manual_seed(0))
        times = []
        for _ in range(3):  # the first call warms up; the fastest of the rest is the machine's pace
            t0 = time.perf_counter()
            engine(x)
            times.append(time.perf_counter() - t0)
        seconds = passes * min(times[1:]) / k
    return CostEstimate(len(hyps), n_windows, passes, merges, gflop, seconds)


def rank_hypotheses(
    state_dict: Mapping[str, torch.Tensor],
    cfg: ModelConfig,
    data: LabelledData,
    space: SearchSpace,
    *,
    screen: int = 0,
    keep: int = 8,
    screen_precision: str = "fast",
    resamples: int = DEFAULT_RESAMPLES,
    level: float = 0.95,
    seed: int = 0,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
    device: str | None = None,
    batch_size: int | None = None,
    scorer: Scorer | None = None,
) -> Ranking:
    """Score every hypothesis of `space` on `data` and rank them (see the module docstring).

    screen > 0: first score all combinations on `screen` evenly spread windows (in `screen_precision`), keep the
    `keep` best, and score only those on every window in float32; the rest are listed after them as screened
    out. screen = 0 scores everything on every window. `scorer(hypotheses, index, precision)` scores elsewhere
    (e.g. `flag_model.distributed.hypotheses_scorer`; it reports its own progress); by default
    `score_hypotheses` here, in batches of `batch_size` windows (default: the engine's choice)."""
    t0 = time.perf_counter()
    hyps = space.hypotheses()
    n = len(data)
    m, kept_n = plan_stages(len(hyps), n, screen, keep)
    total = len(hyps) * (m or n) + (kept_n * n if m else 0)
    if scorer is None:
        passes = 0

        def scorer(hs: Sequence[Hypothesis], index: np.ndarray, precision: str) -> dict[Hypothesis, np.ndarray]:
            nonlocal passes
            out = score_hypotheses(
                state_dict, cfg, hs, data, index, precision, progress, cancel, passes, total, device, batch_size
            )
            passes += len(hs) * len(index)
            return out

    if not m:
        final = scorer(hyps, np.arange(n), "exact")
        ranking = rank_scores(final, data, resamples=resamples, level=level, seed=seed)
    else:
        sidx = evenly_spaced(n, m)
        first = scorer(hyps, sidx, screen_precision)
        order = sorted(hyps, key=lambda h: float(window_scores(first[h], data.labels[sidx])["nll"].mean()))
        kept = order[:kept_n]
        final = scorer(kept, np.arange(n), "exact")
        ranking = rank_scores(final, data, {h: first[h] for h in order[kept_n:]}, sidx, resamples, level, seed)
    return replace(
        ranking,
        seconds=time.perf_counter() - t0,
        precision="float32" + (f" (screening: {screen_precision})" if m else ""),
    )


def assumptions_of(ranking_row: Mapping[str, Any]) -> dict[str, Any]:
    """The sidebar assumptions of one ranking row: num_heads, lora_scale, norm_first, causal."""
    return {
        "num_heads": int(ranking_row["num_heads"]),
        "lora_scale": float(ranking_row["lora_scale"]),
        "norm_first": bool(ranking_row["norm_first"]),
        "causal": bool(ranking_row["causal"]),
    }


CLEAR_SHARE = 0.95


def verdict(ranking: Ranking) -> tuple[bool, str]:
    """(clear, sentence): clear when the best entry wins at least 95 % of the resamples; otherwise names the
    entries whose NLL interval reaches the best one's mean, which the data cannot tell apart."""
    t = ranking.table
    best = t.iloc[0]
    if best["share_best"] >= CLEAR_SHARE:
        return True, (
            f"Clear: {best['label']} has the lowest NLL in {best['share_best']:.0%} of {ranking.resamples} resamples."
        )
    close = t[(t["stage"] == "final") & (t["nll_low"] <= best["nll"])]
    return False, (
        f"Not decisive: the best entry wins only {best['share_best']:.0%} of the resamples, and "
        f"{len(close) - 1} other entr{'y' if len(close) == 2 else 'ies'} reach its NLL within their "
        "intervals. More windows, or data the checkpoint was trained on, narrow the intervals."
    )


def mark_in_use(table: pd.DataFrame, cfg: ModelConfig) -> pd.DataFrame:
    """The ranking table with a first column "in use": True on the entry equal to `cfg`'s assumptions."""
    same = (
        (table["num_heads"] == cfg.num_heads)
        & (table["causal"] == cfg.causal)
        & (table["norm_first"] == cfg.norm_first)
        & np.isclose(table["lora_scale"], cfg.lora_scale)
    )
    return table.assign(**{"in use": same.to_numpy()})[["in use", *table.columns]]
