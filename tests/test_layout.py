"""Time-major outputs: PyTorch's sequence modules built ``batch_first=False`` (their default)
return ``(time, batch, ...)``.  A capture knows its batch is dim 1 (``Capture.batch_dim``), and
every export, reduction, ``cat`` and dataset reads one row per *example*, not per time step.

References are computed by hand from the module's own output (a hook that clones, or the
model's return value), transposed explicitly.  Means are compared with a float32 tolerance
(the library's masked mean sums in another order than ``Tensor.mean``)."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import hookscope as hs
from hookscope.errors import CallCountError, RecordingFileError
from hookscope.frame import capture_matrix

TOL = {"rtol": 1e-5, "atol": 1e-6}


def _encoder(batch_first: bool = False) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=batch_first)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()


def _cloned(model: nn.Module, name: str, *args):
    """The module's output as a hand-written hook that clones sees it."""
    seen = []
    handle = model.get_submodule(name).register_forward_hook(
        lambda m, a, out: seen.append(out[0].detach().clone() if isinstance(out, tuple)
                                      else out.detach().clone()))
    try:
        with torch.no_grad():
            model(*args)
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("rnn", [nn.LSTM, nn.GRU, nn.RNN])
@pytest.mark.parametrize("time", [6, 3])  # 3: as many steps as examples (shapes cannot tell)
def test_a_time_major_rnn_exports_one_row_per_example(rnn, time):
    torch.manual_seed(0)
    model = rnn(4, 5).eval()
    x = torch.randn(time, 3, 4)
    with torch.no_grad(), hs.record(model, [""]) as rec:
        out = model(x)[0]
    cap = rec[""]
    assert cap.batch_dim == 1 and torch.equal(cap.tensor, out)  # the module's layout kept
    frame = rec.to_frame(reduce="mean")
    assert frame.shape == (3, 5)
    torch.testing.assert_close(torch.tensor(frame.to_numpy()), out.mean(0), **TOL)
    last = hs.recording_vectors(rec, reduce="last")[""]
    torch.testing.assert_close(torch.tensor(last), out[-1], **TOL)
    other = hs.recording_vectors(rec, reduce="mean")[""]  # what the analysis functions take
    assert hs.cosine_matrix(other).shape == (3, 3)


def test_a_batch_first_rnn_is_unchanged():
    model = nn.LSTM(4, 5, batch_first=True).eval()
    with torch.no_grad(), hs.record(model, [""]) as rec:
        out = model(torch.randn(3, 6, 4))[0]
    assert rec[""].batch_dim == 0
    torch.testing.assert_close(torch.tensor(rec.to_frame(reduce="mean").to_numpy()),
                               out.mean(1), **TOL)


@pytest.mark.parametrize("name", ["", "layers.0", "layers.1"])
def test_transformer_modules_built_time_major_know_their_batch(name):
    torch.manual_seed(0)
    model = _encoder()
    x = torch.randn(7, 3, 16)
    (want,) = _cloned(model, name, x)
    with torch.no_grad(), hs.record(model, [name]) as rec:
        model(x)
    cap = rec[name]
    assert cap.batch_dim == 1 and torch.equal(cap.tensor, want)
    assert "batch at dim 1" in repr(cap)
    frame = rec.to_frame(reduce="mean")
    assert frame.shape == (3, 16)
    torch.testing.assert_close(torch.tensor(frame.to_numpy()), want.mean(0), **TOL)
    long = rec.to_frame("long")
    assert sorted(long["example"].unique()) == [0, 1, 2]
    assert long["position"].max() == 6
    row = long[(long.example == 2) & (long.position == 4)].sort_values("unit")["value"]
    np.testing.assert_array_equal(row.to_numpy(), want[4, 2].numpy())


def test_a_batch_first_transformer_and_its_submodules_are_batch_first():
    model = _encoder(batch_first=True)
    with torch.no_grad(), hs.record(model, ["layers.0", "layers.0.linear1"]) as rec:
        model(torch.randn(3, 7, 16))
    assert rec["layers.0"].batch_dim == 0 and rec["layers.0.linear1"].batch_dim == 0


def test_attention_output_is_time_major_and_its_weights_batch_first():
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(8, 2).eval()
    q = torch.randn(5, 3, 8)
    with torch.no_grad(), hs.record(attn, [""]) as rec:
        out, _ = attn(q, q, q)
    assert rec[""].batch_dim == 1 and torch.equal(rec[""].tensor, out)
    with torch.no_grad(), hs.record(attn, [""], pick=lambda o: o[1]) as rec:
        attn(q, q, q)
    assert rec[""].batch_dim == 0 and rec[""].tensor.shape == (3, 5, 5)
    with torch.no_grad(), hs.record(attn, [""], pick=lambda o: o[0]) as rec:
        attn(q, q, q)
    assert rec[""].batch_dim == 1  # the very tensor, picked


def test_full_transformer_is_time_major():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="enable_nested_tensor"):
        model = nn.Transformer(8, 2, 1, 1, 16, dropout=0.0).eval()
    src, tgt = torch.randn(6, 2, 8), torch.randn(4, 2, 8)
    with torch.no_grad(), hs.record(model, ["", "encoder"]) as rec:
        out = model(src, tgt)
    assert rec[""].batch_dim == 1 and rec["encoder"].batch_dim == 1
    assert rec[""].to_frame(reduce="max").shape == (2, 8)
    torch.testing.assert_close(torch.tensor(rec[""].to_frame(reduce="max").to_numpy()),
                               out.amax(0), **TOL)


