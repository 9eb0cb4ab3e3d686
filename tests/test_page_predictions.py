"""The Predictions page through AppTest: demo data, an upload, bad uploads, feature columns, blocks mode."""

from __future__ import annotations

import pandas as pd
import pytest
from conftest import REPO
from streamlit.testing.v1 import AppTest

from flag_model import ui
from flag_model.demo import synthetic_ohlcv
from flag_model.features import simple60

# Build the tiny demo before the first AppTest run, so that no run spends its timeout training it.
pytestmark = pytest.mark.usefixtures("tiny_demo_path")


def page() -> AppTest:
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120)
    at.run()
    at.switch_page("app_pages/predictions.py")
    at.run()
    assert not at.exception, at.exception
    return at


def upload(at: AppTest, name: str, frame: pd.DataFrame) -> AppTest:
    at.file_uploader(key="pred_upload").set_value((name, frame.to_csv(index=False).encode(), "text/csv"))
    at.run()
    assert not at.exception, at.exception
    return at


def metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label.startswith(label))


@pytest.fixture(scope="module")
def bars() -> pd.DataFrame:
    """Exchange-style column names and epoch-millisecond times, to exercise detection."""
    b = synthetic_ohlcv(900, seed=5)
    return b.drop(columns="datetime").rename(
        columns={
            "timestamp": "Timestamp",
            "open": "Open",
            "high": "High",
            "low": "Low",
            "close": "Close",
            "volume": "Vol",
        }
    )


def test_demo_data_without_upload():
    at = page()
    assert any("demo market" in i.value for i in at.info)
    assert ui.MARKET not in at.session_state
    assert float(metric(at, "Accuracy").rstrip("%")) > 0
    assert len(at.get("plotly_chart")) >= 7


def test_upload_runs_and_is_shared_with_other_pages(bars):
    at = upload(page(), "exchange.csv", bars)
    assert not [e.value for e in at.error if "Collapse alarm" not in e.value]  # the tiny demo is untrained
    data = at.session_state[ui.MARKET]
    name, frame = data.name, data.frame
    assert name == "exchange.csv" and data.source == "upload"
    assert list(frame.columns) == ["datetime", "timestamp", "open", "high", "low", "close", "volume"]
    assert len(frame) == len(bars) and frame["close"].tolist() == bars["Close"].tolist()
    window = at.number_input(key="pred_window").value
    at.number_input(key="pred_last").set_value(at.number_input(key="pred_last").max).run()  # the default is timed
    assert metric(at, "Scored bars") == f"{len(bars) - 50 - (window - 1) - 5:,}"
    labels = [b.label for b in at.get("download_button")]
    assert labels[-2:] == ["Predictions as CSV", "Predictions as Parquet"]
    assert len(labels) == 2 * 5  # every table: drift, confusion, per class, equity stats and the predictions
    # (the feature matrix's are drawn when its expander is open: test_hourly_data_…)
    at.radio(key="pred_mode").set_value("blocks").run()
    assert not at.exception
    assert any("look-ahead" in c.value for c in at.caption)
    at.slider(key="pred_offset_BUY").set_value(3.0)  # in a form: sent with "Apply offsets"
    next(b for b in at.button if b.label == "Apply offsets").click().run()
    assert not at.exception and any("Collapse alarm" in e.value and "BUY" in e.value for e in at.error)


def test_bad_upload_names_row_and_column(bars):
    unsorted = bars.iloc[[0, 1, 3, 2, *range(4, 300)]]
    at = upload(page(), "unsorted.csv", unsorted)
    assert any("not sorted" in e.value and "row 4" in e.value for e in at.error)
    assert ui.MARKET not in at.session_state
    next(c for c in at.checkbox if c.label.startswith("Repair")).check().run()
    assert not at.exception and any("sorted by time" in w.value for w in at.warning)
    assert ui.MARKET in at.session_state


