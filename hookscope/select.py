"""Turn what the user wrote (names, glob patterns, module classes) into submodules.

Wrappers that prefix names are looked through: ``nn.DataParallel`` and
``DistributedDataParallel`` (``module.``) and ``torch.compile``'s ``OptimizedModule``
(``_orig_mod.``), so the user writes the names of the model they know.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from functools import lru_cache

import torch
from torch import nn

from .errors import InputTypeError, ModuleSelectionError, UnsupportedModelError

__all__ = ["ModuleSpec", "by_name", "describe_spec", "module_tree", "resolve_modules", "unwrap"]

# A dotted name, a glob pattern, an nn.Module subclass, or a submodule object itself.
ModuleSpec = str | type | nn.Module

_GLOB = re.compile(r"[*?\[]")


def unwrap(model: nn.Module) -> tuple[nn.Module, str]:
    """Return the model inside any name-prefixing wrappers, and the prefix they add.

    >>> inner = nn.Linear(2, 2)
    >>> unwrap(nn.DataParallel(inner)) == (inner, "module.")
    True
    """
    prefix = ""
    while True:
        if isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
            model, prefix = model.module, prefix + "module."
        elif "_orig_mod" in model._modules:  # torch.compile's OptimizedModule
            model, prefix = model._orig_mod, prefix + "_orig_mod."
        else:
            return model, prefix


def module_tree(model: nn.Module) -> list[tuple[nn.Module, nn.Module | None]]:
    """Every module of ``model`` once, with its parent, in ``model.modules()`` order (a module
    shared by two parents is listed under the first).

    A plain recursion over the ``_modules`` dicts, twice as fast as ``model.modules()`` (a
    generator per level of nesting); a block walked BERT-base (228 modules) four times that
    way, about 1 ms per ``record()`` before anything ran.

    >>> net = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU()))
    >>> [type(m).__name__ for m, _ in module_tree(net)] == [
    ...     type(m).__name__ for m in net.modules()]
    True
    """
    out: list[tuple[nn.Module, nn.Module | None]] = [(model, None)]
    seen = {id(model)}
    add, append = seen.add, out.append

    def visit(module: nn.Module) -> None:  # (recursive: 3x faster than a stack of pairs)
        for child in module._modules.values():
            if child is not None and id(child) not in seen:
                add(id(child))
                append((child, module))
                visit(child)

    visit(model)
    return out


@lru_cache(maxsize=256)
def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Compile a dotted glob: ``*`` is one name segment, ``**`` any number of segments."""
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append(r"[^.]*")
        elif c == "?":
            out.append(r"[^.]")
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : end]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def _strip_wrapper_prefix(spec: str, prefix: str) -> str:
    # Users who copied a name from the wrapped model's named_modules() keep working.
    if not prefix:
        return spec
    for part in ("module.", "_orig_mod."):
        while spec.startswith(part) and (prefix and part in prefix):
            spec = spec[len(part):]
    return spec


def _lookup(model: nn.Module, name: str) -> nn.Module | None:
    module: nn.Module | None = model
    if name:
        atoms = name.split(".")
        for i, atom in enumerate(atoms):
            if isinstance(module, torch.jit.ScriptModule):  # (its children are compiled too)
                where = ".".join(atoms[:i])
                raise torchscript_error(f"{name!r} is inside {where or 'the model'!r}, a",
                                        module)
            module = module._modules.get(atom)
            if module is None:
                return None
    return module


def torchscript_error(what: str, module: nn.Module) -> UnsupportedModelError:
    """Why a TorchScript module cannot be recorded: ``what`` names it ("Module 'a' is a")."""
    return UnsupportedModelError(
        f"{what} TorchScript module ({type(module).__name__}): TorchScript runs compiled code "
        "that calls no Python hooks, so hookscope cannot record inside it. Record the eager "
        "nn.Module it was scripted from (torch.jit.script/trace keep no link to it), or return "
        "the values you need from forward().")


def describe_spec(spec: object) -> str:
    """A short description of a selection spec for messages (never a whole module's repr)."""
    if isinstance(spec, nn.Module):
        return f"a {type(spec).__name__} object"
    text = repr(spec)
    return text if len(text) <= 60 else text[:57] + "..."


def _name_of(module: nn.Module, model: nn.Module, inner: nn.Module) -> str:
    """The dotted name of a submodule object (its first name where it is shared)."""
    if module is model or module is inner:
        return ""
    for name, candidate in inner.named_modules():
        if candidate is module:
            return name
    raise ModuleSelectionError(
        f"The {type(module).__name__} object passed to select modules is not a submodule of "
        f"this {type(inner).__name__}: pass modules of the recorded model itself (as "
        "model.named_modules() lists them), or their names.")


def by_name(model: nn.Module, specs: object) -> object:
    """``specs`` (one, a list, or a mapping keyed by specs) with every submodule object replaced
    by its name: what a fingerprint of the selection should see (two submodules with equal
    weights are still different selections)."""
    if isinstance(specs, nn.Module):
        return _name_of(specs, model, unwrap(model)[0])
    if isinstance(specs, dict) and any(isinstance(k, nn.Module) for k in specs):
        return {by_name(model, k): v for k, v in specs.items()}
    if isinstance(specs, list | tuple) and any(isinstance(s, nn.Module) for s in specs):
        return type(specs)(by_name(model, s) for s in specs)
    return specs  # unchanged (the same object), so fingerprints of existing datasets hold


