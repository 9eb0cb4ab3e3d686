"""The inference engine against the reference model (the FlagTrader forward) and stock torch modules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_model
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from flag_model import engine as eng_mod
from flag_model.data import rolling_windows
from flag_model.engine import InferenceEngine, default_batch_size, forward_flops

VARIANTS = [
    pytest.param(dict(), id="post-norm"),
    pytest.param(dict(norm_first=True), id="pre-norm"),
    pytest.param(dict(causal=True), id="post-norm-causal"),
    pytest.param(dict(norm_first=True, causal=True), id="pre-norm-causal"),
    pytest.param(dict(targets=()), id="no-lora"),
    pytest.param(
        dict(causal=True, targets=("transformer_blocks.1.ffn.3", "transformer_blocks.0.attention.v_proj")),
        id="some-lora-causal",
    ),
]


@pytest.mark.parametrize("kw", VARIANTS)
@pytest.mark.parametrize("length", [1, 17, 32])
def test_exact_engine_equals_reference(kw, length):
    model = make_model(3, **kw)
    x = torch.randn(4, length, 60, generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        ref = model(x)
    engine = InferenceEngine(model, "exact")
    torch.testing.assert_close(engine(x, last_only=False), ref, atol=1e-5, rtol=0)  # blocks: every position
    torch.testing.assert_close(engine(x, last_only=True), ref[:, -1], atol=1e-5, rtol=0)  # rolling: the decision


@pytest.mark.parametrize("norm_first", [False, True])
def test_engine_equals_stock_transformer_layers(norm_first):
    """Independent oracle: nn.TransformerEncoderLayer loaded with the merged weights."""
    model = make_model(5, norm_first=norm_first)
    cfg = model.config
    layers = []
    for blk in model.transformer_blocks:
        layer = nn.TransformerEncoderLayer(
            cfg.d_model,
            cfg.num_heads,
            cfg.ffn_dim,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=norm_first,
            layer_norm_eps=cfg.ln_eps,
        )
        att = blk.attention
        with torch.no_grad():
            layer.self_attn.in_proj_weight.copy_(
                torch.cat([att.q_proj.merged_weight(), att.k_proj.merged_weight(), att.v_proj.merged_weight()])
            )
            layer.self_attn.in_proj_bias.copy_(
                torch.cat([att.q_proj.base.bias, att.k_proj.base.bias, att.v_proj.base.bias])
            )
            layer.self_attn.out_proj.weight.copy_(att.out_proj.merged_weight())
            layer.self_attn.out_proj.bias.copy_(att.out_proj.base.bias)
            layer.linear1.weight.copy_(blk.ffn[0].merged_weight())
            layer.linear1.bias.copy_(blk.ffn[0].base.bias)
            layer.linear2.weight.copy_(blk.ffn[3].merged_weight())
            layer.linear2.bias.copy_(blk.ffn[3].base.bias)
            for name in ("norm1", "norm2"):
                getattr(layer, name).load_state_dict(getattr(blk, name).state_dict())
        layers.append(layer.eval())
    x = torch.randn(3, 20, 60, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h = model.state_embedding(x) + model.pos_embedding[:, :20]
        for layer in layers:
            h = layer(h)
        oracle = model.action_head(model.output_norm(h))
    torch.testing.assert_close(InferenceEngine(model, "exact")(x, last_only=False), oracle, atol=1e-5, rtol=0)


def test_engine_leaves_the_model_untouched_and_owns_its_weights():
    model = make_model(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = InferenceEngine(model, "exact")
    engine(torch.randn(2, 8, 60))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    params = {p.data_ptr() for p in model.parameters()}
    owned = [
        engine.w_embed,
        engine.pos,
        engine.w_head,
        *(t for b in engine.blocks for t in (b.w_qkv, b.w_out, b.w_ffn1)),
    ]
    assert not params & {t.data_ptr() for t in owned}
    assert all(m.lora_enabled for m in model.linears().values())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_ablated_copy_is_respected():
    """An engine built from a copy with LoRA switched off equals that copy's forward."""
    import copy

    model = copy.deepcopy(make_model(2))
    model.transformer_blocks[0].ffn[0].lora_enabled = False
    x = torch.randn(2, 10, 60)
    with torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(InferenceEngine(model, "exact")(x, last_only=False), ref, atol=1e-5, rtol=0)


