"""The conversion step: what a module returned -> what a :class:`~hookscope.Capture` holds.

Pure functions of a value and a :class:`~hookscope.plan.Plan`: detach, pad ``PackedSequence``
back, undo the caller's batch sorting (``unsort=``), move/cast, and take a *snapshot* of what
still aliases the model's memory; and what a capture knows besides its value (sequence lengths
from packed inputs or nested sizes, the call's padding mask).  No hooks here, so every rule is
testable on plain values.

Snapshot rules, per tensor kind (a capture must never change after its call, never crash the
user's forward, and never pin more memory than it reports):

- dense tensors: an eager copy (``Tensor.clone``: dense layouts such as channels-last are
  kept, a small view of a large storage becomes a compact tensor of its own);
- ``clone="lazy"``: copy-on-write (``torch._lazy_clone``) for dense tensors that PyTorch's
  allocator owns and that use their whole storage; an eager copy for everything else
  (NumPy-backed, ``frombuffer``, DLPack, views);
- nested (``torch.nested``, strided or jagged), sparse and other layouts: an eager copy;
- ``clone=False``: no copy; the tensor's version is remembered (reading a capture changed in
  place raises).  Inference tensors have no version counter and are always copied.
- other objects (a Hugging Face ``DynamicCache``, any object with attributes): copied
  attribute by attribute with their tensors snapshotted; what cannot be copied (modules,
  objects without ``__dict__``) is kept by reference and listed in ``Capture.live``.
"""

from __future__ import annotations

import copy
import enum
import types
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from ._arrays import all_finite
from .errors import InputError, UnsortError
from .layout import resolve_batch_dim
from .plan import Plan
from .rnn_states import RNNStates
from .structure import (
    find_batch_dim,
    first_tensor,
    iter_tensors,
    lengths_from_batch_sizes,
    map_leaves,
    pad_packed,
)

__all__ = [
    "CloneMode",
    "Converted",
    "batch_dim_of",
    "check_cast",
    "check_perm_length",
    "convert",
    "from_rnn_state",
    "input_lengths",
    "input_packed",
    "is_rnn_state",
    "mask_argument",
    "nested_lengths_or_mask",
    "packed_input_layout",
    "packed_layout",
    "padding_mask",
    "snapshot_tensor",
]

CloneMode = bool | Literal["lazy"]

_lazy_clone: Callable[[Tensor], Tensor] | None = getattr(torch, "_lazy_clone", None)

# Values that cannot change after the call: kept as they are.
_IMMUTABLE = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device,
              torch.Size, torch.memory_format, torch.layout, enum.Enum, type, range,
              types.FunctionType, types.BuiltinFunctionType, types.MethodType, frozenset)


def snapshot_tensor(x: Tensor, clone: CloneMode) -> tuple[Tensor, tuple[Tensor, int] | None]:
    """A value of ``x`` that no later in-place op on ``x`` can change, by the rules above.

    Returns ``(tensor, version)`` where ``version`` is ``(x, x._version)`` for ``clone=False``
    (to detect a later change on read) and ``None`` otherwise.
    """
    if clone is False and not x.is_inference():
        try:
            return x, (x, x._version)
        except RuntimeError:  # a kind without a version counter: copy it
            pass
    if clone == "lazy" and _lazy_clone is not None and x.layout is torch.strided \
            and not x.is_nested and _uses_whole_storage(x):
        try:
            return _lazy_clone(x), None
        except (RuntimeError, NotImplementedError):  # memory PyTorch's allocator does not own
            pass
    return x.clone(), None


def _uses_whole_storage(x: Tensor) -> bool:
    """Whether ``x`` spans its storage exactly (so sharing it pins nothing extra)."""
    return x.is_contiguous() and x.untyped_storage().nbytes() == x.numel() * x.element_size()


