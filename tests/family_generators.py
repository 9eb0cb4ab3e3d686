"""Our own generators of every layout family, at any size, built like the original classes (shared/layouts/):
stock torch modules where the real ones used them (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.Embedding),
the real saved-object layouts, and real dataclass / argparse / numpy objects in the pickles where the real files had
them. Each `make_*` returns (file name, bytes or a folder writer, the facts a recogniser must find)."""

from __future__ import annotations

import argparse
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from conftest import make_model
from torch import nn


def _save(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _optimizer_state(model: nn.Module) -> dict:
    return torch.optim.AdamW(model.parameters(), lr=1e-4).state_dict()


# ------------------------------------------------------------------------------ Transformer-A2C


class SinusoidalPE(nn.Module):
    def __init__(self, d: int, length: int) -> None:
        super().__init__()
        pos = torch.arange(length).unsqueeze(1)
        div = torch.exp(torch.arange(0, d, 2) * (-math.log(10000.0) / d))
        pe = torch.zeros(1, length, d)
        pe[0, :, 0::2], pe[0, :, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
        self.register_buffer("pe", pe)


class A2CBlock(nn.Module):
    def __init__(self, d: int, heads: int, f: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attention = nn.MultiheadAttention(d, heads, dropout=0.1, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(d, f), nn.GELU(), nn.Dropout(0.2), nn.Linear(f, d), nn.Dropout(0.2))


class A2CEncoder(nn.Module):
    def __init__(self, inputs: int, d: int, heads: int, layers: int, context: int) -> None:
        super().__init__()
        self.input_proj = nn.Sequential(nn.Linear(inputs, d), nn.LayerNorm(d), nn.GELU())
        self.pos_encoding = SinusoidalPE(d, int(context * 1.5))
        self.transformer_blocks = nn.ModuleList(A2CBlock(d, heads, 4 * d) for _ in range(layers))
        self.final_norm = nn.LayerNorm(d)


class Head(nn.Module):
    def __init__(self, d: int, out: int) -> None:
        super().__init__()
        self.network = nn.Sequential(nn.Linear(d, d // 2), nn.GELU(), nn.Dropout(0.1), nn.Linear(d // 2, out))


class TransformerA2C(nn.Module):
    def __init__(self, inputs: int, d: int, heads: int, layers: int, context: int, actions: int = 3) -> None:
        super().__init__()
        self.encoder = A2CEncoder(inputs, d, heads, layers, context)
        self.actor, self.critic = Head(d, actions), Head(d, 1)


@dataclass
class A2CConfig:
    input_dim: int
    hidden_dim: int
    num_heads: int
    num_layers: int
    context_length: int
    dropout: float = 0.2
    gamma: float = 0.99


def make_a2c(inputs: int, d: int, heads: int, layers: int, context: int, dataclass_config: bool = False):
    model = TransformerA2C(inputs, d, heads, layers, context)
    cfg = A2CConfig(inputs, d, heads, layers, context)
    obj = {
        "global_step": 25000,
        "model_state_dict": model.state_dict(),
        "actor_optimizer_state_dict": _optimizer_state(model.actor),
        "critic_optimizer_state_dict": _optimizer_state(model.critic),
        "val_sharpe": 0.42,
        "config": cfg if dataclass_config else vars(cfg),
    }
    return (
        "a2c.pt",
        _save(obj),
        dict(
            family="a2c",
            n_blocks=layers,
            d_model=d,
            ffn_dim=4 * d,
            state_dim=inputs,
            n_actions=3,
            lora_rank=0,
            heads=heads,
        ),
    )


# ------------------------------------------------------------------------------------- PPO policy


class RegimeConditionedPolicy(nn.Module):
    def __init__(
        self, feature_dim: int, d: int, heads: int, layers: int, context: int, regimes: int = 4, actions: int = 3
    ) -> None:
        super().__init__()
        self.pos_encoding = nn.Parameter(torch.randn(1, context, d) * 0.02)
        self.feature_proj = nn.Linear(feature_dim, d)
        self.regime_embed = nn.Embedding(regimes, d)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.1, batch_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.actor = nn.Sequential(nn.Linear(2 * d, d), nn.ReLU(), nn.Dropout(0.1), nn.Linear(d, actions))
        self.critic = nn.Sequential(nn.Linear(2 * d, d), nn.ReLU(), nn.Dropout(0.1), nn.Linear(d, 1))


def make_ppo(feature_dim: int, d: int, heads: int, layers: int, context: int, bare: bool = False):
    model = RegimeConditionedPolicy(feature_dim, d, heads, layers, context)
    obj = (
        model.state_dict()
        if bare
        else {
            "model_state_dict": model.state_dict(),
            "feature_dim": feature_dim,
            "context_len": context,
            "n_regimes": 4,
            "hidden_dim": d,
            "n_heads": heads,
            "n_layers": layers,
            "n_actions": 3,
            "test_reward": np.float64(0.0123),
            "regime_distribution": {"BULL": 0.31, "BEAR": 0.22, "RANGE": 0.35, "CRISIS": 0.12},
        }
    )
    return (
        "ppo.pt",
        _save(obj),
        dict(
            family="ppo",
            n_blocks=layers,
            d_model=d,
            ffn_dim=4 * d,
            state_dim=feature_dim,
            n_actions=3,
            lora_rank=0,
            heads=None if bare else heads,
        ),
    )


# ------------------------------------------------------------------------------------- CGDT agent


class CGDTBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Dropout(0.1), nn.Linear(4 * d, d))


class DecisionTransformer(nn.Module):
    def __init__(self, state_dim: int, actions: int, d: int, heads: int, layers: int, max_length: int) -> None:
        super().__init__()
        self.state_encoder = nn.Linear(state_dim, d)
        self.action_encoder = nn.Embedding(actions, d)
        self.return_encoder = nn.Linear(1, d)
        self.timestep_encoder = nn.Embedding(max_length, d)
        self.pos_encoding = SinusoidalPE(d, 3 * max_length)
        self.transformer_blocks = nn.ModuleList(CGDTBlock(d, heads) for _ in range(layers))
        self.action_predictor = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, actions))


class Critic(nn.Module):
    def __init__(self, state_dim: int, hidden: int) -> None:
        super().__init__()
        self.network = nn.Sequential(
            nn.Linear(state_dim, hidden),
            nn.LayerNorm(hidden),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(hidden, hidden // 2),
            nn.ReLU(),
            nn.Linear(hidden // 2, 1),
        )


def make_cgdt_agent(state_dim: int, d: int, heads: int, layers: int, max_length: int, namespace: bool = False):
    dt, critic = DecisionTransformer(state_dim, 3, d, heads, layers, max_length), Critic(state_dim, d)
    cfg = {"state_dim": state_dim, "action_dim": 3, "max_length": max_length, "critic_weight": 0.1}
    obj = {
        "dt": dt.state_dict(),
        "critic": critic.state_dict(),
        "config": argparse.Namespace(**cfg) if namespace else cfg,
    }
    return (
        "cgdt_agent.pt",
        _save(obj),
        dict(
            family="cgdt_agent",
            n_blocks=layers,
            d_model=d,
            ffn_dim=4 * d,
            state_dim=state_dim,
            n_actions=3,
            lora_rank=0,
            heads=None,
        ),
    )


# ------------------------------------------------------------------------------------ CGDT engine


@dataclass
class CGDTConfig:
    state_dim: int = 60
    action_dim: int = 3
    hidden_dim: int = 256
    n_layers: int = 6
    n_heads: int = 8
    dropout: float = 0.1
    context_length: int = 500
    target_return: float = 2.5
    max_timestep: int = 10000


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, tokens: int) -> None:
        super().__init__()
        self.register_buffer("mask", torch.tril(torch.ones(tokens, tokens)).view(1, 1, tokens, tokens))
        self.query, self.key, self.value, self.proj = (nn.Linear(d, d) for _ in range(4))


class GPTBlock(nn.Module):
    def __init__(self, d: int, tokens: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, tokens)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(0.1))


class DecisionEngine(nn.Module):
    def __init__(self, c: CGDTConfig) -> None:
        super().__init__()
        d, tokens = c.hidden_dim, 3 * c.context_length
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, d))
        self.state_embed = nn.Linear(c.state_dim, d)
        self.action_embed = nn.Embedding(c.action_dim, d)
        self.return_embed = nn.Linear(1, d)
        self.timestep_embed = nn.Embedding(c.max_timestep, d)
        self.blocks = nn.ModuleList(GPTBlock(d, tokens) for _ in range(c.n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.action_head = nn.Linear(d, c.action_dim)
        self.return_head = nn.Linear(d, 1)
        self.critic_head = nn.Linear(d, c.action_dim)


def make_cgdt_engine(state_dim: int, d: int, heads: int, layers: int, context: int):
    cfg = CGDTConfig(
        state_dim=state_dim, hidden_dim=d, n_layers=layers, n_heads=heads, context_length=context, max_timestep=200
    )
    model = DecisionEngine(cfg)
    obj = {"model": model.state_dict(), "optimizer": _optimizer_state(model), "step": 1, "config": cfg}
    return (
        "cgdt_engine.pt",
        _save(obj),
        dict(
            family="cgdt_engine",
            n_blocks=layers,
            d_model=d,
            ffn_dim=4 * d,
            state_dim=state_dim,
            n_actions=3,
            lora_rank=0,
            heads=heads,
        ),
    )


# ------------------------------------------------------------------------------ the sketch (Option 2)


class LoRALayer(nn.Module):
    """Verbatim structure of the analysis document's sketch."""

    def __init__(self, base_layer: nn.Linear, rank: int = 16) -> None:
        super().__init__()
        self.base = base_layer
        self.lora_A = nn.Parameter(torch.randn(base_layer.in_features, rank) * 0.01)
        self.lora_B = nn.Parameter(torch.randn(rank, base_layer.out_features) * 0.01)


class TransformerBlockWithLoRA(nn.Module):
    def __init__(self, hidden_dim: int, num_heads: int = 8, lora_rank: int = 16) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(hidden_dim), nn.LayerNorm(hidden_dim)
        self.q_proj = LoRALayer(nn.Linear(hidden_dim, hidden_dim), lora_rank)
        self.k_proj = LoRALayer(nn.Linear(hidden_dim, hidden_dim), lora_rank)
        self.v_proj = LoRALayer(nn.Linear(hidden_dim, hidden_dim), lora_rank)
        self.out_proj = LoRALayer(nn.Linear(hidden_dim, hidden_dim), lora_rank)
        self.ffn = nn.Sequential(
            LoRALayer(nn.Linear(hidden_dim, hidden_dim * 4), lora_rank),
            nn.GELU(),
            nn.Dropout(0.1),
            LoRALayer(nn.Linear(hidden_dim * 4, hidden_dim), lora_rank),
        )


class CustomDecisionTransformerLoRA(nn.Module):
    def __init__(self, input_dim: int = 60, hidden_dim: int = 256, num_layers: int = 12, lora_rank: int = 16) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.randn(1, 256, hidden_dim) * 0.02)
        self.state_embedding = nn.Linear(input_dim, hidden_dim)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlockWithLoRA(hidden_dim, lora_rank=lora_rank) for _ in range(num_layers)
        )
        self.output_norm = nn.LayerNorm(hidden_dim)
        self.action_head = nn.Linear(hidden_dim, 3)


