"""Many users: uploads stay in their session, the shared cached model is never changed by any page or
action, concurrent sessions do not disturb each other, and the shared caches stay bounded."""

from __future__ import annotations

import ast
import gc
import threading
import weakref

import numpy as np
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


def test_concurrent_users_of_the_shared_model_do_not_disturb_each_other():
    """What the pages run on the one cached model (attention maps, Integrated Gradients, the smallest flip,
    batched scoring), run by four threads at once, gives exactly what each gives alone, and leaves the shared
    model unchanged.

    Threads, not two AppTests: AppTest swaps process-wide globals (`Runtime._instance`) around every run, so
    two AppTests in one process disturb each other whatever the app does. Real concurrent sessions of one
    server are covered by the browser suite; this checks the part the sessions share, the model."""
    from flag_model.analysis.attention import window_attention
    from flag_model.analysis.attribution import attribute
    from flag_model.analysis.predict import predict_features
    from flag_model.analysis.whatif import smallest_flip
    from flag_model.data import checkpoint_features, detect_columns, prepare_ohlcv
    from flag_model.demo import synthetic_ohlcv
    from flag_model.engine import InferenceEngine

    model = make_model(seed=3)
    bars = synthetic_ohlcv(300, seed=4)
    fm = checkpoint_features(prepare_ohlcv(bars, detect_columns(bars.columns)).frame, {}, 60, "none")
    window = fm.values[-16:]
    before = model_fingerprint(model)

    def attention():
        return window_attention(model, window).maps

    def gradients():
        return attribute(model, window, steps=24).attributions

    def flip():
        return smallest_flip(model, window, target=0, iterations=20).edited

    def scores():
        return predict_features(fm, InferenceEngine(model, precision="exact"), 16).logits

    jobs = {"attention": attention, "gradients": gradients, "flip": flip, "scores": scores}
    alone = {name: job() for name, job in jobs.items()}
    together: dict[str, list] = {name: [] for name in jobs}
    errors: list[str] = []
    barrier = threading.Barrier(4)

    def user(order: list[str]) -> None:
        try:
            barrier.wait(timeout=60)
            for _ in range(2):
                for name in order:
                    together[name].append(jobs[name]())
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(repr(exc))

    names = list(jobs)
    threads = [threading.Thread(target=user, args=(names[i:] + names[:i],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a user hung"
    assert not errors, errors
    for name, results in together.items():
        assert len(results) == 8
        for r in results:
            np.testing.assert_array_equal(r, alone[name], err_msg=name)
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
