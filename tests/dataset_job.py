"""A small deterministic record_dataset job, run in subprocesses by tests/test_dataset.py
(killed mid-run, resumed, or launched with torchrun)."""

from __future__ import annotations

import os
import sys
import time

import torch

from hookscope.dataset import record_dataset
from hookscope.examples.corpus import generate
from hookscope.examples.nli import load_pretrained

PAIRS = 960
BATCH = 32


def batches(delay: float = 0.0):
    _, vec, _ = load_pretrained()
    pairs = generate(0)[:PAIRS]
    for i in range(0, len(pairs), BATCH):
        chunk = pairs[i : i + BATCH]
        b = vec.batch_transform_nli_padded_sorted([p.premise for p in chunk],
                                                  [p.hypothesis for p in chunk])
        b.texts = [p.premise for p in chunk]
        b.labels = [p.label for p in chunk]
        if delay:
            time.sleep(delay)
        yield b


def run(out: str, delay: float = 0.0, shard_rows: int = 96) -> None:
    model, _, _ = load_pretrained()
    record_dataset(
        model, batches(delay), ["encoder", "pooling", "aggregation"], out, reduce="max",
        calls={"encoder": ["premise", "hypothesis"], "pooling": ["premise", "hypothesis"]},
        unsort=lambda b: {"encoder": [b.premise_orig_idx, b.hypothesis_orig_idx]},
        meta=lambda b: {"text": b.texts, "label": b.labels}, shard_rows=shard_rows,
        progress=False)


if __name__ == "__main__":
    out, delay = sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    torch.set_num_threads(1)  # floats depend on the thread count: every compared run uses one
    if "RANK" in os.environ:  # launched by torchrun
        torch.distributed.init_process_group("gloo")
        try:
            run(out, delay)
        finally:
            torch.distributed.destroy_process_group()
    else:
        run(out, delay)
