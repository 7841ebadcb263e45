"""Which part of a model the model call's padding mask belongs to.

The recorder reads the ``(batch, time)`` mask from the model call (``mask_from=``, by default
``attention_mask=``) and gives it to every ``(batch, time, features)`` capture of that shape.
A model with several streams passes the mask on to the part it belongs to: T5 and BART call
``encoder(input_ids, attention_mask=mask)`` and ``decoder(decoder_input_ids,
attention_mask=decoder_mask, encoder_attention_mask=mask)``, CLIP calls
``text_model(input_ids, attention_mask=mask)`` and ``vision_model(pixel_values)``, Wav2Vec2
calls ``encoder(..., attention_mask=frame_mask)`` with a mask of its own over frames.  So the
recorder watches the model's direct children and the ancestors of the selected modules
(:func:`scope_modules`); each call of one of them may open a *scope* for its forward
(:func:`scope_mask`):

- called with the model call's very mask under that keyword: the mask is *handed* to it, and
  captures inside take it;
- called with a 2-D integer or boolean mask of its own under that keyword (a decoder's, a
  mask over audio frames): captures inside take that one;
- called with the model's very mask as its ``encoder_attention_mask`` (any keyword naming the
  encoder): a decoder, another stream, and captures inside get none;
- called with one of the model call's own input tensors but not the mask (CLIP's
  ``vision_model(pixel_values)``, but also an ``embeddings(input_ids)``): a stream entry,
  whose captures get the model's mask unless another part of the model was handed it in that
  forward pass without taking this entry's output as an input (then it is another stream;
  decided when the pass ends);
- anything else (no mask keyword, ``None``, the 4-D additive masks that layers get): no scope,
  the enclosing one applies.

A call inside an open scope is no stream entry (an ``embeddings(input_ids)`` inside the part
the mask was handed to belongs to it).  A capture outside every scope takes the mask of the
scope whose output its module was given (a seq2seq model's ``lm_head`` reads the decoder's
output: the decoder's mask, or none); where it was given something made from one (T5 scales
the decoder's output first), the mask of the scope that closed last, if the model handed its
mask on; else the model call's mask (a task head, the model's own output)
(:func:`scoped_mask`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .convert import mask_argument
from .structure import first_tensor

__all__ = ["end_pass", "scope_hooks", "scope_mask", "scope_modules", "scoped_mask"]

#: What :func:`scope_mask` returns where a call opens no scope.
NO_SCOPE = object()


def scope_modules(model: nn.Module, selected: Iterable[nn.Module],
                  tree: list[tuple[nn.Module, nn.Module | None]]) -> tuple[nn.Module, ...]:
    """The model's direct children and every ancestor of a selected module below the model
    (the model itself is the model call: read by the recorder's step hook).  ``tree`` is
    :func:`~hookscope.select.module_tree` of the model (a shared module's first parent)."""
    parents = {id(m): parent for m, parent in tree}
    found: dict[int, nn.Module] = {id(m): m for m in model.children()}
    for m in selected:
        parent = parents.get(id(m))
        while parent is not None and parent is not model:
            found.setdefault(id(parent), parent)
            parent = parents.get(id(parent))
    # (a container that is never called, a ModuleList, opens nothing: no hooks to add)
    return tuple(m for m in found.values() if _callable(m))


def _callable(module: nn.Module) -> bool:
    """Whether the module can open a scope: it has a forward of its own (not a
    ``ModuleList``'s or ``ModuleDict``'s, which raises) and takes forward pre-hooks (a
    TorchScript module takes none: a scope of its own is not seen, as nothing inside it is)."""
    if isinstance(module, torch.jit.ScriptModule):
        return False
    return type(module).forward is not nn.Module.forward or "forward" in vars(module)


def scope_mask(mask_from: str, args: tuple, kwargs: dict | None, model_raw: Any,
               model_mask: Tensor | None, model_inputs: list[Tensor],
               inside: bool = False) -> Any:
    """The scope a call opens (see the module docstring): ``(mask, handed, pending)``, where
    ``mask`` is what its captures take, ``handed`` whether it is the model call's own mask
    given under the same keyword, and ``pending`` whether the call is a stream entry whose
    mask is decided as the pass ends; else :data:`NO_SCOPE`.  ``model_raw`` is the very
    object the model call was given as its mask, ``model_mask`` what the recorder made of it,
    ``model_inputs`` the model call's other tensors; ``inside``: the call is inside an open
    scope, so it is no stream entry (an ``embeddings(input_ids)`` inside the part the mask was
    handed to belongs to it)."""
    value = mask_argument(mask_from, args, kwargs, NO_SCOPE)
    if model_raw is not None and value is model_raw:
        return model_mask, True, False
    if (isinstance(value, Tensor) and value.ndim == 2 and not value.is_floating_point()
            and not value.is_complex()):  # (a float mask may be additive)
        return value.detach() != 0, False, False
    if model_raw is None:
        return NO_SCOPE
    if kwargs and any(v is model_raw and "encoder" in k for k, v in kwargs.items()):
        return None, False, False  # a decoder's encoder_attention_mask: not its own mask
    given = [*args, *(kwargs.values() if kwargs else ())]
    if (value is NO_SCOPE and not inside
            and any(x is t for x in given for t in model_inputs)):
        return model_mask, False, True  # a stream entry (see the module docstring)
    return NO_SCOPE


def scope_hooks(own: Callable[[], Any], mask_from: str) -> tuple[Callable, Callable]:
    """The forward pre-hook that opens a module's scope (:func:`scope_mask`) and the forward
    hook that closes it, on the session ``own()`` returns (``None``: not this thread's, or no
    block).  A scope is ``(id(module), mask, pending)`` on ``s.mask_stack``;
    ``s.mask_handed`` says the model's own mask went into one in this forward pass, and
    ``s.entries`` holds each stream entry's output until then (see :func:`end_pass`)."""

    def scope_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        s = own()
        if s is not None and (kwargs or args):
            scope = scope_mask(mask_from, args, kwargs, s.mask_raw, s.mask, s.model_inputs,
                               bool(s.mask_stack))
            if scope is not NO_SCOPE:
                mask, handed, pending = scope
                if handed:
                    s.mask_handed = True
                    if s.entries:  # an entry whose output it takes is the same stream
                        given = [*args, *(kwargs.values() if kwargs else ())]
                        for entry, out in list(s.entries.items()):
                            if any(x is out for x in given):
                                s.joined.add(entry)
                elif pending and s.mask_handed:  # (its output cannot feed the part that
                    mask, pending = None, False  # has the mask: that one ran already)
                s.mask_stack.append((id(module), mask, pending))

    def scope_hook(module: nn.Module, args: tuple, output: Any) -> None:
        s = own()
        if s is not None and s.mask_stack and s.mask_stack[-1][0] == id(module):
            _, mask, pending = s.mask_stack.pop()
            out = first_tensor(output)  # (what a module outside may be given: its mask)
            s.scope_outputs.append((out, mask, id(module) if pending else None))
            if pending:  # a stream entry: its output, to know where it goes
                s.entries[id(module)] = out

    return scope_pre_hook, scope_hook


def end_pass(s: Any) -> set[int]:
    """The end of a forward pass: where the model handed its mask to a part of itself, the
    captures made in a stream entry whose output that part did not take
    (``s.mask_outside``: ``(entry, capture)``) belong to another stream and have none.
    Returns those entries (``id`` of the module)."""
    others = set()
    if s.mask_handed:
        for entry, cap in s.mask_outside:
            if entry not in s.joined:
                cap._mask = cap._other_mask = None
                others.add(entry)
        others.update(e for e in s.entries if e not in s.joined)
    s.mask_outside = []
    s.mask_stack.clear()
    s.scope_outputs = []
    s.entries = {}
    s.joined = set()
    s.mask_handed = False
    return others


def scoped_mask(s: Any, args: tuple) -> tuple[Tensor | None, int | None]:
    """The mask a capture made now takes, and the stream entry it is pending on (``None``:
    decided): the innermost open scope's; outside every scope, that of the scope whose output
    the module was given as its first argument, else, where the model handed its mask to a
    part of itself, that of the scope that closed last (a head after a decoder), else the
    model call's."""
    stack = s.mask_stack
    if stack:
        module, mask, pending = stack[-1]
        return mask, module if pending else None
    if args:
        x = args[0]
        for out, mask, entry in s.scope_outputs:
            if x is out:
                return mask, entry
    if s.mask_handed and s.scope_outputs:  # given something made from a scope's output
        _, mask, entry = s.scope_outputs[-1]  # (T5 scales the decoder's before its lm_head):
        return mask, entry  # the stream of the part that ran last
    return s.mask, None
