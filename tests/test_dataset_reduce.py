"""record_dataset reduces each call in its hook (no copy of the whole output): checked
against copies taken by hand-written hooks, unsorted and pooled by hand, one example at a
time, on the story's BiLSTM, a Hugging Face BERT, a CNN and a model that sorts inside."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import hookscope as hs
from hookscope.dataset import record_dataset
from hookscope.dataset_view import open_dataset
from hookscope.examples.corpus import generate
from hookscope.examples.nli import load_pretrained

pytest.importorskip("pyarrow")


def _copies(model, names, run):
    """Every call's output of ``names``, cloned by plain forward hooks (the reference)."""
    got = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: got[n].append(
            (o[0] if isinstance(o, tuple) else o).detach().clone())) for n in names]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return got


def _pool(x, keep, reduce):
    """One example's real positions pooled by hand."""
    real = x[keep]
    return {"max": real.amax(0), "mean": real.mean(0), "sum": real.sum(0)}[reduce]


@pytest.fixture(scope="module")
def story():
    model, vec, _ = load_pretrained()
    pairs = generate(1)[:150]
    batches = []
    for i in range(0, len(pairs), 50):
        chunk = pairs[i:i + 50]
        batches.append(vec.batch_transform_nli_padded_sorted([p.premise for p in chunk],
                                                             [p.hypothesis for p in chunk]))
    return model, batches


@pytest.mark.parametrize("reduce", ["max", "mean", "last"])
def test_story_encoder_reduced_in_the_hook_equals_copies_unsorted_by_hand(
        tmp_path, story, reduce):
    model, batches = story
    out = record_dataset(model, batches, ["encoder", "pooling"], tmp_path / reduce,
                         reduce=reduce, progress=False,
                         calls={"encoder": ["premise", "hypothesis"],
                                "pooling": ["premise", "hypothesis"]},
                         unsort=lambda b: {"encoder": [b.premise_orig_idx,
                                                       b.hypothesis_orig_idx]})
    ds = open_dataset(out)
    for side, call in (("premise", 0), ("hypothesis", 1)):
        expected, pooled = [], []
        for b in batches:
            got = _copies(model, ["encoder", "pooling"], lambda b=b: model(b))
            order = getattr(b, f"{side}_orig_idx")
            lengths = getattr(b, f"{side}_lengths")  # sorted order, as the encoder ran
            padded = got["encoder"][call]
            for i in order.tolist():  # the caller's order, one example at a time
                n = int(lengths[i])
                keep = torch.arange(padded.shape[1]) < n
                if reduce == "last":  # bidirectional: forward half at n-1, backward at 0
                    h = padded.shape[2] // 2
                    expected.append(torch.cat([padded[i, n - 1, :h], padded[i, 0, h:]]))
                else:
                    expected.append(_pool(padded[i], keep, reduce))
            pooled.append(got["pooling"][call])
        rows = ds.numpy(f"encoder:{side}")
        if reduce == "mean":
            np.testing.assert_allclose(rows, torch.stack(expected).numpy(), rtol=1e-5,
                                       atol=1e-6)
        else:
            assert np.array_equal(rows, torch.stack(expected).numpy())
        # 2-D outputs are stored as they were (copied, never aliased)
        assert np.array_equal(ds.numpy(f"pooling:{side}"), torch.cat(pooled).numpy())


