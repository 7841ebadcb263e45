"""Export and analysis of a transformer-like batch (padding masks, either side), a CNN (feature
maps), callable reductions and gathering captures over batches, each against a direct
computation on the tensors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import hookscope as hs
from hookscope.recording import Capture

# -- a CNN (ResNet-like; torchvision is not needed) ------------------------------------------


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        return self.relu(x + self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = Block(8)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.layer2 = Block(16)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.layer2(self.down(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@pytest.fixture
def cnn_rec():
    torch.manual_seed(0)
    model = TinyResNet().eval()
    images = torch.randn(6, 3, 8, 8)
    with torch.no_grad(), hs.record(model, ["layer1", "layer2", "avgpool", "fc"]) as rec:
        model(images)
    return rec


def test_cnn_feature_maps_pool_like_torchvision_avgpool(cnn_rec):
    layer2 = cnn_rec["layer2"].tensor
    assert layer2.shape == (6, 16, 4, 4)
    df = cnn_rec.to_frame(reduce="mean")
    assert np.allclose(df["layer2"].to_numpy(), layer2.mean(dim=(2, 3)).numpy(), atol=1e-6)
    # avgpool's (batch, 512, 1, 1) in a ResNet: global average pooling of layer2's output.
    avg = cnn_rec["avgpool"].tensor
    assert np.allclose(df["avgpool"].to_numpy(), avg[:, :, 0, 0].numpy())
    assert np.allclose(df["layer2"].to_numpy(), avg.flatten(1).numpy(), atol=1e-6)
    assert np.array_equal(df["fc"].to_numpy(), cnn_rec["fc"].tensor.numpy())
    mx = cnn_rec.to_frame(reduce="max")
    assert np.array_equal(mx["layer1"].to_numpy(), cnn_rec["layer1"].tensor.amax((2, 3)).numpy())
    flat = cnn_rec["layer1"].to_frame(reduce="flatten")
    assert np.array_equal(flat.to_numpy(), cnn_rec["layer1"].tensor.reshape(6, -1).numpy())


def test_cnn_errors_say_what_to_do(cnn_rec):
    with pytest.raises(hs.InputError, match="feature map.*reduce='mean'.*'flatten'"):
        cnn_rec.to_frame()
    with pytest.raises(hs.InputError, match="reduce='last' needs a sequence"):
        cnn_rec.to_frame(reduce="last")


def test_cnn_long_frame_indexes_spatial_positions(cnn_rec):
    cap = cnn_rec["layer2"]
    t = cap.tensor
    df = cap.to_frame(kind="long")
    assert len(df) == t.numel()
    sample = df.sample(200, random_state=0)
    h, w = np.unravel_index(sample.position.to_numpy(dtype=int), t.shape[2:])
    direct = t.numpy()[sample.example.to_numpy(), sample.unit.to_numpy(), h, w]
    assert np.array_equal(sample.value.to_numpy(), direct)


def test_cnn_analysis_accepts_what_the_recording_holds(cnn_rec):
    vectors = hs.recording_vectors(cnn_rec, reduce="mean")
    assert {k: v.shape for k, v in vectors.items()} == {
        "layer1": (6, 8), "layer2": (6, 16), "avgpool": (6, 16), "fc": (6, 5)}
    m = hs.similarity_matrix(cnn_rec, reduce="mean")
    manual = {name: cnn_rec[name].tensor.mean((2, 3)) if cnn_rec[name].tensor.ndim == 4
              else cnn_rec[name].tensor for name in cnn_rec}
    assert np.allclose(m.to_numpy(), hs.similarity_matrix(manual).to_numpy(), atol=1e-6)
    assert m.loc["layer2", "avgpool"] == pytest.approx(1.0)
    # Analysis functions take feature maps themselves (flattened).
    layer2 = cnn_rec["layer2"].tensor
    assert np.allclose(hs.cosine(layer2, layer2), 1, atol=1e-6)
    idx, _ = hs.nearest_neighbors(cnn_rec["avgpool"].tensor, k=2)
    assert idx.shape == (6, 2)


def test_callable_reduce_one_or_two_arguments(cnn_rec):
    one = cnn_rec.to_frame(reduce=lambda t: t.amax((2, 3)))
    assert np.array_equal(one.to_numpy(), cnn_rec.to_frame(reduce="max").to_numpy())
    seen = []

    def with_mask(t, mask):
        seen.append(mask)
        return t.mean((2, 3))

    hs.recording_vectors(cnn_rec, reduce=with_mask)
    assert seen and all(m is None for m in seen)  # feature maps have no padding mask
    m = hs.similarity_matrix(cnn_rec, reduce=lambda t: t.mean((2, 3)))  # passed on
    assert m.shape == (4, 4)
    with pytest.raises(hs.InputError, match="reduce callable returned shape"):
        cnn_rec.to_frame(reduce=lambda t: t.mean())
    with pytest.raises(hs.InputError, match="reduce must be one of"):
        cnn_rec.to_frame(reduce="median")


# -- a transformer-like batch with an attention mask -----------------------------------------


class TokenModel(nn.Module):
    """Per-token layers (no mixing across positions), so pad tokens change no real output."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 6, padding_idx=0)
        self.layer = nn.Sequential(nn.Linear(6, 4), nn.Tanh())

    def forward(self, input_ids, attention_mask=None):
        return self.layer(self.embed(input_ids))


