"""Read any supported checkpoint file safely into a `Checkpoint`.

Files are read with `torch.load(..., weights_only=True)` (memory-mapped when opened by path). A pickle that
also holds foreign objects (a dataclass config, argparse Namespace, numpy scalars) is then read by the restricted
reader of `safe_pickle`: tensors and plain values only, foreign objects as inert records, nothing from the file
called. A pickle that names what only an attack needs (os.system, eval, ...) is refused, naming it.
A PEFT `save_pretrained` folder (or its adapter_config.json / adapter_model.*) is read with its adapter config.
"""

from __future__ import annotations

import _compat_pickle
import hashlib
import io
import json
import math
import os
import pickle
import pickletools
import re
import struct
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .config import ConfigError, ModelConfig, infer_config
from .limits import abs_max, limits, too_big
from .safe_pickle import RestrictedPickleError, classify_global, restricted_load

# Wrapper keys under which training scripts saved the model, most specific first.
STATE_DICT_KEYS = ("model_state_dict", "state_dict", "model", "module", "net", "weights")
CONFIG_KEYS = ("config", "model_config", "hparams", "args")
# Entries that hold tensors but are not model weights.
_TRAINING_STATE = re.compile(r"^(optimizer|optim|scheduler|lr_scheduler|scaler)", re.I)
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
# Wrappers that training code adds around module names (DataParallel, a `model.` attribute, torch.compile).
KNOWN_PREFIXES: tuple[str, ...] = ("module.", "model.", "_orig_mod.")
# Files of a PEFT save_pretrained folder, weights first choice first.
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_CONFIG = "adapter_config.json"
# adapter_config.json fields shown to the user.
ADAPTER_FIELDS = (
    "r",
    "lora_alpha",
    "use_rslora",
    "target_modules",
    "base_model_name_or_path",
    "lora_dropout",
    "peft_type",
    "task_type",
    "layers_to_transform",
    "modules_to_save",
    "use_dora",
    "rank_pattern",
    "alpha_pattern",
    "peft_version",
)


def strip_prefixes(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Remove wrapper prefixes shared by *every* key, repeatedly; return the new dict and what was removed."""
    sd, removed = dict(state_dict), []
    while sd:
        prefix = next((p for p in KNOWN_PREFIXES if all(k.startswith(p) for k in sd)), None)
        if prefix is None:
            break
        sd = {k[len(prefix) :]: v for k, v in sd.items()}
        removed.append(prefix)
    return sd, tuple(removed)


_HALF = (torch.float16, torch.bfloat16)


class CheckpointError(ValueError):
    """A file that cannot be read as a checkpoint; the message says why and what to do."""


@dataclass
class Checkpoint:
    """A checkpoint's weights, with everything else the file held kept as metadata."""

    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any]
    source: str
    format: str  # "torch zip", "torch legacy" or "safetensors"
    wrapper_keys: tuple[str, ...]  # top-level keys of the saved dict; () for a bare state dict
    state_dict_key: str | None  # the wrapper key holding the weights
    prefixes_stripped: tuple[str, ...]
    digest: str  # sha256 of the file's bytes
    size_bytes: int
    stored_config: dict[str, Any] | None
    warnings: list[str] = field(default_factory=list)
    config: ModelConfig | None = None
    config_error: str | None = None
    # "weights_only" (torch's safe loader) or "restricted" (safe_pickle: foreign objects became inert records)
    read_mode: str = "weights_only"
    foreign_objects: dict[str, str] = field(default_factory=dict)  # where in the saved object -> module.Class
    adapter_config: dict[str, Any] | None = None  # a PEFT folder's adapter_config.json (ADAPTER_FIELDS)

    def require_config(self) -> ModelConfig:
        """The inferred config, or ConfigError saying why this file has none."""
        if self.config is None:
            raise ConfigError(self.config_error or "no configuration could be inferred")
        return self.config

    @property
    def n_tensors(self) -> int:
        return len(self.state_dict)

    @property
    def n_params(self) -> int:
        return sum(t.numel() for t in self.state_dict.values())


