"""`python -m flag_model bench`: windows/s of the reference forward, the exact engine and the fast engine
in one run, ratios, achieved GFLOP/s against this machine's measured matmul peak, and the fast engine's
argmax agreement with float32 on real data.

The reference is the FlagTrader forward itself: unmerged LoRA, manual softmax attention, float32, batched.
All three see the same random windows (speed does not depend on values) at the same batch size.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .config import BLOCK_LINEARS, ModelConfig
from .engine import InferenceEngine, configure_threads, forward_flops, onednn_linear_ok
from .model import FlagTrader

Report = Callable[[str], None]

TARGET_FAST_X = 6.0
TARGET_FAST_PEAK = 0.60
TARGET_EXACT_X = 1.5
TARGET_AGREEMENT = 0.99


@dataclass(frozen=True)
class BenchConfig:
    windows: tuple[int, ...] = (64, 256)
    min_seconds: float = 3.0  # per measurement, after one warm-up batch
    peak_size: int = 2048  # square matmul for the peak
    agreement_windows: tuple[int, ...] = (2048, 512)  # evenly spaced real windows per window length
    data_path: Path | None = None
    quick: bool = False
    batch: int | None = None  # windows per batch; None: each engine's cache-tuned choice


@dataclass(frozen=True)
class BenchResult:
    speed: pd.DataFrame  # one row per (window, variant)
    peaks: dict[str, float]  # GFLOP/s of a large square matmul, per dtype
    agreement: pd.DataFrame  # window, windows, agreement (or a skip reason)
    engine: str  # what the fast engine runs on and why
    batch: pd.DataFrame  # fast-engine windows/s by batch size at the first window length
    peak_detail: dict[str, dict[str, float]]  # per dtype: GFLOP/s by kernel
    load: tuple[float, float]  # 1-minute load average at the start and at the end of the run
    peak_size: int


def measure_peak(dtype: torch.dtype, n: int = 2048, min_seconds: float = 1.0) -> dict[str, float]:
    """GFLOP/s of an n x n by n x n product in `dtype` (best of repeated runs), with torch.matmul and, where
    available, with oneDNN's linear kernel (the one the engine uses; MKL's float32 path behind
    torch.matmul is slower on non-Intel CPUs)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    kernels: dict[str, Callable[[], object]] = {"torch.matmul": lambda: torch.matmul(a, b)}
    if onednn_linear_ok(dtype):
        kernels["oneDNN linear"] = lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    out = {}
    for name, fn in kernels.items():
        fn()
        best, start = float("inf"), time.perf_counter()
        while time.perf_counter() - start < min_seconds or best == float("inf"):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        out[name] = 2 * n**3 / best / 1e9
    return out


def _rates(
    fns: dict[str, Callable[[torch.Tensor], object]], x: torch.Tensor, min_seconds: float, rounds: int = 4
) -> dict[str, float]:
    """Windows per second of each fn over batches x (B, S, d): one warm-up call each, then `rounds` rounds in
    which every fn runs whole batches for min_seconds / rounds. Rounds interleave the variants and the best
    round counts, so a busy moment on a shared machine hits all of them alike and decides none."""
    for fn in fns.values():
        fn(x)
    best = dict.fromkeys(fns, 0.0)
    for _ in range(rounds):
        for name, fn in fns.items():
            count, start = 0, time.perf_counter()
            while True:
                fn(x)
                count += 1
                elapsed = time.perf_counter() - start
                if elapsed >= min_seconds / rounds:
                    break
            best[name] = max(best[name], count * x.shape[0] / elapsed)
    return best


def quick_model(seed: int = 0) -> FlagTrader:
    """A tiny random model with non-zero LoRA for `bench --quick` (tests)."""
    targets = tuple(f"transformer_blocks.{b}.{m}" for b in range(2) for m in BLOCK_LINEARS)
    cfg = ModelConfig(
        n_blocks=2,
        d_model=32,
        ffn_dim=64,
        state_dim=60,
        n_actions=3,
        max_length=64,
        lora_rank=4,
        lora_targets=targets,
        num_heads=4,
    )
    torch.manual_seed(seed)
    model = FlagTrader(cfg)
    with torch.no_grad():
        for mod in model.linears().values():
            if mod.lora is not None:
                mod.lora.lora_B.normal_(0, 0.05)
    return model.eval()