def test_unsort_permutes_a_time_major_output_along_its_batch():
    torch.manual_seed(0)
    model = _encoder()
    x = torch.randn(7, 4, 16)
    perm = torch.tensor([2, 0, 3, 1])
    (want,) = _cloned(model, "layers.0", x)
    with torch.no_grad(), hs.record(model, ["layers.0"], unsort={"layers.0": perm}) as rec:
        model(x)
    assert torch.equal(rec["layers.0"].tensor, want[:, perm])
    assert rec["layers.0"].batch_dim == 1


def test_unsort_of_a_time_major_rnn_with_as_many_steps_as_examples():
    torch.manual_seed(0)
    model = nn.GRU(4, 5).eval()
    x = torch.randn(3, 3, 4)
    perm = torch.tensor([1, 2, 0])
    with torch.no_grad(), hs.record(model, [""], unsort={"": perm}) as rec:
        out, _ = model(x)
    assert torch.equal(rec[""].tensor, out[:, perm])
    torch.testing.assert_close(torch.tensor(rec.to_frame(reduce="mean").to_numpy()),
                               out[:, perm].mean(0), **TOL)


class _TimeMajorHead(nn.Module):
    """A module of the user's own whose output is time-major: nothing can tell."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(4, 5)
        self.proj = nn.Linear(5, 2)

    def forward(self, x):
        return self.proj(self.rnn(x)[0])


def test_batch_dim_tells_exports_where_the_batch_is_without_unsort():
    torch.manual_seed(0)
    model = _TimeMajorHead().eval()
    x = torch.randn(6, 3, 4)
    (want,) = _cloned(model, "proj", x)
    with torch.no_grad(), hs.record(model, ["proj"], batch_dim={"proj": 1}) as rec:
        model(x)
    assert rec["proj"].batch_dim == 1 and torch.equal(rec["proj"].tensor, want)
    torch.testing.assert_close(torch.tensor(rec.to_frame(reduce="mean").to_numpy()),
                               want.mean(0), **TOL)
    with torch.no_grad(), hs.record(model, ["proj"]) as rec:  # not told: read batch-first
        model(x)
    assert rec["proj"].batch_dim == 0


def test_record_dataset_writes_one_row_per_example_of_a_time_major_model(tmp_path):
    torch.manual_seed(0)
    model = _TimeMajorHead().eval()
    batches = [torch.randn(6, 3, 4) for _ in range(3)]
    out = hs.record_dataset(model, batches, ["rnn"], tmp_path / "ds", reduce="mean",
                            progress=False)
    got = torch.tensor(hs.open_dataset(out).numpy("rnn"))
    assert got.shape == (9, 5)
    with torch.no_grad():
        want = torch.cat([model.rnn(b)[0].mean(0) for b in batches])
    torch.testing.assert_close(got, want, **TOL)


class _PackedTimeMajor(nn.Module):
    """Fed a PackedSequence, returns the time-major padding (pad_packed_sequence's
    default)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(4, 5)

    def forward(self, packed):
        return pad_packed_sequence(self.rnn(packed)[0])[0]


def test_a_time_major_padding_of_a_packed_input_is_known_from_its_lengths(tmp_path):
    torch.manual_seed(0)
    model = _PackedTimeMajor().eval()
    lengths = torch.tensor([5, 2, 4])
    x = torch.randn(5, 3, 4)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    with torch.no_grad(), hs.record(model, [""]) as rec:
        padded = model(packed)
    cap = rec[""]
    assert cap.batch_dim == 1 and cap.lengths.tolist() == [5, 2, 4]
    assert cap.mask.shape == (3, 5)
    want = torch.stack([padded[:n, i].mean(0) for i, n in enumerate(lengths.tolist())])
    torch.testing.assert_close(torch.tensor(rec.to_frame(reduce="mean").to_numpy()),
                               want, **TOL)
    out = hs.record_dataset(model, [packed], [""], tmp_path / "ds", reduce="mean",
                            progress=False)
    got = hs.open_dataset(out).numpy("")
    torch.testing.assert_close(torch.tensor(got), want, **TOL)


class _Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = _encoder()

    def forward(self, x, attention_mask):
        return self.encoder(x.transpose(0, 1),
                            src_key_padding_mask=attention_mask == 0).transpose(0, 1)


def test_the_model_calls_mask_fits_a_time_major_capture():
    torch.manual_seed(0)
    model = _Masked().eval()
    x = torch.randn(3, 7, 16)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    (want,) = _cloned(model, "encoder.layers.1", x, mask)
    with torch.no_grad(), hs.record(model, ["encoder.layers.1"]) as rec:
        model(x, attention_mask=mask)
    cap = rec["encoder.layers.1"]
    assert cap.batch_dim == 1 and torch.equal(cap.mask, mask.bool())
    real = [want[: int(n), i].mean(0) for i, n in enumerate(mask.sum(1))]
    torch.testing.assert_close(torch.tensor(rec.to_frame(reduce="mean").to_numpy()),
                               torch.stack(real), **TOL)


def test_cat_concatenates_time_major_captures_along_their_batch():
    torch.manual_seed(0)
    model = nn.LSTM(4, 5).eval()
    xs = [torch.randn(6, 2, 4), torch.randn(6, 3, 4)]
    with torch.no_grad(), hs.record(model, [""]) as rec:
        outs = [model(x)[0] for x in xs]
    cat = rec.cat("")
    assert cat.batch_dim == 1 and torch.equal(cat.tensor, torch.cat(outs, dim=1))
    assert cat.to_frame(reduce="mean").shape == (5, 5)


