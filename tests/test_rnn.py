"""PackedSequence outputs and inputs: padded back, original order, lengths known."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import hookscope as hs


def _unsorted_batch(batch_first: bool):
    torch.manual_seed(1)
    lengths = torch.tensor([3, 7, 1, 5, 5, 2])
    x = torch.randn(6, 7, 4)
    x = x * (torch.arange(7)[None, :, None] < lengths[:, None, None])
    return (x if batch_first else x.transpose(0, 1)), lengths


@pytest.mark.parametrize("rnn_type", [nn.GRU, nn.LSTM])
@pytest.mark.parametrize("batch_first", [True, False])
def test_packed_output_padded_in_original_order(rnn_type, batch_first):
    torch.manual_seed(0)
    rnn = rnn_type(4, 5, num_layers=2, bidirectional=True, batch_first=batch_first).eval()
    x, lengths = _unsorted_batch(batch_first)
    packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
    with torch.no_grad(), hs.record(rnn, [""]) as rec:
        out, state = rnn(packed)
    ref, ref_lengths = pad_packed_sequence(out, batch_first=True)
    cap = rec[""]
    assert torch.equal(cap.tensor, ref)
    assert torch.equal(cap.lengths, ref_lengths) and torch.equal(cap.lengths, lengths)
    # Hidden states are left as PyTorch returns them: already in the original batch order.
    got_state = cap.output[1]
    if rnn_type is nn.LSTM:
        assert torch.equal(got_state[0], state[0]) and torch.equal(got_state[1], state[1])
        h = state[0]
    else:
        assert torch.equal(got_state, state)
        h = state
    # ... which we check independently: example i's final forward state, run alone.
    for i in (0, 2):
        xi = x[i : i + 1, : lengths[i]] if batch_first else x[: lengths[i], i : i + 1]
        with torch.no_grad():
            _, state_i = rnn(xi)
        hi = state_i[0] if rnn_type is nn.LSTM else state_i
        assert torch.allclose(h[:, i], hi[:, 0], atol=1e-6)


def test_unsort_on_rnn_applies_to_hidden_state_batch_dim():
    torch.manual_seed(0)
    rnn = nn.LSTM(4, 5, batch_first=True).eval()
    x, lengths = _unsorted_batch(True)
    order = torch.argsort(lengths, descending=True, stable=True)
    orig_idx = torch.argsort(order)
    packed = pack_padded_sequence(x[order], lengths[order], batch_first=True)
    with torch.no_grad(), hs.record(rnn, [""], unsort={"": orig_idx}) as rec:
        out, (h, _c) = rnn(packed)
    cap = rec[""]
    assert torch.equal(cap.tensor, pad_packed_sequence(out, batch_first=True)[0][orig_idx])
    assert torch.equal(cap.lengths, lengths)
    assert torch.equal(cap.output[1][0], h[:, orig_idx])


def test_unsort_unpacked_rnn_without_batch_first_uses_dim_1():
    torch.manual_seed(0)
    rnn = nn.GRU(4, 5).eval()  # (time, batch, feature); time == batch to tempt a guess
    x = torch.randn(3, 3, 4)
    perm = torch.tensor([1, 2, 0])
    with torch.no_grad(), hs.record(rnn, [""], unsort={"": perm}) as rec:
        out, h = rnn(x)
    assert torch.equal(rec[""].tensor, out[:, perm]) and torch.equal(rec[""].output[1], h[:, perm])


def test_last_state_of_a_bidirectional_rnn_is_right_by_default():
    """The capture knows it holds [forward, backward] halves: reduce="last" equals h_n
    (forward final state at the last real step, backward at the first) with no argument."""
    torch.manual_seed(0)
    gru = nn.GRU(3, 4, batch_first=True, bidirectional=True)
    lengths = torch.tensor([5, 2, 4])
    x = torch.randn(3, 5, 3)
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True,
                                               enforce_sorted=False)
    with torch.no_grad(), hs.record(gru, [""]) as rec:
        _, h_n = gru(packed)
    cap = rec[""]
    assert cap.bidirectional
    expected = torch.cat([h_n[0], h_n[1]], dim=1).numpy()
    got = rec.to_frame(reduce="last").to_numpy()
    assert np.allclose(got, expected, atol=1e-6)
    # Saying otherwise is still possible (the plain last real position of every unit).
    plain = rec.to_frame(reduce="last", bidirectional=False).to_numpy()
    assert not np.allclose(plain, expected, atol=1e-3)


def test_only_bidirectional_rnn_outputs_are_marked(story_model, story_batch):
    class Projects(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(3, 4, batch_first=True, bidirectional=True)
            self.out = nn.Linear(8, 5)

        def forward(self, x):
            return self.out(self.lstm(x)[0])

    with hs.record(story_model, ["encoder", "pooling"],
                   calls={"encoder": ["p", "h"], "pooling": ["p", "h"]}) as rec:
        story_model(story_batch)
    assert rec["encoder", "p"].bidirectional and not rec["pooling", "p"].bidirectional
    model = Projects()
    with hs.record(model, ["", "lstm"]) as rec2:
        model(torch.randn(2, 3, 3))
    assert rec2["lstm"].bidirectional and not rec2[""].bidirectional


class _PackedWrapper(nn.Module):
    """Takes a PackedSequence, returns the padded output (as the story's LSTMEncoder does)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 4, batch_first=True)

    def forward(self, packed):
        return pad_packed_sequence(self.rnn(packed)[0], batch_first=True)[0]


class _SortedModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = _PackedWrapper()

    def forward(self, x, lengths):
        return self.enc(pack_padded_sequence(x, lengths, batch_first=True))


def test_unsort_permutations_are_read_when_given_and_a_refilled_one_is_an_error():
    """Lengths of a packed input are worked out when first read: from the permutation as it
    was when given, not as the caller's tensor holds it later; a permutation tensor refilled
    in place between forwards is refused, not used stale or unchecked."""
    torch.manual_seed(0)
    model = _SortedModel().eval()
    lengths, x = torch.tensor([7, 5, 4, 3, 2, 1]), torch.randn(6, 7, 3)
    perm = torch.tensor([2, 0, 4, 1, 5, 3])
    expected_lengths = lengths[perm.clone()]
    recorder = hs.record(model, ["enc"], unsort={"enc": perm})
    with torch.no_grad(), recorder as rec:
        out = model(x, lengths)
    perm.copy_(torch.arange(6))  # refilled after the forward, before lengths are read
    assert torch.equal(rec["enc"].lengths, expected_lengths)
    assert torch.equal(rec["enc"].tensor, out[expected_lengths.new_tensor([2, 0, 4, 1, 5, 3])])
    with pytest.raises(hs.UnsortError, match="changed in place"), torch.no_grad():
        recorder.run(x, lengths)
    assert not model.enc._forward_hooks  # the hooks are gone all the same
    with torch.no_grad():  # the remedy the message gives
        again = recorder.run(x, lengths, unsort={"enc": [2, 0, 4, 1, 5, 3]})
    assert torch.equal(again["enc"].lengths, expected_lengths)


class _FinalState(nn.Module):
    """Takes a PackedSequence, returns the RNN's final state as the caller asks for it."""

    def __init__(self, shape: str) -> None:
        super().__init__()
        self.rnn, self.shape = nn.GRU(3, 5, num_layers=2, bidirectional=True), shape

    def forward(self, packed):
        _, h = self.rnn(packed)  # (layers * directions = 4, batch, 5)
        if self.shape == "batch_first":
            return h.transpose(0, 1)  # (batch, 4, 5): a "sequence" of 4 by its shape
        return torch.cat([h[-2], h[-1]], dim=1)  # (batch, 10)


@pytest.mark.parametrize("shape", ["batch_first", "halves"])
def test_a_final_state_is_not_given_the_input_lengths_whatever_its_shape(tmp_path, shape):
    """Sequences of at most 4 steps and a final state with 4 layer-directions (or 10 features):
    shapes alone would take the state for a sequence.  Its capture knows no lengths, and a
    dataset's mean is over all of it, as computed by hand; a GRU hooked itself with pick=
    likewise."""
    torch.manual_seed(0)
    wrapper = _FinalState(shape).eval()
    packed = torch.nn.utils.rnn.pack_sequence([torch.randn(n, 3) for n in (2, 4, 1)],
                                              enforce_sorted=False)
    with torch.no_grad(), hs.record(wrapper, ["", "rnn"], pick={"rnn": lambda o: o[1]}) as rec:
        state = wrapper(packed)
    assert rec[""].lengths is None and rec[""].mask is None
    assert rec["rnn"].lengths is None
    out = hs.record_dataset(wrapper, [packed], [""], tmp_path / "ds", reduce="mean",
                            progress=False)
    expected = state.mean(1) if state.ndim == 3 else state
    np.testing.assert_allclose(hs.open_dataset(out).numpy(""), expected.numpy(), rtol=1e-6,
                               atol=1e-7)


def test_the_sequence_output_of_a_wrapper_keeps_the_input_lengths():
    """The same wrapper kind returning the padded sequence: lengths as pad_packed_sequence
    gives them (the story's encoder, checked on its own model elsewhere)."""
    torch.manual_seed(0)
    model = _SortedModel().eval()
    lengths, x = torch.tensor([4, 4, 3, 1]), torch.randn(4, 4, 3)  # longest == 4 as above
    with torch.no_grad(), hs.record(model, ["enc"]) as rec:
        model(x, lengths)
    assert torch.equal(rec["enc"].lengths, lengths)


@pytest.mark.parametrize("rnn_type", [nn.GRU, nn.LSTM])
def test_an_rnns_own_final_state_is_refused_where_rows_are_per_example(tmp_path, rnn_type):
    """h_n as the RNN returns it is (layers * directions, batch, hidden): to_frame (wide and
    long), a saved and loaded recording, and record_dataset refuse to take dim 0 for the batch
    and say what to pick; the suggested pick gives the per-example rows computed by hand."""
    torch.manual_seed(0)
    rnn = rnn_type(3, 5, num_layers=2).eval()
    packed = torch.nn.utils.rnn.pack_sequence([torch.randn(n, 3) for n in (2, 5, 1, 3)],
                                              enforce_sorted=False)
    with torch.no_grad(), hs.record(rnn, [""], pick=lambda o: o[1]) as rec:
        _, state = rnn(packed)
    h = state[0] if rnn_type is nn.LSTM else state
    assert rec[""].rnn_state and torch.equal(rec[""].tensor, h)  # the value itself is kept
    for export in (lambda r: r.to_frame(reduce="mean"), lambda r: r[""].to_frame(kind="long")):
        with pytest.raises(hs.InputError, match=r"out\[1\]\[-1\]"):
            export(rec)
    hs.save(rec, tmp_path / "r.hsrec")
    with pytest.raises(hs.InputError, match="final state"):
        hs.load(tmp_path / "r.hsrec").to_frame(reduce="mean")
    with pytest.raises(hs.InputError, match="batch 0: .* final state"):
        hs.record_dataset(rnn, [packed], [""], tmp_path / "ds", pick=lambda o: o[1],
                          reduce="mean", progress=False)
    last = (lambda o: o[1][0][-1]) if rnn_type is nn.LSTM else (lambda o: o[1][-1])
    out = hs.record_dataset(rnn, [packed], [""], tmp_path / "ok", pick=last, reduce="mean",
                            progress=False)
    np.testing.assert_array_equal(hs.open_dataset(out).numpy(""), h[-1].numpy())


class _ReturnsState(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 5, num_layers=2, bidirectional=True, batch_first=True)

    def forward(self, x):
        return self.rnn(x)[1]  # h_n itself: (4, batch, 5)


@pytest.mark.parametrize("reduce", ["mean", None])
def test_a_wrapper_returning_h_n_is_marked_and_refused_not_pooled_across_the_batch(
        tmp_path, reduce):
    """A module that returns its inner RNN's h_n: the capture is the state (unsorted along
    dim 1 with unsort=), and exports one row per example refuse it instead of reading its
    layers as examples."""
    torch.manual_seed(0)
    model, x, perm = _ReturnsState().eval(), torch.randn(3, 6, 3), torch.tensor([2, 0, 1])
    with torch.no_grad(), hs.record(model, [""], unsort={"": perm}) as rec:
        h = model(x)
    assert rec[""].rnn_state and torch.equal(rec[""].tensor, h[:, perm])
    with pytest.raises(hs.InputError, match="final state"):
        rec.to_frame(reduce="mean")
    with pytest.raises(hs.InputError, match="batch 0: .*final state"):
        hs.record_dataset(model, [x], [""], tmp_path / "ds", reduce=reduce, progress=False)


def test_an_rnns_picked_state_is_unsorted_along_its_batch_dimension():
    torch.manual_seed(0)
    lstm, perm = nn.LSTM(3, 4, num_layers=2).eval(), torch.tensor([2, 0, 1])
    packed = torch.nn.utils.rnn.pack_sequence([torch.randn(n, 3) for n in (5, 3, 2)])
    with torch.no_grad(), hs.record(lstm, [""], pick=lambda o: o[1][0], unsort={"": perm}) as rec:
        _, (h, _) = lstm(packed)
    assert rec[""].rnn_state and torch.equal(rec[""].tensor, h[:, perm])


class _DictFed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 4, batch_first=True)

    def forward(self, batch):
        return pad_packed_sequence(self.rnn(batch["packed"])[0], batch_first=True)[0]


