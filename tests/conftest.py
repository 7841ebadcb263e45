"""Shared test models and batches."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from hookscope.examples.nli import Vectoriser, build_model

# The real-model tests use the offline MiniLM package: never reach for the network, so that the
# README's test command needs no environment variables.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PREMISES = [
    "Five men are playing frisbee on the beach",
    "Five men are playing frisbee on the beach",
    "A dog runs",
    "Two children read a long book in the quiet library near the old town square",
    "The woman sings",
]
HYPOTHESES = [
    "Some people are playing at the seafront",
    "A group of women is crossing a busy road",
    "An animal is moving outside",
    "Kids are reading",
    "Nobody is singing in the hall tonight at all",
]


@pytest.fixture(scope="session")
def vectoriser() -> Vectoriser:
    return Vectoriser.fit(PREMISES + HYPOTHESES)


@pytest.fixture
def story_model(vectoriser):
    return build_model(len(vectoriser), embedding_dim=24, hidden_size=16, seed=0)


@pytest.fixture
def story_batch(vectoriser):
    return vectoriser.batch_transform_nli_padded_sorted(PREMISES, HYPOTHESES, [1, 0, 1, 1, 0])


class Counter(nn.Module):
    """Identity that counts its calls (to prove that a module did or did not run)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def forward(self, x):
        self.n += 1
        return x


def assert_no_hooks(model: nn.Module) -> None:
    for name, m in model.named_modules():
        assert not m._forward_hooks, f"forward hook left on {name!r}"
        assert not m._forward_pre_hooks, f"forward pre-hook left on {name!r}"
        assert not m._forward_hooks_with_kwargs, f"kwargs flag left on {name!r}"
        assert not m._forward_pre_hooks_with_kwargs, f"pre-hook kwargs flag left on {name!r}"


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))


@pytest.fixture
def bert():
    """A small Hugging Face BERT built from a config (random weights, no download)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3,
                                     num_attention_heads=4, intermediate_size=64,
                                     attn_implementation="eager")
    return transformers.BertModel(config).eval()
