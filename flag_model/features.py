"""Feature sets computed from OHLCV bars, and the label rule.

"simple-60" is the feature set the 61 %-accuracy FLAG-TRADER model was trained on, reproduced exactly as
the original pipeline computed it (the spec is ``../shared/FEATURES.md``; quirks included, because a model
fed features that differ from training sees a silent input shift). For each bar t >= WARMUP (50) every
feature is computed over the window of the 51 bars t-50..t only -- no history before it, not even for EWMs:

- ``c[-k]`` is the k-th bar from the end: ``c[-1]`` is bar t, ``c[-5]`` is 4 bars before it.
- std is the sample std (ddof=1, pandas' default); mean/std/max/min skip NaN as pandas does.
- rolling(k) means are pandas' running sums (Kahan-compensated, started at the window's first bar),
  emulated operation by operation, so comparisons with them (features 40-43) round like pandas.
- EWMs are pandas ``ewm(span).mean()`` with ``adjust=True`` started at the window's first bar, emulated
  with pandas' own recursion.
- NaN and +-inf become 0 (in float64), then the row is stored as float32. No scaling.

Everything is vectorised over all windows of the file; the only Python loops run over the 51 positions
of the window (the running sums and EWM recursions), never over rows.

``SIMPLE60_NAMES`` / ``SIMPLE60_DESCRIPTIONS`` are index-aligned with FEATURES.md's numbering;
``SIMPLE60_QUIRKS`` says where a feature is not what its name suggests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from numpy.lib.stride_tricks import sliding_window_view

ACTIONS: tuple[str, ...] = ("SELL", "HOLD", "BUY")


def too_few_bars(n_bars: int | None = None) -> str:
    """The one message for OHLCV shorter than simple-60's warm-up (`n_bars` None: the count is not known)."""
    has = f"fewer than {WARMUP + 1}" if n_bars is None else n_bars
    return (
        f"too few rows: simple-60 needs at least {WARMUP + 1} bars ({WARMUP} bars of warm-up plus one); "
        f"the data has {has}. Use a longer stretch of bars."
    )


def feature_names_or_default(names: Sequence[str] | None, width: int) -> tuple[str, ...]:
    """The given feature names, else f0..f{width-1} (windows handed in without names)."""
    return tuple(names) if names is not None else tuple(f"f{i}" for i in range(width))


def action_names(n_actions: int) -> tuple[str, ...]:
    """SELL/HOLD/BUY for 3-action models, else class_0..class_{n-1} (names that also work as column suffixes)."""
    return ACTIONS if n_actions == len(ACTIONS) else tuple(f"class_{i}" for i in range(n_actions))


WARMUP = 50
OHLCV_COLUMNS: tuple[str, ...] = ("open", "high", "low", "close", "volume")
DATETIME_COLUMN = "datetime"

