"""AppTest for the Tensor tree and Architecture check pages: demo, second checkpoint, broken files, one-click fix."""

from __future__ import annotations

from conftest import REPO, save_bytes
from streamlit.testing.v1 import AppTest

from flag_model.layouts import apply_fixes

APP = str(REPO / "app.py")


def _page(path: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.switch_page(path)
    at.run()
    assert not at.exception, at.exception
    return at


def _upload(at: AppTest, name: str, data: bytes) -> AppTest:
    """Open `data` as the main checkpoint through the sidebar upload, staying on the current page."""
    at.sidebar.radio(key="ckpt_source").set_value("Upload").run()
    at.sidebar.file_uploader(key="ckpt_upload").upload(name, data).run()
    assert not at.exception, at.exception
    return at


def _texts(elements) -> str:
    return " ".join(e.value for e in elements).replace("\\", "")  # pages escape markdown in library text


def test_tensor_tree_on_demo_says_base_is_untrained_init(tiny_demo_path):
    at = _page("app_pages/tensors.py")
    assert at.title[0].value == "Tensor tree"
    assert at.metric[0].value == "63"
    table = at.dataframe[0].value
    assert len(table) == 63 and {"base", "lora_A", "lora_B", "norm", "embedding", "positional", "head"} <= set(
        table["role"]
    )
    at.selectbox(key="tensors_pick").set_value("transformer_blocks.0.attention.q_proj.base.weight").run()
    assert not at.exception
    assert "looks like untrained initialisation" in _texts(at.info)
    at.selectbox(key="tensors_pick").set_value("transformer_blocks.0.attention.q_proj.lora.lora_A").run()
    assert not at.exception
    assert "untrained initialisation" not in _texts(at.info)


def test_tensor_tree_search_and_colour(tiny_demo_path):
    at = _page("app_pages/tensors.py")
    at.text_input(key="tensors_query").set_value("lora_B").run()
    assert not at.exception
    assert set(at.dataframe[0].value["role"]) == {"lora_B"} and len(at.dataframe[0].value) == 12
    at.selectbox(key="tensors_color").set_value("fro_norm").run()
    assert not at.exception


def test_tensor_tree_second_checkpoint_and_broken_one(tiny_demo_path, tiny_state_dict):
    from flag_model import load_checkpoint

    sd = {k: v.clone() for k, v in load_checkpoint(tiny_demo_path).state_dict.items()}
    sd["transformer_blocks.1.ffn.0.lora.lora_B"] *= 2
    del sd["action_head.bias"]
    sd["extra.weight"] = sd["output_norm.weight"].clone()
    at = _page("app_pages/tensors.py")
    at.file_uploader(key="tensors_second_upload").upload("second.pt", save_bytes(sd)).run()
    assert not at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Changed"] == "1" and metrics["Added"] == "1" and metrics["Removed"] == "1"
    assert "added" in _texts(at.warning)

    at.file_uploader(key="tensors_second_upload").set_value(("broken.pt", b"PK\x03\x04 truncated", "x")).run()
    assert not at.exception
    assert "Could not open the second checkpoint" in _texts(at.error)


def test_architecture_demo_is_native_and_loads(tiny_demo_path):
    at = _page("app_pages/architecture.py")
    assert at.title[0].value == "Architecture check"
    assert "This file is the FLAG-TRADER LoRA layout: 63/63 keys" in _texts(at.success)
    assert "loads strictly into this target" in _texts(at.success)
    at.selectbox(key="arch_target").set_value("peft").run()
    assert not at.exception
    assert "0/63 target keys matched" in _texts(at.error)
    assert "PEFT layout" in _texts(at.markdown)
    assert len(at.dataframe) >= 1


def test_architecture_wrong_hidden_size_is_explained(tiny_demo_path):
    at = _page("app_pages/architecture.py")
    key = next(w.key for w in at.number_input if w.key.startswith("arch_d_"))
    at.number_input(key=key).set_value(64).run()
    assert not at.exception
    assert "Different hidden size: the file has 32" in _texts(at.markdown)


def test_architecture_fixes_a_peft_upload_with_one_click(tiny_demo_path, tiny_state_dict):
    peft = apply_fixes(tiny_state_dict, ["native_to_peft", "add_prefix:base_model.model."])
    at = _upload(_page("app_pages/architecture.py"), "peft.pt", save_bytes(peft))
    assert "This file is the PEFT-wrapped FLAG-TRADER layout" in _texts(at.success)
    assert "PEFT / HF layout" in _texts(at.markdown)
    at.button(key="arch_apply").click().run()
    assert not at.exception
    assert "Strict load into the reconstruction after the fixes: 63/63 tensors load strictly" in _texts(at.success)
    assert any(b.key == "arch_download" for b in at.get("download_button"))


def test_architecture_second_checkpoint_target_and_broken_file(tiny_demo_path, tiny_state_dict):
    at = _page("app_pages/architecture.py")
    at.selectbox(key="arch_target").set_value("second").run()
    at.file_uploader(key="arch_second_upload").upload("other.pt", save_bytes(tiny_state_dict)).run()
    assert not at.exception
    assert "mis-shaped" in _texts(at.error)  # d=16 against the demo's d=32
    at.file_uploader(key="arch_second_upload").set_value(("bad.pt", b"not a checkpoint at all", "x")).run()
    assert not at.exception
    assert "Could not open the second checkpoint" in _texts(at.error)


def test_architecture_for_a_foreign_layout_without_config(tiny_demo_path):
    import torch

    from flag_model.layouts import LAYOUTS, LayoutSize

    sd = {k: torch.randn(s) for k, s in LAYOUTS["a2c"].keys(LayoutSize(2, 16, 32, 60, 3, 32, 0)).items()}
    at = _upload(_page("app_pages/architecture.py"), "a2c.pt", save_bytes(sd))
    assert "Transformer-A2C" in _texts(at.warning) + _texts(at.success)
    assert "not FLAG-TRADER" in _texts(at.markdown)
    at = _upload(_page("app_pages/tensors.py"), "a2c.pt", save_bytes(sd))
    assert at.metric[0].value == str(len(sd))


def test_architecture_sketch_fixed_and_used_as_the_session_checkpoint(tiny_demo_path):
    """The sketch: explained as the sketch, fixed with one click, then made the session's checkpoint — the sidebar
    and the Overview then say it loads strictly, pre-norm."""
    import family_generators as gen

    _, data, _ = gen.make_sketch(60, 32, 2, 4)
    at = _upload(_page("app_pages/architecture.py"), "sketch.pt", data)
    assert "This file is the hand-written sketch (Option 2) layout" in _texts(at.success)
    assert "pre-norm" in _texts(at.markdown)
    at.button(key="arch_apply").click().run()
    assert not at.exception, at.exception
    assert "63/63 tensors load strictly" in _texts(at.success)
    at.button(key="arch_use_fixed").click().run()
    assert not at.exception, at.exception
    assert "63/63 tensors loaded strictly" in _texts(at.sidebar.success)
    assert "Using the fixed checkpoint" in _texts(at.sidebar.info)
    assert at.sidebar.radio(key=next(r.key for r in at.sidebar.radio if r.key.startswith("norm_"))).value == "pre-norm"
    at.switch_page("app_pages/overview.py").run()
    assert not at.exception, at.exception
    assert "loaded strictly into the reconstruction" in _texts(at.success)


def test_architecture_a_different_model_gets_no_fix_chain_and_overview_shows_records(tiny_demo_path):
    import family_generators as gen

    _, data, _ = gen.make_cgdt_engine(20, 32, 4, 2, 8)
    at = _upload(_page("app_pages/architecture.py"), "engine.pt", data)
    assert "This file is the CGDT decision engine layout" in _texts(at.success)
    assert "No fixes are offered" in _texts(at.info)
    assert not any(b.key == "arch_apply" for b in at.button)
    at.switch_page("app_pages/overview.py").run()
    assert not at.exception, at.exception
    assert "Read in restricted mode" in _texts(at.info)
    records = at.dataframe[0].value
    assert "family_generators.CGDTConfig" in set(records["class"])
