"""The benchmarks stay runnable (their numbers are reported, never asserted here)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    """benchmarks/<name>.py as a module, imported as when the script runs."""
    if str(ROOT / "benchmarks") not in sys.path:  # its helpers
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(f"bench_{name}",
                                                  ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _quick_run(name: str, tmp_path: Path, *extra: str) -> dict:
    module = _load(name)
    out = tmp_path / f"{name}.json"
    assert module.main(["--quick", *extra, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_overhead_benchmark_quick_mode(tmp_path, capsys):
    data = _quick_run("overhead", tmp_path, "--repeats", "1")
    variants = {(r["case"].split(" (")[0], r["variant"]) for r in data["results"]}
    assert ("TransformerEncoder", "hookscope stop=True, layer 0 of 6") in variants
    assert ("BiLSTM NLI", "hookscope.record, 3 modules") in variants
    assert all(r["ratio_to_plain"][0] > 0 for r in data["results"])
    assert data["machine"]["torch"] == torch.__version__
    assert "| plain forward |" in capsys.readouterr().out


def test_analysis_benchmark_quick_mode(tmp_path, capsys):
    whats = [r["what"] for r in _quick_run("analysis", tmp_path)["results"]]
    assert any(w.startswith("nearest_neighbors") for w in whats)
    assert any("scipy cdist" in w for w in whats)
    assert any("to_frame('long')" in w for w in whats)
    assert "M values/s" in capsys.readouterr().out


def test_dataset_benchmark_quick_mode(tmp_path, capsys):
    whats = [r["what"] for r in _quick_run("dataset", tmp_path)["results"]]
    assert any("record_dataset" in w for w in whats)
    assert any(w.startswith("peak RSS") for w in whats)
    assert "rows/s" in capsys.readouterr().out


def test_peers_benchmark_quick_mode(tmp_path, capsys, recwarn):
    data = _quick_run("peers", tmp_path)
    ours = data["correctness"]["hookscope"]
    assert ours == {"shared": "both calls", "packed": "padded, original order",
                    "inplace": "intact", "exception": "clean"}
    assert data["correctness"]["hand-written hooks (reference)"]["shared"] == "both calls"
    assert any(t["tool"] == "hookscope" and "ratio" in t for t in data["timing"])
    assert "## Correctness" in capsys.readouterr().out


def test_gpu_benchmark_quick_mode(tmp_path, capsys):
    """Without CUDA, --quick runs the same code on the CPU at tiny sizes and exits cleanly."""
    data = _quick_run("gpu", tmp_path, "--repeats", "1")
    variants = {r["variant"] for r in data["results"] if "variant" in r}
    assert {"plain forward", "raw hooks + clone", "hs.record, stop=True after layer 0",
            'hs.record, unsort=, device="cpu"', "record_dataset (binary)"} <= variants
    assert data["machine"]["torch"] == torch.__version__
    out = capsys.readouterr().out
    assert out.startswith("device: ") and "| plain forward |" in out


def test_gpu_profile_quick_mode(capsys):
    """gpu_check.sh's third step: without CUDA, --quick profiles the same cases on the CPU."""
    assert _load("gpu_profile").main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("device: ") and "### host and wall time per call: BiLSTM" in out
    assert "| hs.record, 2 layers |" in out  # (the BERT of --quick has 2)
    assert "### record_dataset, 3 batches: 1 calls, by host time" in out


def test_gpu_ab_quick_mode(tmp_path, capsys):
    """Two versions side by side: here the package against a copy of itself."""
    import shutil

    copy = tmp_path / "hookscope"
    shutil.copytree(ROOT / "hookscope", copy, ignore=shutil.ignore_patterns("__pycache__"))
    try:
        assert _load("gpu_ab").main(["--quick", "--old", str(copy)]) == 0
    finally:
        sys.modules.pop("hookscope_old", None)
        for name in [m for m in sys.modules if m.startswith("hookscope_old.")]:
            sys.modules.pop(name)
    out = capsys.readouterr().out
    assert "| hs.record (--old) |" in out and "### story's BiLSTM" in out
