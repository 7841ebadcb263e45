"""The benchmarks stay runnable (their numbers are reported, never asserted here)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_overhead_benchmark_quick_mode(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("overhead", ROOT / "benchmarks" / "overhead.py")
    overhead = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(overhead)
    out = tmp_path / "overhead.json"
    assert overhead.main(["--quick", "--repeats", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    variants = {(r["case"].split(" (")[0], r["variant"]) for r in data["results"]}
    assert ("TransformerEncoder", "hookscope stop=True, layer 0 of 6") in variants
    assert ("BiLSTM NLI", "hookscope.record, 3 modules") in variants
    assert all(r["ratio_to_plain"][0] > 0 for r in data["results"])
    assert data["machine"]["torch"] == __import__("torch").__version__
    assert "| plain forward |" in capsys.readouterr().out


def test_analysis_benchmark_quick_mode(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("analysis_bench",
                                                  ROOT / "benchmarks" / "analysis.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "analysis.json"
    assert bench.main(["--quick", "--json", str(out)]) == 0
    whats = [r["what"] for r in json.loads(out.read_text())["results"]]
    assert any(w.startswith("nearest_neighbors") for w in whats)
    assert any("scipy cdist" in w for w in whats)
    assert any("to_frame('long')" in w for w in whats)
    assert "M values/s" in capsys.readouterr().out


def test_dataset_benchmark_quick_mode(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("dataset_bench",
                                                  ROOT / "benchmarks" / "dataset.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "dataset.json"
    assert bench.main(["--quick", "--json", str(out)]) == 0
    whats = [r["what"] for r in json.loads(out.read_text())["results"]]
    assert any("record_dataset" in w for w in whats)
    assert any(w.startswith("peak RSS") for w in whats)
    assert "rows/s" in capsys.readouterr().out
