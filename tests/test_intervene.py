"""Editing, patching and gradients, each against an independent reference: the story's
copy-out-of-forward methods run by hand, hand-written hooks, ``torch.autograd.grad`` and
``retain_grad``."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch
from torch.nn import functional

import hookscope as hs
from hookscope.errors import CallCountError, InputError, ModuleSelectionError, NotRecordedError
from tests.conftest import HYPOTHESES, PREMISES, assert_no_hooks
from tests.test_story import bind_reference

CALLS = {"encoder": ["premise", "hypothesis"], "pooling": ["premise", "hypothesis"]}
ENCODER_CALLS = {"encoder": CALLS["encoder"]}


def unsort(batch):
    return {"encoder": [batch.premise_orig_idx, batch.hypothesis_orig_idx]}


def by_example(t):
    """An edit that depends on the batch order: example i scaled by 0.5 * (i + 1)."""
    w = 0.5 * torch.arange(1, t.shape[0] + 1, dtype=t.dtype, device=t.device)
    return t * w.view(-1, *([1] * (t.ndim - 1)))


def classify_by_hand(model, premise, hypothesis):
    """The rest of the story's forward from the encoder outputs (in the original order)."""
    u = model.pooling(premise, batch_first=True)
    v = model.pooling(hypothesis, batch_first=True)
    return model.feedforward(model.aggregation(u, v))


def nll(scores, batch):
    return functional.cross_entropy(scores, batch.y)


# -- editing --------------------------------------------------------------------------------


def test_edit_in_original_order_equals_the_copied_out_methods(story_model, story_batch):
    """The edit sees the premise encodings in the caller's order; the model goes on with them
    in its sorted order: the logits equal the story's methods given the same replacement."""
    bind_reference(story_model)
    seen = []

    def edit(padded, call):
        seen.append(call)
        return by_example(padded)

    with hs.record(story_model, ["encoder", "pooling"], calls=CALLS, unsort=unsort(story_batch),
                   edit={"encoder": {"premise": hs.at(0, edit)}}) as rec:
        scores = story_model(story_batch)
    premise, hypothesis = story_model.get_representations_before_pooling(story_batch)
    expected = classify_by_hand(story_model, by_example(premise), hypothesis)
    assert torch.equal(scores, expected)
    # What is recorded is what the model continued with (after the edit), in original order.
    assert torch.equal(rec["encoder", "premise"].tensor, by_example(premise).detach())
    assert torch.equal(rec["encoder", "hypothesis"].tensor, hypothesis.detach())
    assert seen == [hs.CallInfo("encoder", 0, 0, "premise")]  # the hypothesis call untouched
    assert_no_hooks(story_model)


def test_edit_every_call_with_a_one_argument_function(story_model, story_batch):
    bind_reference(story_model)
    with hs.record(story_model, ["pooling"], edit={"pooling": lambda u: u * 2}):
        scores = story_model(story_batch)
    u, v = story_model.get_representations_after_pooling(story_batch)
    assert torch.equal(scores, story_model.feedforward(story_model.aggregation(u * 2, v * 2)))


def test_every_other_hook_on_the_module_sees_the_edited_value(mlp):
    """The edit hook goes first: an outer recorder and a hand-written hook registered before
    the block see what the model continues with."""
    x = torch.randn(3, 4)
    seen = []
    handle = mlp[0].register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    try:
        with hs.record(mlp, ["0"]) as outer, \
                hs.record(mlp, ["2"], edit={"0": torch.zeros_like}) as inner:
            mlp(x)
    finally:
        handle.remove()
    for value in (outer["0"].tensor, inner["0"].tensor, seen[0]):
        assert torch.equal(value, torch.zeros(3, 8))
    assert "0" in inner  # the edited module is recorded, though not in the list


