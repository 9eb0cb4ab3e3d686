"""A fast batched inference engine, separate from the analysis model.

The engine copies the model's weights once (LoRA merged via `LoRALinear.merged_weight()`, q/k/v fused
into one [3d, d] matrix) into plain tensors; the shared model is never touched. Forward passes run under
`torch.inference_mode`, in bfloat16 where the hardware does bf16 matmuls natively (AVX-512-BF16 / AMX on
the CPU, or a GPU), or in exact float32 on request. Kernels: oneDNN's linear with the FFN's GELU fused
(checked against F.linear once; F.linear otherwise), attention by `scaled_dot_product_attention`, except
bf16 windows of up to BMM_ATTENTION_MAX_LENGTH positions on the CPU, where two batched matmuls and a
softmax were measured several times faster than SDPA's flash kernel, and the single decision query (SDPA's
one-query kernel depends on the thread count; the matmul path gives the same logits on any number of threads).

In rolling mode only the decision (last) position's output is needed, so the last block computes K and V
for every position but the query, attention, FFN, norms and head for the last position only.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import ModelConfig, linear_shapes
from .model import FlagTrader

PRECISIONS: tuple[str, ...] = ("fast", "exact")
Progress = Callable[[int, int], object]  # (windows done, windows total)

_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
# bf16 windows up to this length use batched-matmul attention: on CPU, SDPA's flash kernel splits short
# sequences into tiny blocks and was measured 5x slower at 64 positions and 1.7x slower at 256 (with the
# scores of a batch in cache); beyond, the S x S scores no longer pay off and SDPA is used.
BMM_ATTENTION_MAX_LENGTH = 256
_threads_configured = False
_onednn_checked: dict[torch.dtype, bool] = {}


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


def onednn_linear_ok(dtype: torch.dtype) -> bool:
    """Whether oneDNN's fused linear (+GELU) kernel exists here and matches F.linear (checked once per dtype).

    torch's F.linear goes through MKL for float32, which is slow on non-Intel CPUs; oneDNN is not, and it
    fuses the FFN's GELU into the matmul."""
    if dtype not in _onednn_checked:
        ok = False
        try:
            g = torch.Generator().manual_seed(0)
            x, w, b = (torch.randn(*shape, generator=g).to(dtype) for shape in ((8, 16), (24, 16), (24,)))
            fused = torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [], "none")
            plain = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
            tol = 1e-5 if dtype == torch.float32 else 5e-2
            ok = bool(
                torch.allclose(plain, F.linear(x, w, b), atol=tol, rtol=tol)
                and torch.allclose(fused, F.gelu(F.linear(x, w, b)), atol=tol, rtol=tol)
            )
        except (AttributeError, RuntimeError):
            ok = False
        _onednn_checked[dtype] = ok
    return _onednn_checked[dtype]


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


