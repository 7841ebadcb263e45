"""``record()``: forward hooks on, capture every call, hooks off.

The flow: selection (:mod:`~hookscope.select`) → an immutable plan per module
(:mod:`~hookscope.plan`) → hooks, whose per-block state lives in a
:class:`~hookscope.session.Session` →
the pure conversion step (:mod:`~hookscope.convert`) → a :class:`~hookscope.Recording`.

The hook is the hot path (it runs on every call of a selected module), so everything that can
be decided once is decided in :class:`Recorder.__init__` and kept in the plans.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .capture import Capture
from .convert import (
    CloneMode,
    convert,
    from_rnn_state,
    input_lengths,
    is_rnn_state,
    mask_argument,
    nested_lengths_or_mask,
    packed_input_layout,
    padding_mask,
    snapshot_tensor,
)
from .edit import CallInfo, apply_edit
from .errors import (
    CallCountError,
    HookscopeError,
    InputError,
    InputTypeError,
)
from .frame import rnn_state_error
from .grads import attach_grad_hooks, require_grads
from .hook_handles import Registration, add_hooks, remove_all
from .layout import (
    SEQUENCE_MODULES,
    capture_batch_dim,
    id_positions,
    id_times,
    known_dims,
    one_batch,
    sequence_output,
    swapped_shapes,
    time_major,
)
from .mask_scope import end_pass, scope_hooks, scope_modules, scoped_mask
from .offload import HostStaging
from .plan import BatchDim, Plan, build_plans, with_perms
from .recording import Recording
from .rerun import CheckpointNotes, checkpointed, graph_task, rerun
from .rows_at_call import rows_at_call
from .select import ModuleSpec, module_tree, resolve_modules, torchscript_error, unwrap
from .session import NO_SWAPS, Session, time_major_call, unfit_mask
from .short_path import make_short_hook, takes_short_path
from .stop import PENDING_STOPS, Stop, raise_pending_stop
from .structure import first_tensor, iter_tensors

__all__ = ["Recorder", "record"]

_get_ident = threading.get_ident

class _CallName:
    """``'encoder' call 1 ('hypothesis')``, the call an error message names: made into text
    only when a message is (a formatted string per call costs more than the rest of a
    simple hook)."""

    __slots__ = ("call", "label", "name")

    def __init__(self, name: str, call: int, label: str | None) -> None:
        self.name, self.call, self.label = name, call, label

    def __str__(self) -> str:
        return f"{self.name!r} call {self.call}" + (f" ({self.label!r})" if self.label else "")

    __format__ = object.__format__  # (format(x, "") is str(x))


class Recorder:
    """A reusable recorder: ``with recorder as rec`` registers the hooks, fills a fresh
    :class:`Recording`, and removes every hook on exit.  Made by :func:`record`.

    Parameters
    ----------
    model : nn.Module
        The model (``DataParallel``/``DistributedDataParallel``/``torch.compile`` wrappers are
        looked through: use the inner model's names, or the wrapper's — both work for
        selection and for ``rec[name]``).  Where anything was compiled with ``torch.compile``
        (the model, a submodule, ``model.compile()``), the block runs eagerly
        (``torch.compiler.set_stance("force_eager")``): a compiled graph does not see hooks
        added after it was compiled, and a recording must not silently miss them.
        TorchScript modules cannot be hooked: an error says so.
    modules : str, type, nn.Module, or list of them
        Exact dotted names from ``model.named_modules()``, glob patterns
        (``"encoder.layer.*.output"``; ``*`` is one name segment, ``**`` several; a pattern
        never selects the model itself, ``""``), module
        classes (``nn.LSTM``: every instance), or the submodules themselves
        (``model.encoder``; recorded under their names).  Selecting nothing is an error that
        lists the closest real names.
    inputs : bool
        Also record each call's positional and keyword inputs (``Capture.inputs`` /
        ``Capture.kwargs``), as the module received them (``unsort=`` is not applied to them).
    device : str or torch.device, optional
        Move captured tensors there (e.g. ``"cpu"`` to keep GPU memory free).  From a CUDA
        device to ``"cpu"`` the copies are asynchronous, into pinned buffers this recorder
        reuses once their captures are released; the block waits for them once, when it ends
        or on the first read of a capture inside it (see :mod:`hookscope.offload`).
    dtype : torch.dtype, optional
        Cast captured floating-point tensors (integer tensors are left alone).
    pick : callable or dict of {module: callable}, optional
        Keep only part of a structured output, e.g. ``lambda out: out[0]``.  A small view of a
        large tensor (``lambda out: out[:, 0]``) is stored compactly.
    calls : dict of {module: [label, ...]}, optional
        Labels for the calls of a module within one forward pass, e.g.
        ``{"encoder": ["premise", "hypothesis"]}``.  A module that runs a different number of
        times than it has labels is reported (``CallCountError`` when the block ends).
    unsort : dict of {module: permutation, [permutation per call] or {label: permutation}}, optional
        Restore the original batch order of a batch the caller sorted by length: each leaf's
        batch dimension is indexed with the permutation (``captured = output[perm]``), and so
        are ``lengths``.  Validated: 1-D, integer, a permutation of ``range(batch)``, of the
        batch size of every leaf it is applied to (else :class:`~hookscope.errors.UnsortError`).
    batch_dim : dict of {module: int or {path prefix: dim or None}}, optional
        Where the batch dimension is, for ``unsort=`` and, for the primary tensor, for
        exports (:attr:`Capture.batch_dim`).  By default: dim 0 (sequences padded from a
        ``PackedSequence`` too), an RNN's output by its ``batch_first`` and its hidden states
        dim 1, the output of ``nn.MultiheadAttention`` and the ``nn.Transformer*`` modules by
        their ``batch_first``.  Another dimension of the permutation's length is never taken
        unasked (it may be a feature or time dimension that happens to match a permutation of
        another batch), nor are several: both raise ``UnsortError``, which says how to name it
        here.  A module of your own that returns ``(time, batch, ...)`` needs ``{name: 1}``
        for its captures to export one row per example.
    stop : bool
        End the forward pass right after the last selected module ran its last expected call:
        once, or as many times as it has ``calls=`` labels (a module called in a loop: give a
        label per call you need).  No compute is spent on the rest of the model.  The
        ``with`` block then ends at the model call (use :meth:`Recorder.run` to keep going in
        your own code).  Nested recorders on the same module all record before it stops.
    clone : True, "lazy" or False
        ``True`` (default): every captured tensor that still shares memory with the model is
        copied, so a later in-place op (``nn.ReLU(inplace=True)``, ``x.add_()``,
        ``x.resize_()``) cannot change it; a small view of a large tensor is copied compactly;
        nested, sparse and NumPy-backed tensors are copied too.  ``"lazy"``: copy-on-write
        (``torch._lazy_clone``) for dense tensors that PyTorch allocated (no bytes copied
        unless the model writes to the tensor later), an eager copy for the rest — saves
        memory when recording with autograd on, but a later ``resize_()`` of the module's
        output to a larger size then fails inside PyTorch.  ``False``: no copy; the tensor's
        version is remembered and reading a capture (``.tensor``, ``.output``, ``.inputs``,
        ``save``) that was changed in place raises
        :class:`~hookscope.errors.CaptureModifiedError`.  Tensors made under
        ``torch.inference_mode()`` have no version counter and are always copied.
    threads : {"own", "all"}
        ``"own"`` (default): record only the forward passes run by the thread that entered the
        block; a server's other threads calling the same model are neither recorded nor
        disturbed.  ``"all"``: record every thread's calls (their order then depends on
        scheduling; ``nn.DataParallel`` over several GPUs runs replicas in threads).
    mask_from : str, callable or None
        Where the model call's ``(batch, time)`` padding mask is, True (or 1) at real tokens:
        the keyword ``"attention_mask"`` by default (the Hugging Face convention; integer,
        boolean or 0/1 float), or that key of a dict passed positionally
        (``model(features)`` in sentence-transformers).  Captures whose leading dims are
        ``(batch, time)`` then know their ``mask``, so reductions and long frames leave
        padding out with no extra code.
        A callable ``(args, kwargs) -> mask`` reads any other convention, e.g. PyTorch's
        ``src_key_padding_mask``, which is True at *padding*:
        ``mask_from=lambda args, kwargs: ~kwargs["src_key_padding_mask"]``.  ``None`` turns
        this off.
    edit : dict of {module: function, [function per call] or {label: function}}, optional
        Change what a module returns: ``fn(output, call) -> new output`` (or ``fn(output)``),
        where ``call`` is a :class:`~hookscope.edit.CallInfo` (``name``, ``step``, ``call``,
        ``label``); the model continues with what it returns (``None`` is an error: return
        the output itself to leave it unchanged).  The function sees the output **in the
        caller's batch order** where ``unsort=`` is given, and what it returns is put back in
        the model's order.  :func:`hookscope.at` edits one part of a structured output.  What
        it returns must keep the output's shapes, dtypes and devices (checked).  A second
        parameter with a default keeps its default (``fn(out, scale=0.5)`` gets no call).
        Edited modules are recorded too, holding the value *after* the edit (what the model
        continued with).  The edit runs before every other forward hook on the module, so
        other observers (an outer recorder, transformers' ``output_hidden_states``) see the
        edited value as well.
    grads : bool
        Keep the gradient of the loss with respect to each recorded output
        (:attr:`Capture.grad`, :attr:`Capture.grad_output`), per call, converted like the
        value (padded, unsorted, moved, cast).  Call ``backward()`` inside the block or after
        it while the graph is alive; repeated ``backward()`` calls add up, as ``.grad`` does.
        Outputs that do not require grad (a frozen model) are made to, without changing any
        value or the model's own gradients; under ``torch.no_grad()`` there is no graph and
        ``Capture.grad`` stays ``None`` (a warning says so).

    """

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
        clone: CloneMode = True,
        threads: str = "own",
        mask_from: str | Callable[[tuple, dict], Any] | None = "attention_mask",
        edit: Mapping[ModuleSpec, Any] | None = None,
        grads: bool = False,
    ) -> None:
        _check_scriptable(model)
        if edit:  # an edited module is recorded too (with the edited value)
            if not isinstance(edit, Mapping):
                raise InputTypeError("edit= must map modules to functions, e.g. "
                                     f"edit={{'encoder': fn}}; got {type(edit).__name__}.")
            listed = [modules] if isinstance(modules, str | type | nn.Module) else list(modules)
            modules = [*listed, *_edited_elsewhere(model, listed, edit)]
        selected = resolve_modules(model, modules)
        for name, m in selected.items():
            _check_scriptable(m, name)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise InputTypeError(f"dtype= must be a floating torch.dtype such as torch.float16; "
                            f"got {dtype!r}. (Integer tensors are never cast.)")
        if clone not in (True, False, "lazy"):
            raise InputError(f"clone= must be True, False or 'lazy'; got {clone!r}.")
        if threads not in ("own", "all"):
            raise InputError(f"threads= must be 'own' (the thread that enters the block) or "
                             f"'all'; got {threads!r}.")
        if mask_from is not None and not (isinstance(mask_from, str) or callable(mask_from)):
            raise InputTypeError(f"mask_from= must be a keyword name such as 'attention_mask', a "
                            f"callable (args, kwargs) -> mask, or None; got {mask_from!r}.")
        if device is not None:
            device = _check_device(device)
        if not isinstance(grads, bool):
            raise InputTypeError(f"grads= must be True or False; got {grads!r}.")
        self.model = model
        self.inputs = inputs
        self.stop = stop
        self.threads = threads
        self.mask_from = mask_from
        self._id_positions: dict[type, tuple[int, ...]] = {}  # model class -> ids arguments
        self._selected = selected
        # device="cpu": captures of CUDA tensors are copied asynchronously into pinned buffers
        # that this recorder reuses (and with_unsort's copies share); see offload.py.
        self._staging = HostStaging() if device is not None and device.type == "cpu" else None
        self._options = {"pick": pick, "calls": calls, "batch_dim": batch_dim, "clone": clone,
                         "device": device, "dtype": dtype, "staging": self._staging,
                         "edit": edit, "grads": grads}
        # One walk of the model for everything below (a walk of BERT-base costs about 50 µs;
        # model.modules() four times cost 1 ms per block).
        tree = module_tree(model)
        # Every RNN of the model: the (h, c) it returns are known as states by identity in
        # every capture of the pass (a wrapper's output, a Dropout or Identity they pass
        # through), whatever is selected; found once here, not per batch.
        sequences = [m for m, _ in tree if isinstance(m, SEQUENCE_MODULES)]  # (one test each)
        self._rnns = tuple(m for m in sequences if isinstance(m, nn.RNNBase))
        self._plans = build_plans(model, selected, unsort=unsort, any_rnn=bool(self._rnns),
                                  **self._options)
        inner, prefix = unwrap(model)
        self._model_type = type(inner).__name__
        self._prefix = prefix
        self._names = list(self._plans)
        # And every module built time-major (an RNN, attention or transformer module with
        # batch_first=False): its output sequence is known wherever it is passed on.
        self._sequence_modules = tuple(m for m in sequences
                                       if time_major(m) and not isinstance(m, nn.RNNBase))
        # Where the model call's padding mask goes (see mask_scope.py): the modules that may
        # open a scope for it.
        self._scopes = (scope_modules(model, selected.values(), tree)
                        if isinstance(mask_from, str) else ())
        # Stream entries that an earlier forward pass showed to be another stream than the
        # one the mask was handed to (shared with with_unsort's copies).
        self._other_streams: set[int] = set()
        self._rows_redo = False
        self._module_types = {n: p.module_type for n, p in self._plans.items()}
        self._make_hooks()
        # Hooks added after torch.compile are not seen by the compiled graph (dynamo skips
        # hook guards), which would give an empty recording: run eagerly inside the block.
        self._wrapped_compiled = "_orig_mod." in prefix
        self._session: Session | None = None

    @property
    def device(self) -> torch.device | None:
        return self._options["device"]

    @property
    def dtype(self) -> torch.dtype | None:
        return self._options["dtype"]

    @property
    def clone(self) -> CloneMode:
        return self._options["clone"]

    def with_unsort(self, unsort: Mapping[ModuleSpec, Any] | None) -> Recorder:
        """The same recorder for a batch with another order: a new :class:`Recorder` with
        these ``unsort=`` permutations (validated) and every other option kept.

        ``record_dataset`` uses it once per batch; ``run(..., unsort=...)`` is the shortcut.
        """
        new = object.__new__(Recorder)
        new.__dict__.update(self.__dict__)
        new._plans = with_perms(self._plans, self.model, self._selected, unsort)
        new._make_hooks()
        new._session = None
        return new

    def _make_hooks(self) -> None:
        """The hook functions of these plans, made once: entering only registers them."""
        plans = self._plans.values()
        # What entering registers, in order: (module, pre-hook?, hook, with_kwargs, prepend)
        # (hook_handles.add_hooks).  First the step hook, on the model.
        hooks: list[Registration] = [(self.model, True, self._new_step, True, False)]
        # The model's RNNs: their (h, c) are recognised by identity wherever they reappear
        # (for unsort=, for exports one row per example, and so that a final state is not
        # given the input's lengths).
        hooks += [(rnn, False, self._make_state_hook(time_major(rnn)), False, False)
                  for rnn in self._rnns]
        hooks += [(m, False, self._make_sequence_hook(), False, False)
                  for m in self._sequence_modules]
        for p in plans:
            if self.inputs:
                hooks.append((p.module, True, self._make_pre_hook(p), True, False))
            # An edit goes first: every other hook on the module (an outer recorder,
            # transformers' output_hidden_states) sees what the model continues with.
            hook = (make_short_hook(self, p) if takes_short_path(self, p)
                    else self._make_hook(p))
            hooks.append((p.module, False, hook, True, p.edits is not None))
        self._registrations = hooks
        # The mask scopes' hooks, added at the block's first forward pass with a mask.
        pre, post = scope_hooks(self._own, self.mask_from)
        self._scope_registrations: list[Registration] = [
            r for m in self._scopes for r in ((m, True, pre, True, False),
                                              (m, False, post, False, False))]
        # Modules given a number of calls per forward pass (calls=, unsort= or edit= per
        # call): (name, expected calls, what was given), checked as each step ends.
        self._expected_calls = []
        for p in plans:
            if p.labels is not None:
                self._expected_calls.append((p.name, len(p.labels), "labels"))
            elif isinstance(p.perms, tuple):
                self._expected_calls.append((p.name, len(p.perms), "unsort permutations"))
            elif isinstance(p.edits, tuple):
                self._expected_calls.append((p.name, len(p.edits),
                                             "edit functions (or patches)"))

    # -- entering and leaving ---------------------------------------------------------------
    def __enter__(self) -> Recording:
        if self._session is not None:
            raise HookscopeError("This recorder is already active; nest a new record() instead.")
        rec = Recording(self._names, self._module_types, self._model_type, prefix=self._prefix)
        s = Session(rec, len(self._plans), _get_ident() if self.threads == "own" else None)
        try:
            if self._needs_eager():
                s.stance = torch.compiler.set_stance("force_eager")
                s.stance.__enter__()
            add_hooks(s.handles, self._registrations)
            self._session = s
        except BaseException:
            _close(s)
            raise
        return rec

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        s, self._session = self._session, None  # the hooks are inert from here on
        if s is not None:
            _close(s)
            self._end_mask_scopes(s)
        if self._staging is not None:
            self._staging.synchronize()  # the one wait for copies in flight: captures complete
        PENDING_STOPS.pop(_get_ident(), None) if exc is not None else None
        stopped = False
        if isinstance(exc, Stop) and self in exc.recorders:
            exc.recorders.discard(self)
            stopped = not exc.recorders  # the outermost stopping recorder swallows it
            if not stopped:
                return False
        if s is not None and (exc is None or isinstance(exc, Stop)):
            self._check_counts(s)  # nothing else went wrong: report label/call mismatches
            unreached = 0 if s.checkpoint is None else s.checkpoint.unreached()
            if unreached:
                warnings.warn(
                    f"{unreached} call(s) with edit= or grads=True ran inside activation "
                    "checkpointing (torch.utils.checkpoint, gradient_checkpointing_enable()), "
                    "and no backward() reached them in this block. A backward() after the "
                    "block re-runs those modules without hookscope: an edit is not applied "
                    "again (the gradients would not be those of the edited forward), and with "
                    "reentrant checkpointing no gradient reaches the captures. Call backward() "
                    "inside the block.", stacklevel=2)
        return stopped

    def run(self, *args: Any, unsort: Mapping[ModuleSpec, Any] | None = None,
            **kwargs: Any) -> Recording:
        """Call the model once inside this recorder and return the recording.

        Convenient with ``stop=True`` (nothing after the stop is skipped in your own code) and
        in loops: the modules are resolved once, only hooks are added and removed per call.
        ``unsort=`` gives this call's own permutations (see :meth:`with_unsort`).
        """
        recorder = self if unsort is None else self.with_unsort(unsort)
        with recorder as rec:
            self.model(*args, **kwargs)
        return rec

    def _needs_eager(self) -> bool:
        """Whether a compiled graph could hide the hooks: the model is wrapped by
        ``torch.compile``, or the compiler is loaded at all (a compiled submodule,
        ``model.compile()``, a compiled function that calls the model).

        Forcing eager mode costs about 20 µs per block.  Asking whether any submodule was
        compiled walked every module instead: 0.4 ms per block on BERT-base, paid by everyone
        whose process imported the compiler (``transformers`` does)."""
        return self._wrapped_compiled or ("torch._dynamo" in sys.modules and _HAS_STANCE)

    # -- hooks ------------------------------------------------------------------------------
    def _own(self) -> Session | None:
        s = self._session
        if s is None or (s.thread is not None and s.thread != _get_ident()) or (
                graph_task() != -1):  # (a re-run in backward: no step, no call, no scope)
            return None
        return s

    def _new_step(self, module: nn.Module, args: Any, *rest: Any) -> None:
        s = self._own()
        if s is None:
            return
        if s.counts and self._expected_calls:
            self._tally_calls(s)
        if s.mask_outside or s.mask_handed or s.mask_stack or s.entries or s.scope_outputs:
            self._end_mask_scopes(s)
        s.rec.steps += 1
        s.counts.clear()
        s.remaining = len(self._plans)
        s.pending_inputs.clear()
        s.rnn_states.clear()
        s.time_major = []
        s.mask = s.mask_raw = None
        s.model_inputs = []
        kwargs = rest[0] if rest else None
        features = (args[0] if args and type(args[0]) is not Tensor
                    and isinstance(args[0], Mapping) else None)  # (sentence-transformers)
        at = self._id_positions.get(type(module)) if args else ()
        if at is None:  # (read once per model class: which argument is input_ids)
            at = self._id_positions[type(module)] = id_positions(module.forward)
        ids = [args[i] for i in at if i < len(args)] if at else None
        s.one_batch, s.swaps, s.id_times = True, NO_SWAPS, NO_SWAPS
        mask_from = self.mask_from
        find = mask_from is not None  # (the mask first: the layout is read once, with it)
        if find and type(mask_from) is str and not (kwargs and mask_from in kwargs):
            for a in args:  # a features dict passed positionally (sentence-transformers)
                if type(a) is not Tensor and isinstance(a, Mapping):
                    break
            else:  # the common case: no mask in this call (but maybe a decoder's)
                find = False
        mask = s.mask = padding_mask(mask_from, args, kwargs or {}) if find else None
        if kwargs or features or ids or mask is not None:
            if kwargs or features or ids:
                s.id_times = id_times(kwargs, features, ids)
            # (a call whose tensors disagree on the batch runs several streams: no layout)
            s.one_batch = one_batch(args, kwargs, features)
            if s.one_batch:
                s.swaps = swapped_shapes(kwargs, mask, features, ids)
        if not find:
            if (mask_from is not None and type(mask_from) is str and kwargs and self._scopes
                    and any(type(k) is str and k.endswith(mask_from) for k in kwargs)):
                self._scope_step(s, args, kwargs)  # (a decoder's mask)
            return
        if type(mask_from) is str:  # (the very object, to know it where it is passed on)
            s.mask_raw = mask_argument(mask_from, args, kwargs)
            if s.mask_raw is not None and self._scopes:
                self._scope_step(s, args, kwargs)

    def _scope_step(self, s: Session, args: tuple, kwargs: dict | None) -> None:
        """A model call with a mask (or a decoder's): note its input tensors, and hook the
        modules that may open a scope (mask_scope.py) at the block's first such call, before
        its children run (a model called without a mask pays nothing)."""
        given = [*args, *(kwargs.values() if kwargs else ())]
        given += [v for a in given if type(a) is not Tensor and isinstance(a, Mapping)
                  for v in a.values()]
        s.model_inputs = [t for t in given if type(t) is Tensor and t is not s.mask_raw]
        if not s.scopes_on:
            s.scopes_on = True
            add_hooks(s.handles, self._scope_registrations)

    def _end_mask_scopes(self, s: Session) -> None:
        """The end of a forward pass (see :func:`~hookscope.mask_scope.end_pass`)."""
        others = end_pass(s)
        if others:
            self._other_streams |= others
            # record_dataset: rows reduced with the model's mask in an entry not known to be
            # another stream yet are redone (the recorder knows it now).
            self._rows_redo = self._rows_redo or bool(s.rows_guessed & others)
        s.rows_guessed = set()

    def _make_hook(self, plan: Plan) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple, *rest: Any) -> Any:
            # (kwargs, output) with kwargs; (output,) in the instant of a registration that
            # another thread's forward sees half-done: never break that forward.
            s = self._session
            new = None  # what the model continues with, if an edit (or grads=) changed it
            if s is not None:
                if graph_task() != -1:  # (any thread: a GPU's backward runs on its own)
                    if plan.edits is not None or plan.grads:
                        new = rerun(s, plan, rest[-1], _CallName, self._require_grads)
                elif s.thread is None or s.thread == _get_ident():
                    kwargs, output = rest if len(rest) == 2 else ({}, rest[0])
                    new = self._record_call(s, plan, args, kwargs, output)
            if PENDING_STOPS:
                raise_pending_stop(module, hook)
            return new

        hook._hookscope = True  # type: ignore[attr-defined]
        return hook

    def _make_pre_hook(self, plan: Plan) -> Callable[..., None]:
        def pre_hook(module: nn.Module, args: tuple, *rest: Any) -> None:
            s = self._own()
            if s is None:
                return
            kwargs = rest[0] if rest else {}
            where = f"{plan.name!r} inputs"
            converted = convert((args, kwargs), plan, where=where)
            s.pending_inputs.setdefault(plan.name, []).append(
                (converted.value, converted.versions))

        return pre_hook

    def _make_state_hook(self, time_major: bool) -> Callable[..., None]:
        def state_hook(module: nn.Module, args: tuple, output: Any) -> None:
            s = self._own()
            if s is not None and type(output) is tuple and len(output) == 2:
                s.rnn_states.add_state(output[1])  # h, or (h, c)
                if time_major and type(output[0]) is Tensor and output[0].ndim == 3:
                    s.time_major.append(output[0])  # (not a PackedSequence: batch-first)

        return state_hook

    def _make_sequence_hook(self) -> Callable[..., None]:
        def sequence_hook(module: nn.Module, args: tuple, output: Any) -> None:
            s = self._own()
            if s is not None:
                seq = sequence_output(output)
                if seq is not None and seq.ndim == 3:
                    s.time_major.append(seq)

        return sequence_hook

    def _record_call(self, s: Session, plan: Plan, args: tuple, kwargs: dict,
                     output: Any) -> Any:
        rec = s.rec
        if rec.steps == 0:  # a module called without the model's own forward (model.encode)
            rec.steps = 1
        name = plan.name
        counts = s.counts
        call = counts.get(name, 0)
        counts[name] = call + 1
        labels = plan.labels
        label = labels[call] if labels is not None and call < len(labels) else None
        live: tuple[str, ...] = ()
        perm = lengths = mask = versions = grads = returned = in_flight = rows = other = None
        rnn_state = False
        if plan.plain and type(output) is Tensor:  # the common case, without the tree walk
            raw = primary = output  # (the model's own tensor: an RNN state is known by its memory)
            rnn_state = bool(s.rnn_states.tensors) and is_rnn_state(plan, raw, s.rnn_states)
            value = output.detach()
            if plan.clone is True:
                value = value.clone()
            else:
                value, version = snapshot_tensor(value, plan.clone)
                versions = None if version is None else [version]
        else:
            perm = plan.perm(call) if plan.perms is not None else None
            where = _CallName(name, call, label)  # (made into text only for an error)
            dims = None
            edit = plan.edit(call) if plan.edits is not None else None
            # (backward() will run it again: its re-run needs this call: rerun.py)
            again = (plan.edits is not None or plan.grads) and checkpointed()
            if edit is not None:
                info = CallInfo(name, rec.steps - 1, call, label)
                output, dims = apply_edit(edit, output, plan, info, perm, s.rnn_states, where)
                returned = output
                if plan.pick is not None:
                    dims = None  # the dims are of the whole output, not of the picked part
            if plan.grads:
                returned = self._require_grads(s, output, returned, where, again)
                output = output if returned is None else returned
            if again:
                if s.checkpoint is None:
                    s.checkpoint = CheckpointNotes()
                s.checkpoint.note((name, rec.steps - 1, call), output,
                                  torch.is_grad_enabled())
            value = raw = plan.pick(output) if plan.pick is not None else output
            primary = first_tensor(raw)
            rnn_state = bool(plan.rnn or s.rnn_states.tensors) and is_rnn_state(
                plan, primary, s.rnn_states, output)
            if rnn_state and plan.rows is not None:  # record_dataset: rows along dim 0
                raise rnn_state_error(f"the output of {where}", tuple(primary.shape))
            if rnn_state and plan.rnn and perm is not None and dims is None:
                # An RNN's own state, picked: its batch is dim 1.  (In a wrapper's output each
                # tensor is decided on its own in convert: an output beside h_n is batch-first.)
                dims = {path: 1 for path, _ in iter_tensors(raw)}
            elif (perm is not None and (s.swaps or s.mask is not None or s.mask_stack
                                        or s.scope_outputs) and dims is None
                  and plan.batch_dim == "auto" and plan.seq_dim is None and primary is not None
                  and time_major_call(s, args, primary, perm.shape[0])):
                dims = {path: 1 for path, x in iter_tensors(raw)
                        if time_major_call(s, args, x, perm.shape[0])}
            elif perm is not None and dims is None and plan.batch_dim == "auto" and (
                    s.time_major or (plan.seq_dim == 1 and plan.pick is not None)
                    or (primary is not None and primary.ndim == 3
                        and primary.shape[0] != perm.shape[0])):
                # Time-major leaves that their paths do not tell (see known_dims; a packed
                # input's lengths can tell only a primary whose dim 0 is not the batch).
                dims = known_dims(plan, output, raw, s.time_major,
                                  packed_input_layout(args, kwargs, primary))
            rows = (None if plan.rows is None else
                    rows_at_call(s, plan, args, kwargs, value, perm, call, label, where,
                                 self._other_streams))
            if rows is not None:  # record_dataset: one row per example, nothing else kept
                leaf = () if type(value) is Tensor else next(
                    (p for p, _ in iter_tensors(value, packed=True)), ())
                value = rows
            else:
                converted = convert(value, plan, perm=perm, where=where,
                                    rnn_states=s.rnn_states, dims=dims)
                if plan.grads:
                    grads = attach_grad_hooks(value, output, plan, perm, converted.dims, where)
                value, lengths, versions = converted.value, converted.lengths, converted.versions
                if plan.staging is not None:  # device="cpu": copies of this call's (and its
                    in_flight = plan.staging.in_flight()  # inputs') tensors may be in flight
                live = tuple(converted.live)
        bidirectional = feature_map = last = False
        entry = None
        batch_dim = 0
        if rows is None:  # (rows know no lengths or mask: they were used)
            t = value if type(value) is Tensor else first_tensor(value)  # the primary, as stored
            layout = None
            if lengths is None and (args or kwargs) and not from_rnn_state(
                    plan, primary, s.rnn_states):
                lengths, layout = input_lengths(args, kwargs, perm, name, t)
            if (rnn_state or layout == "time" or s.time_major or plan.seq_dim == 1
                    or plan.batch_dim != "auto"):  # (else dim 0, without a call)
                batch_dim = capture_batch_dim(plan, output, raw, primary, rnn_state, layout,
                                              s.time_major)
            if ((s.swaps or s.mask is not None or s.mask_stack or s.scope_outputs)
                    and batch_dim == 0 and plan.batch_dim == "auto"
                    and not rnn_state and t is not None and not plan.map_1d
                    and plan.seq_dim is None
                    and time_major_call(s, args, t, None if perm is None else perm.shape[0])):
                batch_dim = 1  # (time, batch, features), as the pass tells it (layout.swapped)
            # The module's own (batch, channels, length) (not a new tensor that pick= made):
            feature_map = (plan.map_1d and t is not None and t.ndim == 3
                           and primary is sequence_output(output))
            last = (plan.map_last and t is not None and t.ndim >= 4
                    and primary is sequence_output(output))
            model_mask, entry = (scoped_mask(s, args) if s.mask_stack or s.scope_outputs
                                 else (s.mask, None))  # (the scope's mask: mask_scope.py)
            if lengths is None and not feature_map and (
                    model_mask is not None or type(value) is not Tensor or value.is_nested):
                tb = t.movedim(batch_dim, 0) if batch_dim else t
                lengths, mask = nested_lengths_or_mask(tb, model_mask, perm)  # ((batch, time))
                if (lengths is None and mask is None and model_mask is not None
                        and tb is not None and not tb.is_nested):
                    other = unfit_mask(s, tb.shape, model_mask)  # (real positions unknown)
            if plan.bidir_units is not None:
                bidirectional = (t is not None and t.ndim > 1
                                 and t.shape[-1] == plan.bidir_units)
        inputs = kwargs_in = None
        if self.inputs:
            pending = s.pending_inputs.get(name)
            if pending:
                (inputs, kwargs_in), in_versions = pending.pop()
                if in_versions:
                    versions = [*(versions or []), *in_versions]
        capture = Capture(name, rec.steps - 1, call, label, plan.module_type, value, inputs,
                          kwargs_in, lengths, versions, mask, live, bidirectional,
                          rnn_state, batch_dim, feature_map, last)  # positional:
        # keywords cost half a microsecond per capture here
        if (mask is not None or other is not None) and entry is not None:
            s.mask_outside.append((entry, capture))  # (decided as the pass ends)
        if other is not None:
            capture._other_mask = other
        if grads is not None:
            capture._grads = grads
        if in_flight is not None:
            capture._pending = in_flight  # device="cpu": a read inside the block waits for it
        if rows is not None and leaf:
            capture._leaf = leaf  # (the rows' tensor in the output: frame.primary_path)
        rec._add(capture)
        if self.stop and call + 1 == plan.expected:
            s.remaining -= 1
            if s.remaining == 0:
                PENDING_STOPS.setdefault(_get_ident(), set()).add(self)
        return returned

    def _reduce_at_call(self, rows: Callable[[Capture, Tensor | None], tuple[Tensor, bool]]
                        ) -> None:
        """Reduce every call to one row per example in its hook (``record_dataset``): nothing
        of the output is copied but the rows (see :func:`~hookscope.rows_at_call.rows_at_call`)."""
        self._options["rows"] = rows
        self._plans = {n: dataclasses.replace(p, rows=rows, plain=False)
                       for n, p in self._plans.items()}
        self._make_hooks()

    @staticmethod
    def _require_grads(s: Session, output: Any, returned: Any, where: str,
                       again: bool = False) -> Any:
        """``grads=True``: the output made to require grad where it did not (``None`` if
        nothing changed and no edit did); a warning, once per block, without a graph (but
        not where backward() runs the call ``again`` with one: reentrant checkpointing)."""
        if not torch.is_grad_enabled():
            if again:
                return returned
            if not s.no_grad_warned:
                s.no_grad_warned = True
                warnings.warn(f"grads=True, but {where} ran without autograd (torch.no_grad() "
                              "or inference_mode): no gradient will reach its capture "
                              "(Capture.grad stays None).", stacklevel=4)
            return returned
        new = require_grads(output)
        if new is output:
            return returned
        if s.rnn_states.tensors:  # an inner RNN's (h, c), now copies: still known as states
            for (_, old), (_, copy) in zip(iter_tensors(output), iter_tensors(new),
                                           strict=True):
                if copy is not old and old in s.rnn_states:
                    s.rnn_states.add(copy)
        return new

    def _tally_calls(self, s: Session) -> None:
        """Note where the step that ends ran a module another number of times than it was
        given labels (or permutations, or edits) for."""
        counts, step = s.counts, s.rec.steps - 1
        for name, n_expected, given in self._expected_calls:
            n = counts.get(name, 0)
            if n and n != n_expected:
                s.count_problems.append(f"{name!r} ran {n} time(s) in step {step}, but "
                                        f"{n_expected} {given} were given")

    def _check_counts(self, s: Session) -> None:
        if s.counts and self._expected_calls:
            self._tally_calls(s)  # the last step
        if s.count_problems:
            raise CallCountError(
                "calls= / unsort= / edit= disagree with what ran: "
                + "; ".join(s.count_problems) + ". The recording is complete "
                "(rec.calls(name) lists every call); give one per call of the module in a "
                "forward pass.")


# torch.compiler.set_stance is PyTorch 2.6+; setup.cfg allows 2.1: without it, a loaded
# compiler alone does not make a block force eager mode (nothing to force it with).
_HAS_STANCE = hasattr(torch.compiler, "set_stance")


def _edited_elsewhere(model: nn.Module, listed: list, edit: Mapping) -> list:
    """The ``edit=`` keys that name modules not already listed for recording (a module
    listed under another of its names is not: it would be selected twice)."""
    keys = [k for k in edit if k not in listed]
    if not keys or not listed:
        return keys
    try:
        chosen = {id(m) for m in resolve_modules(model, listed).values()}
    except HookscopeError:
        return keys  # (the selection's own error comes next, from resolve_modules)
    out = []
    for k in keys:
        try:
            mods = resolve_modules(model, k).values()
        except HookscopeError:
            out.append(k)  # (reported with the selection)
            continue
        if not all(id(m) in chosen for m in mods):
            out.append(k)
    return out


def _close(s: Session) -> None:
    """Remove every hook and leave the compile stance, whatever arrives meanwhile (a Ctrl-C
    in the middle must not leave hooks behind: it is re-raised once all are gone)."""
    interrupted: BaseException | None = None
    handles = s.handles
    while handles or s.stance is not None:
        try:
            remove_all(handles)  # idempotent: safe to repeat after an interruption
            if s.stance is not None:
                stance = s.stance
                stance.__exit__(None, None, None)
                s.stance = None
        except BaseException as exc:  # finish the removal, then re-raise
            interrupted = interrupted or exc
            if s.stance is not None and not handles and not isinstance(exc, KeyboardInterrupt):
                s.stance = None  # a failing stance exit must not loop forever
    if interrupted is not None:
        raise interrupted


def _check_scriptable(model: Any, name: str | None = None) -> None:
    if isinstance(model, torch.jit.ScriptModule):
        raise torchscript_error("The model is a" if name is None else f"Module {name!r} is a",
                                model)
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"record() needs an nn.Module, got {type(model).__name__}.")


def _check_device(device: torch.device | str) -> torch.device:
    """``device=`` checked when recording starts, not in the middle of the forward pass."""
    try:
        device = torch.device(device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, TypeError, ValueError) as exc:
        raise InputError(f"device={device!r} cannot hold tensors here ({exc}). Use a device "
                         "this PyTorch has, e.g. 'cpu'.") from None
    return device


def record(model: nn.Module, modules: ModuleSpec | Iterable[ModuleSpec],
           **options: Any) -> Recorder:
    """Record what the selected submodules return during the model's own forward pass.

    Use it as a context manager around ordinary model calls; it yields a
    :class:`~hookscope.Recording` that fills during the block.  Every hook is removed when the
    block ends, however it ends (an exception, ``stop=True``, even a Ctrl-C during removal).

    Parameters
    ----------
    model : nn.Module
        The model; see :class:`Recorder` for wrappers, compiled and scripted models.
    modules : str, type, nn.Module, or list of them
        What to record: exact dotted names, glob patterns, module classes, or submodules
        (``model.encoder``).
    **options
        Every option of :class:`Recorder` (``inputs``, ``device``, ``dtype``, ``pick``,
        ``calls``, ``unsort``, ``batch_dim``, ``stop``, ``clone``, ``threads``,
        ``mask_from``, ``edit``, ``grads``), documented there.

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
    return Recorder(model, modules, **options)


# The options are declared once, on Recorder; record() shows them (help(), Jupyter, IDEs that
# read __signature__) as its own.
record.__signature__ = inspect.signature(Recorder).replace(  # type: ignore[attr-defined]
    return_annotation=Recorder)
