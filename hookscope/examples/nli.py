"""The story's model: a BiLSTM natural-language-inference encoder with max pooling.

Rebuilt after ``shared/seed/debugging-pretrained-pytorch-models.md``: embedding -> one shared
BiLSTM encoder run over the length-sorted, packed premise and hypothesis -> restoring the
original batch order with ``orig_idx`` -> max pooling -> aggregation ``[u, v, |u-v|, u*v]`` ->
feed-forward classifier.  The class and layer names follow the story, so the story's
copy-out-of-forward methods run on it unchanged.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

__all__ = [
    "WEIGHTS",
    "BidirectionalMaxPoolingLayer",
    "EmbeddingLayer",
    "FeedForward",
    "LSTMEncoder",
    "NLIAggregationLayer",
    "NLIBatch",
    "NLIEncoderFeedforward",
    "Vectoriser",
    "accuracy",
    "build_model",
    "load_pretrained",
    "save_pretrained",
]

# Trained on the generated corpus by ``python -m hookscope.examples.train_nli``.
WEIGHTS = Path(__file__).resolve().parent / "data" / "nli.npz"


class EmbeddingLayer(nn.Module):
    """Wraps an ``nn.Embedding`` (index 0 is padding)."""

    def __init__(self, vocab_size: int, embedding_dim: int) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, embedding_dim, padding_idx=0)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.word_embeddings(tokens)


class LSTMEncoder(nn.Module):
    """Wraps a bidirectional ``nn.LSTM``: takes a ``PackedSequence``, returns the padded
    batch-first outputs and ``(hidden, cell_state)`` as the story's encoder does."""

    def __init__(self, input_size: int, hidden_size: int, bidirectional: bool = True) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.directions = 2 if bidirectional else 1
        self.lstm = nn.LSTM(input_size, hidden_size, bidirectional=bidirectional)

    def forward(self, packed, curr_batch_size: int, hidden: Tensor | None = None,
                cell_state: Tensor | None = None):
        if hidden is None:
            shape = (self.directions, curr_batch_size, self.hidden_size)
            hidden = packed.data.new_zeros(shape)
            cell_state = packed.data.new_zeros(shape)
        output, (hidden, cell_state) = self.lstm(packed, (hidden, cell_state))
        output, _ = pad_packed_sequence(output, batch_first=True)
        return output, (hidden, cell_state)


class BidirectionalMaxPoolingLayer(nn.Module):
    """Max over time (padding positions, which hold 0, included: the story's behaviour)."""

    def forward(self, x: Tensor, batch_first: bool = True) -> Tensor:
        return x.max(dim=1 if batch_first else 0).values


class NLIAggregationLayer(nn.Module):
    """``[u, v, |u - v|, u * v]`` (the story's ``NLIAggregationLayerBalazs2017``)."""

    def forward(self, u: Tensor, v: Tensor) -> Tensor:
        return torch.cat([u, v, (u - v).abs(), u * v], dim=1)


