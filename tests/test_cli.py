"""The README's first command, and `hookscope summary` on saved files."""

from __future__ import annotations

import subprocess
import sys

import torch

from hookscope.cli import main


def test_python_m_hookscope_demo_runs():
    done = subprocess.run([sys.executable, "-m", "hookscope", "demo"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Recording of NLIEncoderFeedforward" in done.stdout
    assert "hypothesis" in done.stdout and "[:, -1, :]" in done.stdout


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
