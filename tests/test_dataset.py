"""record_dataset / open_dataset: values, resumability, multi-process, bad inputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import hookscope as hs
from hookscope.dataset import DatasetError, record_dataset
from hookscope.dataset_view import open_dataset
from tests import dataset_job

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
ROOT = Path(__file__).resolve().parents[1]


def _job(*args: str, torchrun: bool = False) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # --standalone picks a free rendezvous port: two runs on one host cannot collide.
    prefix = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2"] if torchrun else [sys.executable])
    return subprocess.Popen([*prefix, str(ROOT / "tests" / "dataset_job.py"), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    """An uninterrupted single-process run, in a subprocess with one thread like the others
    (float results depend on the thread count, so every run compared here uses one)."""
    out = tmp_path_factory.mktemp("clean") / "ds"
    job = _job(str(out))
    _, stderr = job.communicate(timeout=300)
    assert job.returncode == 0, stderr[-3000:]
    return open_dataset(out)


def test_values_equal_a_direct_recording(clean_run):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the job, for bit-equal floats
    try:
        _check_first_batch(clean_run)
    finally:
        torch.set_num_threads(threads)


def _check_first_batch(clean_run):
    model, _, _ = dataset_job.load_pretrained()
    first = next(dataset_job.batches())
    with torch.no_grad(), hs.record(
            model, ["encoder", "pooling"],
            calls={"encoder": ["premise", "hypothesis"], "pooling": ["premise", "hypothesis"]},
            unsort={"encoder": [first.premise_orig_idx, first.hypothesis_orig_idx]}) as rec:
        model(first)
    n = len(first)
    assert len(clean_run) == dataset_job.PAIRS
    assert np.array_equal(clean_run.numpy("pooling:hypothesis")[:n],
                          rec["pooling", "hypothesis"].tensor.numpy())
    enc = rec["encoder", "premise"]
    expected = hs.masked_pool(enc.tensor, enc.lengths, "max").numpy()
    assert np.array_equal(clean_run.numpy("encoder:premise")[:n], expected)
    meta = clean_run.meta()
    assert meta.text.tolist()[:n] == first.texts and list(meta.index[:3]) == [0, 1, 2]


def test_readable_without_hookscope(clean_run):
    frame = pd.read_parquet(clean_run.path / "shards")  # plain pandas over the shard folder
    assert len(frame) == dataset_job.PAIRS
    assert {"aggregation", "pooling:premise", "text", "label", "batch", "row"} <= set(frame)
    table = pq.read_table(clean_run.path / "shards")
    assert pa.types.is_fixed_size_list(table.schema.field("aggregation").type)
    manifest = json.loads((clean_run.path / "manifest.json").read_text())
    assert manifest["complete"] and sum(s["rows"] for s in manifest["shards"]) == 960
    duckdb = pytest.importorskip("duckdb")
    rows = duckdb.sql(f"select count(*), avg(len(aggregation)) from "
                      f"'{clean_run.path}/shards/*.parquet'").fetchall()
    n, width = rows[0]
    assert n == 960 and width == 512  # the fixed-size vectors read as arrays


def test_sequences_without_reduce(tmp_path):
    lstm = torch.nn.LSTM(3, 4, batch_first=True)
    lengths = [torch.tensor([2, 5, 3]), torch.tensor([1, 4, 4])]
    xs = [torch.randn(3, 5, 3) for _ in lengths]
    batches = [torch.nn.utils.rnn.pack_padded_sequence(x, n, batch_first=True,
                                                       enforce_sorted=False)
               for x, n in zip(xs, lengths, strict=True)]
    out = record_dataset(lstm, batches, [""], tmp_path / "seq", progress=False,
                         pick=lambda o: o[0])
    col = pq.read_table(out / "shards")[""].to_pylist()
    assert [len(s) for s in col] == [2, 5, 3, 1, 4, 4]  # real positions only
    with torch.no_grad():
        padded, _ = torch.nn.utils.rnn.pad_packed_sequence(lstm(batches[0])[0],
                                                           batch_first=True)
    assert np.allclose(np.array(col[1]), padded[1, :5].numpy())
    with pytest.raises(DatasetError, match="sequences"):
        open_dataset(out).numpy("")


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_dataset(tmp_path, clean_run):
    out = tmp_path / "killed"
    job = _job(str(out), "0.05")  # slow batches: time to kill it mid-run
    deadline = time.time() + 60
    while time.time() < deadline:
        shards = list((out / "shards").glob("*.parquet")) if (out / "shards").exists() else []
        if len(shards) >= 3:
            break
        time.sleep(0.05)
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    partial = json.loads((out / "manifest.json").read_text())
    assert not partial["complete"] and 0 < len(partial["shards"]) < 10
    job = _job(str(out))  # the same job again: resume=True by default
    _, stderr = job.communicate(timeout=300)
    assert job.returncode == 0, stderr[-3000:]
    resumed = open_dataset(out)
    assert len(resumed) == len(clean_run)
    pd.testing.assert_frame_equal(resumed.to_frame(), clean_run.to_frame())


@pytest.mark.slow
def test_two_processes_under_torchrun_match_one(tmp_path, clean_run):
    job = _job(str(tmp_path / "dist"), torchrun=True)
    _stdout, stderr = job.communicate(timeout=300)
    assert job.returncode == 0, stderr[-3000:]
    dist = open_dataset(tmp_path / "dist")
    ranks = {s["rank"] for s in dist.manifest["shards"]}
    assert ranks == {0, 1}
    pd.testing.assert_frame_equal(dist.to_frame(), clean_run.to_frame())


def test_bad_inputs(tmp_path):
    model = torch.nn.Linear(3, 2)
    data = [torch.randn(4, 3) for _ in range(3)]
    out = record_dataset(model, data, [""], tmp_path / "a", progress=False)
    with pytest.raises(DatasetError, match="another model"):
        record_dataset(torch.nn.Linear(3, 2), data, [""], out, progress=False)
    with pytest.raises(DatasetError, match="resume=True"):
        record_dataset(model, data, [""], out, resume=False, progress=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="other files"):
        record_dataset(model, data, [""], other, progress=False)
    with pytest.raises(DatasetError, match="has 2 values"):
        record_dataset(model, data, [""], tmp_path / "b", progress=False,
                       meta=lambda b: {"id": [1, 2]})
    growing = torch.nn.Identity()
    with pytest.raises(DatasetError, match="must keep its shape"):
        record_dataset(growing, [torch.randn(2, 3), torch.randn(2, 4)], [""], tmp_path / "c",
                       progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["version"] = 99
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="version 99"):
        open_dataset(out)
    with pytest.raises(TypeError, match="callable"):
        record_dataset(model, data, [""], tmp_path / "d", unsort={"": [0, 1, 2, 3]})


def test_disk_full_keeps_completed_shards_and_resumes(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    data = [torch.randn(4, 3) for _ in range(6)]
    real_write = pq.write_table
    calls = {"n": 0}

    def flaky(table, where, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real_write(table, where, **kwargs)

    monkeypatch.setattr(pq, "write_table", flaky)
    with pytest.raises(DatasetError, match="No space left.*intact"):
        record_dataset(model, data, [""], tmp_path / "full", shard_rows=4, progress=False)
    manifest = json.loads((tmp_path / "full" / "manifest.json").read_text())
    assert len(manifest["shards"]) == 2 and not manifest["complete"]
    assert sorted(p.name for p in (tmp_path / "full" / "shards").iterdir()) == [
        "part-r000-000000.parquet", "part-r000-000001.parquet"]  # no half-written shard
    record_dataset(model, data, [""], tmp_path / "full", shard_rows=4, progress=False)
    with torch.no_grad():  # batch by batch, as the library ran it: BLAS kernels (and so the
        # last bit) depend on the batch size, so one model(torch.cat(data)) may differ.
        expected = torch.cat([model(batch) for batch in data]).numpy()
    assert np.array_equal(open_dataset(tmp_path / "full").numpy(""), expected)


def test_lengths_from_the_batch_for_padded_models(tmp_path):
    """A model without PackedSequence: lengths come from the batch (an attention mask)."""
    embed = torch.nn.Embedding(10, 3)
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    batch = {"ids": ids, "attention_mask": (ids > 0).long()}
    out = record_dataset(embed, [batch], [""], tmp_path / "hf", reduce="mean",
                         forward=lambda m, b: m(b["ids"]),
                         lengths=lambda b: b["attention_mask"].sum(1), progress=False)
    with torch.no_grad():
        expected = torch.stack([embed(ids[0, :3]).mean(0), embed(ids[1, :2]).mean(0)])
    assert np.allclose(open_dataset(out).numpy(""), expected.numpy())


def test_sequences_of_batches_are_indexed_and_resume_builds_nothing_twice(tmp_path):
    class Lazy:
        def __init__(self) -> None:
            self.built: list[int] = []
            torch.manual_seed(0)
            self.data = [torch.randn(4, 3) for _ in range(6)]

        def __len__(self) -> int:
            return len(self.data)

        def __getitem__(self, i: int) -> torch.Tensor:
            self.built.append(i)
            return self.data[i]

    model = torch.nn.Linear(3, 2)
    first = Lazy()
    record_dataset(model, first, [""], tmp_path / "lazy", shard_rows=4, progress=False)
    assert first.built == [0, 1, 2, 3, 4, 5]
    again = Lazy()
    record_dataset(model, again, [""], tmp_path / "lazy", shard_rows=4, progress=False)
    assert again.built == []  # everything was written: nothing rebuilt
    with torch.no_grad():  # per batch, as computed (see test_disk_full_...)
        assert np.array_equal(open_dataset(tmp_path / "lazy").numpy(""),
                              torch.cat([model(batch) for batch in first.data]).numpy())


def test_rows_and_streaming_chunks(clean_run):
    whole = clean_run.numpy("aggregation")
    assert np.array_equal(clean_run.numpy("aggregation", rows=slice(100, 110)), whole[100:110])
    picked = np.array([5, 900, 17])
    assert np.array_equal(clean_run.numpy("aggregation", rows=picked), whole[picked])
    frame = clean_run.to_frame(["pooling:premise"], rows=picked)
    assert list(frame.index) == [5, 900, 17] and frame["text"].iloc[1] == \
        clean_run.meta()["text"].iloc[900]
    seen = np.zeros(len(clean_run), dtype=bool)
    for ids, chunk in clean_run.iter_chunks("aggregation"):  # one shard at a time
        assert len(chunk) <= 96 and np.array_equal(chunk, whole[ids])
        seen[ids] = True
    assert seen.all()