class FeedForward(nn.Module):
    """One hidden layer with ReLU, then the output layer."""

    def __init__(self, input_dim: int, hidden_dim: int, num_classes: int = 3) -> None:
        super().__init__()
        self.forward_layer_1 = nn.Sequential(nn.Linear(input_dim, hidden_dim), nn.ReLU(),
                                             nn.Dropout(0.0))
        self.output_layer = nn.Linear(hidden_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.output_layer(self.forward_layer_1(x))


@dataclass
class NLIBatch:
    """A batch as the story's vectoriser makes it: each side sorted by length (longest first)
    and padded; ``*_orig_idx`` restores the original order (``sorted[orig_idx]``)."""

    premise: Tensor
    premise_lengths: Tensor
    premise_orig_idx: Tensor
    hypothesis: Tensor
    hypothesis_lengths: Tensor
    hypothesis_orig_idx: Tensor
    y: Tensor | None = None

    def __len__(self) -> int:
        return len(self.premise_lengths)


class NLIEncoderFeedforward(nn.Module):
    """The story's model; ``forward`` is the story's, line for line."""

    def __init__(self, vocab_size: int = 20_000, embedding_dim: int = 300,
                 hidden_size: int = 300, ff_hidden: int = 512, num_classes: int = 3,
                 conditional_encoding: bool = False) -> None:
        super().__init__()
        self.embedding = EmbeddingLayer(vocab_size, embedding_dim)
        self.encoder = LSTMEncoder(embedding_dim, hidden_size)
        self.pooling = BidirectionalMaxPoolingLayer()
        self.aggregation = NLIAggregationLayer()
        self.feedforward = FeedForward(8 * hidden_size, ff_hidden, num_classes)
        self.conditional_encoding = conditional_encoding

    def forward(self, batch: NLIBatch) -> Tensor:
        # Embed sequences
        premise = self.embedding(batch.premise)
        hypothesis = self.embedding(batch.hypothesis)

        # Pack embedded sequences
        premise = pack_padded_sequence(premise, batch.premise_lengths, batch_first=True)
        hypothesis = pack_padded_sequence(hypothesis, batch.hypothesis_lengths, batch_first=True)

        # Encode premise & hypothesis
        premise, (hidden, cell_state) = self.encoder(premise, curr_batch_size=len(batch))
        if self.conditional_encoding:
            hypothesis, *_ = self.encoder(hypothesis, curr_batch_size=len(batch), hidden=hidden,
                                          cell_state=cell_state)
        else:
            hypothesis, *_ = self.encoder(hypothesis, curr_batch_size=len(batch))

        # The packed sequences are length-sorted, so we need to return them to their original
        # ordering
        premise = premise[batch.premise_orig_idx, :, :]
        hypothesis = hypothesis[batch.hypothesis_orig_idx, :, :]

        # Pool premise & hypothesis
        premise_emb = self.pooling(premise, batch_first=True)
        hypothesis_emb = self.pooling(hypothesis, batch_first=True)

        # Combine the premise & hypothesis representations
        ff_input = self.aggregation(premise_emb, hypothesis_emb)

        # Feedforward classification with the embedded sequences
        return self.feedforward(ff_input)


_TOKEN = re.compile(r"[a-z0-9']+")


class Vectoriser:
    """Lower-cases, splits into words, maps words to indices (0 = padding, 1 = unknown)."""

    def __init__(self, vocabulary: Sequence[str]) -> None:
        self.index = {w: i + 2 for i, w in enumerate(dict.fromkeys(vocabulary))}

    @classmethod
    def fit(cls, texts: Sequence[str]) -> Vectoriser:
        return cls(sorted({w for t in texts for w in cls.tokenize(t)}))

    @staticmethod
    def tokenize(text: str) -> list[str]:
        return _TOKEN.findall(text.lower())

    def __len__(self) -> int:
        return len(self.index) + 2

    def _sorted_side(self, texts: Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
        ids = [[self.index.get(w, 1) for w in self.tokenize(t)] or [1] for t in texts]
        lengths = np.array([len(x) for x in ids])
        order = np.argsort(-lengths, kind="stable")  # longest first, as packing wants
        padded = np.zeros((len(ids), lengths.max()), dtype=np.int64)
        for row, i in enumerate(order):
            padded[row, : lengths[i]] = ids[i]
        orig_idx = np.argsort(order, kind="stable")  # sorted[orig_idx] == original order
        return (torch.from_numpy(padded), torch.from_numpy(lengths[order]),
                torch.from_numpy(orig_idx))

    def batch_transform_nli_padded_sorted(self, raw_document_1: Sequence[str],
                                          raw_documents_2: Sequence[str],
                                          y: Sequence[int] | None = None) -> NLIBatch:
        """The story's batch: both sides sorted by length and padded, with ``orig_idx``."""
        if len(raw_document_1) != len(raw_documents_2):
            raise ValueError("premises and hypotheses must pair up one to one")
        p, pl, pi = self._sorted_side(raw_document_1)
        h, hl, hi = self._sorted_side(raw_documents_2)
        return NLIBatch(p, pl, pi, h, hl, hi, None if y is None else torch.as_tensor(y))


def build_model(vocab_size: int = 20_000, embedding_dim: int = 300, hidden_size: int = 300,
                seed: int = 0, **kwargs) -> NLIEncoderFeedforward:
    """The story's model with seeded random weights, in eval mode."""
    torch.manual_seed(seed)
    return NLIEncoderFeedforward(vocab_size, embedding_dim, hidden_size, **kwargs).eval()


def save_pretrained(model: NLIEncoderFeedforward, vec: Vectoriser, path: str | Path,
                    meta: dict) -> None:
    """Write weights, vocabulary and metadata to one ``.npz`` (no pickle: plain arrays)."""
    arrays = {f"param/{k}": v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    arrays["vocab"] = np.array(list(vec.index), dtype=str)
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez_compressed(path, **arrays)


def load_pretrained(path: str | Path = WEIGHTS) -> tuple[NLIEncoderFeedforward, Vectoriser, dict]:
    """The trained example model (eval mode), its vectoriser, and its training metadata
    (``meta["dev_accuracy"]``: accuracy on held-out scenes)."""
    with np.load(path, allow_pickle=False) as f:
        meta = json.loads(str(f["meta"]))
        vec = Vectoriser([str(w) for w in f["vocab"]])
        state = {k.removeprefix("param/"): torch.from_numpy(f[k]) for k in f.files
                 if k.startswith("param/")}
    model = NLIEncoderFeedforward(len(vec), meta["embedding_dim"], meta["hidden_size"],
                                  meta["ff_hidden"], num_classes=len(meta["labels"]))
    model.load_state_dict(state)
    return model.eval(), vec, meta


@torch.no_grad()
def accuracy(model: NLIEncoderFeedforward, vec: Vectoriser, pairs: Sequence,
             batch_size: int = 512) -> float:
    """Share of ``pairs`` (with ``premise``, ``hypothesis``, ``label``) predicted right."""
    from .corpus import LABELS

    was_training = model.training
    model.eval()
    right = 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        batch = vec.batch_transform_nli_padded_sorted([q.premise for q in chunk],
                                                      [q.hypothesis for q in chunk])
        pred = model(batch).argmax(1)
        right += int((pred == torch.tensor([LABELS.index(q.label) for q in chunk])).sum())
    model.train(was_training)
    return right / len(pairs)
