"""The `whatif` subcommand: the smallest edit of one window that flips the decision, verified by a plain forward.

    python -m flag_model whatif CHECKPOINT DATA --at TIMESTAMP [--target SELL|HOLD|BUY] [--features ...] [--json]

`--json` prints `window` and `edited_window`: the (S, state_dim) model inputs exactly as fed to the model
(after the checkpoint's normalisation, float32 values written in full precision), so anyone can re-run the
forward and check the flip.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import pandas as pd

from .cli_predict import _assumption_args, _load


def _features(spec: Sequence[str] | None, names: tuple[str, ...]) -> list[int] | None:
    """Feature names or 0-based indices -> indices; None means all."""
    if not spec:
        return None
    out = []
    for item in spec:
        for token in item.split(","):
            token = token.strip()
            if not token:
                continue
            if token.isdigit() and int(token) < len(names):
                out.append(int(token))
            elif token in names:
                out.append(names.index(token))
            else:
                raise ValueError(
                    f"unknown feature {token!r}; use a name such as {', '.join(names[:5])}… "
                    f"or an index 0..{len(names) - 1}."
                )
    return sorted(set(out))


def _window_at(fm: Any, at: str, length: int) -> tuple[int, str | None]:
    """First row of the window whose decision bar is the last bar at or before `at`, and a note if not exact."""
    try:
        when = pd.Timestamp(at)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"--at {at!r} is not a time; write e.g. '2025-12-01 12:00'.") from exc
    if when.tz is not None:
        when = when.tz_convert("UTC").tz_localize(None)
    end = int(fm.times.searchsorted(when, side="right")) - 1
    if end < length - 1:
        first = fm.times[length - 1] if len(fm.times) >= length else None
        raise ValueError(
            f"no full window of {length} bars ends at or before {when}; the first decision bar with "
            f"features is {first}."
        )
    note = None if fm.times[end] == when else f"no bar at {when}; using the last bar before it, {fm.times[end]}."
    return end - length + 1, note


def _whatif(args: argparse.Namespace) -> int:
    from .analysis.whatif import runner_up, smallest_flip
    from .data import checkpoint_features, default_window, detect_columns, prepare_ohlcv, read_table
    from .features import action_names

    ckpt, model = _load(args)
    cfg = model.config
    table = read_table(args.data)
    frame = prepare_ohlcv(table, detect_columns(table.columns)).valid_frame()
    fm = checkpoint_features(frame, ckpt.meta, cfg.state_dim)
    length = args.window or default_window(ckpt.meta, cfg.max_length)
    start, note = _window_at(fm, args.at, length)
    window = fm.values[start : start + length]
    names = action_names(cfg.n_actions)
    if args.target is None:
        target = runner_up(model, window)
    elif args.target.upper() in names:
        target = names.index(args.target.upper())
    else:
        raise ValueError(f"--target must be one of {', '.join(names)}.")
    if args.last is not None and not 1 <= args.last <= length:
        raise ValueError(f"--last must be within 1..{length}.")
    steps = (length - args.last, length) if args.last else None
    res = smallest_flip(
        model,
        window,
        target,
        _features(args.features, fm.names),
        steps,
        iterations=args.iterations,
        feature_names=fm.names,
    )
    cells = res.cells()
    if args.json:
        out = {
            "checkpoint": str(args.checkpoint),
            "data": str(args.data),
            "at": args.at,
            "decision_bar": str(fm.times[start + length - 1]),
            "window_first_bar": str(fm.times[start]),
            "window_length": length,
            "normalisation": fm.normalisation,
            "feature_names": list(fm.names),
            "assumptions": {
                "num_heads": cfg.num_heads,
                "lora_scale": cfg.lora_scale,
                "norm_first": cfg.norm_first,
                "causal": cfg.causal,
            },
            "decision_before": names[int(res.before.argmax())],
            "target": res.target_name,
            "flipped": res.flipped,
            "decision_after": names[int(res.after.argmax())],
            "margin": res.margin,
            "probabilities_before": dict(zip(names, map(float, res.before))),
            "probabilities_after": dict(zip(names, map(float, res.after))),
            "l1": res.l1,
            "linf": res.linf,
            "n_cells": res.n_cells,
            "evaluations": res.evaluations,
            "seconds": res.seconds,
            "notes": [n for n in (note, *res.notes) if n],
            "edited_cells": cells.to_dict(orient="records"),
            # float32 values as Python floats: exact, so reading them back as float32 gives the same inputs
            "window": res.window.tolist(),
            "edited_window": res.edited.tolist(),
        }
        print(json.dumps(out, default=lambda v: v.item() if hasattr(v, "item") else str(v)))
        return 0
    if note:
        print(f"note: {note}", file=sys.stderr)
    fmt = lambda p: " ".join(f"{n} {v:.1%}" for n, v in zip(names, p))  # noqa: E731
    print(
        f"window {fm.times[start]} → {fm.times[start + length - 1]} ({length} bars, {fm.normalisation} "
        f"normalisation); decision {names[int(res.before.argmax())]}: {fmt(res.before)}"
    )
    verdict = "FLIPPED (verified by a plain forward)" if res.flipped else "NOT flipped"
    print(f"target {res.target_name}: {verdict}; after: {fmt(res.after)}; logit margin {res.margin:+.3f}")
    print(
        f"edit: {res.n_cells} cells, L1 {res.l1:.4g}, L∞ {res.linf:.4g} (normalised units), "
        f"{res.evaluations} forward-equivalents, {res.seconds:.1f} s"
    )
    print(cells.head(20).to_string(index=False, float_format=lambda v: f"{v:+.4f}"))
    for n in res.notes:
        print(f"note: {n}", file=sys.stderr)
    return 0


def add_parsers(sub: Any) -> None:
    """Register `whatif` on the CLI's subparsers."""
    p = sub.add_parser("whatif", help="the smallest edit of the window ending at a time that flips the decision")
    p.add_argument("checkpoint")
    p.add_argument("data", help="OHLCV CSV or Parquet (columns detected by name)")
    p.add_argument("--at", required=True, help="decision bar time (the window ends at the last bar at or before it)")
    p.add_argument("--target", help="class to flip to (default: the runner-up class)")
    p.add_argument("--features", nargs="+", help="editable features, names or indices (default: all)")
    p.add_argument("--last", type=int, help="edit only the last N bars of the window (default: all)")
    p.add_argument("--window", type=int, help="window length (default: the checkpoint's, else 64)")
    p.add_argument("--iterations", type=int, default=300, help="gradient steps of the search")
    p.add_argument("--json", action="store_true", help="machine-readable output with the window and edited window")
    _assumption_args(p)
    p.set_defaults(func=_whatif)