def _batch(side: str):
    gen = torch.Generator().manual_seed(1)
    lengths = torch.tensor([5, 2, 3, 1])
    mask = torch.arange(5)[None, :] < lengths[:, None]
    if side == "left":
        mask = mask.flip(1)
    ids = torch.randint(1, 20, (4, 5), generator=gen) * mask
    return ids, mask.long()


@pytest.fixture(params=["left", "right"])
def token_rec(request):
    torch.manual_seed(0)
    model = TokenModel().eval()
    ids, mask = _batch(request.param)
    with torch.no_grad(), hs.record(model, ["layer"]) as rec:
        model(ids, attention_mask=mask)
    return rec, mask


def _manual(t, mask, how):
    rows = []
    for i in range(len(t)):
        real = t[i][mask[i].bool()]
        rows.append({"mean": real.mean(0), "max": real.amax(0), "sum": real.sum(0),
                     "last": real[-1]}[how])
    return torch.stack(rows).numpy()


@pytest.mark.parametrize("how", ["mean", "max", "sum", "last"])
def test_to_frame_with_an_attention_mask_either_side(token_rec, how):
    rec, mask = token_rec
    t = rec["layer"].tensor
    df = rec.to_frame(reduce=how, lengths=mask)
    assert np.allclose(df.to_numpy(), _manual(t, mask, how), atol=1e-6)
    if how == "mean":
        assert not np.allclose(df.to_numpy(), t.mean(1).numpy(), atol=1e-3)  # padding counts
    vectors = hs.recording_vectors(rec, reduce=how, lengths=mask)
    assert np.allclose(vectors["layer"], _manual(t, mask, how), atol=1e-6)


def test_a_capture_that_knows_its_mask_needs_no_argument(token_rec):
    rec, mask = token_rec
    t = rec["layer"].tensor
    cap = Capture("layer", 0, 0, None, nn.Sequential, t, mask=mask.bool())
    assert np.allclose(cap.to_frame(reduce="mean").to_numpy(), _manual(t, mask, "mean"),
                       atol=1e-6)
    assert np.allclose(cap.to_frame(reduce="last").to_numpy(), _manual(t, mask, "last"))
    # lengths= overrides what a capture knows.
    everything = torch.ones_like(mask)
    assert np.allclose(cap.to_frame(reduce="mean", lengths=everything).to_numpy(),
                       t.mean(1).numpy(), atol=1e-6)
    long = cap.to_frame(kind="long")
    assert len(long) == int(mask.sum()) * t.shape[2]
    assert mask.bool()[long.example.to_numpy(), long.position.to_numpy(dtype=int)].all()