def test_unsort_and_edit_by_label_and_per_call_lists(story_model, story_batch):
    perms = {"premise": story_batch.premise_orig_idx,
             "hypothesis": story_batch.hypothesis_orig_idx}
    with hs.record(story_model, ["encoder"], calls=ENCODER_CALLS,
                   unsort={"encoder": perms}) as by_label:
        story_model(story_batch)
    with hs.record(story_model, ["encoder"], calls=ENCODER_CALLS,
                   unsort=unsort(story_batch)) as by_list:
        story_model(story_batch)
    assert torch.equal(by_label["encoder", "hypothesis"].tensor,
                       by_list["encoder", "hypothesis"].tensor)
    # A per-call list longer than the calls is an error, not a silently unused edit.
    with pytest.raises(CallCountError, match="2 edit functions"), \
            hs.record(story_model, ["pooling"], edit={"pooling": [None, None]}):
        story_model.pooling(torch.randn(2, 3, 4))


def test_edit_errors_are_clear_and_leave_no_hooks(mlp, story_model, story_batch):
    x = torch.randn(3, 4)
    with pytest.raises(InputError, match="returned None"), \
            hs.record(mlp, ["0"], edit={"0": lambda out: None}):
        mlp(x)
    assert_no_hooks(mlp)
    with pytest.raises(ModuleSelectionError, match="No module named"):
        hs.record(mlp, ["0"], edit={"nonexistent": lambda out: out})
    with pytest.raises(InputError, match=r"shape \(3, 4\), torch.float32"), \
            hs.record(mlp, ["0"], edit={"0": lambda out: out[:, :4]}):
        mlp(x)
    with pytest.raises(InputError, match="torch.float64"), \
            hs.record(mlp, ["0"], edit={"0": lambda out: out.double()}):
        mlp(x)
    scale_seen = []
    with hs.record(mlp, ["0"], edit={"0": lambda out, scale=2.0: scale_seen.append(scale)
                                     or out * scale}):
        mlp(x)
    assert scale_seen == [2.0]  # a defaulted second parameter keeps its default
    with pytest.raises(CallCountError, match="no labels"):
        hs.record(mlp, ["0"], edit={"0": {"premise": lambda out: out}})
    with pytest.raises(hs.InputTypeError, match="function"):
        hs.record(mlp, ["0"], edit={"0": 3})
    # With unsort=, the batch must stay the batch: it is mapped back to the model's order.
    with pytest.raises(InputError, match="keep shape"), hs.record(
            story_model, ["encoder"], calls=ENCODER_CALLS, unsort=unsort(story_batch),
            edit={"encoder": hs.at(0, lambda t: t[:2])}):
        story_model(story_batch)
    assert_no_hooks(story_model)


def test_at_reaches_into_namedtuples_mappings_and_lists():
    from collections import namedtuple

    Pair = namedtuple("Pair", "a b")
    out = {"x": [torch.ones(1), Pair(torch.ones(1), torch.ones(1))]}
    new = hs.at(("x", 1, "b"), lambda t: t * 0)(out, None)
    assert new["x"][1].b.item() == 0 and out["x"][1].b.item() == 1  # a copy, not in place
    assert new["x"][1].a is out["x"][1].a
    with pytest.raises(InputError, match="no part"):
        hs.at(("x", 5), lambda t: t)(out, None)


# -- patching -------------------------------------------------------------------------------


