"""One writer per dataset folder: a lock held by the operating system for the writer's life.

``record_dataset`` takes an exclusive, non-blocking ``flock`` on
``out/.hookscope-writer-rRRR.lock`` (its rank's) before it touches anything, and writes its host,
pid and start time into the file.  A second writer (another process, or another call in the
same process) is refused with a :class:`DatasetError` naming the holder.  The ranks of one
``torchrun`` job each lock their own rank's file, so they work side by side; a second job (or
a single-process run, rank 0) on the same folder collides with the first on rank 0's lock.

Stale locks cannot happen: the kernel releases the lock when the writer exits or is killed
(even with ``kill -9``); the file stays, holding the last writer's host and pid as
information, and the next writer simply takes it.  On a network filesystem whose ``flock``
is not shared between hosts, run the writers of one folder on one host.  Where ``fcntl`` does
not exist (Windows), the file is created exclusively instead, and one left by a killed writer
is removed by the next one when its pid is no longer running on the same host.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from .errors import DatasetError

__all__ = ["LOCK", "WriterLock"]

LOCK = ".hookscope-writer-r{rank:03d}.lock"


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
        return (f"host {info.get('host')!r}, pid {info.get('pid')}, since "
                f"{info.get('started')}")
    except (OSError, ValueError):
        return "an unknown process"


class WriterLock:
    """Exclusive writer lock of a dataset folder (a context manager)."""

    def __init__(self, folder: Path, rank: int = 0) -> None:
        self.path = folder / LOCK.format(rank=rank)
        self.fd: int | None = None

    def acquire(self) -> None:
        info = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            self._acquire_exclusive_create(info)
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise DatasetError(f"cannot create the writer lock {self.path} ({exc}).") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if not isinstance(exc, BlockingIOError):
                raise DatasetError(f"cannot lock {self.path} ({exc}): this filesystem does not "
                                   "support file locks; record into a local folder and copy "
                                   "the dataset afterwards.") from None
            raise DatasetError(
                f"{self.path.parent} is being written by another record_dataset run "
                f"({_holder(self.path)}); two writers would corrupt it. Wait for it to finish "
                "(or stop it), or record into another folder.") from None
        os.ftruncate(fd, 0)
        os.write(fd, info.encode())
        self.fd = fd

    def _acquire_exclusive_create(self, info: str) -> None:  # pragma: no cover - Windows
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                held = json.loads(self.path.read_text() or "{}")
                if held.get("host") == socket.gethostname() and not _alive(held.get("pid")):
                    self.path.unlink(missing_ok=True)  # left by a killed writer
                    continue
                raise DatasetError(f"{self.path.parent} is being written by another "
                                   f"record_dataset run ({_holder(self.path)}); if none runs, "
                                   f"delete {self.path}.") from None
            os.write(fd, info.encode())
            self.fd = fd
            self._created = True
            return

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.close(self.fd)  # closing releases the flock
        if getattr(self, "_created", False):  # pragma: no cover - Windows
            with contextlib.suppress(OSError):
                self.path.unlink()
        self.fd = None

    def __enter__(self) -> WriterLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _alive(pid: Any) -> bool:  # pragma: no cover - Windows
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True
