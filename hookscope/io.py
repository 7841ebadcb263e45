"""Saving and loading recordings without pickle.

A recording file is a zip archive (the ``.npz`` layout): one ``.npy`` entry per tensor, written
and read with ``allow_pickle=False``, and ``manifest.json`` holding everything else — format
version, module names and types, steps, calls, labels, and the structure of each output
(tuples, lists, dicts, namedtuples, dataclasses and plain values).  Classes are recorded by
name and rebuilt only from modules that are already imported: loading never runs code from the
file.  Writes are atomic: a temporary file in the same folder, renamed into place when complete.
"""

from __future__ import annotations

import collections
import dataclasses
import io as _io
import json
import os
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import RecordingFileError
from .recording import Capture, Recording

__all__ = ["FORMAT_VERSION", "RecordingFileError", "load", "save"]

FORMAT = "hookscope-recording"
FORMAT_VERSION = 1
_MANIFEST = "manifest.json"


class Unsaved:
    """Stands in for an object of an output that has no open-format representation."""

    def __init__(self, cls: str, text: str) -> None:
        self.cls, self.text = cls, text

    def __repr__(self) -> str:
        return f"Unsaved({self.cls}: {self.text})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Unsaved) and (self.cls, self.text) == (other.cls, other.text)

    __hash__ = None  # type: ignore[assignment]


def _class_name(obj: Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}:{cls.__qualname__}"


def _find_class(name: str) -> type | None:
    """The class called ``module:qualname`` if its module is already imported (no imports)."""
    module_name, _, qualname = name.partition(":")
    obj: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, type) else None


class _Writer:
    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        self.unsaved: set[str] = set()

    def tensor(self, t: Tensor) -> dict[str, Any]:
        key = f"t{len(self.arrays)}"
        t = t.detach().cpu()
        dtype = str(t.dtype).removeprefix("torch.")
        # NumPy has no bfloat16: keep the exact bits as uint16.
        bits = t.dtype == torch.bfloat16
        self.arrays[key] = t.contiguous().view(torch.uint16).numpy() if bits else t.numpy()
        return {"t": "tensor", "key": key, "dtype": dtype}

    def tree(self, obj: Any) -> dict[str, Any]:
        if isinstance(obj, Tensor):
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

    The round trip is exact: tensors (dtype included, bfloat16 too), lengths, names, steps,
    calls, labels, and the structure of outputs and inputs.  Objects with no open-format
    representation (rare: a cache object inside an output) are stored as their ``repr`` and
    come back as :class:`Unsaved`, with a warning at save time.

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
        raise TypeError(f"save() writes a hookscope Recording, got {type(recording).__name__}.")
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
        })
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION,
        "model_type": recording.model_type, "steps": recording.steps,
        "modules": [{"name": n, "type": _class_name(t)}
                    for n, t in recording._module_types.items() if n in recording],
        "captures": captures,
    }
    if w.unsaved:
        warnings.warn(f"save(): objects of {sorted(w.unsaved)} have no open-format "
                      "representation; they are stored as their repr.", stacklevel=2)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
                z.writestr(_MANIFEST, json.dumps(manifest, indent=1))
                for key, arr in w.arrays.items():
                    with z.open(f"{key}.npy", "w", force_zip64=True) as entry:
                        np.lib.format.write_array(entry, np.ascontiguousarray(arr),
                                                  allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class _Reader:
    def __init__(self, z: zipfile.ZipFile, path: Path) -> None:
        self.z, self.path = z, path

    def tensor(self, node: dict[str, Any]) -> Tensor:
        try:
            raw = self.z.read(f"{node['key']}.npy")
            arr = np.lib.format.read_array(_io.BytesIO(raw), allow_pickle=False)
        except (KeyError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise RecordingFileError(
                f"{self.path}: tensor {node.get('key')!r} is missing or damaged ({exc}); the "
                "file is truncated or corrupted.") from None
        t = torch.from_numpy(arr.copy())
        if node["dtype"] == "bfloat16":
            t = t.view(torch.bfloat16)
        return t

    def tree(self, node: dict[str, Any] | None) -> Any:
        if node is None:
            return None
        kind = node["t"]
        if kind == "tensor":
            return self.tensor(node)
        if kind == "value":
            return node["v"]
        if kind == "unsaved":
            return Unsaved(node["cls"], node["text"])
        if kind in ("tuple", "list"):
            items = [self.tree(v) for v in node["items"]]
            return tuple(items) if kind == "tuple" else items
        if kind == "namedtuple":
            items = [self.tree(v) for v in node["items"]]
            cls = _find_class(node["cls"])
            if not (cls and getattr(cls, "_fields", None) == tuple(node["fields"])):
                cls = collections.namedtuple(node["cls"].rpartition(".")[2].rpartition(":")[2],
                                             node["fields"])
            return cls(*items)
        if kind == "dict":
            data = dict(zip((self.tree(k) for k in node["keys"]),
                            (self.tree(v) for v in node["items"]), strict=True))
            return _rebuild(_find_class(node["cls"]), data, mapping=True)
        if kind == "dataclass":
            data = {k: self.tree(v) for k, v in node["fields"].items()}
            return _rebuild(_find_class(node["cls"]), data, mapping=False)
        raise RecordingFileError(f"{self.path}: unknown node type {kind!r} in the manifest.")


def _rebuild(cls: type | None, data: dict, mapping: bool) -> Any:
    if cls is not None and cls is not dict:
        try:
            if dataclasses.is_dataclass(cls):
                return cls(**data)
            if mapping:
                return cls(data)
        except Exception:
            pass
    return dict(data)


def load(path: str | os.PathLike) -> Recording:
    """Read a recording written by :func:`save` (never unpickles anything).

    Raises :class:`RecordingFileError` (a ``ValueError``) for a file that is not a hookscope
    recording, is truncated or corrupted, or comes from a newer format version.
    """
    path = Path(path)
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError) as exc:
        raise RecordingFileError(f"{path} is not a hookscope recording, or it is truncated or "
                                 f"corrupted ({exc}).") from None
    with z:
        try:
            manifest = json.loads(z.read(_MANIFEST))
        except KeyError:
            raise RecordingFileError(f"{path} has no {_MANIFEST}: not a hookscope recording."
                                     ) from None
        except (zipfile.BadZipFile, ValueError, EOFError) as exc:
            raise RecordingFileError(f"{path}: the manifest is damaged ({exc}).") from None
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        if fmt != FORMAT:
            raise RecordingFileError(f"{path} is not a hookscope recording (format {fmt!r}).")
        version = manifest.get("version")
        if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
            raise RecordingFileError(
                f"{path} has recording format version {version!r}; this hookscope reads "
                f"versions 1 to {FORMAT_VERSION}. Upgrade hookscope to read it.")
        reader = _Reader(z, path)
        names = [m["name"] for m in manifest["modules"]]
        types = {m["name"]: _find_class(m["type"]) or type(
            m["type"].rpartition(":")[2].rpartition(".")[2], (), {"__module__": "unknown"})
            for m in manifest["modules"]}
        rec = Recording(names, types, manifest["model_type"])
        rec.steps = manifest["steps"]
        for c in manifest["captures"]:
            lengths = None if c["lengths"] is None else reader.tensor(c["lengths"])
            rec._captures[c["name"]].append(Capture(
                c["name"], c["step"], c["call"], c["label"], types[c["name"]],
                reader.tree(c["output"]), reader.tree(c["inputs"]), reader.tree(c["kwargs"]),
                lengths))
    for caps in rec._captures.values():
        caps.sort(key=lambda cap: (cap.step, cap.call))
    return rec
