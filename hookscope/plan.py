"""Per-module recording plans: everything the hook of one module needs, decided once.

``record()``'s per-module options (``pick=``, ``calls=``, ``unsort=``, ``batch_dim=``) are
validated here, against the selected modules, before any hook exists.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from .errors import CallCountError, ModuleSelectionError
from .select import resolve_modules
from .structure import as_permutation

__all__ = ["BatchDim", "Plan", "make_plans", "mark_plain", "set_unsort"]

BatchDim = int | Mapping[tuple, int | None] | None


class Plan:
    """Everything the hook of one module needs, decided once."""

    __slots__ = ("batch_dim", "expected", "labels", "module", "module_type", "name", "perms",
                 "pick", "plain", "rnn", "rnn_states")

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module
        self.module_type = type(module)
        self.plain = False  # True: nothing to do to a tensor output but detach (and clone)
        self.pick: Callable[[Any], Any] | None = None
        self.labels: list[str] | None = None
        self.perms: list[Tensor] | Tensor | None = None  # list: one per call; Tensor: every call
        self.batch_dim: BatchDim | str = "auto"
        self.rnn = isinstance(module, nn.RNNBase)
        self.rnn_states: set[tuple[int, int]] | None = None  # see _rnn_states(), on demand
        self.expected = 1  # calls per forward pass that stop=True waits for

    def perm(self, call: int) -> Tensor | None:
        if isinstance(self.perms, list):
            return self.perms[call] if call < len(self.perms) else None
        return self.perms


def _per_module(
    option: str, value: Any, model: nn.Module, selected: dict[str, nn.Module]
) -> dict[str, Any]:
    """Spread a per-module option ``{name or pattern or type: value}`` over selected names."""
    if not isinstance(value, Mapping):
        raise TypeError(
            f"{option}= must map module names to values, e.g. {option}={{'encoder': ...}}; "
            f"got {type(value).__name__}."
        )
    out: dict[str, Any] = {}
    for key, v in value.items():
        try:
            hits = resolve_modules(model, key)
        except ModuleSelectionError as exc:
            raise ModuleSelectionError(f"{option}= key {key!r}: {exc}") from None
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
    return True


def make_plans(model: nn.Module, selected: dict[str, nn.Module], *, pick: Any = None,
               calls: Mapping[Any, list[str]] | None = None,
               batch_dim: Mapping[Any, BatchDim] | None = None) -> dict[str, Plan]:
    """A validated ``Plan`` per selected module from ``pick=``, ``calls=`` and
    ``batch_dim=`` (``unsort=`` is set by :func:`set_unsort`, as it may change per batch)."""
    plans = {name: Plan(name, m) for name, m in selected.items()}
    if pick is not None:
        picks = (_per_module("pick", pick, model, selected) if isinstance(pick, Mapping)
                 else dict.fromkeys(selected, pick))
        for name, fn in picks.items():
            if not callable(fn):
                raise TypeError(f"pick= for {name!r} must be callable, got {fn!r}.")
            plans[name].pick = fn
    for name, labels in _per_module("calls", calls or {}, model, selected).items():
        if isinstance(labels, str) or not all(isinstance(x, str) for x in labels):
            raise TypeError(f"calls= for {name!r} must be a list of str labels, one per "
                            f"call, e.g. ['premise', 'hypothesis']; got {labels!r}.")
        if len(set(labels)) != len(labels):
            raise ValueError(f"calls= labels for {name!r} repeat: {labels!r}.")
        plans[name].labels = list(labels)
        plans[name].expected = len(labels)
    for name, spec in _per_module("batch_dim", batch_dim or {}, model, selected).items():
        if not (spec is None or isinstance(spec, int | Mapping)):
            raise TypeError(f"batch_dim= for {name!r} must be an int, None, or a mapping "
                            f"of output path prefixes to dims; got {spec!r}.")
        plans[name].batch_dim = spec
    return plans


def set_unsort(plans: dict[str, Plan], model: nn.Module, selected: dict[str, nn.Module],
               unsort: Mapping[Any, Any] | None) -> None:
    """(Re)set every plan's ``unsort=`` permutations, validated."""
    for plan in plans.values():
        plan.perms = None
        plan.expected = len(plan.labels) if plan.labels is not None else 1
    for name, spec in _per_module("unsort", unsort or {}, model, selected).items():
        plan = plans[name]
        if _is_one_perm(spec):
            plan.perms = as_permutation(spec, f"{name!r} (every call)")
            continue
        if isinstance(spec, Mapping):  # {label: perm}
            if plan.labels is None:
                raise CallCountError(f"unsort= for {name!r} is keyed by labels, but "
                                     f"calls= gives {name!r} no labels.")
            unknown = set(spec) - set(plan.labels)
            if unknown:
                raise CallCountError(f"unsort= for {name!r} names unknown labels "
                                     f"{sorted(unknown)}; labels: {plan.labels}.")
            spec = [spec.get(lab) for lab in plan.labels]
        plan.perms = [None if p is None else as_permutation(p, f"{name!r} call {i}")
                      for i, p in enumerate(spec)]
        if plan.labels is not None and len(plan.perms) != len(plan.labels):
            raise CallCountError(
                f"unsort= gives {name!r} {len(plan.perms)} permutation(s) but calls= "
                f"gives {len(plan.labels)} label(s); give one per call.")
        plan.expected = max(plan.expected, len(plan.perms))


def mark_plain(plans: dict[str, Plan], device: Any, dtype: Any) -> None:
    """Flag the plans whose tensor outputs need nothing but detaching (the hook's fast path)."""
    for plan in plans.values():
        plan.plain = (plan.pick is None and plan.perms is None and device is None
                      and dtype is None)
