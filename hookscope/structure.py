"""Walking nested module outputs, padding ``PackedSequence`` back, and undoing batch sorting.

Knows nothing of hooks: every function takes a value and returns a new one.  Containers are
rebuilt (never shared with the model), so a later in-place change to a returned dict, list or
Hugging Face ``ModelOutput`` cannot reach what was recorded.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from .errors import UnsortError

__all__ = [
    "as_permutation",
    "describe_shape",
    "find_batch_dim",
    "first_tensor",
    "held_bytes",
    "iter_tensors",
    "lengths_from_batch_sizes",
    "map_leaves",
    "packed_lengths",
    "packed_mask",
    "pad_packed",
    "takes_two_args",
    "tensor_shape",
]

Path = tuple[Any, ...]
LeafFn = Callable[[Path, Any], Any]


def map_leaves(obj: Any, fn: LeafFn, path: Path = (), other: LeafFn | None = None) -> Any:
    """Return a copy of ``obj`` with every tensor (and ``PackedSequence``) leaf replaced by
    ``fn(path, leaf)``.

    Supported containers: tuple, namedtuple, list, dict and other mappings (``OrderedDict``,
    ``UserDict``, Hugging Face ``ModelOutput`` / ``BatchEncoding``), and dataclasses.  They are
    rebuilt, so the result shares no container with ``obj``.  Any other object is replaced by
    ``other(path, obj)`` where given, else kept as it is.

    >>> map_leaves({"a": (torch.ones(1), 2)}, lambda p, t: p)
    {'a': (('a', 0), 2)}
    """
    kind = type(obj)
    if kind is Tensor or kind is PackedSequence or isinstance(obj, Tensor):
        return fn(path, obj)
    if kind is tuple or kind is list:  # the common containers first, by exact type: this
        # runs on every call, so a tensor item is passed to fn without a call of its own
        items = []
        for i, v in enumerate(obj):
            items.append(fn((*path, i), v) if type(v) is Tensor
                         else map_leaves(v, fn, (*path, i), other))
        return tuple(items) if kind is tuple else items
    if kind is dict:
        return {k: map_leaves(v, fn, (*path, k), other) for k, v in obj.items()}
    if obj is None:
        return None
    if isinstance(obj, PackedSequence):
        return fn(path, obj)
    if isinstance(obj, tuple):
        items = [map_leaves(v, fn, (*path, i), other) for i, v in enumerate(obj)]
        if hasattr(obj, "_fields"):  # namedtuple
            return type(obj)(*items)
        try:
            return type(obj)(items)
        except TypeError:
            return tuple(items)
    if isinstance(obj, list):
        items = [map_leaves(v, fn, (*path, i), other) for i, v in enumerate(obj)]
        try:
            return type(obj)(items)
        except TypeError:
            return items
    if isinstance(obj, Mapping):
        new = {k: map_leaves(v, fn, (*path, k), other) for k, v in obj.items()}
        try:  # keep the type (UserDict, ModelOutput, BatchEncoding) with its own copy
            out = copy.copy(obj)
            for k, v in new.items():
                out[k] = v
            return out
        except Exception:  # an immutable or exotic mapping: a plain dict keeps the values
            return new
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = copy.copy(obj)
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name, None)
            object.__setattr__(out, f.name, map_leaves(value, fn, (*path, f.name), other))
        return out
    if _restored(obj):
        return type(obj)({k: map_leaves(v, fn, (*path, k), other)
                          for k, v in vars(obj).items()})
    return obj if other is None else other(path, obj)


def _restored(obj: Any) -> bool:
    """An object :func:`hookscope.load` made for a class it does not rebuild (a dataclass
    not allowlisted): its fields, as attributes, are what the dataclass's were."""
    return getattr(type(obj), "hookscope_class", None) is not None and not isinstance(
        obj, Mapping) and hasattr(obj, "__dict__")


def iter_tensors(obj: Any, path: Path = (), *,
                 packed: bool = False) -> Iterator[tuple[Path, Tensor]]:
    """Yield ``(path, tensor)`` for every tensor leaf of ``obj``, depth first, in order (a
    ``PackedSequence``'s ``data``, or with ``packed=True`` the ``PackedSequence`` itself)."""
    if isinstance(obj, Tensor):
        yield path, obj
    elif isinstance(obj, PackedSequence):
        yield path, obj if packed else obj.data
    elif isinstance(obj, tuple | list):
        for i, v in enumerate(obj):
            yield from iter_tensors(v, (*path, i), packed=packed)
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from iter_tensors(v, (*path, k), packed=packed)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from iter_tensors(getattr(obj, f.name, None), (*path, f.name), packed=packed)
    elif _restored(obj):  # (a dataclass loaded without its class: the same paths)
        for k, v in vars(obj).items():
            yield from iter_tensors(v, (*path, k), packed=packed)


