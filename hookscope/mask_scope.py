"""Which part of a model the model call's padding mask belongs to.

The recorder reads the ``(batch, time)`` mask from the model call (``mask_from=``, by default
``attention_mask=``) and gives it to every ``(batch, time, features)`` capture of that shape.
A model with several streams passes the mask on to the part it belongs to: T5 and BART call
``encoder(..., attention_mask=mask)`` and ``decoder(..., attention_mask=decoder_mask)``, CLIP
calls ``text_model(..., attention_mask=mask)`` and ``vision_model(pixel_values)``, Wav2Vec2
calls ``encoder(..., attention_mask=frame_mask)`` with a mask of its own over frames.  So the
recorder watches the model's direct children and the ancestors of the selected modules
(:func:`scope_modules`): a module called with the mask keyword opens a *scope* for its
forward (:func:`scope_mask`):

- called with the model call's very mask, the mask is *handed* to it: captures inside take
  it, and captures outside every scope in that forward pass get none (they belong to another
  stream: the decoder, the vision tower), decided when the pass ends;
- called with a 2-D padding mask of its own (a decoder's, a mask over audio frames): captures
  inside take that one;
- called with anything else (``None``, the 4-D additive masks that layers get): no scope, the
  enclosing one applies.

A capture outside every scope, in a model that never hands its mask on (BERT, GPT-2, a
sentence encoder), takes the model call's mask, as before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import Tensor, nn

__all__ = ["end_pass", "scope_hooks", "scope_mask", "scope_modules"]

#: What :func:`scope_mask` returns where a call opens no scope.
NO_SCOPE = object()


def scope_modules(model: nn.Module, selected: Iterable[nn.Module]) -> tuple[nn.Module, ...]:
    """The model's direct children and every ancestor of a selected module below the model
    (the model itself is the model call: read by the recorder's step hook)."""
    parents: dict[int, nn.Module | None] = {}
    found: dict[int, nn.Module] = {id(m): m for m in model.children()}
    stack = [(model, None)]
    while stack:  # (parent of each module, once: shared modules keep their first parent)
        module, parent = stack.pop()
        if id(module) in parents:
            continue
        parents[id(module)] = parent
        stack.extend((child, module) for child in module.children())
    for m in selected:
        parent = parents.get(id(m))
        while parent is not None and parent is not model:
            found.setdefault(id(parent), parent)
            parent = parents.get(id(parent))
    return tuple(found.values())


def scope_mask(mask_from: str, args: tuple, kwargs: dict | None, model_raw: Any,
               model_mask: Tensor | None) -> Any:
    """The scope a call opens (see the module docstring): ``(mask, handed)`` where ``mask``
    is the mask its captures take and ``handed`` whether it is the model call's own, else
    :data:`NO_SCOPE`.  ``model_raw`` is the very object the model call was given as its mask,
    ``model_mask`` what the recorder made of it."""
    value: Any = NO_SCOPE
    if kwargs and mask_from in kwargs:
        value = kwargs[mask_from]
    else:
        for a in args:  # a features dict passed positionally (sentence-transformers)
            if type(a) is not Tensor and isinstance(a, Mapping) and mask_from in a:
                value = a[mask_from]
                break
    if value is NO_SCOPE or value is None:
        return NO_SCOPE
    if value is model_raw:
        return model_mask, True
    if not isinstance(value, Tensor) or value.ndim != 2 or value.is_floating_point():
        return NO_SCOPE  # (a float mask may be additive: only integer and boolean masks)
    return value.detach() != 0, False


def scope_hooks(own: Callable[[], Any], mask_from: str) -> tuple[Callable, Callable]:
    """The forward pre-hook that opens a module's scope (:func:`scope_mask`) and the forward
    hook that closes it, on the session ``own()`` returns (``None``: not this thread's, or no
    block).  A scope is ``(id(module), mask)`` on ``s.mask_stack``; ``s.mask_handed`` says
    the model's own mask went into one in this forward pass."""

    def scope_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        s = own()
        if s is not None and (kwargs or args):
            scope = scope_mask(mask_from, args, kwargs, s.mask_raw, s.mask)
            if scope is not NO_SCOPE:
                mask, handed = scope
                s.mask_handed = s.mask_handed or handed
                s.mask_stack.append((id(module), mask))
                s.scope_opened.add(module)

    def scope_hook(module: nn.Module, args: tuple, output: Any) -> None:
        s = own()
        if s is not None and s.mask_stack and s.mask_stack[-1][0] == id(module):
            s.mask_stack.pop()

    return scope_pre_hook, scope_hook


def end_pass(s: Any) -> bool:
    """The end of a forward pass: where the model handed its mask to a part of itself, the
    captures made outside every scope (``s.mask_outside``) belong to another stream and have
    none.  Returns whether it was handed on."""
    handed = s.mask_handed
    if handed:
        for cap in s.mask_outside:
            cap._mask = None
    s.mask_outside = []
    s.mask_stack.clear()
    s.mask_handed = False
    return handed
