"""Shared fixtures: tiny models with non-zero LoRA B (so merge and ablation tests cannot pass trivially)."""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from flag_model.config import BLOCK_LINEARS, ModelConfig
from flag_model.model import FlagTrader

REPO = Path(__file__).resolve().parents[1]
# The real ETH bars: $FLAG_TRADER_BENCH_DATA (the `bench` command's default too), else ../shared beside the checkout.
ETH_CSV = Path(os.environ.get("FLAG_TRADER_BENCH_DATA") or REPO.parent / "shared" / "data" / "ETH_USDT_5m_6m.csv")

# Tests use the small demo, built into a per-run cache folder, never the user's ~/.cache.
os.environ.setdefault("FLAG_TRADER_DEMO_SIZE", "tiny")
os.environ.setdefault("FLAG_TRADER_CACHE", tempfile.mkdtemp(prefix="flag_cache_"))

# pytest-xdist (`-n N`): each worker computes with its share of the CPUs, and so do the processes it starts
# (servers, CLI runs), unless the user chose a number. Two workers with as many OpenMP threads as cores each
# mostly wait for a thread the other one holds (spinning or sleeping).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1 and not any(os.environ.get(v) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TORCH_NUM_THREADS")):
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // _WORKERS))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def make_config(
    n_blocks: int = 2,
    d: int = 16,
    f: int = 32,
    rank: int = 4,
    state_dim: int = 60,
    actions: int = 3,
    max_length: int = 32,
    heads: int = 4,
    targets: tuple[str, ...] | None = None,
    **assumptions,
) -> ModelConfig:
    if targets is None:
        targets = tuple(f"transformer_blocks.{b}.{m}" for b in range(n_blocks) for m in BLOCK_LINEARS)
    return ModelConfig(
        n_blocks=n_blocks,
        d_model=d,
        ffn_dim=f,
        state_dim=state_dim,
        n_actions=actions,
        max_length=max_length,
        lora_rank=rank if targets else 0,
        lora_targets=targets,
        num_heads=heads,
        **assumptions,
    )


def randomize(model: FlagTrader, seed: int = 0) -> FlagTrader:
    """Give every parameter (LoRA B and LayerNorms included) non-trivial random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name.endswith("output_norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / max(p.shape[-1], 1) ** 0.5)
    return model.eval()


def make_model(seed: int = 0, **kw) -> FlagTrader:
    return randomize(FlagTrader(make_config(**kw)), seed)


def save_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.fixture
def tiny_model() -> FlagTrader:
    """2 blocks, d=16, 4 heads, LoRA rank 4 on every projection, random non-zero B."""
    return make_model()


@pytest.fixture
def tiny_state_dict(tiny_model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tiny_model.state_dict().items()}


@pytest.fixture
def tiny_ckpt_bytes(tiny_state_dict) -> bytes:
    """The tiny model saved like the training code: {'model_state_dict', 'config', ...}."""
    return save_bytes(
        {
            "epoch": 3,
            "model_state_dict": tiny_state_dict,
            "val_accuracy": 0.61,
            "config": {"num_heads": 4, "lora_alpha": 4, "lora_rank": 4},
        }
    )


def full_layout_config(d: int = 256, f: int = 1024) -> ModelConfig:
    """The documented layout: 12 blocks, rank 16, 60 features, 3 actions, max_length 256."""
    return make_config(n_blocks=12, d=d, f=f, rank=16, max_length=256, heads=8)


@contextlib.contextmanager
def _one_builder(size: str) -> Iterator[None]:
    """Held while a demo is built: pytest-xdist's workers share the cache folder above (they inherit its
    environment variable), so the first worker builds and the others wait, then find the cached file."""
    cache = Path(os.environ["FLAG_TRADER_CACHE"])
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / f".build-{size}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="session")
def tiny_demo_path() -> Path:
    """The tiny demo checkpoint (2 blocks, d=32): seeded, not trained (about a second), built once per run."""
    from flag_model.demo import build_demo

    with _one_builder("tiny"):
        return build_demo("tiny")


@pytest.fixture(scope="session")
def full_demo_path() -> Path:
    """The trained full demo (the documented 343-tensor layout), built once per run; tests using it are `slow`."""
    from flag_model.demo import build_demo

    with _one_builder("full"):
        return build_demo("full")


@pytest.fixture(scope="session")
def eth_csv() -> Path:
    if not ETH_CSV.exists():
        pytest.skip(
            f"real ETH data not found at {ETH_CSV} (../shared/data beside the repo, or $FLAG_TRADER_BENCH_DATA)"
        )
    return ETH_CSV
