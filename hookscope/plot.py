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

__all__ = ["cka_matrix", "neighbor_diagram", "neighborhood_change_chart", "overlap_histogram",
           "similarity_heatmap"]


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


def _short(text: Any, width: int = 50) -> str:
    text = str(text)
    return text if len(text) <= width else text[: width - 1] + "\u2026"


def similarity_heatmap(matrix: Any, labels: Sequence[str] | None = None, *, ax: Any = None,
                       title: str = "", vmin: float | None = None,
                       vmax: float | None = None) -> Any:
    """A square similarity matrix (e.g. :func:`hookscope.cosine_matrix`) as a heatmap.

    Every row and column is labelled (``labels``, a DataFrame's index, else its integer
    index).  The colour scale spans the data unless ``vmin``/``vmax`` are given: a diverging
    scale centred on 0 where the data has both signs, a sequential one otherwise.

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
    if labels is not None and len(labels) != m.shape[0]:
        raise InputError(f"{len(labels)} labels for a matrix of {m.shape[0]} rows.")
    labels = [_short(x) for x in (labels if labels is not None else range(m.shape[0]))]
    finite = m[np.isfinite(m)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if lo < 0 < hi:  # both signs: diverging, centred on 0
        bound = max(-lo, hi)
        cmap, lo, hi = "RdBu_r", -bound, bound
    else:
        cmap = "viridis"
    vmin, vmax = lo if vmin is None else vmin, hi if vmax is None else vmax
    width = max(map(len, labels)) * 0.07
    ax = _axes(ax, (2 + width + 0.3 * m.shape[1], 1.5 + width + 0.3 * m.shape[0]))
    im = ax.imshow(m, vmin=vmin, vmax=vmax, cmap=cmap)
    ax.set_xticks(range(m.shape[1]), labels[: m.shape[1]], rotation=90)
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
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="black" if m[i, j] > 0.6 else "white")
    if table.index.name:
        ax.set_xlabel(table.index.name)
        ax.set_ylabel(table.index.name)
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


def _change_table(change: Any) -> pd.DataFrame:
    needed = {"before", "after", "overlap"}
    if not isinstance(change, pd.DataFrame) or not needed <= set(change.columns):
        raise InputError("expects the DataFrame of hookscope.neighborhood_change().")
    return change


def overlap_histogram(change: pd.DataFrame, *, ax: Any = None,
                      title: str = "how much each neighbourhood changed") -> Any:
    """How many items kept 0, 1, ..., k of their k nearest neighbours, from
    :func:`hookscope.neighborhood_change`, with the mean overlap marked.

    >>> import numpy as np, hookscope as hs, hookscope.plot as hp
    >>> x = np.random.default_rng(0).normal(size=(30, 4))
    >>> ax = hp.overlap_histogram(hs.neighborhood_change(x, x + 0.5, k=3))
    >>> ax.get_xlabel()
    'neighbours kept (of 3)'
    """
    change = _change_table(change)
    k = len(change["before"].iloc[0])
    kept = np.rint(change["overlap"].to_numpy() * k).astype(int)
    counts = np.bincount(kept, minlength=k + 1)
    ax = _axes(ax, (6, 3.5))
    bars = ax.bar(range(k + 1), counts, color="#4c72b0")
    for label in ax.bar_label(bars, fontsize=8, padding=2):
        label.set_bbox({"facecolor": "white", "edgecolor": "none", "pad": 1})
        label.set_zorder(3)  # readable over the mean line
    ax.set_xticks(range(k + 1))
    ax.set_xlabel(f"neighbours kept (of {k})")
    ax.set_ylabel("items")
    ax.axvline(kept.mean(), color="#c44e52", linestyle="--",
               label=f"mean: {kept.mean():.1f} kept (overlap {kept.mean() / k:.2f})")
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    ax.set_ylim(0, counts.max() * 1.15)
    ax.set_title(title)
    return ax


def neighbor_diagram(change: pd.DataFrame, item: Any, *, ax: Any = None,
                     before: str = "before", after: str = "after", width: int = 60) -> Any:
    """One item's k nearest neighbours in two columns, ``before`` and ``after``
    (:func:`hookscope.neighborhood_change`): a neighbour kept in both is joined by a grey line,
    one that left is red, one that entered is green.

    >>> import numpy as np, hookscope as hs, hookscope.plot as hp
    >>> x = np.random.default_rng(0).normal(size=(10, 4))
    >>> ax = hp.neighbor_diagram(hs.neighborhood_change(x, x ** 3, k=3), 0)
    >>> ax.get_title(loc="left")
    '0: kept 3 of 3 neighbours'
    """
    change = _change_table(change)
    if item not in change.index:
        raise InputError(f"{_short(item)!r} is not an item of this neighbourhood table.")
    row = change.loc[item]
    old, new = list(row["before"]), list(row["after"])
    k = len(old)
    colours = {"kept": "#555555", "left": "#c44e52", "entered": "#2e8b57"}
    ax = _axes(ax, (10, 0.35 * k + 1))
    ax.set_xlim(0, 1)
    ax.set_ylim(k - 0.4, -1.3)
    ax.axis("off")
    # The columns meet in the middle, so the lines always touch their sentences.
    ax.text(0.43, -0.9, before, fontweight="bold", fontsize=9, ha="right")
    ax.text(0.57, -0.9, after, fontweight="bold", fontsize=9)
    for i, name in enumerate(old):
        ax.text(0.43, i, f"{_short(name, width)}  {i + 1}", fontsize=8, va="center", ha="right",
                color=colours["kept" if name in new else "left"])
        if name in new:
            ax.plot([0.44, 0.56], [i, new.index(name)], color=colours["kept"], linewidth=1)
    for j, name in enumerate(new):
        ax.text(0.57, j, f"{j + 1}  {_short(name, width)}", fontsize=8, va="center",
                color=colours["kept" if name in old else "entered"])
    kept = sum(name in new for name in old)
    ax.set_title(f"{_short(item, 70)}: kept {kept} of {k} neighbours", fontsize=10, loc="left",
                 fontweight="bold")
    ax.set_title("red: left the neighbourhood, green: entered it" if kept < k else "",
                 fontsize=8, loc="right", color="#555555")
    return ax
