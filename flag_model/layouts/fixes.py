"""Fixes: key/tensor rewrites that can be applied with one click, and a greedy search for the ones that bring a
file closest to a target (on shapes only).

Orientation contract (DESIGN §2): native LoRA stores `lora.lora_A` [in, r] and `lora.lora_B` [r, out];
PEFT stores `lora_A.weight` [r, in] and `lora_B.weight` [out, r]. Merged weight `W + scale·(A@B)ᵀ`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from ..model import merge_weight
from .diff import diff_keys
from .keys import LayoutError, Shape, has, meta_like, shapes_of

V = TypeVar("V")

_LINEAR = r"(?:attention\.)?(?:q_proj|k_proj|v_proj|out_proj)|ffn\.0|ffn\.3"
_IN_BLOCK = re.compile(rf"^(.*transformer_blocks\.\d+\.(?:{_LINEAR}))\.(weight|bias)$")
_IN_BLOCK_BASE = re.compile(rf"^(.*transformer_blocks\.\d+\.(?:{_LINEAR}))\.base\.(weight|bias)$")
_PEFT_LORA = re.compile(r"^(.*)\.lora_([AB])(?:\.[^.]+)?\.weight$")
_NATIVE_LORA = re.compile(r"^(.*)\.lora\.lora_([AB])$")
_BARE_LORA = re.compile(r"^(.*?)(?<!\.lora)\.lora_([AB])$")
_FUSED = re.compile(r"^(.*)\.in_proj_(weight|bias)$")
_STOCK = re.compile(
    r"^(?:[\w.]*\.)?layers\.(\d+)\.(self_attn\.in_proj_weight|self_attn\.in_proj_bias|"
    r"self_attn\.out_proj\.(?:weight|bias)|linear1\.(?:weight|bias)|linear2\.(?:weight|bias)|"
    r"norm1\.(?:weight|bias)|norm2\.(?:weight|bias))$"
)
_PRE_NORM_NAMES = {
    "ln1": "norm1",
    "ln_1": "norm1",
    "attn_norm": "norm1",
    "norm_attn": "norm1",
    "input_layernorm": "norm1",
    "ln2": "norm2",
    "ln_2": "norm2",
    "ffn_norm": "norm2",
    "norm_ffn": "norm2",
    "post_attention_layernorm": "norm2",
}
_FINAL_NORM_NAMES = ("ln_f", "final_norm", "norm_f", "final_layer_norm", "ln_out")


def _rename(sd: Mapping[str, torch.Tensor], fn: Callable[[str], str]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        new = fn(k)
        if new in out:
            raise LayoutError(f"renaming would give two tensors the key '{new}'; the file mixes two layouts.")
        out[new] = v
    return out


def _strip_prefix(sd, prefix: str):
    return _rename(sd, lambda k: k[len(prefix) :] if k.startswith(prefix) else k)


def _add_prefix(sd, prefix: str):
    return _rename(sd, lambda k: prefix + k)


def _peft_to_native(sd):
    out = {}
    for k, v in sd.items():
        if m := _PEFT_LORA.match(k):  # lora_A.weight [r, in] -> [in, r]; lora_B.weight [out, r] -> [r, out]
            out[f"{m.group(1)}.lora.lora_{m.group(2)}"] = v.T.contiguous()
        else:
            out[k.replace(".base_layer.", ".base.")] = v
    return out


def _native_to_peft(sd):
    adapted = {m.group(1) for k in sd if (m := _NATIVE_LORA.match(k))}
    out = {}
    for k, v in sd.items():
        if m := _NATIVE_LORA.match(k):
            out[f"{m.group(1)}.lora_{m.group(2)}.weight"] = v.T.contiguous()
        elif m := re.match(r"^(.*)\.base\.(weight|bias)$", k):
            out[f"{m.group(1)}.base_layer.{m.group(2)}" if m.group(1) in adapted else f"{m.group(1)}.{m.group(2)}"] = v
        else:
            out[k] = v
    return out


def _transpose_lora(sd):
    """Native names holding PEFT orientation: lora_A [r, in] -> [in, r], lora_B [out, r] -> [r, out]."""
    out = dict(sd)
    for k, v in sd.items():
        m = _NATIVE_LORA.match(k)
        base = sd.get(f"{m.group(1)}.base.weight") if m else None
        if m is None or base is None or v.dim() != 2:
            continue
        d_out, d_in = base.shape
        rank = min(v.shape)
        right = (d_in, rank) if m.group(2) == "A" else (rank, d_out)
        if tuple(v.shape) != right and tuple(v.shape) == right[::-1]:
            out[k] = v.T.contiguous()
    return out


def _qkv_parts(key: str, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A fused in_proj tensor [3·d, ...] -> its q, k and v parts (contiguous copies)."""
    if v.shape[0] % 3:
        raise LayoutError(f"{key} has shape {list(v.shape)}; a fused q/k/v tensor has 3·d rows.")
    return tuple(part.contiguous() for part in v.chunk(3, dim=0))


