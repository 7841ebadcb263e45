"""record_dataset / open_dataset: values, resumability, multi-process, bad inputs."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import hookscope as hs
import hookscope.dataset
import hookscope.dataset_format
import hookscope.dataset_writer
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
    with pytest.raises(DatasetError, match="another setup"):
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
    real_write = hookscope.dataset_writer._HashingFile.write

    def flaky(self, data):  # the disk fills up while the third shard is written, once
        if self.path.name == ".part-r000-000002.parquet.tmp" and not failed:
            failed.append(self.path)
            raise OSError(28, "No space left on device")
        return real_write(self, data)

    failed: list[Path] = []

    monkeypatch.setattr(hookscope.dataset_writer._HashingFile, "write", flaky)
    with pytest.raises(DatasetError, match="No space left.*intact"):
        record_dataset(model, data, [""], tmp_path / "full", shard_rows=4, progress=False)
    manifest = json.loads((tmp_path / "full" / "manifest.json").read_text())
    assert len(manifest["shards"]) == 2 and not manifest["complete"]
    assert sorted(p.name for p in (tmp_path / "full" / "shards").iterdir()) == [
        "part-r000-000000.parquet", "part-r000-000001.parquet"]  # no half-written shard
    with pytest.warns(UserWarning, match="incomplete.*8 rows"):
        partial = open_dataset(tmp_path / "full")  # readable, but never silently partial
    assert not partial.complete and "INCOMPLETE" in repr(partial)
    record_dataset(model, data, [""], tmp_path / "full", shard_rows=4, progress=False)
    assert open_dataset(tmp_path / "full").complete
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


def test_lengths_may_be_a_mask_padded_on_the_left(tmp_path):
    embed = torch.nn.Embedding(10, 3)
    ids = torch.tensor([[0, 1, 2, 3], [0, 0, 4, 5]])  # left padding, as decoders batch
    mask = ids > 0
    out = record_dataset(embed, [ids], [""], tmp_path / "left", reduce="mean",
                         lengths=lambda b: b > 0, progress=False)
    with torch.no_grad():
        expected = torch.stack([embed(ids[i][mask[i]]).mean(0) for i in range(2)])
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


# -- no silent mixing: the fingerprint covers what determines the values ------------------------

def _small(tmp_path, name="fp", **kwargs):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.5)).eval()
    data = [torch.randn(4, 3) for _ in range(3)]
    record_dataset(model, data, ["0"], tmp_path / name, progress=False, **kwargs)
    return model, data


def test_modules_given_as_objects_are_fingerprinted_by_their_names(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.ReLU()).eval()  # equal submodules
    data = [torch.randn(4, 3) for _ in range(2)]
    out = tmp_path / "objects"
    record_dataset(model, data, [model[0]], out, progress=False, calls={model[0]: ["x"]})
    record_dataset(model, data, ["0"], out, progress=False, calls={"0": ["x"]})  # resumes
    with pytest.raises(DatasetError, match="another setup"):  # the other, identical, ReLU
        record_dataset(model, data, [model[1]], out, progress=False, calls={model[1]: ["x"]})
    assert open_dataset(out).manifest["complete"]


def test_a_changed_setup_is_refused_on_resume(tmp_path):
    model, data = _small(tmp_path, forward=lambda m, b: m(b * 2), meta=lambda b: {"n": [1] * 4})
    out = tmp_path / "fp"

    def again(m=model, **kwargs):
        options = {"forward": lambda m, b: m(b * 2), "meta": lambda b: {"n": [1] * 4}}
        record_dataset(m, data, ["0"], out, progress=False, **{**options, **kwargs})

    again()  # the same setup (new but identical lambdas): resumes, nothing to do
    swapped = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.5))
    swapped.load_state_dict(model.state_dict())
    with torch.no_grad():  # rows swapped: every per-tensor sum is unchanged
        swapped[0].weight.copy_(model[0].weight[[1, 0, 2, 3]])
    assert math.fsum(swapped[0].weight.flatten().tolist()) == math.fsum(
        model[0].weight.flatten().tolist())  # the old per-tensor checksum could not tell
    trained = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.5))
    trained.load_state_dict(model.state_dict())
    scale = 3
    changes = {
        "swapped weights": {"m": swapped},
        "training mode": {"m": trained.train()},
        "another forward": {"forward": lambda m, b: m(b * 3)},
        "a forward closing over another value": {"forward": lambda m, b: m(b * scale)},
        "another meta": {"meta": lambda b: {"n": [2] * 4}},
        "another captured dtype": {"dtype": torch.float16},
        "another stored dtype": {"store_dtype": torch.float16},
    }
    for what, change in changes.items():
        with pytest.raises(DatasetError, match="another setup"):
            again(**change)
            pytest.fail(what)
    assert open_dataset(out).manifest["complete"]


def test_a_callable_that_cannot_be_fingerprinted_needs_setup_id(tmp_path):
    lock = threading.Lock()

    def forward(m, b):
        with lock:
            return m(b)

    with pytest.raises(DatasetError, match="cannot fingerprint forward=.*lock.*setup_id="):
        _small(tmp_path, "a", forward=forward)
    _small(tmp_path, "b", forward=forward, setup_id="v1")  # vouched for
    _small(tmp_path, "b", forward=forward, setup_id="v1")  # resumes
    with pytest.raises(DatasetError, match="another setup"):
        _small(tmp_path, "b", forward=forward, setup_id="v2")


class _CountingBlock(torch.nn.Module):
    """A forward pass that writes a buffer, as running statistics or a cache do."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 4)
        self.register_buffer("calls", torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.lin(x)


def _hash_late(monkeypatch, fail: bool = False) -> None:
    """Every model's parameters hashed on the background thread, 0.3 s late (the batches have
    run by then), or failing there."""
    import hookscope.fingerprint as fp

    monkeypatch.setattr(fp, "_BACKGROUND_BYTES", 0)
    digests = fp._digests

    def late(tensors, after=None):
        if threading.current_thread() is threading.main_thread():
            return digests(tensors, after)
        time.sleep(0.3)
        return [RuntimeError("unreadable")] * len(tensors) if fail else digests(tensors, after)

    monkeypatch.setattr(fp, "_digests", late)


def test_the_fingerprint_hashed_while_batches_run_is_the_models_before_them(tmp_path,
                                                                           monkeypatch):
    torch.manual_seed(0)
    data = [torch.randn(4, 3) for _ in range(5)]
    fresh = _CountingBlock()
    state = {k: v.clone() for k, v in fresh.state_dict().items()}

    def model() -> _CountingBlock:
        m = _CountingBlock()
        m.load_state_dict(state)
        return m

    record_dataset(model(), data, ["lin"], tmp_path / "now", progress=False, shard_rows=8)
    _hash_late(monkeypatch)
    record_dataset(model(), data, ["lin"], tmp_path / "late", progress=False, shard_rows=8)
    now, late = (open_dataset(tmp_path / n) for n in ("now", "late"))
    assert late.manifest["fingerprint"] == now.manifest["fingerprint"]
    assert len(late.manifest["shards"]) == 3  # each shard registered with it
    for shard in late.manifest["shards"]:
        assert (tmp_path / "late" / shard["file"]).exists()
    # A resumed run hashes before it appends: the same model state resumes, a changed one not.
    record_dataset(model(), data, ["lin"], tmp_path / "late", progress=False, resume=True)
    ran = model()
    ran(torch.zeros(1, 3))
    with pytest.raises(DatasetError, match="another setup"):
        record_dataset(ran, data, ["lin"], tmp_path / "late", progress=False, resume=True)
    np.testing.assert_array_equal(late.numpy("lin"), now.numpy("lin"))


def test_a_fingerprint_that_fails_on_its_thread_registers_nothing(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4)).eval()
    data = [torch.randn(4, 3) for _ in range(5)]
    _hash_late(monkeypatch, fail=True)
    with pytest.raises(DatasetError, match="cannot fingerprint '0.weight'.*unreadable"):
        record_dataset(model, data, ["0"], tmp_path / "ds", progress=False, shard_rows=8)
    assert not (tmp_path / "ds" / "manifest.json").exists()
    assert not list((tmp_path / "ds" / "shards").iterdir())
    monkeypatch.undo()
    record_dataset(model, data, ["0"], tmp_path / "ds", progress=False)  # the folder is reusable
    assert open_dataset(tmp_path / "ds").numpy("0").shape == (20, 4)


