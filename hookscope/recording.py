"""``Recording``: all captures of a ``record`` block (``Capture``, one call, is in ``capture.py``).

Storage only: no hooks here, and no analysis.  A ``Recording`` holds no reference to the model,
so dropping the model frees it even while the recording is kept.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import torch

from .capture import Capture
from .errors import AmbiguousCallError, InputTypeError, NotRecordedError
from .frame import path_text, primary_path
from .grads import GradStore
from .select import _strip_wrapper_prefix

__all__ = ["Capture", "Recording"]


class Recording:
    """Everything one ``record`` block captured: module name -> captures in call order.

    ``rec[name]`` is the capture of a module that ran once; ``rec[name, i]`` and
    ``rec[name, "label"]`` pick a call of a module that ran several times (``rec.calls(name)``
    lists them).  Asking ``rec[name]`` of a module that ran several times is an error: hookscope
    never silently hands back only the last call.

    Each forward pass of the recorded model in the block is a *step*; call indices and
    ``calls=`` labels count within a step.  With several steps, ``rec.step(i)`` is the recording
    of step ``i`` alone, and ``rec.calls(name)`` lists the calls of every step in order.
    """

    def __init__(self, names: list[str], module_types: dict[str, type], model_type: str,
                 *, prefix: str = "") -> None:
        self._captures: dict[str, list[Capture]] = {n: [] for n in names}
        # Shared with the recorder and other recordings: never mutated.
        self._module_types = module_types
        self.model_type = model_type
        self._prefix = prefix  # "module." / "_orig_mod.": wrapper names also look up
        self.steps = 0  # number of forward passes (steps) seen

    @classmethod
    def from_captures(cls, captures: list[Capture], *, names: list[str] | None = None,
                      module_types: dict[str, type] | None = None, model_type: str = "",
                      steps: int | None = None) -> Recording:
        """A recording holding ``captures`` (in order), e.g. rebuilt from a file.

        ``names`` (default: the captures' modules, in first-seen order) may list modules that
        never ran; ``steps`` defaults to one more than the highest capture step.
        """
        names = list(dict.fromkeys(names or [])) + [c.name for c in captures]
        names = list(dict.fromkeys(names))
        types_ = dict(module_types or {})
        for c in captures:
            types_.setdefault(c.name, c.module_type)
        rec = cls(names, types_, model_type)
        for c in captures:
            rec._add(c)
        rec.steps = steps if steps is not None else (
            max((c.step for c in captures), default=-1) + 1)
        return rec

    def _add(self, capture: Capture) -> None:
        """Append one capture (the one way a recording is filled)."""
        self._captures[capture.name].append(capture)

    # -- mapping-like access -----------------------------------------------------------------
    def keys(self) -> list[str]:
        """The selected module names, in the order selected (also those that never ran)."""
        return list(self._captures)

    def __iter__(self) -> Iterator[str]:
        return iter(self._captures)

    def __len__(self) -> int:
        return len(self._captures)

    def __contains__(self, name: object) -> bool:
        if name in self._captures:
            return True
        return bool(self._prefix) and isinstance(name, str) and \
            _strip_wrapper_prefix(name, self._prefix) in self._captures

    def captures(self) -> list[Capture]:
        """All captures, ordered by step, then module, then call."""
        out = [c for caps in self._captures.values() for c in caps]
        out.sort(key=lambda c: c.step)  # stable: module and call order kept within a step
        return out

    def _check_name(self, name: str) -> list[Capture]:
        try:
            return self._captures[name]
        except (KeyError, TypeError):
            if self._prefix and isinstance(name, str):
                stripped = _strip_wrapper_prefix(name, self._prefix)
                if stripped in self._captures:
                    return self._captures[stripped]
            import difflib

            close = difflib.get_close_matches(str(name), list(self._captures), n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise NotRecordedError(
                f"{name!r} was not selected for recording. Recorded modules: "
                f"{', '.join(map(repr, self._captures))}.{hint}"
            ) from None

    def calls(self, name: str, step: int | None = None) -> list[Capture]:
        """The captures of module ``name`` in call order (of one ``step``, or of all steps).

        Raises :class:`NotRecordedError` if ``name`` was not selected or never ran.
        """
        caps = self._check_name(name)
        if step is not None:
            step = self._norm_step(step)
            caps = [c for c in caps if c.step == step]
        if not caps:
            where = f" in step {step}" if step is not None else ""
            raise NotRecordedError(
                f"{name!r} ({self._module_types[name].__name__}) was selected but never "
                f"ran{where}: the model's forward did not call it. Check the branch or input "
                "that should reach it (hookscope.summary(model, x) shows which modules run)."
            )
        return caps

    def _norm_step(self, step: int) -> int:
        n = max(self.steps, 1)
        if not -n <= step < n:
            raise NotRecordedError(f"step {step} out of range: this recording has {n} step(s).")
        return step % n

    def step(self, i: int) -> Recording:
        """A recording of forward pass ``i`` alone (negative ``i`` counts from the end)."""
        i = self._norm_step(i)
        view = Recording(list(self._captures), self._module_types, self.model_type,
                         prefix=self._prefix)
        view._captures = {n: [c for c in caps if c.step == i] for n, caps in self._captures.items()}
        view.steps = 1
        return view

    def __getitem__(self, key: str | tuple[str, int | str]) -> Capture:
        if isinstance(key, tuple):
            if len(key) != 2:
                raise InputTypeError(f"Use rec[name] or rec[name, call]; got rec[{key!r}].")
            name, which = key
        else:
            name, which = key, None
        caps = self.calls(name)
        steps = {c.step for c in caps}
        if len(steps) > 1:
            raise AmbiguousCallError(
                f"{name!r} ran in {len(steps)} forward passes of this block; pick one with "
                f"rec.step(i)[{key!r}], or rec.calls({name!r}) for all of them."
            )
        if which is None:
            if len(caps) == 1:
                return caps[0]
            labels = [c.label for c in caps]
            alts = ", ".join(
                f"rec[{name!r}, {lab!r}]" if lab is not None else f"rec[{name!r}, {c.call}]"
                for c, lab in zip(caps, labels, strict=True)
            )
            raise AmbiguousCallError(
                f"{name!r} ran {len(caps)} times in one forward pass; say which call: {alts}, "
                f"or rec.calls({name!r}) for all. (hookscope never returns only the last call.)"
            )
        if isinstance(which, str):
            hits = [c for c in caps if c.label == which]
            if not hits:
                known = [c.label for c in caps if c.label is not None]
                raise NotRecordedError(
                    f"{name!r} has no call labelled {which!r}; labels: {known or 'none'} "
                    f"(set them with calls={{{name!r}: [...]}})."
                )
            return hits[0]
        if isinstance(which, int | np.integer):
            if not -len(caps) <= which < len(caps):
                raise NotRecordedError(
                    f"{name!r} ran {len(caps)} time(s); call {which} does not exist."
                )
            return caps[which]
        raise InputTypeError(f"A call is an int index or a str label; got {which!r}.")

    # -- gathering ----------------------------------------------------------------------------
    def cat(self, name: str, call: int | str | None = None) -> Capture:
        """The captures of module ``name`` over all calls and steps gathered into one capture,
        in order (step, then call), concatenated along the batch dimension.

        ``rec[name]`` refuses a module that ran several times; ``rec.cat(name)`` is the
        deliberate way to put its calls together, e.g. the per-batch captures of a loop over
        a dataset.  ``call`` keeps one call of each step (an index within the step, or a
        ``calls=`` label), for a module that runs several times per forward pass.

        Sequences ``(batch, time, ...)`` of different lengths are padded at the end of the
        time dimension with zeros, and the result's :attr:`Capture.mask` marks the real
        positions (each capture's own mask kept, whichever side it was padded);
        ``lengths`` are concatenated where every capture knows them.  Other dimensions must
        agree.  The result's output is the concatenated primary tensor; its ``step`` and
        ``call`` are those of the first capture gathered; it keeps their layout
        (:attr:`Capture.batch_dim`: a time-major sequence is concatenated along dim 1,
        :attr:`Capture.feature_map`, :attr:`Capture.bidirectional` where all are), and with
        ``grads=True`` its :attr:`Capture.grad` gathers theirs, as they are when ``cat`` is
        called, where every capture has one.

        Examples
        --------
        >>> import torch, hookscope as hs
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2))
        >>> with hs.record(model, ["0"]) as rec:
        ...     for batch in torch.ones(5, 3).split(2):
        ...         _ = model(batch)
        >>> rec.cat("0").tensor.shape
        torch.Size([5, 2])
        """
        from .errors import InputError

        caps = self.calls(name)
        if call is not None:
            picked = []
            for step in dict.fromkeys(c.step for c in caps):
                in_step = [c for c in caps if c.step == step]
                if isinstance(call, str):
                    hits = [c for c in in_step if c.label == call]
                elif isinstance(call, int | np.integer) and -len(in_step) <= call < len(in_step):
                    hits = [in_step[call]]
                else:
                    hits = []
                if not hits:
                    raise NotRecordedError(f"{name!r} has no call {call!r} in step {step}.")
                picked.append(hits[0])
            caps = picked
        paths = {primary_path(c) for c in caps}
        if len(paths) > 1:  # (an entry before the first tensor is None in some steps)
            where = " in some steps, ".join("output" + path_text(p)
                                            for p in sorted(paths, key=repr))
            raise InputError(
                f"cannot concatenate {name!r}: its first tensor is {where} in others (an "
                "entry before it is None in some steps). Choose the tensor with "
                f"pick={{{name!r}: lambda out: out[...]}} when recording.")
        dims = {c.batch_dim for c in caps}
        if len(dims) > 1:
            raise InputError(f"cannot concatenate {name!r}: its captures hold their examples "
                             f"along different dimensions ({sorted(dims)}).")
        dim = dims.pop()  # (a time-major sequence: concatenated along its batch, dim 1)
        tensors = [c.tensor.movedim(dim, 0) if dim else c.tensor for c in caps]
        first = tensors[0]
        if first.ndim == 0:
            raise InputError(f"{name!r} returned scalars, which have no batch to concatenate.")
        sequence = first.ndim == 3 and not caps[0].feature_map  # (not (batch, channels, length))
        for c, t in zip(caps, tensors, strict=True):
            tail, want = tuple(t.shape[2 if sequence else 1:]), first.shape[2 if sequence else 1:]
            if t.ndim != first.ndim or tail != tuple(want):
                raise InputError(f"cannot concatenate {name!r}: {c._where()} has shape "
                                 f"{tuple(t.shape)}, the first capture {tuple(first.shape)}.")
        dtypes = {t.dtype for t in tensors}
        if len(dtypes) > 1:  # (steps in other dtypes: one that holds every value)
            wide = functools.reduce(torch.promote_types, dtypes)
            if wide.is_floating_point and torch.finfo(wide).bits < 64 and any(
                    not d.is_floating_point and not d.is_complex and d != torch.bool
                    and d.itemsize >= 4 for d in dtypes):
                wide = torch.float64  # (int32/int64 beside float32: float32 would round them)
            tensors = [t.to(wide) for t in tensors]
        # Gradients (grads=True) are gathered the same way, where every capture has one.
        grads = [c.grad for c in caps] if all(c._grads is not None for c in caps) else None
        if grads is not None and all(g is not None for g in grads):
            grads = [g.movedim(dim, 0) if dim else g for g in grads]
        else:
            grads = None
        lengths = mask = None
        if sequence:
            time = max(t.shape[1] for t in tensors)
            masks = [c.mask for c in caps]
            if any(m is not None for m in masks) or any(t.shape[1] != time for t in tensors):
                mask = torch.cat([
                    torch.nn.functional.pad(
                        (m if m is not None else torch.ones(t.shape[:2])).to("cpu", torch.bool),
                        (0, time - t.shape[1]), value=False)
                    for m, t in zip(masks, tensors, strict=True)])
                tensors = [torch.nn.functional.pad(t, (0, 0, 0, time - t.shape[1]))
                           for t in tensors]
                if grads is not None:  # (no gradient reaches padding)
                    grads = [torch.nn.functional.pad(g, (0, 0, 0, time - g.shape[1]))
                             for g in grads]
            if all(c.lengths is not None for c in caps):
                lengths = torch.cat([c.lengths for c in caps])
        labels = {c.label for c in caps}
        out = Capture(name, caps[0].step, caps[0].call, labels.pop() if len(labels) == 1
                      else None, caps[0].module_type, torch.cat(tensors).movedim(0, dim),
                      lengths=lengths, mask=mask,
                      bidirectional=all(c.bidirectional for c in caps),
                      rnn_state=caps[0].rnn_state, batch_dim=dim,
                      feature_map=caps[0].feature_map, channels_last=caps[0].channels_last)
        if grads is not None:
            out._grads = GradStore()
            out._grads.add((), torch.cat(grads).movedim(0, dim))
        return out

    # -- export -----------------------------------------------------------------------------
    def to_frame(self, kind: str = "wide", *, reduce: Any = None, lengths: Any = None,
                 meta: Any = None, bidirectional: bool | None = None,
                 values: str = "value") -> pd.DataFrame:
        """The recording as a pandas DataFrame.

        Parameters
        ----------
        kind : {"wide", "long"}
            ``"wide"``: one row per example (index ``example``, continuing across steps),
            columns ``MultiIndex(module, call, unit)``; ``call`` is the label, else the call
            index as a string.  Values share memory with the recording where no reduction or
            concatenation was needed, and are then read-only (``df.copy()`` to edit).
            ``"long"``: tidy, one row per example x position x unit with columns
            ``example, module, call, position, unit, value``; padded positions are left out
            (using each capture's mask, or ``lengths=``); per-example vectors have
            ``position`` <NA>; a feature map ``(batch, channels, *spatial)`` (also 1-D, see
            :attr:`Capture.feature_map`) has one row per
            spatial position (``position`` is the flat row-major index, e.g. ``h * width +
            w``) and channel (``unit``); ``module`` and ``call`` are categorical.
        reduce : callable or {"last", "mean", "max", "sum", "flatten"}, optional
            Wide form only: how a capture with more than two dimensions becomes one vector per
            example (required for those; ``(batch,)`` and ``(batch, units)`` are kept):

            - sequences ``(batch, time, features)``: ``"last"`` real position (see
              :func:`hookscope.last_state`), ``"mean"``/``"max"``/``"sum"`` over real
              positions (see :func:`hookscope.masked_pool`), ``"flatten"`` (all positions);
            - feature maps ``(batch, channels, *spatial)`` (and the 3-D output of a 1-D
              convolution, pooling or normalisation layer, :attr:`Capture.feature_map`):
              ``"mean"``/``"max"``/``"sum"`` over all positions (global pooling),
              ``"flatten"`` (everything);
            - a callable ``f(tensor) -> (batch, units)``, e.g. ``lambda t: t.amax((2, 3))``,
              or ``f(tensor, mask)`` if it takes two positional arguments (``mask``: the
              ``(batch, time)`` boolean mask of real positions, or ``None``).
        lengths : (batch,) lengths or (batch, time) mask, optional
            Real positions of the sequence captures (True/1 = real, any padding side), e.g. a
            Hugging Face ``attention_mask``; overrides what the captures know.  For a
            recording of several steps, a list with one entry per step.
        meta : DataFrame or mapping of column -> values, optional
            Per-example metadata (text, label), one row per example: extra index levels
            (wide) or extra columns (long).
        bidirectional : bool, optional
            For ``reduce="last"``: the features are ``[forward, backward]`` halves.  By default
            each capture says (``Capture.bidirectional``: the recorder knows a bidirectional
            RNN's output, also inside a wrapper).
        values : {"value", "grad", "value*grad"}
            What to export of each capture: the recorded value (default), its gradient
            (:attr:`Capture.grad`, recorded with ``grads=True`` after ``backward()``), or
            value times gradient, the usual first-order attribution.  Reductions and masks
            apply alike; the long form's ``value`` column is then named ``grad`` or
            ``value*grad``.

        Raises
        ------
        InputError
            A capture that needs ``reduce``, NaN or infinity met by a reduction (values
            exported as they are keep NaN), bad lengths or masks, mismatched batches.

        Examples
        --------
        >>> import torch, hookscope as hs
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2))
        >>> with hs.record(model, ["0"]) as rec:
        ...     _ = model(torch.ones(4, 3))
        >>> rec.to_frame(meta={"text": list("abcd")}).shape
        (4, 2)
        """
        from .frame import to_frame

        return to_frame(self.captures(), kind, reduce=reduce, lengths=lengths, meta=meta,
                        bidirectional=bidirectional, values=values)

    # -- display ----------------------------------------------------------------------------
    def table(self) -> pd.DataFrame:
        """One row per capture: module, step, call, label, type, shape, dtype, device, bytes,
        lengths known.  Modules that never ran get a row with ``call`` missing."""
        rows = []
        for name, caps in self._captures.items():
            if caps:
                rows.extend(c._row() for c in caps)
            else:
                rows.append({"module": name, "type": self._module_types[name].__name__,
                             "shape": "never ran"})
        df = pd.DataFrame(rows, columns=["module", "step", "call", "label", "type", "shape",
                                         "dtype", "device", "bytes", "lengths"])
        return df.astype({"step": "Int64", "call": "Int64", "bytes": "Int64"})

    def __repr__(self) -> str:
        head = (f"Recording of {self.model_type}: {len(self)} module(s), "
                f"{sum(map(len, self._captures.values()))} capture(s), {self.steps} step(s)")
        with pd.option_context("display.width", 120, "display.max_columns", 20):
            return head + "\n" + _blank_missing(self.table()).to_string(index=False)

    def _repr_html_(self) -> str:
        """The :meth:`table` with summary statistics of each capture, for Jupyter."""
        head = (f"<p><b>Recording of {self.model_type}</b>: {len(self)} module(s), "
                f"{sum(map(len, self._captures.values()))} capture(s), {self.steps} step(s)</p>")
        table = self.table()
        stats = [c._stats() for caps in self._captures.values() for c in caps] or []
        ran = table["call"].notna().to_numpy()
        for key in ("mean", "std", "min", "max"):
            column = [None] * len(table)
            values = iter(s[key] for s in stats)
            for i, has in enumerate(ran):
                if has:
                    value = next(values)
                    column[i] = None if value is None else f"{value:.4g}"
            table[key] = column
        return head + _blank_missing(table).to_html(index=False)


def _blank_missing(table: pd.DataFrame) -> pd.DataFrame:
    """Missing values (``None``, ``<NA>``) shown as blanks, in the terminal as in HTML."""
    return table.astype(object).where(table.notna(), "")
