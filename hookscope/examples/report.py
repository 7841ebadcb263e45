"""A self-contained HTML report for the demos: one file with its CSS and images inside, that
can be moved, attached to an email or opened offline.

Tables are plain HTML with readable cells (lists joined, floats rounded); a long table can be
folded away and filtered as you type.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["Report", "cell_text", "readable", "save_figure", "write_frame"]

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       max-width: 1100px; margin: 2em auto; padding: 0 1em; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.25em; margin-top: 1.8em;
     border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
p.lead { color: #555; margin-top: 0; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.6em 0; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.6em; text-align: left; vertical-align: top;
}
.nowrap td { white-space: nowrap; }
th { background: #f3f5f8; position: sticky; top: 0; }
tr:nth-child(even) td { background: #fafbfc; }
.note { background: #fff8e5; border-left: 4px solid #f0b400; padding: 0.6em 0.9em; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
details { margin: 0.8em 0; } summary { cursor: pointer; font-weight: 600; }
input[type=search] { margin: 0.5em 0; padding: 0.3em 0.5em; width: 24em; }
code { background: #f3f5f8; padding: 0 0.25em; border-radius: 3px; }
.scroll { max-height: 32em; overflow: auto; }
"""

_LINE = "\x1f"  # joins a list's entries in a cell; a line break in HTML

_FILTER_JS = """
function hsFilter(box, id) {
  const words = box.value.toLowerCase();
  for (const row of document.getElementById(id).tBodies[0].rows) {
    row.hidden = !row.textContent.toLowerCase().includes(words);
  }
}
"""


def cell_text(value: Any, digits: int = 3, sep: str = "; ") -> str:
    """A table cell as a reader expects it: lists joined with ``sep``, floats rounded, NaN as
    ``NaN`` and a missing value blank.

    >>> cell_text(["a man", "a dog"]), cell_text(0.123456), cell_text(float("nan")), cell_text(None)
    ('a man; a dog', '0.123', 'NaN', '')
    """
    if isinstance(value, list | tuple):
        return sep.join(map(str, value))
    if value is None or value is pd.NA:
        return ""
    if isinstance(value, float):
        return "NaN" if value != value else f"{value:.{digits}f}"
    return str(value)


def readable(frame: pd.DataFrame, digits: int = 3, sep: str = "; ") -> pd.DataFrame:
    """``frame`` with every cell as :func:`cell_text` writes it (for printing and HTML)."""
    return frame.map(lambda v: cell_text(v, digits, sep))


class Report:
    """An HTML page built section by section; :meth:`write` saves it as one file."""

    def __init__(self, title: str, lead: str = "") -> None:
        self.title = title
        self.parts = [f"<h1>{html.escape(title)}</h1>"]
        if lead:
            self.parts.append(f'<p class="lead">{html.escape(lead)}</p>')
        self._tables = 0

    def heading(self, text: str) -> None:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def text(self, text: str, *, note: bool = False) -> None:
        """A paragraph of plain text (escaped); ``note=True`` sets it apart."""
        cls = ' class="note"' if note else ""
        self.parts.append(f"<p{cls}>{html.escape(text)}</p>")

    def html(self, fragment: str) -> None:
        """Raw HTML, for fragments that are already HTML (``Recording._repr_html_``)."""
        self.parts.append(fragment)

    def table(self, frame: pd.DataFrame, *, index: bool = True, digits: int = 3,
              fold: str | None = None) -> None:
        """A DataFrame as a table of readable cells.  With ``fold`` (the summary line) the
        table is folded away and gets a filter box."""
        self._tables += 1
        table_id = f"table{self._tables}"
        if index:  # the index as ordinary columns: no separate row for its name
            frame, index = frame.rename_axis(columns=None).reset_index(), False
        body = readable(frame, digits, sep=_LINE).to_html(
            index=index, escape=True, table_id=table_id, border=0
        ).replace(_LINE, "<br>")  # a list: one entry per line
        if fold is None:
            self.parts.append(body)
            return
        self.parts.append(
            f"<details><summary>{html.escape(fold)}</summary>"
            f'<input type="search" placeholder="filter rows: type any words" '
            f"oninput=\"hsFilter(this, '{table_id}')\">"
            f'<div class="scroll">{body}</div></details>')

    def figure(self, png: bytes, alt: str) -> None:
        """A PNG embedded in the page (a data URI), so the page needs no other file."""
        data = base64.b64encode(png).decode("ascii")
        self.parts.append(f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
                          "</p>")

    def render(self) -> str:
        return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
                f"<title>{html.escape(self.title)}</title><style>{_CSS}</style>"
                f"<script>{_FILTER_JS}</script></head><body>\n"
                + "\n".join(self.parts) + "\n</body></html>\n")

    def write(self, path: Path, files: list[tuple[Path, str]]) -> list[tuple[Path, str]]:
        """End the page with the list of ``files`` (path, how to read it) and write it to
        ``path``; return ``files`` with the page added."""
        files = [*files, (path, "this page: self-contained, it can be moved or mailed alone")]
        self.heading("Files")
        self.table(pd.DataFrame([(p.name, how) for p, how in files],
                                columns=["file", "how to read it (pandas as pd, hookscope as hs)"]),
                   index=False)
        path.write_text(self.render(), encoding="utf-8")
        return files


def save_figure(fig: Any, path: Path, report: Report, alt: str) -> list[tuple[Path, str]]:
    """Write a matplotlib figure to ``path`` (PNG), embed it in ``report``, close it; return
    the file written.  ``fig`` is None without matplotlib: the report says what to install."""
    if fig is None:
        report.text("(pip install matplotlib for the plots)", note=True)
        return []
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    path.write_bytes(buffer.getvalue())
    report.figure(buffer.getvalue(), alt)
    return [(path, "the figure of report.html, as a PNG image")]


def _has_pyarrow() -> bool:
    import importlib.util

    return importlib.util.find_spec("pyarrow") is not None


def write_frame(frame: pd.DataFrame, stem: Path) -> tuple[Path, str]:
    """Write a (wide) DataFrame as Parquet where pyarrow is installed, else as CSV; return the
    path and the line of pandas that reads it back exactly."""
    if not _has_pyarrow():
        path = stem.with_suffix(".csv")
        frame.to_csv(path)
        rows, cols = frame.index.nlevels, frame.columns.nlevels
        header = list(range(cols)) if cols > 1 else 0
        index_col = list(range(rows)) if rows > 1 else 0
        return path, (f'pd.read_csv("{path.name}", header={header}, index_col={index_col})'
                      f"  # {cols} header rows, {rows} index columns")
    path = stem.with_suffix(".parquet")
    frame.to_parquet(path)
    return path, f'pd.read_parquet("{path.name}")  # index and column levels kept'
