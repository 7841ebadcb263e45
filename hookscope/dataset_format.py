"""The on-disk format of a recorded dataset, shared by the writer and the reader.

A dataset folder holds ``manifest.json`` and ``shards/part-rRRR-NNNNNN.parquet``.  The manifest
(format ``hookscope-dataset``, :data:`FORMAT_VERSION`) lists

- ``columns``: recorded vector/sequence columns, ``{name: {module, call, kind, units, dtype}}``,
  plus ``encoding: "binary"`` for a vector column stored as fixed-size binary (version 3),
  and ``batch_dim`` for one recorded from a time-major output (its examples read along that
  dimension of the module's output, the same in every batch; the rows are examples);
- ``meta``: the ``meta=`` columns and their Arrow types, ``{name: type}``;
- ``shards``: ``{file, rank, rows, batches: [[batch, rows], ...], bytes, sha256}`` in the order
  written; a shard's rows are its batches' rows in that order, rows ``0..n-1`` of each batch;
- ``fingerprint`` (what determines the values), ``complete``, ``rank``, ``world_size``.

Every shard's size and SHA-256 are checked whenever it is read, and the manifest is validated
as a whole (shard files inside ``shards/``, unique, rows adding up, batch ids unique and, once
complete, covering ``0..n-1``): a damaged or edited dataset raises :class:`DatasetError` naming
the file, never returns different numbers.

Vector columns are stored as Arrow ``fixed_size_list<float>[units]`` (a float array per row
in pandas, pyarrow and DuckDB), or, with ``record_dataset(..., vector_encoding="binary")``,
as ``fixed_size_binary[units * itemsize]``: each row's floats as raw little-endian bytes, which
Parquet writes and reads 5-7 times faster (no repetition levels per value) but which pandas
and DuckDB show as bytes/BLOB (``np.frombuffer``); :func:`~hookscope.open_dataset` reads both.

Version policy (the same as for single recordings): a reader reads every version it knows and
refuses a newer one with "upgrade hookscope".  Version 1 (development builds, no checksums) is
no longer read: record it again.  Version 3 adds binary vector columns; a dataset without them
is still written as version 2, readable by the hookscope releases that read version 2.

This module imports neither torch nor the writer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from .errors import DatasetError

__all__ = ["ENCODINGS", "FORMAT", "FORMAT_VERSION", "LIST_VERSION", "MANIFEST", "arrow",
           "merge_manifests", "read_manifest", "read_shard", "sha256_of", "validate_manifest",
           "write_json_atomic"]

FORMAT = "hookscope-dataset"
FORMAT_VERSION = 3  # the newest version read and written
LIST_VERSION = 2  # written where no column is binary: older readers read it
ENCODINGS = ("list", "binary")  # of vector columns
MANIFEST = "manifest.json"
BOOKKEEPING = ("batch", "row")
_SHARD_NAME = re.compile(r"shards/part-r\d{3}-\d{6}\.parquet")
_HEX64 = re.compile(r"[0-9a-f]{64}")
RESUME_HINT = ("the completed shards and the manifest are intact: free space or fix "
               "permissions, then run again with resume=True.")


def arrow() -> tuple[Any, Any]:
    """``(pyarrow, pyarrow.parquet)``, imported on first use (an optional dependency)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("record_dataset/open_dataset need pyarrow: pip install pyarrow "
                          "(or pip install 'hookscope[parquet]').") from None
    return pa, pq


def sha256_of(data: Any) -> str:
    """Hex SHA-256 of a bytes-like object (a Parquet file's bytes)."""
    return hashlib.sha256(memoryview(data)).hexdigest()