def test_a_packed_sequence_inside_a_dict_input_gives_the_lengths(tmp_path):
    """model({"packed": ...}): the lengths are found inside the container, so pooling is over
    real positions, as computed by hand per example."""
    torch.manual_seed(0)
    model, lengths = _DictFed().eval(), torch.tensor([2, 7, 1, 3])
    batch = {"packed": pack_padded_sequence(torch.randn(4, 7, 3), lengths, batch_first=True,
                                            enforce_sorted=False), "ids": [0, 1, 2, 3]}
    with torch.no_grad(), hs.record(model, [""]) as rec:
        out = model(batch)
    assert torch.equal(rec[""].lengths, lengths)
    ds = hs.record_dataset(model, [batch], [""], tmp_path / "ds", reduce="mean", progress=False,
                           setup_id="test")
    expected = np.stack([out[i, :n].mean(0).numpy() for i, n in enumerate(lengths)])
    np.testing.assert_allclose(hs.open_dataset(ds).numpy(""), expected, rtol=1e-6, atol=1e-7)


class _Encoder(nn.Module):
    """The story's kind of wrapper: PackedSequence in, (padded output, (h, c)) out, the state
    returned as the LSTM returned it, as an alias (``detach``) or as a copy (``clone``)."""

    def __init__(self, state: str) -> None:
        super().__init__()
        self.lstm, self.state = nn.LSTM(4, 5, bidirectional=True), state

    def forward(self, packed):
        out, (h, c) = self.lstm(packed)
        if self.state == "alias":
            h, c = h.detach(), c.detach()
        elif self.state == "copy":
            h, c = h.clone(), c.clone()
        return pad_packed_sequence(out, batch_first=True)[0], (h, c)


