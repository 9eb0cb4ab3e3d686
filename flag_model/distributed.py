"""Scoring on a Dask cluster (`dask.distributed`), row for row identical to single-process `predict`.

Inputs are sources of bars: whole CSV/Parquet files (one symbol each, named by the file's stem) or the rows
of each symbol of a Parquet dataset (a folder or file with a `symbol` column; hive `symbol=X/` folders work).
One *scan* task per source validates it exactly as the single-process stream does (`feature_stream`), counts
its bars and, for "data" normalisation, computes the statistics of the same first pass. The windows of a
source are then cut into *parts* of a whole number of engine batches; a part reads its bars with the overlap
its windows need (window - 1 feature rows and the WARMUP bars of simple-60 before, the label horizon after),
so each window is scored exactly once, in the same engine batch, with the same features as in one process.
Windows across part boundaries are therefore bit-identical too (the engine's logits do not depend on the
thread count; `engine.py`).

Each worker process loads the model once (a per-process cache keyed by the checkpoint's sha256 and the
assumptions; the digest is checked against the client's) and sets its own torch thread count. A part
writes `OUT/symbol=<S>/part-<k>.parquet` through a temporary file and an atomic rename, so a task that is
re-run after its worker died rewrites the same file: no duplicate and no missing rows. A source that fails
(bad file, too few rows) is named in the errors while the others finish; its partial output is removed.

The workers must see the checkpoint, the inputs and OUT at the same paths as the client (one machine, or a
shared file system).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pandas as pd

from .data import (
    MODES,
    WARMUP,
    ColumnMapping,
    DataError,
    RunningMoments,
    check_interval,
    checkpoint_features,
    csv_usecols,
    detect_columns,
    iter_table_chunks,
    prepare_ohlcv,
    too_few_rows,
)
from .features import LabelRule

SYMBOL_COLUMN = "symbol"
DEFAULT_PARTITION_WINDOWS = 8192
_PART_GLOB = "part-*.parquet"

Hook = Callable[[list[Any]], None]  # called with the futures of a phase right after they are submitted


@dataclass(frozen=True)
class Source:
    """One symbol's bars: a whole file (`key` None), or the rows of a Parquet dataset whose symbol column
    equals `key`."""

    symbol: str
    path: str
    key: Any = None

    @property
    def label(self) -> str:
        return self.path if self.key is None else f"{self.path} [symbol {self.symbol}]"


@dataclass(frozen=True)
class ScoreSpec:
    """Everything a worker needs to rebuild the client's engine and score like it (plain values only)."""

    checkpoint: str
    digest: str  # sha256 of the checkpoint file, checked on every worker
    num_heads: int | None
    lora_scale: float | None
    norm_first: bool | None
    causal: bool | None
    precision: str
    window: int
    mode: str
    normalisation: str
    horizon: int
    threshold: float
    batch_size: int  # the client engine's windows per batch: parts are whole batches of it
    threads: int | None  # torch threads per worker; None: its CPUs / tasks it runs at once
    chunk_rows: int  # rows per chunk of the scan (the first pass of "data" normalisation uses the same)
    partition_windows: int
    engine: str = ""  # the client's engine dtype, to warn when workers differ

    @property
    def rule(self) -> LabelRule:
        return LabelRule(self.horizon, self.threshold)

    @property
    def stride(self) -> int:
        return 1 if self.mode == "rolling" else self.window


@dataclass(frozen=True)
class SourceInfo:
    """What a scan found: bar count, the first bar's time ("years" counts from it), the column mapping,
    data statistics (mean, std) for "data" normalisation, warnings."""

    n_bars: int
    origin: pd.Timestamp
    mapping: ColumnMapping
    stats: tuple[np.ndarray, np.ndarray] | None
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class Part:
    """Windows [first_window, first_window + n_windows) of one source, read from bars [bar_start, bar_stop)."""

    index: int
    first_window: int
    n_windows: int
    bar_start: int
    bar_stop: int
    tail_rows: int = 0  # blocks mode, the last part: rows after the last full block (scored as one-process does)


@dataclass(frozen=True)
class PartResult:
    """What a part task reports (its rows are in its file)."""

    symbol: str
    index: int
    rows: int
    counts: np.ndarray  # (n_actions,) predicted actions
    confusion: np.ndarray  # (n_actions, n_actions) true x predicted, labelled rows only
    worker_pid: int
    model_loads: int  # times this worker process had built this engine when the task ran (1 = loaded once)
    dtype: str
    threads: int
    seconds: float


@dataclass(frozen=True)
class RunResult:
    """The outcome of `score_on_cluster`: per-symbol summary, every part, and the failed inputs."""

    out_dir: Path
    summary: pd.DataFrame  # symbol, source, bars, windows, rows, parts, action shares, accuracy, f1_macro, labelled
    parts: list[PartResult]
    errors: list[tuple[str, str]]  # (input, message)
    warnings: list[str]
    seconds: float
    workers: int
    engines: tuple[str, ...] = field(default=())  # distinct "dtype x threads" the workers ran

    @property
    def rows(self) -> int:
        return int(self.summary["rows"].sum()) if len(self.summary) else 0


# Inputs


