"""Shared-server safety: server paths only inside a configured root, bounded memory (the resource policy in
`flag_model.limits`), no injected markup, no tracebacks, no decision from non-finite logits.

Library attacks first, then the same files through every page with AppTest: a clear message, no exception box,
nothing from outside the root or from a file's content disclosed, no live link or image from user text.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

if __name__ == "__main__":  # the child processes of the memory test run this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_model, save_bytes

from flag_model import CheckpointError, build_model, load_checkpoint
from flag_model.analysis import lora
from flag_model.analysis.predict import NO_DECISION, class_shares, decide, equity_curve, evaluate_arrays, undecided_note
from flag_model.config import ConfigError
from flag_model.data import (
    ColumnMapping,
    DataError,
    drift_table,
    iter_table_chunks,
    prepare_ohlcv,
    read_table,
    stored_stats,
)
from flag_model.limits import Limits, limits
from flag_model.model import ModelMismatchError
from flag_model.server_paths import ServerPathError, resolve_under_root, server_root

REPO = Path(__file__).resolve().parents[1]
SECRET = "hunter2-SECRET-do-not-show"
LINK = "[Session expired – click to sign in](http://evil.example/login) ![x](http://evil.example/p.png)"
LIVE_MARKUP = re.compile(r"(?<!\\)\]\((?:https?:|//)|<img|<a\s", re.I)  # an unescaped link/image target


# ---- server paths ---------------------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    (r / "sub").mkdir(parents=True)
    (r / "sub" / "model.pt").write_bytes(b"x")
    outside = tmp_path / "outside.env"
    outside.write_text(f"PASSWORD={SECRET}\n")
    (r / "link_out.pt").symlink_to(outside)
    (r / "link_in.pt").symlink_to(r / "sub" / "model.pt")
    return r.resolve()


def test_server_paths_only_regular_files_inside_the_root(root: Path) -> None:
    assert resolve_under_root("sub/model.pt", root) == root / "sub" / "model.pt"
    assert resolve_under_root(str(root / "sub" / "model.pt"), root) == root / "sub" / "model.pt"
    assert resolve_under_root("link_in.pt", root) == root / "sub" / "model.pt"  # a link that stays inside
    refused = [
        "link_out.pt",
        "../outside.env",
        "sub/../../outside.env",
        "/etc/passwd",
        "/dev/zero",
        "/proc/self/environ",
        "sub",
        ".",
        "missing.pt",
        "~root/.bashrc",
        "~no_such_user_xyz/m.pt",
        "a\x00b.pt",
        "x" * 5000,
        "/" * 300,
        "  ",
    ]
    messages = set()
    for p in refused:
        with pytest.raises(ServerPathError) as err:
            resolve_under_root(p, root)
        messages.add(str(err.value))
    assert len(messages) == 1, "missing and not allowed read the same"
    assert SECRET not in messages.pop()


def test_server_root_is_off_unless_configured(monkeypatch, root: Path) -> None:
    monkeypatch.delenv("FLAG_TRADER_SERVER_ROOT", raising=False)
    assert server_root() is None and server_root("") is None and server_root("/no/such/folder") is None
    assert server_root(str(root)) == root
    monkeypatch.setenv("FLAG_TRADER_SERVER_ROOT", str(root / "sub"))
    assert server_root(str(root)) == root / "sub"  # the environment wins over the config entry


# ---- the resource policy ----------------------------------------------------------------------------------


def test_limits_come_from_one_frozen_policy_and_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("FLAG_TRADER_MAX_PARAMS", "1000")
    monkeypatch.setenv("FLAG_TRADER_MAX_INFLATION", "2.5")
    lim = limits()
    assert lim.max_params == 1000 and lim.max_inflation == 2.5 and lim.max_rows == Limits().max_rows
    with pytest.raises(dataclasses.FrozenInstanceError):
        lim.max_params = 5  # frozen
    monkeypatch.setenv("FLAG_TRADER_MAX_ROWS", "lots")
    with pytest.raises(ValueError, match="FLAG_TRADER_MAX_ROWS"):
        limits()


def test_errors_never_quote_file_content(tmp_path: Path) -> None:
    for content in (
        f"PASSWORD={SECRET}\n".encode(),
        f"c{SECRET}\nrow2,{SECRET}\n".encode(),
        f'{{"token": "{SECRET}"}}'.encode(),
        f"close,open\n{SECRET},1\n".encode(),
    ):
        f = tmp_path / "x.pt"
        f.write_bytes(content)
        for src in (content, f):
            with pytest.raises(CheckpointError) as err:
                load_checkpoint(src, name="x.pt")
            assert SECRET not in str(err.value) and SECRET[:6] not in str(err.value)


def _safetensors(header: dict, body: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def test_safetensors_header_is_checked_before_any_tensor(monkeypatch) -> None:
    huge = _safetensors({"w": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 4]}}, b"\0" * 4)
    with pytest.raises(CheckpointError, match="max_params"):
        load_checkpoint(huge, name="huge.safetensors")
    many = _safetensors(
        {f"t{i}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i in range(300)}, b"\0" * 1200
    )
    monkeypatch.setenv("FLAG_TRADER_MAX_TENSORS", "100")
    with pytest.raises(CheckpointError, match="max_tensors"):
        load_checkpoint(many, name="many.safetensors")
    lying = _safetensors({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4]}}, b"\0" * 4)
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(lying, name="lying.safetensors")


def test_zip_members_that_inflate_far_beyond_the_file_are_refused(tiny_ckpt_bytes) -> None:
    src = zipfile.ZipFile(io.BytesIO(tiny_ckpt_bytes))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as out:
        for info in src.infolist():
            out.writestr(info.filename, src.read(info.filename), compress_type=zipfile.ZIP_STORED)
        out.writestr("archive/data/999", b"\0" * (64 << 20), compress_type=zipfile.ZIP_DEFLATED)  # 64 MiB -> 64 KiB
    bomb = buf.getvalue()
    assert len(bomb) < 2 << 20
    with pytest.raises(CheckpointError, match="max_inflation"):
        load_checkpoint(bomb, name="bomb.pt")


def test_tensor_count_and_values_are_bounded(monkeypatch, tiny_state_dict) -> None:
    monkeypatch.setenv("FLAG_TRADER_MAX_PARAMS", "1000")
    with pytest.raises(CheckpointError, match="max_params"):
        load_checkpoint(save_bytes(tiny_state_dict), name="big.pt")
    monkeypatch.delenv("FLAG_TRADER_MAX_PARAMS")
    monkeypatch.setenv("FLAG_TRADER_MAX_TENSORS", "10")
    with pytest.raises(CheckpointError, match="max_tensors"):
        load_checkpoint(save_bytes(tiny_state_dict), name="many.pt")


def test_build_model_compares_shapes_before_allocating() -> None:
    """Empty tensors whose shapes say d=8192: refused from the shapes, before a 12-block d=8192 model (3.2 G
    parameters) would be allocated: this would take minutes and gigabytes otherwise."""
    sd = make_model(n_blocks=1, d=8, f=16).state_dict()
    sd["state_embedding.weight"] = torch.empty(8192, 0)
    sd["pos_embedding"] = torch.empty(1, 0, 8192)
    with pytest.raises((ModelMismatchError, ConfigError)):
        build_model(sd)


def test_build_model_refuses_a_model_above_max_params(monkeypatch, tiny_state_dict) -> None:
    monkeypatch.setenv("FLAG_TRADER_MAX_PARAMS", "1000")
    with pytest.raises(ConfigError, match="max_params"):
        build_model(tiny_state_dict)


def test_stride0_view_statistics_cost_one_chunk() -> None:
    """A stride-0 view of 2**31 values (8 GiB as float32) whose statistics are computed chunk by chunk."""
    from flag_model.analysis.tensors import tensor_stats
    from flag_model.limits import abs_max

    t = torch.tensor([3.0]).expand(2**16, 2**15)
    assert abs_max(t) == 3.0
    row = tensor_stats({"w": torch.tensor([-2.0, 0.0, float("nan")]).repeat(1000)}).iloc[0]
    assert row["nonfinite"] == 1000 and row["min"] == -2.0 and math.isclose(row["mean"], -1.0)
    assert math.isclose(row["std"], 1.0) and math.isclose(row["zeros_share"], 1 / 3)


def test_metadata_of_the_wrong_type_is_ignored_not_fatal() -> None:
    meta = {"feature_mean": ["a"] * 60, "feature_std": [1.0] * 60}
    assert stored_stats(meta, 60) is None
    assert stored_stats({"feature_mean": [float("nan")] * 2, "feature_std": [1, 1]}, 2) is None
    assert stored_stats({"feature_mean": [True, 1], "feature_std": [1, 1]}, 2) is None
    from flag_model.data import FeatureMatrix

    fm = FeatureMatrix(
        np.zeros((3, 2), np.float32),
        pd.DatetimeIndex(pd.date_range("2025", periods=3)),
        np.ones(3),
        ("a", "b"),
        "x",
        "none",
        (),
    )
    assert len(drift_table(fm, {"feature_mean": ["x", {}], "feature_std": [[1], "y"]})) == 2


# ---- data files -----------------------------------------------------------------------------------------------


def _bars(n: int = 80) -> pd.DataFrame:
    t = pd.date_range("2025-01-01", periods=n, freq="5min")
    close = 100 + np.arange(n, dtype=float)
    return pd.DataFrame(
        {"datetime": t.astype(str), "open": close, "high": close + 1, "low": close - 1, "close": close, "volume": 10.0}
    )


def test_csv_header_and_parquet_footer_are_checked_first(monkeypatch, tmp_path: Path) -> None:
    wide = (",".join(f"c{i}" for i in range(200)) + "\n" + ",".join("1" * 200) + "\n").encode()
    monkeypatch.setenv("FLAG_TRADER_MAX_COLUMNS", "100")
    with pytest.raises(DataError, match="max_columns"):
        read_table(wide, "wide.csv")
    monkeypatch.delenv("FLAG_TRADER_MAX_COLUMNS")
    monkeypatch.setenv("FLAG_TRADER_MAX_ROWS", "50")
    buf = io.BytesIO()
    _bars(80).to_parquet(buf)
    with pytest.raises(DataError, match="max_rows"):
        read_table(buf.getvalue(), "long.parquet")
    with pytest.raises(DataError, match="max_rows"):
        read_table(_bars(80).to_csv(index=False).encode(), "long.csv")
    monkeypatch.setenv("FLAG_TRADER_MAX_HEADER_BYTES", "1000")
    with pytest.raises(DataError, match="max_header_bytes"):
        read_table(b"a" * 5000 + b"\n1\n", "longheader.csv")


def test_a_first_row_wider_than_the_header_is_cut_to_the_header(tmp_path: Path) -> None:
    csv = _bars(60).to_csv(index=False)
    head, first, rest = csv.split("\n", 2)
    data = f"{head}\n{first}{',9' * 50_000}\n{rest}".encode()
    df = read_table(data, "wide-row.csv")
    assert list(df.columns) == head.split(",") and len(df) == 60
    path = tmp_path / "wide-row.csv"
    path.write_bytes(data)
    assert list(pd.concat(iter_table_chunks(path, 25)).columns) == head.split(",")


def test_non_finite_prices_are_a_validation_error() -> None:
    df = _bars().assign(close=np.inf)
    prep = prepare_ohlcv(
        read_table(df.to_csv(index=False).encode(), "inf.csv"),
        ColumnMapping("datetime", "open", "high", "low", "close", "volume"),
    )
    assert not prep.ok and any("infinite" in i.message for i in prep.errors)


def test_non_finite_logits_are_never_a_decision() -> None:
    logits = np.array([[1.0, 2.0, 0.0], [np.nan, 0.0, 0.0], [np.inf, 0.0, 0.0], [0.0, 0.0, 5.0]], np.float32)
    probs, actions = decide(logits)
    assert actions.tolist() == [1, NO_DECISION, NO_DECISION, 2]
    assert np.isnan(probs[1:3]).all() and np.allclose(probs[[0, 3]].sum(axis=1), 1)
    shares = class_shares(actions, ("SELL", "HOLD", "BUY"))
    assert shares["count"].tolist() == [0, 1, 1] and "2 of 4 bars have no decision" in undecided_note(actions)
    m = evaluate_arrays(np.array([1, 0, 0, 2]), actions, ("SELL", "HOLD", "BUY"))
    assert m.n == 2 and m.accuracy == 1.0
    eq = equity_curve(
        pd.DatetimeIndex(pd.date_range("2025", periods=4, freq="h")),
        np.array([1.0, 2, 4, 8]),
        actions,
        ("SELL", "HOLD", "BUY"),
        fee=0.0,
    )
    assert eq.frame["strategy"].iloc[-1] == 1.0  # HOLD, then flat twice: no position without a decision


def test_lora_metrics_and_spectra_survive_nan_weights() -> None:
    model = make_model(n_blocks=1)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    metrics = lora.adapter_metrics(model)
    assert len(metrics) and metrics["delta_fro"].isna().all()
    spec = lora.spectra(model, metrics["path"].iloc[0])
    assert spec[["ΔW", "W", "W + ΔW"]].isna().all().all()


# ---- through the app ------------------------------------------------------------------------------------------


def _markdown_texts(at) -> list[str]:
    """The markdown body of every element that renders markdown, in the sidebar and the main area."""
    out = []
    for part in (at.sidebar, at.main):
        for kind in ("error", "warning", "info", "success", "caption", "markdown"):
            out += [str(e.value) for e in getattr(part, kind)]
    return out


def _assert_clean(at, page: str = "") -> None:
    assert not at.exception, (page, [e.message for e in at.exception])
    texts = _markdown_texts(at)
    assert not any(SECRET in t for t in texts), (page, "file content disclosed")
    assert not any(LIVE_MARKUP.search(t) for t in texts), (page, [t for t in texts if LIVE_MARKUP.search(t)])


def test_server_path_is_off_without_a_root(tiny_demo_path, monkeypatch) -> None:
    from streamlit.testing.v1 import AppTest

    monkeypatch.delenv("FLAG_TRADER_SERVER_ROOT", raising=False)
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=180).run()
    at.sidebar.radio(key="ckpt_source").set_value("Server path").run()
    _assert_clean(at)
    assert any("Server paths are off" in c.value for c in at.sidebar.caption)
    at.sidebar.text_input(key="ckpt_path").input("/etc/passwd").run()
    _assert_clean(at)
    assert at.session_state["_flag_loaded"].ckpt is None and "Server paths are off" in at.sidebar.error[0].value


def test_server_path_reads_only_inside_the_root(tiny_demo_path, monkeypatch, root: Path) -> None:
    """The sidebar, the second-checkpoint field (Tensor tree) and the Predictions data path, with a root: a file
    inside opens; outside, a symlink out, a folder, a device or a missing file all give the same refusal."""
    from browser_util import app_pages
    from streamlit.testing.v1 import AppTest

    (root / "good.pt").write_bytes(tiny_demo_path.read_bytes())
    _bars(400).to_csv(root / "bars.csv", index=False)
    monkeypatch.setenv("FLAG_TRADER_SERVER_ROOT", str(root))
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=180).run()
    at.sidebar.radio(key="ckpt_source").set_value("Server path").run()
    refusals = set()
    for p in ["link_out.pt", "/etc/passwd", "../outside.env", "sub", "/dev/zero", "missing.pt", "a\x00b"]:
        at.sidebar.text_input(key="ckpt_path").input(p).run()
        _assert_clean(at, p)
        refusals |= {e.value for e in at.sidebar.error}
    assert len(refusals) == 1 and "root:" not in refusals.pop()
    at.sidebar.text_input(key="ckpt_path").input("good.pt").run()
    assert at.session_state["_flag_loaded"].model is not None
    pages = {Path(pg.file).stem: pg.file for pg in app_pages()}
    at.switch_page(pages["tensors"]).run()
    at.text_input(key="tensors_second_path").input("link_out.pt").run()
    _assert_clean(at, "tensors")
    assert any("no readable file" in e.value for e in at.error)
    at.session_state["pred_path"] = "../outside.env"  # typed before the page first runs: no demo-market scoring
    at.switch_page(pages["predictions"]).run()
    _assert_clean(at, "predictions")
    assert any("no readable file" in e.value for e in at.error)
    at.text_input(key="pred_path").input("bars.csv").run()
    _assert_clean(at, "predictions")
    assert not any("no readable file" in e.value for e in at.error), [e.value for e in at.error]
    assert "bars\\.csv**: 400 rows" in " ".join(c.value for c in at.caption), [e.value for e in at.error]


def _crafted_checkpoints() -> dict[str, bytes]:
    """Files that load but carry attacker-chosen text or degenerate sizes."""
    sd = make_model(seed=5).state_dict()
    cfg = {"num_heads": 4, "lora_alpha": 4, "lora_rank": 4}
    one = make_model(seed=6, max_length=1).state_dict()
    return {
        "markdown key": save_bytes({"model_state_dict": {**sd, f"extra.{LINK}": torch.ones(2)}, "config": cfg}),
        "markdown metadata": save_bytes(
            {"model_state_dict": sd, "config": {**cfg, "note": LINK}, LINK: LINK, "feature_names": [LINK] * 60}
        ),
        "feature_mean strings": save_bytes(
            {"model_state_dict": sd, "config": cfg, "feature_mean": ["x"] * 60, "feature_std": ["y"] * 60}
        ),
        "max_length 1": save_bytes({"model_state_dict": one, "config": cfg}),
        "all NaN": save_bytes({"model_state_dict": {k: v * float("nan") for k, v in sd.items()}, "config": cfg}),
    }


@pytest.mark.parametrize("name", list(_crafted_checkpoints()))
def test_crafted_checkpoints_through_every_page(name) -> None:
    from browser_util import app_pages
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=180)
    at.session_state["ckpt_source"] = "Upload"  # straight to the upload: the demo is not needed
    at.run()
    at.sidebar.file_uploader(key="ckpt_upload").upload(
        f"{LINK}.pt", _crafted_checkpoints()[name], "application/octet-stream"
    ).run()
    _assert_clean(at, "sidebar")
    assert at.session_state["_flag_loaded"].ckpt is not None
    for page in app_pages():
        at.switch_page(page.file).run()
        _assert_clean(at, page.file)
        main = at.main
        assert main.get("plotly_chart") or main.error or main.info or main.warning, f"{page.file} shows nothing"


def test_refused_uploads_show_an_inert_name_and_no_content(tiny_demo_path, monkeypatch, root: Path) -> None:
    """A text file named like a link, uploaded as a checkpoint and as market data (with a link in a column name
    and in a cell): plain, escaped messages."""
    from browser_util import app_pages
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=180)
    at.session_state["ckpt_source"] = "Upload"
    at.run()
    at.sidebar.file_uploader(key="ckpt_upload").upload(
        f"{LINK}.pt", f"PASSWORD={SECRET}\n".encode(), "application/octet-stream"
    ).run()
    _assert_clean(at, "sidebar")
    assert at.sidebar.error and "\\[Session expired" in at.sidebar.error[0].value
    at.sidebar.radio(key="ckpt_source").set_value("Demo").run()
    pred = next(pg.file for pg in app_pages() if pg.file.endswith("predictions.py"))
    monkeypatch.setenv("FLAG_TRADER_SERVER_ROOT", str(root))
    at.session_state["pred_path"] = "missing.csv"  # the page stops at the data source instead of scoring the demo
    at.switch_page(pred).run()  # an upload takes precedence over the path
    df = _bars(120).rename(columns={"volume": LINK})
    df["close"] = df["close"].astype(object)
    df.loc[5, "close"] = LINK
    at.file_uploader(key="pred_upload").upload(f"{LINK}.csv", df.to_csv(index=False).encode(), "text/csv").run()
    _assert_clean(at, "predictions")
    assert at.error or at.warning


def test_memory_cases_stay_within_the_policy_in_a_child_process() -> None:
    """The issue's memory attacks, each read in a fresh process capped at 3 GiB of address space above its
    start-up: every one ends in a clear error (run `python tests/test_security.py rss` for the peak RSS table)."""
    out = subprocess.run(
        [sys.executable, __file__, "rss"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == len(MEMORY_CASES)
    bad = [r for r in rows if not r["outcome"].startswith("loaded" if r["case"].startswith("control") else "refused")]
    assert not bad, bad


# ---- memory cases, each run in a child process (python tests/test_security.py rss) ----------------------------


def _empty_d8192() -> bytes:
    sd = {
        k: torch.empty(0) if v.dim() == 1 else torch.empty(*(0 if s == 16 else s for s in v.shape))
        for k, v in make_model(n_blocks=12, d=16, f=32).state_dict().items()
    }
    sd["state_embedding.weight"] = torch.empty(8192, 0)
    sd["pos_embedding"] = torch.empty(1, 0, 8192)
    sd["output_norm.weight"] = torch.empty(8192)[:0].clone()
    return save_bytes(sd)


def _zip_bomb() -> bytes:
    good = save_bytes(make_model(n_blocks=1).state_dict())
    src = zipfile.ZipFile(io.BytesIO(good))
    buf = io.BytesIO()
    # deflate level 1: about 4x faster on zeros than the default level; still ~230x smaller than the member
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as out:
        for info in src.infolist():
            out.writestr(info.filename, src.read(info.filename), compress_type=zipfile.ZIP_STORED)
        with out.open("archive/data/9999", "w", force_zip64=True) as member:
            zeros = bytes(1 << 20)
            for _ in range(1536):  # 1.5 GiB of zeros, written 1 MiB at a time
                member.write(zeros)
    return buf.getvalue()


def _stride0() -> bytes:
    return save_bytes({"w": torch.zeros(1, dtype=torch.int8).expand(2**33)})


def _wide_csv() -> bytes:
    return b",".join(b"c%d" % i for i in range(10_000_000)) + b"\n" + b"1," * 9_999_999 + b"1\n"


def _long_parquet() -> bytes:
    buf = io.BytesIO()
    n = 10_000_000
    pd.DataFrame(
        {
            "datetime": np.zeros(n, "datetime64[ns]"),
            **{c: np.ones(n) for c in ("open", "high", "low", "close", "volume")},
        }
    ).to_parquet(buf, compression="zstd")
    return buf.getvalue()


def _many_safetensors() -> bytes:
    n = 1_000_000
    return _safetensors(
        {f"t{i}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i in range(n)}, b"\0" * (4 * n)
    )


def _huge_safetensors_shape() -> bytes:
    return _safetensors({"w": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 4]}}, b"\0" * 4)


def _documented() -> bytes:
    from conftest import full_layout_config, randomize

    from flag_model.model import FlagTrader

    return save_bytes(
        {"model_state_dict": randomize(FlagTrader(full_layout_config())).state_dict(), "config": {"num_heads": 8}}
    )


MEMORY_CASES = {  # name -> (builder, reader)
    "control: documented d=256 checkpoint (10.4 M parameters)": (_documented, "checkpoint"),
    "empty tensors claiming d=8192 (build_model)": (_empty_d8192, "model"),
    "1.5 GiB zip member in a small file": (_zip_bomb, "checkpoint"),
    "stride-0 int8 view of 2^33 values": (_stride0, "checkpoint"),
    "10^7-column CSV": (_wide_csv, "data"),
    "Parquet with 10^7 rows": (_long_parquet, "data"),
    "safetensors with 10^6 tensors": (_many_safetensors, "checkpoint"),
    "safetensors shape 2^40": (_huge_safetensors_shape, "checkpoint"),
}


def _rss_case(name: str, path: str, reader: str) -> None:
    """One case in this (fresh) process: prints outcome, peak RSS and seconds as JSON."""
    import resource
    import time

    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
    from flag_model.analysis.tensors import tensor_stats

    def peak_mib() -> float:  # VmHWM: this process's own high-water mark (ru_maxrss survives exec from the parent)
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024

    before = peak_mib()
    t0 = time.perf_counter()
    try:
        if reader == "data":
            read_table(path)
        else:
            ckpt = load_checkpoint(path)
            tensor_stats(ckpt.state_dict)
            build_model(ckpt)
        outcome = "loaded"
    except (CheckpointError, DataError, ConfigError, ModelMismatchError) as exc:
        outcome = f"refused: {type(exc).__name__}: {str(exc)[:150]}"
    except MemoryError as exc:  # the cap hit: a failure of the policy
        outcome = f"MemoryError {exc}"
    print(
        json.dumps(
            {
                "case": name,
                "outcome": outcome,
                "import_rss_mib": round(before),
                "peak_rss_mib": round(peak_mib()),
                "s": round(time.perf_counter() - t0, 2),
                "file_bytes": os.path.getsize(path),
            }
        ),
        flush=True,
    )


def _forked(fn, err: Path) -> int:
    """Run fn() in a forked copy of this process (which has only imported modules, like a fresh interpreter, without
    paying an interpreter start-up per case); the child's stderr goes to `err`. Returns its exit status."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            with err.open("w") as f:
                os.dup2(f.fileno(), 2)
            fn()
            code = 0
        except BaseException:  # noqa: BLE001 - reported through the exit status and the stderr file
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _rss_table() -> None:
    """One line of JSON per memory case. This process only imports; each file is built in a forked child, then
    read in another one, so the reader starts as small as a fresh interpreter and its peak is its own."""
    import tempfile

    sys.stdout.flush()  # nothing buffered here may be written again by a child
    with tempfile.TemporaryDirectory() as tmp:
        err = Path(tmp) / "stderr.txt"
        for name, (build, reader) in MEMORY_CASES.items():
            suffix = (
                ".csv"
                if "CSV" in name
                else ".parquet"
                if "Parquet" in name
                else ".safetensors"
                if "safetensors" in name
                else ".pt"
            )
            path = Path(tmp) / f"case{suffix}"
            if rc := _forked(lambda build=build, path=path: path.write_bytes(build()), err):
                raise RuntimeError(f"building {name!r} failed (exit {rc}):\n{err.read_text()[-3000:]}")
            if rc := _forked(lambda name=name, path=path, reader=reader: _rss_case(name, str(path), reader), err):
                print(json.dumps({"case": name, "outcome": f"crashed rc={rc}: {err.read_text()[-300:]}"}), flush=True)
            path.unlink()


if __name__ == "__main__":
    if sys.argv[1:] != ["rss"]:
        sys.exit("usage: python tests/test_security.py rss")
    _rss_table()
