"""``record()``: forward hooks on, capture every call, hooks off.

The hook is the hot path (it runs on every call of a selected module), so everything that can
be decided once — which module, its labels, its permutations, what to do with each leaf — is
decided in :class:`Recorder.__init__` and kept in a ``Plan`` per module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .errors import CallCountError, HookscopeError, UnsortError
from .plan import BatchDim, Plan, make_plans, mark_plain, set_unsort
from .recording import Capture, Recording
from .select import ModuleSpec, resolve_modules, unwrap
from .structure import find_batch_dim, map_leaves, packed_lengths, pad_packed

__all__ = ["Recorder", "record"]

# A copy-on-write clone: O(1) now, and the data are copied only if the model later writes to
# the tensor in place (then the write copies, and the capture keeps the old values).  Falls
# back to an eager clone where this PyTorch lacks it.
_safe_clone: Callable[[Tensor], Tensor] = getattr(torch, "_lazy_clone", None) or Tensor.clone


class _Stop(BaseException):
    """Raised by a hook to end the forward pass early (``stop=True``).

    A ``BaseException`` so that a model's own ``except Exception`` cannot swallow it; the
    recorder that raised it swallows it in ``__exit__``.
    """

    def __init__(self, recorder: Recorder) -> None:
        super().__init__("hookscope: forward pass stopped after the last recorded module")
        self.recorder = recorder


class Recorder:
    """A reusable recorder: ``with recorder as rec`` registers the hooks, fills a fresh
    :class:`Recording`, and removes every hook on exit.  Made by :func:`record`, which
    documents the options."""

    def __init__(
        self,
        model: nn.Module,
        modules: ModuleSpec | Iterable[ModuleSpec],
        *,
        inputs: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        pick: Callable[[Any], Any] | Mapping[ModuleSpec, Callable[[Any], Any]] | None = None,
        calls: Mapping[ModuleSpec, list[str]] | None = None,
        unsort: Mapping[ModuleSpec, Any] | None = None,
        batch_dim: Mapping[ModuleSpec, BatchDim] | None = None,
        stop: bool = False,
        clone: bool = True,
    ) -> None:
        selected = resolve_modules(model, modules)
        self.model = model
        self.inputs = inputs
        self.device = torch.device(device) if device is not None else None
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype= must be a floating torch.dtype such as torch.float16; "
                            f"got {dtype!r}. (Integer tensors are never cast.)")
        self.dtype = dtype
        self.stop = stop
        self.clone = clone
        self._selected = selected
        self._plans = make_plans(model, selected, pick=pick, calls=calls, batch_dim=batch_dim)
        self._set_unsort(unsort)
        # Made once: entering the recorder only registers these.
        self._names = list(self._plans)
        self._module_types = {n: p.module_type for n, p in self._plans.items()}
        self._hooks = [(p.module, self._make_pre_hook(p) if inputs else None, self._make_hook(p))
                       for p in self._plans.values()]
        inner, prefix = unwrap(model)
        self._model_type = type(inner).__name__
        # Hooks added after torch.compile are not seen by the compiled graph (dynamo skips
        # hook guards), which would give an empty recording: run eagerly inside the block.
        self._compiled = "_orig_mod." in prefix
        self._stance: Any = None
        self._handles: list[Any] = []
        self._rec: Recording | None = None
        self._counts: dict[str, int] = {}
        self._remaining = 0
        self._pending_inputs: dict[str, list[tuple[tuple, dict]]] = {}

    def _set_unsort(self, unsort: Mapping[ModuleSpec, Any] | None) -> None:
        """(Re)set the ``unsort=`` permutations, validated; used once per batch by
        ``record_dataset``, where every batch has its own order."""
        set_unsort(self._plans, self.model, self._selected, unsort)
        mark_plain(self._plans, self.device, self.dtype)

    # -- entering and leaving ---------------------------------------------------------------
    def __enter__(self) -> Recording:
        if self._rec is not None:
            raise HookscopeError("This recorder is already active; nest a new record() instead.")
        self._rec = Recording(self._names, self._module_types, self._model_type)
        self._counts = {}
        self._remaining = len(self._plans)
        self._pending_inputs = {}
        try:
            if self._compiled:
                self._stance = torch.compiler.set_stance("force_eager")
                self._stance.__enter__()
            add = self._handles.append
            add(self.model.register_forward_pre_hook(self._new_step))
            for module, pre_hook, hook in self._hooks:
                if pre_hook is not None:
                    add(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
                add(module.register_forward_hook(hook, with_kwargs=True))
        except BaseException:
            self._remove_hooks()
            raise
        return self._rec

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        rec = self._rec
        self._remove_hooks()
        stopped = isinstance(exc, _Stop) and exc.recorder is self
        if rec is not None and (exc is None or stopped):
            self._check_counts(rec)  # nothing else went wrong: report label/call mismatches
        return stopped

    def _remove_hooks(self) -> None:
        handles, self._handles = self._handles, []
        for h in handles:
            h.remove()
        if self._stance is not None:
            stance, self._stance = self._stance, None
            stance.__exit__(None, None, None)
        self._rec = None
        self._pending_inputs = {}

    def run(self, *args: Any, **kwargs: Any) -> Recording:
        """Call the model once inside this recorder and return the recording.

        Convenient with ``stop=True`` (nothing after the stop is skipped in your own code) and
        in loops: the modules are resolved once, only hooks are added and removed per call.
        """
        with self as rec:
            self.model(*args, **kwargs)
        return rec

    # -- hooks ------------------------------------------------------------------------------
    def _new_step(self, module: nn.Module, args: Any) -> None:
        rec = self._rec
        if rec is None:
            return
        rec.steps += 1
        self._counts.clear()
        self._remaining = len(self._plans)
        self._pending_inputs.clear()

    def _make_hook(self, plan: Plan) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            self._record_call(plan, args, kwargs, output)

        return hook

    def _make_pre_hook(self, plan: Plan) -> Callable[..., None]:
        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            where = f"{plan.name!r} inputs"
            args, kwargs = self._convert(plan, (args, kwargs), None, where)[0]
            self._pending_inputs.setdefault(plan.name, []).append((args, kwargs))

        return pre_hook

    def _record_call(self, plan: Plan, args: tuple, kwargs: dict, output: Any) -> None:
        rec = self._rec
        if rec is None:  # a stale call after the block ended (e.g. from a cached graph)
            return
        if rec.steps == 0:  # a module called without the model's own forward (model.encode)
            rec.steps = 1
        name = plan.name
        counts = self._counts
        call = counts.get(name, 0)
        counts[name] = call + 1
        labels = plan.labels
        label = labels[call] if labels is not None and call < len(labels) else None
        if plan.plain and type(output) is Tensor:  # the common case, without the tree walk
            value = output.detach()
            versions = None
            if self.clone or value.is_inference():  # inference tensors have no version
                value = _safe_clone(value)
            else:
                versions = [(value, value._version)]
            lengths = self._input_lengths(args, kwargs, None)
        else:
            value = plan.pick(output) if plan.pick is not None else output
            perm = plan.perm(call) if plan.perms is not None else None
            where = f"{name!r} call {call}" + (f" ({label!r})" if label else "")
            value, lengths, versions = self._convert(plan, value, perm, where)
            if lengths is None:
                lengths = self._input_lengths(args, kwargs, perm)
        inputs = kwargs_in = None
        if self.inputs:
            pending = self._pending_inputs.get(name)
            if pending:
                inputs, kwargs_in = pending.pop()
        rec._captures[name].append(Capture(
            name, rec.steps - 1, call, label, plan.module_type, value, inputs, kwargs_in,
            lengths, versions))
        if self.stop and call + 1 == plan.expected:
            self._remaining -= 1
            if self._remaining == 0:
                raise _Stop(self)

    # -- values -----------------------------------------------------------------------------
    def _convert(
        self, plan: Plan, value: Any, perm: Tensor | None, where: str
    ) -> tuple[Any, Tensor | None, list | None]:
        """Detach, pad packed sequences, unsort, move/cast, and clone what still aliases the
        model's memory.  Returns (value, lengths, versions-for-clone=False)."""
        found: list[Tensor] = []
        versions: list[tuple[Tensor, int]] | None = None if self.clone else []
        device, dtype, clone = self.device, self.dtype, self.clone

        def leaf(path: tuple, x: Any) -> Tensor:
            packed = isinstance(x, PackedSequence)
            if packed:
                x, lens = pad_packed(x)
                found.append(lens)
            else:
                x = x.detach()
            own = x
            if perm is not None:
                dim = self._batch_dim(plan, path, x, packed, len(perm), where)
                if dim is not None:
                    x = x.index_select(dim, perm.to(x.device, non_blocking=True))
            if device is not None or (dtype is not None and x.is_floating_point()):
                x = x.to(device=device, dtype=dtype if x.is_floating_point() else None)
            if x is own and not packed:  # still the model's memory: a later x.add_() would show
                if clone or x.is_inference():  # inference tensors have no version counter
                    x = _safe_clone(x)
                else:
                    versions.append((x, x._version))
            return x

        value = map_leaves(value, leaf)
        lengths = found[0] if found else None
        if lengths is not None and perm is not None:
            lengths = lengths[perm]
        return value, lengths, versions

    def _batch_dim(
        self, plan: Plan, path: tuple, x: Tensor, packed: bool, n: int, where: str
    ) -> int | None:
        spec = plan.batch_dim
        if isinstance(spec, Mapping):
            best = None
            for prefix, dim in spec.items():
                prefix = prefix if isinstance(prefix, tuple) else (prefix,)
                if path[: len(prefix)] == prefix and (best is None or len(prefix) > len(best[0])):
                    best = (prefix, dim)
            if best is not None:
                spec = best[1]
                if spec is None:
                    return None
            else:
                spec = "auto"
        if isinstance(spec, int):
            if x.ndim <= spec or x.shape[spec] != n:
                raise UnsortError(f"unsort for {where}: batch_dim {spec} of a leaf with shape "
                                  f"{tuple(x.shape)} is not of the permutation's length {n}.")
            return spec
        if spec is None:
            return None
        if packed:
            return 0  # padded batch-first by us
        if plan.rnn and plan.pick is None and path:
            if path[0] == 0:  # the RNN's output sequence
                return 0 if plan.module.batch_first else 1
            return 1  # h / (h, c): (layers * directions, batch, hidden) whatever batch_first says
        if (plan.pick is None and path[:1] == (1,) and x.ndim == 3 and x.shape[1] == n
                and (x.shape[0], x.shape[2]) in self._rnn_states(plan)):
            return 1  # the wrapped RNN's (h, c), returned as the RNN returns them
        dim = find_batch_dim(x.shape, n, where, path)
        if dim is None and path == ():
            raise UnsortError(f"unsort for {where}: the output has shape {tuple(x.shape)}, "
                              f"with no dimension of the permutation's length {n}.")
        return dim

    @staticmethod
    def _rnn_states(plan: Plan) -> set[tuple[int, int]]:
        """(layers * directions, hidden) of RNNs inside a wrapper such as the story's
        LSTMEncoder: a state leaf of exactly that shape has its batch in dim 1."""
        if plan.rnn_states is None:
            plan.rnn_states = {
                (m.num_layers * (2 if m.bidirectional else 1), size)
                for m in plan.module.modules() if isinstance(m, nn.RNNBase)
                for size in {m.hidden_size, getattr(m, "proj_size", 0) or m.hidden_size}
            }
        return plan.rnn_states

    @staticmethod
    def _input_lengths(args: tuple, kwargs: dict, perm: Tensor | None) -> Tensor | None:
        # The story's LSTMEncoder takes a PackedSequence and returns a padded tensor: the
        # lengths live in the input's batch_sizes.  (Plain loops: this runs on every call.)
        packed = None
        for a in args:
            if isinstance(a, PackedSequence):
                packed = a
                break
        if packed is None and kwargs:
            for a in kwargs.values():
                if isinstance(a, PackedSequence):
                    packed = a
                    break
        if packed is None:
            return None
        lengths = packed_lengths(packed)
        return lengths[perm] if perm is not None and len(perm) == len(lengths) else lengths

    def _check_counts(self, rec: Recording) -> None:
        problems = []
        for name, plan in self._plans.items():
            n_expected = len(plan.labels) if plan.labels is not None else (
                len(plan.perms) if isinstance(plan.perms, list) else None)
            if n_expected is None:
                continue
            per_step: dict[int, int] = {}
            for c in rec._captures[name]:
                per_step[c.step] = per_step.get(c.step, 0) + 1
            for step, n in sorted(per_step.items()):
                if n != n_expected:
                    given = "labels" if plan.labels is not None else "unsort permutations"
                    problems.append(f"{name!r} ran {n} time(s) in step {step}, but {n_expected} "
                                    f"{given} were given")
        if problems:
            raise CallCountError(
                "calls= / unsort= disagree with what ran: " + "; ".join(problems) + ". The "
                "recording is complete (rec.calls(name) lists every call); fix the labels to "
                "match the number of calls per forward pass.")


