"""No silent wrong capture, no leak: unsort on every path, threads, interrupts, compiled and
scripted models, stop= nesting, wrapper names, and a summary that changes nothing."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import hookscope as hs
from hookscope.errors import UnsortError, UnsupportedModelError
from tests.conftest import assert_no_hooks

# -- unsort= on every path ------------------------------------------------------------------


def test_wrong_length_permutation_on_an_rnn_is_an_error():
    rnn = nn.GRU(3, 4)
    x = torch.randn(6, 4, 3)  # (time, batch 4, features)
    with pytest.raises(UnsortError, match="length 3"), hs.record(rnn, [""],
                                                               unsort={"": [2, 0, 1]}):
        rnn(x)
    assert_no_hooks(rnn)


def test_wrong_length_permutation_on_a_packed_output_is_an_error():
    lstm = nn.LSTM(3, 4, batch_first=True)
    packed = pack_padded_sequence(torch.randn(4, 5, 3), torch.tensor([5, 4, 2, 1]),
                                  batch_first=True)
    with pytest.raises(UnsortError, match="length 3"), hs.record(lstm, [""],
                                                               unsort={"": [2, 0, 1]}):
        lstm(packed)
    # The right one works, checked against pad_packed_sequence + indexing.
    perm = torch.tensor([3, 1, 0, 2])
    with torch.no_grad(), hs.record(lstm, [""], unsort={"": perm}) as rec:
        out, (h, _) = lstm(packed)
    assert torch.equal(rec[""].tensor, pad_packed_sequence(out, batch_first=True)[0][perm])
    assert rec[""].lengths.tolist() == [1, 4, 5, 2]
    assert torch.equal(rec[""].output[1][0], h[:, perm])


def test_wrong_length_permutation_on_a_tuple_output_is_an_error():
    class Pair(nn.Module):
        def forward(self, x):
            return x * 2, x.sum(-1)

    model = Pair()
    with pytest.raises(UnsortError, match="no tensor"), hs.record(
            model, [""], unsort={"": [1, 0]}):
        model(torch.randn(3, 5))


def test_wrong_length_permutation_for_input_lengths_is_an_error(story_model, story_batch):
    perm = torch.arange(len(story_batch) - 1)
    with pytest.raises(UnsortError), hs.record(
            story_model, ["encoder"], calls={"encoder": ["premise", "hypothesis"]},
            unsort={"encoder": [perm, perm]}):
        story_model(story_batch)


def test_transposed_rnn_state_with_batch_equal_to_layers_is_ambiguous():
    class Transposes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(3, 4, bidirectional=True)  # layers x directions = 2

        def forward(self, x):
            out, (h, c) = self.lstm(x)
            return out, (h.transpose(0, 1), c.transpose(0, 1))  # (batch, 2, hidden)

    model = Transposes()
    x = torch.randn(5, 2, 3)  # batch 2 == layers x directions
    # (The time-major output (5, 2, 8) is refused first: only dim 0 is taken unasked.)
    with pytest.raises(UnsortError, match="batch_dim="), hs.record(
            model, [""], unsort={"": [1, 0]}):
        model(x)
    with pytest.raises(UnsortError, match="ambiguous"), hs.record(
            model, [""], unsort={"": [1, 0]}, batch_dim={"": {(0,): 1}}):
        model(x)
    # Saying where the batch is settles it.
    with torch.no_grad(), hs.record(model, [""], unsort={"": [1, 0]},
                                    batch_dim={"": {(0,): 1, (1,): 0}}) as rec:
        _, (h, _) = model(x)
    assert torch.equal(rec[""].output[1][0], h[[1, 0]])


def test_run_takes_this_calls_permutation():
    model = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    recorder = hs.record(model, [""])
    perm = torch.tensor([2, 0, 3, 1])
    rec = recorder.run(x, unsort={"": perm})
    with torch.no_grad():
        assert torch.equal(rec[""].tensor, model(x)[perm])
    assert torch.equal(recorder.run(x)[""].tensor, model(x).detach())  # unchanged recorder


# -- threads, interrupts --------------------------------------------------------------------


def test_a_block_records_only_its_own_thread():
    model = nn.Linear(3, 3)
    other_out = []
    started, done = threading.Event(), threading.Event()

    def serve() -> None:
        started.set()
        while not done.is_set():
            other_out.append(model(torch.full((1, 3), 9.0)))

    worker = threading.Thread(target=serve)
    worker.start()
    started.wait()
    try:
        with hs.record(model, [""]) as rec:
            for _ in range(3):
                model(torch.zeros(2, 3))
    finally:
        done.set()
        worker.join()
    assert len(other_out) > 0 and rec.steps == 3
    assert all(c.tensor.shape == (2, 3) for c in rec.calls(""))
    with hs.record(model, [""], threads="all") as rec_all:
        t = threading.Thread(target=lambda: model(torch.zeros(5, 3)))
        t.start()
        t.join()
    assert rec_all[""].tensor.shape == (5, 3)


def test_registration_never_breaks_another_threads_forward():
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(8)])
    errors: list[BaseException] = []
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                model(torch.randn(2, 4))
            except BaseException as exc:  # any error there is the bug
                errors.append(exc)
                return

    worker = threading.Thread(target=serve)
    worker.start()
    try:
        for _ in range(200):
            with hs.record(model, ["*"], inputs=True):
                model(torch.randn(2, 4))
    finally:
        done.set()
        worker.join()
    assert errors == []
    assert_no_hooks(model)


class _OwnRegistration(nn.Linear):
    """A module class that registers forward hooks its own way (through the public API, with
    a ``RemovableHandle``): hookscope must go through it too."""

    registered = 0

    def register_forward_hook(self, hook, **kwargs):
        type(self).registered += 1
        return super().register_forward_hook(hook, **kwargs)


@pytest.mark.parametrize("how", ["handles", "mixed"])
def test_an_interrupt_during_hook_removal_leaves_no_hook(monkeypatch, how):
    """Ctrl-C in the middle of the removal: every hook is gone, whichever way it was added
    (hookscope.hook_handles: straight into the hook dicts, or the public API's handles for a
    module that overrides register_forward_hook), the removal going on where it stopped."""
    from torch.utils.hooks import RemovableHandle

    layers = [_OwnRegistration(2, 2) if how == "handles" or i % 2 else nn.Linear(2, 2)
              for i in range(20)]
    model = nn.Sequential(*layers)
    real = RemovableHandle.remove
    calls = {"n": 0}

    def flaky(self):
        calls["n"] += 1
        if calls["n"] == (5 if how == "handles" else 3):
            raise KeyboardInterrupt  # Ctrl-C arrives in the middle of the removal
        return real(self)

    monkeypatch.setattr(RemovableHandle, "remove", flaky)
    registered = _OwnRegistration.registered
    with pytest.raises(KeyboardInterrupt), hs.record(model, ["*"]):
        model(torch.randn(1, 2))
    expected = sum(isinstance(m, _OwnRegistration) for m in layers)
    assert _OwnRegistration.registered - registered == expected  # (their own method)
    assert calls["n"] == expected + 1  # (the interrupted removal was tried again)
    monkeypatch.setattr(RemovableHandle, "remove", real)
    assert_no_hooks(model)


def test_hooks_removed_by_others_inside_a_block_are_no_error():
    """A hook of the block that other code removed meanwhile (a library clearing a module's
    hooks): leaving the block removes the rest and raises nothing."""
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(4)])
    with hs.record(model, ["*"]) as rec:
        model[2]._forward_hooks.clear()
        model[2]._forward_hooks_with_kwargs.clear()
        model(torch.randn(1, 2))
    assert [c.name for c in rec.captures()] == ["0", "1", "3"]
    assert_no_hooks(model)


def test_hooks_of_others_survive_a_block_and_ids_never_collide():
    """Hooks that the user (or transformers) registers before or inside a block keep their
    handles: hookscope's keys come from PyTorch's own counter."""
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    seen = []
    before = model[0].register_forward_hook(lambda m, i, o: seen.append("before"))
    with hs.record(model, ["0"]) as rec:
        inside = model[0].register_forward_hook(lambda m, i, o: seen.append("inside"))
        model(torch.randn(1, 2))
    assert seen == ["before", "inside"] and len(rec.calls("0")) == 1
    seen.clear()
    model(torch.randn(1, 2))
    assert seen == ["before", "inside"]
    before.remove()
    inside.remove()
    assert_no_hooks(model)


# -- models hooks cannot see ----------------------------------------------------------------


def test_torchscript_is_a_clear_error():
    scripted = torch.jit.script(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    with pytest.raises(UnsupportedModelError, match="TorchScript"):
        hs.record(scripted, ["0"])
    wrapper = nn.Sequential(scripted, nn.ReLU())
    with pytest.raises(UnsupportedModelError, match="'0'"):
        hs.record(wrapper, ["0"])


def _compiles() -> bool:
    try:
        torch.compile(nn.Linear(2, 2))(torch.randn(1, 2))
        return True
    except Exception:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("how", ["in_place", "submodule", "compiled_elsewhere"])
def test_compiled_variants_are_recorded(how):
    if not _compiles():  # pragma: no cover - depends on the machine's toolchain
        pytest.skip("torch.compile does not work here")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.ReLU()),
                          nn.Linear(4, 2))
    x = torch.randn(3, 4)
    call = model
    if how == "in_place":
        model.compile()
    elif how == "submodule":
        model[1] = torch.compile(model[1])
    else:
        call = torch.compile(model)  # compiled before the block, called inside it
    call(x)  # compiled now, before the hooks exist
    with hs.record(model, ["0", "**.0"] if how == "submodule" else ["0", "1.0"]) as rec:
        y = call(x)
    names = [n for n in rec if rec._captures[n]]
    assert len(names) == 2, f"missed: {set(rec) - set(names)}"
    with torch.no_grad():
        assert torch.allclose(rec["0"].tensor, model[0](x))
    assert y.shape == (3, 2)
    assert_no_hooks(model)


# -- stop=, names, summary ------------------------------------------------------------------


def test_outer_stop_does_not_hide_an_inner_recorders_capture():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    x = torch.randn(1, 2)
    with hs.record(model, ["0"], stop=True) as outer:
        with hs.record(model, ["0", "2"]) as inner:
            model(x)
    assert outer["0"].tensor.shape == (1, 2) and inner["0"].tensor.shape == (1, 2)
    assert inner.calls  # the inner recorder saw module 0 before the stop
    # Both stop at the same module: the inner block ends, so does the outer.
    after = []
    with hs.record(model, ["0"], stop=True) as outer:
        with hs.record(model, ["0"], stop=True) as inner:
            model(x)
        after.append("outer block went on")
    assert after == [] and len(outer.calls("0")) == len(inner.calls("0")) == 1
    assert_no_hooks(model)


def test_stop_waits_for_the_labelled_calls_of_a_loop():
    class Loop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cell = nn.Linear(2, 2)
            self.head = nn.Linear(2, 2)

        def forward(self, x):
            for _ in range(3):
                x = self.cell(x)
            return self.head(x)

    model = Loop()
    rec = hs.record(model, ["cell"], stop=True,
                    calls={"cell": ["t0", "t1", "t2"]}).run(torch.randn(1, 2))
    assert [c.label for c in rec.calls("cell")] == ["t0", "t1", "t2"]


def test_wrapper_names_look_up_too(mlp):
    wrapped = nn.DataParallel(mlp, device_ids=[] if not torch.cuda.is_available() else None)
    if torch.cuda.is_available():  # pragma: no cover - exercised on GPU machines
        pytest.skip("covered by test_data_parallel_names_resolve_to_the_inner_model")
    with hs.record(wrapped, ["module.0"]) as rec:
        wrapped(torch.randn(2, 4))
    assert rec["module.0"] is rec["0"] and "module.0" in rec


def test_summary_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 3) * 10 + 5
    rng = torch.get_rng_state()
    hs.summary(model, x)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(torch.get_rng_state(), rng) and model.training


# -- options checked before the forward pass --------------------------------------------------


def test_a_device_that_cannot_hold_tensors_is_an_error_at_record():
    if torch.cuda.is_available():  # pragma: no cover - exercised on CPU-only machines
        pytest.skip("CUDA is available here")
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="device='cuda'|device=device"):
        hs.record(model, [""], device="cuda")
    assert_no_hooks(model)


def test_an_int_batch_dim_that_does_not_fit_every_leaf_says_how_to_fix_it():
    lstm = nn.LSTM(3, 4, batch_first=True)
    with pytest.raises(UnsortError, match=r"applies to every tensor.*\(1,\)"), hs.record(
            lstm, [""], unsort={"": [1, 0, 3, 2]}, batch_dim={"": 0}):
        lstm(torch.randn(4, 5, 3))


def test_mask_from_reads_masks_of_any_convention():
    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(3, 3)

        def forward(self, x, attention_mask=None, src_key_padding_mask=None):
            return self.proj(x)

    model, x = Seq(), torch.randn(2, 4, 3)
    real = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    with hs.record(model, ["proj"]) as rec:
        model(x, attention_mask=real.float())  # a 0/1 float mask is a padding mask
        model(x, attention_mask=(1.0 - real.float()) * -1e9)  # an additive one is not
    assert torch.equal(rec.step(0)["proj"].mask, real.bool())
    assert rec.step(1)["proj"].mask is None
    pad = real == 0  # PyTorch's convention: True at padding
    with hs.record(model, ["proj"],
                   mask_from=lambda args, kwargs: ~kwargs["src_key_padding_mask"]) as rec:
        model(x, src_key_padding_mask=pad)
    assert torch.equal(rec["proj"].mask, real.bool())
    with pytest.raises(TypeError, match="mask_from"):
        hs.record(model, ["proj"], mask_from=3)


def test_a_mask_from_callable_that_raises_says_so_and_leaves_no_hooks():
    model = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(hs.InputError, match=r"mask_from= raised KeyError.*return None"):
        with hs.record(model, ["0"], mask_from=lambda args, kwargs: kwargs["mask"]):
            model(torch.randn(2, 3))
    assert not model._forward_pre_hooks and not model[0]._forward_hooks


def test_a_torchscript_child_beside_recorded_modules():
    """A scripted submodule is no scope for the mask (it takes no pre-hooks): its siblings
    record, with and without a mask in the call."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.scripted = torch.jit.script(nn.Linear(2, 2))
            self.plain = nn.Linear(2, 2)

        def forward(self, x, attention_mask=None):
            return self.plain(self.scripted(x))

    model = Model()
    x = torch.randn(3, 2)
    for kwargs in ({}, {"attention_mask": torch.ones(3, 1, dtype=torch.long)}):
        with torch.no_grad(), hs.record(model, ["plain"]) as rec:
            out = model(x, **kwargs)
        assert torch.equal(rec["plain"].tensor, out)
    assert_no_hooks(model)


def test_a_module_that_overrides_hook_registration_on_itself_is_asked():
    """A register_forward_hook set on the instance (a library wrapping one module) is used,
    as one that its class defines is."""
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    asked = []
    original = model[0].register_forward_hook

    def register(hook, **kwargs):
        asked.append(kwargs)
        return original(hook, **kwargs)

    model[0].register_forward_hook = register
    with hs.record(model, ["0"]) as rec:
        out = model[0](torch.randn(1, 2))
    assert asked and torch.equal(rec["0"].tensor, out)
    del model[0].register_forward_hook
    assert_no_hooks(model)


def test_a_name_inside_a_torchscript_module_is_a_clear_error():
    """``"a.0"`` where ``a`` is scripted: the TorchScript error, naming the scripted part
    (it was an AttributeError of TorchScript's module dict)."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.jit.script(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))

        def forward(self, x):
            return self.a(x)

    with pytest.raises(UnsupportedModelError, match="'a.0' is inside 'a', a TorchScript"):
        hs.record(Model(), ["a.0"])