class Converted:
    """What :func:`convert` made of one value."""

    __slots__ = ("dims", "lengths", "live", "permuted", "value", "versions")

    def __init__(self) -> None:
        self.value: Any = None
        self.lengths: Tensor | None = None  # from a PackedSequence in the value
        self.versions: list[tuple[Tensor, int]] | None = None
        self.live: list[str] = []  # objects kept by reference: "path (type)"
        self.permuted = 0  # leaves indexed with the permutation
        self.dims: dict[tuple, int | None] = {}  # with a permutation: each leaf's batch dim


def convert(
    value: Any,
    plan: Plan,
    *,
    perm: Tensor | None = None,
    where: str = "",
    rnn_states: RNNStates | None = None,
    dims: Mapping[tuple, int | None] | None = None,
) -> Converted:
    """Detach, pad, unsort, move/cast and snapshot every leaf of ``value`` by ``plan``'s rules.

    ``perm`` is this call's ``unsort=`` permutation (validated by the plan); every leaf with a
    batch dimension is indexed with it, and a permutation that no leaf can take is an error.
    ``rnn_states`` holds the (h, c) tensors that RNNs inside ``plan.module`` returned in this
    call (see :func:`batch_dim_of`).  ``dims`` gives the batch dimension of leaves by
    path where it was already decided (an edited output keeps its original's dims).
    """
    out = Converted()
    if plan.clone is False:
        out.versions = []
    device, dtype, clone, staging = plan.device, plan.dtype, plan.clone, plan.staging
    memo: dict[int, Any] = {}
    if perm is not None:
        n, perm_device = perm.shape[0], perm.device
        # Dim 0 is decided here for a plain leaf whose dim 0 alone has the batch's size (most
        # leaves); batch_dim_of decides everything else, and raises.
        auto = plan.batch_dim == "auto" and not plan.rnn and plan.seq_dim != 1
        states = rnn_states if rnn_states is not None and rnn_states.tensors else None

    def leaf(path: tuple, x: Any) -> Tensor:
        packed = type(x) is not Tensor and isinstance(x, PackedSequence)
        if packed:
            x, lengths = pad_packed(x)
            x = x.detach()  # padding is an autograd op: keep no graph alive
            if out.lengths is None:
                out.lengths = lengths
        else:
            tracked = x.requires_grad  # (a copy below needs no detached alias first)
            if tracked:
                x = x.detach()
        own = not packed  # still the model's own memory?
        if perm is not None:
            if dims is not None and path in dims:
                dim = dims[path]
            else:
                shape = x.shape
                if (auto and not packed and shape and shape[0] == n and shape.count(n) == 1
                        and (states is None or x not in states)):
                    dim = 0
                else:
                    dim = batch_dim_of(plan, path, x, packed, n, where, rnn_states)
            out.dims[path] = dim
            if dim is not None:
                here = x.device
                x = x.index_select(dim, perm if here == perm_device else plan.perm_on(perm, here))
                own = False
                out.permuted += 1
        if device is not None or (dtype is not None and x.is_floating_point()):
            cast = dtype if x.is_floating_point() else None
            if staging is not None:  # device="cpu": asynchronous into pinned memory
                moved = staging.to_host(x, cast)
            else:
                moved = x.to(device=device, dtype=cast)
                if cast is not None and x.device.type == "cpu":
                    check_cast(x, moved, where)  # (on a GPU it would wait: not there)
            own = own and moved is x
            x = moved
        if own:
            if not packed and not tracked and clone is False:
                x = x.detach()  # kept as it is: an alias, never the model's own object
            x, version = snapshot_tensor(x, clone)
            if version is not None:
                out.versions.append(version)
        return x

    def other(path: tuple, obj: Any) -> Any:
        return _snapshot_object(path, obj, leaf, out.live, memo)

    out.value = map_leaves(value, leaf, other=other)
    if perm is not None:
        if out.permuted == 0 and dims is None:
            raise UnsortError(
                f"unsort for {where}: no tensor in the output has a dimension of the "
                f"permutation's length {len(perm)}, so nothing would be put back in order. "
                "Check that the permutation belongs to this call's batch.")
        if out.lengths is not None:
            out.lengths = permute_lengths(out.lengths, perm, where)
    return out