def test_long_frame_and_similarity_matrix_with_a_mask(token_rec):
    rec, mask = token_rec
    t = rec["layer"].tensor
    long = rec.to_frame(kind="long", lengths=mask)
    assert len(long) == int(mask.sum()) * t.shape[2]
    sample = long.sample(30, random_state=0)
    pos = sample.position.to_numpy(dtype=int)
    assert mask.bool()[sample.example.to_numpy(), pos].all()
    assert np.array_equal(sample.value.to_numpy(),
                          t[sample.example.to_numpy(), pos, sample.unit.to_numpy()].numpy())
    with pytest.raises(hs.InputError, match="shape"):
        rec.to_frame(reduce="mean", lengths=mask[:, :3])


def test_lengths_per_step_and_similarity_matrix():
    torch.manual_seed(0)
    model = TokenModel().eval()
    (ids1, m1), (ids2, m2) = _batch("left"), _batch("right")
    with torch.no_grad(), hs.record(model, ["embed", "layer"]) as rec:
        model(ids1, attention_mask=m1)
        model(ids2[:, :4], attention_mask=m2[:, :4])
    masks = [m1, m2[:, :4]]
    df = rec.to_frame(reduce="mean", lengths=masks)
    caps = rec.calls("layer")
    expected = np.concatenate([_manual(c.tensor, m, "mean") for c, m in zip(caps, masks,
                                                                              strict=True)])
    assert np.allclose(df["layer"].to_numpy(), expected, atol=1e-6)
    with pytest.raises(hs.InputError, match="one .* per step"):
        rec.to_frame(reduce="mean", lengths=m1)
    m = hs.similarity_matrix(rec, reduce="mean", lengths=masks)
    manual = {name: np.concatenate([_manual(c.tensor, mk, "mean") for c, mk in
                                    zip(rec.calls(name), masks, strict=True)])
              for name in ("embed", "layer")}
    assert m.loc["embed", "layer"] == pytest.approx(hs.linear_cka(manual["embed"],
                                                                  manual["layer"]))


def test_callable_reduce_gets_the_mask(token_rec):
    rec, mask = token_rec

    def masked_mean(t, m):
        w = m.unsqueeze(-1).to(t.dtype)
        return (t * w).sum(1) / w.sum(1)

    df = rec.to_frame(reduce=masked_mean, lengths=mask)
    assert np.allclose(df.to_numpy(), _manual(rec["layer"].tensor, mask, "mean"), atol=1e-6)


# -- gathering captures over calls -------------------------------------------------------------


def test_cat_gathers_batches_in_order(mlp):
    xs = torch.randn(7, 4).split(3)
    with torch.no_grad(), hs.record(mlp, ["2"]) as rec:
        for x in xs:
            mlp(x)
    with pytest.raises(hs.AmbiguousCallError):
        rec["2"]
    gathered = rec.cat("2")
    assert torch.equal(gathered.tensor, torch.cat([c.tensor for c in rec.calls("2")]))
    assert gathered.mask is None and gathered.lengths is None
    assert np.array_equal(gathered.to_frame().to_numpy(), rec.to_frame().to_numpy())


def test_cat_pads_sequences_and_keeps_lengths_and_masks():
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, batch_first=True)
    batches = [(torch.randn(3, 5, 3), torch.tensor([5, 2, 4])),
               (torch.randn(2, 3, 3), torch.tensor([1, 3]))]
    with torch.no_grad(), hs.record(lstm, [""], pick=lambda out: out[0]) as rec:
        for x, n in batches:
            lstm(nn.utils.rnn.pack_padded_sequence(x, n, batch_first=True,
                                                   enforce_sorted=False))
    cap = rec.cat("")
    assert cap.tensor.shape == (5, 5, 4)
    assert torch.equal(cap.lengths, torch.tensor([5, 2, 4, 1, 3]))
    assert torch.equal(cap.mask, torch.arange(5)[None, :] < cap.lengths[:, None])
    per_step = rec.to_frame(reduce="mean")
    assert np.allclose(cap.to_frame(reduce="mean").to_numpy(), per_step.to_numpy(), atol=1e-6)


