"""Key layouts: known checkpoint layouts, key diff against a target, explanations, fixes and exports.

A layout is a function from a size spec to the keys and shapes a file of that layout holds. Everything
that compares layouts works on shapes only (plain tuples or `meta` tensors), so a 88 M-parameter file is
diffed, ranked and repaired without touching its data; only the final conversion moves real tensors.

Orientation contract (DESIGN §2): native LoRA stores `lora.lora_A` [in, r] and `lora.lora_B` [r, out];
PEFT stores `lora_A.weight` [r, in] and `lora_B.weight` [out, r]. Merged weight `W + scale·(A@B)ᵀ`.
"""
from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence, TypeVar

import pandas as pd
import torch

from .config import BLOCK_LINEARS, DEFAULT_HEADS, ConfigError, ModelConfig, infer_config
from .model import FlagTrader

V = TypeVar("V")
Shape = tuple[int, ...]

# Wrappers that training code adds around module names (DataParallel, a `model.` attribute, torch.compile).
KNOWN_PREFIXES: tuple[str, ...] = ("module.", "model.", "_orig_mod.")


def strip_prefixes(state_dict: Mapping[str, V]) -> tuple[dict[str, V], tuple[str, ...]]:
    """Remove wrapper prefixes shared by *every* key, repeatedly; return the new dict and what was removed."""
    sd, removed = dict(state_dict), []
    while sd:
        prefix = next((p for p in KNOWN_PREFIXES if all(k.startswith(p) for k in sd)), None)
        if prefix is None:
            break
        sd = {k[len(prefix):]: v for k, v in sd.items()}
        removed.append(prefix)
    return sd, tuple(removed)


class LayoutError(ValueError):
    """A conversion that cannot be done; the message says why and what to do instead."""


def shapes_of(sd: Mapping[str, Any]) -> dict[str, Shape]:
    """{key: shape} from tensors (real or meta) or shapes."""
    return {k: tuple(v.shape) if hasattr(v, "shape") else tuple(int(x) for x in v) for k, v in sd.items()}


