"""Feature sets computed from OHLCV bars, and the label rule.

"simple-60" is the feature set the 61 %-accuracy FLAG-TRADER model was trained on (DESIGN §2). For
each bar t >= WARMUP (50) every feature is computed over the window of the last 51 bars t-50..t
(inclusive); rows t < 50 get no features. Conventions, applied to every feature alike:

- std is the population std (ddof=0), everywhere.
- "k-bar return" is c_t / c_{t-k} - 1; "pct" is the one-bar return c_i / c_{i-1} - 1. The window
  holds 50 of them (i = t-49..t); "last k pct" are the k ending at t.
- "SMA k", "std k", "mean volume k", "max/min over k" use the last k bars ending at t.
- A bare "mean/std/max/min" without k is over the whole 51-bar window; o0 is the window's first open.
- Conditions are 1.0 when true, else 0.0 (a NaN comparison is false).
- MACD uses pandas ``ewm(span, adjust=False)`` seeded at the window's first close, so the value
  depends only on the window; the signal is EMA9 of that in-window MACD series, seeded likewise.
- Calendar features come from the bar's timestamp as given (no time-zone conversion); "years" is
  measured from the first row of the input, so it depends on where the input starts.
- NaN and +-inf (zero std, zero volume, ...) become 0. No scaling. Output is float32.

``SIMPLE60_NAMES`` / ``SIMPLE60_DESCRIPTIONS`` are index-aligned with DESIGN §2's numbering.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from numpy.lib.stride_tricks import sliding_window_view

ACTIONS: tuple[str, ...] = ("SELL", "HOLD", "BUY")
WARMUP = 50
OHLCV_COLUMNS: tuple[str, ...] = ("open", "high", "low", "close", "volume")
DATETIME_COLUMN = "datetime"

_SIMPLE60: tuple[tuple[str, str], ...] = (
    ("ret_50", "50-bar return c_t/c_{t-50}-1"),
    ("range_hl", "max(h)/min(l)-1 over the window"),
    ("ret_open", "(c-o0)/o0, o0 = open of the window's first bar"),
    ("ret_5", "5-bar return"),
    ("ret_10", "10-bar return"),
    ("ret_20", "20-bar return"),
    ("cv_close", "std(c)/mean(c) over the window"),
    ("range_rel", "mean(h-l)/mean(c) over the window"),
    ("vol_rel", "v/mean(v) over the window"),
    ("zscore_close", "(c-mean(c))/std(c) over the window"),
    ("rsi_14", "RSI(14), simple averages of the last 14 close changes; 100 if no losses"),
    ("macd", "EMA12-EMA26 of close, seeded at the window start"),
    ("macd_signal", "EMA9 of the in-window MACD series"),
    ("macd_hist", "MACD - signal"),
    ("sma_5", "SMA 5 of close"),
    ("sma_10", "SMA 10 of close"),
    ("sma_20", "SMA 20 of close"),
    ("dev_sma20", "(c-SMA20)/std(c), std over the window"),
    ("ret_mean", "mean of the window's 50 pct changes"),
    ("ret_std", "std of the window's 50 pct changes"),
    ("retstd_5", "std(last 5 pct)*sqrt(5)"),
    ("retstd_10", "std(last 10 pct)*sqrt(10)"),
    ("retstd_20", "std(last 20 pct)*sqrt(20)"),
    ("hl_mean", "mean(h-l) over the window"),
    ("hl_std", "std(h-l) over the window"),
    ("close_std_5", "std of the last 5 closes"),
    ("close_std_10", "std of the last 10 closes"),
    ("close_std_20", "std of the last 20 closes"),
    ("hl_span", "max(h)-min(l) over the window"),
    ("bb_z20", "(c-SMA20)/(2*std20)"),
    ("vma_5", "mean volume of the last 5 bars"),
    ("vma_10", "mean volume of the last 10 bars"),
    ("vma_20", "mean volume of the last 20 bars"),
    ("vol_cv", "std(v)/mean(v) over the window"),
    ("vol_rel20", "v/SMA20(v)"),
    ("retvol_5", "mean of pct*v over the last 5 bars"),
    ("retvol_10", "mean of pct*v over the last 10 bars"),
    ("retvol_20", "mean of pct*v over the last 20 bars"),
    ("vol_maxmin", "max(v)/min(v) over the window"),
    ("vol_dev", "v-mean(v) over the window"),
    ("above_sma5", "c > SMA5"),
    ("above_sma10", "c > SMA10"),
    ("above_sma20", "c > SMA20"),
    ("sma10_gt_sma20", "SMA10 > SMA20"),
    ("near_high_10", "c > 0.99*max(h) over the last 10 bars"),
    ("near_high_20", "c > 0.99*max(h) over the last 20 bars"),
    ("near_low_10", "c < 1.01*min(l) over the last 10 bars"),
    ("near_low_20", "c < 1.01*min(l) over the last 20 bars"),
    ("bb_pctb", "Bollinger %B(20) = (c-(SMA20-2*std20))/(4*std20)"),
    ("two_bull", "c>o on this bar and on the previous bar"),
    ("hour", "hour/24"),
    ("weekday", "weekday/7, Monday=0"),
    ("day", "day of month/31"),
    ("month", "month/12"),
    ("hour_sin", "sin(2*pi*hour/24)"),
    ("hour_cos", "cos(2*pi*hour/24)"),
    ("weekday_sin", "sin(2*pi*weekday/7)"),
    ("weekday_cos", "cos(2*pi*weekday/7)"),
    ("years", "years since the input's first row, seconds/(365.25*86400)"),
    ("weekend", "Saturday or Sunday"),
)
SIMPLE60_NAMES: tuple[str, ...] = tuple(name for name, _ in _SIMPLE60)
SIMPLE60_DESCRIPTIONS: tuple[str, ...] = tuple(text for _, text in _SIMPLE60)

_WINDOW = WARMUP + 1


@dataclass(frozen=True)
class FeatureSet:
    """A named feature set: column names in model-input order and the rows it needs before the first."""

    name: str
    names: tuple[str, ...]
    description: str
    warmup: int


FEATURE_SETS: dict[str, FeatureSet] = {
    "simple-60": FeatureSet(
        name="simple-60",
        names=SIMPLE60_NAMES,
        description=(
            "60 features from 5-minute OHLCV, each over the last 51 bars (t-50..t); "
            "NaN/inf -> 0; no scaling. The set the 61 %-accuracy model was trained on."
        ),
        warmup=WARMUP,
    ),
}


def _ema_taps(span: int, length: int) -> np.ndarray:
    """(length, length) lower-triangular E with ema_i = sum_j E[i, j] x_j.

    pandas ``ewm(span, adjust=False)`` seeded at x_0: ema_0 = x_0, ema_i = a x_i + (1-a) ema_{i-1}.
    """
    alpha = 2.0 / (span + 1.0)
    i = np.arange(length)[:, None]
    j = np.arange(length)[None, :]
    lag = np.clip(i - j, 0, None)
    taps = np.where(j == 0, (1.0 - alpha) ** i, alpha * (1.0 - alpha) ** lag)
    return np.where(j <= i, taps, 0.0)


def _macd_taps(length: int) -> tuple[np.ndarray, np.ndarray]:
    """Weights over a window of closes (length,) giving MACD and its signal at the window's last bar.

    Every EMA over a fixed window is a fixed linear filter, so both are dot products with the window.
    """
    macd_rows = _ema_taps(12, length) - _ema_taps(26, length)
    return macd_rows[-1], _ema_taps(9, length)[-1] @ macd_rows


_MACD_TAPS, _SIGNAL_TAPS = _macd_taps(_WINDOW)


def _timestamps(ohlcv: pd.DataFrame) -> pd.DatetimeIndex:
    if DATETIME_COLUMN in ohlcv.columns:
        col = ohlcv[DATETIME_COLUMN]
        if not pd.api.types.is_datetime64_any_dtype(col):
            raise ValueError(
                f"column {DATETIME_COLUMN!r} has dtype {col.dtype}, expected datetime64; "
                f"parse it first, e.g. pd.to_datetime(df[{DATETIME_COLUMN!r}])"
            )
        return pd.DatetimeIndex(col)
    if isinstance(ohlcv.index, pd.DatetimeIndex):
        return ohlcv.index
    raise ValueError(
        f"missing column {DATETIME_COLUMN!r}: simple-60's calendar features need a datetime64 "
        f"column named {DATETIME_COLUMN!r} or a DatetimeIndex"
    )


def _ohlcv_arrays(ohlcv: pd.DataFrame) -> dict[str, np.ndarray]:
    if not isinstance(ohlcv, pd.DataFrame):
        raise ValueError(f"expected a pandas DataFrame of OHLCV bars, got {type(ohlcv).__name__}")
    missing = [c for c in OHLCV_COLUMNS if c not in ohlcv.columns]
    if missing:
        raise ValueError(
            f"missing column(s) {', '.join(repr(c) for c in missing)}; "
            f"OHLCV input needs columns {', '.join(OHLCV_COLUMNS)} (lower case)"
        )
    arrays = {}
    for c in OHLCV_COLUMNS:
        try:
            arrays[c] = ohlcv[c].to_numpy(dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"column {c!r} is not numeric ({ohlcv[c].dtype}): {exc}") from exc
    return arrays


def simple60(ohlcv: pd.DataFrame) -> pd.DataFrame:
    """The simple-60 features for every bar t >= 50.

    ohlcv: n rows with columns open, high, low, close, volume and either a datetime64 column
    ``datetime`` or a DatetimeIndex. Returns float32 (n - 50, 60) with columns SIMPLE60_NAMES and
    index ``ohlcv.index[50:]``. Row t depends only on bars t-50..t (and on row 0's timestamp for
    "years").
    """
    arr = _ohlcv_arrays(ohlcv)
    ts = _timestamps(ohlcv)
    n = len(ohlcv)
    if n < _WINDOW:
        raise ValueError(f"simple-60 needs at least {_WINDOW} bars (50 warm-up + 1), got {n}")

    # (m, 51) read-only views; window row r covers bars r..r+50, i.e. t = r + 50.
    o, h, lo, c, v = (sliding_window_view(arr[k], _WINDOW, axis=0) for k in OHLCV_COLUMNS)
    with np.errstate(all="ignore"):
        ct, vt = c[:, -1], v[:, -1]
        mean_c, std_c = c.mean(axis=1), c.std(axis=1)
        mean_v, std_v = v.mean(axis=1), v.std(axis=1)
        hl = h - lo
        pct = c[:, 1:] / c[:, :-1] - 1.0  # (m, 50)
        pct_v = pct * v[:, 1:]
        sma = {k: c[:, -k:].mean(axis=1) for k in (5, 10, 20)}
        std_k = {k: c[:, -k:].std(axis=1) for k in (5, 10, 20)}
        max_h = {k: h[:, -k:].max(axis=1) for k in (10, 20)}
        min_l = {k: lo[:, -k:].min(axis=1) for k in (10, 20)}

        change = np.diff(c[:, -15:], axis=1)  # last 14 close changes
        gain = np.clip(change, 0.0, None).mean(axis=1)
        loss = np.clip(-change, 0.0, None).mean(axis=1)
        rsi = np.where(loss == 0.0, 100.0, 100.0 - 100.0 / (1.0 + gain / loss))

        macd = c @ _MACD_TAPS
        signal = c @ _SIGNAL_TAPS

        hour = ts.hour.to_numpy(dtype=np.float64)[WARMUP:]
        wday = ts.day_of_week.to_numpy(dtype=np.float64)[WARMUP:]
        years = ((ts - ts[0]).total_seconds().to_numpy(dtype=np.float64) / (365.25 * 86400.0))[WARMUP:]

        columns = (
            ct / c[:, 0] - 1.0,
            h.max(axis=1) / lo.min(axis=1) - 1.0,
            (ct - o[:, 0]) / o[:, 0],
            ct / c[:, -6] - 1.0,
            ct / c[:, -11] - 1.0,
            ct / c[:, -21] - 1.0,
            std_c / mean_c,
            hl.mean(axis=1) / mean_c,
            vt / mean_v,
            (ct - mean_c) / std_c,
            rsi,
            macd,
            signal,
            macd - signal,
            sma[5],
            sma[10],
            sma[20],
            (ct - sma[20]) / std_c,
            pct.mean(axis=1),
            pct.std(axis=1),
            *(pct[:, -k:].std(axis=1) * np.sqrt(k) for k in (5, 10, 20)),
            hl.mean(axis=1),
            hl.std(axis=1),
            std_k[5],
            std_k[10],
            std_k[20],
            h.max(axis=1) - lo.min(axis=1),
            (ct - sma[20]) / (2.0 * std_k[20]),
            *(v[:, -k:].mean(axis=1) for k in (5, 10, 20)),
            std_v / mean_v,
            vt / v[:, -20:].mean(axis=1),
            *(pct_v[:, -k:].mean(axis=1) for k in (5, 10, 20)),
            v.max(axis=1) / v.min(axis=1),
            vt - mean_v,
            ct > sma[5],
            ct > sma[10],
            ct > sma[20],
            sma[10] > sma[20],
            ct > 0.99 * max_h[10],
            ct > 0.99 * max_h[20],
            ct < 1.01 * min_l[10],
            ct < 1.01 * min_l[20],
            (ct - (sma[20] - 2.0 * std_k[20])) / (4.0 * std_k[20]),
            (c[:, -1] > o[:, -1]) & (c[:, -2] > o[:, -2]),
            hour / 24.0,
            wday / 7.0,
            ts.day.to_numpy(dtype=np.float64)[WARMUP:] / 31.0,
            ts.month.to_numpy(dtype=np.float64)[WARMUP:] / 12.0,
            np.sin(2.0 * np.pi * hour / 24.0),
            np.cos(2.0 * np.pi * hour / 24.0),
            np.sin(2.0 * np.pi * wday / 7.0),
            np.cos(2.0 * np.pi * wday / 7.0),
            years,
            wday >= 5.0,
        )
        # Cast before cleaning so float32 overflow (e.g. a huge max(v)/min(v)) also becomes 0.
        out = np.column_stack(columns).astype(np.float32)
    np.nan_to_num(out, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    return pd.DataFrame(out, index=ohlcv.index[WARMUP:], columns=list(SIMPLE60_NAMES))


_COMPUTE: dict[str, Callable[[pd.DataFrame], pd.DataFrame]] = {"simple-60": simple60}


def compute_features(ohlcv: pd.DataFrame, feature_set: str = "simple-60") -> pd.DataFrame:
    """Features of ``feature_set`` for every bar t >= its warmup; see FEATURE_SETS for the names."""
    if feature_set not in FEATURE_SETS:
        raise ValueError(
            f"unknown feature set {feature_set!r}; known feature sets: {', '.join(sorted(FEATURE_SETS))}"
        )
    return _COMPUTE[feature_set](ohlcv)


@dataclass(frozen=True)
class LabelRule:
    """Label bar t by its return ``horizon`` bars ahead against +-``threshold`` (0.002 = 0.2 %)."""

    horizon: int = 5
    threshold: float = 0.002

    def __post_init__(self) -> None:
        if int(self.horizon) != self.horizon or self.horizon < 1:
            raise ValueError(f"LabelRule.horizon must be a positive integer, got {self.horizon!r}")
        if not np.isfinite(self.threshold) or self.threshold < 0:
            raise ValueError(f"LabelRule.threshold must be a finite fraction >= 0, got {self.threshold!r}")

    def describe(self) -> str:
        h, pct = self.horizon, 100.0 * self.threshold
        return (
            f"r = close[t+{h}]/close[t] - 1; BUY if r > +{pct:g} %, SELL if r < -{pct:g} %, "
            f"else HOLD; the last {h} bars (no future) are HOLD"
        )


def compute_labels(close: np.ndarray | pd.Series, rule: LabelRule = LabelRule()) -> np.ndarray:
    """int64 labels (n,) for every bar: 0=SELL, 1=HOLD, 2=BUY (ACTIONS order) by ``rule``.

    Bars without a future close (the last ``horizon``) and bars with a NaN return are HOLD.
    """
    c = np.asarray(close, dtype=np.float64).reshape(-1)
    labels = np.ones(c.shape[0], dtype=np.int64)
    h = rule.horizon
    if c.shape[0] > h:
        with np.errstate(all="ignore"):
            r = c[h:] / c[:-h] - 1.0
        labels[:-h][r < -rule.threshold] = 0
        labels[:-h][r > rule.threshold] = 2
    return labels