def test_patch_clean_into_corrupted_equals_a_hand_written_hook(story_model, vectoriser):
    """Activation patching through the sorted batch: the clean run's premise encodings (in
    original order) replace the corrupted run's; a hand-written hook must re-sort them."""
    clean = vectoriser.batch_transform_nli_padded_sorted(PREMISES, HYPOTHESES)
    corrupted = vectoriser.batch_transform_nli_padded_sorted(PREMISES[::-1], HYPOTHESES)
    with hs.record(story_model, ["encoder"], calls=ENCODER_CALLS, unsort=unsort(clean)) as rec:
        story_model(clean)
    with hs.patch(story_model, {"encoder": {"premise": rec["encoder", "premise"]}},
                  calls=ENCODER_CALLS, unsort=unsort(corrupted)) as patched:
        scores = story_model(corrupted)

    clean_premise = rec["encoder", "premise"].output  # (padded, (h, c)), original order
    order = corrupted.premise_orig_idx.argsort()
    calls = []

    def by_hand(module, args, output):
        calls.append(1)
        if len(calls) == 1:  # the premise call
            h, c = clean_premise[1]
            return clean_premise[0][order], (h[:, order], c[:, order])
        return None

    handle = story_model.encoder.register_forward_hook(by_hand)
    try:
        expected = story_model(corrupted)
    finally:
        handle.remove()
    assert torch.equal(scores, expected)
    assert torch.equal(patched["encoder", "premise"].tensor, clean_premise[0])


def test_no_op_patch_is_bitwise_identical(story_model, story_batch):
    with hs.record(story_model, ["encoder", "pooling", "aggregation"], calls=CALLS,
                   unsort=unsort(story_batch)) as rec:
        scores = story_model(story_batch)
    patches = {"encoder": [rec["encoder", "premise"], rec["encoder", "hypothesis"]],
               "pooling": {"premise": rec["pooling", "premise"]},
               "aggregation": rec["aggregation"]}
    with hs.patch(story_model, patches, calls=CALLS, unsort=unsort(story_batch)):
        again = story_model(story_batch)
    assert torch.equal(again, scores)


def test_patch_one_position_and_numpy_sources(mlp):
    model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Flatten(), torch.nn.Linear(12, 2))
    clean, corrupted = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    with hs.patch(model, {"0": clean}, index=np.s_[:, 1], modules=["1"]) as rec:
        out = model(corrupted)
    expected_input = corrupted.clone()
    expected_input[:, 1] = clean[:, 1]
    assert torch.equal(out, model(expected_input))
    assert torch.equal(rec["1"].tensor, expected_input.flatten(1))
    with hs.patch(model, {"0": clean[:, 1].numpy()}, index=np.s_[:, 1]):  # the part's shape
        assert torch.equal(model(corrupted), out)


def test_patch_shape_mismatch_is_an_error(mlp):
    with pytest.raises(InputError, match=r"shape \(3, 8\) but the patch has shape \(2, 8\)"), \
            hs.patch(mlp, {"0": torch.zeros(2, 8)}):
        mlp(torch.randn(3, 4))
    assert_no_hooks(mlp)
    with pytest.raises(hs.InputTypeError, match="patches="):
        hs.patch(mlp, {})
    with pytest.raises(hs.InputTypeError, match="patch source"):
        hs.patch(mlp, {"0": [1.0, 2.0]})


# -- gradients ------------------------------------------------------------------------------


@pytest.mark.parametrize("frozen", [False, True])
def test_grads_equal_autograd_on_the_copied_out_intermediates(story_model, story_batch, frozen):
    bind_reference(story_model)
    if frozen:  # no parameter requires grad: the recorder makes the outputs require it
        story_model.requires_grad_(False)
    with hs.record(story_model, ["encoder", "pooling"], calls=CALLS,
                   unsort=unsort(story_batch), grads=True) as rec:
        nll(story_model(story_batch), story_batch).backward()
    premise, hypothesis = story_model.get_representations_before_pooling(story_batch)
    if frozen:
        premise, hypothesis = premise.requires_grad_(), hypothesis.requires_grad_()
    loss = nll(classify_by_hand(story_model, premise, hypothesis), story_batch)
    g_premise, g_hypothesis = torch.autograd.grad(loss, [premise, hypothesis])
    assert torch.equal(rec["encoder", "premise"].grad, g_premise)
    assert torch.equal(rec["encoder", "hypothesis"].grad, g_hypothesis)
    assert not torch.equal(g_premise[:, :3], g_hypothesis[:, :3])  # two calls, two gradients
    # The hidden state (h, c) has no gradient here: the model does not use it.
    assert rec["encoder", "premise"].grad_output[1] == (None, None)
    u = rec.calls("pooling")[0]
    assert u.grad.shape == u.tensor.shape and not u.tensor.requires_grad


