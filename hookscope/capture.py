"""``Capture``: one call of one module — what it returned (a snapshot), what it was given,
and what is known besides (lengths, padding mask, bidirectional halves, live objects).

Storage and display only: no hooks here (the recorder fills captures), no analysis.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ._arrays import NO_NUMPY_FLOATS
from .errors import CaptureModifiedError, NotRecordedError
from .structure import (
    describe_shape,
    first_tensor,
    held_bytes,
    iter_tensors,
    map_leaves,
    tensor_shape,
)

__all__ = ["Capture"]


class Capture:
    """One call of one module: what it returned (and, if asked, what it was given).

    Attributes
    ----------
    name : str
        The module's dotted name in the (unwrapped) model.
    step : int
        Which forward pass of the model in the ``record`` block (0, 1, ...).
    call : int
        Which call of the module within that forward pass (0 for the first).
    label : str or None
        The ``calls=`` label of this call (``"premise"``), if one was given.
    module_type : type
        The module's class.
    output : Any
        The module's output with its structure kept (tensor, tuple, dict, namedtuple,
        dataclass, ``ModelOutput``); tensors detached, ``PackedSequence`` padded batch-first,
        ``unsort=`` applied, ``device=``/``dtype=`` applied.
    inputs, kwargs : tuple, dict or None
        Positional and keyword inputs, treated the same way; ``None`` unless ``inputs=True``.
    lengths : Tensor or None
        Sequence lengths (int64, CPU, same batch order as ``output``) where known: from a
        ``PackedSequence`` in the output, else from one in the inputs, or from a nested
        tensor's sizes.
    live : tuple of str
        Objects in the output that could not be snapshotted and are held by reference
        (``"output[1] (MyCache)"``); empty for most captures.
    bidirectional : bool
        Whether the primary tensor is a bidirectional RNN's output (``[forward, backward]``
        halves): ``reduce="last"`` then takes the backward half at the first real position.
    mask : Tensor or None
        Boolean ``(batch, time)``, True at real positions (see :attr:`mask`).
    rnn_state : bool
        Whether the primary tensor is an RNN's final state ``(layers * directions, batch,
        hidden)`` as the RNN returned it (``pick=lambda out: out[1]``): its batch is dim 1,
        so reductions and exports one row per example refuse it and say what to pick.
    batch_dim : int
        The dimension of :attr:`tensor` that holds the examples: 0, or 1 for a time-major
        sequence, ``(time, batch, ...)``, as ``nn.LSTM``, ``nn.GRU``, ``nn.RNN``,
        ``nn.MultiheadAttention`` and the ``nn.Transformer*`` modules return by default
        (``batch_first=False``), for an RNN's final state, for an output that a packed
        input's lengths describe as time-major, and wherever ``batch_dim=`` says so.  The
        capture keeps the module's layout; reductions, exports, :meth:`Recording.cat` and
        ``record_dataset`` read the examples along this dimension.
    feature_map : bool
        Whether a 3-D primary tensor is a 1-D feature map ``(batch, channels, length)``, the
        module's own output of ``nn.Conv1d`` or another 1-D convolution, pooling or
        normalisation layer (``hookscope.layout.CHANNELS_FIRST_1D``), rather than a sequence
        ``(batch, time, features)``: reductions pool it over its positions, one unit per
        channel, as they pool 2-D and 3-D feature maps (4-D tensors and more are feature maps
        whatever this says).
    channels_last : bool
        Whether a 4-D or larger primary tensor is ``(batch, *spatial, channels)``, the
        module's own output of a layer that acts on the last dimension (``nn.Linear``,
        ``nn.LayerNorm``, ...: ``hookscope.layout.CHANNELS_LAST``), as inside a ConvNeXt
        block, rather than ``(batch, channels, *spatial)``: exports read its channels last.
    """

    # What every capture sets, in slots; the rest are class defaults that a capture overrides
    # in its __dict__ where it differs (plain_capture, the hot path, sets seven attributes).
    __slots__ = ("__dict__", "_mask", "_output", "call", "label", "module_type", "name", "step")
    _inputs: tuple | None = None
    _kwargs: dict | None = None
    _lengths: Tensor | Callable[[], Tensor] | None = None
    _versions: list[tuple[Tensor, int]] | None = None
    live: tuple[str, ...] = ()
    bidirectional = False
    rnn_state = False
    batch_dim = 0
    feature_map = False
    channels_last = False
    _grads: Any = None  # a grads.GradStore with grads=True
    _pending: Any = None  # device="cpu": copies in flight (see hookscope.offload)
    # The model call's padding mask where this (batch, time, ...) sequence has other time
    # steps (a strided convolution, pooling, internal padding): its real positions are
    # unknown, and a reduction warns (hookscope.frame.warn_unmasked).
    _other_mask: Tensor | None = None
    # record_dataset's rows reduced in the hook: where in the module's output the tensor
    # they came from was (hookscope.frame.primary_path; else read from the output).
    _leaf: tuple | None = None

    def __init__(
        self,
        name: str,
        step: int,
        call: int,
        label: str | None,
        module_type: type,
        output: Any,
        inputs: tuple | None = None,
        kwargs: dict | None = None,
        lengths: Tensor | Callable[[], Tensor] | None = None,
        versions: list[tuple[Tensor, int]] | None = None,
        mask: Tensor | None = None,
        live: tuple[str, ...] = (),
        bidirectional: bool = False,
        rnn_state: bool = False,
        batch_dim: int = 0,
        feature_map: bool = False,
        channels_last: bool = False,
    ) -> None:
        self.name = name
        self.step = step
        self.call = call
        self.label = label
        self.module_type = module_type
        self._output = output
        self._mask = mask
        # (the rest only where it differs from the class default: fewer writes per capture)
        if inputs is not None:
            self._inputs = inputs
        if kwargs is not None:
            self._kwargs = kwargs
        if lengths is not None:
            self._lengths = lengths  # or what computes them, on first read (see lengths)
        if versions is not None:
            self._versions = versions
        if live:
            self.live = live
        if bidirectional:
            self.bidirectional = bidirectional
        if rnn_state:
            self.rnn_state = rnn_state
        if batch_dim:
            self.batch_dim = batch_dim
        if feature_map:
            self.feature_map = feature_map
        if channels_last:
            self.channels_last = channels_last

    # -- values -----------------------------------------------------------------------------
    @property
    def output(self) -> Any:
        """The module's output, structure kept (checked like :attr:`tensor` for
        ``clone=False``)."""
        self.check()
        return self._output

    @property
    def inputs(self) -> tuple | None:
        """Positional inputs (``inputs=True``), else ``None``."""
        self.check()
        return self._inputs

    @property
    def kwargs(self) -> dict | None:
        """Keyword inputs (``inputs=True``), else ``None``."""
        self.check()
        return self._kwargs

    def check(self) -> None:
        """Raise :class:`CaptureModifiedError` if a value recorded with ``clone=False`` has
        been changed in place since it was recorded (only such captures can be).  A capture
        whose copy to the host is still in flight (``device="cpu"``) waits for it first."""
        if self._pending is not None:
            self._pending.wait()
            self._pending = None
        if self._versions is None:
            return
        for t, version in self._versions:
            if t._version != version:
                raise CaptureModifiedError(
                    f"{self._where()}: a tensor recorded with clone=False was modified in place "
                    f"after it was recorded (version {version} -> {t._version}), e.g. by "
                    "nn.ReLU(inplace=True) or x.add_(). Its value is no longer what the module "
                    "returned. Record again with clone=True (the default)."
                )

    @property
    def tensor(self) -> Tensor:
        """The primary tensor: the output if it is a tensor, else its first tensor leaf (use
        ``pick=`` when recording to choose another)."""
        self.check()
        t = first_tensor(self._output)
        if t is None:
            raise NotRecordedError(
                f"{self._where()} returned no tensor ({type(self._output).__name__}); see "
                ".output, or use pick= to select a tensor when recording."
            )
        return t

    @property
    def grad(self) -> Tensor | None:
        """Gradient of the loss with respect to the primary tensor (:attr:`tensor`), recorded
        with ``grads=True``: same shape, batch order, device and dtype as the value; ``None``
        until a ``backward()`` reaches it (or if the loss does not depend on it).  Gradients of
        several ``backward()`` calls add up."""
        grads = self._grad_store()
        path = next((p for p, _ in iter_tensors(self._output)), None)
        return None if path is None else grads.get(path)

    @property
    def grad_output(self) -> Any:
        """Gradients of every tensor of :attr:`output`, in its structure (``None`` where no
        gradient arrived), recorded with ``grads=True``."""
        grads = self._grad_store()
        # (an object whose insides no path reaches, as one loaded without its class: None,
        # never the object itself, which would show values as gradients)
        return map_leaves(self._output, lambda path, _: grads.get(path),
                          other=lambda path, obj: None)

    def _grad_store(self) -> dict:
        if self._grads is None:
            raise NotRecordedError(f"{self._where()} was recorded without gradients; record "
                                   "with grads=True and call backward() on the loss.")
        return self._grads.grads

    @property
    def lengths(self) -> Tensor | None:
        """Sequence lengths (see the class docstring).  Those of a packed input are worked out
        from its ``batch_sizes`` when first read, not in the hook: most captures never need
        them."""
        lengths = self._lengths
        if lengths is not None and type(lengths) is not Tensor:
            lengths = self._lengths = lengths()
        return lengths

    @lengths.setter
    def lengths(self, value: Tensor | None) -> None:
        self._lengths = value

    @property
    def mask(self) -> Tensor | None:
        """Boolean ``(batch, time)`` mask, True at real (non-padding) positions, where known:
        the model call's attention mask (``mask_from=``), given when the capture was made, or
        made from ``lengths``; else ``None``.  Pooling and exports use it, whichever side is
        padded."""
        if self._mask is not None:
            if self._mask.device.type != "cpu":  # left on the GPU by the hook: moved once
                self._mask = self._mask.cpu()
            return self._mask
        if self.lengths is None:
            return None
        t = first_tensor(self._output)
        n = len(self.lengths)
        if t is not None and t.is_nested:
            time = int(self.lengths.max()) if n else 0
        elif self.batch_dim == 1:
            time = t.shape[0]
        else:
            time = t.shape[1] if t.ndim > 1 and t.shape[0] == n else t.shape[0]
        return torch.arange(time).unsqueeze(0) < self.lengths.unsqueeze(1)

    def numpy(self) -> np.ndarray:
        """The primary tensor as a NumPy array (on CPU; bfloat16 and float8 become float32,
        which NumPy lacks).  A nested tensor comes back padded with zeros to ``(batch, max
        length, ...)`` (``lengths`` and ``mask`` say which positions are real); a sparse one
        dense.

        Read-only: on the CPU it shares the capture's memory, so writing into it would change
        the recording (and everything computed from it later).  ``.copy()`` it to write."""
        t = self.tensor.detach()
        if t.is_nested:
            t = torch.nested.to_padded_tensor(t, 0.0)
        elif t.layout is not torch.strided:
            t = t.to_dense()
        t = t.cpu()
        if t.dtype in NO_NUMPY_FLOATS:
            t = t.float()
        arr = t.numpy()
        arr.flags.writeable = False  # (a view: the base array stays writable for torch)
        return arr

    @property
    def shape(self) -> tuple[int, ...] | None:
        """Shape of the primary tensor; for a nested tensor, ``(batch, None, ...)`` with
        ``None`` where examples differ (their shapes: :attr:`shapes`)."""
        t = first_tensor(self._output)
        return None if t is None else tensor_shape(t)

    @property
    def shapes(self) -> list[tuple[int, ...]] | None:
        """Per-example shapes of a nested primary tensor, else ``None``."""
        t = first_tensor(self._output)
        return None if t is None or not t.is_nested else [tuple(c.shape) for c in t.unbind()]

    @property
    def nbytes(self) -> int:
        """Bytes this capture really holds: every distinct storage under its output and
        inputs, counted once and whole (a view keeps its whole storage alive)."""
        return held_bytes(t for part in (self._output, self._inputs, self._kwargs)
                          for _, t in iter_tensors(part))

    def to_frame(self, kind: str = "wide", *, reduce: Any = None, lengths: Any = None,
                 meta: Any = None, bidirectional: bool | None = None,
                 values: str = "value") -> pd.DataFrame:
        """This capture as a DataFrame; see :meth:`Recording.to_frame`."""
        from .frame import to_frame

        return to_frame([self], kind, reduce=reduce, lengths=lengths, meta=meta,
                        bidirectional=bidirectional, values=values)

    # -- display ----------------------------------------------------------------------------
    def _where(self) -> str:
        label = f" ({self.label!r})" if self.label is not None else ""
        return f"{self.name!r} step {self.step} call {self.call}{label}"

    def _row(self) -> dict[str, Any]:
        t = first_tensor(self._output)
        return {
            "module": self.name,
            "step": self.step,
            "call": self.call,
            "label": self.label,
            "type": self.module_type.__name__,
            "shape": None if t is None else describe_shape(t),
            "batch_dim": self.batch_dim,
            "dtype": None if t is None else str(t.dtype).replace("torch.", ""),
            "device": None if t is None else str(t.device),
            "bytes": self.nbytes,
            "lengths": self.lengths is not None or self._mask is not None,
        }

    def _stats(self) -> dict[str, float | None]:
        """Summary statistics of the primary tensor (over real positions where lengths are
        known), for display."""
        none = {"mean": None, "std": None, "min": None, "max": None}
        if self._pending is not None:  # reads values: the copy must have landed
            self._pending.wait()
        t = first_tensor(self._output)
        if t is None or not (t.is_floating_point() or t.is_complex()):
            return none
        if t.is_nested:  # every value of a nested tensor is real
            values = torch.cat([c.detach().float().flatten() for c in t.unbind()])
        elif t.layout is not torch.strided:
            values = t.detach().to_dense().float()
        else:
            values = t.detach().float()
            if self.batch_dim and t.ndim > self.batch_dim:  # (the mask is (batch, time))
                values = values.movedim(self.batch_dim, 0)
            mask = self.mask if t.ndim > 2 else None
            if mask is not None and tuple(mask.shape) == tuple(t.shape[:2]):
                values = values[mask.to(t.device)]
        if values.numel() == 0:
            return none
        return {"mean": float(values.mean()), "std": float(values.std()) if values.numel() > 1
                else 0.0, "min": float(values.min()), "max": float(values.max())}

    def _repr_html_(self) -> str:
        row = {**self._row(), **self._stats()}
        return pd.DataFrame([row]).to_html(index=False, na_rep="", float_format="{:.4g}".format)

    def __repr__(self) -> str:
        r = self._row()
        lengths = ", lengths known" if r["lengths"] else ""
        if self.batch_dim:
            lengths = f", batch at dim {self.batch_dim}{lengths}"
        if self.feature_map:
            lengths = f", a feature map (batch, channels, length){lengths}"
        if self.channels_last:
            lengths = f", channels last{lengths}"
        live = f", live objects (not snapshots): {', '.join(self.live)}" if self.live else ""
        return (
            f"Capture({self._where()}, {r['type']}, shape={r['shape']}, dtype={r['dtype']}"
            f"{lengths}{live})"
        )


_new_capture = object.__new__


def plain_capture(name: str, step: int, call: int, label: str | None, module_type: type,
                  output: Tensor, mask: Tensor | None) -> Capture:
    """``Capture(name, step, call, label, module_type, output, mask=mask)`` in a quarter of
    the time: a recorded module's hook makes one per call (``Recorder``'s short path)."""
    c = _new_capture(Capture)
    c.name = name
    c.step = step
    c.call = call
    c.label = label
    c.module_type = module_type
    c._output = output
    c._mask = mask
    return c
