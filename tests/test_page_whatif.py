"""AppTest runs of the What-if page and the Attributions page's "How faithful" panel on the tiny demo."""

from __future__ import annotations

import pytest
from conftest import REPO
from streamlit.testing.v1 import AppTest

from flag_model.analysis import whatif as wi

pytestmark = pytest.mark.filterwarnings("ignore:Setting forward, backward hooks")


def open_page(path: str) -> AppTest:
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=300)
    at.switch_page(path)  # before the first run, so the sidebar is kept
    at.run()
    assert not at.exception, at.exception
    return at


def test_whatif_edit_flip_and_stability(tiny_demo_path):
    at = open_page("app_pages/whatif.py")
    assert at.title[0].value == "What-if"
    assert [m.label for m in at.metric][:2] == ["Decision", "Cells changed"]
    assert at.metric[1].value == "32"  # the default edit: one feature over the whole 32-bar window
    at.selectbox(key="wi_edit_op").select("add").run()
    at.number_input(key="wi_edit_value").set_value(2.0)
    at.slider(key="wi_edit_time").set_value((-3, 0)).run()
    assert not at.exception, at.exception
    assert at.metric[1].value == "4"
    at.selectbox(key="wi_edit_op").select("multiply").run()
    at.number_input(key="wi_edit_value").set_value(1e39).run()  # refused with a message, the page survives
    assert not at.exception, at.exception
    assert any("Cannot apply this edit" in e.value for e in at.error)
    at.selectbox(key="wi_edit_op").select("copy from another window").run()
    assert not at.exception, at.exception
    assert at.slider(key="wi_edit_src_when")  # the other window, chosen by its decision time

    at.number_input(key="wi_iter").set_value(100)
    at.button(key="wi_search").click().run()
    assert not at.exception, at.exception
    assert any("Verified: a plain forward" in s.value for s in at.success)
    assert any("Random directions with the same budget" in c.value for c in at.caption)
    assert [m.label for m in at.metric][2:5] == ["Cells edited", "L1 (input units)", "L∞ (input units)"]
    assert any(b.proto.label == "Edited cells CSV" for b in at.get("download_button"))

    charts = len(at.get("plotly_chart"))
    at.slider(key="wi_samples").set_value(8)
    at.button(key="wi_stable").click().run()
    assert not at.exception, at.exception
    assert len(at.get("plotly_chart")) == charts + 1
    at.slider(key="wi_count").set_value(10)
    at.toggle(key="wi_many").set_value(True).run()
    assert not at.exception, at.exception
    assert any("settings changed" in i.value for i in at.info)  # not recomputed silently
    at.button(key="wi_stable").click().run()
    assert not at.exception, at.exception
    assert len(at.get("plotly_chart")) == charts + 1  # the same stability chart, now with two lines
    curve = at.dataframe[-1].value
    assert list(curve["k"]) == list(wi.DEFAULT_KS) and curve["share unchanged"].between(0, 1).all()


def test_attributions_how_faithful_panel(tiny_demo_path):
    at = open_page("app_pages/attributions.py")
    assert any(h.value == "How faithful" for h in at.subheader)
    at.multiselect(key="faith_methods").set_value(["Integrated Gradients", "Saliency"])
    at.number_input(key="faith_random").set_value(2)
    at.number_input(key="faith_steps").set_value(8)
    at.button(key="faith_run").click().run()
    assert not at.exception, at.exception
    table = at.dataframe[-1].value
    assert list(table["method"]) == ["Integrated Gradients", "Saliency"]
    assert {"deletion area", "random deletion area", "infidelity", "sensitivity max"} <= set(table.columns)
    charts = len(at.get("plotly_chart"))
    at.button(key="faith_rand").click().run()
    assert not at.exception, at.exception
    assert len(at.get("plotly_chart")) == charts + 1