def first_tensor(obj: Any) -> Tensor | None:
    """The first tensor leaf of ``obj`` (``obj`` itself if it is a tensor), or ``None``."""
    if isinstance(obj, Tensor):
        return obj
    if type(obj) is tuple and obj and type(obj[0]) is Tensor:  # (out, state): every call
        return obj[0]
    return next((t for _, t in iter_tensors(obj)), None)


def tensor_shape(t: Tensor) -> tuple[int | None, ...]:
    """``tuple(t.shape)``; for a nested tensor ``(batch, ...)`` with ``None`` where the
    examples' sizes differ.

    >>> tensor_shape(torch.nested.nested_tensor([torch.ones(2, 3), torch.ones(4, 3)]))
    (2, None, 3)
    """
    if not t.is_nested:
        return tuple(t.shape)
    shapes = [tuple(c.shape) for c in t.unbind()]
    if not shapes:
        return (0,)
    return (len(shapes), *(s[0] if len(set(s)) == 1 else None for s in zip(*shapes, strict=True)))


def describe_shape(t: Tensor) -> str | tuple[int, ...]:
    """The shape for display: a tuple, or for a nested tensor ``"nested (2, None, 3)"``."""
    if t.is_nested:
        shape = ", ".join("*" if d is None else str(d) for d in tensor_shape(t))
        return f"nested ({shape})"
    return tuple(t.shape)


def held_bytes(tensors: Any) -> int:
    """Bytes held by ``tensors``: each distinct storage once, whole (a view of a large
    tensor keeps all of it alive); sparse and nested tensors by their parts."""
    seen: set[tuple] = set()
    total = 0
    for t in tensors:
        parts = ([t._indices(), t._values()] if t.layout is torch.sparse_coo else
                 [t.crow_indices(), t.col_indices(), t.values()] if t.layout is torch.sparse_csr
                 else [t])
        for part in parts:
            try:
                storage = part.untyped_storage()
                key = (part.device, storage.data_ptr())
                size = storage.nbytes()
            except (RuntimeError, NotImplementedError):  # no plain storage (nested, ...)
                key = (part.device, id(part))
                size = sum(c.numel() * c.element_size() for c in part.unbind()) \
                    if part.is_nested else part.numel() * part.element_size()
            if key[1] == 0:  # an empty storage has no address: count by object
                key = (part.device, id(part))
            if key not in seen:
                seen.add(key)
                total += size
    return total


def packed_lengths(packed: PackedSequence) -> Tensor:
    """Sequence lengths of a ``PackedSequence``, in the batch order it was packed from.

    Computed from ``batch_sizes`` (and ``unsorted_indices``) alone, without padding the data.

    >>> from torch.nn.utils.rnn import pack_sequence
    >>> packed_lengths(pack_sequence([torch.ones(2), torch.ones(3)], enforce_sorted=False))
    tensor([2, 3])
    """
    return lengths_from_batch_sizes(packed.batch_sizes, packed.unsorted_indices)


def lengths_from_batch_sizes(batch_sizes: Tensor, unsorted_indices: Tensor | None) -> Tensor:
    """:func:`packed_lengths` from a ``PackedSequence``'s two index fields alone."""
    sizes = batch_sizes.numpy()  # always on the CPU, non-increasing
    n = int(sizes[0]) if len(sizes) else 0
    # Sequence i (in sorted order) has a step at time t iff i < batch_sizes[t]: its length
    # is the number of times, less those whose batch size is at most i (a search, not the
    # (batch, time) mask summed).
    lengths = torch.from_numpy(
        len(sizes) - np.searchsorted(sizes[::-1], np.arange(n), side="right").astype(np.int64))
    if unsorted_indices is not None:
        lengths = lengths[unsorted_indices.cpu()]
    return lengths


def packed_mask(packed: PackedSequence) -> Tensor:
    """The ``(batch, time)`` mask of real positions of a ``PackedSequence``, True where a
    sequence has a step, in the batch order it was packed from: straight from
    ``batch_sizes`` (one comparison; this runs on every call of a module fed one).

    >>> from torch.nn.utils.rnn import pack_sequence
    >>> packed_mask(pack_sequence([torch.ones(2), torch.ones(3)], enforce_sorted=False)).int()
    tensor([[1, 1, 0],
            [1, 1, 1]], dtype=torch.int32)
    """
    sizes = packed.batch_sizes.numpy()  # always on the CPU
    # Sequence i (in sorted order) is present at time t iff i < batch_sizes[t].
    keep = torch.from_numpy(np.arange(int(sizes[0]))[:, None] < sizes[None, :])
    if packed.unsorted_indices is not None:
        keep = keep[packed.unsorted_indices.cpu()]
    return keep


