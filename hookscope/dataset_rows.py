"""One batch of a dataset: captures reduced to rows (in the hooks, see
:class:`ReduceAtCall`), ``lengths=`` and ``meta=`` checked, and the batch's columns moved to
the host in one copy, checked finite (see :func:`hookscope.record_dataset`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .capture import Capture
from .dataset_format import BOOKKEEPING, arrow
from .errors import DatasetError, InputError
from .frame import (
    batch_first_capture,
    capture_mask,
    capture_rows,
    is_sequence,
    path_text,
    primary_path,
    rnn_state_error,
    warn_unmasked,
)
from .offload import HostStaging
from .pooling import REDUCTIONS, pool_sequences

__all__ = ["ReduceAtCall", "apply_lengths", "batch_columns", "given_lengths", "host_columns",
           "host_columns_later", "meta_columns"]


def _column_names(rec: Any) -> dict[tuple[str, int], str]:
    names = {}
    for name in rec:
        caps = rec.calls(name) if rec._captures[name] else []
        for c in caps:
            key = c.label if c.label is not None else str(c.call)
            names[(name, c.call)] = name if len(caps) == 1 else f"{name}:{key}"
    return names


class ReduceAtCall:
    """``reduce=`` run by the recorder's hook on each call (``Plan.rows``): the call's primary
    tensor, where the model left it and in the model's batch order, becomes one row per
    example; the recorder then unsorts the rows.  No copy of the whole output is made, which
    on a sequence model is most of what recording a dataset costs."""

    def __init__(self, reduce: Any, bidirectional: bool | None) -> None:
        self.reduce, self.bidirectional = reduce, bidirectional
        self.given: Tensor | None = None  # this batch's lengths= (checked; caller's order)
        self.index = 0  # this batch's index, for messages
        self.warned: set[str] = set()  # captures warned of padding (frame.warn_unmasked)

    def __call__(self, cap: Capture, perm: Tensor | None) -> tuple[Tensor, bool]:
        given = None
        if self.given is not None and takes_lengths(cap):
            given = _lengths_for(cap, self.given, self.index)
            if perm is not None:  # given in the caller's order; the capture is the model's
                given = given.index_select(0, perm.argsort())
        t = cap.tensor
        if (given is None and t.ndim == 3 and t.is_floating_point()
                and self.reduce in REDUCTIONS and not cap.feature_map):
            # The common case, without reading anything back from the device: the mask stays
            # where the model call's mask is, and on a GPU finiteness is checked on the host
            # with the batch's one copy (see host_columns).
            keep = cap._mask
            if keep is None and cap.lengths is not None:  # (in NumPy: fewer dispatches)
                keep = torch.from_numpy(np.arange(t.shape[1]) < cap.lengths.numpy()[:, None])
            if (keep is None and cap.name not in self.warned  # (once a run; in the hook,
                    and warn_unmasked(cap, self.reduce, sync=False)):  # no wait for a GPU)
                self.warned.add(cap.name)
            rows, finite = pool_sequences(t, None if keep is None else keep.to(t.device),
                                          self.reduce, check=t.device.type == "cpu")
            if finite:
                return rows, False
        return capture_rows(cap, self.reduce, bidirectional=self.bidirectional, lengths=given)


def takes_lengths(cap: Capture) -> bool:
    """A ``(batch, time, features)`` sequence capture: ``lengths=`` applies to it, and wins
    over the lengths or mask it knows from the model call (as ``to_frame(lengths=)`` does):
    what a caller asks for explicitly is never dropped silently."""
    return is_sequence(cap) and not cap.tensor.is_nested and not cap.rnn_state


def given_lengths(given: Any, index: int) -> Tensor:
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
    """``known`` (from :func:`given_lengths`) after checking it fits ``cap``'s sequence."""
    batch, time_steps = cap.tensor.shape[:2]
    if cap.batch_dim == 1:  # (time, batch, ...)
        batch, time_steps = time_steps, batch
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


def apply_lengths(rec: Any, known: Tensor, index: int) -> None:
    """Give ``lengths=`` (checked by :func:`given_lengths`) to every sequence capture (see
    :func:`takes_lengths`), in place of what it knew."""
    for cap in rec.captures():
        if takes_lengths(cap):
            known = _lengths_for(cap, known, index)
            if known.ndim == 2:
                cap._mask, cap.lengths = known, None
            else:
                cap._mask, cap.lengths = None, known


