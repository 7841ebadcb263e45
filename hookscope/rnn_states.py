"""The final states of RNNs in one forward pass, known by identity.

An RNN returns ``(output, h)`` or ``(output, (h, c))``, and ``h`` is ``(layers * directions,
batch, hidden)``: its batch is dim 1.  Wherever such a state reappears in a recorded module's
output (a wrapper returns it, a ``Dropout`` passes it on), ``unsort=`` must reorder dim 1 and
exports one row per example must refuse it; shapes alone cannot tell, so the recorder hooks
every RNN of the model and keeps the states it returned here until the pass ends.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .structure import iter_tensors

__all__ = ["RNNStates", "state_key"]


def state_key(x: Tensor) -> tuple:
    """Identifies a tensor by its memory and layout (a detached alias has the same key)."""
    return (x.data_ptr(), tuple(x.shape), x.stride())


class RNNStates:
    """The final states ``(h, c)`` that RNNs inside hooked wrappers returned in one forward
    pass, held (so that no address is reused) until it ends: every capture of the pass knows
    them, the wrapper's own and those of wrappers around it, whatever else was recorded
    inside (a state forgotten at an inner capture would be taken for a batch-first tensor).

    ``x in states`` is True for one of those very tensors or an alias of one (same memory and
    layout: ``h.detach()``); :meth:`shares_memory` also for a view or part of one.  Identity
    is tested first and addresses only on a miss, so that the common case (the wrapper returns
    what its RNN returned, beside an output of other memory) costs a few pointer compares.
    """

    __slots__ = ("_keys", "_ptrs", "_storages", "tensors")

    def __init__(self) -> None:
        self.tensors: list[Tensor] = []
        self._ptrs: set[int] | None = None  # made on the first miss (see __contains__)
        self._keys: set[tuple] | None = None
        self._storages: set[int] | None = None

    def __bool__(self) -> bool:
        return bool(self.tensors)

    def add(self, t: Tensor) -> None:
        self.tensors.append(t)
        self._ptrs = self._keys = self._storages = None

    def add_state(self, state: Any) -> None:
        """Add an RNN's state: ``h``, or ``(h, c)``."""
        if type(state) is Tensor:
            self.add(state)
        elif (type(state) is tuple and len(state) == 2
              and type(state[0]) is Tensor and type(state[1]) is Tensor):
            self.tensors.extend(state)  # (h, c): the common case, without the tree walk
            self._ptrs = self._keys = self._storages = None
        else:
            for _, t in iter_tensors(state):
                self.add(t)

    def clear(self) -> None:
        self.tensors.clear()
        self._ptrs = self._keys = self._storages = None

    def __contains__(self, x: Tensor) -> bool:
        for t in self.tensors:
            if x is t:
                return True
        if not self.tensors:
            return False
        if self._ptrs is None:
            self._ptrs = {t.data_ptr() for t in self.tensors}
        if x.data_ptr() not in self._ptrs:
            return False
        if self._keys is None:
            self._keys = {state_key(t) for t in self.tensors}
        return state_key(x) in self._keys

    def batch_at_dim_1(self, x: Tensor) -> bool:
        """Whether 3-D ``x`` is one of the states or a view of one whose dim 1 is the state's
        batch dimension (same size and stride): its rows are not examples."""
        if x.ndim != 3:
            return False
        for t in self.tensors:
            if x is t:
                return True
        if not self.tensors or x.is_nested or x.layout is not torch.strided:
            return False
        where = x.untyped_storage().data_ptr()
        if where not in self._storage_ptrs():
            return False
        size, stride = x.shape[1], x.stride(1)
        for t in self.tensors:
            if t.ndim == 3 and t.shape[1] == size and t.stride(1) == stride \
                    and t.untyped_storage().data_ptr() == where:
                return True
        return False

    def shares_memory(self, x: Tensor) -> bool:
        """Whether ``x`` lies in the memory of one of the states (a view or part of one)."""
        return x.untyped_storage().data_ptr() in self._storage_ptrs()

    def _storage_ptrs(self) -> set[int]:
        if self._storages is None:
            self._storages = {t.untyped_storage().data_ptr() for t in self.tensors}
        return self._storages