# (name, definition, quirk or ""); the window is c[0] (oldest) .. c[-1] (current bar), 51 bars.
_SIMPLE60: tuple[tuple[str, str, str], ...] = (
    ("ret_50", "c[-1]/c[0] - 1: return over the 51-bar window", ""),
    ("range_hl", "max(h)/min(l) - 1 over the window", ""),
    ("ret_open", "(c[-1] - o[0])/o[0], o[0] = open of the window's oldest bar", ""),
    ("ret_5", "(c[-1] - c[-5])/c[-5]", "c[-5] is 4 bars back: a 4-bar return"),
    ("ret_10", "(c[-1] - c[-10])/c[-10]", "c[-10] is 9 bars back: a 9-bar return"),
    ("ret_20", "(c[-1] - c[-20])/c[-20]", "c[-20] is 19 bars back: a 19-bar return"),
    ("cv_close", "std(c)/mean(c) over the window (sample std)", ""),
    ("range_rel", "mean(h - l)/mean(c) over the window", ""),
    ("vol_rel", "v[-1]/mean(v) over the window", ""),
    (
        "zscore_oldest",
        "(c[0] - mean(c))/std(c)",
        "the z-score of the window's OLDEST bar (50 bars ago), not of the current bar",
    ),
    (
        "rsi_14",
        "RSI(14): simple 14-bar rolling means of gains and losses; 100 if no losses, 50 if undefined",
        "simple means, not Wilder's smoothing",
    ),
    ("macd", "EWM12(c) - EWM26(c) at the last bar", "pandas EWM adjust=True, started at the window's first bar"),
    ("macd_signal", "EWM9 of the in-window MACD series", "pandas EWM adjust=True, started at the window's first bar"),
    ("macd_hist", "MACD - signal", "pandas EWM adjust=True, started at the window's first bar"),
    ("sma_5", "SMA 5 of close (raw price)", ""),
    ("sma_10", "SMA 10 of close (raw price)", ""),
    ("sma_20", "SMA 20 of close (raw price)", ""),
    ("dev_sma20", "(c[-1] - SMA20)/std(c)", "divided by the whole window's std, not the 20-bar std"),
    ("ret_mean", "mean of the window's 50 one-bar returns", ""),
    ("ret_std", "std of the window's 50 one-bar returns", ""),
    ("retstd_5", "std(all 50 returns) * sqrt(5)", "the whole window's return std, scaled; not the last 5 returns"),
    ("retstd_10", "std(all 50 returns) * sqrt(10)", "the whole window's return std, scaled; not the last 10 returns"),
    ("retstd_20", "std(all 50 returns) * sqrt(20)", "the whole window's return std, scaled; not the last 20 returns"),
    ("hl_mean", "mean(h - l) over the window", ""),
    ("hl_std", "std(h - l) over the window", ""),
    ("close_std_5", "rolling std of the last 5 closes", ""),
    ("close_std_10", "rolling std of the last 10 closes", ""),
    ("close_std_20", "rolling std of the last 20 closes", ""),
    ("hl_span", "max(h) - min(l) over the window", ""),
    ("bb_z20", "(c[-1] - SMA20)/(2 * rollstd20)", ""),
    ("vma_5", "mean volume of the last 5 bars (raw volume)", ""),
    ("vma_10", "mean volume of the last 10 bars (raw volume)", ""),
    ("vma_20", "mean volume of the last 20 bars (raw volume)", ""),
    ("vol_cv", "std(v)/mean(v) over the window", ""),
    ("vol_rel20", "v[-1]/(mean volume of the last 20 bars)", ""),
    ("retvol_5", "mean of return * volume over the last 5 bars", ""),
    ("retvol_10", "mean of return * volume over the last 10 bars", ""),
    ("retvol_20", "mean of return * volume over the last 20 bars", ""),
    ("vol_maxmin", "max(v)/min(v) over the window (0 when a bar has zero volume)", ""),
    ("vol_dev", "v[-1] - mean(v) over the window (raw volume)", ""),
    ("above_sma5", "c[-1] > SMA5, 0/1", "SMA rounded like pandas' running sum"),
    ("above_sma10", "c[-1] > SMA10, 0/1", "SMA rounded like pandas' running sum"),
    ("above_sma20", "c[-1] > SMA20, 0/1", "SMA rounded like pandas' running sum"),
    ("sma10_gt_sma20", "SMA10 > SMA20, 0/1", "SMA rounded like pandas' running sum"),
    ("near_high_10", "c[-1] > 0.99 * max(h) of the last 10 bars, 0/1", ""),
    ("near_high_20", "c[-1] > 0.99 * max(h) of the last 20 bars, 0/1", ""),
    ("near_low_10", "c[-1] < 1.01 * min(l) of the last 10 bars, 0/1", ""),
    ("near_low_20", "c[-1] < 1.01 * min(l) of the last 20 bars, 0/1", ""),
    ("bb_pctb", "Bollinger %B(20): (c[-1] - lower)/(upper - lower); 0.5 when the band is flat", ""),
    ("two_bull", "c > o on the current bar and on the one before, 0/1", ""),
    ("hour", "hour/24 of the bar's timestamp", "assumes the file's clock (UTC in training)"),
    ("weekday", "dayofweek/7, Monday = 0", "assumes the file's clock (UTC in training)"),
    ("day", "day of month/31", ""),
    ("month", "month/12", ""),
    ("hour_sin", "sin(2*pi*hour/24)", "assumes the file's clock (UTC in training)"),
    ("hour_cos", "cos(2*pi*hour/24)", "assumes the file's clock (UTC in training)"),
    ("weekday_sin", "sin(2*pi*dayofweek/7)", ""),
    ("weekday_cos", "cos(2*pi*dayofweek/7)", ""),
    (
        "years",
        "(time - first time of the whole file) in years of 365.25 days",
        "depends on where the file starts, not on the market",
    ),
    ("weekend", "Saturday or Sunday, 0/1", ""),
)
SIMPLE60_NAMES: tuple[str, ...] = tuple(name for name, _, _ in _SIMPLE60)
SIMPLE60_DESCRIPTIONS: tuple[str, ...] = tuple(text for _, text, _ in _SIMPLE60)
SIMPLE60_QUIRKS: dict[int, str] = {i: quirk for i, (_, _, quirk) in enumerate(_SIMPLE60) if quirk}

