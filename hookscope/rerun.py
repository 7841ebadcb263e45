"""Modules re-run inside ``backward()`` by activation checkpointing.

``torch.utils.checkpoint`` (reentrant or not), Hugging Face's
``gradient_checkpointing_enable()`` and reversible layers (Reformer) run modules a second time
while back-propagating.  A re-run is the same computation as a call of the forward pass: it is
no call of its own, it must get that call's edit (else the gradients are those of an unedited
forward), and with ``grads=True`` its gradient belongs to that call's capture (reentrant
checkpointing ran the call itself without autograd).

The recorder notes each call with an edit or ``grads=True`` that runs where ``backward()`` will
run it again (:func:`checkpointed`), and hands each re-run to :func:`rerun`, which finds its
call among those, or raises rather than leave a re-run silently unedited.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .capture import Capture
from .convert import convert
from .edit import CallInfo, apply_edit
from .errors import CaptureModifiedError, HookscopeError
from .grads import attach_grad_hooks
from .plan import Plan
from .structure import first_tensor, iter_tensors

__all__ = ["CheckpointNotes", "checkpointed", "graph_task", "rerun"]

#: Inside a backward pass (an id other than -1), a module's forward is a re-run.
graph_task: Callable[[], int] = getattr(torch._C, "_current_graph_task_id", lambda: -1)

Key = tuple[str, int, int]  # (module, step, call)


class CheckpointNotes:
    """One block's calls that ``backward()`` will re-run, and what reached them."""

    __slots__ = ("calls", "counts", "no_grad", "reached", "warned")

    def __init__(self) -> None:
        # call -> whether a backward() must reach it visibly (a re-run, or a gradient at its
        # output); False: an output outside the graph (an ablation to a constant), which an
        # early-stopping re-run may never reach.
        self.calls: dict[Key, bool] = {}
        self.reached: set[Key] = set()
        self.no_grad: set[Key] = set()  # calls run without autograd: the re-run's gradient
        # is theirs (reentrant checkpointing)
        self.counts: dict[tuple[int, str], int] = {}  # (backward, module) -> re-runs
        self.warned: set[str] = set()

    def note(self, key: Key, output: Any, grad_enabled: bool) -> None:
        """A call that ran under checkpointing; with autograd on, a hook on its output tells
        when a backward() reaches it (non-reentrant checkpointing may stop re-running before
        this module: it re-runs only what backward needs)."""
        t = next((t for _, t in iter_tensors(output) if t.requires_grad), None)
        self.calls[key] = t is not None or not grad_enabled  # (reentrant: always re-run)
        if not grad_enabled:
            self.no_grad.add(key)
        if t is not None:
            def reached(grad: Tensor) -> None:
                self.reached.add(key)

            t.register_hook(reached)

    def unreached(self) -> int:
        """Calls that no backward() in the block reached: a backward() after the block
        re-runs them without hookscope.  (A call whose output left the graph, an ablation
        to a constant, shows no sign either way, and is not counted: a re-run stops early
        before it wherever nothing backward needs depends on it.)"""
        return sum(1 for k, visible in self.calls.items() if visible and k not in self.reached)


def checkpointed() -> bool:
    """Whether the forward pass runs where ``backward()`` will run it again: non-reentrant
    checkpointing (its saved-tensor hooks; ``save_on_cpu`` answers yes too), or a module run
    without autograd inside an autograd ``Function``'s ``forward(ctx, ...)`` (reentrant
    checkpointing, reversible layers), which runs it again with autograd in ``backward``."""
    if torch.is_grad_enabled():
        try:
            return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
        except (AttributeError, TypeError, RuntimeError):  # (a private function)
            return False
    frame = sys._getframe(1)
    while frame is not None:  # (edits and grads without autograd only)
        code = frame.f_code
        if code.co_name == "forward" and code.co_varnames[:1] == ("ctx",):
            return True
        frame = frame.f_back
    return False


