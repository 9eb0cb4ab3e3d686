"""simple-60 and the label rule against an independent slow oracle written straight from FEATURES.md.

The oracle below takes each 51-bar window as its own pandas frame and applies the spec's pandas calls one by
one (std, rolling, ewm, pct_change, diff, where). It shares no code with flag_model.features: a quirk that
the vectorised version gets wrong (which bar "c[-5]" is, sample std, the oldest bar's z-score, EWM adjust,
the whole window's pct std, pandas' running-sum rolling mean) shows up as a named feature on a named row.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest

from flag_model.features import (
    ACTIONS,
    FEATURE_SETS,
    SIMPLE60_DESCRIPTIONS,
    SIMPLE60_NAMES,
    SIMPLE60_QUIRKS,
    WARMUP,
    LabelRule,
    compute_features,
    compute_labels,
    feature_help,
    simple60,
)


@pytest.fixture(scope="module")
def eth(eth_csv) -> pd.DataFrame:
    """The real ETH file read the way the training pipeline read it."""
    return pd.read_csv(eth_csv, index_col="datetime", parse_dates=True)


@pytest.fixture(scope="module")
def eth_features(eth: pd.DataFrame) -> pd.DataFrame:
    return simple60(eth)


def oracle_row(win: pd.DataFrame, first_time: pd.Timestamp) -> np.ndarray:
    """FEATURES.md for one 51-bar window (DatetimeIndex, columns open..volume), as float32 (60,)."""
    o, h, l, c, v = (win[k] for k in ("open", "high", "low", "close", "volume"))  # noqa: E741
    last = lambda s: s.iloc[-1]  # noqa: E731
    f = [np.nan] * 60
    f[0] = c.iloc[-1] / c.iloc[0] - 1
    f[1] = h.max() / l.min() - 1
    f[2] = (c.iloc[-1] - o.iloc[0]) / o.iloc[0]
    for i, k in zip((3, 4, 5), (5, 10, 20)):
        f[i] = (c.iloc[-1] - c.iloc[-k]) / c.iloc[-k]  # the k-th bar from the end
    f[6] = c.std() / c.mean()
    f[7] = (h - l).mean() / c.mean()
    f[8] = v.iloc[-1] / v.mean()
    f[9] = ((c - c.mean()) / c.std()).iloc[0]
    delta = c.diff()
    gain = delta.where(delta > 0, 0)
    loss = -delta.where(delta < 0, 0)
    avg_gain, avg_loss = last(gain.rolling(14).mean()), last(loss.rolling(14).mean())
    rsi = 100.0 if avg_loss == 0 else 100 - 100 / (1 + avg_gain / avg_loss)
    f[10] = 50.0 if np.isnan(rsi) else rsi
    macd = c.ewm(span=12).mean() - c.ewm(span=26).mean()
    signal = macd.ewm(span=9).mean()
    f[11], f[12], f[13] = last(macd), last(signal), last(macd) - last(signal)
    sma = {k: last(c.rolling(k).mean()) for k in (5, 10, 20)}
    rstd = {k: last(c.rolling(k).std()) for k in (5, 10, 20)}
    f[14], f[15], f[16] = sma[5], sma[10], sma[20]
    f[17] = (c.iloc[-1] - sma[20]) / c.std()
    pct = c.pct_change()
    f[18], f[19] = pct.mean(), pct.std()
    for i, k in zip((20, 21, 22), (5, 10, 20)):
        f[i] = pct.std() * np.sqrt(k)
    f[23], f[24] = (h - l).mean(), (h - l).std()
    f[25], f[26], f[27] = rstd[5], rstd[10], rstd[20]
    f[28] = h.max() - l.min()
    f[29] = (c.iloc[-1] - sma[20]) / (2 * rstd[20])
    for i, k in zip((30, 31, 32), (5, 10, 20)):
        f[i] = last(v.rolling(k).mean())
    f[33] = v.std() / v.mean()
    f[34] = v.iloc[-1] / last(v.rolling(20).mean())
    for i, k in zip((35, 36, 37), (5, 10, 20)):
        f[i] = last((pct * v).rolling(k).mean())
    f[38] = v.max() / v.min()
    f[39] = v.iloc[-1] - v.mean()
    f[40], f[41], f[42] = (float(c.iloc[-1] > sma[k]) for k in (5, 10, 20))
    f[43] = float(sma[10] > sma[20])
    f[44], f[45] = (float(c.iloc[-1] > 0.99 * last(h.rolling(k).max())) for k in (10, 20))
    f[46], f[47] = (float(c.iloc[-1] < 1.01 * last(l.rolling(k).min())) for k in (10, 20))
    upper, lower = sma[20] + 2 * rstd[20], sma[20] - 2 * rstd[20]
    f[48] = 0.5 if upper == lower else (c.iloc[-1] - lower) / (upper - lower)
    f[49] = float(c.iloc[-2] > o.iloc[-2] and c.iloc[-1] > o.iloc[-1])
    ts = win.index[-1]
    f[50], f[51], f[52], f[53] = ts.hour / 24, ts.day_of_week / 7, ts.day / 31, ts.month / 12
    f[54], f[55] = math.sin(2 * math.pi * ts.hour / 24), math.cos(2 * math.pi * ts.hour / 24)
    f[56], f[57] = math.sin(2 * math.pi * ts.day_of_week / 7), math.cos(2 * math.pi * ts.day_of_week / 7)
    f[58] = (ts - first_time).total_seconds() / (365.25 * 24 * 3600)
    f[59] = float(ts.day_of_week >= 5)
    row = np.array(f, dtype=np.float64)
    row[~np.isfinite(row)] = 0.0
    return row.astype(np.float32)


def assert_oracle(df: pd.DataFrame, feats: pd.DataFrame, rows) -> None:
    """Every feature of every listed bar within one float32 step of the oracle (comparisons exactly)."""
    bad = []
    for t in rows:
        with np.errstate(all="ignore"):
            want = oracle_row(df.iloc[t - WARMUP : t + 1], df.index[0])
        got = feats.iloc[t - WARMUP].to_numpy()
        close = np.abs(got.astype(np.float64) - want) <= np.spacing(np.abs(want))
        close[40:50] = got[40:50] == want[40:50]
        bad += [f"row {t} #{i} {SIMPLE60_NAMES[i]}: got {got[i]!r}, spec {want[i]!r}" for i in np.flatnonzero(~close)]
    assert not bad, f"{len(bad)} values differ from FEATURES.md:\n" + "\n".join(bad[:30])


def test_names_quirks_and_registry() -> None:
    assert len(SIMPLE60_NAMES) == 60 == len(set(SIMPLE60_NAMES)) == len(SIMPLE60_DESCRIPTIONS)
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", n) for n in SIMPLE60_NAMES)
    assert (SIMPLE60_NAMES[0], SIMPLE60_NAMES[9], SIMPLE60_NAMES[-1]) == ("ret_50", "zscore_oldest", "weekend")
    assert {3, 4, 5, 9, 11, 12, 13, 20, 21, 22, 40, 58} <= set(SIMPLE60_QUIRKS)
    assert "OLDEST" in feature_help(9) and "4 bars back" in feature_help(3)
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


def _hard_rows(eth: pd.DataFrame) -> list[int]:
    """Bars whose close is within 1e-9 (relative) of an SMA: where running-sum rounding decides 40-43."""
    c = eth["close"].to_numpy()
    rows = set()
    for k in (5, 10, 20):
        sma = np.convolve(c, np.ones(k) / k, mode="full")[: len(c)]
        near = np.flatnonzero(np.abs(c - sma) <= 1e-9 * c)
        rows.update(int(t) for t in near if t >= WARMUP)
    sma10, sma20 = (np.convolve(c, np.ones(k) / k, mode="full")[: len(c)] for k in (10, 20))
    rows.update(int(t) for t in np.flatnonzero(np.abs(sma10 - sma20) <= 1e-9 * c) if t >= WARMUP)
    return sorted(rows)


def test_eth_matches_the_oracle(eth: pd.DataFrame, eth_features: pd.DataFrame) -> None:
    """A few hundred bars of the real file: the ends, random bars, and every bar where a close ties an SMA."""
    rng = np.random.default_rng(11)
    hard = _hard_rows(eth)
    assert len(hard) > 5  # 5-minute closes do tie their SMAs: the rounding quirk is exercised
    rows = sorted(
        {
            WARMUP,
            WARMUP + 1,
            len(eth) - 1,
            *range(len(eth) - 5, len(eth)),
            *rng.integers(WARMUP, len(eth), 200).tolist(),
            *hard[:150],
        }
    )
    assert_oracle(eth, eth_features, rows)


def _bars(n: int = 130, seed: int = 0, freq: str = "5min") -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    close = 100.0 * np.exp(np.cumsum(rng.normal(0.0, 0.004, n)))
    open_ = np.r_[close[0], close[:-1]]
    high = np.maximum(open_, close) * (1.0 + rng.uniform(0.0, 0.003, n))
    low = np.minimum(open_, close) * (1.0 - rng.uniform(0.0, 0.003, n))
    index = pd.date_range("2027-12-31 18:00", periods=n, freq=freq, name="datetime")
    return pd.DataFrame(
        {"open": open_, "high": high, "low": low, "close": close, "volume": rng.lognormal(6.0, 0.8, n)}, index=index
    )


def _flat(df: pd.DataFrame) -> pd.DataFrame:
    """Flat stretches at prices whose sums do not divide back exactly (x.1), one tick apart."""
    df = df.copy()
    level = round(float(df["close"].iloc[59]), 0) + 0.1
    df.iloc[60:100, :4] = level
    df.iloc[70:80, 3] = level + 0.1
    return df


def _zero_volume(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    df.iloc[55:58, 4] = 0.0
    df.iloc[90:, 4] = 0.0
    return df


def _gaps(df: pd.DataFrame) -> pd.DataFrame:
    idx = df.index.to_series()
    idx.iloc[40:] += pd.Timedelta(hours=7)
    idx.iloc[90:] += pd.Timedelta(days=2, minutes=3)
    return df.set_axis(pd.DatetimeIndex(idx.to_numpy(), name="datetime"))


def _nans(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    df.iloc[75, 3] = np.nan  # a missing close
    df.iloc[82, 4] = np.nan  # a missing volume
    df.iloc[100, 1] = np.nan  # a missing high
    df.iloc[110:113, :] = np.nan  # a missing stretch
    return df


def _spike(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    df.iloc[80, 1:4] = df.iloc[80, 1:4] * 10.0
    df.iloc[80, 4] = df.iloc[80, 4] * 1e6
    return df


def _all_flat(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(open=5.0, high=5.0, low=5.0, close=5.0, volume=0.0)


@pytest.mark.parametrize(
    "edit",
    [_flat, _zero_volume, _gaps, _nans, _spike, _all_flat],
    ids=["flat-prices", "zero-volume", "gaps", "nan", "single-spike", "all-flat-no-volume"],
)
def test_edge_cases_match_the_oracle(edit) -> None:
    df = edit(_bars())
    with np.errstate(all="ignore"):
        feats = simple60(df)
    assert feats.index.equals(df.index[WARMUP:]) and (feats.dtypes == np.float32).all()
    assert_oracle(df, feats, range(WARMUP, len(df)))


def test_documented_values_on_a_flat_market() -> None:
    feats = simple60(_all_flat(_bars(80)))
    assert (feats["rsi_14"] == 100.0).all() and (feats["bb_pctb"] == 0.5).all()
    for name in (
        "zscore_oldest",
        "bb_z20",
        "vol_rel",
        "vol_maxmin",
        "ret_std",
        "close_std_20",
        "macd",
        "macd_signal",
        "macd_hist",
    ):
        assert (feats[name] == 0.0).all(), name


def test_quirks_are_the_ones_documented() -> None:
    """Each quirk against its plain alternative on a trending window, so a 'fix' is caught."""
    df = _bars(51, seed=5)
    row = simple60(df).iloc[0]
    c = df["close"]
    assert row["ret_5"] == np.float32((c.iloc[-1] - c.iloc[-5]) / c.iloc[-5])
    assert row["ret_5"] != np.float32(c.iloc[-1] / c.iloc[-6] - 1)
    assert row["zscore_oldest"] == np.float32((c.iloc[0] - c.mean()) / c.std())
    assert row["cv_close"] != np.float32(c.std(ddof=0) / c.mean())
    assert row["retstd_5"] == np.float32(c.pct_change().std() * np.sqrt(5))
    adjust_false = c.ewm(span=12, adjust=False).mean().iloc[-1] - c.ewm(span=26, adjust=False).mean().iloc[-1]
    assert row["macd"] != np.float32(adjust_false)


def test_no_look_ahead() -> None:
    df = _bars(n=400, seed=3)
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
    assert (labels[-5:] == 1).all()  # training counted the bars without a future as HOLD
    np.testing.assert_array_equal(compute_labels(eth["close"].to_numpy()), labels)


def test_labels_small_example() -> None:
    close = np.array([100.0, 101.0, 100.1, 99.0, 99.1, 99.0, 98.0])
    # returns 1 bar ahead: +1 %, -0.89 %, -1.1 %, +0.10 %, -0.10 %, -1.01 %, (none)
    assert compute_labels(close, LabelRule(horizon=1, threshold=0.002)).tolist() == [2, 0, 0, 1, 1, 0, 1]
    # 2 bars ahead: +0.1 %, -1.98 %, -1.0 %, 0 %, -1.11 %, (none), (none)
    assert compute_labels(close, LabelRule(horizon=2, threshold=0.005)).tolist() == [1, 0, 0, 1, 0, 1, 1]
    assert compute_labels(close[:3], LabelRule(horizon=5)).tolist() == [1, 1, 1]
    # (c1 - c0)/c0 is exactly 0.002 here while c1/c0 - 1 is not: the pipeline's form decides.
    edge = np.array([1000.0, 1002.0])
    assert (edge[1] - edge[0]) / edge[0] == 0.002 and edge[1] / edge[0] - 1 != 0.002
    assert compute_labels(edge, LabelRule(horizon=1)).tolist() == [1, 1]
    assert "+0.2 %" in LabelRule().describe() and "HOLD in training" in LabelRule().describe()
    with pytest.raises(ValueError, match="horizon"):
        LabelRule(horizon=0)
    with pytest.raises(ValueError, match="threshold"):
        LabelRule(threshold=-0.1)


def test_label_rule_from_checkpoint_metadata() -> None:
    assert LabelRule.from_meta({"label_rule": {"horizon": 3, "threshold": 0.001}}) == (
        LabelRule(3, 0.001),
        "stored in the checkpoint",
    )
    assert LabelRule.from_meta({"config": {"label_rule": {"horizon": 7}}})[0] == LabelRule(7, 0.002)
    rule, source = LabelRule.from_meta({"label_rule": {"horizon": "soon"}})
    assert rule == LabelRule() and source.startswith("assumed")
    assert LabelRule.from_meta({})[1].startswith("assumed")


def test_bad_input_messages() -> None:
    df = _bars(n=120)
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
