"""The story, redone: one forward pass must give exactly what the copied-out methods give."""

from __future__ import annotations

import types

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import hookscope as hs
from hookscope.errors import UnsortError


# The story's copy-out-of-forward methods, verbatim in spirit: the independent reference.
def get_representations_before_pooling(self, batch):
    premise = self.embedding(batch.premise)
    hypothesis = self.embedding(batch.hypothesis)
    premise = pack_padded_sequence(premise, batch.premise_lengths, batch_first=True)
    hypothesis = pack_padded_sequence(hypothesis, batch.hypothesis_lengths, batch_first=True)
    premise, (hidden, cell_state) = self.encoder(premise, curr_batch_size=len(batch))
    if self.conditional_encoding:
        hypothesis, *_ = self.encoder(hypothesis, curr_batch_size=len(batch), hidden=hidden,
                                      cell_state=cell_state)
    else:
        hypothesis, *_ = self.encoder(hypothesis, curr_batch_size=len(batch))
    premise = premise[batch.premise_orig_idx, :, :]
    hypothesis = hypothesis[batch.hypothesis_orig_idx, :, :]
    return premise, hypothesis


def get_representations_after_pooling(self, batch):
    premise, hypothesis = self.get_representations_before_pooling(batch)
    return self.pooling(premise, batch_first=True), self.pooling(hypothesis, batch_first=True)


def get_aggregated_representations(self, batch):
    premise_emb, hypothesis_emb = self.get_representations_after_pooling(batch)
    return self.aggregation(premise_emb, hypothesis_emb)


def _detached(pair):
    return tuple(t.detach() for t in pair)


def bind_reference(model):
    for fn in (get_representations_before_pooling, get_representations_after_pooling,
               get_aggregated_representations):
        setattr(model, fn.__name__, types.MethodType(fn, model))


def first_five_minutes(model, batch):
    with hs.record(model, ["encoder", "pooling", "aggregation"],
                   calls={"encoder": ["premise", "hypothesis"],
                          "pooling": ["premise", "hypothesis"]},
                   unsort={"encoder": [batch.premise_orig_idx, batch.hypothesis_orig_idx]}) as rec:
        scores = model(batch)
    return rec, scores


@pytest.mark.parametrize("conditional", [False, True])
def test_one_pass_equals_copied_out_methods(story_model, story_batch, conditional):
    story_model.conditional_encoding = conditional
    bind_reference(story_model)
    calls = {"n": 0}
    story_model.encoder.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    rec, scores = first_five_minutes(story_model, story_batch)
    assert calls["n"] == 2  # one forward pass: the encoder ran once per side, no more
    # The references run in the recording's grad mode: CPU LSTM kernels differ between grad
    # and no_grad mode in the last bit on some CPUs, and bit-equality is the claim here.
    ref_prem, ref_hypo = _detached(story_model.get_representations_before_pooling(story_batch))
    ref_u, ref_v = _detached(story_model.get_representations_after_pooling(story_batch))
    ref_agg = story_model.get_aggregated_representations(story_batch).detach()
    ref_scores = story_model(story_batch).detach()
    scores = scores.detach()
    assert torch.equal(rec["encoder", "premise"].tensor, ref_prem)
    assert torch.equal(rec["encoder", "hypothesis"].tensor, ref_hypo)
    u, v = rec.calls("pooling")
    assert (u.label, v.label) == ("premise", "hypothesis")
    assert torch.equal(u.tensor, ref_u) and torch.equal(v.tensor, ref_v)
    assert torch.equal(rec["aggregation"].tensor, ref_agg)
    assert torch.equal(scores, ref_scores)


def test_encoder_lengths_come_back_in_original_order(story_model, story_batch):
    rec, _ = first_five_minutes(story_model, story_batch)
    prem, hypo = rec["encoder", "premise"], rec["encoder", "hypothesis"]
    orig_prem_lengths = story_batch.premise_lengths[story_batch.premise_orig_idx]
    assert torch.equal(prem.lengths, orig_prem_lengths)
    orig_hypo_lengths = story_batch.hypothesis_lengths[story_batch.hypothesis_orig_idx]
    assert torch.equal(hypo.lengths, orig_hypo_lengths)
    # The mask says where the real tokens are; padding positions of the LSTM output are zero.
    out = prem.tensor
    assert prem.mask.shape == out.shape[:2]
    assert torch.all(out[~prem.mask] == 0)
    assert torch.all(out[prem.mask].abs().sum(-1) > 0)


def test_hidden_states_unsorted_along_their_batch_dim(story_model, story_batch):
    rec, _ = first_five_minutes(story_model, story_batch)
    h, c = rec["encoder", "premise"].output[1]
    emb = story_model.embedding(story_batch.premise)  # grad mode, as recorded
    packed = pack_padded_sequence(emb, story_batch.premise_lengths, batch_first=True)
    h_sorted, c_sorted = _detached(
        story_model.encoder(packed, curr_batch_size=len(story_batch))[1])
    assert torch.equal(h, h_sorted[:, story_batch.premise_orig_idx])
    assert torch.equal(c, c_sorted[:, story_batch.premise_orig_idx])


def test_story_with_two_pairs_is_not_ambiguous(story_model, vectoriser):
    """The story's own batch has 2 pairs: the hidden state (2 directions, 2, hidden) has two
    dims of size 2, resolved by the wrapped LSTM's (layers x directions, hidden) shape."""
    from tests.conftest import HYPOTHESES, PREMISES

    batch = vectoriser.batch_transform_nli_padded_sorted(PREMISES[:2], HYPOTHESES[:2])
    bind_reference(story_model)
    rec, _ = first_five_minutes(story_model, batch)
    ref_prem = story_model.get_representations_before_pooling(batch)[0].detach()  # grad mode
    assert torch.equal(rec["encoder", "premise"].tensor, ref_prem)


def test_ambiguous_batch_dim_is_an_error_not_a_guess():
    model = torch.nn.Identity()
    x = torch.randn(3, 3)
    with pytest.raises(UnsortError, match="ambiguous"), hs.record(
            model, [""], unsort={"": [2, 0, 1]}):
        model(x)
    # ... and the user can say which dimension it is.
    with hs.record(model, [""], unsort={"": [2, 0, 1]}, batch_dim={"": 1}) as rec:
        model(x)
    assert torch.equal(rec[""].tensor, x[:, [2, 0, 1]])
