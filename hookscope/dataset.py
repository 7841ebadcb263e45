"""Recording a whole dataset: captures streamed to Parquet shards, resumable, multi-process.

``record_dataset`` runs the model's normal forward over an iterable of batches inside one
reusable recorder, reduces each capture to per-example rows (or keeps each example's real
positions), and writes them as Parquet shards with a JSON manifest.  Memory holds one shard at a
time.  A shard is written to a temporary file and renamed into place, and only then registered
in the manifest (itself replaced atomically), so a run killed at any moment resumes with
``resume=True`` and produces the same dataset as an uninterrupted one.

Under ``torchrun`` (``torch.distributed`` initialised) each rank records every
``world_size``-th batch into its own shards; rank 0 merges the manifests after a barrier.

pyarrow is an optional dependency (``pip install 'hookscope[parquet]'``).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import DatasetError
from .frame import capture_mask, capture_matrix
from .recorder import Recorder

__all__ = ["DatasetError", "record_dataset"]

FORMAT = "hookscope-dataset"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def _arrow() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("record_dataset/open_dataset need pyarrow: pip install pyarrow "
                          "(or pip install 'hookscope[parquet]').") from None
    return pa, pq


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _describe(value: Any) -> Any:
    """A JSON-able description that is the same in every run (callables by name, not id)."""
    if isinstance(value, Mapping):
        return {str(k): _describe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_describe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)}"
    if isinstance(value, type):
        return value.__qualname__
    if callable(value):
        return f"callable:{getattr(value, '__qualname__', type(value).__qualname__)}"
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _fingerprint(model: torch.nn.Module, modules: Any, options: dict) -> str:
    """Identifies the model (class, parameter names, shapes and a checksum of the values) and
    the recording options, so that a changed setup never appends to an old dataset."""
    h = hashlib.sha256()
    h.update(type(model).__qualname__.encode())
    with torch.no_grad():
        for name, p in model.state_dict().items():
            h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
            if p.is_floating_point() and p.numel():
                h.update(f"{float(p.double().sum()):.10e}".encode())
    h.update(json.dumps([str(m) for m in modules]).encode())
    h.update(json.dumps(options, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def _column_names(rec: Any) -> dict[tuple[str, int], str]:
    names = {}
    for name in rec:
        caps = rec.calls(name) if rec._captures[name] else []
        for c in caps:
            key = c.label if c.label is not None else str(c.call)
            names[(name, c.call)] = name if len(caps) == 1 else f"{name}:{key}"
    return names


class _ShardWriter:
    """Buffers rows; writes each full shard on a background thread (Parquet encoding and disk
    I/O release the GIL, so they overlap the next batches' forward passes).  At most one write
    is pending: memory stays at about two shards."""

    def __init__(self, out: Path, rank: int, manifest: dict, manifest_path: Path) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.out, self.rank, self.manifest, self.manifest_path = out, rank, manifest, manifest_path
        self.rows: dict[str, list[Any]] = {}
        self.n_buffered = 0
        self.first_batch: int | None = None
        self.bytes_written = 0
        self.next_index = len([s for s in manifest["shards"] if s["rank"] == rank])
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hookscope-shards")
        self.pending: tuple[Any, dict] | None = None

    def add(self, columns: dict[str, Any], n: int, batch_index: int) -> None:
        if self.first_batch is None:
            self.first_batch = batch_index
        for k, v in columns.items():
            self.rows.setdefault(k, []).append(v)
        self.n_buffered += n
        self.last_batch = batch_index

    def _table(self) -> Any:
        pa, _ = _arrow()
        arrays, names = [], []
        for name, parts in self.rows.items():
            spec = self.manifest["columns"].get(name)
            if spec is None:  # meta, batch, row
                values = np.concatenate(parts) if isinstance(parts[0], np.ndarray) else [
                    x for p in parts for x in p]
                arr = pa.array(values)
            elif spec["kind"] == "vector":
                mat = np.concatenate(parts)
                arr = pa.FixedSizeListArray.from_arrays(pa.array(mat.reshape(-1)), mat.shape[1])
            else:  # sequence: each example's real positions, a list of fixed-size vectors
                seqs = [s for p in parts for s in p]
                lengths = np.array([len(s) for s in seqs])
                flat = np.concatenate([s.reshape(-1) for s in seqs])
                inner = pa.FixedSizeListArray.from_arrays(pa.array(flat), spec["units"])
                offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
                arr = pa.ListArray.from_arrays(pa.array(offsets), inner)
            arrays.append(arr)
            names.append(name)
        return pa.Table.from_arrays(arrays, names=names)

    def flush(self) -> None:
        """Hand the buffered rows to the writer thread (after the previous write finished)."""
        if not self.n_buffered:
            return
        table = self._table()
        name = f"part-r{self.rank:03d}-{self.next_index:06d}.parquet"
        entry = {"file": f"shards/{name}", "rank": self.rank, "rows": self.n_buffered,
                 "batches": [self.first_batch, self.last_batch + 1]}
        self.rows, self.n_buffered, self.first_batch = {}, 0, None
        self.wait()
        self.next_index += 1
        snapshot = json.dumps({**self.manifest, "shards": [*self.manifest["shards"], entry]},
                              indent=1)
        self.pending = (self.pool.submit(self._write, table, name, snapshot), entry)

    def _write(self, table: Any, name: str, manifest_text: str) -> int:
        _, pq = _arrow()
        final = self.out / "shards" / name
        tmp = final.with_name(f".{name}.tmp")
        vectors = set(self.manifest["columns"])
        other = [c for c in table.column_names if c not in vectors]
        try:
            # Floats do not compress: store vectors plain (fast), compress the rest.
            pq.write_table(table, tmp, compression={c: "none" if c in vectors else "snappy"
                                                    for c in table.column_names},
                           use_dictionary=other, write_statistics=other)
            os.replace(tmp, final)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise DatasetError(
                f"writing shard {final} failed ({exc}); the {len(self.manifest['shards'])} "
                "completed shards and the manifest are intact: free space or fix permissions, "
                "then run again with resume=True.") from exc
        manifest_tmp = self.manifest_path.with_name(f".{self.manifest_path.name}.tmp")
        manifest_tmp.write_text(manifest_text)
        os.replace(manifest_tmp, self.manifest_path)  # registered only once complete
        return final.stat().st_size

    def wait(self) -> None:
        """Wait for the pending write; register its shard (or raise its error)."""
        if self.pending is None:
            return
        future, entry = self.pending
        self.pending = None
        self.bytes_written += future.result()
        self.manifest["shards"].append(entry)

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.pool.shutdown(wait=True)


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
    bidirectional: bool = False,
    dtype: torch.dtype = torch.float32,
    **record_options: Any,
) -> Path:
    """Record ``modules`` over every batch and stream the results to Parquet shards in ``out``.

    Parameters
    ----------
    model, modules, **record_options
        As for :func:`hookscope.record` (``calls=``, ``pick=`` ...), except that ``unsort=``
        is a callable ``unsort(batch) -> {module: permutation(s)}``: each batch has its own
        order.
    batches : iterable or sequence
        A DataLoader or any iterable of batches, iterated once in order (every rank iterates
        it and skips the others' batches).  A sequence (``__len__`` and ``__getitem__``, e.g.
        one that builds batch ``i`` on access) is indexed instead: each rank then builds only
        its own batches, and a resumed run only the missing ones.
    out : path
        A new or empty folder, or one written by an earlier run with the same model, modules
        and options (then completed batches are skipped when ``resume=True``).
    reduce : {"last", "mean", "max", "sum"}, callable or None
        Length-aware reduction of sequence captures to one vector per example (see
        :meth:`hookscope.Recording.to_frame`).  ``None`` keeps per-example vectors as they are
        and stores sequence captures as each example's real positions (a list of vectors).
    forward : callable, optional
        ``forward(model, batch)`` runs one batch; default ``model(batch)``.
    meta : callable, optional
        ``meta(batch) -> {column: values}`` with one value per example (ids, texts, labels),
        stored beside the vectors.
    lengths : callable, optional
        ``lengths(batch)`` -> ``(batch,)`` sequence lengths or a ``(batch, time)`` mask (True/1
        at real positions, any padding side) for sequence captures that do not know theirs,
        e.g. ``lambda b: b["attention_mask"]`` for a Hugging Face batch; used by ``reduce`` and
        for sequences.
    shard_rows : int
        Rows per shard (shards end at batch boundaries): the memory bound.
    dtype : torch.float32 or torch.float16
        Stored precision of the vectors.

    Returns
    -------
    pathlib.Path
        ``out``.  Read it with :func:`open_dataset`, pandas, pyarrow or DuckDB.
    """
    _arrow()  # fail before any work if pyarrow is missing
    if dtype not in (torch.float32, torch.float16):
        raise TypeError(f"dtype must be torch.float32 or torch.float16, got {dtype!r}.")
    if not isinstance(shard_rows, int) or shard_rows < 1:
        raise ValueError(f"shard_rows must be a positive int, got {shard_rows!r}.")
    out = Path(out)
    rank, world = _dist()
    per_batch_unsort = record_options.pop("unsort", None)
    if per_batch_unsort is not None and not callable(per_batch_unsort):
        raise TypeError("record_dataset: unsort= must be a callable batch -> {module: "
                        "permutation(s)}, since every batch has its own order (e.g. lambda b: "
                        "{'encoder': [b.premise_orig_idx, b.hypothesis_orig_idx]}).")
    recorder = Recorder(model, modules, **record_options)
    options = _describe({"reduce": reduce, "dtype": dtype, "bidirectional": bidirectional,
                         "lengths": lengths,
                         "world_size": world, "record": record_options,
                         "unsort": per_batch_unsort})
    fingerprint = _fingerprint(model, modules, options)
    manifest_path = out / (MANIFEST if world == 1 else f"manifest-r{rank:03d}.json")
    manifest = _open_for_writing(out, manifest_path, fingerprint, resume, rank)
    manifest.update(fingerprint=fingerprint, model=type(model).__qualname__,
                    options=options, rank=rank, world_size=world)
    from . import __version__

    manifest["hookscope"] = __version__
    done = {b for s in manifest["shards"] for b in range(*s["batches"])}
    writer = _ShardWriter(out, rank, manifest, manifest_path)
    run = forward or (lambda m, b: m(b))
    bar = _progress_bar(progress, rank)
    t0 = time.perf_counter()
    np_dtype = np.float16 if dtype == torch.float16 else np.float32
    try:
        job = _Job(model, recorder, run, per_batch_unsort, meta, lengths, reduce, bidirectional,
                   np_dtype, manifest, writer, bar, shard_rows)
        _record_batches(job, _batches_to_do(batches, done, rank, world))
        writer.flush()
    finally:
        writer.close()  # a started shard is finished and registered, whatever happened
    manifest["complete"] = True
    _write_json_atomic(manifest_path, manifest)
    if bar is not None:
        bar.close()
    if world > 1:
        torch.distributed.barrier()
        if rank == 0:
            _merge_manifests(out, world)
        torch.distributed.barrier()
    if progress and rank == 0:
        total = sum(s["rows"] for s in json.loads((out / MANIFEST).read_text())["shards"])
        size = sum((out / s["file"]).stat().st_size
                   for s in json.loads((out / MANIFEST).read_text())["shards"])
        print(f"hookscope: {total} rows in {len(list((out / 'shards').glob('*.parquet')))} "
              f"shards, {size / 2**20:.1f} MiB, {time.perf_counter() - t0:.1f} s -> {out}",
              file=sys.stderr)
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
            if job.unsort is not None:
                job.recorder._set_unsort(job.unsort(batch))  # this batch's order
            with job.recorder as rec:
                job.run(job.model, batch)
            known = job.lengths(batch) if job.lengths is not None else None
            columns, n = _batch_columns(rec, job.reduce, job.bidirectional, job.np_dtype,
                                        job.manifest, index, known)
            if job.meta is not None:
                for k, v in job.meta(batch).items():
                    values = v.tolist() if isinstance(v, torch.Tensor | np.ndarray) else list(v)
                    if len(values) != n:
                        raise DatasetError(f"batch {index}: meta column {k!r} has "
                                           f"{len(values)} values but the captures have {n} "
                                           "examples.")
                    columns[k] = values
            columns["batch"] = np.full(n, index, dtype=np.int64)
            columns["row"] = np.arange(n, dtype=np.int64)
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


def _open_for_writing(out: Path, manifest_path: Path, fingerprint: str, resume: bool,
                      rank: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / "shards").mkdir(exist_ok=True)
    if manifest_path.exists():
        manifest = _read_manifest(manifest_path)
        if manifest["fingerprint"] != fingerprint:
            raise DatasetError(
                f"{out} holds a dataset recorded with another model, module list or options "
                f"(model {manifest.get('model')!r}); use a new folder, or delete this one to "
                "start again.")
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
    return {"format": FORMAT, "version": FORMAT_VERSION, "columns": {}, "shards": [],
            "complete": False}


def _batch_columns(rec: Any, reduce: Any, bidirectional: bool, np_dtype: Any, manifest: dict,
                   index: int, lengths: Any = None) -> tuple[dict[str, Any], int]:
    columns: dict[str, Any] = {}
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
            arr = t.detach().cpu().float().numpy().astype(np_dtype, copy=False)
            value: Any = list(arr) if mask is None else [
                row[keep] for row, keep in zip(arr, mask.numpy(), strict=True)]
            kind, units, rows = "sequence", arr.shape[2], len(value)
        else:
            value = capture_matrix(cap, reduce, bidirectional=bidirectional,
                                   lengths=given).astype(np_dtype)
            kind, units, rows = "vector", value.shape[1], value.shape[0]
        spec = {"module": cap.name, "call": cap.label if cap.label is not None else cap.call,
                "kind": kind, "units": int(units), "dtype": np.dtype(np_dtype).name}
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
        columns[col] = value
    if n is None:
        raise DatasetError(f"batch {index}: no selected module ran.")
    return columns, n


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise DatasetError(f"{path} is not a hookscope dataset manifest.")
    if manifest.get("version") != FORMAT_VERSION:
        raise DatasetError(f"{path} is hookscope dataset format version "
                           f"{manifest.get('version')!r}; this hookscope reads version "
                           f"{FORMAT_VERSION}. Use a matching hookscope version.")
    return manifest


def _merge_manifests(out: Path, world: int) -> None:
    parts = [_read_manifest(out / f"manifest-r{r:03d}.json") for r in range(world)]
    merged = {**parts[0], "rank": None,
              "shards": sorted((s for p in parts for s in p["shards"]),
                               key=lambda s: s["batches"][0]),
              "complete": all(p["complete"] for p in parts)}
    for p in parts[1:]:
        for col, spec in p["columns"].items():
            merged["columns"].setdefault(col, spec)
    _write_json_atomic(out / MANIFEST, merged)
