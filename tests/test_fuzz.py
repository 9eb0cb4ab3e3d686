"""Fuzz the readers: hundreds of corruptions of a valid tiny checkpoint and of a market-data file, and
malicious pickles.

Every checkpoint corruption must end in `CheckpointError`, or load and then be refused by `build_model` with
`ConfigError` / `ModelMismatchError`, or load and run (a benign change, with a warning if its logits are not
finite). Every data corruption must end in `DataError` or in validation errors the page lists, or be accepted
with finite model inputs. Never another exception, a hang or a crash: the corruptions run in a child process
(this file run as a script) so that a segfault or a hang is caught and named instead of taking pytest down.
Run with `pytest -s` to see the outcome counts (torch's legacy format embeds storage addresses, so the counts
for flipped legacy bytes vary by a few between runs).
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import importlib
import io
import json
import math
import os
import pickle
import random
import struct
import subprocess
import sys
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
SEED = 7_2024
# Outcomes a corruption may end in; anything else (another exception, a hang, a crash) fails the test.
CKERR, BUILD, LOADED = "CheckpointError", "refused by build_model", "loaded"
CASE_LIMIT_S = 15.0  # one case slower than this counts as a hang


# ---- corruption builders (pure bytes -> bytes) ---------------------------------------------------------


def _rezip(
    data: bytes,
    order: Callable[[list[str]], list[str]] | None = None,
    drop: tuple[str, ...] = (),
    replace: dict[str, bytes] | None = None,
    extra: dict[str, bytes] | None = None,
) -> bytes:
    """Rewrite a torch zip with members reordered, dropped, replaced or added (stored, like torch writes)."""
    zin = zipfile.ZipFile(io.BytesIO(data))
    names = [i.filename for i in zin.infolist()]
    names = order(names) if order else names
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zout:
        for n in names:
            if n not in drop:
                zout.writestr(n, (replace or {}).get(n, zin.read(n)))
        for n, b in (extra or {}).items():
            zout.writestr(n, b)
    return buf.getvalue()


def _patch_zip_size(data: bytes, member: str, size: int, local: bool, central: bool) -> bytes:
    """Declare `size` bytes for `member` in the local and/or central zip headers (the data stays as is)."""
    d = bytearray(data)
    info = zipfile.ZipFile(io.BytesIO(data)).getinfo(member)
    if local:
        struct.pack_into("<II", d, info.header_offset + 18, size, size)
    if central:
        pos = 0
        while (pos := d.find(b"PK\x01\x02", pos)) >= 0:
            n = struct.unpack_from("<H", d, pos + 28)[0]
            if bytes(d[pos + 46 : pos + 46 + n]).decode() == member:
                struct.pack_into("<II", d, pos + 20, size, size)
                break
            pos += 4
    return bytes(d)


def _safetensors_with(
    data: bytes,
    edit: Callable[[dict], object] | None = None,
    length: int | None = None,
    raw_header: bytes | None = None,
) -> bytes:
    """A safetensors file with its JSON header edited, replaced, or its declared header length changed."""
    n = struct.unpack("<Q", data[:8])[0]
    header, body = json.loads(data[8 : 8 + n]), data[8 + n :]
    if edit is not None:
        edit(header)
    raw = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + body


def _splice_pickle(data: bytes, member: str | None, placeholder: str, opcodes: bytes) -> bytes:
    """Replace the pickled string `placeholder` with raw pickle opcodes (in a torch zip member or a legacy file)."""
    enc = placeholder.encode()
    needle = b"X" + struct.pack("<I", len(enc)) + enc
    if member is None:
        assert data.count(needle) == 1
        return data.replace(needle, opcodes)
    pkl = zipfile.ZipFile(io.BytesIO(data)).read(member)
    assert pkl.count(needle) == 1
    return _rezip(data, replace={member: pkl.replace(needle, opcodes)})


def _deep_list(n: int) -> bytes:
    """Opcodes for a list nested n deep: n EMPTY_LISTs, then n-1 APPENDs."""
    return b"]" * n + b"a" * (n - 1)


def _deep_dict(n: int) -> bytes:
    """Opcodes for {'a': {'a': ... 0}} nested n deep."""
    return (b"}X\x01\x00\x00\x00a") * n + b"K\x00" + b"s" * n


# ---- the corruptions -------------------------------------------------------------------------------------


def corruptions(seed: int = SEED) -> Iterator[tuple[str, str, bytes, tuple[str, ...]]]:
    """(category, case name, file bytes, allowed outcomes) for every corruption, deterministically."""
    import torch
    from conftest import make_model, save_bytes
    from safetensors.torch import save as st_save

    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    sd = {k: v.clone() for k, v in make_model(seed=3).state_dict().items()}
    keys = sorted(sd)
    meta = {"epoch": 3, "val_accuracy": 0.61, "config": {"num_heads": 4, "lora_alpha": 4, "lora_rank": 4}}
    good = save_bytes({"model_state_dict": sd, **meta})
    buf = io.BytesIO()
    torch.save({"model_state_dict": sd, **meta}, buf, _use_new_zipfile_serialization=False)
    legacy = buf.getvalue()
    safet = st_save(sd, metadata={"feature_set": "simple-60"})
    anything = (CKERR, BUILD, LOADED)

    def wrap(state: dict, **extra) -> bytes:
        return save_bytes({"model_state_dict": state, **meta, **extra})

    yield "valid (control)", "torch zip", good, (LOADED,)
    yield "valid (control)", "torch legacy", legacy, (LOADED,)
    yield "valid (control)", "safetensors", safet, (LOADED,)

    # Truncations at many offsets: always a CheckpointError (header, pickle, storages and directory are cut).
    for fmt, data, n in (("zip", good, 90), ("legacy", legacy, 40), ("safetensors", safet, 40)):
        offsets = {0, 1, 2, 4, 8, 9, 16, 30, 64, len(data) - 1, len(data) - 22, len(data) - 23}
        offsets |= set(rng.sample(range(1, len(data)), n))
        for off in sorted(o for o in offsets if 0 <= o < len(data)):
            yield f"truncated {fmt}", f"{fmt}[:{off}]", data[:off], (CKERR,)

    # Flipped bytes: anywhere, inside the pickle, inside the zip directory, in the safetensors header.
    zinfo = zipfile.ZipFile(io.BytesIO(good)).getinfo("archive/data.pkl")
    pkl_start = zinfo.header_offset + 30 + len(zinfo.filename)
    cd_start = good.find(b"PK\x01\x02")
    st_hlen = 8 + struct.unpack("<Q", safet[:8])[0]
    regions = (
        ("zip anywhere", good, 0, len(good), 50),
        ("zip pickle", good, pkl_start, zinfo.file_size, 70),
        ("zip directory", good, cd_start, len(good) - cd_start, 40),
        ("legacy", legacy, 0, len(legacy), 40),
        ("safetensors header", safet, 0, st_hlen, 40),
    )
    for what, data, start, span, n in regions:
        for i in range(n):
            d = bytearray(data)
            for _ in range(rng.randint(1, 6)):
                d[start + rng.randrange(span)] = rng.randrange(256)
            yield f"flipped bytes: {what}", f"{what} #{i}", bytes(d), anything

    # Zip members shuffled, removed, duplicated, replaced, renamed.
    names = [i.filename for i in zipfile.ZipFile(io.BytesIO(good)).infolist()]
    for i in range(6):
        yield "zip members shuffled", f"shuffle #{i}", _rezip(good, order=lambda ns: rng.sample(ns, len(ns))), anything
    storages = [n for n in names if "/data/" in n]
    for n in ["archive/data.pkl", *rng.sample(storages, 6)]:
        yield "zip member removed", f"without {n}", _rezip(good, drop=(n,)), (CKERR,)
    for n in names:  # torch has defaults for the small records (byteorder, versions, alignment)
        if "/data" not in n:
            yield "zip member removed", f"without {n}", _rezip(good, drop=(n,)), anything
    for n, junk in [
        ("archive/byteorder", b"big"),
        ("archive/byteorder", b"middle"),
        ("archive/data.pkl", b""),
        ("archive/data.pkl", b"\x80\x02}q\x00."),
        ("archive/data.pkl", b"not a pickle"),
        ("archive/.format_version", b"99"),
        (storages[0], b"\x00" * 3),
        (storages[1], b""),
    ]:
        yield "zip member replaced", f"{n} = {junk[:12]!r}", _rezip(good, replace={n: junk}), anything
    yield (
        "zip member added",
        "duplicate data.pkl",
        _rezip(good, extra={"archive/data.pkl": b"\x80\x02K\x01."}),
        anything,
    )
    yield "zip member added", "foreign member", _rezip(good, extra={"other/data.pkl": b"x"}), anything
    members = {n: zipfile.ZipFile(io.BytesIO(good)).read(n) for n in names}
    yield (
        "zip members renamed",
        "renamed folder",
        _rezip(good, drop=tuple(names), extra={n.replace("archive/", "renamed/"): b for n, b in members.items()}),
        anything,
    )
    yield (
        "zip members renamed",
        "no folder",
        _rezip(good, drop=tuple(names), extra={n.split("/", 1)[1]: b for n, b in members.items()}),
        anything,
    )

    # Huge declared sizes: zip headers, safetensors header length/offsets/shapes, stride-0 tensors.
    for member in ["archive/data.pkl", storages[0], "archive/byteorder"]:
        for size in (0, 2**31 - 1, 2**32 - 1):
            for local, central in ((True, False), (False, True), (True, True)):
                yield (
                    "huge declared size: zip header",
                    f"{member} size {size} local={local} central={central}",
                    _patch_zip_size(good, member, size, local, central),
                    anything,
                )
    first = sorted(json.loads(safet[8:st_hlen]).keys() - {"__metadata__"})[0]
    st_cases = {
        "header length 2**63": _safetensors_with(safet, length=2**63),
        "header length 99_999_999": _safetensors_with(safet, length=99_999_999),
        "header length file+1": _safetensors_with(safet, length=len(safet) + 1),
        "header length 1": _safetensors_with(safet, length=1),
        "offsets 2**62": _safetensors_with(safet, lambda h: h[first].update(data_offsets=[0, 2**62])),
        "offsets reversed": _safetensors_with(safet, lambda h: h[first].update(data_offsets=[8, 0])),
        "shape 2**31 x 2**31": _safetensors_with(safet, lambda h: h[first].update(shape=[2**31, 2**31])),
        "shape negative": _safetensors_with(safet, lambda h: h[first].update(shape=[-1])),
        "dtype C64": _safetensors_with(safet, lambda h: h[first].update(dtype="C64")),
        "dtype F8_E4M3": _safetensors_with(safet, lambda h: h[first].update(dtype="F8_E4M3")),
        "dtype unknown": _safetensors_with(safet, lambda h: h[first].update(dtype="Q4")),
        "dtype I64": _safetensors_with(safet, lambda h: h[first].update(dtype="I64")),
        "header not JSON": _safetensors_with(safet, raw_header=b"{not json" + b" " * 50),
        "header a list": _safetensors_with(safet, raw_header=b"[1, 2, 3]"),
        "header a string": _safetensors_with(safet, raw_header=b'{"a": "b"}'),
        "metadata not strings": _safetensors_with(safet, lambda h: h.update(__metadata__={"a": [1, 2]})),
        "entry missing offsets": _safetensors_with(safet, lambda h: h[first].pop("data_offsets")),
    }
    for name, data in st_cases.items():
        yield "huge declared size / bad header: safetensors", name, data, anything
    for k in rng.sample(keys, 4):
        big = dict(sd)
        big[k] = torch.randn(1, generator=gen).expand(100_000, 100_000)
        yield "huge declared size: stride-0 tensor", f"{k} [1e5, 1e5]", wrap(big), (CKERR,)
    big = dict(sd)
    big["state_embedding.weight"] = torch.randn(1, generator=gen).expand(60_000, 60)
    buf = io.BytesIO()
    torch.save({"model_state_dict": big}, buf, _use_new_zipfile_serialization=False)
    yield "huge declared size: stride-0 tensor", "legacy state_embedding [6e4, 60]", buf.getvalue(), (BUILD,)

    # Wrong shapes: every key as 0-d, 1-d, 3-d, transposed or one row longer.
    for k in keys:
        t = sd[k]
        variants = {
            "0-d": torch.tensor(0.5),
            "1-d": t.flatten()[:5].clone(),
            "3-d": t.reshape(1, 1, -1).clone(),
            "transposed": t.T.contiguous() if t.dim() == 2 else t.flip(0).clone(),
            "one more row": torch.cat([t, t[:1]]) if t.dim() >= 1 else t,
        }
        for vname in rng.sample(sorted(variants), 2):
            bad = dict(sd)
            bad[k] = variants[vname]
            yield "wrong shape", f"{k} {vname}", wrap(bad), anything

    # Wrong dtypes: integers and bools load (cast, with a warning); complex, float8, quantized are refused.
    for dtype, outcome in (
        (torch.int64, anything),
        (torch.int8, anything),
        (torch.bool, anything),
        (torch.float64, anything),
        (torch.float16, anything),
        (torch.bfloat16, anything),
        (torch.complex64, (CKERR,)),
        (torch.complex128, (CKERR,)),
        (torch.float8_e4m3fn, (CKERR,)),
        (torch.float8_e5m2, (CKERR,)),
        (torch.uint16, (CKERR,)),
    ):
        for k in rng.sample(keys, 3):
            bad = dict(sd)
            bad[k] = sd[k].to(dtype)
            yield "wrong dtype", f"{k} as {dtype}", wrap(bad), outcome
    for k in rng.sample(keys, 2):
        bad = dict(sd)
        bad[k] = torch.quantize_per_tensor(sd[k], 0.1, 0, torch.qint8)
        yield "wrong dtype", f"{k} quantized", wrap(bad), (CKERR,)
        bad = dict(sd)
        bad[k] = sd[k].to_sparse()
        yield "wrong layout", f"{k} sparse", wrap(bad), (CKERR,)
        bad = dict(sd)
        bad[k] = torch.empty(sd[k].shape, device="meta")
        yield "wrong layout", f"{k} on meta device", wrap(bad), (CKERR,)

    # Non-tensor values where tensors belong, odd top-level objects, odd stored configs.
    for k in rng.sample(keys, 8):
        for v in ("hello", [1, 2], None, {"x": 1}, 3):
            bad = dict(sd)
            bad[k] = v
            yield "non-tensor value", f"{k} = {v!r}", wrap(bad), (CKERR, BUILD)
    for name, obj in {
        "list": [sd],
        "tuple": (sd, 1),
        "int": 7,
        "string": "model",
        "None": None,
        "tensor": torch.randn(3, generator=gen),
        "empty dict": {},
        "int keys": {1: torch.randn(2)},
        "only optimizer": {"optimizer_state_dict": {"state": {}, "param_groups": []}},
    }.items():
        yield "non-tensor top level", name, save_bytes(obj), (CKERR, BUILD)
    for key in ("num_heads", "lora_alpha", "lora_rank", "norm_first", "causal", "d_model", "n_layers"):
        for v in ("abc", [1], None, {"a": 1}, -3, 0, 10**30, 10**400, float("nan"), float("inf"), True, b"\x00"):
            yield (
                "odd stored config",
                f"config[{key}] = {v!r:.20}",
                save_bytes({"model_state_dict": sd, "config": {key: v}}),
                (LOADED, BUILD),
            )
    for v in ("{not json", "[1, 2]", 5, [1, 2], None):
        yield "odd stored config", f"config = {v!r}", save_bytes({"model_state_dict": sd, "config": v}), (LOADED,)

    # Pickle-level bombs: deep nesting and shared sub-objects (exponential to walk naively).
    for n in (100, 5_000, 100_000):
        yield (
            "deep nesting",
            f"list {n} deep (zip)",
            _splice_pickle(
                save_bytes({"model_state_dict": sd, "history": "PLACEHOLDER"}),
                "archive/data.pkl",
                "PLACEHOLDER",
                _deep_list(n),
            ),
            (LOADED,),
        )
        yield (
            "deep nesting",
            f"dict {n} deep (zip)",
            _splice_pickle(
                save_bytes({"model_state_dict": sd, "history": "PLACEHOLDER"}),
                "archive/data.pkl",
                "PLACEHOLDER",
                _deep_dict(n),
            ),
            (LOADED,),
        )
    buf = io.BytesIO()
    torch.save({"model_state_dict": sd, "history": "PLACEHOLDER"}, buf, _use_new_zipfile_serialization=False)
    yield (
        "deep nesting",
        "list 100000 deep (legacy)",
        _splice_pickle(buf.getvalue(), None, "PLACEHOLDER", _deep_list(100_000)),
        (LOADED,),
    )
    yield (
        "deep nesting",
        "bare state dict beside a dict 100 deep",
        _splice_pickle(
            save_bytes({"w": torch.ones(2), "nest": "PLACEHOLDER"}), "archive/data.pkl", "PLACEHOLDER", _deep_dict(100)
        ),
        (CKERR,),
    )
    row = [0] * 1000
    yield "shared sub-objects", "list 1000^3", wrap(sd, history=[[row] * 1000] * 1000), (LOADED,)
    level = {str(i): 0 for i in range(300)}
    yield (
        "shared sub-objects",
        "dict 300^3",
        wrap(sd, history={str(i): {str(j): level for j in range(300)} for i in range(300)}),
        (LOADED,),
    )
    tensors = {str(i): sd["action_head.bias"] for i in range(200)}
    bomb = {str(i): {str(j): tensors for j in range(200)} for i in range(200)}
    yield "shared sub-objects", "8M tensor entries in nested dicts", save_bytes(bomb), (CKERR,)


# ---- data-file corruptions ------------------------------------------------------------------------------------

DATAERR, ISSUES, DATA_OK = "DataError", "validation errors listed", "accepted"


def data_corruptions(seed: int = SEED) -> Iterator[tuple[str, str, bytes, tuple[str, ...]]]:
    """(category, case name, file bytes with its name in the case name, allowed outcomes) for uploads."""
    import numpy as np
    import pandas as pd

    from flag_model.demo import synthetic_ohlcv

    rng = random.Random(seed)
    df = synthetic_ohlcv(300, seed=1)
    good = df.to_csv(index=False).encode()
    text = good.decode()
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    parquet = buf.getvalue()
    anything = (DATAERR, ISSUES, DATA_OK)

    yield "valid (control)", "ohlcv.csv", good, (DATA_OK,)
    yield "valid (control)", "ohlcv.parquet", parquet, (DATA_OK,)
    for name, data in {
        "0 bytes": b"",
        "whitespace": b"  \n\n  \n",
        "header only": good.split(b"\n")[0] + b"\n",
        "header and one row": b"\n".join(good.split(b"\n")[:2]),
        "one newline": b"\n",
        "BOM only": b"\xef\xbb\xbf",
        "NUL bytes": b"\x00" * 100,
    }.items():
        yield "empty file", f"{name}.csv", data, (DATAERR, ISSUES)
    yield "empty file", "0 bytes.parquet", b"", (DATAERR,)
    yield "empty file", "no rows.parquet", _parquet(df.iloc[:0]), (DATAERR, ISSUES)

    for sep in (";", "\t", "|", " "):
        yield "wrong delimiter", f"sep {sep!r}.csv", df.to_csv(index=False, sep=sep).encode(), anything
    yield "wrong delimiter", "decimal comma ;.csv", df.to_csv(index=False, sep=";", decimal=",").encode(), anything
    yield "wrong delimiter", "decimal comma ,.csv", df.to_csv(index=False, decimal=",").encode(), anything
    for enc in ("utf-16", "utf-16-le", "utf-32", "utf-8-sig", "cp1252", "latin-1"):
        renamed = df.rename(columns={"close": "clôture", "volume": "volumen€"})
        yield "encoding", f"{enc}.csv", renamed.to_csv(index=False).encode(enc, errors="replace"), anything
    yield "encoding", "invalid utf-8 in cells.csv", good.replace(b"2025-01-06 00:1", b"2025-01-06 \xff\xfe:1"), anything
    yield "encoding", "invalid utf-8 in header.csv", good.replace(b"close", b"cl\xe9\xff"), anything

    cols = list(df.columns)
    junk = [
        "abc",
        "",
        "NaN",
        "inf",
        "-inf",
        "1e400",
        "--",
        "1,234.5",
        "$100",
        " 12 ",
        "0x1F",
        "None",
        "TRUE",
        "12abc",
        "٣٤",
        "1e-400",
        "-0",
        "nan%",
        "NULL",
        '"quoted"',
    ]
    for i in range(60):
        lines = text.split("\n")
        for _ in range(rng.randint(1, 5)):
            r, c = rng.randrange(1, len(lines) - 1), rng.randrange(len(cols))
            cells = lines[r].split(",")
            cells[c] = rng.choice(junk)
            lines[r] = ",".join(cells)
        yield "text in numeric/time columns", f"junk cells #{i}.csv", "\n".join(lines).encode(), anything
    for col in ("open", "close", "volume", "datetime", "timestamp"):
        bad = df.astype({col: str})
        bad.loc[bad.index[::7], col] = "n/a"
        yield "text in numeric/time columns", f"every 7th {col} text.parquet", _parquet(bad), anything
        yield (
            "text in numeric/time columns",
            f"{col} all text.csv",
            df.assign(**{col: "x"}).to_csv(index=False).encode(),
            anything,
        )

    odd_values = {
        "negative prices": df.assign(close=-df["close"]),
        "zero prices": df.assign(open=0.0),
        "huge values": df.assign(volume=1e308),
        "inf values": df.assign(high=np.inf),
        "all NaN close": df.assign(close=np.nan),
        "high < low": df.assign(high=df["low"] - 1),
        "reversed rows": df.iloc[::-1],
        "duplicated rows": pd.concat([df, df]),
        "shuffled rows": df.sample(frac=1, random_state=seed),
        "one row": df.iloc[:1],
        "fewer rows than the warm-up": df.iloc[:40],
        "no time column": df.drop(columns=["datetime", "timestamp"]),
        "no close column": df.drop(columns=["close"]),
        "only close": df[["datetime", "close"]],
        "duplicate column names": df.rename(columns={"open": "close"}),
        "times year 1500": df.assign(datetime="1500-01-01 00:00:00"),
        "times year 3000": df.assign(datetime=[f"30{i % 100:02d}-01-01" for i in range(len(df))]),
        "times bogus dates": df.assign(datetime="2025-13-45 25:61:00"),
        "epoch seconds": df.assign(datetime=df["timestamp"] // 1000).drop(columns=["timestamp"]),
        "epoch huge": df.assign(datetime=1e25).drop(columns=["timestamp"]),
        "mixed time zones": df.assign(
            datetime=[f"2025-01-06T00:{i % 60:02d}:00{'+02:00' if i % 2 else 'Z'}" for i in range(len(df))]
        ),
        "100 extra columns": pd.concat(
            [df, pd.DataFrame(np.ones((len(df), 100)), columns=[f"f{i}" for i in range(100)])], axis=1
        ),
        "200 feature columns": pd.DataFrame(
            np.random.default_rng(0).normal(size=(300, 200)), columns=[f"x{i}" for i in range(200)]
        ).assign(time=df["datetime"]),
    }
    refused = {
        "negative prices",
        "zero prices",
        "all NaN close",
        "one row",
        "fewer rows than the warm-up",
        "times year 1500",
        "times year 3000",
        "times bogus dates",
        "reversed rows",
        "duplicated rows",
    }
    for name, frame in odd_values.items():
        allowed = (ISSUES,) if name in refused else anything
        yield "odd values", f"{name}.csv", frame.to_csv(index=False).encode(), allowed
        if name != "duplicate column names":  # Parquet cannot hold those
            yield "odd values", f"{name}.parquet", _parquet(frame), allowed

    lines = good.split(b"\n")
    structure = {
        "no header": b"\n".join(lines[1:]),
        "ragged rows": good.replace(b"\n2025-01-06 00:1", b",9,9,9\n2025-01-06 00:1"),
        "unterminated quote": good.replace(b"\n2025-01-06 00:2", b'\n"2025-01-06 00:2', 1),
        "quoted newlines": good.replace(b"open", b'"op\nen"'),
        "blank lines": good.replace(b"\n", b"\n\n"),
        "CRLF": good.replace(b"\n", b"\r\n"),
        "CR only": good.replace(b"\n", b"\r"),
        "very long line": lines[0] + b"\n" + b"1," * 20_000 + b"\n" + b"\n".join(lines[1:]),
        "NUL in cells": good.replace(b"2025-01-06 00:05", b"2025-01-06\x0000:05"),
        "header repeated mid-file": b"\n".join(lines[:100] + [lines[0]] + lines[100:]),
        "comment lines": b"# exported by a tool\n# second comment\n" + good,
        "excel sep= line": b"sep=,\n" + good,
        "JSON instead": df.head(5).to_json().encode(),
        "HTML instead": b"<html><body>404</body></html>",
        "a PNG": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
        "a zip": _rezip_bytes(good),
        "gzip bytes": gzip.compress(good),
        "random bytes": random.Random(seed).randbytes(5000),
    }
    for name, data in structure.items():
        yield "file structure", f"{name}.csv", data, anything
    yield "file structure", "CSV named .parquet", good, (DATAERR,)
    yield "file structure", "Parquet named .csv", parquet, anything

    for fmt, data, n in (("csv", good, 40), ("parquet", parquet, 40)):
        for off in sorted(set(rng.sample(range(1, len(data)), n)) | {1, 4, len(data) - 1, len(data) - 8}):
            yield f"truncated {fmt}", f"[:{off}].{fmt}", data[:off], anything
        for i in range(40):
            d = bytearray(data)
            for _ in range(rng.randint(1, 6)):
                d[rng.randrange(len(d))] = rng.randrange(256)
            yield f"flipped bytes {fmt}", f"#{i}.{fmt}", bytes(d), anything


def _parquet(frame) -> bytes:
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    return buf.getvalue()


def _rezip_bytes(data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("data.csv", data)
    return buf.getvalue()


def classify_data(data: bytes, name: str, path: Path | None) -> tuple[str, str]:
    """Run an upload through what the Predictions page does: read, detect columns, validate (strict and
    repairing, through the page's own cached `prepare`), features for 60 inputs, window check.
    -> (outcome, detail)."""
    import hashlib

    import numpy as np

    from flag_model.data import (
        DataError,
        check_window,
        checkpoint_features,
        column_features,
        detect_columns,
        feature_candidates,
        read_table,
        rolling_windows,
    )
    from flag_model.features import WARMUP
    from flag_model.ui.predictions import KINDS, prepare

    try:
        df = read_table(path if path is not None else data, name)
    except DataError as exc:
        return DATAERR, str(exc)
    except BaseException as exc:  # noqa: BLE001
        return f"unexpected {type(exc).__name__} in read_table", str(exc)[:300]
    outcome, detail = DATA_OK, ""
    try:
        mapping = detect_columns(df.columns)
        ohlcv = not mapping.missing()
        columns = () if ohlcv else tuple(feature_candidates(df, mapping)[:60])
        key = hashlib.sha256(data).hexdigest()
        for repair in (False, True):
            prep = prepare(
                key, KINDS[0] if ohlcv else KINDS[1], mapping, columns, None if ohlcv else mapping.close, repair, 60, df
            )
            if not prep.ok:
                messages = [i.message for i in prep.errors]
                if not messages or min(map(len, messages)) < 20:
                    return "unexpected: refused without a message", repr(prep.issues)[:300]
                outcome, detail = (ISSUES, messages[0]) if outcome == DATA_OK else (outcome, detail)
                continue
            fm = (
                checkpoint_features(prep.frame, {}, 60, "data")
                if ohlcv
                else column_features(prep.frame, list(prep.feature_columns), {}, 60, "data")
            )
            issue = check_window(len(fm.values), 16, 32, WARMUP if ohlcv else 0)
            if issue is None:
                windows = rolling_windows(fm.values, 16)
                if windows.shape[1:] != (16, 60) or not np.isfinite(windows).all():
                    return "unexpected: non-finite model input", f"{windows.shape} finite={np.isfinite(windows).all()}"
    except BaseException as exc:  # noqa: BLE001
        return f"unexpected {type(exc).__name__}", str(exc)[:300]
    return outcome, detail


# ---- running one case --------------------------------------------------------------------------------------


def classify(data: bytes, name: str, path: Path | None) -> tuple[str, str]:
    """-> (outcome, detail). Outcome is one of CKERR / BUILD / LOADED, or 'unexpected <type>'."""
    import torch

    from flag_model import CheckpointError, ConfigError, ModelMismatchError, build_model, load_checkpoint

    try:
        ckpt = load_checkpoint(path if path is not None else data, name=name)
    except CheckpointError as exc:
        return CKERR, str(exc)
    except BaseException as exc:  # noqa: BLE001 - the point: report anything else
        return f"unexpected {type(exc).__name__}", str(exc)[:300]
    try:
        model = build_model(ckpt)
    except (ConfigError, ModelMismatchError) as exc:
        return BUILD, str(exc)
    except BaseException as exc:  # noqa: BLE001
        return f"unexpected {type(exc).__name__} in build_model", str(exc)[:300]
    try:
        with torch.no_grad():
            logits = model(torch.ones(1, min(4, model.config.max_length), model.config.state_dim))
    except BaseException as exc:  # noqa: BLE001
        return f"unexpected {type(exc).__name__} in forward", str(exc)[:300]
    warned = "; ".join(ckpt.warnings)
    if not torch.isfinite(logits).all() and "NaN" not in warned:
        return "unexpected silent NaN/Inf logits", warned  # a corrupt file must not look healthy
    if not math.isfinite(model.config.lora_scale):
        return "unexpected non-finite LoRA scale", str(model.config.lora_scale)
    return LOADED, warned


def worker(kind: str, tmp: Path) -> None:
    """Run every corruption of `kind` ("checkpoint" or "data") from bytes, and every third also from a file
    path (checkpoints by path are memory-mapped), printing one JSON line per load; 'start' lines let the
    parent name a case that hung or crashed."""
    import resource
    import warnings

    warnings.simplefilter("ignore")
    # A memory bomb becomes a visible MemoryError instead of taking the machine down.
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
    sys.path[:0] = [str(REPO), str(TESTS)]
    cases, run = (corruptions, classify) if kind == "checkpoint" else (data_corruptions, classify_data)
    # What the classifiers import on first use is imported before any case's clock starts: the time limit is about
    # the cases, not the interpreter's start (in a fresh venv installed without byte-compiling, the first import
    # of torch also compiles it).
    for module in ("torch", "flag_model", "flag_model.model", "flag_model.layouts.diff", "safetensors.torch") + (
        ("pyarrow.parquet", "flag_model.data", "flag_model.features", "flag_model.ui.predictions")
        if kind == "data"
        else ()
    ):
        importlib.import_module(module)
    for i, (cat, name, data, allowed) in enumerate(cases()):
        suffix = Path(name).suffix if kind == "data" and Path(name).suffix in (".csv", ".parquet") else ".pt"
        sources = [None] + ([tmp / f"case_{i}{suffix}"] if i % 3 == 0 else [])
        for path in sources:
            if path is not None:
                path.write_bytes(data)
            via = "path" if path else "bytes"
            print(json.dumps({"start": f"{cat} | {name} | {via}"}), flush=True)
            t0 = time.perf_counter()
            outcome, detail = run(data, name, path)
            print(
                json.dumps(
                    {
                        "cat": cat,
                        "case": name,
                        "via": via,
                        "outcome": outcome,
                        "allowed": allowed,
                        "detail": detail[:300],
                        "s": round(time.perf_counter() - t0, 3),
                    }
                ),
                flush=True,
            )
            if path is not None:
                path.unlink()


def _fuzz(kind: str, tmp_path: Path) -> list[dict]:
    """Run the worker for `kind` in a child process; fail on a crash or hang; -> one row per load."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = None
    try:
        proc = subprocess.run(
            [sys.executable, __file__, kind, str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
            cwd=REPO,
        )
        out, rc = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out, rc = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or ""), "timeout"
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    started = [r["start"] for r in rows if "start" in r]
    done = [r for r in rows if "outcome" in r]
    assert rc == 0 and len(done) == len(started), (
        f"the {kind} fuzz worker ended with {rc} during: {started[-1] if started else 'startup'}\n"
        f"{proc.stderr[-3000:] if proc is not None else ''}"
    )
    return done


def _report(kind: str, done: list[dict], names: dict[str, str]) -> list[dict]:
    """Print the outcome counts (pytest -s); -> the rows whose outcome was not allowed."""
    bad = [r for r in done if r["outcome"] not in r["allowed"]]
    slow = [r for r in done if r["s"] > CASE_LIMIT_S]
    counts = Counter(r["outcome"] for r in done)
    cases = {(r["cat"], r["case"]) for r in done}
    print(
        f"\n{kind} fuzz: {len(cases)} corruptions, {len(done)} loads ({sum(r['via'] == 'path' for r in done)} "
        f"from a path): "
        + ", ".join(f"{counts[k]} {v}" for k, v in names.items())
        + f", {len(bad)} unexpected, {len(slow)} slower than {CASE_LIMIT_S:.0f} s, 0 crashes"
    )
    for (cat, outcome), n in sorted(Counter((r["cat"], r["outcome"]) for r in done).items()):
        print(f"  {cat:45s} {outcome:25s} {n}")
    assert len(cases) >= 250
    assert not slow, [(r["case"], r["s"]) for r in slow]
    return bad


def test_checkpoint_fuzz(tmp_path: Path) -> None:
    done = _fuzz("checkpoint", tmp_path)
    bad = _report("checkpoint", done, {CKERR: CKERR, BUILD: BUILD, LOADED: "loaded (benign)"})
    assert not bad, "\n".join(f"{r['cat']} | {r['case']} | {r['via']}: {r['outcome']}: {r['detail']}" for r in bad[:20])
    messages = [r["detail"] for r in done if r["outcome"] == CKERR]
    assert all(len(m) > 30 for m in messages), "every refusal says why"


def test_data_fuzz(tmp_path: Path) -> None:
    done = _fuzz("data", tmp_path)
    bad = _report("data", done, {DATAERR: DATAERR, ISSUES: ISSUES, DATA_OK: "accepted"})
    assert not bad, "\n".join(f"{r['cat']} | {r['case']} | {r['via']}: {r['outcome']}: {r['detail']}" for r in bad[:20])
    assert all(len(r["detail"]) > 20 for r in done if r["outcome"] == DATAERR), "every refusal says why"


# ---- malicious pickles ----------------------------------------------------------------------------------


def _payloads(marker: Path) -> dict[str, tuple[str, bytes]]:
    """name -> (the global it needs, pickle bytes whose loading with plain pickle creates `marker`)."""
    import builtins

    class Reduce:
        def __init__(self, fn, *args):
            self.fn, self.args = fn, args

        def __reduce__(self):
            return self.fn, self.args

    py = f"open({str(marker)!r}, 'w').close()"
    touch = f"touch {marker}"
    getattr_chain = b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(Vos\ntRVsystem\ntR(V" + touch.encode() + b"\ntR."
    return {
        "os.system (protocol 2)": ("posix.system", pickle.dumps(Reduce(os.system, touch), protocol=2)),
        "os.system (protocol 4)": ("posix.system", pickle.dumps(Reduce(os.system, touch), protocol=4)),
        "eval": ("builtins.eval", pickle.dumps(Reduce(builtins.eval, py), protocol=2)),
        "exec": ("builtins.exec", pickle.dumps(Reduce(builtins.exec, py), protocol=3)),
        "subprocess.check_call": (
            "subprocess.check_call",
            pickle.dumps(Reduce(subprocess.check_call, ["touch", str(marker)]), protocol=2),
        ),
        "builtins.getattr chain": ("builtins.getattr", getattr_chain),
        "__builtin__.eval (py2 name)": ("builtins.eval", b"c__builtin__\neval\n(V" + py.encode() + b"\ntR."),
        "payload inside the state dict": (
            "posix.system",
            pickle.dumps({"model_state_dict": {"w": Reduce(os.system, touch)}, "epoch": 1}, protocol=2),
        ),
    }


def _containers(payload: bytes) -> dict[str, bytes]:
    """The payload as raw pickle bytes, as data.pkl of a torch zip, and after a legacy-format preamble."""
    import torch

    buf = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buf)
    zipped = _rezip(buf.getvalue(), replace={"archive/data.pkl": payload})
    preamble = b"".join(pickle.dumps(x, protocol=2) for x in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001}))
    return {"raw pickle": payload, "torch zip": zipped, "legacy": preamble + payload}


