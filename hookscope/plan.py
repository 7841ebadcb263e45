"""Per-module recording plans: everything the hook of one module needs, decided once.

``record()``'s per-module options (``pick=``, ``calls=``, ``unsort=``, ``batch_dim=``) are
validated here, against the selected modules, before any hook exists.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .errors import (
    CallCountError,
    InputError,
    InputTypeError,
    ModuleSelectionError,
    UnsortError,
)
from .layout import channels_first_1d, channels_last, sequence_batch_dim
from .select import describe_spec, resolve_modules
from .structure import as_permutation, takes_two_args

__all__ = ["BatchDim", "Plan", "build_plans", "with_perms"]

BatchDim = int | Mapping[tuple, int | None] | None
#: ``edit=``: ``fn(output, call) -> new output`` (``call``: :class:`CallInfo`), or ``fn(output)``.
EditFn = Callable[..., Any]


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything the hook of one module needs, decided once (immutable: a recorder that
    records another batch order makes new plans, see :func:`build_plans`)."""

    name: str
    module: nn.Module
    module_type: type
    pick: Callable[[Any], Any] | None = None
    labels: tuple[str, ...] | None = None
    perms: tuple[Tensor | None, ...] | Tensor | None = None  # tuple: per call; Tensor: every
    batch_dim: Any = "auto"
    device: torch.device | None = None
    dtype: torch.dtype | None = None
    clone: Any = True
    rnn: bool = False
    # One of PyTorch's RNN, attention or transformer modules: the batch dim of its own output
    # sequence by its batch_first, 0 or 1 (time-major); None for other modules (layout.py).
    seq_dim: int | None = None
    # A 1-D convolution, pooling or normalisation layer: its own 3-D output is a feature map
    # (batch, channels, length), not a sequence (see layout.py).
    map_1d: bool = False
    # A layer that acts on the last dimension (nn.Linear, nn.LayerNorm): its own 4-D or larger
    # output is channels-last, (batch, *spatial, channels) (see layout.py).
    map_last: bool = False
    # Feature size of a bidirectional RNN's output ([forward, backward] halves) in this module
    # (itself, or the one RNN inside a wrapper): captures of that width know they are.
    bidir_units: int | None = None
    expected: int = 1  # calls per forward pass that stop=True waits for
    plain: bool = False  # True: nothing to do to a tensor output but detach and snapshot
    # edit=: one function for every call, or a tuple with one (or None) per call.
    edits: tuple[EditFn | None, ...] | EditFn | None = None
    grads: bool = False  # grads=True: tensor hooks keep the gradient of each call's output
    # device="cpu": the recorder's pinned buffers and asynchronous copies (see offload.py).
    staging: Any = None
    # record_dataset: rows(capture, perm) -> (rows, shares memory) reduces each call to one row
    # per example in the hook, in the model's batch order (see rows_at_call.py).
    rows: Callable[[Any, Tensor | None], tuple[Tensor, bool]] | None = None
    # The permutations copied to the devices they were used on, made once (a host-to-device
    # copy from pageable memory waits for the GPU: it must not run in every call).
    device_perms: dict = field(default_factory=dict, compare=False, repr=False)
    # The caller's unsort= tensors and their versions when they were read (like perms: one,
    # or one per call): a tensor refilled in place afterwards is an error, not ignored.
    perm_sources: Any = field(default=None, compare=False, repr=False)

    def perm(self, call: int) -> Tensor | None:
        if isinstance(self.perms, tuple):
            if call >= len(self.perms):
                return None
            sources = self.perm_sources
            perm, source = self.perms[call], None if sources is None else sources[call]
        else:
            perm, source = self.perms, self.perm_sources
        if source is not None and source[0]._version != source[1]:
            raise UnsortError(
                f"unsort for {self.name!r} call {call}: the permutation tensor was changed in "
                "place after it was given (permutations are read when record(), "
                "with_unsort() or run() is called). Give each batch's permutation with "
                "recorder.with_unsort({...}) or recorder.run(batch, unsort={...}) instead of "
                "refilling one tensor.")
        return perm

    def edit(self, call: int) -> EditFn | None:
        if isinstance(self.edits, tuple):
            return self.edits[call] if call < len(self.edits) else None
        return self.edits

    def inverse_on(self, perm: Tensor, device: torch.device) -> Tensor:
        """``perm.argsort()`` on ``device``, made once (``edit=`` maps an edited output back
        to the model's order with it)."""
        key = ("inverse", id(perm), device)  # perm is one of the plan's: its id stays unique
        on = self.device_perms.get(key)
        if on is None:
            inverse = perm.argsort()
            if inverse.device != device:
                source = inverse.pin_memory() if device.type == "cuda" else inverse
                inverse = source.to(device, non_blocking=True)
            on = self.device_perms[key] = inverse
        return on

    def perm_on(self, perm: Tensor, device: torch.device) -> Tensor:
        """``perm`` (one of :attr:`perms`, on the CPU) on ``device``: copied once per device,
        from pinned memory without waiting, then reused by every call."""
        if perm.device == device:
            return perm
        key = (id(perm), device)  # the plan keeps its perms alive: ids stay unique
        on = self.device_perms.get(key)
        if on is None:
            source = perm.pin_memory() if device.type == "cuda" else perm
            on = self.device_perms[key] = source.to(device, non_blocking=True)
        return on