@pytest.mark.parametrize("state", ["same", "alias"])
def test_a_wrappers_rnn_state_is_unsorted_along_dim_1_as_hand_written_hooks_do(state):
    """(h, c) returned by an RNN inside the hooked wrapper, the very tensors or aliases of
    them, are (layers * directions, batch, hidden): put back in order along dim 1, the padded
    output along dim 0; compared with hooks written by hand that index the same way."""
    torch.manual_seed(0)
    wrapper = _Encoder(state).eval()
    x, lengths = _unsorted_batch(True)
    order = torch.argsort(lengths, descending=True, stable=True)
    orig_idx = torch.argsort(order)
    packed = pack_padded_sequence(x[order], lengths[order], batch_first=True)
    by_hand = []
    handle = wrapper.register_forward_hook(lambda m, a, o: by_hand.append(
        (o[0][orig_idx], o[1][0][:, orig_idx], o[1][1][:, orig_idx])))
    try:
        with torch.no_grad(), hs.record(wrapper, [""], unsort={"": orig_idx}) as rec:
            wrapper(packed)
    finally:
        handle.remove()
    out, (h, c) = rec[""].output
    assert torch.equal(out, by_hand[0][0])
    assert torch.equal(h, by_hand[0][1]) and torch.equal(c, by_hand[0][2])
    assert torch.equal(rec[""].lengths, lengths)


