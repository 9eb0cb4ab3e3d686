"""What-if and faithfulness: edits against direct formulas, flips checked by an independent build_model forward,
the gradient search against random directions with the same budget, stability against a re-implementation,
deletion curves against random orders, and the shared model left exactly as it was."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from browser_util import model_fingerprint
from conftest import make_model

from flag_model import build_model, load_checkpoint
from flag_model.__main__ import main
from flag_model.analysis import attribution as A
from flag_model.analysis import faithfulness as F
from flag_model.analysis import whatif as W
from flag_model.data import checkpoint_features
from flag_model.demo import demo_data

pytestmark = pytest.mark.filterwarnings("ignore:Setting forward, backward hooks")
S = 32


@pytest.fixture(scope="module")
def demo(tiny_demo_path):
    """(checkpoint path, model, features) of the tiny demo on its own synthetic market."""
    ckpt = load_checkpoint(tiny_demo_path)
    return tiny_demo_path, build_model(ckpt), checkpoint_features(demo_data("tiny"), ckpt.meta, 60)


def decide(model, window: np.ndarray) -> np.ndarray:
    """Oracle: plain softmax at the last position of one window."""
    with torch.no_grad():
        return model(torch.tensor(np.asarray(window, np.float32))[None])[0, -1].softmax(-1).numpy()


def window_at(fm, end: int) -> np.ndarray:
    return fm.values[end - S : end]


def test_edits_change_exactly_the_chosen_cells_by_the_formula():
    rng = np.random.default_rng(0)
    w, src = rng.standard_normal((2, 10, 6)).astype(np.float32)
    mean = rng.standard_normal(6).astype(np.float32)
    feats, t0, t1 = (1, 4), 3, 7
    expected = {
        W.SET: lambda c, j: np.float32(2.5),
        W.ADD: lambda c, j: c + np.float32(2.5),
        W.MULTIPLY: lambda c, j: c * np.float32(2.5),
        W.ZERO: lambda c, j: 0.0,
        W.COPY: lambda c, j: src[t, j],
        W.MEAN: lambda c, j: mean[j],
    }
    for op, formula in expected.items():
        out = W.apply_edit(w, W.Edit(op, feats, t0, t1, 2.5), source=src, feature_mean=mean)
        for t in range(10):
            for j in range(6):
                want = formula(w[t, j], j) if (t0 <= t < t1 and j in feats) else w[t, j]
                assert out[t, j] == pytest.approx(want), (op, t, j)
    assert np.array_equal(W.apply_edit(w, W.Edit(W.MEAN, feats, t0, t1))[t0:t1][:, feats], np.zeros((4, 2)))
    for bad, kw in (
        (W.Edit(W.SET, (6,), 0, 1), {}),
        (W.Edit(W.SET, (0,), 5, 5), {}),
        (W.Edit(W.COPY, (0,), 0, 2), {}),
        (W.Edit("scale", (0,), 0, 2), {}),
        (W.Edit(W.SET, (), 0, 2), {}),
        (W.Edit(W.MULTIPLY, (0,), 0, 2, 1e39), {}),
    ):
        with pytest.raises(ValueError):
            W.apply_edit(w, bad, **kw)


def test_evaluate_edits_reports_the_plain_forward(demo):
    _, model, fm = demo
    w = window_at(fm, 2000)
    res = W.evaluate_edits(model, w, [W.Edit(W.ADD, (3, 9), S - 4, S, 1.5), W.Edit(W.ZERO, (0,), 0, S)])
    manual = w.copy()
    manual[S - 4 :, [3, 9]] += np.float32(1.5)
    manual[:, 0] = 0
    assert np.array_equal(res.edited, manual) and res.changed_cells == int((manual != w).sum())
    assert np.allclose(res.before, decide(model, w), atol=1e-6)
    assert np.allclose(res.after, decide(model, manual), atol=1e-6)


@pytest.mark.parametrize("end", [900, 3000, 6000])
def test_flip_holds_under_an_independent_build_model_forward(demo, end):
    path, model, fm = demo
    w = window_at(fm, end)
    target = W.runner_up(model, w)
    feats, steps = tuple(range(0, 60, 2)), (S - 8, S)
    res = W.smallest_flip(model, w, target, feats, steps, feature_names=fm.names)
    assert res.flipped
    fresh = build_model(load_checkpoint(path))  # our own forward, not the search's model object
    p = decide(fresh, res.edited)
    assert int(p.argmax()) == target != int(decide(fresh, w).argmax())
    assert np.allclose(p, res.after, atol=1e-6)
    allowed = W.cell_mask(w.shape, feats, steps)
    assert not (res.delta[~allowed]).any() and res.n_cells == len(res.cells()) > 0
    assert res.l1 == pytest.approx(float(np.abs(res.edited.astype(np.float64) - w).sum()))
    assert res.linf == pytest.approx(float(np.abs(res.cells()["change"]).max()))


@pytest.mark.parametrize("end", [900, 3000, 6000])
def test_gradient_flip_is_smaller_than_random_directions_with_the_same_budget(demo, end):
    _, model, fm = demo
    w = window_at(fm, end)
    target = W.runner_up(model, w)
    grad = W.smallest_flip(model, w, target, iterations=150)
    rand = W.random_flip(model, w, target, budget=grad.evaluations, seed=1)
    assert rand.evaluations <= grad.evaluations
    assert grad.flipped and rand.flipped  # both found one, so the sizes are comparable
    assert grad.l1 < rand.l1 and int(decide(model, rand.edited).argmax()) == target


def test_no_flip_is_reported_when_the_editable_cells_cannot_matter():
    model = make_model(seed=2, max_length=32)
    with torch.no_grad():
        model.state_embedding.weight[:, 5] = 0  # input feature 5 is ignored by the model
    w = np.random.default_rng(3).standard_normal((12, 60)).astype(np.float32)
    target = W.runner_up(model, w)
    res = W.smallest_flip(model, w, target, features=(5,), iterations=40)
    assert not res.flipped and int(decide(model, res.edited).argmax()) != target
    assert any("no edit within the budget" in n for n in res.notes)
    with pytest.raises(ValueError, match="already decides"):
        W.smallest_flip(model, w, int(decide(model, w).argmax()))


def test_searches_leave_the_shared_model_untouched(demo):
    _, model, fm = demo
    before = model_fingerprint(model)
    w = window_at(fm, 3000)
    W.smallest_flip(model, w, W.runner_up(model, w), iterations=20)
    W.decision_stability(model, w, np.ones(60, np.float32), ks=(0.5,), n_samples=4)
    F.randomisation_check(model, w, (A.IG, A.DEEPLIFT), steps=4)
    assert model_fingerprint(model) == before
    assert all(p.grad is None for p in model.parameters())


def test_stability_matches_a_direct_reimplementation(demo):
    _, model, fm = demo
    w = window_at(fm, 4000)
    sigma = W.feature_sigma(fm.values)
    ks, n = (0.0, 0.3, 3.0), 16
    res = W.decision_stability(model, w, sigma, ks, n_samples=n, seed=5, batch_size=10_000)
    rng = np.random.default_rng(5)  # spec: one draw of K*n noises, k-major, noise = N(0,1)*sigma*k
    noise = rng.standard_normal((len(ks) * n, S, 60)).astype(np.float32) * sigma
    noisy = w[None] + np.repeat(np.float32(ks), n)[:, None, None] * noise
    with torch.no_grad():
        got = model(torch.tensor(noisy))[:, -1].argmax(-1).numpy().reshape(len(ks), n)
    clean = int(decide(model, w).argmax())
    assert np.allclose(res.unchanged[0], (got == clean).mean(axis=1))
    assert res.unchanged[0, 0] == 1.0 and res.decisions[0] == clean
    calls: list[tuple[int, int]] = []
    many = W.decision_stability(
        model, np.stack([w, window_at(fm, 5000)]), sigma, ks, n_samples=4, progress=lambda d, t: calls.append((d, t))
    )
    assert calls == [(1, 2), (2, 2)] and many.unchanged.shape == (2, 3)
    assert list(many.curve().columns) == ["k", "share unchanged", "p10 over windows", "min over windows"]


def test_integrated_gradients_deletes_faster_than_random_orders(demo):
    _, model, fm = demo
    areas = []
    for end in (1500, 3000, 4500, 6000):
        w = window_at(fm, end)
        res = A.attribute(model, w, A.IG, steps=32)
        cv = F.deletion_insertion(model, w, res.attributions, res.target, A.make_baseline(w, A.ZEROS), A.IG)
        base_p = decide(model, A.make_baseline(w, A.ZEROS))[res.target]
        assert cv.deletion[0] == pytest.approx(res.probabilities[res.target], abs=1e-5)  # nothing deleted yet
        assert cv.deletion[-1] == pytest.approx(base_p, abs=1e-5) == cv.insertion[0]
        areas.append((cv.areas["deletion area"], cv.areas["random deletion area"]))
    ig, rand = np.array(areas).T
    assert (ig < rand).all(), areas


def test_faithfulness_table_and_randomisation_check(demo):
    _, model, fm = demo
    w = window_at(fm, 3000)
    res = F.faithfulness(model, w, (A.IG, A.SALIENCY, A.IXG), steps=16, n_random=4, sensitivity_samples=2)
    assert list(res.table["method"]) == [A.IG, A.SALIENCY, A.IXG]
    assert np.isfinite(res.table[["infidelity", "sensitivity max"]].to_numpy()).all()
    assert (res.table[["infidelity", "sensitivity max"]].to_numpy() >= 0).all()
    # with a zero baseline Saliency's perturbation x*mask times the gradient equals Input×Gradient's mask*(x*grad)
    assert res.table["infidelity"][1] == pytest.approx(res.table["infidelity"][2], rel=1e-4)
    table = F.randomisation_check(model, w, (A.IG, A.SALIENCY), steps=8)
    assert list(table["blocks randomised"].unique()) == [0, 1, 2]
    assert (table[table["blocks randomised"] == 0]["spearman"] == 1).all()
    assert (table[table["blocks randomised"] == 2]["spearman"] < 1).all()


def test_randomised_copy_changes_only_the_top_blocks_adapters(demo):
    _, model, _ = demo
    clone = F.randomised_copy(model, 1)
    orig, new = model.state_dict(), clone.state_dict()
    top = f"transformer_blocks.{len(model.transformer_blocks) - 1}."
    changed = {k for k in orig if not torch.equal(orig[k], new[k])}
    assert changed and all(k.startswith(top) and ".lora." in k for k in changed)
    assert all(".lora.lora_A" in k or ".lora.lora_B" in k for k in changed)


def test_cli_whatif_json_is_checkable_with_our_own_forward(demo, tmp_path, capsys):
    path, _, fm = demo
    csv = tmp_path / "market.csv"
    demo_data("tiny").to_csv(csv, index=False)
    at, names = str(fm.times[3000 - 1]), ("SELL", "HOLD", "BUY")
    fresh = build_model(load_checkpoint(path))
    target = names[int(np.argsort(decide(fresh, window_at(fm, 3000)))[-2])]
    assert main(["whatif", str(path), str(csv), "--at", at, "--target", target, "--last", "6", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    window, edited = (np.array(out[k], dtype=np.float32) for k in ("window", "edited_window"))
    assert window.shape == edited.shape == (S, 60) and np.array_equal(window, window_at(fm, 3000))
    assert out["decision_before"] == names[int(decide(fresh, window).argmax())] != target
    assert out["flipped"] and out["target"] == target == names[int(decide(fresh, edited).argmax())]
    assert np.allclose([out["probabilities_after"][n] for n in names], decide(fresh, edited), atol=1e-6)
    assert len(out["edited_cells"]) == int((edited != window).sum()) > 0
    assert all(c["offset"] > -6 for c in out["edited_cells"])
    assert main(["whatif", str(path), str(csv), "--at", at, "--features", "rsi_14,ret_5", "macd", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {c["feature"] for c in out["edited_cells"]} <= {"rsi_14", "ret_5", "macd"}
    assert out["flipped"] == (
        out["target"] == names[int(decide(fresh, np.array(out["edited_window"], np.float32)).argmax())]
    )
    assert main(["whatif", str(path), str(csv), "--at", "1990-01-01"]) == 2
    assert main(["whatif", str(path), str(csv), "--at", at, "--features", "nope"]) == 2
    assert "unknown feature" in capsys.readouterr().err