# -- one writer at a time ---------------------------------------------------------------------

WRITER = """
import os, sys, time, torch
from hookscope.dataset import record_dataset

class Gated:  # from batch 10 on, waits until the file sys.argv[2] exists
    def __len__(self):
        return 40

    def __getitem__(self, i):
        while i >= 10 and not os.path.exists(sys.argv[2]):
            time.sleep(0.05)
        return torch.arange(12.0).reshape(4, 3) + i

torch.manual_seed(0)
record_dataset(torch.nn.Linear(3, 2), Gated(), [""], sys.argv[1], shard_rows=8, progress=False,
               meta=lambda b: {"first": b[:, 0]})
"""


def _writer(out, gate) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", WRITER, str(out), str(gate)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_second_writer_is_refused_and_a_killed_one_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "locked"
    gate = tmp_path / "go"  # never created: the first writer waits at batch 10, lock held
    first = _writer(out, gate)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "manifest.json").exists():
        time.sleep(0.05)  # the first writer has registered a shard
    assert first.poll() is None
    second = _writer(out, gate)
    _, err = second.communicate(timeout=120)
    assert second.returncode != 0 and "being written by another record_dataset run" in err
    assert f"pid {first.pid}" in err
    os.kill(first.pid, signal.SIGKILL)  # the lock dies with its process
    first.wait()
    gate.touch()
    third = _writer(out, gate)
    _, err = third.communicate(timeout=120)
    assert third.returncode == 0, err[-3000:]
    ds = open_dataset(out)
    frame = ds.meta()
    assert len(ds) == 160 and not frame.duplicated(["batch", "row"]).any()
    assert frame["first"].tolist() == [float(i) + 3 * r for i in range(40) for r in range(4)]