def test_malicious_payloads_are_live(tmp_path: Path) -> None:
    """Control: plain pickle really runs each payload (so the refusal test below can fail)."""
    for name, (_, payload) in _payloads(tmp_path / "marker").items():
        marker = tmp_path / "marker"
        pickle.loads(payload)  # noqa: S301 - deliberately, on our own harmless payload
        assert marker.exists(), name
        marker.unlink()


@pytest.mark.parametrize("container", ["raw pickle", "torch zip", "legacy"])
def test_malicious_pickles_are_refused(tmp_path: Path, container: str) -> None:
    from flag_model import CheckpointError, load_checkpoint

    marker = tmp_path / "marker"
    for name, (needs, payload) in _payloads(marker).items():
        data = _containers(payload)[container]
        file = tmp_path / "evil.pt"
        file.write_bytes(data)
        for src in (data, file):
            with pytest.raises(CheckpointError) as err:
                load_checkpoint(src, name="evil.pt")
            assert needs in str(err.value), (name, str(err.value))
            assert "nothing in the file was executed" in str(err.value)
            assert not marker.exists(), f"{name} ({container}) ran"


if __name__ == "__main__":
    worker(sys.argv[1], Path(sys.argv[2]))


# ---- odd but readable checkpoints through the app ---------------------------------------------------------


