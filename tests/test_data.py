"""Reading, validating and featurising uploads; drift; windows; labels on the real ETH file."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest

from flag_model.data import (
    ColumnMapping,
    DataError,
    RunningMoments,
    bar_interval,
    check_interval,
    check_window,
    checkpoint_features,
    column_features,
    default_window,
    detect_columns,
    drift_table,
    format_timedelta,
    horizon_text,
    iter_table_chunks,
    parse_times,
    prepare_features,
    prepare_ohlcv,
    read_table,
    rolling_windows,
    training_interval,
)
from flag_model.demo import synthetic_ohlcv
from flag_model.features import SIMPLE60_NAMES, LabelRule, compute_labels, simple60

OHLCV = ColumnMapping("datetime", "open", "high", "low", "close", "volume")


@pytest.fixture(scope="module")
def bars() -> pd.DataFrame:
    return synthetic_ohlcv(400, seed=3)


def as_csv_frame(df: pd.DataFrame) -> pd.DataFrame:
    """What read_table gives for this frame written as CSV (strings stay strings)."""
    return read_table(df.to_csv(index=False).encode(), "x.csv")


@pytest.mark.parametrize(
    "names, expected",
    [
        (
            ["datetime", "timestamp", "open", "high", "low", "close", "volume"],
            ColumnMapping("datetime", "open", "high", "low", "close", "volume"),
        ),
        (
            ["Date", "Open", "High", "Low", "Close", "Volume"],
            ColumnMapping("Date", "Open", "High", "Low", "Close", "Volume"),
        ),
        (["t", "o", "h", "l", "c", "v"], ColumnMapping("t", "o", "h", "l", "c", "v")),
        (
            ["Timestamp", "open_price", "HIGH", "low", "Price", "Vol"],
            ColumnMapping("Timestamp", "open_price", "HIGH", "low", "Price", "Vol"),
        ),
        (["time", "close"], ColumnMapping("time", None, None, None, "close", None)),
    ],
)
def test_detect_columns(names, expected):
    assert detect_columns(names) == expected


def test_epoch_seconds_milliseconds_and_strings_agree(bars):
    ms = bars["timestamp"]
    for values, fmt in ((ms, "epoch ms"), (ms // 1000, "epoch s"), (bars["datetime"].astype(str), "date strings")):
        times, found = parse_times(values)
        assert found == fmt
        np.testing.assert_array_equal(times, bars["datetime"].to_numpy())


def test_prepare_ohlcv_renamed_columns(bars):
    df = bars.drop(columns="datetime").rename(
        columns={"timestamp": "Time", "open": "Open", "close": "Price", "volume": "Vol"}
    )
    prep = prepare_ohlcv(df, detect_columns(df.columns))
    assert prep.ok and not prep.issues and prep.time_format == "epoch ms"
    assert list(prep.frame.columns) == ["datetime", "timestamp", "open", "high", "low", "close", "volume"]
    pd.testing.assert_frame_equal(prep.frame, bars[prep.frame.columns].reset_index(drop=True), check_dtype=False)


def only_error(prep, column):
    assert not prep.ok and prep.frame is None
    errors = prep.errors
    assert errors, prep.issues
    hit = [e for e in errors if e.column == column]
    assert hit, errors
    return hit[0]


def test_non_numeric_value_names_column_and_row(bars):
    df = bars.astype({"close": object})
    df.loc[41, "close"] = "n/a?"
    e = only_error(prepare_ohlcv(as_csv_frame(df), OHLCV), "close")
    assert e.row == 42 and "'close'" in e.message and "row 42" in e.message and "n/a?" in e.message


def test_missing_value_runs(bars):
    df = bars.copy()
    df.loc[10:12, "volume"] = np.nan
    df.loc[100:107, "volume"] = np.nan
    e = only_error(prepare_ohlcv(df, OHLCV), "volume")
    assert (
        e.row == 11 and "11 missing" in e.message and "rows 11–13" in e.message and "rows 101–108 (8 rows)" in e.message
    )
    fixed = prepare_ohlcv(df, OHLCV, repair=True)
    assert fixed.ok and fixed.frame["volume"].iloc[100] == df["volume"].iloc[99]
    assert any(w.column == "volume" for w in fixed.warnings)


def test_unsorted_times(bars):
    df = bars.iloc[[0, 1, 2, 4, 3, *range(5, 200)]]
    e = only_error(prepare_ohlcv(df, OHLCV), "datetime")
    assert e.row == 5 and "not sorted" in e.message and "row 5" in e.message
    fixed = prepare_ohlcv(df, OHLCV, repair=True)
    assert fixed.ok and fixed.frame["datetime"].is_monotonic_increasing


def test_duplicate_times(bars):
    df = bars.copy()
    df.loc[30, "datetime"] = df.loc[29, "datetime"]
    e = only_error(prepare_ohlcv(df, OHLCV), "datetime")
    assert e.row == 31 and "duplicate" in e.message
    fixed = prepare_ohlcv(df, OHLCV, repair=True)
    assert fixed.ok and len(fixed.frame) == len(df) - 1
    assert fixed.frame["close"].iloc[29] == df["close"].iloc[30]  # the last row of a duplicated time is kept


def test_unparseable_time(bars):
    df = bars.astype({"datetime": str})
    df.loc[7, "datetime"] = "yesterday-ish"
    e = only_error(prepare_ohlcv(df, OHLCV), "datetime")
    assert e.row == 8 and "yesterday-ish" in e.message
    assert prepare_ohlcv(df, OHLCV, repair=True).ok


def test_gaps_are_warnings(bars):
    df = bars.drop(index=range(50, 56))
    prep = prepare_ohlcv(df, OHLCV)
    assert prep.ok
    (w,) = prep.warnings
    assert w.column == "datetime" and w.row == 50 and "gap" in w.message and "35:00" in w.message


def test_missing_role_and_bad_prices(bars):
    prep = prepare_ohlcv(bars.drop(columns="volume"), detect_columns(bars.drop(columns="volume").columns))
    assert not prep.ok and "'volume'" in prep.errors[0].message and "Column mapping" in prep.errors[0].message
    df = bars.copy()
    df.loc[99, "low"] = 0.0
    e = only_error(prepare_ohlcv(df, OHLCV), "low")
    assert e.row == 100 and "<= 0" in e.message


def test_too_few_rows_and_window_bounds():
    e = check_window(30, 64, 256, warmup=50)
    assert e is not None and "64" in e.message and "30" in e.message and "114 bars" in e.message
    assert "max_length" in check_window(500, 300, 256).message
    assert check_window(64, 64, 256) is None


def test_feature_columns_count_and_padding(bars):
    feats = simple60(bars).iloc[:, :45].assign(datetime=bars["datetime"].iloc[50:].to_numpy())
    too_many = prepare_features(feats, list(feats.columns[:45]) * 2, "datetime", state_dim=60)
    assert not too_many.ok and "wrong feature count: 90" in too_many.errors[0].message
    prep = prepare_features(feats, list(feats.columns[:45]), "datetime", state_dim=60)
    assert prep.ok and "15 zero columns" in prep.warnings[0].message
    fm = column_features(prep.frame, prep.feature_columns, {}, 60, "none")
    assert fm.values.shape == (len(feats), 60) and fm.n_padded == 15
    assert not fm.values[:, 45:].any() and fm.names[45:] == tuple(f"pad_{i}" for i in range(15))
    assert any("15 zero columns" in w for w in fm.warnings)
    assert np.isnan(fm.close).all()
    bad = feats.astype({"rsi_14": object})
    bad.loc[bad.index[3], "rsi_14"] = "x"
    e = only_error(prepare_features(as_csv_frame(bad), ["rsi_14"], "datetime", 60), "rsi_14")
    assert e.row == 4


def test_checkpoint_features_normalisation_and_padding(bars):
    raw = simple60(bars).to_numpy(np.float64)
    mean, std = raw.mean(0) + 1.0, raw.std(0) + 2.0
    meta = {"feature_mean": mean.tolist(), "feature_std": std.tolist()}
    fm = checkpoint_features(bars, meta, 60, "checkpoint")
    np.testing.assert_allclose(fm.values, ((raw - mean) / std).astype(np.float32), rtol=1e-6)
    fm = checkpoint_features(bars, {}, 60, "checkpoint")
    assert fm.normalisation == "none" and "no feature statistics" in fm.warnings[0]
    fm = checkpoint_features(bars, {}, 64, "data")
    assert fm.n_padded == 4 and any("4 zero columns" in w for w in fm.warnings)
    live = fm.values[:, :60][:, raw.std(0) > 0]
    np.testing.assert_allclose(live.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(live.std(0), 1, atol=1e-3)
    assert not fm.values[:, 60:].any()


def test_origin_makes_chunk_features_equal_whole_file(bars):
    whole = checkpoint_features(bars, {}, 60, "none")
    part = bars.iloc[150:].reset_index(drop=True)
    chunk = checkpoint_features(part, {}, 60, "none", origin=bars["datetime"].iloc[0])
    np.testing.assert_array_equal(chunk.values, whole.values[150:])  # bar 200 on: feature row 150


def test_drift_flags_zero_columns_scale_jumps_and_names(bars):
    fm = checkpoint_features(bars, {}, 64, "none")
    raw_std = fm.raw_std[:60]
    meta = {
        "feature_mean": fm.raw_mean[:60].tolist() + [0.0] * 4,
        "feature_std": (raw_std / 50).tolist() + [1.0] * 4,
        "feature_names": list(SIMPLE60_NAMES[:59]) + ["other", "a", "b", "c", "d"],
    }
    table = drift_table(fm, meta)
    assert len(table) == 64
    assert table["flags"].iloc[60:].str.contains("zero padding").all()
    scaled = table.iloc[:60][raw_std > 0]
    assert scaled["flags"].str.contains("scale ×50").all()
    assert "name differs" in table["flags"].iloc[59]
    np.testing.assert_allclose(table["std ratio"].iloc[:60][raw_std > 0], 50, rtol=1e-9)


def test_read_table_csv_parquet_and_errors(tmp_path, bars):
    buf = io.BytesIO()
    bars.to_parquet(buf, index=False)
    from_parquet = read_table(buf.getvalue(), "no-extension")  # recognised by its magic bytes
    pd.testing.assert_frame_equal(from_parquet, bars)
    path = tmp_path / "bars.csv"
    bars.to_csv(path, index=False)
    assert len(read_table(path)) == len(bars)
    chunks = list(iter_table_chunks(path, 150))
    assert [len(c) for c in chunks] == [150, 150, 100]
    with pytest.raises(DataError, match="no file"):
        read_table(tmp_path / "missing.csv")
    with pytest.raises(DataError, match="Parquet"):
        read_table(b"PAR1 not really", "x.parquet")
    with pytest.raises(DataError, match="no data rows"):
        read_table(b"a,b\n", "empty.csv")


def test_running_moments_equal_numpy():
    x = np.random.default_rng(0).normal(3000, 5, (1000, 4))
    rm = RunningMoments()
    for part in np.array_split(x, 7):
        rm.update(part)
    mean, std = rm.result()
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(std, x.std(0), rtol=1e-9)


def test_rolling_windows_is_a_view():
    v = np.arange(20 * 3, dtype=np.float32).reshape(20, 3)
    w = rolling_windows(v, 5, 5)
    assert w.shape == (4, 5, 3) and np.shares_memory(w, v)
    np.testing.assert_array_equal(w[1], v[5:10])
    with pytest.raises(ValueError, match="at least 21"):
        rolling_windows(v, 21)


def test_default_window():
    assert default_window({"config": {"window": 64}}, 256) == 64
    assert default_window({"window": 300}, 256) == 256
    assert default_window({}, 32) == 32 and default_window({}, 256) == 64


def test_labels_on_the_real_eth_file(eth_csv):
    """DESIGN §5: 51,852 bars; labels for rows 50+ are 12,754 SELL / 25,699 HOLD / 13,349 BUY."""
    df = read_table(eth_csv)
    prep = prepare_ohlcv(df, detect_columns(df.columns))
    assert prep.ok and not prep.issues and len(prep.frame) == 51_852
    labels = compute_labels(prep.frame["close"].to_numpy(), LabelRule())[50:]
    assert len(labels) == 51_802
    assert np.bincount(labels).tolist() == [12_754, 25_699, 13_349]


def test_missing_ohlcv_column_is_an_error_naming_it(bars):
    df = bars.drop(columns="volume")
    prep = prepare_ohlcv(df, detect_columns(df.columns))
    assert not prep.ok and prep.frame is None
    (err,) = prep.errors
    assert err.column == "volume" and "missing column 'volume'" in err.message
    assert "Precomputed feature columns" in err.message  # the other mode is named, never switched to


def test_bar_interval_median_and_gaps():
    times = pd.date_range("2025-03-01", periods=200, freq="1h").delete([20, 21, 22, 100])
    bi = bar_interval(pd.Series(times).astype(str).pipe(pd.to_datetime))
    assert bi.median == pd.Timedelta(hours=1) and bi.text == "1 h" and bi.n_bars == 196
    assert bi.gaps["after"].tolist() == [times[19], times[96]]  # positions after the deletions
    assert bi.gaps["gap"].tolist() == [pd.Timedelta(hours=4), pd.Timedelta(hours=2)]
    assert bi.gaps["missing bars"].tolist() == [3, 1]
    assert bar_interval(times[:1]).median is None
    assert [format_timedelta(pd.Timedelta(x)) for x in ("5min", "1h", "1D", "2D", "30s", "90s")] == [
        "5 min",
        "1 h",
        "1 day",
        "2 days",
        "30 s",
        "90 s",
    ]


def test_training_interval_stored_or_assumed():
    assert training_interval({"bar_interval": "15min"}) == (pd.Timedelta(minutes=15), "stored in the checkpoint")
    assert training_interval({"config": {"bar_interval": 3600}})[0] == pd.Timedelta(hours=1)
    for meta in ({}, {"bar_interval": "soon"}, {"bar_interval": -5}, {"bar_interval": True}):
        td, source = training_interval(meta)
        assert td == pd.Timedelta(minutes=5) and source.startswith("assumed"), meta


def test_interval_check_says_what_differs():
    hourly = pd.date_range("2025-03-01", periods=100, freq="1h")
    check = check_interval(hourly, {}, horizon=5)
    assert not check.matches and check.training_source.startswith("assumed")
    msg = check.message.replace("**", "")
    assert "every 1 h" in msg and "5 min bars (assumed" in msg and "12×" in msg
    assert "5 h here instead of 25 min" in msg
    same = check_interval(pd.date_range("2025-03-01", periods=100, freq="5min"), {"bar_interval": "5min"}, 5)
    assert same.matches and "as in training" in same.message
    assert horizon_text(5, pd.Timedelta(hours=1)) == "5 bars (5 h)" and horizon_text(3, None) == "3 bars"
