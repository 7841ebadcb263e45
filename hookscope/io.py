"""Saving and loading recordings without pickle.

A recording file is a zip archive (the ``.npz`` layout): one ``.npy`` entry per tensor, written
and read with ``allow_pickle=False``, and ``manifest.json`` holding everything else — format
version, module names and types, steps, calls, labels, and the structure of each output
(tuples, lists, dicts, namedtuples, dataclasses and plain values).

Loading is safe by construction: it builds tensors, lists, tuples, dicts, namedtuples generated
from field names, and instances of the classes on an explicit allowlist (:func:`allow_class`;
Hugging Face ``ModelOutput`` subclasses when ``transformers`` is already imported).  A class
name read from the file only selects among those; it is never looked up with ``getattr``,
never imported and never called.  Anything else comes back as a plain container that keeps its
original class name (:class:`Restored`, :class:`RestoredDict`).  The manifest is validated
node by node, the declared sizes are checked against a budget before any array is read, and
every array is checked against its CRC-32: a malformed file raises
:class:`RecordingFileError`, never another exception.

Writes are atomic: a temporary file in the same folder, renamed into place when complete;
temporaries left by a killed save of the same target are removed by the next save.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob as _glob
import hashlib
import json
import keyword
import os
import secrets
import socket
import struct
import warnings
import zipfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._arrays import NO_NUMPY_FLOATS
from .capture import Capture
from .errors import InputTypeError, RecordingFileError
from .grads import GradStore
from .recording import Recording
from .restore import (
    Restored,
    RestoredDict,
    _allowed,
    _class_name,
    _module_type,
    _namedtuple,
    _restored_class,
    allow_class,
)
from .structure import first_tensor, iter_tensors

__all__ = ["FORMAT_VERSION", "RecordingFileError", "Restored", "RestoredDict", "Unsaved",
           "allow_class", "load", "save"]

FORMAT = "hookscope-recording"
FORMAT_VERSION = 4  # 2: nested and sparse tensors, capture masks and live notes; 3: a
# capture's batch_dim, feature_map and channels_last; 4: gradients (grads=True).  Each is
# written only where set, and its version only then, so that other files stay readable by
# hookscope versions that read an older one.
_MANIFEST = "manifest.json"
#: Extra bytes, beyond the file's own size, that :func:`load` may decode by default.
DEFAULT_SLACK_BYTES = 64 * 2**20
_MAX_DEPTH = 100  # nesting of containers inside one output


class Unsaved:
    """Stands in for an object of an output that has no open-format representation."""

    def __init__(self, cls: str, text: str) -> None:
        self.cls, self.text = cls, text

    def __repr__(self) -> str:
        return f"Unsaved({self.cls}: {self.text})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Unsaved) and (self.cls, self.text) == (other.cls, other.text)

    __hash__ = None  # type: ignore[assignment]


class _Writer:
    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        self.unsaved: set[str] = set()

    def tensor(self, t: Tensor) -> dict[str, Any]:
        key = f"t{len(self.arrays)}"
        t = t.detach().cpu()
        dtype = str(t.dtype).removeprefix("torch.")
        bits = _BITS.get(dtype)  # (NumPy has no such dtype: the exact bits, as integers)
        if bits is not None:
            self.arrays[key] = t.contiguous().view(bits[1]).numpy()
        else:
            try:
                self.arrays[key] = t.numpy()
            except TypeError:  # (complex32, quantized, ...: no NumPy dtype, no plain bits)
                raise InputTypeError(
                    f"save() cannot store a tensor of dtype {t.dtype} (no open-format "
                    "representation); cast that capture first, e.g. with "
                    "hs.record(..., pick=lambda out: out.float()) or dtype=torch.float32."
                ) from None
        return {"t": "tensor", "key": key, "dtype": dtype}

    def tree(self, obj: Any) -> dict[str, Any]:
        if isinstance(obj, Tensor):
            if obj.is_nested:  # one array per example, and the layout to rebuild it with
                layout = "jagged" if obj.layout is torch.jagged else "strided"
                return {"t": "nested", "layout": layout,
                        "items": [self.tensor(c) for c in obj.unbind()]}
            if obj.layout is not torch.strided:  # sparse: stored dense, rebuilt as COO
                return {"t": "sparse", "dense": self.tensor(obj.to_dense())}
            return self.tensor(obj)
        if obj is None or isinstance(obj, bool | int | float | str):
            return {"t": "value", "v": obj}
        if isinstance(obj, tuple):
            node = {"t": "tuple", "items": [self.tree(v) for v in obj]}
            if hasattr(obj, "_fields"):
                node.update(t="namedtuple", cls=_class_name(obj), fields=list(obj._fields))
            return node
        if isinstance(obj, list):
            return {"t": "list", "items": [self.tree(v) for v in obj]}
        if isinstance(obj, Mapping):
            return {"t": "dict", "cls": _class_name(obj),
                    "keys": [self.tree(k) for k in obj], "items": [self.tree(v) for v in
                                                                   obj.values()]}
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return {"t": "dataclass", "cls": _class_name(obj),
                    "fields": {f.name: self.tree(getattr(obj, f.name, None))
                               for f in dataclasses.fields(obj)}}
        self.unsaved.add(_class_name(obj))
        return {"t": "unsaved", "cls": _class_name(obj), "text": repr(obj)[:200]}


def save(recording: Recording, path: str | os.PathLike) -> Path:
    """Write a recording to ``path`` in an open format (zip of ``.npy`` + JSON; no pickle).

    The round trip is exact: tensors (dtype and shape included, bfloat16 and float8 too;
    nested tensors per example; sparse tensors, which come back in COO layout), lengths,
    masks, gradients (``grads=True``), names, steps, calls, labels, ``Capture.live`` notes,
    and the structure of outputs and inputs.  Objects with no open-format representation (a
    module kept by reference, see ``Capture.live``) are stored as their ``repr`` and come
    back as :class:`Unsaved`, with a warning at save time.

    Returns the path written.

    Examples
    --------
    >>> import tempfile, torch, hookscope as hs
    >>> model = torch.nn.Linear(2, 2)
    >>> with hs.record(model, [""]) as rec:
    ...     _ = model(torch.ones(1, 2))
    >>> path = hs.save(rec, tempfile.mkdtemp() + "/rec.hsrec")
    >>> torch.equal(hs.load(path)[""].tensor, rec[""].tensor)
    True
    """
    if not isinstance(recording, Recording):
        raise InputTypeError(
            f"save() writes a hookscope Recording, got {type(recording).__name__}.")
    path = Path(path)
    w = _Writer()
    captures = []
    for cap in recording.captures():
        captures.append({
            "name": cap.name, "step": cap.step, "call": cap.call, "label": cap.label,
            "output": w.tree(cap.output),
            "inputs": None if cap.inputs is None else w.tree(cap.inputs),
            "kwargs": None if cap.kwargs is None else w.tree(cap.kwargs),
            "lengths": None if cap.lengths is None else w.tensor(cap.lengths),
            "mask": None if cap._mask is None else w.tensor(cap._mask),
            "live": list(cap.live),
            "bidirectional": bool(cap.bidirectional),
            "rnn_state": bool(cap.rnn_state),
        })
        if cap._grads is not None:  # (grads=True: the gradients that arrived, by path)
            captures[-1]["grads"] = _grad_nodes(w, cap._grads.grads)
        if cap.batch_dim:
            captures[-1]["batch_dim"] = int(cap.batch_dim)
        if cap.feature_map:
            captures[-1]["feature_map"] = True
        if cap.channels_last:
            captures[-1]["channels_last"] = True
    manifest = {
        "format": FORMAT,
        "version": 4 if any("grads" in c for c in captures) else 3 if any(
            key in c for c in captures for key in ("batch_dim", "feature_map", "channels_last"))
        else 2,
        "model_type": recording.model_type, "steps": recording.steps,
        "modules": [{"name": n, "type": _class_name(t)}
                    for n, t in recording._module_types.items() if n in recording],
        "captures": captures,
    }
    if w.unsaved:
        warnings.warn(f"save(): objects of {sorted(w.unsaved)} have no open-format "
                      "representation; they are stored as their repr.", stacklevel=2)
    _remove_stale_temporaries(path)
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
                z.writestr(_MANIFEST, json.dumps(manifest, indent=1))
                for key, arr in w.arrays.items():
                    with z.open(f"{key}.npy", "w", force_zip64=True) as entry:
                        # (reshaped: ascontiguousarray makes a 0-d array 1-D)
                        np.lib.format.write_array(
                            entry, np.ascontiguousarray(arr).reshape(arr.shape),
                            allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _grad_nodes(w: _Writer, grads: dict[tuple, Tensor]) -> list[dict[str, Any]]:
    """A capture's gradients (``grads=True``) as ``[{"path": [...], "grad": tensor}]``; a
    path through a key that is neither text nor an integer has no JSON form (unsaved)."""
    out = []
    for path, grad in grads.items():
        if all(type(k) in (int, str) for k in path):
            out.append({"path": list(path), "grad": w.tensor(grad)})
        else:
            w.unsaved.add("a gradient under a non-text key")
    return out


def _create_temporary(path: Path) -> tuple[int, str]:
    """A new temporary file beside ``path``, with the permissions of any file the user creates
    (0o666 less the umask; ``tempfile.mkstemp`` would make it private, 0o600)."""
    for _ in range(100):
        tmp = (path.parent or Path(".")) / (
            f"{_temp_prefix(path)}{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                           0o666), str(tmp)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")  # pragma: no cover


def _temp_prefix(path: Path) -> str:
    """``.NAME.hstmp-HOST-``: temporaries of one target, tagged with a hash of the host name
    (then the writer's pid), so that a save can tell its own host's dead writers' files."""
    host = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
    return f".{path.name}.hstmp-{host}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _remove_stale_temporaries(path: Path) -> None:
    """Remove temporaries of ``path`` left by saves killed on this host (their pid is gone).
    Those of running saves, and of other hosts on a shared filesystem, are left alone."""
    prefix = _temp_prefix(path)
    try:
        candidates = list((path.parent or Path(".")).glob(f"{_glob.escape(prefix)}*.tmp"))
    except OSError:
        return
    for tmp in candidates:
        pid_text = tmp.name[len(prefix):].partition(".")[0]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and not _pid_alive(
                int(pid_text)):
            with contextlib.suppress(OSError):
                tmp.unlink()






# -- reading -------------------------------------------------------------------------------------

# Tensor dtypes NumPy lacks, stored as their exact bits: dtype name -> (NumPy, torch) integers.
_BITS = {str(d).removeprefix("torch."): ("uint16", torch.uint16) if d.itemsize == 2
         else ("uint8", torch.uint8) for d in NO_NUMPY_FLOATS}

# The NumPy dtypes a tensor can come from: little-endian (or single-byte) numbers and bools.
_DTYPES = {"bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
           "float16", "float32", "float64", "complex64", "complex128"}
_NODE_TYPES = {"tensor", "value", "unsaved", "tuple", "list", "namedtuple", "dict", "dataclass",
               "nested", "sparse"}


class _BadFileError(Exception):
    """Internal: what is wrong with the file (becomes a RecordingFileError naming the path)."""


def _expect(condition: bool, what: str) -> None:
    if not condition:
        raise _BadFileError(what)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _field(node: Any, key: str, where: str) -> Any:
    _expect(isinstance(node, dict), f"{where} is not an object")
    _expect(key in node, f"{where} has no {key!r}")
    return node[key]


class _Reader:
    """Validates the manifest's nodes and builds values from them, within a byte budget."""

    def __init__(self, z: zipfile.ZipFile, budget: int) -> None:
        self.z = z
        self.budget = budget
        self.entries = {info.filename: info for info in z.infolist()}
        encrypted = [name for name, info in self.entries.items() if info.flag_bits & 0x1]
        _expect(not encrypted, f"entries {encrypted[:3]} are marked encrypted")
        self.headers: dict[str, tuple[np.dtype, tuple[int, ...], bool]] = {}
        self.classes: dict[str, Any] = {}

    # Pass 1: structure, sizes and headers; nothing decoded.
    def scan(self, node: Any, where: str, depth: int = 0) -> None:
        _expect(depth <= _MAX_DEPTH, f"{where} is nested more than {_MAX_DEPTH} levels deep")
        kind = _field(node, "t", where)
        _expect(kind in _NODE_TYPES, f"{where} has unknown node type {kind!r}")
        if kind == "tensor":
            self.scan_tensor(node, where)
        elif kind == "value":
            v = _field(node, "v", where)
            _expect(v is None or isinstance(v, bool | int | float | str),
                    f"{where} holds a {type(v).__name__}, not a plain value")
        elif kind == "nested":
            _expect(_field(node, "layout", where) in ("strided", "jagged"),
                    f"{where}: nested layout must be 'strided' or 'jagged'")
            items = _field(node, "items", where)
            _expect(isinstance(items, list) and all(
                isinstance(v, dict) and v.get("t") == "tensor" for v in items),
                f"{where}: a nested tensor's items must be tensors")
            for i, v in enumerate(items):
                self.scan_tensor(v, f"{where}[{i}]")
        elif kind == "sparse":
            dense = _field(node, "dense", where)
            _expect(isinstance(dense, dict) and dense.get("t") == "tensor",
                    f"{where}: a sparse tensor is stored as a dense tensor")
            self.scan_tensor(dense, f"{where}.dense")
            # Rebuilding it makes int64 indices, ndim of them per non-zero value: at most
            # that much more (a few dims of ones would otherwise decode to gigabytes).
            shape = self.headers[f"{dense['key']}.npy"][1]
            self.spend(int(np.prod(shape, dtype=object)) * 8 * len(shape),
                       f"{where}'s sparse indices")
        elif kind == "unsaved":
            _expect(isinstance(_field(node, "cls", where), str)
                    and isinstance(_field(node, "text", where), str),
                    f"{where}: an unsaved object needs a class name and a text")
        elif kind == "dataclass":
            _expect(isinstance(_field(node, "cls", where), str), f"{where}: class name not text")
            fields = _field(node, "fields", where)
            _expect(isinstance(fields, dict), f"{where}: fields are not an object")
            for k, v in fields.items():
                _expect(k.isidentifier() and not k.startswith("__"),
                        f"{where}: field name {k!r} is not a valid identifier")
                self.scan(v, f"{where}.{k}", depth + 1)
        else:
            items = _field(node, "items", where)
            _expect(isinstance(items, list), f"{where}: items are not a list")
            if kind == "namedtuple":
                _expect(isinstance(_field(node, "cls", where), str),
                        f"{where}: class name not text")
                fields = _field(node, "fields", where)
                _expect(isinstance(fields, list) and len(fields) == len(items)
                        and len(set(fields)) == len(fields) and all(
                            isinstance(f, str) and f.isidentifier() and not keyword.iskeyword(f)
                            and not f.startswith("_") for f in fields),
                        f"{where}: namedtuple fields {fields!r} are not unique identifiers, one "
                        "per item")
            if kind == "dict":
                _expect(isinstance(_field(node, "cls", where), str),
                        f"{where}: class name not text")
                keys = _field(node, "keys", where)
                _expect(isinstance(keys, list) and len(keys) == len(items),
                        f"{where}: keys and items differ in number")
                for i, k in enumerate(keys):
                    self.scan(k, f"{where}.keys[{i}]", depth + 1)
            for i, v in enumerate(items):
                self.scan(v, f"{where}[{i}]", depth + 1)

    def scan_tensor(self, node: Any, where: str) -> None:
        key, dtype = _field(node, "key", where), _field(node, "dtype", where)
        _expect(isinstance(key, str) and isinstance(dtype, str),
                f"{where}: tensor key and dtype must be text")
        name = f"{key}.npy"
        info = self.entries.get(name)
        _expect(info is not None, f"{where}: tensor {key!r} is missing from the archive")
        # hookscope writes each tensor once: an entry referenced again (thousands of times)
        # would cost work out of proportion to the file.
        _expect(name not in self.headers, f"{where}: tensor {key!r} is referenced twice")
        self.spend(info.file_size, f"tensor {key!r}")
        if name not in self.headers:
            with self.z.open(info) as f:
                version = np.lib.format.read_magic(f)
                _expect(version in ((1, 0), (2, 0)), f"{name}: npy version {version}")
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                               np.lib.format.read_array_header_2_0)
                shape, fortran, np_dtype = read_header(f, max_header_size=10_000)
                header_end = f.tell()
            _expect(np_dtype.name in _DTYPES and np_dtype.byteorder in "=|<"
                    and not np_dtype.fields and not np_dtype.subdtype,
                    f"{name}: dtype {np_dtype.str!r} is not a tensor dtype hookscope writes")
            _expect(all(_is_int(n) and n >= 0 for n in shape), f"{name}: bad shape {shape}")
            nbytes = int(np.prod(shape, dtype=object)) * np_dtype.itemsize if shape else \
                np_dtype.itemsize
            _expect(header_end + nbytes == info.file_size,
                    f"{name}: the header declares {nbytes} bytes of data, the entry holds "
                    f"{info.file_size - header_end}")
            self.headers[name] = (np_dtype, tuple(shape), fortran)
        np_dtype = self.headers[name][0]
        expected = _BITS[dtype][0] if dtype in _BITS else dtype
        _expect(np_dtype.name == expected,
                f"{where}: the manifest says {dtype}, the array holds {np_dtype.name}")

    def spend(self, nbytes: int, what: str) -> None:
        self.budget -= nbytes
        if self.budget < 0:
            raise RecordingFileError(
                f"{what} takes the decoded size of this file past the size budget: the file "
                "declares more data than it holds (a compressed or crafted file). If you trust "
                "it, pass a larger max_bytes= to load().")

    # Pass 2: build the values (only after pass 1 accepted every node).
    def tensor(self, node: dict[str, Any]) -> Tensor:
        with self.z.open(f"{node['key']}.npy") as f:
            arr = np.lib.format.read_array(f, allow_pickle=False)
            _expect(f.read(1) == b"", f"{node['key']}.npy has trailing bytes")
            # Reading to the end of the entry checks its CRC-32 (BadZipFile if it differs).
        t = torch.from_numpy(np.ascontiguousarray(arr).reshape(arr.shape))  # (0-d stays 0-d)
        if node["dtype"] in _BITS:
            t = t.view(getattr(torch, node["dtype"]))
        return t

    def tree(self, node: dict[str, Any]) -> Any:
        kind = node["t"]
        if kind == "tensor":
            return self.tensor(node)
        if kind == "nested":
            items = [self.tensor(v) for v in node["items"]]
            try:
                return torch.nested.nested_tensor(
                    items, layout=torch.jagged if node["layout"] == "jagged" else torch.strided)
            except (RuntimeError, ValueError, TypeError) as exc:
                raise _BadFileError(f"a nested tensor cannot be rebuilt ({exc})") from None
        if kind == "sparse":
            return self.tensor(node["dense"]).to_sparse()
        if kind == "value":
            return node["v"]
        if kind == "unsaved":
            return Unsaved(node["cls"], node["text"])
        if kind == "dataclass":
            data = {k: self.tree(v) for k, v in node["fields"].items()}
            return self.rebuild(node["cls"], data, Restored, dataclasses.is_dataclass)
        items = [self.tree(v) for v in node["items"]]
        if kind == "tuple":
            return tuple(items)
        if kind == "list":
            return items
        if kind == "namedtuple":
            allowed = self.allowed(node["cls"])
            if allowed is not None and getattr(allowed[0], "_fields", None) == tuple(
                    node["fields"]):
                return self.rebuild(node["cls"], dict(zip(node["fields"], items, strict=True)),
                                    tuple, lambda cls: issubclass(cls, tuple))
            return _namedtuple(node["cls"], tuple(node["fields"]))(*items)
        keys = [self.tree(k) for k in node["keys"]]
        try:
            data = dict(zip(keys, items, strict=True))
        except TypeError:
            raise _BadFileError("a dict key is not hashable") from None
        _expect(len(data) == len(keys), "a dict has duplicate keys")
        if node["cls"] == "builtins:dict":
            return data
        return self.rebuild(node["cls"], data, RestoredDict,
                            lambda cls: issubclass(cls, Mapping))

    def allowed(self, name: str) -> Any:
        """The allowlisted class called ``name`` (looked up once per name and load)."""
        if name not in self.classes:
            self.classes[name] = _allowed(name)
        return self.classes[name]

    def rebuild(self, name: str, data: dict, fallback: type,
                fits: Callable[[type], bool]) -> Any:
        allowed = self.allowed(name)
        _expect(allowed is None or fits(allowed[0]),
                f"{name} is stored as a {fallback.__name__} node but is not one")
        if allowed is None:
            if fallback is tuple:  # unreachable: namedtuples are generated instead
                raise _BadFileError(name)
            return _restored_class(name, fallback)(data)
        cls, rebuild = allowed
        try:
            return rebuild(cls, data)
        except Exception as exc:
            raise _BadFileError(f"cannot rebuild {name} from the file's fields "
                                f"({type(exc).__name__}: {exc})") from None


