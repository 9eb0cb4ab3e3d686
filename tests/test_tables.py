"""Downloads are formula-safe: text that a spreadsheet would run is quoted, numbers stay numbers."""

import io

import pandas as pd
import pytest

from flag_model.tables import table_bytes

EVIL = [
    '=HYPERLINK("http://x","y")',
    "+cmd|' /C calc'!A0",
    "@SUM(1+1)*cmd|' /C calc'!A0",
    "-2+3+cmd|' /C calc'!A0",
    "\tx",
    "\rx",
]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_formula_cells_and_names_are_quoted(fmt):
    df = pd.DataFrame({"text": EVIL, "=name": range(len(EVIL)), "num": [-1.5, 2.0, -3.0, 0.0, 1.0, -2.0]})
    data = table_bytes(df, fmt)
    back = pd.read_csv(io.BytesIO(data)) if fmt == "csv" else pd.read_parquet(io.BytesIO(data))
    assert all(str(v).startswith("'") for v in back["text"]), list(back["text"])
    assert [v[1:] for v in back["text"]][:4] == EVIL[:4]
    assert "'=name" in back.columns
    assert list(back["num"]) == [-1.5, 2.0, -3.0, 0.0, 1.0, -2.0]  # numbers are not text: never quoted


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="unknown table format"):
        table_bytes(pd.DataFrame({"a": [1]}), "xlsx")