def _read_source(
    src: str | os.PathLike | bytes | bytearray | memoryview | BinaryIO,
) -> tuple[str, Path | None, bytes | None]:
    """-> (display name, path or None, bytes or None)."""
    if isinstance(src, (str, os.PathLike)):
        try:
            path = Path(src).expanduser()
            path.stat()
        except (OSError, RuntimeError, ValueError) as exc:  # missing, unknown ~user, name too long, NUL byte
            raise CheckpointError(
                f"{src}: cannot open this path ({exc}). Check the path (it is read on the machine running the tool)."
            ) from None
        if not path.exists():
            raise CheckpointError(f"{path}: no such file. Check the path (it is read on the machine running the tool).")
        if path.is_dir() or path.name == PEFT_CONFIG:
            folder = path if path.is_dir() else path.parent
            # the folder itself, or the `lora/` save_pretrained folder the PEFT FLAGTrader class writes beside heads.pt
            weights = next((f / n for f in (folder, folder / "lora") for n in PEFT_WEIGHTS if (f / n).is_file()), None)
            if weights is None:
                raise CheckpointError(
                    f"{path} is a folder; give the checkpoint file inside it (.pt, .pth, .bin or "
                    f".safetensors), or a PEFT save_pretrained folder with {' or '.join(PEFT_WEIGHTS)}."
                )
            return str(weights), weights, None
        return str(path), path, None
    if isinstance(src, (bytes, bytearray, memoryview)):
        return "uploaded bytes", None, bytes(src)
    if hasattr(src, "read"):
        if hasattr(src, "seek"):
            src.seek(0)
        return str(getattr(src, "name", "uploaded file")), None, src.read()
    raise CheckpointError(f"cannot read a checkpoint from a {type(src).__name__}; give a path, bytes or a file object.")


# A file to read is a path on disk or bytes in memory: exactly one of (path, data) is given (see _read_source).


def _stream(path: Path | None, data: bytes | None) -> BinaryIO:
    """The file opened for reading, or the bytes as a stream."""
    if path is not None:
        return path.open("rb")
    if data is None:
        raise ValueError("neither a path nor bytes to read")
    return io.BytesIO(data)


def _size(path: Path | None, data: bytes | None) -> int:
    return path.stat().st_size if path is not None else len(_head(path, data))


def _head(path: Path | None, data: bytes | None, limit: int | None = None) -> bytes:
    """The first `limit` bytes (all when None)."""
    if data is not None:
        return data if limit is None else data[:limit]
    with _stream(path, data) as f:
        return f.read() if limit is None else f.read(limit)


def _digest(path: Path | None, data: bytes | None) -> str:
    h = hashlib.sha256()
    with _stream(path, data) as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _sniff(head: bytes) -> str:
    """Container format from the first bytes."""
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "torch zip"
    if len(head) >= 9:
        n = struct.unpack("<Q", head[:8])[0]
        if 2 <= n < 100_000_000 and head[8:9] == b"{":
            return "safetensors"
    if head[:1] == b"\x80" and len(head) >= 2 and 2 <= head[1] <= 5:
        return "torch legacy"
    return "unknown"


def _describe_unknown(name: str, head: bytes) -> str:
    text = head.lstrip()
    try:
        sample = text[:200].decode("utf-8")
        printable = sum(c.isprintable() or c in "\r\n\t" for c in sample) >= 0.95 * max(len(sample), 1)
    except UnicodeDecodeError:
        printable = False
    # Never quote the file's content: on a shared server the file may be someone else's.
    if printable and sample:
        kind = "JSON" if sample[:1] in "{[" else "text"
        return (
            f"{name} is a {kind} file, not a checkpoint. "
            "Open the .pt/.pth/.bin/.safetensors file the training script saved."
        )
    return (
        f"{name} is not a PyTorch or safetensors checkpoint (its first bytes are no known format). "
        "The file may be corrupt or of another kind; re-export it with torch.save or safetensors."
    )


