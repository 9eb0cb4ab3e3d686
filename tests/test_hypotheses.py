"""Hypotheses ranking: candidates, scoring against the reference model, bootstrap and metrics against direct
formulas, and recovery of hidden settings from tiny checkpoints trained with them."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import make_config, make_model, save_bytes
from hidden_train import hidden_bars, train_hidden

from flag_model.analysis import hypotheses as hy
from flag_model.analysis.bootstrap import f1_macro
from flag_model.analysis.predict import evaluate_arrays
from flag_model.checkpoint import load_checkpoint
from flag_model.config import infer_config
from flag_model.data import FeatureMatrix
from flag_model.features import LabelRule
from flag_model.model import build_model


def _data(n_rows: int = 80, n_windows: int = 24, longest: int = 12, seed: int = 0) -> hy.LabelledData:
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.004, n_rows)))
    fm = FeatureMatrix(
        values=rng.normal(size=(n_rows, 60)).astype(np.float32),
        times=pd.date_range("2025-01-01", periods=n_rows, freq="5min"),
        close=close,
        names=tuple(f"f{i}" for i in range(60)),
        feature_set="test",
        normalisation="none",
        warnings=(),
    )
    return hy.labelled_windows(fm, n_windows, longest, LabelRule())


def test_candidates_follow_the_rules():
    cfg = make_config(d=32, rank=4)
    assert hy.candidate_heads(cfg) == (1, 2, 4)  # head width >= 8
    assert [s for s, _ in hy.candidate_scales(cfg)] == [0.5, 1.0, 2.0, 4.0]  # 16 / r = 4
    stored, _ = infer_config(make_model(d=32, rank=4).state_dict(), {"num_heads": 8, "lora_alpha": 8})
    assert 8 in hy.candidate_heads(stored)  # a stored head count is always tried, even at width 4
    scales = dict(hy.candidate_scales(stored))
    assert "stored alpha 8 / r 4" in scales[2.0] and "fixed" in scales[2.0]  # merged with the fixed candidate
    assert "rsLoRA" in scales[4.0] and "default alpha" in scales[4.0]  # 8 / sqrt(4) = 16 / 4
    assert hy.candidate_scales(make_config(targets=())) == ((1.0, "no LoRA tensors: the scale has no effect"),)
    space = hy.search_space(cfg, {"config": {"window": 20}})
    assert len(space) == len(space.hypotheses()) == 3 * 2 * 2 * 4 and space.windows == (20,)
    with pytest.raises(ValueError, match="do not divide"):
        hy.search_space(cfg, {}, heads=[3])


def test_scores_equal_the_reference_model_and_the_pure_function():
    model = make_model(4, d=32, rank=4, heads=4)
    sd, cfg = model.state_dict(), model.config
    data = _data()
    hyps = [
        hy.Hypothesis(h, c, n, s, w)
        for h, c, n, s, w in (
            (1, False, False, 1.0, 12),
            (4, True, False, 0.5, 12),
            (2, True, True, 2.0, 8),
            (4, False, True, 2.0, 12),
        )
    ]
    index = np.arange(len(data))
    shared = hy.score_hypotheses(sd, cfg, hyps, data, index)
    for h in hyps:
        windows = data.windows(h.window, index)
        ref = build_model(sd, num_heads=h.num_heads, lora_scale=h.lora_scale, norm_first=h.norm_first, causal=h.causal)
        with torch.no_grad():  # the oracle: the reference model's own forward, decision position
            expected = ref(torch.from_numpy(windows))[:, -1].numpy()
        np.testing.assert_allclose(shared[h], expected, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(shared[h], hy.score_combination(sd, cfg, h, windows))  # identical: same batches
        assert np.array_equal(windows[:, -1], data.values[data.ends])  # the window ends at its decision row


def test_windows_are_labelled_and_evenly_spread():
    data = _data(n_rows=200, n_windows=40, longest=30)
    assert len(data) == 40 and data.ends.min() >= 29 and np.all(np.diff(data.ends) > 0)
    assert data.ends.max() <= 200 - 1 - 5  # the last 5 rows have no future: not labelled
    with pytest.raises(Exception, match="no labelled window"):
        _data(n_rows=20, n_windows=4, longest=30)


def test_metrics_and_bootstrap_against_direct_formulas():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 300)
    logits = rng.normal(size=(300, 3)).astype(np.float32)
    s = hy.window_scores(logits, labels)
    np.testing.assert_allclose(
        s["nll"],
        F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels), reduction="none").numpy(),
        rtol=1e-6,
    )
    p = torch.from_numpy(logits).double().softmax(-1).numpy()
    np.testing.assert_allclose(s["brier"], ((p - np.eye(3)[labels]) ** 2).sum(1), rtol=1e-9)
    conf, correct = p.max(1), (p.argmax(1) == labels)
    ece = sum(
        abs(correct[m].mean() - conf[m].mean()) * m.mean()
        for b in range(10)
        if (m := (np.minimum((conf * 10).astype(int), 9) == b)).any()
    )
    assert hy.expected_calibration_error(conf, correct.astype(float)) == pytest.approx(ece)
    cm = np.bincount(labels * 3 + s["pred"], minlength=9).reshape(1, 3, 3)
    assert f1_macro(cm)[0] == pytest.approx(evaluate_arrays(labels, s["pred"], ("S", "H", "B")).f1_macro)

    w = hy.bootstrap_weights(10, 3, 50, seed=2)
    assert w.shape == (50, 10) and np.all(w.sum(1) == 10)
    one = hy.bootstrap_weights(10, 10, 5, seed=2)  # one block of all windows (circular): each window once
    assert np.all(one == 1)


def test_ranking_puts_the_better_hypothesis_first_with_shares():
    data = _data(n_rows=300, n_windows=120, longest=12)
    y = data.labels
    good = np.eye(3)[y] * 3.0  # confident and right
    bad = np.zeros((len(y), 3))
    hyps = [hy.Hypothesis(2, False, False, 1.0, 12), hy.Hypothesis(4, True, True, 0.5, 12)]
    ranking = hy.rank_scores({hyps[0]: bad, hyps[1]: good}, data, resamples=200)
    t = ranking.table
    assert list(t["num_heads"]) == [4, 2] and list(t["rank"]) == [1, 2]
    assert t["share_best"].tolist() == [1.0, 0.0]
    assert t.loc[0, "accuracy"] == 1.0 and t.loc[1, "nll"] == pytest.approx(np.log(3))
    assert t.loc[0, "nll_low"] <= t.loc[0, "nll"] <= t.loc[0, "nll_high"]
    rec = ranking.records()[0]
    assert {"num_heads", "causal", "norm_first", "lora_scale", "nll", "accuracy", "f1", "nll_interval"} <= set(rec)
    assert hy.verdict(ranking)[0]
    noise = np.random.default_rng(5).normal(size=(2, *good.shape))  # equally good, different windows
    tie = hy.rank_scores({hyps[0]: good + noise[0], hyps[1]: good + noise[1]}, data, resamples=200)
    clear, sentence = hy.verdict(tie)
    assert not clear and "1 other entry" in sentence
    marked = hy.mark_in_use(t, make_config(heads=2))
    assert marked["in use"].tolist() == [False, True]


def test_cost_estimate_and_cancel():
    model = make_model(1, d=32, rank=4)
    sd, cfg = model.state_dict(), model.config
    data = _data(n_windows=40)
    space = hy.search_space(cfg, {}, windows=[12], heads=[1, 2], scales=[1.0, 2.0])
    cost = hy.estimate_cost(sd, cfg, space, len(data), screen=10, keep=3)
    assert cost.hypotheses == 16 and cost.window_passes == 16 * 10 + 3 * 30
    assert cost.seconds is not None and cost.seconds > 0 and "16 combinations" in cost.text()
    assert hy.plan_stages(16, 40, 50, 3) == (0, 16)  # screening more windows than there are: no screening
    calls = []

    def progress(done, total, what):
        calls.append((done, total))

    with pytest.raises(hy.Cancelled):
        hy.rank_hypotheses(sd, cfg, data, space, progress=progress, cancel=lambda: len(calls) >= 3)
    assert len(calls) == 3 and calls[-1][1] == 16 * len(data)


# Recovery: tiny checkpoints trained with hidden settings (seeded; a few CPU seconds each)

HIDDEN = [
    pytest.param(dict(num_heads=1, causal=True, norm_first=False, lora_scale=2.0), 0, id="1head-causal-post-x2"),
    pytest.param(dict(num_heads=4, causal=False, norm_first=True, lora_scale=0.5), 0, id="4heads-nomask-pre-x0.5"),
    pytest.param(
        dict(num_heads=2, causal=False, norm_first=False, lora_scale=1.0), 24, id="2heads-nomask-post-x1-screened"
    ),
]


@pytest.fixture(scope="module")
def bars() -> pd.DataFrame:
    return hidden_bars()


def _train(bars, hidden) -> bytes:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is faster than two fighting over a loaded machine
    try:
        return save_bytes(train_hidden(bars, **hidden))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("hidden, screen", HIDDEN)
def test_ranking_recovers_hidden_settings(bars, hidden, screen):
    ckpt = load_checkpoint(_train(bars, hidden), name="hidden.pt")
    cfg = ckpt.config
    assert "default" in cfg.provenance["num_heads"]  # nothing in the file names the hidden values
    space = hy.search_space(cfg, ckpt.meta)
    assert len(space) == 3 * 2 * 2 * 4
    data = hy.labelled_data(bars, ckpt.meta, cfg.state_dim, 384, max(space.windows))
    assert data.normalisation == "checkpoint"
    ranking = hy.rank_hypotheses(ckpt.state_dict, cfg, data, space, screen=screen, keep=6, resamples=300)
    top = ranking.table.iloc[0]
    assert hy.assumptions_of(top) == hidden
    assert top["stage"] == "final" and top["windows"] == 384
    assert top["share_best"] == ranking.table["share_best"].max()
    if screen:
        assert (ranking.table["stage"] == "screened out").sum() == len(space) - 6


def test_cli_json_ranks_best_first(bars, tmp_path, capsys):
    from flag_model.__main__ import main

    hidden = dict(num_heads=4, causal=False, norm_first=True, lora_scale=0.5)
    ck, csv = tmp_path / "hidden.pt", tmp_path / "bars.csv"
    ck.write_bytes(_train(bars, hidden))
    bars.to_csv(csv, index=False)
    assert main(["hypotheses", str(ck), str(csv), "--windows", "256", "--json", "--resamples", "200"]) == 0
    out = capsys.readouterr()
    entries = json.loads(out.out)
    assert len(entries) == 48 and [e["rank"] for e in entries] == list(range(1, 49))
    assert [e["nll"] for e in entries] == sorted(e["nll"] for e in entries)
    assert {k: entries[0][k] for k in hidden} == hidden
    assert entries[0]["nll_interval"][0] <= entries[0]["nll"] <= entries[0]["nll_interval"][1]
    assert "window passes" in out.err and "bootstrap" in out.err
    assert main(["hypotheses", str(ck), str(csv), "--windows", "64", "--heads", "3"]) == 2  # clear error, no trace
    assert "do not divide" in capsys.readouterr().err
