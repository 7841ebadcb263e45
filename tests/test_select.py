"""Module selection: names, globs, types, wrappers, helpful errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hookscope as hs
from hookscope.errors import ModuleSelectionError
from hookscope.select import resolve_modules


@pytest.fixture
def layered():
    layer = lambda: nn.ModuleDict({"attention": nn.Linear(2, 2), "output": nn.Linear(2, 2)})  # noqa: E731
    return nn.ModuleDict({"encoder": nn.ModuleDict({"layer": nn.ModuleList([layer(), layer()])}),
                          "pooler": nn.LSTM(2, 2)})


def test_glob_star_is_one_segment(layered):
    assert list(resolve_modules(layered, "encoder.layer.*.output")) == [
        "encoder.layer.0.output", "encoder.layer.1.output"]
    assert list(resolve_modules(layered, "encoder.**.attention")) == [
        "encoder.layer.0.attention", "encoder.layer.1.attention"]
    assert list(resolve_modules(layered, "encoder.layer.[1]")) == ["encoder.layer.1"]


def test_mixes_keep_the_order_given_without_duplicates(layered):
    got = resolve_modules(layered, ["pooler", nn.LSTM, "encoder.layer.1.output",
                                    "encoder.layer.0"])
    assert list(got) == ["pooler", "encoder.layer.1.output", "encoder.layer.0"]
    assert list(resolve_modules(layered, ["encoder.layer.1", "encoder.layer.0"])) == [
        "encoder.layer.1", "encoder.layer.0"]


def test_unknown_name_suggests_close_ones(layered):
    with pytest.raises(KeyError, match=r"encoder.layer.0.output"):
        resolve_modules(layered, "encoder.layer.0.ouput")
    with pytest.raises(KeyError, match=r"No module named 'pooler.weight_ih_l0'"):
        resolve_modules(layered, "pooler.weight_ih_l0")  # a parameter, not a module


def test_empty_pattern_and_type_selections_are_errors(layered):
    with pytest.raises(ModuleSelectionError, match="matches no module"):
        resolve_modules(layered, "decoder.*")
    with pytest.raises(ModuleSelectionError, match="No module of type GRU.*LSTM"):
        resolve_modules(layered, nn.GRU)
    with pytest.raises(ModuleSelectionError, match="No modules were selected"):
        resolve_modules(layered, [])
    with pytest.raises(TypeError, match="dotted name"):
        resolve_modules(layered, [3])


def test_ddp_style_prefix_is_looked_through(layered):
    wrapped = nn.DataParallel(layered)
    assert list(resolve_modules(wrapped, ["module.pooler", "encoder.layer.0.output"])) == [
        "pooler", "encoder.layer.0.output"]


def test_module_objects_select_by_their_names(layered):
    import torch

    import hookscope as hs

    enc = layered["encoder"]["layer"]
    assert list(resolve_modules(layered, [enc[1]["output"], "pooler"])) == [
        "encoder.layer.1.output", "pooler"]
    assert list(resolve_modules(layered, enc)) == ["encoder.layer"]  # a container is one module
    assert list(resolve_modules(layered, layered)) == [""]
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    with hs.record(model, [model[0]], calls={model[0]: ["x"]}) as rec:
        model(torch.randn(4, 2))
    assert rec["0", "x"].tensor.shape == (4, 3)
    wrapped = nn.DataParallel(model)
    assert list(resolve_modules(wrapped, [model[1], wrapped])) == ["1", ""]


def test_a_foreign_module_object_is_a_short_clear_error(layered):
    import torch

    import hookscope as hs

    stranger = nn.Linear(2, 2)
    with pytest.raises(ModuleSelectionError, match="Linear object .* is not a submodule") as info:
        resolve_modules(layered, [stranger])
    assert "in_features" not in str(info.value)  # the module is named, not printed
    model = nn.Sequential(nn.Linear(2, 3))
    with pytest.raises(ModuleSelectionError, match="calls= key a Linear object"):
        hs.record(model, ["0"], calls={stranger: ["x"]})
    with pytest.raises(TypeError, match=r"\.\.\. \(Tensor\)") as info:
        resolve_modules(layered, [torch.zeros(100, 100)])
    assert len(str(info.value)) < 250


def test_module_tree_lists_what_modules_lists_with_first_parents():
    """One recursive walk replaces model.modules() in every block: same modules, same order,
    shared modules once (under their first parent), None children skipped."""
    from hookscope.select import module_tree

    shared = nn.Linear(2, 2)
    inner = nn.Sequential(shared, nn.ReLU())
    model = nn.Sequential(inner, nn.Sequential(shared, inner), nn.LSTM(2, 2))
    model.register_module("gone", None)
    tree = module_tree(model)
    assert [m for m, _ in tree] == list(model.modules())
    parents = {id(m): p for m, p in tree}
    assert parents[id(shared)] is inner and parents[id(inner)] is model
    assert parents[id(model)] is None


class _Aliased(nn.Module):
    """One Linear under two attribute names (model.b = model.a), called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(2, 2)
        self.b = self.a
        self.c = nn.Linear(2, 2)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


def test_a_module_under_two_names_is_selected_once():
    """A type or pattern selected both names: each call was recorded twice, and edits of both
    names stacked on every call."""
    model = _Aliased()
    assert list(resolve_modules(model, [nn.Linear])) == ["a", "c"]
    assert list(resolve_modules(model, "*")) == ["a", "c"]  # (a pattern never selects "")
    assert list(resolve_modules(model, ["b"])) == ["b"]  # either name, once
    with pytest.raises(ModuleSelectionError, match="'a' and 'b' are the same module"):
        resolve_modules(model, ["a", "b"])
    x = torch.randn(3, 2)
    got = []
    handle = model.a.register_forward_hook(lambda m, i, o: got.append(o.detach().clone()))
    with hs.record(model, [nn.Linear]) as rec:
        model(x)
    handle.remove()
    assert [c.call for c in rec.calls("a")] == [0, 1]
    assert set(rec.to_frame().columns.get_level_values(0)) == {"a", "c"}
    for cap, ref in zip(rec.calls("a"), got[:2], strict=True):
        assert torch.equal(cap.tensor, ref)


def test_an_edit_named_by_the_other_name_of_a_recorded_module_is_its_edit():
    model = _Aliased()
    x = torch.randn(3, 2)
    with hs.record(model, ["a"], edit={"b": lambda t: t * 0}) as rec:
        y = model(x)
    assert [c.call for c in rec.calls("a")] == [0, 1]
    assert all(not c.tensor.any() for c in rec.calls("a"))  # (edited value recorded)
    assert torch.allclose(y, model.c(torch.zeros(3, 2)))