def write_json_atomic(path: Path, data: dict) -> None:
    """Write ``data`` to a temporary file and rename it over ``path``.  A failure raises
    :class:`DatasetError` (with the resume hint) and leaves the old file as it was."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):  # on a read-only filesystem this fails too
            tmp.unlink(missing_ok=True)
        raise DatasetError(f"writing {path} failed ({exc}); {RESUME_HINT}") from exc


def _expect(condition: bool, path: Path, what: str) -> None:
    if not condition:
        raise DatasetError(f"{path} is damaged or edited: {what}. Record the dataset again (or "
                           "restore the manifest from a backup).")


def _is_int(x: Any, low: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def read_manifest(path: Path) -> dict:
    """Read and validate a manifest (:func:`validate_manifest`)."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DatasetError(f"{path} is not a hookscope dataset manifest.")
    version = manifest.get("version")
    if not _is_int(version, 1) or version > FORMAT_VERSION:
        raise DatasetError(f"{path} is hookscope dataset format version {version!r}; this "
                           f"hookscope reads versions {LIST_VERSION} to {FORMAT_VERSION}. Upgrade "
                           "hookscope to read it.")
    if version < LIST_VERSION:
        raise DatasetError(f"{path} is hookscope dataset format version {version}, written by "
                           "a development build without shard checksums; record it again.")
    validate_manifest(manifest, path)
    return manifest


def validate_manifest(manifest: dict, path: Path) -> None:
    """Check that a manifest describes a well-formed dataset (raises :class:`DatasetError`)."""
    columns, meta = manifest.get("columns"), manifest.get("meta")
    _expect(isinstance(columns, dict) and isinstance(meta, dict), path, "no column lists")
    for name, spec in columns.items():
        _expect(isinstance(spec, dict) and spec.get("kind") in ("vector", "sequence")
                and _is_int(spec.get("units"), 1)
                and spec.get("dtype") in ("float32", "float16")
                and spec.get("encoding", "list") in ENCODINGS
                and (spec.get("encoding", "list") == "list" or (
                    spec["kind"] == "vector" and manifest.get("version", 0) >= 3))
                and _is_int(spec.get("batch_dim", 1), 1), path,
                f"column {name!r} has an invalid description")
    for name, kind in meta.items():
        _expect(isinstance(kind, str) and name not in columns and name not in BOOKKEEPING,
                path, f"meta column {name!r} is invalid or collides with another column")
    _expect(isinstance(manifest.get("complete"), bool), path, "'complete' is not true/false")
    _expect(isinstance(manifest.get("fingerprint"), str), path, "no fingerprint")
    world = manifest.get("world_size")
    _expect(_is_int(world, 1), path, "'world_size' is not a positive count")
    shards = manifest.get("shards")
    _expect(isinstance(shards, list), path, "'shards' is not a list")
    files, batches = set(), set()
    for i, s in enumerate(shards):
        _expect(isinstance(s, dict), path, f"shard entry {i} is not an object")
        file = s.get("file")
        _expect(isinstance(file, str) and _SHARD_NAME.fullmatch(file) is not None, path,
                f"shard entry {i} names {file!r}, not a file of the shards/ folder")
        _expect(file not in files, path, f"shard {file} is listed twice")
        files.add(file)
        _expect(_is_int(s.get("rank")) and s["rank"] < world
                and file.startswith(f"shards/part-r{s['rank']:03d}-"), path,
                f"shard {file} has an invalid rank")
        _expect(_is_int(s.get("rows")) and _is_int(s.get("bytes"), 1)
                and isinstance(s.get("sha256"), str)
                and _HEX64.fullmatch(s["sha256"]) is not None, path,
                f"shard {file} has an invalid row count, size or checksum")
        pairs = s.get("batches")
        _expect(isinstance(pairs, list) and pairs and all(
            isinstance(p, list) and len(p) == 2 and _is_int(p[0]) and _is_int(p[1])
            for p in pairs), path, f"shard {file} has an invalid batch list")
        _expect(sum(p[1] for p in pairs) == s["rows"], path,
                f"shard {file}: its batches' rows do not add up to its {s['rows']} rows")
        for b, _ in pairs:
            _expect(b not in batches, path, f"batch {b} is in two shards")
            _expect(b % world == s["rank"], path, f"batch {b} is in a shard of another rank")
            batches.add(b)
    if manifest["complete"]:
        # The merged manifest (or a single process's) covers 0..n-1; one rank's manifest of a
        # torchrun job covers rank, rank + world, ...
        rank = manifest.get("rank")
        first, step = (rank, world) if _is_int(rank) and world > 1 else (0, 1)
        expected = set(range(first, first + step * len(batches), step))
        _expect(batches == expected, path, "the dataset is marked complete but its batches "
                "are not all the batches from the first to the last")