def test_a_state_copied_by_the_wrapper_is_no_rnn_state_and_its_batch_must_be_named():
    """A copy of the state is a tensor of its own: hookscope does not guess that its dim 1 is
    the batch (dim 0 has the batch size only by chance, or not at all) and says how to name
    it; with batch_dim= it is unsorted as asked."""
    torch.manual_seed(0)
    wrapper = _Encoder("copy").eval()
    x, lengths = _unsorted_batch(True)
    order = torch.argsort(lengths, descending=True, stable=True)
    orig_idx = torch.argsort(order)
    packed = pack_padded_sequence(x[order], lengths[order], batch_first=True)
    with pytest.raises(hs.UnsortError, match="batch_dim="), torch.no_grad(), \
            hs.record(wrapper, [""], unsort={"": orig_idx}):
        wrapper(packed)
    dims = {"": {(0,): 0, (1,): 1}}
    with torch.no_grad(), hs.record(wrapper, [""], unsort={"": orig_idx},
                                    batch_dim=dims) as rec:
        out, (h, c) = wrapper(packed)
    got = rec[""].output
    assert torch.equal(got[0], out[orig_idx])
    assert torch.equal(got[1][0], h[:, orig_idx]) and torch.equal(got[1][1], c[:, orig_idx])


def test_a_permutation_as_long_as_the_states_first_dim_is_not_applied_to_it():
    """A permutation of 2 entries for a batch of 6: an LSTM state (2, 6, 3) has dim 0 of the
    permutation's length, but it is a state, whose batch is dim 1 — an error, never a
    reordering of its layers and directions."""
    wrapper = _Encoder("same").eval()
    x, lengths = _unsorted_batch(True)
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    with pytest.raises(hs.UnsortError, match="another batch"), torch.no_grad(), \
            hs.record(wrapper, [""], unsort={"": torch.tensor([1, 0])}):
        wrapper(packed)


