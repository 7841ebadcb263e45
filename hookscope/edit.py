"""Changing what a module returns: ``edit=`` functions, :func:`at` and :func:`patch`.

An edit runs inside the module's forward hook and returns the value the model continues with.
It sees the output **in the caller's batch order**: where ``unsort=`` is given, every leaf
with a batch dimension is put back in the original order before the function sees it, and
what it returns is put back in the model's (sorted) order afterwards.  That mapping is the
part hand-written hooks get wrong, so it lives here once, for edits and patches alike.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .capture import Capture
from .convert import batch_dim_of
from .errors import InputError, InputTypeError, UnsortError
from .plan import EditFn, Plan
from .structure import first_tensor, iter_tensors, map_leaves, takes_two_args

__all__ = ["CallInfo", "apply_edit", "at", "patch"]


class CallInfo(NamedTuple):
    """Which call an ``edit=`` function is editing (its second argument)."""

    name: str
    step: int
    call: int
    label: str | None


def apply_edit(fn: EditFn, output: Any, plan: Plan, info: CallInfo, perm: Tensor | None,
               rnn_states: Any, where: str) -> tuple[Any, dict[tuple, int | None] | None]:
    """Run ``fn`` on ``output`` in the caller's batch order; return the value in the model's
    order and the batch dimension used per leaf (``None`` without ``unsort=``)."""
    dims: dict[tuple, int | None] | None = None
    shown = output
    if perm is not None:
        dims = {}
        whole = plan if plan.pick is None else dataclasses.replace(plan, pick=None)

        def to_caller(path: tuple, x: Any) -> Any:
            if isinstance(x, PackedSequence):
                raise UnsortError(
                    f"edit for {where}: the output holds a PackedSequence, which cannot be "
                    "shown in the caller's batch order. Edit the module that pads it "
                    "(pad_packed_sequence) instead, or drop unsort= for this module and edit "
                    "in the model's sorted order.")
            dim = batch_dim_of(whole, path, x, False, len(perm), where, rnn_states)
            dims[path] = dim
            return x if dim is None else x.index_select(dim, plan.perm_on(perm, x.device))

        shown = map_leaves(output, to_caller)
        if all(d is None for d in dims.values()):
            raise UnsortError(f"unsort for {where}: no tensor in the output has a dimension of "
                              f"the permutation's length {len(perm)}.")
    new = fn(shown, info)  # the plan made every edit take (output, call)
    if new is None:
        raise InputError(
            f"edit for {where} returned None. Return the value the model continues with (the "
            "output itself to leave it unchanged); editing it in place and returning nothing "
            "would be lost where unsort= reorders the batch.")
    _check_like(new, output, where)
    if perm is None:
        return new, None
    def to_model(path: tuple, x: Any) -> Any:
        if path not in dims:
            raise InputError(f"edit for {where} returned a tensor at output"
                             f"{''.join(f'[{k!r}]' for k in path)}, where the module's output "
                             "had none: keep the output's structure when unsort= is given.")
        dim = dims[path]
        if dim is None:
            return x
        if x.ndim <= dim or x.shape[dim] != len(perm):
            raise InputError(f"edit for {where} changed the batch size at output"
                             f"{''.join(f'[{k!r}]' for k in path)} (shape {tuple(x.shape)}); "
                             f"an edit must keep the batch of {len(perm)}.")
        return x.index_select(dim, plan.inverse_on(perm, x.device))

    return map_leaves(new, to_model), dims


def _check_like(new: Any, output: Any, where: str) -> None:
    """What an edit returns must fit where the module's output went: same shapes, dtypes and
    devices for the tensors at the same places (else the model fails later, far from here)."""
    before = dict(iter_tensors(output))
    for path, t in iter_tensors(new):
        old = before.get(path)
        if old is None or old.is_nested or t.is_nested:
            continue
        if (old.shape, old.dtype, old.device) != (t.shape, t.dtype, t.device):
            at_ = "output" + "".join(f"[{k!r}]" for k in path)
            raise InputError(
                f"edit for {where} returned {at_} of shape {tuple(t.shape)}, {t.dtype} on "
                f"{t.device}, where the module returned {tuple(old.shape)}, {old.dtype} on "
                f"{old.device}: the model continues with it, so keep shape, dtype and device "
                "(e.g. torch.zeros_like(out), out.clone() edited in place).")


# -- editing one part of a structured output ------------------------------------------------


def at(path: Any, fn: Callable[..., Any]) -> Callable[[Any, CallInfo], Any]:
    """An ``edit=`` function that changes one part of a structured output.

    Parameters
    ----------
    path : key or tuple of keys
        Where the part is: an index (``0`` of a tuple), a key or attribute name
        (``"last_hidden_state"`` of a Hugging Face ``ModelOutput``), or a tuple of them for
        nested outputs (``(1, 0)``: ``h`` of an LSTM's ``(output, (h, c))``).
    fn : callable
        ``fn(part, call) -> new part`` (or ``fn(part)``).

    Returns
    -------
    callable
        ``edit(output, call)`` returning a copy of ``output`` with that part replaced (the
        containers are rebuilt; the other parts are the module's own).

    Examples
    --------
    >>> import torch, hookscope as hs
    >>> lstm = torch.nn.LSTM(2, 3, batch_first=True)
    >>> zero_h = hs.at((1, 0), lambda h: torch.zeros_like(h))
    >>> out, (h, c) = zero_h(lstm(torch.ones(1, 4, 2)), None)
    >>> bool((h == 0).all())
    True
    """
    keys = path if isinstance(path, tuple) else (path,)
    two = takes_two_args(fn, required=True)

    def edit(output: Any, call: CallInfo) -> Any:
        return _replace_at(output, keys, lambda part: fn(part, call) if two else fn(part), ())

    edit.same_for_every_call = not two  # type: ignore[attr-defined]  # (see recorder.py)
    return edit


def _replace_at(obj: Any, keys: tuple, fn: Callable[[Any], Any], done: tuple) -> Any:
    if not keys:
        return fn(obj)
    key, rest = keys[0], keys[1:]
    where = "output" + "".join(f"[{k!r}]" for k in done)
    try:
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
            name = obj._fields[key] if isinstance(key, int) else key
            return obj._replace(**{name: _replace_at(getattr(obj, name), rest, fn,
                                                     (*done, key))})
        if isinstance(obj, tuple | list):
            items = list(obj)
            items[key] = _replace_at(obj[key], rest, fn, (*done, key))
            return tuple(items) if isinstance(obj, tuple) else type(obj)(items)
        if isinstance(obj, Mapping):
            if isinstance(key, int) and key not in obj:  # ModelOutput: position of a field
                key = list(obj.keys())[key]
            new = copy.copy(obj)
            new[key] = _replace_at(obj[key], rest, fn, (*done, key))
            return new
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return dataclasses.replace(obj, **{key: _replace_at(getattr(obj, key), rest, fn,
                                                                (*done, key))})
    except (IndexError, KeyError, AttributeError, TypeError) as exc:
        raise InputError(f"hs.at: {where} ({type(obj).__name__}) has no part {key!r} "
                         f"({exc}).") from None
    raise InputError(f"hs.at: cannot go into {where}, a {type(obj).__name__}; give the path "
                     "of a tensor inside a tuple, list, dict, ModelOutput or dataclass.")


# -- patching in values from another run ----------------------------------------------------

Source = Tensor | np.ndarray | Capture


def patch(model: nn.Module, patches: Mapping[Any, Any], *, index: Any = None,
          modules: Iterable[Any] = (), **options: Any) -> Any:
    """Replace what modules return with given values (from another run) during the model's
    own forward pass: the activation-patching experiment in one ``with`` block.

    Parameters
    ----------
    model : nn.Module
        The model.
    patches : dict of {module: source, [source per call] or {label: source}}
        What each module should return instead.  A source is a :class:`~hookscope.Capture`
        (e.g. from a clean run: its whole output is patched in, leaf by leaf), a tensor or a
        NumPy array (the module's primary tensor).  Values are in the caller's batch order,
        as captures are (``unsort=`` maps them to the model's order); they are moved to the
        module output's device and dtype.  ``None`` in a per-call list leaves that call alone.
    index : index expression or dict of {module: index}, optional
        Patch only part of the tensor, e.g. ``(slice(None), 3)`` for position 3 of every
        sequence (``torch.IndexExpression``-style tuples; ``numpy.s_[:, 3]`` reads well).  The
        source may have the module output's full shape or the shape of that part.
    modules : list, optional
        Further modules to record during the patched run.  The patched ones are recorded
        too, with the patched value, and so are those that ``calls=``/``unsort=`` name.
    **options
        Any option of :func:`~hookscope.record` (``calls=``, ``unsort=``, ``stop=``, ...).

    Returns
    -------
    Recorder
        Use it as ``with hs.patch(...) as rec:`` around the model call.

    Raises
    ------
    InputError
        A source whose shape does not fit the module's output (checked at the call).

    Examples
    --------
    >>> import torch, hookscope as hs
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh())
    >>> clean, corrupted = torch.ones(1, 2), torch.zeros(1, 2)
    >>> with hs.record(model, ["0"]) as rec:
    ...     clean_out = model(clean)
    >>> with hs.patch(model, {"0": rec["0"]}):
    ...     patched_out = model(corrupted)
    >>> torch.equal(patched_out, clean_out)
    True
    """
    from .recorder import Recorder

    if "edit" in options:
        raise InputError("hs.patch builds its own edit=; use hs.record(..., edit=...) to "
                         "combine patches with other edits.")
    if not isinstance(patches, Mapping) or not patches:
        raise InputTypeError("patches= must map modules to what they should return, e.g. "
                             "{'encoder': clean['encoder']}; got "
                             f"{type(patches).__name__ if patches else 'nothing'}.")
    per_module_index = isinstance(index, Mapping)
    edits = {}
    for key, spec in patches.items():
        where_index = index.get(key) if per_module_index else index
        edits[key] = _per_call(spec, lambda s, i=where_index: _patch_fn(s, i))
    extra = [modules] if isinstance(modules, str | type) else list(modules)
    # Modules that calls= / unsort= speak of are recorded too (one labels dict serves the
    # clean recording and the patched run).
    for option in ("calls", "unsort", "batch_dim"):
        extra.extend(options.get(option) or ())
    recorded = list(dict.fromkeys([*patches, *extra]))
    return Recorder(model, recorded, edit=edits, **options)


def _per_call(spec: Any, make: Callable[[Any], EditFn]) -> Any:
    """A source, a list of sources (per call) or {label: source} -> the same of edit fns."""
    if isinstance(spec, Mapping):
        return {label: None if s is None else make(s) for label, s in spec.items()}
    if isinstance(spec, list | tuple):
        return [None if s is None else make(s) for s in spec]
    return make(spec)


def _patch_fn(source: Any, index: Any) -> EditFn:
    if not isinstance(source, Tensor | np.ndarray | Capture):
        raise InputTypeError(f"a patch source must be a Capture, a tensor or a NumPy array; "
                             f"got {type(source).__name__}.")

    def patch_edit(output: Any, call: CallInfo) -> Any:
        where = f"{call.name!r} call {call.call}" + (f" ({call.label!r})" if call.label else "")
        value = source.output if isinstance(source, Capture) else source
        if isinstance(output, Tensor):
            return _patched(output, _primary(value), index, where, "output")
        if isinstance(value, Tensor | np.ndarray):  # a tensor for a structured output: its
            paths = [p for p, _ in iter_tensors(output)]  # primary tensor
            if not paths:
                raise InputError(f"patch for {where}: the module returned no tensor.")
            return at(paths[0], lambda t: _patched(t, value, index, where, "output"))(output,
                                                                                     call)
        leaves = dict(iter_tensors(value))
        if not leaves.keys() & {p for p, _ in iter_tensors(output)}:
            raise InputError(f"patch for {where}: the source's structure shares no tensor "
                             "position with the module's output; patch a tensor instead.")

        def leaf(path: tuple, x: Any) -> Any:
            if path not in leaves:
                return x
            name = "output" + "".join(f"[{k!r}]" for k in path)
            return _patched(x, leaves[path], index, where, name)

        return map_leaves(output, leaf)

    patch_edit.same_for_every_call = True  # type: ignore[attr-defined]  # (the call only
    # names it in messages: recorder.py)
    return patch_edit


def _primary(value: Any) -> Tensor | np.ndarray:
    if isinstance(value, Tensor | np.ndarray):
        return value
    t = first_tensor(value)
    if t is None:
        raise InputError("the patch source holds no tensor.")
    return t


def _patched(out: Any, value: Any, index: Any, where: str, name: str) -> Tensor:
    if isinstance(out, PackedSequence):
        raise InputError(f"patch for {where}: {name} is a PackedSequence. Patch the module "
                         "that returns it padded (the story's encoder wrapper), or use edit=.")
    v = torch.as_tensor(value)
    if index is None:
        if tuple(v.shape) != tuple(out.shape):
            raise InputError(f"patch for {where}: the module's {name} has shape "
                             f"{tuple(out.shape)} but the patch has shape {tuple(v.shape)}. "
                             "Patch with a value of the same batch and sizes (a capture of "
                             "the same module on a batch of the same shape).")
        # The output's own layout and dtype, so a patch with the run's own values changes
        # nothing downstream, bit for bit; a constant: no gradient flows to earlier modules.
        new = torch.empty_like(out, requires_grad=False)
        with torch.no_grad():
            new.copy_(v)
        return new
    part = out[index]
    if tuple(v.shape) == tuple(out.shape):
        v = v[index]
    elif tuple(v.shape) != tuple(part.shape):
        raise InputError(f"patch for {where}: index {index!r} selects shape "
                         f"{tuple(part.shape)} of the module's {name} {tuple(out.shape)}, but "
                         f"the patch has shape {tuple(v.shape)}; give the full shape or the "
                         "part's.")
    new = out.clone()  # differentiable: gradients still reach the positions left alone
    new[index] = v.to(device=out.device, dtype=out.dtype)
    return new
