"""A restricted unpickler for checkpoints whose pickle holds foreign objects (dataclass configs, argparse
Namespace, numpy scalars, other class instances) that `torch.load(weights_only=True)` refuses.

Nothing from the file is called or imported. `find_class` returns only:
- our own tensor/storage rebuilders (plain tensors; tensor and Parameter subclasses are dropped to plain tensors),
- a few stdlib containers (OrderedDict, set, ...) and torch value types (dtype, Size, device),
- for anything else a fresh *inert record type* created here: constructing, BUILD-ing, SETITEMS-ing or APPENDS-ing
  it only stores the arguments, so a foreign class (or a foreign subclass of OrderedDict or Parameter) never has
  any of its methods run.
Globals that only an attack needs (os.system, eval, exec, subprocess, getattr, importlib, ...) are refused: the
whole file is rejected, naming them.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from typing import Any

import torch

# Modules no checkpoint needs; a reference to any of them means the pickle tries to run something.
DANGEROUS_MODULES = frozenset(
    (
        "os",
        "posix",
        "nt",
        "subprocess",
        "sys",
        "shutil",
        "socket",
        "importlib",
        "pickle",
        "_pickle",
        "marshal",
        "types",
        "code",
        "codeop",
        "runpy",
        "ctypes",
        "io",
        "_io",
        "pty",
        "webbrowser",
        "multiprocessing",
        "signal",
        "operator",
        "_operator",
        "functools",
        "_functools",
        "commands",
        "platform",
        "tempfile",
        "pathlib",
        "glob",
        "inspect",
        "threading",
        "_thread",
        "asyncio",
        "urllib",
        "http",
        "requests",
        "zipimport",
        "pkgutil",
        "site",
        "sysconfig",
        "ftplib",
        "smtplib",
        "telnetlib",
        "pdb",
        "bdb",
        "timeit",
        "trace",
        "cProfile",
        "profile",
        "dill",
        "cloudpickle",
        "joblib",
        "yaml",
        "shelve",
        "dbm",
        "sqlite3",
        "tarfile",
        "zipfile",
        "gc",
        "weakref",
    )
)
# Builtins that are plain value types; every other builtin (eval, exec, getattr, __import__, open...) is refused.
_SAFE_BUILTINS = {
    name: getattr(__import__("builtins"), name)
    for name in (
        "set",
        "frozenset",
        "complex",
        "slice",
        "bytearray",
        "bytes",
        "str",
        "int",
        "float",
        "bool",
        "list",
        "tuple",
        "dict",
        "range",
        "object",
    )
}
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_MAX_RECORDS = 100_000  # inert objects per file: a pickle that builds more is not a checkpoint


class RestrictedPickleError(pickle.UnpicklingError):
    """The pickle needs something the restricted reader refuses; `refused` names it."""

    def __init__(self, refused: str, why: str, malformed: bool = False) -> None:
        super().__init__(f"{refused}: {why}")
        self.refused, self.why, self.malformed = refused, why, malformed


class ForeignObject:
    """Inert record of an object of a class the file names: never the class itself, only what was stored."""

    _module = ""
    _name = ""
    # What the pickle stored, set by __new__ (not __init__: unpickling may skip it).
    args: tuple[Any, ...]
    state: Any
    items: dict[Any, Any]
    values: list[Any]

    def __init__(self, *args: Any) -> None:  # only reached through our own __new__ calls
        pass

    def __new__(cls, *args: Any, **kwargs: Any) -> ForeignObject:
        obj = object.__new__(cls)
        obj.args, obj.state, obj.items, obj.values = tuple(args), None, {}, []
        return obj

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value

    def append(self, value: Any) -> None:
        self.values.append(value)

    def extend(self, values: Any) -> None:
        self.values.extend(list(values))

    @property
    def class_name(self) -> str:
        return f"{self._module}.{self._name}"

    def __repr__(self) -> str:
        return f"<record of {self.class_name}>"


def _is_dangerous(module: str, name: str) -> bool:
    root = module.split(".")[0]
    if root in DANGEROUS_MODULES or root == "__builtin__":
        return True
    if module == "builtins":
        return name not in _SAFE_BUILTINS
    return False


def classify_global(module: str, name: str) -> str:
    """'allowed', 'record' (becomes an inert record) or 'refused' for one `module.name` a pickle imports."""
    module, name = _compat_pickle.NAME_MAPPING.get(
        (module, name), (_compat_pickle.IMPORT_MAPPING.get(module, module), name)
    )
    if (module, name) in _ALLOWED or module == "builtins" and name in _SAFE_BUILTINS:
        return "allowed"
    if _is_dangerous(module, name):
        return "refused"
    if module.split(".")[0] == "torch":
        # torch internals beyond the tensor rebuilders can load or run things (torch.load, torch.hub, ops):
        # a pickled nn.Module or optimizer object is refused, its class named.
        return "refused"
    return "record"


# --------------------------------------------------------------------------------- our rebuilders


def _tensor(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> torch.Tensor:
    """torch._utils._rebuild_tensor_v2 without hooks or metadata: a plain tensor viewing the storage."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise RestrictedPickleError("tensor", "a tensor without stored data", malformed=True)
    ints = (
        isinstance(offset, int)
        and all(isinstance(x, int) for x in (*size, *stride))
        and isinstance(size, tuple)
        and isinstance(stride, tuple)
    )
    if not ints:
        raise RestrictedPickleError("tensor", "a tensor whose shape is not a tuple of integers", malformed=True)
    t = torch.empty((0,), dtype=storage.dtype)
    return t.set_(storage._untyped_storage, offset, size, stride)  # set_ checks the bounds


