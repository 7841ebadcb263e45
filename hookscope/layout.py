"""What a module's output layout is, where its type says so: PyTorch's sequence modules built
time-major, and its 1-D convolution, pooling and normalisation layers (channels first).

``nn.LSTM``, ``nn.GRU``, ``nn.RNN``, ``nn.MultiheadAttention`` and the ``nn.Transformer*``
modules are time-major by default (``batch_first=False``): their output sequence is
``(time, batch, ...)``.  A capture of such an output knows its batch is dim 1
(:attr:`hookscope.Capture.batch_dim`), so that ``unsort=`` permutes the right dimension and
exports give one row per example, not one per time step.  Any other module's 3-D output is
time-major where the forward pass tells it: its dims 0 and 1 are those of the model call's
padding mask or token ids (by their keyword, :data:`BATCH_FIRST_IDS`) or of its scope's mask
swapped, with time steps != examples (:func:`swapped`: fairseq-style models, FSMT, XLNet).  A
layout its type tells (``batch_first=True``) wins.  Where they are equal, or nothing tells,
``batch_dim=`` says it.

A 3-D tensor is otherwise read as a sequence ``(batch, time, features)``; the output of
``nn.Conv1d`` and the other 1-D layers of :data:`CHANNELS_FIRST_1D` is ``(batch, channels,
length)``, a 1-D feature map (:attr:`hookscope.Capture.feature_map`), pooled over its
positions with one unit per channel, as 2-D and 3-D feature maps are.  A 4-D or larger
tensor is otherwise read as ``(batch, channels, *spatial)``; the output of the layers of
:data:`CHANNELS_LAST` (``nn.Linear``, ``nn.LayerNorm``, ...), which act on the last dimension,
is ``(batch, *spatial, channels)`` (:attr:`hookscope.Capture.channels_last`).
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .rnn_states import state_key
from .structure import iter_tensors

__all__ = ["BATCH_FIRST_IDS", "CHANNELS_FIRST_1D", "CHANNELS_LAST", "SEQUENCE_MODULES",
           "capture_batch_dim", "channels_first_1d", "channels_last", "id_positions",
           "id_times", "is_known", "known_dims", "one_batch", "resolve_batch_dim",
           "sequence_batch_dim", "sequence_output", "swapped", "swapped_shapes", "time_major"]

_OWN_FLAG = (nn.RNNBase, nn.MultiheadAttention, nn.Transformer)
_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
_STACKS = (nn.TransformerEncoder, nn.TransformerDecoder)
#: PyTorch's modules whose sequence layout their ``batch_first`` tells (RNNs included).
SEQUENCE_MODULES = _OWN_FLAG + _LAYERS + _STACKS


#: Layers whose 3-D output is ``(batch, channels, length)`` (their lazy variants included).
CHANNELS_FIRST_1D: tuple[type, ...] = (
    nn.Conv1d, nn.ConvTranspose1d, nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveMaxPool1d, nn.LPPool1d, nn.MaxUnpool1d, nn.BatchNorm1d, nn.LazyBatchNorm1d,
    nn.SyncBatchNorm, nn.InstanceNorm1d, nn.LazyInstanceNorm1d, nn.GroupNorm,
    nn.ReflectionPad1d, nn.ReplicationPad1d, nn.ConstantPad1d, nn.CircularPad1d,
    nn.Upsample, nn.Dropout1d,
)


#: Layers whose output has its features last: a 4-D or larger output is channels-last,
#: ``(batch, *spatial, channels)`` (a ``Linear`` or ``LayerNorm`` inside a ConvNeXt block).
CHANNELS_LAST: tuple[type, ...] = (
    nn.Linear, nn.Bilinear, nn.LayerNorm, nn.Embedding,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def swapped(shape: tuple[int, ...], ref: tuple[int, ...] | None,
            pairs: set[tuple[int, int]] | None = None) -> bool:
    """Whether a tensor of ``shape`` is ``(time, batch, features)`` where ``ref`` is a
    ``(batch, time)`` of the forward pass (a scope's padding mask) or ``pairs`` holds its
    ``(time, batch)`` (:func:`swapped_shapes`): dims 0 and 1 are ``ref``'s swapped.  Equal
    sizes tell nothing (``False``); a batch-first tensor never matches (its dim 0 is the
    batch, which differs from the time steps)."""
    if len(shape) != 3:
        return False
    if pairs and (shape[0], shape[1]) in pairs:
        return True
    return (ref is not None and ref[0] != ref[1] and shape[0] == ref[1]
            and shape[1] == ref[0])


# Keywords that hold (batch, time) token ids by convention (Hugging Face, fairseq): a tensor
# passed positionally, or under another name, may be (time, batch) (PyTorch's
# word_language_model takes time-major ids) and tells nothing.
BATCH_FIRST_IDS = frozenset({"input_ids", "decoder_input_ids", "token_type_ids",
                             "src_tokens", "prev_output_tokens"})


def id_positions(fn: Any) -> tuple[int, ...]:
    """Which of a function's positional parameters hold token ids by their name
    (:data:`BATCH_FIRST_IDS`): ``(0,)`` for ``forward(self, input_ids, ...)``; ``()`` where
    none does or the signature cannot be read.  Read once per function (``inspect`` costs
    tens of microseconds, and a block is often made per forward pass)."""
    key = getattr(fn, "__func__", fn)
    try:
        return _ID_POSITIONS[key]
    except (KeyError, TypeError):  # (TypeError: a callable that takes no weak reference)
        pass
    out = _id_positions(fn)
    with contextlib.suppress(TypeError):
        _ID_POSITIONS[key] = out
    return out


_ID_POSITIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _id_positions(fn: Any) -> tuple[int, ...]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return ()
    out = []
    for i, p in enumerate(params):
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            break
        if p.name in BATCH_FIRST_IDS:
            out.append(i)
    return tuple(out)


def swapped_shapes(kwargs: dict | None, mask: Any = None, features: Any = None,
                   ids: list[Any] | None = None) -> set[tuple[int, int]]:
    """``(time, batch)`` of the model call's ``(batch, time)`` tensors: its padding ``mask``,
    positional token ``ids`` (:func:`id_positions`), and tensors under the names of
    :data:`BATCH_FIRST_IDS` or ending in ``attention_mask`` (keywords, or a positional
    ``features`` dict), where time != batch.  A 3-D output whose dims 0 and 1 are one of them
    is time-major (:func:`swapped`); a batch-first output never is, as its dim 0 is the batch,
    which differs from every such time.  Tensors that disagree on the batch size tell nothing
    (two streams of transposed shapes): the empty set."""
    given = [*([mask] if isinstance(mask, Tensor) else []), *(ids or ()),
             *_named(kwargs, features, lambda k: k in BATCH_FIRST_IDS
                     or k.endswith("attention_mask"))]
    shapes = {(a.shape[0], a.shape[1]) for a in given
              if type(a) is Tensor and a.ndim == 2 and not a.is_floating_point()
              and not a.is_complex()}
    if len({b for b, _ in shapes}) != 1:
        return set()
    return {(t, b) for b, t in shapes if t != b}


def id_times(kwargs: dict | None, features: Any = None,
             ids: list[Any] | None = None) -> set[int]:
    """The time steps of the model call's token ids (:data:`BATCH_FIRST_IDS`, ``labels``;
    keywords, a features dict, positional ``ids``): a sequence with as many steps is a stream
    whose tokens the call gave (a decoder fed its own ids, a cached generation step), not one
    whose padding went unknown (:func:`hookscope.frame.warn_unmasked`)."""
    given = [*(ids or ()),
             *_named(kwargs, features, lambda k: k in BATCH_FIRST_IDS or k == "labels")]
    return {a.shape[1] for a in given if type(a) is Tensor and a.ndim == 2
            and not a.is_floating_point()}


def _named(kwargs: dict | None, features: Any, accept: Any) -> list[Any]:
    """The values of the model call's keywords and features dict whose names ``accept``
    takes."""
    return [v for named in (kwargs, features) if isinstance(named, Mapping)
            for k, v in named.items() if type(k) is str and accept(k)]


def one_batch(*given: Any) -> bool:
    """Whether the model call's tensors of two or more dimensions (in ``given``: its
    positional arguments, keywords, a features dict) agree on dim 0, the batch, leaving out
    size 1 (broadcast ``position_ids``).  Where they do not (CLIP's 5 prompts beside 3
    images, a query beside a document), the model runs streams of different batches, and
    shapes that coincide across them tell no layout."""
    sizes = set()
    for group in given:
        for v in (group.values() if isinstance(group, Mapping) else group or ()):
            if type(v) is Tensor and v.ndim >= 2 and v.shape[0] != 1:
                sizes.add(v.shape[0])
    return len(sizes) <= 1


def channels_last(module: nn.Module) -> bool:
    """Whether a 4-D or larger output of ``module`` is ``(batch, *spatial, channels)``
    (:data:`CHANNELS_LAST`)."""
    return isinstance(module, CHANNELS_LAST)


def channels_first_1d(module: nn.Module) -> bool:
    """Whether a 3-D output of ``module`` is a 1-D feature map ``(batch, channels, length)``
    (:data:`CHANNELS_FIRST_1D`)."""
    return isinstance(module, CHANNELS_FIRST_1D)


def sequence_batch_dim(module: nn.Module) -> int | None:
    """The batch dimension of the sequence that one of PyTorch's RNN, attention or
    transformer modules returns (:func:`sequence_output`), by its ``batch_first``: 0, or 1 for
    ``(time, batch, ...)``; ``None`` for any other module."""
    if isinstance(module, _STACKS):  # (they follow their layers, as their forward does)
        layers = getattr(module, "layers", None)
        module = layers[0] if layers is not None and len(layers) else None
    if isinstance(module, _LAYERS):
        module = getattr(module, "self_attn", None)
    if isinstance(module, _OWN_FLAG):
        return 0 if getattr(module, "batch_first", True) else 1
    return None


def time_major(module: nn.Module) -> bool:
    """Whether ``module`` is one of PyTorch's sequence modules built with
    ``batch_first=False``: its own output sequence (:func:`sequence_output`) is ``(time,
    batch, ...)`` when its input is batched."""
    # (one test first: a block asks this of every module of the model)
    return isinstance(module, SEQUENCE_MODULES) and sequence_batch_dim(module) == 1


def is_known(t: Tensor, tensors: list[Tensor]) -> bool:
    """Whether ``t`` is one of ``tensors`` or an alias of one (same memory and layout, as
    ``x.detach()`` is): identity first, addresses only on a miss."""
    for x in tensors:
        if t is x:
            return True
    if t.is_nested or t.layout is not torch.strided:
        return False
    key = state_key(t)  # (as RNN states are known: rnn_states.py)
    return any(not x.is_nested and x.layout is torch.strided and state_key(x) == key
               for x in tensors)


def sequence_output(output: Any) -> Tensor | None:
    """The sequence a time-major module returned: its output, or the first item of the tuple
    it returned (``nn.LSTM``'s ``(output, (h, c))``, ``nn.MultiheadAttention``'s
    ``(attn_output, attn_weights)``, whose weights are batch-first)."""
    if type(output) is Tensor:
        return output
    if type(output) is tuple and output and type(output[0]) is Tensor:
        return output[0]
    return None


def resolve_batch_dim(spec: Any, path: tuple) -> Any:
    """``batch_dim=``'s answer for the leaf at ``path`` of an output: an int, ``None`` (leave
    it alone), or ``"auto"`` (not said: the default, or a mapping whose prefixes miss it).  A
    mapping's longest matching path prefix wins."""
    if type(spec) is not str and isinstance(spec, Mapping):  # ("auto", the default: a str)
        best = None
        for prefix, dim in spec.items():
            prefix = prefix if isinstance(prefix, tuple) else (prefix,)
            if path[: len(prefix)] == prefix and (best is None or len(prefix) > len(best[0])):
                best = (prefix, dim)
        return "auto" if best is None else best[1]
    return spec


