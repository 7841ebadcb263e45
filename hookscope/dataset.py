"""Recording a whole dataset: captures streamed to Parquet shards, resumable, multi-process.

``record_dataset`` runs the model's normal forward over an iterable of batches inside one
reusable recorder, reduces each capture to per-example rows (or keeps each example's real
positions), and writes them as Parquet shards with a JSON manifest.  Rows are written as they
arrive, a row group at a time on a background thread: memory holds about two row groups.  A
shard is written to a temporary file and renamed into place, and only then registered in the
manifest (itself replaced atomically), so a run killed at any moment resumes with
``resume=True`` and produces the same dataset as an uninterrupted one.

Under ``torchrun`` (``torch.distributed`` initialised) each rank records every
``world_size``-th batch into its own shards; rank 0 merges the manifests after a barrier.

pyarrow is an optional dependency (``pip install 'hookscope[parquet]'``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .capture import Capture
from .dataset_format import (
    BOOKKEEPING,
    ENCODINGS,
    FORMAT,
    FORMAT_VERSION,
    LIST_VERSION,
    MANIFEST,
    RESUME_HINT,
    arrow,
    merge_manifests,
    read_manifest,
    write_json_atomic,
)
from .dataset_lock import WriterLock
from .errors import DatasetError, InputError, InputTypeError, UnsortError
from .fingerprint import setup_fingerprint
from .frame import capture_mask, capture_rows, check_reduce
from .offload import HostStaging
from .pooling import REDUCTIONS, pool_sequences
from .recorder import Recorder
from .select import by_name

__all__ = ["DatasetError", "record_dataset"]


def _column_names(rec: Any) -> dict[tuple[str, int], str]:
    names = {}
    for name in rec:
        caps = rec.calls(name) if rec._captures[name] else []
        for c in caps:
            key = c.label if c.label is not None else str(c.call)
            names[(name, c.call)] = name if len(caps) == 1 else f"{name}:{key}"
    return names


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


class _ShardWriter:
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

    def __init__(self, out: Path, rank: int, manifest: dict, manifest_path: Path) -> None:
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


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def record_dataset(
    model: torch.nn.Module,
    batches: Iterable[Any],
    modules: Any,
    out: str | os.PathLike,
    *,
    reduce: str | Callable | None = None,
    forward: Callable[[torch.nn.Module, Any], Any] | None = None,
    meta: Callable[[Any], Mapping[str, Any]] | None = None,
    lengths: Callable[[Any], Any] | None = None,
    shard_rows: int = 10_000,
    resume: bool = True,
    progress: bool = True,
    bidirectional: bool | None = None,
    store_dtype: torch.dtype = torch.float32,
    vector_encoding: str = "list",
    setup_id: str | None = None,
    **record_options: Any,
) -> Path:
    """Record ``modules`` over every batch and stream the results to Parquet shards in ``out``.

    Parameters
    ----------
    model : nn.Module
        As for :func:`hookscope.record`.
    modules : str, type, nn.Module, or list of them
        As for :func:`hookscope.record`.
    **record_options
        As for :func:`hookscope.record` (``calls=``, ``pick=``, ``dtype=`` (the captured
        dtype) ...), except that ``unsort=`` is a callable ``unsort(batch) -> {module:
        permutation(s)}``: each batch has its own order.
    batches : iterable or sequence
        A DataLoader or any iterable of batches, iterated once in order (every rank iterates
        it and skips the others' batches).  A sequence (``__len__`` and ``__getitem__``, e.g.
        one that builds batch ``i`` on access) is indexed instead: each rank then builds only
        its own batches, and a resumed run only the missing ones.
    out : path
        A new or empty folder, or one written by an earlier run with the same setup (then
        completed batches are skipped when ``resume=True``).  The same setup means the same
        fingerprint: model classes, training flags, parameter and buffer bytes, modules, every
        option, and the callables' code and captured values (see :mod:`hookscope.fingerprint`).
        One writer at a time: a second run on the same folder is refused.
    reduce : callable, {"last", "mean", "max", "sum"} or None
        Length-aware reduction of sequence captures to one vector per example (see
        :meth:`hookscope.Recording.to_frame`).  ``None`` keeps per-example vectors as they are
        and stores sequence captures as each example's real positions (a list of vectors).
    forward : callable, optional
        ``forward(model, batch)`` runs one batch; default ``model(batch)``.
    meta : callable, optional
        ``meta(batch) -> {column: values}`` with one value per example (ids, texts, labels),
        stored beside the vectors.  The same columns, of the same type, in every batch (an
        all-``None`` batch takes the column's type); not named ``batch``, ``row`` or like a
        recorded column.
    lengths : callable, optional
        ``lengths(batch)`` -> ``(batch,)`` sequence lengths or a ``(batch, time)`` mask (True/1
        at real positions, any padding side) for sequence captures that do not know theirs,
        e.g. ``lambda b: b["attention_mask"]`` for a Hugging Face batch; used by ``reduce`` and
        for sequences.  In the caller's order, as the stored rows are: with ``unsort=``, not
        the order a collate function sorted the batch into.
    shard_rows : int
        Rows per shard file: what :meth:`hookscope.DatasetView.iter_chunks` reads at a
        time.  Shards end at batch boundaries, so a shard holds up to ``shard_rows + batch
        size - 1`` rows.  Each shard is written progressively, in row groups of about 4 MiB
        (also ending at batch boundaries), so the writer's memory does not grow with
        ``shard_rows``.
    store_dtype : torch.float32 or torch.float16
        Stored precision of the vectors (``dtype=``, as for :func:`hookscope.record`, is the
        captured precision).
    vector_encoding : {"list", "binary"}
        How vector columns are stored: ``"list"`` (default) as Arrow
        ``fixed_size_list<float>``, a float array per row in pandas, pyarrow and DuckDB;
        ``"binary"`` as fixed-size binary (each row's floats as raw little-endian bytes), which
        Parquet encodes and decodes 5-7 times faster but pandas and DuckDB show as bytes
        (``np.frombuffer(value, "<f4")``); :func:`open_dataset` reads both alike.  A dataset
        with binary columns is format version 3 (hookscope releases before it refuse it).
    setup_id : str, optional
        Vouch for the callables yourself: they are identified by this text instead of by
        their code and captured values (needed when they capture something that cannot be
        fingerprinted).  Change it whenever the callables or what they use change.

    Returns
    -------
    pathlib.Path
        ``out``.  Read it with :func:`open_dataset`, pandas, pyarrow or DuckDB.
    """
    arrow()  # fail before any work if pyarrow is missing
    if store_dtype not in (torch.float32, torch.float16):
        raise InputTypeError(f"store_dtype must be torch.float32 or torch.float16, got "
                        f"{store_dtype!r}.")
    if vector_encoding not in ENCODINGS:
        raise InputError(f"vector_encoding must be one of {ENCODINGS}, got {vector_encoding!r}.")
    if not isinstance(shard_rows, int) or shard_rows < 1:
        raise InputError(f"shard_rows must be a positive int, got {shard_rows!r}.")
    if setup_id is not None and not isinstance(setup_id, str):
        raise InputTypeError(f"setup_id must be a str, got {setup_id!r}.")
    out = Path(out)
    rank, world = _dist()
    if record_options.get("grads"):
        raise InputError("record_dataset runs inference only (no backward pass), so grads=True "
                         "would stay empty; record gradients with hs.record(..., grads=True) "
                         "around your own forward and backward.")
    per_batch_unsort = record_options.pop("unsort", None)
    if per_batch_unsort is not None and not callable(per_batch_unsort):
        raise InputTypeError("record_dataset: unsort= must be a callable batch -> {module: "
                        "permutation(s)}, since every batch has its own order (e.g. lambda "
                        "batch: {'encoder': batch['sort_order']}, where your collate function "
                        "keeps the permutation it sorted by).")
    recorder = Recorder(model, modules, **record_options)
    reducer = None
    if check_reduce(reduce) is not None:  # reduced in the hooks: no whole output is copied
        reducer = _ReduceAtCall(reduce, bidirectional)
        recorder._reduce_at_call(reducer)
    fingerprint = setup_fingerprint(model, by_name(model, modules), {
        "reduce": reduce, "store_dtype": store_dtype, "bidirectional": bidirectional,
        "lengths": lengths, "forward": forward, "meta": meta, "world_size": world,
        "record": {k: by_name(model, v) for k, v in record_options.items()},
        "unsort": per_batch_unsort,
        # (only where not the default: datasets recorded before the option still resume)
        **({"vector_encoding": vector_encoding} if vector_encoding != "list" else {})},
        setup_id)
    _make_folder(out)
    with WriterLock(out, rank):
        manifest_path = out / (MANIFEST if world == 1 else f"manifest-r{rank:03d}.json")
        try:
            version = FORMAT_VERSION if vector_encoding == "binary" else LIST_VERSION
            manifest = _open_for_writing(out, manifest_path, fingerprint, resume, rank,
                                         version)
        except OSError as exc:
            raise DatasetError(f"cannot prepare {out} for writing ({exc}).") from None
        from . import __version__

        manifest.update(fingerprint=fingerprint, model=type(model).__qualname__, rank=rank,
                        world_size=world, hookscope=__version__)
        done = {b for s in manifest["shards"] for b, _ in s["batches"]}
        writer = _ShardWriter(out, rank, manifest, manifest_path)
        bar = _progress_bar(progress, rank)
        t0 = time.perf_counter()
        np_dtype = np.float16 if store_dtype == torch.float16 else np.float32
        try:
            job = _Job(model, recorder, forward or (lambda m, b: m(b)), per_batch_unsort, meta,
                       lengths, reduce, bidirectional, np_dtype, manifest, writer, bar,
                       shard_rows, vector_encoding, reducer)
            _record_batches(job, _batches_to_do(batches, done, rank, world))
            writer.flush()
        finally:
            writer.close()  # a started shard is finished and registered, whatever happened
        manifest["complete"] = True
        write_json_atomic(manifest_path, manifest)
        if bar is not None:
            bar.close()
        if world > 1:
            torch.distributed.barrier()
            if rank == 0:
                parts = [read_manifest(out / f"manifest-r{r:03d}.json") for r in range(world)]
                write_json_atomic(out / MANIFEST, merge_manifests(parts))
            torch.distributed.barrier()
    if progress and rank == 0:
        shards = read_manifest(out / MANIFEST)["shards"]
        print(f"hookscope: {sum(s['rows'] for s in shards)} rows in {len(shards)} shards, "
              f"{sum(s['bytes'] for s in shards) / 2**20:.1f} MiB, "
              f"{time.perf_counter() - t0:.1f} s -> {out}", file=sys.stderr)
    return out


@dataclass
class _Job:
    """What every batch of one ``record_dataset`` call shares."""

    model: torch.nn.Module
    recorder: Recorder
    run: Callable[[torch.nn.Module, Any], Any]
    unsort: Callable[[Any], Any] | None
    meta: Callable[[Any], Mapping[str, Any]] | None
    lengths: Callable[[Any], Any] | None
    reduce: Any
    bidirectional: bool
    np_dtype: Any
    manifest: dict
    writer: _ShardWriter
    bar: Any
    shard_rows: int
    encoding: str
    reducer: _ReduceAtCall | None = None  # reduce= in the hooks (None: reduce=None)
    staging: HostStaging = field(default_factory=HostStaging)  # pinned buffers, reused


def _batches_to_do(batches: Iterable[Any], done: set[int], rank: int,
                   world: int) -> Iterable[tuple[int, Any]]:
    """``(index, batch)`` for this rank's batches not yet written."""
    if hasattr(batches, "__getitem__") and hasattr(batches, "__len__"):
        # A sequence: build only this rank's batches, and not the ones already written.
        mine = (i for i in range(len(batches)) if i % world == rank and i not in done)
        return ((i, batches[i]) for i in mine)
    return ((i, b) for i, b in enumerate(batches) if i % world == rank and i not in done)


def _record_batches(job: _Job, items: Iterable[tuple[int, Any]]) -> None:
    with torch.no_grad():
        for index, batch in items:
            recorder = job.recorder if job.unsort is None else \
                job.recorder.with_unsort(job.unsort(batch))  # this batch's order
            given = None if job.lengths is None else _given_lengths(job.lengths(batch), index)
            if job.reducer is not None:  # the hooks reduce: they need this batch's lengths=
                job.reducer.given, job.reducer.index = given, index
            try:
                with recorder as rec:
                    job.run(job.model, batch)
            except (InputError, UnsortError) as exc:  # raised by the hooks: say which batch
                raise type(exc)(f"batch {index}: {exc}") from None
            if given is not None and job.reducer is None:
                _apply_lengths(rec, given, index)
            columns, n = _batch_columns(rec, job.reduce, job.bidirectional, job.np_dtype,
                                        job.manifest, index, staging=job.staging,
                                        encoding=job.encoding)
            if job.meta is not None:
                columns.update(_meta_columns(job.meta(batch), n, job.manifest, index))
            elif job.manifest["meta"]:
                raise DatasetError(f"batch {index}: meta= gave no columns; earlier batches "
                                   f"had {sorted(job.manifest['meta'])}.")
            columns["batch"] = np.full(n, index, dtype=np.int64)
            columns["row"] = np.arange(n, dtype=np.int64)
            job.writer.add(columns, n, index)
            if job.bar is not None:
                job.bar.update(n)
                job.bar.set_postfix(MB=f"{job.writer.bytes_written / 2**20:.1f}")
            if job.writer.n_buffered >= job.shard_rows:
                job.writer.flush()


class _ReduceAtCall:
    """``reduce=`` run by the recorder's hook on each call (``Plan.rows``): the call's primary
    tensor, where the model left it and in the model's batch order, becomes one row per
    example; the recorder then unsorts the rows.  No copy of the whole output is made, which
    on a sequence model is most of what recording a dataset costs."""

    def __init__(self, reduce: Any, bidirectional: bool | None) -> None:
        self.reduce, self.bidirectional = reduce, bidirectional
        self.given: Tensor | None = None  # this batch's lengths= (checked; caller's order)
        self.index = 0  # this batch's index, for messages

    def __call__(self, cap: Capture, perm: Tensor | None) -> tuple[Tensor, bool]:
        given = None
        if self.given is not None and needs_lengths(cap):
            given = _lengths_for(cap, self.given, self.index)
            if perm is not None:  # given in the caller's order; the capture is the model's
                given = given.index_select(0, perm.argsort())
        t = cap.tensor
        if (given is None and t.ndim == 3 and t.is_floating_point()
                and self.reduce in REDUCTIONS):
            # The common case, without reading anything back from the device: the mask stays
            # where the model call's mask is, and on a GPU finiteness is checked on the host
            # with the batch's one copy (see host_columns).
            keep = cap._mask
            if keep is None and cap.lengths is not None:  # (in NumPy: fewer dispatches)
                keep = torch.from_numpy(np.arange(t.shape[1]) < cap.lengths.numpy()[:, None])
            rows, finite = pool_sequences(t, None if keep is None else keep.to(t.device),
                                          self.reduce, check=t.device.type == "cpu")
            if finite:
                return rows, False
        return capture_rows(cap, self.reduce, bidirectional=self.bidirectional, lengths=given)


def needs_lengths(cap: Capture) -> bool:
    """A sequence capture that knows neither its lengths nor its mask (``lengths=`` is for
    those)."""
    return cap.lengths is None and cap._mask is None and cap.tensor.ndim == 3


def _given_lengths(given: Any, index: int) -> Tensor:
    """``lengths(batch)`` checked: one integer per example, or a ``(batch, time)`` mask (True
    at real positions, either padding side) as bool."""
    known = torch.as_tensor(given).to("cpu")
    is_mask = known.ndim == 2
    if not is_mask and (known.ndim != 1 or known.is_floating_point() or known.is_complex()):
        raise DatasetError(f"batch {index}: lengths= must give one integer per example or a "
                           f"(batch, time) mask, got shape {tuple(known.shape)} of "
                           f"{known.dtype}.")
    return known != 0 if is_mask else known.to(torch.int64)


def _lengths_for(cap: Capture, known: Tensor, index: int) -> Tensor:
    """``known`` (from :func:`_given_lengths`) after checking it fits ``cap``'s sequence."""
    batch, time_steps = cap.tensor.shape[:2]
    is_mask = known.ndim == 2
    if len(known) != batch:
        given_what = "mask rows" if is_mask else "lengths"
        raise DatasetError(f"batch {index}: lengths= gave {len(known)} {given_what}, but "
                           f"{cap.name!r} has {batch} examples.")
    if is_mask and known.shape[1] != time_steps:
        raise DatasetError(f"batch {index}: lengths= gave a mask of {known.shape[1]} "
                           f"positions, but {cap.name!r} has {time_steps}.")
    if not is_mask and len(known) and (int(known.min()) < 0 or int(known.max()) > time_steps):
        raise DatasetError(f"batch {index}: lengths= gave lengths from {int(known.min())} "
                           f"to {int(known.max())}, but {cap.name!r} has {time_steps} "
                           "positions.")
    return known


def _apply_lengths(rec: Any, known: Tensor, index: int) -> None:
    """Give ``lengths=`` (checked by :func:`_given_lengths`) to the sequence captures that
    know neither lengths nor mask."""
    for cap in rec.captures():
        if needs_lengths(cap):
            known = _lengths_for(cap, known, index)
            if known.ndim == 2:
                cap._mask = known
            else:
                cap.lengths = known


def _meta_columns(given: Any, n: int, manifest: dict, index: int) -> dict[str, Any]:
    """``meta(batch)`` as Arrow arrays, checked: names, lengths, and one type per column."""
    pa, _ = arrow()
    if not isinstance(given, Mapping):
        raise DatasetError(f"batch {index}: meta= must return a dict of columns, got "
                           f"{type(given).__name__}.")
    known = manifest["meta"]
    if known and set(given) != set(known):
        raise DatasetError(f"batch {index}: meta= gave columns {sorted(given)}, earlier "
                           f"batches gave {sorted(known)}; every batch needs the same columns.")
    out = {}
    for k, v in given.items():
        if not isinstance(k, str) or k in BOOKKEEPING or k in manifest["columns"]:
            raise DatasetError(f"batch {index}: meta column {k!r} collides with the "
                               "bookkeeping columns 'batch' and 'row' or a recorded column, or "
                               "is not text: rename it.")
        arr = _meta_array(pa, k, v, known.get(k), index)
        if len(arr) != n:
            raise DatasetError(f"batch {index}: meta column {k!r} has {len(arr)} values but "
                               f"the captures have {n} examples.")
        known.setdefault(k, str(arr.type))
        out[k] = arr
    return out


def _meta_array(pa: Any, name: str, values: Any, known: str | None, index: int) -> Any:
    """One batch's values of a meta column as an Arrow array of the column's type."""
    if isinstance(values, str | bytes | Mapping) or not hasattr(values, "__len__"):
        # (a str is a sequence of characters, a dict of its keys: never what was meant)
        raise DatasetError(f"batch {index}: meta column {name!r} must give one value per "
                           f"example (a list, array or tensor), got {type(values).__name__}; "
                           "for the same value on every row, pass [value] * len(batch).")
    try:
        if isinstance(values, pa.Array | pa.ChunkedArray):  # typed by the caller
            arr = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
        else:
            arr = pa.array(values.tolist() if isinstance(values, torch.Tensor | np.ndarray)
                           else list(values))
    except (pa.ArrowException, ValueError, TypeError) as exc:
        raise DatasetError(f"batch {index}: meta column {name!r} cannot be stored ({exc}); "
                           "give it values of one type (numbers, text, bools).") from None
    if pa.types.is_nested(arr.type):
        raise DatasetError(f"batch {index}: meta column {name!r} holds {arr.type}, not one "
                           "scalar per example (numbers, text, bools); store vectors as a "
                           "recorded module's output, or one meta column per component.")
    if known is None or str(arr.type) == known:
        return arr
    if arr.null_count == len(arr):  # all None: take the column's type
        with contextlib.suppress(ValueError, pa.ArrowException):
            return pa.nulls(len(arr), type=pa.type_for_alias(known))
    raise DatasetError(
        f"batch {index}: meta column {name!r} holds {arr.type}, earlier batches held {known}; "
        "a column needs one type in every batch (for a column that starts all None, pass a "
        "typed pyarrow array, e.g. pa.array(values, type=pa.string())).")


def _progress_bar(progress: bool, rank: int) -> Any:
    if not progress:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(unit=" rows", desc=f"recording (rank {rank})", position=rank, file=sys.stderr,
                mininterval=1.0)


def _make_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DatasetError(f"out={str(out)!r} is an existing file, not a folder: record a "
                           "dataset into a new or empty folder.")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "shards").mkdir(exist_ok=True)
    except OSError as exc:
        raise DatasetError(f"cannot create the dataset folder {out} ({exc}).") from None


def _open_for_writing(out: Path, manifest_path: Path, fingerprint: str, resume: bool,
                      rank: int, version: int = LIST_VERSION) -> dict:
    # Temporaries of this rank left by a killed run (this process holds the rank's lock).
    for tmp in [*(out / "shards").glob(f".part-r{rank:03d}-*.parquet.tmp"),
                *out.glob(f".{manifest_path.name}.*.tmp")]:
        tmp.unlink(missing_ok=True)
    if manifest_path.exists():
        manifest = read_manifest(manifest_path)
        if manifest["fingerprint"] != fingerprint:
            raise DatasetError(
                f"{out} holds a dataset recorded with another setup (model "
                f"{manifest.get('model')!r}): the model's weights, buffers or training mode, "
                "the module list, an option, or a callable's code or captured values differ. "
                "Use a new folder, or delete this one to start again.")
        if not resume:
            raise DatasetError(f"{out} already holds a dataset; pass resume=True to continue "
                               "it, or use a new folder.")
        # Shards written but not registered (killed between rename and manifest) are redone.
        known = {Path(s["file"]).name for s in manifest["shards"]}
        for f in (out / "shards").glob(f"part-r{rank:03d}-*.parquet"):
            if f.name not in known:
                f.unlink()
        manifest["complete"] = False
        return manifest
    foreign = [p.name for p in out.iterdir()
               if p.name != "shards" and not p.name.startswith((".", "manifest"))]
    foreign += [f"shards/{p.name}" for p in (out / "shards").iterdir()
                if not p.name.startswith((".", "part-r"))]
    if foreign:
        raise DatasetError(f"{out} holds other files ({', '.join(sorted(foreign)[:5])}): record "
                           "a dataset into a new or empty folder.")
    for f in (out / "shards").glob(f"part-r{rank:03d}-*.parquet"):
        f.unlink()  # written by a run killed before it registered its first shard
    return {"format": FORMAT, "version": version, "columns": {}, "meta": {},
            "shards": [], "complete": False}


def _batch_columns(rec: Any, reduce: Any, bidirectional: bool, np_dtype: Any, manifest: dict,
                   index: int, lengths: Any = None, staging: HostStaging | None = None,
                   encoding: str = "list") -> tuple[dict[str, Any], int]:
    columns: dict[str, Any] = {}
    vectors: dict[str, torch.Tensor] = {}
    n = None
    names = _column_names(rec)
    for cap in rec.captures():
        col = names[(cap.name, cap.call)]
        t = cap.tensor
        # lengths= (integer lengths or a (batch, time) mask) for sequences that know neither.
        given = (lengths if lengths is not None and t.ndim == 3 and cap.mask is None
                 and len(t) == len(lengths) else None)
        if reduce is None and t.ndim == 3:
            mask = capture_mask(cap, given)
            with np.errstate(over="ignore"):  # (an overflow is refused below, clearly)
                arr = t.detach().cpu().float().numpy().astype(np_dtype, copy=False)
            value: Any = list(arr) if mask is None else [
                row[keep] for row, keep in zip(arr, mask.numpy(), strict=True)]
            for row, seq in enumerate(value):  # real positions only: padding may hold anything
                if not np.isfinite(seq).all():
                    position, unit = np.argwhere(~np.isfinite(seq))[0]
                    _refuse_non_finite(f"batch {index}: {col!r} example {row} position "
                                       f"{position} (unit {unit})")
            kind, units, rows = "sequence", arr.shape[2], len(value)
        else:  # reduced where the capture is (the GPU); moved below, with the others
            value, _ = capture_rows(cap, reduce, bidirectional=bidirectional, lengths=given)
            vectors[col] = value
            kind, units, rows = "vector", value.shape[1], value.shape[0]
        if col in BOOKKEEPING:
            raise DatasetError(f"a recorded module is named {col!r}, like a bookkeeping "
                               "column; record it under its parent or a renamed wrapper.")
        spec = {"module": cap.name, "call": cap.label if cap.label is not None else cap.call,
                "kind": kind, "units": int(units), "dtype": np.dtype(np_dtype).name}
        if encoding == "binary" and kind == "vector":
            spec["encoding"] = "binary"
        known = manifest["columns"].setdefault(col, spec)
        if known != spec:
            raise DatasetError(
                f"batch {index}: {col!r} now gives {spec['kind']} of {spec['units']} units, "
                f"earlier batches gave {known['kind']} of {known['units']}; a module's output "
                "must keep its shape (only sequence lengths may vary).")
        if n is None:
            n = rows
        elif rows != n:
            raise DatasetError(f"batch {index}: {col!r} has {rows} examples, other captures "
                               f"have {n}; select modules that see the same examples.")
        columns[col] = value  # a vector: replaced by its host array below
    if n is None:
        raise DatasetError(f"batch {index}: no selected module ran.")
    columns.update(host_columns(vectors, np_dtype, staging, index))
    return columns, n


def host_columns(vectors: dict[str, torch.Tensor], np_dtype: Any,
                 staging: HostStaging | None = None, index: int = 0) -> dict[str, np.ndarray]:
    """A batch's vector columns ``(batch, units)`` as NumPy in the stored dtype, with one
    device-to-host copy for all of them: cast and laid side by side on their device, copied
    into a pinned buffer (``staging``'s, reused) without waiting, then one wait.  CPU tensors
    are only cast (a float32 column is not copied here: the shard writer concatenates)."""
    if not vectors:
        return {}
    dtype = torch.float16 if np.dtype(np_dtype) == np.float16 else torch.float32
    parts = [v.detach().to(dtype) for v in vectors.values()]
    staging = staging or HostStaging()
    if not all(staging.copies_async(p) for p in parts):  # the CPU: nothing to move
        out = {k: p.cpu().numpy() for k, p in zip(vectors, parts, strict=True)}
    else:
        host = staging.to_host(torch.cat([p.to(parts[0].device) for p in parts], dim=1), None)
        staging.synchronize()  # the batch's one wait
        arr = host.numpy()
        bounds = np.cumsum([0, *(p.shape[1] for p in parts)])
        out = {k: arr[:, a:b] for k, a, b in zip(vectors, bounds[:-1], bounds[1:],
                                                 strict=True)}
    for name, arr in out.items():
        check_rows_finite(arr, name, index)
    return out


def check_rows_finite(arr: np.ndarray, column: str, index: int) -> None:
    """Stored vectors are finite: the reductions on a GPU are checked here, on the host, once
    per batch (reading back each one where it is computed would wait for the GPU)."""
    if np.isfinite(arr).all():
        return
    row, unit = np.argwhere(~np.isfinite(arr))[0]
    _refuse_non_finite(f"batch {index}: {column!r} row {row} (unit {unit})")


def _refuse_non_finite(where: str) -> None:
    raise InputError(f"{where} is NaN or infinity, from NaN or infinity at a real position, an "
                     "example with no real position, or an overflow of the stored dtype "
                     "(store_dtype=torch.float16 holds up to 65504); hookscope never stores "
                     "them: clean or drop those items first.")
