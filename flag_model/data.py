"""Market data to model inputs: reading and validating uploads, feature matrices for a checkpoint, drift
against the checkpoint's stored statistics, and windows as views (never copies).

Row numbers in messages are 1-based data rows (the header is not counted: CSV line = row + 1).
"""

from __future__ import annotations

import hashlib
import io
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd

from .features import FEATURE_SETS, OHLCV_COLUMNS, WARMUP, compute_features, stored_config
from .limits import limits, too_big

NORMALISATIONS = ("checkpoint", "none", "data")
MODES = ("rolling", "blocks")
DEFAULT_WINDOW = 64
PRICE_COLUMN = "_price"  # feature uploads: the optional price column, kept apart from the features

# Normalised column names (lower case, letters and digits only) each role is detected by, best first.
_ROLE_NAMES: dict[str, tuple[str, ...]] = {
    "time": ("datetime", "date", "time", "timestamp", "opentime", "ts", "t", "datetimeutc", "timeutc", "dateutc"),
    "open": ("open", "o", "openprice", "opening"),
    "high": ("high", "h", "highprice", "max"),
    "low": ("low", "l", "lowprice", "min"),
    "close": ("close", "c", "closeprice", "price", "last", "adjclose"),
    "volume": ("volume", "vol", "v", "basevolume", "quantity", "qty"),
}
_SCALE_JUMP = 10.0  # input std / stored std beyond this factor (either way) is flagged
_SHIFT_SIGMAS = 3.0  # |input mean - stored mean| / stored std beyond this is flagged


class DataError(ValueError):
    """An upload that cannot be read or used; the message names the problem and the fix."""


@dataclass(frozen=True)
class Issue:
    """One validation finding. severity "error" stops the run, "warning" is shown and the run goes on."""

    severity: str
    message: str
    column: str | None = None
    row: int | None = None  # 1-based data row of the first occurrence


@dataclass(frozen=True)
class FeatureMatrix:
    """Model-ready features: `values` (n, state_dim) float32, one row per bar that has features."""

    values: np.ndarray
    times: pd.DatetimeIndex
    close: np.ndarray  # (n,) close price of each row's bar; NaN when the upload has no prices
    names: tuple[str, ...]  # state_dim names; padded columns are named "pad_i"
    feature_set: str
    normalisation: str
    warnings: tuple[str, ...]
    raw_mean: np.ndarray | None = None  # (state_dim,) per-column mean before normalisation
    raw_std: np.ndarray | None = None  # (state_dim,) population std before normalisation
    n_padded: int = 0  # zero columns appended to reach state_dim

    @property
    def has_prices(self) -> bool:
        """True when every row has a finite close, so labels and the equity curve can be computed."""
        return len(self.close) > 0 and bool(np.isfinite(self.close).all())


@dataclass(frozen=True)
class ColumnMapping:
    """Which upload column plays which OHLCV role (None: not found)."""

    time: str | None = None
    open: str | None = None
    high: str | None = None
    low: str | None = None
    close: str | None = None
    volume: str | None = None

    def missing(self) -> list[str]:
        return [r for r in ("time", *OHLCV_COLUMNS) if getattr(self, r) is None]

    def as_dict(self) -> dict[str, str | None]:
        return {r: getattr(self, r) for r in ("time", *OHLCV_COLUMNS)}


@dataclass(frozen=True)
class Prepared:
    """A validated upload. `frame` has columns datetime, timestamp (ms), open, high, low, close, volume
    (OHLCV mode) or datetime, the feature columns and PRICE_COLUMN if mapped (feature mode); None when
    there are errors."""

    frame: pd.DataFrame | None
    issues: tuple[Issue, ...]
    time_format: str = ""
    feature_columns: tuple[str, ...] = ()

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "warning"]

    @property
    def ok(self) -> bool:
        return self.frame is not None and not self.errors

    def valid_frame(self) -> pd.DataFrame:
        """`frame` of an upload without errors; DataError naming every error otherwise."""
        if self.frame is None or self.errors:
            raise DataError("; ".join(i.message for i in self.errors) or "the table could not be prepared")
        return self.frame


def frame_digest(df: pd.DataFrame) -> str:
    """sha256 of a table's column names and every cell: an exact cache key. (Streamlit's own hash of a frame with
    50,000 rows or more reads a sample of 10,000 rows, so two files that differ elsewhere would share results.)"""
    h = hashlib.sha256("\x1f".join(map(str, df.columns)).encode())
    h.update(pd.util.hash_pandas_object(df, index=False).to_numpy().tobytes())
    return h.hexdigest()


# Reading


def _header_columns(head: bytes, label: str) -> list[str]:
    """The CSV header's column names from the file's first bytes; refuses a header line above max_header_bytes
    or with more than max_columns fields before pandas sees the file."""
    lim = limits()
    line = head.split(b"\n", 1)[0]
    if b"\n" not in head and len(head) >= lim.max_header_bytes:
        raise DataError(
            f"{label}: the header line is longer than this server's limit of {lim.max_header_bytes:,} "
            "bytes (max_header_bytes); refused before parsing. A market-data header is a few hundred "
            "bytes: is this the right file?"
        )
    if line.count(b",") + 1 > lim.max_columns:
        raise DataError(f"{label}: " + too_big("the number of columns", line.count(b",") + 1, "max_columns"))
    if line.count(b'"') % 2:  # a quoted newline inside the header: let the parser read on, within 1 MiB
        line = head[: 1 << 20]
    try:
        columns = [str(c) for c in pd.read_csv(io.BytesIO(line + b"\n"), nrows=0, index_col=False).columns]
    except Exception as exc:  # noqa: BLE001 - parsers raise many types; the user needs the reason
        raise DataError(
            f"could not read the header of {label} as CSV ({type(exc).__name__}). Upload a CSV with "
            "a header row or a Parquet file."
        ) from None
    if len(columns) > lim.max_columns:
        raise DataError(f"{label}: " + too_big("the number of columns", len(columns), "max_columns"))
    return columns


