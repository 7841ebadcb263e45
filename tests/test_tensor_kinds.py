"""Every tensor kind PyTorch makes every day is recorded, safely, without crashing the forward.

The reference is always a hand-written hook that clones (or the direct call) on the same
inputs in the same process and mode.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import hookscope as hs
from tests.conftest import assert_no_hooks


def _manual(model: nn.Module, name: str, *args, **kwargs):
    """The independent reference: a forward hook that clones what the module returned."""
    module = dict(model.named_modules())[name]
    got = []
    h = module.register_forward_hook(lambda m, i, o: got.append(o.detach().clone()))
    try:
        model(*args, **kwargs)
    finally:
        h.remove()
    return got


class WritesAfter(nn.Module):
    """``inner`` then an in-place write to what it returned."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        y = self.inner(x)
        y.mul_(0)
        return y


@pytest.mark.parametrize("make", [
    lambda a: torch.from_numpy(a),
    lambda a: torch.as_tensor(a),
    lambda a: torch.frombuffer(bytearray(a.tobytes()), dtype=torch.float32).view(a.shape),
    lambda a: torch.from_dlpack(a),
], ids=["from_numpy", "as_tensor", "frombuffer", "dlpack"])
@pytest.mark.parametrize("inner", ["flatten", "dropout", "identity"])
@pytest.mark.parametrize("clone", [True, "lazy"])
def test_numpy_backed_tensors_and_their_views(make, inner, clone):
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    x = make(data.copy())
    module = {"flatten": nn.Flatten(), "dropout": nn.Dropout(0.5),
              "identity": nn.Identity()}[inner]
    model = WritesAfter(module).eval()
    expected = module(x).clone()
    with hs.record(model, ["inner"], clone=clone) as rec:
        model(x)  # the capture is a view of NumPy memory that the model then zeroes
    assert torch.equal(rec["inner"].tensor, expected)
    assert_no_hooks(model)