class SortsInside(nn.Module):
    """Sorts its batch by length before the inner layer, as the story's model does, but the
    inner layer's output carries no lengths: they come from ``lengths=``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner = nn.Sequential(nn.Linear(4, 6), nn.Tanh())

    def forward(self, batch):
        order = batch["lengths"].argsort(descending=True)
        return self.inner(batch["x"][order])


def test_lengths_from_the_batch_follow_the_unsort_permutation(tmp_path):
    model = SortsInside()
    gen = torch.Generator().manual_seed(1)
    data = []
    for _ in range(3):
        lengths = torch.randint(1, 8, (9,), generator=gen)
        x = torch.randn(9, 7, 4, generator=gen)
        data.append({"x": x, "lengths": lengths})
    for reduce in ("mean", "max", "sum"):
        out = record_dataset(model, data, ["inner"], tmp_path / reduce, reduce=reduce,
                             progress=False, lengths=lambda b: b["lengths"],
                             unsort=lambda b: {"inner": b["lengths"].argsort(
                                 descending=True).argsort()})
        with torch.no_grad():
            expected = torch.stack([
                _pool(model.inner(b["x"][i]), torch.arange(7) < b["lengths"][i], reduce)
                for b in data for i in range(9)])
        np.testing.assert_allclose(open_dataset(out).numpy("inner"), expected.numpy(),
                                   rtol=1e-5, atol=1e-6)


def test_bert_hidden_states_masked_by_the_attention_mask(tmp_path, bert):
    gen = torch.Generator().manual_seed(2)
    data = []
    for _ in range(2):
        ids = torch.randint(1, 100, (5, 9), generator=gen)
        mask = (torch.arange(9)[None] < torch.randint(2, 10, (5, 1), generator=gen)).long()
        data.append({"input_ids": ids * mask, "attention_mask": mask})
    layers = ["encoder.layer.0", "encoder.layer.2"]
    out = record_dataset(bert, data, layers, tmp_path / "bert", reduce="mean", progress=False,
                         forward=lambda m, b: m(**b))
    ds = open_dataset(out)
    with torch.no_grad():
        states = [bert(**b, output_hidden_states=True).hidden_states for b in data]
    for k, name in ((1, layers[0]), (3, layers[1])):
        expected = torch.stack([_pool(h[k][i], b["attention_mask"][i].bool(), "mean")
                                for h, b in zip(states, data, strict=True) for i in range(5)])
        np.testing.assert_allclose(ds.numpy(name), expected.numpy(), rtol=1e-5, atol=1e-5)


def test_cnn_feature_maps_and_a_later_in_place_op(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 5), nn.ReLU(inplace=True))
    data = [torch.from_numpy(np.random.default_rng(i).standard_normal((6, 3, 8, 8),
                                                                       dtype=np.float32))
            for i in range(2)]
    out = record_dataset(model, data, ["0", "3"], tmp_path / "cnn", reduce="max",
                         progress=False)
    got = _copies(model, ["0", "3"], lambda: [model(x) for x in data])
    ds = open_dataset(out)
    # The convolution's output is pooled before ReLU(inplace=True) overwrites it, and the
    # linear layer's rows are a copy taken before the second in-place ReLU.
    assert np.array_equal(ds.numpy("0"), torch.cat([c.amax((2, 3)) for c in got["0"]]).numpy())
    assert np.array_equal(ds.numpy("3"), torch.cat(got["3"]).numpy())
    assert (ds.numpy("3") < 0).any()  # (what the in-place ReLU would have hidden)
    with pytest.raises(hs.InputError, match="reduce='flatten'") as err:
        record_dataset(model, data, ["0"], tmp_path / "none", reduce=None, progress=False)
    assert "kind=" not in str(err.value) and "batch 0" in str(err.value)  # (not to_frame's)
    flat = record_dataset(model, data, ["0"], tmp_path / "flat", reduce="flatten",
                          progress=False)
    assert np.array_equal(open_dataset(flat).numpy("0"),
                          torch.cat([c.flatten(1) for c in got["0"]]).numpy())


def test_a_permutation_of_another_batch_is_a_clear_error(tmp_path, story):
    model, batches = story
    with pytest.raises(hs.UnsortError, match="another batch"):
        record_dataset(model, batches, ["encoder"], tmp_path / "bad", reduce="max",
                       progress=False, unsort=lambda b: {"encoder": torch.arange(3)})


def test_non_finite_rows_are_refused_with_the_column_and_row(tmp_path):
    from hookscope.dataset_rows import host_columns

    rows = torch.zeros(4, 3)
    rows[2, 1] = float("nan")
    with pytest.raises(hs.InputError, match=r"batch 7: 'enc' row 2 \(unit 1\) is NaN"):
        host_columns({"ok": torch.zeros(4, 2), "enc": rows}, np.float32, index=7)
    # A float32 value that float16 cannot hold is refused, not stored as infinity.
    big = nn.Linear(2, 2)
    with torch.no_grad():
        big.weight.fill_(1e5)
    with pytest.raises(hs.InputError, match="overflow of the stored dtype"):
        record_dataset(big, [torch.ones(3, 2)], [""], tmp_path / "f16", reduce="mean",
                       store_dtype=torch.float16, progress=False)


def test_nan_at_a_real_position_is_an_error_and_nan_in_padding_is_not(tmp_path):
    class Padded(nn.Module):
        def forward(self, x, attention_mask):
            return x * 1.0

    x = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    x[1, 3] = float("nan")  # padding: never pooled
    out = record_dataset(Padded(), [{"x": x, "attention_mask": mask}], [""], tmp_path / "ok",
                         reduce="max", forward=lambda m, b: m(**b), progress=False)
    expected = torch.stack([x[0, :3].amax(0), x[1, :2].amax(0)])
    assert np.array_equal(open_dataset(out).numpy(""), expected.numpy())
    x[0, 1, 2] = float("inf")  # a real position
    with pytest.raises(hs.InputError, match=r"^batch 0: the output of '' call 0 holds NaN or "
                       r"infinity at a real position \(first at index \(0, 1, 2\)\)"):
        record_dataset(Padded(), [{"x": x, "attention_mask": mask}], [""], tmp_path / "bad",
                       reduce="max", forward=lambda m, b: m(**b), progress=False)
    # Sequences stored as they are (reduce=None): real positions only are checked.
    with pytest.raises(hs.InputError, match="batch 0: '' example 0 position 1 .unit 2. is NaN"):
        record_dataset(Padded(), [{"x": x, "attention_mask": mask}], [""], tmp_path / "seq",
                       forward=lambda m, b: m(**b), progress=False)
    x[0, 1, 2] = 1e5  # fits float32, not float16
    with pytest.raises(hs.InputError, match="overflow of the stored dtype"):
        record_dataset(Padded(), [{"x": x, "attention_mask": mask}], [""], tmp_path / "f16",
                       forward=lambda m, b: m(**b), store_dtype=torch.float16, progress=False)
    with pytest.raises(hs.InputError, match="no real position"):
        record_dataset(Padded(), [{"x": x, "attention_mask": mask * 0}], [""],
                       tmp_path / "empty", reduce="mean", forward=lambda m, b: m(**b),
                       progress=False)


def test_a_permutation_that_fits_only_the_feature_dimension_is_refused(tmp_path):
    # Batch 3, 4 features, a permutation of 4: reordering the features would be silent.
    lin = nn.Linear(4, 4)
    x = torch.randn(3, 4)
    bad = torch.tensor([3, 2, 1, 0])
    with pytest.raises(hs.UnsortError, match="dim 0 is not of the permutation's length 4"), \
            hs.record(lin, [""], unsort={"": bad}):
        lin(x)
    for reduce in (None, "mean"):
        with pytest.raises(hs.UnsortError):
            record_dataset(lin, [x], [""], tmp_path / str(reduce), reduce=reduce,
                           progress=False, unsort=lambda b: {"": bad})
    # With lengths= too, the permutation is blamed (not the lengths, no IndexError).
    seq = torch.randn(3, 5, 4)
    for wrong in (torch.tensor([0, 1, 2, 3]), torch.tensor([1, 0])):
        with pytest.raises(hs.UnsortError, match="the output has 3 examples"):
            record_dataset(lin, [seq], [""], tmp_path / f"len{len(wrong)}", reduce="mean",
                           progress=False, lengths=lambda b: torch.tensor([5, 5, 5]),
                           unsort=lambda b, wrong=wrong: {"": wrong})
    # A time-major output whose batch really is dim 1 is recorded once told so.
    seq = torch.randn(5, 3, 4)  # (time, batch, features)
    perm = torch.tensor([2, 0, 1])
    with torch.no_grad(), hs.record(lin, [""], unsort={"": perm}, batch_dim={"": 1}) as rec:
        out = lin(seq)
    assert torch.equal(rec[""].tensor, out[:, perm])


def test_a_packed_rnns_final_state_is_not_given_the_input_lengths(tmp_path):
    class Final(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.gru = nn.GRU(3, 4, batch_first=True, bidirectional=True)

        def forward(self, b):
            return self.gru(nn.utils.rnn.pack_padded_sequence(b[0], b[1],
                                                              batch_first=True))[1]

    model = Final().eval()
    batch = (torch.randn(5, 6, 3), torch.tensor([6, 5, 3, 2, 1]))
    with torch.no_grad(), hs.record(model, ["gru"], pick=lambda o: o[1]) as rec:
        h_n = model(batch)
    # h_n is (directions, batch, hidden): the input's lengths do not describe it.
    assert rec["gru"].lengths is None and rec["gru"].mask is None
    assert torch.equal(rec["gru"].tensor, h_n)
    out = record_dataset(model, [batch], ["gru"], tmp_path / "h", reduce="max", progress=False,
                         pick=lambda o: o[1].transpose(0, 1).flatten(1))
    assert np.array_equal(open_dataset(out).numpy("gru"), h_n.transpose(0, 1).flatten(1).numpy())


@pytest.mark.parametrize("meta, message", [
    ({"split": "dev"}, "one value per example .a list, array or tensor., got str"),
    ({"info": {"a": 1, "b": 2, "c": 3}}, "got dict"),
    ({"pos": np.zeros((3, 2))}, "not one scalar per example"),
])
def test_meta_columns_that_are_not_one_scalar_per_example_are_refused(tmp_path, meta, message):
    lin = nn.Linear(2, 2)
    with pytest.raises(hs.DatasetError, match=message):
        record_dataset(lin, [torch.ones(3, 2)], [""], tmp_path / "m", reduce="mean",
                       meta=lambda b: meta, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_reductions_match_the_cpu_and_read_nothing_back_per_capture(tmp_path):
    from hookscope.offload import count_host_syncs

    class Padded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))

        def forward(self, x, attention_mask):
            for layer in self.layers:
                x = torch.tanh(layer(x))
            return x

    gen = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(16, 12, 8, generator=gen),
             "attention_mask": (torch.arange(12)[None] < torch.randint(
                 1, 13, (16, 1), generator=gen)).long()} for _ in range(3)]
    model = Padded()
    names = [f"layers.{i}" for i in range(4)]
    results = {}
    for device in ("cpu", "cuda"):
        model.to(device)
        on = [{k: v.to(device) for k, v in b.items()} for b in data]
        out = record_dataset(model, on, names, tmp_path / device, reduce="mean",
                             forward=lambda m, b: m(**b), progress=False)
        results[device] = {n: open_dataset(out).numpy(n) for n in names}
    for n in names:
        np.testing.assert_allclose(results["cuda"][n], results["cpu"][n], rtol=1e-5,
                                   atol=1e-6)

    def one_run(folder, batches):
        return lambda: record_dataset(model, batches, names, tmp_path / folder, reduce="mean",
                                      forward=lambda m, b: m(**b), progress=False)

    # At most one wait per batch (the copy of its vectors), none per capture; the fixed
    # ones (the setup's fingerprint reads the weights) cancel out in the difference.
    one, three = count_host_syncs(one_run("s1", on[:1])), count_host_syncs(one_run("s3", on))
    assert three - one <= 2, (one, three)
    on[1]["x"][3, 0, 0] = float("nan")  # a real position: refused, on the host
    with pytest.raises(hs.InputError, match="batch 1: 'layers.0' row 3"):
        one_run("nan", on)()


def test_a_packed_input_padded_to_a_longer_total_length(tmp_path):
    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.gru = nn.GRU(3, 4, batch_first=True)

        def forward(self, packed):  # padded past the longest sequence, as a fixed-size batch
            out, _ = self.gru(packed)
            return nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=9)[0]

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = Encoder()

        def forward(self, b):
            return self.encoder(nn.utils.rnn.pack_padded_sequence(
                b["x"], b["lengths"], batch_first=True, enforce_sorted=False))

    model = Model().eval()
    gen = torch.Generator().manual_seed(3)
    data = [{"x": torch.randn(5, 6, 3, generator=gen),
             "lengths": torch.tensor([6, 2, 5, 1, 3])} for _ in range(2)]
    got = _copies(model, ["encoder"], lambda: [model(b) for b in data])["encoder"]
    for reduce in ("mean", "max"):
        out = record_dataset(model, data, ["encoder"], tmp_path / reduce, reduce=reduce,
                             progress=False)
        expected = torch.stack([_pool(o[i], torch.arange(9) < b["lengths"][i], reduce)
                                for o, b in zip(got, data, strict=True) for i in range(5)])
        np.testing.assert_allclose(open_dataset(out).numpy("encoder"), expected.numpy(),
                                   rtol=1e-6, atol=1e-6)


def test_a_time_major_output_of_a_packed_call_is_read_along_its_batch(tmp_path):
    class TimeMajor(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.gru = nn.GRU(3, 4)

        def forward(self, packed):  # pad_packed_sequence's default: (time, batch, hidden)
            return nn.utils.rnn.pad_packed_sequence(self.gru(packed)[0])[0]

    model = TimeMajor().eval()
    batch = nn.utils.rnn.pack_padded_sequence(torch.randn(6, 5, 3), torch.tensor([6, 5, 3, 2, 1]))
    with torch.no_grad(), hs.record(model, [""]) as rec:
        padded = model(batch)
    assert rec[""].batch_dim == 1  # (6 steps, 5 sequences: the lengths say which is which)
    expected = torch.stack([padded[:n, i].mean(0) for i, n in enumerate([6, 5, 3, 2, 1])])
    np.testing.assert_allclose(rec.to_frame(reduce="mean").to_numpy(), expected.numpy(),
                               rtol=1e-6, atol=1e-6)
    for pick, folder in ((None, "tm"), (lambda out: out.transpose(0, 1), "bf")):
        out = record_dataset(model, [batch], [""], tmp_path / folder, reduce="mean",
                             progress=False, pick=pick)
        np.testing.assert_allclose(open_dataset(out).numpy(""), expected.numpy(), rtol=1e-6,
                                   atol=1e-6)


# -- batches pipelined: batch i's rows are finished while batch i + 1 computes -------------


def _linear_batches(n=3, rows=4):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3), nn.ReLU(inplace=True)).eval()
    return model, [torch.randn(rows, 5) for _ in range(n)]


def test_batch_rows_are_waited_for_after_the_next_forward_is_queued(tmp_path, monkeypatch):
    """With copies that complete only when waited for (a CUDA stream as the host sees it),
    each batch's wait comes after the next batch's copy was queued, waits for its own copy
    alone, and the stored rows are the Linear's outputs (before the in-place ReLU)."""
    import hookscope.dataset as dataset_module
    from hookscope.offload import HostStaging

    from .test_offload import FakeOps

    ops = FakeOps()
    monkeypatch.setattr(dataset_module, "HostStaging", lambda: HostStaging(ops=lambda x: ops))
    model, batches = _linear_batches()
    out = record_dataset(model, batches, ["0"], tmp_path / "ds", reduce="mean",
                         progress=False)
    assert ops.log == [("copy", 1), ("copy", 2), ("wait", 1), ("copy", 3), ("wait", 2),
                       ("wait", 3)]
    with torch.no_grad():
        expected = torch.cat([model[0](b) for b in batches]).numpy()
    np.testing.assert_array_equal(open_dataset(out).numpy("0"), expected)  # same kernels