# -- corruption is detected ---------------------------------------------------------------------

@pytest.fixture
def small_dataset(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 5)
    data = [torch.randn(4, 3) for _ in range(6)]
    out = record_dataset(model, data, [""], tmp_path / "small", shard_rows=8, progress=False,
                         meta=lambda b: {"x": b[:, 0].tolist(), "tag": ["a"] * len(b)})
    with torch.no_grad():
        expected = model(torch.cat(data)).numpy()
    return out, expected


def test_every_bit_flip_in_a_shard_is_detected(small_dataset):
    out, expected = small_dataset
    shards = sorted((out / "shards").glob("*.parquet"))
    rng = np.random.default_rng(0)
    flips = detected = 0
    for _ in range(300):
        shard = shards[rng.integers(len(shards))]
        original = shard.read_bytes()
        raw = bytearray(original)
        bit = int(rng.integers(len(raw) * 8))
        raw[bit // 8] ^= 1 << (bit % 8)
        shard.write_bytes(bytes(raw))
        try:
            ds = open_dataset(out)
            values, frame = ds.numpy(""), ds.meta()
        except DatasetError as exc:
            assert shard.name in str(exc)  # names the file
            detected += 1
        else:  # never silently different
            assert np.array_equal(values, expected) and len(frame) == 24
        flips += 1
        shard.write_bytes(original)
    assert detected == flips == 300


def _edited(out, edit):
    path = out / "manifest.json"
    original = path.read_text()
    manifest = json.loads(original)
    edit(manifest)
    path.write_text(json.dumps(manifest))
    try:
        open_dataset(out).numpy("")
    finally:
        path.write_text(original)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: m["shards"].append(m["shards"][0]), "listed twice"),
    (lambda m: m["shards"].pop(1), "complete but its batches"),
    (lambda m: m["shards"][0].update(file="/etc/passwd"), "not a file of the shards/"),
    (lambda m: m["shards"][0].update(file="shards/../../x.parquet"), "not a file of the"),
    (lambda m: m["shards"][0].update(rows=7), "do not add up"),
    (lambda m: m["shards"][0]["batches"][0].__setitem__(1, 3), "do not add up"),
    (lambda m: m["shards"][1].update(batches=m["shards"][0]["batches"]), "in two shards"),
    (lambda m: m["shards"][0].update(sha256="0" * 64), "checksum"),
    (lambda m: m["shards"][0].update(bytes=10), "bytes"),
    (lambda m: m["shards"][0].update(sha256=None), "invalid row count"),
    (lambda m: m.update(shards={}), "not a list"),
    (lambda m: m["columns"][""].update(units=0), "invalid description"),
    (lambda m: m["meta"].update(batch="int64"), "collides"),
    (lambda m: m.pop("fingerprint"), "no fingerprint"),
])
def test_an_edited_manifest_is_refused(small_dataset, edit, message):
    out, _ = small_dataset
    with pytest.raises(DatasetError, match=message):
        _edited(out, edit)


def test_missing_or_truncated_shards_name_the_file(small_dataset):
    out, _ = small_dataset
    shard = out / "shards" / "part-r000-000001.parquet"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="part-r000-000001.parquet is damaged"):
        open_dataset(out).numpy("")
    shard.unlink()
    with pytest.raises(DatasetError, match="cannot read shard .*part-r000-000001"):
        open_dataset(out).numpy("")
    # The unverified path still checks sizes and Parquet structure.
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(DatasetError, match="part-r000-000001"):
        open_dataset(out, verify=False).numpy("")


# -- meta and lengths errors at the batch where they happen -------------------------------------

