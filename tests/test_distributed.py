"""Scoring on a local Dask cluster of 2 worker processes equals single-process `predict` row for row, with
identical logits, across part boundaries; a killed worker and a bad input file still give complete output."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
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


# Many-window analyses on the cluster: the hypotheses ranking and global attributions


def _analysis_inputs(files, **assumptions):
    """The tiny checkpoint, a model under `assumptions`, AAA's features, and a reference workers load."""
    from flag_model.checkpoint import load_checkpoint
    from flag_model.data import detect_columns, prepare_ohlcv
    from flag_model.distributed import ModelRef
    from flag_model.model import build_model

    ckpt = load_checkpoint(files / "tiny.pt")
    raw = pd.read_csv(files / "AAA.csv")
    prep = prepare_ohlcv(raw, detect_columns(raw.columns))
    # one thread per worker (this process has the machine's CPUs): the logits must not depend on the thread count
    ref = ModelRef.of(files / "tiny.pt", ckpt.digest, threads=1, **assumptions)
    return ckpt, build_model(ckpt, **assumptions), prep.frame, ref


def _loads_per_worker(client, digest):
    from flag_model import distributed

    return set(client.run(lambda: distributed.checkpoint_loads.get(digest, 0)).values()) - {0}


def test_hypotheses_ranking_on_the_cluster_equals_one_process_with_a_worker_killed(files):
    """Both stages (screening and final) in chunks of one engine batch each, a worker SIGKILLed as the final stage
    starts: the table (scores, intervals, ranking) is identical to one process's, exactly. A cluster of its own:
    two live workers for sure (a worker killed by another test may take long to come back on a loaded machine)."""
    from flag_model.analysis import hypotheses as hy
    from flag_model.distributed import hypotheses_scorer

    ckpt, _, bars, ref = _analysis_inputs(files)
    cfg = ckpt.require_config()
    space = hy.search_space(cfg, ckpt.meta, windows=[12, 16], heads=[2, 4], scales=[0.5, 1.0])
    data = hy.labelled_data(bars, ckpt.meta, cfg.state_dim, 160, max(space.windows))
    opts = dict(screen=32, keep=4, resamples=200)
    one = hy.rank_hypotheses(ckpt.state_dict, cfg, data, space, batch_size=16, **opts)
    killed: dict[str, int] = {}
    stages: list[int] = []
    pids: dict[str, int] = {}

    def kill_when_the_final_stage_starts(futures):
        stages.append(len(futures))
        if len(stages) == 2:  # the final stage: kill a worker holding tasks of it
            # The scheduler hands the just-submitted tasks to workers a moment later: wait for that, then kill at
            # once by the pid read beforehand (a round trip to the worker here lets a fast machine finish first).
            deadline, busy = time.monotonic() + 30, []
            while not busy and time.monotonic() < deadline:
                busy = [w for w, keys in client.processing().items() if keys]
                time.sleep(0 if busy else 0.005)
            assert busy, "no worker took a task of the final stage within 30 s"
            killed["remaining"] = sum(not f.done() for f in futures)
            os.kill(pids[busy[0]], signal.SIGKILL)

    with local_client(2) as client:
        pids.update(client.run(os.getpid))
        scorer = hypotheses_scorer(
            client, ref, cfg, data, batch_size=16, partition_windows=1, on_submit=kill_when_the_final_stage_starts
        )
        many = hy.rank_hypotheses(ckpt.state_dict, cfg, data, space, scorer=scorer, **opts)
        loads = _loads_per_worker(client, ckpt.digest)
    # screening: 2 scales x 2 lengths x 2 chunks of 16 windows; final: 10 chunks per (scale, length) kept
    assert stages[0] == 8 and stages[1] % 10 == 0
    assert killed["remaining"] > 0  # the worker died with tasks still to do
    pd.testing.assert_frame_equal(many.table, one.table, check_exact=True)
    assert (many.table["stage"] == "screened out").sum() == len(space) - 4
    assert loads <= {1}  # the checkpoint was loaded once per worker process (the restarted one may have none yet)


