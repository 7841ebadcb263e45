"""Captures -> NumPy matrices -> pandas DataFrames (wide and long/tidy).

Works on anything with the ``Capture`` attributes (``name``, ``step``, ``call``, ``label``,
``tensor``, ``lengths``); imports nothing of the recorder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .pooling import last_state, masked_pool

__all__ = ["capture_matrix", "recording_vectors", "to_frame"]

Reduce = str | Callable[[Tensor, Tensor | None], Tensor] | None
_REDUCTIONS = ("last", "mean", "max", "sum")


def _call_key(cap: Any) -> str:
    return cap.label if cap.label is not None else str(cap.call)


def _numpy(t: Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    arr = t.numpy()
    view = arr.view()
    view.flags.writeable = False  # frames share memory with the recording: never write into it
    return view


def capture_matrix(cap: Any, reduce: Reduce = None, *, bidirectional: bool = False) -> np.ndarray:
    """One row per example for a capture: ``(batch, units)``.

    A 1-D output is one unit; 2-D is used as it is; a 3-D ``(batch, time, features)``
    sequence needs ``reduce``: ``"last"`` (length-aware final state, see
    :func:`hookscope.last_state`; ``bidirectional`` as there), ``"mean"``, ``"max"``, ``"sum"``
    (over real positions, see :func:`hookscope.masked_pool`), or a callable
    ``f(tensor, lengths) -> (batch, units)``.  Without known lengths every position counts.
    """
    t = cap.tensor
    if t.ndim == 0:
        raise ValueError(f"{cap.name!r} call {_call_key(cap)} returned a scalar, which has no "
                         "examples; use pick= to select a batched tensor.")
    if t.ndim == 1:
        return _numpy(t.unsqueeze(1))
    if t.ndim == 2 and reduce is None:
        return _numpy(t)
    if reduce is None:
        raise ValueError(
            f"{cap.name!r} call {_call_key(cap)} has shape {tuple(t.shape)}: one row per "
            "example needs reduce='last'|'mean'|'max'|'sum' (length-aware) or a callable, or "
            "use kind='long' for one row per position.")
    if t.ndim == 2:
        return _numpy(t)  # already one vector per example: nothing to reduce
    if callable(reduce):
        out = torch.as_tensor(reduce(t, cap.lengths))
        if out.ndim != 2 or out.shape[0] != t.shape[0]:
            raise ValueError(f"reduce callable returned shape {tuple(out.shape)} for "
                             f"{cap.name!r}; expected ({t.shape[0]}, units).")
        return _numpy(out)
    if reduce not in _REDUCTIONS:
        raise ValueError(f"reduce must be one of {_REDUCTIONS} or a callable, got {reduce!r}.")
    if t.ndim != 3:
        raise ValueError(f"reduce={reduce!r} needs (batch, time, features); {cap.name!r} has "
                         f"shape {tuple(t.shape)}. Pass a callable reduce.")
    lengths = cap.lengths if cap.lengths is not None else torch.full((t.shape[0],), t.shape[1])
    if reduce == "last":
        return _numpy(last_state(t, lengths, bidirectional=bidirectional))
    return _numpy(masked_pool(t, lengths, reduce))


def _grouped(captures: Sequence[Any]) -> tuple[dict[tuple[str, str], list[Any]], list[int]]:
    """Captures grouped by (module, call key) in first-seen order; example offset per step."""
    groups: dict[tuple[str, str], list[Any]] = {}
    sizes: dict[int, tuple[int, str]] = {}
    for cap in captures:
        groups.setdefault((cap.name, _call_key(cap)), []).append(cap)
        t = cap.tensor
        n = t.shape[0] if t.ndim else 0
        seen = sizes.setdefault(cap.step, (n, f"{cap.name!r} call {_call_key(cap)}"))
        if seen[0] != n:
            raise ValueError(
                f"step {cap.step}: {seen[1]} has {seen[0]} examples but {cap.name!r} call "
                f"{_call_key(cap)} has {n}; one row per example needs equal batch sizes (select"
                " the modules of one batch, or export them separately).")
    steps = sorted(sizes)
    offsets, total = {}, 0
    for s in steps:
        offsets[s] = total
        total += sizes[s][0]
    for caps in groups.values():
        if len(caps) != len(steps):
            raise ValueError(f"{caps[0].name!r} call {_call_key(caps[0])} ran in {len(caps)} of "
                             f"{len(steps)} steps; rows would not line up.")
    return groups, [offsets[s] for s in steps] + [total]


def recording_vectors(rec: Any, reduce: Reduce = None, *,
                      bidirectional: bool = False) -> dict[str, np.ndarray]:
    """``{"module" or "module:call": (examples, units)}`` for a recording, steps stacked."""
    groups, _ = _grouped(rec.captures())
    multi = {name for (name, _) in groups if sum(1 for (n, _) in groups if n == name) > 1}
    out = {}
    for (name, call), caps in groups.items():
        mats = [capture_matrix(c, reduce, bidirectional=bidirectional) for c in caps]
        out[f"{name}:{call}" if name in multi else name] = (
            mats[0] if len(mats) == 1 else np.concatenate(mats))
    return out


def _meta_frame(meta: Any, n: int) -> pd.DataFrame:
    frame = meta if isinstance(meta, pd.DataFrame) else pd.DataFrame(dict(meta))
    if len(frame) != n:
        raise ValueError(f"meta has {len(frame)} rows but the recording has {n} examples.")
    return frame.reset_index(drop=True)


def to_frame(captures: Iterable[Any], kind: str = "wide", *, reduce: Reduce = None,
             meta: pd.DataFrame | Mapping[str, Sequence] | None = None,
             bidirectional: bool = False) -> pd.DataFrame:
    """Captures as a DataFrame; see :meth:`hookscope.Recording.to_frame`."""
    captures = list(captures)
    if reduce is not None and not callable(reduce) and reduce not in _REDUCTIONS:
        raise ValueError(f"reduce must be one of {_REDUCTIONS} or a callable, got {reduce!r}.")
    if not captures:
        raise ValueError("nothing to export: the recording holds no captures (did the model "
                         "run inside the with block?).")
    if kind == "wide":
        return _wide(captures, reduce, meta, bidirectional)
    if kind == "long":
        if reduce is not None:
            raise ValueError("kind='long' keeps every position: drop reduce=, or use "
                             "kind='wide'.")
        return _long(captures, meta)
    raise ValueError(f"kind must be 'wide' or 'long', got {kind!r}.")


def _wide(captures: list[Any], reduce: Reduce, meta: Any, bidirectional: bool) -> pd.DataFrame:
    groups, offsets = _grouped(captures)
    n = offsets[-1]
    # Levels in recorded order (not sorted by name), so codes increase along the columns:
    # the index stays lexsorted and selecting df["encoder", "premise"] is fast.
    module_names = list(dict.fromkeys(name for name, _ in groups))
    call_names = list(dict.fromkeys(call for _, call in groups))
    blocks, module_codes, call_codes, units = [], [], [], []
    for (name, call), caps in groups.items():
        mats = [capture_matrix(c, reduce, bidirectional=bidirectional) for c in caps]
        m = mats[0] if len(mats) == 1 else np.concatenate(mats)
        blocks.append(m)
        module_codes.append(np.full(m.shape[1], module_names.index(name)))
        call_codes.append(np.full(m.shape[1], call_names.index(call)))
        units.append(np.arange(m.shape[1]))
    values = blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=1)
    unit_codes = np.concatenate(units)
    columns = pd.MultiIndex(
        levels=[module_names, call_names, np.arange(unit_codes.max() + 1)],
        codes=[np.concatenate(module_codes), np.concatenate(call_codes), unit_codes],
        names=["module", "call", "unit"])
    index = pd.RangeIndex(n, name="example")
    if meta is not None:
        m = _meta_frame(meta, n)
        index = pd.MultiIndex.from_arrays([np.arange(n), *(m[c].to_numpy() for c in m.columns)],
                                          names=["example", *m.columns])
    return pd.DataFrame(values, index=index, columns=columns, copy=False)


def _long(captures: list[Any], meta: Any) -> pd.DataFrame:
    groups, offsets = _grouped(captures)
    step_offset = dict(zip(sorted({c.step for c in captures}), offsets, strict=False))
    module_names = list(dict.fromkeys(name for name, _ in groups))
    call_names = list(dict.fromkeys(call for _, call in groups))
    keys = ("example", "module", "call", "position", "unit", "value")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for (name, call), caps in groups.items():
        for cap in caps:
            t = cap.tensor.detach().cpu()
            if t.dtype == torch.bfloat16:
                t = t.float()
            arr = t.numpy()
            b = arr.shape[0]
            if arr.ndim == 1:
                arr = arr[:, None]
            if arr.ndim == 2:
                ex, pos = np.arange(b), np.full(b, -1)
                vals = arr
            elif arr.ndim == 3:
                if cap.lengths is not None:
                    mask = cap.mask.numpy()
                    ex, pos = np.nonzero(mask)
                else:
                    ex, pos = np.divmod(np.arange(b * arr.shape[1]), arr.shape[1])
                vals = arr[ex, pos]
            else:
                raise ValueError(f"{name!r} call {call} has shape {arr.shape}; kind='long' "
                                 "handles (batch,), (batch, units) and (batch, time, units).")
            u = vals.shape[1]
            parts["example"].append(np.repeat(ex + step_offset[cap.step], u))
            parts["position"].append(np.repeat(pos, u))
            parts["unit"].append(np.tile(np.arange(u), len(ex)))
            parts["value"].append(vals.reshape(-1))
            count = len(ex) * u
            parts["module"].append(np.full(count, module_names.index(name), dtype=np.int32))
            parts["call"].append(np.full(count, call_names.index(call), dtype=np.int32))
    cat = {k: np.concatenate(v) for k, v in parts.items()}
    position = pd.array(cat["position"], dtype="Int64")
    position[cat["position"] < 0] = pd.NA  # per-example vectors have no position
    frame = pd.DataFrame({
        "example": cat["example"],
        "module": pd.Categorical.from_codes(cat["module"], categories=module_names),
        "call": pd.Categorical.from_codes(cat["call"], categories=call_names),
        "position": position,
        "unit": cat["unit"],
        "value": cat["value"],
    }, copy=False)
    if meta is not None:
        m = _meta_frame(meta, offsets[-1])
        for col in m.columns:
            frame[col] = m[col].to_numpy()[cat["example"]]
    return frame