def _odd_checkpoints() -> dict[str, bytes]:
    """Files that load (or are refused only by the model) but are unusual in a way pages must cope with."""
    import torch
    from conftest import make_model, save_bytes

    sd = make_model(seed=5).state_dict()
    cfg = {"num_heads": 4, "lora_alpha": 4, "lora_rank": 4}

    def with_(**changes):
        return save_bytes({"model_state_dict": {**sd, **changes}, "config": cfg})

    return {
        "float16": save_bytes({"model_state_dict": {k: v.half() for k, v in sd.items()}, "config": cfg}),
        "bfloat16": save_bytes({"model_state_dict": {k: v.bfloat16() for k, v in sd.items()}, "config": cfg}),
        "integer head": with_(**{"action_head.weight": (sd["action_head.weight"] * 10).to(torch.int64)}),
        "NaN weights": with_(
            **{"transformer_blocks.0.ffn.0.base.weight": sd["transformer_blocks.0.ffn.0.base.weight"] * float("nan")}
        ),
        "1e30 weights": with_(**{"state_embedding.weight": sd["state_embedding.weight"] * 1e30}),
        "dead LoRA (B = 0)": save_bytes(
            {"model_state_dict": {k: (v * 0 if k.endswith("lora_B") else v) for k, v in sd.items()}, "config": cfg}
        ),
        "no LoRA": save_bytes({k: v for k, v in sd.items() if ".lora." not in k}),
        "odd metadata": save_bytes(
            {
                "model_state_dict": sd,
                "config": cfg,
                "history": [[list(range(2000))] * 50] * 50,
                "blob": b"\x00\xff",
                "c": 1 + 2j,
                "s": {1, 2},
                "n": None,
                "t": torch.ones(3, 3),
            }
        ),
        "bad stored config": save_bytes({"model_state_dict": sd, "config": {"num_heads": "eight", "lora_alpha": -3}}),
        "another layout": save_bytes({f"encoder.{k}": v for k, v in sd.items()}),
    }