def test_meta_and_lengths_errors(tmp_path):
    model = torch.nn.Linear(3, 2)
    data = [torch.randn(4, 3) for _ in range(3)]

    def run(name, **kwargs):
        return record_dataset(model, data, [""], tmp_path / name, progress=False, **kwargs)

    for bad in ("batch", "row", ""):
        with pytest.raises(DatasetError, match=f"meta column {bad!r} collides"):
            run(f"c{bad}", meta=lambda b, bad=bad: {bad: [0] * len(b)})
    with pytest.raises(DatasetError, match="batch 1: meta column 'x' holds string, earlier "
                                           "batches held int64"):
        run("types", meta=lambda b: {"x": [0] * 4 if b is data[0] else ["a"] * 4})
    with pytest.raises(DatasetError, match="batch 1: meta= gave columns"):
        run("keys", meta=lambda b: {"x" if b is data[0] else "y": [0] * 4})
    out = run("nones", meta=lambda b: {"x": [1.5] * 4 if b is not data[1] else [None] * 4})
    assert open_dataset(out).meta()["x"].isna().tolist() == [False] * 4 + [True] * 4 + \
        [False] * 4  # an all-None batch takes the column's type
    embed = torch.nn.Embedding(10, 3)
    ids = [torch.randint(1, 10, (2, 5)) for _ in range(2)]
    with pytest.raises(DatasetError, match="batch 0: lengths= gave 3 lengths, but '' has 2"):
        record_dataset(embed, ids, [""], tmp_path / "len", reduce="mean",
                       lengths=lambda b: torch.tensor([5, 5, 5]), progress=False)
    with pytest.raises(DatasetError, match="lengths from 1 to 9, but '' has 5 positions"):
        record_dataset(embed, ids, [""], tmp_path / "len2", reduce="mean",
                       lengths=lambda b: torch.tensor([1, 9]), progress=False)


