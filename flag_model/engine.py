"""A fast batched inference engine, separate from the analysis model.

The engine copies the model's weights once (LoRA merged via `LoRALinear.merged_weight()`, q/k/v fused
into one [3d, d] matrix) into plain tensors; the shared model is never touched. Forward passes run under
`torch.inference_mode` with `scaled_dot_product_attention`, in bfloat16 where the hardware does bf16
matmuls natively (AVX-512-BF16 / AMX on the CPU, or a GPU), or in exact float32 on request.

In rolling mode only the decision (last) position's output is needed, so the last block computes K and V
for every position but the query, attention, FFN, norms and head for the last position only.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F

from .config import ModelConfig
from .model import FlagTrader

Precision = Literal["fast", "exact"]
PRECISIONS: tuple[str, ...] = ("fast", "exact")
Progress = Callable[[int, int], None]  # (windows done, windows total)

_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
_threads_configured = False


def cpu_flags() -> set[str]:
    """The CPU feature flags the kernel reports (empty where /proc/cpuinfo is unavailable)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_bf16_native() -> tuple[bool, str]:
    """Whether this CPU multiplies bf16 matrices natively, and why we think so."""
    found = sorted(set(_BF16_CPU_FLAGS) & cpu_flags())
    if not found:
        return False, "CPU has no avx512_bf16/amx_bf16: bf16 would be emulated (slow), using float32"
    try:
        onednn = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn = False
    if not onednn:
        return False, f"CPU has {', '.join(found)} but torch's oneDNN has no bf16 support: using float32"
    return True, f"CPU has {', '.join(found)} and oneDNN bf16: bfloat16 matmuls"


