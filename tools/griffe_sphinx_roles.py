"""Griffe extension for the docs site: Sphinx roles in docstrings become links.

The docstrings use Sphinx roles (``:class:`~hookscope.Recording```), which read well in
``help()`` and IDEs but which mkdocstrings would print literally.  This extension rewrites each
role into inline code wrapped in an optional cross-reference: a link where the target is on the
site, plain code where it is not (``torch.nn.Module``), never a warning.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|data|exc|obj|const):`([^`]+)`")


def _replace(match: re.Match[str]) -> str:
    target = match.group(1).strip()
    short = target.startswith("~")
    target = target.lstrip("~.")
    shown = target.rsplit(".", 1)[-1] if short else target
    identifier = target if target.split(".", 1)[0] in ("hookscope", "torch", "numpy", "pandas") \
        else f"hookscope.{target}"
    return f'<autoref identifier="{identifier}" optional><code>{shown}</code></autoref>'


def rewrite(text: str) -> str:
    """Replace every Sphinx role in ``text`` by an optional cross-reference.

    >>> rewrite("a :class:`~hookscope.Recording` b")
    'a <autoref identifier="hookscope.Recording" optional><code>Recording</code></autoref> b'
    """
    return ROLE.sub(_replace, text)


class SphinxRoles(griffe.Extension):
    """Rewrite the roles of every docstring griffe loads."""

    def on_instance(self, *, obj: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
