"""``summary()``: which modules a model has, how often each runs, and what each returns.

This is how a user finds the names to pass to :func:`hookscope.record`.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch
from torch import nn

from .errors import InputTypeError
from .select import unwrap
from .structure import describe_shape, iter_tensors

__all__ = ["format_summary", "summary"]

# The same names as Recording.table() where they mean the same thing.
_COLUMNS = ["module", "type", "calls", "shape", "dtype", "params"]


def _shapes(output: Any) -> tuple[str, str]:
    leaves = list(iter_tensors(output))
    if not leaves:
        return type(output).__name__, ""
    shapes = [describe_shape(t) for _, t in leaves]
    dtypes = sorted({str(t.dtype).replace("torch.", "") for _, t in leaves})
    shape = str(shapes[0]) if len(shapes) == 1 else "; ".join(map(str, shapes))
    return shape, ",".join(dtypes)


def summary(model: nn.Module, *example_inputs: Any, **example_kwargs: Any) -> pd.DataFrame:
    """Run one forward pass (without gradients) and describe every submodule.

    The model is left as it was: buffers that the pass updates (BatchNorm's running
    statistics in train mode) are restored, and so is the random number generator state.

    Parameters
    ----------
    model : nn.Module
        Any model; wrappers (``DataParallel``, ``torch.compile``) are looked through.
    *example_inputs, **example_kwargs
        What to call the model with, as in ``model(*example_inputs, **example_kwargs)``.

    Returns
    -------
    pandas.DataFrame
        One row per submodule in ``named_modules()`` order: ``module`` (what
        :func:`hookscope.record` accepts), ``type``, ``calls`` (how often it ran; 0 if never),
        ``shape`` (of its first call's output; several tensors joined by ``;``), ``dtype``, and
        ``params`` (parameters of the module and its children).  :func:`format_summary` renders
        it for a terminal.

    Examples
    --------
    >>> import torch, hookscope as hs
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    >>> hs.summary(model, torch.randn(2, 4))[["module", "calls", "shape", "params"]]
      module  calls   shape  params
    0             1  (2, 3)      15
    1      0      1  (2, 3)      15
    2      1      1  (2, 3)       0
    """
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"summary() needs an nn.Module, got {type(model).__name__}.")
    inner, _ = unwrap(model)
    named = list(inner.named_modules())
    calls = {name: 0 for name, _ in named}
    first: dict[str, tuple[str, str]] = {}
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            calls[name] += 1
            if name not in first:
                first[name] = _shapes(output)
        return hook

    # A look must not change what is looked at: buffers (BatchNorm's running statistics in
    # train mode) are restored afterwards, and the random number generators too (dropout).
    buffers = [(b, b.detach().clone()) for b in inner.buffers()]
    devices = sorted({t.device.index for t in (*inner.buffers(), *inner.parameters())
                      if t.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            for name, module in named:
                handles.append(module.register_forward_hook(make_hook(name)))
            model(*example_inputs, **example_kwargs)
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for b, saved in buffers:
                if b.shape == saved.shape:
                    b.copy_(saved)
    rows = []
    for name, module in named:
        shape, dtype = first.get(name, ("never ran", ""))
        rows.append([name, type(module).__name__, calls[name], shape, dtype,
                     sum(p.numel() for p in module.parameters())])
    return pd.DataFrame(rows, columns=_COLUMNS)


def format_summary(table: pd.DataFrame) -> str:
    """Render a :func:`summary` table as plain text for a terminal.

    Each module is shown by its full dotted name, exactly what :func:`hookscope.record`
    accepts, so it can be copied from the terminal; the model itself is ``""``.

    >>> import torch, hookscope as hs
    >>> model = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    >>> print(hs.format_summary(hs.summary(model, torch.randn(1, 2))))
    module  type        calls  shape   dtype    params
    --------------------------------------------------
    ""      Sequential      1  (1, 2)  float32       6
    0       Sequential      1  (1, 2)  float32       6
    0.0     Linear          1  (1, 2)  float32       6
    """
    lines = []
    width = {c: max(len(c), *(len(str(v)) for v in table[c])) for c in _COLUMNS[1:]}
    names = [n if n else '""' for n in table.module]
    name_w = max(len("module"), *map(len, names))
    header = "module".ljust(name_w) + "  " + "  ".join(c.ljust(width[c]) for c in _COLUMNS[1:])
    lines.append(header)
    lines.append("-" * len(header))
    for shown, (_, row) in zip(names, table.iterrows(), strict=True):
        lines.append((shown.ljust(name_w) + "  " + "  ".join(
            str(row[c]).rjust(width[c]) if c in ("calls", "params") else str(row[c]).ljust(width[c])
            for c in _COLUMNS[1:])).rstrip())
    return "\n".join(lines)