@pytest.mark.parametrize("name", list(_odd_checkpoints()))
def test_odd_checkpoints_through_every_page(tiny_demo_path, name):
    """Uploaded through the sidebar, each odd file gives every page a clear message or its figures, never an
    exception box."""
    from browser_util import app_pages
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=180).run()
    at.sidebar.radio(key="ckpt_source").set_value("Upload").run()
    at.sidebar.file_uploader(key="ckpt_upload").upload(
        f"{name}.pt", _odd_checkpoints()[name], "application/octet-stream"
    ).run()
    assert at.session_state["_flag_loaded"].ckpt is not None, [e.value for e in at.sidebar.error]
    for page in app_pages():
        at.switch_page(page.file).run()
        assert not at.exception, (page.file, [e.message for e in at.exception])
        assert at.session_state["_flag_loaded"].ckpt.source == f"{name}.pt"
        # Figures, or a message saying why not (a model page for a file that does not fit, LoRA without LoRA).
        main = at.main
        assert main.get("plotly_chart") or main.error or main.info or main.warning, f"{page.file} shows nothing"


def test_a_stored_head_count_is_never_replaced_silently(tiny_demo_path):
    """d=256 with 128 heads stored: the sidebar must offer 128 (any divisor of d is a valid head count)."""
    from conftest import make_model, save_bytes
    from streamlit.testing.v1 import AppTest

    data = save_bytes(
        {"model_state_dict": make_model(d=256, f=32, n_blocks=1, heads=8).state_dict(), "config": {"num_heads": 128}}
    )
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=180).run()
    at.sidebar.radio(key="ckpt_source").set_value("Upload").run()
    at.sidebar.file_uploader(key="ckpt_upload").upload("heads128.pt", data, "application/octet-stream").run()
    assert not at.exception
    heads = next(s for s in at.sidebar.selectbox if "heads" in s.label.lower())
    assert heads.value == 128 and at.session_state["_flag_loaded"].config.num_heads == 128


