"""save/load: exact round trip, no pickle, atomic writes, clear errors for bad files."""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import zipfile

import numpy as np
import pytest
import torch

import hookscope as hs
from hookscope.io import RecordingFileError, Unsaved
from tests.test_story import first_five_minutes

Pair = collections.namedtuple("Pair", "left right")


@dataclasses.dataclass
class Box:
    value: torch.Tensor
    note: str


class Many(torch.nn.Module):
    def forward(self, x):
        return {"pair": Pair(x, x.to(torch.bfloat16)), "box": Box(x * 2, "n"), "n": 3,
                "none": None, "ints": torch.arange(3)}


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, tuple | list):
        assert type(a) is type(b) or (hasattr(a, "_fields") and a._fields == b._fields)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_same(a[k], b[k])
    elif dataclasses.is_dataclass(a):
        assert type(a) is type(b)
        for f in dataclasses.fields(a):
            _assert_same(getattr(a, f.name), getattr(b, f.name))
    else:
        assert a == b


def test_round_trip_of_the_story(tmp_path, story_model, story_batch):
    rec, _ = first_five_minutes(story_model, story_batch)
    path = hs.save(rec, tmp_path / "story.hsrec")
    back = hs.load(path)
    assert back.keys() == rec.keys() and back.steps == rec.steps
    for a, b in zip(rec.captures(), back.captures(), strict=True):
        assert (a.name, a.step, a.call, a.label) == (b.name, b.step, b.call, b.label)
        assert a.module_type is b.module_type
        _assert_same(a.output, b.output)
        assert torch.equal(a.lengths, b.lengths) if a.lengths is not None else b.lengths is None
    assert back["encoder", "hypothesis"].mask.equal(rec["encoder", "hypothesis"].mask)


def test_round_trip_structures_inputs_and_bfloat16(tmp_path):
    model = Many()
    x = torch.randn(2, 3)
    with hs.record(model, [""], inputs=True) as rec:
        model(x, )
    back = hs.load(hs.save(rec, tmp_path / "many.hsrec"))
    _assert_same(rec[""].output, back[""].output)
    _assert_same(rec[""].inputs, back[""].inputs)
    assert isinstance(back[""].output["pair"], Pair)


def test_no_pickle_in_the_file(tmp_path, story_model, story_batch):
    rec, _ = first_five_minutes(story_model, story_batch)
    path = hs.save(rec, tmp_path / "r.hsrec")
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        manifest = json.loads(z.read("manifest.json"))
        assert all(n == "manifest.json" or n.endswith(".npy") for n in names)
        for n in names[1:]:  # every array reads without pickle, and none holds objects
            arr = np.lib.format.read_array(io.BytesIO(z.read(n)), allow_pickle=False)
            assert arr.dtype != object
    assert manifest["format"] == "hookscope-recording" and manifest["version"] == 1


def test_unsaved_objects_warn_and_come_back_as_placeholders(tmp_path):
    class Odd(torch.nn.Module):
        def forward(self, x):
            return x, object()

    model = Odd()
    with hs.record(model, [""]) as rec:
        model(torch.ones(1))
    with pytest.warns(UserWarning, match="no open-format"):
        path = hs.save(rec, tmp_path / "odd.hsrec")
    assert isinstance(hs.load(path)[""].output[1], Unsaved)


def test_bad_files_give_clear_errors(tmp_path, story_model, story_batch):
    rec, _ = first_five_minutes(story_model, story_batch)
    good = hs.save(rec, tmp_path / "good.hsrec")
    data = good.read_bytes()
    truncated = tmp_path / "truncated.hsrec"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(RecordingFileError, match="truncated or corrupted"):
        hs.load(truncated)
    corrupted = tmp_path / "corrupted.hsrec"
    corrupted.write_bytes(data[:2000] + bytes(b ^ 0xFF for b in data[2000:2400]) + data[2400:])
    with pytest.raises(RecordingFileError):
        hs.load(corrupted)
    with zipfile.ZipFile(tmp_path / "future.hsrec", "w") as z:
        z.writestr("manifest.json", json.dumps({"format": "hookscope-recording", "version": 99}))
    with pytest.raises(RecordingFileError, match="version 99.*Upgrade"):
        hs.load(tmp_path / "future.hsrec")
    (tmp_path / "text.hsrec").write_text("hello")
    with pytest.raises(ValueError, match="not a hookscope recording"):
        hs.load(tmp_path / "text.hsrec")
    with pytest.raises(TypeError, match="Recording"):
        hs.save({"a": 1}, tmp_path / "x.hsrec")


def test_interrupted_save_leaves_no_file(tmp_path, story_model, story_batch, monkeypatch):
    rec, _ = first_five_minutes(story_model, story_batch)
    target = tmp_path / "r.hsrec"
    hs.save(rec, target)
    before = target.read_bytes()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(np.lib.format, "write_array", boom)
    with pytest.raises(KeyboardInterrupt):
        hs.save(rec, target)
    assert target.read_bytes() == before  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["r.hsrec"]  # no temp file left behind