@pytest.mark.parametrize(
    "method, same_threads",
    [("Integrated Gradients", True), ("Integrated Gradients", False), ("Feature Ablation", False)],
)
def test_global_importance_on_the_cluster_equals_one_process(files, client, method, same_threads):
    """Assumptions other than the checkpoint's travel with the reference. With the workers' torch threads equal to
    this process's, every window's totals are identical to one process's (exact equality); with other thread
    counts the gradient methods differ by float32 rounding (the backward kernels split their sums by thread:
    measured up to 1.2e-7 absolute); perturbation methods (forward passes only) stay identical."""
    from dataclasses import replace

    import torch

    from flag_model.analysis.attribution import global_importance
    from flag_model.data import checkpoint_features, rolling_windows
    from flag_model.distributed import global_importance_on_cluster

    ckpt, model, bars, ref = _analysis_inputs(files, num_heads=2, lora_scale=0.5, causal=True)
    if same_threads:
        ref = replace(ref, threads=torch.get_num_threads())
    fm = checkpoint_features(bars, ckpt.meta, model.config.state_dim, "data")
    windows = rolling_windows(fm.values, WINDOW)
    index = np.linspace(0, len(windows) - 1, 19).round().astype(int)  # 3 batches, one task each
    opts = dict(method=method, steps=4, batch_size=8, feature_names=fm.names)
    one = global_importance(model, windows, index, **opts)
    many = global_importance_on_cluster(client, ref, windows, index, partition_windows=1, **opts)
    if same_threads or method == "Feature Ablation":
        np.testing.assert_array_equal(many.totals, one.totals)
        pd.testing.assert_frame_equal(many.table(), one.table(), check_exact=True)
    else:
        np.testing.assert_allclose(many.totals, one.totals, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(many.predicted, one.predicted)
    np.testing.assert_array_equal(many.targets, one.targets)
    np.testing.assert_array_equal(many.window_index, index)
    assert _loads_per_worker(client, ckpt.digest) == {1}


def test_cluster_analyses_name_the_failed_task(files, client, tmp_path):
    from flag_model.analysis import hypotheses as hy
    from flag_model.data import rolling_windows
    from flag_model.distributed import ClusterError, ModelRef, global_importance_on_cluster, hypotheses_scorer

    ckpt, model, bars, ref = _analysis_inputs(files)
    windows = np.array(rolling_windows(np.random.default_rng(0).normal(size=(60, 60)).astype(np.float32), WINDOW))
    windows[30, 3, 7] = np.nan
    with pytest.raises(ClusterError, match=r"windows 24\.\.31 of 41 failed on the cluster: .*NaN"):
        global_importance_on_cluster(client, ref, windows, method="Saliency", batch_size=8, partition_windows=8)
    other = tmp_path / "tiny.pt"  # a different file at the path the workers are told
    other.write_bytes(save_bytes({"model_state_dict": make_model(9, max_length=32).state_dict()}))
    cfg = ckpt.require_config()
    space = hy.search_space(cfg, ckpt.meta, windows=[12], heads=[4], scales=[1.0])
    data = hy.labelled_data(bars, ckpt.meta, cfg.state_dim, 16, 12)
    scorer = hypotheses_scorer(client, ModelRef.of(other, ckpt.digest), cfg, data)
    with pytest.raises(ClusterError, match=r"LoRA ×1, window 12, windows 0\.\.15 .*differs from the client's"):
        hy.rank_hypotheses(ckpt.state_dict, cfg, data, space, scorer=scorer)


def test_cli_hypotheses_and_importance_on_a_cluster_print_what_one_process_prints(files, client, capsys):
    import json

    import torch

    ckpt, data = str(files / "tiny.pt"), str(files / "AAA.csv")
    cluster = ["--scheduler", client.scheduler.address, "--partition-windows", "8"]
    hyp = [*("hypotheses", ckpt, data, "--windows", "48", "--window-lengths", "12", "--heads", "2", "4"), "--json"]
    hyp += ["--scales", "1", "--screen", "0", "--resamples", "100"]
    assert main(hyp) == 0
    one = json.loads(capsys.readouterr().out)
    assert main([*hyp, *cluster]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out) == one and len(one) == 8
    assert "hypotheses task(s) done" in out.err  # progress from Dask (a line per tenth when not on a terminal)
    imp = ["importance", ckpt, data, "--method", "ig", "--windows", "24", "--window", str(WINDOW), "--steps", "4"]
    imp += ["--batch-size", "8", "--num-heads", "2", "--json", "--threads", str(torch.get_num_threads())]
    assert main(imp) == 0
    one = json.loads(capsys.readouterr().out)
    assert main([*imp, *cluster]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out) == one and len(one) == 60
    assert "importance task(s) done" in out.err
    assert main([*imp, "--workers", "2", "--scheduler", client.scheduler.address]) == 2
    assert "not both" in capsys.readouterr().err
