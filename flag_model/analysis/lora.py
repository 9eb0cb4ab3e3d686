"""LoRA adapters: per-adapter metrics, flags, singular value spectra and ablation.

ΔW = scale·(A @ B)ᵀ with A [in, r], B [r, out] has rank ≤ r, so its singular values and vectors come from
an r×r SVD after QR of A and Bᵀ; the dense [out, in] ΔW is never formed for the metrics. That keeps the
d=768 layout (72 adapters, 3072×768 FFN matrices) in seconds.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..config import BLOCK_LINEARS, SHORT_NAMES
from ..features import action_names
from ..model import FlagTrader, LoRALinear, lora_delta

# Column -> label of every metric the heatmap can show.
METRICS: dict[str, str] = {
    "delta_fro": "‖ΔW‖_F",
    "rel_norm": "‖ΔW‖_F / ‖W‖_F",
    "spectral": "‖ΔW‖₂ (spectral norm)",
    "stable_rank": "stable rank ‖ΔW‖²_F / ‖ΔW‖²₂",
    "effective_rank": "effective rank exp(H(σ / Σσ))",
    "amplification": "amplification ‖ΔW‖_F / ‖UᵀWV‖_F",
    "a_fro": "‖A‖_F",
    "b_fro": "‖B‖_F",
}
DEAD_REL = 1e-4  # ‖ΔW‖_F below this share of ‖W‖_F: the adapter changes nothing that matters
OUTLIER_Z = 3.5  # modified z-score (Iglewicz & Hoaglin) of log10 ‖ΔW‖_F across blocks
OUTLIER_FACTOR = 2.0  # and at least this factor from the median: peers of equal norm make the MAD tiny
DOMINATE_REL = 1.0  # ‖ΔW‖_F above ‖W‖_F: the update outweighs the base weight
# Flag column -> words (also the heatmap legend): ✕ dead, ▲ dominates, ! outlier, ? non-finite values.
FLAG_NAMES: dict[str, str] = {
    "bad_base": "base weight has NaN/Inf",
    "bad_lora": "A or B has NaN/Inf",
    "dead": "dead (B ≈ 0)",
    "dominating": "ΔW dominates W",
    "outlier": "outlier across blocks",
}


@dataclass(frozen=True)
class LowRankSVD:
    """Thin SVD of ΔW = U diag(S) Vᵀ: U [out, k], S [k] descending, V [in, k], k = min(r, in, out)."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor


def lowrank_svd(lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> LowRankSVD:
    """SVD of scale·(A @ B)ᵀ = scale·Bᵀ Aᵀ from QR of A [in, r] and Bᵀ [out, r] and an r×r SVD (float64)."""
    qa, ra = torch.linalg.qr(lora_A.detach().double())  # A = Qa Ra
    qb, rb = torch.linalg.qr(lora_B.detach().double().T)  # Bᵀ = Qb Rb
    core = scale * (rb @ ra.T)  # ΔW = Qb (scale Rb Raᵀ) Qaᵀ
    uc, s, vhc = torch.linalg.svd(core, full_matrices=False)
    return LowRankSVD(U=qb @ uc, S=s, V=qa @ vhc.T)


def _finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _adapter_row(path: str, lin: LoRALinear) -> dict[str, object]:
    if lin.lora is None:
        raise ValueError(f"{path} has no LoRA adapter")
    A, B = lin.lora.lora_A.detach(), lin.lora.lora_B.detach()
    W = lin.base.weight.detach()
    block = int(path.split(".")[1]) if path.startswith("transformer_blocks.") else -1
    module = path.split(".", 2)[2] if block >= 0 else path
    where = {
        "path": path,
        "block": block,
        "module": SHORT_NAMES.get(module, module),
        "d_out": W.shape[0],
        "d_in": W.shape[1],
        "rank": A.shape[1],
        "scale": lin.scale,
    }
    if not (_finite(A, B, W) and math.isfinite(lin.scale)):  # an SVD of NaN/Inf fails or means nothing: NaN metrics
        return {
            **where,
            "w_fro": math.nan,
            **{m: math.nan for m in METRICS},
            # A and B themselves: which part is not finite (the flags), and B = 0 stays a dead adapter
            "a_fro": float(torch.linalg.vector_norm(A.double())),
            "b_fro": float(torch.linalg.vector_norm(B.double())),
        }
    svd = lowrank_svd(A, B, lin.scale)
    s = svd.S
    delta_fro = float(torch.linalg.vector_norm(s))
    w_fro = float(torch.linalg.vector_norm(W, dtype=torch.float64))
    top = float(s[0]) if len(s) else 0.0
    if top > 0:
        p = s / s.sum()
        p = p[p > 0]
        effective_rank = math.exp(float(-(p * p.log()).sum()))
        # LoRA paper §7.3: how much ΔW amplifies directions W already has, W projected onto ΔW's subspaces.
        # float32 products: r×out×in work, the float64 copy of W would cost more than the rest together.
        projected = float(torch.linalg.matrix_norm((svd.U.to(W.dtype).T @ W) @ svd.V.to(W.dtype)))
        amplification = delta_fro / projected if projected > 0 else math.inf
        stable_rank = delta_fro**2 / top**2
    else:
        effective_rank = stable_rank = amplification = 0.0
    return {
        **where,
        # A non-finite base weight has no meaningful ratio: NaN there, flagged as such, never "ΔW dominates W".
        "delta_fro": delta_fro,
        "w_fro": w_fro,
        "rel_norm": math.nan if not math.isfinite(w_fro) else delta_fro / w_fro if w_fro > 0 else math.inf,
        "spectral": top,
        "stable_rank": stable_rank,
        "effective_rank": effective_rank,
        "amplification": amplification,
        "a_fro": float(torch.linalg.vector_norm(A.double())),
        "b_fro": float(torch.linalg.vector_norm(B.double())),
    }


def _flag(
    df: pd.DataFrame, dead_rel: float, outlier_z: float, outlier_factor: float, dominate_rel: float
) -> pd.DataFrame:
    finite = {c: np.isfinite(df[c].to_numpy(dtype=float)) for c in ("w_fro", "a_fro", "b_fro")}  # also when empty
    df["bad_base"] = ~finite["w_fro"] & finite["a_fro"] & finite["b_fro"]
    df["bad_lora"] = ~finite["a_fro"] | ~finite["b_fro"]
    df["dead"] = ((df["b_fro"] == 0) | (df["rel_norm"] < dead_rel)) & ~df["bad_lora"]
    df["dominating"] = (df["rel_norm"] > dominate_rel) & ~df["bad_base"] & ~df["bad_lora"]
    log_norm = np.log10(df["delta_fro"].where(~df["dead"]))
    by_module = log_norm.groupby(df["module"])
    med = by_module.transform("median")
    mad = (log_norm - med).abs().groupby(df["module"]).transform("median")
    z = 0.6745 * (log_norm - med) / mad.where(mad > 0)
    df["outlier_z"] = z
    df["outlier"] = (z.abs() > outlier_z) & ((log_norm - med).abs() > np.log10(outlier_factor))
    notes = []
    for dead, dom, out, zi, base, ab in zip(
        df["dead"], df["dominating"], df["outlier"], z, df["bad_base"], df["bad_lora"]
    ):
        parts = [
            name
            for name, on in (
                (FLAG_NAMES["bad_base"], base),
                (FLAG_NAMES["bad_lora"], ab),
                (FLAG_NAMES["dead"], dead),
                (FLAG_NAMES["dominating"], dom),
            )
            if on
        ]
        if out:
            parts.append(f"outlier across blocks ({'high' if zi > 0 else 'low'}, z={zi:+.1f})")
        notes.append("; ".join(parts))
    df["flags"] = notes
    return df


def adapter_metrics(
    model: FlagTrader,
    dead_rel: float = DEAD_REL,
    outlier_z: float = OUTLIER_Z,
    outlier_factor: float = OUTLIER_FACTOR,
    dominate_rel: float = DOMINATE_REL,
) -> pd.DataFrame:
    """One row per adapter: block, module (short name), shapes, every METRICS column, ‖W‖_F and flags.

    Flags (see FLAG_NAMES): `bad_base` / `bad_lora` (NaN or Inf in W, or in A or B: no ratio is meaningful),
    `dead` (B = 0 or ‖ΔW‖_F < dead_rel·‖W‖_F), `dominating` (‖ΔW‖_F > dominate_rel·‖W‖_F),
    `outlier` (|modified z| of log10 ‖ΔW‖_F among the same module across blocks > outlier_z, and more
    than outlier_factor from that module's median).
    """
    with torch.inference_mode():
        rows = [_adapter_row(p, lin) for p, lin in model.linears().items() if lin.lora is not None]
    cols = ["path", "block", "module", "d_out", "d_in", "rank", "scale", *METRICS, "w_fro"]
    df = pd.DataFrame(rows, columns=cols)
    return _flag(df, dead_rel, outlier_z, outlier_factor, dominate_rel)


def flag_summary(metrics: pd.DataFrame, examples: int = 4) -> list[str]:
    """One line per kind of flag: how many adapters carry it (of all) and a few of them — never one line per
    adapter, so a file whose adapters are all dead reads as one clear sentence."""
    lines = []
    n = len(metrics)
    for col, name in FLAG_NAMES.items():
        hit = metrics.loc[metrics[col].astype(bool), "path"].tolist()
        if not hit:
            continue
        share = "all" if len(hit) == n else f"{len(hit)} of"
        shown = ", ".join(hit[:examples]) + (f", … ({len(hit) - examples} more)" if len(hit) > examples else "")
        lines.append(f"{name}: {share} {n} adapters — {shown}")
    return lines


def block_label(block: int) -> str:
    """A block's row label in the blocks × modules figures ("block 3")."""
    return f"block {block}"


def adapter_at(metrics: pd.DataFrame, row_label: str, module: str) -> str | None:
    """The adapter path of one cell of the blocks × modules grid, from the labels a plot click reports; None when
    the cell has no adapter."""
    hit = metrics[(metrics["block"].map(block_label) == row_label) & (metrics["module"] == module)]
    return str(hit["path"].iloc[0]) if len(hit) else None


def adapter_title(metrics: pd.DataFrame, path: str) -> str:
    """One adapter's heading: its path, W's shape [out×in] and its rank."""
    row = metrics.set_index("path").loc[path]
    return f"{path}  ({row['d_out']}×{row['d_in']}, rank {row['rank']})"


def metric_grid(metrics: pd.DataFrame, column: str) -> pd.DataFrame:
    """blocks × modules table of one column (NaN where a module has no adapter), modules in block order."""
    grid = metrics.pivot_table(index="block", columns="module", values=column, aggfunc="first", dropna=False)
    order = [SHORT_NAMES[m] for m in BLOCK_LINEARS if SHORT_NAMES[m] in grid.columns]
    return grid.reindex(columns=order + [c for c in grid.columns if c not in order])


def spectra(model: FlagTrader, path: str) -> pd.DataFrame:
    """Singular values of ΔW (low-rank, r values), W and W + ΔW for one adapter; rows k = 1..min(out, in)."""
    lin = model.linears()[path]
    if lin.lora is None:
        raise ValueError(f"{path} has no LoRA adapter; choose one of the adapted modules.")
    with torch.inference_mode():
        W = lin.base.weight.detach().float()
        delta = lora_delta(lin.lora.lora_A, lin.lora.lora_B, lin.scale)
        n = min(W.shape)
        nan = np.full(n, np.nan)  # non-finite weights have no spectrum (the SVD fails or means nothing)
        finite_delta = _finite(lin.lora.lora_A, lin.lora.lora_B) and math.isfinite(lin.scale)
        s_delta = lowrank_svd(lin.lora.lora_A, lin.lora.lora_B, lin.scale).S.numpy() if finite_delta else nan
        s_w = torch.linalg.svdvals(W).numpy() if _finite(W) else nan
        s_merged = torch.linalg.svdvals(W + delta).numpy() if _finite(W) and finite_delta else nan
    padded = np.full(n, np.nan)
    padded[: min(n, len(s_delta))] = s_delta[:n]
    return pd.DataFrame({"k": np.arange(1, n + 1), "ΔW": padded, "W": s_w, "W + ΔW": s_merged})


def adapter_paths(
    model: FlagTrader, blocks: Iterable[int] | None = None, modules: Iterable[str] | None = None
) -> list[str]:
    """Paths of the adapters in the chosen blocks AND modules (None = all); modules as in BLOCK_LINEARS."""
    bset = None if blocks is None else {int(b) for b in blocks}
    mset = None if modules is None else set(modules)
    out = []
    for path, lin in model.linears().items():
        if lin.lora is None or not path.startswith("transformer_blocks."):
            continue
        _, b, module = path.split(".", 2)
        if (bset is None or int(b) in bset) and (mset is None or module in mset):
            out.append(path)
    return out


@dataclass(frozen=True)
class AblationResult:
    """Decision-position probabilities (N windows, A actions) with all adapters on and with `disabled` off."""

    disabled: tuple[str, ...]
    actions: tuple[str, ...]
    before: np.ndarray  # (N, A)
    after: np.ndarray  # (N, A)

    @property
    def flipped(self) -> float:
        """Share of windows whose decided action changes."""
        return float((self.before.argmax(1) != self.after.argmax(1)).mean()) if len(self.before) else 0.0

    def summary(self) -> pd.DataFrame:
        """Per action: mean probability and decision share before and after, and the changes."""
        n_a = len(self.actions)
        share_b = np.bincount(self.before.argmax(1), minlength=n_a) / max(len(self.before), 1)
        share_a = np.bincount(self.after.argmax(1), minlength=n_a) / max(len(self.after), 1)
        mean_b, mean_a = self.before.mean(0), self.after.mean(0)
        return pd.DataFrame(
            {
                "action": self.actions,
                "mean p (LoRA on)": mean_b,
                "mean p (ablated)": mean_a,
                "Δ mean p": mean_a - mean_b,
                "mean |Δp|": np.abs(self.after - self.before).mean(0),
                "decided (LoRA on)": share_b,
                "decided (ablated)": share_a,
            }
        )


def ablated_copy(model: FlagTrader, disabled: Iterable[str]) -> FlagTrader:
    """A copy of `model` with LoRA off on `disabled`; parameters are shared, read-only, not duplicated."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    clone = copy.deepcopy(model, memo)
    linears = clone.linears()
    for path in disabled:
        if path not in linears or linears[path].lora is None:
            raise ValueError(f"{path} is not an adapted module of this model.")
        linears[path].lora_enabled = False
    return clone


def decision_probs(model: FlagTrader, windows: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Softmax probabilities at the last (decision) position: windows (N, S, state_dim) -> (N, A)."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(windows), batch_size):
            x = torch.as_tensor(np.ascontiguousarray(windows[i : i + batch_size], dtype=np.float32))
            out.append(model(x)[:, -1].softmax(-1).numpy())
    return np.concatenate(out) if out else np.zeros((0, model.config.n_actions), np.float32)


def ablate(model: FlagTrader, windows: np.ndarray, disabled: Iterable[str], batch_size: int = 64) -> AblationResult:
    """Switch LoRA off for `disabled` adapter paths on a copy and compare decision probabilities.

    windows: (N, S, state_dim). The shared `model` is never changed.
    """
    disabled = tuple(disabled)
    clone = ablated_copy(model, disabled)
    return AblationResult(
        disabled=disabled,
        actions=action_names(model.config.n_actions),
        before=decision_probs(model, windows, batch_size),
        after=decision_probs(clone, windows, batch_size),
    )