def make_sketch(inputs: int, d: int, layers: int, rank: int):
    model = CustomDecisionTransformerLoRA(inputs, d, layers, rank)
    return (
        "sketch.pt",
        _save(model.state_dict()),
        dict(
            family="sketch",
            n_blocks=layers,
            d_model=d,
            ffn_dim=4 * d,
            state_dim=inputs,
            n_actions=3,
            lora_rank=rank,
            heads=None,
        ),
    )


# ------------------------------------------------------------------------- FLAG-TRADER's own namings


def make_native(layers: int, d: int, rank: int, wrapper: str = "model_state_dict"):
    model = make_model(n_blocks=layers, d=d, f=2 * d, rank=rank, heads=4)
    sd = model.state_dict()
    obj = sd if wrapper == "bare" else {wrapper: sd, "config": {"num_heads": 4}}
    return (
        "native.pt",
        _save(obj),
        dict(
            family="native",
            n_blocks=layers,
            d_model=d,
            ffn_dim=2 * d,
            state_dim=60,
            n_actions=3,
            lora_rank=rank,
            heads=None if wrapper == "bare" else 4,
        ),
    )


def make_peft_native(layers: int, d: int, rank: int):
    """What get_peft_model(FlagTrader, LoraConfig(target_modules=[...])).state_dict() names: a `base_model.model.`
    prefix, `base_layer`, lora_A.default.weight [r, in], lora_B.default.weight [out, r]."""
    sd = make_model(n_blocks=layers, d=d, f=2 * d, rank=rank, heads=4).state_dict()
    out = {}
    for k, v in sd.items():
        k2 = "base_model.model." + k
        if ".lora.lora_" in k:
            out[
                k2.replace(".lora.lora_A", ".lora_A.default.weight").replace(".lora.lora_B", ".lora_B.default.weight")
            ] = v.T.contiguous()
        else:
            out[k2.replace(".base.", ".base_layer.")] = v
    return (
        "peft.pt",
        _save(out),
        dict(
            family="peft",
            n_blocks=layers,
            d_model=d,
            ffn_dim=2 * d,
            state_dim=60,
            n_actions=3,
            lora_rank=rank,
            heads=None,
        ),
    )