def _whole_pickle(raw: bytes) -> bool:
    """True when `raw` parses as complete pickles up to its end (opcodes only, nothing runs). A text file whose
    lines happen to read as a GLOBAL opcode does not, so its content is never quoted as a class name."""
    f = io.BytesIO(raw)
    try:
        while f.tell() < len(raw):
            for _ in pickletools.genops(f):
                pass
    except Exception:  # noqa: BLE001 - any parse failure means "not a pickle"
        return False
    return True


def _pickle_globals(raw: bytes) -> list[str]:
    """`module.name` of every global the pickle(s) in `raw` import, in Python 3 spelling.

    Only parses opcodes (pickletools), never executes; a damaged tail ends the scan.
    """
    found: list[str] = []
    f = io.BytesIO(raw)
    try:
        while f.tell() < len(raw):  # a legacy file is several pickles in a row
            strings: list[str] = []
            for op, arg, _ in pickletools.genops(f):
                if op.name in ("GLOBAL", "INST"):
                    found.append(str(arg).replace(" ", "."))  # "module name"
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # noqa: BLE001 - raw storage bytes or damage after the pickles: keep what was read
        pass
    out = []
    for g in found:
        mod, _, attr = g.partition(".")
        mod, attr = _compat_pickle.NAME_MAPPING.get((mod, attr), (_compat_pickle.IMPORT_MAPPING.get(mod, mod), attr))
        if f"{mod}.{attr}" not in out:
            out.append(f"{mod}.{attr}")
    return out


def _refused_globals(fmt: str, path: Path | None, data: bytes | None, limit: int = 1 << 26) -> list[str]:
    """Globals in the file's pickle that the restricted reader refuses (os.system, eval, a pickled torch module...);
    found by parsing opcodes only."""
    try:
        if fmt == "torch zip":
            with _stream(path, data) as f, zipfile.ZipFile(f) as zf:
                raw = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
        else:
            raw = _head(path, data, limit)
    except Exception:  # noqa: BLE001 - no readable pickle: fall back to torch's own message
        return []
    return [g for g in _pickle_globals(raw) if classify_global(*g.rsplit(".", 1)) == "refused"]


def _check_zip(name: str, path: Path | None, data: bytes | None, size: int) -> None:
    """Refuse a torch zip whose members would inflate far beyond the file (a zip bomb) or beyond the limit,
    from the zip directory alone. torch writes members uncompressed, so a genuine file inflates to its own size."""
    lim = limits()
    try:
        with _stream(path, data) as f, zipfile.ZipFile(f) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return  # torch.load reports the damage in its own words
    if len(infos) > lim.max_tensors + 16:
        raise CheckpointError(f"{name}: " + too_big("the number of zip members", len(infos), "max_tensors"))
    total = 0
    for info in infos:
        total += info.file_size
        if info.file_size > lim.max_inflation * size + (1 << 20):
            raise CheckpointError(
                f"{name}: a zip member would inflate to {info.file_size:,} bytes from a {size:,}-byte file (more "
                f"than {lim.max_inflation:g}× the file; max_inflation). torch saves members uncompressed, so this is "
                "not a checkpoint torch wrote; it was refused before inflating."
            )
    if total > lim.max_decompressed_bytes:
        raise CheckpointError(
            f"{name}: " + too_big("the bytes the zip members inflate to", total, "max_decompressed_bytes")
        )


def _torch_load(name: str, fmt: str, path: Path | None, data: bytes | None) -> tuple[Any, dict[str, str] | None]:
    """-> (saved object, None) from torch's safe loader, or (object, {path: class}) from the restricted reader."""
    if fmt == "torch zip":
        _check_zip(name, path, data, _size(path, data))
    try:
        if path is not None:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=(fmt == "torch zip")), None
        return torch.load(_stream(path, data), map_location="cpu", weights_only=True), None
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        refused = _refused_globals(fmt, path, data)
        if refused:
            return _refuse(name, ", ".join(refused[:5]))
        if "GLOBAL" in msg or "Unsupported global" in msg or "Unsupported class" in msg:
            return _restricted(name, fmt, path, data)
        detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", msg)
        why = _brief(detail.group(1) if detail else msg.splitlines()[0])
        raise CheckpointError(
            f"{name}: the safe loader refused this pickle ({why}). "
            "It holds something other than tensors and plain values; it was not executed. "
            "Re-save only the state dict (torch.save(model.state_dict(), path)) from trusted code."
        ) from None
    except Exception as exc:  # noqa: BLE001 - whatever a damaged archive makes torch raise is a damaged file
        first = _brief(str(exc).splitlines()[0]) if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"{name}: the {fmt} archive is damaged or truncated ({first}). "
            "Copy the file again (check its size against the original) or re-save it."
        ) from None


