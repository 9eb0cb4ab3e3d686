"""Scoring on a local Dask cluster of 2 worker processes equals single-process `predict` row for row, with
identical logits, across part boundaries; a killed worker and a bad input file still give complete output."""

from __future__ import annotations

import os
import signal
import time

import pandas as pd
import pytest
from conftest import make_model, save_bytes

from flag_model.__main__ import main
from flag_model.data import WARMUP
from flag_model.demo import synthetic_ohlcv
from flag_model.distributed import discover_sources, local_client, make_spec, plan_parts, read_output, score_on_cluster

pytest.importorskip("distributed")
WINDOW = 20


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A checkpoint and two inputs of different formats; BBB's Parquet has small row groups."""
    d = tmp_path_factory.mktemp("dist")
    ckpt = d / "tiny.pt"
    model = make_model(8, max_length=32)
    ckpt.write_bytes(save_bytes({"model_state_dict": model.state_dict(), "config": {"num_heads": 4}}))
    synthetic_ohlcv(2300, seed=21).to_csv(d / "AAA.csv", index=False)
    synthetic_ohlcv(2000, seed=22).to_parquet(d / "BBB.parquet", index=False, row_group_size=300)
    return d


@pytest.fixture(scope="module")
def client():
    with local_client(2) as c:  # processes=True, loopback, random ports
        yield c


def single_process(files, name, tmp_path, *extra, data=None):
    """Single-process `predict` of files/name (or of `data`) with the same settings."""
    out = tmp_path / f"single_{name}.parquet"
    assert (
        main(
            [
                "predict",
                str(files / "tiny.pt"),
                str(data or files / name),
                "--out",
                str(out),
                "--window",
                str(WINDOW),
                "--chunk-rows",
                "700",
                *extra,
            ]
        )
        == 0
    )
    return pd.read_parquet(out)


@pytest.mark.parametrize(
    "mode, extra",
    [
        ("rolling", ()),  # default engine batches
        ("blocks", ("--precision", "exact", "--normalisation", "data", "--batch-size", "16")),
    ],
)
def test_cluster_equals_single_process_across_part_boundaries(files, client, tmp_path, mode, extra):
    opts = dict(zip(extra[::2], extra[1::2]))
    spec, _ = make_spec(
        files / "tiny.pt",
        window=WINDOW,
        mode=mode,
        precision=opts.get("--precision", "fast"),
        normalisation=opts.get("--normalisation", "checkpoint"),
        chunk_rows=700,
        partition_windows=1,
        batch_size=int(opts["--batch-size"]) if "--batch-size" in opts else None,
    )
    out = tmp_path / "out"
    result = score_on_cluster(client, [str(files / "AAA.csv"), str(files / "BBB.parquet")], spec, out)
    assert result.errors == []
    for name in ("AAA.csv", "BBB.parquet"):
        symbol = name.split(".")[0]
        expected = single_process(files, name, tmp_path, "--mode", mode, *extra)
        got = read_output(out, symbol)
        parts = [p for p in result.parts if p.symbol == symbol]
        assert len(parts) >= 2  # parts of one engine batch each: windows span their boundaries
        pd.testing.assert_frame_equal(got, expected, check_exact=True)  # every row, identical logits
        assert got["timestamp"].is_unique and got["timestamp"].is_monotonic_increasing  # each bar once, in order
    assert all(p.model_loads == 1 for p in result.parts)  # the model was loaded once per worker process
    assert len({p.worker_pid for p in result.parts}) <= 2
    everything = read_output(out)
    assert len(everything) == result.rows and set(everything["symbol"]) == {"AAA", "BBB"}


def test_parts_cover_every_window_once_with_the_overlap_it_needs(files):
    spec, _ = make_spec(files / "tiny.pt", window=WINDOW, partition_windows=1)
    n_bars = 2300
    parts = plan_parts(n_bars, spec)
    starts = [p.first_window for p in parts]
    assert starts == list(range(0, n_bars - WARMUP - WINDOW + 1, spec.batch_size))
    assert sum(p.n_windows for p in parts) == n_bars - WARMUP - WINDOW + 1
    for p in parts:  # window k covers feature rows k..k+W-1 = bars k..k+W-1+WARMUP, plus the label horizon
        assert p.bar_start == p.first_window
        assert p.bar_stop == min(n_bars, p.first_window + p.n_windows - 1 + WINDOW + WARMUP + spec.horizon)
    blocks, _ = make_spec(files / "tiny.pt", window=WINDOW, mode="blocks", partition_windows=1)
    parts = plan_parts(n_bars, blocks)  # blocks mode: every feature row once, the newest partial block included
    assert sum(p.n_windows * WINDOW + p.tail_rows for p in parts) == n_bars - WARMUP
    assert [p.tail_rows > 0 for p in parts] == [False] * (len(parts) - 1) + [(n_bars - WARMUP) % WINDOW > 0]