def test_too_short_upload(bars):
    at = upload(page(), "short.csv", bars.iloc[:60])
    assert any("too few rows" in e.value for e in at.error)


def test_feature_columns_are_padded_with_a_warning(bars):
    raw = bars.rename(
        columns={
            "Timestamp": "timestamp",
            "Open": "open",
            "High": "high",
            "Low": "low",
            "Close": "close",
            "Vol": "volume",
        }
    )
    raw.insert(0, "datetime", pd.to_datetime(raw["timestamp"], unit="ms"))
    feats = simple60(raw).iloc[:, :45]
    feats = feats[sorted(feats.columns)]  # 45 alphabetical indicator columns: the mistake of DESIGN §1
    feats.insert(0, "time", raw["datetime"].iloc[50:].astype(str).to_numpy())
    at = upload(page(), "indicators.csv", feats)
    kind = next(r for r in at.radio if r.label == "Input")
    assert kind.value.startswith("OHLCV")  # never switched silently: missing OHLCV columns are named errors
    assert any("missing column 'open'" in e.value for e in at.error) and ui.MARKET not in at.session_state
    kind.set_value(next(o for o in kind.options if o.startswith("Precomputed"))).run()
    # The tiny demo is untrained: on these shifted inputs its collapse alarm may ring, which is right.
    assert not at.exception and all("Collapse alarm" in e.value for e in at.error), [e.value for e in at.error]
    assert any("15 zero columns" in w.value for w in at.warning)
    assert ui.MARKET not in at.session_state
    assert not at.get("metric")  # no prices, no labels


def test_hourly_data_shows_the_interval_notice_the_horizon_in_time_and_the_feature_matrix(bars):
    hourly = bars.assign(Timestamp=bars["Timestamp"].iloc[0] + 3_600_000 * pd.RangeIndex(len(bars)))
    at = upload(page(), "hourly.csv", hourly)
    notice = next(w.value for w in at.warning if "Bar interval differs" in w.value)
    assert "**1 h**" in notice and "**5 min**" in notice and "stored in the checkpoint" in notice
    assert "5 h here instead of 25 min" in notice
    assert at.number_input(key="pred_horizon").value == 5  # the demo checkpoint's stored rule
    assert any("5 bars (5 h)" in c.value for c in at.caption)
    assert any("training counted them as HOLD" in c.value for c in at.caption)
    assert any("Training bar interval: **5 min** — stored in the checkpoint" in c.value for c in at.sidebar.caption)
    assert "Feature matrix as CSV" not in [b.label for b in at.get("download_button")]  # drawn only when open
    at.session_state["pred_fm_open"] = True
    labels = [b.label for b in at.run().get("download_button")]
    assert "Feature matrix as CSV" in labels and "Feature matrix as Parquet" in labels
    at.switch_page("app_pages/attention.py").run()
    assert not at.exception and any("Bar interval differs" in w.value for w in at.warning)


def test_missing_volume_is_an_error_naming_the_column(bars):
    at = upload(page(), "no_volume.csv", bars.drop(columns="Vol"))
    assert any("missing column 'volume'" in e.value for e in at.error)
    assert next(r for r in at.radio if r.label == "Input").value.startswith("OHLCV")
    assert not at.get("metric") and ui.MARKET not in at.session_state


def test_feature_matrix_download_matches_the_features(bars):
    from flag_model.data import detect_columns, prepare_ohlcv
    from flag_model.ui.predictions import _raw_features

    prep = prepare_ohlcv(bars, detect_columns(bars.columns))
    table = _raw_features(("k",), "simple-60", prep.frame)
    assert list(table.columns[:2]) == ["datetime", "ret_50"] and len(table) == len(bars) - 50
    assert table["datetime"].iloc[0] == prep.frame["datetime"].iloc[50]
    pd.testing.assert_frame_equal(table.drop(columns="datetime"), simple60(prep.frame).reset_index(drop=True))