def test_cat_refuses_captures_with_their_batch_on_different_dimensions():
    model = _TimeMajorHead().eval()
    rec = hs.record(model, ["proj"], batch_dim={"proj": 1}).run(torch.randn(6, 3, 4))
    other = hs.record(model, ["proj"]).run(torch.randn(6, 3, 4))
    rec._add(other["proj"])
    other["proj"].step = 1
    with pytest.raises(hs.errors.InputError, match="different dimensions"):
        rec.cat("proj")


def test_gradients_of_a_time_major_capture_export_per_example():
    torch.manual_seed(0)
    model = nn.LSTM(4, 5)
    x = torch.randn(6, 3, 4)
    with hs.record(model, [""], grads=True) as rec:
        out = model(x)[0]
        out.pow(2).sum().backward()
    grad = rec[""].grad
    assert grad.shape == (6, 3, 5)
    frame = rec.to_frame(reduce="mean", values="grad")
    torch.testing.assert_close(torch.tensor(frame.to_numpy()), (2 * out).detach().mean(0),
                               **TOL)


def test_batch_dim_is_saved_and_loaded(tmp_path):
    model = nn.GRU(4, 5).eval()
    with torch.no_grad(), hs.record(model, [""]) as rec:
        model(torch.randn(6, 3, 4))
    path = hs.save(rec, tmp_path / "rec")
    loaded = hs.load(path)
    assert loaded[""].batch_dim == 1
    np.testing.assert_array_equal(loaded.to_frame(reduce="mean").to_numpy(),
                                  rec.to_frame(reduce="mean").to_numpy())


def _archive(path):
    with zipfile.ZipFile(path) as z:
        return {i.filename: z.read(i) for i in z.infolist()}


def _rewritten(path, edit, out):
    files = _archive(path)
    manifest = json.loads(files["manifest.json"])
    edit(manifest)
    files["manifest.json"] = json.dumps(manifest).encode()
    with zipfile.ZipFile(out, "w") as z:
        for name, body in files.items():
            z.writestr(name, body)
    return out


def test_a_file_without_time_major_captures_keeps_format_version_2(tmp_path):
    rec = hs.record(nn.Linear(3, 2), [""]).run(torch.randn(4, 3))
    path = hs.save(rec, tmp_path / "rec")
    assert hs.load(path)[""].batch_dim == 0
    assert json.loads(_archive(path)["manifest.json"])["version"] == 2
    rec = hs.record(nn.GRU(4, 5), [""]).run(torch.randn(6, 3, 4))
    assert json.loads(_archive(hs.save(rec, tmp_path / "tm"))["manifest.json"])["version"] == 3


@pytest.mark.parametrize("bad", [7, -1, "1", True, 1.0, 2**70])
def test_a_crafted_batch_dim_is_refused(tmp_path, bad):
    rec = hs.record(nn.GRU(4, 5), [""]).run(torch.randn(6, 3, 4))
    path = hs.save(rec, tmp_path / "rec")

    def edit(manifest):
        manifest["captures"][0]["batch_dim"] = bad

    crafted = _rewritten(path, edit, tmp_path / "crafted.hsrec")
    with pytest.raises(RecordingFileError, match="batch_dim"):
        hs.load(crafted)


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 5)

    def forward(self, x):
        return self.lin(x) + self.lin(x)


def test_unsort_by_label_must_name_every_call():
    model = _Twice()
    perm = torch.tensor([1, 0])
    with pytest.raises(CallCountError, match="'b'"):
        hs.record(model, ["lin"], calls={"lin": ["a", "b"]}, unsort={"lin": {"a": perm}})
    rec = hs.record(model, ["lin"], calls={"lin": ["a", "b"]},
                    unsort={"lin": {"a": perm, "b": None}})
    x = torch.randn(2, 3)
    with torch.no_grad(), rec as got:
        model(x)
    want = model.lin(x).detach()
    assert torch.equal(got.calls("lin")[0].tensor, want[perm])
    assert torch.equal(got.calls("lin")[1].tensor, want)


# -- 1-D feature maps: (batch, channels, length) from Conv1d and the other 1-D layers ------


