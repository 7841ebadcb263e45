"""Reading a dataset written by :func:`hookscope.record_dataset`: a lazy, read-only view.

Knows the on-disk format (:mod:`hookscope.dataset_format`), not the recorder.  Example ids come
from the manifest alone (each shard lists its batches and their rows), so selecting rows reads
only the shards that hold them, and every shard read is checked against its SHA-256.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .dataset_format import BOOKKEEPING, MANIFEST, arrow, read_manifest, read_shard
from .errors import DatasetError

__all__ = ["DatasetView", "open_dataset"]


class DatasetView:
    """A lazy view of a recorded dataset (see :func:`open_dataset`)."""

    def __init__(self, path: Path, manifest: dict, verify: bool = True) -> None:
        self.path = path
        self.manifest = manifest
        self.verify = verify
        self.columns = list(manifest["columns"])
        self._ids: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return sum(s["rows"] for s in self.manifest["shards"])

    @property
    def complete(self) -> bool:
        """Whether the recording ran to its end (``False``: a run that stopped or was killed
        part-way; the rows written so far are readable, and ``record_dataset`` resumes it)."""
        return bool(self.manifest.get("complete"))

    def __repr__(self) -> str:
        partial = "" if self.complete else "INCOMPLETE, "
        return (f"DatasetView({str(self.path)!r}: {partial}{len(self)} rows, "
                f"{len(self.manifest['shards'])} shards, columns {self.columns})")

    def _example_ids(self) -> list[np.ndarray]:
        """Per shard, the example id of each of its rows: the rank of ``(batch, row)`` over the
        whole dataset, from the manifest's batch lists (no shard is read; computed once)."""
        if self._ids is None:
            pairs = sorted(p for s in self.manifest["shards"] for p in s["batches"])
            counts = [n for _, n in pairs]
            starts = dict(zip((b for b, _ in pairs), np.cumsum([0, *counts])[:-1].tolist(),
                              strict=True))
            self._ids = [np.concatenate([np.arange(starts[b], starts[b] + n, dtype=np.int64)
                                         for b, n in s["batches"]])
                         for s in self.manifest["shards"]]
        return self._ids

    def _shard(self, entry: dict, columns: list[str]) -> Any:
        return read_shard(self.path, entry, columns, verify=self.verify, manifest=self.manifest)

    def _table(self, columns: list[str], rows: Any = None) -> Any:
        """The columns in example order, optionally only ``rows`` (a slice or example ids);
        reads only the shards that hold the rows asked for."""
        pa, _ = arrow()
        shard_ids = self._example_ids()
        n = len(self)
        try:
            wanted = np.arange(n)[rows] if rows is not None else np.arange(n)
        except IndexError as exc:
            raise IndexError(f"rows={rows!r}: {exc} (the dataset has {n} rows).") from None
        wanted = np.atleast_1d(wanted)
        shard_of = np.empty(n, dtype=np.int64)
        position = np.empty(n, dtype=np.int64)
        for i, ids in enumerate(shard_ids):
            shard_of[ids] = i
            position[ids] = np.arange(len(ids))
        needed = np.unique(shard_of[wanted])
        if not len(needed):
            return self._empty(columns)
        tables = [self._shard(self.manifest["shards"][i], columns) for i in needed]
        offsets = np.zeros(len(self.manifest["shards"]), dtype=np.int64)
        offsets[needed] = np.cumsum([0] + [t.num_rows for t in tables[:-1]])
        take = offsets[shard_of[wanted]] + position[wanted]
        return pa.concat_tables(tables).take(pa.array(take))

    def _empty(self, columns: list[str]) -> Any:
        pa, _ = arrow()
        fields = []
        for c in columns:
            if c in BOOKKEEPING:
                fields.append(pa.field(c, pa.int64()))
            elif c in self.manifest["meta"]:
                try:
                    fields.append(pa.field(c, pa.type_for_alias(self.manifest["meta"][c])))
                except ValueError:
                    fields.append(pa.field(c, pa.null()))
            else:
                spec = self.manifest["columns"][c]
                dtype = np.dtype(spec["dtype"])
                fields.append(pa.field(c, pa.binary(spec["units"] * dtype.itemsize)
                                       if spec.get("encoding") == "binary" else
                                       pa.list_(pa.from_numpy_dtype(dtype), spec["units"])))
        return pa.schema(fields).empty_table()

    def _matrix(self, table: Any, column: str) -> np.ndarray:
        spec = self._vector_spec(column)
        col = table[column].combine_chunks()
        if spec.get("encoding") == "binary":  # each row's floats as raw bytes (format 3)
            dtype = np.dtype(spec["dtype"]).newbyteorder("<")
            width = spec["units"] * dtype.itemsize
            data = np.frombuffer(col.buffers()[1], np.uint8)
            data = data[col.offset * width:(col.offset + len(col)) * width]
            return data.view(dtype).reshape(-1, spec["units"])
        return col.values.to_numpy(zero_copy_only=False).reshape(-1, spec["units"])

    def numpy(self, column: str, rows: Any = None) -> np.ndarray:
        """A vector column as one ``(rows, units)`` array, in example order (``rows``: a slice
        or an array of example ids, to read only the shards that hold them)."""
        self._vector_spec(column)
        return self._matrix(self._table([column], rows), column)

    def _vector_spec(self, column: str) -> dict:
        spec = self._spec(column)
        if spec["kind"] != "vector":
            raise DatasetError(f"{column!r} holds sequences (each example's positions); read "
                               "it with pyarrow or pandas, or record it with reduce=.")
        return spec

    def _spec(self, column: str) -> dict:
        try:
            return self.manifest["columns"][column]
        except KeyError:
            raise DatasetError(f"no column {column!r}; columns: {self.columns}.") from None

    def meta(self, rows: Any = None) -> pd.DataFrame:
        """The metadata columns (and ``batch``, ``row``), indexed by example id."""
        extra = [*self.manifest["meta"], *BOOKKEEPING]
        frame = self._table(extra, rows).to_pandas()
        ids = np.atleast_1d(np.arange(len(self))[rows]) if rows is not None else np.arange(
            len(frame))
        frame.index = pd.Index(ids, name="example")
        return frame

    def to_frame(self, columns: list[str] | None = None, rows: Any = None) -> pd.DataFrame:
        """Wide DataFrame: one row per example, ``(column, unit)`` columns, metadata first.

        The columns are a two-level index throughout: a metadata or bookkeeping column is
        ``(name, "")``, so ``frame["encoder"]`` is that column's units and ``frame["text"]``
        (pandas' rule for an empty second level) the metadata as a Series."""
        columns = self.columns if columns is None else columns
        for c in columns:
            self._vector_spec(c)
        extra = [*self.manifest["meta"], *BOOKKEEPING]
        table = self._table([*extra, *columns], rows)  # each shard read (and verified) once
        meta = table.select(extra).to_pandas()
        meta.columns = pd.MultiIndex.from_arrays([list(meta.columns), [""] * len(extra)])
        meta.index = pd.Index(np.atleast_1d(np.arange(len(self))[rows]) if rows is not None
                              else np.arange(len(meta)), name="example")
        parts = [meta]
        for c in columns:
            m = self._matrix(table, c)
            parts.append(pd.DataFrame(m, index=meta.index, copy=False,
                                      columns=pd.MultiIndex.from_product([[c], range(
                                          m.shape[1])])))
        return pd.concat(parts, axis=1)

    def iter_chunks(self, column: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream a vector column one shard at a time: yields ``(example_ids, array)``, so that
        a matrix larger than memory can be processed (e.g. as ``queries=`` of
        :func:`hookscope.nearest_neighbors`) without loading it whole."""
        self._vector_spec(column)
        for shard, ids in zip(self.manifest["shards"], self._example_ids(), strict=True):
            yield ids, self._matrix(self._shard(shard, [column]), column)


def open_dataset(path: str | os.PathLike, *, verify: bool = True) -> DatasetView:
    """Open a dataset written by :func:`record_dataset` (complete or not: an incomplete one
    opens with a ``UserWarning``, and ``DatasetView.complete`` says which).

    The manifest is validated when opened, and each shard's size and SHA-256 checksum when it
    is read: a damaged or edited dataset raises :class:`DatasetError` naming the file.
    ``verify=False`` skips the checksums (not the other checks) for speed.
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        if (path / "shards").is_dir():  # record_dataset made the folder, then stopped
            raise DatasetError(
                f"{path} has no {MANIFEST}: its recording stopped before a first batch was "
                "written (or it is a multi-process run that did not finish). Run the same "
                "record_dataset(...) again to record it.")
        raise DatasetError(f"{path} has no {MANIFEST}: not a hookscope dataset (or a "
                           "multi-process run that did not finish).")
    view = DatasetView(path, read_manifest(manifest_path), verify=verify)
    if not view.complete:
        warnings.warn(f"{path} is incomplete: its recording stopped before the end, and only "
                      f"the {len(view)} rows written so far are here. Run the same "
                      "record_dataset(...) again to finish it (it resumes).", stacklevel=2)
    return view
