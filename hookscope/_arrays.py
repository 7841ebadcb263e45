"""Array helpers shared by analysis, pooling and export: one conversion to tensors and to
NumPy, one NaN/inf policy, one paired-inputs check, one parameter validation.

Imports nothing else of hookscope but :mod:`hookscope.errors`, so ``analysis``, ``pooling``
and ``frame`` all depend on this module and not on each other's internals.

The NaN/inf policy
------------------
hookscope never *computes* with NaN or infinity: every function that combines values (analysis
functions, pooling, ``reduce=`` in exports) raises :class:`~hookscope.errors.InputError` naming
the argument and the first bad index.  Functions that only *copy* values (``to_frame`` without
``reduce``, ``kind="long"``, ``save``) keep them as they are, so a NaN coming out of a model
stays visible.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import TypeAlias

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .errors import InputError

__all__ = [
    "ArrayLike",
    "as_matrix",
    "as_tensor",
    "check_bool",
    "check_choice",
    "check_finite",
    "check_int",
    "from_numpy",
    "paired",
    "to_numpy",
]

#: What hookscope's analysis and pooling functions accept as an array.
ArrayLike: TypeAlias = Tensor | np.ndarray | pd.DataFrame | pd.Series | Sequence


def from_numpy(arr: np.ndarray) -> Tensor:
    """Zero-copy tensor of an array; read-only arrays (pandas, hookscope frames) are fine
    because nothing in hookscope writes into its inputs.  What torch cannot share is copied:
    a reversed view (``x[::-1]``, ``np.flip``), non-native byte order, and long double (as
    float64, which torch has)."""
    if arr.dtype.kind == "f" and arr.dtype.itemsize > 8:
        arr = arr.astype(np.float64)
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if any(st < 0 for st in arr.strides):
        arr = np.ascontiguousarray(arr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


#: Floating dtypes NumPy lacks, read as float32 (which holds each of their values).
NO_NUMPY_FLOATS = frozenset({torch.bfloat16} | {
    getattr(torch, name) for name in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2",
                                      "float8_e5m2fnuz") if hasattr(torch, name)})


def to_numpy(t: Tensor, *, readonly: bool = False) -> np.ndarray:
    """The one tensor -> NumPy conversion: detached, on the CPU, bfloat16 and float8 as
    float32 (NumPy has neither; float32 holds their values exactly).  ``readonly=True``
    returns a read-only view (frames that share memory with a recording must never write into
    it)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype in NO_NUMPY_FLOATS:
        t = t.float()
    arr = t.numpy()
    if readonly:
        arr = arr.view()
        arr.flags.writeable = False
    return arr


def as_tensor(x: ArrayLike, name: str) -> Tensor:
    """A CPU tensor view of ``x`` (no copy where possible) in the computing dtype: floating
    inputs keep their precision except float16/bfloat16 (computed in float32); integer and
    boolean inputs become float64."""
    if isinstance(x, pd.DataFrame | pd.Series):
        x = _frame_numpy(x, name)
    if isinstance(x, Tensor):
        t = x.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if t.is_nested:
            raise InputError(f"{name} is a nested tensor (sequences of different lengths): "
                             "pool each to one vector first, e.g. hs.masked_pool or "
                             "rec.to_frame(reduce='mean').")
        if t.layout is not torch.strided:  # (sparse COO/CSR: its dense values)
            t = t.to_dense()
    elif hasattr(x, "toarray") and hasattr(x, "nnz"):  # a scipy.sparse matrix or array
        t = from_numpy(np.asarray(x.toarray()))
        return as_tensor(t, name)
    else:
        arr = np.asarray(x)
        if arr.dtype.kind not in "biuf":
            raise InputError(f"{name} must be a numeric array, got dtype {arr.dtype}.")
        t = from_numpy(arr)
    if t.dtype.is_complex:
        raise InputError(f"{name} must be real-valued, got {t.dtype}.")
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    elif not t.dtype.is_floating_point:
        t = t.double()
    return t


def _frame_numpy(x: pd.DataFrame | pd.Series, name: str) -> np.ndarray:
    """A DataFrame or Series as NumPy; pandas' nullable columns (``Float64``, ``Int64``,
    ``boolean``) without missing values as float64 (their NumPy form would be ``object``)."""
    arr = x.to_numpy()
    if arr.dtype == object:
        dtypes = x.dtypes if isinstance(x, pd.DataFrame) else [x.dtype]
        if all(isinstance(d, pd.api.extensions.ExtensionDtype) and d.kind in "biuf"
               for d in dtypes):
            if bool(x.isna().to_numpy().any()):
                raise InputError(f"{name} has missing values (pandas NA): drop or fill them.")
            arr = x.to_numpy(dtype=np.float64)
    return arr