def record(
    model: nn.Module,
    modules: ModuleSpec | Iterable[ModuleSpec],
    *,
    inputs: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    pick: Callable[[Any], Any] | Mapping[ModuleSpec, Callable[[Any], Any]] | None = None,
    calls: Mapping[ModuleSpec, list[str]] | None = None,
    unsort: Mapping[ModuleSpec, Any] | None = None,
    batch_dim: Mapping[ModuleSpec, BatchDim] | None = None,
    stop: bool = False,
    clone: bool = True,
) -> Recorder:
    """Record what the selected submodules return during the model's own forward pass.

    Use it as a context manager around ordinary model calls; it yields a
    :class:`~hookscope.Recording` that fills during the block.  Every hook is removed when the
    block ends, however it ends.

    Parameters
    ----------
    model : nn.Module
        The model (``DataParallel``/``DistributedDataParallel``/``torch.compile`` wrappers are
        looked through: use the inner model's names).  A ``torch.compile``d model runs eagerly
        inside the block (``torch.compiler.set_stance("force_eager")``): a compiled graph does
        not see hooks added after it was compiled, and a recording must not silently miss them.
        ``nn.DataParallel`` over several GPUs runs replicas in threads: record the inner
        model, or use ``DistributedDataParallel`` (one process per GPU).
    modules : str, type, or list of them
        Exact dotted names from ``model.named_modules()``, glob patterns
        (``"encoder.layer.*.output"``; ``*`` is one name segment, ``**`` several), or module
        classes (``nn.LSTM``: every instance).  Selecting nothing is an error that lists the
        closest real names.
    inputs : bool
        Also record each call's positional and keyword inputs (``Capture.inputs`` /
        ``Capture.kwargs``), as the module received them (``unsort=`` is not applied to them).
    device : str or torch.device, optional
        Move captured tensors there (e.g. ``"cpu"`` to keep GPU memory free).
    dtype : torch.dtype, optional
        Cast captured floating-point tensors (integer tensors are left alone).
    pick : callable or {module: callable}, optional
        Keep only part of a structured output, e.g. ``lambda out: out[0]``.
    calls : {module: [label, ...]}, optional
        Labels for the calls of a module within one forward pass, e.g.
        ``{"encoder": ["premise", "hypothesis"]}``.  A module that runs a different number of
        times than it has labels is reported (``CallCountError`` when the block ends).
    unsort : {module: permutation or [permutation per call] or {label: permutation}}, optional
        Restore the original batch order of a batch the caller sorted by length: each leaf's
        batch dimension is indexed with the permutation (``captured = output[perm]``), and so
        are ``lengths``.  Validated: 1-D, integer, a permutation of ``range(batch)``.
    batch_dim : {module: int or {path prefix: dim or None}}, optional
        Where the batch dimension is, for ``unsort=``.  By default it is found per leaf: the
        only dimension with the batch size (RNN hidden states: dim 1; sequences padded from a
        ``PackedSequence``: dim 0); several candidates raise ``UnsortError`` instead of guessing.
    stop : bool
        End the forward pass right after the last selected module ran its last expected call
        (its number of ``calls=`` labels, else once): no compute is spent on the rest of the
        model.  The ``with`` block then ends at the model call (use :meth:`Recorder.run` to
        keep going in your own code).
    clone : bool
        ``True`` (default): a captured tensor that still shares memory with the model (no
        copy was made by padding, unsorting, moving or casting) is cloned, so a later in-place
        op (``nn.ReLU(inplace=True)``, ``x.add_()``) cannot change it.  The clone is
        copy-on-write (``torch._lazy_clone`` where PyTorch has it): no data are copied unless
        the model really writes to the tensor later, and then only that tensor is copied.
        ``False``: no copy; the tensor's version is remembered and reading a capture that was
        changed in place raises :class:`~hookscope.errors.CaptureModifiedError`.  Tensors made
        under
        ``torch.inference_mode()`` have no version counter and are always cloned.

    Returns
    -------
    Recorder
        A context manager (yielding a :class:`~hookscope.Recording`), reusable any number of
        times; ``Recorder.run(*args)`` records one call of the model.

    Examples
    --------
    >>> import torch, hookscope as hs
    >>> linear = torch.nn.Linear(2, 2, bias=False)
    >>> _ = linear.weight.data.copy_(-torch.eye(2))
    >>> model = torch.nn.Sequential(linear, torch.nn.ReLU(inplace=True))
    >>> with hs.record(model, ["0"]) as rec:
    ...     y = model(torch.ones(1, 2))
    >>> rec["0"].tensor  # what the Linear returned, before the in-place ReLU zeroed it
    tensor([[-1., -1.]])
    >>> y.detach()
    tensor([[0., 0.]])
    """
    return Recorder(model, modules, inputs=inputs, device=device, dtype=dtype, pick=pick,
                    calls=calls, unsort=unsort, batch_dim=batch_dim, stop=stop, clone=clone)
