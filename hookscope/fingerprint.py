"""Fingerprints of what determines a recorded dataset's values.

A resumed :func:`hookscope.record_dataset` run appends to a dataset only if its fingerprint
matches.  The fingerprint is a SHA-256 over

- the model: its class, every module's class and ``training`` flag, and the name, dtype, shape
  and *bytes* of every parameter and buffer (persistent or not);
- the module selection and every option;
- every callable option (``forward=``, ``meta=``, ``lengths=``, ``unsort=``, a callable
  ``reduce=`` or ``pick=``) by what it computes: its bytecode, constants, names, defaults and
  the values of its closure cells, recursively, the plain values it reads from its globals,
  and the state of a callable object or bound method's instance.

A value that cannot be fingerprinted (an open file, a socket, an object without inspectable
state) in a callable's closure or defaults is an error that says so; pass ``setup_id=`` to
vouch for the callables yourself instead.  Bytecode differs between Python versions, so a run
resumed under another Python version starts a new fingerprint (and is refused).
"""

from __future__ import annotations

import enum
import functools
import hashlib
import json
import os
import types
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from .errors import DatasetError

__all__ = ["model_digest", "setup_fingerprint", "start_model_digest", "start_setup_fingerprint"]

_MAX_DEPTH = 24  # nesting of values inside one option
_GLOBAL_DEPTH = 2  # how far functions reached through globals are followed by code


class _UnfingerprintableError(Exception):
    def __init__(self, where: str, value: Any) -> None:
        super().__init__(where)
        self.where, self.value = where, value


