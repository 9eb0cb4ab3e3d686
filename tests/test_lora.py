"""LoRA metrics against direct dense formulas, flags, spectra and ablation against a LoRA-free model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import make_config, make_model

from flag_model.analysis import lora
from flag_model.model import FlagTrader

PATH = "transformer_blocks.1.ffn.0"


def dense_metrics(lin) -> dict[str, float]:
    """The textbook definitions on the dense ΔW = scale·(A @ B)ᵀ [out, in], in float64."""
    A, B = lin.lora.lora_A.detach().double(), lin.lora.lora_B.detach().double()
    W = lin.base.weight.detach().double()
    delta = lin.scale * (A @ B).T
    s = torch.linalg.svdvals(delta)
    r = A.shape[1]
    U, _, Vh = torch.linalg.svd(delta, full_matrices=False)
    p = s[:r] / s[:r].sum()
    return {
        "delta_fro": float(torch.linalg.matrix_norm(delta)),
        "rel_norm": float(torch.linalg.matrix_norm(delta) / torch.linalg.matrix_norm(W)),
        "spectral": float(torch.linalg.matrix_norm(delta, ord=2)),
        "stable_rank": float(torch.linalg.matrix_norm(delta) ** 2 / s[0] ** 2),
        "effective_rank": math.exp(float(-(p * p.log()).sum())),
        "amplification": float(torch.linalg.matrix_norm(delta) / torch.linalg.matrix_norm(U[:, :r].T @ W @ Vh[:r].T)),
        "a_fro": float(torch.linalg.matrix_norm(A)),
        "b_fro": float(torch.linalg.matrix_norm(B)),
    }


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_metrics_equal_dense_formulas(scale):
    model = make_model(seed=3, lora_scale=scale)
    df = lora.adapter_metrics(model).set_index("path")
    assert len(df) == 12
    for path, lin in model.linears().items():
        expected = dense_metrics(lin)
        for col, value in expected.items():
            assert df.loc[path, col] == pytest.approx(value, rel=1e-4), (path, col)
    assert set(lora.METRICS) <= set(df.columns)


def test_lowrank_svd_matches_dense_svd():
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(40, 5, generator=g), torch.randn(5, 24, generator=g)
    svd = lora.lowrank_svd(A, B, 2.0)
    delta = 2.0 * (A.double() @ B.double()).T
    torch.testing.assert_close(svd.S, torch.linalg.svdvals(delta)[:5])
    torch.testing.assert_close(svd.U @ torch.diag(svd.S) @ svd.V.T, delta)


def test_dead_adapter_is_flagged_and_others_are_not():
    model = make_model(seed=4)
    with torch.no_grad():
        model.linears()[PATH].lora.lora_B.zero_()
    df = lora.adapter_metrics(model).set_index("path")
    assert df.loc[PATH, "dead"] and "dead" in df.loc[PATH, "flags"]
    assert df.loc[PATH, "delta_fro"] == 0 and df.loc[PATH, "amplification"] == 0
    assert not df.drop(index=PATH)["dead"].any()


def test_dominating_and_outlier_flags():
    model = make_model(seed=5, n_blocks=6)
    with torch.no_grad():
        model.linears()["transformer_blocks.2.attention.v_proj"].lora.lora_B.mul_(1e3)
    df = lora.adapter_metrics(model).set_index("path")
    row = df.loc["transformer_blocks.2.attention.v_proj"]
    assert row["dominating"] and row["outlier"] and row["outlier_z"] > 0
    assert df["outlier"].sum() == 1


def test_metric_grid_is_blocks_by_modules():
    model = make_model(seed=6)
    df = lora.adapter_metrics(model)
    grid = lora.metric_grid(df, "delta_fro")
    assert list(grid.columns) == ["q", "k", "v", "out", "ffn.0", "ffn.3"] and list(grid.index) == [0, 1]
    assert grid.loc[1, "ffn.0"] == df.set_index("path").loc[PATH, "delta_fro"]


def test_metric_grid_leaves_gaps_for_unadapted_modules():
    targets = ("transformer_blocks.0.attention.q_proj", "transformer_blocks.1.ffn.3")
    df = lora.adapter_metrics(make_model(seed=7, targets=targets))
    grid = lora.metric_grid(df, "spectral")
    assert grid.shape == (2, 2) and grid.isna().sum().sum() == 2


def test_spectra_equal_dense_singular_values():
    model = make_model(seed=8)
    lin = model.linears()[PATH]
    sp = lora.spectra(model, PATH)
    W = lin.base.weight.detach()
    delta = lin.delta_weight().detach()
    np.testing.assert_allclose(sp["W"], torch.linalg.svdvals(W).numpy(), rtol=1e-5)
    np.testing.assert_allclose(sp["W + ΔW"], torch.linalg.svdvals(W + delta).numpy(), rtol=1e-4, atol=1e-6)
    r = lin.lora.lora_A.shape[1]
    np.testing.assert_allclose(sp["ΔW"][:r], torch.linalg.svdvals(delta).numpy()[:r], rtol=1e-4)
    assert sp["ΔW"][r:].isna().all()


def test_adapter_paths_intersects_blocks_and_modules():
    model = make_model()
    assert len(lora.adapter_paths(model)) == 12
    assert lora.adapter_paths(model, blocks=[1], modules=["ffn.0", "attention.q_proj"]) == [
        "transformer_blocks.1.attention.q_proj",
        PATH,
    ]
    assert lora.adapter_paths(model, blocks=[]) == []


def windows(n: int = 6, s: int = 10, d: int = 60, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, s, d)).astype(np.float32)


def test_ablating_every_adapter_equals_the_lora_free_model():
    model = make_model(seed=9)
    before_sd = {k: v.clone() for k, v in model.state_dict().items()}
    x = windows()
    result = lora.ablate(model, x, lora.adapter_paths(model))
    base = FlagTrader(make_config(targets=()))
    base.load_state_dict({k: v for k, v in model.state_dict().items() if ".lora." not in k})
    base.eval()
    with torch.no_grad():
        expected = base(torch.from_numpy(x))[:, -1].softmax(-1).numpy()
        full = model(torch.from_numpy(x))[:, -1].softmax(-1).numpy()
    np.testing.assert_allclose(result.after, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.before, full, rtol=1e-5, atol=1e-6)
    assert np.abs(result.after - result.before).max() > 1e-3  # the adapters matter in this model
    # the shared model is untouched: flags and weights as before
    assert all(lin.lora_enabled for lin in model.linears().values())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_sd[k])


def test_ablating_one_block_equals_zeroing_its_b():
    model = make_model(seed=10)
    x = windows(seed=1)
    paths = lora.adapter_paths(model, blocks=[0])
    result = lora.ablate(model, x, paths)
    zeroed = make_model(seed=10)
    with torch.no_grad():
        for p in paths:
            zeroed.linears()[p].lora.lora_B.zero_()
    np.testing.assert_allclose(result.after, lora.decision_probs(zeroed, x), rtol=1e-5, atol=1e-6)
    summary = result.summary()
    assert list(summary["action"]) == ["SELL", "HOLD", "BUY"]
    np.testing.assert_allclose(summary["decided (ablated)"].sum(), 1.0)
    np.testing.assert_allclose(summary["Δ mean p"], result.after.mean(0) - result.before.mean(0))
    assert 0.0 <= result.flipped <= 1.0


def test_ablating_an_unadapted_module_is_an_error():
    model = make_model(targets=("transformer_blocks.0.ffn.0",))
    with pytest.raises(ValueError, match="not an adapted module"):
        lora.ablate(model, windows(), ["transformer_blocks.1.ffn.0"])
