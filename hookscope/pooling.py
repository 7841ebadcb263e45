"""Length-aware pooling of padded sequences: the true final state, and pooling over real
positions only.  Functions return the type they were given (tensor or NumPy array)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .analysis import ArrayLike, _from_numpy

__all__ = ["last_state", "masked_pool"]


def _lengths_for(padded: Tensor, lengths: ArrayLike, time_dim: int) -> Tensor:
    lens = torch.as_tensor(np.asarray(lengths) if not isinstance(lengths, Tensor) else lengths)
    lens = lens.detach().to("cpu")
    if lens.ndim != 1 or lens.dtype.is_floating_point or lens.dtype == torch.bool:
        raise ValueError(f"lengths must be a 1-D integer array, got shape {tuple(lens.shape)} "
                         f"and dtype {lens.dtype}.")
    batch_dim = 1 - time_dim
    if len(lens) != padded.shape[batch_dim]:
        raise ValueError(f"lengths has {len(lens)} entries but padded has batch size "
                         f"{padded.shape[batch_dim]} (dim {batch_dim}).")
    if bool((lens <= 0).any()) or bool((lens > padded.shape[time_dim]).any()):
        raise ValueError(f"lengths must lie in [1, {padded.shape[time_dim]}] (the padded time "
                         f"dimension); got min {int(lens.min())}, max {int(lens.max())}.")
    return lens.to(torch.int64)


def _as_padded(padded: ArrayLike) -> tuple[Tensor, bool]:
    if isinstance(padded, Tensor):
        if padded.ndim != 3:
            raise ValueError(f"padded must be 3-D (batch x time x features), got shape "
                             f"{tuple(padded.shape)}.")
        return padded.detach(), True
    arr = np.asarray(padded)
    if arr.ndim != 3:
        raise ValueError(f"padded must be 3-D (batch x time x features), got shape {arr.shape}.")
    return _from_numpy(arr), False


def _back(t: Tensor, was_tensor: bool) -> Tensor | np.ndarray:
    return t if was_tensor else t.numpy()


def last_state(padded: ArrayLike, lengths: ArrayLike, *, bidirectional: bool = False,
               batch_first: bool = True) -> Tensor | np.ndarray:
    """The true final state of each padded sequence.

    A unidirectional RNN's final state is at position ``length - 1``; a bidirectional one's is
    the forward half there and the backward half at position 0.  The story takes
    ``padded[:, -1, :]``, which for every sequence shorter than the longest is *padding*
    (zeros, or whatever the padding value is):

    >>> import torch
    >>> out = torch.tensor([[[1., 10.], [2., 20.], [0., 0.]]])  # one sequence of length 2
    >>> out[:, -1, :]                    # the story's "final state": padding
    tensor([[0., 0.]])
    >>> last_state(out, [2], bidirectional=True)   # forward half at t=1, backward at t=0
    tensor([[ 2., 10.]])

    Parameters
    ----------
    padded : (batch, time, features) (or (time, batch, features) with ``batch_first=False``)
    lengths : (batch,) integers in ``[1, time]``
    bidirectional : bool
        The last dimension is ``[forward, backward]`` halves, as PyTorch RNNs return them.

    Returns
    -------
    Tensor or numpy.ndarray
        ``(batch, features)``, the type of ``padded``.
    """
    t, was_tensor = _as_padded(padded)
    if not batch_first:
        t = t.transpose(0, 1)
    lens = _lengths_for(t, lengths, time_dim=1).to(t.device)
    rows = torch.arange(t.shape[0], device=t.device)
    last = t[rows, lens - 1]
    if bidirectional:
        if t.shape[2] % 2:
            raise ValueError(f"bidirectional=True needs an even feature size, got {t.shape[2]}.")
        half = t.shape[2] // 2
        last = torch.cat([last[:, :half], t[:, 0, half:]], dim=1)
    return _back(last, was_tensor)


def masked_pool(padded: ArrayLike, lengths: ArrayLike, how: str = "mean", *,
                batch_first: bool = True) -> Tensor | np.ndarray:
    """Pool each padded sequence over its real positions only: ``"mean"``, ``"max"`` or
    ``"sum"``.

    >>> import torch
    >>> out = torch.tensor([[[1.], [3.], [0.]], [[-1.], [-2.], [-3.]]])
    >>> masked_pool(out, [2, 3], "mean").ravel().tolist()
    [2.0, -2.0]
    >>> masked_pool(out, [2, 1], "max").ravel().tolist()   # padding (0) never wins
    [3.0, -1.0]

    Returns ``(batch, features)`` of the type of ``padded`` (integer inputs: float for mean).
    """
    if how not in ("mean", "max", "sum"):
        raise ValueError(f"how must be 'mean', 'max' or 'sum', got {how!r}.")
    t, was_tensor = _as_padded(padded)
    if not batch_first:
        t = t.transpose(0, 1)
    lens = _lengths_for(t, lengths, time_dim=1).to(t.device)
    mask = (torch.arange(t.shape[1], device=t.device)[None, :] < lens[:, None]).unsqueeze(-1)
    if how == "max":
        fill = torch.finfo(t.dtype).min if t.dtype.is_floating_point else torch.iinfo(t.dtype).min
        out = t.masked_fill(~mask, fill).amax(1)
    else:
        out = t.masked_fill(~mask, 0).sum(1)
        if how == "mean":
            out = out / lens[:, None].to(out.dtype if out.dtype.is_floating_point else
                                         torch.float64)
    return _back(out, was_tensor)
