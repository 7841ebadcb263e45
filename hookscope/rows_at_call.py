"""``record_dataset``'s reduction in the hook: each call of a module becomes one row per
example where the model left its output (on the GPU), in the model's batch order, and only
the rows are unsorted (reduction commutes with reordering examples); the output itself is
never copied.  The recorder calls :func:`rows_at_call` from its hook; ``s`` is its session
(the recording, the forward pass's RNN states, time-major outputs and mask scopes).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from .capture import Capture
from .convert import check_cast, from_rnn_state, input_packed, packed_layout
from .errors import UnsortError
from .layout import is_known
from .mask_scope import scoped_mask
from .plan import Plan
from .session import time_major_call, unfit_mask
from .structure import iter_tensors, packed_mask, pad_packed

__all__ = ["rows_at_call"]


def rows_at_call(s: Any, plan: Plan, args: tuple, kwargs: dict, value: Any,
                 perm: Tensor | None, call: int, label: str | None,
                 where: str, other_streams: set[int]) -> Tensor | None:
    """``plan.rows`` applied to this call's primary tensor where the model left it, in the
    model's batch order, then the rows (not the whole output) unsorted: reduction commutes
    with reordering examples, and the output itself is never copied.  ``None`` where the
    general path must decide (no dense tensor, ``batch_dim=``, a time-major output)."""
    if plan.batch_dim != "auto" or plan.seq_dim == 1 or (
            (plan.map_1d or plan.map_last) and plan.pick):
        return None  # (pick= may have made a sequence of a 1-D feature map)
    leaf = next((x for _, x in iter_tensors(value, packed=True)), None)
    lengths = None
    if isinstance(leaf, PackedSequence):
        leaf, lengths = pad_packed(leaf)
    elif leaf is None or leaf.is_nested or leaf.layout is not torch.strided or (
            s.time_major and is_known(leaf, s.time_major)):  # (time-major: see convert)
        return None
    t = leaf.detach()
    if (lengths is None and not plan.map_1d and plan.seq_dim is None
            and time_major_call(s, args, t)):
        return None  # (time, batch, features) as the pass tells it: the general path
    if plan.map_last and t.ndim >= 4:  # (batch, *spatial, channels): channels at dim 1
        t = t.movedim(-1, 1)
    if perm is not None and (t.ndim == 0 or t.shape[0] != len(perm)):
        raise UnsortError(
            f"unsort for {where}: the output has {t.shape[0] if t.ndim else 0} examples "
            f"(shape {tuple(t.shape)}) but the permutation has {len(perm)} entries: the "
            "permutation is for another batch.")
    if t.ndim in (1, 2) and lengths is None:  # already one row per example: kept as is
        if plan.dtype is not None and t.is_floating_point():
            t = _cast(t, plan.dtype, where)
        rows = t.unsqueeze(1) if t.ndim == 1 else t
        if perm is None:
            return rows.clone()  # (the model's own memory: a later in-place op)
        return rows.index_select(0, plan.perm_on(perm, rows.device))
    mask = other = None
    packed_in = input_packed(args, kwargs) if lengths is None else None
    if packed_in is not None and t.ndim >= 2 and not from_rnn_state(plan, t, s.rnn_states):
        # Real positions straight from the input's batch_sizes, where they describe this
        # output as (batch, time, ...) (not an RNN's h_n computed from the same input).
        keep = packed_mask(packed_in)
        layout = packed_layout(t, *keep.shape)
        if layout == "batch":
            if t.shape[1] > keep.shape[1]:  # padded to a longer total_length
                keep = torch.nn.functional.pad(keep, (0, t.shape[1] - keep.shape[1]))
            mask = keep
        elif layout == "time":  # (time, batch, ...): the general path knows it
            return None
    elif lengths is None and t.ndim == 3 and not plan.map_1d:
        mask, entry = (scoped_mask(s, args) if s.mask_stack or s.scope_outputs
                       else (s.mask, None))  # (the scope's mask: mask_scope.py)
        if entry is not None and entry in other_streams:  # (an earlier pass showed it)
            mask = None
        if mask is not None and tuple(t.shape[:2]) != tuple(mask.shape):
            # (other time steps: real positions unknown; a pending stream's mask may not be its)
            other = unfit_mask(s, t.shape, mask) if entry is None else None
            mask = None
        elif mask is not None and entry is not None:
            s.rows_guessed.add(entry)  # (the recorder redoes the batch if it was another
            # stream: Recorder._end_mask_scopes)
    if plan.dtype is not None and t.is_floating_point():
        t = _cast(t, plan.dtype, where)  # reduced in the captured precision, as a capture
        # would be
    bidirectional = (plan.bidir_units is not None and t.ndim > 1
                     and t.shape[-1] == plan.bidir_units)
    cap = Capture(plan.name, s.rec.steps - 1, call, label, plan.module_type, t,
                  lengths=lengths, mask=mask, bidirectional=bidirectional,
                  feature_map=plan.map_1d and t.ndim == 3)
    cap._other_mask = other
    rows, shared = plan.rows(cap, perm)
    if perm is not None:
        return rows.index_select(0, plan.perm_on(perm, rows.device))
    return rows.clone() if shared else rows  # rows that are the model's own memory


def _cast(t: Tensor, dtype: torch.dtype, where: str) -> Tensor:
    """``dtype=``'s cast, refused where it turns finite values into infinities (on the CPU;
    on a GPU the check would wait for it)."""
    cast = t.to(dtype)
    if t.device.type == "cpu" and cast is not t:
        check_cast(t, cast, where)
    return cast
