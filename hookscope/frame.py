"""Captures -> NumPy matrices -> pandas DataFrames (wide and long/tidy).

Works on anything with the ``Capture`` attributes (``name``, ``step``, ``call``, ``label``,
``tensor``, ``lengths``, ``mask``); imports nothing of the recorder.  Reductions are those of
:mod:`hookscope.pooling`: padding (any side) is never averaged in.
"""

from __future__ import annotations

import copy
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeAlias

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ._arrays import check_bool, check_finite, to_numpy
from .errors import InputError
from .pooling import REDUCTIONS, _last_state, _masked_pool, as_mask
from .structure import iter_tensors, takes_two_args

__all__ = ["REDUCE_NAMES", "Reduce", "batch_first_capture", "capture_matrix", "capture_rows",
           "recording_vectors", "to_frame"]

#: ``reduce=``: a name, or ``f(tensor) -> (batch, units)``, or ``f(tensor, mask)`` where
#: ``mask`` is the capture's ``(batch, time)`` boolean mask of real positions (or ``None``).
Reduce: TypeAlias = str | Callable[..., Any] | None

#: The named reductions of ``reduce=``.
REDUCE_NAMES = ("last", *REDUCTIONS, "flatten")


def batch_first_capture(cap: Any) -> Any:
    """``cap`` itself, or for a capture whose examples are along another dimension
    (:attr:`~hookscope.Capture.batch_dim`, a time-major sequence) or whose channels are last
    (:attr:`~hookscope.Capture.channels_last`) a capture of the same call whose tensor is a
    view of it in the layout exports and reductions read: examples at dim 0, and a feature
    map's channels at dim 1.  An RNN's final state is left as it is (exports refuse it,
    saying what to pick)."""
    dim = getattr(cap, "batch_dim", 0)
    last = getattr(cap, "channels_last", False)
    if not (dim or last) or getattr(cap, "rnn_state", False):
        return cap
    out = copy.copy(cap)  # the same call, only its tensor moved
    t = cap.tensor.movedim(dim, 0) if dim else cap.tensor
    out._output = t.movedim(-1, 1) if last and t.ndim >= 4 else t
    out._inputs = out._kwargs = out._versions = None
    out.batch_dim, out.channels_last = 0, False
    return out


def check_layouts(captures: Iterable[Any]) -> None:
    """A module's call holds its examples along one dimension in every step: where a layout
    is told per call (a packed input's lengths, the model call's ids or mask: see
    :mod:`hookscope.layout`), a time-major output whose time steps equal its batch size looks
    batch-first, and exporting it with the others would give that step one row per time
    step.  (A step whose dims 0 and 1 both have one entry reads the same either way.)"""
    seen: dict[tuple[str, str], tuple[int, int]] = {}
    paths: dict[tuple[str, str], tuple[tuple, int]] = {}
    for cap in captures:
        path = primary_path(cap)
        known = paths.setdefault((cap.name, _call_key(cap)), (path, cap.step))
        if known[0] != path:
            raise InputError(
                f"{cap.name!r} call {_call_key(cap)}: its first tensor, which exports read, is "
                f"output{path_text(known[0])} in step {known[1]} but "
                f"output{path_text(path)} in step {cap.step} (an entry before it is None in "
                "some steps). Choose the tensor with "
                f"pick={{{cap.name!r}: lambda out: out{path_text(path or known[0])}}} when "
                "recording.")
        t = cap.tensor
        if (getattr(cap, "rnn_state", False) or t.is_nested or t.ndim < 2
                or t.shape[0] == t.shape[1] == 1):
            continue
        dim = getattr(cap, "batch_dim", 0)
        first = seen.setdefault((cap.name, _call_key(cap)), (dim, cap.step))
        if first[0] != dim:
            raise InputError(
                f"{cap.name!r} call {_call_key(cap)} holds its examples along dim {first[0]} "
                f"in step {first[1]} but along dim {dim} in step {cap.step}: a time-major "
                "(time, batch, ...) output whose time steps equal its batch size looks "
                f"batch-first. Say where the batch is with batch_dim={{{cap.name!r}: 1}} (or "
                "0) when recording.")