_WINDOW = WARMUP + 1


def simple60_reference() -> pd.DataFrame:
    """One row per simple-60 feature: index, name, definition, quirk (empty where none). For help texts."""
    return pd.DataFrame(
        {
            "index": range(len(_SIMPLE60)),
            "name": SIMPLE60_NAMES,
            "definition": SIMPLE60_DESCRIPTIONS,
            "quirk": [q for _, _, q in _SIMPLE60],
        }
    )


def feature_help(i: int) -> str:
    """The definition of simple-60 feature ``i`` with its quirk, for a column tooltip."""
    quirk = SIMPLE60_QUIRKS.get(i)
    return f"#{i}: {SIMPLE60_DESCRIPTIONS[i]}" + (f". Quirk: {quirk}." if quirk else "")


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
            "60 features from 5-minute OHLCV, each over the 51 bars t-50..t, exactly as the training "
            "pipeline computed them (quirks included); NaN/inf -> 0; no scaling."
        ),
        warmup=WARMUP,
    ),
}


def _nan_mean_std(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample std (ddof=1) over the last axis skipping NaN, in pandas' nanops order of operations
    (sum / count, then sum((avg - x)**2) / (count - 1)). x (..., n) -> two (...,) arrays."""
    nan = np.isnan(x)
    count = (~nan).sum(axis=-1)
    filled = np.where(nan, 0.0, x)
    avg = filled.sum(axis=-1) / count
    sqr = np.where(nan, 0.0, (avg[..., None] - filled) ** 2)
    return avg, np.sqrt(sqr.sum(axis=-1) / (count - 1))


def _by_position(series: np.ndarray, m: int) -> list[np.ndarray]:
    """(..., n) series -> 51 arrays (..., m): [j] holds position j of each of the m windows of 51 bars.

    Position j of window r is series[r + j], so each is a contiguous view: the loops over the window's
    positions below stream through memory instead of striding across rows.
    """
    view = sliding_window_view(series, m, axis=-1)  # (..., 51, m)
    return [view[..., j, :] for j in range(_WINDOW)]


def _rolling_mean_last(x: list[np.ndarray], k: int) -> np.ndarray:
    """pandas ``Series(w).rolling(k).mean().iloc[-1]`` of every window w at once; x by position (see
    ``_by_position``) -> (..., m).

    pandas keeps a Kahan-compensated running sum from the series' first value (separate compensation
    for adds and removes), returns the last value itself when the last k observations are all equal,
    and clamps the sign; repeating that here makes c > SMA_k round exactly as in training.
    """
    shape = x[0].shape
    nobs = np.zeros(shape, dtype=np.int64)
    neg = np.zeros(shape, dtype=np.int64)
    total = np.zeros(shape)
    comp_add = np.zeros(shape)
    comp_rem = np.zeros(shape)
    same = np.zeros(shape, dtype=np.int64)
    prev = np.array(x[0], dtype=np.float64)
    for j in range(len(x)):
        if j >= k:  # pandas removes the value leaving the window before adding the new one
            val = x[j - k]
            ok = ~np.isnan(val)
            y = -val - comp_rem
            t = total + y
            comp_rem = np.where(ok, t - total - y, comp_rem)
            total = np.where(ok, t, total)
            nobs -= ok
            neg -= ok & (val < 0)
        val = x[j]
        ok = ~np.isnan(val)
        y = val - comp_add
        t = total + y
        comp_add = np.where(ok, t - total - y, comp_add)
        total = np.where(ok, t, total)
        nobs += ok
        neg += ok & (val < 0)
        same = np.where(ok, np.where(val == prev, same + 1, 1), same)
        prev = np.where(ok, val, prev)
    with np.errstate(all="ignore"):
        result = total / nobs
    result = np.where(same >= nobs, prev, result)
    result = np.where((same < nobs) & (neg == 0) & (result < 0), 0.0, result)
    result = np.where((same < nobs) & (neg == nobs) & (result > 0), 0.0, result)
    return np.where((nobs >= k) & (nobs > 0), result, np.nan)


_INV_COND_TOL = np.finfo(np.float64).eps * 1e3  # pandas' threshold for "catastrophic cancellation"


class _Welford:
    """pandas' rolling-variance state (Welford with Kahan compensation, separate add/remove compensation)
    for many windows at once; every update is masked to the rows where the value is not NaN."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.nobs = np.zeros(shape)
        self.mean = np.zeros(shape)
        self.ssq = np.zeros(shape)
        self.comp_add = np.zeros(shape)
        self.comp_rem = np.zeros(shape)
        self.unstable = np.zeros(shape, dtype=bool)

    def add(self, val: np.ndarray) -> None:
        ok = ~np.isnan(val)
        prev_m2 = self.ssq
        nobs = self.nobs + ok
        prev_mean = self.mean - self.comp_add
        y = val - self.comp_add
        t = y - self.mean
        comp = t + self.mean - y
        mean = self.mean + t / nobs
        ssq = self.ssq + (val - prev_mean) * (val - mean)
        self.unstable = np.where(ok, self.unstable | (prev_m2 * _INV_COND_TOL > ssq), self.unstable)
        self.nobs, self.mean = nobs, np.where(ok, mean, self.mean)
        self.ssq, self.comp_add = np.where(ok, ssq, self.ssq), np.where(ok, comp, self.comp_add)

    def remove(self, val: np.ndarray) -> None:
        ok = ~np.isnan(val)
        prev_m2 = self.ssq
        nobs = self.nobs - ok
        prev_mean = self.mean - self.comp_rem
        y = val - self.comp_rem
        t = y - self.mean
        comp = t + self.mean - y
        mean = self.mean - t / nobs
        ssq = self.ssq - (val - prev_mean) * (val - mean)
        some, empty = ok & (nobs > 0), ok & (nobs == 0)
        self.unstable = np.where(some, self.unstable | (prev_m2 * _INV_COND_TOL > ssq), self.unstable & ~empty)
        self.mean = np.where(some, mean, np.where(empty, 0.0, self.mean))
        self.ssq = np.where(some, ssq, np.where(empty, 0.0, self.ssq))
        self.comp_rem = np.where(some, comp, self.comp_rem)
        self.nobs = nobs