def _brief(text: str, limit: int = 200) -> str:
    """A library's error message cut to whole sentences within `limit` characters (never mid-sentence);
    a first sentence longer than that is cut at a word and marked with '…'."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text.rstrip(".")
    sentences = re.split(r"(?<=[.!?])\s+", text)
    out = sentences[0]
    for sentence in sentences[1:]:
        if len(out) + 1 + len(sentence) > limit:
            break
        out += " " + sentence
    if len(out) > limit:
        out = out[:limit].rsplit(" ", 1)[0].rstrip(",;:") + "…"
    return out.rstrip(".")  # it is quoted in parentheses inside a sentence


def _restricted(name: str, fmt: str, path: Path | None, data: bytes | None) -> tuple[Any, dict[str, str]]:
    """The restricted reader (safe_pickle) for pickles holding foreign objects; nothing from the file is called."""
    try:
        if fmt == "torch zip":
            with _stream(path, data) as f, zipfile.ZipFile(f) as zf:
                res = restricted_load(fmt, zf=zf)
        else:
            res = restricted_load(fmt, raw=_head(path, data))
    except RestrictedPickleError as exc:
        if exc.malformed:
            raise CheckpointError(
                f"{name}: the file could not be read even in restricted mode ({exc.refused}: "
                f"{exc.why}); it may be damaged. Copy it again or re-save the state dict."
            ) from None
        return _refuse(name, exc.refused)
    except Exception as exc:  # noqa: BLE001 - a damaged pickle or archive, whatever the unpickler raised
        first = _brief(str(exc).splitlines()[0]) if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"{name}: the file could not be read even in restricted mode ({first}); it may be "
            "damaged. Re-save the state dict (torch.save(model.state_dict(), path))."
        ) from None
    return res.obj, res.foreign


def _refuse(name: str, what: str) -> Any:
    raise CheckpointError(
        f"{name} needs the Python object '{what}' to load, which the safe loader (weights_only=True) refuses; "
        "nothing in the file was executed. If you trust its origin, re-save only the state dict "
        "(torch.save(model.state_dict(), path)) from the training code."
    )


_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _check_safetensors_header(name: str, header: bytes, size: int) -> None:
    """Refuse, from the JSON header alone, files whose tensors would be too many, too large, of an unknown dtype or
    outside the file: before safetensors allocates anything."""
    lim = limits()
    try:
        entries = json.loads(header)
    except ValueError:
        raise CheckpointError(
            f"{name}: the safetensors header is not valid JSON; the file is damaged. Copy or export it again."
        ) from None
    if not isinstance(entries, dict):
        raise CheckpointError(f"{name}: the safetensors header is not a JSON object; the file is damaged.")
    tensors = {k: v for k, v in entries.items() if k != "__metadata__"}
    if len(tensors) > lim.max_tensors:
        raise CheckpointError(f"{name}: " + too_big("the number of tensors", len(tensors), "max_tensors"))
    total = 0
    for e in tensors.values():
        shape, offsets = (e.get("shape"), e.get("data_offsets")) if isinstance(e, dict) else (None, None)
        if not (
            isinstance(shape, list)
            and all(type(d) is int and 0 <= d for d in shape)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= size
        ):
            raise CheckpointError(
                f"{name}: the safetensors header entry for a tensor has an invalid shape or offsets "
                "(negative, not integers, or beyond the end of the file); the file is damaged."
            )
        numel = math.prod(shape)
        total += numel
        if total > lim.max_params:
            raise CheckpointError(f"{name}: " + too_big("the values the header declares", total, "max_params"))
        if e.get("dtype") in _ST_ITEMSIZE and numel * _ST_ITEMSIZE[e["dtype"]] != offsets[1] - offsets[0]:
            raise CheckpointError(
                f"{name}: a tensor's shape in the safetensors header does not match the bytes "
                "stored for it; the file is damaged. Copy or export it again."
            )


def _safetensors_load(
    name: str, path: Path | None, data: bytes | None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors.torch import load, load_file

    size = _size(path, data)
    with _stream(path, data) as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = f.read(min(n, limits().max_header_bytes))
    if n > limits().max_header_bytes:
        raise CheckpointError(f"{name}: " + too_big("the safetensors header length", n, "max_header_bytes"))
    if n > size - 8:
        raise CheckpointError(
            f"{name}: the safetensors header is longer than the file; the file is damaged or "
            "truncated. Copy or export it again."
        )
    _check_safetensors_header(name, header, size - 8 - n)
    try:
        tensors = load(data) if data is not None else load_file(str(path))
        metadata = json.loads(header).get("__metadata__") or {}
    except Exception as exc:  # noqa: BLE001 - SafetensorError, bad JSON, a header that is not an object...
        raise CheckpointError(
            f"{name}: the safetensors file is damaged or truncated ({_brief(str(exc))}). Copy or export it again."
        ) from None
    if not isinstance(metadata, dict):
        metadata = {}
    return tensors, metadata


_MAX_DEPTH = 32  # nesting of dicts/lists read from a file
_MAX_ENTRIES = 1_000_000  # dict entries walked per file; shared sub-dicts are counted each time


def _flatten(
    obj: Mapping[str, Any], prefix: str = "", _budget: list[int] | None = None, _depth: int = 0
) -> dict[str, torch.Tensor]:
    """Nested dicts of tensors -> one dotted-key dict (e.g. CGDT's top-level `dt` / `critic` dicts)."""
    budget = [_MAX_ENTRIES] if _budget is None else _budget
    if _depth > _MAX_DEPTH:
        raise CheckpointError(
            f"dicts nested more than {_MAX_DEPTH} levels deep (at '{prefix[:80]}…'); this is not a model checkpoint."
        )
    out: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        budget[0] -= 1
        if budget[0] < 0:
            raise CheckpointError(f"more than {_MAX_ENTRIES:,} nested dict entries; this is not a model checkpoint.")
        if isinstance(v, torch.Tensor):
            out[prefix + str(k)] = v
        elif isinstance(v, Mapping) and not _TRAINING_STATE.match(str(k)):
            out.update(_flatten(v, f"{prefix}{k}.", budget, _depth + 1))
    return out


def _plain(v: Any, _budget: list[int] | None = None, _depth: int = 0) -> Any:
    """Metadata value for display: small tensors as numbers, big ones described; deep or huge values cut."""
    budget = [10_000] if _budget is None else _budget
    budget[0] -= 1
    if budget[0] < 0 or _depth > _MAX_DEPTH:
        return "… (cut: too large or too deeply nested to show)"
    if isinstance(v, torch.Tensor):
        if v.numel() == 1 and v.layout == torch.strided and v.device.type == "cpu" and not v.is_quantized:
            return v.item()
        return f"tensor {list(v.shape)} {str(v.dtype).removeprefix('torch.')}"
    if isinstance(v, Mapping):
        return {str(k): _plain(x, budget, _depth + 1) for k, x in v.items()}
    if isinstance(v, (list, tuple)) and len(v) <= 1000:
        return [_plain(x, budget, _depth + 1) for x in v]
    return v


def _unwrap(obj: Any, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], tuple[str, ...], str | None]:
    """Saved object -> (state dict, metadata, wrapper keys, state-dict key)."""
    if isinstance(obj, torch.nn.Module):  # only reachable if a future torch allow-lists modules
        return dict(obj.state_dict()), {}, (), None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{name} holds a {type(obj).__name__}, not a dict of tensors; save a state dict instead.")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {str(k): v for k, v in obj.items()}, {}, (), None
    keys = tuple(str(k) for k in obj)
    sd_key = next((k for k in STATE_DICT_KEYS if isinstance(obj.get(k), Mapping) and _flatten(obj[k])), None)
    meta: dict[str, Any] = {}
    if sd_key is not None:
        sd = _flatten(obj[sd_key])
        rest = {k: v for k, v in obj.items() if k != sd_key}
    else:
        sd = _flatten(obj)
        rest = {
            k: v
            for k, v in obj.items()
            if not isinstance(v, torch.Tensor)
            and not (isinstance(v, Mapping) and _flatten(v) and not _TRAINING_STATE.match(str(k)))
        }
    for k, v in rest.items():
        if _TRAINING_STATE.match(str(k)):
            groups = len(v.get("param_groups", [])) if isinstance(v, Mapping) else 0
            meta[k] = f"present ({groups} parameter groups; not loaded)" if groups else "present (not loaded)"
        else:
            meta[str(k)] = _plain(v)
    return sd, meta, keys, sd_key


_DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
)


def _check_tensors(sd: Mapping[str, torch.Tensor], name: str) -> None:
    """Refuse tensors the analysis cannot hold: exotic dtypes/layouts, and views declaring far more values than
    the file stores (a stride-0 view can declare a 100000 x 100000 weight backed by one number; small ones,
    as in tests that mimic a large file, are allowed)."""
    lim = limits()
    if len(sd) > lim.max_tensors:
        raise CheckpointError(f"{name}: " + too_big("the number of tensors", len(sd), "max_tensors"))
    view_bytes = params = 0
    for k, t in sd.items():
        if t.layout != torch.strided or t.device.type != "cpu" or t.is_quantized or t.dtype not in _DTYPES:
            kind = str(t.dtype).removeprefix("torch.") if t.layout == torch.strided else str(t.layout)
            raise CheckpointError(
                f"{name}: tensor '{k}' is {kind} on {t.device.type}; weights must be dense real tensors "
                "(float32/64, float16, bfloat16; integers and bools are read too). Re-save it as float32."
            )
        params += t.numel()
        if params > lim.max_params:
            raise CheckpointError(f"{name}: " + too_big("the values in its tensors", params, "max_params"))
        declared, stored = t.numel() * t.element_size(), t.untyped_storage().nbytes()
        view_bytes += declared if declared > stored else 0
        if view_bytes > lim.max_view_bytes:
            raise CheckpointError(
                f"{name}: tensor '{k}' declares shape {list(t.shape)} ({t.numel():,} values) but the file holds "
                f"only {stored:,} bytes for it (overlapping strides), over {lim.max_view_bytes:,} bytes of such "
                "views in all (max_view_bytes). Re-save it with .contiguous() (torch.save(model.state_dict(), path))."
            )