def _agreement(
    model: FlagTrader, meta: dict, fast: InferenceEngine, exact: InferenceEngine, cfg: BenchConfig, report: Report
) -> pd.DataFrame:
    from .data import checkpoint_features, detect_columns, evenly_spaced, prepare_ohlcv, read_table, rolling_windows

    path = cfg.data_path
    if path is None or not Path(path).is_file():
        why = "no real data given (--data or $FLAG_TRADER_BENCH_DATA)" if path is None else f"not found at {path}"
        return pd.DataFrame(
            [{"window": w, "windows": 0, "agreement": np.nan, "note": f"skipped: {why}"} for w in cfg.windows]
        )
    df = read_table(path)
    prep = prepare_ohlcv(df, detect_columns(df.columns))
    if not prep.ok:
        return pd.DataFrame(
            [
                {"window": w, "windows": 0, "agreement": np.nan, "note": "skipped: " + prep.errors[0].message}
                for w in cfg.windows
            ]
        )
    fm = checkpoint_features(prep.frame, meta, model.config.state_dim, "checkpoint")
    rows = []
    for w, count in zip(cfg.windows, cfg.agreement_windows):
        windows = rolling_windows(fm.values, w)
        pick = evenly_spaced(len(windows), count)
        report(f"agreement at window {w}: {len(pick)} of {len(windows)} real windows")
        a = fast.run(windows[pick]).argmax(1)
        b = exact.run(windows[pick]).argmax(1)
        rows.append(
            {
                "window": w,
                "windows": len(pick),
                "agreement": float((a == b).mean()),
                "note": f"{Path(path).name}, evenly spaced rolling windows, checkpoint normalisation",
            }
        )
    return pd.DataFrame(rows)