def test_run_batches_views_and_matches_forward():
    model = make_model(4)
    values = np.random.default_rng(0).standard_normal((70, 60)).astype(np.float32)
    windows = rolling_windows(values, 16)
    assert np.shares_memory(windows, values)  # a view, never a copy of the data
    seen = []
    engine = InferenceEngine(model, "exact", batch_size=7)
    out = engine.run(windows, last_only=True, progress=lambda done, total: seen.append((done, total)))
    with torch.no_grad():
        ref = model(torch.from_numpy(np.ascontiguousarray(windows)))[:, -1].numpy()
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
    assert seen[-1] == (len(windows), len(windows)) and len(seen) == -(-len(windows) // 7)
    full = engine.run(windows[:5], last_only=False)
    assert full.shape == (5, 16, 3)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [24, 300])  # batched-matmul attention up to 256 positions, SDPA above
def test_fast_path_agreement_is_measured(causal, length):
    """bf16 (where native) against float32: logits close and argmax agreement high on a random model."""
    model = make_model(6, d=32, f=64, heads=4, causal=causal, max_length=320)
    x = torch.randn(512 if length < 100 else 64, length, 60, generator=torch.Generator().manual_seed(2))
    fast, exact = InferenceEngine(model, "fast"), InferenceEngine(model, "exact")
    a, b = fast(x), exact(x)
    torch.testing.assert_close(fast(x, last_only=False)[:, -1], a, atol=2e-2, rtol=2e-2)  # last-only = full
    agreement = (a.argmax(1) == b.argmax(1)).float().mean().item()
    mean_dev = ((a - b).abs().mean() / b.std()).item()  # bf16 keeps 8 bits of mantissa: ~1 % of a logit std
    if fast.dtype == torch.float32:
        assert "float32" in fast.info.reason and agreement == 1.0
    else:
        assert fast.dtype in (torch.bfloat16, torch.float16)
        assert mean_dev < 0.05, f"fast logits deviate by {mean_dev:.3f} logit std on average"
        assert agreement >= 0.97, f"argmax agreement {agreement:.3f}"


def test_bf16_detection_reads_cpu_flags(monkeypatch):
    monkeypatch.setattr(eng_mod, "cpu_flags", lambda: {"avx2", "fma"})
    native, why = eng_mod.cpu_bf16_native()
    assert not native and "avx512_bf16" in why
    monkeypatch.setattr(eng_mod, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    native, why = eng_mod.cpu_bf16_native()
    assert native == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    monkeypatch.setattr(eng_mod, "cpu_flags", set)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    e = InferenceEngine(make_model(0), "fast")
    assert e.dtype == torch.float32 and "float32" in e.info.reason


def test_bad_arguments():
    model = make_model(0)
    with pytest.raises(ValueError, match="precision"):
        InferenceEngine(model, "turbo")
    engine = InferenceEngine(model, "exact")
    with pytest.raises(ValueError, match="60"):
        engine(torch.randn(2, 8, 45))
    with pytest.raises(ValueError, match="max_length"):
        engine(torch.randn(1, 33, 60))


def test_flop_formula_matches_flop_counter(monkeypatch):
    """forward_flops against torch's FlopCounterMode. The counter sees neither SDPA on CPU (its term is added
    by hand) nor oneDNN's fused linear (switched off here; the FLOPs are the same)."""
    monkeypatch.setitem(eng_mod._onednn_checked, torch.float32, False)
    model = make_model(0)
    cfg, s = model.config, 20
    x = torch.randn(1, s, 60)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x)
    assert fc.get_total_flops() == forward_flops(cfg, s, last_only=False, lora=True)
    engine = InferenceEngine(model, "exact")
    for last_only in (False, True):
        with FlopCounterMode(display=False) as fc:
            engine(x, last_only=last_only)
        # The decision query's attention (last_only) runs as batched matmuls, which the counter sees.
        attention = 4 * s * s * cfg.d_model * (cfg.n_blocks - 1) + (0 if last_only else 4 * s * s * cfg.d_model)
        assert fc.get_total_flops() + attention == forward_flops(cfg, s, last_only=last_only)


def test_default_batch_size_fills_the_cache(monkeypatch):
    cfg = make_model(0).config
    monkeypatch.setattr(eng_mod, "last_level_cache_bytes", lambda: 32 << 20)
    rows = min((16 << 20) // (cfg.ffn_dim * 2), 16384)
    assert default_batch_size(cfg, 64, 2) == min(rows // 64, (8 << 20) // (cfg.num_heads * 64 * 64 * 2))
    assert default_batch_size(cfg, 256, 2) == (8 << 20) // (cfg.num_heads * 256 * 256 * 2)  # scores decide
    assert default_batch_size(cfg, 256, 4, scores=False) == min((16 << 20) // (cfg.ffn_dim * 4), 16384) // 256
    assert default_batch_size(cfg, 10_000, 4) == 1