def _parameter(data: Any, *_: Any) -> Any:
    """torch._utils._rebuild_parameter(_with_state): the data only (hooks and state are not applied)."""
    return data


def _from_type(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    """torch._tensor._rebuild_from_type_v2: rebuild with one of *our* functions, ignore the (sub)class and its state."""
    if func not in (_tensor, _parameter, _from_type):
        raise RestrictedPickleError(
            getattr(func, "class_name", repr(func)[:80]), "a tensor rebuilt by a foreign function", malformed=True
        )
    return func(*args)


def _latin1(text: Any, encoding: Any = "utf-8") -> Any:
    """_codecs.encode as protocol 2 uses it for bytes (str, 'latin1'); any other use stays inert."""
    if isinstance(text, str) and encoding in ("latin1", "latin-1"):
        return text.encode("latin1")
    return _record_type("_codecs", "encode")(text, encoding)


def _reconstructor(cls: Any, base: Any, state: Any = None) -> Any:
    """copyreg._reconstructor: an inert record of `cls` (base.__new__ is never called)."""
    obj = cls() if isinstance(cls, type) and issubclass(cls, ForeignObject) else _record_type("copyreg", "object")()
    if state is not None:
        obj.state = state
    return obj


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _tensor,
    ("torch._utils", "_rebuild_tensor"): _tensor,
    ("torch._utils", "_rebuild_parameter"): _parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _from_type,
    ("torch._utils", "_rebuild_from_type_v2"): _from_type,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("_codecs", "encode"): _latin1,
    **{("torch", n): _StorageType(dt) for n, dt in _STORAGE_DTYPES.items()},
    **{("torch", str(dt).removeprefix("torch.")): dt for dt in _STORAGE_DTYPES.values()},
}
_RECORD_TYPES: dict[tuple[str, str], type] = {}


def _record_type(module: str, name: str) -> type:
    """A fresh ForeignObject subclass standing for `module.name` (created here; nothing is imported)."""
    key = (module, name)
    if key not in _RECORD_TYPES:
        _RECORD_TYPES[key] = type("Record", (ForeignObject,), {"_module": module, "_name": name, "__slots__": ()})
    return _RECORD_TYPES[key]


@dataclass
class RestrictedResult:
    """The unpickled object (foreign objects turned into plain values) and the classes that were recorded."""

    obj: Any
    foreign: dict[str, str] = field(default_factory=dict)  # dotted path in the object -> class name