def _stored_config(meta: Mapping[str, Any]) -> dict[str, Any] | None:
    for k in CONFIG_KEYS:
        v = meta.get(k)
        if isinstance(v, Mapping):
            return dict(v)
        if isinstance(v, str) and v.strip().startswith("{"):
            try:
                return dict(json.loads(v))
            except ValueError:
                continue
    return None


@dataclass(frozen=True)
class NonFinite:
    """The NaN/Inf scan of a state dict: the tensors holding any, and the counts over those tensors."""

    keys: tuple[str, ...]
    nan: int
    inf: int
    elements: int  # all elements of those tensors


def nonfinite_scan(sd: Mapping[str, torch.Tensor], amax: Mapping[str, float] | None = None) -> NonFinite:
    """The one NaN/Inf scan (chunked max |t| first, so only damaged tensors are counted); `amax`: abs_max per key
    when the caller has it already."""
    if amax is None:
        amax = {k: abs_max(t) for k, t in sd.items() if t.numel() and t.dtype != torch.bool}
    suspect = (k for k, v in amax.items() if not math.isfinite(v) and sd[k].is_floating_point())
    bad = tuple(k for k in suspect if not bool(torch.isfinite(sd[k]).all()))  # float64 beyond float32 range is fine
    return NonFinite(
        bad,
        sum(int(torch.isnan(sd[k]).sum()) for k in bad),
        sum(int(torch.isinf(sd[k]).sum()) for k in bad),
        sum(sd[k].numel() for k in bad),
    )


