"""Writing a dataset's shards: rows streamed to Parquet, a row group at a time, on a
background thread, each shard hashed as it is written, renamed into place when complete and
only then registered in the manifest (see :func:`hookscope.record_dataset`)."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .dataset_format import BOOKKEEPING, RESUME_HINT, arrow, write_json_atomic
from .errors import DatasetError

__all__ = ["ShardWriter"]


# Row groups end at the first batch boundary after this many buffered bytes.  Measured on the
# story BiLSTM (2 shared cores, one model thread; 4 KiB per row, shards of 4,096 rows = 16 MiB):
# the main thread's wait for the last group after the last batch was 8 / 10 / 26 / 39 / 67 ms
# with groups of 1 / 2 / 4 / 8 MiB / one per shard (list encoding; about half with binary),
# while the writer thread's CPU time stayed the same (0.07-0.10 s per 16 MiB).  Reading
# (open_dataset numpy/to_frame, pandas; 20,000 rows) was 10-20 % slower with 1 MiB groups and
# the same from 2 MiB up as with one group per shard.  4 MiB: a short tail with a margin on
# reading, and the writer holds about two groups (8 MiB) whatever the shard size.
_ROW_GROUP_BYTES = 4 << 20


class _HashingFile:
    """A write-only file that hashes the bytes it writes: the shard's SHA-256 is of exactly
    the bytes on disk, without reading the file back."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sha256 = hashlib.sha256()
        self.size = 0
        self._file = open(path, "wb")  # noqa: SIM115 (closed by close(), after the footer)

    @property
    def closed(self) -> bool:
        return self._file.closed

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.sha256.update(view)  # releases the GIL for large buffers, as the write does
        self._file.write(view)
        self.size += len(view)
        return len(view)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


@dataclass
class _OpenShard:
    """The shard being written (owned by the writer thread)."""

    final: Path
    tmp: Path
    file: _HashingFile
    parquet: Any  # pyarrow.parquet.ParquetWriter


def _nbytes(value: Any) -> int:
    """Bytes of one batch's column (a NumPy array, a list of sequences, or an Arrow array)."""
    if isinstance(value, list):
        return sum(s.nbytes for s in value)
    return int(value.nbytes)