def test_grads_equal_retain_grad_on_bert(bert):
    ids = torch.randint(1, 100, (3, 7), generator=torch.Generator().manual_seed(1))
    with hs.record(bert, ["encoder.layer.*"], grads=True) as rec:
        out = bert(ids, output_hidden_states=True)
        for h in out.hidden_states:
            h.retain_grad()
        out.last_hidden_state.pow(2).sum().backward()
    for i in range(3):
        assert torch.equal(rec[f"encoder.layer.{i}"].grad, out.hidden_states[i + 1].grad)


def test_parameter_gradients_are_unchanged_by_recording(story_model, story_batch):
    def param_grads(record):
        story_model.zero_grad()
        if record:
            with hs.record(story_model, ["encoder", "pooling", "aggregation"], calls=CALLS,
                           unsort=unsort(story_batch), grads=True):
                nll(story_model(story_batch), story_batch).backward()
        else:
            nll(story_model(story_batch), story_batch).backward()
        return [p.grad.clone() for p in story_model.parameters()]

    for a, b in zip(param_grads(False), param_grads(True), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("frozen", [False, True])
def test_grads_are_right_when_the_model_changes_the_output_in_place(frozen):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(inplace=True),
                                torch.nn.Linear(6, 2)).requires_grad_(not frozen)
    x = torch.randn(5, 4)
    with hs.record(model, ["0"], grads=True) as rec:  # frozen: no leaf for the ReLU to hit
        model(x).pow(2).sum().backward()
    h = model[0](x).detach().requires_grad_()
    (g,) = torch.autograd.grad(model[2](torch.relu(h)).pow(2).sum(), [h])
    assert torch.equal(rec["0"].grad, g)
    assert (rec["0"].tensor < 0).any()  # the value before the in-place ReLU


def test_grads_after_the_block_while_the_graph_lives_and_they_add_up(mlp):
    x = torch.randn(5, 4)
    with hs.record(mlp, ["2"], grads=True) as rec:
        loss = mlp(x).sum()
    assert rec["2"].grad is None  # no backward yet
    loss.backward(retain_graph=True)
    first = rec["2"].grad.clone()
    loss.backward()
    assert torch.equal(rec["2"].grad, 2 * first)
    assert_no_hooks(mlp)


def test_grads_are_moved_and_cast_like_values(mlp):
    with hs.record(mlp, ["2"], grads=True, dtype=torch.float64) as rec:
        mlp(torch.randn(5, 4)).sum().backward()
    assert rec["2"].grad.dtype == torch.float64 == rec["2"].tensor.dtype


def test_grads_of_an_edited_output_are_of_the_value_the_model_continued_with(mlp):
    x = torch.randn(5, 4)
    with hs.record(mlp, ["2"], grads=True, edit={"2": lambda out: out * 3}) as rec:
        mlp(x).sum().backward()
    h = (mlp[2](mlp[1](mlp[0](x))) * 3).detach().requires_grad_()
    (g,) = torch.autograd.grad(mlp[4](mlp[3](h)).sum(), [h])
    assert torch.equal(rec["2"].grad, g)


def test_no_references_or_hooks_left_even_without_backward(mlp):
    x = torch.randn(5, 4)
    with hs.record(mlp, ["0", "2"], grads=True) as rec:
        loss = mlp(x).sum()  # the graph stays alive after the block, backward never runs
    assert_no_hooks(mlp)
    ref = weakref.ref(rec)
    stores = [weakref.ref(c._grads) for c in rec.captures()]  # what the graph's hooks know
    del rec
    gc.collect()
    assert ref() is None and all(s() is None for s in stores)
    loss.backward()  # the graph's hooks find nothing to fill, and change nothing
    assert all(p.grad is not None for p in mlp.parameters())


