"""Many users: uploads stay in their session, the shared cached model is never changed by any page or
action, concurrent sessions do not disturb each other, and the shared caches stay bounded."""

from __future__ import annotations

import ast
import gc
import threading
import weakref

import pytest
from browser_util import REPO, app_pages, model_fingerprint
from conftest import make_model, save_bytes
from streamlit.testing.v1 import AppTest

LOADED = "_flag_loaded"  # flag_model.ui.LOADED
PAGES = app_pages()


def _session(page: str | None = None) -> AppTest:
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=180)
    if page is not None:
        at.switch_page(page)
    return at.run()


def _loaded(at: AppTest):
    return at.session_state[LOADED]


def _upload_checkpoint(at: AppTest, data: bytes, name: str) -> AppTest:
    at.sidebar.radio(key="ckpt_source").set_value("Upload").run()
    at.sidebar.file_uploader(key="ckpt_upload").upload(name, data, "application/octet-stream").run()
    return at


def _actions(at: AppTest) -> list[str]:
    """Press every button of the page once (compute-on-demand actions, form submits) and flip its toggles
    (the main area only: the sidebar's assumptions select another cached model); -> what was done."""
    done = []
    for i in range(len(at.main.button)):
        if i < len(at.main.button):  # a click can change which widgets the page shows
            done.append(f"button {at.main.button[i].label!r}")
            at.main.button[i].click().run()
    for i in range(len(at.main.toggle)):
        if i < len(at.main.toggle):
            done.append(f"toggle {at.main.toggle[i].label!r}")
            at.main.toggle[i].set_value(not at.main.toggle[i].value).run()
    return done


def test_an_upload_stays_in_its_session(tiny_demo_path):
    a, b = _session(), _session()
    demo_digest = _loaded(b).ckpt.digest
    data = save_bytes({"model_state_dict": make_model(seed=11).state_dict(), "config": {"num_heads": 4}})
    _upload_checkpoint(a, data, "private.pt")
    assert not a.exception and _loaded(a).ckpt.source == "private.pt" and _loaded(a).model is not None
    b.run()
    assert not b.exception
    assert b.sidebar.radio(key="ckpt_source").value == "Demo"
    assert len(b.sidebar.get("file_uploader")) == 0
    assert _loaded(b).ckpt.digest == demo_digest != _loaded(a).ckpt.digest
    assert all("private.pt" not in m.value for m in [*b.markdown, *b.success, *b.sidebar.success])
    # A third session opened after the upload starts on the demo too.
    c = _session()
    assert _loaded(c).ckpt.digest == demo_digest


def test_uploaded_market_data_stays_in_its_session(tiny_demo_path):
    from flag_model.demo import synthetic_ohlcv

    predictions = next(p.file for p in PAGES if p.file.endswith("predictions.py"))
    a, b = _session(predictions), _session(predictions)
    csv = synthetic_ohlcv(400, seed=5).to_csv(index=False).encode()
    a.file_uploader(key="pred_upload").upload("private_bars.csv", csv, "text/csv").run()
    assert not a.exception and a.session_state["market_data"].name == "private_bars.csv"
    b.run()
    assert not b.exception and "market_data" not in b.session_state
    assert any("demo market" in i.value for i in b.info)


@pytest.mark.parametrize("page", [p.file for p in PAGES], ids=[p.url_path or "default" for p in PAGES])
def test_no_page_or_action_changes_the_shared_model(tiny_demo_path, page):
    at = _session(page)
    assert not at.exception, at.exception
    model = _loaded(at).model
    before = model_fingerprint(model)
    actions = _actions(at)
    assert not at.exception, (actions, at.exception)
    at.run()
    assert _loaded(at).model is model, "the page did not use the shared cached model"
    assert model_fingerprint(model) == before, f"{page} changed the shared model ({actions})"
    # Other assumptions give another cached model; the first one must not be adapted in place.
    for toggle in at.sidebar.toggle:
        toggle.set_value(not toggle.value).run()
    heads = next(s for s in at.sidebar.selectbox if "heads" in s.label.lower())
    heads.set_value(next(o for o in heads.options if str(o) != str(heads.value))).run()
    assert not at.exception, at.exception
    assert _loaded(at).model is not model
    assert model_fingerprint(model) == before, f"{page} changed the shared model when assumptions changed"


