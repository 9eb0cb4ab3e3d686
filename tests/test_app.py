"""AppTest: the app starts on the (tiny) demo, shows the Overview, and survives bad uploads."""

from __future__ import annotations

from conftest import REPO, save_bytes
from streamlit.testing.v1 import AppTest

APP = str(REPO / "app.py")


def _start() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    return at


def test_app_starts_on_demo_overview(tiny_demo_path):
    at = _start()
    assert not at.exception
    assert at.title[0].value == "Overview"
    assert any("tensors loaded strictly" in s.value for s in at.sidebar.success)
    assert [m.label for m in at.metric][:2] == ["Tensors", "Parameters"]
    assert at.metric[0].value == "63"  # tiny demo: 2 blocks x 28 + 7
    assert any("heads" in s.label for s in at.sidebar.selectbox)


def _upload(at: AppTest, data: bytes, name: str) -> AppTest:
    at.sidebar.radio(key="ckpt_source").set_value("Upload").run()
    at.sidebar.file_uploader(key="ckpt_upload").upload(name, data, "application/octet-stream").run()
    return at


def test_bad_upload_shows_error_and_app_keeps_working(tiny_demo_path):
    at = _upload(_start(), b"this is not a checkpoint", "flag_trader_best.pt")
    assert not at.exception
    errors = " ".join(e.value for e in at.sidebar.error)
    assert "not a checkpoint" in errors and "text file" in errors
    at.sidebar.radio(key="ckpt_source").set_value("Demo").run()
    assert not at.exception and at.metric[0].value == "63"


def test_upload_of_a_file_that_does_not_fit_is_red(tiny_demo_path, tiny_state_dict):
    sd = {("encoder." + k): v for k, v in tiny_state_dict.items()}
    at = _upload(_start(), save_bytes(sd), "other.pt")
    assert not at.exception
    assert any("does not fit" in e.value for e in at.sidebar.error)
    assert any("does not load into the reconstruction" in e.value for e in at.error)


def test_upload_and_changed_assumption(tiny_demo_path, tiny_ckpt_bytes):
    at = _upload(_start(), tiny_ckpt_bytes, "good.pt")
    assert not at.exception
    assert any("loaded strictly" in s.value for s in at.sidebar.success)
    assert "good.pt" in at.success[0].value.replace("\\", "")  # the name is markdown-escaped
    status = next(s.value for s in at.sidebar.success if "loaded strictly" in s.value)
    assert "4 heads (stored) · post-norm (assumed) · no mask (assumed)" in status
    heads = next(s for s in at.sidebar.selectbox if "heads" in s.label)
    heads.set_value(2).run()
    at.sidebar.toggle[0].set_value(True).run()  # the causal mask
    assert not at.exception
    status = next(s.value for s in at.sidebar.success if "loaded strictly" in s.value)
    assert "2 heads (set) · post-norm (assumed) · causal mask (set)" in status  # the status follows the change
    table = at.dataframe[0].value
    assert table.loc[table["field"] == "num_heads", "value"].item() == "2"
