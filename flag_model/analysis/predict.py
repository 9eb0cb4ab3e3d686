"""SELL/HOLD/BUY predictions over market data: windows through the inference engine, labels, metrics,
class shares, a simple equity sanity check, download frames, and chunked streaming for large files.

Modes: "rolling" -- stride-1 windows, each decides at its last position (what a live trader gets);
"blocks" -- non-overlapping windows, every position scored (how the 61 % evaluation was done). The newest
rows that do not fill a block are scored too, by one more window made of the last `window` rows: it ends on
the newest bar, and only its rows not scored before count (at positions window-r..window-1). A live trader
acts only at a window's last position (`decision_rows`). The one-shot path and the streaming path share one
`WindowRunner`, which runs whole engine batches only, so both give bit-identical logits.

Rows: `Predictions.row` is internal (0 = first feature row); bars are identified by their time everywhere
the user sees them, and row numbers in validation messages count the file's data lines from 1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from ..data import (
    MODES,
    WARMUP,
    ColumnMapping,
    DataError,
    FeatureMatrix,
    check_window,
    checkpoint_features,
    detect_columns,
    horizon_text,
    prepare_ohlcv,
    rolling_windows,
    too_few_rows,
)
from ..engine import InferenceEngine, Progress
from ..features import LabelRule, action_names, compute_labels, too_few_bars
from .bootstrap import Intervals, score_intervals

NO_LABEL = -1
NO_DECISION = -1  # the action of a row whose logits are not finite: never turned into SELL/HOLD/BUY
COLLAPSE_SHARE = 0.9
_POSITIONS = {"SELL": -1.0, "HOLD": 0.0, "BUY": 1.0}


@dataclass(frozen=True)
class Predictions:
    """One row per scored bar. `row` is the feature-row index (0 = first bar with features)."""

    times: pd.DatetimeIndex
    close: np.ndarray  # (n,) float64; NaN where the data has no prices
    logits: np.ndarray  # (n, n_actions) float32
    row: np.ndarray  # (n,) int64
    position: np.ndarray  # (n,) int64 position inside the window that decided
    labels: np.ndarray | None  # (n,) int64 action index by the label rule, NO_LABEL where unknown
    window: int
    mode: str
    actions: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.row)


class WindowRunner:
    """Consecutive feature rows in, predictions out. Carries the rows the next windows need (window-1 in
    rolling mode, the incomplete block in blocks mode) and the windows that do not fill an engine batch,
    so any chunking gives the same batches and therefore the same logits as one pass."""

    def __init__(self, engine: InferenceEngine, window: int, mode: str, first_row: int = 0) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.engine, self.window, self.mode = engine, window, mode
        self.batch = engine.batch_size(window)
        self.actions = action_names(engine.config.n_actions)
        self.start = first_row  # feature-row index of the buffer's first row, always the start of the next window
        self._buf: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None] | None = None
        self._context = np.zeros((0, engine.config.state_dim), dtype=np.float32)  # rows before the buffer

    def feed(
        self,
        values: np.ndarray,
        times: np.ndarray,
        close: np.ndarray,
        labels: np.ndarray | None,
        final: bool = False,
        progress: Progress | None = None,
    ) -> Predictions | None:
        """Add rows (values (m, state_dim) float32, times, close, labels or None); returns what could be
        scored, or None. `final` scores everything left."""
        new = (values, np.asarray(times, dtype="datetime64[ns]"), close, labels)
        if self._buf is not None:
            old = self._buf
            new = (
                np.concatenate([old[0], values]),
                np.concatenate([old[1], new[1]]),
                np.concatenate([old[2], close]),
                None if labels is None or old[3] is None else np.concatenate([old[3], labels]),
            )
        vals, tms, cls, lbl = new
        w, m = self.window, len(vals)
        stride = 1 if self.mode == "rolling" else w
        available = max(0, (m - w) // stride + 1) if m >= w else 0
        take = available if final else (available // self.batch) * self.batch
        cut = take * stride
        self._buf = None if final else (vals[cut:], tms[cut:], cls[cut:], None if lbl is None else lbl[cut:])
        partial = self._partial_block(vals, take, final)
        self._context = np.concatenate([self._context, vals[: take * stride][-w:]])[-w:]
        if take == 0:
            return None if partial is None else self._finish(*partial, tms, cls, lbl, self.start)
        windows = rolling_windows(vals[: (take - 1) * stride + w], w, stride)  # a view, no copy
        if self.mode == "rolling":
            logits = self.engine.run(windows, last_only=True, progress=progress)
            local = np.arange(take) + w - 1
            position = np.full(take, w - 1, dtype=np.int64)
        else:
            logits = self.engine.run(windows, last_only=False, progress=progress).reshape(take * w, -1)
            local = np.arange(take * w)
            position = np.tile(np.arange(w, dtype=np.int64), take)
        if partial is not None:
            logits = np.concatenate([logits, partial[0]])
            local, position = np.concatenate([local, partial[1]]), np.concatenate([position, partial[2]])
        first, self.start = self.start, self.start + take * stride
        return self._finish(logits, local, position, tms, cls, lbl, first)

    def _partial_block(
        self, vals: np.ndarray, take: int, final: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Blocks mode, last feed: the r < window rows after the full blocks, scored by the window of the
        last `window` rows (earlier rows from this feed or the context). -> (logits (r, A), local rows,
        positions) or None."""
        w = self.window
        r = len(vals) - take * w
        if self.mode != "blocks" or not final or r <= 0:
            return None
        history = np.concatenate([self._context, vals[: take * w]])[-(w - r) :] if w > r else vals[:0]
        if len(history) < w - r:  # fewer than `window` rows in the whole input
            return None
        window = np.concatenate([history, vals[take * w :]])
        logits = self.engine.run(window[None], last_only=False)[0, w - r :]
        return logits, np.arange(take * w, len(vals)), np.arange(w - r, w, dtype=np.int64)

    def _finish(
        self,
        logits: np.ndarray,
        local: np.ndarray,
        position: np.ndarray,
        tms: np.ndarray,
        cls: np.ndarray,
        lbl: np.ndarray | None,
        first: int,
    ) -> Predictions:
        """Predictions of buffer rows `local`; `first` is the feature-row index of buffer row 0."""
        return Predictions(
            times=pd.DatetimeIndex(tms[local]),
            close=cls[local],
            logits=logits,
            row=local + first,
            position=position,
            labels=None if lbl is None else lbl[local],
            window=self.window,
            mode=self.mode,
            actions=self.actions,
        )