ODD_PATHS = ["~no_such_user_xyz/model.pt", "a\x00b.pt", "x" * 5000, "/dev/zero", "/proc", "  ", "/" * 300]


def test_odd_server_paths_give_a_readable_error(tiny_demo_path, tmp_path):
    """The sidebar's 'Server path' and the Predictions page's path field: odd paths (an unknown ~user, a NUL
    byte, a name too long, a device, a folder) end in a message, never an exception box."""
    from browser_util import app_pages
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=180).run()
    at.sidebar.radio(key="ckpt_source").set_value("Server path").run()
    for p in ODD_PATHS:
        at.sidebar.text_input(key="ckpt_path").input(p).run()
        assert not at.exception, (repr(p[:40]), [e.message for e in at.exception])
    predictions = next((pg.file for pg in app_pages() if pg.file.endswith("predictions.py")), None)
    if predictions is None:
        return
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=180)
    at.switch_page(predictions).run()
    for p in [*ODD_PATHS, str(tmp_path)]:
        at.text_input(key="pred_path").input(p).run()
        assert not at.exception, (repr(p[:40]), [e.message for e in at.exception])


# ---- the restricted reader (safe_pickle) on its own --------------------------------------------------------


class _MarkingDict(collections.OrderedDict):
    """An OrderedDict subclass whose methods would create a marker file if they ever ran."""

    marker = ""

    def __setitem__(self, key, value):
        open(self.marker, "w").close()
        super().__setitem__(key, value)

    def __setstate__(self, state):
        open(self.marker, "w").close()


