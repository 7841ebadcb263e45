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


class Counting(nn.Module):
    """A forward pass that writes a buffer (as running statistics or a cache do)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(30, 40)
        self.register_buffer("calls", torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.lin(x)


def _slow_background(monkeypatch) -> list[str]:
    """Every model hashed partly in the background, slowly: the thread starts hashing 0.2 s
    after it was started (a later forward has then run).  Returns the hashing threads' names."""
    import threading
    import time

    monkeypatch.setattr(fp, "_BACKGROUND_BYTES", 0)
    threads, digests = [], fp._digests

    def slow(tensors, after=None):
        threads.append(threading.current_thread().name)
        if threading.current_thread() is not threading.main_thread():
            time.sleep(0.2)
        return digests(tensors, after)

    monkeypatch.setattr(fp, "_digests", slow)
    return threads


def test_a_background_digest_is_of_the_model_as_it_was_when_started(monkeypatch):
    torch.manual_seed(0)
    model = Counting()
    before = fp.model_digest(model)
    threads = _slow_background(monkeypatch)
    wait = fp.start_model_digest(model)
    model(torch.randn(2, 30))  # the buffer changes while the parameters are being hashed
    model.train(False)  # so does a training flag
    assert wait() == before == fp.model_digest(_reloaded(model))
    assert wait() == before  # asked again: the same
    assert any(name.startswith("hookscope-fingerprint") for name in threads)
    assert fp.model_digest(model) != before  # the buffer and the flag do count


def _reloaded(model: Counting) -> Counting:
    """The model as it was before its forward pass and eval(), rebuilt independently."""
    torch.manual_seed(0)
    fresh = Counting()
    assert torch.equal(fresh.lin.weight, model.lin.weight)
    return fresh


def test_a_small_model_is_hashed_at_once(monkeypatch):
    threads = []
    digests = fp._digests
    monkeypatch.setattr(fp, "_digests", lambda t, after=None: threads.append(1) or digests(t))
    model = nn.Linear(8, 8)  # far below _BACKGROUND_BYTES
    fp.start_model_digest(model)
    assert len(threads) == 1  # one call, in this thread, before returning


def test_a_tensor_that_cannot_be_hashed_is_an_error_at_once(monkeypatch):
    monkeypatch.setattr(fp, "_BACKGROUND_BYTES", 0)
    model = nn.Linear(4, 4)
    model.register_buffer("odd", torch.zeros(2, 2).to_sparse())  # hashed fine, densified
    assert fp.start_model_digest(model)() == fp.model_digest(model)

    def refuse(t):
        raise RuntimeError("no bytes")

    monkeypatch.setattr(fp, "_tensor_digest", refuse)
    with pytest.raises(fp.DatasetError, match="cannot fingerprint 'odd'.*setup_id="):
        fp.start_model_digest(model)  # a buffer: hashed before this returns


@cuda
def test_a_background_gpu_digest_overlaps_forward_passes_and_equals_the_cpu_digest(
        monkeypatch):
    torch.manual_seed(0)
    model = Counting()
    on_cpu = fp.model_digest(model)
    model = model.cuda()
    monkeypatch.setattr(fp, "_PARALLEL_BYTES", 0)
    monkeypatch.setattr(fp, "_CHUNK_BYTES", 1000)
    _slow_background(monkeypatch)
    wait = fp.start_model_digest(model)
    x = torch.randn(64, 30, device="cuda")
    for _ in range(20):
        model(x)
    assert wait() == on_cpu
