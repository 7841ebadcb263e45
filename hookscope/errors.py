"""The exception hierarchy of hookscope.

Every error raised on purpose by hookscope derives from :class:`HookscopeError` and from the
builtin that fits (``LookupError``, ``ValueError``, ``TypeError``), so that ``except KeyError``
and ``except HookscopeError`` both work.  Messages quote the user's input and say what to do.
"""

from __future__ import annotations

__all__ = [
    "AmbiguousCallError",
    "CallCountError",
    "CaptureModifiedError",
    "DatasetError",
    "HookscopeError",
    "InputError",
    "InputTypeError",
    "ModuleSelectionError",
    "NotRecordedError",
    "RecordingFileError",
    "UnsortError",
    "UnsupportedModelError",
]


class HookscopeError(Exception):
    """Base class of every error hookscope raises on purpose."""


class ModuleSelectionError(HookscopeError, KeyError):
    """A module name, pattern or type selects nothing in the model."""

    def __str__(self) -> str:  # KeyError would repr() the message and add quotes
        return str(self.args[0]) if self.args else ""


class NotRecordedError(HookscopeError, KeyError):
    """A capture was asked for that the recording does not hold."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class AmbiguousCallError(HookscopeError, LookupError):
    """A module ran several times and the caller did not say which call they want."""


class CallCountError(HookscopeError, ValueError):
    """``calls=`` labels or ``unsort=`` permutations disagree with how often a module ran."""


class UnsortError(HookscopeError, ValueError):
    """An ``unsort=`` permutation is invalid, or cannot be applied without guessing."""


class CaptureModifiedError(HookscopeError, RuntimeError):
    """A capture recorded with ``clone=False`` was changed in place after it was recorded."""


class UnsupportedModelError(HookscopeError, TypeError):
    """The model (or a selected module) cannot be hooked, e.g. a TorchScript module."""


class InputError(HookscopeError, ValueError):
    """An argument of an analysis, pooling or export function is unusable: wrong shape or
    dtype, NaN or infinity where values are combined, a constant representation where a
    similarity is undefined, an unknown option, or a parameter out of range."""


class InputTypeError(HookscopeError, TypeError):
    """An argument has a type hookscope cannot use at all (a model that is not an
    ``nn.Module``, a non-callable ``pick=``); wrong values of the right kind are
    :class:`InputError`."""


class RecordingFileError(HookscopeError, ValueError):
    """A file is not a readable hookscope recording (truncated, corrupted, malformed, too large
    for the size budget, or another format)."""


class DatasetError(HookscopeError, ValueError):
    """A dataset folder cannot be written or read as asked (damaged shard, invalid manifest,
    another writer holding the folder, a changed setup on resume ...)."""