def test_cat_keeps_left_padding_masks_and_selects_calls(story_model, story_batch):
    from tests.test_story import first_five_minutes

    rec, _ = first_five_minutes(story_model, story_batch)
    prem = rec.cat("encoder", "premise")
    assert torch.equal(prem.tensor, rec["encoder", "premise"].tensor)
    assert prem.label == "premise"
    both = rec.cat("encoder")
    assert both.tensor.shape[0] == 2 * prem.tensor.shape[0]
    with pytest.raises(hs.NotRecordedError, match="no call 'other'"):
        rec.cat("encoder", "other")
    # Captures padded on the left keep their own masks; the padding added at the end is
    # masked too.
    t1, t2 = torch.randn(2, 3, 2), torch.randn(1, 5, 2)
    left = torch.tensor([[False, True, True], [True, True, True]])
    caps = [Capture("x", 0, 0, None, nn.Identity, t1, mask=left),
            Capture("x", 1, 0, None, nn.Identity, t2)]
    fake = hs.Recording(["x"], {"x": nn.Identity}, "Identity")
    fake._captures["x"] = caps
    fake.steps = 2
    gathered = fake.cat("x")
    assert gathered.mask.tolist() == [[False, True, True, False, False],
                                      [True, True, True, False, False],
                                      [True] * 5]
    pooled = gathered.to_frame(reduce="mean").to_numpy()
    assert np.allclose(pooled, np.stack([t1[0, 1:].mean(0), t1[1].mean(0), t2[0].mean(0)]))
    fake._captures["x"] = [caps[0], Capture("x", 1, 0, None, nn.Identity, torch.randn(1, 3, 4))]
    with pytest.raises(hs.InputError, match="cannot concatenate"):
        fake.cat("x")


def test_frame_values_are_not_checked_for_nan_but_reductions_are():
    t = torch.tensor([[[1.0], [float("nan")]], [[2.0], [3.0]]])
    cap = Capture("x", 0, 0, None, nn.Identity, t, lengths=torch.tensor([1, 2]))
    long = cap.to_frame(kind="long")
    assert len(long) == 3 and not long.value.isna().any()  # the NaN is padding
    cap = Capture("x", 0, 0, None, nn.Identity, t)
    assert cap.to_frame(kind="long").value.isna().sum() == 1  # copied as it is
    with pytest.raises(hs.InputError, match="NaN"):
        cap.to_frame(reduce="mean")
    assert isinstance(cap.to_frame(reduce="flatten"), pd.DataFrame)


def test_record_dataset_lengths_may_return_a_mask(tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    torch.manual_seed(0)
    model = TokenModel().eval()
    batches = [dict(zip(("input_ids", "attention_mask"), _batch(side), strict=True))
               for side in ("left", "right")]

    def run(m, b):
        return m(b["input_ids"], attention_mask=b["attention_mask"])

    out = hs.record_dataset(model, batches, ["layer"], tmp_path / "mean", reduce="mean",
                            forward=run, lengths=lambda b: b["attention_mask"], progress=False)
    with torch.no_grad():
        expected = np.concatenate([_manual(run(model, b), b["attention_mask"], "mean")
                                   for b in batches])
    assert np.allclose(hs.open_dataset(out).numpy("layer"), expected, atol=1e-6)
    seq = hs.record_dataset(model, batches, ["layer"], tmp_path / "seq", forward=run,
                            lengths=lambda b: b["attention_mask"], progress=False)
    rows = pq.read_table(seq / "shards")["layer"].to_pylist()
    masks = torch.cat([b["attention_mask"] for b in batches])
    assert [len(r) for r in rows] == masks.sum(1).tolist()  # real positions, either side
    with torch.no_grad():
        left = run(model, batches[0])
    assert np.allclose(np.array(rows[1]), left[1][batches[0]["attention_mask"][1].bool()])