class MaskedEncoder(torch.nn.Module):
    """Called as a Hugging Face model is: ``model(input_ids=..., attention_mask=...)``, so its
    sequence captures know the call's mask."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(20, 4)
        self.layer = torch.nn.Linear(4, 4)

    def forward(self, input_ids, attention_mask):
        return self.layer(self.embed(input_ids)) * attention_mask[..., None]


@pytest.mark.parametrize("reduce", ["mean", None])
def test_lengths_given_win_over_the_models_mask_and_are_checked(tmp_path, reduce):
    """A caller's ``lengths=`` is never dropped silently because the model was given a mask
    (as ``to_frame(lengths=)``): the first token alone, against the layer's own output; and
    lengths that do not fit are errors, mask or not."""
    torch.manual_seed(0)
    model = MaskedEncoder().eval()
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    batches = [{"input_ids": torch.randint(1, 20, (3, 6)), "attention_mask": mask}
               for _ in range(2)]
    ones = torch.ones(3, dtype=torch.long)

    def run(name, lengths):
        return record_dataset(model, batches, ["layer"], tmp_path / name, reduce=reduce,
                              forward=lambda m, b: m(**b), lengths=lengths, progress=False)

    ds = open_dataset(run("first", lambda b: ones))
    with torch.no_grad():
        first = torch.cat([model.layer(model.embed(b["input_ids"]))[:, 0] for b in batches])
    if reduce == "mean":
        # The same Linear on the same rows in one process: only summation order differs.
        np.testing.assert_allclose(ds.numpy("layer"), first.numpy(), rtol=1e-6, atol=1e-7)
    else:  # every example keeps one position, the first
        stored = pq.read_table(ds.path / "shards")["layer"].to_pylist()
        assert [len(x) for x in stored] == [1] * 6
        np.testing.assert_allclose(np.array([x[0] for x in stored]), first.numpy(),
                                   rtol=1e-6, atol=1e-7)
    with pytest.raises(DatasetError, match="lengths from 1 to 9, but 'layer' has 6 positions"):
        run("long", lambda b: torch.tensor([1, 9, 2]))
    with pytest.raises(DatasetError, match="lengths= gave 2 lengths, but 'layer' has 3"):
        run("few", lambda b: torch.tensor([1, 2]))


# -- errors while writing -----------------------------------------------------------------------

def test_write_errors_are_dataset_errors_with_the_resume_hint(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    data = [torch.randn(4, 3) for _ in range(3)]
    (tmp_path / "file").write_text("x")
    with pytest.raises(DatasetError, match="existing file"):
        record_dataset(model, data, [""], tmp_path / "file", progress=False)
    real_write_text = Path.write_text

    def full(self, *args, **kwargs):
        if self.name.startswith(".manifest"):
            raise OSError(28, "No space left on device")
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(DatasetError, match="No space left.*intact.*resume=True"):
        record_dataset(model, data, [""], tmp_path / "full", shard_rows=4, progress=False)
    monkeypatch.undo()
    real_unlink = Path.unlink

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(os, "replace", read_only)
    monkeypatch.setattr(Path, "unlink", read_only)  # the cleanup fails too
    with pytest.raises(DatasetError, match="Read-only file system.*resume=True"):
        record_dataset(model, data, [""], tmp_path / "ro", shard_rows=4, progress=False)
    monkeypatch.setattr(Path, "unlink", real_unlink)
    monkeypatch.undo()
    record_dataset(model, data, [""], tmp_path / "full", shard_rows=4, progress=False)
    with torch.no_grad():
        assert np.array_equal(open_dataset(tmp_path / "full").numpy(""),
                              model(torch.cat(data)).numpy())


# -- reading ------------------------------------------------------------------------------------

def test_rows_read_only_their_shards_and_ids_read_none(small_dataset, monkeypatch):
    out, expected = small_dataset
    reads = []
    real = hookscope.dataset_view.read_shard

    def counting(folder, entry, columns, verify=True, manifest=None):
        reads.append(entry["file"])
        return real(folder, entry, columns, verify, manifest)

    monkeypatch.setattr(hookscope.dataset_view, "read_shard", counting)
    ds = open_dataset(out)
    ds._example_ids()
    assert reads == []
    assert np.array_equal(ds.numpy("", rows=[9, 8]), expected[[9, 8]])
    assert reads == ["shards/part-r000-000001.parquet"]
    assert ds.meta(rows=slice(0, 2))["tag"].tolist() == ["a", "a"]


def test_an_empty_dataset_reads_as_empty(tmp_path):
    out = record_dataset(torch.nn.Linear(3, 2), [], [""], tmp_path / "empty", progress=False)
    ds = open_dataset(out)
    assert len(ds) == 0 and list(ds.meta().columns) == ["batch", "row"] and ds.meta().empty
    model = torch.nn.Linear(3, 2)
    data = [torch.randn(4, 3), torch.randn(0, 3), torch.randn(4, 3)]  # a batch of no examples
    out = record_dataset(model, data, [""], tmp_path / "gap", shard_rows=4, progress=False,
                         meta=lambda b: {"x": b[:, 0]})
    ds = open_dataset(out)  # complete: batches 0..2, the empty one registered too
    with torch.no_grad():
        assert np.array_equal(ds.numpy(""), model(torch.cat(data)).numpy())
    assert ds.meta()["batch"].tolist() == [0] * 4 + [2] * 4


def test_captured_and_stored_dtype_are_separate_options(tmp_path):
    model = torch.nn.Linear(3, 2)
    data = [torch.randn(4, 3)]
    out = record_dataset(model, data, [""], tmp_path / "d", dtype=torch.bfloat16,
                         store_dtype=torch.float16, progress=False)
    ds = open_dataset(out)
    assert ds.manifest["columns"][""]["dtype"] == "float16"
    with torch.no_grad():
        expected = model(data[0]).to(torch.bfloat16).to(torch.float16).numpy()
    assert np.array_equal(ds.numpy(""), expected)


def test_the_reader_does_not_import_the_writer():
    """The reader shares the on-disk format module with the writer, not the writer itself."""
    src = (ROOT / "hookscope" / "dataset_view.py").read_text()
    assert "from .dataset import" not in src and "import torch" not in src
    assert "import torch" not in (ROOT / "hookscope" / "dataset_format.py").read_text()


def test_a_resumed_run_removes_temporaries_of_a_killed_one(small_dataset):
    out, _ = small_dataset
    stale = [out / "shards" / ".part-r000-000009.parquet.tmp", out / ".manifest.json.99.tmp"]
    for path in stale:
        path.write_bytes(b"half")
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 5)
    data = [torch.randn(4, 3) for _ in range(6)]
    record_dataset(model, data, [""], out, shard_rows=8, progress=False,
                   meta=lambda b: {"x": b[:, 0].tolist(), "tag": ["a"] * len(b)})
    assert not any(p.exists() for p in stale)


def test_fingerprints_follow_what_callables_compute():
    """Unit checks of the fingerprint of options: equal exactly when the same is computed."""
    import functools

    from hookscope.fingerprint import setup_fingerprint

    model = torch.nn.Linear(2, 2)

    def fp(value):
        return setup_fingerprint(model, [""], {"forward": value})

    class Scaled:
        def __init__(self, k):
            self.k = k

        def __call__(self, m, b):
            return m(b * self.k)

    def make(k):
        return lambda m, b: m(b * k)

    def with_default(m, b, k=2):
        return m(b * k)

    def with_other_default(m, b, k=3):
        return m(b * k)

    same = [(make(2), make(2)), (lambda m, b: m(b), lambda m, b: m(b)),
            (functools.partial(with_default, k=2), functools.partial(with_default, k=2)),
            (Scaled(2), Scaled(2))]
    different = [(make(2), make(3)), (with_default, with_other_default),
                 (functools.partial(with_default, k=2), functools.partial(with_default, k=3)),
                 (Scaled(2), Scaled(3)), (Scaled(2).__call__, Scaled(3).__call__),
                 (lambda m, b: m(b), lambda m, b: m(-b)), (None, make(1))]
    for a, b in same:
        assert fp(a) == fp(b)
    for a, b in different:
        assert fp(a) != fp(b)
    assert setup_fingerprint(model, [""], {}) != setup_fingerprint(model.train(False), [""], {})


def test_binary_vector_encoding_reads_back_the_same_and_stays_readable(tmp_path):
    """vector_encoding="binary": the same numbers through open_dataset, format version 3
    (the list encoding stays version 2), and each row's raw floats in pyarrow, pandas and
    DuckDB (where installed)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh()).eval()
    batches = [torch.randn(5, 3, 4) for _ in range(3)]
    views = {}
    for encoding in ("list", "binary"):
        out = record_dataset(model, batches, ["0", "1"], tmp_path / encoding, reduce="mean",
                             progress=False, shard_rows=7, vector_encoding=encoding,
                             store_dtype=torch.float16)
        views[encoding] = open_dataset(out)
    assert views["list"].manifest["version"] == 2 and views["binary"].manifest["version"] == 3
    assert views["binary"].manifest["columns"]["1"]["encoding"] == "binary"
    for column in ("0", "1"):  # the same bytes stored two ways
        assert np.array_equal(views["binary"].numpy(column), views["list"].numpy(column))
        assert np.array_equal(views["binary"].numpy(column, rows=[14, 2]),
                              views["list"].numpy(column, rows=[14, 2]))
    assert views["binary"].to_frame().equals(views["list"].to_frame())
    shards = sorted((tmp_path / "binary" / "shards").glob("*.parquet"))
    table = pq.read_table(shards[0])
    first = np.frombuffer(table["1"][0].as_py(), "<f2")
    assert np.array_equal(first, views["list"].numpy("1")[0])
    frame = pd.read_parquet(shards[0])
    assert np.array_equal(np.frombuffer(frame["1"].iloc[0], "<f2"), first)
    duckdb = pytest.importorskip("duckdb")
    blob = duckdb.sql(f"select \"1\" from '{shards[0]}' limit 1").fetchall()[0][0]
    assert np.array_equal(np.frombuffer(blob, "<f2"), first)