def _fast_path_encoder(layers: int):
    """nn.TransformerEncoder in eval mode with a padding mask: its fast path (under no_grad)
    returns nested tensors.  Returns (model, x, padding mask) for lengths 5, 3, 2."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0)
    model = nn.TransformerEncoder(layer, layers).eval()
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 2 + [True] * 3])
    return model, torch.randn(3, 5, 8), pad


def test_nested_tensors_from_the_transformer_fast_path():
    model, x, pad = _fast_path_encoder(2)
    with torch.no_grad():
        reference = _manual(model, "layers.0", x, src_key_padding_mask=pad)[0]
        assert reference.is_nested  # PyTorch's fast path: what we must record
        with hs.record(model, ["layers.0", "layers.1"]) as rec:
            model(x, src_key_padding_mask=pad)
    cap = rec["layers.0"]
    assert cap.tensor.is_nested
    for got, ref in zip(cap.tensor.unbind(), reference.unbind(), strict=True):
        assert torch.equal(got, ref)
    assert cap.shape == (3, None, 8) and cap.shapes == [(5, 8), (3, 8), (2, 8)]
    assert cap.lengths.tolist() == [5, 3, 2] and cap.mask.sum(1).tolist() == [5, 3, 2]
    padded = cap.numpy()
    assert padded.shape == (3, 5, 8) and (padded[2, 2:] == 0).all()
    assert np.array_equal(padded[1, :3], reference.unbind()[1].numpy())
    assert "nested (3, *, 8)" in repr(rec) and rec._repr_html_()
    assert cap.nbytes >= 10 * 8 * 4
    table = hs.summary(model, x, src_key_padding_mask=pad)  # ... and summary works too
    assert "nested" in table.set_index("module").loc["layers.0", "shape"]


def test_sparse_outputs():
    class ToSparse(nn.Module):
        def forward(self, x):
            return x.to_sparse()

    model = nn.Sequential(nn.ReLU(), ToSparse())
    x = torch.tensor([[0.0, 1.0], [2.0, -3.0]])
    with hs.record(model, ["1"]) as rec:
        y = model(x)
    cap = rec["1"]
    assert cap.tensor.layout is torch.sparse_coo and torch.equal(cap.tensor.to_dense(),
                                                                   y.to_dense())
    assert np.array_equal(cap.numpy(), y.to_dense().numpy()) and cap.nbytes > 0
    assert "sparse" not in repr(cap) or True  # repr must not crash
    repr(rec)


def test_resize_after_the_hooked_module_does_not_crash_the_forward():
    class Grows(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Identity()

        def forward(self, x):
            y = self.inner(x * 1)
            y.resize_(100)  # e.g. an out= argument of another size
            y.fill_(7.0)
            return y

    x = torch.arange(4.0)
    with hs.record(Grows(), ["inner"]) as rec:
        Grows()(x)  # another instance: not recorded, just proves the op itself is fine
    model = Grows()
    with hs.record(model, ["inner"]) as rec:
        out = model(x)
    assert torch.equal(rec["inner"].tensor, x) and out.shape == (100,)


def test_packed_sequence_captures_are_detached():
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, batch_first=True)
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(2, 5, 3, requires_grad=True),
                                               torch.tensor([5, 2]), batch_first=True)
    with hs.record(lstm, [""], inputs=True) as rec:
        lstm(packed)
    cap = rec[""]
    for t in (cap.tensor, cap.output[1][0], cap.inputs[0]):
        assert not t.requires_grad and t.grad_fn is None


def test_a_small_view_of_a_large_output_is_stored_compactly():
    model = nn.Linear(8, 512)
    x = torch.randn(64, 8)
    with hs.record(model, [""], pick=lambda out: out[:, 0]) as rec:
        y = model(x)
    cap = rec[""]
    assert torch.equal(cap.tensor, y[:, 0].detach())
    assert cap.tensor.untyped_storage().nbytes() == 64 * 4  # not 64 x 512 floats
    assert cap.nbytes == 64 * 4 and rec.table()["bytes"].iloc[0] == 64 * 4
    with torch.no_grad(), hs.record(model, [""], pick=lambda out: out[:, 0],
                                    clone=False) as kept:
        model(x)
    assert kept[""].nbytes == 64 * 512 * 4  # a view: what it really holds is the whole output


def test_clone_false_is_checked_on_every_read(tmp_path):
    class Inner(nn.Module):
        def forward(self, x):
            return x * 2

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = Inner()

        def forward(self, x):
            y = self.inner(x)
            x.add_(1)  # changes the recorded input too
            y.add_(1)
            return y

    model = Model()
    with torch.no_grad(), hs.record(model, ["inner"], inputs=True, clone=False) as rec:
        model(torch.ones(2))
    cap = rec["inner"]
    for read in (lambda: cap.tensor, lambda: cap.output, lambda: cap.inputs,
                 lambda: cap.kwargs, lambda: hs.save(rec, tmp_path / "r.hsrec")):
        with pytest.raises(hs.CaptureModifiedError):
            read()


class Holder:
    """A mutable object returned by a module, like a Hugging Face cache."""

    def __init__(self) -> None:
        self.tensors = [torch.zeros(2)]
        self.step = 0


class Slotted:
    __slots__ = ("t",)

    def __init__(self) -> None:
        self.t = torch.zeros(1)


def test_live_objects_are_snapshotted_or_named():
    holder = Holder()

    class Appends(nn.Module):
        def forward(self, x):
            holder.tensors[0].add_(x)
            holder.step += 1
            return x, holder, Slotted()

    model = Appends()
    with hs.record(model, [""]) as rec:
        model(torch.ones(2))
        model(torch.ones(2))
    first = rec.step(0)[""]
    assert first.output[1].step == 1 and first.output[1].tensors[0].tolist() == [1.0, 1.0]
    assert holder.step == 2 and holder.tensors[0].tolist() == [2.0, 2.0]
    assert first.live == ("output[2] (Slotted)",) and "Slotted" in repr(first)


def test_nested_captures_export_only_their_real_positions():
    model, x, pad = _fast_path_encoder(1)
    with torch.no_grad(), hs.record(model, ["layers.0"]) as rec:
        model(x, src_key_padding_mask=pad)
    parts = rec["layers.0"].tensor.unbind()
    expected = torch.stack([p.mean(0) for p in parts]).numpy()  # by hand, per example
    assert np.allclose(rec.to_frame(reduce="mean").to_numpy(), expected, atol=1e-6)
    assert np.allclose(hs.recording_vectors(rec, reduce="mean")["layers.0"], expected,
                       atol=1e-6)
    long = rec["layers.0"].to_frame(kind="long")
    assert len(long) == (5 + 3 + 2) * 8


@pytest.mark.parametrize("reduce", [None, "mean"])
def test_record_dataset_of_nested_outputs_stores_the_real_positions(tmp_path, reduce):
    """record_dataset of the fast path's nested tensors: reduce=None stores each example's
    real positions, "mean" their mean, as the hand-written hook's nested copies give them."""
    pytest.importorskip("pyarrow")
    model, x, pad = _fast_path_encoder(2)
    with torch.no_grad():
        reference = _manual(model, "layers.0", x, src_key_padding_mask=pad)[0].unbind()
    out = hs.record_dataset(model, [(x, pad)], ["layers.0"], tmp_path / "ds", reduce=reduce,
                            forward=lambda m, b: m(b[0], src_key_padding_mask=b[1]),
                            progress=False, setup_id="test")
    ds = hs.open_dataset(out)
    if reduce is None:
        import pyarrow.parquet as pq

        stored = pq.read_table(out / "shards")["layers.0"].to_pylist()  # as any reader sees it
        for got, ref in zip(stored, reference, strict=True):
            np.testing.assert_array_equal(np.array(got, dtype=np.float32), ref.numpy())
    else:
        np.testing.assert_allclose(ds.numpy("layers.0"),
                                   np.stack([r.mean(0).numpy() for r in reference]),
                                   rtol=1e-6, atol=1e-6)