try:
    import torch as _torch

    class _MarkingParameter(_torch.nn.Parameter):
        """A Parameter subclass whose __setstate__ would create a marker file if it ever ran."""

        marker = ""

        def __setstate__(self, state):
            open(self.marker, "w").close()

        def __reduce_ex__(self, proto):  # the way torch pickles a Parameter subclass that carries state
            return (
                _torch._tensor._rebuild_from_type_v2,
                (
                    _torch._utils._rebuild_parameter,
                    type(self),
                    (self.data, False, collections.OrderedDict()),
                    {"flag": 1},
                ),
            )
except ImportError:  # the worker subprocess imports this file too
    pass


@dataclasses.dataclass
class _Config:
    hidden_dim: int = 8
    n_heads: int = 2


@pytest.mark.parametrize("container", ["raw pickle", "torch zip", "legacy"])
def test_restricted_reader_refuses_every_malicious_global_itself(tmp_path: Path, container: str) -> None:
    """Bypassing the opcode scan: the reader's own find_class refuses each payload and nothing runs."""
    import zipfile

    from flag_model.safe_pickle import RestrictedPickleError, classify_global, restricted_load

    marker = tmp_path / "marker"
    for name, (_needs, payload) in _payloads(marker).items():
        data = _containers(payload)[container]
        with pytest.raises(RestrictedPickleError) as err:
            if container == "torch zip":
                with zipfile.ZipFile(io.BytesIO(data)) as zf:
                    restricted_load("torch zip", zf=zf)
            else:
                restricted_load("torch legacy", raw=data)
        assert classify_global(*err.value.refused.rsplit(".", 1)) == "refused", (name, err.value.refused)
        assert not marker.exists(), f"{name} ({container}) ran"