def _health_warnings(sd: Mapping[str, torch.Tensor]) -> list[str]:
    out = []
    amax = {k: abs_max(t) for k, t in sd.items() if t.numel() and t.dtype != torch.bool}
    scan = nonfinite_scan(sd, amax)
    bad, nan, inf = scan.keys, scan.nan, scan.inf
    if bad:
        out.append(
            f"{len(bad)} tensor{'s contain' if len(bad) > 1 else ' contains'} NaN or Inf ({nan:,} NaN and "
            f"{inf:,} Inf elements; e.g. {bad[0]}); predictions will be NaN."
        )
    # A flipped exponent bit turns a weight into ~1e30: finite, but the forward pass overflows to NaN.
    huge = [k for k, v in amax.items() if math.isfinite(v) and v > 1e4]
    if huge:
        out.append(
            f"{len(huge)} tensors hold values beyond ±1e4 (e.g. {huge[0]}: {amax[huge[0]]:.3g}), far outside "
            "trained weights; the file is probably damaged and predictions may overflow to NaN."
        )
    ints = [k for k, t in sd.items() if not t.is_floating_point()]
    if ints:
        out.append(
            f"{len(ints)} tensors hold integers or bools (e.g. {ints[0]}: "
            f"{str(sd[ints[0]].dtype).removeprefix('torch.')}); weights are floats, so they are cast when loaded."
        )
    half = sorted({str(t.dtype).removeprefix("torch.") for t in sd.values() if t.dtype in _HALF})
    if half:
        n = sum(t.dtype in _HALF for t in sd.values())
        out.append(f"{n} tensors are stored in {'/'.join(half)}; they are converted to float32 for analysis.")
    return out


def load_checkpoint(
    src: str | os.PathLike | bytes | bytearray | memoryview | BinaryIO, name: str | None = None
) -> Checkpoint:
    """Read a .pt/.pth/.bin (torch zip or legacy) or .safetensors checkpoint from a path, bytes or file object.

    Unwraps saved-dict layouts and wrapper prefixes, keeps non-tensor entries as metadata, infers the
    configuration when the layout fits. Raises CheckpointError with a readable message for bad input.
    """
    try:
        return _load(src, name)
    except CheckpointError:
        raise
    except MemoryError:
        raise CheckpointError(
            f"{name or 'the file'}: reading it ran out of memory. The file declares more data than "
            "this machine can hold; see the limits in the README."
        ) from None
    except Exception as exc:  # noqa: BLE001 - whatever else a crafted file triggers is a refusal, never a traceback
        raise CheckpointError(
            f"{name or 'the file'} could not be read as a checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:160] if str(exc) else 'no detail'})."
        ) from None