def all_finite(t: Tensor) -> bool:
    """Whether every element of a floating ``t`` is finite.  A finite sum proves it with one
    small kernel (``torch.isfinite(t).all()`` costs several full-size ones); only a NaN, an
    infinity or an overflowing sum leads to the elementwise check."""
    if t.is_complex():
        return bool(torch.isfinite(t).all())
    wide = torch.float64 if t.dtype == torch.float64 else torch.float32  # (a float16 sum
    # overflows long before its elements do)
    return math.isfinite(t.sum(dtype=wide).item()) or bool(torch.isfinite(t).all())


def check_finite(t: Tensor, name: str) -> None:
    """Raise :class:`InputError` if ``t`` holds NaN or infinity, naming the first index."""
    if not t.dtype.is_floating_point or all_finite(t):
        return
    where = torch.nonzero(~torch.isfinite(t))[0].tolist()
    raise InputError(f"{name} holds NaN or infinity (first at index {tuple(where)}); hookscope "
                     "never computes with them: clean or drop those items first.")


def as_matrix(x: ArrayLike, name: str) -> Tensor:
    """``x`` as ``(items, features)``, validated (shape, emptiness, NaN/inf).

    Feature maps ``(items, channels, *spatial)`` (4-D or more) are flattened to
    ``(items, channels * positions)``: each channel at each position is a feature.  A 3-D input
    is ambiguous (a padded sequence would mix padding into every result) and is refused with
    what to do instead.
    """
    t = as_tensor(x, name)
    if t.ndim >= 4:
        t = t.reshape(t.shape[0], -1)
    if t.ndim == 3:
        raise InputError(
            f"{name} has shape {tuple(t.shape)}: analysis functions take one vector per item, "
            "(items, features). For a padded sequence (batch, time, features), pool it over its "
            "real positions first: hs.masked_pool(x, lengths_or_mask, 'mean') or "
            "rec.to_frame(reduce='mean'); for a 1-D feature map (batch, channels, length), "
            "x.mean(2) or x.flatten(1).")
    if t.ndim != 2:
        hint = " Use x.reshape(1, -1) for one item." if t.ndim == 1 else ""
        raise InputError(f"{name} must be 2-D (items x features), got shape "
                         f"{tuple(t.shape)}.{hint}")
    if t.shape[0] == 0 or t.numel() == 0:
        raise InputError(f"{name} is empty (shape {tuple(t.shape)}).")
    check_finite(t, name)
    return t


def paired(x: ArrayLike, y: ArrayLike, names: tuple[str, str] = ("x", "y"), *,
           same: str = "rows") -> tuple[Tensor, Tensor]:
    """The one check of two-argument functions: both validated by :func:`as_matrix`, then
    ``same="rows"`` (the same items in two spaces), ``"features"`` (two sets of items in one
    space) or ``"shape"`` (rows paired one to one); returned in a common dtype."""
    a, b = as_matrix(x, names[0]), as_matrix(y, names[1])
    if same == "rows" and a.shape[0] != b.shape[0]:
        raise InputError(f"{names[0]} and {names[1]} must hold the same items: {a.shape[0]} "
                         f"rows != {b.shape[0]} rows.")
    if same == "features" and a.shape[1] != b.shape[1]:
        raise InputError(f"{names[0]} and {names[1]} need the same number of features: "
                         f"{a.shape[1]} != {b.shape[1]}.")
    if same == "shape" and a.shape != b.shape:
        raise InputError(f"{names[0]} and {names[1]} must pair up row by row: shapes "
                         f"{tuple(a.shape)} and {tuple(b.shape)} differ.")
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)


def check_int(value: object, name: str, low: int, high: int | None = None, *,
              why: str = "") -> int:
    """``value`` as an int in ``[low, high]`` (bools refused), else :class:`InputError`."""
    ok = isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)
    if ok and low <= value and (high is None or value <= high):
        return int(value)
    bounds = f"[{low}, {high}]" if high is not None else f"[{low}, ...)"
    raise InputError(f"{name} must be an int in {bounds}{why}, got {value!r}.")


def check_bool(value: object, name: str) -> bool:
    """``value`` as a bool (``True``/``False`` or NumPy's), else :class:`InputError`."""
    if isinstance(value, bool | np.bool_):
        return bool(value)
    raise InputError(f"{name} must be True or False, got {value!r}.")


def check_choice(value: object, name: str, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``, else :class:`InputError` listing them."""
    if isinstance(value, str) and value in choices:
        return value
    listed = ", ".join(repr(c) for c in choices)
    raise InputError(f"{name} must be one of {listed}, got {value!r}.")