def _split_qkv(sd):
    out = {}
    for k, v in sd.items():
        m = _FUSED.match(k)
        if m is None:
            out[k] = v
            continue
        p, kind = m.groups()
        style = ".base" if f"{p}.out_proj.base.weight" in sd else ""
        for name, part in zip(("q_proj", "k_proj", "v_proj"), _qkv_parts(k, v)):
            out[f"{p}.{name}{style}.{kind}"] = part
    return out


def _fuse_qkv(sd):
    out = {}
    for k, v in sd.items():
        m = re.match(r"^(.*)\.q_proj(\.base)?\.(weight|bias)$", k)
        if m is None:
            if re.match(r"^.*\.(k_proj|v_proj)(\.base)?\.(weight|bias)$", k):
                continue
            out[k] = v
            continue
        p, style, kind = m.group(1), m.group(2) or "", m.group(3)
        if any(key.startswith(f"{p}.{n}_proj.") and "lora" in key for key in sd for n in "qkv"):
            raise LayoutError(f"{p}: q/k/v carry LoRA adapters, which a fused in_proj cannot hold; merge LoRA first.")
        parts = [sd.get(f"{p}.{n}_proj{style}.{kind}") for n in "qkv"]
        if any(t is None for t in parts):
            raise LayoutError(f"{p}: q_proj is there but k_proj or v_proj is missing; cannot fuse.")
        out[f"{p}.in_proj_{kind}"] = torch.cat(parts, dim=0)
    return out


def _add_base_level(sd):
    return _rename(sd, lambda k: _IN_BLOCK.sub(r"\1.base.\2", k))


def _remove_base_level(sd):
    return _rename(sd, lambda k: _IN_BLOCK_BASE.sub(r"\1.\2", k))


def _add_attention_level(sd):
    return _rename(
        sd,
        lambda k: re.sub(r"(transformer_blocks\.\d+\.)(q_proj|k_proj|v_proj|out_proj|in_proj_)", r"\1attention.\2", k),
    )


def _remove_attention_level(sd):
    return _rename(sd, lambda k: re.sub(r"(transformer_blocks\.\d+\.)attention\.", r"\1", k))


def _add_lora_level(sd):
    return _rename(sd, lambda k: _BARE_LORA.sub(r"\1.lora.lora_\2", k))


def _remove_lora_level(sd):
    return _rename(sd, lambda k: _NATIVE_LORA.sub(r"\1.lora_\2", k))


def _rename_norms(sd):
    def fn(k: str) -> str:
        parts = k.split(".")
        if len(parts) >= 2 and parts[-2] in _PRE_NORM_NAMES:
            parts[-2] = _PRE_NORM_NAMES[parts[-2]]
        elif len(parts) == 2 and parts[0] in _FINAL_NORM_NAMES:
            parts[0] = "output_norm"
        return ".".join(parts)

    return _rename(sd, fn)


def _norms_to_ln(sd):
    def fn(k: str) -> str:
        k = re.sub(r"(transformer_blocks\.\d+\.)norm([12])\.", r"\1ln\2.", k)
        return re.sub(r"^output_norm\.", "ln_f.", k)

    return _rename(sd, fn)