def _name(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', repr(obj))}"


def _tensor_digest(t: torch.Tensor) -> str:
    t = t.detach()
    if t.is_sparse:
        t = t.to_dense()
    t = t.cpu().contiguous().reshape(-1)
    raw = t.view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
    return hashlib.sha256(memoryview(raw.numpy())).hexdigest()


def model_digest(model: torch.nn.Module) -> str:
    """SHA-256 of a model's classes, training flags, and parameter and buffer bytes."""
    return start_model_digest(model, background=False)()


_BACKGROUND_BYTES = 16 << 20  # below this the parameters are hashed at once (a few ms)


def start_model_digest(model: torch.nn.Module, background: bool = True) -> Callable[[], str]:
    """Begin :func:`model_digest`; the returned function waits for it and returns it.

    With ``background``, a large model's dense parameters are hashed on a background thread
    (copied off a GPU on a side stream), so that the hashing overlaps the forward passes that
    follow: a fixed cost of about 0.15-0.2 s per run on BERT-base.  Everything a forward pass
    may change is hashed before this returns: the modules' ``training`` flags and every buffer
    (running statistics, caches).  A forward pass does not write parameters (``record_dataset``
    runs under ``torch.no_grad()``), so the digest is the one :func:`model_digest` gives now.
    Tensors of another kind (sparse, quantized, a subclass, not contiguous) are hashed at
    once, so that a tensor that cannot be hashed is an error here, before any batch runs."""
    h = hashlib.sha256()
    for name, m in model.named_modules():
        h.update(f"{name}|{_name(type(m))}|{m.training}\n".encode())
    params = list(model.named_parameters())
    tensors = [*params, *model.named_buffers()]
    later = [i for i, (_, t) in enumerate(tensors[:len(params)]) if _plain(t)] \
        if background else []
    if sum(tensors[i][1].numel() * tensors[i][1].element_size() for i in later) \
            < _BACKGROUND_BYTES:
        later = []
    now = [i for i in range(len(tensors)) if i not in set(later)]
    digests: list[str | Exception | None] = [None] * len(tensors)
    for i, d in zip(now, _digests([tensors[i] for i in now]), strict=True):
        digests[i] = _checked(tensors[i], d)
    pending = None
    if later:
        # The copies off a GPU start after what the caller queued so far (the weights may
        # still be being written there), not after the forward passes queued next.
        devices = {tensors[i][1].device for i in later} - {torch.device("cpu")}
        after = {d: torch.cuda.current_stream(d).record_event() for d in devices}
        pool = ThreadPoolExecutor(1, thread_name_prefix="hookscope-fingerprint")
        pending = pool.submit(_digests, [tensors[i] for i in later], after)
        pool.shutdown(wait=False)  # the thread ends with its one task

    def result() -> str:
        if pending is not None:
            for i, d in zip(later, pending.result(), strict=True):
                digests[i] = _checked(tensors[i], d)
        for (name, t), digest in zip(tensors, digests, strict=True):
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|{digest}\n".encode())
        return h.hexdigest()

    return functools.cache(result)


def _plain(t: torch.Tensor) -> bool:
    """A dense, contiguous tensor of PyTorch's own type on the CPU or a CUDA device: its
    bytes are read as they are (no conversion, no kernel on the caller's stream)."""
    return (type(t) in (torch.Tensor, torch.nn.Parameter) and t.layout is torch.strided
            and not t.is_quantized and t.device.type in ("cpu", "cuda") and t.is_contiguous())


def _checked(item: tuple[str, torch.Tensor], digest: str | Exception) -> str:
    if isinstance(digest, Exception):
        name, t = item
        raise DatasetError(f"cannot fingerprint {name!r} ({t.dtype} on {t.device}): "
                           f"{digest}. Pass setup_id= to identify the setup "
                           "yourself.") from None
    return digest


_PARALLEL_BYTES = 32 << 20  # below this a model is hashed in this thread (a few ms)
_CHUNK_BYTES = 64 << 20  # a GPU model is copied off in pieces of this size (two buffers)


def _digests(tensors: list[tuple[str, torch.Tensor]],
             after: dict[torch.device, Any] | None = None) -> list[str | Exception]:
    """Each tensor's :func:`_tensor_digest` (or the error it raised), in order.

    A large model is hashed on several threads: hashlib and the copies off the GPU release
    the GIL, and hashing is most of what ``record_dataset`` costs before its first batch
    (BERT-base: 440 MB, about 0.3 s on one core).  Dense GPU tensors are copied off in
    chunks (:func:`_chunked_digests`, after the events in ``after``): one wait per chunk
    instead of one per tensor (BERT-base has 201).  The digests are the same either way."""
    def one(t: torch.Tensor) -> str | Exception:
        try:
            return _tensor_digest(t)
        except (RuntimeError, TypeError, NotImplementedError) as exc:
            return exc

    size = sum(t.numel() * t.element_size() for _, t in tensors)
    workers = min(8, os.cpu_count() or 1, len(tensors))
    if not after and (size < _PARALLEL_BYTES or workers < 2):  # (in the background, GPU
        return [one(t) for _, t in tensors]  # tensors always take the side stream)
    out: list[str | Exception | None] = [None] * len(tensors)
    gpu = [i for i, (_, t) in enumerate(tensors) if _chunkable(t)]
    with ThreadPoolExecutor(workers, thread_name_prefix="hookscope-digest") as pool:
        rest = [i for i, (_, t) in enumerate(tensors) if not _chunkable(t)]
        for i, d in zip(rest, pool.map(one, (tensors[i][1] for i in rest)), strict=True):
            out[i] = d
        if gpu:
            digests = _chunked_digests([tensors[i][1] for i in gpu], pool, after=after)
            for i, d in zip(gpu, digests, strict=True):
                out[i] = d
    return out  # type: ignore[return-value]


def _chunkable(t: torch.Tensor) -> bool:
    return t.device.type == "cuda" and t.layout is torch.strided and t.numel() > 0


def _chunked_digests(tensors: list[torch.Tensor], pool: ThreadPoolExecutor,
                     chunk: int | None = None,
                     after: dict[torch.device, Any] | None = None) -> list[str]:
    """SHA-256 of each tensor's bytes (as :func:`_tensor_digest`), its bytes copied to the
    host in chunks of ``chunk`` bytes, alternating between two pinned buffers: the copies of
    one chunk are queued without waiting, waited for once, and hashed on ``pool`` while the
    next chunk is copied.  A tensor larger than a chunk is hashed piece by piece, in order
    (SHA-256 is incremental), so no buffer grows with the model.

    The copies run on a side stream per device that first waits for ``after[device]`` (an
    event), or for the caller's current stream as it is now: each wait is for this
    function's copies alone, not for the work other threads queue meanwhile (the forward
    passes a background digest overlaps)."""
    chunk = chunk or _CHUNK_BYTES
    flats = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors]
    pin = any(f.device.type == "cuda" for f in flats)
    buffers = [torch.empty(chunk, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
    hashers = [hashlib.sha256() for _ in flats]
    streams: dict[torch.device, Any] = {}

    def side(device: torch.device) -> Any:
        if device not in streams:
            streams[device] = torch.cuda.Stream(device)
            if after is not None and device in after:
                streams[device].wait_event(after[device])
            else:
                streams[device].wait_stream(torch.cuda.current_stream(device))
        return streams[device]

    pending: list[Any] = []
    k, i, start = 0, 0, 0  # chunk number; tensor and byte where the next piece begins
    while i < len(flats):
        buf, used, pieces, devices = buffers[k % 2], 0, [], set()
        while i < len(flats) and used < chunk:
            n = min(chunk - used, flats[i].numel() - start)
            source = flats[i][start:start + n]
            if source.device.type == "cuda":
                with torch.cuda.stream(side(source.device)):
                    buf[used:used + n].copy_(source, non_blocking=True)
                devices.add(source.device)
            else:
                buf[used:used + n].copy_(source)
            pieces.append((i, used, n))
            used, start = used + n, start + n
            if start == flats[i].numel():
                i, start = i + 1, 0
        for device in devices:  # the one wait of this chunk
            streams[device].synchronize()
        for f in pending:  # the previous chunk is hashed: its buffer is free, and each
            f.result()  # tensor's pieces reach its hasher in order
        pending = [pool.submit(hashers[j].update, memoryview(buf[at:at + n].numpy()))
                   for j, at, n in pieces]
        k += 1
    for f in pending:
        f.result()
    return [h.hexdigest() for h in hashers]


class _Describer:
    """Turns option values into a JSON-able description that is equal exactly when the values
    compute the same thing (as far as can be inspected)."""

    def __init__(self, vouched: bool) -> None:
        self.vouched = vouched  # setup_id= given: callables are not inspected
        self.path: set[int] = set()

    def __call__(self, value: Any, where: str, depth: int = 0, global_depth: int = 0) -> Any:
        if value is None or isinstance(value, bool | int | float | str):
            return value
        if depth > _MAX_DEPTH:
            raise _UnfingerprintableError(f"{where} (nested too deep)", value)
        if id(value) in self.path:
            return ["cycle"]
        self.path.add(id(value))
        try:
            return self.describe(value, where, depth + 1, global_depth)
        finally:
            self.path.discard(id(value))

    def describe(self, value: Any, where: str, depth: int, gdepth: int) -> Any:
        d = functools.partial(self, depth=depth, global_depth=gdepth)
        if isinstance(value, bytes | bytearray):
            return ["bytes", hashlib.sha256(value).hexdigest()]
        if isinstance(value, tuple | list):
            return [type(value).__name__, *[d(v, f"{where}[{i}]") for i, v in enumerate(value)]]
        if isinstance(value, set | frozenset):
            items = [d(v, f"{where} item") for v in value]
            return ["set", *sorted(items, key=lambda x: json.dumps(x, sort_keys=True))]
        if isinstance(value, dict):
            return ["dict", _name(type(value)), [[d(k, f"{where} key"), d(v, f"{where}[{k!r}]")]
                                                 for k, v in value.items()]]
        if isinstance(value, torch.Tensor):
            return ["tensor", str(value.dtype), list(value.shape), _tensor_digest(value)]
        if isinstance(value, np.ndarray):
            if value.dtype.hasobject:
                raise _UnfingerprintableError(where, value)
            return ["ndarray", value.dtype.str, list(value.shape),
                    hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()]
        if isinstance(value, np.generic):
            return ["numpy", value.dtype.str, value.item()]
        if isinstance(value, torch.dtype | torch.device | torch.Size | slice | range):
            return [type(value).__name__, repr(value)]
        if value is Ellipsis:
            return ["..."]
        if isinstance(value, enum.Enum):
            return ["enum", _name(type(value)), value.name]
        if isinstance(value, type):
            return ["type", _name(value)]
        if isinstance(value, types.ModuleType):
            return ["module", value.__name__]
        if isinstance(value, torch.nn.Module):
            return ["nn.Module", model_digest(value)]
        if isinstance(value, functools.partial):
            return ["partial", d(value.func, f"{where}.func"), d(value.args, f"{where} args"),
                    d(value.keywords, f"{where} keywords")]
        if isinstance(value, types.FunctionType | types.MethodType | types.CodeType):
            if self.vouched:
                return ["vouched", _name(value)]
            if isinstance(value, types.MethodType):
                return ["method", d(value.__func__, where), d(value.__self__, f"{where}.__self__")]
            if isinstance(value, types.CodeType):
                return self.code(value, where, depth, gdepth)
            return self.function(value, where, depth, gdepth)
        if isinstance(value, types.BuiltinFunctionType | types.BuiltinMethodType
                      | types.WrapperDescriptorType | types.MethodWrapperType):
            owner = getattr(value, "__self__", None)
            plain = owner is None or isinstance(owner, types.ModuleType | type)
            return ["builtin", _name(value), None if plain else d(owner, f"{where}.__self__")]
        state = getattr(value, "__dict__", None)
        if isinstance(state, dict) and not getattr(type(value), "__slots__", ()):
            if callable(value) and self.vouched:
                return ["vouched", _name(type(value))]
            call = next((k.__dict__["__call__"] for k in type(value).__mro__
                         if "__call__" in k.__dict__), None) if callable(value) else None
            return ["object", _name(type(value)),
                    None if call is None else d(call, f"{where}.__call__"),
                    d(state, f"{where} (its attributes)")]
        raise _UnfingerprintableError(where, value)

    def function(self, fn: types.FunctionType, where: str, depth: int, gdepth: int) -> Any:
        d = functools.partial(self, depth=depth, global_depth=gdepth)
        cells = []
        for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or (), strict=True):
            try:
                content = cell.cell_contents
            except ValueError:  # an empty cell (a name assigned later)
                content = ["empty"]
            cells.append([name, d(content, f"{where} (its closure variable {name!r})")])
        # Not its name: two identical lambdas defined in different places compute the same.
        return ["function", self.code(fn.__code__, where, depth, gdepth),
                d(fn.__defaults__, f"{where} (its defaults)"),
                d(fn.__kwdefaults__, f"{where} (its keyword defaults)"), cells,
                self.globals_used(fn, where, depth, gdepth)]

    def code(self, co: types.CodeType, where: str, depth: int, gdepth: int) -> Any:
        consts = [self.code(c, where, depth, gdepth) if isinstance(c, types.CodeType)
                  else self(c, f"{where} (a constant)", depth, gdepth) for c in co.co_consts]
        return ["code", hashlib.sha256(co.co_code).hexdigest(), consts, list(co.co_names),
                list(co.co_varnames), list(co.co_freevars)]

    def globals_used(self, fn: types.FunctionType, where: str, depth: int, gdepth: int) -> Any:
        """The values of the global names the function's code reads: plain values and
        functions (to a small depth) by content, other objects by their class only."""
        names: set[str] = set()
        todo = [fn.__code__]
        while todo:
            co = todo.pop()
            names.update(co.co_names)
            todo.extend(c for c in co.co_consts if isinstance(c, types.CodeType))
        out = []
        for name in sorted(names):
            if name not in fn.__globals__:
                continue  # a builtin, or an attribute name
            value = fn.__globals__[name]
            if isinstance(value, types.FunctionType) and gdepth >= _GLOBAL_DEPTH:
                out.append([name, ["function", _name(value)]])
                continue
            try:
                out.append([name, self(value, f"{where} (global {name!r})", depth, gdepth + 1)])
            except _UnfingerprintableError:
                out.append([name, ["object", _name(type(value))]])
        return out


def setup_fingerprint(model: torch.nn.Module, modules: Any, options: dict[str, Any],
                      setup_id: str | None = None) -> str:
    """SHA-256 (hex) of the model (:func:`model_digest`), the module selection and the options
    (callables by their code and captured values, or by ``setup_id`` when given)."""
    return start_setup_fingerprint(model, modules, options, setup_id, background=False)()


def start_setup_fingerprint(model: torch.nn.Module, modules: Any, options: dict[str, Any],
                            setup_id: str | None = None,
                            background: bool = True) -> Callable[[], str]:
    """Begin :func:`setup_fingerprint`: the options are described (an option that cannot be
    fingerprinted is an error here) and the model's digest started
    (:func:`start_model_digest`); the returned function waits for the fingerprint."""
    describe = _Describer(vouched=setup_id is not None)
    described = {}
    for key, value in options.items():
        try:
            described[key] = describe(value, f"{key}=")
        except _UnfingerprintableError as exc:
            raise DatasetError(
                f"record_dataset cannot fingerprint {exc.where}: a {type(exc.value).__name__}, "
                "whose state cannot be inspected. The fingerprint must cover everything that "
                "determines the values, so that a resumed run never mixes setups. Pass "
                "setup_id='...' (any text you change whenever your callables or what they use "
                "change) to vouch for the callables yourself.") from None
    rest = json.dumps([_name(type(model)), describe(modules, "modules"), described, setup_id],
                      sort_keys=True, default=repr).encode()
    digest = start_model_digest(model, background)

    def result() -> str:
        h = hashlib.sha256()
        h.update(digest().encode())
        h.update(rest)
        return h.hexdigest()

    return functools.cache(result)
