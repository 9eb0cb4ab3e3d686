"""Pages that open quickly: Predictions scores a bounded default and keeps its result for the session; a slow
attribution shows its progress."""

from __future__ import annotations

import time

import pytest
from conftest import REPO
from streamlit.testing.v1 import AppTest

from flag_model.ui import predictions as pw

pytestmark = pytest.mark.usefixtures("tiny_demo_path")


def _open(page: str) -> AppTest:
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=180)
    at.run()
    at.switch_page(page)
    at.run()
    assert not at.exception, at.exception
    return at


def test_predictions_scores_a_bounded_default_and_keeps_it_for_the_session(monkeypatch):
    scored: list[int] = []
    real = pw.predict_features
    monkeypatch.setattr(pw, "predict_features", lambda *a, **k: scored.append(k["last"]) or real(*a, **k))
    pw._predictions.clear()
    at = _open("app_pages/predictions.py")
    default, scorable = at.number_input(key="pred_last").value, at.number_input(key="pred_last").max
    assert scorable > pw.QUICK_BARS[0]  # the tiny demo market has more bars than the smallest default
    assert pw.QUICK_BARS[0] <= default <= min(scorable, pw.QUICK_BARS[1]) and default < scorable
    assert scored == [default]
    at.switch_page("app_pages/overview.py").run()
    pw._predictions.clear()  # as if other sessions had pushed this result out of the shared cache
    at.switch_page("app_pages/predictions.py").run()
    assert not at.exception and scored == [default]  # this session kept its result: nothing scored again
    score_all = next(b for b in at.button if b.label == f"Score all {int(scorable):,} bars")
    score_all.click().run()  # more on request: every bar
    assert not at.exception and scored == [default, scorable]
    assert at.number_input(key="pred_last").value == scorable


def test_a_slow_attribution_shows_its_progress(monkeypatch):
    # faithfulness binds `attribute` when first imported: import it before the patch, or it would keep the patched
    # function for every later test (the suite's outcome would depend on test order).
    from flag_model.analysis import attribution as attr
    from flag_model.analysis import faithfulness  # noqa: F401

    seen: list[float] = []
    real = attr.attribute

    def slow(*a, progress=None, **k):
        def tick(fraction, message):
            time.sleep(0.2)  # each pass takes a while: past a second the bar appears
            seen.append(fraction)
            progress(fraction, message)

        return real(*a, progress=tick, **k)

    monkeypatch.setattr(attr, "attribute", slow)
    at = _open("app_pages/attributions.py")
    at.number_input(key="attr_steps").set_value(37).run()  # a setting no other test used: not cached
    assert not at.exception and seen and seen[-1] == 1.0
    assert not at.get("progress")  # removed when done


def test_shared_features_are_cached_by_the_exact_bars(monkeypatch):
    """Two 60,000-bar tables that differ in one close: each gets its own features (Streamlit's own hash of a frame
    this long reads a sample of 10,000 rows, so a cache keyed by it handed the first table's features to the
    second), and the digest of the values differs too; the same table again is a cache hit."""
    import numpy as np

    from flag_model import ui
    from flag_model.data import detect_columns, frame_digest, prepare_ohlcv
    from flag_model.demo import synthetic_ohlcv

    bars = synthetic_ohlcv(60_000, seed=3)
    a = prepare_ohlcv(bars, detect_columns(bars.columns)).valid_frame()
    b = a.copy()
    row = len(b) - 10
    b.loc[row, "close"] *= 1.01
    b.loc[row, "high"] = max(b.loc[row, "high"], b.loc[row, "close"])
    assert frame_digest(a) == frame_digest(a.copy()) != frame_digest(b)
    assert frame_digest(a) != frame_digest(a.rename(columns={"volume": "vol"}))
    calls = []
    compute = ui.checkpoint_features
    monkeypatch.setattr(ui, "checkpoint_features", lambda *args: calls.append(1) or compute(*args))
    fa, ka = ui.shared_features("ckpt", 60, a, {})
    fb, kb = ui.shared_features("ckpt", 60, b, {})
    assert ka != kb and not np.array_equal(fa.values, fb.values)
    assert ui.shared_features("ckpt", 60, a.copy(), {})[1] == ka and len(calls) == 2
