"""AppTest runs of the LoRA and Attention pages on the tiny demo (conftest sets FLAG_TRADER_DEMO_SIZE=tiny)."""

from __future__ import annotations

import datetime

import pytest
from conftest import REPO
from streamlit.testing.v1 import AppTest

from flag_model import load_checkpoint


@pytest.fixture
def open_page(tiny_demo_path):
    def _open(page: str) -> AppTest:
        # switch before the first run: after a switch in a running session AppTest drops the sidebar
        at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120)
        at.switch_page(page)
        at.run()
        assert not at.exception, at.exception
        return at

    return _open


def texts(at: AppTest) -> str:
    parts = [e.value for e in [*at.markdown, *at.caption, *at.info, *at.warning]]
    return "\n".join(str(p) for p in parts)


def test_lora_page_heatmap_table_spectra_and_ablation(open_page):
    at = open_page("app_pages/lora.py")
    assert at.title[0].value == "LoRA adapters"
    assert at.selectbox(key="lora_metric").value == "delta_fro"
    assert len(at.get("plotly_chart")) == 2  # heatmap + spectra of the first adapter
    assert "12 adapters of rank 4" in texts(at)
    cell = at.selectbox(key="lora_cell")
    cell.select("transformer_blocks.1.ffn.3").run()
    assert not at.exception, at.exception
    at.selectbox(key="lora_metric").select("amplification").run()
    assert not at.exception, at.exception
    at.main.button[0].click().run()  # the form's "Run ablation"
    assert not at.exception, at.exception
    assert "Decisions that change" in [m.label for m in at.metric]
    assert at.metric[3].value == "12 / 12"
    assert len(at.get("plotly_chart")) == 4
    assert [*at.dataframe[-1].value["action"]] == ["SELL", "HOLD", "BUY"]


def test_lora_page_ablating_one_block(open_page):
    at = open_page("app_pages/lora.py")
    at.main.multiselect[0].set_value([1])
    at.main.multiselect[1].set_value(["attention.q_proj", "ffn.0"])
    at.main.button[0].click().run()
    assert not at.exception, at.exception
    assert at.metric[3].value == "2 / 12"


def test_attention_page_shows_assumptions_maps_and_stats(open_page):
    at = open_page("app_pages/attention.py")
    assert at.title[0].value == "Attention"
    info = texts(at)
    assert "4 heads" in info and "no mask" in info and "post-norm" in info
    assert len(at.get("plotly_chart")) == 1  # lazy tabs: only the open one (the grid) is computed and drawn
    for tab, n_charts in (("Zoom", 1), ("Rollout", 2), ("Head statistics", 4 + 1)):  # four heatmaps, future lines
        at.session_state["attn_tab"] = tab
        at.run()
        assert not at.exception and len(at.get("plotly_chart")) == n_charts, tab
    when = at.slider(key="attn_when")  # the window is chosen by the date and time of its decision bar
    when.set_value(when.value - datetime.timedelta(hours=3)).run()
    assert not at.exception, at.exception
    assert "bars " in texts(at)
    next(r for r in at.main.radio if r.key == "attn_one_queries").set_value("deciding").run()
    assert not at.exception and "uniform: 0.00" in texts(at) + " ".join(
        c.proto.spec for c in at.get("plotly_chart")
    )  # the deciding bar has no future keys
    at.session_state["attn_tab"] = "Over many windows"
    next(b for b in at.run().main.button if b.label.startswith("Compute")).click().run()
    assert not at.exception, at.exception
    assert "Mean over 64 windows of length 32" in texts(at)


def test_attention_page_follows_the_assumptions(tiny_demo_path):
    # Preset the sidebar widgets by key: under switch_page AppTest re-runs only the page script, so a
    # changed sidebar widget would not reach the next run.
    tag = load_checkpoint(tiny_demo_path).digest[:12]
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120)
    at.switch_page("app_pages/attention.py")
    at.session_state[f"heads_{tag}"] = 2
    at.session_state[f"causal_{tag}"] = True
    at.run()
    assert not at.exception, at.exception
    info = texts(at)
    assert "2 heads" in info and "causal mask" in info
    grid = at.get("plotly_chart")[0]
    assert '"head 1"' in grid.proto.spec and '"head 2"' not in grid.proto.spec