_INIT_FIELDS = tuple(f.name for f in dataclasses.fields(Plan) if f.init)


def _per_module(
    option: str, value: Any, model: nn.Module, selected: dict[str, nn.Module]
) -> dict[str, Any]:
    """Spread a per-module option ``{name or pattern or type: value}`` over selected names."""
    if not isinstance(value, Mapping):
        raise InputTypeError(
            f"{option}= must map module names to values, e.g. {option}={{'encoder': ...}}; "
            f"got {type(value).__name__}."
        )
    out: dict[str, Any] = {}
    by_object = {id(m): n for n, m in selected.items()}  # (a module under two names)
    for key, v in value.items():
        try:
            found = resolve_modules(model, key)
        except ModuleSelectionError as exc:
            raise ModuleSelectionError(f"{option}= key {describe_spec(key)}: {exc}") from None
        hits = [by_object.get(id(m), n) for n, m in found.items()]
        missing = [n for n in hits if n not in selected]
        if missing:
            raise ModuleSelectionError(
                f"{option}= names {missing[0]!r}, which is not among the recorded modules "
                f"({', '.join(map(repr, selected))}); add it to the modules to record."
            )
        out.update(dict.fromkeys(hits, v))
    return out


def _is_one_perm(value: Any) -> bool:
    """A single permutation (tensor, array, list of ints) rather than a list of them."""
    if isinstance(value, list | tuple):
        return not value or isinstance(value[0], int)
    return not isinstance(value, Mapping)  # {label: permutation} is per call


def build_plans(model: nn.Module, selected: dict[str, nn.Module], *, pick: Any = None,
                calls: Mapping[Any, list[str]] | None = None,
                unsort: Mapping[Any, Any] | None = None,
                batch_dim: Mapping[Any, BatchDim] | None = None,
                device: torch.device | None = None, dtype: torch.dtype | None = None,
                clone: Any = True, staging: Any = None, edit: Mapping[Any, Any] | None = None,
                grads: bool = False, rows: Callable | None = None,
                any_rnn: bool = True) -> dict[str, Plan]:
    """A validated, immutable ``Plan`` per selected module from ``record()``'s options
    (``any_rnn=False``: the model holds no RNN, so no module needs searching for one)."""
    fields: dict[str, dict[str, Any]] = {
        name: {"name": name, "module": m, "module_type": type(m), "device": device,
               "dtype": dtype, "clone": clone, "staging": staging,
               "rnn": isinstance(m, nn.RNNBase), "seq_dim": sequence_batch_dim(m),
               "map_1d": channels_first_1d(m), "map_last": channels_last(m),
               "bidir_units": _bidirectional_units(m) if any_rnn else None,
               "grads": grads, "rows": rows}
        for name, m in selected.items()}
    if pick is not None:
        picks = (_per_module("pick", pick, model, selected) if isinstance(pick, Mapping)
                 else dict.fromkeys(selected, pick))
        for name, fn in picks.items():
            if not callable(fn):
                raise InputTypeError(f"pick= for {name!r} must be callable, got {fn!r}.")
            fields[name]["pick"] = fn
    for name, labels in _per_module("calls", calls or {}, model, selected).items():
        if isinstance(labels, str) or not all(isinstance(x, str) for x in labels):
            raise InputTypeError(f"calls= for {name!r} must be a list of str labels, one per "
                            f"call, e.g. ['premise', 'hypothesis']; got {labels!r}.")
        if len(set(labels)) != len(labels):
            raise InputError(f"calls= labels for {name!r} repeat: {labels!r}.")
        fields[name]["labels"] = tuple(labels)
    for name, spec in _per_module("batch_dim", batch_dim or {}, model, selected).items():
        if not (spec is None or isinstance(spec, int | Mapping)):
            raise InputTypeError(f"batch_dim= for {name!r} must be an int, None, or a mapping "
                            f"of output path prefixes to dims; got {spec!r}.")
        fields[name]["batch_dim"] = spec
    for name, spec in _per_module("unsort", unsort or {}, model, selected).items():
        _unsort_fields(name, spec, fields[name])
    for name, spec in _per_module("edit", edit or {}, model, selected).items():
        fields[name]["edits"] = _edit_spec(name, spec, fields[name].get("labels"))
    for f in fields.values():
        _derived_fields(f)
    return {name: Plan(**f) for name, f in fields.items()}


def with_perms(plans: dict[str, Plan], model: nn.Module, selected: dict[str, nn.Module],
               unsort: Mapping[Any, Any] | None) -> dict[str, Plan]:
    """``plans`` with ``unsort=`` replaced (validated as :func:`build_plans` does) and every
    other option kept, without building them again: ``record_dataset`` does this per batch."""
    given = _per_module("unsort", unsort or {}, model, selected)
    out = {}
    for name, plan in plans.items():
        if name not in given and plan.perms is None:
            out[name] = plan
            continue
        f = {k: getattr(plan, k) for k in _INIT_FIELDS}
        f.update(perms=None, perm_sources=None, device_perms={})  # (cached device copies
        # belong to the old perms)
        if name in given:
            _unsort_fields(name, given[name], f)
        out[name] = Plan(**_derived_fields(f))
    return out


