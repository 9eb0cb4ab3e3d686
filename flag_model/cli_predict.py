"""The `predict` and `bench` subcommands (registered by flag_model/__main__.py through add_parsers)."""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .data import (
    MODES,
    NORMALISATIONS,
    IntervalCheck,
    RunningMoments,
    check_interval,
    default_window,
    detect_columns,
    iter_table_chunks,
    parse_times,
)
from .distributed import DEFAULT_PARTITION_WINDOWS
from .engine import PRECISIONS
from .features import LabelRule

DEFAULT_CHUNK_ROWS = 20_000
# Real OHLCV for `bench` (agreement check, --cluster) when --data is not given; nothing is assumed about where
# the repository or its data lie, so an installed package behaves like the checkout.
BENCH_DATA_ENV = "FLAG_TRADER_BENCH_DATA"


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (MiB; ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Writer:
    """Appends prediction frames to a CSV or Parquet file chunk by chunk (bounded memory)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.parquet = path.suffix.lower() in (".parquet", ".pq")
        if not self.parquet and path.suffix.lower() != ".csv":
            raise ValueError(f"--out must end in .csv or .parquet, not {path.name!r}.")
        self._pq: Any = None
        self._first = True
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, frame: pd.DataFrame) -> None:
        if self.parquet:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pandas(frame, preserve_index=False)
            if self._pq is None:
                self._pq = pq.ParquetWriter(self.path, table.schema)
            self._pq.write_table(table)
        else:
            frame.to_csv(self.path, mode="w" if self._first else "a", header=self._first, index=False)
        self._first = False

    def close(self) -> None:
        if self._pq is not None:
            self._pq.close()


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from .checkpoint import load_checkpoint
    from .model import build_model

    ckpt = load_checkpoint(args.checkpoint)
    model = build_model(
        ckpt,
        num_heads=args.num_heads,
        lora_scale=args.lora_scale,
        norm_first=True if args.pre_norm else None,
        causal=True if args.causal else None,
    )
    return ckpt, model


def _on_cluster(args: argparse.Namespace) -> bool:
    """Several inputs, a glob, a Parquet dataset or a named cluster go to Dask; one file stays in-process."""
    import glob

    from .distributed import has_symbol_column

    return bool(
        args.workers is not None
        or args.scheduler
        or len(args.data) > 1
        or glob.has_magic(args.data[0])
        or has_symbol_column(args.data[0])
    )


def _predict_cluster(args: argparse.Namespace) -> int:
    from .distributed import (
        check_cluster_args,
        cluster_client,
        make_spec,
        progress_hook,
        score_on_cluster,
        threads_per_worker,
    )

    t0 = time.perf_counter()
    check_cluster_args(args.workers, args.scheduler)
    spec, engine = make_spec(
        args.checkpoint,
        window=args.window,
        mode=args.mode,
        precision=args.precision,
        normalisation=args.normalisation,
        horizon=args.horizon,
        threshold=args.threshold,
        num_heads=args.num_heads,
        lora_scale=args.lora_scale,
        norm_first=True if args.pre_norm else None,
        causal=True if args.causal else None,
        threads=threads_per_worker(args.workers, args.scheduler, args.threads),
        chunk_rows=args.chunk_rows,
        batch_size=args.batch_size,
        partition_windows=args.partition_windows,
    )
    _say(
        f"{Path(args.checkpoint).name}: window {spec.window}, {spec.mode} mode, {spec.normalisation} "
        f"normalisation; engine {engine.info.dtype} ({engine.info.reason}), batches of {spec.batch_size}"
    )
    _say(f"label rule: {spec.rule.describe()}")

    with cluster_client(args.workers, args.scheduler, _say) as client:
        result = score_on_cluster(client, args.data, spec, args.out, on_submit=progress_hook(_say, t0), say=_say)
    for w in result.warnings:
        _say(f"warning: {w}")
    for _, r in result.summary.iterrows():
        shares = ", ".join(f"{c[6:]} {r[c]:.1%}" for c in result.summary.columns if c.startswith("share_"))
        score = (
            f"; accuracy {r['accuracy']:.4f}, F1-macro {r['f1_macro']:.4f} over {r['labelled']:,} labelled"
            if r["labelled"]
            else ""
        )
        _say(f"  {r['symbol']}: {r['rows']:,} rows in {r['parts']} part(s); {shares}{score}")
    _say(
        f"wrote {result.rows:,} rows for {len(result.summary)} symbol(s) to {result.out_dir} in "
        f"{time.perf_counter() - t0:.1f} s on {result.workers} worker(s) ({', '.join(result.engines)})"
    )
    for source, message in result.errors:
        _say(f"error: {source}: {message}")
    return 2 if result.errors else 0


def _predict(args: argparse.Namespace) -> int:
    if _on_cluster(args):
        return _predict_cluster(args)
    args.data = args.data[0]
    return _predict_one(args)


def _predict_one(args: argparse.Namespace) -> int:
    from .analysis.predict import (
        NO_LABEL,
        decide,
        evaluate_arrays,
        feature_stream,
        label_text,
        predictions_frame,
        stream_predictions,
        undecided_note,
    )
    from .engine import InferenceEngine

    t0 = time.perf_counter()
    ckpt, model = _load(args)
    cfg = model.config
    window = args.window or default_window(ckpt.meta, cfg.max_length)
    stored, rule_source = LabelRule.from_meta(ckpt.meta)
    rule = LabelRule(
        stored.horizon if args.horizon is None else args.horizon,
        stored.threshold if args.threshold is None else args.threshold,
    )
    engine = InferenceEngine(model, args.precision, batch_size=args.batch_size)
    _say(
        f"{Path(args.checkpoint).name}: window {window}, {args.mode} mode, {args.normalisation} normalisation; "
        f"engine {engine.info.dtype} on {engine.info.device} ({engine.info.reason})"
    )

    def chunks() -> Iterator[pd.DataFrame]:
        return iter_table_chunks(args.data, args.chunk_rows)

    check = _interval_check(chunks(), ckpt.meta, rule.horizon)
    _say(("" if check.matches else "NOTICE: ") + check.message.replace("**", ""))
    if args.horizon is None or args.threshold is None:
        _say(f"label rule: {rule.describe()} (default {rule_source})")

    stats = None
    if args.normalisation == "data":
        moments = RunningMoments()
        for fm in feature_stream(chunks(), ckpt.meta, cfg.state_dim, "none"):
            moments.update(fm.values.astype(np.float64))
        stats = moments.result()
        _say(f"first pass: feature statistics over {moments.n:,} rows")
    out = _Writer(Path(args.out))
    labels: list[np.ndarray] = []
    actions: list[np.ndarray] = []
    positions: list[np.ndarray] = []
    names: tuple[str, ...] = ("SELL", "HOLD", "BUY")
    rows = 0
    try:
        for part in stream_predictions(
            chunks(),
            ckpt.meta,
            engine,
            window,
            args.mode,
            args.normalisation,
            rule,
            stats,
            warn=lambda m: _say(f"warning: {m}"),
        ):
            out.write(predictions_frame(part))
            rows += len(part)
            names = part.actions
            labels.append(part.labels if part.labels is not None else np.full(len(part), NO_LABEL))
            actions.append(decide(part.logits)[1])
            positions.append(part.position)
            _say(f"  {rows:,} rows predicted, up to {part.times[-1]}")
    finally:
        out.close()
    act = np.concatenate(actions)
    shares = np.bincount(act[act >= 0], minlength=len(names)) / max(len(act), 1)
    _say("actions: " + ", ".join(f"{n} {s:.1%}" for n, s in zip(names, shares)))
    if (note := undecided_note(act)) is not None:
        _say(f"warning: {note}")
    metrics = evaluate_arrays(
        np.concatenate(labels), act, names, np.concatenate(positions) if args.mode == "blocks" else None, window
    )
    if metrics is not None:
        _say(
            f"{label_text(rule, check.data.median)}.\n"
            f"scores: accuracy {metrics.accuracy:.4f}, F1-macro {metrics.f1_macro:.4f}, "
            f"majority baseline {metrics.majority_accuracy:.4f} ({metrics.majority_class}) over {metrics.n:,} rows"
        )
    _say(f"wrote {rows:,} rows to {args.out} in {time.perf_counter() - t0:.1f} s; peak RSS {peak_rss_mib():.0f} MiB")
    return 0


def _interval_check(chunks: Iterator[pd.DataFrame], meta: Any, horizon: int) -> IntervalCheck:
    """The data's bar interval (median over the first chunk) against the checkpoint's training interval."""
    first = next(iter(chunks), None)
    time_col = detect_columns(first.columns).time if first is not None else None
    times = np.array([], dtype="datetime64[ns]")
    if first is not None and time_col is not None:
        times = parse_times(first[time_col])[0]
    return check_interval(times[~np.isnat(times)], meta, horizon)


def bench_data(arg: str | None) -> Path | None:
    """`--data`, else $FLAG_TRADER_BENCH_DATA, else None (the agreement check then says it was skipped)."""
    value = arg or os.environ.get(BENCH_DATA_ENV)
    return Path(value) if value else None


def _bench(args: argparse.Namespace) -> int:
    from .bench import BenchConfig, format_result, quick_model, run_bench

    data = bench_data(args.data)
    if args.cluster:
        from .demo import build_demo
        from .distributed import bench_cluster

        if data is None:
            raise ValueError(f"bench --cluster scores real bars: pass --data FILE or set {BENCH_DATA_ENV}.")
        ckpt = args.checkpoint or build_demo("full", progress=lambda f, m: _say(f"  [{f:4.0%}] {m}"))
        table = bench_cluster(
            ckpt,
            data,
            args.cluster,
            window=(args.windows or [64])[0],
            bars=args.cluster_bars,
            report=lambda m: _say(f"  {m}"),
        )
        print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
        if args.cluster_hypotheses:
            from .distributed import bench_hypotheses_cluster

            hyp = bench_hypotheses_cluster(
                ckpt,
                data,
                args.cluster,
                windows=args.cluster_hypotheses,
                bars=args.cluster_bars,
                report=lambda m: _say(f"  {m}"),
            )
            print(hyp.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
            table = pd.concat([table, hyp])
        return 0 if table["identical"].all() else 1
    meta: dict[str, Any]  # the checkpoint's; none for the quick random model
    if args.quick:
        model, meta = quick_model(), {}
        cfg = BenchConfig(
            windows=tuple(args.windows or (16, 32)),
            min_seconds=0.05,
            peak_size=256,
            agreement_windows=(64, 32),
            data_path=Path(args.data) if args.data else None,  # quick (for tests): no environment default
            quick=True,
            batch=16,
        )
    else:
        if args.checkpoint:
            ckpt, model = _load(args)
        else:
            from .checkpoint import load_checkpoint
            from .demo import build_demo
            from .model import build_model

            _say("using the full demo checkpoint (built once if needed)")
            ckpt = load_checkpoint(build_demo("full", progress=lambda f, m: _say(f"  [{f:4.0%}] {m}")))
            model = build_model(ckpt)
        meta = ckpt.meta
        windows = tuple(args.windows or (64, 256))
        cfg = BenchConfig(
            windows=windows,
            min_seconds=args.seconds,
            agreement_windows=tuple(args.agreement_windows for _ in windows)
            if args.agreement_windows
            else tuple(2048 if w <= 64 else 512 for w in windows),
            data_path=data,
        )
    result = run_bench(model, meta, cfg, report=lambda m: _say(f"  {m}"))
    print(format_result(result))
    return 0


def _assumption_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-heads", type=int, help="attention heads (not recoverable from the weights)")
    p.add_argument("--lora-scale", type=float, help="LoRA alpha / r (default: stored config, else 1.0)")
    p.add_argument("--pre-norm", action="store_true", help="assume pre-norm blocks (default: post-norm)")
    p.add_argument("--causal", action="store_true", help="assume a causal attention mask (default: none)")


def add_parsers(sub: Any) -> None:
    """Register `predict` and `bench` on the CLI's subparsers; each sets func(args) -> exit code."""
    p = sub.add_parser(
        "predict",
        help="SELL/HOLD/BUY for every bar of OHLCV CSV/Parquet files, streamed in chunks; "
        "several files or a dataset run on a Dask cluster",
    )
    p.add_argument("checkpoint")
    p.add_argument(
        "data",
        nargs="+",
        help="OHLCV CSV or Parquet (columns detected by name: time/open/high/low/close/volume); several "
        "files, a glob ('bars/*.csv') or a Parquet dataset with a 'symbol' column run on a cluster",
    )
    p.add_argument(
        "--out",
        required=True,
        help="one file: .csv or .parquet; on a cluster: a new folder for a Parquet dataset partitioned by symbol",
    )
    p.add_argument(
        "--workers",
        type=int,
        help="score on a local Dask cluster of N worker processes (the default for several inputs: one per CPU)",
    )
    p.add_argument("--scheduler", help="score on an existing Dask cluster (e.g. tcp://10.0.0.5:8786)")
    p.add_argument("--threads", type=int, help="torch threads per worker (default: its CPUs / tasks at once)")
    p.add_argument(
        "--partition-windows",
        type=int,
        default=DEFAULT_PARTITION_WINDOWS,
        help="windows per cluster task (rounded up to whole engine batches)",
    )
    p.add_argument("--window", type=int, help="window length (default: the checkpoint's, else 64)")
    p.add_argument(
        "--mode",
        choices=MODES,
        default="rolling",
        help="rolling: stride 1, last position decides; blocks: non-overlapping, every position",
    )
    p.add_argument(
        "--precision", choices=PRECISIONS, default="fast", help="fast: bf16 where native (or GPU); exact: float32"
    )
    p.add_argument("--normalisation", choices=NORMALISATIONS, default="checkpoint")
    p.add_argument(
        "--horizon",
        type=int,
        help=f"label horizon in bars (default: the checkpoint's stored rule, else {LabelRule().horizon})",
    )
    p.add_argument(
        "--threshold",
        type=float,
        help=f"label threshold, 0.002 = 0.2 %% (default: the checkpoint's stored rule, else {LabelRule().threshold})",
    )
    p.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS, help="rows read per chunk")
    p.add_argument("--batch-size", type=int, help="windows per engine batch (default: sized to the CPU cache)")
    _assumption_args(p)
    p.set_defaults(func=_predict)

    b = sub.add_parser("bench", help="windows/s of reference vs exact vs fast engine, GFLOP/s vs peak, agreement")
    b.add_argument("--checkpoint", help="checkpoint to time (default: the full demo)")
    b.add_argument("--data", help=f"real OHLCV for the agreement check and --cluster (default: ${BENCH_DATA_ENV})")
    b.add_argument("--windows", type=int, nargs="+", help="window lengths (default: 64 256)")
    b.add_argument("--seconds", type=float, default=3.0, help="timing budget per measurement")
    b.add_argument("--agreement-windows", type=int, help="real windows per length for the agreement check")
    b.add_argument("--quick", action="store_true", help="tiny random model, a few windows (for tests)")
    b.add_argument(
        "--cluster",
        type=int,
        nargs="+",
        metavar="N",
        help="instead: predict in one process vs local Dask clusters of N workers (windows/s, overhead)",
    )
    b.add_argument("--cluster-bars", type=int, default=3000, help="bars of --data scored by --cluster")
    b.add_argument(
        "--cluster-hypotheses",
        type=int,
        default=0,
        metavar="WINDOWS",
        help="with --cluster: also rank 8 hypotheses (4|8 heads x mask x norm) on WINDOWS windows vs the clusters",
    )
    _assumption_args(b)
    b.set_defaults(func=_bench)
