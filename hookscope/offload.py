"""Moving captures off the GPU without waiting for them: ``record(..., device="cpu")``.

A capture on a CUDA device is copied into *pinned* host memory with a ``non_blocking`` copy
issued on the current CUDA stream, in the hook, right after the module ran.  The hook returns at
once and the copy overlaps the next layers' compute; nothing waits until

- the ``record`` block ends (one synchronisation, so that every capture is complete when the
  block is left), or
- a capture is read inside the block (``.tensor``, ``.output``, ``.inputs``, ``.kwargs``, or
  anything that reads them): that read synchronises first, so it never sees memory that is
  still being written.

Ordering (why this is correct): a copy issued on the current stream runs after every kernel
already queued on that stream (the one that produced the output) and before every kernel queued
later (an in-place ``ReLU(inplace=True)`` right after the hooked module cannot overwrite the
source before it was read).  Assumption, as for any hook: the module ran on the stream that is
current when its hook runs.  A model that computes on side streams of its own must make the
current stream wait for them before returning (as PyTorch requires of any consumer).

Pinned buffers are reused across the calls of a reused :class:`~hookscope.Recorder`, per shape
and dtype, but only once every capture that used a buffer has been released (no tensor, view or
NumPy array refers to its memory any more): a capture a user still holds is never overwritten.
The pool is bounded (:data:`POOL_BYTES` per recorder); beyond it, buffers are allocated as usual
and freed when released.

The device side is behind :class:`DeviceOps`, so that the orchestration (pool, pending copies,
synchronisation on read or at the end of the block) runs the same code under a CPU fake in the
tests.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["POOL_BYTES", "CudaOps", "DeviceOps", "HostStaging", "Pending", "count_host_syncs",
           "ops_for"]

POOL_BYTES = 2 << 30  # pinned bytes kept for reuse per recorder (2 GiB)

_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _storage_refs(t: Tensor) -> int | None:
    """References to ``t``'s storage, or ``None`` where this PyTorch cannot say."""
    if _use_count is None:
        return None
    try:
        return int(_use_count(t.untyped_storage()._cdata))
    except (AttributeError, RuntimeError, TypeError):
        return None


# ``t.untyped_storage()`` itself holds a reference while it is asked: the count of a storage
# that only one tensor refers to, measured once on this PyTorch.
_ALONE = _storage_refs(torch.empty(1))


class DeviceOps:
    """What the staging needs from a device: pinned memory, an asynchronous copy on the
    current stream, and waiting for the copies issued so far."""

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        raise NotImplementedError

    def copy(self, dst: Tensor, src: Tensor) -> Any:
        """Queue ``dst.copy_(src)``; return a key of the queue it went on (its stream)."""
        raise NotImplementedError

    def wait(self, queues: set) -> None:
        """Block until every copy queued on ``queues`` is complete."""
        raise NotImplementedError

    def mark(self, queue: Any) -> Callable[[], None]:
        """A wait for what ``queue`` holds now, and not for anything queued on it later."""
        return lambda: self.wait({queue})


class CudaOps(DeviceOps):
    """CUDA: page-locked host buffers, copies on the current stream, stream synchronisation."""

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def copy(self, dst: Tensor, src: Tensor) -> Any:
        stream = torch.cuda.current_stream(src.device)
        dst.copy_(src, non_blocking=True)  # ordered on `stream` after the producing kernel
        return stream

    def wait(self, queues: set) -> None:
        for stream in queues:
            stream.synchronize()

    def mark(self, queue: Any) -> Callable[[], None]:
        event = torch.cuda.Event()
        event.record(queue)
        return event.synchronize


_CUDA = CudaOps()


def ops_for(x: Tensor) -> DeviceOps | None:
    """The device side for moving ``x`` to the host asynchronously, or ``None`` where a plain
    ``.to("cpu")`` is right (a CPU tensor; sparse, nested and other layouts)."""
    if x.is_cuda and x.layout is torch.strided and not x.is_nested:
        return _CUDA
    return None


class Pending:
    """Copies issued and not yet waited for: captures made meanwhile hold it, and reading one
    waits first (:meth:`wait`)."""

    __slots__ = ("done", "staging")

    def __init__(self, staging: HostStaging) -> None:
        self.staging = staging
        self.done = False

    def wait(self) -> None:
        if not self.done:
            self.staging.synchronize()