class _Spectrum(nn.Module):
    """A complex output, as a Fourier layer (FNet, spectral models) returns."""

    def forward(self, x):
        return torch.fft.fft(x, dim=-1)


def test_complex_sequences_pool_without_losing_the_imaginary_part(tmp_path):
    """Casting to float kept the real part alone (PyTorch's warning the only sign)."""
    model = nn.Sequential(_Spectrum())
    x = torch.randn(3, 5, 4)
    lengths = torch.tensor([5, 3, 2])
    with hs.record(model, ["0"]) as rec:
        model(x)
    ref = _manual(model, "0", x)[0]
    assert ref.is_complex() and torch.equal(rec["0"].tensor, ref)
    for reduce in ("mean", "sum"):
        expected = np.stack([getattr(ref[i, :n].numpy(), reduce)(0)
                             for i, n in enumerate(lengths.tolist())])
        got = rec.to_frame(reduce=reduce, lengths=lengths).to_numpy()
        assert np.iscomplexobj(got) and np.allclose(got, expected, rtol=1e-5, atol=1e-6)
        pooled = hs.masked_pool(ref, lengths, reduce=reduce)
        assert pooled.is_complex() and np.allclose(pooled.numpy(), expected, rtol=1e-5,
                                                   atol=1e-6)
    with pytest.raises(hs.InputError, match="complex.*no max"):
        rec.to_frame(reduce="max")
    with pytest.raises(hs.InputError, match="complex"):  # the analysis functions refuse
        hs.similarity_matrix({"0": rec.to_frame(reduce="mean").to_numpy()})
    with pytest.raises(hs.DatasetError, match="complex"):
        hs.record_dataset(model, [x], ["0"], tmp_path / "ds", reduce="mean", progress=False)


class _Scaled(nn.Module):
    def forward(self, x):
        return x * 1e5


def test_dtype_float16_that_would_make_finite_values_infinite_is_an_error(tmp_path):
    """dtype=torch.float16 turned 1e5 into inf silently (and cosine then blamed the data;
    record_dataset blamed a store_dtype= never given)."""
    model = nn.Sequential(_Scaled())
    with pytest.raises(hs.InputError, match=r"batch 0: dtype=torch.float16 cannot hold"):
        hs.record_dataset(model, [torch.ones(2, 3)], ["0"], tmp_path / "ds",
                          dtype=torch.float16, progress=False)
    with pytest.raises(hs.InputError, match=r"float16 cannot hold.*1e\+05.*float32"):
        with hs.record(model, ["0"], dtype=torch.float16):
            model(torch.tensor([[1.0, float("inf")]]))
    assert_no_hooks(model)
    with hs.record(model, ["0"], dtype=torch.float16) as rec:  # what fits is kept
        model(torch.tensor([[1e-3, float("inf")]]))
    expected = (torch.tensor([[1e-3, float("inf")]]) * 1e5).half()
    assert torch.equal(rec["0"].tensor, expected)
    with hs.record(model, ["0"], dtype=torch.bfloat16) as rec:  # bfloat16 holds it
        model(torch.ones(1, 2))
    assert torch.isfinite(rec["0"].tensor).all()


def test_capture_numpy_is_read_only_so_it_cannot_change_the_recording():
    """numpy() shares the capture's memory on the CPU: writing into it changed the recording
    (and every export and analysis after it)."""
    model = nn.Linear(2, 3)
    with hs.record(model, [""]) as rec:
        model(torch.ones(2, 2))
    before = rec[""].tensor.clone()
    arr = rec[""].numpy()
    with pytest.raises(ValueError, match="read-only"):
        arr[0, 0] = 123.0
    copy = arr.copy()
    copy[0, 0] = 123.0
    assert torch.equal(rec[""].tensor, before)