def test_binary_encoding_is_refused_where_it_cannot_be(tmp_path):
    with pytest.raises(hs.errors.InputError, match="vector_encoding"):
        record_dataset(torch.nn.Linear(2, 2), [torch.ones(1, 2)], [""], tmp_path / "x",
                       vector_encoding="bytes", progress=False)
    manifest = {"format": "hookscope-dataset", "version": 2, "complete": False,
                "fingerprint": "f", "world_size": 1, "shards": [], "meta": {},
                "columns": {"a": {"kind": "vector", "units": 2, "dtype": "float32",
                                  "encoding": "binary"}}}
    with pytest.raises(DatasetError, match="invalid description"):  # binary needs version 3
        hookscope.dataset_format.validate_manifest(manifest, tmp_path / "manifest.json")
    manifest["version"] = 3
    hookscope.dataset_format.validate_manifest(manifest, tmp_path / "manifest.json")


# -- shards written progressively, in row groups -----------------------------------------------

def _grouped_and_whole(tmp_path, monkeypatch, name, group_bytes, **options):
    """The same recording written with row groups of about ``group_bytes`` and with one row
    group per shard (the writer's former layout): the independent reference."""
    views = {}
    for layout, limit in (("grouped", group_bytes), ("whole", 2**62)):
        monkeypatch.setattr(hookscope.dataset_writer, "_ROW_GROUP_BYTES", limit)
        out = record_dataset(progress=False, out=tmp_path / f"{name}-{layout}", **options)
        views[layout] = open_dataset(out)  # verify=True: every shard read is checksummed
    monkeypatch.undo()
    return views


def _row_groups(view) -> list[int]:
    return [pq.ParquetFile(view.path / s["file"]).metadata.num_row_groups
            for s in view.manifest["shards"]]


@pytest.mark.parametrize("encoding", ["list", "binary"])
def test_shards_of_several_row_groups_read_back_what_was_recorded(tmp_path, monkeypatch,
                                                                  encoding):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh()).eval()
    sizes = [5, 3, 7, 1, 6, 4, 2, 8, 3]  # uneven: groups and shards end mid-way
    batches = [torch.randn(n, 4) for n in sizes]
    # 5 rows of 2 x 6 float32 + bookkeeping: about two batches per row group.
    views = _grouped_and_whole(
        tmp_path, monkeypatch, encoding, 200, model=model, batches=batches, modules=["0", "1"],
        shard_rows=12, vector_encoding=encoding,
        meta=lambda b: {"x": b[:, 0].tolist(), "tag": [f"t{len(b)}"] * len(b)})
    grouped, whole = views["grouped"], views["whole"]
    assert all(n >= 2 for n in _row_groups(grouped)) and set(_row_groups(whole)) == {1}
    assert grouped.manifest["shards"] == [{**s, "bytes": g["bytes"], "sha256": g["sha256"]}
                                          for s, g in zip(whole.manifest["shards"],
                                                          grouped.manifest["shards"],
                                                          strict=True)]
    with torch.no_grad():  # the recording computed by hand, batch by batch
        expected = {"0": torch.cat([model[0](b) for b in batches]).numpy(),
                    "1": torch.cat([model(b) for b in batches]).numpy()}
    for column in ("0", "1"):
        assert np.array_equal(grouped.numpy(column), expected[column])
        assert np.array_equal(grouped.numpy(column, rows=[29, 3, 17]),
                              expected[column][[29, 3, 17]])
        chunks = list(grouped.iter_chunks(column))
        assert np.array_equal(np.concatenate([c for _, c in chunks]), expected[column])
    meta = grouped.meta()
    assert meta.x.tolist() == torch.cat(batches)[:, 0].tolist()
    assert meta.batch.tolist() == [i for i, n in enumerate(sizes) for _ in range(n)]
    assert meta.row.tolist() == [r for n in sizes for r in range(n)]
    assert grouped.to_frame().equals(whole.to_frame())
    # Other readers: the same table, the same frame, row for row.
    assert pq.read_table(grouped.path / "shards").equals(pq.read_table(whole.path / "shards"))
    assert pd.read_parquet(grouped.path / "shards").equals(pd.read_parquet(whole.path / "shards"))
    for s in grouped.manifest["shards"]:  # the checksum is of the very bytes on disk
        data = (grouped.path / s["file"]).read_bytes()
        assert len(data) == s["bytes"] and hookscope.dataset_format.sha256_of(data) == s["sha256"]
    duckdb = pytest.importorskip("duckdb")
    query = "select * from '{}/shards/*.parquet' order by batch, row"
    assert duckdb.sql(query.format(grouped.path)).fetchall() == duckdb.sql(
        query.format(whole.path)).fetchall()


