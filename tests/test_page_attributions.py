"""AppTest runs of the Attributions page on the tiny demo (conftest sets FLAG_TRADER_DEMO_SIZE=tiny)."""

from __future__ import annotations

import pytest
from conftest import REPO
from streamlit.testing.v1 import AppTest

pytestmark = pytest.mark.filterwarnings("ignore:Setting forward, backward hooks")


@pytest.fixture
def page(tiny_demo_path) -> AppTest:
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=180)
    at.switch_page("app_pages/attributions.py")  # before the first run, so the sidebar is kept
    at.run()
    assert not at.exception, at.exception
    return at


def test_default_view_shows_ig_with_its_completeness_badge(page):
    assert page.title[0].value == "Attributions"
    assert page.selectbox(key="attr_method").value == "Integrated Gradients"
    assert len(page.get("plotly_chart")) == 4  # probabilities, heatmap, per-feature, per-time
    assert [m.label for m in page.metric][1:3] == ["f(baseline)", "Σ attributions"]
    assert any("Completeness good" in s.value for s in page.success)


def test_other_methods_explain_their_trust(page):
    page.selectbox(key="attr_method").select("DeepLift").run()
    assert not page.exception, page.exception
    badges = [e.value for e in [*page.success, *page.warning, *page.error]]
    assert any("relative delta" in b for b in badges)
    assert any("GELU" in c.value for c in page.caption)
    page.selectbox(key="attr_method").select("Occlusion").run()
    assert not page.exception, page.exception
    assert any("no completeness check" in i.value for i in page.info)
    page.selectbox(key="attr_class").select("SELL").run()
    assert not page.exception, page.exception
    assert page.metric[0].label == "f(x): logit of SELL"


def test_agreement_and_global_importance_with_download(page):
    page.toggle(key="attr_compare").set_value(True).run()
    assert not page.exception, page.exception
    assert len(page.get("plotly_chart")) == 6
    page.slider(key="attr_count").set_value(30)
    page.button(key="attr_global").click().run()
    assert not page.exception, page.exception
    assert len(page.get("plotly_chart")) == 8
    assert any("30 windows" in c.value for c in page.caption)
    labels = [b.proto.label for b in page.get("download_button")]
    assert labels[:2] == ["Time × feature attributions as CSV", "Time × feature attributions as Parquet"]
    assert labels[-2:] == ["Download CSV", "Download Parquet"]  # the global importance table