def _suggest(spec: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(spec, names, n=5, cutoff=0.5)
    if not close:  # fall back to names that share the last segment, then to a sample
        tail = spec.rsplit(".", 1)[-1]
        close = [n for n in names if n.rsplit(".", 1)[-1] == tail][:5]
    if close:
        return "Did you mean: " + ", ".join(repr(n) for n in close) + "?"
    sample = ", ".join(repr(n) for n in names[:8])
    return f"Names in this model start with: {sample}{', ...' if len(names) > 8 else ''}."


def resolve_modules(
    model: nn.Module, specs: ModuleSpec | Iterable[ModuleSpec]
) -> dict[str, nn.Module]:
    """Resolve names, glob patterns and module classes to ``{name: module}``.

    Parameters
    ----------
    model
        The model, possibly wrapped in ``DataParallel``/``DistributedDataParallel`` or
        compiled with ``torch.compile``; names are those of the model inside the wrappers.
    specs
        One spec or a list of them: an exact dotted name as in ``model.named_modules()``
        (``""`` is the model itself), a glob pattern (``"encoder.layer.*.output"``: ``*`` matches
        one name segment, ``**`` any number; never the model itself), an ``nn.Module``
        subclass (every instance), or a
        submodule object (``model.encoder``; its name in ``model``).

    Returns
    -------
    dict
        Selected modules in the order of ``specs`` (a pattern or type expands in
        ``named_modules()`` order), each once.

    Raises
    ------
    TypeError
        ``model`` is not an ``nn.Module`` or a spec is not a string, module class or module.
    ModuleSelectionError
        A spec selects nothing (the message lists the closest real names), or a module object
        is not part of ``model``.

    Examples
    --------
    >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    >>> list(resolve_modules(model, ["0", nn.ReLU]))
    ['0', '1']
    >>> list(resolve_modules(model, model[2]))
    ['2']
    """
    if not isinstance(model, nn.Module):
        raise InputTypeError(
            f"hookscope records torch.nn.Module objects; got {type(model).__name__}. "
            "Pass the model itself (not its output or state_dict)."
        )
    if isinstance(specs, str | type | nn.Module):  # one spec (an nn.Sequential is one module)
        specs = [specs]
    specs = list(specs)
    if not specs:
        raise ModuleSelectionError(
            "No modules were selected: pass at least one name, pattern or module class "
            "(hookscope.summary(model, example_input) lists the names)."
        )
    inner, prefix = unwrap(model)
    specs = [_name_of(s, model, inner) if isinstance(s, nn.Module)
             else _strip_wrapper_prefix(s, prefix) if isinstance(s, str) else s for s in specs]
    if all(isinstance(s, str) and not _GLOB.search(s) for s in specs):
        # Exact names only: look them up without walking every module of a large model.
        found = {s: _lookup(inner, s) for s in specs}
        if None not in found.values() and len({id(m) for m in found.values()}) == len(found):
            return found  # else fall through to the walk, which explains what is wrong
    named = dict(inner.named_modules(remove_duplicate=False))
    names = list(named)
    chosen: dict[str, None] = {}  # insertion-ordered set
    explicit: set[str] = set()  # exact names the user wrote
    for spec in specs:
        if isinstance(spec, type) and issubclass(spec, nn.Module):
            hits = [n for n, m in named.items() if isinstance(m, spec)]
            if not hits:
                types = sorted({type(m).__name__ for m in named.values()})
                raise ModuleSelectionError(
                    f"No module of type {spec.__name__} in {type(inner).__name__}. "
                    f"Types present: {', '.join(types)}."
                )
        elif isinstance(spec, str):
            if spec in named:
                hits = [spec]
            elif _GLOB.search(spec):
                rx = _glob_regex(spec)
                hits = [n for n in names if n and rx.match(n)]  # (the model itself: "")
                if not hits:
                    raise ModuleSelectionError(
                        f"Pattern {spec!r} matches no module of {type(inner).__name__} "
                        f"('*' matches one dotted segment, '**' several). {_suggest(spec, names)}"
                    )
            else:
                raise ModuleSelectionError(
                    f"No module named {spec!r} in {type(inner).__name__}. {_suggest(spec, names)}"
                )
        else:
            raise InputTypeError(
                f"Cannot select modules with {describe_spec(spec)} ({type(spec).__name__}): use "
                "a dotted name, a glob pattern, an nn.Module subclass such as nn.LSTM, or a "
                "submodule of the model."
            )
        if isinstance(spec, str) and spec in named:
            explicit.add(spec)
        chosen.update(dict.fromkeys(hits))
    return _one_name_each(chosen, named, explicit)


def _one_name_each(chosen: dict[str, None], named: dict[str, nn.Module],
                   explicit: set[str]) -> dict[str, nn.Module]:
    """One name per module object: a module under two attribute names (``model.b =
    model.a``) would record every call twice (and stack two edits).  A pattern or type keeps
    its first name; two exact names of one module are an error."""
    out: dict[str, nn.Module] = {}
    first: dict[int, str] = {}
    for n in chosen:
        m = named[n]
        seen = first.get(id(m))
        if seen is None:
            first[id(m)] = n
            out[n] = m
        elif n in explicit and seen in explicit:
            raise ModuleSelectionError(
                f"{seen!r} and {n!r} are the same module (one object under two names): "
                "select it once; every call of it is recorded under that name.")
    return out
