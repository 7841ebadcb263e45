"""Ending a forward pass early (``stop=True``): the exception, and the stops pending per
thread until the last hookscope hook of the module that asked raises it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["PENDING_STOPS", "Stop", "raise_pending_stop"]

_get_ident = threading.get_ident

# Recorders that asked to stop the forward pass, per thread; the last hookscope hook of the
# module raises (so that a nested recorder's hook on the same module still records first).
PENDING_STOPS: dict[int, set[Any]] = {}


class Stop(BaseException):
    """Raised by a hook to end the forward pass early (``stop=True``).

    A ``BaseException`` so that a model's own ``except Exception`` cannot swallow it; each
    recorder that asked for it takes itself off ``recorders`` in ``__exit__``, and the last
    one swallows it.
    """

    def __init__(self, recorders: set[Any]) -> None:
        super().__init__("hookscope: forward pass stopped after the last recorded module")
        self.recorders = recorders


def raise_pending_stop(module: nn.Module, hook: Callable) -> None:
    """Raise the pending stop of this thread from the last hookscope hook of ``module``."""
    pending = PENDING_STOPS.get(_get_ident())
    if not pending:
        return
    later = False
    seen = False
    for h in list(module._forward_hooks.values()):
        if h is hook:
            seen = True
        elif seen and getattr(h, "_hookscope", False):
            later = True
            break
    if not later:
        del PENDING_STOPS[_get_ident()]
        raise Stop(pending)