def primary_path(cap: Any) -> tuple:
    """Where in the module's output the capture's primary tensor (the first tensor, which
    exports read) is: ``()`` for a tensor output, ``("hidden",)`` for ``out["hidden"]``."""
    leaf = getattr(cap, "_leaf", None)
    if leaf is not None:
        return leaf
    out = cap._output
    if type(out) is Tensor:
        return ()
    return next((p for p, _ in iter_tensors(out, packed=True)), ())


def path_text(path: tuple) -> str:
    """``['hidden'][0]``: a path into an output, as Python indexes it."""
    return "".join(f"[{k!r}]" for k in path)


def dense_capture(cap: Any) -> Any:
    """``cap`` itself, or a capture of the same call whose tensor is dense and batch-first
    (:func:`batch_first_capture`): nested sequences padded with zeros to ``(batch, max
    length, ...)`` with their ``mask``, so exports and reductions see only the real
    positions."""
    cap = batch_first_capture(cap)
    t = cap.tensor
    if not t.is_nested and t.layout is torch.strided:
        return cap
    out = copy.copy(cap)  # the same call, only its tensor made dense
    out._output = torch.nested.to_padded_tensor(t, 0.0) if t.is_nested else t.to_dense()
    out._inputs = out._kwargs = out._versions = None
    out._mask = cap.mask if t.is_nested else cap._mask
    return out


#: ``values=`` of ``to_frame``: what each capture contributes.
VALUES = ("value", "grad", "value*grad")


def values_capture(cap: Any, values: str) -> Any:
    """``cap`` itself for ``values="value"``; else a capture of the same call whose tensor is
    its gradient (``"grad"``) or value times gradient (``"value*grad"``, an attribution)."""
    if values == "value":
        return cap
    if values not in VALUES:
        raise InputError(f"values must be one of {VALUES}; got {values!r}.")
    grad = cap.grad
    if grad is None:
        raise InputError(f"{cap._where()}: no gradient has arrived, so values={values!r} has "
                         "nothing to export. Call backward() on a loss that depends on it.")
    out = copy.copy(cap)  # the same call, its tensor replaced
    out._output = grad if values == "grad" else cap.tensor * grad
    out._inputs = out._kwargs = out._versions = None
    return out


def _call_key(cap: Any) -> str:
    return cap.label if cap.label is not None else str(cap.call)


def _where(cap: Any) -> str:
    return f"{cap.name!r} call {_call_key(cap)}"


def check_reduce(reduce: Reduce) -> Reduce:
    """``reduce`` if it is ``None``, a callable or one of :data:`REDUCE_NAMES`."""
    if reduce is None or callable(reduce) or (isinstance(reduce, str) and reduce in REDUCE_NAMES):
        return reduce
    raise InputError(f"reduce must be one of {REDUCE_NAMES}, a callable f(tensor) or "
                     f"f(tensor, mask), or None; got {reduce!r}.")


def capture_mask(cap: Any, lengths: Any = None) -> Tensor | None:
    """The boolean ``(batch, time)`` mask of real positions of a sequence capture: from
    ``lengths`` (integer lengths or a mask) if given, else the capture's own ``mask``
    (``None`` when unknown, or when the capture is not a ``(batch, time, ...)`` sequence)."""
    cap = dense_capture(cap)
    t = cap.tensor
    if t.ndim < 2:
        return None
    if lengths is not None:
        return as_mask(lengths, t.shape[0], t.shape[1], name=f"lengths for {_where(cap)}")
    mask = getattr(cap, "mask", None)
    if mask is None:
        return None
    mask = torch.as_tensor(mask).to("cpu")
    if tuple(mask.shape) != tuple(t.shape[:2]):
        raise InputError(f"{_where(cap)}: its mask has shape {tuple(mask.shape)} but the "
                         f"capture's (batch, time) is {tuple(t.shape[:2])}."
                         + time_major_hint(t.shape, mask.shape))
    return mask.bool()


def time_major_hint(shape: Any, mask_shape: Any) -> str:
    """What to do when a capture is ``(time, batch, ...)`` (``pad_packed_sequence``'s
    default) while its mask is ``(batch, time)``."""
    if len(shape) < 2 or tuple(mask_shape) != (shape[1], shape[0]):
        return ""
    return (" It looks time-major (time, batch, ...), as pad_packed_sequence returns it "
            "without batch_first=True: record it batch-first with "
            "pick=lambda out: out.transpose(0, 1) (for a tuple, e.g. out[0].transpose(0, 1)).")


