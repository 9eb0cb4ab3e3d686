"""Key diff: file keys against target keys, and one aligned row per key of either side."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from .keys import Shape, natural_key, shapes_of


@dataclass(frozen=True)
class KeyDiff:
    """File keys against target keys. `mismatched` holds (key, file shape, target shape)."""

    matched: tuple[str, ...]
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    mismatched: tuple[tuple[str, Shape, Shape], ...]
    n_file: int
    n_target: int

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def counts(self) -> dict[str, int]:
        return {
            "matched": len(self.matched),
            "missing": len(self.missing),
            "unexpected": len(self.unexpected),
            "mis-shaped": len(self.mismatched),
        }

    def summary(self) -> str:
        c = self.counts()
        return (
            f"{c['matched']}/{self.n_target} target keys matched; {c['missing']} missing, "
            f"{c['unexpected']} unexpected, {c['mis-shaped']} mis-shaped"
        )


def diff_keys(file: Mapping[str, Any], target: Mapping[str, Any]) -> KeyDiff:
    """Compare keys and shapes (tensors or shapes on either side)."""
    fs, ts = shapes_of(file), shapes_of(target)
    both = [k for k in ts if k in fs]
    return KeyDiff(
        matched=tuple(k for k in both if fs[k] == ts[k]),
        missing=tuple(k for k in ts if k not in fs),
        unexpected=tuple(k for k in fs if k not in ts),
        mismatched=tuple((k, fs[k], ts[k]) for k in both if fs[k] != ts[k]),
        n_file=len(fs),
        n_target=len(ts),
    )


def diff_table(file: Mapping[str, Any], target: Mapping[str, Any]) -> pd.DataFrame:
    """One aligned row per key of either side: key, status, file_shape, target_shape (shapes as text)."""
    fs, ts = shapes_of(file), shapes_of(target)
    rows = []
    for k in sorted(set(fs) | set(ts), key=natural_key):
        a, b = fs.get(k), ts.get(k)
        status = "missing" if a is None else "unexpected" if b is None else "matched" if a == b else "mis-shaped"
        rows.append(
            {
                "key": k,
                "status": status,
                "file_shape": "" if a is None else str(list(a)),
                "target_shape": "" if b is None else str(list(b)),
            }
        )
    return pd.DataFrame(rows, columns=["key", "status", "file_shape", "target_shape"])


__all__ = ["KeyDiff", "diff_keys", "diff_table"]