# What a damaged or crafted archive can make zipfile, zlib, json and NumPy raise.
_DAMAGE = (_BadFileError, KeyError, IndexError, TypeError, ValueError, EOFError,
           RecursionError, NotImplementedError, OverflowError, OSError, struct.error,
           zlib.error, zipfile.BadZipFile, zipfile.LargeZipFile)


def load(path: str | os.PathLike, *, max_bytes: int | None = None) -> Recording:
    """Read a recording written by :func:`save`: never unpickles, imports or runs code.

    Values are rebuilt as tensors, lists, tuples, dicts, namedtuples (generated from their
    field names) and instances of allowlisted classes (:func:`allow_class`); other objects come
    back as :class:`Restored` / :class:`RestoredDict` with their class name kept.

    Parameters
    ----------
    path : path
        The file.
    max_bytes : int, optional
        The most bytes that decoding may produce (the manifest plus every array, counted once
        per reference).  Default: the file's size plus 64 MiB, which a file written by
        :func:`save` never exceeds (it stores arrays uncompressed).  Checked from the declared
        sizes before any array is read.

    Raises
    ------
    RecordingFileError
        (a ``ValueError``) for a file that is not a hookscope recording, is truncated,
        corrupted or malformed, exceeds the size budget, or comes from a newer format version.
    FileNotFoundError, PermissionError
        If the file cannot be opened at all.
    """
    path = Path(path)
    with open(path, "rb") as f:  # a missing file is a FileNotFoundError, not a bad file
        size = os.fstat(f.fileno()).st_size
        budget = size + DEFAULT_SLACK_BYTES if max_bytes is None else int(max_bytes)
        try:
            return _load(f, path, budget)
        except RecordingFileError:
            raise
        except MemoryError:
            raise RecordingFileError(f"{path}: out of memory while decoding; the file is "
                                     "malformed or larger than this machine can load.") from None
        except _DAMAGE as exc:
            what = str(exc) if isinstance(exc, _BadFileError) else f"{type(exc).__name__}: {exc}"
            raise RecordingFileError(f"{path}: not a hookscope recording, or it is truncated or "
                                     f"corrupted ({what}).") from None


