"""summary(): names, call counts, shapes, parameters — checked against the model itself."""

from __future__ import annotations

import torch

import hookscope as hs


def test_summary_of_the_story_model(story_model, story_batch):
    table = hs.summary(story_model, story_batch)
    assert list(table.columns) == ["module", "type", "calls", "shape", "dtype", "params"]
    assert table.module.tolist() == [n for n, _ in story_model.named_modules()]
    row = table.set_index("module")
    assert row.loc["encoder", "calls"] == 2 and row.loc["pooling", "calls"] == 2
    assert row.loc["aggregation", "shape"] == str((len(story_batch), 8 * 16))
    assert row.loc["", "params"] == sum(p.numel() for p in story_model.parameters())
    assert row.loc["encoder", "type"] == "LSTMEncoder"
    text = hs.format_summary(table)
    assert "LSTMEncoder" in text and "aggregation" in text
    assert not any(m._forward_hooks for m in story_model.modules())


def test_summary_marks_modules_that_never_ran():
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(2, 2), "b": torch.nn.Linear(2, 2)})
    model.forward = lambda x: model["a"](x)
    table = hs.summary(model, torch.randn(1, 2)).set_index("module")
    assert table.loc["b", "calls"] == 0 and table.loc["b", "shape"] == "never ran"