def configure_threads() -> int:
    """Set torch's intra-op threads once, to the CPUs this process may use, unless the user chose a number."""
    global _threads_configured
    if not _threads_configured:
        _threads_configured = True
        user_set = any(os.environ.get(v) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TORCH_NUM_THREADS"))
        if not user_set:
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            if torch.get_num_threads() != cpus:
                torch.set_num_threads(cpus)
    return torch.get_num_threads()


def last_level_cache_bytes() -> int:
    """Size of the largest CPU cache (sysfs), 32 MiB where unknown."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * mult)
    return max(sizes, default=32 << 20)


def default_batch_size(cfg: ModelConfig, length: int, elem_bytes: int) -> int:
    """Windows per batch: the largest activation (B*S rows of the FFN's hidden width) fills about half the
    last-level cache; at least 256 and at most 16384 rows so small models still get efficient matmuls."""
    rows = (last_level_cache_bytes() // 2) // max(cfg.ffn_dim * elem_bytes, 1)
    rows = int(np.clip(rows, 256, 16384))
    return max(1, rows // length)


def forward_flops(cfg: ModelConfig, length: int, last_only: bool, lora: bool = False) -> int:
    """Floating-point operations (2 per multiply-add) of one window's forward pass.

    Counts the matmuls, attention score and value products (full S x S even when causal); ignores norms,
    softmax and activations. `last_only`: the last block and the head work on the decision position only.
    `lora`: adds the unmerged adapters' two thin matmuls per adapted projection (the reference's cost).
    """
    d, f, s, h = cfg.d_model, cfg.ffn_dim, length, 0
    block = 2 * s * (4 * d * d + 2 * d * f) + 4 * s * s * d
    last = (2 * s * 2 * d * d + 2 * (2 * d * d + 2 * d * f) + 4 * s * d) if last_only else block
    h += 2 * s * cfg.state_dim * d + (cfg.n_blocks - 1) * block + last
    h += 2 * (1 if last_only else s) * d * cfg.n_actions
    if lora and cfg.lora_rank:
        shapes = {"attention.q_proj": 2 * d, "attention.k_proj": 2 * d, "attention.v_proj": 2 * d,
                  "attention.out_proj": 2 * d, "ffn.0": d + f, "ffn.3": f + d}
        h += sum(2 * s * cfg.lora_rank * shapes[t.split(".", 2)[2]] for t in cfg.lora_targets)
    return h


@dataclass(frozen=True)
class EngineInfo:
    """What the engine runs on and why (shown to the user, printed by the bench)."""

    precision: str
    device: str
    dtype: str
    batch_size: int
    threads: int
    reason: str


@dataclass(frozen=True)
class _Block:
    w_qkv: torch.Tensor  # [3d, d] rows q, k, v (merged LoRA)
    b_qkv: torch.Tensor  # [3d]
    w_out: torch.Tensor  # [d, d]
    b_out: torch.Tensor
    w_ffn1: torch.Tensor  # [F, d]
    b_ffn1: torch.Tensor
    w_ffn2: torch.Tensor  # [d, F]
    b_ffn2: torch.Tensor
    norm1: tuple[torch.Tensor, torch.Tensor]
    norm2: tuple[torch.Tensor, torch.Tensor]


def _choose(precision: str, device: str | None) -> tuple[torch.device, torch.dtype, str]:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if precision == "exact":
        return dev, torch.float32, "exact float32 on request"
    if dev.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return dev, torch.bfloat16, f"GPU {torch.cuda.get_device_name(dev)}: bfloat16"
        return dev, torch.float16, f"GPU {torch.cuda.get_device_name(dev)} without bf16: float16"
    native, why = cpu_bf16_native()
    return dev, (torch.bfloat16 if native else torch.float32), why


class InferenceEngine:
    """Merged-weight copy of a FlagTrader for batched inference. forward(x (B, S, state_dim)) -> logits."""

    def __init__(self, model: FlagTrader, precision: str = "fast", device: str | None = None,
                 batch_size: int | None = None) -> None:
        self.config: ModelConfig = model.config
        self.device, self.dtype, reason = _choose(precision, device)
        self.precision = precision
        threads = configure_threads()
        cfg = self.config
        self.heads = cfg.num_heads
        self.norm_first = cfg.norm_first
        self.causal = cfg.causal
        self.eps = cfg.ln_eps

        def t(w: torch.Tensor) -> torch.Tensor:
            # A private copy in the compute dtype: the shared model's tensors are never aliased.
            return w.detach().to(device=self.device, dtype=self.dtype, copy=True).contiguous()

        with torch.no_grad():
            self.w_embed = t(model.state_embedding.weight)
            self.b_embed = t(model.state_embedding.bias)
            self.pos = t(model.pos_embedding[0])  # [max_length, d]
            blocks = []
            for blk in model.transformer_blocks:
                att = blk.attention
                blocks.append(_Block(
                    w_qkv=t(torch.cat([att.q_proj.merged_weight(), att.k_proj.merged_weight(),
                                       att.v_proj.merged_weight()])),
                    b_qkv=t(torch.cat([att.q_proj.base.bias, att.k_proj.base.bias, att.v_proj.base.bias])),
                    w_out=t(att.out_proj.merged_weight()), b_out=t(att.out_proj.base.bias),
                    w_ffn1=t(blk.ffn[0].merged_weight()), b_ffn1=t(blk.ffn[0].base.bias),
                    w_ffn2=t(blk.ffn[3].merged_weight()), b_ffn2=t(blk.ffn[3].base.bias),
                    norm1=(t(blk.norm1.weight), t(blk.norm1.bias)),
                    norm2=(t(blk.norm2.weight), t(blk.norm2.bias)),
                ))
            self.blocks: tuple[_Block, ...] = tuple(blocks)
            self.out_norm = (t(model.output_norm.weight), t(model.output_norm.bias))
            self.w_head = t(model.action_head.weight)
            self.b_head = t(model.action_head.bias)
        self._batch_size = batch_size
        self.info = EngineInfo(precision=precision, device=str(self.device), dtype=str(self.dtype).replace("torch.", ""),
                               batch_size=batch_size or 0, threads=threads, reason=reason)

    def batch_size(self, length: int) -> int:
        """Windows per batch for windows of `length` (the fixed one if given, else tuned to the cache)."""
        return self._batch_size or default_batch_size(self.config, length, torch.finfo(self.dtype).bits // 8)

    def _ln(self, x: torch.Tensor, p: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], p[0], p[1], self.eps)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        """q (B, Sq, d), k/v (B, S, d) -> (B, Sq, d); heads split by view like the model."""
        B, Sq, d = q.shape
        S, h = k.shape[1], self.heads
        q = q.view(B, Sq, h, d // h).transpose(1, 2)
        k = k.view(B, S, h, d // h).transpose(1, 2)
        v = v.view(B, S, h, d // h).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, h, Sq, d/h)
        return y.transpose(1, 2).reshape(B, Sq, d)

    def _block(self, x: torch.Tensor, b: _Block) -> torch.Tensor:
        """Every position: x (B, S, d) -> (B, S, d)."""
        u = self._ln(x, b.norm1) if self.norm_first else x
        q, k, v = F.linear(u, b.w_qkv, b.b_qkv).chunk(3, dim=-1)
        a = F.linear(self._attend(q, k, v, self.causal), b.w_out, b.b_out)
        return self._residual_ffn(x, a, b)

    def _last_block(self, x: torch.Tensor, b: _Block) -> torch.Tensor:
        """Decision position only: x (B, S, d) -> (B, 1, d). K/V from every position, the rest from the last.

        The last query may see every position even with the causal mask, so no mask is passed (SDPA's
        is_causal would align the single query with position 0)."""
        d = x.shape[-1]
        u = self._ln(x, b.norm1) if self.norm_first else x
        q = F.linear(u[:, -1:], b.w_qkv[:d], b.b_qkv[:d])
        k, v = F.linear(u, b.w_qkv[d:], b.b_qkv[d:]).chunk(2, dim=-1)
        a = F.linear(self._attend(q, k, v, False), b.w_out, b.b_out)
        return self._residual_ffn(x[:, -1:], a, b)

    def _residual_ffn(self, x: torch.Tensor, a: torch.Tensor, b: _Block) -> torch.Tensor:
        if self.norm_first:
            x = x + a
            return x + self._ffn(self._ln(x, b.norm2), b)
        x = self._ln(x + a, b.norm1)
        return self._ln(x + self._ffn(x, b), b.norm2)

    @staticmethod
    def _ffn(x: torch.Tensor, b: _Block) -> torch.Tensor:
        return F.linear(F.gelu(F.linear(x, b.w_ffn1, b.b_ffn1)), b.w_ffn2, b.b_ffn2)

    def forward(self, x: torch.Tensor, last_only: bool = True) -> torch.Tensor:
        """x (B, S, state_dim) -> float32 logits (B, n_actions) if last_only else (B, S, n_actions)."""
        cfg = self.config
        if x.dim() != 3 or x.shape[-1] != cfg.state_dim:
            raise ValueError(f"input must be (batch, window, {cfg.state_dim}) features; got {tuple(x.shape)}.")
        if not 1 <= x.shape[1] <= cfg.max_length:
            raise ValueError(f"window length {x.shape[1]} is outside 1..{cfg.max_length} (max_length).")
        with torch.inference_mode():
            x = x.to(device=self.device, dtype=self.dtype)
            h = F.linear(x, self.w_embed, self.b_embed) + self.pos[: x.shape[1]]
            for b in self.blocks[:-1]:
                h = self._block(h, b)
            h = self._last_block(h, self.blocks[-1]) if last_only else self._block(h, self.blocks[-1])
            logits = F.linear(self._ln(h, self.out_norm), self.w_head, self.b_head).float()
        return logits[:, -1] if last_only else logits

    __call__ = forward

    def run(self, windows: np.ndarray, last_only: bool = True, progress: Progress | None = None) -> np.ndarray:
        """Batched inference over windows (n_w, S, state_dim) (a view is fine; one batch is copied at a time).

        Returns float32 logits (n_w, n_actions) if last_only else (n_w, S, n_actions)."""
        n, length = windows.shape[0], windows.shape[1]
        bs = self.batch_size(length)
        shape = (n, self.config.n_actions) if last_only else (n, length, self.config.n_actions)
        out = np.empty(shape, dtype=np.float32)
        for start in range(0, n, bs):
            batch = torch.from_numpy(np.array(windows[start:start + bs], dtype=np.float32))  # one writable copy per batch
            out[start:start + bs] = self.forward(batch, last_only).cpu().numpy()
            if progress is not None:
                progress(min(start + bs, n), n)
        return out