def test_rnn_states_know_the_tensors_their_aliases_and_views():
    """RNNStates: the very tensors and aliases (same memory and layout) are states; a view
    (h[-1]) shares their memory but is no state; other tensors are neither."""
    from hookscope.rnn_states import RNNStates

    h, c, other = torch.randn(2, 4, 3), torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    states = RNNStates()
    assert not states and other not in states
    states.add_state((h, c))
    assert h in states and c in states and h.detach() in states
    assert h[-1] not in states and other not in states and h.transpose(0, 1) not in states
    assert states.shares_memory(h[-1]) and not states.shares_memory(other)
    states.clear()
    assert h not in states and not states.shares_memory(h)
    states.add_state(h)
    assert h in states and c not in states


class _Projected(nn.Module):
    """A wrapper with a module of its own after the LSTM: returns (proj(output), h_n)."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 5, num_layers=2, bidirectional=True, batch_first=True)
        self.proj = nn.Linear(10, 6)

    def forward(self, packed):
        out, (h, _c) = self.lstm(packed)
        return self.proj(pad_packed_sequence(out, batch_first=True)[0]), h


class _Outer(nn.Module):
    """A wrapper around a wrapper around a GRU, passing the GRU's h_n through both."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Module()
        self.enc.rnn = nn.GRU(3, 5, batch_first=True)
        self.enc.forward = lambda packed: self.enc.rnn(packed)

    def forward(self, packed):
        out, h = self.enc(packed)
        return out, h


def _packed_and_order(batch: int):
    torch.manual_seed(0)
    lengths = torch.tensor([2, 6, 3, 5, 4, 1][:batch])
    x = torch.randn(batch, 6, 3)
    order = lengths.argsort(descending=True)
    return pack_padded_sequence(x[order], lengths[order], batch_first=True), order.argsort()


@pytest.mark.parametrize(("make", "modules"), [
    (_Projected, ["", "proj"]), (_Outer, ["", "enc"]), (_Outer, ["", "enc", "enc.rnn"])])
def test_a_wrappers_state_is_known_whatever_else_inside_it_is_recorded(tmp_path, make, modules):
    """Recording a module inside the wrapper too (a projection after the LSTM, an inner
    wrapper) must not make the outer capture forget that its h_n is an RNN state: unsorted
    along dim 1 as by hand, marked, and refused where rows are per example — with 4 sequences
    and 4 layer-directions, a silent max over the batch otherwise."""
    model = make().eval()
    packed, inv = _packed_and_order(4)
    with torch.no_grad():
        _, h = model(packed)
    with torch.no_grad(), hs.record(model, modules, unsort={"": inv}) as rec:
        model(packed)
    assert torch.equal(rec[""].output[1], h.index_select(1, inv))
    with torch.no_grad(), hs.record(model, modules, pick={"": lambda o: o[1]}) as rec:
        model(packed)
    assert rec[""].rnn_state
    with pytest.raises(hs.InputError, match="final state"):
        rec[""].to_frame(reduce="max")
    with pytest.raises(hs.InputError, match="final state"):
        hs.record_dataset(model, [packed], modules, tmp_path / "ds", reduce="max",
                          pick={"": lambda o: o[1]}, progress=False)


