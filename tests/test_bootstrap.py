"""Block-bootstrap intervals against direct formulas and known distributions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from flag_model.analysis.bootstrap import draws, f1_macro, replicate_sums, score_intervals, unit_sums
from flag_model.analysis.predict import NO_LABEL, Predictions, decision_rows, evaluate, evaluate_arrays


def test_unit_sums_are_direct_block_sums():
    v = np.arange(20, dtype=float).reshape(10, 2)
    got = unit_sums(v, block=3)
    assert got.shape == (8, 2)
    np.testing.assert_allclose(got, [v[i : i + 3].sum(0) for i in range(8)])
    groups = np.array([5, 5, 5, 7, 7, 9, 9, 9, 9, 9])
    np.testing.assert_allclose(unit_sums(v, groups=groups), [v[:3].sum(0), v[3:5].sum(0), v[5:].sum(0)])


def test_iid_accuracy_interval_matches_the_binomial_normal_approximation():
    """Block length 1 on independent hits: the percentile interval is the binomial one, p ± z·√(p(1−p)/n)."""
    rng = np.random.default_rng(3)
    n, p = 4000, 0.6
    labels = rng.integers(0, 3, n)
    hit = rng.random(n) < p
    actions = np.where(hit, labels, (labels + 1) % 3)
    ci = score_intervals(labels, actions, 3, block=1, n_boot=3000, seed=1)
    acc = hit.mean()
    half = 1.959964 * np.sqrt(acc * (1 - acc) / n)
    assert ci.accuracy[0] == pytest.approx(acc - half, abs=0.15 * half)
    assert ci.accuracy[1] == pytest.approx(acc + half, abs=0.15 * half)


def test_whole_window_resampling_has_the_direct_variance():
    """Equal windows resampled whole: the replicate accuracy is the mean of G drawn window means, so its
    variance is var(window means) / G (population variance)."""
    rng = np.random.default_rng(4)
    G, w = 60, 10
    window_p = rng.uniform(0.2, 0.9, G)  # windows differ: strong dependence inside a window
    hit = (rng.random((G, w)) < window_p[:, None]).astype(float)
    units = unit_sums(np.c_[hit.ravel(), np.ones(G * w)], groups=np.repeat(np.arange(G), w))
    reps = replicate_sums(units, G, n_boot=4000, seed=2)
    acc = reps[:, 0] / reps[:, 1]
    direct = hit.mean(1).std() / np.sqrt(G)
    assert acc.std() == pytest.approx(direct, rel=0.08)
    assert acc.mean() == pytest.approx(hit.mean(), abs=0.2 * direct)


def test_f1_replicates_equal_scores_of_explicitly_resampled_arrays():
    """The vectorised F1 of each replicate is evaluate_arrays' F1 of the resampled samples themselves."""
    rng = np.random.default_rng(5)
    n, b = 300, 7
    labels, actions = rng.integers(0, 3, n), rng.integers(0, 3, n)
    units = unit_sums(np.eye(9)[labels * 3 + actions], block=b)
    k = round(n / b)
    reps = replicate_sums(units, k, n_boot=5, seed=9)
    starts = next(draws(len(units), k, 5, seed=9))
    for rep, s in zip(reps, starts):
        idx = (s[:, None] + np.arange(b)).ravel()
        direct = evaluate_arrays(labels[idx], actions[idx], ("SELL", "HOLD", "BUY"))
        assert f1_macro(rep.reshape(3, 3)) == pytest.approx(direct.f1_macro)
        assert np.trace(rep.reshape(3, 3)) / rep.sum() == pytest.approx(direct.accuracy)


def test_evaluate_adds_intervals_by_position_in_blocks_mode():
    rng = np.random.default_rng(6)
    w, k = 8, 40
    n = w * k + 3  # a partial block at the end
    position = np.r_[np.tile(np.arange(w), k), np.arange(w - 3, w)]
    labels = rng.integers(0, 3, n)
    actions = np.where(position < 4, labels, rng.integers(0, 3, n))  # early positions always right
    labels[-1] = NO_LABEL
    pred = Predictions(
        times=pd.date_range("2025-01-01", periods=n, freq="5min"),
        close=np.ones(n),
        logits=np.zeros((n, 3), np.float32),
        row=np.arange(n),
        position=position,
        labels=labels,
        window=w,
        mode="blocks",
        actions=("SELL", "HOLD", "BUY"),
    )
    m = evaluate(pred, actions, n_boot=300)
    ci = m.intervals
    assert ci.accuracy[0] < m.accuracy < ci.accuracy[1] and ci.f1_macro[0] < m.f1_macro < ci.f1_macro[1]
    bp = m.by_position
    assert list(bp.columns) == ["position", "n", "accuracy", "lo", "hi"]
    assert (bp.loc[:3, ["lo", "hi"]].to_numpy() == 1.0).all()  # always right: no spread
    assert ((bp["lo"] <= bp["accuracy"]) & (bp["accuracy"] <= bp["hi"])).all()
    assert "41 windows" in ci.method
    np.testing.assert_array_equal(decision_rows(pred), np.flatnonzero(position == w - 1))
    assert evaluate(pred, actions).intervals is None  # only when asked for