class _TextCNN(nn.Module):
    """Embeddings (batch, time, dim) turned channels-first for 1-D convolutions, as text and
    audio CNNs do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(8, 6, 3, padding=1)
        self.norm = nn.BatchNorm1d(6)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool1d(2, return_indices=True)
        self.gap = nn.AdaptiveAvgPool1d(1)

    def forward(self, x, attention_mask=None):
        h = self.act(self.norm(self.conv(x.transpose(1, 2))))
        return self.gap(self.pool(h)[0]).flatten(1)


@pytest.mark.parametrize("reduce", ["mean", "max", "sum"])
def test_a_1d_feature_map_is_pooled_over_its_positions(reduce):
    torch.manual_seed(0)
    model = _TextCNN().eval()
    x = torch.randn(3, 10, 8)
    outs = {name: _cloned(model, name, x)[0] for name in ("conv", "norm", "pool", "gap")}
    with torch.no_grad(), hs.record(model, ["conv", "norm", "pool", "gap", "act"]) as rec:
        model(x)
    for name, want in outs.items():
        cap = rec[name]
        assert cap.feature_map and torch.equal(cap.tensor, want)
        got = torch.tensor(cap.to_frame(reduce=reduce).to_numpy())
        pooled = {"mean": want.mean(2), "max": want.amax(2), "sum": want.sum(2)}[reduce]
        torch.testing.assert_close(got, pooled, **TOL)
    assert not rec["act"].feature_map  # (any other module's 3-D output is a sequence)


def test_a_1d_feature_maps_long_frame_and_flatten_are_per_position_and_channel():
    torch.manual_seed(0)
    model = _TextCNN().eval()
    x = torch.randn(2, 5, 8)
    (want,) = _cloned(model, "conv", x)
    with torch.no_grad(), hs.record(model, ["conv"]) as rec:
        model(x)
    long = rec.to_frame("long")
    assert long["unit"].max() == 5 and long["position"].max() == 4  # 6 channels, 5 positions
    row = long[(long.example == 1) & (long.position == 3)].sort_values("unit")["value"]
    np.testing.assert_array_equal(row.to_numpy(), want[1, :, 3].numpy())
    flat = rec.to_frame(reduce="flatten").to_numpy()
    np.testing.assert_array_equal(flat, want.reshape(2, -1).numpy())  # channel-major, as 2-D
    with pytest.raises(hs.errors.InputError, match="feature map"):
        rec.to_frame(reduce="last")
    with pytest.raises(hs.errors.InputError, match="feature map"):
        rec.to_frame()


def test_a_1d_feature_map_gets_no_padding_mask_even_where_its_shape_fits():
    torch.manual_seed(0)
    model = _TextCNN().eval()
    x = torch.randn(3, 6, 8)  # conv: (3, 6 channels, 6 positions); the mask: (3, 6)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, 3:] = 0
    with torch.no_grad(), hs.record(model, ["conv", "norm"]) as rec:
        model(x, attention_mask=mask)
    for name in ("conv", "norm"):
        assert rec[name].mask is None
        torch.testing.assert_close(torch.tensor(rec[name].to_frame(reduce="mean").to_numpy()),
                                   rec[name].tensor.mean(2), **TOL)


def test_pick_can_make_a_1d_feature_map_a_sequence_of_positions():
    model = _TextCNN().eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad(), hs.record(model, ["conv"], pick=lambda o: o.transpose(1, 2)) as rec:
        model(x)
    assert not rec["conv"].feature_map
    assert rec.to_frame(reduce="last").shape == (2, 6)


def test_record_dataset_pools_a_1d_feature_map_per_channel(tmp_path):
    torch.manual_seed(0)
    model = _TextCNN().eval()
    batches = [torch.randn(3, 10, 8) for _ in range(2)]
    out = hs.record_dataset(model, batches, ["conv", "gap"], tmp_path / "ds", reduce="mean",
                            progress=False)
    view = hs.open_dataset(out)
    with torch.no_grad():
        want = torch.cat([model.conv(b.transpose(1, 2)).mean(2) for b in batches])
    torch.testing.assert_close(torch.tensor(view.numpy("conv")), want, **TOL)
    assert view.numpy("gap").shape == (6, 6)  # (the pooled (batch, 6, 1): 6 channels)
    with pytest.raises(hs.errors.InputError, match="feature map"):
        hs.record_dataset(model, batches, ["conv"], tmp_path / "none", progress=False)


def test_a_1d_feature_map_is_kept_by_cat_save_and_load(tmp_path):
    model = _TextCNN().eval()
    with torch.no_grad(), hs.record(model, ["conv"]) as rec:
        model(torch.randn(2, 5, 8))
        model(torch.randn(3, 5, 8))
    cat = rec.cat("conv")
    assert cat.feature_map and cat.tensor.shape == (5, 6, 5)
    loaded = hs.load(hs.save(rec, tmp_path / "rec"))
    assert loaded.calls("conv")[0].feature_map
    np.testing.assert_array_equal(loaded.to_frame(reduce="max").to_numpy(),
                                  rec.to_frame(reduce="max").to_numpy())


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_a_crafted_feature_map_flag_is_refused(tmp_path, bad):
    rec = hs.record(nn.Conv1d(2, 3, 1), [""]).run(torch.randn(4, 2, 5))
    path = hs.save(rec, tmp_path / "rec")

    def edit(manifest):
        manifest["captures"][0]["feature_map"] = bad

    with pytest.raises(RecordingFileError, match="feature_map"):
        hs.load(_rewritten(path, edit, tmp_path / "crafted.hsrec"))


# -- time-major sequences passed on, picked, unsorted; datasets with lengths= ------------


class _Passes(nn.Module):
    """Returns what a time-major module inside returned: as it is, its tuple, or through an
    eval-mode Dropout (which returns its input)."""

    def __init__(self, how: str, inner: nn.Module | None = None) -> None:
        super().__init__()
        self.inner = inner if inner is not None else nn.LSTM(4, 3, bidirectional=True)
        self.drop = nn.Dropout(0.5)
        self.how = how

    def forward(self, x):
        got = self.inner(x)
        out = got[0] if isinstance(got, tuple) else got
        return {"tuple": got, "out": out, "dropout": self.drop(out)}[self.how]


@pytest.mark.parametrize("how", ["tuple", "out", "dropout"])
@pytest.mark.parametrize("time", [5, 2])
def test_a_module_that_passes_a_time_major_sequence_on_knows_its_batch(tmp_path, how, time):
    torch.manual_seed(0)
    model = _Passes(how).eval()
    x = torch.randn(time, 2, 4)
    with torch.no_grad(), hs.record(model, ["", "drop"]) as rec:
        got = model(x)
    out = got[0] if isinstance(got, tuple) else got
    assert rec[""].batch_dim == 1
    if how == "dropout":
        assert rec["drop"].batch_dim == 1
    torch.testing.assert_close(torch.tensor(rec[""].to_frame(reduce="mean").to_numpy()),
                               out.mean(0), **TOL)
    last = torch.cat([out[-1, :, :3], out[0, :, 3:]], dim=1)  # forward / backward halves
    torch.testing.assert_close(torch.tensor(rec[""].to_frame(reduce="last").to_numpy()),
                               last, **TOL)
    perm = torch.tensor([1, 0])
    with torch.no_grad(), hs.record(model, [""], unsort={"": perm}) as rec:
        model(x)
    assert torch.equal(rec[""].tensor, out[:, perm])
    path = hs.record_dataset(model, [x, x], [""], tmp_path / "ds", reduce="mean",
                             progress=False)
    assert hs.open_dataset(path).numpy("").shape == (4, 6)


def test_a_module_around_a_time_major_transformer_knows_its_batch():
    torch.manual_seed(0)
    model = _Passes("out", _encoder()).eval()
    x = torch.randn(7, 3, 16)
    with torch.no_grad(), hs.record(model, [""]) as rec:
        out = model(x)
    assert rec[""].batch_dim == 1
    torch.testing.assert_close(torch.tensor(rec.to_frame(reduce="mean").to_numpy()),
                               out.mean(0), **TOL)


@pytest.mark.parametrize("time", [5, 3])
def test_unsort_of_a_time_major_sequence_picked_from_an_rnns_output(time):
    torch.manual_seed(0)
    model = nn.GRU(4, 5).eval()
    x = torch.randn(time, 3, 4)
    perm = torch.tensor([2, 0, 1])
    with torch.no_grad(), hs.record(model, [""], pick=lambda o: o[0], unsort={"": perm}) as rec:
        out, _ = model(x)
    assert rec[""].batch_dim == 1 and torch.equal(rec[""].tensor, out[:, perm])


def test_unsort_of_a_time_major_padding_of_a_packed_input():
    torch.manual_seed(0)
    model = _PackedTimeMajor().eval()
    lengths = torch.tensor([5, 2, 4])
    packed = pack_padded_sequence(torch.randn(5, 3, 4), lengths, enforce_sorted=False)
    perm = torch.tensor([1, 2, 0])
    with torch.no_grad(), hs.record(model, [""], unsort={"": perm}) as rec:
        padded = model(packed)
    cap = rec[""]
    assert cap.batch_dim == 1 and torch.equal(cap.tensor, padded[:, perm])
    assert cap.lengths.tolist() == lengths[perm].tolist()


@pytest.mark.parametrize("module", [
    lambda: nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
    lambda: nn.MultiheadAttention(8, 2, batch_first=True),
    lambda: nn.MultiheadAttention(8, 2),
])
def test_unsort_of_attention_modules_where_time_equals_batch(module):
    """Their layout is known from batch_first: no 'ambiguous' error when time == batch, and
    attention weights are batch-first (batch, target, source)."""
    torch.manual_seed(0)
    m = module().eval()
    x = torch.randn(3, 3, 8)
    perm = torch.tensor([2, 0, 1])
    call = (lambda: m(x, x, x)) if isinstance(m, nn.MultiheadAttention) else (lambda: m(x))
    with torch.no_grad(), hs.record(m, [""], unsort={"": perm}) as rec:
        got = call()
    dim = 1 if isinstance(m, nn.MultiheadAttention) and not m.batch_first else 0
    out = got[0] if isinstance(got, tuple) else got
    assert torch.equal(rec[""].tensor, out.index_select(dim, perm))
    if isinstance(got, tuple):
        assert torch.equal(rec[""].output[1], got[1][perm])


@pytest.mark.parametrize("reduce", ["mean", "last", None])
@pytest.mark.parametrize("time", [5, 3])
def test_record_dataset_applies_lengths_to_time_major_captures(tmp_path, reduce, time):
    torch.manual_seed(0)
    model = nn.GRU(4, 5).eval()
    x = torch.randn(time, 3, 4)
    lengths = torch.tensor([time, 2, 1])
    path = hs.record_dataset(model, [x], [""], tmp_path / "ds", reduce=reduce,
                             lengths=lambda batch: lengths, progress=False)
    with torch.no_grad():
        out, _ = model(x)
    real = [out[:n, i] for i, n in enumerate(lengths.tolist())]
    if reduce is None:  # sequences, each example's real positions: as pandas reads them
        import pandas as pd

        frame = pd.read_parquet(path / "shards").sort_values(["batch", "row"])
        got = [np.stack(seq) for seq in frame[""]]
        assert [len(g) for g in got] == lengths.tolist()
        for g, want in zip(got, real, strict=True):
            np.testing.assert_allclose(g, want.numpy(), rtol=1e-6, atol=1e-6)
        return
    want = torch.stack([r.mean(0) if reduce == "mean" else r[-1] for r in real])
    torch.testing.assert_close(torch.tensor(hs.open_dataset(path).numpy("")), want, **TOL)
    with pytest.raises(hs.errors.DatasetError, match="gave 4 lengths"):
        hs.record_dataset(model, [x], [""], tmp_path / "bad", reduce=reduce,
                          lengths=lambda batch: torch.tensor([1, 1, 1, 1]), progress=False)


def test_record_dataset_refuses_a_layout_that_changes_between_batches(tmp_path):
    model = _PackedTimeMajor().eval()
    batches = [pack_padded_sequence(torch.randn(5, 3, 4), torch.tensor([5, 2, 4]),
                                    enforce_sorted=False),  # 5 steps, 3 sequences: time-major
               pack_padded_sequence(torch.randn(3, 3, 4), torch.tensor([3, 2, 1]),
                                    enforce_sorted=False)]  # 3 and 3: looks batch-first
    with pytest.raises(hs.errors.DatasetError, match=r"along dim 0, earlier batches along dim 1"):
        hs.record_dataset(model, batches, [""], tmp_path / "ds", reduce="mean", progress=False)
    path = hs.record_dataset(model, batches, [""], tmp_path / "told", reduce="mean",
                             batch_dim={"": 1}, progress=False)
    assert hs.open_dataset(path).numpy("").shape == (6, 5)


def test_cat_keeps_bidirectional_halves_and_gathers_gradients():
    torch.manual_seed(0)
    model = nn.LSTM(4, 3, bidirectional=True)
    xs = [torch.randn(5, 2, 4), torch.randn(5, 3, 4)]
    with hs.record(model, [""], grads=True) as rec:
        outs = [model(x)[0] for x in xs]
        sum(o.pow(2).sum() for o in outs).backward()
    cat = rec.cat("")
    assert cat.bidirectional
    out = torch.cat(outs, dim=1).detach()
    last = torch.cat([out[-1, :, :3], out[0, :, 3:]], dim=1)
    torch.testing.assert_close(torch.tensor(cat.to_frame(reduce="last").to_numpy()), last,
                               **TOL)
    torch.testing.assert_close(cat.grad, 2 * out, **TOL)


# -- channels-last feature maps: Linear and LayerNorm inside a ConvNeXt block ----------------


class _ConvNextBlock(nn.Module):
    """ConvNeXt's block: a depthwise convolution, then channels-last LayerNorm and MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.norm = nn.LayerNorm(8)
        self.pwconv1 = nn.Linear(8, 16)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(16, 8)

    def forward(self, x):
        h = self.dwconv(x).permute(0, 2, 3, 1)
        return x + self.pwconv2(self.act(self.pwconv1(self.norm(h)))).permute(0, 3, 1, 2)


