"""The short path of a recorded module's hook: the general hook's work (``Recorder._record_call``)
inlined for the common call, a tensor output copied as it is, on the GPU's critical path where
a forward pass is bound by the host.  Every other call goes to the general path."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from .capture import plain_capture
from .layout import is_known, swapped
from .mask_scope import scoped_mask
from .plan import Plan
from .rerun import graph_task
from .session import Session, unfit_mask
from .stop import PENDING_STOPS, raise_pending_stop

__all__ = ["make_short_hook", "takes_short_path"]

_get_ident = threading.get_ident
_NO_KWARGS = object()  # a forward hook called as hook(module, args, output)

# Argument types that cannot hold a PackedSequence (the short path's test, by exact type).
_ATOMIC = frozenset({Tensor, type(None), int, float, bool, str})

# Whether every type in an iterable is one of them: `_atomic(map(type, args))` tests every
# argument of a call without a Python loop (this runs on every call of a recorded module).
_atomic = _ATOMIC.issuperset


def takes_short_path(recorder: Any, plan: Plan) -> bool:
    """Whether the module's hook can take the short path (a tensor output copied as it
    is, nothing to pick, unsort, move, cast, edit, differentiate or stop at)."""
    return (plan.plain and plan.clone is True and plan.bidir_units is None
            and not recorder.inputs and not recorder.stop)


def make_short_hook(recorder: Any, plan: Plan) -> Callable[..., None]:
    """The hot path: the general hook's work for a tensor output, inlined.  It takes any
    call whose arguments are tensors, numbers, strings or ``None`` (a transformer layer
    called with its mask), so nothing can hold a ``PackedSequence`` whose lengths the
    capture would need; other calls, nested outputs, and calls inside a wrapper of an RNN
    (whose state tensors must be recognised) take the general path.  Each check here is
    an exact type test: this runs once per module call, on the GPU's critical path where
    a forward is bound by the host."""
    name, labels, module_type, map_1d = plan.name, plan.labels, plan.module_type, plan.map_1d
    map_last = plan.map_last  # (layouts its type tells: see layout.py)
    told = map_1d or plan.seq_dim is not None  # (a layout the pass cannot overrule)

    def hook(module: nn.Module, args: tuple, kwargs: Any, output: Any = _NO_KWARGS) -> None:
        s = recorder._session
        if s is not None and (s.thread is None or s.thread == _get_ident()) and (
                graph_task() == -1):  # (a re-run in backward() is no call: rerun.py)
            if output is _NO_KWARGS:  # (registered an instant ago, seen without kwargs)
                kwargs, output = {}, kwargs
            general = (type(output) is not Tensor or output.is_nested
                       or (s.rnn_states.tensors and s.rnn_states.shares_memory(output))
                       or (s.time_major and is_known(output, s.time_major))
                       or not _atomic(map(type, args))
                       or (kwargs and not _atomic(map(type, kwargs.values()))))
            if not general:
                # The (batch, time) mask of the scope this call is in (mask_scope.py),
                # where it fits a (batch, time, features) sequence (a (batch, d) output
                # has none, nor a 4-D one: (batch, heads, time, time) weights may have as
                # many heads)
                stack = s.mask_stack
                if stack:  # (inside a scope: scoped_mask's first case, inlined)
                    scope, mask, pending = stack[-1]
                    entry = scope if pending else None
                elif s.scope_outputs:
                    mask, entry = scoped_mask(s, args)
                else:
                    mask, entry = s.mask, None
                fits = False
                if mask is not None and output.ndim == 3:
                    shape, ref = output.shape, mask.shape
                    # A (batch, time, features) sequence of the mask's shape, batch and time
                    # told apart, that no (time, batch) of the pass's ids matches (a scope
                    # of another batch may: layout.swapped decides): the mask fits it.
                    fits = (shape[0] == ref[0] and shape[1] == ref[1] and ref[0] != ref[1]
                            and not map_1d
                            and not (s.swaps and (shape[0], shape[1]) in s.swaps))
                if (not fits and output.ndim == 3 and not told
                        and (s.swaps or mask is not None) and s.one_batch):
                    # (time, batch, features), as the pass tells it: the general path
                    general = swapped(output.shape, None if mask is None else mask.shape,
                                      s.swaps)
            if general:
                recorder._record_call(s, plan, args, kwargs, output)
            else:
                rec = s.rec
                if rec.steps == 0:  # a module called without the model's own forward
                    rec.steps = 1
                counts = s.counts
                call = counts.get(name, 0)
                counts[name] = call + 1
                label = labels[call] if labels is not None and call < len(labels) else None
                # (detach only what autograd tracks: it costs a tensor of its own)
                value = (output.detach() if output.requires_grad else output).clone()
                if fits:  # (the common case of a transformer's layers)
                    capture = plain_capture(name, rec.steps - 1, call, label, module_type,
                                            value, mask)
                    if entry is not None:  # (decided as the pass ends: mask_scope.py)
                        s.mask_outside.append((entry, capture))
                    rec._captures[name].append(capture)
                elif mask is None and not map_1d and not map_last:  # (no mask, no map)
                    rec._captures[name].append(plain_capture(
                        name, rec.steps - 1, call, label, module_type, value, None))
                else:
                    _add_unfit(s, name, rec.steps - 1, call, label, value, output, mask,
                               entry, map_1d, map_last, module_type)
        if PENDING_STOPS:
            raise_pending_stop(module, hook)

    hook._hookscope = True  # type: ignore[attr-defined]
    return hook


def _add_unfit(s: Session, name: str, step: int, call: int, label: str | None,
               value: Tensor, output: Tensor, mask: Tensor | None, entry: Any,
               map_1d: bool, map_last: bool, module_type: type) -> None:
    """The short path's capture where the scope's mask does not simply fit the output."""
    other = None
    if mask is not None and (output.ndim != 3 or output.shape[:2] != mask.shape or map_1d):
        if output.ndim == 3 and not map_1d:
            other = unfit_mask(s, output.shape, mask)  # (real positions unknown:
            # reductions warn)
        mask = None
    capture = plain_capture(name, step, call, label, module_type, value, mask)
    if map_1d and value.ndim == 3:  # (batch, channels, length)
        capture.feature_map = True
    elif map_last and value.ndim >= 4:  # (batch, *spatial, channels)
        capture.channels_last = True
    elif other is not None:
        capture._other_mask = other
        if entry is not None:  # (decided as the pass ends: mask_scope.py)
            s.mask_outside.append((entry, capture))
    elif mask is not None and entry is not None:  # (decided as the pass ends)
        s.mask_outside.append((entry, capture))
    s.rec._captures[name].append(capture)