def run_bench(
    model: FlagTrader, meta: dict, cfg: BenchConfig = BenchConfig(), report: Report = lambda m: None
) -> BenchResult:
    """Measure the reference, exact and fast engines on `model` (never modified)."""
    load_start = os.getloadavg()[0]
    configure_threads()
    exact = InferenceEngine(model, "exact", batch_size=cfg.batch)
    fast = InferenceEngine(model, "fast", batch_size=cfg.batch)
    report(f"fast engine: {fast.info.dtype} on {fast.info.device} ({fast.info.reason}); {fast.info.threads} threads")
    report(f"kernels: {fast.info.kernels}")
    peaks, peak_detail = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).replace("torch.", "")
        peak_detail[name] = measure_peak(dtype, cfg.peak_size, 0.5 if cfg.quick else 2.0)
        peaks[name] = max(peak_detail[name].values())  # the best this machine showed: the stricter yardstick
        report(f"matmul peak {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in peak_detail[name].items()) + " GFLOP/s")
    fast_peak = peaks["bfloat16" if fast.dtype == torch.bfloat16 else "float32"]
    speed_rows, batch_rows = [], []
    g = torch.Generator().manual_seed(0)
    for w in cfg.windows:
        bs = fast.batch_size(w)  # one batch size for all three: the fast engine's cache-tuned choice
        x = torch.randn(bs, w, model.config.state_dim, generator=g)
        flops = {
            "reference": forward_flops(model.config, w, last_only=False, lora=True),
            "exact": forward_flops(model.config, w, last_only=True),
            "fast": forward_flops(model.config, w, last_only=True),
        }

        def reference(xb: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return model(xb)

        rates = _rates({"reference": reference, "exact": exact.forward, "fast": fast.forward}, x, cfg.min_seconds)
        report(f"window {w}, batch {bs}: " + ", ".join(f"{k} {v:.1f}" for k, v in rates.items()) + " windows/s")
        for name, rate in rates.items():
            peak = fast_peak if name == "fast" else peaks["float32"]
            gflops = rate * flops[name] / 1e9
            speed_rows.append(
                {
                    "window": w,
                    "variant": name,
                    "batch": bs,
                    "windows/s": rate,
                    "× reference": rate / rates["reference"],
                    "GFLOP/window": flops[name] / 1e9,
                    "GFLOP/s": gflops,
                    "% of peak": 100 * gflops / peak,
                    "peak used": "bfloat16" if name == "fast" and fast.dtype == torch.bfloat16 else "float32",
                }
            )
        if w == cfg.windows[0] and not cfg.quick:
            for b in sorted({max(1, bs // 4), max(1, bs // 2), bs, bs * 2, fast.batch_size(w)}):
                xb = torch.randn(b, w, model.config.state_dim, generator=g)
                rate = _rates({"fast": fast.forward}, xb, cfg.min_seconds)["fast"]
                batch_rows.append({"window": w, "batch": b, "fast windows/s": rate, "auto": b == fast.batch_size(w)})
    agreement = _agreement(model, meta, fast, exact, cfg, report)
    info = (
        f"{fast.info.dtype} on {fast.info.device}: {fast.info.reason}; {fast.info.threads} threads; {fast.info.kernels}"
    )
    return BenchResult(
        pd.DataFrame(speed_rows),
        peaks,
        agreement,
        info,
        pd.DataFrame(batch_rows),
        peak_detail,
        (load_start, os.getloadavg()[0]),
        cfg.peak_size,
    )


def format_result(res: BenchResult) -> str:
    """The printed table, with the targets checked."""
    cpus = os.cpu_count() or 1
    busy = max(res.load) > cpus
    lines = [
        f"fast engine: {res.engine}",
        f"load average {res.load[0]:.1f} at the start, {res.load[1]:.1f} at the end, on {cpus} CPUs"
        + (" — the machine was busy: timings and ratios are unreliable, run again when it is idle" if busy else ""),
        f"measured matmul peak ({res.peak_size}² · {res.peak_size}², best kernel; % of peak below uses it): "
        + "; ".join(
            f"{k} {v:.1f} GFLOP/s (" + ", ".join(f"{n} {g:.1f}" for n, g in res.peak_detail[k].items()) + ")"
            for k, v in res.peaks.items()
        ),
        "",
    ]
    sp = res.speed
    lines.append(
        f"{'window':>6} {'variant':<10} {'batch':>5} {'windows/s':>10} {'× ref':>6} {'GFLOP/win':>9} "
        f"{'GFLOP/s':>8} {'% peak':>7}  peak"
    )
    for r in sp.itertuples(index=False):
        lines.append(
            f"{r.window:>6} {r.variant:<10} {r.batch:>5} {r[3]:>10.1f} {r[4]:>6.2f} {r[5]:>9.3f} "
            f"{r[6]:>8.1f} {r[7]:>6.1f}%  {r[8]}"
        )
    if not res.batch.empty:
        lines += [
            "",
            f"fast engine by batch size (window {res.batch['window'].iloc[0]}): "
            + ", ".join(f"{b.batch}{'*' if b.auto else ''}: {b[2]:.1f}/s" for b in res.batch.itertuples(index=False))
            + "   (* = automatic choice)",
        ]
    lines += ["", "argmax agreement, fast vs exact float32:"]
    for r in res.agreement.itertuples(index=False):
        value = "n/a" if np.isnan(r.agreement) else f"{100 * r.agreement:.2f} %"
        lines.append(f"  window {r.window}: {value} over {r.windows} windows ({r.note})")
    lines += ["", "targets:"]
    for w in sp["window"].unique():
        rows = sp[sp["window"] == w].set_index("variant")
        fast_x, exact_x = rows.loc["fast", "× reference"], rows.loc["exact", "× reference"]
        fast_pct = rows.loc["fast", "% of peak"]
        lines.append(
            f"  window {w}: fast {fast_x:.2f}× ref (target ≥ {TARGET_FAST_X:g}) "
            f"{'PASS' if fast_x >= TARGET_FAST_X else 'MISS'}; fast {fast_pct:.0f} % of peak (target ≥ "
            f"{100 * TARGET_FAST_PEAK:.0f} %) {'PASS' if fast_pct >= 100 * TARGET_FAST_PEAK else 'MISS'}; "
            f"exact {exact_x:.2f}× ref (target ≥ {TARGET_EXACT_X:g}) "
            f"{'PASS' if exact_x >= TARGET_EXACT_X else 'MISS'}"
        )
    for r in res.agreement.itertuples(index=False):
        if not np.isnan(r.agreement):
            lines.append(
                f"  window {r.window}: agreement {100 * r.agreement:.2f} % (target ≥ "
                f"{100 * TARGET_AGREEMENT:.0f} %) {'PASS' if r.agreement >= TARGET_AGREEMENT else 'MISS'}"
            )
    return "\n".join(lines)
