"""The reconstruction against stock PyTorch modules loaded with LoRA-merged weights (independent oracle)."""

from __future__ import annotations

import pytest
import torch
from conftest import full_layout_config, make_model, randomize
from torch import nn

from flag_model import ModelMismatchError, build_model
from flag_model.model import FlagTrader, expected_shapes


class StockStack(nn.Module):
    """Embedding + nn.TransformerEncoderLayer stack + norm + head, the way stock PyTorch would write it."""

    def __init__(self, model: FlagTrader) -> None:
        super().__init__()
        cfg = model.config
        self.pos = model.pos_embedding.detach().clone()
        self.embed = nn.Linear(cfg.state_dim, cfg.d_model)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                cfg.d_model,
                cfg.num_heads,
                cfg.ffn_dim,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=cfg.norm_first,
                layer_norm_eps=cfg.ln_eps,
            )
            for _ in range(cfg.n_blocks)
        )
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.head = nn.Linear(cfg.d_model, cfg.n_actions)
        self.causal = cfg.causal
        with torch.no_grad():
            self.embed.load_state_dict(model.state_embedding.state_dict())
            self.norm.load_state_dict(model.output_norm.state_dict())
            self.head.load_state_dict(model.action_head.state_dict())
            for layer, block in zip(self.layers, model.transformer_blocks):
                att = block.attention
                layer.self_attn.in_proj_weight.copy_(
                    torch.cat([p.merged_weight() for p in (att.q_proj, att.k_proj, att.v_proj)])
                )
                layer.self_attn.in_proj_bias.copy_(
                    torch.cat([p.base.bias for p in (att.q_proj, att.k_proj, att.v_proj)])
                )
                layer.self_attn.out_proj.weight.copy_(att.out_proj.merged_weight())
                layer.self_attn.out_proj.bias.copy_(att.out_proj.base.bias)
                layer.linear1.weight.copy_(block.ffn[0].merged_weight())
                layer.linear1.bias.copy_(block.ffn[0].base.bias)
                layer.linear2.weight.copy_(block.ffn[3].merged_weight())
                layer.linear2.bias.copy_(block.ffn[3].base.bias)
                layer.norm1.load_state_dict(block.norm1.state_dict())
                layer.norm2.load_state_dict(block.norm2.state_dict())
        self.eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        S = x.shape[1]
        mask = torch.ones(S, S, dtype=torch.bool).triu(1) if self.causal else None
        h = self.embed(x) + self.pos[:, :S]
        maps = []
        for layer in self.layers:
            # Attention probabilities of this layer from stock MultiheadAttention on the same input.
            q_in = layer.norm1(h) if layer.norm_first else h
            _, w = layer.self_attn(q_in, q_in, q_in, attn_mask=mask, need_weights=True, average_attn_weights=False)
            maps.append(w)
            h = layer(h, src_mask=mask)
        return self.head(self.norm(h)), maps


def _check(model: FlagTrader, batch: int = 3, seq: int = 11, atol: float = 1e-5) -> None:
    x = torch.randn(batch, seq, model.config.state_dim, generator=torch.Generator().manual_seed(1))
    stock = StockStack(model)
    with torch.no_grad():
        ours, our_maps = model(x, return_attention=True)
        theirs, their_maps = stock(x)
    assert ours.shape == (batch, seq, model.config.n_actions)
    torch.testing.assert_close(ours, theirs, atol=atol, rtol=0)
    for a, b in zip(our_maps, their_maps):
        assert a.shape == (batch, model.config.num_heads, seq, seq)
        torch.testing.assert_close(a, b, atol=atol, rtol=0)


@pytest.mark.parametrize(
    "assumptions", [{}, {"norm_first": True}, {"causal": True}, {"norm_first": True, "causal": True}]
)
def test_tiny_model_matches_stock_transformer(assumptions):
    _check(make_model(**assumptions))


def test_lora_is_not_trivially_zero(tiny_model):
    x = torch.randn(2, 5, 60)
    ablated = make_model()
    for m in ablated.linears().values():
        m.lora_enabled = False
    with torch.no_grad():
        assert (tiny_model(x) - ablated(x)).abs().max() > 1e-3


def test_lora_on_a_subset_and_no_lora_at_all():
    _check(make_model(targets=("transformer_blocks.0.attention.v_proj", "transformer_blocks.1.ffn.3")))
    model = make_model(targets=())
    assert not any(".lora." in k for k in model.state_dict())
    _check(model)


def test_full_343_tensor_layout_matches_stock():
    model = randomize(FlagTrader(full_layout_config()), seed=3)
    sd = model.state_dict()
    assert len(sd) == 343
    assert sum(t.numel() for t in sd.values()) == 10_444_291 == model.config.param_count()
    _check(model, batch=2, seq=64)


def test_d768_layout_shapes_and_count():
    cfg = full_layout_config(768, 3072)
    shapes = expected_shapes(cfg)
    assert len(shapes) == 343
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 87_955_971 == cfg.param_count()
    assert shapes["transformer_blocks.11.ffn.0.lora.lora_A"] == (768, 16)
    assert shapes["transformer_blocks.11.ffn.0.lora.lora_B"] == (16, 3072)


def test_build_model_is_strict_and_names_every_bad_key(tiny_state_dict):
    model = build_model(tiny_state_dict)
    assert not model.training
    bad = dict(tiny_state_dict)
    bad.pop("transformer_blocks.1.norm2.bias")
    bad["transformer_blocks.0.q_proj.lora_A"] = torch.zeros(16, 4)
    bad["transformer_blocks.0.ffn.0.lora.lora_A"] = torch.zeros(4, 16)
    with pytest.raises(ModelMismatchError) as err:
        build_model(bad)
    assert err.value.missing == ["transformer_blocks.1.norm2.bias"]
    assert err.value.unexpected == ["transformer_blocks.0.q_proj.lora_A"]
    assert err.value.mismatched == [("transformer_blocks.0.ffn.0.lora.lora_A", (4, 16), (16, 4))]
    text = str(err.value)
    assert "1 missing, 1 unexpected, 1 mis-shaped" in text and "file [4, 16] vs model [16, 4]" in text


def test_heads_change_attention_but_are_validated(tiny_state_dict):
    x = torch.randn(1, 6, 60)
    with torch.no_grad():
        a = build_model(tiny_state_dict, num_heads=4)(x)
        b = build_model(tiny_state_dict, num_heads=2)(x)
    assert (a - b).abs().max() > 1e-4
    with pytest.raises(ValueError, match="do not divide"):
        build_model(tiny_state_dict, num_heads=3)


def test_lora_scale_matches_merged_formula(tiny_model):
    lin = tiny_model.transformer_blocks[0].attention.q_proj
    x = torch.randn(4, 16)
    lin2 = make_model().transformer_blocks[0].attention.q_proj
    lin2.scale = 2.0
    expected = x @ (lin2.base.weight + 2.0 * (lin2.lora.lora_A @ lin2.lora.lora_B).T).T + lin2.base.bias
    with torch.no_grad():
        torch.testing.assert_close(lin2(x), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(lin(x), x @ lin.merged_weight().T + lin.base.bias, atol=1e-5, rtol=0)


def test_bad_input_shapes_are_explained(tiny_model):
    with pytest.raises(ValueError, match=r"\(batch, window, 60\)"):
        tiny_model(torch.randn(2, 5, 45))
    with pytest.raises(ValueError, match="outside 1..32"):
        tiny_model(torch.randn(1, 33, 60))
