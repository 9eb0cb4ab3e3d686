"""What a layout family is: a signature, size inference from shapes, expected keys at those sizes, words."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ...config import BLOCK_LINEARS, DEFAULT_HEADS, SIZE_FIELDS, STORED_HEADS, ModelConfig, Sizes, fallback_heads
from ..keys import LayoutError, Shape, find, indices, lin, norm


@dataclass(frozen=True)
class LayoutSize(Sizes):
    """The sizes a layout is generated at; `provenance` says which tensor (or stored value) each came from.

    `lora_targets` are module paths relative to the layout's root (FLAG-TRADER: "transformer_blocks.0.ffn.0";
    PEFT LLM adapters: module names such as "q_proj"); empty with a rank means every projection. `extra` holds
    family-specific sizes as sorted (name, value) pairs (prefix, head chains, regimes, ...).
    """

    lora_targets: tuple[str, ...] = ()
    num_heads: int | None = None
    extra: tuple[tuple[str, Any], ...] = ()
    provenance: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)

    def get(self, name: str, default: Any = None) -> Any:
        """A family-specific size from `extra`."""
        return dict(self.extra).get(name, default)

    @classmethod
    def from_config(cls, cfg: Any) -> LayoutSize:
        """From a ModelConfig (or anything with the same size attributes)."""
        return cls(
            **{f: getattr(cfg, f) for f in SIZE_FIELDS},
            lora_targets=tuple(getattr(cfg, "lora_targets", ())),
            num_heads=getattr(cfg, "num_heads", None),
            provenance={k: "given" for k in SIZE_FIELDS},
        )

    def native_targets(self) -> tuple[str, ...]:
        """FLAG-TRADER LoRA module paths: the inferred ones, or every projection when only a rank is given."""
        if not self.lora_rank:
            return ()
        if self.lora_targets:
            return self.lora_targets
        return tuple(f"transformer_blocks.{b}.{m}" for b in range(self.n_blocks) for m in BLOCK_LINEARS)

    def to_config(self, num_heads: int | None = None, **assumptions: Any) -> ModelConfig:
        """A ModelConfig at these sizes; heads: given, else stored, else 8, falling back to a divisor of d."""
        heads = fallback_heads(self.d_model, num_heads or self.num_heads or DEFAULT_HEADS)
        return ModelConfig(
            self.n_blocks,
            self.d_model,
            self.ffn_dim,
            self.state_dim,
            self.n_actions,
            self.max_length,
            self.lora_rank,
            self.native_targets(),
            num_heads=heads,
            provenance=dict(self.provenance),
            **assumptions,
        )

    def summary(self) -> str:
        """'12 blocks, d=256, F=1024, 60 inputs, 3 actions, LoRA rank 16 on 72 modules, 8 heads (stored)'."""
        parts = [
            f"{self.n_blocks} blocks" if self.n_blocks else None,
            f"d={self.d_model}" if self.d_model else None,
            f"F={self.ffn_dim}" if self.ffn_dim else None,
            f"{self.state_dim} inputs" if self.state_dim else None,
            f"{self.n_actions} actions" if self.n_actions else None,
        ]
        if self.lora_rank:
            parts.append(
                f"LoRA rank {self.lora_rank} on {len(self.native_targets()) or 'all'} modules"
                if not self.get("peft_targets")
                else f"LoRA rank {self.lora_rank} on {', '.join(self.get('peft_targets'))}"
            )
        if self.num_heads:
            parts.append(f"{self.num_heads} heads ({self.provenance.get('num_heads', 'stored')})")
        if self.get("prefix") not in (None, "", "base_model.model.", "base_model.model.model."):
            parts.append(f"every key under the extra prefix '{self.get('prefix')}'")
        return ", ".join(p for p in parts if p)


Infer = Callable[[Mapping[str, Shape], Mapping[str, Any]], LayoutSize]


@dataclass(frozen=True)
class Family:
    """A known checkpoint layout family.

    `signature`: regexes of keys only this family's files have (block index as \\d+); a file with none of them is
    not scored. `infer(shapes, stored)` reads every size from shapes (stored config only for heads/alpha) and raises
    LayoutError when it cannot; `expected(size)` gives the keys and shapes a file of the family has at those sizes.
    """

    name: str
    title: str
    description: str
    converts_to: str
    convertible: bool
    carries_lora: bool
    signature: tuple[str, ...]
    infer: Infer
    expected: Callable[[LayoutSize], dict[str, Shape]]

    @property
    def keys(self) -> Callable[[LayoutSize], dict[str, Shape]]:
        return self.expected

    @property
    def note(self) -> str:
        return self.description

    def evidence(self, keys) -> list[str]:
        """File keys that match the signature."""
        rxs = [re.compile(p) for p in self.signature]
        return [k for k in keys if any(r.search(k) for r in rxs)]


# ------------------------------------------------------------------------------------- shared helpers


def stored_heads(stored: Mapping[str, Any] | None) -> tuple[int | None, str]:
    """Head count from a stored config (or the saved dict's own top-level values) and where it came from."""
    for n in STORED_HEADS:
        v = (stored or {}).get(n)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v, f"stored config['{n}']"
    return None, "not stored (not recoverable from weights)"


@dataclass(frozen=True)
class Trunk:
    """What every encoder family reads the same way: the input embedding [d, inputs] (and the prefix in front of
    it), the block indices and the FFN width, with provenance."""

    root: str
    d_model: int
    state_dim: int
    blocks: tuple[int, ...]
    ffn_dim: int
    provenance: dict[str, str]

    def size(self, n_actions: int, max_length: int, stored: Mapping[str, Any], extra: tuple) -> LayoutSize:
        """A LayoutSize without LoRA at these sizes; the head count from the stored config (else unknown)."""
        heads, self.provenance["num_heads"] = stored_heads(stored)
        return LayoutSize(
            max(self.blocks) + 1,
            self.d_model,
            self.ffn_dim,
            self.state_dim,
            n_actions,
            max_length,
            0,
            (),
            heads,
            extra,
            self.provenance,
        )


def read_trunk(
    shapes: Mapping[str, Shape], embed: str, what: str, inputs: str, blocks: str, ffn: str, ffn_under_root: bool = False
) -> Trunk:
    """`embed`: regex of the embedding weight key after the prefix; `what` names it in errors; `inputs` names its
    second dimension; `blocks`: the block stem before `.N.` (literal); `ffn`: regex of the first FFN weight after
    `.N.`, searched anywhere (or only under the prefix with `ffn_under_root`)."""
    emb = need(find(shapes, rf"^(.*?){embed}$", lambda s: len(s) == 2), what)
    root = emb[2].group(1)
    (d, state_dim), prov = emb[1], {}
    prov["d_model"] = prov["state_dim"] = f"{emb[0]} {list(emb[1])} = [d, {inputs}]"
    stem = re.escape(blocks)
    found = indices(shapes, rf"^{re.escape(root)}{stem}\.(\d+)\.")
    if not found:
        raise LayoutError(f"no {blocks}.N keys")
    prov["n_blocks"] = f"{len(found)} distinct {blocks}.N indices"
    anchor = f"^{re.escape(root)}" if ffn_under_root else ""
    hit = find(shapes, rf"{anchor}{stem}\.\d+\.{ffn}$", lambda s: len(s) == 2)
    prov["ffn_dim"] = f"{hit[0]} {list(hit[1])} = [F, d]" if hit else "default 4·d"
    return Trunk(root, d, state_dim, tuple(found), hit[1][0] if hit else 4 * d, prov)


def need(hit: Any, what: str) -> Any:
    if hit is None:
        raise LayoutError(f"no {what} found")
    return hit


def lora_rank_of(shapes: Mapping[str, Shape], pattern: str, axis: int) -> tuple[int, int]:
    """(most common rank, number of adapters) over lora_A tensors matching `pattern`; rank on `axis`."""
    rx = re.compile(pattern)
    ranks = Counter(s[axis] for k, s in shapes.items() if rx.search(k) and len(s) == 2)
    return (ranks.most_common(1)[0][0], sum(ranks.values())) if ranks else (0, 0)


def sequential(shapes: Mapping[str, Shape], prefix: str) -> tuple[tuple[int, str, int], ...]:
    """An nn.Sequential's parameterised layers under `prefix`: (index, 'linear'|'norm', output size), in order."""
    rx = re.compile(rf"^{re.escape(prefix)}(\d+)\.weight$")
    out = []
    for k, s in shapes.items():
        if m := rx.match(k):
            out.append((int(m.group(1)), "linear" if len(s) == 2 else "norm", s[0]))
    return tuple(sorted(out))


def sequential_keys(prefix: str, spec, d_in: int) -> dict[str, Shape]:
    """Keys of an nn.Sequential of Linear/LayerNorm layers (spec from `sequential`) fed `d_in` features."""
    out: dict[str, Shape] = {}
    cur = d_in
    for idx, kind, size in spec:
        if kind == "linear":
            out.update(lin(f"{prefix}{idx}", cur, size))
            cur = size
        else:
            out.update(norm(f"{prefix}{idx}", cur))
    return out


def mha(prefix: str, d: int) -> dict[str, Shape]:
    """nn.MultiheadAttention keys (fused in_proj)."""
    return {
        f"{prefix}.in_proj_weight": (3 * d, d),
        f"{prefix}.in_proj_bias": (3 * d,),
        **lin(f"{prefix}.out_proj", d, d),
    }


def positional(shapes: Mapping[str, Shape], pattern: str, d: int) -> tuple[int, str]:
    """Length of a positional table [1, L, d] (or [L, d]) and its provenance; 0 when absent."""
    hit = next(((k, s) for k, s in shapes.items() if re.search(pattern, k) and len(s) in (2, 3) and s[-1] == d), None)
    if hit is None:
        return 0, "no positional table"
    return hit[1][-2], f"{hit[0]} {list(hit[1])}"