class StockExport(nn.Module):
    def __init__(self, inputs: int, d: int, heads: int, layers: int, f: int, length: int) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.zeros(1, length, d))
        self.state_embedding = nn.Linear(inputs, d)
        layer = nn.TransformerEncoderLayer(d, heads, f, dropout=0.0, activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.output_norm = nn.LayerNorm(d)
        self.action_head = nn.Linear(d, 3)


def make_stock(inputs: int, d: int, layers: int):
    model = StockExport(inputs, d, 4, layers, 3 * d, 32)
    return (
        "stock.pt",
        _save({"model_state_dict": model.state_dict(), "config": {"num_heads": 4, "layout": "stock"}}),
        dict(
            family="stock",
            n_blocks=layers,
            d_model=d,
            ffn_dim=3 * d,
            state_dim=inputs,
            n_actions=3,
            lora_rank=0,
            heads=4,
        ),
    )


# ----------------------------------------------------------------------------------- PEFT LLM adapter


@dataclass
class FLAGTraderConfig:
    model_name: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    lora_r: int = 16
    lora_alpha: int = 32
    use_rslora: bool = True
    hidden_dim: int = 576
    num_actions: int = 3
    use_fallback: bool = False


def _llm_dims(hidden: int, kv: int, inter: int) -> dict[str, tuple[str, int, int]]:
    return {
        "q_proj": ("self_attn", hidden, hidden),
        "k_proj": ("self_attn", hidden, kv),
        "v_proj": ("self_attn", hidden, kv),
        "o_proj": ("self_attn", hidden, hidden),
        "gate_proj": ("mlp", hidden, inter),
        "up_proj": ("mlp", hidden, inter),
        "down_proj": ("mlp", inter, hidden),
    }


def make_peft_llm(
    layers: int, hidden: int, kv: int, rank: int, targets: tuple[str, ...], alpha: int = 32, rslora: bool = True
):
    """A PEFT save_pretrained folder: adapter_model.safetensors + adapter_config.json, and heads.pt beside it."""
    from safetensors.torch import save

    dims = _llm_dims(hidden, kv, 3 * hidden)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for b in range(layers):
        for t in targets:
            parent, d_in, d_out = dims[t]
            p = f"base_model.model.model.layers.{b}.{parent}.{t}"
            tensors[f"{p}.lora_A.weight"] = torch.randn(rank, d_in, generator=g)
            tensors[f"{p}.lora_B.weight"] = torch.randn(d_out, rank, generator=g) * 0.01
    config = {
        "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "bias": "none",
        "lora_alpha": alpha,
        "lora_dropout": 0.1,
        "peft_type": "LORA",
        "r": rank,
        "target_modules": list(targets),
        "task_type": "CAUSAL_LM",
        "use_rslora": rslora,
        "use_dora": False,
        "peft_version": "0.21.2",
    }
    heads = {
        "policy_head": nn.Linear(hidden, 3).state_dict(),
        "value_head": nn.Linear(hidden, 1).state_dict(),
        "config": FLAGTraderConfig(lora_r=rank, lora_alpha=alpha, use_rslora=rslora, hidden_dim=hidden),
    }

    def write(folder: Path) -> Path:
        lora = folder / "lora"
        lora.mkdir(parents=True, exist_ok=True)
        (lora / "adapter_model.safetensors").write_bytes(save(tensors))
        (lora / "adapter_config.json").write_text(json.dumps(config, indent=2))
        (folder / "heads.pt").write_bytes(_save(heads))
        return lora

    return (
        "lora",
        write,
        dict(
            family="peft_llm",
            n_blocks=layers,
            d_model=hidden,
            lora_rank=rank,
            targets=tuple(sorted(targets)),
            alpha=alpha,
            rslora=rslora,
        ),
    )


# ------------------------------------------------------------------------------------- MLP fallbacks


class FallbackPolicy(nn.Module):
    def __init__(self, inputs: int, hidden: int, actions: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(inputs, hidden),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(hidden, hidden // 2),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(hidden // 2, actions),
        )


class PeftFallback(nn.Module):
    def __init__(self, inputs: int, hidden: int, actions: int = 3) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.policy_head, self.value_head = nn.Linear(hidden, actions), nn.Linear(hidden, 1)


def make_mlp(inputs: int, hidden: int, peft: bool = False):
    if peft:
        obj = {
            "fallback": PeftFallback(inputs, hidden).state_dict(),
            "config": FLAGTraderConfig(hidden_dim=hidden, use_fallback=True),
        }
    else:
        obj = FallbackPolicy(inputs, hidden).state_dict()
    return "mlp.pt", _save(obj), dict(family="mlp", d_model=hidden, state_dim=inputs, n_actions=3, lora_rank=0)