@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_channels_last_maps_of_linear_and_layernorm_are_pooled_per_channel(tmp_path, reduce):
    torch.manual_seed(0)
    model = _ConvNextBlock().eval()
    x = torch.randn(2, 8, 5, 6)
    names = ["norm", "pwconv1", "pwconv2"]
    outs = {name: _cloned(model, name, x)[0] for name in names}
    with torch.no_grad(), hs.record(model, [*names, "dwconv"]) as rec:
        model(x)
    for name, want in outs.items():
        cap = rec[name]
        assert cap.channels_last and torch.equal(cap.tensor, want)  # (the module's layout)
        pooled = want.mean((1, 2)) if reduce == "mean" else want.amax((1, 2))
        torch.testing.assert_close(torch.tensor(cap.to_frame(reduce=reduce).to_numpy()),
                                   pooled, **TOL)
    assert not rec["dwconv"].channels_last
    long = rec["pwconv1"].to_frame("long")
    assert long["unit"].max() == 15 and long["position"].max() == 29  # 16 channels, 5 x 6
    row = long[(long.example == 1) & (long.position == 7)].sort_values("unit")["value"]
    np.testing.assert_array_equal(row.to_numpy(), outs["pwconv1"][1, 1, 1].numpy())
    path = hs.record_dataset(model, [x, x], names, tmp_path / "ds", reduce=reduce,
                             progress=False)
    view = hs.open_dataset(path)
    assert view.numpy("pwconv1").shape == (4, 16)
    loaded = hs.load(hs.save(rec, tmp_path / "rec"))
    assert loaded["pwconv1"].channels_last
    with torch.no_grad(), hs.record(model, ["pwconv1"],
                                    pick=lambda o: o.permute(0, 3, 1, 2)) as picked:
        model(x)
    assert not picked["pwconv1"].channels_last
    torch.testing.assert_close(torch.tensor(picked.to_frame(reduce=reduce).to_numpy()),
                               torch.tensor(rec["pwconv1"].to_frame(reduce=reduce).to_numpy()))