class _StateFirst(nn.Module):
    """Returns (h_n, padded output): the state first, then the sequence."""

    def __init__(self, view: str = "h") -> None:
        super().__init__()
        self.rnn, self.view = nn.GRU(3, 5, num_layers=2, bidirectional=True,
                                     batch_first=True), view

    def forward(self, packed):
        out, h = self.rnn(packed)
        picked = {"h": h, "last two": h[-2:], "last": h[-1], "features": h[..., :3]}[self.view]
        return picked, pad_packed_sequence(out, batch_first=True)[0]


def test_an_output_beside_a_wrappers_state_keeps_its_own_batch_dimension():
    """A wrapper returning (h_n, output) with as many time steps as sequences: h_n is
    unsorted along dim 1, but the output beside it is not (it used to be, along its time
    steps, silently); its batch is ambiguous, an error says how to name it, and named it is
    unsorted along dim 0 as by hand."""
    model = _StateFirst().eval()
    lengths = torch.tensor([4, 2, 3, 1])  # 4 sequences, the longest of 4 steps
    torch.manual_seed(1)
    x = torch.randn(4, 4, 3)
    order = lengths.argsort(descending=True)
    inv = order.argsort()
    packed = pack_padded_sequence(x[order], lengths[order], batch_first=True)
    with torch.no_grad():
        h, out = model(packed)
    assert out.shape[:2] == (4, 4)
    with pytest.raises(hs.UnsortError, match="ambiguous"), torch.no_grad(), \
            hs.record(model, [""], unsort={"": inv}):
        model(packed)
    with torch.no_grad(), hs.record(model, [""], unsort={"": inv},
                                    batch_dim={"": {(1,): 0}}) as rec:
        model(packed)
    assert torch.equal(rec[""].output[0], h[:, inv])
    assert torch.equal(rec[""].output[1], out[inv])


@pytest.mark.parametrize(("view", "is_state"), [
    ("last two", True), ("features", True), ("last", False)])
def test_a_view_of_a_state_that_keeps_its_batch_at_dim_1_is_marked(view, is_state):
    """h[-2:] and h[..., :3] keep the batch at dim 1: marked as RNN states and refused where
    rows are per example (they used to give one row per layer-direction, silently); h[-1] is
    (batch, hidden), one row per example, and is exported."""
    model = _StateFirst(view).eval()
    packed, _ = _packed_and_order(5)
    with torch.no_grad(), hs.record(model, [""], pick=lambda o: o[0]) as rec:
        picked, _ = model(packed)
    assert rec[""].rnn_state is is_state
    if is_state:
        with pytest.raises(hs.InputError, match="final state"):
            rec[""].to_frame(reduce="max")
    else:
        np.testing.assert_array_equal(rec[""].to_frame().to_numpy(), picked.numpy())


class _Dropped(nn.Module):
    """A GRU whose h_n passes through a Dropout (the very tensor in eval) and a Linear on the
    last step beside it."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 6, num_layers=2, batch_first=True)
        self.drop = nn.Dropout(0.1)
        self.proj = nn.Linear(6, 4)

    def forward(self, x):
        out, h = self.rnn(x)
        return self.drop(h), self.proj(out[:, -1])


@pytest.mark.parametrize("modules", [["drop"], ["rnn", "drop"], ["", "drop"], ["", "proj"]])
def test_a_state_is_known_in_any_module_it_passes_through_whatever_is_selected(tmp_path,
                                                                                modules):
    """h_n through a Dropout, recorded with or without its wrapper or the RNN: always marked
    and refused one row per example (it gave a row per layer, silently, unless the wrapper
    was selected too); a recording's frame says so rather than that batch sizes differ."""
    model = _Dropped().eval()
    x = torch.randn(5, 4, 3)
    with torch.no_grad(), hs.record(model, modules) as rec:
        model(x)
    holder = modules[-1] if modules[-1] == "drop" else ""
    assert rec[holder].rnn_state
    with pytest.raises(hs.InputError, match="final state"):
        rec[holder].to_frame(reduce="mean")
    with pytest.raises(hs.InputError, match="final state"):
        rec.to_frame(reduce="mean")
    with pytest.raises(hs.InputError, match="final state"):
        hs.record_dataset(model, [x], [holder], tmp_path / "ds", reduce="mean", progress=False)
