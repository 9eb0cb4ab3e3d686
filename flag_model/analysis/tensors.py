"""Tensor table, module tree, per-tensor detail (histogram, spectrum against random init) and state-dict diffs.

Statistics are computed with torch reductions over chunks of each tensor (no Python loops over elements, no
full-size temporary: see `flag_model.limits`), so all 343 tensors of a d=768 file (88 M parameters) take about a
second and a huge or stride-0 tensor costs one chunk of memory.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..limits import pieces

ROLES = ("embedding", "positional", "base", "lora_A", "lora_B", "norm", "head", "other")
STATISTICS = ("mean", "std", "min", "max", "abs_max", "fro_norm", "zeros_share", "nonfinite")
TABLE_COLUMNS = ("name", "role", "block", "module", "shape", "dtype", "elements", "bytes") + STATISTICS

_BLOCK = re.compile(r"(?:^|\.)(?:transformer_blocks|layers|blocks)\.(\d+)\.(.*)$")
_NORM_PART = re.compile(r"^(ln(_?\w+)?|\w*norm\w*)$")


def tensor_role(key: str) -> str:
    """embedding / positional / base / lora_A / lora_B / norm / head / other, from the key alone."""
    low = key.lower()
    parts = low.split(".")
    if "lora_a" in parts or re.search(r"lora_a$|lora_a\.", low):
        return "lora_A"
    if "lora_b" in parts or re.search(r"lora_b$|lora_b\.", low):
        return "lora_B"
    if re.search(r"pos_(embedding|encoding|embed)|position", low):
        return "positional"
    if any(_NORM_PART.match(p) for p in parts[:-1]) or _NORM_PART.match(parts[-1]):
        return "norm"
    if re.search(r"(action_head|policy_head|value_head|actor|critic|(^|\.)head)", low):
        return "head"
    if re.search(r"(state_embedding|input_proj|feature_proj|embed)", low):
        return "embedding"
    if _BLOCK.search(key) or re.search(r"(proj|linear|ffn|mlp|fc)", low):
        return "base"
    return "other"


def split_block(key: str) -> tuple[int | None, str]:
    """(block index or None, the key's path inside the block with `attention.`/`base.`/`lora.` levels dropped)."""
    m = _BLOCK.search(key)
    if m is None:
        return None, key
    rest = m.group(2).removeprefix("attention.").replace(".base.", ".").replace(".lora.", ".")
    return int(m.group(1)), rest


def _moments(t: torch.Tensor) -> tuple[dict[str, float], int, int]:
    """Statistics of one tensor over its finite values, chunk by chunk (flag_model.limits.pieces), merged with
    Chan et al.'s parallel update: -> (mean/std/min/max/abs_max/fro_norm, zero count, non-finite count)."""
    n_all = cnt = zeros = 0
    mean = m2 = sq = 0.0
    lo, hi = math.inf, -math.inf
    for part in pieces(t):
        x = part.reshape(-1).float()  # a copy of one chunk at most
        n_all += x.numel()
        finite = torch.isfinite(x)
        if not bool(finite.all()):
            x = x[finite]
        m = x.numel()
        if not m:
            continue
        a, b = torch.aminmax(x)
        lo, hi = min(lo, float(a)), max(hi, float(b))
        mean_b = float(x.sum(dtype=torch.float64)) / m
        m2_b = float(torch.linalg.vector_norm(x.double() - mean_b)) ** 2
        sq += float(torch.linalg.vector_norm(x, dtype=torch.float64)) ** 2
        zeros += m - int(torch.count_nonzero(x))
        total = cnt + m
        delta = mean_b - mean
        mean, m2, cnt = mean + delta * m / total, m2 + m2_b + delta * delta * cnt * m / total, total
    if not cnt:
        return {k: math.nan for k in ("mean", "std", "min", "max", "abs_max", "fro_norm")}, 0, n_all
    return (
        {
            "mean": mean,
            "std": math.sqrt(m2 / cnt),
            "min": lo,
            "max": hi,
            "abs_max": max(-lo, hi),
            "fro_norm": math.sqrt(sq),
        },
        zeros,
        n_all - cnt,
    )


def stats_totals(stats: pd.DataFrame) -> dict[str, int]:
    """Headline counts of a `tensor_stats` table: tensors, elements, NaN/Inf elements, all-zero tensors."""
    return {
        "Tensors": len(stats),
        "Elements": int(stats["elements"].sum()),
        "NaN / Inf": int(stats["nonfinite"].sum()),
        "All-zero tensors": int((stats["zeros_share"] == 1).sum()),
    }


def tensor_stats(sd: Mapping[str, torch.Tensor]) -> pd.DataFrame:
    """One row per tensor: name, role, block, module, shape, dtype, elements, bytes and STATISTICS.

    std is the population std (no Bessel correction); statistics skip NaN/Inf, counted in `nonfinite`.
    """
    rows = []
    for name, t in sd.items():
        n = t.numel()
        row, zeros, bad = _moments(t.detach())
        block, module = split_block(name)
        rows.append(
            {
                "name": name,
                "role": tensor_role(name),
                "block": block,
                "module": module,
                "shape": "×".join(map(str, t.shape)) or "scalar",
                "dtype": str(t.dtype).removeprefix("torch."),
                "elements": n,
                "bytes": n * t.element_size(),
                **row,
                "zeros_share": zeros / n if n else math.nan,
                "nonfinite": bad,
            }
        )
    df = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    df["block"] = df["block"].astype("Int64")
    return df


def _node_parts(key: str) -> list[str]:
    """Tree levels of a key: a numeric part stays with its parent ('transformer_blocks.0', 'ffn.3')."""
    out: list[str] = []
    for p in key.split("."):
        if p.isdigit() and out:
            out[-1] = f"{out[-1]}.{p}"
        else:
            out.append(p)
    return out


def _hierarchy(keys: list[str], root: str) -> tuple[list[tuple[str, str, str]], dict[str, list[str]]]:
    """-> ([(id, parent, label)] for inner nodes and leaves, {node id: leaf keys below it})."""
    nodes: dict[str, tuple[str, str]] = {root: ("", root)}
    below: dict[str, list[str]] = {root: []}
    for k in keys:
        parts = _node_parts(k)
        parent = root
        below[root].append(k)
        for i, p in enumerate(parts):
            node = k if i == len(parts) - 1 else ".".join(parts[: i + 1]) + "/"
            nodes.setdefault(node, (parent, p))
            below.setdefault(node, []).append(k)
            parent = node
    return [(i, par, lab) for i, (par, lab) in nodes.items()], below


_AGG = {"min": "min", "max": "max", "abs_max": "max", "nonfinite": "sum", "elements": "sum", "bytes": "sum"}


def tensor_tree(stats: pd.DataFrame, color: str = "std", root: str = "checkpoint") -> pd.DataFrame:
    """Treemap data: id, parent, label, elements, n_tensors, color.

    Leaves are tensors; inner nodes aggregate their leaves (min/max/sum where that is the meaning,
    element-weighted mean otherwise). `elements` of a node is the sum of its leaves.
    """
    names = list(stats["name"])
    row_of = {n: i for i, n in enumerate(names)}
    values = stats[color].astype(float).to_numpy()
    elements = stats["elements"].to_numpy(dtype=np.int64)
    agg = _AGG.get(color)
    nodes, below = _hierarchy(names, root)
    rows = []
    for node, parent, label in nodes:  # numpy per node: the 12-block file has ~600 nodes
        idx = np.fromiter((row_of[k] for k in below[node]), dtype=np.int64)
        vals, elems = values[idx], elements[idx]
        known = ~np.isnan(vals)
        if agg in ("min", "max"):
            c = float(getattr(vals[known], agg)()) if known.any() else math.nan
        elif agg == "sum":
            c = float(vals[known].sum())
        else:
            w = np.where(known, elems, 0).astype(float)
            c = float((np.where(known, vals, 0.0) * w).sum() / w.sum()) if w.sum() else math.nan
        rows.append(
            {
                "id": node,
                "parent": parent,
                "label": label,
                "elements": int(elems.sum()),
                "n_tensors": len(idx),
                "color": c,
            }
        )
    return pd.DataFrame(rows)


def key_status_tree(table: pd.DataFrame, root: str = "keys") -> pd.DataFrame:
    """Aligned tree of a key diff (layouts.diff_table): id, parent, label, status, counts per status.

    An inner node's status is its leaves' status when they agree, else 'mixed'; labels carry the counts.
    """
    status = dict(zip(table["key"], table["status"]))
    nodes, below = _hierarchy(list(table["key"]), root)
    rows = []
    for node, parent, label in nodes:
        sts = [status[k] for k in below[node]]
        counts = {s: sts.count(s) for s in ("matched", "mis-shaped", "missing", "unexpected")}
        one = set(sts)
        st = one.pop() if len(one) == 1 else "mixed"
        if len(below[node]) > 1:
            label = f"{label} ({', '.join(f'{n} {s}' for s, n in counts.items() if n)})"
        rows.append({"id": node, "parent": parent, "label": label, "status": st, "size": 1, **counts})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------- detail


@dataclass(frozen=True)
class InitGuess:
    """What a random initialisation of a tensor with this key would look like."""

    sigma: float  # std of one entry at init (0: initialised to zero)
    bound: float | None  # uniform inits: |w| <= bound
    description: str


def init_guess(key: str, shape: tuple[int, ...]) -> InitGuess | None:
    """The PyTorch default init for this kind of tensor, or None for vectors (biases, norms).

    nn.Linear [out, in] (also the native lora_A [in, r], initialised on its transpose): kaiming_uniform a=√5,
    U(±1/√in), entry variance 1/(3·in). lora_B: zeros. pos_embedding: N(0, 0.02²). in_proj_weight
    [3d, d] (nn.MultiheadAttention): xavier_uniform, variance 2/(d + 3d).
    """
    if len(shape) < 2:
        return None
    role = tensor_role(key)
    if role == "lora_B":
        return InitGuess(0.0, 0.0, "zeros (the LoRA initialisation of B)")
    if role == "positional":
        return InitGuess(0.02, None, "normal(0, 0.02)")
    if key.endswith("in_proj_weight") and shape[0] == 3 * shape[1]:
        bound = math.sqrt(6 / (4 * shape[1]))
        return InitGuess(bound / math.sqrt(3), bound, f"xavier_uniform U(±{bound:.4g})")
    if role == "lora_A" and not key.endswith("weight"):
        fan_in = shape[0]  # native [in, r]
    elif key.endswith("embed.weight") and role == "embedding":
        return InitGuess(1.0, None, "nn.Embedding default N(0, 1)")
    else:
        fan_in = int(np.prod(shape[1:]))  # [out, in]
    bound = 1 / math.sqrt(fan_in)
    return InitGuess(bound / math.sqrt(3), bound, f"nn.Linear default U(±1/√{fan_in}) = U(±{bound:.4g})")


def marchenko_pastur_singular_values(rows: int, cols: int, sigma: float) -> np.ndarray:
    """Expected singular values (descending, min(rows, cols) of them) of a rows×cols matrix with i.i.d.
    entries of std `sigma`: the Marchenko–Pastur quantiles at (i + 0.5) / n.

    With m ≥ n the eigenvalues of WᵀW / m have density √((b−λ)(λ−a)) / (2π σ² y λ), y = n/m,
    a, b = σ²(1 ∓ √y)²; a singular value is √(m λ). Integrated on λ = a + (b−a)(1−cos θ)/2, where the
    density is smooth even at a = 0 (square matrices).
    """
    m, n = max(rows, cols), min(rows, cols)
    if sigma == 0 or n == 0:
        return np.zeros(n)
    y = n / m
    a, b = sigma**2 * (1 - math.sqrt(y)) ** 2, sigma**2 * (1 + math.sqrt(y)) ** 2
    theta = np.linspace(0.0, math.pi, 20_001)
    lam = a + (b - a) * (1 - np.cos(theta)) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        g = ((b - a) / 2) ** 2 * np.sin(theta) ** 2 / (2 * math.pi * sigma**2 * y * lam)
    g[0] = 0.0 if a > 0 else b / (2 * math.pi * sigma**2 * y)  # the θ→0 limit; finite although λ→0
    cdf = np.concatenate([[0.0], np.cumsum((g[1:] + g[:-1]) / 2 * np.diff(theta))])
    cdf /= cdf[-1]
    probs = (n - np.arange(n) - 0.5) / n  # descending order
    return np.sqrt(m * np.interp(probs, cdf, lam))


@dataclass(frozen=True)
class SpectrumCheck:
    """Singular values of a matrix next to the random-init expectation, with a plain verdict."""

    singular_values: np.ndarray  # descending
    expected: np.ndarray  # Marchenko–Pastur quantiles of the init, same length
    init: str
    edge: float  # largest singular value a random init of this shape reaches (MP upper edge)
    std: float
    expected_std: float
    n_above_edge: int
    spectrum_error: float  # mean |s - expected| / mean(expected)
    looks_like_init: bool
    verdict: str


def spectrum_check(key: str, t: torch.Tensor) -> SpectrumCheck | None:
    """Compare a matrix with what its default random initialisation would give; None for vectors.

    Verdict "looks like untrained initialisation" when the entry std is within a few percent of the init
    std, the entries respect the uniform bound, and the spectrum follows Marchenko–Pastur with no singular
    value above the bulk edge (tolerances widen for small matrices, whose spectra fluctuate more).
    """
    x = t.detach().float()
    if x.dim() < 2 or x.numel() == 0 or not torch.isfinite(x).all():
        return None
    guess = init_guess(key, tuple(x.shape))
    if guess is None:  # no default initialisation to compare with
        return None
    x = x.reshape(-1, x.shape[-1])  # pos_embedding [1, L, d] -> [L, d]
    rows, cols = x.shape
    s = torch.linalg.svdvals(x).double().numpy()
    std = float(x.std(correction=0))
    n = min(rows, cols)
    if guess.sigma == 0:
        zero = bool((x == 0).all())
        verdict = (
            "all zero: exactly the LoRA initialisation of B — this adapter was never trained"
            if zero
            else "non-zero: LoRA B starts at zero, so this adapter was trained"
        )
        return SpectrumCheck(
            s,
            np.zeros(n),
            guess.description,
            0.0,
            std,
            0.0,
            int((s > 0).sum()),
            math.inf if not zero else 0.0,
            zero,
            verdict,
        )
    expected = marchenko_pastur_singular_values(rows, cols, guess.sigma)
    edge = guess.sigma * (math.sqrt(max(rows, cols)) + math.sqrt(n))
    tol_edge = 0.05 + 2.0 * n ** (-2 / 3)
    tol_std = 0.03 + 4.0 / math.sqrt(x.numel())
    tol_spec = 0.04 + 0.6 / math.sqrt(n)
    above = int((s > edge * (1 + tol_edge)).sum())
    err = float(np.abs(s - expected).mean() / expected.mean())
    std_ok = abs(std / guess.sigma - 1) <= tol_std
    bound_ok = guess.bound is None or float(x.abs().max()) <= guess.bound * (1 + 1e-6)
    spec_ok = n < 8 or (above == 0 and err <= tol_spec)
    ok = std_ok and bound_ok and spec_ok
    if ok:
        verdict = f"looks like untrained initialisation ({guess.description}): std {std:.4g} vs {guess.sigma:.4g}" + (
            "" if n < 8 else f", spectrum within {err:.0%} of Marchenko–Pastur"
        )
    elif above:
        verdict = (
            f"trained / structured: {above} singular value{'s' * (above > 1)} above the random-init edge "
            f"{edge:.3g} (largest {s[0]:.3g})"
        )
    elif not std_ok:
        verdict = f"not the default initialisation: entry std {std:.4g} vs {guess.sigma:.4g} for {guess.description}"
    elif not bound_ok:
        verdict = f"moved from initialisation: entries exceed the init bound ±{guess.bound:.4g}"
    else:
        verdict = f"moved from initialisation: spectrum differs from Marchenko–Pastur by {err:.0%}"
    return SpectrumCheck(s, expected, guess.description, edge, std, guess.sigma, above, err, ok, verdict)


@dataclass(frozen=True)
class TensorDetail:
    """Everything the detail view shows for one tensor (numpy only, so pages need no torch)."""

    name: str
    role: str
    shape: tuple[int, ...]
    hist_edges: np.ndarray  # bins + 1
    hist_counts: np.ndarray  # bins
    matrix: np.ndarray | None  # 2-D (leading dims flattened), block-averaged to at most max_cells; None for vectors
    matrix_step: int  # rows and columns per cell of `matrix` (1: not reduced)
    spectrum: SpectrumCheck | None


def block_mean(a: np.ndarray, max_cells: int) -> tuple[np.ndarray, int]:
    """(r, c) float64: square blocks of a 2-D array averaged (NaNs ignored; edge blocks partial) so that at most
    `max_cells` remain, and the block side. The one downsampler of every heatmap."""
    rows, cols = a.shape
    step = max(1, math.ceil(math.sqrt(rows * cols / max_cells)))
    r, c = -(-rows // step), -(-cols // step)
    padded = np.full((r * step, c * step), np.nan)
    padded[:rows, :cols] = a
    with np.errstate(invalid="ignore"):
        return np.nanmean(padded.reshape(r, step, c, step), axis=(1, 3)), step


def tensor_detail(name: str, t: torch.Tensor, bins: int = 60, max_cells: int = 250_000) -> TensorDetail:
    """Histogram of finite values, the (block-averaged) 2-D matrix for a heatmap, and the spectrum check."""
    x = t.detach().float()
    flat = x.reshape(-1)
    flat = flat[torch.isfinite(flat)]
    if flat.numel():
        lo, hi = (float(v) for v in torch.aminmax(flat))
        if lo == hi:
            lo, hi = lo - 0.5, hi + 0.5
        counts = torch.histc(flat, bins=bins, min=lo, max=hi).numpy()
        edges = np.linspace(lo, hi, bins + 1)
    else:
        counts, edges = np.zeros(0), np.zeros(1)
    matrix, step = block_mean(x.reshape(-1, x.shape[-1]).numpy(), max_cells) if x.dim() >= 2 else (None, 1)
    return TensorDetail(name, tensor_role(name), tuple(t.shape), edges, counts, matrix, step, spectrum_check(name, t))


# --------------------------------------------------------------------------------------------- diff


def state_dict_diff(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> pd.DataFrame:
    """Per-key comparison of two state dicts: name, status (same / changed / reshaped / added / removed),
    block, module, shape_a, shape_b, rel_change = ‖b − a‖_F / ‖a‖_F, max_abs_change.

    Rows follow a's key order, then keys only in b. `added` keys are only in b, `removed` only in a.
    rel_change is inf when a is all zero and b is not.
    """
    rows = []
    for k in list(a) + [k for k in b if k not in a]:
        ta, tb = a.get(k), b.get(k)
        block, module = split_block(k)
        row: dict[str, Any] = {
            "name": k,
            "block": block,
            "module": module,
            "shape_a": "" if ta is None else "×".join(map(str, ta.shape)),
            "shape_b": "" if tb is None else "×".join(map(str, tb.shape)),
            "rel_change": math.nan,
            "max_abs_change": math.nan,
        }
        if ta is None or tb is None:
            row["status"] = "added" if ta is None else "removed"
        elif ta.shape != tb.shape:
            row["status"] = "reshaped"
        else:
            d = tb.detach().float() - ta.detach().float()
            num, den = float(torch.linalg.vector_norm(d)), float(torch.linalg.vector_norm(ta.detach().float()))
            row["rel_change"] = num / den if den else (0.0 if num == 0 else math.inf)
            row["max_abs_change"] = float(d.abs().max()) if d.numel() else 0.0
            row["status"] = "same" if num == 0 else "changed"
        rows.append(row)
    df = pd.DataFrame(
        rows, columns=["name", "status", "block", "module", "shape_a", "shape_b", "rel_change", "max_abs_change"]
    )
    df["block"] = df["block"].astype("Int64")
    return df


def diff_grid(diff: pd.DataFrame) -> pd.DataFrame:
    """Relative change as blocks (rows) × in-block tensors (columns, in first-seen order); NaN where absent."""
    inside = diff[diff["block"].notna()]
    if inside.empty:
        return pd.DataFrame()
    grid = inside.pivot_table(index="block", columns="module", values="rel_change", aggfunc="first", dropna=False)
    order = list(dict.fromkeys(inside["module"]))
    return grid.reindex(columns=[c for c in order if c in grid.columns])
