"""An analyst's session in a real browser: uploaded data and settings survive page switches, fast arrow keys on
the logit-offset sliders do not freeze the page, and blocks mode scores through the newest bar.

Uses the server, browser and helpers of test_browser.py (Playwright + Debian's Chromium; skipped without them).
With FLAG_TRADER_SHOTS=DIR the LoRA page of a checkpoint with dead and NaN adapters, the Overview table and the
sidebar status are also saved there as PNGs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
import test_browser
import torch
from conftest import make_model, save_bytes
from test_browser import (
    MAIN,
    SIDEBAR,
    _choose_upload_source,
    _upload,
    act,
    check_page,  # noqa: F401
    open_url,
)

pytestmark = pytest.mark.browser
# test_browser.py's fixtures, bound here so that pytest finds them for this module's tests (an import of the bare
# names is unused to a linter, which removed it once and broke every test below).
browser, page, server = test_browser.browser, test_browser.page, test_browser.server

SHOTS = Path(os.environ["FLAG_TRADER_SHOTS"]) if os.environ.get("FLAG_TRADER_SHOTS") else None


def _nav(pg, server_url: str, stem: str) -> None:
    act(pg, pg.locator(f'[data-testid="stSidebarNavLink"][href="{server_url}/{stem}"]').click)


def _bars_csv(tmp_path: Path, n: int = 600) -> tuple[Path, pd.DataFrame]:
    from flag_model.demo import synthetic_ohlcv

    bars = synthetic_ohlcv(n, seed=9)
    path = tmp_path / "session_bars.csv"
    path.write_text(bars.to_csv(index=False))
    return path, bars


def test_uploaded_data_and_settings_survive_a_round_trip(server, page, tmp_path):
    csv, _ = _bars_csv(tmp_path)
    open_url(page, f"{server}/predictions")
    _upload(page, MAIN, csv, "session_bars.csv: 600 rows")
    mode = page.locator('[data-testid="stRadio"]').filter(has_text="Mode")
    act(page, lambda: mode.get_by_text("blocks", exact=True).click())
    for stem in ("attention", "lora", ""):
        _nav(page, server, stem)
        assert "session_bars.csv · 600 rows · 5 min bars · upload" in page.locator(SIDEBAR).inner_text()
    _nav(page, server, "attention")
    assert "session_bars.csv" in page.locator(MAIN).inner_text()  # the upload, not the demo market
    _nav(page, server, "predictions")
    main = check_page(page, "session-round-trip")
    assert "uploaded earlier in this session" in main and "demo market" not in main
    assert "session_bars.csv: 600 rows" in main
    assert mode.get_by_role("radio", name="blocks").is_checked()


def test_fast_arrow_keys_on_an_offset_slider_do_not_freeze_the_page(server, page):
    open_url(page, f"{server}/predictions")
    runs = page.flag_runs
    slider = page.locator('[data-testid="stSlider"]').filter(has_text="BUY offset")
    thumb, shown = slider.get_by_role("slider"), slider.locator('[data-testid="stSliderThumbValue"]')
    thumb.focus()
    started = runs.started
    for _ in range(20):
        page.keyboard.press("ArrowRight")
        page.wait_for_timeout(50)
    page.wait_for_timeout(1500)
    assert runs.started == started, "arrow keys on the slider started script runs"
    assert page.locator('[data-stale="true"]').count() == 0
    assert shown.inner_text() == "1.00"  # 20 steps of 0.05, all taken
    act(page, page.get_by_role("button", name="Apply offsets").click)
    assert page.locator('[data-stale="true"]').count() == 0
    assert shown.inner_text() == "1.00"
    act(
        page,
        lambda: (
            page.locator('[data-testid="stRadio"]').filter(has_text="Mode").get_by_text("blocks", exact=True).click()
        ),
    )  # the page still answers
    check_page(page, "offsets-after-fast-keys")


def test_blocks_mode_scores_through_the_newest_bar(server, page, tmp_path):
    csv, bars = _bars_csv(tmp_path)
    open_url(page, f"{server}/predictions")
    _upload(page, MAIN, csv, "session_bars.csv: 600 rows")
    act(
        page,
        lambda: (
            page.locator('[data-testid="stRadio"]').filter(has_text="Mode").get_by_text("blocks", exact=True).click()
        ),
    )
    window = int(
        page.locator('[data-testid="stNumberInput"]').filter(has_text="Window length").locator("input").input_value()
    )
    assert (len(bars) - 50) % window, "the case needs a partial last block"
    check_page(page, "blocks-mode")
    with page.expect_download() as dl:
        page.get_by_role("button", name="Predictions as CSV").click()
    got = pd.read_csv(dl.value.path())
    assert pd.Timestamp(got["datetime"].iloc[-1]) == pd.Timestamp(bars["datetime"].iloc[-1])
    assert got["position"].iloc[-1] == window - 1
    # whole blocks from a block boundary (within the timed "bars to score" default), then every bar to the newest
    assert len(got) > window and got["position"].iloc[0] == 0
    assert (pd.to_datetime(got["datetime"]).diff().dropna() == pd.Timedelta(minutes=5)).all()


def _crafted_checkpoint(tmp_path: Path) -> Path:
    """12 blocks, every adapter dead (B = 0), a NaN in one base weight."""
    model = make_model(seed=3, n_blocks=12)
    sd = model.state_dict()
    for k in sd:
        if k.endswith("lora_B"):
            sd[k] = torch.zeros_like(sd[k])
    sd["transformer_blocks.3.attention.q_proj.base.weight"][0, :4] = float("nan")
    path = tmp_path / "dead_and_nan.pt"
    path.write_bytes(save_bytes({"model_state_dict": sd, "epoch": 7, "config": {"num_heads": 4}}))
    return path


def test_dead_and_nan_adapters_overview_and_status(server, page, tmp_path):
    open_url(page, server)
    _choose_upload_source(page)
    _upload(page, SIDEBAR, _crafted_checkpoint(tmp_path), "tensors loaded strictly")
    status = page.locator(f'{SIDEBAR} [data-testid="stAlert"]').filter(has_text="loaded strictly").inner_text()
    assert "4 heads (stored) · post-norm (assumed) · no mask (assumed) · LoRA scale 1 (assumed)" in status
    main = check_page(page, "crafted-overview")
    assert "NaN" in main and "4 NaN and 0 Inf" in main
    table = page.locator('[data-testid="stDataFrame"]').first
    for field in ("norm_first", "causal", "lora_targets"):
        if field not in main:  # the grid draws its cells after the page settles; waits fail the test on timeout
            table.get_by_text(field).first.wait_for(state="attached", timeout=60_000)  # canvas grid: hidden cells
    alert = page.locator(f'{SIDEBAR} [data-testid="stAlert"]').filter(has_text="loaded strictly")
    if SHOTS:
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.locator('[data-testid="stDataFrame"]').first.screenshot(path=str(SHOTS / "overview-table.png"))
        page.locator(MAIN).get_by_text("Health scan", exact=True).scroll_into_view_if_needed()
        page.screenshot(path=str(SHOTS / "overview-health.png"))
        alert.scroll_into_view_if_needed()
        page.locator(SIDEBAR).screenshot(path=str(SHOTS / "status.png"))
    _nav(page, server, "lora")
    main = check_page(page, "crafted-lora")
    assert "All 72 adapters are dead" in main and "ΔW dominates W: " not in main
    assert main.count("dead (B ≈ 0)") <= 3  # one summary line, not 72 warnings
    if SHOTS:
        page.screenshot(path=str(SHOTS / "lora-dead-nan.png"), full_page=True)
    act(page, page.locator(f'{SIDEBAR} [data-testid="stCheckbox"]').filter(has_text="Causal mask").click)
    status = alert.inner_text()
    assert "4 heads (stored) · post-norm (assumed) · causal mask (set)" in status  # the status follows the change
    if SHOTS:
        alert.scroll_into_view_if_needed()
        page.locator(SIDEBAR).screenshot(path=str(SHOTS / "status-after-change.png"))