class ShardWriter:
    """Streams rows to Parquet shards, one row group at a time, on a background thread.

    The main thread only collects each batch's columns (NumPy arrays, Arrow meta arrays);
    once about :data:`_ROW_GROUP_BYTES` are collected they go to the writer thread, which
    builds the Arrow table, encodes it as the next row group of the open shard and writes it
    (Parquet encoding, hashing and disk I/O release the GIL, so they overlap the next batches'
    forward passes).  A shard ends at the first batch boundary after ``shard_rows`` rows: its
    last group and the footer are written, and it is renamed into place and registered.  So
    after the last batch only that small remainder is left to write.  A row group is handed
    over only once the previous ones are written: memory stays at about two row groups (one
    being written, one being collected).  Tasks run in order; after a failed one the others
    are skipped, and the error is raised at the next ``add``, ``flush`` or ``close``."""

    def __init__(self, out: Path, rank: int, manifest: dict, manifest_path: Path,
                 late: Callable[[], dict] | None = None) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.out, self.rank, self.manifest, self.manifest_path = out, rank, manifest, manifest_path
        self.parts: list[dict[str, Any]] = []  # the batches of the row group being collected
        self.part_bytes = 0
        self.n_buffered = 0  # rows of the current shard not yet registered
        self.batches: list[list[int]] = []  # [batch index, rows] of the current shard
        self.bytes_written = 0
        self.next_index = len([s for s in manifest["shards"] if s["rank"] == rank])
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hookscope-shards")
        self.pending: deque[tuple[Any, dict | None]] = deque()  # (future, entry) in order
        # The writer thread's: the open shard, the shards it registered, whether a task failed.
        self.open: _OpenShard | None = None
        self.registered = list(manifest["shards"])
        self.failed = False
        # Manifest fields known only later (the fingerprint, hashed while the first batches
        # run): merged in by the first flush, before any shard is registered.
        self.late = late

    def add(self, columns: dict[str, Any], n: int, batch_index: int) -> None:
        self._collect(block=False)  # a failed write stops the run at the next batch
        self.parts.append(columns)
        self.part_bytes += sum(_nbytes(v) for v in columns.values())
        self.n_buffered += n
        self.batches.append([batch_index, n])
        if self.part_bytes >= _ROW_GROUP_BYTES:
            self._submit(None)

    def flush(self) -> None:
        """End the current shard: its last row group, footer, rename and registration go to
        the writer thread."""
        if self.late is not None:
            self.manifest.update(self.late())  # (an error here registers nothing)
            self.late = None
        if not self.batches:  # (a batch of no examples is registered too: batches stay 0..n-1)
            return
        name = f"part-r{self.rank:03d}-{self.next_index:06d}.parquet"
        entry = {"file": f"shards/{name}", "rank": self.rank, "rows": self.n_buffered,
                 "batches": self.batches}
        self.n_buffered, self.batches = 0, []
        self._submit(entry)
        self.next_index += 1

    def _submit(self, entry: dict | None) -> None:
        """Hand the collected batches to the writer thread (after its previous task), as a
        row group of the current shard; ``entry`` (the shard's manifest entry) ends it."""
        parts, self.parts, self.part_bytes = self.parts, [], 0
        # Rows wait for the rows before them (the memory bound); a shard's end alone (when its
        # last group was just handed over) does not: it queues behind them.
        self._collect(block=bool(parts))
        name = f"part-r{self.rank:03d}-{self.next_index:06d}.parquet"
        self.pending.append((self.pool.submit(self._task, parts, name, entry), entry))

    def _task(self, parts: list[dict[str, Any]], name: str, entry: dict | None) -> bool:
        """On the writer thread: :meth:`_write`, unless an earlier task failed (then nothing:
        ``False``)."""
        if self.failed:
            return False
        try:
            self._write(parts, name, entry)
        except BaseException:
            self.failed = True
            raise
        return True

    def _write(self, parts: list[dict[str, Any]], name: str, entry: dict | None) -> None:
        """One row group of shard ``name``; with ``entry``, also the footer, the rename and
        the registration."""
        final = self.out / "shards" / name
        tmp = final.with_name(f".{name}.tmp")
        try:
            if parts:
                table = self._group_table(parts)
                if self.open is None:
                    self.open = self._open(final, tmp, table.schema)
                self.open.parquet.write_table(table, row_group_size=max(1, table.num_rows))
            if entry is not None:
                shard, self.open = self.open, None
                try:
                    shard.parquet.close()  # the footer
                finally:
                    shard.file.close()
                entry.update(bytes=shard.file.size, sha256=shard.file.sha256.hexdigest())
                os.replace(tmp, final)
        except OSError as exc:
            self._abort()
            with contextlib.suppress(OSError):  # a read-only filesystem refuses this too
                tmp.unlink(missing_ok=True)
            raise DatasetError(
                f"writing shard {final} failed ({exc}); the {len(self.registered)} "
                f"completed shards: {RESUME_HINT}") from exc
        if entry is not None:  # registered only once complete
            write_json_atomic(self.manifest_path, {**self.manifest,
                                                   "shards": [*self.registered, entry]})
            self.registered.append(entry)

    def _open(self, final: Path, tmp: Path, schema: Any) -> _OpenShard:
        _, pq = arrow()
        vectors = set(self.manifest["columns"])
        other = [c for c in schema.names if c not in vectors]
        file = _HashingFile(tmp)
        try:
            # Floats do not compress: store vectors plain (fast), compress the rest.
            parquet = pq.ParquetWriter(file, schema, compression={
                c: "none" if c in vectors else "snappy" for c in schema.names},
                use_dictionary=other, write_statistics=other)
        except BaseException:
            file.close()
            raise
        return _OpenShard(final, tmp, file, parquet)

    def _abort(self) -> None:
        """Drop the open shard (its temporary file is removed by the caller or, after a
        kill, by the next run)."""
        shard, self.open = self.open, None
        if shard is None:
            return
        with contextlib.suppress(Exception):  # failing again (the disk is full): the file
            shard.parquet.close()  # handle is still closed below
        shard.file.close()

    def _group_table(self, parts: list[dict[str, Any]]) -> Any:
        """The collected batches as one Arrow table: one chunk per batch and column (the
        arrays wrap the batches' NumPy memory; Parquet encodes the chunks without joining)."""
        pa, _ = arrow()
        names = list(parts[0])
        return pa.Table.from_arrays(
            [pa.chunked_array([self._array(pa, name, p[name]) for p in parts])
             for name in names], names=names)

    def _array(self, pa: Any, name: str, value: Any) -> Any:
        """One batch's column as an Arrow array of the column's stored type."""
        spec = self.manifest["columns"].get(name)
        if spec is None and name in BOOKKEEPING:
            return pa.array(value)
        if spec is None:  # meta: an Arrow array already, of the column's one type
            return value
        if spec["kind"] == "vector":
            if spec.get("encoding") == "binary":  # raw little-endian rows (format 3)
                mat = np.ascontiguousarray(value, value.dtype.newbyteorder("<"))
                return pa.FixedSizeBinaryArray.from_buffers(
                    pa.binary(mat.shape[1] * mat.itemsize), len(mat), [None, pa.py_buffer(mat)])
            return pa.FixedSizeListArray.from_arrays(pa.array(value.reshape(-1)),
                                                     value.shape[1])
        # sequence: each example's real positions, a list of fixed-size vectors
        lengths = np.array([len(s) for s in value])
        flat = np.concatenate([s.reshape(-1) for s in value]) if value else np.empty(
            0, spec["dtype"])
        inner = pa.FixedSizeListArray.from_arrays(pa.array(flat), spec["units"])
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), inner)

    def _collect(self, block: bool) -> None:
        """Collect the finished tasks in order (with ``block``, wait for all of them): register
        the shards they ended, or raise the first error."""
        while self.pending and (block or self.pending[0][0].done()):
            future, entry = self.pending.popleft()
            if future.result() and entry is not None:
                self.bytes_written += entry["bytes"]
                self.manifest["shards"].append(entry)

    def close(self) -> None:
        """Finish the pending tasks and stop the thread.  A shard not yet ended (the run
        stopped on an error) is dropped, as its rows were before: a resumed run records
        them."""
        try:
            self._collect(block=True)
        finally:
            self.pool.shutdown(wait=True)
            shard = self.open
            self._abort()
            if shard is not None:
                with contextlib.suppress(OSError):
                    shard.tmp.unlink(missing_ok=True)
