"""Many record blocks keep memory flat and leave no reference behind."""

from __future__ import annotations

import gc
import tracemalloc
import weakref

import torch
from torch import nn

import hookscope as hs


def test_ten_thousand_blocks_keep_memory_flat():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    x = torch.randn(4, 8)

    def blocks(n):
        for _ in range(n):
            with hs.record(model, ["0", "2"], calls={"2": ["only"]}) as rec:
                model(x)
            assert rec["2", "only"].tensor.shape == (4, 8)

    blocks(500)  # warm caches (allocator, lru caches)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    blocks(10_000)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert after - before < 256 * 1024, f"grew by {after - before} bytes over 10,000 blocks"
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_recording_keeps_no_reference_to_model_or_its_tensors():
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
    x = torch.randn(2, 8)
    with hs.record(model, ["0", "1"], inputs=True) as rec:
        out = model(x)
    model_ref, out_ref = weakref.ref(model), weakref.ref(out)
    captured = weakref.ref(rec["1"].tensor)
    del model, out
    gc.collect()
    assert model_ref() is None and out_ref() is None  # the recording does not keep them alive
    assert rec["0"].tensor.shape == (2, 8)
    del rec
    gc.collect()
    assert captured() is None  # ... and dropping the recording frees what it captured
