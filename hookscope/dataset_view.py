"""Reading a dataset written by :func:`hookscope.record_dataset`: a lazy, read-only view.

Knows the on-disk layout (``manifest.json`` + Parquet shards with ``batch`` and ``row``
columns), not the recorder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .dataset import MANIFEST, DatasetError, _arrow, _read_manifest

__all__ = ["DatasetView", "open_dataset"]


class DatasetView:
    """A lazy view of a recorded dataset (see :func:`open_dataset`)."""

    def __init__(self, path: Path, manifest: dict) -> None:
        self.path = path
        self.manifest = manifest
        self.columns = list(manifest["columns"])

    def __len__(self) -> int:
        return sum(s["rows"] for s in self.manifest["shards"])

    def __repr__(self) -> str:
        return (f"DatasetView({str(self.path)!r}: {len(self)} rows, "
                f"{len(self.manifest['shards'])} shards, columns {self.columns})")

    def _example_ids(self) -> list[np.ndarray]:
        """Per shard, the example id of each of its rows: the rank of ``(batch, row)`` over the
        whole dataset (reads only those two small columns)."""
        _, pq = _arrow()
        keys = [pq.read_table(self.path / s["file"], columns=["batch", "row"])
                for s in self.manifest["shards"]]
        if not keys:
            raise DatasetError(f"{self.path} holds no rows yet.")
        batch = np.concatenate([k["batch"].to_numpy() for k in keys])
        row = np.concatenate([k["row"].to_numpy() for k in keys])
        ids = np.empty(len(batch), dtype=np.int64)
        ids[np.lexsort((row, batch))] = np.arange(len(batch))
        return np.split(ids, np.cumsum([len(k) for k in keys])[:-1])

    def _table(self, columns: list[str], rows: Any = None) -> Any:
        """The columns in example order, optionally only ``rows`` (a slice or example ids)."""
        pa, pq = _arrow()
        ids = np.concatenate(self._example_ids())
        wanted = np.arange(len(ids))[rows] if rows is not None else None
        table = pa.concat_tables([pq.read_table(self.path / s["file"], columns=columns)
                                  for s in self.manifest["shards"]])
        order = np.argsort(ids, kind="stable")  # position in the table of example i
        return table.take(pa.array(order if wanted is None else order[wanted]))

    def numpy(self, column: str, rows: Any = None) -> np.ndarray:
        """A vector column as one ``(rows, units)`` array, in example order (``rows``: a slice
        or an array of example ids, to read only those)."""
        spec = self._vector_spec(column)
        col = self._table([column], rows)[column].combine_chunks()
        return col.values.to_numpy(zero_copy_only=False).reshape(-1, spec["units"])

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
        _, pq = _arrow()
        schema = pq.read_schema(self.path / self.manifest["shards"][0]["file"])
        extra = [n for n in schema.names if n not in self.manifest["columns"]]
        frame = self._table(extra, rows).to_pandas()
        ids = np.arange(len(self))[rows] if rows is not None else np.arange(len(frame))
        frame.index = pd.Index(ids, name="example")
        return frame

    def to_frame(self, columns: list[str] | None = None, rows: Any = None) -> pd.DataFrame:
        """Wide DataFrame: one row per example, ``(column, unit)`` columns, metadata first."""
        columns = self.columns if columns is None else columns
        meta = self.meta(rows)
        parts = [meta]
        for c in columns:
            m = self.numpy(c, rows)
            parts.append(pd.DataFrame(m, index=meta.index, copy=False,
                                      columns=pd.MultiIndex.from_product([[c], range(
                                          m.shape[1])])))
        return pd.concat(parts, axis=1)

    def iter_chunks(self, column: str) -> Any:
        """Stream a vector column one shard at a time: yields ``(example_ids, array)``, so that
        a matrix larger than memory can be processed (e.g. as ``queries=`` of
        :func:`hookscope.nearest_neighbors`) without loading it whole."""
        _, pq = _arrow()
        spec = self._vector_spec(column)
        for shard, ids in zip(self.manifest["shards"], self._example_ids(), strict=True):
            col = pq.read_table(self.path / shard["file"], columns=[column])[column]
            yield ids, col.combine_chunks().values.to_numpy(zero_copy_only=False).reshape(
                -1, spec["units"])


def open_dataset(path: str | os.PathLike) -> DatasetView:
    """Open a dataset written by :func:`record_dataset` (complete or not)."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        raise DatasetError(f"{path} has no {MANIFEST}: not a hookscope dataset (or a "
                           "multi-process run that did not finish).")
    return DatasetView(path, _read_manifest(manifest_path))
