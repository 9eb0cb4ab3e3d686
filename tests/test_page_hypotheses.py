"""AppTest: the Hypotheses page ranks the tiny demo's assumptions, and Adopt sets the sidebar to an entry."""

from __future__ import annotations

from conftest import REPO, save_bytes
from streamlit.testing.v1 import AppTest

APP = str(REPO / "app.py")


def _ranking(at: AppTest):
    return next(d.value for d in at.dataframe if "rank" in d.value.columns)


def _page() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=300)
    at.run()
    at.switch_page("app_pages/hypotheses.py").run()
    return at


def test_rank_and_adopt_on_the_demo(tiny_demo_path):
    at = _page()
    assert not at.exception and at.title[0].value == "Hypotheses"
    assert any("Cost:" in i.value and "48 combinations" in i.value for i in at.info)
    at.number_input(key="hyp_windows").set_value(48).run()
    at.multiselect(key="hyp_heads").set_value([2, 4]).run()
    at.multiselect(key="hyp_scales").set_value([1.0, 2.0]).run()
    at.button(key="hyp_run").click().run()
    assert not at.exception
    table = _ranking(at)
    assert len(table) == 2 * 2 * 2 * 2 and table["rank"].tolist() == list(range(1, 17))
    assert table["nll"].is_monotonic_increasing
    assert table["in use"].sum() == 1  # the demo's own settings (4 heads, post-norm, no mask, x1) are in the table
    assert "Best:" in at.success[0].value
    pick = next(i for i in range(16) if table.loc[i, "num_heads"] == 2 and table.loc[i, "lora_scale"] == 2.0)
    at.selectbox(key="hyp_pick").set_value(pick).run()
    at.button(key="hyp_adopt").click().run()
    assert not at.exception
    heads = next(s for s in at.sidebar.selectbox if "heads" in s.label)
    assert heads.value == 2
    assert next(n for n in at.sidebar.number_input if "LoRA" in n.label).value == 2.0
    assert _ranking(at).loc[pick, "in use"]  # the ranking is kept and marks the adopted entry
    at.switch_page("app_pages/overview.py").run()  # the adopted assumptions are what the other pages use
    config = at.dataframe[0].value
    assert config.loc[config["field"] == "num_heads", "value"].item() == "2"


def test_overview_suggests_the_page_when_heads_are_not_stored(tiny_demo_path, tiny_state_dict):
    at = AppTest.from_file(APP, default_timeout=300)
    at.run()
    assert not any("Hypotheses" in i.value for i in at.info)  # the demo stores its head count
    at.sidebar.radio(key="ckpt_source").set_value("Upload").run()
    at.sidebar.file_uploader(key="ckpt_upload").upload(
        "bare.pt", save_bytes(tiny_state_dict), "application/octet-stream"
    ).run()
    assert not at.exception
    assert any("does not name the head count" in i.value for i in at.info)
    at.switch_page("app_pages/hypotheses.py").run()
    assert not at.exception and any("Cost:" in i.value for i in at.info)
