"""Settings that stick: every settings widget of every page is kept across page switches, no trigger widget is
(Streamlit refuses to set those), the current data stays with the session, and ranges clamp kept values."""

from __future__ import annotations

from pathlib import Path

import pytest
from browser_util import app_pages
from conftest import REPO
from streamlit.testing.v1 import AppTest

from flag_model.demo import synthetic_ohlcv
from flag_model.ui import session

pytestmark = pytest.mark.usefixtures("tiny_demo_path")
SETTINGS = (
    "slider",
    "select_slider",
    "selectbox",
    "multiselect",
    "number_input",
    "radio",
    "toggle",
    "checkbox",
    "text_input",
    "date_input",
    "time_input",
    "color_picker",
    "text_area",
)
TRIGGERS = ("button", "download_button", "file_uploader")


def start(page: str | None = None) -> AppTest:
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=180)
    at.run()
    if page:
        at.switch_page(page)
        at.run()
    assert not at.exception, at.exception
    return at


@pytest.mark.parametrize("spec", app_pages(), ids=lambda p: Path(p.file).stem)
def test_every_settings_widget_is_kept_and_no_trigger_is(spec):
    at = start(spec.file)
    registered = at.session_state[session._KEPT_KEYS]
    settings = [w for kind in SETTINGS for w in at.get(kind)]
    assert settings, "a page without settings widgets?"
    for w in settings:
        assert w.key in registered, f"{spec.title}: {type(w).__name__} '{w.label}' is not kept (use ui.session.keep)"
    for kind in TRIGGERS:
        for w in at.get(kind):
            assert getattr(w, "key", None) not in registered, f"{spec.title}: trigger {kind} '{w.key}' would be set"


def test_settings_and_uploaded_data_survive_a_round_trip_through_other_pages():
    at = start("app_pages/predictions.py")
    bars = synthetic_ohlcv(700, seed=3)
    at.file_uploader(key="pred_upload").set_value(("round_trip.csv", bars.to_csv(index=False).encode(), "text/csv"))
    at.run()
    at.radio(key="pred_mode").set_value("blocks").run()
    at.number_input(key="pred_fee").set_value(7.5).run()
    assert not at.exception
    for page in ("app_pages/attention.py", "app_pages/overview.py"):
        at.switch_page(page).run()
        assert not at.exception
        entry = " ".join(c.value for c in at.sidebar.caption)
        assert "round\\_trip\\.csv · 700 rows · 5 min bars · upload" in entry, entry
    at.switch_page("app_pages/attention.py").run()
    assert "round\\_trip\\.csv" in " ".join(c.value for c in at.caption)  # Attention uses the upload, not the demo
    at.slider(key="attn_length").set_value(16).run()
    at.switch_page("app_pages/predictions.py").run()
    assert not at.exception
    assert not any("demo market" in i.value for i in at.info)
    assert any("uploaded earlier in this session" in c.value for c in at.caption)
    assert at.radio(key="pred_mode").value == "blocks" and at.number_input(key="pred_fee").value == 7.5
    at.switch_page("app_pages/attention.py").run()
    assert at.slider(key="attn_length").value == 16
    at.switch_page("app_pages/predictions.py").run()
    next(b for b in at.button if b.label == "Forget it").click().run()
    assert any("demo market" in i.value for i in at.info)
    assert session.MARKET not in at.session_state


def test_a_kept_value_outside_a_new_range_is_clamped():
    """k of the last-k share is at most the window length: a shorter window clamps it (Streamlit alone would
    reset it to its minimum)."""
    at = start("app_pages/attention.py")
    at.session_state["attn_tab"] = "Head statistics"  # a lazy tab: drawn only when open
    at.slider(key="attn_length").set_value(32).run()
    at.number_input(key="attn_last_k").set_value(30).run()
    at.slider(key="attn_length").set_value(12).run()
    assert not at.exception and at.number_input(key="attn_last_k").value == 12