_STOCK_TO_NATIVE = {
    "self_attn.out_proj.weight": "attention.out_proj.base.weight",
    "self_attn.out_proj.bias": "attention.out_proj.base.bias",
    "linear1.weight": "ffn.0.base.weight",
    "linear1.bias": "ffn.0.base.bias",
    "linear2.weight": "ffn.3.base.weight",
    "linear2.bias": "ffn.3.base.bias",
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
}


def _stock_to_native(sd):
    out = {}
    for k, v in sd.items():
        m = _STOCK.match(k)
        if m is None:
            out[k] = v
            continue
        b, name = m.groups()
        if name.startswith("self_attn.in_proj_"):
            kind = name.rsplit("_", 1)[1]
            for n, part in zip("qkv", _qkv_parts(k, v)):
                out[f"transformer_blocks.{b}.attention.{n}_proj.base.{kind}"] = part
        else:
            out[f"transformer_blocks.{b}.{_STOCK_TO_NATIVE[name]}"] = v
    return out


def _native_to_stock(sd):
    if any(_NATIVE_LORA.match(k) for k in sd):
        raise LayoutError("stock nn.TransformerEncoderLayer has no LoRA; merge the adapters first (export 'merged').")
    back = {v: k for k, v in _STOCK_TO_NATIVE.items()}
    out = {}
    for k, v in sd.items():
        m = re.match(r"^transformer_blocks\.(\d+)\.(.*)$", k)
        if m is None:
            out[k] = v
            continue
        b, rest = m.groups()
        qkv = re.match(r"^attention\.([qkv])_proj\.base\.(weight|bias)$", rest)
        if qkv:
            if qkv.group(1) == "q":
                kind = qkv.group(2)
                parts = [sd[f"transformer_blocks.{b}.attention.{n}_proj.base.{kind}"] for n in "qkv"]
                out[f"encoder.layers.{b}.self_attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
        elif rest in back:
            out[f"encoder.layers.{b}.{back[rest]}"] = v
        else:
            raise LayoutError(f"{k} has no place in nn.TransformerEncoderLayer.")
    return out


def merge_lora(sd: Mapping[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """Native state dict -> the same keys without `lora.*`, each base weight replaced by W + scale·(A@B)ᵀ.

    The result loads strictly into FlagTrader built without LoRA and gives the same logits.
    """
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if _NATIVE_LORA.match(k):
            continue
        m = re.match(r"^(.*)\.base\.weight$", k)
        a, b = (sd.get(f"{m.group(1)}.lora.lora_A"), sd.get(f"{m.group(1)}.lora.lora_B")) if m else (None, None)
        if a is not None and b is not None:
            v = merge_weight(v, a, b, scale)
        out[k] = v
    return out


@dataclass(frozen=True)
class Fix:
    """A key/tensor rewrite that can be applied with one click. `id` is 'op' or 'op:argument'."""

    id: str
    title: str
    detail: str


_FIX_OPS: dict[str, tuple[Callable[..., dict], str, str]] = {
    "strip_prefix": (
        _strip_prefix,
        "Strip the prefix '{arg}'",
        "remove '{arg}' from the start of every key that has it",
    ),
    "add_prefix": (_add_prefix, "Add the prefix '{arg}'", "put '{arg}' in front of every key"),
    "peft_to_native": (
        _peft_to_native,
        "PEFT → native LoRA",
        "base_layer → base; lora_A.weight [r, in] → lora.lora_A [in, r] and lora_B.weight [out, r] → "
        "lora.lora_B [r, out] (transposed)",
    ),
    "native_to_peft": (
        _native_to_peft,
        "Native LoRA → PEFT",
        "base → base_layer; lora.lora_A [in, r] → lora_A.weight [r, in], lora.lora_B → lora_B.weight "
        "[out, r] (transposed)",
    ),
    "transpose_lora": (
        _transpose_lora,
        "Transpose LoRA matrices",
        "lora_A stored [r, in] and lora_B stored [out, r] (PEFT orientation) under native names: "
        "transpose to [in, r] / [r, out]",
    ),
    "split_qkv": (
        _split_qkv,
        "Split fused in_proj into q/k/v",
        "in_proj_weight [3d, d] → q_proj, k_proj, v_proj [d, d] (rows 0:d, d:2d, 2d:3d); same for the bias",
    ),
    "fuse_qkv": (_fuse_qkv, "Fuse q/k/v into in_proj", "q, k, v [d, d] stacked into in_proj_weight [3d, d]"),
    "add_base_level": (
        _add_base_level,
        "Add the `base.` level",
        "plain nn.Linear names (ffn.0.weight) → LoRALinear names (ffn.0.base.weight)",
    ),
    "remove_base_level": (_remove_base_level, "Remove the `base.` level", "ffn.0.base.weight → ffn.0.weight"),
    "add_attention_level": (
        _add_attention_level,
        "Add the `attention.` level",
        "transformer_blocks.N.q_proj → transformer_blocks.N.attention.q_proj",
    ),
    "remove_attention_level": (
        _remove_attention_level,
        "Remove the `attention.` level",
        "transformer_blocks.N.attention.q_proj → transformer_blocks.N.q_proj",
    ),
    "add_lora_level": (_add_lora_level, "Add the `lora.` level", "q_proj.lora_A → q_proj.lora.lora_A"),
    "remove_lora_level": (_remove_lora_level, "Remove the `lora.` level", "q_proj.lora.lora_A → q_proj.lora_A"),
    "rename_norms": (
        _rename_norms,
        "Rename pre-norm LayerNorms",
        "ln1/attn_norm → norm1, ln2/ffn_norm → norm2, ln_f/final_norm → output_norm (names only: "
        "the norm placement stays an assumption)",
    ),
    "norms_to_ln": (
        _norms_to_ln,
        "Rename LayerNorms to ln1/ln2/ln_f",
        "norm1 → ln1, norm2 → ln2, output_norm → ln_f (the sketch's pre-norm names)",
    ),
    "merge_lora": (
        lambda sd, scale: merge_lora(sd, float(scale)),
        "Merge LoRA into the base weights (scale {arg})",
        "base.weight ← W + scale·(A@B)ᵀ, lora keys removed; the scale is the LoRA-scale assumption",
    ),
    "stock_to_native": (
        _stock_to_native,
        "Stock PyTorch → native",
        "layers.N.self_attn.in_proj_weight → q/k/v base weights, linear1/linear2 → ffn.0/ffn.3",
    ),
    "native_to_stock": (
        _native_to_stock,
        "Native → stock PyTorch",
        "q/k/v base weights → encoder.layers.N.self_attn.in_proj_weight, ffn.0/ffn.3 → linear1/linear2",
    ),
}


def make_fix(fix_id: str) -> Fix:
    """The Fix for an id like 'split_qkv' or 'strip_prefix:encoder.'."""
    op, _, arg = fix_id.partition(":")
    if op not in _FIX_OPS:
        raise LayoutError(f"unknown fix '{fix_id}'; known: {sorted(_FIX_OPS)}")
    _, title, detail = _FIX_OPS[op]
    return Fix(fix_id, title.format(arg=arg), detail.format(arg=arg))


def apply_fix(sd: Mapping[str, torch.Tensor], fix: Fix | str) -> dict[str, torch.Tensor]:
    """A new dict with the fix applied; the input (maybe a shared, cached state dict) is never changed."""
    fix_id = fix.id if isinstance(fix, Fix) else fix
    op, _, arg = fix_id.partition(":")
    if op not in _FIX_OPS:
        raise LayoutError(f"unknown fix '{fix_id}'; known: {sorted(_FIX_OPS)}")
    fn = _FIX_OPS[op][0]
    return fn(sd, arg) if arg else fn(sd)


def apply_fixes(sd: Mapping[str, torch.Tensor], fixes: Sequence[Fix | str]) -> dict[str, torch.Tensor]:
    out = dict(sd)
    for f in fixes:
        out = apply_fix(out, f)
    return out


def drop_keys(sd: Mapping[str, V], keys: Sequence[str]) -> dict[str, V]:
    """Without the given keys (e.g. an RL critic the inference model has no place for)."""
    gone = set(keys)
    return {k: v for k, v in sd.items() if k not in gone}


def _prefixes(keys: Sequence[str]) -> set[str]:
    out = set()
    for k in keys:
        parts = k.split(".")
        for n in (1, 2):
            if len(parts) > n:
                out.add(".".join(parts[:n]) + ".")
    return out


def candidate_fixes(file: Mapping[str, Any], target: Mapping[str, Any], lora_scale: float = 1.0) -> list[str]:
    """Fix ids worth trying: every op, prefixes of unmatched keys on either side, a merge when the target
    has no LoRA but the file has."""
    fs, ts = shapes_of(file), shapes_of(target)
    strip = {
        p for p in _prefixes([k for k in fs if k not in ts]) if any(k.startswith(p) and k[len(p) :] in ts for k in fs)
    }
    add = {
        p for p in _prefixes([k for k in ts if k not in fs]) if any(k.startswith(p) and k[len(p) :] in fs for k in ts)
    }
    ops = [op for op in _FIX_OPS if op not in ("strip_prefix", "add_prefix", "merge_lora")]
    merge = [f"merge_lora:{lora_scale:g}"] if has(list(fs), _NATIVE_LORA.pattern) and not has(list(ts), "lora") else []
    return [f"strip_prefix:{p}" for p in sorted(strip)] + [f"add_prefix:{p}" for p in sorted(add)] + merge + ops


def _score(sd: Mapping[str, Any], ts: Mapping[str, Shape]) -> int:
    return sum(1 for k, s in shapes_of(sd).items() if ts.get(k) == s)


def suggest_fixes(
    file: Mapping[str, Any], target: Mapping[str, Any], lora_scale: float = 1.0, max_steps: int = 12
) -> list[Fix]:
    """Fixes that bring the file's keys and shapes closest to the target, in order (greedy, on shapes only).

    Each step takes the fix that matches the most additional target keys; when no single fix helps, a pair
    is tried (two renames that only pay off together).
    """
    ts = shapes_of(target)
    cur = meta_like(file)
    chosen: list[str] = []
    for _ in range(max_steps):
        base = _score(cur, ts)
        if base == len(ts):  # every target key matched: what is left over no rename can place
            break
        best: tuple[int, list[str], dict] | None = None
        cands = candidate_fixes(cur, ts, lora_scale)
        for f in cands:
            try:
                nxt = apply_fix(cur, f)
            except LayoutError:
                continue
            gain = _score(nxt, ts) - base
            if gain > 0 and (best is None or gain > best[0]):
                best = (gain, [f], nxt)
        if best is None:
            for f1 in cands:
                try:
                    mid = apply_fix(cur, f1)
                except LayoutError:
                    continue
                if shapes_of(mid) == shapes_of(cur):
                    continue
                for f2 in candidate_fixes(mid, ts, lora_scale):
                    try:
                        nxt = apply_fix(mid, f2)
                    except LayoutError:
                        continue
                    gain = _score(nxt, ts) - base
                    if gain > 0 and (best is None or gain > best[0]):
                        best = (gain, [f1, f2], nxt)
        if best is None:
            break
        chosen += best[1]
        cur = best[2]
    return [make_fix(f) for f in chosen]


def fix_for_target(
    sd: Mapping[str, torch.Tensor], fixes: Sequence[Fix | str], target: Mapping[str, Any], drop_extra: bool = False
) -> dict[str, torch.Tensor]:
    """Apply fixes in order; with drop_extra also remove keys the target has no place for."""
    out = apply_fixes(sd, fixes)
    return drop_keys(out, diff_keys(out, target).unexpected) if drop_extra else out


__all__ = [
    "Fix",
    "apply_fix",
    "apply_fixes",
    "candidate_fixes",
    "drop_keys",
    "fix_for_target",
    "make_fix",
    "merge_lora",
    "suggest_fixes",
]
