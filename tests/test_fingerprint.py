"""The model digest behind record_dataset's fingerprint: the same digests whichever way the
bytes are read (one tensor at a time, on threads, or copied off a GPU in chunks), checked
against SHA-256 of each tensor's bytes computed here by hand."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

import hookscope.fingerprint as fp
from hookscope.offload import count_host_syncs

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def by_hand(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes, C order, through NumPy (the independent reference)."""
    a = t.detach().cpu().contiguous()
    if a.dtype == torch.bfloat16:  # NumPy has no bfloat16: the same two bytes as int16
        a = a.view(torch.int16)
    return hashlib.sha256(a.numpy().tobytes()).hexdigest()


TENSORS = [
    torch.randn(100, 7),
    torch.arange(5, dtype=torch.int64),
    torch.randn(3, 4).t(),  # not contiguous
    torch.ones(1000, dtype=torch.bool),
    torch.randn(2, 2, dtype=torch.complex64),
    torch.randn(10).to(torch.bfloat16),
    torch.randn(4, 6)[:, ::2],  # strided view
]


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000, 1 << 20])
def test_chunked_digests_equal_each_tensors_bytes(chunk):
    """Chunks smaller than one element, than a tensor, and larger than all of them."""
    with ThreadPoolExecutor(3) as pool:
        got = fp._chunked_digests(TENSORS, pool, chunk=chunk)
    assert got == [by_hand(t) for t in TENSORS]


def test_model_digest_is_the_same_serial_and_on_threads(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 40), nn.LayerNorm(40), nn.Embedding(50, 8))
    model.register_buffer("steps", torch.tensor(3))
    serial = fp.model_digest(model)
    monkeypatch.setattr(fp, "_PARALLEL_BYTES", 0)  # every model "large": the thread pool
    assert fp.model_digest(model) == serial
    tensors = [*model.named_parameters(), *model.named_buffers()]
    assert fp._digests(tensors) == [by_hand(t) for _, t in tensors]


@cuda
def test_a_gpu_models_digest_equals_its_cpu_digest_with_one_wait_per_chunk(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(20)])  # 40 tensors, 333 kB
    on_cpu = fp.model_digest(model)
    model = model.cuda()
    monkeypatch.setattr(fp, "_PARALLEL_BYTES", 0)
    monkeypatch.setattr(fp, "_CHUNK_BYTES", 100_000)  # 4 chunks
    digest = []
    syncs = count_host_syncs(lambda: digest.append(fp.model_digest(model)))
    assert digest == [on_cpu]
    assert syncs <= 4  # one tensor at a time: 40
