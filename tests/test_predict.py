"""Predictions: rolling vs blocks semantics, streaming = one-shot, metrics against direct formulas, the CLI."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_model

from flag_model.__main__ import main
from flag_model.analysis.predict import (
    NO_LABEL,
    Predictions,
    attach_labels,
    class_shares,
    collapse_alarm,
    decide,
    equity_curve,
    evaluate,
    predict_features,
    predictions_frame,
    row_labels,
    stream_predictions,
)
from flag_model.checkpoint import load_checkpoint
from flag_model.data import DataError, checkpoint_features, detect_columns, prepare_ohlcv, read_table
from flag_model.demo import synthetic_ohlcv
from flag_model.engine import InferenceEngine
from flag_model.features import LabelRule
from flag_model.model import build_model


@pytest.fixture(scope="module")
def bars() -> pd.DataFrame:
    return synthetic_ohlcv(700, seed=11)


@pytest.fixture(scope="module")
def model():
    return make_model(8, max_length=32)


def features(bars):
    return checkpoint_features(bars, {}, 60, "data")  # z-scores: inputs of the scale a model is fed


@pytest.mark.parametrize("mode", ["rolling", "blocks"])
def test_modes_against_the_reference_model(bars, model, mode):
    fm, w = features(bars), 20
    n = len(fm.values)
    pred = predict_features(fm, InferenceEngine(model, "exact", batch_size=6), w, mode)
    x = torch.from_numpy(fm.values)
    with torch.no_grad():
        if mode == "rolling":  # stride 1, the last position of each window decides
            ref = model(x.unfold(0, w, 1).permute(0, 2, 1))[:, -1]
            assert len(pred) == n - w + 1
            np.testing.assert_array_equal(pred.row, np.arange(w - 1, n))
            assert (pred.position == w - 1).all()
        else:  # non-overlapping windows, every position scored; the newest partial block by the last w rows
            k, r = n // w, n % w
            assert r > 0  # the case this checks
            ref = torch.cat(
                [model(x[: k * w].reshape(k, w, 60)).reshape(k * w, -1), model(x[None, n - w :])[0, w - r :]]
            )
            np.testing.assert_array_equal(pred.row, np.arange(n))
            np.testing.assert_array_equal(pred.position, np.r_[np.tile(np.arange(w), k), np.arange(w - r, w)])
    np.testing.assert_allclose(pred.logits, ref.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(pred.times, fm.times[pred.row])
    np.testing.assert_array_equal(pred.close, fm.close[pred.row])


def one_shot_frame(bars, engine, window, mode, rule=LabelRule()):
    fm = checkpoint_features(prepare_ohlcv(bars, detect_columns(bars.columns)).frame, {}, 60, "none")
    return predictions_frame(attach_labels(predict_features(fm, engine, window, mode), fm.close, rule))


@pytest.mark.parametrize("precision", ["exact", "fast"])
@pytest.mark.parametrize("mode", ["rolling", "blocks"])
def test_chunked_streaming_equals_one_shot(bars, model, mode, precision):
    engine = InferenceEngine(model, precision, batch_size=16)
    expected = one_shot_frame(bars, engine, 20, mode)
    for size in (37, 101, 256, 700):
        chunks = (bars.iloc[i : i + size] for i in range(0, len(bars), size))
        parts = stream_predictions(chunks, {}, engine, 20, mode, "none")
        got = pd.concat([predictions_frame(p) for p in parts], ignore_index=True)
        pd.testing.assert_frame_equal(got, expected, check_exact=True)


def test_stream_rejects_disorder_across_chunks(bars, model):
    engine = InferenceEngine(model, "exact")
    chunks = [bars.iloc[:300], bars.iloc[250:400]]
    with pytest.raises(DataError, match="row 301 .*not later"):
        list(stream_predictions(chunks, {}, engine, 20, "rolling", "none"))
    with pytest.raises(DataError, match="fewer than 51"):
        list(stream_predictions([bars.iloc[:40]], {}, engine, 20, "rolling", "none"))
    with pytest.raises(DataError, match="too few rows"):
        list(stream_predictions([bars.iloc[:60]], {}, engine, 20, "rolling", "none"))


def test_labels_rule_and_unknown_future():
    close = np.array([100.0, 100.0, 101.0, 99.0, 100.1, 100.0])
    labels = row_labels(close, LabelRule(horizon=2, threshold=0.005))
    # r_t = close[t+2]/close[t] - 1: +1 %, -1 %, -0.89 %, +1.01 %, then no future
    assert labels.tolist() == [2, 0, 0, 2, NO_LABEL, NO_LABEL]


def synthetic_pred(labels, mode="rolling", window=4, position=None) -> Predictions:
    n = len(labels)
    return Predictions(
        times=pd.date_range("2025-01-01", periods=n, freq="5min"),
        close=np.linspace(100, 110, n),
        logits=np.zeros((n, 3), np.float32),
        row=np.arange(n),
        position=np.arange(n) % window if position is None else position,
        labels=np.asarray(labels),
        window=window,
        mode=mode,
        actions=("SELL", "HOLD", "BUY"),
    )


def test_metrics_against_direct_formulas():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 500)
    y[:7] = NO_LABEL
    p = rng.integers(0, 3, 500)
    m = evaluate(synthetic_pred(y, mode="blocks"), p)
    yk, pk = y[7:], p[7:]
    assert m.n == 493 and m.accuracy == pytest.approx(np.mean(yk == pk))
    f1s = []
    for c in range(3):
        tp = sum(1 for a, b in zip(yk, pk) if a == c and b == c)
        prec, rec = tp / sum(pk == c), tp / sum(yk == c)
        assert m.per_class["precision"].iloc[c] == pytest.approx(prec)
        assert m.per_class["recall"].iloc[c] == pytest.approx(rec)
        f1s.append(2 * prec * rec / (prec + rec))
        for d in range(3):
            assert m.confusion.iloc[c, d] == sum(1 for a, b in zip(yk, pk) if a == c and b == d)
    assert m.f1_macro == pytest.approx(np.mean(f1s))
    counts = np.bincount(yk, minlength=3)
    assert m.majority_class == ("SELL", "HOLD", "BUY")[counts.argmax()]
    assert m.majority_accuracy == pytest.approx(counts.max() / len(yk))
    pos = (np.arange(500) % 4)[7:]
    for q in range(4):
        assert m.by_position["accuracy"].iloc[q] == pytest.approx(np.mean(yk[pos == q] == pk[pos == q]))
    assert evaluate(synthetic_pred(y), p).by_position is None


def test_f1_macro_skips_absent_classes_and_none_without_labels():
    m = evaluate(synthetic_pred([1, 1, 2, 2]), np.array([1, 1, 2, 1]))
    assert m.f1_macro == pytest.approx(np.mean([2 * 2 / 3 * 1 / (2 / 3 + 1), 2 * 1 * 0.5 / 1.5]))
    assert m.per_class.loc["SELL", "support"] == 0 and m.per_class.loc["SELL", "predicted"] == 0
    assert evaluate(synthetic_pred([NO_LABEL] * 3), np.zeros(3, int)) is None


def test_offsets_shares_and_collapse_alarm():
    logits = np.array([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.5]], np.float32)
    probs, act = decide(logits)
    np.testing.assert_allclose(probs.sum(1), 1.0)
    np.testing.assert_allclose(probs[0], np.exp([0, 1, 0]) / np.exp([0, 1, 0]).sum())
    assert act.tolist() == [1, 0, 2]
    assert decide(logits, np.array([0.0, 0.0, 5.0]))[1].tolist() == [2, 2, 2]
    shares = class_shares(np.array([2] * 95 + [0] * 5), ("SELL", "HOLD", "BUY"))
    assert shares["count"].tolist() == [5, 0, 95]
    assert "95.0 % of predictions are BUY".replace(" %", "%") in collapse_alarm(shares)
    assert collapse_alarm(class_shares(np.array([0, 1, 2, 2]), ("SELL", "HOLD", "BUY"))) is None


def test_equity_curve_by_hand():
    times = pd.date_range("2025-01-01", periods=4, freq="5min")
    close = np.array([100.0, 110.0, 99.0, 99.0])
    act = np.array([2, 0, 1, 1])  # long, short, flat
    eq = equity_curve(times, close, act, ("SELL", "HOLD", "BUY"), fee=0.01)
    # bar 1: long +10 % minus a 1 % fee to open; bar 2: short +10 % minus 2 % to flip; bar 3: flat, 1 % to close
    expected = np.cumprod([1 + 0.10 - 0.01, 1 + 0.10 - 0.02, 1 - 0.01])
    np.testing.assert_allclose(eq.frame["strategy"], expected)
    np.testing.assert_allclose(eq.frame["buy_and_hold"], close[1:] / 100)
    assert eq.trades == 3
    assert eq.stats.loc["strategy", "total return"] == pytest.approx(expected[-1] - 1)
    assert eq.stats.loc["buy_and_hold", "max drawdown"] == pytest.approx(99 / 110 - 1)
    assert equity_curve(times, close, act, ("a", "b", "c")) is None


def test_download_frame_columns():
    pred = synthetic_pred([0, 2, NO_LABEL])
    frame = predictions_frame(pred)
    assert list(frame.columns) == [
        "datetime",
        "timestamp",
        "position",
        "close",
        "logit_SELL",
        "logit_HOLD",
        "logit_BUY",
        "prob_SELL",
        "prob_HOLD",
        "prob_BUY",
        "action",
        "label",
    ]
    assert frame["label"].tolist() == ["SELL", "BUY", ""]
    assert frame["timestamp"].iloc[0] == pd.Timestamp("2025-01-01").value // 10**6


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_cli_predict_streams_and_matches_the_page(tmp_path, tiny_demo_path, bars, suffix, capsys):
    data = tmp_path / "bars.csv"
    renamed = bars.drop(columns="datetime").rename(columns={"timestamp": "Timestamp", "close": "Close"})
    renamed.to_csv(data, index=False)
    out = tmp_path / f"pred{suffix}"
    rc = main(
        [
            "predict",
            str(tiny_demo_path),
            str(data),
            "--out",
            str(out),
            "--window",
            "24",
            "--precision",
            "exact",
            "--chunk-rows",
            "113",
        ]
    )
    assert rc == 0
    err = capsys.readouterr().err
    assert "accuracy" in err and "peak RSS" in err
    got = pd.read_csv(out, keep_default_na=False) if suffix == ".csv" else pd.read_parquet(out)
    model = build_model(load_checkpoint(tiny_demo_path))
    ckpt = load_checkpoint(tiny_demo_path)
    fm = checkpoint_features(bars, ckpt.meta, 60, "checkpoint")
    expected = predictions_frame(
        attach_labels(predict_features(fm, InferenceEngine(model, "exact"), 24), fm.close, LabelRule())
    )
    if suffix == ".csv":
        expected["datetime"] = expected["datetime"].astype(str)
        pd.testing.assert_frame_equal(got, expected, check_dtype=False, rtol=1e-6)
    else:
        pd.testing.assert_frame_equal(got, expected, check_exact=True, check_dtype=False)


def test_cli_predict_errors_go_to_stderr(tmp_path, tiny_demo_path, bars, capsys):
    data = tmp_path / "bad.csv"
    bars.iloc[[0, 2, 1, *range(3, 200)]].to_csv(data, index=False)
    rc = main(["predict", str(tiny_demo_path), str(data), "--out", str(tmp_path / "o.csv")])
    err = capsys.readouterr().err
    assert rc == 2 and "not sorted" in err and "row 3" in err and "Traceback" not in err
    rc = main(["predict", str(tiny_demo_path), str(data), "--out", str(tmp_path / "o.txt")])
    assert rc == 2 and ".csv or .parquet" in capsys.readouterr().err


def test_cli_predict_data_normalisation_two_passes(tmp_path, tiny_demo_path, bars, capsys):
    data = tmp_path / "bars.parquet"
    bars.to_parquet(data, index=False)
    out = tmp_path / "p.parquet"
    assert (
        main(
            [
                "predict",
                str(tiny_demo_path),
                str(data),
                "--out",
                str(out),
                "--normalisation",
                "data",
                "--mode",
                "blocks",
                "--chunk-rows",
                "200",
                "--precision",
                "exact",
            ]
        )
        == 0
    )
    got = pd.read_parquet(out)
    ckpt = load_checkpoint(tiny_demo_path)
    fm = checkpoint_features(bars, ckpt.meta, 60, "data")
    expected = predictions_frame(
        attach_labels(
            predict_features(fm, InferenceEngine(build_model(ckpt), "exact"), 32, "blocks"), fm.close, LabelRule()
        )
    )
    np.testing.assert_allclose(got["logit_BUY"], expected["logit_BUY"], atol=1e-4)  # stats differ by rounding only
    assert (got["action"] == expected["action"]).mean() > 0.99


def test_metrics_on_the_real_eth_file(eth_csv, tiny_demo_path):
    """Window 1, rolling: every bar from row 50 is scored; supports are the documented label counts minus
    the last 5 bars (HOLD by the rule, but with no future they carry no label)."""
    df = read_table(eth_csv)
    ckpt = load_checkpoint(tiny_demo_path)
    fm = checkpoint_features(prepare_ohlcv(df, detect_columns(df.columns)).frame, ckpt.meta, 60)
    pred = attach_labels(predict_features(fm, InferenceEngine(build_model(ckpt), "fast"), 1), fm.close, LabelRule())
    assert len(pred) == 51_802 and (pred.labels[-5:] == NO_LABEL).all()
    m = evaluate(pred, decide(pred.logits)[1])
    assert m.n == 51_797
    assert m.per_class["support"].tolist() == [12_754, 25_699 - 5, 13_349]
    assert m.majority_class == "HOLD" and m.majority_accuracy == pytest.approx(25_694 / 51_797)


def test_bench_quick_runs(tmp_path, bars, capsys):
    data = tmp_path / "bars.csv"
    bars.to_csv(data, index=False)
    assert main(["bench", "--quick", "--data", str(data)]) == 0
    out = capsys.readouterr().out
    for word in ("reference", "exact", "fast", "× ref", "GFLOP/s", "matmul peak", "agreement", "targets"):
        assert word in out
    assert "window 16:" in out and "window 32:" in out and "n/a" not in out


@pytest.mark.parametrize("mode", ["rolling", "blocks"])
def test_scoring_only_the_most_recent_rows(bars, model, mode):
    fm, w = features(bars), 20
    engine = InferenceEngine(model, "exact", batch_size=8)
    full = predict_features(fm, engine, w, mode)
    part = predict_features(fm, engine, w, mode, last=130)
    n = len(fm.values)
    if mode == "rolling":
        np.testing.assert_array_equal(part.row, np.arange(n - 130, n))
    else:  # whole blocks from the first boundary inside the last 130 rows, then the newest partial block
        first = -(-(n - 130) // w) * w
        np.testing.assert_array_equal(part.row, np.arange(first, n))
    np.testing.assert_allclose(part.logits, full.logits[np.isin(full.row, part.row)], atol=1e-5, rtol=0)
    assert len(predict_features(fm, engine, w, mode, last=10**6)) == len(full)


def test_cli_predict_says_when_the_bar_interval_differs(tmp_path, tiny_demo_path, bars, capsys):
    five = tmp_path / "five.csv"
    bars.iloc[:200].to_csv(five, index=False)
    assert main(["predict", str(tiny_demo_path), str(five), "--out", str(tmp_path / "a.csv"), "--window", "8"]) == 0
    err = capsys.readouterr().err
    assert "NOTICE" not in err and "as in training (5 min)" in err
    assert "(default stored in the checkpoint)" in err and "counted as HOLD in training" in err
    hourly = tmp_path / "hourly.csv"
    bars.iloc[:200].assign(
        datetime=pd.date_range("2025-01-01", periods=200, freq="1h"),
        timestamp=lambda d: d["datetime"].astype("datetime64[ms]").astype("int64"),
    ).to_csv(hourly, index=False)
    assert (
        main(
            [
                "predict",
                str(tiny_demo_path),
                str(hourly),
                "--out",
                str(tmp_path / "b.csv"),
                "--window",
                "8",
                "--horizon",
                "3",
                "--threshold",
                "0.002",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "NOTICE: Bar interval differs" in err and "every 1 h" in err and "3 h here instead of 15 min" in err
    assert "Label = return over the next 3 bars (3 h)" in err