def permute_lengths(lengths: Tensor, perm: Tensor, where: str) -> Tensor:
    """``lengths[perm]``, after checking that both describe the same batch."""
    check_perm_length(len(lengths), perm, where)
    return lengths.index_select(0, perm)  # (cheaper to dispatch than lengths[perm])


def check_perm_length(n: int, perm: Tensor, where: str) -> None:
    """An ``UnsortError`` unless ``perm`` is for a batch of ``n`` sequences."""
    if n != perm.shape[0]:
        raise UnsortError(
            f"unsort for {where}: the permutation has {perm.shape[0]} entries but the batch has "
            f"{n} sequences. Pass this call's own permutation.")


def check_cast(x: Tensor, cast: Tensor, where: Any) -> None:
    """``dtype=`` must not turn finite values into infinities (float16 holds up to 65504)."""
    if (torch.finfo(cast.dtype).max >= torch.finfo(x.dtype).max  # (no narrower range)
            or all_finite(cast)):
        return
    lost = torch.isinf(cast) & torch.isfinite(x)
    if bool(lost.any()):
        raise InputError(
            f"dtype={cast.dtype} cannot hold the output of {where}: a finite value of "
            f"magnitude {x[lost].abs().max().item():.4g} becomes infinity (the largest "
            f"{cast.dtype} is {torch.finfo(cast.dtype).max:.4g}). Record it in "
            "torch.float32 or torch.bfloat16.")


def _snapshot_object(path: tuple, obj: Any, leaf: Callable, live: list[str],
                     memo: dict[int, Any]) -> Any:
    """Copy an object that is not a known container, snapshotting the tensors it holds."""
    if isinstance(obj, _IMMUTABLE):
        return obj
    if id(obj) in memo:  # the same object twice (or a cycle): one copy
        return memo[id(obj)]
    where = "output" + "".join(f"[{k!r}]" for k in path)
    if isinstance(obj, nn.Module) or not hasattr(obj, "__dict__") or len(path) > 32:
        live.append(f"{where} ({type(obj).__name__})")
        return obj
    try:
        new = copy.copy(obj)
    except Exception:
        live.append(f"{where} ({type(obj).__name__})")
        return obj
    memo[id(obj)] = new

    def other(p: tuple, o: Any) -> Any:
        return _snapshot_object(p, o, leaf, live, memo)

    for key, v in list(vars(obj).items()):
        try:
            object.__setattr__(new, key, map_leaves(v, leaf, (*path, key), other=other))
        except (AttributeError, TypeError):
            live.append(f"{where}.{key} ({type(v).__name__})")
    return new