def pad_packed(packed: PackedSequence) -> tuple[Tensor, Tensor]:
    """``pad_packed_sequence(packed, batch_first=True)``: padded (batch, time, ...) and lengths,
    both in the original batch order."""
    padded, lengths = pad_packed_sequence(packed, batch_first=True)
    return padded, lengths


def as_permutation(perm: Any, where: str) -> Tensor:
    """Validate an ``unsort=`` permutation and return it as a CPU ``int64`` tensor.

    Raises :class:`~hookscope.errors.UnsortError` that says which module/call (``where``) and
    what is wrong: not 1-D, not integer, or not a permutation of ``range(len(perm))``.

    >>> as_permutation([2, 0, 1], "encoder call 0")
    tensor([2, 0, 1])
    """
    # A copy in every case: the permutation is read now, so that refilling the caller's tensor
    # (or NumPy array) later can change neither this call's order nor lengths read later.
    if (type(perm) is Tensor and perm.dtype is torch.int64 and perm.ndim == 1
            and perm.device.type == "cpu" and not perm.requires_grad):
        t = perm.clone()  # the common case (a collate function's index): no conversion
    else:
        try:
            t = torch.as_tensor(perm).detach()
        except Exception as exc:
            raise UnsortError(f"unsort for {where}: cannot read {type(perm).__name__} as an "
                              f"index tensor ({exc}).") from None
        if t.ndim != 1:
            raise UnsortError(
                f"unsort for {where}: a permutation must be 1-D, got shape {tuple(t.shape)}.")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise UnsortError(
                f"unsort for {where}: a permutation must hold integers, got dtype {t.dtype}.")
        t = t.to(device="cpu", dtype=torch.int64, copy=True)
    n = t.numel()
    if n == 0:
        return t
    a = t.numpy()
    if a.min() >= 0 and a.max() < n:  # in range, and every index present: a permutation
        seen = np.zeros(n, dtype=bool)  # (NumPy: a few microseconds; this runs per batch)
        seen[a] = True
        if seen.all():
            return t
    out_of_range = (t < 0) | (t >= n)
    counts = torch.bincount(torch.where(out_of_range, n, t), minlength=n + 1)
    if bool((counts[:n] != 1).any()) or bool(out_of_range.any()):
        bad = [int(v) for v in t if v < 0 or v >= n][:3]
        dup = torch.nonzero(counts[:n] > 1).flatten()[:3].tolist()
        missing = torch.nonzero(counts[:n] == 0).flatten()[:3].tolist()
        parts = []
        if bad:
            parts.append(f"values out of range(0, {n}): {bad}")
        if dup:
            parts.append(f"repeated: {dup}")
        if missing:
            parts.append(f"missing: {missing}")
        raise UnsortError(
            f"unsort for {where}: not a permutation of range({n}) ({'; '.join(parts)}). Pass "
            "the index that restores the original order: if you sorted with "
            "order = lengths.argsort(descending=True), pass order.argsort()."
        )
    return t


def find_batch_dim(shape: torch.Size, batch: int, where: str, path: Path) -> int | None:
    """The one dimension of ``shape`` that has size ``batch``, or ``None`` if there is none.

    Raises :class:`~hookscope.errors.UnsortError` where several dimensions have that size: the
    batch dimension is then ambiguous and hookscope does not guess.
    """
    dims = [d for d, size in enumerate(shape) if size == batch]
    if len(dims) == 1:
        return dims[0]
    if not dims:
        return None
    leaf = "output" + "".join(f"[{k!r}]" for k in path)
    raise UnsortError(
        f"unsort for {where}: {leaf} has shape {tuple(shape)}, where dims {dims} all have the "
        f"batch size {batch}, so its batch dimension is ambiguous. Say which with "
        f"batch_dim={{name: {{{path!r}: dim}}}} (a path prefix maps to a dim, None leaves the "
        "leaf alone), or record only the batched tensor with pick=."
    )


def takes_two_args(fn: Callable[..., Any], *, required: bool = False) -> bool:
    """Whether ``fn`` accepts a second positional argument (``reduce=`` callables may take a
    mask, ``edit=`` functions the call they edit); with ``required``, only a second parameter
    without a default counts (``def f(out, scale=0.5)`` keeps its default)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature: call with one
        return False
    positional = 0
    for p in params:
        if p.kind is p.VAR_POSITIONAL:
            return True
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and not (
                required and p.default is not p.empty):
            positional += 1
    return positional >= 2