def test_lengths_for_an_export_without_sequences_is_an_error_not_ignored():
    model = _TextCNN().eval()
    with torch.no_grad(), hs.record(model, ["conv", "gap"]) as rec:
        model(torch.randn(3, 10, 8))
    with pytest.raises(hs.errors.InputError, match="no capture is one"):
        rec.to_frame(reduce="mean", lengths=torch.tensor([10, 4, 2]))
    with pytest.raises(hs.errors.InputError, match="no capture is one"):
        hs.recording_vectors(rec, reduce="mean", lengths=torch.tensor([10, 4, 2]))


def test_record_dataset_says_a_3d_output_whose_channels_vary_may_be_a_feature_map(tmp_path):
    model = _TextCNN().eval()
    batches = [torch.randn(3, 10, 8), torch.randn(3, 7, 8)]
    with pytest.raises(hs.errors.DatasetError, match=r"\(batch, channels, length\) map"):
        hs.record_dataset(model, batches, ["act"], tmp_path / "ds", reduce="mean",
                          progress=False)


class _TimeMajorEncoder(nn.Module):
    """fairseq's layout, written by hand: ids (batch, time) in, layers on (time, batch, d)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.Tanh())
                                     for _ in range(2)])

    def forward(self, input_ids, attention_mask=None):
        x = self.embed(input_ids).transpose(0, 1)  # (time, batch, d)
        for layer in self.layers:
            x = layer(x)
        return x.transpose(0, 1)


def _time_major_batch(batch: int = 3, time: int = 6):
    ids = torch.randint(1, 50, (batch, time), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, time, dtype=torch.long)
    mask[1, 4:] = 0
    return ids, mask


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("positional", [True, False])
def test_a_time_major_layer_is_told_by_the_calls_ids_or_mask(masked, positional):
    torch.manual_seed(0)
    model = _TimeMajorEncoder().eval()
    ids, mask = _time_major_batch()
    kwargs = {"attention_mask": mask} if masked else {}
    outs = []  # the reference: a hand-written hook that clones
    handle = model.layers[1].register_forward_hook(lambda m, a, o: outs.append(o.clone()))
    with hs.record(model, ["layers.0", "layers.1"]) as rec:
        # ids under the name input_ids (forward's first parameter), which holds (batch, time)
        model(ids, **kwargs) if positional else model(input_ids=ids, **kwargs)
    handle.remove()
    cap = rec["layers.1"]
    assert cap.batch_dim == 1 and "batch at dim 1" in repr(cap)
    assert torch.equal(cap.tensor, outs[0])
    keep = mask.bool() if masked else torch.ones_like(mask, dtype=torch.bool)
    assert (cap.mask is not None) == masked
    by_hand = (outs[0].transpose(0, 1) * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)
    frame = rec.to_frame(reduce="mean")
    assert len(frame) == 3
    torch.testing.assert_close(torch.as_tensor(capture_matrix(cap, reduce="mean")), by_hand)
    # unsort=: the permutation reaches dim 1 (rows put back in the caller's order)
    perm = torch.tensor([2, 0, 1])
    with hs.record(model, ["layers.1"], unsort={"layers.1": perm}) as rec2:
        model(input_ids=ids, **kwargs)
    torch.testing.assert_close(rec2["layers.1"].tensor, outs[0][:, perm])
    torch.testing.assert_close(torch.as_tensor(capture_matrix(rec2["layers.1"], reduce="mean")),
                               by_hand[perm])


class _TimeMajorIds(nn.Module):
    """Time-major ids (time, batch) in, batch-first inside: a batch_first=True LSTM."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.proj = nn.Linear(8, 8)

    def forward(self, ids):
        return self.proj(self.lstm(self.embed(ids).transpose(0, 1))[0])


