"""Tables leaving the app: CSV and Parquet bytes that a spreadsheet cannot turn into a formula.

A cell such as `=HYPERLINK(...)`, `+cmd|...`, `@SUM(...)` or `-2+3+cmd...` is run by Excel or LibreOffice
when a downloaded CSV is opened. Text cells (and column names) that start with one of those characters are
prefixed with a quote, the OWASP recommendation; numbers are left as numbers, so a negative value stays -1.5.
"""

from __future__ import annotations

import csv
import io

import pandas as pd

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
TABLE_FORMATS = ("csv", "parquet")


def defuse(value: object) -> object:
    """`value` with a leading quote if it is text a spreadsheet would read as a formula; anything else as is."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def safe_frame(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of `df` whose text cells and column names cannot start a spreadsheet formula."""
    out = df.copy()
    out.columns = [defuse(str(c)) if not isinstance(c, str) else defuse(c) for c in out.columns]
    for col in out.columns:
        s = out[col]
        if s.dtype == object or pd.api.types.is_string_dtype(s) or isinstance(s.dtype, pd.CategoricalDtype):
            out[col] = s.astype(object).map(defuse)
    return out


def table_bytes(df: pd.DataFrame, fmt: str = "csv") -> bytes:
    """`df` as formula-safe CSV (UTF-8, no index) or Parquet bytes."""
    if fmt not in TABLE_FORMATS:
        raise ValueError(f"unknown table format {fmt!r}; choose one of {', '.join(TABLE_FORMATS)}")
    safe = safe_frame(df)
    if fmt == "csv":
        # Quoting every text cell keeps a CR or newline inside a cell from splitting the row.
        return safe.to_csv(index=False, quoting=csv.QUOTE_NONNUMERIC).encode()
    buf = io.BytesIO()
    safe.to_parquet(buf, index=False)
    return buf.getvalue()