def capture_matrix(cap: Any, reduce: Reduce = None, *, bidirectional: bool | None = None,
                   lengths: Any = None) -> np.ndarray:
    """One row per example for a capture: ``(batch, units)``, as NumPy (see
    :func:`capture_rows`, which computes it where the capture is, e.g. on the GPU)."""
    rows, shared = capture_rows(cap, reduce, bidirectional=bidirectional, lengths=lengths)
    return to_numpy(rows, readonly=shared)


def capture_rows(cap: Any, reduce: Reduce = None, *, bidirectional: bool | None = None,
                 lengths: Any = None) -> tuple[Tensor, bool]:
    """One row per example for a capture, ``(batch, units)``, as a tensor on the capture's
    device, and whether it shares memory with the capture (then never to be written into).

    - ``(batch,)`` is one unit; ``(batch, units)`` is used as it is (``reduce`` is not
      needed, and ignored).
    - A sequence ``(batch, time, features)`` needs ``reduce``: ``"last"`` (the last real
      position, see :func:`hookscope.last_state`; ``bidirectional`` as there, by default
      what the recorder knows: ``Capture.bidirectional``), ``"mean"``,
      ``"max"``, ``"sum"`` over real positions only (see :func:`hookscope.masked_pool`), or
      ``"flatten"`` (every position, padding included).  Real positions come from ``lengths``
      (integer lengths or a ``(batch, time)`` mask) if given, else from the capture's own
      ``mask``; without either, every position counts.
    - A feature map ``(batch, channels, *spatial)`` (4-D or more, or the 3-D output of a 1-D
      convolution, pooling or normalisation layer, :attr:`Capture.feature_map`): ``"mean"``,
      ``"max"``, ``"sum"`` pool over all spatial positions (global pooling, one value per
      channel); ``"flatten"`` keeps everything, ``(batch, channels * positions)``.
    - A callable is ``f(tensor) -> (batch, units)``, or ``f(tensor, mask)`` if it takes two
      positional arguments (``mask`` as above, or ``None``), e.g. ``lambda t: t.amax((2, 3))``.

    Reductions never compute with NaN or infinity: they raise
    :class:`~hookscope.errors.InputError` (values exported without ``reduce`` are kept as
    they are).
    """
    reduce = check_reduce(reduce)
    bidirectional = (bool(getattr(cap, "bidirectional", False)) if bidirectional is None
                     else check_bool(bidirectional, "bidirectional"))
    cap = dense_capture(cap)
    t = cap.tensor
    refuse_rnn_state(cap)
    if t.ndim == 0:
        raise InputError(f"{_where(cap)} returned a scalar, which has no examples; use pick= "
                         "to select a batched tensor.")
    if t.ndim == 1:
        return t.unsqueeze(1), True
    if t.ndim == 2:
        return t, True  # already one vector per example: nothing to reduce
    feature_map = t.ndim >= 4 or (t.ndim == 3 and getattr(cap, "feature_map", False))
    if reduce is None:
        if feature_map:
            raise InputError(
                f"{_where(cap)} is a feature map of shape {tuple(t.shape)} (batch, channels, "
                "*spatial): one row per example needs reduce='mean'|'max'|'sum' (global pooling "
                "over positions), reduce='flatten' (every position), or a callable; or "
                "kind='long' for one row per position.")
        raise InputError(
            f"{_where(cap)} has shape {tuple(t.shape)} (batch, time, features): one row per "
            "example needs reduce='last'|'mean'|'max'|'sum' (over real positions), "
            "reduce='flatten', or a callable; or kind='long' for one row per position.")
    if reduce == "flatten":
        return t.reshape(t.shape[0], -1), True
    if callable(reduce):
        mask = None if feature_map else capture_mask(cap, lengths)
        if mask is None and not feature_map and takes_two_args(reduce):
            warn_unmasked(cap, reduce)
        out = reduce(t, mask) if takes_two_args(reduce) else reduce(t)
        out = torch.as_tensor(out)
        if out.ndim != 2 or out.shape[0] != t.shape[0]:
            raise InputError(f"reduce callable returned shape {tuple(out.shape)} for "
                             f"{_where(cap)}; expected ({t.shape[0]}, units).")
        check_finite(out, f"reduce's result for {_where(cap)}")
        return out, False
    if feature_map:
        if reduce == "last":
            raise InputError(f"reduce='last' needs a sequence (batch, time, features); "
                             f"{_where(cap)} is a feature map of shape {tuple(t.shape)}: use "
                             "'mean', 'max', 'sum' or 'flatten'.")
        return _masked_pool(t, None, reduce, True, _named(cap), feature_map=True), False
    mask = capture_mask(cap, lengths)
    if mask is None:
        warn_unmasked(cap, reduce)
    if reduce == "last":
        if mask is None:
            mask = torch.ones(t.shape[:2], dtype=torch.bool)
        return _last_state(t, mask, bidirectional, True, _named(cap)), False
    return _masked_pool(t, mask, reduce, True, _named(cap)), False