def batch_dim_of(
    plan: Plan, path: tuple, x: Tensor, packed: bool, n: int, where: str,
    rnn_states: RNNStates | None = None,
) -> int | None:
    """The dimension of leaf ``x`` (at ``path`` in the output) that ``unsort=`` permutes.

    ``batch_dim=`` decides where given; otherwise: sequences padded from a ``PackedSequence``
    dim 0; an RNN's own output by ``batch_first``, its ``(h, c)`` dim 1; a transformer
    module's own output (or attention's ``attn_output``) by ``batch_first`` (see
    :mod:`hookscope.layout`); the ``(h, c)`` that an
    RNN inside a wrapper returned (those very tensors or aliases, ``rnn_states``) dim 1; else
    the one dimension of size ``n``.  Several candidates raise instead of guessing, and a chosen
    dimension that is not of size ``n`` raises too (never a silent partial permutation).
    """
    spec = plan.batch_dim
    if type(spec) is not str:  # ("auto", the default, without a call)
        spec = resolve_batch_dim(spec, path)
    if spec is None:
        return None
    if type(spec) is not str and isinstance(spec, int):
        dim = spec
        if x.ndim <= dim or x.shape[dim] != n:
            leaf = "output" + "".join(f"[{k!r}]" for k in path)
            raise UnsortError(
                f"unsort for {where}: batch_dim={spec} applies to every tensor of the output, "
                f"but {leaf} has shape {tuple(x.shape)}, whose dim {dim} is not of the "
                f"permutation's length {n}. Give a dim per output path instead, e.g. "
                f"batch_dim={{name: {{{path[:1]!r}: dim}}}} (None leaves a tensor alone).")
        return dim
    if packed:
        dim = 0  # padded batch-first by us
    elif plan.rnn and plan.pick is None and path:
        # An RNN's output sequence follows batch_first; h / (h, c) are
        # (layers * directions, batch, hidden) whatever batch_first says.
        dim = (0 if plan.module.batch_first else 1) if path[0] == 0 else 1
    elif plan.seq_dim is not None and plan.pick is None and path in ((), (0,)) and x.ndim == 3:
        dim = plan.seq_dim  # a transformer module's own sequence, by its batch_first
    elif plan.seq_dim is not None and plan.pick is None and path == (1,) and x.ndim >= 3:
        dim = 0  # nn.MultiheadAttention's weights: (batch, [heads,] target, source)
    elif rnn_states is not None and x in rnn_states:
        dim = 1  # the wrapped RNN's own (h, c), returned as the RNN returned them
    else:
        dim = find_batch_dim(x.shape, n, where, path)
        if dim is None and path == ():
            raise UnsortError(f"unsort for {where}: the output has shape {tuple(x.shape)}, "
                              f"with no dimension of the permutation's length {n}: the "
                              "permutation is for another batch.")
        if dim is not None and dim != 0:
            # Only dim 0 is taken as the batch without being told: a permutation of another
            # batch's length that happens to match a feature or time dimension would
            # otherwise reorder features, silently.
            leaf = "output" + "".join(f"[{k!r}]" for k in path)
            raise UnsortError(
                f"unsort for {where}: {leaf} has shape {tuple(x.shape)}; its dim 0 is not of "
                f"the permutation's length {n}, dim {dim} is. If the permutation is for another "
                f"batch, pass this call's own. If dim {dim} really is the batch (a time-major "
                f"output), say so: batch_dim={{name: {dim}}}, or per output path "
                f"batch_dim={{name: {{{path!r}: {dim}}}}} (None leaves a tensor alone).")
        return dim
    if x.ndim <= dim or x.shape[dim] != n:
        leaf = "output" + "".join(f"[{k!r}]" for k in path)
        per_call = (" If the module runs several times per forward pass, give one "
                    "permutation per call: unsort={name: [perm_call0, perm_call1]}."
                    if isinstance(plan.perms, tuple) or plan.expected > 1 else "")
        raise UnsortError(
            f"unsort for {where}: {leaf} has shape {tuple(x.shape)}, whose batch dimension "
            f"{dim} is not of the permutation's length {n}: the permutation is for another "
            f"batch.{per_call}")
    return dim


# -- what a capture knows besides its value: lengths and padding masks ---------------------


def mask_argument(mask_from: str, args: tuple, kwargs: dict | None, missing: Any = None) -> Any:
    """What a call was given as its mask: the keyword ``mask_from``, else that key of a dict
    passed positionally (``model(features)`` in sentence-transformers), else ``missing``."""
    if kwargs and mask_from in kwargs:
        return kwargs[mask_from]
    for a in args:
        if type(a) is not Tensor and isinstance(a, Mapping) and mask_from in a:
            return a[mask_from]
    return missing


