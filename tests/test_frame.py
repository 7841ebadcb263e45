"""DataFrame export: wide and long forms against direct construction from the tensors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import hookscope as hs
from tests.conftest import HYPOTHESES, PREMISES
from tests.test_story import first_five_minutes


@pytest.fixture
def story_rec(story_model, story_batch):
    rec, _ = first_five_minutes(story_model, story_batch)
    return rec


def test_wide_frame_columns_and_values(story_rec):
    df = story_rec.to_frame(reduce="max", meta={"premise": PREMISES, "hypothesis": HYPOTHESES})
    assert df.index.names == ["example", "premise", "hypothesis"]
    assert df.columns.names == ["module", "call", "unit"]
    assert list(dict.fromkeys(df.columns.droplevel("unit"))) == [
        ("encoder", "premise"), ("encoder", "hypothesis"), ("pooling", "premise"),
        ("pooling", "hypothesis"), ("aggregation", "0")]
    u = story_rec["pooling", "premise"].tensor.numpy()
    assert np.array_equal(df[("pooling", "premise")].to_numpy(), u)
    # Length-aware max over the encoder output equals the story's max pooling here only where
    # padding (zeros) does not win; compare with a direct masked max instead.
    enc = story_rec["encoder", "premise"]
    expected = np.stack([enc.tensor[i, :n].max(0).values.numpy()
                         for i, n in enumerate(enc.lengths.tolist())])
    assert np.allclose(df[("encoder", "premise")].to_numpy(), expected)
    assert df.xs(PREMISES[3], level="premise").shape[0] == 1


def test_wide_frame_needs_reduce_for_sequences_and_shares_memory(story_rec):
    with pytest.raises(ValueError, match="reduce='last'"):
        story_rec.to_frame()
    cap = story_rec["aggregation"]
    df = cap.to_frame()
    assert np.shares_memory(df.to_numpy(), cap.tensor.numpy())  # zero copy
    with pytest.raises(ValueError, match="read-only"):
        df.iloc[0, 0] = 1.0  # ... and the recording cannot be changed through it


def test_reduce_last_bidirectional(story_rec):
    df = story_rec.to_frame(reduce="last", bidirectional=True)
    enc = story_rec["encoder", "hypothesis"]
    expected = hs.last_state(enc.tensor, enc.lengths, bidirectional=True).numpy()
    assert np.array_equal(df[("encoder", "hypothesis")].to_numpy(), expected)


def test_long_frame_excludes_padding(story_rec):
    enc = story_rec["encoder", "premise"]
    df = enc.to_frame(kind="long")
    assert list(df.columns) == ["example", "module", "call", "position", "unit", "value"]
    assert isinstance(df.module.dtype, pd.CategoricalDtype)
    units = enc.tensor.shape[2]
    assert len(df) == int(enc.lengths.sum()) * units
    # Every value is where it should be (independent: index the tensor directly).
    sample = df.sample(50, random_state=0)
    direct = enc.tensor[np.array(sample.example), np.array(sample.position, dtype=int),
                        np.array(sample.unit)].numpy()
    assert np.array_equal(sample.value.to_numpy(), direct)
    assert (df.position.to_numpy(dtype=int) < enc.lengths.numpy()[df.example]).all()


def test_long_frame_of_whole_recording_with_meta(story_rec):
    df = story_rec.to_frame(kind="long", meta={"label": ["e", "c", "e", "e", "c"]})
    pooled = df[df.module == "pooling"]
    assert pooled.position.isna().all()
    assert set(pooled.call) == {"premise", "hypothesis"}
    by_label = df[df.module == "aggregation"].groupby("label").value.count()
    assert by_label["e"] == 3 * story_rec["aggregation"].tensor.shape[1]


def test_several_steps_continue_example_ids(mlp):
    xs = [torch.randn(3, 4), torch.randn(2, 4)]
    with hs.record(mlp, ["2"]) as rec:
        for x in xs:
            mlp(x)
    df = rec.to_frame()
    assert list(df.index) == [0, 1, 2, 3, 4]
    with torch.no_grad():
        assert np.allclose(df.to_numpy(), mlp[:3](torch.cat(xs)).numpy())
    vectors = hs.recording_vectors(rec)
    assert vectors["2"].shape == (5, 8)


def test_export_errors(mlp):
    with hs.record(mlp, ["0"]) as rec:
        pass
    with pytest.raises(ValueError, match="no captures"):
        rec.to_frame()
    with hs.record(mlp, ["0", "2"]) as rec:
        mlp(torch.randn(3, 4))
    with pytest.raises(ValueError, match="meta has 2 rows"):
        rec.to_frame(meta={"text": ["a", "b"]})
    with pytest.raises(ValueError, match="kind"):
        rec.to_frame(kind="tall")
    with pytest.raises(ValueError, match="reduce must be"):
        rec.to_frame(reduce="median")


def test_similarity_matrix_of_a_recording(story_rec):
    vectors = hs.recording_vectors(story_rec, reduce="max")
    assert set(vectors) == {"encoder:premise", "encoder:hypothesis", "pooling:premise",
                            "pooling:hypothesis", "aggregation"}
    m = hs.similarity_matrix(vectors)
    assert m.shape == (5, 5) and np.allclose(np.diag(m), 1)