def test_a_failing_batch_still_writes_the_batch_before_it(tmp_path):
    """Batch 1's rows wait for batch 2's forward; batch 2 raises: batches 0 and 1 are written
    all the same (their shard is ended, not dropped), and a resumed run records only batch 2
    onwards, equal to a clean run."""
    model, batches = _linear_batches(4)

    def forward(m, x):
        if forward.fail and x is batches[2]:
            raise RuntimeError("the model failed on batch 2")
        return m(x)

    forward.fail = True
    with pytest.raises(RuntimeError, match="batch 2"):
        record_dataset(model, batches, ["0"], tmp_path / "ds", reduce="mean", progress=False,
                       forward=forward, setup_id="test")  # one shard, not yet ended
    with pytest.warns(UserWarning, match="incomplete"):
        partial = open_dataset(tmp_path / "ds")
    assert {b for s in partial.manifest["shards"] for b, _ in s["batches"]} == {0, 1}
    forward.fail = False
    out = record_dataset(model, batches, ["0"], tmp_path / "ds", reduce="mean",
                         progress=False, forward=forward, setup_id="test", resume=True)
    clean = record_dataset(model, batches, ["0"], tmp_path / "clean", reduce="mean",
                           progress=False, forward=forward, setup_id="test")
    np.testing.assert_array_equal(open_dataset(out).numpy("0"), open_dataset(clean).numpy("0"))