def read_shard(folder: Path, entry: dict, columns: list[str] | None, verify: bool = True,
               manifest: dict | None = None) -> Any:
    """One shard as a pyarrow Table (``columns`` only), after checking its size and SHA-256
    (``verify=False`` skips the checksum, not the other checks) and, given the manifest, the
    columns' types."""
    pa, pq = arrow()
    path = folder / entry["file"]
    try:
        # Verified: the whole file, hashed, then parsed from those very bytes.  Unverified: only
        # the columns asked for are read from disk.
        data = path.read_bytes() if verify else None
        size = len(data) if data is not None else path.stat().st_size
    except OSError as exc:
        raise DatasetError(f"cannot read shard {path} ({exc}): the dataset is incomplete or "
                           "damaged.") from None
    if size != entry["bytes"]:
        raise DatasetError(f"shard {path} is damaged: {size} bytes, the manifest recorded "
                           f"{entry['bytes']}.")
    if data is not None and sha256_of(data) != entry["sha256"]:
        raise DatasetError(f"shard {path} is damaged: its SHA-256 checksum differs from the one "
                           "recorded in the manifest.")
    try:
        with pa.BufferReader(data) if data is not None else pa.OSFile(str(path)) as source:
            table = pq.read_table(source, columns=columns)
    except (pa.ArrowException, OSError, ValueError, KeyError) as exc:
        raise DatasetError(f"shard {path} cannot be read as Parquet ({exc}).") from None
    if table.num_rows != entry["rows"]:
        raise DatasetError(f"shard {path} holds {table.num_rows} rows, the manifest says "
                           f"{entry['rows']}.")
    if manifest is not None:
        for field in table.schema:
            if not _type_fits(pa, field.type, field.name, manifest):
                raise DatasetError(f"shard {path}: column {field.name!r} has type {field.type}, "
                                   "not the one the manifest describes; the shard is damaged.")
    return table


def _type_fits(pa: Any, kind: Any, name: str, manifest: dict) -> bool:
    if name in BOOKKEEPING:
        return kind == pa.int64()
    if name in manifest["meta"]:
        return str(kind) == manifest["meta"][name]
    spec = manifest["columns"].get(name)
    if spec is None:
        return False
    if spec["kind"] == "sequence":
        if not pa.types.is_list(kind):
            return False
        kind = kind.value_type
    if spec.get("encoding") == "binary":
        itemsize = 2 if spec["dtype"] == "float16" else 4
        return pa.types.is_fixed_size_binary(kind) and kind.byte_width == spec["units"] * itemsize
    return (pa.types.is_fixed_size_list(kind) and kind.list_size == spec["units"]
            and kind.value_type == pa.from_numpy_dtype(spec["dtype"]))


def merge_manifests(parts: list[dict]) -> dict:
    """One manifest from the manifests of the ranks of a ``torchrun`` job."""
    merged = {**parts[0], "rank": None,
              "shards": sorted((s for p in parts for s in p["shards"]),
                               key=lambda s: s["batches"][0][0]),
              "complete": all(p["complete"] for p in parts)}
    merged["columns"] = dict(parts[0]["columns"])
    merged["meta"] = dict(parts[0]["meta"])
    for p in parts[1:]:
        for col, spec in p["columns"].items():
            if merged["columns"].setdefault(col, spec) != spec:
                raise DatasetError(f"column {col!r} differs between ranks: {spec} and "
                                   f"{merged['columns'][col]}.")
        for col, kind in p["meta"].items():
            if merged["meta"].setdefault(col, kind) != kind:
                raise DatasetError(f"meta column {col!r} has type {kind} on one rank and "
                                   f"{merged['meta'][col]} on another.")
    return merged