def test_symbol_dataset_equals_one_file_per_symbol(files, client, tmp_path):
    """A Parquet dataset with a symbol column (rows of both symbols interleaved) gives each symbol's output
    exactly as its own file would."""
    a = pd.read_csv(files / "AAA.csv").assign(symbol="AAA")
    b = pd.read_parquet(files / "BBB.parquet").assign(symbol="BBB")
    a["datetime"] = pd.to_datetime(a["datetime"])
    mixed = pd.concat([a, b]).sort_values("timestamp", kind="stable")
    data = tmp_path / "bars.parquet"
    mixed.to_parquet(data, index=False)
    assert [s.symbol for s in discover_sources([str(data)])[0]] == ["AAA", "BBB"]
    spec, _ = make_spec(files / "tiny.pt", window=WINDOW, chunk_rows=700, partition_windows=1)
    result = score_on_cluster(client, [str(data)], spec, tmp_path / "out")
    assert result.errors == []
    for name in ("AAA.csv", "BBB.parquet"):
        pd.testing.assert_frame_equal(
            read_output(tmp_path / "out", name.split(".")[0]), single_process(files, name, tmp_path), check_exact=True
        )


def test_cli_bad_file_is_named_and_the_others_finish(files, client, tmp_path, capsys):
    bad = tmp_path / "CCC.csv"
    synthetic_ohlcv(300, seed=3).iloc[[0, 2, 1, *range(3, 300)]].to_csv(bad, index=False)
    out = tmp_path / "out"
    rc = main(
        [
            "predict",
            str(files / "tiny.pt"),
            str(files / "AAA.csv"),
            str(bad),
            str(tmp_path / "nope_*.csv"),
            "--out",
            str(out),
            "--window",
            str(WINDOW),
            "--chunk-rows",
            "700",
            "--scheduler",
            client.scheduler.address,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert f"error: {bad}" in err and "not sorted" in err and "nope_*.csv" in err
    assert not (out / "symbol=CCC").exists()
    pd.testing.assert_frame_equal(read_output(out, "AAA"), single_process(files, "AAA.csv", tmp_path), check_exact=True)
    assert (
        main(
            [
                "predict",
                str(files / "tiny.pt"),
                str(files / "AAA.csv"),
                "--out",
                str(out),
                "--scheduler",
                client.scheduler.address,
            ]
        )
        == 2
    )
    assert "not empty" in capsys.readouterr().err


def test_a_worker_killed_mid_run_still_gives_complete_output(files, client, tmp_path):
    big = tmp_path / "DDD.csv"
    synthetic_ohlcv(12_000, seed=5).to_csv(big, index=False)
    spec, _ = make_spec(files / "tiny.pt", window=WINDOW, partition_windows=1, batch_size=256)  # ~50 parts
    killed: dict[str, int] = {}

    def kill_one_busy_worker(futures):
        if not futures[0].key.startswith("score-"):
            return
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            busy = {w: ks for w, ks in client.processing().items() if ks}
            if any(f.done() for f in futures) and busy:
                addr = next(iter(busy))
                pid = client.run(os.getpid, workers=[addr])[addr]
                killed["remaining"] = sum(not f.done() for f in futures)
                os.kill(pid, signal.SIGKILL)
                killed["pid"] = pid
            time.sleep(0.02)

    out = tmp_path / "out"
    result = score_on_cluster(client, [str(big), str(files / "AAA.csv")], spec, out, on_submit=kill_one_busy_worker)
    assert killed and killed["remaining"] > 0  # the worker died while parts were still to do
    assert result.errors == []
    for path, name in ((big, "DDD"), (files / "AAA.csv", "AAA")):
        expected = single_process(files, path.name, tmp_path, "--batch-size", "256", data=path)
        pd.testing.assert_frame_equal(read_output(out, name), expected, check_exact=True)
    assert not list(out.rglob("*.tmp"))