def test_concurrent_sessions_do_not_disturb_each_other(tiny_demo_path):
    """A session running every page with its on-demand computations (attributions, statistics over many
    windows) in a thread while a second session walks every page: both finish without an exception and
    the shared model is unchanged."""
    probe = _session()
    model = _loaded(probe).model
    before = model_fingerprint(model)
    errors: list[str] = []

    def heavy() -> None:
        try:
            for p in PAGES:
                at = _session(p.file)
                _actions(at)
                errors.extend(f"A {p.file}: {e.message}" for e in at.exception)
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(f"A crashed: {exc!r}")

    worker = threading.Thread(target=heavy)
    worker.start()
    try:
        for p in PAGES:
            at = _session(p.file)
            errors.extend(f"B {p.file}: {e.message}" for e in at.exception)
            assert _loaded(at).model is model
    finally:
        worker.join(timeout=600)
    assert not worker.is_alive(), "session A hung"
    assert not errors, errors
    assert model_fingerprint(model) == before


def test_cached_checkpoints_and_models_are_bounded(tiny_demo_path):
    """Opening 8 distinct checkpoints keeps at most max_entries of them (and of their models) alive."""
    from flag_model import ui

    ckpts, models = [], []
    for seed in range(8):
        data = save_bytes({"model_state_dict": make_model(seed=100 + seed).state_dict(), "config": {"num_heads": 4}})
        ck = ui.open_checkpoint_file(data, f"user_{seed}.pt")
        cfg = ck.config
        model, err = ui._model(ck.digest, cfg.num_heads, cfg.lora_scale, cfg.norm_first, cfg.causal, ck)
        assert err is None
        ckpts.append(weakref.ref(ck))
        models.append(weakref.ref(model))
        del ck, model
    gc.collect()
    alive_ckpts = sum(r() is not None for r in ckpts)
    alive_models = sum(r() is not None for r in models)
    assert alive_ckpts <= 4 and alive_models <= 6, (alive_ckpts, alive_models)
    assert alive_ckpts >= 1, "the cache keeps the most recent checkpoints (the check above can fail)"


def test_every_cache_declares_max_entries():
    """Every st.cache_resource / st.cache_data in flag_model/ui and the page files is bounded (new pages
    included: the page folders come from app.py's PAGES)."""
    folders = {REPO / "flag_model" / "ui", *((REPO / p.file).parent for p in PAGES)}
    files = sorted(f for d in folders for f in d.glob("*.py"))
    unbounded, found = [], 0
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for dec in node.decorator_list:
                    call = dec if isinstance(dec, ast.Call) else None
                    name = ast.unparse(call.func if call else dec)
                    if name.endswith(("cache_resource", "cache_data")):
                        found += 1
                        if call is None or "max_entries" not in {k.arg for k in call.keywords}:
                            unbounded.append(f"{f.relative_to(REPO)}:{node.lineno} {node.name}")
    assert found >= 3
    assert not unbounded, f"caches without max_entries: {unbounded}"


def test_the_fingerprint_sees_in_place_changes():
    """The oracle above can fail: each kind of in-place change a page could make alters the fingerprint."""
    import torch

    def q(m):
        return m.transformer_blocks[0].attention.q_proj

    base = model_fingerprint(make_model(seed=1))
    changes = {
        "ablation flag": lambda m: setattr(q(m), "lora_enabled", False),
        "LoRA scale": lambda m: setattr(q(m), "scale", 2.0),
        "train mode": lambda m: m.train(),
        "hook left behind": lambda m: q(m).register_forward_hook(lambda *a: None),
        "weight nudged": lambda m: q(m).base.weight.data.add_(1e-6),
        "requires_grad": lambda m: m.action_head.bias.requires_grad_(False),
        "parametrization": lambda m: torch.nn.utils.parametrize.register_parametrization(
            q(m).base, "weight", torch.nn.Identity()
        ),
    }
    for name, change in changes.items():
        model = make_model(seed=1)
        change(model)
        assert model_fingerprint(model) != base, name
