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
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .dataset_format import (
    ENCODINGS,
    FORMAT,
    FORMAT_VERSION,
    LIST_VERSION,
    MANIFEST,
    arrow,
    merge_manifests,
    read_manifest,
    write_json_atomic,
)
from .dataset_lock import WriterLock
from .dataset_rows import (
    ReduceAtCall,
    apply_lengths,
    batch_columns,
    given_lengths,
    meta_columns,
)
from .dataset_writer import ShardWriter
from .errors import DatasetError, InputError, InputTypeError, UnsortError
from .fingerprint import start_setup_fingerprint
from .frame import check_reduce
from .offload import HostStaging
from .recorder import Recorder
from .select import by_name

__all__ = ["DatasetError", "record_dataset"]


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
    reduce : callable, {"last", "mean", "max", "sum", "flatten"} or None
        Length-aware reduction of sequence captures to one vector per example (see
        :meth:`hookscope.Recording.to_frame`; feature maps are pooled over their positions,
        ``"flatten"`` keeps every position).  ``None`` keeps per-example vectors as they are
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
        at real positions, any padding side) for every ``(batch, time, features)`` capture,
        e.g. ``lambda b: b["attention_mask"]`` where the model is not given its mask; used by
        ``reduce`` and for sequences.  Given, it wins over the lengths or mask a capture knows
        from the model call (as ``to_frame(lengths=)`` does), and must fit every sequence
        capture (their batch and time sizes), or the batch is an error.  In the caller's
        order, as the stored rows are: with ``unsort=``, not the order a collate function
        sorted the batch into.
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
        reducer = ReduceAtCall(reduce, bidirectional)
        recorder._reduce_at_call(reducer)
    # Hashed while the first batches run (a new dataset's manifest needs it only when its
    # first shard is registered); a resumed run waits for it before appending anything.
    fingerprint = start_setup_fingerprint(model, by_name(model, modules), {
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

        manifest.update(model=type(model).__qualname__, rank=rank, world_size=world,
                        hookscope=__version__)
        done = {b for s in manifest["shards"] for b, _ in s["batches"]}
        writer = ShardWriter(out, rank, manifest, manifest_path,
                             late=lambda: {"fingerprint": fingerprint()})
        bar = _progress_bar(progress, rank)
        t0 = time.perf_counter()
        np_dtype = np.float16 if store_dtype == torch.float16 else np.float32
        try:
            job = _Job(model, recorder, forward or (lambda m, b: m(b)), per_batch_unsort, meta,
                       lengths, reduce, bidirectional, np_dtype, manifest, writer, bar,
                       shard_rows, vector_encoding, reducer, HostStaging())
            try:
                _record_batches(job, _batches_to_do(batches, done, rank, world))
            except BaseException:
                # The batches handed to the writer are complete: end their shard, so that a
                # resumed run starts at the batch that failed (a failing writer fails again).
                with contextlib.suppress(Exception):
                    writer.flush()
                raise
            writer.flush()
        finally:
            writer.close()  # a shard not ended above is dropped; a resumed run redoes it
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
    writer: ShardWriter
    bar: Any
    shard_rows: int
    encoding: str
    reducer: ReduceAtCall | None = None  # reduce= in the hooks (None: reduce=None)
    staging: HostStaging | None = None  # pinned buffers, reused (one per call)
    warned: set[str] = field(default_factory=set)  # captures warned of padding (once a run)
    leaves: dict = field(default_factory=dict)  # column -> (output path it holds, batch)


def _batches_to_do(batches: Iterable[Any], done: set[int], rank: int,
                   world: int) -> Iterable[tuple[int, Any]]:
    """``(index, batch)`` for this rank's batches not yet written."""
    if hasattr(batches, "__getitem__") and hasattr(batches, "__len__"):
        # A sequence: build only this rank's batches, and not the ones already written.
        mine = (i for i in range(len(batches)) if i % world == rank and i not in done)
        return ((i, batches[i]) for i in mine)
    return ((i, b) for i, b in enumerate(batches) if i % world == rank and i not in done)


def _record_batches(job: _Job, items: Iterable[tuple[int, Any]]) -> None:
    """Each batch's forward, then the previous batch's rows to the writer: on a GPU, batch
    *i*'s copy to the host and its columns are finished while batch *i + 1* computes (the
    wait is for batch *i*'s copy alone).  Batches reach the writer in order; a batch whose
    successor fails is still written, so that a resumed run starts after it."""
    previous = None
    with torch.no_grad():
        for index, batch in items:
            try:
                current = _forward(job, index, batch)
            except BaseException:
                if previous is not None:
                    with contextlib.suppress(Exception):  # the first error is the one to see
                        _write(job, *previous)
                raise
            if previous is not None:
                _write(job, *previous)
            previous = current
        if previous is not None:
            _write(job, *previous)


def _forward(job: _Job, index: int, batch: Any) -> tuple[int, dict, int, Callable]:
    """One batch's forward with the hooks, its rows reduced and their copy queued, and its
    other columns."""
    recorder = job.recorder if job.unsort is None else \
        job.recorder.with_unsort(job.unsort(batch))  # this batch's order
    given = None if job.lengths is None else given_lengths(job.lengths(batch), index)
    if job.reducer is not None:  # the hooks reduce: they need this batch's lengths=
        job.reducer.given, job.reducer.index = given, index
    try:
        with recorder as rec:
            job.run(job.model, batch)
        if recorder._rows_redo:  # the first batch of a model that hands its padding mask
            recorder._rows_redo = False  # to a part of itself (mask_scope.py): now known
            with recorder as rec:
                job.run(job.model, batch)
    except (InputError, UnsortError) as exc:  # raised by the hooks: say which batch
        raise type(exc)(f"batch {index}: {exc}") from None
    if given is not None:  # (to the captures the hooks did not reduce: time-major ones)
        apply_lengths(rec, given, index)
    columns, n, vectors = batch_columns(rec, job.reduce, job.bidirectional, job.np_dtype,
                                        job.manifest, index, staging=job.staging,
                                        encoding=job.encoding, warned=job.warned,
                                        leaves=job.leaves)
    # meta= now, not with the rows: an iterable may reuse its batch object for the next one.
    if job.meta is not None:
        columns.update(meta_columns(job.meta(batch), n, job.manifest, index))
    elif job.manifest["meta"]:
        raise DatasetError(f"batch {index}: meta= gave no columns; earlier batches "
                           f"had {sorted(job.manifest['meta'])}.")
    columns["batch"] = np.full(n, index, dtype=np.int64)
    columns["row"] = np.arange(n, dtype=np.int64)
    return index, columns, n, vectors


def _write(job: _Job, index: int, columns: dict, n: int,
           vectors: Callable[[], dict]) -> None:
    """A batch's rows, once on the host, to the writer."""
    columns.update(vectors())
    job.writer.add(columns, n, index)
    if job.bar is not None:
        job.bar.update(n)
        job.bar.set_postfix(MB=f"{job.writer.bytes_written / 2**20:.1f}")
    if job.writer.n_buffered >= job.shard_rows:
        job.writer.flush()


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


def _open_for_writing(out: Path, manifest_path: Path, fingerprint: Callable[[], str],
                      resume: bool, rank: int, version: int = LIST_VERSION) -> dict:
    # Temporaries of this rank left by a killed run (this process holds the rank's lock).
    for tmp in [*(out / "shards").glob(f".part-r{rank:03d}-*.parquet.tmp"),
                *out.glob(f".{manifest_path.name}.*.tmp")]:
        tmp.unlink(missing_ok=True)
    if manifest_path.exists():
        manifest = read_manifest(manifest_path)
        if manifest["fingerprint"] != fingerprint():
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
