"""The demo checkpoint: a seeded, untrained test size in about a second; the stored feature clip; the background
build every session sees; and (slow) the trained full demo, which must show what each page is for."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from conftest import REPO
from streamlit.testing.v1 import AppTest

from flag_model import demo
from flag_model.analysis.attention import attention_summary
from flag_model.analysis.health import health_scan
from flag_model.analysis.lora import adapter_metrics
from flag_model.analysis.predict import class_shares, collapse_alarm
from flag_model.checkpoint import load_checkpoint
from flag_model.config import infer_config
from flag_model.data import checkpoint_features, rolling_windows
from flag_model.model import FlagTrader, build_model


def test_tiny_demo_is_seeded_untrained_and_has_live_adapters():
    a, b = demo.train_demo("tiny"), demo.train_demo("tiny")
    assert a["epoch"] == 0 and "not trained" in a["data"]
    assert a["model_state_dict"].keys() == b["model_state_dict"].keys()
    for k, v in a["model_state_dict"].items():
        assert torch.equal(v, b["model_state_dict"][k]), k  # deterministic
    lora_b = [v for k, v in a["model_state_dict"].items() if k.endswith("lora_B")]
    assert len(lora_b) == 2 * 6 and min(float(v.abs().max()) for v in lora_b) > 1e-3
    adapters = next(f for f in health_scan(a["model_state_dict"]) if f.check == "LoRA adapters")
    assert adapters.level == "ok", adapters


def test_full_demo_spec_is_the_documented_layout():
    sd = FlagTrader(demo.demo_config(demo.DEMO_SIZES["full"]), dropout=0.1).state_dict()
    assert len(sd) == 343 and sum(v.numel() for v in sd.values()) == 10_444_291
    cfg = infer_config(sd)[0]
    assert (cfg.n_blocks, cfg.d_model, cfg.ffn_dim, cfg.lora_rank, cfg.state_dim, cfg.n_actions, cfg.max_length) == (
        12,
        256,
        1024,
        16,
        60,
        3,
        256,
    )


def test_demo_cache_file_carries_the_version(monkeypatch, tmp_path):
    monkeypatch.setenv("FLAG_TRADER_CACHE", str(tmp_path))
    now = demo.demo_path("full")
    assert now.parent == tmp_path and now.name.startswith("demo-full-")
    monkeypatch.setattr(demo, "DEMO_VERSION", demo.DEMO_VERSION - 1)
    assert demo.demo_path("full") != now  # a cache written by an older version is never reused


def test_checkpoint_normalisation_applies_the_stored_clip():
    bars = demo.synthetic_ohlcv(400, seed=3)
    meta = {"feature_mean": [0.0] * 60, "feature_std": [1e-3] * 60}  # z-scores far beyond ±10
    free = checkpoint_features(bars, meta, 60)
    clipped = checkpoint_features(bars, {**meta, "feature_clip": 10.0}, 60)
    assert np.abs(free.values).max() > 10
    assert np.abs(clipped.values).max() == pytest.approx(10.0)
    inside = np.abs(free.values) < 10
    assert np.array_equal(clipped.values[inside], free.values[inside])
    raw = checkpoint_features(bars, {**meta, "feature_clip": 10.0}, 60, "none")
    assert np.abs(raw.values).max() > 10  # only the checkpoint's normalisation is clipped
    for odd in ("10", True, -1.0, float("nan")):  # not a usable bound: ignored
        assert np.array_equal(checkpoint_features(bars, {**meta, "feature_clip": odd}, 60).values, free.values)


@pytest.fixture
def gated_build(monkeypatch, tmp_path):
    """An empty demo cache and a build that waits for `gate` after its first progress reports."""
    monkeypatch.setenv("FLAG_TRADER_CACHE", str(tmp_path))
    monkeypatch.setattr(demo, "_builds", {})
    gate = threading.Event()
    real = demo.train_demo

    def gated(size, progress=None, seed=0):
        progress(0.0, "generating synthetic market data")
        progress(0.1, "training step 1/10")
        assert gate.wait(120)
        return real(size, progress, seed)

    monkeypatch.setattr(demo, "train_demo", gated)
    yield gate
    gate.set()
    for build in list(demo._builds.values()):
        build._thread.join(120)


def _wait(predicate, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def test_one_background_build_per_process(gated_build):
    build = demo.start_build("tiny")
    assert demo.start_build("tiny") is build
    _wait(lambda: build.status().fraction >= 0.1)
    status = build.status()
    assert not status.done and status.error is None and "training step 1/10" in status.message
    assert [s.size for s in demo.running_builds()] == ["tiny"]
    gated_build.set()
    build._thread.join(120)
    status = build.status()
    assert status.done and status.error is None and status.fraction == 1.0
    assert demo.demo_path("tiny").exists() and demo.running_builds() == []
    assert demo.start_build("tiny") is build  # built: nothing restarts


def test_a_failed_build_is_shown_and_retried(monkeypatch, tmp_path):
    monkeypatch.setenv("FLAG_TRADER_CACHE", str(tmp_path))
    monkeypatch.setattr(demo, "_builds", {})
    monkeypatch.setattr(demo, "train_demo", lambda *a, **k: (_ for _ in ()).throw(MemoryError("out of memory")))
    build = demo.start_build("tiny")
    build._thread.join(60)
    assert "MemoryError: out of memory" in build.status().error
    assert [s.error for s in demo.running_builds()] == [build.status().error]
    monkeypatch.setattr(demo, "train_demo", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    again = demo.start_build("tiny")
    assert again is not build
    again._thread.join(60)


def test_the_app_never_waits_for_the_demo(gated_build, tiny_ckpt_bytes):
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=60)
    at.run()  # starts the build and returns at once
    assert not at.exception
    _wait(lambda: demo.running_builds() and demo.running_builds()[0].fraction >= 0.1)
    at.run()
    progress = [p.proto.text for p in at.get("progress")]
    assert any("Building the demo checkpoint" in t and "training step 1/10" in t for t in progress), progress
    assert any("being built" in i.value for i in at.info)
    at.sidebar.radio(key="ckpt_source").set_value("Upload").run()  # Upload works while the demo builds
    at.sidebar.file_uploader(key="ckpt_upload").upload("mine.pt", tiny_ckpt_bytes, "application/octet-stream").run()
    assert not at.exception and any("loaded strictly" in s.value for s in at.sidebar.success)
    assert any("Building the demo checkpoint" in p.proto.text for p in at.get("progress"))  # every page shows it
    gated_build.set()
    _wait(lambda: demo.demo_path("tiny").exists() and not demo.running_builds())
    at.sidebar.radio(key="ckpt_source").set_value("Demo").run()
    assert not at.exception and not at.get("progress")
    assert at.metric[0].value == "63" and "built-in demo" in at.success[0].value.replace("\\", "")  # md-escaped


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_trained_demo_shows_what_the_pages_are_for(full_demo_path):
    ckpt = load_checkpoint(full_demo_path)
    assert ckpt.n_tensors == 343 and ckpt.meta["feature_clip"] == demo.FEATURE_CLIP
    model = build_model(ckpt)
    adapters = adapter_metrics(model)
    assert not adapters["dead"].any(), adapters[adapters["dead"]]  # LoRA: every adapter changes its weight
    window = int(ckpt.meta["config"]["window"])
    fm = checkpoint_features(demo.demo_data("full"), ckpt.meta, 60)
    windows = rolling_windows(fm.values, window)
    held_out = windows[-int(0.2 * len(windows)) :]  # the chronological 20 % the demo never trained on
    attn = attention_summary(model, held_out[:: len(held_out) // 16]).stats
    focus = attn["entropy"] / np.log(window)
    assert focus.min() < 0.8, focus.describe()  # attention: some heads clearly focus (uniform = 1.0)
    with torch.inference_mode():
        pred = model(torch.as_tensor(np.ascontiguousarray(held_out[::16])))[:, -1].argmax(-1).numpy()  # 300 windows
    shares = class_shares(pred, ("SELL", "HOLD", "BUY"))
    assert collapse_alarm(shares) is None, shares  # predictions: not collapsed onto one class
    assert (shares["share"] >= 0.1).sum() >= 2, shares