def capture_batch_dim(plan: Any, output: Any, raw: Any, primary: Tensor | None,
                      rnn_state: bool, packed_layout: str | None,
                      time_major_outputs: list[Tensor]) -> int:
    """The dimension of a capture's primary tensor that holds the examples
    (:attr:`hookscope.Capture.batch_dim`), as recorded (after ``pick=``, ``raw``).

    ``batch_dim=`` decides where it says so for the primary's path; else 1 for an RNN's
    final state, for a time-major module's own sequence (``primary`` is
    :func:`sequence_output` of the module's ``output``, by identity: a new tensor made from
    it by ``pick=`` is not known), for such a sequence passed on unchanged by a module around
    it (``time_major_outputs``: what the model's time-major modules returned in this forward
    pass; a ``Dropout`` in eval mode returns its input), and for an output a packed input's
    lengths describe as ``(time, batch, ...)`` (``packed_layout``); else 0."""
    if primary is None or primary.ndim < 2:
        return 0
    if plan.batch_dim != "auto":
        path = next((p for p, _ in iter_tensors(raw, packed=True)), ())
        spec = resolve_batch_dim(plan.batch_dim, path)
        if spec is None:
            return 0
        if spec != "auto":
            return spec
    if rnn_state or packed_layout == "time":
        return 1
    if primary.ndim == 3 and (
            (plan.seq_dim == 1 and primary is sequence_output(output))
            or (time_major_outputs and is_known(primary, time_major_outputs))):
        return 1
    return 0


def known_dims(plan: Any, output: Any, raw: Any, time_major_outputs: list[Tensor],
               packed_layout: str | None) -> dict[tuple, int] | None:
    """For ``unsort=``: the batch dimension (1) of the leaves of ``raw`` that are known to be
    time-major though their paths do not say so: the module's own sequence picked with
    ``pick=``, a time-major sequence passed on from a module inside
    (``time_major_outputs``), and the primary tensor where a packed input's lengths describe
    it as ``(time, batch, ...)``; ``None`` if none is."""
    own = sequence_output(output) if plan.seq_dim == 1 and plan.pick is not None else None
    dims = {}
    for i, (path, x) in enumerate(iter_tensors(raw, packed=True)):
        if type(x) is not Tensor and not isinstance(x, Tensor):  # (a PackedSequence)
            continue
        if x.ndim == 3 and (x is own or (i == 0 and packed_layout == "time") or (
                time_major_outputs and is_known(x, time_major_outputs))):
            dims[path] = 1
    return dims or None
