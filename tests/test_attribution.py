"""Captum attributions: completeness, concentration on the only feature that matters, perturbation oracles,
and that the shared model is left exactly as it was."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_model

from flag_model.analysis import attribution as A
from flag_model.data import FeatureMatrix, evenly_spaced

S, D = 12, 60
pytestmark = pytest.mark.filterwarnings("ignore:Setting forward, backward hooks")  # Captum, on our copy


@pytest.fixture(scope="module")
def model():
    return make_model(seed=3, max_length=32)


@pytest.fixture(scope="module")
def window() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((S, D)).astype(np.float32)


def single_feature_model(j: int = 7):
    """A FlagTrader whose output depends on input feature j only: every other state_embedding column is 0."""
    m = make_model(seed=5, max_length=32)
    with torch.no_grad():
        keep = m.state_embedding.weight[:, j].clone()
        m.state_embedding.weight.zero_()
        m.state_embedding.weight[:, j] = keep * 5
    return m


def direct_output(model, x: np.ndarray, position: int, target: int) -> float:
    """Independent oracle: the deciding logit straight from the model."""
    with torch.no_grad():
        return float(model(torch.tensor(x, dtype=torch.float32)[None])[0, position, target])


def test_integrated_gradients_completeness(model, window):
    res = A.attribute(model, window, A.IG, target=2, baseline=A.WINDOW_MEAN, steps=50)
    base = A.make_baseline(window, A.WINDOW_MEAN)
    fx, fb = direct_output(model, window, -1, 2), direct_output(model, base, -1, 2)
    assert res.f_input == pytest.approx(fx, abs=1e-5) and res.f_baseline == pytest.approx(fb, abs=1e-5)
    gap = res.attributions.sum() - (fx - fb)
    assert res.delta == pytest.approx(gap, abs=1e-5)  # the reported delta is the completeness gap
    assert abs(gap) <= abs(res.delta) + 1e-5
    assert abs(fx - fb) > 0.05 and res.relative_delta < 0.01
    assert res.relative_delta == pytest.approx(abs(res.delta) / abs(fx - fb), rel=1e-6)


def test_completeness_on_probabilities(model, window):
    res = A.attribute(model, window, A.IG, target=0, output="probability", steps=64)
    with torch.no_grad():
        p = model(torch.tensor(window)[None])[0, -1].softmax(-1)
    assert res.f_input == pytest.approx(float(p[0]), abs=1e-6)
    assert np.allclose(res.probabilities, p.numpy(), atol=1e-6)
    assert abs(res.attributions.sum() - (res.f_input - res.f_baseline)) <= abs(res.delta) + 1e-6


@pytest.mark.parametrize("method", A.METHODS)
def test_every_method_returns_time_by_feature(model, window, method):
    res = A.attribute(model, window, method, baseline=A.ZEROS, steps=8, occlusion_patch=(4, 3))
    assert res.attributions.shape == (S, D) and res.attributions.dtype == np.float32
    assert np.isfinite(res.attributions).all() and np.abs(res.attributions).sum() > 0
    assert res.target == int(np.argmax(res.probabilities))  # None explains the predicted class
    assert res.position == S - 1 and res.method == method
    assert (res.delta is not None) == (method in A.DELTA_METHODS)
    assert res.per_feature.shape == (D,) and res.per_time.shape == (S,)


@pytest.mark.parametrize("method", A.METHODS)
def test_attribution_concentrates_on_the_only_relevant_feature(method):
    j = 7
    m = single_feature_model(j)
    x = np.random.default_rng(1).standard_normal((S, D)).astype(np.float32)
    res = A.attribute(m, x, method, target=1, baseline=A.ZEROS, steps=16, occlusion_patch=(4, 1))
    mag = np.abs(res.attributions)
    assert mag[:, j].sum() > 0
    others = np.delete(mag, j, axis=1)
    assert others.max() <= 1e-6 * max(mag.max(), 1.0), f"{method} attributes to irrelevant features"
    assert A.feature_table(res)["feature"][0] == f"f{j}"


def test_feature_ablation_matches_direct_ablation(model, window):
    res = A.attribute(model, window, A.ABLATION, target=1, baseline=A.ZEROS, internal_batch_size=7)
    fx = direct_output(model, window, -1, 1)
    for j in (0, 13, 59):
        ablated = window.copy()
        ablated[:, j] = 0
        assert res.per_feature[j] == pytest.approx(fx - direct_output(model, ablated, -1, 1), abs=1e-5)
        assert np.allclose(res.attributions[:, j], res.attributions[0, j])  # spread evenly over time


def test_occlusion_matches_direct_patch_effect_and_covers_ragged_edges(model, window):
    res = A.attribute(model, window, A.OCCLUSION, target=0, baseline=A.WINDOW_MEAN, occlusion_patch=(5, 7))
    base = A.make_baseline(window, A.WINDOW_MEAN)
    fx = direct_output(model, window, -1, 0)
    for t0, f0 in ((0, 0), (10, 56)):  # an inner patch and the cut-off corner patch (2 steps x 4 features)
        t1, f1 = min(t0 + 5, S), min(f0 + 7, D)
        occluded = window.copy()
        occluded[t0:t1, f0:f1] = base[t0:t1, f0:f1]
        assert res.attributions[t0:t1, f0:f1].sum() == pytest.approx(
            fx - direct_output(model, occluded, -1, 0), abs=1e-5
        )


def test_flat_market_baseline_gives_the_deciding_step_nothing(model, window):
    res = A.attribute(model, window, A.IG, baseline=A.FLAT, steps=16)
    assert np.all(res.attributions[-1] == 0)
    assert np.abs(res.attributions[:-1]).sum() > 0


def test_deeplift_reports_its_delta_and_the_unsupported_nonlinearities(model, window):
    res = A.attribute(model, window, A.DEEPLIFT, target=2, baseline=A.ZEROS)
    gap = res.attributions.sum() - (res.f_input - res.f_baseline)
    assert res.delta == pytest.approx(gap, abs=1e-4)
    assert any("GELU" in n and "LayerNorm" in n for n in res.notes)


def test_auto_steps_doubles_until_the_threshold_or_the_cap(model, window):
    loose = A.attribute(model, window, A.IG, steps=4, auto_threshold=0.9)
    assert loose.steps == 4
    tight = A.attribute(model, window, A.IG, steps=2, auto_threshold=1e-4, max_steps=256)
    assert tight.steps > 2 and (tight.relative_delta < 1e-4 or tight.steps == 256)
    capped = A.attribute(model, window, A.IG, steps=2, auto_threshold=1e-9, max_steps=8)
    assert capped.steps == 8 and any("step cap" in n for n in capped.notes)


def test_completeness_levels(model, window):
    ig = A.attribute(model, window, A.IG, steps=50)
    assert A.completeness(ig)[0] == "good" and "relative delta" in A.completeness(ig)[1]
    rough = A.attribute(model, window, A.IG, steps=1)
    assert rough.relative_delta > 0.05 and A.completeness(rough, 0.05)[0] in ("fair", "poor")
    assert A.completeness(rough, threshold=rough.relative_delta * 2)[0] == "good"
    assert A.completeness(A.attribute(model, window, A.SALIENCY))[0] == "n/a"
    flat = A.attribute(model, np.repeat(window[-1:], S, axis=0), A.IG, baseline=A.FLAT, steps=4)  # x == baseline
    assert flat.relative_delta == 0.0 and A.completeness(flat)[0] == "good"


def test_shared_model_is_not_mutated_and_keeps_no_hooks(model, window):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for method in A.METHODS:
        A.attribute(model, window, method, steps=4, occlusion_patch=(6, 30))
    A.global_importance(model, np.stack([window, window[::-1]]), method=A.DEEPLIFT)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert not model.training
    for mod in model.modules():
        hooks = [
            mod._forward_hooks,
            mod._forward_pre_hooks,
            mod._backward_hooks,
            getattr(mod, "_backward_pre_hooks", {}),
        ]
        assert not any(hooks), f"hook left on {type(mod).__name__}"


def test_runs_inside_inference_mode_and_on_read_only_views(model, window):
    expected = A.attribute(model, window, A.IG, steps=8)
    view = np.lib.stride_tricks.sliding_window_view(window, S, axis=0).transpose(0, 2, 1)[0]  # read-only view
    with torch.inference_mode():
        got = A.attribute(model, view, A.IG, steps=8)
    assert np.allclose(got.attributions, expected.attributions, atol=1e-6)


def test_baselines():
    x = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    assert not A.make_baseline(x, A.ZEROS).any()
    assert np.allclose(A.make_baseline(x, A.WINDOW_MEAN)[1, 0], x[1].mean(0))
    assert np.allclose(A.make_baseline(x, A.FLAT)[:, 0], x[:, -1])
    assert np.allclose(A.make_baseline(x, A.MEANS, np.arange(4.0)), np.arange(4.0))
    with pytest.raises(ValueError, match="feature_means"):
        A.make_baseline(x, A.MEANS)
    with pytest.raises(ValueError, match="unknown baseline"):
        A.make_baseline(x, "median")


def _fm(values: np.ndarray, normalisation: str, names=("a", "b", "pad_0")) -> FeatureMatrix:
    return FeatureMatrix(
        values=values,
        times=pd.DatetimeIndex([]),
        close=np.zeros(len(values)),
        names=names,
        feature_set="simple-60",
        normalisation=normalisation,
        warnings=(),
    )


def test_feature_means_in_the_units_the_model_sees():
    values = np.array([[1, 10, 0], [3, 30, 0]], dtype=np.float32)
    mean, note = A.feature_means(_fm(values, "checkpoint"), {})
    assert not mean.any() and "normalisation" in note
    mean, note = A.feature_means(_fm(values, "none"), {"feature_mean": [5.0, 6.0], "feature_std": [1.0, 1.0]})
    assert mean.tolist() == [5.0, 6.0, 0.0] and "stored" in note
    mean, note = A.feature_means(_fm(values, "none"), {})
    assert mean.tolist() == [2.0, 20.0, 0.0] and "this data" in note


def test_bad_input_is_named(model, window):
    with pytest.raises(ValueError, match="60"):
        A.attribute(model, window[:, :10])
    with pytest.raises(ValueError, match="max_length"):
        A.attribute(model, np.zeros((40, D), np.float32))
    with pytest.raises(ValueError, match="position"):
        A.attribute(model, window, position=S)
    with pytest.raises(ValueError, match="target"):
        A.attribute(model, window, target=3)
    with pytest.raises(ValueError, match="unknown attribution method"):
        A.attribute(model, window, "LIME")
    bad = window.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        A.attribute(model, bad)


def test_global_importance_matches_single_windows_and_ranks_the_relevant_feature():
    m = single_feature_model(11)
    wins = np.random.default_rng(2).standard_normal((9, S, D)).astype(np.float32)
    calls = []
    gi = A.global_importance(
        m,
        wins,
        indices=[0, 3, 5, 8],
        method=A.IG,
        steps=8,
        batch_size=3,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert gi.totals.shape == (4, D) and gi.window_index.tolist() == [0, 3, 5, 8]
    assert calls == [(3, 4), (4, 4)]
    for row, i in enumerate(gi.window_index):  # batched Captum calls agree with one window at a time
        single = A.attribute(m, wins[i], A.IG, target=int(gi.targets[row]), steps=8)
        assert np.allclose(gi.totals[row], single.per_feature, atol=1e-5)
    assert np.array_equal(gi.targets, gi.predicted)
    table = gi.table()
    assert table["feature"][0] == "f11" and table["rank"].tolist() == list(range(1, D + 1))
    assert {f"mean_abs_{a}" for a in gi.action_names} <= set(table.columns)
    assert sum(gi.class_counts().values()) == 4


def test_global_importance_per_class_columns_average_over_that_class(model):
    wins = np.random.default_rng(4).standard_normal((24, S, D)).astype(np.float32)
    gi = A.global_importance(model, wins, method=A.IXG, target=0, batch_size=10)
    assert (gi.targets == 0).all()
    table = gi.table().set_index("feature")
    for c, name in enumerate(gi.action_names):
        rows = gi.predicted == c
        if rows.any():
            assert np.allclose(table.loc["f0", f"mean_abs_{name}"], np.abs(gi.totals[rows, 0]).mean())


def test_agreement_is_spearman(model, window):
    ig = A.attribute(model, window, A.IG, steps=16)
    corr = A.agreement([ig], extra={"reversed": -np.argsort(np.argsort(np.abs(ig.per_feature)))})
    assert corr.loc[A.IG, "reversed"] == pytest.approx(-1.0)
    roll = A.rollout_importance(model, window)
    assert roll.shape == (S,) and roll.sum() == pytest.approx(1.0)
    by_time = A.agreement([ig], "time", {"Attention rollout": roll})
    assert by_time.shape == (2, 2)
    with pytest.raises(ValueError, match="length"):
        A.rank_agreement({"a": np.zeros(3), "b": np.zeros(4)})


def test_evenly_spaced():
    assert evenly_spaced(10, 3).tolist() == [0, 4, 9]
    assert evenly_spaced(3, 10).tolist() == [0, 1, 2]
    with pytest.raises(ValueError):
        evenly_spaced(0, 5)


@pytest.mark.parametrize("method", A.METHODS)
def test_progress_counts_every_forward_pass(method):
    """The progress of one attribution reaches exactly 1.0: forward_rows predicts Captum's passes."""
    model = make_model(max_length=32)
    window = np.random.default_rng(0).standard_normal((12, 60)).astype(np.float32)
    calls: list[tuple[float, str]] = []
    A.attribute(
        model,
        window,
        method,
        steps=7,
        internal_batch_size=4,
        occlusion_patch=(5, 7),
        progress=lambda f, msg: calls.append((f, msg)),
    )
    fractions = [f for f, _ in calls]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    total = A.forward_rows(method, 1, 12, 60, 7, (5, 7))
    assert calls[-1][1].endswith(f"{total:,} / {total:,} model passes")
    assert sum(f < 1.0 for f in fractions) == len(fractions) - 1  # never full before the last pass


def test_merged_copy_is_the_same_function_and_follows_weight_changes():
    """Gradient methods run on a cached copy with LoRA merged into the base weights: same outputs as the model,
    never the model itself, rebuilt when a weight changes in place."""
    model = make_model(max_length=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 12, 60)
    fast = A._worker(model, A.IG)
    assert fast is not model and A._worker(model, A.SALIENCY) is fast
    assert not any(p.requires_grad for p in fast.parameters())
    torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is untouched
    assert A._worker(model, A.DEEPLIFT) is not fast  # hooks go on a fresh copy
    with torch.no_grad():
        model.transformer_blocks[0].attention.q_proj.lora.lora_B.mul_(3.0)
    again = A._worker(model, A.IG)
    assert again is not fast
    torch.testing.assert_close(again(x), model(x), rtol=1e-5, atol=1e-5)