class HostStaging:
    """Pinned host buffers and the copies into them, for one recorder (see the module
    docstring).  Thread-safe: ``threads="all"`` records from several threads."""

    def __init__(self, pool_bytes: int = POOL_BYTES, ops: Any = ops_for) -> None:
        self.pool_bytes = pool_bytes
        self._ops_for = ops
        self._pool: dict[tuple, list[Tensor]] = {}  # (shape, dtype) -> buffers owned here
        self._pooled = 0  # bytes in the pool
        self._queues: dict[Any, DeviceOps] = {}  # queues with copies not yet waited for
        self._pending: Pending | None = None
        self._lock = threading.Lock()  # the pool and the queues
        self._sync = threading.Lock()  # one wait at a time: a reader waits for a wait under way
        self.allocated = 0  # buffers made (reuse shows as fewer allocations: tests, benchmarks)

    def copies_async(self, x: Tensor) -> bool:
        """Whether :meth:`to_host` copies ``x`` asynchronously (a CUDA tensor)."""
        return self._ops_for(x) is not None

    def to_host(self, x: Tensor, dtype: torch.dtype | None) -> Tensor:
        """``x`` (cast to ``dtype`` if given) on the host: a buffer being filled (wait on
        :meth:`in_flight` before reading it); or, where no asynchronous copy applies,
        ``x.to("cpu", dtype)``."""
        ops = self._ops_for(x)
        if ops is None:
            return x.to(device="cpu", dtype=dtype)
        if dtype is not None and dtype != x.dtype:
            x = x.to(dtype)  # cast on the device: the copy moves the smaller result
        with self._lock:
            buf = self._take(ops, tuple(x.shape), x.dtype)
            self._queues[ops.copy(buf, x)] = ops
            if self._pending is None:
                self._pending = Pending(self)
            return buf

    def to_host_marked(self, x: Tensor) -> tuple[Tensor, Callable[[], None]]:
        """``x`` on the host, and a wait for that copy alone: not for work queued after it
        (``record_dataset`` reads batch *i*'s rows while the GPU computes batch *i + 1*).
        The buffer is the caller's to read after the wait; no capture refers to it."""
        ops = self._ops_for(x)
        if ops is None:
            return x.to("cpu"), _nothing
        with self._lock:
            buf = self._take(ops, tuple(x.shape), x.dtype)
            return buf, ops.mark(ops.copy(buf, x))

    def in_flight(self) -> Pending | None:
        """What a capture made now must wait for before it is read: the copies issued since
        the last wait, or ``None`` if there are none."""
        return self._pending

    def _take(self, ops: DeviceOps, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """A buffer of this shape and dtype that nobody else refers to (a view of it is
        returned, so that the pool's own tensor is the only reference once it is released)."""
        key = (shape, dtype)
        buffers = self._pool.setdefault(key, [])
        for buf in buffers:
            if _ALONE is not None and _storage_refs(buf) == _ALONE:
                return buf.view(shape)
        buf = ops.empty(shape, dtype)
        self.allocated += 1
        nbytes = buf.numel() * buf.element_size()
        if _ALONE is not None and self._pooled + nbytes <= self.pool_bytes:
            buffers.append(buf)
            self._pooled += nbytes
            return buf.view(shape)
        return buf  # not kept: freed once its capture is released

    def synchronize(self) -> None:
        """Wait for every copy issued so far; captures made before are then complete."""
        with self._sync:
            with self._lock:
                pending, self._pending = self._pending, None
                queues, self._queues = self._queues, {}
            if pending is None:
                return
            by_ops: dict[int, tuple[DeviceOps, set]] = {}
            for queue, ops in queues.items():
                by_ops.setdefault(id(ops), (ops, set()))[1].add(queue)
            for ops, qs in by_ops.values():
                ops.wait(qs)
            pending.done = True

    @property
    def pooled_bytes(self) -> int:
        return self._pooled


def _nothing() -> None:
    pass


def count_host_syncs(fn: Callable[[], Any]) -> int | None:
    """How many times ``fn()`` made the host wait for the GPU (``.item()``, a copy to pageable
    memory, ``bool(cuda_tensor)`` ...), as ``torch.cuda.set_sync_debug_mode("warn")`` reports
    them; ``None`` without CUDA.  Compare a recorded forward with the plain one: recording must
    add none."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)
