"""Validation and application of unsort permutations (property tests), and tree walking."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import hookscope as hs
from hookscope.errors import UnsortError
from hookscope.structure import as_permutation, map_leaves, packed_lengths


@st.composite
def batches(draw):
    n = draw(st.integers(1, 12))
    perm = draw(st.permutations(range(n)))
    width = draw(st.integers(1, 4).filter(lambda w: w != n))
    return n, list(perm), width


@settings(max_examples=60, deadline=None)
@given(batches())
def test_unsort_round_trip(case):
    n, perm, width = case
    original = torch.arange(n * width, dtype=torch.float32).reshape(n, width)
    order = torch.argsort(torch.tensor(perm))  # the caller sorted with some order ...
    sorted_batch = original[order]
    orig_idx = torch.argsort(order)            # ... and keeps the inverse to restore it
    model = nn.Identity()
    with hs.record(model, [""], unsort={"": orig_idx.numpy()}) as rec:
        model(sorted_batch)
    assert torch.equal(rec[""].tensor, original)
    assert torch.equal(as_permutation(perm, "x"), torch.tensor(perm))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-3, 15), min_size=1, max_size=12))
def test_invalid_permutations_raise(values):
    is_perm = sorted(values) == list(range(len(values)))
    if is_perm:
        assert as_permutation(values, "m").tolist() == values
    else:
        with pytest.raises(UnsortError, match="not a permutation"):
            as_permutation(values, "m")


@pytest.mark.parametrize("bad, message", [
    (torch.tensor([[0, 1]]), "1-D"),
    (np.array([0.0, 1.0]), "integers"),
    ([True, False], "integers"),
    ([0, 0, 1], "repeated: \\[0\\]"),
])
def test_bad_permutation_messages(bad, message):
    with pytest.raises(UnsortError, match=message):
        hs.record(nn.Identity(), [""], unsort={"": bad})


def test_wrong_length_permutation_names_module_and_call():
    model = nn.Identity()
    with pytest.raises(UnsortError, match=r"'' call 0.*length 3"), hs.record(
            model, [""], unsort={"": [1, 0, 2]}) as rec:
        model(torch.randn(4, 5))
    assert rec.steps == 1 and not model._forward_hooks  # raised inside forward; hooks gone


def test_map_leaves_rebuilds_containers():
    a = torch.ones(2)
    obj = {"x": [a, (a, 1)], "y": None}
    out = map_leaves(obj, lambda p, t: t * 2)
    assert out is not obj and out["x"] is not obj["x"]
    assert torch.equal(out["x"][1][0], a * 2) and out["x"][1][1] == 1 and out["y"] is None


def test_packed_lengths_without_padding():
    seqs = [torch.ones(n) for n in (2, 5, 1, 4)]
    packed = torch.nn.utils.rnn.pack_sequence(seqs, enforce_sorted=False)
    assert packed_lengths(packed).tolist() == [2, 5, 1, 4]