def warn_unmasked(cap: Any, reduce: Any, sync: bool = True) -> bool:
    """Warn that a sequence is reduced (or exported) over every position, padding included,
    where the model call had a padding mask that does not fit it (:attr:`Capture._other_mask`:
    a module that changes the time steps).  The mask is checked for padding where reading it
    costs no wait for a GPU (``sync``, or a CPU mask); a mask without padding loses nothing.
    Returns whether it warned.  The warning points at the caller's line outside hookscope."""
    other = getattr(cap, "_other_mask", None)
    if other is None or ((sync or other.device.type == "cpu") and bool(other.all())):
        return False
    what = ("a reduce callable given mask=None" if callable(reduce)
            else "every position is kept" if reduce is None else f"reduce={reduce!r}")
    warnings.warn(
        f"hookscope: {cap.name!r} is a (batch, time, features) sequence whose time steps "
        "differ from the model call's padding mask, so its real positions are unknown: where "
        "padding reaches it (a strided convolution, pooling or internal padding changed the "
        f"steps), {what} counts padded positions too. Pass lengths= with each example's real "
        "steps in this output (export it on its own where other sequences have other steps); "
        "if it is a (batch, channels, length) map, record it with "
        "pick=lambda out: out.transpose(1, 2); if every position is real, ignore this.",
        stacklevel=_outside_hookscope())
    return True


def _outside_hookscope() -> int:
    """The ``stacklevel`` (as ``warnings.warn`` in :func:`warn_unmasked` counts it) of the
    frame that called into hookscope last: the user's line that asked for the export or the
    dataset (a warning from a hook inside ``record_dataset`` passes the model's frames)."""
    frame, level, outermost = sys._getframe(2), 2, 1  # (2: the caller of warn_unmasked)
    while frame is not None:
        if frame.f_code.co_filename.startswith(_PACKAGE):
            outermost = level
        frame, level = frame.f_back, level + 1
    return outermost + 1


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep  # (any platform)


def _named(cap: Any) -> str:
    """How errors name a capture's values: "'encoder' call premise"."""
    return f"the output of {_where(cap)}"


