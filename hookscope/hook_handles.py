"""Adding a block's hooks to a module, and removing them, at the cost of two dict writes.

A ``record`` block registers its hooks when it is entered and removes them when it is left:
on BERT-base, about twenty hooks per forward pass.  Through ``register_forward_hook`` and
``RemovableHandle.remove`` each costs about 90 Python bytecodes (a handle object, two weak
references, a generator), a quarter of everything a block adds to a forward pass; on a GPU
whose forward is bound by the host, that time is the forward's.  Here a hook goes straight
into the module's hook dictionaries, the same entries that ``register_forward_hook`` makes
(keyed by the same counter, so no id collides with a hook registered through the public API),
and its removal deletes them again.

Where a module registers hooks its own way (its class, or the module itself, overrides
``register_forward_hook``) or PyTorch keeps its hooks elsewhere, the public API is used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

_FORWARD = nn.Module.register_forward_hook
_PRE = nn.Module.register_forward_pre_hook
# The dictionaries register_forward_hook writes (PyTorch 2.1 and later).
_ATTRIBUTES = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs")
_DIRECT = all(hasattr(nn.Module(), a) for a in _ATTRIBUTES)

Handles = list  # what the functions below append to: handles, or (hooks, id, flags) triples
# One hook to add: (module, is a forward pre-hook, hook, with_kwargs, prepend).
Registration = tuple[nn.Module, bool, Callable[..., Any], bool, bool]


def add_hooks(handles: Handles, registrations: list[Registration]) -> None:
    """Add each hook as ``register_forward_pre_hook`` / ``register_forward_hook`` would, in
    order, its handle appended to ``handles`` (see :func:`remove_all`)."""
    append = handles.append
    for module, pre, hook, with_kwargs, prepend in registrations:
        if pre:
            if (not _DIRECT or type(module).register_forward_pre_hook is not _PRE
                    or "register_forward_pre_hook" in module.__dict__):
                append(module.register_forward_pre_hook(hook, with_kwargs=with_kwargs,
                                                        prepend=prepend))
                continue
            hooks, flags = module._forward_pre_hooks, module._forward_pre_hooks_with_kwargs
        else:
            if (not _DIRECT or type(module).register_forward_hook is not _FORWARD
                    or "register_forward_hook" in module.__dict__):
                append(module.register_forward_hook(hook, with_kwargs=with_kwargs,
                                                    prepend=prepend))
                continue
            hooks, flags = module._forward_hooks, module._forward_hooks_with_kwargs
        key = RemovableHandle.next_id
        RemovableHandle.next_id = key + 1
        if with_kwargs:  # (the flag first: a forward in another thread never sees the hook
            flags[key] = True  # without it)
        hooks[key] = hook
        if prepend:
            hooks.move_to_end(key, last=False)
        append((hooks, key, flags))


def remove_all(handles: Handles) -> None:
    """Remove the hooks of ``handles``, last first, each handle dropped once its hook is gone:
    safe to call again after an interruption (a removed hook is not missed)."""
    while handles:
        handle = handles[-1]
        if type(handle) is tuple:
            hooks, key, flags = handle
            hooks.pop(key, None)
            flags.pop(key, None)
        else:
            handle.remove()
        handles.pop()