def _derived_fields(f: dict[str, Any]) -> dict[str, Any]:
    """Set the fields that follow from the others: calls per forward pass that ``stop=True``
    waits for, and whether the plan is plain."""
    labels, edits, perms = f.get("labels"), f.get("edits"), f.get("perms")
    f["expected"] = max([len(labels) if labels is not None else 1,
                         *(len(x) for x in (edits, perms) if isinstance(x, tuple))])
    f["plain"] = (f.get("pick") is None and perms is None and f.get("device") is None
                  and f.get("dtype") is None and edits is None and not f.get("grads")
                  and f.get("rows") is None and f.get("seq_dim") != 1
                  and f.get("batch_dim", "auto") == "auto")  # (the capture's batch_dim)
    return f


def _edit_spec(name: str, spec: Any, labels: tuple[str, ...] | None) -> Any:
    """``edit=`` of one module: a function (every call), a list with a function or None per
    call, or ``{label: function}`` (needs ``calls=`` labels)."""
    if callable(spec):
        return _as_two_args(spec)
    if isinstance(spec, Mapping):
        spec = _by_label("edit", name, spec, labels)
    if not isinstance(spec, list | tuple) or not all(f is None or callable(f) for f in spec):
        raise InputTypeError(
            f"edit= for {name!r} must be a function fn(output, call) -> new output, a list "
            f"with a function (or None) per call, or {{label: function}}; got {spec!r}.")
    if labels is not None and len(spec) > len(labels):
        raise CallCountError(f"edit= gives {name!r} {len(spec)} functions but calls= gives "
                             f"{len(labels)} labels.")
    return tuple(None if f is None else _as_two_args(f) for f in spec)


def _as_two_args(fn: EditFn) -> EditFn:
    """``fn(output, call)`` as it is; ``fn(output)`` (or a defaulted second parameter)
    wrapped once here, so that the hook calls every edit the same way."""
    if takes_two_args(fn, required=True):
        return fn

    def edit(output: Any, call: Any) -> Any:
        return fn(output)

    edit.same_for_every_call = True  # (a re-run in backward() needs no call: recorder.py)
    return edit


def _by_label(option: str, name: str, spec: Mapping[str, Any],
              labels: tuple[str, ...] | None) -> list[Any]:
    """``{label: value}`` -> a list with a value (or None) per call, in label order."""
    if labels is None:
        raise CallCountError(f"{option}= for {name!r} is keyed by labels, but calls= gives "
                             f"{name!r} no labels; add calls={{{name!r}: [...]}}.")
    unknown = set(spec) - set(labels)
    if unknown:
        raise CallCountError(f"{option}= for {name!r} names unknown labels {sorted(unknown)}; "
                             f"labels: {list(labels)}.")
    return [spec.get(lab) for lab in labels]


def _bidirectional_units(module: nn.Module) -> int | None:
    """``2 * hidden`` if ``module`` is, or wraps exactly one, bidirectional RNN; else None."""
    rnns = [m for m in module.modules() if isinstance(m, nn.RNNBase)]
    if len(rnns) != 1 or not rnns[0].bidirectional:
        return None
    rnn = rnns[0]
    return 2 * (getattr(rnn, "proj_size", 0) or rnn.hidden_size)


def _unsort_fields(name: str, spec: Any, f: dict[str, Any]) -> None:
    labels = f.get("labels")
    if _is_one_perm(spec):
        f["perms"] = as_permutation(spec, f"{name!r} (every call)")
        f["perm_sources"] = _source(spec)
        return
    if isinstance(spec, Mapping):  # {label: perm}
        missing = [lab for lab in labels or () if lab not in spec]
        if labels is not None and missing:  # (a call left out would stay in model order)
            raise CallCountError(
                f"unsort= for {name!r} gives no permutation for labels {missing}: give one for "
                "every call, or None to leave a call in the model's order.")
        spec = _by_label("unsort", name, spec, labels)
    perms = tuple(None if p is None else as_permutation(p, f"{name!r} call {i}")
                  for i, p in enumerate(spec))
    if labels is not None and len(perms) != len(labels):
        raise CallCountError(
            f"unsort= gives {name!r} {len(perms)} permutation(s) but calls= "
            f"gives {len(labels)} label(s); give one per call.")
    f["perms"] = perms
    f["perm_sources"] = tuple(_source(p) for p in spec)


def _source(perm: Any) -> tuple[Tensor, int] | None:
    """The caller's permutation tensor and its version now (see Plan.perm_sources)."""
    if not isinstance(perm, Tensor):
        return None
    try:
        return perm, perm._version
    except RuntimeError:  # an inference-mode tensor keeps no version (nor can it change)
        return None