def _parquet_check(source: Any, label: str) -> None:
    """Rows, columns and inflated size from the Parquet footer, before any row is read."""
    import pyarrow.parquet as pq

    lim = limits()
    try:
        meta = pq.read_metadata(source)
    except Exception as exc:  # noqa: BLE001
        raise DataError(
            f"could not read {label} as Parquet ({type(exc).__name__}: {str(exc)[:120]}). Upload a "
            "CSV with a header row or a Parquet file."
        ) from None
    if meta.num_columns > lim.max_columns:
        raise DataError(f"{label}: " + too_big("the number of columns", meta.num_columns, "max_columns"))
    if meta.num_rows > lim.max_rows:
        raise DataError(f"{label}: " + too_big("the number of rows", meta.num_rows, "max_rows"))
    if meta.num_rows * meta.num_columns > lim.max_cells:
        raise DataError(f"{label}: " + too_big("rows × columns", meta.num_rows * meta.num_columns, "max_cells"))
    inflated = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    if inflated > lim.max_decompressed_bytes:
        raise DataError(f"{label}: " + too_big("the bytes its columns inflate to", inflated, "max_decompressed_bytes"))


def read_table(src: str | Path | bytes | IO[bytes], name: str | None = None) -> pd.DataFrame:
    """A CSV or Parquet file (path, bytes or binary file object) as a DataFrame; Parquet is recognised by
    its name or its magic bytes. The CSV header line or the Parquet footer is checked against the resource
    policy (`flag_model.limits`) first, and at most max_rows / max_cells rows are parsed. Raises DataError with
    the reason when the file cannot be parsed or is too large; the message never quotes the file's content."""
    label = name or (str(src) if isinstance(src, (str, Path)) else "upload")
    lim = limits()
    if isinstance(src, (str, Path)):
        path = Path(src).expanduser()
        if not path.is_file():
            raise DataError(f"no file at {path}; check the path (it is read on the machine running this).")
        with path.open("rb") as f:
            head = f.read(lim.max_header_bytes)
        is_parquet = head[:4] == b"PAR1" or path.suffix.lower() in (".parquet", ".pq")
        source: Any = path
    else:
        data = src if isinstance(src, bytes) else src.read()
        head = data[: lim.max_header_bytes]
        is_parquet = data[:4] == b"PAR1" or label.lower().endswith((".parquet", ".pq"))
        source = io.BytesIO(data)
    try:
        if is_parquet:
            _parquet_check(source, label)
            if not isinstance(source, Path):
                source.seek(0)
            df = pd.read_parquet(source)
        else:
            columns = _header_columns(head, label)
            max_rows = min(lim.max_rows, lim.max_cells // max(len(columns), 1))
            # usecols: a first data row wider than the header is cut to the header's columns instead of
            # silently becoming a (huge, slow) row index.
            df = pd.read_csv(source, index_col=False, usecols=range(len(columns)), nrows=max_rows + 1)
            if len(df) > max_rows:
                raise DataError(
                    f"{label}: "
                    + too_big("the number of rows", len(df), "max_rows")
                    + (" (rows × columns is bounded by max_cells)" if max_rows < lim.max_rows else "")
                )
    except DataError:
        raise
    except MemoryError:
        raise DataError(
            f"{label} is too large to read on this machine (out of memory); upload a shorter stretch "
            "of bars or fewer columns."
        ) from None
    except Exception as exc:  # noqa: BLE001 - parsers raise many types; the user needs the reason, not the class
        kind = "Parquet" if is_parquet else "CSV"
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise DataError(
            f"could not read {label} as {kind} ({reason}). Upload a CSV with a header row or a Parquet file."
        ) from None
    if df.empty or len(df.columns) == 0:
        raise DataError(f"{label} has no data rows; it needs a header row and one row per bar.")
    return df


def csv_usecols(path: str | Path) -> range:
    """The column positions of a CSV's header (checked like `read_table`), for readers of row ranges: a row wider
    than the header is cut to it."""
    with Path(path).open("rb") as f:
        return range(len(_header_columns(f.read(limits().max_header_bytes), Path(path).name)))


def iter_table_chunks(path: str | Path, chunk_rows: int) -> Iterator[pd.DataFrame]:
    """A CSV or Parquet file in pieces of about `chunk_rows` rows, for bounded-memory streaming (header line or
    footer checked first, like `read_table`; CSV rows are cut to the header's columns)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"no file at {path}; check the path.")
    with path.open("rb") as f:
        head = f.read(limits().max_header_bytes)
    if head[:4] == b"PAR1":
        import pyarrow.parquet as pq

        _parquet_check(path, path.name)
        for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk_rows):
            yield batch.to_pandas()
    else:
        with pd.read_csv(path, chunksize=chunk_rows, index_col=False, usecols=csv_usecols(path)) as reader:
            yield from reader


# Column detection and validation


def _norm_name(name: object) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def detect_columns(columns: Sequence[object]) -> ColumnMapping:
    """Map OHLCV roles to columns by common names (open/Open/o, close/c/price, volume/vol, time/date/...)."""
    by_norm: dict[str, str] = {}
    for c in columns:
        by_norm.setdefault(_norm_name(c), str(c))
    found: dict[str, str | None] = {}
    for role, names in _ROLE_NAMES.items():
        found[role] = next((by_norm[n] for n in names if n in by_norm), None)
    return ColumnMapping(**found)


def feature_candidates(df: pd.DataFrame, mapping: ColumnMapping | None = None) -> list[str]:
    """Columns that could be precomputed features: numeric, not the time column."""
    time_col = mapping.time if mapping else detect_columns(df.columns).time
    return [str(c) for c in df.columns if str(c) != time_col and pd.api.types.is_numeric_dtype(df[c])]


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[(start, end)] inclusive index runs where mask is True."""
    if not mask.any():
        return []
    padded = np.r_[False, mask, False].astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[::2].tolist(), (edges[1::2] - 1).tolist()))


