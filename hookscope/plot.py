"""Plots for notebooks (matplotlib, an optional extra: ``pip install hookscope[plot]``).

Each function draws on a given or new ``Axes`` and returns it; matplotlib is imported only when
a function is called.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from .errors import InputError

__all__ = ["cka_matrix", "neighborhood_change_chart", "similarity_heatmap"]


def _pyplot() -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("hookscope.plot needs matplotlib: pip install matplotlib "
                          "(or pip install 'hookscope[plot]').") from None
    return plt


def _axes(ax: Any, size: tuple[float, float]) -> Any:
    if ax is not None:
        return ax
    return _pyplot().subplots(figsize=size)[1]


def similarity_heatmap(matrix: Any, labels: Sequence[str] | None = None, *, ax: Any = None,
                       title: str = "", vmin: float = -1.0, vmax: float = 1.0) -> Any:
    """A square similarity matrix (e.g. :func:`hookscope.cosine_matrix`) as a heatmap.

    >>> import numpy as np, hookscope.plot as hp
    >>> ax = hp.similarity_heatmap(np.eye(3), ["a", "b", "c"])
    >>> ax.get_xticklabels()[1].get_text()
    'b'
    """
    if isinstance(matrix, pd.DataFrame):
        labels = list(map(str, matrix.index)) if labels is None else labels
        matrix = matrix.to_numpy()
    m = np.asarray(matrix, dtype=float)
    if m.ndim != 2:
        raise InputError(f"matrix must be 2-D, got shape {m.shape}.")
    ax = _axes(ax, (1 + 0.45 * m.shape[1], 1 + 0.45 * m.shape[0]))
    im = ax.imshow(m, vmin=vmin, vmax=vmax, cmap="RdBu_r")
    if labels is not None:
        ax.set_xticks(range(m.shape[1]), labels, rotation=90)
        ax.set_yticks(range(m.shape[0]), labels)
    ax.figure.colorbar(im, ax=ax, shrink=0.8)
    ax.set_title(title)
    return ax


def cka_matrix(table: pd.DataFrame, *, ax: Any = None, title: str = "linear CKA") -> Any:
    """A :func:`hookscope.similarity_matrix` table (layer x layer) with values written in."""
    ax = similarity_heatmap(table, ax=ax, title=title, vmin=0.0, vmax=1.0)
    m = table.to_numpy()
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8)
    return ax


def neighborhood_change_chart(change: pd.DataFrame, *, ax: Any = None, top: int = 20,
                              title: str = "neighbourhood overlap") -> Any:
    """Per-item overlap from :func:`hookscope.neighborhood_change`, lowest first (the items
    whose neighbourhood changed most)."""
    if "overlap" not in change:
        raise InputError("expects the DataFrame of hookscope.neighborhood_change().")
    rows = change["overlap"].sort_values().head(top)
    ax = _axes(ax, (7, 0.3 * len(rows) + 1))
    ax.barh(range(len(rows)), rows.to_numpy())
    ax.set_yticks(range(len(rows)), [str(i)[:60] for i in rows.index])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("overlap of k nearest neighbours (1 = unchanged)")
    ax.set_title(title)
    return ax