def test_ids_that_may_be_time_major_or_disagree_tell_nothing():
    """Only ids under the conventional keywords, and masks, tell a layout; a layout the
    module's type tells wins; references that disagree on the batch tell nothing."""
    torch.manual_seed(0)
    model = _TimeMajorIds().eval()
    ids = torch.randint(1, 50, (7, 3))  # 7 steps of 3 sequences, positional
    outs = []  # the reference: a hand-written hook that clones
    handle = model.lstm.register_forward_hook(lambda m, a, o: outs.append(o[0].clone()))
    perm = torch.tensor([2, 0, 1])
    with hs.record(model, ["lstm", "proj"], unsort={"lstm": perm}) as rec:
        out = model(ids)
    handle.remove()
    assert rec["lstm"].batch_dim == rec["proj"].batch_dim == 0
    assert rec["proj"].tensor.shape == out.shape == (3, 7, 8)
    assert torch.equal(rec["lstm"].output[0], outs[0][perm])  # every time step, rows permuted
    assert len(rec.to_frame(reduce="mean")) == 3

    class TwoStreams(nn.Module):  # a query (4, 8) and a document (8, 4): batches disagree
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(50, 8)

        def forward(self, input_ids, decoder_input_ids):
            return self.embed(input_ids), self.embed(decoder_input_ids)

    two = TwoStreams().eval()
    with hs.record(two, ["embed"]) as rec:
        two(input_ids=torch.randint(1, 50, (4, 8)), decoder_input_ids=torch.randint(1, 50, (8, 4)))
    assert [c.batch_dim for c in rec.calls("embed")] == [0, 0]


def test_batch_first_outputs_and_equal_sizes_keep_the_batch_at_dim_0():
    torch.manual_seed(0)
    batch_first = nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 8)).eval()
    ids, _ = _time_major_batch()
    with hs.record(batch_first, ["1"]) as rec:
        batch_first(ids)
    assert rec["1"].batch_dim == 0  # (3, 6, 8): dim 0 is the ids' batch
    # time == batch: nothing tells the layout; it stays dim 0 (batch_dim= says otherwise)
    model = _TimeMajorEncoder().eval()
    square, _ = _time_major_batch(batch=4, time=4)
    with hs.record(model, ["layers.1"]) as rec:
        model(input_ids=square)
    assert rec["layers.1"].batch_dim == 0
    with hs.record(model, ["layers.1"], batch_dim={"layers.1": 1}) as rec:
        model(input_ids=square)
    assert rec["layers.1"].batch_dim == 1


def test_record_dataset_of_a_time_major_layer_writes_a_row_per_example(tmp_path):
    torch.manual_seed(0)
    model = _TimeMajorEncoder().eval()
    ids, mask = _time_major_batch()
    outs = []
    handle = model.layers[1].register_forward_hook(lambda m, a, o: outs.append(o.clone()))
    batches = [{"input_ids": ids, "attention_mask": mask}] * 2
    hs.record_dataset(model, batches, ["layers.1"], tmp_path / "ds", reduce="max",
                      forward=lambda m, b: m(**b), progress=False)
    handle.remove()
    rows = hs.open_dataset(tmp_path / "ds").numpy("layers.1")
    keep = mask.bool()
    by_hand = outs[0].transpose(0, 1).masked_fill(~keep[..., None], float("-inf")).amax(1)
    assert rows.shape == (6, 8)
    torch.testing.assert_close(torch.tensor(rows[:3]), by_hand)