def test_meta_is_read_before_the_iterable_gives_the_next_batch(tmp_path):
    """An iterable that refills one dict for every batch: each batch's meta is its own,
    although its rows reach the writer only after the next batch ran."""
    model, xs = _linear_batches()

    def refilled():
        batch = {}
        for i, x in enumerate(xs):
            batch["x"], batch["id"] = x, [f"{i}-{r}" for r in range(len(x))]
            yield batch

    out = record_dataset(model, refilled(), ["0"], tmp_path / "ds", reduce="mean",
                         progress=False, forward=lambda m, b: m(b["x"]),
                         meta=lambda b: {"id": b["id"]}, setup_id="test")
    assert open_dataset(out).meta()["id"].tolist() == [
        f"{i}-{r}" for i in range(len(xs)) for r in range(4)]


def test_a_run_that_fails_on_its_first_batch_says_to_run_it_again(tmp_path):
    model, batches = _linear_batches(2)

    def forward(m, x):
        raise RuntimeError("the model failed")

    with pytest.raises(RuntimeError, match="the model failed"):
        record_dataset(model, batches, ["0"], tmp_path / "ds", reduce="mean", progress=False,
                       forward=forward, setup_id="test")
    with pytest.raises(hs.DatasetError, match="stopped before a first batch.*again"):
        open_dataset(tmp_path / "ds")
