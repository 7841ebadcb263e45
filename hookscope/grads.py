"""``grads=True``: the gradient of the loss with respect to each recorded call's output.

A tensor hook on each output leaf (the very tensor the model continues with) receives the
gradient during ``backward()``; it is converted like the value was (``PackedSequence``
padded, ``unsort=`` applied with the same batch dimensions, moved/cast) and kept in the
capture's :class:`GradStore`.  The hooks hold the store only weakly: a graph the user keeps
alive after the block keeps no recording alive, and a hook whose capture is gone does
nothing.  The model's own gradients are untouched (the hooks return ``None``).
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from .convert import convert
from .errors import InputError
from .plan import Plan
from .structure import iter_tensors, map_leaves

__all__ = ["GradStore", "attach_grad_hooks", "require_grads"]


class GradStore:
    """Gradients of one capture's output leaves, by path, summed over ``backward()`` calls
    (as ``Tensor.grad`` accumulates)."""

    __slots__ = ("__weakref__", "grads")

    def __init__(self) -> None:
        self.grads: dict[tuple, Tensor] = {}

    def add(self, path: tuple, grad: Tensor) -> None:
        old = self.grads.get(path)
        self.grads[path] = grad if old is None else old + grad


def _wants_grad(t: Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def require_grads(output: Any) -> Any:
    """``output`` with every floating leaf that does not require grad replaced by a copy that
    does (same values), so a frozen model or one fed plain inputs still gets gradients from
    here on; ``output`` itself when nothing had to change.

    Safe: a tensor that does not require grad has no graph behind it to cut.
    """
    if not torch.is_grad_enabled():
        return output
    changed = False

    def leaf(path: tuple, x: Any) -> Any:
        nonlocal changed
        t = x.data if isinstance(x, PackedSequence) else x
        if t.requires_grad or not _wants_grad(t) or t.is_inference():
            return x
        changed = True
        # A copy of a leaf, not the leaf itself: the model may change its output in place
        # (nn.ReLU(inplace=True)), which autograd forbids on a leaf that requires grad.
        t = t.detach().requires_grad_().clone()
        return x._replace(data=t) if isinstance(x, PackedSequence) else t

    new = map_leaves(output, leaf)
    return new if changed else output


def attach_grad_hooks(value: Any, output: Any, plan: Plan, perm: Tensor | None,
                      dims: dict[tuple, int | None], where: str,
                      store: GradStore | None = None) -> GradStore:
    """Register a tensor hook on every leaf of ``value`` (the output, or what ``pick=`` chose
    from it) that requires grad; return the store the gradients will arrive in (``store``,
    or a new one)."""
    store = GradStore() if store is None else store
    ref = weakref.ref(store)
    # The gradient is converted as the value was: same batch dims, device, dtype; always a
    # copy of its own (clone=False is about values, not gradients), made synchronously (no
    # pinned staging: a gradient arrives after the block's one wait for copies in flight).
    gplan = dataclasses.replace(plan, pick=None, clone=True, staging=None)
    own = None
    if plan.pick is not None:  # pick= must choose leaves of the output, not compute new ones
        own = {id(t) for _, t in iter_tensors(output)}
    for path, t in iter_tensors(value):
        if not (t.requires_grad and _wants_grad(t)):
            continue
        if own is not None and id(t) not in own:
            raise InputError(
                f"grads=True for {where}: pick= returned a tensor computed from the output "
                "(a slice or a new tensor), which the model never uses, so no gradient can "
                "reach it. Pick a part of the output (lambda out: out[0]) and slice "
                "Capture.grad afterwards.")
        meta = _packed_meta(value, path)
        t.register_hook(_grad_hook(ref, path, meta, dims.get(path), perm, gplan))
    return store


def _packed_meta(value: Any, path: tuple) -> tuple | None:
    """``(batch_sizes, sorted_indices, unsorted_indices)`` if the leaf at ``path`` is a
    ``PackedSequence`` (its data is what the hook sees), else ``None``."""
    x = value
    for k in path:
        x = x[k] if not dataclasses.is_dataclass(x) else getattr(x, k)
    if isinstance(x, PackedSequence):
        return x.batch_sizes, x.sorted_indices, x.unsorted_indices
    return None


def _grad_hook(ref: weakref.ref, path: tuple, meta: tuple | None, dim: int | None,
               perm: Tensor | None, plan: Plan) -> Callable[[Tensor], None]:
    def hook(grad: Tensor) -> None:
        store = ref()
        if store is None:  # the recording is gone: nothing to keep
            return
        g: Any = grad if meta is None else PackedSequence(grad, *meta)
        store.add(path, convert(g, plan, perm=perm, dims={(): dim}).value)

    return hook