def _numeric(df: pd.DataFrame, col: str, rows: np.ndarray, repair: bool, issues: list[Issue]) -> np.ndarray:
    """Column as float64; non-numeric cells are errors naming the first row and value (NaN when repairing).
    `rows` holds each line's 1-based data row number."""
    raw = df[col]
    num = pd.to_numeric(raw, errors="coerce") if not pd.api.types.is_numeric_dtype(raw) else raw
    values = num.to_numpy(dtype=np.float64, na_value=np.nan)
    infinite = np.isinf(values)
    inf = np.flatnonzero(infinite)
    if len(inf):  # an infinite price would give inf returns and, downstream, a meaningless decision
        i = int(inf[0])
        msg = f"column '{col}' has {len(inf)} infinite value(s); the first in row {rows[i]}."
        issues.append(
            Issue("warning", msg + " Treated as missing.", col, int(rows[i]))
            if repair
            else Issue("error", msg + " Fix the file or tick 'Repair' to treat them as missing.", col, int(rows[i]))
        )
        values = np.where(infinite, np.nan, values)
    bad = np.flatnonzero(np.isnan(values) & raw.notna().to_numpy() & ~infinite)
    if len(bad):
        i = int(bad[0])
        msg = f"column '{col}' has {len(bad)} non-numeric value(s); the first is {raw.iloc[i]!r} in row {rows[i]}."
        if repair:
            issues.append(Issue("warning", msg + " Treated as missing.", col, int(rows[i])))
        else:
            issues.append(
                Issue("error", msg + " Fix the file or tick 'Repair' to treat them as missing.", col, int(rows[i]))
            )
    return values


def _span(a: int, b: int) -> str:
    return f"row {a}" if a == b else f"rows {a}–{b} ({b - a + 1} rows)"


def _td(ns: float) -> str:
    return str(pd.Timedelta(int(ns), "ns")).replace("0 days ", "")


def _missing_runs(values: np.ndarray, col: str, rows: np.ndarray, repair: bool, issues: list[Issue]) -> None:
    runs = _runs(np.isnan(values))
    if not runs:
        return
    count = sum(b - a + 1 for a, b in runs)
    a0, b0 = runs[0]
    la, lb = max(runs, key=lambda r: r[1] - r[0])
    msg = (
        f"column '{col}' has {count} missing value(s) in {len(runs)} run(s): the first is "
        f"{_span(rows[a0], rows[b0])}, the longest {_span(rows[la], rows[lb])}."
    )
    if repair:
        issues.append(Issue("warning", msg + " Filled with the previous value.", col, int(rows[a0])))
    else:
        issues.append(
            Issue(
                "error",
                msg + " Fill or remove them, or tick 'Repair' to carry the last value forward.",
                col,
                int(rows[a0]),
            )
        )


def parse_times(col: pd.Series) -> tuple[np.ndarray, str]:
    """A time column as datetime64[ns] values (NaT where unparseable) and the format found.

    Numbers are epoch times whose unit is read from their size (s, ms, µs or ns); strings are parsed as
    dates; times with a UTC offset are converted to UTC and the zone is dropped."""
    if pd.api.types.is_datetime64_any_dtype(col):
        times = pd.DatetimeIndex(col)
        if times.tz is not None:
            times = times.tz_convert("UTC").tz_localize(None)
        return _ns(times), "datetime"
    num = pd.to_numeric(col, errors="coerce") if not pd.api.types.is_numeric_dtype(col) else col
    num_values = num.to_numpy(dtype=np.float64, na_value=np.nan)
    if np.isfinite(num_values).mean() > 0.5:
        mag = np.nanmedian(np.abs(num_values))
        unit = "s" if mag < 1e11 else "ms" if mag < 1e14 else "us" if mag < 1e17 else "ns"
        times = pd.DatetimeIndex(pd.to_datetime(num_values, unit=unit, errors="coerce"))
        return _ns(times), f"epoch {unit}"
    try:
        parsed = pd.to_datetime(col, errors="coerce", utc=True, format="mixed")
    except (ValueError, TypeError):
        parsed = pd.to_datetime(col, errors="coerce", utc=True)
    return _ns(pd.DatetimeIndex(parsed).tz_localize(None)), "date strings"


def _ns(times: pd.DatetimeIndex) -> np.ndarray:
    """datetime64[ns] values; times outside its range (years before 1677 or after 2262) become NaT, so they
    are reported as unparseable instead of overflowing."""
    inside = (times >= pd.Timestamp.min) & (times <= pd.Timestamp.max)
    return times.where(inside).as_unit("ns").to_numpy()


def _time_issues(
    times: np.ndarray, raw: pd.Series, name: str, rows: np.ndarray, repair: bool, issues: list[Issue]
) -> np.ndarray:
    """Unparseable times: an error naming the first row, or (repair) a warning; returns the rows to keep."""
    bad = np.flatnonzero(np.isnat(times))
    if len(bad):
        i = int(bad[0])
        msg = (
            f"time column '{name}' has {len(bad)} value(s) that are not times; the first is {raw.iloc[i]!r} "
            f"in row {rows[i]}."
        )
        issues.append(
            Issue("warning", msg + " Those rows were dropped.", name, int(rows[i]))
            if repair
            else Issue("error", msg + " Fix them or tick 'Repair' to drop those rows.", name, int(rows[i]))
        )
    return ~np.isnat(times)


