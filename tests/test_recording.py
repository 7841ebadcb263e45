"""Recording and Capture: display in terminals and notebooks."""

from __future__ import annotations

import pytest
import torch

import hookscope as hs


def test_html_and_text_display_of_recordings(story_model, story_batch):
    from tests.test_story import first_five_minutes

    rec, _ = first_five_minutes(story_model, story_batch)
    html = rec._repr_html_()
    assert "<table" in html and "hypothesis" in html and "mean" in html
    cap = rec["encoder", "premise"]
    stats = cap._stats()
    real = cap.tensor[cap.mask]  # statistics over real tokens only, not padding
    assert abs(stats["mean"] - float(real.mean())) < 1e-6
    assert abs(stats["max"] - float(real.max())) < 1e-6
    assert "<table" in cap._repr_html_()
    text = repr(rec)
    assert text.startswith("Recording of NLIEncoderFeedforward") and "premise" in text
    assert "lengths known" in repr(cap)


def test_html_display_with_a_module_that_never_ran():
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(2, 2), "b": torch.nn.Linear(2, 2)})
    with hs.record(model, ["a", "b"]) as rec:
        model["a"](torch.ones(1, 2))
    html = rec._repr_html_()
    assert "never ran" in html and html.count("<tr") == 3  # header + two modules


def test_a_missing_label_is_blank_in_the_terminal_as_in_html():
    import torch

    import hookscope as hs

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    with hs.record(model, ["0"]) as rec:
        model(torch.randn(2, 4))
    assert "None" not in repr(rec) and "<NA>" not in repr(rec)
    assert "None" not in rec._repr_html_()


def test_cat_of_steps_in_other_dtypes_keeps_every_value():
    """int64 beside float32 was concatenated as float32: 2**40 + 1 became 2**40 (to_frame,
    in float64, kept it)."""
    model = torch.nn.Sequential(torch.nn.Identity())
    with hs.record(model, ["0"]) as rec:
        model(torch.tensor([[2**40 + 1]]))
        model(torch.tensor([[0.5]]))
        model(torch.tensor([[1.5]], dtype=torch.bfloat16))
    cat = rec.cat("0").tensor
    assert cat.dtype == torch.float64 and cat[:, 0].tolist() == [2**40 + 1, 0.5, 1.5]
    with hs.record(model, ["0"]) as rec:  # floats alone: PyTorch's promotion, exact
        model(torch.tensor([[0.25]], dtype=torch.bfloat16))
        model(torch.tensor([[0.5]]))
    assert rec.cat("0").tensor.dtype == torch.float32


def test_cat_refuses_steps_whose_first_tensor_is_another_part_of_the_output():
    """{"main": None or a tensor, "aux": a tensor}: cat mixed main and aux rows silently."""

    class Optional(torch.nn.Module):
        def forward(self, x, main):
            return {"main": x * 2 if main else None, "aux": x}

    model = Optional()
    with hs.record(model, [""]) as rec:
        model(torch.ones(2, 4), True)
        model(torch.ones(2, 4), False)
    with pytest.raises(hs.InputError, match=r"output\['aux'\] in some steps.*pick="):
        rec.cat("")