def meta_columns(given: Any, n: int, manifest: dict, index: int) -> dict[str, Any]:
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
        elif isinstance(values, np.ndarray) and (values.dtype.kind in "mM" or (
                values.dtype.kind == "u" and values.dtype.itemsize == 8)):
            # (tolist() gives datetime64[ns] as integers, and uint64 beyond int64 overflows)
            arr = pa.array(values)
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


def batch_columns(rec: Any, reduce: Any, bidirectional: bool, np_dtype: Any, manifest: dict,
                   index: int, lengths: Any = None, staging: HostStaging | None = None,
                   encoding: str = "list", warned: set[str] | None = None,
                   leaves: dict[str, tuple[tuple, int]] | None = None
                   ) -> tuple[dict[str, Any], int, Callable[[], dict[str, np.ndarray]]]:
    """A batch's columns, the number of its rows, and what gives its vector columns.

    Vectors reduced on a GPU are copied to the host without waiting: calling the third value
    waits for that copy alone and checks the vectors (``record_dataset`` calls it once the
    next batch's forward is queued, so that the GPU computes while the host writes)."""
    columns: dict[str, Any] = {}
    vectors: dict[str, torch.Tensor] = {}
    n = None
    names = _column_names(rec)
    for cap in rec.captures():
        col = names[(cap.name, cap.call)]
        if leaves is not None:  # (the run's first batch tells which tensor a column holds)
            path = primary_path(cap)
            first = leaves.setdefault(col, (path, index))
            if first[0] != path:
                raise DatasetError(
                    f"batch {index}: column {col!r} would hold output{path_text(path)}, but "
                    f"batch {first[1]} gave output{path_text(first[0])} (the module's first "
                    "tensor: an entry before it is None in some batches). Choose the tensor "
                    f"with pick={{{cap.name!r}: lambda out: out{path_text(path or first[0])}}}.")
        layout_dim = cap.batch_dim  # (a layout that changes between batches is an error)
        cap = batch_first_capture(cap)  # (a time-major sequence: its examples along dim 0)
        t = cap.tensor
        # lengths= (integer lengths or a (batch, time) mask) for sequences that know neither.
        sequence = t.ndim == 3 and not cap.feature_map  # (not (batch, channels, length))
        given = (lengths if lengths is not None and sequence and cap.mask is None
                 and len(t) == len(lengths) else None)
        if cap.rnn_state and t.ndim == 3:  # (rows reduced in the hook are refused there)
            raise rnn_state_error(f"batch {index}: {col!r}", tuple(t.shape))
        if reduce is None and sequence:
            with np.errstate(over="ignore"):  # (an overflow is refused below, clearly)
                if t.is_nested:  # (nn.TransformerEncoder's fast path): real positions only
                    value: Any = [c.detach().cpu().float().numpy().astype(np_dtype, copy=False)
                                  for c in t.unbind()]
                    units = t.size(2)
                else:
                    mask = capture_mask(cap, given)
                    if (mask is None and cap.name not in (warned or ())  # (once a run)
                            and warn_unmasked(cap, None) and warned is not None):
                        warned.add(cap.name)
                    arr = t.detach().cpu().float().numpy().astype(np_dtype, copy=False)
                    value = list(arr) if mask is None else [
                        row[keep] for row, keep in zip(arr, mask.numpy(), strict=True)]
                    units = arr.shape[2]
            for row, seq in enumerate(value):  # real positions only: padding may hold anything
                if not np.isfinite(seq).all():
                    position, unit = np.argwhere(~np.isfinite(seq))[0]
                    _refuse_non_finite(f"batch {index}: {col!r} example {row} position "
                                       f"{position} (unit {unit})")
            kind, rows = "sequence", len(value)
        else:  # reduced where the capture is (the GPU); moved below, with the others
            if reduce is None and t.ndim >= 3:  # (to_frame's advice, kind="long", is not ours)
                raise InputError(
                    f"batch {index}: {col!r} is a feature map of shape {tuple(t.shape)} "
                    "(batch, channels, *spatial); record_dataset stores one vector per example, "
                    "or with reduce=None a (batch, time, features) sequence: pass "
                    "reduce='mean'|'max'|'sum' (global pooling), reduce='flatten' (every "
                    "position), or a callable t -> (batch, units).")
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
        if layout_dim:  # (only then: the manifests of batch-first columns are unchanged)
            spec["batch_dim"] = layout_dim
        known = manifest["columns"].setdefault(col, spec)
        if known.get("batch_dim", 0) != spec.get("batch_dim", 0):
            raise DatasetError(
                f"batch {index}: {col!r} holds its examples along dim "
                f"{spec.get('batch_dim', 0)}, earlier batches along dim "
                f"{known.get('batch_dim', 0)}. A time-major (time, batch, ...) output whose "
                "time steps equal its batch size looks batch-first: say where the batch is "
                f"with batch_dim={{{cap.name!r}: 1}} (or 0). A dataset written before "
                "hookscope knew time-major layouts holds one row per time step there: "
                "record it again into a new folder.")
        if known != spec:
            hint = ("" if cap.feature_map or t.ndim > 3 else
                    " (A 3-D output is read as (batch, time, features): if this one is a "
                    "(batch, channels, length) map whose length varies, pool it with "
                    "reduce=lambda t: t.mean(2), or record it with "
                    "pick=lambda out: out.transpose(1, 2).)")
            raise DatasetError(
                f"batch {index}: {col!r} now gives {spec['kind']} of {spec['units']} units, "
                f"earlier batches gave {known['kind']} of {known['units']}; a module's output "
                f"must keep its shape (only sequence lengths may vary).{hint}")
        if n is None:
            n = rows
        elif rows != n:
            raise DatasetError(f"batch {index}: {col!r} has {rows} examples, other captures "
                               f"have {n}; select modules that see the same examples.")
        columns[col] = value  # a vector: replaced by its host array when it is there
    if n is None:
        raise DatasetError(f"batch {index}: no selected module ran.")
    return columns, n, host_columns_later(vectors, np_dtype, staging, index)