def _order_checks(
    times: np.ndarray, name: str, rows: np.ndarray, repair: bool, issues: list[Issue]
) -> np.ndarray | None:
    """Unsorted and duplicate timestamps: errors naming rows, or (repair) the row order that fixes them."""
    order = np.arange(len(times))
    back = np.flatnonzero(np.diff(times.astype(np.int64)) < 0)
    if len(back):
        i = int(back[0]) + 1
        msg = (
            f"'{name}' is not sorted: row {rows[i]} ({pd.Timestamp(times[i])}) is earlier than row "
            f"{rows[i - 1]} ({pd.Timestamp(times[i - 1])}); {len(back)} such step(s) back."
        )
        if not repair:
            issues.append(Issue("error", msg + " Sort the file by time or tick 'Repair'.", name, int(rows[i])))
            return None
        issues.append(Issue("warning", msg + " Rows were sorted by time.", name, int(rows[i])))
        order = np.argsort(times, kind="stable")
    sorted_t = times[order]
    dup = np.flatnonzero(sorted_t[1:] == sorted_t[:-1]) + 1
    if len(dup):
        j = int(order[dup[0]])
        msg = f"'{name}' has {len(dup)} duplicate timestamp(s); the first is {pd.Timestamp(times[j])} in row {rows[j]}."
        if not repair:
            issues.append(
                Issue(
                    "error",
                    msg + " Remove the duplicates or tick 'Repair' (keeps the last row of each time).",
                    name,
                    int(rows[j]),
                )
            )
            return None
        issues.append(Issue("warning", msg + " Kept the last row of each time.", name, int(rows[j])))
        order = order[np.r_[sorted_t[1:] != sorted_t[:-1], True]]
    return order


def _gap_check(times: np.ndarray, name: str, rows: np.ndarray, issues: list[Issue]) -> None:
    if len(times) < 3:
        return
    step: np.ndarray = np.diff(times.astype(np.int64))  # ns between bars
    bar = np.median(step)
    gaps = np.flatnonzero(step > 1.5 * bar)
    if len(gaps):
        i, big = int(gaps[0]), int(np.argmax(step))
        issues.append(
            Issue(
                "warning",
                f"'{name}' has {len(gaps)} gap(s) longer than the usual bar of {_td(bar)}: the first "
                f"after row {rows[i]} ({pd.Timestamp(times[i])}), the longest {_td(step[big])} "
                f"after row {rows[big]}. Windows that span a gap mix distant bars.",
                name,
                int(rows[i]),
            )
        )


def _carry_forward(
    frame: pd.DataFrame, columns: list[str], rows: np.ndarray, issues: list[Issue]
) -> tuple[pd.DataFrame, np.ndarray]:
    """Repair: fill missing values with the previous row's; leading rows with nothing before them are
    dropped, and an error is added when no row is left."""
    frame = frame.copy()
    frame[columns] = frame[columns].ffill()
    missing = frame[columns].isna().any(axis=1).to_numpy()
    lead = len(missing) if missing.all() else int(missing.argmin())
    if lead:
        issues.append(
            Issue(
                "warning",
                f"the first {lead} row(s) had missing values with nothing before them to "
                "carry forward; they were dropped.",
                None,
                int(rows[0]),
            )
        )
    if lead == len(frame):
        issues.append(
            Issue("error", "no usable rows are left after the repairs above; fix the file's times and values.")
        )
    return frame.iloc[lead:], rows[lead:]


def _has_errors(issues: list[Issue]) -> bool:
    return any(i.severity == "error" for i in issues)


def prepare_ohlcv(df: pd.DataFrame, mapping: ColumnMapping, repair: bool = False, row_offset: int = 0) -> Prepared:
    """Validate an upload's OHLCV columns and return them in the house convention.

    Errors (stop): a role without a column, non-numeric cells, missing values, unparseable, unsorted or
    duplicate times, prices <= 0. Warnings: gaps, high < low. `repair` turns the fixable errors into
    warnings (drop bad times, sort, keep the last duplicate, carry values forward). `row_offset` shifts
    row numbers for chunks of a larger file."""
    issues: list[Issue] = []
    listed = f"{', '.join(map(str, df.columns[:12]))}{'…' if len(df.columns) > 12 else ''}"
    for role in mapping.missing():
        names = ", ".join(_ROLE_NAMES[role][:4])
        issues.append(
            Issue(
                "error",
                f"missing column '{role}': OHLCV input needs a {role} column and none of this "
                f"file's columns ({listed}) is named like one ({names}, …). Map one in 'Column mapping "
                "and validation', or, if the file holds precomputed features, choose 'Precomputed "
                "feature columns' there.",
                role,
            )
        )
    for role, col in mapping.as_dict().items():
        if col is not None and col not in df.columns:
            issues.append(Issue("error", f"column '{col}' mapped to '{role}' is not in the file.", col))
    if issues or mapping.time is None:  # a missing time column is one of the issues
        return Prepared(None, tuple(issues))
    rows = np.arange(1, len(df) + 1) + row_offset
    cols = {r: _numeric(df, getattr(mapping, r), rows, repair, issues) for r in OHLCV_COLUMNS}
    times, fmt = parse_times(df[mapping.time])
    keep = _time_issues(times, df[mapping.time], mapping.time, rows, repair, issues)
    if not repair and not keep.all():
        return Prepared(None, tuple(issues), fmt)
    keep = np.flatnonzero(keep)
    order = _order_checks(times[keep], mapping.time, rows[keep], repair, issues)
    if order is None or _has_errors(issues):
        return Prepared(None, tuple(issues), fmt)
    sel = keep[order]
    frame = pd.DataFrame({"datetime": times[sel]})
    for r in OHLCV_COLUMNS:
        _missing_runs(cols[r][sel], getattr(mapping, r), rows[sel], repair, issues)
        frame[r] = cols[r][sel]
    rows = rows[sel]
    if repair:
        frame, rows = _carry_forward(frame, list(OHLCV_COLUMNS), rows, issues)
    if _has_errors(issues):
        return Prepared(None, tuple(issues), fmt)
    for r in OHLCV_COLUMNS[:4]:  # prices; volume may be zero
        bad = np.flatnonzero(frame[r].to_numpy() <= 0)
        if len(bad):
            col = getattr(mapping, r)
            issues.append(
                Issue(
                    "error",
                    f"column '{col}' ({r}) has {len(bad)} price(s) <= 0; the first in row "
                    f"{rows[bad[0]]}. Returns are undefined there; remove those rows.",
                    col,
                    int(rows[bad[0]]),
                )
            )
    bad = np.flatnonzero(frame["high"].to_numpy() < frame["low"].to_numpy())
    if len(bad):
        issues.append(
            Issue(
                "warning",
                f"high < low in {len(bad)} row(s), the first in row {rows[bad[0]]}: are "
                f"'{mapping.high}' and '{mapping.low}' swapped?",
                mapping.high,
                int(rows[bad[0]]),
            )
        )
    if _has_errors(issues):
        return Prepared(None, tuple(issues), fmt)
    _gap_check(frame["datetime"].to_numpy(), mapping.time, rows, issues)
    frame = frame.reset_index(drop=True)
    frame.insert(1, "timestamp", frame["datetime"].to_numpy().astype("datetime64[ms]").astype(np.int64))
    return Prepared(frame, tuple(issues), fmt)