def test_foreign_classes_are_inert_records_and_their_methods_never_run(tmp_path: Path) -> None:
    import argparse

    import numpy as np
    import torch

    from flag_model import load_checkpoint

    marker = tmp_path / "marker"
    _MarkingDict.marker = str(marker)
    odict = _MarkingDict()
    dict.__setitem__(odict, "a", torch.ones(2))
    _MarkingParameter.marker = str(marker)
    param = _MarkingParameter(torch.arange(3.0))
    obj = {
        "model_state_dict": {"w": torch.ones(2, 3), "p": param},
        "extra": odict,
        "config": _Config(),
        "args": argparse.Namespace(lr=0.1, steps=np.int64(7)),
        "acc": np.float32(0.5),
    }
    for legacy in (False, True):
        buf = io.BytesIO()
        torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
        assert not marker.exists()
        ckpt = load_checkpoint(buf.getvalue(), name="foreign.pt")
        assert not marker.exists(), "a method of a class named in the file ran"
        assert ckpt.read_mode == "restricted"
        assert type(ckpt.state_dict["p"]) is torch.Tensor and ckpt.state_dict["p"].tolist() == [0.0, 1.0, 2.0]
        assert ckpt.meta["config"] == {"__class__": f"{__name__}._Config", "hidden_dim": 8, "n_heads": 2}
        assert ckpt.meta["args"]["steps"] == 7 and ckpt.meta["acc"] == 0.5
        assert ckpt.foreign_objects["extra"].endswith("_MarkingDict")
        assert ckpt.stored_config["n_heads"] == 2
        assert any("nothing from the file was called" in w for w in ckpt.warnings)


def test_restricted_reader_refuses_a_pickled_torch_module_and_bad_storage(tmp_path: Path) -> None:
    import torch

    from flag_model import CheckpointError, load_checkpoint

    buf = io.BytesIO()
    torch.save({"config": _Config(), "m": torch.nn.Linear(2, 2)}, buf)
    with pytest.raises(CheckpointError, match=r"torch\.nn\.modules\.linear\.Linear"):
        load_checkpoint(buf.getvalue())
    buf = io.BytesIO()
    torch.save({"config": _Config(), "w": torch.ones(4)}, buf)
    damaged = _rezip(buf.getvalue(), replace={"archive/data/0": b"\x00" * 3})  # 3 bytes for 4 floats
    with pytest.raises(CheckpointError, match="restricted"):
        load_checkpoint(damaged)