def test_sequences_in_several_row_groups(tmp_path, monkeypatch):
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(3, 4, batch_first=True)
    lengths = [torch.tensor([2, 5, 3]), torch.tensor([1, 4, 4]), torch.tensor([3, 3]),
               torch.tensor([5, 1, 2, 2]), torch.tensor([2, 4])]
    batches = [torch.nn.utils.rnn.pack_padded_sequence(torch.randn(len(n), 5, 3), n,
                                                       batch_first=True, enforce_sorted=False)
               for n in lengths]
    views = _grouped_and_whole(tmp_path, monkeypatch, "seq", 100, model=lstm, batches=batches,
                               modules=[""], shard_rows=7, pick=lambda o: o[0])
    assert all(n >= 2 for n in _row_groups(views["grouped"]))
    grouped = pq.read_table(views["grouped"].path / "shards")
    assert grouped.equals(pq.read_table(views["whole"].path / "shards"))
    col = grouped[""].to_pylist()
    assert [len(s) for s in col] == torch.cat(lengths).tolist()
    with torch.no_grad():
        padded, _ = torch.nn.utils.rnn.pad_packed_sequence(lstm(batches[3])[0],
                                                           batch_first=True)
    assert np.array_equal(np.array(col[8 + 1], dtype=np.float32), padded[1, :1].numpy())


def test_a_failed_row_group_stops_the_run_and_resumes(tmp_path, monkeypatch):
    """The disk fills up in the middle of a shard (not its last row group): the error comes
    at the next batch, the half-written shard is removed, and a resumed run completes it."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    data = [torch.randn(4, 3) for _ in range(9)]
    monkeypatch.setattr(hookscope.dataset_writer, "_ROW_GROUP_BYTES", 1)  # a row group per batch
    real_write = hookscope.dataset_writer._HashingFile.write
    seen = []

    def flaky(self, data):
        seen.append(self.path.name)
        if self.path.name == ".part-r000-000001.parquet.tmp" and seen.count(seen[-1]) == 3:
            raise OSError(28, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(hookscope.dataset_writer._HashingFile, "write", flaky)
    added = []
    real_add = hookscope.dataset_writer.ShardWriter.add

    def add(self, columns, n, index):
        added.append(index)
        real_add(self, columns, n, index)

    monkeypatch.setattr(hookscope.dataset_writer.ShardWriter, "add", add)
    out = tmp_path / "full"
    with pytest.raises(DatasetError, match="part-r000-000001.parquet failed.*No space left.*"
                                           "the 1 completed shards.*intact"):
        record_dataset(model, data, [""], out, shard_rows=12, progress=False)
    assert added[-1] < len(data) - 1  # stopped early, not at the end
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["part-r000-000000.parquet"]
    with pytest.warns(UserWarning, match="incomplete.*12 rows"):
        open_dataset(out)
    monkeypatch.undo()
    record_dataset(model, data, [""], out, shard_rows=12, progress=False)
    with torch.no_grad():
        expected = torch.cat([model(batch) for batch in data]).numpy()
    assert np.array_equal(open_dataset(out).numpy(""), expected)


def test_a_run_stopped_mid_shard_leaves_no_temporary(tmp_path, monkeypatch):
    """An error in the main loop while a shard has row groups on disk: the batches already
    handed to the writer end that shard (a resumed run starts at the failing batch), no
    temporary is left, and a resumed run gives the whole dataset."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    data = [torch.randn(4, 3) for _ in range(9)]
    monkeypatch.setattr(hookscope.dataset_writer, "_ROW_GROUP_BYTES", 1)

    stop = [True]

    def meta(batch):
        if stop[0] and float(batch[0, 0]) == float(data[7][0, 0]):  # shard 3's 2nd batch
            raise RuntimeError("stop")
        return {"x": batch[:, 0].tolist()}

    out = tmp_path / "stopped"
    with pytest.raises(RuntimeError, match="stop"):
        record_dataset(model, data, [""], out, shard_rows=8, progress=False, meta=meta,
                       setup_id="v1")
    names = sorted(p.name for p in (out / "shards").iterdir())
    assert names == [f"part-r000-00000{i}.parquet" for i in range(4)]  # batch 6: a shard
    with pytest.warns(UserWarning, match="incomplete"):
        partial = open_dataset(out)
    assert [b for s in partial.manifest["shards"] for b, _ in s["batches"]] == list(range(7))
    stop[0] = False
    record_dataset(model, data, [""], out, shard_rows=8, progress=False, meta=meta,
                   setup_id="v1")
    with torch.no_grad():
        expected = torch.cat([model(batch) for batch in data]).numpy()
    assert np.array_equal(open_dataset(out).numpy(""), expected)