def prepare_features(
    df: pd.DataFrame,
    columns: Sequence[str],
    time_column: str | None,
    state_dim: int,
    close_column: str | None = None,
    repair: bool = False,
    row_offset: int = 0,
) -> Prepared:
    """Validate precomputed feature columns (in the chosen order). Returns a frame with datetime, the
    feature columns and (if mapped) the price as PRICE_COLUMN. More columns than state_dim is an error;
    fewer is a warning because the model will see zero padding."""
    issues: list[Issue] = []
    columns = [str(c) for c in columns]
    if not columns:
        return Prepared(None, (Issue("error", "no feature columns selected; choose them in 'Feature columns'."),))
    if time_column is None:
        issues.append(
            Issue("error", "no time column; map the column with timestamps (charts, order and gap checks need it).")
        )
    for c in [*columns, time_column, close_column]:
        if c is not None and c not in df.columns:
            issues.append(Issue("error", f"column '{c}' is not in the file.", c))
    if len(columns) > state_dim:
        issues.append(
            Issue(
                "error",
                f"wrong feature count: {len(columns)} columns selected but the model takes "
                f"{state_dim} inputs; select at most {state_dim}.",
            )
        )
    if issues or time_column is None:  # no time column is one of the issues
        return Prepared(None, tuple(issues))
    rows = np.arange(1, len(df) + 1) + row_offset
    named = list(dict.fromkeys([*columns, *([close_column] if close_column else [])]))
    values = {c: _numeric(df, c, rows, repair, issues) for c in named}
    times, fmt = parse_times(df[time_column])
    keep = _time_issues(times, df[time_column], time_column, rows, repair, issues)
    if not repair and not keep.all():
        return Prepared(None, tuple(issues), fmt)
    keep = np.flatnonzero(keep)
    order = _order_checks(times[keep], time_column, rows[keep], repair, issues)
    if order is None or _has_errors(issues):
        return Prepared(None, tuple(issues), fmt)
    sel = keep[order]
    frame = pd.DataFrame({"datetime": times[sel]})
    for c in named:
        _missing_runs(values[c][sel], c, rows[sel], repair, issues)
        frame[c] = values[c][sel]
    if close_column:
        frame[PRICE_COLUMN] = values[close_column][sel]
    rows = rows[sel]
    if repair:
        frame, rows = _carry_forward(frame, list(frame.columns[1:]), rows, issues)
    if _has_errors(issues):
        return Prepared(None, tuple(issues), fmt)
    if len(columns) < state_dim:
        issues.append(
            Issue(
                "warning",
                f"{len(columns)} feature columns for a model with {state_dim} inputs: "
                f"{state_dim - len(columns)} zero columns will be appended. A model trained on "
                f"{state_dim} real features sees constant zeros there — the padding mistake.",
            )
        )
    _gap_check(frame["datetime"].to_numpy(), time_column, rows, issues)
    return Prepared(frame.reset_index(drop=True), tuple(issues), fmt, tuple(columns))


def too_few_rows(window: int, n_rows: int | None = None, warmup: int = 0) -> str:
    """The one "too few rows" message: what a window needs (with the OHLCV warm-up, if any) and what there is."""
    extra = f" ({window + warmup} bars of OHLCV with the {warmup}-bar warm-up)" if warmup else ""
    has = "fewer" if n_rows is None else n_rows
    return (
        f"too few rows: window {window} needs at least {window} rows of features{extra}; the data gives {has}. "
        "Use a shorter window or more data."
    )


def evenly_spaced(n_items: int, count: int) -> np.ndarray:
    """(k,) int64 indices of min(count, n_items) items (at least one) spread evenly over 0..n_items-1, rounded."""
    if n_items < 1:
        raise ValueError("there are no windows to sample from; use more data or a shorter window.")
    return np.unique(np.linspace(0, n_items - 1, max(1, min(count, n_items))).round().astype(np.int64))


def spread_starts(n_rows: int, length: int, count: int) -> np.ndarray:
    """Start rows of `count` windows of `length` spread evenly over n_rows rows (fewer if they do not fit)."""
    if n_rows < length:
        raise ValueError(too_few_rows(length, n_rows))
    return evenly_spaced(n_rows - length + 1, count)


def check_window(n_rows: int, window: int, max_length: int, warmup: int = 0) -> Issue | None:
    """Too few rows (or a window the model cannot take) as an error naming the numbers, else None."""
    if not 1 <= window <= max_length:
        return Issue("error", f"window {window} is outside 1..{max_length} (the checkpoint's max_length).")
    if n_rows < window:
        return Issue("error", too_few_rows(window, n_rows, warmup))
    return None