def test_exports_refuse_a_layout_that_changes_between_steps():
    """Step 2 has as many tokens as sequences: nothing tells its layout, and read batch-first
    it would give one row per time step beside step 1's rows per example."""
    torch.manual_seed(0)
    model = _TimeMajorEncoder().eval()
    told, _ = _time_major_batch(batch=3, time=6)
    square, _ = _time_major_batch(batch=4, time=4)
    with hs.record(model, ["layers.1"]) as rec:
        model(input_ids=told)
        model(input_ids=square)
    assert [c.batch_dim for c in rec.calls("layers.1")] == [1, 0]
    for export in (lambda: rec.to_frame(reduce="mean"),
                   lambda: hs.recording_vectors(rec, reduce="mean")):
        with pytest.raises(hs.InputError, match=r"dim 1 in step 0 but along dim 0 in step 1.*"
                                                r"batch_dim=\{'layers.1': 1\}"):
            export()
    with hs.record(model, ["layers.1"], batch_dim={"layers.1": 1}) as rec:
        model(input_ids=told)
        model(input_ids=square)
    frame = rec.to_frame(reduce="mean")
    assert len(frame) == 7
    by_hand = model.layers[1](model.layers[0](model.embed(square).transpose(0, 1))).mean(0)
    torch.testing.assert_close(torch.tensor(frame.to_numpy()[3:], dtype=torch.float32),
                               by_hand.detach())
    one = torch.tensor([[7]])  # (1, 1, d): either reading is the same
    with hs.record(model, ["layers.1"]) as rec:
        model(input_ids=told)
        model(input_ids=one)
    assert len(rec.to_frame(reduce="mean")) == 4


class _Downsampling(nn.Module):
    """(batch, time) ids -> (batch, time / 2, d) by a strided convolution, as speech and
    funnel models shorten their sequences: the call's padding mask no longer fits."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.conv = nn.Conv1d(8, 8, 3, stride=2, padding=1)
        self.out = nn.Linear(8, 8)

    def forward(self, input_ids, attention_mask=None):
        return self.out(self.conv(self.embed(input_ids).transpose(1, 2)).transpose(1, 2))


def test_a_sequence_the_padding_mask_does_not_fit_warns_when_reduced(tmp_path):
    import warnings

    torch.manual_seed(0)
    model = _Downsampling().eval()
    ids, mask = _time_major_batch(batch=3, time=8)  # sequence 1 padded after 4 tokens
    with hs.record(model, ["embed", "out"]) as rec:
        model(ids, attention_mask=mask)
    assert rec["embed"].mask is not None and rec["out"].mask is None
    with pytest.warns(UserWarning, match=r"'out' is a \(batch, time, features\) sequence whose "
                                         r"time steps differ.*reduce='mean'.*lengths="):
        rec.to_frame(reduce="mean")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these warns
        rec.to_frame(reduce="flatten")  # (every position, as asked)
        with hs.record(model, ["out"]) as unpadded:
            model(ids, attention_mask=torch.ones_like(mask))  # no padding: nothing lost
        unpadded.to_frame(reduce="mean")
        with hs.record(model, ["out"]) as again:
            model(ids, attention_mask=mask)
        again.to_frame(reduce="mean", lengths=torch.tensor([4, 2, 4]))  # told: no warning
    with pytest.warns(UserWarning, match="'out' is a"):
        hs.record_dataset(model, [{"input_ids": ids, "attention_mask": mask}] * 2, ["out"],
                          tmp_path / "ds", reduce="max", forward=lambda m, b: m(**b),
                          progress=False)


class _DownsamplingWithDecoder(_Downsampling):
    """The same, with a decoder over its own ids (batch, target) whose tokens the call gave."""

    def __init__(self) -> None:
        super().__init__()
        self.decoder = nn.Linear(8, 8)

    def forward(self, input_ids, attention_mask=None, decoder_input_ids=None):
        memory = super().forward(input_ids)
        return self.decoder(self.embed(decoder_input_ids) + memory.mean(1, keepdim=True))


def test_the_padding_warning_spares_given_tokens_and_points_at_the_caller(tmp_path):
    import warnings

    torch.manual_seed(0)
    model = _DownsamplingWithDecoder().eval()
    ids, mask = _time_major_batch(batch=3, time=8)
    target = torch.randint(1, 50, (3, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with hs.record(model, ["decoder"]) as rec:  # (3, 5, 8): the call's own 5 tokens
            model(ids, attention_mask=mask, decoder_input_ids=target)
            model(ids, attention_mask=mask, decoder_input_ids=target[:, :1])  # one step
        rec.to_frame(reduce="mean")
    with hs.record(model, ["out"]) as rec:
        for _ in range(3):
            model(ids, attention_mask=mask, decoder_input_ids=target)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec.to_frame(kind="long")  # every position kept: warned too
    assert [w.filename for w in caught] == [__file__] * 3  # this test's line, once a step
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for reduce in ("mean", None):
            hs.record_dataset(model, [{"input_ids": ids, "attention_mask": mask,
                                       "decoder_input_ids": target}] * 3, ["out"],
                              tmp_path / f"ds-{reduce}", reduce=reduce,
                              forward=lambda m, b: m(**b), progress=False)
    assert len(caught) == 2 and {w.filename for w in caught} == {__file__}  # once a run