def padding_mask(mask_from: Any, args: tuple, kwargs: dict) -> Tensor | None:
    """The model call's ``(batch, time)`` mask, True at real positions, or ``None``.

    A keyword name reads that keyword, or that key of a dict passed positionally (True /
    non-zero = a real token, the Hugging Face convention); an additive float mask (0 and -inf)
    is not a padding mask and is ignored.
    A callable gets ``(args, kwargs)`` and returns the mask itself (or ``None``).
    """
    if callable(mask_from):
        try:
            mask = mask_from(args, kwargs)
        except Exception as exc:  # (a bare KeyError from inside the model call says nothing)
            raise InputError(
                f"mask_from= raised {type(exc).__name__}: {exc}. It is called with (args, "
                "kwargs) of every call of the model in the block; return None for a call "
                "that has no mask, e.g. lambda args, kwargs: kwargs.get('mask').") from exc
        if mask is None:
            return None
        mask = torch.as_tensor(mask)
        if mask.ndim != 2:
            raise InputError(f"mask_from= returned a mask of shape {tuple(mask.shape)}; it "
                             "must be (batch, time), True at real positions.")
        return mask.detach() != 0  # on its device, as below
    mask = kwargs.get(mask_from)
    if mask is None:  # model(batch) with a dict of features (sentence-transformers)
        mask = mask_argument(mask_from, args, None)
    if not isinstance(mask, Tensor) or mask.ndim != 2:
        return None
    mask = mask.detach()
    if mask.is_floating_point() and not bool(((mask == 0) | (mask == 1)).all()):
        return None  # an additive mask (0 / -inf): not "1 = real token"
    # Left on its device (moving it to the CPU here would wait for the GPU in every forward):
    # Capture.mask moves it on first read.
    return mask != 0


def packed_layout(t: Tensor | None, n: int, longest: int) -> str | None:
    """``"batch"`` where ``t`` is ``(batch, time, ...)`` for ``n`` sequences of at most
    ``longest`` steps, ``"time"`` where it is ``(time, batch, ...)``, else ``None``.

    The time dimension holds exactly ``longest`` steps (``pad_packed_sequence``), or more
    (``total_length=``) where ``t`` is a sequence of vectors (3-D or more): a 2-D ``(batch,
    features)`` output, an RNN's final state or its concatenated halves, is not a sequence
    merely because it has at least as many features as the longest sequence has steps.
    (An RNN's own state is excluded by identity before this: see :func:`from_rnn_state`.  A
    time-major capture keeps its lengths, and its batch is known to be dim 1.)"""
    if t is None or t.is_nested or t.ndim < 2:
        return None
    for layout, b, time in (("batch", 0, 1), ("time", 1, 0)):
        steps = t.shape[time]
        if t.shape[b] == n and (steps == longest or (t.ndim >= 3 and steps > longest)):
            return layout
    return None


def is_rnn_state(plan: Plan, t: Tensor | None, states: RNNStates, output: Any = None) -> bool:
    """Whether ``t``, a capture's primary tensor (picked from the module's ``output``), is an
    RNN's final state ``(layers * directions, batch, hidden)``: the very state the hooked RNN
    returned beside its output (``(out, h)`` or ``(out, (h, c))``, picked with ``pick=``), or
    one of ``states``, those RNNs inside hooked wrappers returned in this forward pass, or a
    view of one that keeps its batch at dim 1 (``h[-2:]``, ``h[..., :3]``)."""
    if t is None or t.ndim != 3:
        return False
    if plan.rnn:
        return (plan.pick is not None and isinstance(output, tuple) and len(output) == 2
                and any(t is state for _, state in iter_tensors(output[1])))
    return states.batch_at_dim_1(t)


def from_rnn_state(plan: Plan, t: Tensor | None, states: RNNStates) -> bool:
    """Whether ``t``, a capture's primary tensor, is an RNN's final state (or a view of one)
    rather than its sequence output: the hooked module is an RNN (its sequence output, packed, has
    lengths of its own), or the tensor shares memory with one of ``states``, the ``(h, c)``
    RNNs inside hooked wrappers returned in this forward pass (held alive until it ends, so
    that no address is reused).  The input's lengths never describe it, whatever its shape."""
    if plan.rnn:
        return True
    if not states.tensors:
        return False
    if t is None or t.is_nested or t.layout is not torch.strided:
        return False
    return states.shares_memory(t)