def default_window(meta: Mapping[str, Any], max_length: int) -> int:
    """The window the checkpoint's metadata names (top level or in its config), else 64; at most max_length."""
    cfg = stored_config(meta)
    for value in (meta.get("window"), cfg.get("window"), cfg.get("window_size"), cfg.get("seq_len")):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 1:  # NaN fails >= 1
            return int(min(value, max_length))
    return min(DEFAULT_WINDOW, max_length)


# Bar interval


TRAINING_BAR_ASSUMED = pd.Timedelta(minutes=5)  # FLAG-TRADER's pipeline was written for 5-minute bars


def format_timedelta(td: pd.Timedelta) -> str:
    """A bar length in words: "5 min", "1 h", "2 days", "30 s"."""
    secs = td.total_seconds()
    for unit, size in (("day", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if secs >= size and secs % size == 0:
            n = int(secs // size)
            return f"{n} {unit}{'s' if unit == 'day' and n != 1 else ''}"
    return f"{secs:g} s"


@dataclass(frozen=True)
class BarInterval:
    """The spacing of a series of bars: the median step, and every step longer than 1.5 medians (a gap)."""

    median: pd.Timedelta | None  # None with fewer than 2 bars
    gaps: pd.DataFrame  # columns: after (time), next bar (time), gap (Timedelta), missing bars (int)
    n_bars: int

    @property
    def text(self) -> str:
        return "unknown" if self.median is None else format_timedelta(self.median)


def bar_interval(times: Sequence[Any] | np.ndarray | pd.DatetimeIndex) -> BarInterval:
    """Median spacing and the gaps of sorted bar times (n,)."""
    t = pd.DatetimeIndex(times).as_unit("ns")  # asi8 below is then nanoseconds whatever the input unit
    empty = pd.DataFrame(
        {
            "after": pd.DatetimeIndex([]),
            "next bar": pd.DatetimeIndex([]),
            "gap": pd.to_timedelta([]),
            "missing bars": np.zeros(0, dtype=np.int64),
        }
    )
    if len(t) < 2:
        return BarInterval(None, empty, len(t))
    step = np.diff(t.asi8)
    median = pd.Timedelta(int(np.median(step)), "ns")
    at = np.flatnonzero(step > 1.5 * median.value) if median.value > 0 else np.zeros(0, dtype=np.int64)
    gaps = pd.DataFrame(
        {
            "after": t[at],
            "next bar": t[at + 1],
            "gap": pd.to_timedelta(step[at], "ns"),
            "missing bars": (np.round(step[at] / max(median.value, 1)) - 1).astype(np.int64),
        }
    )
    return BarInterval(median, gaps if len(at) else empty, len(t))


def training_interval(meta: Mapping[str, Any]) -> tuple[pd.Timedelta, str]:
    """The bar interval the checkpoint was trained on and where that comes from: ``bar_interval`` stored at
    the top level or in its config (a pandas duration string like "5min", or seconds), else 5 minutes,
    assumed for FLAG-TRADER files (its pipeline was written for 5-minute bars)."""
    cfg = stored_config(meta)
    stored = meta.get("bar_interval", cfg.get("bar_interval"))
    try:
        if isinstance(stored, str):
            td = pd.Timedelta(stored)
        elif isinstance(stored, (int, float)) and not isinstance(stored, bool):
            td = pd.Timedelta(seconds=float(stored))
        else:
            td = None
    except (ValueError, OverflowError):
        td = None
    if td is not None and td > pd.Timedelta(0):
        return td, "stored in the checkpoint"
    return TRAINING_BAR_ASSUMED, "assumed: the checkpoint does not say; FLAG-TRADER was trained on 5-minute bars"


@dataclass(frozen=True)
class IntervalCheck:
    """The data's bar interval against the checkpoint's training interval."""

    data: BarInterval
    training: pd.Timedelta
    training_source: str
    matches: bool
    message: str


def check_interval(
    times: Sequence[Any] | np.ndarray | pd.DatetimeIndex, meta: Mapping[str, Any], horizon: int | None = None
) -> IntervalCheck:
    """Compare the data's median bar spacing with the training interval; the message says what differs
    (the label horizon in time when ``horizon`` bars is given)."""
    data = bar_interval(times)
    training, source = training_interval(meta)
    matches = data.median is None or data.median == training
    assumed = " (assumed)" if source.startswith("assumed") else ""
    gaps = f"; {len(data.gaps):,} gap(s) in the data" if len(data.gaps) else ""
    if data.median is None:
        message = (
            f"The bar interval of this data is unknown (fewer than 2 bars with a time); training used "
            f"{format_timedelta(training)} bars{assumed}."
        )
    elif matches:
        message = f"Bars every {data.text}, as in training ({format_timedelta(training)}{assumed}){gaps}."
    else:
        ratio = data.median / training
        message = (
            f"Bar interval differs from training: this data has a bar every **{data.text}** (median), the "
            f"checkpoint was trained on **{format_timedelta(training)}** bars ({source}). Every simple-60 "
            f"feature counts bars, so its returns, volatilities, SMAs and volume levels span {ratio:g}× the "
            "time they did in training, and the hour and weekday features meet other patterns"
        )
        if horizon:
            message += (
                f"; the label 'return over the next {horizon} bars' is {format_timedelta(horizon * data.median)} "
                f"here instead of {format_timedelta(horizon * training)}"
            )
        message += f"{gaps}. Predictions on such data are outside what the model was trained on."
    return IntervalCheck(data, training, source, matches, message)


def horizon_text(horizon: int, bar: pd.Timedelta | None) -> str:
    """The label horizon in bars and in time: "5 bars (25 min)"."""
    return f"{horizon} bars" + (f" ({format_timedelta(horizon * bar)})" if bar is not None else "")


# Feature matrices


def checkpoint_feature_set(meta: Mapping[str, Any]) -> str:
    """The feature set a checkpoint's metadata names, else simple-60 (the documented training set)."""
    name = meta.get("feature_set")
    return name if isinstance(name, str) and name in FEATURE_SETS else "simple-60"


def stored_numbers(meta: Mapping[str, Any], key: str) -> np.ndarray | None:
    """meta[key] as a float64 vector when it is a list of finite real numbers (a file may store anything there:
    strings, nested lists, NaN); else None."""
    value = meta.get(key)
    if not isinstance(value, list) or not value or len(value) > limits().max_columns:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return None
    arr = np.asarray(value, dtype=np.float64)
    return arr if np.isfinite(arr).all() else None


def stored_stats(meta: Mapping[str, Any], width: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(mean, std) stored in the checkpoint dict, if present, numeric, finite and of the right width."""
    mean, std = stored_numbers(meta, "feature_mean"), stored_numbers(meta, "feature_std")
    if mean is not None and std is not None and len(mean) == len(std) == width:
        return mean, np.where(std > 1e-12, std, 1.0)
    return None


def stored_clip(meta: Mapping[str, Any]) -> float | None:
    """The bound ±c the training clipped normalised features to ("feature_clip" in the checkpoint dict), if any."""
    clip = meta.get("feature_clip")
    if isinstance(clip, (int, float)) and not isinstance(clip, bool) and math.isfinite(clip) and clip > 0:
        return float(clip)
    return None


def _finish(
    vals: np.ndarray,
    names: tuple[str, ...],
    meta: Mapping[str, Any],
    state_dim: int,
    normalisation: str,
    stats: tuple[np.ndarray, np.ndarray] | None,
    warnings: list[str],
) -> tuple[np.ndarray, tuple[str, ...], str, np.ndarray, np.ndarray, int]:
    """Normalise (n, k) float64 features, then pad or cut to state_dim. Returns values, names, the
    normalisation applied, raw mean/std per output column, and the number of padded columns."""
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, not {normalisation!r}")
    raw_mean, raw_std = vals.mean(axis=0), vals.std(axis=0)
    if normalisation == "checkpoint":
        ck = stored_stats(meta, vals.shape[1])
        if ck is None:
            warnings.append(
                f"the checkpoint stores no feature statistics for {vals.shape[1]} features; features are used unscaled."
            )
            normalisation = "none"
        else:
            vals = (vals - ck[0]) / ck[1]
            clip = stored_clip(meta)
            if clip is not None:  # the training pipeline clipped its normalised features: do the same
                vals = vals.clip(-clip, clip)
    pad = 0
    if vals.shape[1] < state_dim:
        pad = state_dim - vals.shape[1]
        warnings.append(f"{pad} zero columns were appended to reach the model's {state_dim} inputs.")
        vals = np.hstack([vals, np.zeros((len(vals), pad))])
        names += tuple(f"pad_{i}" for i in range(pad))
        raw_mean, raw_std = np.r_[raw_mean, np.zeros(pad)], np.r_[raw_std, np.zeros(pad)]
    elif vals.shape[1] > state_dim:
        warnings.append(f"{vals.shape[1] - state_dim} feature columns were dropped to fit state_dim={state_dim}.")
        vals, names = vals[:, :state_dim], names[:state_dim]
        raw_mean, raw_std = raw_mean[:state_dim], raw_std[:state_dim]
    if normalisation == "data":  # after padding: zero columns stay zero
        mean, std = stats if stats is not None else (raw_mean, raw_std)
        vals = (vals - mean) / np.where(std > 1e-12, std, 1.0)
    return vals, names, normalisation, raw_mean, raw_std, pad


def checkpoint_features(
    ohlcv: pd.DataFrame,
    meta: Mapping[str, Any],
    state_dim: int,
    normalisation: str = "checkpoint",
    *,
    origin: pd.Timestamp | None = None,
    stats: tuple[np.ndarray, np.ndarray] | None = None,
) -> FeatureMatrix:
    """OHLCV bars -> the features a checkpoint expects, normalised as asked, padded/cut to state_dim.

    normalisation: "checkpoint" (stored mean/std, then clipped to ±"feature_clip" where the checkpoint stores
    one, as its training did; falls back to none with a warning), "none", or "data"
    (z-scores from this data, or from `stats` (mean, std) of the state_dim unnormalised columns when given,
    e.g. by a first streaming pass). Padding with
    zero columns is reported as a warning, never silent. `origin` fixes the time the "years" feature counts
    from (default: the first row), so chunks of one file get the same features as the whole file.
    """
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, not {normalisation!r}")
    fs = checkpoint_feature_set(meta)
    feats = compute_features(ohlcv, fs)
    if origin is not None and "years" in feats.columns:
        ts = pd.DatetimeIndex(ohlcv["datetime"]) if "datetime" in ohlcv else pd.DatetimeIndex(ohlcv.index)
        years = (ts - origin).total_seconds().to_numpy(dtype=np.float64) / (365.25 * 86400.0)
        feats["years"] = years[len(ts) - len(feats) :].astype(np.float32)  # same cast as the feature code
    warnings: list[str] = []
    vals, names, normalisation, raw_mean, raw_std, pad = _finish(
        feats.to_numpy(np.float64), tuple(feats.columns), meta, state_dim, normalisation, stats, warnings
    )
    pos = ohlcv.index.get_indexer(feats.index)
    times = (
        pd.DatetimeIndex(ohlcv["datetime"].to_numpy()[pos]) if "datetime" in ohlcv else pd.DatetimeIndex(feats.index)
    )
    return FeatureMatrix(
        values=np.ascontiguousarray(vals, dtype=np.float32),
        times=times,
        close=ohlcv["close"].to_numpy(np.float64)[pos],
        names=names,
        feature_set=fs,
        normalisation=normalisation,
        warnings=tuple(warnings),
        raw_mean=raw_mean,
        raw_std=raw_std,
        n_padded=pad,
    )


def column_features(
    frame: pd.DataFrame,
    columns: Sequence[str],
    meta: Mapping[str, Any],
    state_dim: int,
    normalisation: str = "none",
    stats: tuple[np.ndarray, np.ndarray] | None = None,
) -> FeatureMatrix:
    """Precomputed feature columns (a `prepare_features` frame) as they are, in the given order, normalised
    as asked and zero-padded to state_dim (with a warning)."""
    warnings: list[str] = []
    vals, names, normalisation, raw_mean, raw_std, pad = _finish(
        frame[list(columns)].to_numpy(np.float64),
        tuple(map(str, columns)),
        meta,
        state_dim,
        normalisation,
        stats,
        warnings,
    )
    close = frame[PRICE_COLUMN].to_numpy(np.float64) if PRICE_COLUMN in frame else np.full(len(frame), np.nan)
    return FeatureMatrix(
        values=np.ascontiguousarray(vals, dtype=np.float32),
        times=pd.DatetimeIndex(frame["datetime"]),
        close=close,
        names=names,
        feature_set="uploaded columns",
        normalisation=normalisation,
        warnings=tuple(warnings),
        raw_mean=raw_mean,
        raw_std=raw_std,
        n_padded=pad,
    )


@dataclass
class RunningMoments:
    """Per-column mean and population std over chunks (Chan et al.'s parallel update, stable in float64)."""

    n: int = 0
    mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    m2: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def update(self, values: np.ndarray) -> None:
        """values (m, k)."""
        m = len(values)
        if m == 0:
            return
        mean_b = values.mean(axis=0)
        m2_b = ((values - mean_b) ** 2).sum(axis=0)
        if self.n == 0:
            self.n, self.mean, self.m2 = m, mean_b, m2_b
            return
        n = self.n + m
        delta = mean_b - self.mean
        self.mean = self.mean + delta * m / n
        self.m2 = self.m2 + m2_b + delta**2 * self.n * m / n
        self.n = n

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        return self.mean, np.sqrt(self.m2 / max(self.n, 1))


# Drift against the checkpoint's stored statistics


def drift_table(fm: FeatureMatrix, meta: Mapping[str, Any]) -> pd.DataFrame:
    """Per model input: the input's mean/std (before normalisation) against the checkpoint's stored
    feature_mean/feature_std, the mean shift in stored sigmas, the std ratio, and flags (zero column,
    constant, scale jump, mean shift, name differs)."""
    n = fm.values.shape[1]
    mean = fm.raw_mean if fm.raw_mean is not None else fm.values.mean(axis=0)
    std = fm.raw_std if fm.raw_std is not None else fm.values.std(axis=0)
    s_mean, s_std = stored_numbers(meta, "feature_mean"), stored_numbers(meta, "feature_std")
    if s_mean is None or s_std is None or len(s_mean) != len(s_std):
        s_mean = s_std = np.array([])
    stored_names = meta.get("feature_names")
    s_names = stored_names if isinstance(stored_names, list) else []
    rows = []
    for i in range(n):
        st_m = float(s_mean[i]) if i < len(s_mean) else np.nan
        st_s = float(s_std[i]) if i < len(s_std) else np.nan
        flags = []
        if std[i] == 0:
            flags.append(
                "zero padding" if fm.names[i].startswith("pad_") else "zero column" if mean[i] == 0 else "constant"
            )
        shift = (mean[i] - st_m) / st_s if st_s and st_s > 1e-12 else np.nan
        ratio = std[i] / st_s if st_s and st_s > 1e-12 else np.nan
        if std[i] > 0 and np.isfinite(ratio) and (ratio > _SCALE_JUMP or ratio < 1 / _SCALE_JUMP):
            flags.append(f"scale ×{ratio:.3g}")
        if np.isfinite(shift) and abs(shift) > _SHIFT_SIGMAS:
            flags.append(f"mean shift {shift:+.1f}σ")
        stored_name = str(s_names[i]) if i < len(s_names) else ""
        if stored_name and stored_name != fm.names[i]:
            flags.append("name differs")
        rows.append(
            {
                "feature": fm.names[i],
                "stored name": stored_name,
                "input mean": float(mean[i]),
                "input std": float(std[i]),
                "stored mean": st_m,
                "stored std": st_s,
                "mean shift (σ)": float(shift),
                "std ratio": float(ratio),
                "flags": ", ".join(flags),
            }
        )
    return pd.DataFrame(rows)


# Windows


def rolling_windows(values: np.ndarray, length: int, stride: int = 1) -> np.ndarray:
    """(n, d) -> read-only view (n_windows, length, d); window i covers rows i*stride .. i*stride+length-1."""
    if length < 1:
        raise ValueError(f"window length must be at least 1, not {length}.")
    if length > len(values):
        raise ValueError(too_few_rows(length, len(values)))
    view = np.lib.stride_tricks.sliding_window_view(values, length, axis=0)  # (n-length+1, d, length)
    return view.transpose(0, 2, 1)[::stride]  # (n_windows, length, d)


__all__ = [
    "BarInterval",
    "ColumnMapping",
    "DataError",
    "FeatureMatrix",
    "IntervalCheck",
    "Issue",
    "Prepared",
    "RunningMoments",
    "WARMUP",
    "bar_interval",
    "check_interval",
    "check_window",
    "format_timedelta",
    "horizon_text",
    "training_interval",
    "checkpoint_features",
    "column_features",
    "csv_usecols",
    "default_window",
    "detect_columns",
    "drift_table",
    "feature_candidates",
    "iter_table_chunks",
    "parse_times",
    "prepare_features",
    "prepare_ohlcv",
    "read_table",
    "rolling_windows",
    "stored_clip",
    "stored_stats",
]
