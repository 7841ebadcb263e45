"""device="cpu": asynchronous copies into reused pinned buffers (hookscope.offload).

On CPU the orchestration runs against :class:`FakeOps`, which behaves like a CUDA stream as
seen from the host: a copy reads its source when issued (stream order: before any later
in-place kernel) but its result becomes visible only when waited for (asynchronous
completion).  Reading a buffer before the wait therefore shows NaN (a fresh buffer) or the
previous capture (a reused one), so a missing synchronisation fails these tests.  The same
properties are checked on a real GPU by the CUDA tests at the end (skipped without one).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import hookscope as hs
from hookscope.offload import DeviceOps, HostStaging, count_host_syncs

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class FakeOps(DeviceOps):
    """A CPU stand-in for a CUDA stream (see the module docstring)."""

    def __init__(self) -> None:
        self.queued: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.waits = 0
        self.issued = self.completed = 0  # copies queued and completed so far
        self.log: list[tuple[str, int]] = []  # ("copy", k) and ("wait", up to copy k)

    def empty(self, shape, dtype):
        return torch.full(shape, float("nan"), dtype=dtype)

    def copy(self, dst, src):
        self.queued.append((dst, src.detach().clone()))  # read now, in stream order
        self.issued += 1
        self.log.append(("copy", self.issued))
        return "stream"

    def wait(self, queues):
        assert queues == {"stream"}
        self.waits += 1
        self._complete(self.issued)

    def mark(self, queue):
        """Like a CUDA event: its wait completes the copies queued before it, no later one."""
        assert queue == "stream"
        upto = self.issued

        def wait():
            self.waits += 1
            self.log.append(("wait", upto))
            self._complete(upto)

        return wait

    def _complete(self, upto):
        while self.completed < upto:
            dst, src = self.queued.pop(0)
            dst.copy_(src)
            self.completed += 1


def fake_recorder(model, names, **options):
    """A recorder with device="cpu" whose staging treats every CPU tensor as a GPU one."""
    recorder = hs.record(model, names, device="cpu", **options)
    ops = FakeOps()
    recorder._staging._ops_for = lambda x: ops
    return recorder, ops


def inplace_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 3)).eval()


def test_capture_moved_off_equals_value_despite_a_later_inplace_write():
    model, x = inplace_model(), torch.randn(5, 4)
    expected = model[0](x)  # the Linear's output before the in-place ReLU
    assert (expected < 0).any()  # so that the ReLU really changes it
    recorder, ops = fake_recorder(model, ["0", "2"])
    with recorder as rec:
        y = model(x)
        assert ops.queued  # copies in flight inside the block
    assert ops.waits == 1 and not ops.queued  # one wait, at the end of the block
    torch.testing.assert_close(rec["0"].tensor, expected, rtol=0, atol=0)  # same kernels
    torch.testing.assert_close(rec["2"].tensor, y, rtol=0, atol=0)


def test_reading_a_capture_inside_the_block_waits_for_its_copy():
    model, x = inplace_model(), torch.randn(5, 4)
    expected = model[0](x)
    recorder, ops = fake_recorder(model, ["0"])
    with recorder as rec:
        model(x)
        cap = rec["0"]
        assert ops.queued
        value = cap.tensor.clone()  # the read waits first
        assert not ops.queued and ops.waits == 1
        model(x)  # a second step: a new copy in flight, a new wait on its read
        assert torch.equal(rec.calls("0", step=1)[0].tensor, expected)
        assert ops.waits == 2
    assert ops.waits == 2  # nothing left to wait for at the end
    assert torch.equal(value, expected)


def test_displaying_a_capture_inside_the_block_waits_for_its_values():
    model, x = inplace_model(), torch.randn(5, 4)
    recorder, ops = fake_recorder(model, ["0"])
    with recorder as rec:
        model(x)
        html = rec["0"]._repr_html_()  # shows mean/std/min/max: reads the values
        assert not ops.queued
    assert f"{model[0](x).max().item():.4g}" in html


def test_buffers_are_reused_only_once_captures_are_released():
    model, x = inplace_model(), torch.randn(5, 4)
    recorder, _ops = fake_recorder(model, ["0"])
    staging = recorder._staging
    first = recorder.run(x)
    assert staging.allocated == 1
    held = first["0"].tensor
    before = held.clone()
    second = recorder.run(x * 2)  # `held` is still referenced: a new buffer
    assert staging.allocated == 2
    assert torch.equal(held, before)  # never overwritten
    assert torch.equal(second["0"].tensor, model[0](x * 2))
    view = second["0"].tensor[1:]  # a view keeps its buffer in use too
    array = first["0"].numpy()  # and so does a NumPy array of it
    del first, second, held
    recorder.run(x)
    assert staging.allocated == 3
    del view, array
    for _ in range(3):  # both buffers free again: reused, no allocation
        assert torch.equal(recorder.run(x)["0"].tensor, model[0](x))
    assert staging.allocated == 3


def test_the_pool_is_bounded():
    model, x = inplace_model(), torch.randn(5, 4)
    recorder, _ops = fake_recorder(model, ["0"])
    recorder._staging.pool_bytes = 0  # nothing kept: every call allocates, values still right
    for scale in (1.0, 2.0):
        assert torch.equal(recorder.run(x * scale)["0"].tensor, model[0](x * scale))
    assert recorder._staging.pooled_bytes == 0 and recorder._staging.allocated == 2


def test_dtype_unsort_inputs_and_with_unsort_go_through_the_staging():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh()).eval()
    x = torch.randn(5, 4)
    perm = torch.tensor([3, 0, 4, 1, 2])
    recorder, _ops = fake_recorder(model, ["0"], dtype=torch.float16, inputs=True,
                                  unsort={"0": perm})
    rec = recorder.run(x)
    torch.testing.assert_close(rec["0"].tensor, model[0](x)[perm].half(), rtol=1e-3, atol=1e-3)
    assert rec["0"].tensor.dtype == torch.float16
    assert torch.equal(rec["0"].inputs[0], x.half())  # inputs: as received, cast
    other = torch.tensor([1, 0, 2, 3, 4])
    again = recorder.with_unsort({"0": other})
    assert again._staging is recorder._staging  # one pool per recorder, shared
    torch.testing.assert_close(again.run(x)["0"].tensor, model[0](x)[other].half(),
                               rtol=1e-3, atol=1e-3)


def test_on_cpu_device_cpu_needs_no_staging_copy():
    model, x = inplace_model(), torch.randn(5, 4)
    with hs.record(model, ["0"], device="cpu") as rec:
        model(x)
    assert rec["0"]._pending is None
    torch.testing.assert_close(rec["0"].tensor, model[0](x), rtol=0, atol=0)


def test_staging_falls_back_for_layouts_it_cannot_copy_asynchronously():
    staging = HostStaging()
    sparse = torch.eye(3).to_sparse()
    assert torch.equal(staging.to_host(sparse, None).to_dense(), torch.eye(3))
    assert staging.in_flight() is None


def test_unsort_permutations_are_moved_to_a_device_once_per_plan():
    """The permutation is copied to the output's device on first use and then reused (a copy
    per call was a host-device transfer in every call); "meta" stands in for a GPU here."""
    model = nn.Linear(2, 2)
    recorder = hs.record(model, [""], unsort={"": [1, 0]})
    plan = recorder._plans[""]
    perm = plan.perm(0)
    assert plan.perm_on(perm, torch.device("cpu")) is perm
    on = plan.perm_on(perm, torch.device("meta"))
    assert on.device.type == "meta" and plan.perm_on(perm, torch.device("meta")) is on
    assert recorder.with_unsort({"": [0, 1]})._plans[""].device_perms == {}  # its own perms


def test_a_dataset_batch_moves_in_one_copy_and_one_wait():
    from hookscope.dataset_rows import host_columns

    ops = FakeOps()
    staging = HostStaging(ops=lambda x: ops)
    a, b = torch.randn(6, 3), torch.randn(6, 5, dtype=torch.float64)
    out = host_columns({"a": a, "b": b}, np.float16, staging)
    assert ops.waits == 1 and staging.allocated == 1  # one buffer, one copy, one wait
    assert list(out) == ["a", "b"] and out["a"].dtype == out["b"].dtype == np.float16
    np.testing.assert_allclose(out["a"], a.numpy(), rtol=1e-3, atol=1e-3)  # float16 storage
    np.testing.assert_allclose(out["b"], b.numpy(), rtol=1e-3, atol=1e-3)


# -- on a real GPU ----------------------------------------------------------------------------


class GpuSleep(nn.Module):
    """Keeps the stream busy before the hooked layer, so that its copy is still queued when
    the hook returns: a read that did not wait would see an unwritten buffer."""

    def forward(self, x):
        torch.cuda._sleep(20_000_000)  # cycles: about 10 ms
        return x


def sleepy_inplace_model():
    return nn.Sequential(GpuSleep(), *inplace_model()).cuda()


@cuda
def test_cuda_capture_moved_off_equals_the_on_gpu_value_despite_inplace():
    model = sleepy_inplace_model()
    x = torch.randn(256, 4, device="cuda")
    with hs.record(model, ["1", "3"]) as on_gpu:  # the reference: cloned on the GPU
        model(x)
    recorder = hs.record(model, ["1", "3"], device="cpu")
    for _ in range(3):  # reused recorder: reused pinned buffers
        with recorder as rec:
            model(x)
        assert rec["1"].tensor.device.type == "cpu" and rec["1"].tensor.is_pinned()
        # The same kernels on the same inputs: bit-identical, the in-place ReLU after "1"
        # (queued after the copy on the same stream) notwithstanding.
        assert torch.equal(rec["1"].tensor, on_gpu["1"].tensor.cpu())
        assert torch.equal(rec["3"].tensor, on_gpu["3"].tensor.cpu())
    assert recorder._staging.allocated == 2


@cuda
def test_cuda_reading_inside_the_block_is_correct():
    model = sleepy_inplace_model()
    x = torch.randn(4096, 4, device="cuda")
    reference = model[1](x).cpu()
    with hs.record(model, ["1"], device="cpu") as rec:
        model(x)  # returns while the GPU still sleeps: the copy is queued behind it
        inside = rec["1"].tensor.clone()
    assert torch.equal(inside, reference)


@cuda
def test_cuda_story_bilstm_with_unsort_adds_no_synchronisation():
    """The hooks of the story's model with unsort= (and device="cpu") make no host-device
    synchronisation of their own: counted against the plain forward."""
    model, batch = story_batch_on_gpu()
    names = ["encoder", "pooling", "aggregation"]
    options = {"calls": {"encoder": ["premise", "hypothesis"],
                         "pooling": ["premise", "hypothesis"]},
               "unsort": {"encoder": [batch.premise_orig_idx, batch.hypothesis_orig_idx]}}

    with torch.no_grad():
        for device in (None, "cpu"):
            recorder = hs.record(model, names, device=device, **options)
            recorder.run(batch)  # warm: permutations copied to the GPU once
            plain, recorded = [], []
            # The fewest of three: a first call can sync once for reasons of its own (the
            # H100 run counted 1 for a plain forward right after the warm-up, then 0).
            for _ in range(3):
                plain.append(count_host_syncs(lambda: model(batch)))
                with recorder:  # (its end waits for the copies: outside the count)
                    recorded.append(count_host_syncs(lambda: model(batch)))
            assert min(recorded) <= min(plain), (device, recorded, plain)


def story_batch_on_gpu():
    """The story's model on the GPU with a length-sorted batch as its vectoriser makes it
    (lengths stay on the CPU, as pack_padded_sequence wants them)."""
    from hookscope.examples.nli import NLIBatch, build_model

    model = build_model(500, 32, 32, seed=0).cuda().eval()
    g = torch.Generator().manual_seed(0)
    sides = []
    for _ in range(2):
        lengths = torch.randint(3, 12, (16,), generator=g)
        order = torch.argsort(lengths, descending=True, stable=True)
        ids = torch.randint(2, 500, (16, int(lengths.max())), generator=g)
        ids = ids * (torch.arange(ids.shape[1]) < lengths[:, None])
        sides += [ids[order].cuda(), lengths[order], torch.argsort(order).cuda()]
    return model, NLIBatch(*sides)


@cuda
def test_cuda_record_dataset_matches_the_cpu(tmp_path):
    pytest.importorskip("pyarrow")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).eval()
    batches = [torch.randn(32, 10, 8) for _ in range(3)]
    cpu = hs.open_dataset(hs.record_dataset(model, batches, ["1", "2"], tmp_path / "cpu",
                                            reduce="mean", progress=False))
    model.cuda()
    gpu = hs.open_dataset(hs.record_dataset(model, [b.cuda() for b in batches], ["1", "2"],
                                            tmp_path / "gpu", reduce="mean", progress=False))
    for column in ("1", "2"):  # other kernels, other summation order: float32 tolerance
        np.testing.assert_allclose(gpu.numpy(column), cpu.numpy(column), rtol=1e-4, atol=1e-5)