def _rolling_std_last(x: list[np.ndarray], k: int) -> np.ndarray:
    """pandas ``Series(w).rolling(k).std().iloc[-1]`` of every window w; x by position -> (m,).

    pandas updates a running Welford state from the window's first value and recomputes a window from
    scratch only when an update looks like catastrophic cancellation; on flat stretches that leaves small
    residues instead of 0, and training saw those residues, so they are repeated here. Negative variance
    reads as 0 (pandas' zsqrt).
    """
    state = _Welford(x[0].shape)
    state.add(x[0])
    for i in range(1, len(x)):
        if i >= k:
            state.remove(x[i - k])
        state.add(x[i])
        rows = np.flatnonzero(state.unstable)
        if len(rows):  # pandas' recompute of the window i-k+1..i, for the flagged windows only
            fresh = _Welford((len(rows),))
            for j in range(max(0, i - k + 1), i + 1):
                fresh.add(x[j][rows])
            for name in ("nobs", "mean", "ssq", "comp_add", "comp_rem"):
                getattr(state, name)[rows] = getattr(fresh, name)
            state.unstable[rows] = False
    with np.errstate(all="ignore"):
        var = np.where((state.nobs >= k) & (state.nobs > 1), state.ssq / (state.nobs - 1.0), np.nan)
    return np.where(var < 0, 0.0, np.sqrt(var))


