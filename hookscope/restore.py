"""What :func:`hookscope.load` may rebuild: the allowlist, and the plain containers that stand
in for every other class.

A class name read from a recording file only selects among classes registered here by the
class object (:func:`allow_class`), or Hugging Face ``ModelOutput`` subclasses found from
the class object when ``transformers`` is already imported.  Nothing is looked up with
``getattr`` (a lazy module's ``__getattr__`` imports), imported or called because the file
names it.
"""

from __future__ import annotations

import collections
import dataclasses
import keyword
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .errors import InputTypeError

__all__ = ["Restored", "RestoredDict", "allow_class"]


def _class_name(obj: Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}:{cls.__qualname__}"


_ALLOWED: dict[str, tuple[type, Callable[[type, dict], Any]]] = {}


def _by_keywords(cls: type, data: dict) -> Any:
    return cls(**data)


def _by_mapping(cls: type, data: dict) -> Any:
    return cls(data)


def allow_class(cls: type, rebuild: Callable[[type, dict], Any] | None = None) -> type:
    """Let :func:`load` rebuild instances of ``cls`` (a namedtuple, dataclass or mapping class).

    :func:`load` never builds a class because the file names it: it builds only the classes
    registered here (by the class object itself, in this process), and returns every other
    structured value as a plain container that keeps the class name (:class:`Restored`,
    :class:`RestoredDict`, a generated namedtuple).  Register only classes whose constructor
    does nothing but store its fields.

    Parameters
    ----------
    cls : type
        The class.  Namedtuples are rebuilt with their fields, dataclasses with
        ``cls(**fields)``, mappings with ``cls(dict)``.
    rebuild : callable, optional
        ``rebuild(cls, data) -> object`` instead of the default above (``data`` is a dict).

    Returns
    -------
    type
        ``cls``, so that ``allow_class`` can decorate a class definition.
    """
    if not isinstance(cls, type):
        raise InputTypeError(f"allow_class() takes a class, got {cls!r}.")
    if rebuild is None:
        if (issubclass(cls, tuple) and hasattr(cls, "_fields")) or dataclasses.is_dataclass(cls):
            rebuild = _by_keywords
        elif issubclass(cls, Mapping):
            rebuild = _by_mapping
        else:
            raise InputTypeError(f"allow_class(): {cls.__qualname__} is not a namedtuple, "
                                 "dataclass or mapping; pass rebuild=.")
    _ALLOWED[_class_name(cls)] = (cls, rebuild)
    return cls


allow_class(collections.OrderedDict)


def _allowed(name: str) -> tuple[type, Callable[[type, dict], Any]] | None:
    """The allowlisted class called ``name``: registered ones, and subclasses of Hugging Face's
    ``ModelOutput`` found from the class object when transformers is already imported."""
    if name in _ALLOWED:
        return _ALLOWED[name]
    generic = sys.modules.get("transformers.utils.generic")
    base = _module_dict(generic).get("ModelOutput") if generic is not None else None
    if isinstance(base, type):
        todo = [base]
        while todo:
            cls = todo.pop()
            if _class_name(cls) == name:
                return cls, _by_keywords
            todo.extend(type.__subclasses__(cls))
    return None


def _module_dict(module: Any) -> dict:
    """A module's namespace, read without ``getattr`` (no lazy-loading ``__getattr__``)."""
    if not isinstance(module, types.ModuleType):
        return {}
    namespace = object.__getattribute__(module, "__dict__")
    return namespace if isinstance(namespace, dict) else {}


_STAND_INS: dict[str, type] = {}


def _module_type(name: str) -> type:
    """The ``nn.Module`` class called ``module:qualname`` if its module is already imported,
    found by reading namespaces (no ``getattr``, no import, nothing called); else a stand-in
    class of the same name."""
    module_name, _, qualname = name.partition(":")
    obj: Any = _module_dict(sys.modules.get(module_name))
    for part in qualname.split("."):
        namespace = obj if isinstance(obj, dict) else (
            type.__dict__["__dict__"].__get__(obj) if isinstance(obj, type) else {})
        obj = namespace.get(part)
    if isinstance(obj, type) and issubclass(obj, torch.nn.Module):
        return obj
    if name not in _STAND_INS:
        _STAND_INS[name] = type(_short_name(name, "Module"), (), {"__module__": "unknown",
                                                                    "hookscope_class": name})
    return _STAND_INS[name]


def _short_name(name: str, default: str) -> str:
    short = name.rpartition(":")[2].rpartition(".")[2]
    return short if short.isidentifier() and not keyword.iskeyword(short) else default


class Restored:
    """An object whose class :func:`load` does not rebuild (not on the allowlist of
    :func:`allow_class`): its fields as attributes, its class name in ``hookscope_class``.

    Each original class gets its own subclass, named like it, so ``type(obj).__name__`` reads
    as before and two objects of one class share a type.
    """

    hookscope_class = ""

    def __init__(self, fields: dict[str, Any]) -> None:
        self.__dict__.update(fields)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items())
        return f"{type(self).__name__}({inner})"



class RestoredDict(dict):
    """A mapping whose class :func:`load` does not rebuild: a ``dict`` (keys also readable as
    attributes, like a ``ModelOutput``), its class name in ``hookscope_class``."""

    hookscope_class = ""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


_RESTORED: dict[tuple[str, type], type] = {}
_NAMEDTUPLES: dict[tuple[str, tuple[str, ...]], type] = {}


def _restored_class(name: str, base: type) -> type:
    if (name, base) not in _RESTORED:
        namespace: dict[str, Any] = {"__module__": "hookscope.restore", "hookscope_class": name}
        if base is RestoredDict:
            namespace["__slots__"] = ()
        _RESTORED[name, base] = type(_short_name(name, base.__name__), (base,), namespace)
    return _RESTORED[name, base]


def _namedtuple(name: str, fields: tuple[str, ...]) -> type:
    """A namedtuple class generated from the field names (validated identifiers)."""
    key = (name, fields)
    if key not in _NAMEDTUPLES:
        cls = collections.namedtuple(_short_name(name, "Restored"), fields,
                                     module="hookscope.restore")
        cls.hookscope_class = name  # type: ignore[attr-defined]
        _NAMEDTUPLES[key] = cls
    return _NAMEDTUPLES[key]