def input_packed(args: tuple, kwargs: dict) -> PackedSequence | None:
    """The first ``PackedSequence`` a call was given as an argument, else the one inside its
    arguments' containers (``model({"premise": packed, ...})``) where there is exactly one
    (several would leave it unknown which one a capture's sequences come from).  (Plain loops
    and exact type tests: this runs on every call.)"""
    containers = False
    for a in (*args, *kwargs.values()) if kwargs else args:
        kind = type(a)
        if kind is PackedSequence:
            return a
        if kind is Tensor or a is None or kind in _SCALARS:
            continue
        if isinstance(a, PackedSequence):
            return a
        containers = containers or isinstance(a, Mapping | list | tuple)
    if not containers:
        return None
    found = [x for _, x in iter_tensors((args, kwargs), packed=True)
             if isinstance(x, PackedSequence)]
    return found[0] if len(found) == 1 else None


_SCALARS = frozenset({int, float, bool, str})


def packed_input_layout(args: tuple, kwargs: dict, t: Tensor | None) -> str | None:
    """:func:`packed_layout` of ``t`` (a call's primary output) for the ``PackedSequence``
    the call was given (see :func:`input_packed`), or ``None``."""
    packed = input_packed(args, kwargs) if t is not None and type(t) is Tensor else None
    if packed is None:
        return None
    sizes = packed.batch_sizes  # (on the CPU, whatever the data's device)
    longest = sizes.shape[0]
    return packed_layout(t, int(sizes[0]) if longest else 0, longest)


def input_lengths(args: tuple, kwargs: dict, perm: Tensor | None, name: str,
                  t: Tensor | None = None) -> tuple[Callable[[], Tensor] | None, str | None]:
    """What computes the lengths of the ``PackedSequence`` a call was given, in the output's
    batch order (a :class:`~hookscope.Capture` calls it when its lengths are first read),
    and ``t``'s layout (:func:`packed_layout`: ``"batch"``, ``"time"``, or ``None`` when not
    given); given ``t``, the capture's primary tensor, only where they describe it.  It holds
    the input's ``batch_sizes`` and ``unsorted_indices``, not its data."""
    # The story's LSTMEncoder takes a PackedSequence and returns a padded tensor: the
    # lengths live in the input's batch_sizes.
    packed = input_packed(args, kwargs)
    if packed is None:
        return None, None
    sizes, unsorted = packed.batch_sizes, packed.unsorted_indices
    # Sequences: batch_sizes[0]; the longest has a step at every time.
    longest = sizes.shape[0]
    n = int(sizes[0]) if longest else 0
    layout = None if t is None else packed_layout(t, n, longest)
    if t is not None and layout is None:
        return None, None  # e.g. an RNN's h_n picked from a packed call
    if perm is not None:  # (checked now, not on first read: the error belongs to this call)
        check_perm_length(n, perm, f"{name!r} lengths")

    def lengths() -> Tensor:
        out = lengths_from_batch_sizes(sizes, unsorted)
        return out if perm is None else permute_lengths(out, perm, f"{name!r} lengths")

    return lengths, layout


def nested_lengths_or_mask(value: Any, mask: Tensor | None,
                            perm: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """Lengths of a nested tensor's sequences, or the model call's attention mask where the
    primary tensor is ``(batch, time, features)`` of the mask's shape (a 2-D ``(batch, d)``
    output whose ``d`` happens to equal the time steps is no sequence, and a 4-D one is read
    as a feature map: attention weights ``(batch, heads, time, time)`` may have as many heads
    as time steps)."""
    t = first_tensor(value)
    if t is None:
        return None, None
    if t.is_nested:
        try:
            return torch.tensor([c.shape[0] for c in t.unbind()], dtype=torch.int64), None
        except Exception:
            return None, None
    if mask is None or t.ndim != 3 or t.shape[:2] != mask.shape:  # (batch, d): no sequence
        return None, None
    return None, mask if perm is None else mask[perm]