def meta_like(sd: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Shape-only stand-ins (device `meta`), so conversions can be tried on a 88 M-parameter file for free."""
    return {k: torch.empty(s, device="meta") for k, s in shapes_of(sd).items()}


_BLOCK_INDEX = re.compile(r"(transformer_blocks|layers|blocks|h)\.\d+\.")


def key_pattern(key: str) -> str:
    """Key with the block index and a PEFT adapter name generalised: `transformer_blocks.N.ffn.0...`."""
    key = _BLOCK_INDEX.sub(lambda m: f"{m.group(1)}.N.", key)
    return re.sub(r"\.(lora_[AB])\.(?!weight$)[^.]+\.weight$", r".\1.weight", key)


def natural_key(key: str) -> tuple:
    """Sort key that orders `blocks.2` before `blocks.10`."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in key.split("."))


# --------------------------------------------------------------------------------------------- sizes

@dataclass(frozen=True)
class LayoutSize:
    """The sizes a layout is generated at; `provenance` says which tensor each came from."""

    n_blocks: int
    d_model: int
    ffn_dim: int
    state_dim: int
    n_actions: int
    max_length: int
    lora_rank: int
    provenance: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def from_config(cls, cfg: Any) -> "LayoutSize":
        """From a ModelConfig (or anything with the same size attributes)."""
        return cls(cfg.n_blocks, cfg.d_model, cfg.ffn_dim, cfg.state_dim, cfg.n_actions, cfg.max_length,
                   cfg.lora_rank, {k: "given" for k in ("n_blocks", "d_model", "ffn_dim", "state_dim",
                                                          "n_actions", "max_length", "lora_rank")})

    def to_config(self, num_heads: int | None = None, **assumptions: Any) -> ModelConfig:
        """A ModelConfig with LoRA on every projection (if rank > 0); heads fall back to a divisor of d."""
        heads = num_heads or DEFAULT_HEADS
        if self.d_model % heads:
            heads = max(h for h in range(1, min(self.d_model, DEFAULT_HEADS) + 1) if self.d_model % h == 0)
        targets = tuple(f"transformer_blocks.{b}.{m}" for b in range(self.n_blocks) for m in BLOCK_LINEARS
                        ) if self.lora_rank else ()
        return ModelConfig(self.n_blocks, self.d_model, self.ffn_dim, self.state_dim, self.n_actions,
                           self.max_length, self.lora_rank, targets, num_heads=heads,
                           provenance=dict(self.provenance), **assumptions)


def _find(shapes: Mapping[str, Shape], pattern: str, ok: Callable[[Shape], bool] = lambda s: True
          ) -> tuple[str, Shape] | None:
    rx = re.compile(pattern)
    return next(((k, s) for k, s in shapes.items() if rx.search(k) and ok(s)), None)


def infer_sizes(sd: Mapping[str, Any]) -> LayoutSize:
    """Sizes of any layout in the family from whatever shapes exist; sizes not found are defaults, said so.

    Raises LayoutError when not even the hidden size can be found.
    """
    shapes = shapes_of(sd)
    prov: dict[str, str] = {}
    d = state_dim = None
    for pat in (r"(^|\.)state_embedding\.weight$", r"(^|\.)input_proj\.0\.weight$", r"(^|\.)feature_proj\.weight$"):
        hit = _find(shapes, pat, lambda s: len(s) == 2)
        if hit:
            (d, state_dim), prov["d_model"] = hit[1], f"{hit[0]} {list(hit[1])} = [d, state_dim]"
            prov["state_dim"] = prov["d_model"]
            break
    if d is None and (hit := _find(shapes, r"in_proj_weight$", lambda s: len(s) == 2 and s[0] == 3 * s[1])):
        d, prov["d_model"] = hit[1][1], f"{hit[0]} {list(hit[1])} = [3d, d] (fused q/k/v)"
    if d is None and (hit := _find(shapes, r"q_proj(\.base|\.base_layer)?\.weight$", lambda s: len(s) == 2 and s[0] == s[1])):
        d, prov["d_model"] = hit[1][0], f"{hit[0]} {list(hit[1])} = [d, d]"
    if d is None:
        norms = [s[0] for k, s in shapes.items() if len(s) == 1 and re.search(r"norm|ln", k) and k.endswith("weight")]
        if norms:
            d = max(set(norms), key=norms.count)
            prov["d_model"] = f"most common LayerNorm size ({norms.count(d)} norms of size {d})"
    if d is None:
        raise LayoutError("cannot tell the hidden size: no embedding, attention projection or LayerNorm found. "
                          "This does not look like a transformer checkpoint.")
    if state_dim is None:
        state_dim, prov["state_dim"] = 60, "default 60 (simple-60 features; no input embedding found)"

    if hit := _find(shapes, r"(ffn\.0(\.base|\.base_layer)?|linear1)\.weight$", lambda s: len(s) == 2):
        f, prov["ffn_dim"] = hit[1][0], f"{hit[0]} {list(hit[1])} = [F, d]"
    else:
        f, prov["ffn_dim"] = 4 * d, "default 4·d (no FFN weight found)"

    blocks = {int(m.group(2)) for k in shapes if (m := re.search(r"(transformer_blocks|layers|blocks)\.(\d+)\.", k))}
    n_blocks = max(blocks) + 1 if blocks else 0
    prov["n_blocks"] = f"{len(blocks)} distinct block indices" if blocks else "no blocks found"

    length = 256
    prov["max_length"] = "default 256 (no positional table found)"
    if hit := _find(shapes, r"(pos_embedding|pos_encoding\.pe|pos_embed)$"):
        rest = [x for x in hit[1] if x != 1]
        if len(rest) == 2:
            length = rest[0] if rest[1] == d else rest[1]
            prov["max_length"] = f"{hit[0]} {list(hit[1])}"

    actions, prov["n_actions"] = 3, "default 3 (SELL/HOLD/BUY; no action head found)"
    heads = [(k, s) for k, s in shapes.items() if len(s) == 2 and re.search(
        r"(action_head|policy_head|actor\.network\.\d+)\.weight$", k)]
    if heads:
        k, s = max(heads, key=lambda ks: natural_key(ks[0]))  # the actor's last layer
        actions, prov["n_actions"] = s[0], f"{k} {list(s)} = [actions, d]"

    ranks = [min(s) for k, s in shapes.items() if len(s) == 2 and re.search(r"lora_A(\.[^.]+)?(\.weight)?$", k)]
    rank = max(set(ranks), key=ranks.count) if ranks else 0
    prov["lora_rank"] = f"smaller side of {len(ranks)} lora_A tensors" if ranks else "no lora_A tensors: no LoRA"
    return LayoutSize(n_blocks, d, f, state_dim, actions, length, rank, prov)


# ------------------------------------------------------------------------------------------- layouts

def _linear_sizes(s: LayoutSize) -> dict[str, tuple[int, int]]:
    """(in, out) of each block projection, by its native module path."""
    d, f = s.d_model, s.ffn_dim
    return {"attention.q_proj": (d, d), "attention.k_proj": (d, d), "attention.v_proj": (d, d),
            "attention.out_proj": (d, d), "ffn.0": (d, f), "ffn.3": (f, d)}


def _norm(prefix: str, d: int) -> dict[str, Shape]:
    return {f"{prefix}.weight": (d,), f"{prefix}.bias": (d,)}


def _lin(prefix: str, d_in: int, d_out: int) -> dict[str, Shape]:
    return {f"{prefix}.weight": (d_out, d_in), f"{prefix}.bias": (d_out,)}


def native_layout(s: LayoutSize) -> dict[str, Shape]:
    """FLAG-TRADER with LoRA on every projection (DESIGN §2), in FlagTrader.state_dict() order."""
    d, r = s.d_model, s.lora_rank
    out: dict[str, Shape] = {"pos_embedding": (1, s.max_length, d), **_lin("state_embedding", s.state_dim, d)}
    for b in range(s.n_blocks):
        p = f"transformer_blocks.{b}."
        for m, (i, o) in _linear_sizes(s).items():
            out.update(_lin(f"{p}{m}.base", i, o))
            if r:
                out[f"{p}{m}.lora.lora_A"], out[f"{p}{m}.lora.lora_B"] = (i, r), (r, o)
            if m == "attention.out_proj":
                out.update(_norm(f"{p}norm1", d))
        out.update(_norm(f"{p}norm2", d))
    return {**out, **_norm("output_norm", d), **_lin("action_head", d, s.n_actions)}


def _stock_block(p: str, d: int, f: int, attn: str = "self_attn") -> dict[str, Shape]:
    """nn.TransformerEncoderLayer keys, in its state_dict order."""
    return {f"{p}{attn}.in_proj_weight": (3 * d, d), f"{p}{attn}.in_proj_bias": (3 * d,),
            **_lin(f"{p}{attn}.out_proj", d, d), **_lin(f"{p}linear1", d, f), **_lin(f"{p}linear2", f, d),
            **_norm(f"{p}norm1", d), **_norm(f"{p}norm2", d)}


def stock_layout(s: LayoutSize) -> dict[str, Shape]:
    """FLAG-TRADER exported for stock PyTorch: `encoder` = nn.TransformerEncoder of TransformerEncoderLayer."""
    d = s.d_model
    out: dict[str, Shape] = {"pos_embedding": (1, s.max_length, d), **_lin("state_embedding", s.state_dim, d)}
    for b in range(s.n_blocks):
        out.update(_stock_block(f"encoder.layers.{b}.", d, s.ffn_dim))
    return {**out, **_norm("output_norm", d), **_lin("action_head", d, s.n_actions)}


def a2c_layout(s: LayoutSize) -> dict[str, Shape]:
    """Transformer-A2C: pre-norm encoder with nn.MultiheadAttention, actor and critic networks."""
    d, f = s.d_model, s.ffn_dim
    out: dict[str, Shape] = {**_lin("encoder.input_proj.0", s.state_dim, d), **_norm("encoder.input_proj.1", d),
                             "encoder.pos_encoding.pe": (1, s.max_length, d)}
    for b in range(s.n_blocks):
        p = f"encoder.layers.{b}."
        out.update({f"{p}attention.in_proj_weight": (3 * d, d), f"{p}attention.in_proj_bias": (3 * d,),
                    **_lin(f"{p}attention.out_proj", d, d), **_norm(f"{p}norm1", d), **_norm(f"{p}norm2", d),
                    **_lin(f"{p}ffn.0", d, f), **_lin(f"{p}ffn.3", f, d)})
    return {**out, **_norm("encoder.norm", d), **_lin("actor.network.0", d, d),
            **_lin("actor.network.2", d, s.n_actions), **_lin("critic.network.0", d, d), **_lin("critic.network.2", d, 1)}


def ppo_layout(s: LayoutSize) -> dict[str, Shape]:
    """PPO policy: feature projection, regime embedding, nn.TransformerEncoder, policy and value heads."""
    d = s.d_model
    out: dict[str, Shape] = {**_lin("feature_proj", s.state_dim, d), "regime_embed.weight": (4, d)}
    for b in range(s.n_blocks):
        out.update(_stock_block(f"transformer.layers.{b}.", d, s.ffn_dim))
    return {**out, **_lin("policy_head", d, s.n_actions), **_lin("value_head", d, 1)}


def cgdt_layout(s: LayoutSize) -> dict[str, Shape]:
    """CGDT: a decision transformer `dt` (fused attention, plain FFN, no LoRA) and a `critic` network."""
    d, f = s.d_model, s.ffn_dim
    out: dict[str, Shape] = {"dt.pos_embedding": (1, s.max_length, d), **_lin("dt.state_embedding", s.state_dim, d),
                             **_lin("dt.return_embedding", 1, d)}
    for b in range(s.n_blocks):
        p = f"dt.transformer_blocks.{b}."
        out.update({f"{p}attention.in_proj_weight": (3 * d, d), f"{p}attention.in_proj_bias": (3 * d,),
                    **_lin(f"{p}attention.out_proj", d, d), **_norm(f"{p}norm1", d),
                    **_lin(f"{p}ffn.0", d, f), **_lin(f"{p}ffn.3", f, d), **_norm(f"{p}norm2", d)})
    return {**out, **_norm("dt.output_norm", d), **_lin("dt.action_head", d, s.n_actions),
            **_lin("critic.q_net.0", s.state_dim + s.n_actions, d), **_lin("critic.q_net.2", d, 1)}


def peft_layout(s: LayoutSize) -> dict[str, Shape]:
    """The FLAG-TRADER model wrapped by HF PEFT: `base_layer`, `lora_A.weight` [r, in], `lora_B.weight` [out, r]."""
    pre, d, r = "base_model.model.", s.d_model, s.lora_rank
    out: dict[str, Shape] = {f"{pre}pos_embedding": (1, s.max_length, d), **_lin(f"{pre}state_embedding", s.state_dim, d)}
    for b in range(s.n_blocks):
        p = f"{pre}transformer_blocks.{b}."
        for m, (i, o) in _linear_sizes(s).items():
            if r:
                out.update({**_lin(f"{p}{m}.base_layer", i, o), f"{p}{m}.lora_A.weight": (r, i),
                            f"{p}{m}.lora_B.weight": (o, r)})
            else:
                out.update(_lin(f"{p}{m}", i, o))
            if m == "attention.out_proj":
                out.update(_norm(f"{p}norm1", d))
        out.update(_norm(f"{p}norm2", d))
    return {**out, **_norm(f"{pre}output_norm", d), **_lin(f"{pre}action_head", d, s.n_actions)}


def sketch_layout(s: LayoutSize) -> dict[str, Shape]:
    """The hand-written sketch: `transformer_blocks.N.q_proj.lora_A` (no `attention.`/`lora.` levels), pre-norm."""
    d, r = s.d_model, s.lora_rank
    out: dict[str, Shape] = {**_lin("state_embedding", s.state_dim, d), "pos_embedding": (1, s.max_length, d)}
    for b in range(s.n_blocks):
        p = f"transformer_blocks.{b}."
        out.update(_norm(f"{p}ln1", d))
        for m, (i, o) in _linear_sizes(s).items():
            m = m.removeprefix("attention.")
            out.update(_lin(f"{p}{m}", i, o))
            if r:
                out[f"{p}{m}.lora_A"], out[f"{p}{m}.lora_B"] = (i, r), (r, o)
            if m == "out_proj":
                out.update(_norm(f"{p}ln2", d))
    return {**out, **_norm("ln_f", d), **_lin("action_head", d, s.n_actions)}


@dataclass(frozen=True)
class Layout:
    """A known checkpoint layout: its key generator and what it means for loading into FLAG-TRADER."""

    name: str
    title: str
    keys: Callable[[LayoutSize], dict[str, Shape]]
    convertible: bool  # can renaming/reshaping alone turn it into FLAG-TRADER?
    note: str


LAYOUTS: dict[str, Layout] = {lay.name: lay for lay in (
    Layout("native", "FLAG-TRADER LoRA", native_layout, True,
           "the layout the reconstruction loads (without lora keys: a merged or LoRA-free file)"),
    Layout("stock", "FLAG-TRADER, stock PyTorch export", stock_layout, True,
           "nn.TransformerEncoderLayer names with fused in_proj_weight; LoRA merged"),
    Layout("peft", "PEFT / HF LoRA", peft_layout, True,
           "the same model wrapped by PEFT: base_layer, lora_A.weight [r, in], lora_B.weight [out, r]"),
    Layout("sketch", "hand-written sketch", sketch_layout, True,
           "q_proj.lora_A directly on the block (no attention./lora. levels), pre-norm ln1/ln2/ln_f"),
    Layout("cgdt", "CGDT", cgdt_layout, False,
           "decision transformer `dt` with fused attention and no LoRA, plus a `critic`; a different model"),
    Layout("a2c", "Transformer-A2C", a2c_layout, False,
           "actor-critic with a pre-norm encoder (nn.MultiheadAttention); a different model"),
    Layout("ppo", "PPO policy", ppo_layout, False,
           "feature_proj, regime_embed, nn.TransformerEncoder, policy/value heads; a different model"),
)}


def reconstruction_shapes(cfg: ModelConfig) -> dict[str, Shape]:
    """Keys and shapes of FlagTrader(cfg).state_dict(), built on the meta device (no memory for weights)."""
    with torch.device("meta"):
        return shapes_of(FlagTrader(cfg).state_dict())


# ---------------------------------------------------------------------------------------- key diff

@dataclass(frozen=True)
class KeyDiff:
    """File keys against target keys. `mismatched` holds (key, file shape, target shape)."""

    matched: tuple[str, ...]
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    mismatched: tuple[tuple[str, Shape, Shape], ...]
    n_file: int
    n_target: int

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def counts(self) -> dict[str, int]:
        return {"matched": len(self.matched), "missing": len(self.missing), "unexpected": len(self.unexpected),
                "mis-shaped": len(self.mismatched)}

    def summary(self) -> str:
        c = self.counts()
        return (f"{c['matched']}/{self.n_target} target keys matched; {c['missing']} missing, "
                f"{c['unexpected']} unexpected, {c['mis-shaped']} mis-shaped")


def diff_keys(file: Mapping[str, Any], target: Mapping[str, Any]) -> KeyDiff:
    """Compare keys and shapes (tensors or shapes on either side)."""
    fs, ts = shapes_of(file), shapes_of(target)
    both = [k for k in ts if k in fs]
    return KeyDiff(
        matched=tuple(k for k in both if fs[k] == ts[k]),
        missing=tuple(k for k in ts if k not in fs),
        unexpected=tuple(k for k in fs if k not in ts),
        mismatched=tuple((k, fs[k], ts[k]) for k in both if fs[k] != ts[k]),
        n_file=len(fs), n_target=len(ts),
    )


def diff_table(file: Mapping[str, Any], target: Mapping[str, Any]) -> pd.DataFrame:
    """One aligned row per key of either side: key, status, file_shape, target_shape (shapes as text)."""
    fs, ts = shapes_of(file), shapes_of(target)
    rows = []
    for k in sorted(set(fs) | set(ts), key=natural_key):
        a, b = fs.get(k), ts.get(k)
        status = ("missing" if a is None else "unexpected" if b is None else "matched" if a == b else "mis-shaped")
        rows.append({"key": k, "status": status, "file_shape": "" if a is None else str(list(a)),
                     "target_shape": "" if b is None else str(list(b))})
    return pd.DataFrame(rows, columns=["key", "status", "file_shape", "target_shape"])


def rank_layouts(sd: Mapping[str, Any], size: LayoutSize | None = None) -> pd.DataFrame:
    """How well the file matches each known layout, best first.

    `score` is the Dice overlap of key patterns (block index generalised, so depth does not matter);
    `matched` counts exact key+shape matches against the layout generated at the file's inferred sizes.
    """
    fs = shapes_of(sd)
    try:
        size = size or infer_sizes(fs)
    except LayoutError:
        size = None
    pf = {key_pattern(k) for k in fs}
    rows = []
    for lay in LAYOUTS.values():
        keys = lay.keys(size) if size else {}
        pl = {key_pattern(k) for k in keys}
        score = 2 * len(pf & pl) / (len(pf) + len(pl)) if pf or pl else 0.0
        matched = sum(1 for k, s in keys.items() if fs.get(k) == s)
        rows.append({"layout": lay.name, "title": lay.title, "score": score, "matched": matched,
                     "layout_keys": len(keys), "file_keys": len(fs), "convertible": lay.convertible, "note": lay.note})
    return pd.DataFrame(rows).sort_values(["score", "matched"], ascending=False, ignore_index=True)


def ranking_headline(ranking: pd.DataFrame) -> str:
    """'This file is the FLAG-TRADER LoRA layout: 343/343 keys; PEFT / HF LoRA: 41 %; ...'."""
    top = ranking.iloc[0]
    others = "; ".join(f"{r.title}: {r.score:.0%}" for r in ranking.iloc[1:].itertuples())
    if top.score >= 0.9:
        head = f"This file is the {top.title} layout: {top.matched}/{top.layout_keys} keys"
    elif top.score >= 0.5:
        head = f"This file resembles the {top.title} layout ({top.score:.0%} of key patterns; {top.matched}/{top.layout_keys} keys)"
    else:
        head = f"This file matches no known layout well (best: {top.title}, {top.score:.0%} of key patterns)"
    return f"{head}; {others}."


# --------------------------------------------------------------------------------------------- fixes

_LINEAR = r"(?:attention\.)?(?:q_proj|k_proj|v_proj|out_proj)|ffn\.0|ffn\.3"
_IN_BLOCK = re.compile(rf"^(.*transformer_blocks\.\d+\.(?:{_LINEAR}))\.(weight|bias)$")
_IN_BLOCK_BASE = re.compile(rf"^(.*transformer_blocks\.\d+\.(?:{_LINEAR}))\.base\.(weight|bias)$")
_PEFT_LORA = re.compile(r"^(.*)\.lora_([AB])(?:\.[^.]+)?\.weight$")
_NATIVE_LORA = re.compile(r"^(.*)\.lora\.lora_([AB])$")
_BARE_LORA = re.compile(r"^(.*?)(?<!\.lora)\.lora_([AB])$")
_FUSED = re.compile(r"^(.*)\.in_proj_(weight|bias)$")
_STOCK = re.compile(r"^(?:[\w.]*\.)?layers\.(\d+)\.(self_attn\.in_proj_weight|self_attn\.in_proj_bias|"
                    r"self_attn\.out_proj\.(?:weight|bias)|linear1\.(?:weight|bias)|linear2\.(?:weight|bias)|"
                    r"norm1\.(?:weight|bias)|norm2\.(?:weight|bias))$")
_PRE_NORM_NAMES = {"ln1": "norm1", "ln_1": "norm1", "attn_norm": "norm1", "norm_attn": "norm1",
                   "input_layernorm": "norm1", "ln2": "norm2", "ln_2": "norm2", "ffn_norm": "norm2",
                   "norm_ffn": "norm2", "post_attention_layernorm": "norm2"}
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
    return _rename(sd, lambda k: k[len(prefix):] if k.startswith(prefix) else k)


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


def _split_qkv(sd):
    out = {}
    for k, v in sd.items():
        m = _FUSED.match(k)
        if m is None:
            out[k] = v
            continue
        p, kind = m.groups()
        style = ".base" if f"{p}.out_proj.base.weight" in sd else ""
        if v.shape[0] % 3:
            raise LayoutError(f"{k} has shape {list(v.shape)}; a fused q/k/v tensor has 3·d rows.")
        for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
            out[f"{p}.{name}{style}.{kind}"] = part.contiguous()
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
    return _rename(sd, lambda k: re.sub(r"(transformer_blocks\.\d+\.)(q_proj|k_proj|v_proj|out_proj|in_proj_)",
                                        r"\1attention.\2", k))


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


_STOCK_TO_NATIVE = {"self_attn.out_proj.weight": "attention.out_proj.base.weight",
                    "self_attn.out_proj.bias": "attention.out_proj.base.bias",
                    "linear1.weight": "ffn.0.base.weight", "linear1.bias": "ffn.0.base.bias",
                    "linear2.weight": "ffn.3.base.weight", "linear2.bias": "ffn.3.base.bias",
                    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
                    "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias"}


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
            for n, part in zip("qkv", v.chunk(3, dim=0)):
                out[f"transformer_blocks.{b}.attention.{n}_proj.base.{kind}"] = part.contiguous()
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


@dataclass(frozen=True)
class Fix:
    """A key/tensor rewrite that can be applied with one click. `id` is 'op' or 'op:argument'."""

    id: str
    title: str
    detail: str


_FIX_OPS: dict[str, tuple[Callable[..., dict], str, str]] = {
    "strip_prefix": (_strip_prefix, "Strip the prefix '{arg}'", "remove '{arg}' from the start of every key that has it"),
    "add_prefix": (_add_prefix, "Add the prefix '{arg}'", "put '{arg}' in front of every key"),
    "peft_to_native": (_peft_to_native, "PEFT → native LoRA",
                       "base_layer → base; lora_A.weight [r, in] → lora.lora_A [in, r] and lora_B.weight [out, r] → "
                       "lora.lora_B [r, out] (transposed)"),
    "native_to_peft": (_native_to_peft, "Native LoRA → PEFT",
                       "base → base_layer; lora.lora_A [in, r] → lora_A.weight [r, in], lora.lora_B → lora_B.weight "
                       "[out, r] (transposed)"),
    "transpose_lora": (_transpose_lora, "Transpose LoRA matrices",
                       "lora_A stored [r, in] and lora_B stored [out, r] (PEFT orientation) under native names: "
                       "transpose to [in, r] / [r, out]"),
    "split_qkv": (_split_qkv, "Split fused in_proj into q/k/v",
                  "in_proj_weight [3d, d] → q_proj, k_proj, v_proj [d, d] (rows 0:d, d:2d, 2d:3d); same for the bias"),
    "fuse_qkv": (_fuse_qkv, "Fuse q/k/v into in_proj", "q, k, v [d, d] stacked into in_proj_weight [3d, d]"),
    "add_base_level": (_add_base_level, "Add the `base.` level",
                       "plain nn.Linear names (ffn.0.weight) → LoRALinear names (ffn.0.base.weight)"),
    "remove_base_level": (_remove_base_level, "Remove the `base.` level", "ffn.0.base.weight → ffn.0.weight"),
    "add_attention_level": (_add_attention_level, "Add the `attention.` level",
                            "transformer_blocks.N.q_proj → transformer_blocks.N.attention.q_proj"),
    "remove_attention_level": (_remove_attention_level, "Remove the `attention.` level",
                               "transformer_blocks.N.attention.q_proj → transformer_blocks.N.q_proj"),
    "add_lora_level": (_add_lora_level, "Add the `lora.` level", "q_proj.lora_A → q_proj.lora.lora_A"),
    "remove_lora_level": (_remove_lora_level, "Remove the `lora.` level", "q_proj.lora.lora_A → q_proj.lora_A"),
    "rename_norms": (_rename_norms, "Rename pre-norm LayerNorms",
                     "ln1/attn_norm → norm1, ln2/ffn_norm → norm2, ln_f/final_norm → output_norm (names only: "
                     "the norm placement stays an assumption)"),
    "norms_to_ln": (_norms_to_ln, "Rename LayerNorms to ln1/ln2/ln_f",
                    "norm1 → ln1, norm2 → ln2, output_norm → ln_f (the sketch's pre-norm names)"),
    "merge_lora": (lambda sd, scale: merge_lora(sd, float(scale)), "Merge LoRA into the base weights (scale {arg})",
                   "base.weight ← W + scale·(A@B)ᵀ, lora keys removed; the scale is the LoRA-scale assumption"),
    "stock_to_native": (_stock_to_native, "Stock PyTorch → native",
                        "layers.N.self_attn.in_proj_weight → q/k/v base weights, linear1/linear2 → ffn.0/ffn.3"),
    "native_to_stock": (_native_to_stock, "Native → stock PyTorch",
                        "q/k/v base weights → encoder.layers.N.self_attn.in_proj_weight, ffn.0/ffn.3 → linear1/linear2"),
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
    strip = {p for p in _prefixes([k for k in fs if k not in ts])
             if any(k.startswith(p) and k[len(p):] in ts for k in fs)}
    add = {p for p in _prefixes([k for k in ts if k not in fs])
           if any(k.startswith(p) and k[len(p):] in fs for k in ts)}
    ops = [op for op in _FIX_OPS if op not in ("strip_prefix", "add_prefix", "merge_lora")]
    merge = [f"merge_lora:{lora_scale:g}"] if _has(list(fs), _NATIVE_LORA.pattern) and not _has(list(ts), "lora") else []
    return [f"strip_prefix:{p}" for p in sorted(strip)] + [f"add_prefix:{p}" for p in sorted(add)] + merge + ops


def _score(sd: Mapping[str, Any], ts: Mapping[str, Shape]) -> int:
    return sum(1 for k, s in shapes_of(sd).items() if ts.get(k) == s)


def suggest_fixes(file: Mapping[str, Any], target: Mapping[str, Any], lora_scale: float = 1.0,
                  max_steps: int = 12) -> list[Fix]:
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


# ----------------------------------------------------------------------------------------- explain

@dataclass(frozen=True)
class Explanation:
    """A mismatch cause a rule recognised, in words, with the fixes (ids) that address it."""

    rule: str
    message: str
    fixes: tuple[str, ...] = ()


def _has(keys: Sequence[str], pattern: str) -> list[str]:
    rx = re.compile(pattern)
    return [k for k in keys if rx.search(k)]


def explain(file: Mapping[str, Any], target: Mapping[str, Any], ranking: pd.DataFrame | None = None) -> list[Explanation]:
    """Rule-based causes of the differences between file and target keys (empty when they match)."""
    fs, ts = shapes_of(file), shapes_of(target)
    diff = diff_keys(fs, ts)
    if diff.ok:
        return []
    F, T = list(fs), list(ts)
    out: list[Explanation] = []
    unexpected, missing = list(diff.unexpected), list(diff.missing)

    if ranking is None:
        ranking = rank_layouts(fs)
    top = ranking.iloc[0]
    if top.score >= 0.5 and not top.convertible:
        out.append(Explanation("layout", f"The file is a {top.title} checkpoint ({top.score:.0%} of key patterns): "
                               f"{top.note}. Renaming can align parts of it, but it is not FLAG-TRADER and cannot "
                               "be loaded as such."))

    for p in sorted(_prefixes(unexpected), key=len, reverse=True):
        n = sum(1 for k in unexpected if k.startswith(p) and k[len(p):] in ts)
        if n:
            carrying = sum(1 for k in F if k.startswith(p))
            who = f"all {carrying}" if carrying == len(F) else f"{carrying} of the {len(F)}"
            out.append(Explanation("prefix", f"{who} file keys carry the prefix '{p}' that the target does not have; "
                                   f"without it {n} of them match a target key "
                                   f"(e.g. '{next(k for k in unexpected if k.startswith(p) and k[len(p):] in ts)}').",
                                   (f"strip_prefix:{p}",)))
            break
    for p in sorted(_prefixes(missing), key=len, reverse=True):
        n = sum(1 for k in missing if k.startswith(p) and k[len(p):] in fs)
        if n:
            out.append(Explanation("prefix", f"{n} target keys have the prefix '{p}' that the file's keys lack.",
                                   (f"add_prefix:{p}",)))
            break

    if _has(F, r"transformer_blocks\.\d+\.(q|k|v|out)_proj\.") and _has(T, r"transformer_blocks\.\d+\.attention\."):
        out.append(Explanation("attention_level", "The file has q/k/v/out_proj directly on the block "
                               "(transformer_blocks.N.q_proj); the target nests them under `attention.`.",
                               ("add_attention_level",)))
    elif _has(F, r"transformer_blocks\.\d+\.attention\.") and _has(T, r"transformer_blocks\.\d+\.(q|k|v|out)_proj\."):
        out.append(Explanation("attention_level", "The file nests projections under `attention.`; the target has "
                               "them directly on the block.", ("remove_attention_level",)))

    peft_f, peft_t = _has(F, _PEFT_LORA.pattern) + _has(F, r"\.base_layer\."), _has(T, _PEFT_LORA.pattern)
    if peft_f and not peft_t:
        out.append(Explanation("peft_orientation", f"{len(peft_f)} keys use the PEFT / HF layout: `base_layer`, "
                               "lora_A.weight [r, in] and lora_B.weight [out, r]. Native LoRA is lora.lora_A [in, r] "
                               "and lora.lora_B [r, out]: the same numbers, transposed.", ("peft_to_native",)))
    elif peft_t and not peft_f and _has(F, _NATIVE_LORA.pattern):
        out.append(Explanation("peft_orientation", "The target is the PEFT layout: native lora.lora_A [in, r] must "
                               "become lora_A.weight [r, in] (transposed), base → base_layer.", ("native_to_peft",)))
    flipped = [k for k, a, b in diff.mismatched if a == b[::-1] and re.search(r"lora_[AB]", k)]
    if flipped:
        out.append(Explanation("peft_orientation", f"{len(flipped)} LoRA matrices are stored transposed (e.g. {flipped[0]}: "
                               f"file {list(fs[flipped[0]])}, target {list(ts[flipped[0]])}) — PEFT's [r, in] / [out, r] "
                               "orientation under native names.", ("transpose_lora",)))

    fused_f, fused_t = _has(F, r"in_proj_weight$"), _has(T, r"in_proj_weight$")
    if fused_f and not fused_t and _has(T, r"q_proj"):
        d = fs[fused_f[0]]
        out.append(Explanation("fused_qkv", f"{len(fused_f)} attention layers store q, k, v fused in in_proj_weight "
                               f"{list(d)} (nn.MultiheadAttention); the target has separate q_proj/k_proj/v_proj.",
                               ("stock_to_native",) if _has(F, r"self_attn\.in_proj") else ("split_qkv",)))
    elif fused_t and not fused_f and _has(F, r"q_proj"):
        out.append(Explanation("fused_qkv", "The target fuses q, k, v into in_proj_weight [3d, d]; the file keeps them "
                               "separate. LoRA on q/k/v must be merged first.",
                               ("native_to_stock",) if _has(T, r"self_attn\.in_proj") else ("fuse_qkv",)))

    plain = _has(unexpected, _IN_BLOCK.pattern)
    if plain and _has(T, _IN_BLOCK_BASE.pattern):
        out.append(Explanation("base_level", f"{len(plain)} projections use plain nn.Linear names ({plain[0]}); "
                               "FLAG-TRADER wraps each in a LoRALinear (`…base.weight`).", ("add_base_level",)))
    if _has(F, _BARE_LORA.pattern) and _has(T, _NATIVE_LORA.pattern):
        out.append(Explanation("lora_level", "LoRA matrices sit directly on the projection (q_proj.lora_A); the target "
                               "keeps them in a `lora.` sub-module (q_proj.lora.lora_A).", ("add_lora_level",)))

    pre = sorted({p for k in F for p in k.split(".") if p in _PRE_NORM_NAMES or p in _FINAL_NORM_NAMES})
    if pre and _has(T, r"(norm1|norm2|output_norm)\.weight$"):
        out.append(Explanation("norm_naming", f"LayerNorms are named {', '.join(pre)} — pre-norm naming; the target "
                               "uses norm1/norm2/output_norm (post-norm in the training code). Renaming fixes the keys; "
                               "the norm placement is an assumption: choose 'pre-norm' in the sidebar if this file "
                               "was trained pre-norm.", ("rename_norms",)))

    lora_f, lora_t = _has(F, r"lora_A"), _has(T, r"lora_A")
    if lora_t and not lora_f:
        out.append(Explanation("no_lora", f"The file has no LoRA adapters; the target expects {len(lora_t)} lora_A "
                               "tensors. A merged or LoRA-free file loads into the reconstruction built without LoRA."))
    elif lora_f and not lora_t:
        out.append(Explanation("no_lora", f"The file has {len(lora_f)} LoRA adapters; the target has none. Export it "
                               "'merged' (W + scale·(A@B)ᵀ) to load it into a model without LoRA."))

    try:
        sf, st = infer_sizes(fs), infer_sizes(ts)
    except LayoutError:
        sf = st = None
    if sf is not None:
        names = {"d_model": "hidden size", "ffn_dim": "FFN width", "n_blocks": "number of blocks",
                 "state_dim": "input features", "n_actions": "actions", "max_length": "max_length",
                 "lora_rank": "LoRA rank"}
        for attr, what in names.items():
            a, b = getattr(sf, attr), getattr(st, attr)
            guessed = any(str(x.provenance.get(attr, "")).startswith("default") for x in (sf, st))
            if a != b and not guessed and not (attr == "lora_rank" and 0 in (a, b)):
                out.append(Explanation("size", f"Different {what}: the file has {a} ({sf.provenance.get(attr, '')}), "
                                       f"the target {b}. No renaming changes a size; build the target from the file's "
                                       "shapes (the reconstruction does)."))
    return out


# ------------------------------------------------------------------------------- strict load, export

@dataclass(frozen=True)
class StrictLoad:
    """Result of loading a state dict strictly into FlagTrader(config inferred from it)."""

    ok: bool
    message: str
    config: ModelConfig | None
    diff: KeyDiff | None


def strict_load(sd: Mapping[str, torch.Tensor], stored: Mapping[str, Any] | None = None,
                **assumptions: Any) -> StrictLoad:
    """Infer the config from `sd`, build FlagTrader on the meta device and load `sd` with strict=True.

    Nothing is allocated: `assign=True` lets the model borrow the given tensors, and it is discarded.
    """
    try:
        cfg = infer_config(sd, stored)[0].with_assumptions(**assumptions)
    except ConfigError as exc:
        return StrictLoad(False, f"No configuration can be inferred: {exc}", None, None)
    with torch.device("meta"):
        model = FlagTrader(cfg)
    diff = diff_keys(sd, model.state_dict())
    if not diff.ok:
        return StrictLoad(False, f"Does not load strictly: {diff.summary()}.", cfg, diff)
    if any(t.device.type != "meta" for t in sd.values()):
        try:
            model.load_state_dict(dict(sd), strict=True, assign=True)
        except RuntimeError as exc:
            return StrictLoad(False, f"torch refused the strict load: {str(exc).splitlines()[0]}", cfg, diff)
    return StrictLoad(True, f"{len(sd)}/{len(sd)} tensors load strictly into FlagTrader "
                      f"({cfg.n_blocks} blocks, d={cfg.d_model}, LoRA rank {cfg.lora_rank}).", cfg, diff)


EXPORT_KINDS = ("native", "merged", "stock")
EXPORT_FORMATS = ("pt", "safetensors")


def to_native(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[Fix]]:
    """The file in the native layout (fixes chosen against the native layout at the file's own sizes).

    Raises LayoutError naming what is still wrong when no chain of fixes makes it load strictly.
    """
    if strict_load(meta_like(sd)).ok:
        return dict(sd), []
    size = infer_sizes(sd)
    fixes = suggest_fixes(sd, native_layout(size))
    out = apply_fixes(sd, fixes)
    res = strict_load(meta_like(out))
    if not res.ok:
        done = ", ".join(f.title for f in fixes) or "none applied"
        extra = ""
        if res.diff is not None:
            extra = "; ".join(f"{n}: {', '.join(ks[:4])}" for n, ks in (
                ("unexpected", res.diff.unexpected), ("missing", res.diff.missing),
                ("mis-shaped", [k for k, _, _ in res.diff.mismatched])) if ks)
        raise LayoutError(f"cannot convert to the native layout (fixes: {done}). {res.message} {extra}".strip())
    return out, fixes


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
            # float32 (or wider) so a half-precision file does not lose the small update
            work = torch.promote_types(v.dtype, torch.float32)
            v = (v.to(work) + scale * (a.to(work) @ b.to(work)).T).to(v.dtype)
        out[k] = v
    return out


def convert(sd: Mapping[str, torch.Tensor], kind: str, lora_scale: float) -> tuple[dict[str, torch.Tensor], list[Fix]]:
    """Convert any convertible layout to 'native', 'merged' (LoRA folded in, native names) or 'stock'."""
    if kind not in EXPORT_KINDS:
        raise LayoutError(f"unknown export kind '{kind}'; choose one of {EXPORT_KINDS}")
    native, fixes = to_native(sd)
    if kind == "native":
        return native, fixes
    merged = merge_lora(native, lora_scale)
    if kind == "merged":
        return merged, fixes
    stock = _native_to_stock(merged)
    check = diff_keys(stock, stock_layout(infer_sizes(merged)))
    if not check.ok:  # e.g. LoRA on only some blocks' projections cannot leave holes in a stock layer
        raise LayoutError(f"the stock export does not match nn.TransformerEncoderLayer keys: {check.summary()}.")
    return stock, fixes


def export_config(cfg: ModelConfig, kind: str) -> dict[str, Any]:
    """Plain-value config stored with an export, so it reopens with the same assumptions."""
    out = cfg.to_dict()
    if kind != "native":
        out.pop("lora_alpha", None)
        out.pop("lora_rank", None)
        out["lora_merged_with_scale"] = cfg.lora_scale
    out["layout"] = kind
    return out


def export_bytes(sd: Mapping[str, torch.Tensor], fmt: str = "pt", config: Mapping[str, Any] | None = None) -> bytes:
    """File bytes: .pt holds {'model_state_dict', 'config'} (loads with weights_only=True); .safetensors holds
    the tensors with the config as JSON metadata."""
    tensors = {k: v.detach().contiguous().clone() for k, v in sd.items()}
    if fmt == "pt":
        buf = io.BytesIO()
        torch.save({"model_state_dict": tensors, "config": dict(config or {})}, buf)
        return buf.getvalue()
    if fmt == "safetensors":
        from safetensors.torch import save

        return save(tensors, metadata={"config": json.dumps(dict(config or {}))})
    raise LayoutError(f"unknown format '{fmt}'; choose one of {EXPORT_FORMATS}")


def export_file(sd: Mapping[str, torch.Tensor], kind: str, fmt: str, stored: Mapping[str, Any] | None = None,
                **assumptions: Any) -> bytes:
    """Convert (any convertible layout) and serialise, with the config and assumptions stored beside the weights.

    `assumptions` are ModelConfig assumptions (num_heads, lora_scale, norm_first, causal); lora_scale is the
    scale a merge uses.
    """
    native, _ = to_native(sd)
    cfg = infer_config(native, stored)[0].with_assumptions(**assumptions)
    out, _ = convert(native, kind, cfg.lora_scale)
    return export_bytes(out, fmt, export_config(cfg, kind))


def export_problem(sd: Mapping[str, Any], kind: str) -> str | None:
    """Why this export would fail (checked on shapes only, instantly), or None when it will work."""
    try:
        convert(meta_like(sd), kind, 1.0)
    except (LayoutError, ConfigError) as exc:
        return str(exc)
    return None


def fix_for_target(sd: Mapping[str, torch.Tensor], fixes: Sequence[Fix | str], target: Mapping[str, Any],
                   drop_extra: bool = False) -> dict[str, torch.Tensor]:
    """Apply fixes in order; with drop_extra also remove keys the target has no place for."""
    out = apply_fixes(sd, fixes)
    return drop_keys(out, diff_keys(out, target).unexpected) if drop_extra else out


def reconstruction_config(cfg: ModelConfig | None, sd: Mapping[str, Any]) -> tuple[ModelConfig, str]:
    """The config of the reconstruction target, and how it was found (inferred config or shapes of any layout)."""
    if cfg is not None:
        return cfg, "the file's inferred configuration with the current assumptions"
    size = infer_sizes(sd)
    how = "; ".join(f"{k} {getattr(size, k)} from {v}" for k, v in size.provenance.items())
    return size.to_config(), f"sizes read from whatever shapes exist ({how})"


def resize_config(cfg: ModelConfig, **sizes: int | None) -> ModelConfig:
    """A copy with n_blocks / d_model / ffn_dim replaced (what another loader assumed); LoRA stays on the same
    modules of every block, and the head count falls back to a divisor of the new d."""
    sizes = {k: v for k, v in sizes.items() if v is not None and v != getattr(cfg, k)}
    if not sizes:
        return cfg
    mods = {t.split(".", 2)[2] for t in cfg.lora_targets}
    n = sizes.get("n_blocks", cfg.n_blocks)
    targets = tuple(f"transformer_blocks.{b}.{m}" for b in range(n) for m in BLOCK_LINEARS if m in mods)
    d = sizes.get("d_model", cfg.d_model)
    heads = cfg.num_heads if d % cfg.num_heads == 0 else max(h for h in range(1, DEFAULT_HEADS + 1) if d % h == 0)
    prov = {**cfg.provenance, **{k: "set by user (what another loader assumed)" for k in sizes}}
    return replace(cfg, **sizes, lora_targets=targets, num_heads=heads, provenance=prov)


TARGETS: tuple[str, ...] = ("reconstruction",) + tuple(LAYOUTS)


def target_shapes(target: str, sd: Mapping[str, Any], cfg: ModelConfig | None = None,
                  **sizes: int | None) -> tuple[dict[str, Shape], str]:
    """Expected keys and shapes of a named target, and a sentence saying how they were derived.

    'reconstruction' is FlagTrader(cfg) (cfg: the file's config with the current assumptions, or sizes read
    from any layout's shapes when the file has none); a layout name generates that layout at the file's sizes.
    `sizes` (n_blocks, d_model, ffn_dim) override what the file says, e.g. to see a wrong guess.
    """
    if target == "reconstruction":
        cfg, how = reconstruction_config(cfg, sd)
        cfg = resize_config(cfg, **sizes)
        return reconstruction_shapes(cfg), (
            f"FlagTrader with {cfg.n_blocks} blocks, d={cfg.d_model}, F={cfg.ffn_dim}, LoRA rank {cfg.lora_rank} on "
            f"{len(cfg.lora_targets)} modules — {how}")
    if target not in LAYOUTS:
        raise LayoutError(f"unknown target '{target}'; choose one of {TARGETS} or give a checkpoint path.")
    lay = LAYOUTS[target]
    size = with_sizes(infer_sizes(sd), **sizes)
    return lay.keys(size), (f"{lay.title} generated at the file's sizes (d={size.d_model}, F={size.ffn_dim}, "
                            f"{size.n_blocks} blocks, LoRA rank {size.lora_rank}) — {lay.note}")


def with_sizes(size: LayoutSize, **changes: int | None) -> LayoutSize:
    """A copy with some sizes replaced (e.g. the hidden size another loader assumed)."""
    changes = {k: v for k, v in changes.items() if v is not None and v != getattr(size, k)}
    prov = {**size.provenance, **{k: "set by user" for k in changes}}
    return replace(size, **changes, provenance=prov)


__all__ = [
    "EXPORT_FORMATS", "EXPORT_KINDS", "Explanation", "Fix", "KNOWN_PREFIXES", "KeyDiff", "LAYOUTS", "Layout",
    "LayoutError", "LayoutSize", "StrictLoad", "apply_fix", "apply_fixes", "candidate_fixes", "convert",
    "TARGETS", "diff_keys", "diff_table", "drop_keys", "explain", "export_bytes", "export_config", "export_file",
    "export_problem", "fix_for_target", "infer_sizes",
    "key_pattern", "make_fix", "merge_lora", "meta_like", "native_layout", "rank_layouts",
    "ranking_headline", "reconstruction_config", "reconstruction_shapes", "resize_config", "shapes_of",
    "strict_load", "strip_prefixes", "suggest_fixes", "target_shapes", "to_native", "with_sizes",
]