def rerun(s: Any, plan: Plan, output: Any, where_of: Callable[[str, int, Any], Any],
          require_grads: Callable[..., Any]) -> Any:
    """What the model continues with after a re-run of ``plan``'s module (``None``: its
    output as it is).

    The re-run is one of the block's calls that ran under checkpointing (a module called
    outside checkpointing in the block is never re-run: a re-run of it comes from a forward
    pass before the block, and is left alone).  Where the module ran once so, that call;
    else an edit must be the same for every call, and gradients go to the one call whose kept
    value the re-run reproduces exactly.  More re-runs in one backward() than calls is an
    error, as is a call-dependent edit that cannot be matched."""
    notes: CheckpointNotes | None = s.checkpoint
    name = plan.name
    caps = [c for c in s.rec._captures.get(name) or ()
            if notes is not None and (name, c.step, c.call) in notes.calls]
    if not caps:  # (no call of the block ran under checkpointing: another forward's re-run)
        return None
    count = (graph_task(), name)
    notes.counts[count] = runs = notes.counts.get(count, 0) + 1
    if runs > len(caps):
        raise HookscopeError(
            f"{name!r} was re-run {runs} times inside one backward() but ran {len(caps)} "
            "time(s) under activation checkpointing in this block: checkpoints are nested, or "
            "the loss also depends on a checkpointed forward pass from outside the block. "
            "Their re-runs cannot be told apart, so edits or gradients would be mixed up: "
            "compute and back-propagate each block's loss inside it, or do not nest "
            "checkpoints while editing or recording gradients.")
    edits, perms = plan.edits, plan.perms
    target = caps[0] if len(caps) == 1 else None
    if target is None and edits is not None and (
            isinstance(edits, tuple) or isinstance(perms, tuple)
            or not getattr(edits, "same_for_every_call", False)):
        raise HookscopeError(
            f"{name!r} was re-run inside backward() (activation checkpointing: "
            "torch.utils.checkpoint or gradient_checkpointing_enable()), and ran "
            f"{len(caps)} times in this block, so the re-run cannot be matched to its call, "
            "and its edit depends on the call. Its gradients would not be those of the edited "
            "forward. Call backward() after each forward pass in a block of its own, give one "
            "edit function of the output alone for every call, or turn checkpointing off "
            "while editing (model.gradient_checkpointing_disable()).")
    if target is not None:
        notes.reached.add((name, target.step, target.call))
    else:  # (the same edit for every call: one of them, whichever)
        notes.reached.add(next((k for k in ((name, c.step, c.call) for c in caps)
                                if k not in notes.reached), (name, caps[0].step, caps[0].call)))
    call = 0 if target is None else target.call
    where = where_of(name, call, None if target is None else target.label)
    perm = plan.perm(call) if perms is not None else None
    returned = dims = None
    edit = plan.edit(call) if edits is not None else None
    if edit is not None:
        info = (CallInfo(name, -1, -1, None) if target is None else
                CallInfo(name, target.step, target.call, target.label))
        output, dims = apply_edit(edit, output, plan, info, perm, s.rnn_states, where)
        returned = output
    if plan.grads and torch.is_grad_enabled():
        returned = require_grads(s, output, returned, where)
        output = output if returned is None else returned
        _send_gradient(s, notes, plan, output, dims, caps, target, where)
    return returned


def _send_gradient(s: Any, notes: CheckpointNotes, plan: Plan, output: Any, dims: Any,
                   caps: list[Capture], target: Capture | None, where: Any) -> None:
    """Hooks that send the re-run's gradient to its call's capture (non-reentrant
    checkpointing never back-propagates through a re-run: there they never fire)."""
    value = plan.pick(output) if plan.pick is not None else output
    gplan = dataclasses.replace(plan, staging=None, clone=True)
    found = []
    for cap in [target] if target is not None else caps:
        perm = plan.perm(cap.call) if plan.perms is not None else None
        converted = convert(value, gplan, perm=perm, where=where, rnn_states=s.rnn_states,
                            dims=None if plan.pick is not None else dims)
        if target is not None or _same_value(_kept(cap), first_tensor(converted.value)):
            found.append((cap, perm, converted))
    if len(found) == 1:
        cap, perm, converted = found[0]
        cap._grads = attach_grad_hooks(value, output, plan, perm, converted.dims, where,
                                       store=cap._grads)
    elif plan.name not in notes.warned and any(
            (c.name, c.step, c.call) in notes.no_grad for c in caps):  # (no gradient else)
        notes.warned.add(plan.name)
        warnings.warn(
            f"grads=True: {plan.name!r} was re-run inside backward() (reentrant activation "
            f"checkpointing) and ran {len(caps)} times in this block; the re-run reproduces "
            f"{'no' if not found else 'more than one'} call's kept value, so its gradient is "
            "not kept (Capture.grad stays None for it). Call backward() after each forward "
            "pass in a block of its own, or use use_reentrant=False.", stacklevel=3)


def _kept(cap: Capture) -> Tensor | None:
    """A capture's primary tensor as kept (a copy to the host in flight waited for), or
    ``None`` where a ``clone=False`` value was changed since."""
    try:
        return first_tensor(cap.output)
    except CaptureModifiedError:
        return None


def _same_value(kept: Tensor | None, rerun: Tensor | None) -> bool:
    """Whether a re-run reproduced a kept value exactly (a re-run repeats the call's
    computation; checkpointing restores its random state)."""
    if kept is None or rerun is None or kept.is_nested or rerun.is_nested:
        return False
    return (kept.shape == rerun.shape and kept.dtype == rerun.dtype
            and torch.equal(kept, rerun.to(kept.device)))