def _ewm_series(x: list[np.ndarray], span: int) -> list[np.ndarray]:
    """pandas ``Series(w).ewm(span=span).mean()`` (adjust=True, ignore_na=False, min_periods=0) of every
    window w, started at its first value, with pandas' own recursion; by position in and out."""
    com = (span - 1) / 2.0
    alpha = 1.0 / (1.0 + com)
    factor = 1.0 - alpha
    weighted = np.array(x[0], dtype=np.float64)
    old_wt = np.ones(weighted.shape)
    out = [weighted]
    for cur in x[1:]:
        obs = ~np.isnan(cur)
        have = ~np.isnan(weighted)
        old_wt = np.where(have, old_wt * factor, old_wt)
        blended = (old_wt * weighted + 1.0 * cur) / (old_wt + 1.0)
        update = have & obs
        weighted = np.where(update & (weighted != cur), blended, weighted)
        old_wt = np.where(update, old_wt + 1.0, old_wt)
        weighted = np.where(~have & obs, cur, weighted)
        out.append(weighted)
    return out


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
            arrays[c] = ohlcv[c].to_numpy(dtype=np.float64, na_value=np.nan)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"column {c!r} is not numeric ({ohlcv[c].dtype}): {exc}") from exc
    return arrays


def simple60(ohlcv: pd.DataFrame) -> pd.DataFrame:
    """The simple-60 features for every bar t >= 50, as FEATURES.md specifies.

    ohlcv: n rows sorted by time with columns open, high, low, close, volume and either a datetime64
    column ``datetime`` or a DatetimeIndex. Returns float32 (n - 50, 60) with columns SIMPLE60_NAMES and
    index ``ohlcv.index[50:]``. Row t depends only on bars t-50..t (and on row 0's timestamp for "years").
    """
    arr = _ohlcv_arrays(ohlcv)
    ts = _timestamps(ohlcv)
    n = len(ohlcv)
    if n < _WINDOW:
        raise ValueError(too_few_bars(n))

    # (m, 51) read-only views; window row r covers bars r..r+50, i.e. t = r + 50.
    o, h, lo, c, v = (sliding_window_view(arr[k], _WINDOW, axis=0) for k in OHLCV_COLUMNS)
    with np.errstate(all="ignore"):
        ct, vt = c[:, -1], v[:, -1]
        mean_c, std_c = _nan_mean_std(c)
        mean_v, std_v = _nan_mean_std(v)
        hl = h - lo
        mean_hl, std_hl = _nan_mean_std(hl)
        pct = np.concatenate([np.full((len(c), 1), np.nan), c[:, 1:] / c[:, :-1] - 1.0], axis=1)  # (m, 51)
        mean_pct, std_pct = _nan_mean_std(pct)
        # The running sums and EWMs walk the 51 positions, each holding all m windows (contiguous views).
        m, close = len(c), arr["close"]
        file_pct = np.r_[np.nan, close[1:] / close[:-1] - 1.0]  # equals each window's own pct_change at j >= 1
        by_pos = _by_position(np.stack([close, arr["volume"], file_pct * arr["volume"]]), m)
        by_pos[0] = np.stack([by_pos[0][0], by_pos[0][1], np.full(m, np.nan)])  # a window's first pct is NaN
        roll = {k: _rolling_mean_last(by_pos, k) for k in (5, 10, 20)}  # rows: close, volume, pct * v
        sma = {k: roll[k][0] for k in roll}
        vma = {k: roll[k][1] for k in roll}
        pvma = {k: roll[k][2] for k in roll}
        close_pos = _by_position(close, m)
        rstd = {k: _rolling_std_last(close_pos, k) for k in (5, 10, 20)}
        max_h = {k: h[:, -k:].max(axis=1) for k in (10, 20)}
        min_l = {k: lo[:, -k:].min(axis=1) for k in (10, 20)}
        max_h_all, min_l_all = np.fmax.reduce(h, axis=1), np.fmin.reduce(lo, axis=1)

        delta = np.r_[np.nan, np.diff(close)]
        delta = np.stack([np.where(delta > 0, delta, 0.0), np.where(delta < 0, -delta, 0.0)])  # NaN -> 0
        delta_pos = _by_position(delta, m)
        delta_pos[0] = np.zeros_like(delta_pos[0])  # a window's first diff is NaN, so its gain and loss are 0
        avg_gain, avg_loss = _rolling_mean_last(delta_pos, 14)
        rsi = np.where(avg_loss == 0, 100.0, 100.0 - 100.0 / (1.0 + avg_gain / avg_loss))
        rsi = np.where(np.isnan(rsi), 50.0, rsi)

        macd_series = [a - b for a, b in zip(_ewm_series(close_pos, 12), _ewm_series(close_pos, 26))]
        macd = macd_series[-1]
        signal = _ewm_series(macd_series, 9)[-1]

        upper, lower = sma[20] + 2.0 * rstd[20], sma[20] - 2.0 * rstd[20]
        pctb = np.where(upper == lower, 0.5, (ct - lower) / (upper - lower))

        hour = ts.hour.to_numpy(dtype=np.float64)[WARMUP:]
        wday = ts.day_of_week.to_numpy(dtype=np.float64)[WARMUP:]
        years = ((ts - ts[0]).total_seconds().to_numpy(dtype=np.float64) / (365.25 * 24 * 3600))[WARMUP:]

        columns = (
            ct / c[:, 0] - 1.0,
            max_h_all / min_l_all - 1.0,
            (ct - o[:, 0]) / o[:, 0],
            *((ct - c[:, -k]) / c[:, -k] for k in (5, 10, 20)),
            std_c / mean_c,
            mean_hl / mean_c,
            vt / mean_v,
            (c[:, 0] - mean_c) / std_c,
            rsi,
            macd,
            signal,
            macd - signal,
            sma[5],
            sma[10],
            sma[20],
            (ct - sma[20]) / std_c,
            mean_pct,
            std_pct,
            *(std_pct * np.sqrt(k) for k in (5, 10, 20)),
            mean_hl,
            std_hl,
            rstd[5],
            rstd[10],
            rstd[20],
            max_h_all - min_l_all,
            (ct - sma[20]) / (2.0 * rstd[20]),
            vma[5],
            vma[10],
            vma[20],
            std_v / mean_v,
            vt / vma[20],
            pvma[5],
            pvma[10],
            pvma[20],
            np.fmax.reduce(v, axis=1) / np.fmin.reduce(v, axis=1),
            vt - mean_v,
            ct > sma[5],
            ct > sma[10],
            ct > sma[20],
            sma[10] > sma[20],
            ct > 0.99 * max_h[10],
            ct > 0.99 * max_h[20],
            ct < 1.01 * min_l[10],
            ct < 1.01 * min_l[20],
            pctb,
            (c[:, -2] > o[:, -2]) & (c[:, -1] > o[:, -1]),
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
        out = np.column_stack(columns).astype(np.float64)
    # As the pipeline did: clean in float64, then store as float32. A value beyond float32's range (only from
    # absurd inputs such as volumes near 1e300) would be stored as +-inf there; it becomes 0 too, because a model
    # input must be finite.
    np.nan_to_num(out, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    out32 = out.astype(np.float32)
    np.nan_to_num(out32, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    return pd.DataFrame(out32, index=ohlcv.index[WARMUP:], columns=list(SIMPLE60_NAMES))


_COMPUTE: dict[str, Callable[[pd.DataFrame], pd.DataFrame]] = {"simple-60": simple60}


def compute_features(ohlcv: pd.DataFrame, feature_set: str = "simple-60") -> pd.DataFrame:
    """Features of ``feature_set`` for every bar t >= its warmup; see FEATURE_SETS for the names."""
    if feature_set not in FEATURE_SETS:
        raise ValueError(f"unknown feature set {feature_set!r}; known feature sets: {', '.join(sorted(FEATURE_SETS))}")
    return _COMPUTE[feature_set](ohlcv)


def stored_config(meta: Mapping[str, Any]) -> Mapping[str, Any]:
    """The training config a checkpoint stores under ``config`` ({} when there is none or it is not a dict)."""
    cfg = meta.get("config")
    return cfg if isinstance(cfg, Mapping) else {}


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

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> tuple[LabelRule, str]:
        """The rule a checkpoint stores (``label_rule: {horizon, threshold}``, top level or in its config) and
        where it came from: "stored in the checkpoint", else the documented training rule, "assumed"."""
        cfg = stored_config(meta)
        stored = meta.get("label_rule", cfg.get("label_rule"))
        if isinstance(stored, Mapping):
            try:
                return cls(
                    int(stored.get("horizon", cls.horizon)), float(stored.get("threshold", cls.threshold))
                ), "stored in the checkpoint"
            except (TypeError, ValueError):
                pass  # an unusable stored rule falls back to the documented one, and says so
        return cls(), "assumed (the FLAG-TRADER training rule; the checkpoint stores none)"

    def describe(self) -> str:
        h, pct = self.horizon, 100.0 * self.threshold
        return (
            f"r = (close[t+{h}] - close[t])/close[t]; BUY if r > +{pct:g} %, SELL if r < -{pct:g} %, "
            f"else HOLD; the last {h} bars have no future: unknown here, counted as HOLD in training"
        )


def compute_labels(close: np.ndarray | pd.Series, rule: LabelRule = LabelRule()) -> np.ndarray:
    """int64 labels (n,) for every bar as the training pipeline made them: 0=SELL, 1=HOLD, 2=BUY.

    r = (c[t+h] - c[t]) / c[t] in that order of operations (the thresholds see the last bit). Bars without
    a future close (the last ``horizon``) and bars with a NaN return are HOLD, as training counted them;
    for metrics use ``analysis.predict.row_labels``, which marks them unknown.
    """
    c = np.asarray(close, dtype=np.float64).reshape(-1)
    labels = np.ones(c.shape[0], dtype=np.int64)
    h = rule.horizon
    if c.shape[0] > h:
        with np.errstate(all="ignore"):
            r = (c[h:] - c[:-h]) / c[:-h]
        labels[:-h][r < -rule.threshold] = 0
        labels[:-h][r > rule.threshold] = 2
    return labels