def _grouped(captures: Sequence[Any]) -> tuple[dict[tuple[str, str], list[Any]], list[int]]:
    """Captures grouped by (module, call key) in first-seen order; example offset per step."""
    groups: dict[tuple[str, str], list[Any]] = {}
    sizes: dict[int, tuple[int, str]] = {}
    for cap in captures:
        refuse_rnn_state(cap)  # (its dim 0 is no batch: say so, not that the sizes differ)
        groups.setdefault((cap.name, _call_key(cap)), []).append(cap)
        t = cap.tensor
        n = t.shape[0] if t.ndim else 0
        seen = sizes.setdefault(cap.step, (n, f"{cap.name!r} call {_call_key(cap)}"))
        if seen[0] != n:
            raise InputError(
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
            raise InputError(f"{caps[0].name!r} call {_call_key(caps[0])} ran in {len(caps)} of "
                             f"{len(steps)} steps; rows would not line up.")
    return groups, [offsets[s] for s in steps] + [total]


def _lengths_by_step(captures: Sequence[Any], lengths: Any) -> dict[int, Any]:
    """``lengths=`` of an export, per step: one value for a one-step recording, else a list
    with one entry per step.  Given where no capture is a sequence, it is an error, not
    ignored."""
    if lengths is None:
        return {}
    if not any(is_sequence(c) for c in captures):
        kinds = sorted({f"{c.name!r} {tuple(c.tensor.shape)}" for c in captures})
        raise InputError(
            f"lengths= applies to sequences (batch, time, features), and no capture is one: "
            f"{', '.join(kinds)}. A feature map (batch, channels, *spatial) is pooled over "
            "all its positions; a (batch, channels, length) map that should leave padded "
            "positions out can be recorded as a sequence with "
            "pick=lambda out: out.transpose(1, 2).")
    steps = sorted({c.step for c in captures})
    if len(steps) == 1:
        return {steps[0]: lengths}
    if not isinstance(lengths, list | tuple) or len(lengths) != len(steps):
        raise InputError(f"the recording has {len(steps)} steps: pass lengths= as a list with "
                         "one (batch,) lengths array or (batch, time) mask per step.")
    return dict(zip(steps, lengths, strict=True))


def _sequence_lengths(cap: Any, by_step: dict[int, Any]) -> Any:
    """The ``lengths=`` entry that applies to ``cap``: sequences only (3-D)."""
    return by_step.get(cap.step) if is_sequence(cap) else None


def is_sequence(cap: Any) -> bool:
    """Whether a capture's primary tensor is a sequence ``(batch, time, features)``: 3-D, and
    not a 1-D feature map ``(batch, channels, length)`` (:attr:`Capture.feature_map`)."""
    return cap.tensor.ndim == 3 and not getattr(cap, "feature_map", False)


def recording_vectors(rec: Any, reduce: Reduce = None, *, lengths: Any = None,
                      bidirectional: bool | None = None) -> dict[str, np.ndarray]:
    """One ``(examples, units)`` matrix per module (and call) of a recording, steps stacked.

    Keys are ``"module"``, or ``"module:call"`` for a module that ran several times per step
    (``call`` is the label, else the index).  Each capture becomes rows as in
    :func:`capture_matrix`; the result feeds every analysis function.

    Parameters
    ----------
    rec : Recording
    reduce : callable or {"last", "mean", "max", "sum", "flatten"}, optional
        Needed for sequence and feature-map captures; see :meth:`hookscope.Recording.to_frame`.
    lengths : (batch,) lengths or (batch, time) mask, optional
        Real positions of the sequence captures, overriding what they know (a list with one
        entry per step for a recording of several steps).
    bidirectional : bool, optional
        For ``reduce="last"``: the features are ``[forward, backward]`` halves.  By default
        each capture says (``Capture.bidirectional``).

    Returns
    -------
    dict of str -> numpy.ndarray
    """
    reduce = check_reduce(reduce)
    check_layouts(rec.captures())
    captures = [dense_capture(c) for c in rec.captures()]
    by_step = _lengths_by_step(captures, lengths)
    groups, _ = _grouped(captures)
    multi = {name for (name, _) in groups if sum(1 for (n, _) in groups if n == name) > 1}
    out = {}
    for (name, call), caps in groups.items():
        mats = [capture_matrix(c, reduce, bidirectional=bidirectional,
                               lengths=_sequence_lengths(c, by_step)) for c in caps]
        out[f"{name}:{call}" if name in multi else name] = (
            mats[0] if len(mats) == 1 else np.concatenate(mats))
    return out


def _meta_frame(meta: Any, n: int) -> pd.DataFrame:
    frame = meta if isinstance(meta, pd.DataFrame) else pd.DataFrame(dict(meta))
    if len(frame) != n:
        raise InputError(f"meta has {len(frame)} rows but the recording has {n} examples.")
    return frame.reset_index(drop=True)


def to_frame(captures: Iterable[Any], kind: str = "wide", *, reduce: Reduce = None,
             lengths: Any = None, meta: pd.DataFrame | Mapping[str, Sequence] | None = None,
             bidirectional: bool | None = None, values: str = "value") -> pd.DataFrame:
    """Captures as a DataFrame; see :meth:`hookscope.Recording.to_frame`."""
    captures = list(captures)
    check_layouts(captures)
    captures = [dense_capture(values_capture(c, values)) for c in captures]
    if kind == "long" and values != "value":  # the column says what it holds
        return to_frame(captures, kind, reduce=reduce, lengths=lengths, meta=meta,
                        bidirectional=bidirectional).rename(columns={"value": values})
    reduce = check_reduce(reduce)
    if bidirectional is not None:
        bidirectional = check_bool(bidirectional, "bidirectional")
    if not captures:
        raise InputError("nothing to export: the recording holds no captures (did the model "
                         "run inside the with block?).")
    by_step = _lengths_by_step(captures, lengths)
    if kind == "wide":
        return _wide(captures, reduce, meta, bidirectional, by_step)
    if kind == "long":
        if reduce is not None:
            raise InputError("kind='long' keeps every position: drop reduce=, or use "
                             "kind='wide'.")
        if bidirectional:
            raise InputError("bidirectional= applies to reduce='last' (kind='wide').")
        return _long(captures, meta, by_step)
    raise InputError(f"kind must be 'wide' or 'long', got {kind!r}.")


def _wide(captures: list[Any], reduce: Reduce, meta: Any, bidirectional: bool | None,
          by_step: dict[int, Any]) -> pd.DataFrame:
    groups, offsets = _grouped(captures)
    n = offsets[-1]
    # Levels in recorded order (not sorted by name), so codes increase along the columns:
    # the index stays lexsorted and selecting df["encoder", "premise"] is fast.
    module_names = list(dict.fromkeys(name for name, _ in groups))
    call_names = list(dict.fromkeys(call for _, call in groups))
    blocks, module_codes, call_codes, units = [], [], [], []
    for (name, call), caps in groups.items():
        mats = [capture_matrix(c, reduce, bidirectional=bidirectional,
                               lengths=_sequence_lengths(c, by_step)) for c in caps]
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


def refuse_rnn_state(cap: Any) -> None:
    """An RNN's final state as it returned it, ``(layers * directions, batch, hidden)``, is not
    one row per example along dim 0: an error that says what to pick instead."""
    if getattr(cap, "rnn_state", False) and cap.tensor.ndim == 3:
        raise rnn_state_error(_where(cap), tuple(cap.tensor.shape))


def rnn_state_error(where: str, shape: tuple[int, ...]) -> InputError:
    return InputError(
        f"{where} is an RNN's final state h_n of shape {shape} (layers * directions, batch, "
        "hidden): its batch is dim 1. One row per example needs the last layer, h_n[-1], or "
        "every layer and direction, h_n.transpose(0, 1).flatten(1): with pick= on the RNN "
        "itself, pick=lambda out: out[1][-1] (out[1][0][-1] for an LSTM, whose state is "
        "(h, c)), or return that from your module.")


def _long_rows(cap: Any, by_step: dict[int, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(example, position, values (rows, units))`` of one capture, padding left out."""
    refuse_rnn_state(cap)
    t = cap.tensor
    arr = to_numpy(t)
    b = arr.shape[0]
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim == 2:
        return np.arange(b), np.full(b, -1), arr
    if arr.ndim == 3 and is_sequence(cap):
        mask = capture_mask(cap, _sequence_lengths(cap, by_step))
        if mask is not None:
            ex, pos = np.nonzero(mask.numpy())
        else:
            warn_unmasked(cap, None)
            ex, pos = np.divmod(np.arange(b * arr.shape[1]), arr.shape[1])
        return ex, pos, arr[ex, pos]
    # A feature map: one row per spatial position (flat, row-major), a unit per channel.
    flat = arr.reshape(b, arr.shape[1], -1)
    positions = flat.shape[2]
    ex, pos = np.divmod(np.arange(b * positions), positions)
    return ex, pos, flat.transpose(0, 2, 1).reshape(b * positions, arr.shape[1])


def _long(captures: list[Any], meta: Any, by_step: dict[int, Any]) -> pd.DataFrame:
    groups, offsets = _grouped(captures)
    step_offset = dict(zip(sorted({c.step for c in captures}), offsets, strict=False))
    module_names = list(dict.fromkeys(name for name, _ in groups))
    call_names = list(dict.fromkeys(call for _, call in groups))
    keys = ("example", "module", "call", "position", "unit", "value")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for (name, call), caps in groups.items():
        for cap in caps:
            if cap.tensor.ndim == 0:
                raise InputError(f"{_where(cap)} returned a scalar, which has no examples.")
            ex, pos, vals = _long_rows(cap, by_step)
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