def test_grads_errors_and_warnings(mlp):
    x = torch.randn(5, 4)
    with hs.record(mlp, ["0"]) as rec:
        mlp(x)
    with pytest.raises(NotRecordedError, match="grads=True"):
        rec["0"].grad
    with pytest.warns(UserWarning, match="without autograd"), torch.no_grad(), \
            hs.record(mlp, ["0", "2"], grads=True) as rec:
        mlp(x)
    assert rec["0"].grad is None
    with pytest.raises(InputError, match="computed from the output"), \
            hs.record(mlp, ["0"], grads=True, pick=lambda out: out[:, 0]):
        mlp(x)
    with pytest.raises(hs.InputTypeError, match="grads="):
        hs.record(mlp, ["0"], grads="yes")
    with pytest.raises(InputError, match="inference only"):
        hs.record_dataset(mlp, ["0"], [x], "unused-dir", grads=True)


def test_to_frame_exports_grad_and_value_times_grad(mlp):
    with hs.record(mlp, ["2"], grads=True) as rec:
        mlp(torch.randn(5, 4)).pow(2).sum().backward()
    cap = rec["2"]
    grad = rec.to_frame(values="grad").to_numpy()
    attribution = rec.to_frame(values="value*grad").to_numpy()
    np.testing.assert_array_equal(grad, cap.grad.numpy())
    np.testing.assert_array_equal(attribution, (cap.tensor * cap.grad).numpy())
    with pytest.raises(InputError, match="values must be"):
        rec.to_frame(values="gradient")


def test_transformers_hidden_states_report_the_edit_every_time():
    """transformers adds its own output_hidden_states hooks on first use; the edit runs
    before them, on the first call and on every later one."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        with hs.record(model, [], edit={"transformer.h.0": _zero_primary}):
            out = model(ids, output_hidden_states=True)
        assert torch.equal(out.hidden_states[1], torch.zeros_like(out.hidden_states[1]))


def _zero_primary(out):
    """Zero a block's hidden states, whether the block returns a tensor or a tuple."""
    if isinstance(out, torch.Tensor):
        return torch.zeros_like(out)
    return hs.at(0, torch.zeros_like)(out, None)


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs a CUDA device")),
])
def test_edit_and_grads_with_captures_moved_to_the_cpu(story_model, story_batch, device):
    """device="cpu" (asynchronous, pinned, from a GPU): the edit still acts on the model's
    device and the gradients arrive on the CPU, equal to the reference computed there."""
    bind_reference(story_model)
    model = story_model.to(device)
    batch = type(story_batch)(**{k: v.to(device) if torch.is_tensor(v) and k in (
        "premise", "hypothesis", "y") else v for k, v in vars(story_batch).items()})
    # cuDNN's RNN has no backward in eval mode: the native kernels, on both sides.
    with torch.backends.cudnn.flags(enabled=False):
        _edit_and_grads_on(model, batch)


def _edit_and_grads_on(model, batch):
    with hs.record(model, ["encoder"], calls=ENCODER_CALLS, unsort=unsort(batch),
                   device="cpu", grads=True,
                   edit={"encoder": {"premise": hs.at(0, by_example)}}) as rec:
        nll(model(batch), batch).backward()
    premise, hypothesis = model.get_representations_before_pooling(batch)
    edited = by_example(premise)
    (g,) = torch.autograd.grad(nll(classify_by_hand(model, edited, hypothesis), batch),
                               [edited])
    cap = rec["encoder", "premise"]
    assert cap.tensor.device.type == "cpu" and cap.grad.device.type == "cpu"
    torch.testing.assert_close(cap.tensor, edited.detach().cpu(), rtol=0, atol=0)
    # The same computation on the same device, run twice: equal on the CPU; on a GPU the
    # backward of indexing accumulates with atomics, so the last bits may differ.
    torch.testing.assert_close(cap.grad, g.cpu(), rtol=1e-5, atol=1e-6)
