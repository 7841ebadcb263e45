"""The state of one entered ``record`` block (:class:`Session`), and what a forward pass
tells the hooks about layouts: a call's 3-D tensor is ``(time, batch, features)`` where the
model call's ids or masks, or its scope's mask, say so (:func:`time_major_call`, rules in
:mod:`hookscope.layout`)."""

from __future__ import annotations

from collections.abc import Set
from typing import Any

from torch import Tensor

from .capture import Capture
from .layout import swapped
from .mask_scope import scoped_mask
from .recording import Recording
from .rnn_states import RNNStates

__all__ = ["NO_SWAPS", "Session", "time_major_call", "unfit_mask"]

NO_SWAPS: frozenset[tuple[int, int]] = frozenset()


def unfit_mask(s: Session, shape: tuple[int, ...], mask: Tensor) -> Tensor | None:
    """The call's padding ``mask`` where a 3-D output of its batch is a sequence with other
    time steps (a strided convolution, pooling or internal padding changed them), so that
    its real positions are unknown (:attr:`Capture._other_mask`); ``None`` for one step (one
    position, a generation step's) and where the call's ids have as many steps (a decoder fed
    its own ids)."""
    if (len(shape) == 3 and shape[0] == mask.shape[0] and shape[1] != mask.shape[1]
            and shape[1] > 1 and shape[1] not in s.id_times):
        return mask
    return None


def time_major_call(s: Session, args: tuple, t: Tensor, batch: int | None = None) -> bool:
    """Whether a call's 3-D tensor is ``(time, batch, features)`` as the forward pass tells
    it: the shape of its scope's padding mask, or of the model call's ids and masks, swapped
    (:func:`~hookscope.layout.swapped`); with ``batch`` (a permutation's length), only where
    dim 1 holds that many."""
    if t.is_nested or t.ndim != 3 or not s.one_batch:
        return False  # (a nested tensor has no shape)
    if batch is not None and t.shape[1] != batch:
        return False
    mask = scoped_mask(s, args)[0] if s.mask_stack or s.scope_outputs else s.mask
    return swapped(t.shape, None if mask is None else mask.shape, s.swaps)


class Session:
    """The state of one entered block: the recording, call counters, handles."""

    __slots__ = (
        "checkpoint",
        "count_problems",
        "counts",
        "entries",
        "handles",
        "id_times",
        "joined",
        "mask",
        "mask_handed",
        "mask_outside",
        "mask_raw",
        "mask_stack",
        "model_inputs",
        "no_grad_warned",
        "one_batch",
        "pending_inputs",
        "rec",
        "remaining",
        "rnn_states",
        "rows_guessed",
        "scope_outputs",
        "scopes_on",
        "stance",
        "swaps",
        "thread",
        "time_major",
    )

    def __init__(self, rec: Recording, n_plans: int, thread: int | None) -> None:
        self.rec = rec
        self.thread = thread  # None: every thread's calls are recorded
        self.counts: dict[str, int] = {}  # calls per module in the current step
        self.count_problems: list[str] = []  # steps whose calls disagree with calls= etc.
        self.remaining = n_plans
        self.pending_inputs: dict[str, list[tuple[tuple, dict]]] = {}
        self.handles: list[Any] = []
        self.stance: Any = None
        self.mask: Tensor | None = None  # the model call's attention mask, if any
        self.mask_raw: Any = None  # ... as the model was given it (see mask_scope.py)
        # (time, batch) of the model call's (batch, time) ids and masks: a 3-D output of one
        self.swaps: Set[tuple[int, int]] = NO_SWAPS  # of these shapes is time-major (layout.py)
        self.one_batch = True  # the model call's tensors agree on the batch (layout.one_batch)
        self.id_times: Set[int] = NO_SWAPS  # time steps of the call's ids (layout.id_times)
        # Open scopes: (module, mask, pending: a stream entry, decided as the pass ends).
        self.mask_stack: list[tuple[int, Tensor | None, bool]] = []
        self.mask_handed = False  # the model's mask went into a scope in this forward pass
        self.mask_outside: list[tuple[int, Capture]] = []  # (entry, capture): given the
        # model's mask in a pending scope
        self.entries: dict[int, Any] = {}  # stream entries that ran: their outputs
        self.joined: set[int] = set()  # entries whose output the part with the mask took
        self.scope_outputs: list[tuple[Any, Tensor | None, int | None]] = []  # closed scopes:
        # (output, mask, pending entry), for modules outside given one (a seq2seq lm_head)
        self.model_inputs: list[Tensor] = []  # the model call's tensors (mask_scope.py)
        self.rows_guessed: set[int] = set()  # record_dataset rows reduced so, in entries
        self.scopes_on = False  # the scope hooks are registered (at the first masked call)
        # (h, c) returned by RNNs inside hooked wrappers in this forward pass: their batch is
        # dim 1, and no packed input's lengths describe them (see RNNStates).
        self.rnn_states = RNNStates()
        # The (time, batch, ...) sequences the model's time-major modules returned in this
        # forward pass: a module around one that passes it on has its batch at dim 1 too.
        self.time_major: list[Tensor] = []
        self.no_grad_warned = False
        self.checkpoint: Any = None  # rerun.CheckpointNotes, once a call runs checkpointed