_LENGTH_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)


def _read_grads(reader: _Reader, nodes: list, output: Any, where: str) -> GradStore:
    """A capture's gradients: each at a tensor of its output (by path, once), of that
    tensor's shape and dtype, as recording made them."""
    leaves = dict(iter_tensors(output))
    store = GradStore()
    for g in nodes:
        path = tuple(g["path"])
        value = leaves.get(path)
        _expect(value is not None, f"{where}: a gradient at output{list(path)}, where the "
                "output has no tensor")
        _expect(path not in store.grads, f"{where}: two gradients at output{list(path)}")
        grad = reader.tensor(g["grad"])
        _expect(grad.dtype == value.dtype and (value.is_nested or value.layout is not
                                               torch.strided or grad.shape == value.shape),
                f"{where}: the gradient at output{list(path)} is {tuple(grad.shape)} "
                f"{grad.dtype}, the value {tuple(value.shape)} {value.dtype}")
        store.grads[path] = grad
    return store


def _load(f: Any, path: Path, budget: int) -> Recording:
    z = zipfile.ZipFile(f)
    if _MANIFEST not in z.NameToInfo:
        raise RecordingFileError(f"{path} has no {_MANIFEST}: not a hookscope recording.")
    reader = _Reader(z, budget)
    info = z.getinfo(_MANIFEST)
    # A parsed manifest takes many times its text in objects: charged as such where it was
    # compressed (hookscope stores it as it is), so that a small file cannot expand into
    # gigabytes of lists.
    reader.spend(info.file_size * (1 if info.compress_type == zipfile.ZIP_STORED else 32),
                 _MANIFEST)
    manifest = json.loads(z.read(_MANIFEST))
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if fmt != FORMAT:
        raise RecordingFileError(f"{path} is not a hookscope recording (format {fmt!r}).")
    version = manifest.get("version")
    if not _is_int(version) or version > FORMAT_VERSION or version < 1:
        raise RecordingFileError(
            f"{path} has recording format version {version!r}; this hookscope reads "
            f"versions 1 to {FORMAT_VERSION}. Upgrade hookscope to read it.")
    _expect(isinstance(manifest.get("model_type"), str), "model_type is not text")
    _expect(_is_int(manifest.get("steps")) and manifest["steps"] >= 0,
            "steps is not a count")
    modules = _field(manifest, "modules", "the manifest")
    _expect(isinstance(modules, list), "modules is not a list")
    for i, m in enumerate(modules):
        _expect(isinstance(_field(m, "name", f"modules[{i}]"), str)
                and isinstance(_field(m, "type", f"modules[{i}]"), str),
                f"modules[{i}]: name and type must be text")
    names = [m["name"] for m in modules]
    _expect(len(set(names)) == len(names), "a module is listed twice")
    captures = _field(manifest, "captures", "the manifest")
    _expect(isinstance(captures, list), "captures is not a list")
    seen = set()
    for i, c in enumerate(captures):
        where = f"captures[{i}]"
        for key in ("name", "step", "call", "label", "output", "inputs", "kwargs", "lengths"):
            _field(c, key, where)
        _expect(c["name"] in names, f"{where}: module {c['name']!r} is not listed")
        _expect(_is_int(c["step"]) and 0 <= c["step"] < max(manifest["steps"], 1)
                and _is_int(c["call"]) and c["call"] >= 0, f"{where}: bad step or call")
        _expect((c["name"], c["step"], c["call"]) not in seen, f"{where} is a duplicate")
        seen.add((c["name"], c["step"], c["call"]))
        _expect(c["label"] is None or isinstance(c["label"], str), f"{where}: bad label")
        reader.scan(c["output"], f"{where}.output")
        for key in ("inputs", "kwargs", "lengths"):
            if c[key] is not None:
                reader.scan(c[key], f"{where}.{key}")
        if c["lengths"] is not None:
            _expect(c["lengths"]["t"] == "tensor", f"{where}.lengths is not a tensor")
        if c.get("mask") is not None:  # version 2
            _expect(isinstance(c["mask"], dict) and c["mask"].get("t") == "tensor",
                    f"{where}.mask is not a tensor")
            reader.scan(c["mask"], f"{where}.mask")
        grads = c.get("grads", [])  # version 4
        _expect(isinstance(grads, list) and (not grads or version >= 4),
                f"{where}.grads is not a list of a version 4 file")
        for g in grads:
            path = _field(g, "path", f"{where}.grads")
            _expect(isinstance(path, list) and all(type(k) in (int, str) for k in path),
                    f"{where}.grads: a path must be a list of keys")
            _expect(isinstance(_field(g, "grad", f"{where}.grads"), dict)
                    and g["grad"].get("t") == "tensor", f"{where}.grads: not a tensor")
            reader.scan(g["grad"], f"{where}.grads")
        batch_dim = c.get("batch_dim", 0)  # version 3
        _expect(_is_int(batch_dim) and 0 <= batch_dim < 64, f"{where}.batch_dim is not a "
                "dimension")
        for flag in ("feature_map", "channels_last"):
            _expect(type(c.get(flag, False)) is bool, f"{where}.{flag} is not a bool")
        _expect(isinstance(c.get("live", []), list) and all(
            isinstance(x, str) for x in c.get("live", [])), f"{where}.live is not a text list")
    types_ = {name: _module_type(m["type"]) for name, m in zip(names, modules, strict=True)}
    rec = Recording(names, types_, manifest["model_type"])
    rec.steps = manifest["steps"]
    for c in captures:
        lengths = None if c["lengths"] is None else reader.tensor(c["lengths"])
        if lengths is not None:
            _expect(lengths.ndim == 1 and lengths.dtype in _LENGTH_DTYPES,
                    "lengths must be a 1-d signed integer tensor")
        mask = None if c.get("mask") is None else reader.tensor(c["mask"])
        if mask is not None:
            _expect(mask.ndim == 2 and mask.dtype == torch.bool, "mask must be a 2-d bool tensor")
        output = reader.tree(c["output"])
        batch_dim = c.get("batch_dim", 0)
        if batch_dim:
            t = first_tensor(output)
            _expect(t is not None and t.ndim > batch_dim, f"capture {c['name']!r} step "
                    f"{c['step']} call {c['call']}: batch_dim {batch_dim} is not a dimension of "
                    "its tensor")
        capture = Capture(
            c["name"], c["step"], c["call"], c["label"], types_[c["name"]],
            output, None if c["inputs"] is None else reader.tree(c["inputs"]),
            None if c["kwargs"] is None else reader.tree(c["kwargs"]), lengths, mask=mask,
            live=tuple(c.get("live", ())), bidirectional=c.get("bidirectional") is True,
            rnn_state=c.get("rnn_state") is True, batch_dim=batch_dim,
            feature_map=c.get("feature_map") is True,
            channels_last=c.get("channels_last") is True)
        if "grads" in c:
            capture._grads = _read_grads(reader, c["grads"], output,
                                         f"capture {c['name']!r} step {c['step']} call "
                                         f"{c['call']}")
        rec._add(capture)
    for caps in rec._captures.values():
        caps.sort(key=lambda cap: (cap.step, cap.call))
    return rec
