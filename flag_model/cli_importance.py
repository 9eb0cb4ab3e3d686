"""The `importance` subcommand: global feature importance of one attribution method over many windows.

    python -m flag_model importance CHECKPOINT DATA [--method ixg] [--windows 256] [--out table.csv]
                                    [--workers N | --scheduler ADDRESS]

The windows are spread evenly over the data (as on the Attributions page); with `--workers` or `--scheduler`
they are attributed on a Dask cluster in chunks of whole batches, identical to one process.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from .cli_predict import _assumption_args, _load

# Short names for the command line -> attribution.METHODS
METHOD_ALIASES = {
    "ig": "Integrated Gradients",
    "saliency": "Saliency",
    "ixg": "Input × Gradient",
    "deeplift": "DeepLift",
    "shap": "GradientSHAP",
    "occlusion": "Occlusion",
    "ablation": "Feature Ablation",
}


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _importance(args: argparse.Namespace) -> int:
    from .analysis import attribution as attr
    from .data import (
        checkpoint_features,
        default_window,
        detect_columns,
        evenly_spaced,
        prepare_ohlcv,
        read_table,
        rolling_windows,
    )
    from .features import action_names
    from .tables import table_bytes

    cluster = args.workers is not None or bool(args.scheduler)
    if cluster:
        from .distributed import check_cluster_args

        check_cluster_args(args.workers, args.scheduler)
    out = Path(args.out) if args.out else None
    if out is not None and out.suffix.lower() not in (".csv", ".parquet"):
        raise ValueError(f"--out must end in .csv or .parquet, not {out.name!r}.")
    ckpt, model = _load(args)
    cfg = model.config
    raw = read_table(args.data)
    frame = prepare_ohlcv(raw, detect_columns(raw.columns)).valid_frame()
    fm = checkpoint_features(frame, ckpt.meta, cfg.state_dim, args.normalisation)
    length = args.window or default_window(ckpt.meta, cfg.max_length)
    windows = rolling_windows(fm.values, length)
    index = evenly_spaced(len(windows), args.windows)
    names = action_names(cfg.n_actions)
    target = None
    if args.target is not None:
        if args.target.upper() not in names:
            raise ValueError(f"--target must be one of {', '.join(names)}.")
        target = names.index(args.target.upper())
    means, means_source = attr.feature_means(fm, ckpt.meta)
    options = dict(
        method=METHOD_ALIASES[args.method],
        target=target,
        baseline=args.baseline,
        feature_mean=means,
        steps=args.steps,
        batch_size=args.batch_size,
        feature_names=fm.names,
    )
    _say(
        f"{Path(args.checkpoint).name}: {options['method']} on {len(index):,} windows of {length} bars "
        f"({fm.normalisation} normalisation), baseline {args.baseline}"
        + (f" ({means_source})" if args.baseline == attr.MEANS else "")
        + f", explaining {'the predicted class' if target is None else names[target]}"
    )
    t0 = time.perf_counter()
    if cluster:
        from .distributed import (
            ModelRef,
            cluster_client,
            global_importance_on_cluster,
            progress_hook,
            threads_per_worker,
        )

        ref = ModelRef.of(
            args.checkpoint,
            ckpt.digest,
            threads_per_worker(args.workers, args.scheduler, args.threads),
            num_heads=args.num_heads,
            lora_scale=args.lora_scale,
            norm_first=True if args.pre_norm else None,
            causal=True if args.causal else None,
        )
        with cluster_client(args.workers, args.scheduler, _say) as client:
            gi = global_importance_on_cluster(
                client,
                ref,
                windows,
                index,
                partition_windows=args.partition_windows,
                on_submit=progress_hook(_say, t0),
                **options,
            )
    else:

        def progress(done: int, total: int) -> None:
            _say(f"  {done}/{total} windows ({time.perf_counter() - t0:.0f} s)")

        gi = attr.global_importance(model, windows, index, progress=progress, **options)
    table = gi.table()
    counts = ", ".join(f"{k} {v}" for k, v in gi.class_counts().items())
    _say(f"done in {time.perf_counter() - t0:.1f} s; predicted classes: {counts}")
    if options["method"] == attr.SHAP:
        _say("note: GradientSHAP draws random samples; its numbers differ between runs.")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(table_bytes(table, out.suffix.lower().lstrip(".")))
        _say(f"wrote {len(table)} features to {out}")
    shown = table.head(args.top) if args.top else table
    if args.json:
        print(json.dumps(shown.to_dict(orient="records"), default=float))
    else:
        print(shown.to_string(index=False, float_format=lambda v: f"{v:+.5f}"))
    return 0


def add_parsers(sub: Any) -> None:
    """Register `importance` on the CLI's subparsers."""
    from .analysis.attribution import BASELINES, ZEROS
    from .data import NORMALISATIONS
    from .distributed import DEFAULT_IMPORTANCE_WINDOWS

    p = sub.add_parser("importance", help="global feature importance of an attribution method over many windows")
    p.add_argument("checkpoint")
    p.add_argument("data", help="OHLCV CSV or Parquet (columns detected by name)")
    p.add_argument("--method", choices=tuple(METHOD_ALIASES), default="ixg", help="attribution method")
    p.add_argument("--windows", type=int, default=256, help="windows, spread evenly over the data")
    p.add_argument("--window", type=int, help="window length (default: the checkpoint's, else 64)")
    p.add_argument("--target", help="class explained (default: each window's predicted class)")
    p.add_argument("--baseline", choices=BASELINES, default=ZEROS, help="reference input of baseline methods")
    p.add_argument("--steps", type=int, default=16, help="path points of Integrated Gradients / GradientSHAP")
    p.add_argument("--batch-size", type=int, default=16, help="windows attributed together")
    p.add_argument("--normalisation", choices=NORMALISATIONS, default="checkpoint")
    p.add_argument("--top", type=int, default=0, help="print only the N most important features")
    p.add_argument("--json", action="store_true", help="print the table as JSON records")
    p.add_argument("--out", help="write the whole table to a .csv or .parquet file")
    p.add_argument("--workers", type=int, help="attribute on a local Dask cluster of N worker processes")
    p.add_argument("--scheduler", help="attribute on an existing Dask cluster (e.g. tcp://10.0.0.5:8786)")
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads per worker (default: its share of the CPUs on a local cluster); gradient methods are "
        "bit-identical to one process when this equals its thread count",
    )
    p.add_argument(
        "--partition-windows",
        type=int,
        default=DEFAULT_IMPORTANCE_WINDOWS,
        help="windows per cluster task (rounded up to whole batches)",
    )
    _assumption_args(p)
    p.set_defaults(func=_importance)