def _load(src: str | os.PathLike | bytes | bytearray | memoryview | BinaryIO, name: str | None) -> Checkpoint:
    display, path, data = _read_source(src)
    display = name or display
    size = _size(path, data)
    if size == 0:
        raise CheckpointError(f"{display} is empty (0 bytes). The copy or upload did not complete; try again.")
    head = _head(path, data, 64)
    fmt = _sniff(head)
    if fmt == "unknown":
        raw = _head(path, data, 1 << 20)
        refused = _refused_globals(fmt, None, raw, limit=1 << 20) if _whole_pickle(raw) else []  # protocol-0 pickle
        if refused:
            _refuse(display, ", ".join(refused[:5]))
        raise CheckpointError(_describe_unknown(display, head))

    if fmt == "safetensors":
        tensors, st_meta = _safetensors_load(display, path, data)
        obj: Any = tensors
        extra_meta: dict[str, Any] = {k: v for k, v in st_meta.items()}
        foreign = None
    else:
        (obj, foreign), extra_meta = _torch_load(display, fmt, path, data), {}
    sd, meta, wrapper_keys, sd_key = _unwrap(obj, display)
    _check_tensors(sd, display)
    meta.update(extra_meta)
    if not sd:
        raise CheckpointError(
            f"{display} holds no tensors (top-level keys: {list(wrapper_keys)[:10]}). "
            "It may be a metadata or optimizer-only file; open the file with the model weights."
        )
    sd, stripped = strip_prefixes(sd)
    warnings = [f"removed the key prefix '{p}' from every key" for p in stripped]
    if foreign is not None:
        classes = sorted(set(foreign.values()))
        warnings.append(
            f"read in restricted mode: the pickle holds {len(foreign)} Python object(s) of "
            f"{len(classes)} class(es) the safe loader refuses ({', '.join(classes[:4])}"
            f"{', …' if len(classes) > 4 else ''}); their fields were read as inert records and "
            "nothing from the file was called."
        )
    adapter = _adapter_config(path) if path is not None else None
    if adapter is not None:
        meta["adapter_config"] = adapter
    warnings += _health_warnings(sd)
    stored = _stored_config(meta)
    ckpt = Checkpoint(
        state_dict=sd,
        meta=meta,
        source=display,
        format=fmt,
        wrapper_keys=wrapper_keys,
        state_dict_key=sd_key,
        prefixes_stripped=stripped,
        digest=_digest(path, data),
        size_bytes=size,
        stored_config=stored,
        warnings=warnings,
        read_mode="weights_only" if foreign is None else "restricted",
        foreign_objects=dict(foreign or {}),
        adapter_config=adapter,
    )
    try:
        ckpt.config, more = infer_config(sd, stored)
        ckpt.warnings += more
    except ConfigError as exc:
        ckpt.config_error = str(exc)
    except (ValueError, TypeError, IndexError, OverflowError) as exc:
        _infer_without_stored(ckpt, exc)
    else:
        if not 0.0 <= ckpt.config.lora_scale <= 1e4:  # NaN, Inf, negative or so large the forward pass overflows
            _infer_without_stored(
                ckpt, ValueError(f"its lora_alpha gives a LoRA scale of {ckpt.config.lora_scale:.3g}")
            )
    return ckpt


def _adapter_config(weights: Path) -> dict[str, Any] | None:
    """The adapter_config.json beside a PEFT adapter_model.* file (ADAPTER_FIELDS only), or None."""
    if weights.name not in PEFT_WEIGHTS or not (weights.parent / PEFT_CONFIG).is_file():
        return None
    try:
        raw = json.loads((weights.parent / PEFT_CONFIG).read_text(encoding="utf-8")[:1_000_000])
    except (OSError, ValueError):
        return None
    return {k: raw.get(k) for k in ADAPTER_FIELDS if k in raw} if isinstance(raw, dict) else None


def _infer_without_stored(ckpt: Checkpoint, exc: Exception) -> None:
    """infer_config failed on a value it did not expect: a stored config value of the wrong type, or a
    tensor with the wrong number of dimensions. Retry without the stored config to tell which."""
    try:
        ckpt.config, more = infer_config(ckpt.state_dict, None)
    except ConfigError as again:
        ckpt.config_error = str(again)
    except (ValueError, TypeError, IndexError, OverflowError):

        def want(k: str) -> int:  # dimensions of a key in the documented layout
            if k == "pos_embedding":
                return 3
            return 2 if k.endswith(("lora_A", "lora_B")) or (k.endswith(".weight") and "norm" not in k) else 1

        wrong = [f"{k} is {t.dim()}-d, expected {want(k)}-d" for k, t in ckpt.state_dict.items() if t.dim() != want(k)]
        ckpt.config_error = (
            f"the tensor shapes do not fit the FLAG-TRADER layout ({'; '.join(wrong[:3]) or exc}). "
            "The Architecture page compares every key with the expected shape."
        )
    else:
        ckpt.warnings += more
        ckpt.warnings.append(
            f"the stored config could not be used ({type(exc).__name__}: {exc}); the assumptions use their defaults."
        )
