"""The resource policy: every bound on what a file may make the tool allocate, in one place.

The defaults keep a shared 2-core, 24 GB team server alive while still opening the largest known checkpoint
(d=768: 88 M parameters, 336 MB) and half a year of 5-minute bars. Each bound can be changed with an
environment variable `FLAG_TRADER_<FIELD>` (e.g. `FLAG_TRADER_MAX_PARAMS=500000000`), read when `limits()`
is called, so a server operator sets them once before `streamlit run`.

Checks happen before the allocation they protect: shapes are compared with the file before a model is built,
the safetensors header and the zip directory are read before any tensor, the CSV header line and the Parquet
footer before any row.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch


@dataclass(frozen=True)
class Limits:
    """Upper bounds applied while reading checkpoints and market data."""

    max_params: int = 300_000_000  # values in all tensors of a checkpoint (1.2 GB as float32)
    max_tensors: int = 20_000  # tensors in a checkpoint (the known layout has 343)
    max_decompressed_bytes: int = 4 << 30  # bytes a zip archive's members inflate to, in all
    max_inflation: float = 4.0  # a zip member may inflate to at most this × the file's size (+ 1 MiB)
    max_header_bytes: int = 16 << 20  # a safetensors JSON header, a CSV header line
    max_view_bytes: int = 2 << 30  # values declared by overlapping (e.g. stride-0) tensors beyond their data
    max_columns: int = 5_000  # columns of a market-data table
    max_rows: int = 2_000_000  # rows of a market-data table read at once (about 19 years of 5-minute bars;
    #                            60 float64 features of that many rows are 0.96 GB; the CLI streams larger files)
    max_cells: int = 50_000_000  # rows × columns of a market-data table read at once (0.4 GB as float64)
    stats_chunk: int = 1 << 22  # values per chunk when statistics are computed over a tensor


def limits() -> Limits:
    """The policy in force: the defaults, each overridden by `FLAG_TRADER_<FIELD>` when that is set."""
    values: dict[str, Any] = {}  # int or float, each converted to its field's type below
    for f in fields(Limits):
        raw = os.environ.get(f"FLAG_TRADER_{f.name.upper()}")
        if raw is None or not raw.strip():
            continue
        try:
            value = float(raw) if f.type in ("float", float) else int(float(raw))
        except ValueError:
            raise ValueError(f"FLAG_TRADER_{f.name.upper()}={raw!r} is not a number") from None
        if not value > 0:
            raise ValueError(f"FLAG_TRADER_{f.name.upper()} must be positive, not {raw!r}")
        values[f.name] = value
    return Limits(**values)


def too_big(what: str, value: int | float, limit_name: str) -> str:
    """The sentence for a refused size: what, how much, the limit and how to raise it."""
    limit = getattr(limits(), limit_name)
    return (
        f"{what}: {value:,}, above this server's limit of {limit:,} ({limit_name}); refused before "
        f"allocating memory. If the file is genuine, the server operator can raise "
        f"FLAG_TRADER_{limit_name.upper()}."
    )


def pieces(t: torch.Tensor, step: int | None = None) -> Iterator[torch.Tensor]:
    """Views of `t` of at most `step` values (limits().stats_chunk) that together cover it once, split along the
    leading dimensions. Statistics over them never materialise a full-size temporary, so a large or stride-0
    tensor costs at most one chunk of memory."""
    step = step or limits().stats_chunk
    if t.dim() == 0 or t.numel() <= step:
        yield t
        return
    row = t.numel() // t.shape[0]
    if row > step:
        for r in t:
            yield from pieces(r, step)
    else:
        k = step // row
        for i in range(0, t.shape[0], k):
            yield t[i : i + k]


def abs_max(t: torch.Tensor) -> float:
    """max |t| (NaN if any value is NaN), chunk by chunk."""
    out = 0.0
    for part in pieces(t):
        m = float(part.float().abs().amax()) if part.numel() else 0.0
        if not m <= out:  # NaN wins, like amax over the whole tensor
            out = m
    return out