def default_batch_size(cfg: ModelConfig, length: int, elem_bytes: int, scores: bool = True) -> int:
    """Windows per batch, so that the largest intermediates stay in the last-level cache: the FFN's hidden
    activation (B*S rows of width F) fills at most half of it and, where attention materialises them
    (`scores`), the attention scores (B*heads*S*S) at most a quarter. Rows stay within 256..16384 so small
    models still get efficient matmuls."""
    cache = last_level_cache_bytes()
    rows = int(np.clip((cache // 2) // max(cfg.ffn_dim * elem_bytes, 1), 256, 16384))
    by_scores = (cache // 4) // (cfg.num_heads * length * length * elem_bytes) if scores else rows
    return max(1, min(rows // length, by_scores))


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
        shapes = linear_shapes(d, f)
        h += sum(2 * s * cfg.lora_rank * sum(shapes[t.split(".", 2)[2]]) for t in cfg.lora_targets)
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
    kernels: str = ""


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


def _auto_batch_size(cfg: ModelConfig, length: int, device: torch.device, dtype: torch.dtype) -> int:
    scores = device.type == "cpu" and dtype == torch.bfloat16 and length <= BMM_ATTENTION_MAX_LENGTH
    return default_batch_size(cfg, length, torch.finfo(dtype).bits // 8, scores)


def engine_batch_size(cfg: ModelConfig, length: int, precision: str, device: str | None = None) -> int:
    """The windows per batch an engine of `cfg` in `precision` chooses for windows of `length` when none is fixed,
    without building one: a cluster's client plans tasks of whole batches with it (identical batches give
    identical logits)."""
    dev, dtype, _ = _choose(precision, device)
    return _auto_batch_size(cfg, length, dev, dtype)


class InferenceEngine:
    """Merged-weight copy of a FlagTrader for batched inference. forward(x (B, S, state_dim)) -> logits."""

    def __init__(
        self, model: FlagTrader, precision: str = "fast", device: str | None = None, batch_size: int | None = None
    ) -> None:
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
            for blk in model.blocks():
                att = blk.attention
                ffn1, ffn2 = blk.ffn_linears()
                blocks.append(
                    _Block(
                        w_qkv=t(
                            torch.cat(
                                [att.q_proj.merged_weight(), att.k_proj.merged_weight(), att.v_proj.merged_weight()]
                            )
                        ),
                        b_qkv=t(torch.cat([att.q_proj.base.bias, att.k_proj.base.bias, att.v_proj.base.bias])),
                        w_out=t(att.out_proj.merged_weight()),
                        b_out=t(att.out_proj.base.bias),
                        w_ffn1=t(ffn1.merged_weight()),
                        b_ffn1=t(ffn1.base.bias),
                        w_ffn2=t(ffn2.merged_weight()),
                        b_ffn2=t(ffn2.base.bias),
                        norm1=(t(blk.norm1.weight), t(blk.norm1.bias)),
                        norm2=(t(blk.norm2.weight), t(blk.norm2.bias)),
                    )
                )
            self.blocks: tuple[_Block, ...] = tuple(blocks)
            self.out_norm = (t(model.output_norm.weight), t(model.output_norm.bias))
            self.w_head = t(model.action_head.weight)
            self.b_head = t(model.action_head.bias)
        self._batch_size = batch_size
        self._onednn = self.device.type == "cpu" and onednn_linear_ok(self.dtype)
        self._bmm_attention = self.device.type == "cpu" and self.dtype == torch.bfloat16
        kernels = (
            ("oneDNN linear, GELU fused" if self._onednn else "torch linear")
            + "; attention: "
            + (
                f"batched matmul up to {BMM_ATTENTION_MAX_LENGTH} positions, SDPA above"
                if self._bmm_attention
                else "SDPA"
            )
            + "; the decision query alone: batched matmul"
        )
        self.info = EngineInfo(
            precision=precision,
            device=str(self.device),
            dtype=str(self.dtype).replace("torch.", ""),
            batch_size=batch_size or 0,
            threads=threads,
            reason=reason,
            kernels=kernels,
        )

    def batch_size(self, length: int) -> int:
        """Windows per batch for windows of `length` (the fixed one if given, else tuned to the cache)."""
        return self._batch_size or _auto_batch_size(self.config, length, self.device, self.dtype)

    def _ln(self, x: torch.Tensor, p: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], p[0], p[1], self.eps)

    def _linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        """x (..., in) -> (..., out) = x W^T + b, optionally followed by exact (erf) GELU."""
        if self._onednn:
            y = torch.ops.mkldnn._linear_pointwise(
                x.reshape(-1, x.shape[-1]), w, b, "gelu" if gelu else "none", [], "none" if gelu else ""
            )
            return y.view(*x.shape[:-1], w.shape[0])
        y = F.linear(x, w, b)
        return F.gelu(y) if gelu else y

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        """q (B, Sq, d), k/v (B, S, d) -> (B, Sq, d); heads split by view like the model, scores scaled by
        1/sqrt(d/heads). `causal` masks future positions (only used with Sq == S)."""
        B, Sq, d = q.shape
        S, h = k.shape[1], self.heads
        q = q.view(B, Sq, h, d // h).transpose(1, 2)
        k = k.view(B, S, h, d // h).transpose(1, 2)
        v = v.view(B, S, h, d // h).transpose(1, 2)
        # A single query (the decision position) always takes the matmul path: SDPA's one-query kernel splits
        # the keys across threads, so its result would depend on the thread count (measured: 2e-7 between 1
        # and 2 threads), and a cluster worker must give the same logits as one process whatever its threads.
        if Sq == 1 or (self._bmm_attention and S <= BMM_ATTENTION_MAX_LENGTH):
            q, k, v = (a.reshape(B * h, -1, d // h) for a in (q, k, v))
            mask = (
                torch.full((Sq, S), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
                if causal
                else torch.zeros(1, 1, 1, dtype=q.dtype, device=q.device)
            )
            scores = torch.baddbmm(mask, q, k.transpose(1, 2), alpha=(d // h) ** -0.5)  # (B*h, Sq, S)
            y = torch.bmm(scores.softmax(dim=-1), v).view(B, h, Sq, d // h)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, h, Sq, d/h)
        return y.transpose(1, 2).reshape(B, Sq, d)

    def _block(self, x: torch.Tensor, b: _Block) -> torch.Tensor:
        """Every position: x (B, S, d) -> (B, S, d)."""
        u = self._ln(x, b.norm1) if self.norm_first else x
        q, k, v = self._linear(u, b.w_qkv, b.b_qkv).chunk(3, dim=-1)
        a = self._linear(self._attend(q, k, v, self.causal), b.w_out, b.b_out)
        return self._residual_ffn(x, a, b)

    def _last_block(self, x: torch.Tensor, b: _Block) -> torch.Tensor:
        """Decision position only: x (B, S, d) -> (B, 1, d). K/V from every position, the rest from the last.

        The last query may see every position even with the causal mask, so no mask is passed (SDPA's
        is_causal would align the single query with position 0)."""
        d = x.shape[-1]
        u = self._ln(x, b.norm1) if self.norm_first else x
        q = self._linear(u[:, -1:], b.w_qkv[:d], b.b_qkv[:d])
        k, v = self._linear(u, b.w_qkv[d:], b.b_qkv[d:]).chunk(2, dim=-1)
        a = self._linear(self._attend(q, k, v, False), b.w_out, b.b_out)
        return self._residual_ffn(x[:, -1:], a, b)

    def _residual_ffn(self, x: torch.Tensor, a: torch.Tensor, b: _Block) -> torch.Tensor:
        if self.norm_first:
            x = x + a
            return x + self._ffn(self._ln(x, b.norm2), b)
        x = self._ln(x + a, b.norm1)
        return self._ln(x + self._ffn(x, b), b.norm2)

    def _ffn(self, x: torch.Tensor, b: _Block) -> torch.Tensor:
        return self._linear(self._linear(x, b.w_ffn1, b.b_ffn1, gelu=True), b.w_ffn2, b.b_ffn2)

    def variant(self, num_heads: int, norm_first: bool, causal: bool) -> InferenceEngine:
        """The same merged weights (shared, not copied) under other head count, norm placement and mask: these
        assumptions change the computation, not the weights. The LoRA scale does (it is merged in)."""
        other = copy.copy(self)
        other.config = self.config.with_assumptions(num_heads=num_heads, norm_first=norm_first, causal=causal)
        other.heads, other.norm_first, other.causal = num_heads, norm_first, causal
        other.info = replace(self.info)
        return other

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, S, state_dim) -> the first block's input (B, S, d) in the compute dtype; it depends on no
        assumption, so one embedding can feed every variant."""
        self.config.check_windows(tuple(x.shape))
        with torch.inference_mode():
            x = x.to(device=self.device, dtype=self.dtype)
            return self._linear(x, self.w_embed, self.b_embed) + self.pos[: x.shape[1]]

    def forward_embedded(self, h: torch.Tensor, last_only: bool = True) -> torch.Tensor:
        """h (B, S, d) from `embed` -> float32 logits (B, n_actions) if last_only else (B, S, n_actions)."""
        with torch.inference_mode():
            for b in self.blocks[:-1]:
                h = self._block(h, b)
            h = self._last_block(h, self.blocks[-1]) if last_only else self._block(h, self.blocks[-1])
            logits = self._linear(self._ln(h, self.out_norm), self.w_head, self.b_head).float()
        return logits[:, -1] if last_only else logits

    def forward(self, x: torch.Tensor, last_only: bool = True) -> torch.Tensor:
        """x (B, S, state_dim) -> float32 logits (B, n_actions) if last_only else (B, S, n_actions)."""
        return self.forward_embedded(self.embed(x), last_only)

    __call__ = forward

    def run(self, windows: np.ndarray, last_only: bool = True, progress: Progress | None = None) -> np.ndarray:
        """Batched inference over windows (n_w, S, state_dim) (a view is fine; one batch is copied at a time).

        Returns float32 logits (n_w, n_actions) if last_only else (n_w, S, n_actions)."""
        n, length = windows.shape[0], windows.shape[1]
        bs = self.batch_size(length)
        shape = (n, self.config.n_actions) if last_only else (n, length, self.config.n_actions)
        out = np.empty(shape, dtype=np.float32)
        for start in range(0, n, bs):
            batch = torch.from_numpy(
                np.array(windows[start : start + bs], dtype=np.float32)
            )  # one writable copy per batch
            out[start : start + bs] = self.forward(batch, last_only).cpu().numpy()
            if progress is not None:
                progress(min(start + bs, n), n)
        return out