def scorable_rows(n_rows: int, window: int, mode: str) -> int:
    """How many rows get a decision: rolling scores every row from the window's last one on, blocks every row."""
    return n_rows - (window - 1 if mode == "rolling" else 0)


def predict_features(
    fm: FeatureMatrix,
    engine: InferenceEngine,
    window: int,
    mode: str = "rolling",
    progress: Progress | None = None,
    last: int | None = None,
) -> Predictions:
    """The windows of a feature matrix in one pass (the page). `last`: score only about the most recent
    `last` rows (rolling: exactly; blocks: from the first block boundary inside them, through the newest
    row); rows keep their index in the whole matrix. Raises DataError when there are too few rows."""
    n = len(fm.values)
    issue = check_window(n, window, engine.config.max_length)
    if issue is not None:
        raise DataError(issue.message)
    start = 0
    if last is not None and last < n:
        if mode == "rolling":
            start = max(0, n - last - (window - 1))
        else:
            start = min(-(-(n - last) // window) * window, (n // window - 1) * window)
    runner = WindowRunner(engine, window, mode, first_row=start)
    out = runner.feed(fm.values[start:], fm.times.to_numpy()[start:], fm.close[start:], None, True, progress)
    assert out is not None  # check_window guarantees at least one window
    return out


def row_labels(close: np.ndarray, rule: LabelRule) -> np.ndarray:
    """Label of every row from the closes `horizon` rows ahead; NO_LABEL where there is no future or a
    price is missing."""
    labels = compute_labels(close, rule)
    known = np.zeros(len(close), dtype=bool)
    h = rule.horizon
    if len(close) > h:
        known[:-h] = np.isfinite(close[:-h]) & np.isfinite(close[h:])
    return np.where(known, labels, NO_LABEL)


def label_text(rule: LabelRule, bar: pd.Timedelta | None = None) -> str:
    """The rule in words, as scored here (bars without `horizon` future bars carry no label); with the
    data's bar interval `bar` the horizon is also given in time."""
    pct = 100 * rule.threshold
    return (
        f"Label = return over the next {horizon_text(rule.horizon, bar)}: BUY above +{pct:g} %, SELL below "
        f"-{pct:g} %, else HOLD; the last {rule.horizon} bars have no future: unknown here and not scored "
        "(training counted them as HOLD)"
    )


def attach_labels(pred: Predictions, close: np.ndarray, rule: LabelRule) -> Predictions:
    """Labels for the scored rows from the closes of all feature rows (`FeatureMatrix.close`)."""
    return replace(pred, labels=row_labels(close, rule)[pred.row])


def decision_rows(pred: Predictions) -> np.ndarray:
    """Indices of the rows a live trader acts on: every row in rolling mode; in blocks mode only each window's
    last position (earlier positions of a block see later bars without a causal mask: look-ahead)."""
    if pred.mode == "blocks":
        return np.flatnonzero(pred.position == pred.window - 1)
    return np.arange(len(pred))


def decide(logits: np.ndarray, offsets: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities (n, A) float64 and argmax actions (n,) after adding per-class logit offsets.

    A row with a NaN or infinite logit has no decision: action NO_DECISION and NaN probabilities (argmax would
    silently call it SELL, the first class)."""
    z = logits.astype(np.float64)
    if offsets is not None:
        z = z + np.asarray(offsets, dtype=np.float64)
    ok = np.asarray(np.isfinite(z).all(axis=1))  # (n,) bool
    z = np.where(ok[:, None], z, 0.0)
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    p[~ok] = np.nan
    return p, np.where(ok, z.argmax(axis=1), NO_DECISION)


def undecided_note(actions: np.ndarray) -> str | None:
    """A message when some rows have no decision because the model's logits were NaN or infinite."""
    n = int((actions == NO_DECISION).sum())
    if not n:
        return None
    return (
        f"{n:,} of {len(actions):,} bars have no decision: the model's logits there are NaN or infinite (damaged "
        "weights, or inputs far outside the training range). They are left out of the shares, scores and the "
        "equity curve (flat), and marked 'no decision' in the download."
    )


def class_shares(actions: np.ndarray, names: tuple[str, ...]) -> pd.DataFrame:
    """Count and share of each predicted action (rows without a decision are not counted)."""
    counts = np.bincount(actions[actions != NO_DECISION], minlength=len(names))[: len(names)]
    return pd.DataFrame({"action": list(names), "count": counts, "share": counts / max(counts.sum(), 1)})


def collapse_alarm(shares: pd.DataFrame, threshold: float = COLLAPSE_SHARE) -> str | None:
    """A message when one action takes more than `threshold` of all predictions (a collapsed model)."""
    top = shares.loc[shares["share"].idxmax()]
    if top["share"] > threshold:
        return (
            f"Collapse alarm: {top['share']:.1%} of predictions are {top['action']}. A model this one-sided "
            "usually sees inputs unlike its training data (features, scaling, window length) — check the "
            "drift table and the settings."
        )
    return None


@dataclass(frozen=True)
class Metrics:
    """Scores of predictions against labels (rows with a label only)."""

    n: int
    accuracy: float
    f1_macro: float
    per_class: pd.DataFrame  # index actions: precision, recall, f1, support, predicted
    confusion: pd.DataFrame  # rows true action, columns predicted action, counts
    majority_class: str
    majority_accuracy: float  # always predicting the most frequent label
    by_position: pd.DataFrame | None  # position, n, accuracy[, lo, hi] (blocks mode; None in rolling mode)
    intervals: Intervals | None = None  # block-bootstrap intervals (None when not asked for)


def evaluate(
    pred: Predictions, actions: np.ndarray, n_boot: int = 0, block: int | None = None, seed: int = 0
) -> Metrics | None:
    """Scores of `actions` (n,) against pred.labels; None without labels. See `evaluate_arrays`.

    n_boot > 0 adds block-bootstrap intervals: blocks mode resamples whole windows; rolling mode moving
    blocks of `block` bars (default: the window length — overlapping windows share their inputs)."""
    if pred.labels is None:
        return None
    blocks = pred.mode == "blocks"
    metrics = evaluate_arrays(pred.labels, actions, pred.actions, pred.position if blocks else None, pred.window)
    if metrics is None or n_boot <= 0:
        return metrics
    known = (pred.labels != NO_LABEL) & (actions != NO_DECISION)  # the rows evaluate_arrays scores
    ci = score_intervals(
        pred.labels[known],
        actions[known],
        len(pred.actions),
        block or pred.window,
        groups=pred.row[known] // pred.window if blocks else None,
        position=pred.position[known] if blocks else None,
        window=pred.window,
        n_boot=n_boot,
        seed=seed,
    )
    by_position = metrics.by_position
    if by_position is not None and ci.by_position is not None:
        by_position = by_position.merge(ci.by_position, on="position", how="left")
    return replace(metrics, by_position=by_position, intervals=ci)


def evaluate_arrays(
    labels: np.ndarray, actions: np.ndarray, names: tuple[str, ...], position: np.ndarray | None = None, window: int = 0
) -> Metrics | None:
    """Accuracy, F1-macro (over classes present in labels or predictions, like scikit-learn), per-class
    precision/recall, confusion matrix, majority baseline and (given positions) accuracy by position in the
    window. Rows labelled NO_LABEL or without a decision are left out; None when no row is left."""
    known = (labels != NO_LABEL) & (actions != NO_DECISION)
    if not known.any():
        return None
    y, p, k = labels[known], actions[known], len(names)
    cm = np.bincount(y * k + p, minlength=k * k).reshape(k, k)
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    present = (support > 0) | (predicted > 0)
    per_class = pd.DataFrame(
        {"precision": precision, "recall": recall, "f1": f1, "support": support, "predicted": predicted},
        index=pd.Index(list(names), name="action"),
    )
    majority = int(np.argmax(support))
    by_position = None
    if position is not None:
        pos = position[known]
        n_pos = np.bincount(pos, minlength=window)
        hits = np.bincount(pos, weights=(y == p).astype(np.float64), minlength=window)
        with np.errstate(invalid="ignore", divide="ignore"):
            by_position = pd.DataFrame({"position": np.arange(len(n_pos)), "n": n_pos, "accuracy": hits / n_pos})
    return Metrics(
        n=int(known.sum()),
        accuracy=float(tp.sum() / cm.sum()),
        f1_macro=float(f1[present].mean()),
        per_class=per_class,
        confusion=pd.DataFrame(
            cm, index=pd.Index(list(names), name="true"), columns=pd.Index(list(names), name="predicted")
        ),
        majority_class=names[majority],
        majority_accuracy=float(support[majority] / cm.sum()),
        by_position=by_position,
    )


@dataclass(frozen=True)
class Equity:
    """A sanity check, not a backtest: long on BUY, flat on HOLD, short on SELL, from one bar's close to
    the next, minus `fee` per unit of position change; against buy-and-hold."""

    frame: pd.DataFrame  # datetime, strategy, buy_and_hold (growth of 1)
    fee: float
    trades: int
    stats: pd.DataFrame  # index strategy / buy_and_hold: total return, Sharpe (annualised), max drawdown


def _stats(returns: np.ndarray, periods_per_year: float) -> dict[str, float]:
    curve = np.cumprod(1.0 + returns)
    std = returns.std()
    return {
        "total return": float(curve[-1] - 1.0),
        "Sharpe (annualised)": float(returns.mean() / std * np.sqrt(periods_per_year)) if std > 0 else 0.0,
        "max drawdown": float((curve / np.maximum.accumulate(curve) - 1.0).min()),
    }


def equity_curve(
    times: pd.DatetimeIndex, close: np.ndarray, actions: np.ndarray, names: tuple[str, ...], fee: float = 0.0005
) -> Equity | None:
    """The signal's equity curve on consecutive bars; None without prices, or for actions that are not
    SELL/HOLD/BUY."""
    if len(close) < 3 or not np.isfinite(close).all() or set(names) != set(_POSITIONS):
        return None
    position = np.array([*(_POSITIONS[n] for n in names), 0.0])[actions]  # held t to t+1; flat without a decision
    ret = close[1:] / close[:-1] - 1.0
    change = np.abs(np.diff(np.r_[0.0, position[:-1]]))
    strategy = position[:-1] * ret - fee * change
    step = np.median(np.diff(times.asi8)) if len(times) > 1 else 0
    per_year = 365.25 * 86400e9 / step if step > 0 else 252.0
    frame = pd.DataFrame(
        {"datetime": times[1:], "strategy": np.cumprod(1.0 + strategy), "buy_and_hold": np.cumprod(1.0 + ret)}
    )
    stats = pd.DataFrame({"strategy": _stats(strategy, per_year), "buy_and_hold": _stats(ret, per_year)}).T
    return Equity(frame=frame, fee=fee, trades=int((change > 0).sum()), stats=stats)


def predictions_frame(pred: Predictions, offsets: np.ndarray | None = None) -> pd.DataFrame:
    """The download: datetime, timestamp (ms), position in the window, close, raw logits, probabilities and action
    (after offsets, if any), and the label where known."""
    probs, act = decide(pred.logits, offsets)
    names = pred.actions
    out = pd.DataFrame(
        {
            "datetime": pred.times,
            "timestamp": pred.times.as_unit("ms").asi8,
            "position": pred.position,
            "close": pred.close,
        }
    )
    for i, n in enumerate(names):
        out[f"logit_{n}"] = pred.logits[:, i]
    for i, n in enumerate(names):
        out[f"prob_{n}"] = probs[:, i]
    out["action"] = np.asarray([*names, "no decision"], dtype=object)[act]  # NO_DECISION picks the last
    if pred.labels is not None:
        lab = np.asarray([*names, ""], dtype=object)[np.where(pred.labels == NO_LABEL, len(names), pred.labels)]
        out["label"] = lab
    return out


def feature_stream(
    chunks: Iterable[pd.DataFrame],
    meta: Mapping[str, Any],
    state_dim: int,
    normalisation: str = "checkpoint",
    stats: tuple[np.ndarray, np.ndarray] | None = None,
    mapping: ColumnMapping | None = None,
    warn: Callable[[str], None] | None = None,
) -> Iterator[FeatureMatrix]:
    """Feature rows of raw OHLCV chunks of one file, in order: each chunk is validated (row numbers count
    from the file's start), the last 50 bars are carried for the warm-up, and "years" counts from the
    file's first bar, so the rows equal `checkpoint_features` of the whole file."""
    carry: pd.DataFrame | None = None
    origin: pd.Timestamp | None = None
    offset, produced, seen = 0, False, set()

    def say(message: str) -> None:
        if warn is not None and message not in seen:
            seen.add(message)
            warn(message)

    for chunk in chunks:
        mapping = mapping or detect_columns(chunk.columns)
        prep = prepare_ohlcv(chunk, mapping, row_offset=offset)
        offset += len(chunk)
        bars = prep.valid_frame()  # DataError naming every error
        for issue in prep.warnings:
            say(issue.message)
        if carry is not None and len(bars) and bars["datetime"].iloc[0] <= carry["datetime"].iloc[-1]:
            raise DataError(
                f"row {offset - len(chunk) + 1} ({bars['datetime'].iloc[0]}) is not later than the row "
                f"before it ({carry['datetime'].iloc[-1]}); sort the file by time and remove duplicates."
            )
        frame = bars if carry is None else pd.concat([carry, bars], ignore_index=True)
        origin = frame["datetime"].iloc[0] if origin is None else origin
        if len(frame) <= WARMUP:
            carry = frame
            continue
        fm = checkpoint_features(frame, meta, state_dim, normalisation, origin=origin, stats=stats)
        for message in fm.warnings:
            say(message)
        carry = frame.iloc[-WARMUP:].reset_index(drop=True)
        produced = True
        yield fm
    if not produced:
        raise DataError(too_few_bars())


def stream_predictions(
    chunks: Iterable[pd.DataFrame],
    meta: Mapping[str, Any],
    engine: InferenceEngine,
    window: int,
    mode: str = "rolling",
    normalisation: str = "checkpoint",
    rule: LabelRule = LabelRule(),
    stats: tuple[np.ndarray, np.ndarray] | None = None,
    mapping: ColumnMapping | None = None,
    warn: Callable[[str], None] | None = None,
) -> Iterator[Predictions]:
    """Predictions for raw OHLCV chunks of one file, in order, with bounded memory.

    Carries the feature warm-up and the rows the next windows need across chunks, and holds back the last
    `rule.horizon` rows until their labels are known; the result equals one pass over the whole file
    (`predict_features` + `attach_labels`). "data" normalisation needs `stats` (mean, std) of the raw
    features from a first pass (see `RunningMoments`)."""
    if normalisation == "data" and stats is None:
        raise ValueError("streaming with 'data' normalisation needs the statistics of a first pass (stats=).")
    h = rule.horizon
    runner = WindowRunner(engine, window, mode)
    pending: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    for fm in feature_stream(chunks, meta, engine.config.state_dim, normalisation, stats, mapping, warn):
        vals, tms, cls = fm.values, fm.times.to_numpy(), fm.close
        if pending is not None:
            vals, tms, cls = (np.concatenate([a, b]) for a, b in zip(pending, (vals, tms, cls)))
        ready = max(0, len(vals) - h)
        pending = (vals[ready:], tms[ready:], cls[ready:])
        if ready:
            out = runner.feed(vals[:ready], tms[:ready], cls[:ready], row_labels(cls, rule)[:ready])
            if out is not None:
                yield out
    assert pending is not None  # feature_stream raises when there is no feature row
    vals, tms, cls = pending
    out = runner.feed(vals, tms, cls, np.full(len(vals), NO_LABEL, dtype=np.int64), final=True)
    if out is not None:
        yield out
    elif runner.start == 0:
        raise DataError(too_few_rows(window, None, WARMUP))