def host_columns(vectors: dict[str, torch.Tensor], np_dtype: Any,
                 staging: HostStaging | None = None, index: int = 0) -> dict[str, np.ndarray]:
    """A batch's vector columns ``(batch, units)`` as NumPy in the stored dtype, checked
    (see :func:`host_columns_later`)."""
    return host_columns_later(vectors, np_dtype, staging, index)()


def host_columns_later(vectors: dict[str, torch.Tensor], np_dtype: Any,
                       staging: HostStaging | None = None, index: int = 0
                       ) -> Callable[[], dict[str, np.ndarray]]:
    """What gives a batch's vector columns ``(batch, units)`` as NumPy in the stored dtype,
    with one device-to-host copy for all of them: cast and laid side by side on their device
    and copied into a pinned buffer (``staging``'s, reused) now, without waiting; the call
    waits for that copy alone (not for work queued after it) and checks the rows.  CPU
    tensors are only cast (a float32 column is not copied here: the shard writer
    concatenates)."""
    if not vectors:
        return dict
    for name, v in vectors.items():
        if v.is_complex():  # (the cast below would keep the real part alone)
            raise DatasetError(
                f"batch {index}: column {name!r} is complex ({v.dtype}); vector columns hold "
                "real numbers. Record .real, .abs() or torch.view_as_real(...).flatten(1) "
                "(pick=, or a reduce callable) instead.")
    dtype = torch.float16 if np.dtype(np_dtype) == np.float16 else torch.float32
    parts = [v.detach().to(dtype) for v in vectors.values()]
    staging = staging or HostStaging()
    if not all(staging.copies_async(p) for p in parts):  # the CPU: nothing to move
        def on_host() -> dict[str, np.ndarray]:
            return {k: p.cpu().numpy() for k, p in zip(vectors, parts, strict=True)}
    else:
        host, wait = staging.to_host_marked(
            torch.cat([p.to(parts[0].device) for p in parts], dim=1))
        bounds = np.cumsum([0, *(p.shape[1] for p in parts)])

        def on_host() -> dict[str, np.ndarray]:
            wait()  # the batch's one wait
            arr = host.numpy()
            return {k: arr[:, a:b] for k, a, b in zip(vectors, bounds[:-1], bounds[1:],
                                                     strict=True)}

    def checked() -> dict[str, np.ndarray]:
        out = on_host()
        for name, arr in out.items():
            check_rows_finite(arr, name, index)
        return out

    return checked


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
                     "(float32 holds up to 3.4e38; with store_dtype=torch.float16, 65504); "
                     "hookscope never stores them: clean or drop those items first.")