def _is_parquet(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"PAR1"


def _symbol_column(names: Sequence[str]) -> str | None:
    return next((n for n in names if n.lower() == SYMBOL_COLUMN), None)


def _dataset(path: str) -> Any:
    import pyarrow.dataset as ds

    return ds.dataset(path, format="parquet", partitioning="hive")


def has_symbol_column(path: str | Path) -> bool:
    """Whether a path is a Parquet folder, or a Parquet file with a symbol column (a many-symbol input)."""
    p = Path(path).expanduser()
    if p.is_dir():
        return True
    if not p.is_file() or not _is_parquet(p):
        return False
    import pyarrow.parquet as pq

    return _symbol_column(pq.read_schema(p).names) is not None


def discover_sources(inputs: Sequence[str]) -> tuple[list[Source], list[tuple[str, str]]]:
    """Paths, globs or Parquet datasets -> sources (one per symbol) and the inputs that cannot be used,
    each with the reason. Two sources with the same symbol are an error naming both."""
    sources: list[Source] = []
    errors: list[tuple[str, str]] = []
    for item in inputs:
        paths = sorted(glob.glob(os.path.expanduser(item))) if glob.has_magic(item) else [item]
        if not paths:
            errors.append((item, f"no file matches {item!r}."))
        for raw in paths:
            path = Path(raw).expanduser().resolve()  # workers may start elsewhere: absolute paths
            try:
                if has_symbol_column(path):
                    d = _dataset(str(path))
                    col = _symbol_column(d.schema.names)
                    if col is None:
                        raise DataError(
                            f"the Parquet dataset {path} has no '{SYMBOL_COLUMN}' column (or "
                            f"'{SYMBOL_COLUMN}=...' folders) to split it by symbol."
                        )
                    keys = sorted(d.to_table(columns=[col]).column(col).unique().to_pylist(), key=str)
                    if not keys:
                        raise DataError(f"the Parquet dataset {path} has no rows.")
                    sources += [Source(str(k), str(path), k) for k in keys]
                elif path.is_file():
                    sources.append(Source(path.stem, str(path)))
                else:
                    raise DataError(f"no file at {path}; check the path (workers read it at the same path).")
            except (OSError, ValueError) as exc:  # pyarrow's errors derive from these
                errors.append((str(path), str(exc)))
    seen: dict[str, Source] = {}
    for s in sources:
        if s.symbol in seen:
            raise DataError(
                f"two inputs give the symbol {s.symbol!r}: {seen[s.symbol].label} and {s.label}; "
                "rename one file (its name is its symbol)."
            )
        seen[s.symbol] = s
    return sources, errors


_frame_cache: dict[tuple[str, str, int], pd.DataFrame] = {}


def _symbol_frame(src: Source) -> pd.DataFrame:
    """One symbol's rows of a dataset, sorted by time (stable). A worker reads the symbol whole and keeps the
    last one read, so its next part of the same symbol costs nothing."""
    import pyarrow.compute as pc

    ck = (src.path, repr(src.key), os.stat(src.path).st_mtime_ns)
    if ck not in _frame_cache:
        d = _dataset(src.path)
        col = _symbol_column(d.schema.names)
        table = d.to_table(filter=pc.field(col) == src.key)
        df = table.drop_columns([col]).to_pandas()
        time_col = detect_columns(df.columns).time
        if time_col is not None:
            df = df.sort_values(time_col, kind="stable").reset_index(drop=True)
        _frame_cache.clear()
        _frame_cache[ck] = df
    return _frame_cache[ck]


def iter_source_chunks(src: Source, chunk_rows: int) -> Iterator[pd.DataFrame]:
    """A source's raw rows in order, about `chunk_rows` at a time (files exactly as single-process
    `predict` reads them)."""
    if src.key is None:
        yield from iter_table_chunks(src.path, chunk_rows)
        return
    df = _symbol_frame(src)
    for start in range(0, len(df), chunk_rows):
        yield df.iloc[start : start + chunk_rows].reset_index(drop=True)


def read_rows(src: Source, start: int, stop: int) -> pd.DataFrame:
    """Raw rows [start, stop) of a source (0-based data rows)."""
    if src.key is not None:
        return _symbol_frame(src).iloc[start:stop].reset_index(drop=True)
    path = Path(src.path).expanduser()
    if _is_parquet(path):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
        ends = np.cumsum(sizes)
        groups = [i for i in range(len(sizes)) if ends[i] > start and ends[i] - sizes[i] < stop]
        first = int(ends[groups[0]] - sizes[groups[0]])
        return pf.read_row_groups(groups).slice(start - first, stop - start).to_pandas()
    return pd.read_csv(
        path, skiprows=lambda i: 0 < i <= start, nrows=stop - start, index_col=False, usecols=csv_usecols(path)
    )  # as iter_table_chunks


# The model on a worker: loaded once per process


_engines: dict[tuple, tuple[Any, dict[str, Any]]] = {}
_engine_lock = threading.Lock()
_loads: dict[tuple, int] = {}  # how often each engine key was built in this process


def _worker_threads(threads: int | None) -> int:
    """Torch threads of a worker's tasks: `threads` if given, else its CPUs shared by the tasks it runs at once."""
    if threads:
        return threads
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        from distributed import get_worker

        per_task = max(1, get_worker().state.nthreads)
    except ValueError:  # not inside a worker (a direct call)
        per_task = 1
    return max(1, cpus // per_task)


def worker_engine(spec: ScoreSpec) -> tuple[Any, dict[str, Any]]:
    """(InferenceEngine, checkpoint meta) of this process, built on first use and kept for every later
    task with the same checkpoint digest and assumptions."""
    key = _engine_key(spec)
    with _engine_lock:
        if key not in _engines:
            import torch

            from .engine import InferenceEngine
            from .model import build_model

            ckpt = _load_checked(spec.checkpoint, spec.digest)
            model = build_model(
                ckpt,
                num_heads=spec.num_heads,
                lora_scale=spec.lora_scale,
                norm_first=spec.norm_first,
                causal=spec.causal,
            )
            engine = InferenceEngine(model, spec.precision, batch_size=spec.batch_size)
            torch.set_num_threads(_worker_threads(spec.threads))  # after the engine, which may set its own default
            _engines.clear()  # one model per worker process: memory stays bounded
            _engines[key] = (engine, dict(ckpt.meta))
            _loads[key] = _loads.get(key, 0) + 1
        return _engines[key]


def _engine_key(spec: ScoreSpec) -> tuple:
    return (spec.digest, spec.num_heads, spec.lora_scale, spec.norm_first, spec.causal, spec.precision, spec.batch_size)


def _load_checked(path: str, digest: str) -> Any:
    """The checkpoint at `path` on this worker, refused unless its sha256 is the client's."""
    from .checkpoint import CheckpointError, load_checkpoint

    ckpt = load_checkpoint(path)
    if ckpt.digest != digest:
        raise CheckpointError(
            f"the checkpoint at {path} on this worker differs from the client's (sha256); "
            "give every worker the same file."
        )
    return ckpt


def dask_setup(worker: Any) -> None:
    """Run by `dask worker --preload flag_model.distributed` (and local clusters) as a worker starts: import
    torch, the engine and the readers then, not in the worker's first task."""
    import pyarrow.parquet  # noqa: F401

    from . import checkpoint, engine, model  # noqa: F401
    from .analysis import predict  # noqa: F401


# Tasks


def scan_source(src: Source, spec: ScoreSpec) -> SourceInfo:
    """Validate a source exactly as single-process streaming does, count its bars, and compute the
    "data" normalisation statistics of the same first pass. Raises DataError (the caller names the source)."""
    from .analysis.predict import feature_stream

    engine, meta = worker_engine(spec)
    state: dict[str, Any] = {"n": 0, "first": None}  # bars counted, the first chunk

    def counted() -> Iterator[pd.DataFrame]:
        for chunk in iter_source_chunks(src, spec.chunk_rows):
            state["n"] += len(chunk)
            state["first"] = chunk if state["first"] is None else state["first"]
            yield chunk

    warnings: list[str] = []
    moments = RunningMoments()
    norm = "none" if spec.normalisation == "data" else spec.normalisation  # "data" needs this pass first
    for fm in feature_stream(counted(), meta, engine.config.state_dim, norm, warn=warnings.append):
        if spec.normalisation == "data":
            moments.update(fm.values.astype(np.float64))
    mapping = detect_columns(state["first"].columns)
    first = prepare_ohlcv(state["first"], mapping).valid_frame()["datetime"]
    origin = first.iloc[0]
    check = check_interval(first.to_numpy(), meta, spec.horizon)  # as single-process predict: the first chunk
    if not check.matches:
        warnings.insert(0, "NOTICE: " + check.message.replace("**", ""))
    n_feat = state["n"] - WARMUP
    if n_feat < spec.window:
        raise DataError(too_few_rows(spec.window, n_feat, WARMUP))
    return SourceInfo(
        n_bars=state["n"],
        origin=origin,
        mapping=mapping,
        stats=moments.result() if spec.normalisation == "data" else None,
        warnings=tuple(warnings),
    )


def plan_parts(n_bars: int, spec: ScoreSpec) -> list[Part]:
    """Cut a source's windows into parts of whole engine batches (about `partition_windows` windows). A
    part's bars start at its first window's first feature row (bar = feature row + WARMUP, so WARMUP bars
    of warm-up come first) and end `horizon` bars after its last window, for the labels."""
    n_feat, w, stride = n_bars - WARMUP, spec.window, spec.stride
    n_windows = (n_feat - w) // stride + 1 if n_feat >= w else 0
    size = max(1, -(-spec.partition_windows // spec.batch_size)) * spec.batch_size
    # Blocks mode also scores the newest partial block (the last part's tail), as `WindowRunner` does in one pass.
    tail = n_feat - ((n_windows - 1) * stride + w) if spec.mode == "blocks" and n_windows else 0
    parts = []
    for i, first in enumerate(range(0, n_windows, size)):
        count = min(size, n_windows - first)
        extra = tail if first + count == n_windows else 0
        last_row = (first + count - 1) * stride + w - 1 + extra  # feature row of the last scored row
        parts.append(Part(i, first, count, first * stride, min(n_bars, last_row + 1 + WARMUP + spec.horizon), extra))
    return parts


def part_path(out_dir: str | Path, symbol: str, index: int) -> Path:
    """Where a part is written: a hive-style folder per symbol (names are URL-quoted, as pyarrow reads them)."""
    return Path(out_dir) / f"{SYMBOL_COLUMN}={quote(symbol, safe='')}" / f"part-{index:05d}.parquet"


def score_part(src: Source, info: SourceInfo, part: Part, spec: ScoreSpec, out_dir: str) -> PartResult:
    """Score one part and write its rows (atomically, so a re-run after a worker died rewrites the same file)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from .analysis.predict import NO_DECISION, NO_LABEL, WindowRunner, decide, predictions_frame, row_labels

    t0 = time.perf_counter()
    engine, meta = worker_engine(spec)
    prep = prepare_ohlcv(read_rows(src, part.bar_start, part.bar_stop), info.mapping, row_offset=part.bar_start)
    fm = checkpoint_features(
        prep.valid_frame(), meta, engine.config.state_dim, spec.normalisation, origin=info.origin, stats=info.stats
    )
    used = (part.n_windows - 1) * spec.stride + spec.window + part.tail_rows  # feature rows the part scores
    labels = row_labels(fm.close, spec.rule)[:used]  # the extra `horizon` rows give the last rows their labels
    runner = WindowRunner(engine, spec.window, spec.mode, first_row=part.first_window * spec.stride)
    pred = runner.feed(fm.values[:used], fm.times.to_numpy()[:used], fm.close[:used], labels, final=True)
    expected = part.n_windows * (1 if spec.mode == "rolling" else spec.window) + part.tail_rows
    if pred is None or len(pred) != expected:
        raise DataError(
            f"part {part.index} scored {0 if pred is None else len(pred)} rows, expected "
            f"{expected}; the file changed while it was being scored?"
        )
    frame = predictions_frame(pred)
    path = part_path(out_dir, src.symbol, part.index)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")  # dot files are ignored by Parquet readers
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp)
    os.replace(tmp, path)
    actions = decide(pred.logits)[1]
    k = len(pred.actions)
    labels = pred.labels if pred.labels is not None else np.full(len(actions), NO_LABEL)
    known = (labels != NO_LABEL) & (actions != NO_DECISION)  # no decision from non-finite logits
    confusion = np.bincount(labels[known] * k + actions[known], minlength=k * k).reshape(k, k)
    return PartResult(
        symbol=src.symbol,
        index=part.index,
        rows=len(pred),
        counts=np.bincount(actions[actions != NO_DECISION], minlength=k),
        confusion=confusion,
        worker_pid=os.getpid(),
        model_loads=_loads[_engine_key(spec)],
        dtype=engine.info.dtype,
        threads=torch.get_num_threads(),
        seconds=time.perf_counter() - t0,
    )


# The client side


def make_spec(
    checkpoint: str | Path,
    *,
    window: int | None = None,
    mode: str = "rolling",
    precision: str = "fast",
    normalisation: str = "checkpoint",
    horizon: int | None = None,
    threshold: float | None = None,
    num_heads: int | None = None,
    lora_scale: float | None = None,
    norm_first: bool | None = None,
    causal: bool | None = None,
    threads: int | None = None,
    chunk_rows: int = 20_000,
    partition_windows: int = DEFAULT_PARTITION_WINDOWS,
    batch_size: int | None = None,
) -> tuple[ScoreSpec, Any]:
    """Load the checkpoint on the client (it must fit), fix the window, the label rule (`horizon`/`threshold`,
    else the checkpoint's stored rule, as single-process `predict`) and the engine's batch size there
    (`batch_size`, else the client engine's default); returns the spec and the client's engine."""
    from .checkpoint import load_checkpoint
    from .data import default_window
    from .engine import InferenceEngine
    from .model import build_model

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if partition_windows < 1 or (batch_size is not None and batch_size < 1):
        raise ValueError("partition windows and batch size must be at least 1.")
    ckpt = load_checkpoint(checkpoint)
    model = build_model(ckpt, num_heads=num_heads, lora_scale=lora_scale, norm_first=norm_first, causal=causal)
    window = window or default_window(ckpt.meta, model.config.max_length)
    if not 1 <= window <= model.config.max_length:
        raise ValueError(f"window {window} is outside 1..{model.config.max_length} (the checkpoint's max_length).")
    engine = InferenceEngine(model, precision, batch_size=batch_size)
    stored, _ = LabelRule.from_meta(ckpt.meta)
    rule = LabelRule(
        stored.horizon if horizon is None else horizon, stored.threshold if threshold is None else threshold
    )
    spec = ScoreSpec(
        checkpoint=str(Path(checkpoint).expanduser().resolve()),
        digest=ckpt.digest,
        num_heads=num_heads,
        lora_scale=lora_scale,
        norm_first=norm_first,
        causal=causal,
        precision=precision,
        window=window,
        mode=mode,
        normalisation=normalisation,
        horizon=rule.horizon,
        threshold=rule.threshold,
        batch_size=engine.batch_size(window),
        threads=threads,
        chunk_rows=chunk_rows,
        partition_windows=partition_windows,
        engine=engine.info.dtype,
    )
    return spec, engine


def default_workers() -> int:
    """Worker processes of a local cluster by default: one per CPU this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextmanager
def local_client(n_workers: int, **cluster_kw: Any) -> Iterator[Any]:
    """A Client on a local cluster of `n_workers` processes with one task slot each, on loopback, with
    random ports and no dashboard (pass dashboard_address=":8787" for one); returns once the workers have
    imported torch."""
    import logging

    from distributed import Client, LocalCluster

    if n_workers < 1:
        raise ValueError("--workers must be at least 1.")
    kw = dict(
        n_workers=n_workers,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        scheduler_port=0,
        dashboard_address=None,
        silence_logs=logging.ERROR,
        preload=[__name__],
    )  # see dask_setup
    kw.update(cluster_kw)
    with LocalCluster(**kw) as cluster, Client(cluster) as client:
        yield client


def check_cluster_args(workers: int | None, scheduler: str | None) -> None:
    """`--workers N` (a local cluster) and `--scheduler ADDRESS` (an existing one) exclude each other."""
    if workers is not None and workers < 1:
        raise ValueError("--workers must be at least 1.")
    if workers and scheduler:
        raise ValueError("give --workers (a local cluster) or --scheduler (an existing one), not both.")


def threads_per_worker(workers: int | None, scheduler: str | None, threads: int | None = None) -> int | None:
    """Torch threads per worker: `threads` if given; on a local cluster each worker's share of this machine's
    CPUs; on an existing cluster None (each worker uses its own CPUs)."""
    if threads or scheduler:
        return threads
    return max(1, default_workers() // (workers or default_workers()))


@contextmanager
def cluster_client(
    workers: int | None, scheduler: str | None, say: Callable[[str], None] | None = None
) -> Iterator[Any]:
    """A Client on the cluster at `scheduler`, else on a local cluster of `workers` processes (default: one per
    CPU), closed on exit."""
    check_cluster_args(workers, scheduler)
    if scheduler:
        from distributed import Client

        with Client(scheduler, timeout="30s") as client:
            yield client
        return
    n = workers or default_workers()
    if say:
        say(f"starting a local cluster of {n} worker process(es)")
    with local_client(n) as client:
        yield client


def progress_hook(say: Callable[[str], None], t0: float | None = None) -> Hook:
    """An `on_submit` hook: Dask's progress bar on a terminal; otherwise a line per tenth of the tasks (logs
    stay short)."""
    import sys

    start = time.perf_counter() if t0 is None else t0

    def hook(futures: list[Any]) -> None:
        from distributed import as_completed
        from distributed import progress as dask_progress

        if not futures:
            return
        if sys.stdout.isatty():
            dask_progress(futures, multi=False)
            print(flush=True)
            return
        step = max(1, len(futures) // 10)
        for i, _ in enumerate(as_completed(futures), 1):
            if i % step == 0 or i == len(futures):
                say(
                    f"  {i}/{len(futures)} {futures[0].key.split('-')[0]} task(s) done "
                    f"({time.perf_counter() - start:.0f} s)"
                )

    return hook


def wait_for_workers(client: Any) -> int:
    """The number of workers once at least one has joined (60 s at most; else a DataError saying how to start one)."""
    try:
        client.wait_for_workers(1, timeout=60)
    except TimeoutError:
        raise DataError(
            f"no worker joined the scheduler at {client.scheduler.address} within 60 s; start one "
            "with `dask worker ADDRESS`."
        ) from None
    return len(client.scheduler_info(n_workers=-1)["workers"])


def _prepare_out(out_dir: Path) -> None:
    if out_dir.suffix.lower() == ".csv" or (out_dir.exists() and not out_dir.is_dir()):
        raise ValueError(f"--out {out_dir} must be a folder for a Parquet dataset (one folder per symbol).")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"--out {out_dir} is not empty; choose a new folder (parts of another run would mix in).")
    out_dir.mkdir(parents=True, exist_ok=True)


def _summary_row(
    src: Source, info: SourceInfo, parts: list[PartResult], names: tuple[str, ...], spec: ScoreSpec
) -> dict[str, Any]:
    from .analysis.predict import evaluate_arrays

    counts = np.sum([p.counts for p in parts], axis=0)
    cm = np.sum([p.confusion for p in parts], axis=0)
    row: dict[str, Any] = {
        "symbol": src.symbol,
        "source": src.label,
        "bars": info.n_bars,
        "windows": sum(p.rows for p in parts) // (1 if spec.mode == "rolling" else spec.window),
        "rows": int(counts.sum()),
        "parts": len(parts),
    }
    for n, c in zip(names, counts):
        row[f"share_{n}"] = float(c / max(counts.sum(), 1))
    # Metrics from the summed confusion matrix: one (label, action) pair per counted row.
    k = len(names)
    labels = np.repeat(np.arange(k * k) // k, cm.ravel())
    acts = np.repeat(np.arange(k * k) % k, cm.ravel())
    m = evaluate_arrays(labels, acts, names) if len(labels) else None
    row.update(
        labelled=int(cm.sum()),
        accuracy=m.accuracy if m else np.nan,
        f1_macro=m.f1_macro if m else np.nan,
        majority_accuracy=m.majority_accuracy if m else np.nan,
    )
    return row


def score_on_cluster(
    client: Any,
    inputs: Sequence[str],
    spec: ScoreSpec,
    out_dir: str | Path,
    on_submit: Hook | None = None,
    say: Callable[[str], None] | None = None,
) -> RunResult:
    """Score every source of `inputs` on the cluster behind `client` into the Parquet dataset `out_dir`
    (one `symbol=<S>` folder per symbol, rows in time order by part file). `on_submit(futures)` is called
    after each phase is submitted (the CLI shows Dask's progress bar there). Sources that fail are listed in
    `errors` and leave no output; the others finish."""
    from distributed import wait

    from .features import action_names

    t0 = time.perf_counter()
    say = say or (lambda m: None)
    out = Path(out_dir).expanduser().resolve()
    _prepare_out(out)
    sources, errors = discover_sources(inputs)
    if not sources:
        raise DataError("no usable input: " + "; ".join(f"{i}: {m}" for i, m in errors))
    workers = wait_for_workers(client)
    say(f"{len(sources)} source(s) on {workers} worker(s) at {client.scheduler.address}")
    scans = [
        client.submit(scan_source, s, spec, key=f"scan-{s.symbol}-{uuid.uuid4().hex[:8]}", pure=False) for s in sources
    ]
    if on_submit:
        on_submit(scans)
    wait(scans)
    plans: dict[str, tuple[Source, SourceInfo, list[Part]]] = {}
    warnings: list[str] = []
    for src, fut in zip(sources, scans):
        if fut.status != "finished":
            errors.append((src.label, _reason(fut)))
            continue
        info: SourceInfo = fut.result()
        warnings += [f"{src.symbol}: {w}" for w in info.warnings]
        plans[src.symbol] = (src, info, plan_parts(info.n_bars, spec))
    jobs = [
        (
            symbol,
            client.submit(
                score_part,
                src,
                info,
                part,
                spec,
                str(out),
                key=f"score-{symbol}-{part.index}-{uuid.uuid4().hex[:8]}",
                pure=False,
            ),
        )
        for symbol, (src, info, parts) in plans.items()
        for part in parts
    ]
    say(
        f"{sum(len(p[2]) for p in plans.values())} part(s) of up to "
        f"{max(1, -(-spec.partition_windows // spec.batch_size)) * spec.batch_size} windows"
    )
    if on_submit and jobs:
        on_submit([f for _, f in jobs])
    wait([f for _, f in jobs])
    done: dict[str, list[PartResult]] = {s: [] for s in plans}
    failed: dict[str, str] = {}
    for symbol, fut in jobs:
        if fut.status == "finished":
            done[symbol].append(fut.result())
        else:
            failed.setdefault(symbol, _reason(fut))
    names: tuple[str, ...] = ()
    rows, parts_all, engines = [], [], set()
    for symbol, (src, info, parts) in plans.items():
        got = sorted(done[symbol], key=lambda p: p.index)
        expected = sum(p.n_windows * (1 if spec.mode == "rolling" else spec.window) + p.tail_rows for p in parts)
        if symbol not in failed and (
            [p.index for p in got] != list(range(len(parts)))
            or sum(p.rows for p in got) != expected
            or not all(part_path(out, symbol, p.index).is_file() for p in got)
        ):
            failed[symbol] = "the parts on disk do not add up to the expected rows (was --out changed meanwhile?)"
        if symbol in failed:
            errors.append((src.label, failed[symbol]))
            shutil.rmtree(part_path(out, symbol, 0).parent, ignore_errors=True)  # no partial symbol
            continue
        names = action_names(len(got[0].counts))
        rows.append(_summary_row(src, info, got, names, spec))
        parts_all += got
        engines |= {f"{p.dtype} x {p.threads} thread(s)" for p in got}
    for tmp in out.rglob(".part-*.tmp"):  # left by a worker that died while writing
        tmp.unlink(missing_ok=True)
    summary = pd.DataFrame(rows)
    if spec.engine and any(not e.startswith(spec.engine + " ") for e in engines):
        warnings.append(
            f"workers ran {', '.join(sorted(engines))} but this machine's engine is {spec.engine}: "
            "logits match single-process runs only on the same kind of CPU."
        )
    result = RunResult(
        out_dir=out,
        summary=summary,
        parts=parts_all,
        errors=errors,
        warnings=warnings,
        seconds=time.perf_counter() - t0,
        workers=workers,
        engines=tuple(sorted(engines)),
    )
    manifest = {
        "spec": asdict(spec),
        "inputs": list(inputs),
        "errors": errors,
        "warnings": warnings,
        "summary": summary.to_dict(orient="records"),
        "seconds": result.seconds,
        "workers": workers,
    }
    (out / "_manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    return result


def _reason(fut: Any) -> str:
    """A failed future's exception as one line (KilledWorker: the task's workers kept dying)."""
    try:
        exc = fut.exception()
    except Exception as e:  # a cancelled future raises here
        exc = e
    text = str(exc)
    if type(exc).__name__ == "KilledWorker":
        text = f"its workers died repeatedly ({text}); check the workers' memory and logs"
    return text or type(exc).__name__


def read_output(out_dir: str | Path, symbol: str | None = None) -> pd.DataFrame:
    """The dataset written by `score_on_cluster` (one symbol, or all with a `symbol` column), in order."""
    import pyarrow.dataset as ds

    out = Path(out_dir)
    if symbol is not None:
        files = sorted(part_path(out, symbol, 0).parent.glob(_PART_GLOB))
        return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    table = ds.dataset(out, format="parquet", partitioning="hive").to_table()
    df = table.to_pandas()
    return df.sort_values([SYMBOL_COLUMN, "timestamp"], kind="stable").reset_index(drop=True)


def bench_cluster(
    checkpoint: str | Path,
    data: str | Path,
    workers: Sequence[int],
    window: int = 64,
    bars: int = 3000,
    precision: str = "fast",
    work_dir: str | Path | None = None,
    report: Callable[[str], None] | None = None,
) -> pd.DataFrame:
    """Windows/s of single-process `predict` against a local cluster of each of `workers` processes, on the
    first `bars` bars of `data`, measured in one run. Both include loading the model and writing the output;
    the cluster's start (worker processes importing torch) is reported apart. CPU seconds (this process and
    the workers) show the overhead where a busy machine makes wall time noisy. Each cluster run is also
    checked against the single-process output (identical rows)."""
    import tempfile

    from .__main__ import main

    say = report or (lambda m: None)
    tmp = Path(work_dir or tempfile.mkdtemp(prefix="flag_bench_"))
    src = tmp / "bench_bars.parquet"
    raw = next(iter_table_chunks(data, bars))
    raw.to_parquet(src, index=False)
    rows = []
    t, cpu = time.perf_counter(), time.process_time()
    single = tmp / "single.parquet"
    if (
        main(
            [
                "predict",
                str(checkpoint),
                str(src),
                "--out",
                str(single),
                "--window",
                str(window),
                "--precision",
                precision,
            ]
        )
        != 0
    ):
        raise RuntimeError("single-process predict failed; see the messages above.")
    base, base_cpu = time.perf_counter() - t, time.process_time() - cpu
    expected = pd.read_parquet(single)
    n = len(expected)
    rows.append(
        {
            "engine": "one process",
            "workers": 0,
            "start_s": 0.0,
            "run_s": base,
            "windows_per_s": n / base,
            "vs_one_process": 1.0,
            "cpu_s": base_cpu,
            "cpu_vs_one_process": 1.0,
            "identical": True,
        }
    )
    say(f"one process: {n:,} windows in {base:.1f} s ({n / base:.1f} windows/s)")
    cpus = default_workers()
    for k in workers:
        spec, _ = make_spec(
            checkpoint,
            window=window,
            precision=precision,
            threads=max(1, cpus // k),
            partition_windows=max(1, n // (4 * k)),
        )  # a few parts per worker
        t = time.perf_counter()
        with local_client(k) as client:
            start = time.perf_counter() - t
            t, cpu, before = time.perf_counter(), time.process_time(), client.run(time.process_time)
            result = score_on_cluster(client, [str(src)], spec, tmp / f"cluster_{k}")
            run = time.perf_counter() - t
            after = client.run(time.process_time)
            used = time.process_time() - cpu + sum(after[w] - before.get(w, 0.0) for w in after)
        same = not result.errors and read_output(tmp / f"cluster_{k}", src.stem).equals(expected)
        rows.append(
            {
                "engine": f"cluster of {k}",
                "workers": k,
                "start_s": start,
                "run_s": run,
                "windows_per_s": n / run,
                "vs_one_process": base / run,
                "cpu_s": used,
                "cpu_vs_one_process": used / base_cpu,
                "identical": same,
            }
        )
        say(
            f"cluster of {k}: started in {start:.1f} s, {n:,} windows in {run:.1f} s ({n / run:.1f} windows/s, "
            f"{base / run:.2f}x one process; CPU {used:.1f} s = {used / base_cpu:.2f}x), identical: {same}"
        )
    return pd.DataFrame(rows)


# Many-window analyses: the hypotheses ranking and global attributions on a cluster
#
# Both are cut into chunks of whole batches of the batches one process uses, each chunk is computed on a worker by
# the same library function one process calls, and the client puts the chunks back in order. A batch's result
# depends only on its windows, so every number is the one-process number (see the tests). Results travel back
# in memory: a task re-run after its worker died replaces nothing and adds nothing.

DEFAULT_HYPOTHESIS_WINDOWS = 256  # windows per ranking task (rounded up to whole engine batches)
DEFAULT_IMPORTANCE_WINDOWS = 64  # windows per attribution task (rounded up to whole batches)


class ClusterError(ValueError):
    """A task of a many-window analysis failed on the cluster; the message names the task and the reason."""


@dataclass(frozen=True)
class ModelRef:
    """A checkpoint each worker loads itself, once per process (checked against the client's sha256), and the
    assumptions a model is built with (None: the checkpoint's own)."""

    checkpoint: str
    digest: str
    num_heads: int | None = None
    lora_scale: float | None = None
    norm_first: bool | None = None
    causal: bool | None = None
    threads: int | None = None  # torch threads per worker; None: its CPUs / tasks it runs at once

    @classmethod
    def of(cls, checkpoint: str | Path, digest: str, threads: int | None = None, **assumptions: Any) -> ModelRef:
        """A reference to the file at `checkpoint` (made absolute: workers may start elsewhere)."""
        return cls(str(Path(checkpoint).expanduser().resolve()), digest, threads=threads, **assumptions)


_analysis: dict[str, Any] = {}  # this process's checkpoint ("ckpt", by "file": path, digest) and what was built
checkpoint_loads: dict[str, int] = {}  # digest -> times this process loaded it for analyses (1 = loaded once)


def _analysis_cached(ref: ModelRef, key: tuple, build: Callable[[Any], Any]) -> Any:
    """`build(checkpoint)` once per process and key; the checkpoint itself is loaded once per process. A new
    checkpoint drops everything built from the old one (memory stays bounded)."""
    import torch

    with _engine_lock:
        if _analysis.get("file") != (ref.checkpoint, ref.digest):
            _analysis.clear()
            _analysis.update(
                file=(ref.checkpoint, ref.digest), ckpt=_load_checked(ref.checkpoint, ref.digest), built={}
            )
            checkpoint_loads[ref.digest] = checkpoint_loads.get(ref.digest, 0) + 1
        built = _analysis["built"]
        if key not in built:
            if len(built) >= 8:  # a handful of scales x precisions; never unbounded
                built.pop(next(iter(built)))
            built[key] = build(_analysis["ckpt"])
            torch.set_num_threads(_worker_threads(ref.threads))  # after any engine, which may set its own default
        return built[key]


def _hypotheses_task(
    ref: ModelRef, cfg: Any, hyps: tuple[Any, ...], data: Any, index: np.ndarray, precision: str, batch_size: int
) -> dict[Any, np.ndarray]:
    """Logits of windows `index` of `data` under `hyps` (one LoRA scale and window length), with this worker's
    merged engines."""
    from .analysis.hypotheses import merged_engine, score_hypotheses

    def engine_of(scale: float, prec: str) -> Any:
        key = ("hypotheses", cfg.num_heads, cfg.norm_first, cfg.causal, scale, prec, batch_size)
        return _analysis_cached(ref, key, lambda ck: merged_engine(ck.state_dict, cfg, scale, prec, None, batch_size))

    return score_hypotheses(None, cfg, hyps, data, index, precision, engine_of=engine_of)  # type: ignore[arg-type]


def _value(value: Any) -> Any:
    """The input itself, as a task's result (see `hypotheses_scorer`)."""
    return value


def _collect(jobs: list[tuple[str, Any]]) -> list[Any]:
    """Results of (what, future) in order, once all are done; a failed one raises ClusterError naming it."""
    from distributed import wait

    try:
        wait([f for _, f in jobs])
    except Exception as exc:  # e.g. the scheduler cancelled them (lost data, a client that closed)
        raise ClusterError(f"the cluster lost the tasks of {jobs[0][0]} and others: {exc}") from exc
    failed = [(what, _reason(f)) for what, f in jobs if f.status != "finished"]
    if failed:
        more = f" (and {len(failed) - 1} more task(s))" if len(failed) > 1 else ""
        raise ClusterError(f"{failed[0][0]} failed on the cluster: {failed[0][1]}{more}")
    return [f.result() for _, f in jobs]


def _chunks(n: int, batch: int, per_task: int) -> list[slice]:
    """Slices of 0..n-1 of whole batches (about `per_task` items each): the batches of one process, grouped."""
    size = max(1, -(-per_task // batch)) * batch
    return [slice(a, min(a + size, n)) for a in range(0, n, size)]


def hypotheses_scorer(
    client: Any,
    ref: ModelRef,
    cfg: Any,
    data: Any,
    *,
    batch_size: int | None = None,
    partition_windows: int = DEFAULT_HYPOTHESIS_WINDOWS,
    on_submit: Hook | None = None,
) -> Callable[[Any, np.ndarray, str], dict[Any, np.ndarray]]:
    """A `scorer` for `rank_hypotheses` that scores on the cluster behind `client`: one task per LoRA scale,
    window length and chunk of whole engine batches (`batch_size`, else the batches this machine's engine
    chooses, which one-process ranking uses too), so every logit, and the ranking, equals one process's.
    `data` (LabelledData) goes to every worker once. Raises ClusterError naming a task that failed."""
    from .engine import engine_batch_size

    if partition_windows < 1 or (batch_size is not None and batch_size < 1):
        raise ValueError("partition windows and batch size must be at least 1.")
    wait_for_workers(client)
    # A task that returns the data, not `scatter`: scattered data is lost with the workers holding it, a task's
    # result is recomputed by the scheduler when its worker dies.
    shared = client.submit(_value, data, key=f"labelled-data-{uuid.uuid4().hex[:12]}", pure=False)

    def score(hyps: Any, index: np.ndarray, precision: str) -> dict[Any, np.ndarray]:
        jobs: list[tuple[str, Any]] = []
        groups = []
        for scale in sorted({h.lora_scale for h in hyps}):  # score_hypotheses' order
            for length in sorted({h.window for h in hyps if h.lora_scale == scale}):
                group = tuple(h for h in hyps if h.lora_scale == scale and h.window == length)
                bs = batch_size or engine_batch_size(cfg, length, precision)
                parts = _chunks(len(index), bs, partition_windows)
                groups.append((group, len(parts)))
                for p in parts:
                    what = f"LoRA ×{scale:g}, window {length}, windows {p.start}..{p.stop - 1} ({precision})"
                    fut = client.submit(
                        _hypotheses_task,
                        ref,
                        cfg,
                        group,
                        shared,
                        index[p],
                        precision,
                        bs,
                        key=f"hypotheses-{uuid.uuid4().hex[:12]}",
                        pure=False,
                    )
                    jobs.append((what, fut))
        if on_submit:
            on_submit([f for _, f in jobs])
        results = iter(_collect(jobs))
        out: dict[Any, np.ndarray] = {}
        for group, n_parts in groups:
            pieces = [next(results) for _ in range(n_parts)]
            out.update({h: np.concatenate([p[h] for p in pieces]) for h in group})
        return out

    return score


def _importance_task(ref: ModelRef, windows: np.ndarray, options: dict[str, Any]) -> Any:
    """`global_importance` of `windows` (k, S, D) with this worker's model (built once per assumptions)."""
    from .analysis.attribution import global_importance
    from .model import build_model

    key = ("model", ref.num_heads, ref.lora_scale, ref.norm_first, ref.causal)
    model = _analysis_cached(
        ref,
        key,
        lambda ck: build_model(
            ck, num_heads=ref.num_heads, lora_scale=ref.lora_scale, norm_first=ref.norm_first, causal=ref.causal
        ),
    )
    return global_importance(model, windows, **options)


def global_importance_on_cluster(
    client: Any,
    ref: ModelRef,
    windows: np.ndarray,
    indices: Sequence[int] | np.ndarray | None = None,
    *,
    partition_windows: int = DEFAULT_IMPORTANCE_WINDOWS,
    on_submit: Hook | None = None,
    **options: Any,
) -> Any:
    """`attribution.global_importance(model, windows, indices, **options)` on the cluster behind `client`, for the
    model `ref` names: the selected windows are cut into chunks of whole batches (`batch_size`, default 16) and
    each chunk goes to a worker. The batches are the ones one process uses, so the result is identical to it for
    every deterministic method (GradientSHAP draws random samples: it differs between any two runs). Raises
    ClusterError naming a chunk that failed."""
    from .analysis.attribution import GlobalImportance

    if partition_windows < 1:
        raise ValueError("partition windows must be at least 1.")
    if "progress" in options:
        raise TypeError("progress comes from Dask on a cluster (on_submit); pass no progress callback.")
    t0 = time.perf_counter()
    windows = np.asarray(windows)
    idx = np.arange(len(windows)) if indices is None else np.asarray(indices, dtype=int)
    if len(idx) == 0:
        raise ValueError("no windows selected for global importance.")
    wait_for_workers(client)
    jobs = []
    for p in _chunks(len(idx), int(options.get("batch_size", 16)), partition_windows):
        chunk = np.ascontiguousarray(windows[idx[p]])  # only these windows travel
        fut = client.submit(
            _importance_task, ref, chunk, options, key=f"importance-{uuid.uuid4().hex[:12]}", pure=False
        )
        jobs.append((f"windows {p.start}..{p.stop - 1} of {len(idx)}", fut))
    if on_submit:
        on_submit([f for _, f in jobs])
    parts: list[GlobalImportance] = _collect(jobs)
    first = parts[0]
    return GlobalImportance(
        method=first.method,
        baseline=first.baseline,
        output=first.output,
        position=first.position,
        totals=np.concatenate([p.totals for p in parts]),
        window_index=idx,
        predicted=np.concatenate([p.predicted for p in parts]),
        targets=np.concatenate([p.targets for p in parts]),
        feature_names=first.feature_names,
        action_names=first.action_names,
        seconds=time.perf_counter() - t0,
    )


def bench_hypotheses_cluster(
    checkpoint: str | Path,
    data: str | Path,
    workers: Sequence[int],
    windows: int = 256,
    bars: int = 3000,
    heads: Sequence[int] = (4, 8),
    scales: Sequence[float] = (1.0,),
    report: Callable[[str], None] | None = None,
) -> pd.DataFrame:
    """Window passes/s of the hypotheses ranking (`heads` x mask x norm placement x `scales`, `windows` labelled
    windows of the first `bars` bars of `data`, no screening) in one process against a local cluster of each of
    `workers` processes, measured in one run; each cluster ranking is checked against the one-process table
    (identical). Both include the bootstrap on the client; the cluster's start is reported apart."""
    from .analysis import hypotheses as hy
    from .checkpoint import load_checkpoint

    say = report or (lambda m: None)
    ckpt = load_checkpoint(checkpoint)
    cfg = ckpt.require_config()
    raw = next(iter_table_chunks(data, bars))
    frame = prepare_ohlcv(raw, detect_columns(raw.columns)).valid_frame()
    space = hy.search_space(cfg, ckpt.meta, heads=heads, scales=scales)
    labelled = hy.labelled_data(frame, ckpt.meta, cfg.state_dim, windows, max(space.windows))
    passes = len(space) * len(labelled)
    t, cpu = time.perf_counter(), time.process_time()
    one = hy.rank_hypotheses(ckpt.state_dict, cfg, labelled, space, resamples=200)
    base, base_cpu = time.perf_counter() - t, time.process_time() - cpu
    rows = [
        {
            "engine": "one process",
            "workers": 0,
            "start_s": 0.0,
            "run_s": base,
            "passes_per_s": passes / base,
            "vs_one_process": 1.0,
            "cpu_s": base_cpu,
            "cpu_vs_one_process": 1.0,
            "identical": True,
        }
    ]
    say(f"hypotheses, one process: {len(space)} combinations x {len(labelled)} windows in {base:.1f} s")
    cpus = default_workers()
    for k in workers:
        ref = ModelRef.of(checkpoint, ckpt.digest, threads=max(1, cpus // k))
        t = time.perf_counter()
        with local_client(k) as client:
            start = time.perf_counter() - t
            t, cpu, before = time.perf_counter(), time.process_time(), client.run(time.process_time)
            scorer = hypotheses_scorer(
                client, ref, cfg, labelled, partition_windows=max(1, len(labelled) // (2 * k))
            )  # a few tasks per worker
            many = hy.rank_hypotheses(ckpt.state_dict, cfg, labelled, space, resamples=200, scorer=scorer)
            run = time.perf_counter() - t
            after = client.run(time.process_time)
            used = time.process_time() - cpu + sum(after[w] - before.get(w, 0.0) for w in after)
        same = many.table.equals(one.table)
        rows.append(
            {
                "engine": f"cluster of {k}",
                "workers": k,
                "start_s": start,
                "run_s": run,
                "passes_per_s": passes / run,
                "vs_one_process": base / run,
                "cpu_s": used,
                "cpu_vs_one_process": used / base_cpu,
                "identical": same,
            }
        )
        say(
            f"hypotheses, cluster of {k}: started in {start:.1f} s, ranked in {run:.1f} s ({base / run:.2f}x one "
            f"process; CPU {used / base_cpu:.2f}x), identical: {same}"
        )
    return pd.DataFrame(rows)