def test_to_frame_selects_a_column_and_a_meta_column_by_name(tmp_path):
    """(column, unit) columns stay a two-level index beside the metadata: frame["0"] is the
    units, frame["k"] the metadata, as the recorded values and meta say."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    data = [torch.randn(4, 3), torch.randn(2, 3)]
    out = record_dataset(model, data, [""], tmp_path / "ds", progress=False, setup_id="v1",
                         meta=lambda b: {"k": (b[:, 0] * 10).round().tolist()})
    frame = open_dataset(out).to_frame()
    assert isinstance(frame.columns, pd.MultiIndex)
    with torch.no_grad():
        expected = torch.cat([model(b) for b in data]).numpy()
    np.testing.assert_array_equal(frame[""].to_numpy(), expected)
    assert frame["k"].tolist() == torch.cat(data)[:, 0].mul(10).round().tolist()
    assert frame["batch"].tolist() == [0, 0, 0, 0, 1, 1]


def test_meta_dates_durations_and_large_unsigned_integers_keep_their_type(tmp_path):
    """tolist() made datetime64[ns] integers (nanoseconds), and uint64 beyond int64 a raw
    pyarrow OverflowError."""
    import duckdb

    model = torch.nn.Linear(2, 3)
    when = np.array(["2020-01-01T00:00:00.000000001", "2021-05-05", "2022-01-01"],
                    dtype="datetime64[ns]")
    big = np.array([2**64 - 1, 5, 2**63], dtype=np.uint64)
    record_dataset(model, [torch.randn(3, 2)], [""], tmp_path / "ds", progress=False,
                   meta=lambda b: {"when": when, "big": big, "since": when - when[0]})
    for frame in (open_dataset(tmp_path / "ds").meta(),
                  pd.read_parquet(tmp_path / "ds" / "shards")):
        assert frame["when"].tolist() == [pd.Timestamp(t) for t in when]
        assert frame["big"].tolist() == [int(v) for v in big]
        assert frame["since"].tolist() == [pd.Timedelta(d) for d in when - when[0]]
    rows = duckdb.sql(f"select big from read_parquet('{tmp_path}/ds/shards/*.parquet')")
    assert [r[0] for r in rows.fetchall()] == [int(v) for v in big]


class _OptionalFirst(torch.nn.Module):
    """{"aux": a tensor only when asked, "hidden": always}: the first tensor changes."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x, want_aux=False):
        h = self.lin(x)
        return {"aux": -torch.ones_like(h) if want_aux else None, "hidden": h}


class _AskAux(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = _OptionalFirst()

    def forward(self, batch):
        return self.block(batch["x"], want_aux=batch["aux"])


def test_a_column_never_switches_to_another_part_of_the_output(tmp_path):
    """Batch 0 stored out["hidden"], batch 1 out["aux"] (rows of -1), silently; to_frame
    mixed them across steps too."""
    torch.manual_seed(0)
    model, x = _AskAux(), torch.randn(4, 4)
    batches = [{"x": x[:2], "aux": False}, {"x": x[2:], "aux": True}]
    with pytest.raises(DatasetError, match=r"output\['aux'\].*output\['hidden'\].*pick="):
        record_dataset(model, batches, ["block"], tmp_path / "ds", progress=False)
    with torch.no_grad(), hs.record(model, ["block"]) as rec:
        for b in batches:
            model(b)
    with pytest.raises(hs.InputError, match=r"output\['hidden'\] in step 0 but output\['aux'\]"):
        rec.to_frame()
    # what the message says to do works, and stores the hidden states of every batch
    record_dataset(model, batches, ["block"], tmp_path / "ok", progress=False,
                   pick={"block": lambda out: out["hidden"]})
    expected = model.block.lin(x).detach().numpy()
    assert np.allclose(open_dataset(tmp_path / "ok").numpy("block"), expected, rtol=1e-6,
                       atol=1e-7)