class _Unpickler(pickle.Unpickler):
    def __init__(
        self, file: io.BytesIO, storages: dict[str, torch.storage.TypedStorage] | None, load_storage: Any
    ) -> None:
        super().__init__(file)
        self._storages = {} if storages is None else storages
        self._load_storage = load_storage
        self.records = 0

    def find_class(self, module: str, name: str) -> Any:
        module, name = _compat_pickle.NAME_MAPPING.get(
            (module, name), (_compat_pickle.IMPORT_MAPPING.get(module, module), name)
        )
        kind = classify_global(module, name)
        if kind == "refused":
            raise RestrictedPickleError(f"{module}.{name}", "refused by the restricted reader")
        if kind == "allowed":
            return _SAFE_BUILTINS[name] if module == "builtins" else _ALLOWED[(module, name)]
        self.records += 1
        if self.records > _MAX_RECORDS:
            raise RestrictedPickleError(f"{module}.{name}", f"more than {_MAX_RECORDS:,} foreign objects")
        return _record_type(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if not (
            isinstance(pid, tuple)
            and len(pid) >= 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
            and isinstance(pid[4], int)
        ):
            raise RestrictedPickleError("persistent id", "a storage reference of an unknown kind", malformed=True)
        dtype, key, numel = pid[1].dtype, pid[2], pid[4]
        if key not in self._storages:
            if self._load_storage is None:
                raise RestrictedPickleError("storage", "tensor data in a pickle without an archive", malformed=True)
            self._storages[key] = self._load_storage(key, dtype, numel)
        return self._storages[key]


def _zip_storage_loader(zf: zipfile.ZipFile, prefix: str):
    def load(key: str, dtype: torch.dtype, numel: int) -> torch.storage.TypedStorage:
        try:
            raw = zf.read(f"{prefix}data/{key}")
        except KeyError:
            raise RestrictedPickleError(
                f"data/{key}", "a tensor whose data is missing from the archive", malformed=True
            ) from None
        size = torch.empty((), dtype=dtype).element_size()
        if len(raw) != numel * size:
            raise RestrictedPickleError(
                f"data/{key}", f"{len(raw)} bytes stored for {numel} values of {dtype}", malformed=True
            )
        flat = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        return torch.storage.TypedStorage(wrap_storage=flat.untyped_storage(), dtype=dtype, _internal=True)

    return load


def _thaw(obj: Any, path: str, foreign: dict[str, str], depth: int = 0) -> Any:
    """Replace records by plain values: dict-like records by their items, objects by their fields (with the class
    name under '__class__'), numpy scalars by numbers; note every record's class and where it was."""
    if depth > 64:
        return "… (cut: nested too deeply)"
    if isinstance(obj, ForeignObject):
        foreign.setdefault(path or "(top level)", obj.class_name)
        num = _numpy_scalar(obj)
        if num is not None:  # numpy.float64(0.61) and the like: the number (its dtype record is not listed)
            return num
        out: dict[str, Any] = {"__class__": obj.class_name}
        if obj.items:
            out = {**{str(k): _thaw(v, f"{path}.{k}".lstrip("."), foreign, depth + 1) for k, v in obj.items.items()}}
            return out
        state = obj.state
        if isinstance(state, tuple) and len(state) == 2 and state[0] is None and isinstance(state[1], dict):
            state = state[1]  # (None, slots dict)
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):  # (dict, slots dict)
            state = {**state[0], **(state[1] or {})}
        if isinstance(state, dict):
            out.update({str(k): _thaw(v, f"{path}.{k}".lstrip("."), foreign, depth + 1) for k, v in state.items()})
        elif state is not None:
            out["state"] = _thaw(state, f"{path}.state".lstrip("."), foreign, depth + 1)
        if obj.args:
            out["args"] = [_thaw(a, f"{path}.args".lstrip("."), foreign, depth + 1) for a in obj.args]
        if obj.values:
            out["values"] = [_thaw(a, f"{path}.values".lstrip("."), foreign, depth + 1) for a in obj.values[:1000]]
        return out
    if isinstance(obj, dict):
        return {k: _thaw(v, f"{path}.{k}".lstrip("."), foreign, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        vals = [_thaw(v, path, foreign, depth + 1) for v in obj]
        return vals if isinstance(obj, list) else tuple(vals)
    return obj


_NUMPY_SCALAR = {("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}
_NUMPY_DTYPES = {"f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "b1"}


def _numpy_scalar(obj: ForeignObject) -> float | int | bool | None:
    """numpy.core.multiarray.scalar(dtype('f8'), b'...') -> a Python number, decoded by struct-free numpy-free means."""
    if (obj._module, obj._name) not in _NUMPY_SCALAR or len(obj.args) != 2:
        return None
    dtype, raw = obj.args
    code = dtype.args[0] if isinstance(dtype, ForeignObject) and dtype.args and isinstance(dtype.args[0], str) else None
    if code not in _NUMPY_DTYPES or not isinstance(raw, (bytes, bytearray)):
        return None
    order = "<"
    if isinstance(dtype.state, tuple) and len(dtype.state) > 1 and dtype.state[1] in ("<", ">", "|", "="):
        order = ">" if dtype.state[1] == ">" else "<"
    fmt = {
        "f2": "e",
        "f4": "f",
        "f8": "d",
        "i1": "b",
        "i2": "h",
        "i4": "i",
        "i8": "q",
        "u1": "B",
        "u2": "H",
        "u4": "I",
        "u8": "Q",
        "b1": "?",
    }[code]
    try:
        return struct.unpack(order + fmt, bytes(raw))[0]
    except struct.error:
        return None


def restricted_load(fmt: str, raw: bytes | None = None, zf: zipfile.ZipFile | None = None) -> RestrictedResult:
    """Unpickle a torch zip archive (`zf`) or a plain pickle (`raw`) with the restricted reader.

    Raises RestrictedPickleError naming a refused global or a malformed tensor reference.
    """
    if fmt == "torch zip":
        if zf is None:
            raise ValueError("a torch zip archive is read from its ZipFile (zf)")
        name = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
        if name is None:
            raise RestrictedPickleError("data.pkl", "a torch archive without its pickle", malformed=True)
        prefix = name[: -len("data.pkl")]
        up = _Unpickler(io.BytesIO(zf.read(name)), None, _zip_storage_loader(zf, prefix))
    elif raw is None:
        raise ValueError(f"a {fmt} file is read from its bytes (raw)")
    elif fmt == "torch legacy":
        return _legacy_load(raw)
    else:
        up = _Unpickler(io.BytesIO(raw), None, None)
    return _thawed(up.load())


def _thawed(obj: Any) -> RestrictedResult:
    """The unpickled object made plain, with every foreign object's location and class."""
    foreign: dict[str, str] = {}
    return RestrictedResult(_thaw(obj, "", foreign), foreign)


def _legacy_load(raw: bytes) -> RestrictedResult:
    """torch's pre-1.6 format: magic, protocol, sys info pickles, the object pickle, the storage keys, then the
    raw storages (8-byte count + data each, in key order)."""
    f = io.BytesIO(raw)
    if _Unpickler(f, None, None).load() != _LEGACY_MAGIC:  # a plain pickle, not torch's legacy format
        plain = _Unpickler(io.BytesIO(raw), None, None).load()
        return _thawed(plain)
    for _ in range(2):  # protocol version, sys info: plain values
        _Unpickler(f, None, None).load()
    wanted: dict[str, tuple[torch.dtype, int]] = {}

    def allocate(key: str, dtype: torch.dtype, numel: int) -> torch.storage.TypedStorage:
        size = torch.empty((), dtype=dtype).element_size()
        if numel < 0 or numel * size > len(raw):  # bounded by the file before anything is allocated
            raise RestrictedPickleError(
                f"storage {key}", f"{numel:,} values declared, more than the file holds", malformed=True
            )
        wanted[key] = (dtype, numel)
        flat = torch.zeros(numel, dtype=dtype)
        return torch.storage.TypedStorage(wrap_storage=flat.untyped_storage(), dtype=dtype, _internal=True)

    storages: dict[str, torch.storage.TypedStorage] = {}
    obj = _Unpickler(f, storages, allocate).load()
    keys = _Unpickler(f, None, None).load()
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise RestrictedPickleError("storage keys", "a legacy file without its list of storages", malformed=True)
    for key in keys:
        if key not in wanted:
            raise RestrictedPickleError(f"storage {key}", "data for a storage the pickle does not use", malformed=True)
        dtype, numel = wanted[key]
        count = int.from_bytes(f.read(8), "little")
        size = torch.empty((), dtype=dtype).element_size()
        data = f.read(count * size) if count == numel else b""
        if count != numel or len(data) != count * size:
            raise RestrictedPickleError(f"storage {key}", "truncated tensor data", malformed=True)
        if data:
            storages[key]._untyped_storage.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8).untyped_storage())
    return _thawed(obj)
