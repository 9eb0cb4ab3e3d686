"""simple-60 features and the label rule, against a per-window loop oracle and the team's label counts."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flag_model.features import (
    ACTIONS,
    FEATURE_SETS,
    SIMPLE60_DESCRIPTIONS,
    SIMPLE60_NAMES,
    WARMUP,
    LabelRule,
    compute_features,
    compute_labels,
    simple60,
)

ETH_CSV = Path(__file__).resolve().parents[1].parent / "shared/data/ETH_USDT_5m_6m.csv"


@pytest.fixture(scope="module")
def eth() -> pd.DataFrame:
    if not ETH_CSV.exists():
        pytest.skip(f"real ETH data not found at {ETH_CSV} (not part of the repo)")
    return pd.read_csv(ETH_CSV, parse_dates=["datetime"])


@pytest.fixture(scope="module")
def eth_features(eth: pd.DataFrame) -> pd.DataFrame:
    return simple60(eth)


def _synthetic(n: int = 300, seed: int = 0) -> pd.DataFrame:
    """Random-walk OHLCV on a 5-minute DatetimeIndex, with a few flat bars and zero-volume bars."""
    rng = np.random.default_rng(seed)
    close = 100.0 * np.exp(np.cumsum(rng.normal(0.0, 0.004, n)))
    close[120:126] = close[119]
    open_ = np.r_[close[0], close[:-1]]
    high = np.maximum(open_, close) * (1.0 + rng.uniform(0.0, 0.003, n))
    low = np.minimum(open_, close) * (1.0 - rng.uniform(0.0, 0.003, n))
    volume = rng.lognormal(6.0, 0.8, n)
    volume[200:203] = 0.0
    index = pd.date_range("2027-12-31 12:00", periods=n, freq="5min", name="datetime")
    columns = {"open": open_, "high": high, "low": low, "close": close, "volume": volume}
    return pd.DataFrame(columns, index=index)


def _pstd(x: np.ndarray) -> float:
    m = sum(x) / len(x)
    return math.sqrt(sum((xi - m) ** 2 for xi in x) / len(x))


def _div(a: float, b: float) -> float:
    return a / b if b != 0 else 0.0


def _oracle_row(df: pd.DataFrame, times: pd.DatetimeIndex, t: int) -> np.ndarray:
    """The 60 features of bar t written out directly from DESIGN §2 over the 51-bar window, float64."""
    w = df.iloc[t - WARMUP : t + 1]
    o, h, lo, c, v = (w[k].to_numpy(dtype=np.float64) for k in ("open", "high", "low", "close", "volume"))
    ct, vt = c[-1], v[-1]
    pct = pd.Series(c).pct_change().to_numpy()[1:]
    sma = {k: sum(c[-k:]) / k for k in (5, 10, 20)}
    sd = {k: _pstd(c[-k:]) for k in (5, 10, 20)}
    hl = h - lo
    gains = losses = 0.0
    for i in range(len(c) - 14, len(c)):
        d = c[i] - c[i - 1]
        gains += max(d, 0.0)
        losses += max(-d, 0.0)
    rsi = 100.0 if losses == 0 else 100.0 - 100.0 / (1.0 + (gains / 14) / (losses / 14))
    s = pd.Series(c)
    macd_series = s.ewm(span=12, adjust=False).mean() - s.ewm(span=26, adjust=False).mean()
    macd = macd_series.iloc[-1]
    signal = macd_series.ewm(span=9, adjust=False).mean().iloc[-1]
    pv = pct * v[1:]
    ts = times[t]
    hour, wday = ts.hour, ts.weekday()
    row = [
        c[-1] / c[0] - 1, _div(max(h), min(lo)) - 1, (ct - o[0]) / o[0],
        ct / c[-6] - 1, ct / c[-11] - 1, ct / c[-21] - 1,
        _pstd(c) / np.mean(c), np.mean(hl) / np.mean(c), _div(vt, np.mean(v)),
        _div(ct - np.mean(c), _pstd(c)), rsi, macd, signal, macd - signal,
        sma[5], sma[10], sma[20], _div(ct - sma[20], _pstd(c)),
        np.mean(pct), _pstd(pct), *(_pstd(pct[-k:]) * math.sqrt(k) for k in (5, 10, 20)),
        np.mean(hl), _pstd(hl), sd[5], sd[10], sd[20], max(h) - min(lo),
        _div(ct - sma[20], 2 * sd[20]),
        *(sum(v[-k:]) / k for k in (5, 10, 20)),
        _div(_pstd(v), np.mean(v)), _div(vt, sum(v[-20:]) / 20),
        *(sum(pv[-k:]) / k for k in (5, 10, 20)),
        _div(max(v), min(v)), vt - np.mean(v),
        ct > sma[5], ct > sma[10], ct > sma[20], sma[10] > sma[20],
        ct > 0.99 * max(h[-10:]), ct > 0.99 * max(h[-20:]),
        ct < 1.01 * min(lo[-10:]), ct < 1.01 * min(lo[-20:]),
        _div(ct - (sma[20] - 2 * sd[20]), 4 * sd[20]),
        c[-1] > o[-1] and c[-2] > o[-2],
        hour / 24, wday / 7, ts.day / 31, ts.month / 12,
        math.sin(2 * math.pi * hour / 24), math.cos(2 * math.pi * hour / 24),
        math.sin(2 * math.pi * wday / 7), math.cos(2 * math.pi * wday / 7),
        (ts - times[0]).total_seconds() / (365.25 * 86400), wday >= 5,
    ]
    return np.array(row, dtype=np.float64)


def _assert_matches_oracle(
    df: pd.DataFrame, times: pd.DatetimeIndex, feats: pd.DataFrame, rows: list[int]
) -> None:
    for t in rows:
        expected = _oracle_row(df, times, t)
        got = feats.iloc[t - WARMUP].to_numpy(dtype=np.float64)
        bad = ~np.isclose(got, expected, rtol=1e-6, atol=1e-7)
        assert not bad.any(), f"row {t}: " + ", ".join(
            f"{SIMPLE60_NAMES[i]} got {got[i]!r} expected {expected[i]!r}" for i in np.flatnonzero(bad)
        )


def test_names_and_feature_set_registry() -> None:
    assert len(SIMPLE60_NAMES) == 60 == len(set(SIMPLE60_NAMES)) == len(SIMPLE60_DESCRIPTIONS)
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", n) for n in SIMPLE60_NAMES)
    assert (SIMPLE60_NAMES[0], SIMPLE60_NAMES[1], SIMPLE60_NAMES[-1]) == ("ret_50", "range_hl", "weekend")
    fs = FEATURE_SETS["simple-60"]
    assert fs.names == SIMPLE60_NAMES and fs.warmup == WARMUP == 50 and fs.name == "simple-60"
    assert ACTIONS == ("SELL", "HOLD", "BUY")


def test_eth_shape_dtype_finite(eth: pd.DataFrame, eth_features: pd.DataFrame) -> None:
    assert eth_features.shape == (51_802, 60)
    assert list(eth_features.columns) == list(SIMPLE60_NAMES)
    assert (eth_features.dtypes == np.float32).all()
    assert np.isfinite(eth_features.to_numpy()).all()
    assert eth_features.index.equals(eth.index[WARMUP:])
    assert compute_features(eth.iloc[:400]).equals(eth_features.iloc[:350])


def test_eth_matches_loop_oracle(eth: pd.DataFrame, eth_features: pd.DataFrame) -> None:
    rng = np.random.default_rng(7)
    rows = [WARMUP, len(eth) - 1, *rng.integers(WARMUP, len(eth), 6).tolist()]
    _assert_matches_oracle(eth, pd.DatetimeIndex(eth["datetime"]), eth_features, rows)


def test_synthetic_edge_cases_match_oracle() -> None:
    df = _synthetic()
    feats = simple60(df)
    assert feats.index.equals(df.index[WARMUP:])
    assert np.isfinite(feats.to_numpy()).all()
    # Row 125 ends seven flat closes (std of the last 5 is 0); row 202 has zero volume in its
    # window (max/min volume is inf, hence 0); the others are ordinary.
    rows = [WARMUP, 125, 130, 202, 205, 299]
    _assert_matches_oracle(df, df.index, feats, rows)
    assert feats["close_std_5"].iloc[125 - WARMUP] == 0.0
    assert feats["vol_maxmin"].iloc[202 - WARMUP] == 0.0
    # The synthetic index runs from Friday 2027-12-31 into Saturday 2028-01-01.
    assert set(feats["weekend"].unique()) == {0.0, 1.0}
    assert set(feats["month"].unique()) == {np.float32(1 / 12), np.float32(1.0)}


def test_flat_market_is_finite_with_documented_values() -> None:
    n = 80
    df = pd.DataFrame(
        {"open": 5.0, "high": 5.0, "low": 5.0, "close": 5.0, "volume": 0.0,
         "datetime": pd.date_range("2025-01-04", periods=n, freq="5min")}
    )
    feats = simple60(df)
    assert feats.index.equals(pd.RangeIndex(WARMUP, n))
    assert np.isfinite(feats.to_numpy()).all()
    assert (feats["rsi_14"] == 100.0).all()
    for name in ("zscore_close", "bb_pctb", "bb_z20", "vol_rel", "vol_maxmin", "ret_std", "close_std_20"):
        assert (feats[name] == 0.0).all(), name
    # EMA taps sum to 1 only up to rounding, so a flat MACD is ~0, not exactly 0.
    assert np.abs(feats[["macd", "macd_signal", "macd_hist"]].to_numpy()).max() < 1e-9
    assert (feats["weekend"] == 1.0).all()  # 2025-01-04 is a Saturday


def test_no_look_ahead() -> None:
    df = _synthetic(n=400, seed=3)
    t = 250
    base = simple60(df)
    rng = np.random.default_rng(11)
    future = df.copy()
    for col in ("open", "high", "low", "close", "volume"):
        future.iloc[t + 1 :, future.columns.get_loc(col)] *= rng.uniform(0.5, 1.5, len(df) - t - 1)
    future.index = df.index[: t + 1].append(df.index[t + 1 :] + pd.Timedelta(hours=7))
    changed = simple60(future)
    upto = t - WARMUP + 1
    np.testing.assert_array_equal(changed.to_numpy()[:upto], base.to_numpy()[:upto])
    assert not np.array_equal(changed.to_numpy()[upto], base.to_numpy()[upto])


def test_eth_label_counts(eth: pd.DataFrame) -> None:
    labels = compute_labels(eth["close"])
    assert labels.dtype == np.int64 and labels.shape == (len(eth),)
    after_warmup = labels[WARMUP:]
    assert len(after_warmup) == 51_802
    assert np.bincount(after_warmup, minlength=3).tolist() == [12_754, 25_699, 13_349]
    assert np.bincount(after_warmup[-10_361:], minlength=3).tolist() == [1_987, 6_201, 2_173]
    np.testing.assert_array_equal(compute_labels(eth["close"].to_numpy()), labels)


def test_labels_small_example() -> None:
    close = np.array([100.0, 101.0, 100.1, 99.0, 99.1, 99.0, 98.0])
    # returns 1 bar ahead: +1 %, -0.89 %, -1.1 %, +0.10 %, -0.10 %, -1.01 %, (none)
    assert compute_labels(close, LabelRule(horizon=1, threshold=0.002)).tolist() == [2, 0, 0, 1, 1, 0, 1]
    # 2 bars ahead: +0.1 %, -1.98 %, -1.0 %, 0 %, -1.11 %, (none), (none)
    assert compute_labels(close, LabelRule(horizon=2, threshold=0.005)).tolist() == [1, 0, 0, 1, 0, 1, 1]
    assert compute_labels(close[:3], LabelRule(horizon=5)).tolist() == [1, 1, 1]
    assert "+0.2 %" in LabelRule().describe() and "t+5" in LabelRule().describe()
    with pytest.raises(ValueError, match="horizon"):
        LabelRule(horizon=0)
    with pytest.raises(ValueError, match="threshold"):
        LabelRule(threshold=-0.1)


def test_bad_input_messages() -> None:
    df = _synthetic(n=120)
    with pytest.raises(ValueError, match="simple-60"):
        compute_features(df, "alphabetical-45")
    with pytest.raises(ValueError, match="'volume'"):
        simple60(df.drop(columns="volume"))
    with pytest.raises(ValueError, match="'datetime'"):
        simple60(df.reset_index(drop=True))
    with pytest.raises(ValueError, match="to_datetime"):
        simple60(df.reset_index().astype({"datetime": str}))
    with pytest.raises(ValueError, match="at least 51"):
        simple60(df.iloc[:50])
