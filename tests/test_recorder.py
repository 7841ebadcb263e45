"""record(): hooks on and off, repeated calls, safety of captured values, options."""

from __future__ import annotations

import collections
import dataclasses

import pytest
import torch
from torch import nn

import hookscope as hs
from hookscope.errors import (
    AmbiguousCallError,
    CallCountError,
    CaptureModifiedError,
    ModuleSelectionError,
    NotRecordedError,
)
from tests.conftest import Counter, assert_no_hooks


class Shared(nn.Module):
    """One block called three times in one forward."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Linear(4, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.block(self.block(self.block(x))))


def test_module_called_three_times_gives_three_captures():
    torch.manual_seed(0)
    model, x = Shared().eval(), torch.randn(2, 4)
    with hs.record(model, ["block"], calls={"block": ["a", "b", "c"]}) as rec:
        model(x)
    a, b, c = rec.calls("block")
    with torch.no_grad():
        y1 = model.block(x)
        y2 = model.block(y1)
        y3 = model.block(y2)
    assert torch.equal(a.tensor, y1) and torch.equal(b.tensor, y2) and torch.equal(c.tensor, y3)
    assert [k.call for k in (a, b, c)] == [0, 1, 2]
    assert rec["block", "b"] is b and rec["block", -1] is c
    with pytest.raises(AmbiguousCallError, match=r"ran 3 times.*rec\['block', 'a'\]"):
        rec["block"]


@pytest.mark.parametrize("how", ["block", "forward", "interrupt"])
def test_hooks_gone_whatever_happens(mlp, how):
    class Boom(nn.Module):
        def forward(self, x):
            if how == "interrupt":
                raise KeyboardInterrupt
            raise RuntimeError("inside forward")

    model = nn.Sequential(mlp, Boom()) if how != "block" else mlp
    expected = KeyboardInterrupt if how == "interrupt" else RuntimeError
    with pytest.raises(expected), hs.record(model, ["0.0", "0.2"] if how != "block" else ["0"],
                                            inputs=True) as rec:
        model(torch.randn(3, 4))
        raise RuntimeError("inside block")
    assert_no_hooks(model)
    assert len(rec.calls("0.0" if how != "block" else "0")) == 1  # nothing recorded is lost


def test_nested_recorders_each_see_their_own(mlp):
    x = torch.randn(3, 4)
    with hs.record(mlp, ["0", "2"]) as outer:
        mlp(x)
        with hs.record(mlp, ["2", "4"]) as inner:
            mlp(x)
        mlp(x)
    assert_no_hooks(mlp)
    assert outer.steps == 3 and inner.steps == 1
    assert len(outer.calls("2")) == 3 and len(inner.calls("2")) == 1
    assert torch.equal(inner["4"].tensor, mlp(x).detach())
    with pytest.raises(NotRecordedError, match="not selected"):
        inner["0"]


def test_inplace_relu_after_hooked_linear_does_not_change_capture():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(inplace=True))
    x = torch.randn(8, 4)
    with torch.no_grad():
        expected = model[0](x).clone()
    with torch.no_grad(), hs.record(model, ["0"]) as rec:
        model(x)
    assert (expected < 0).any()  # the ReLU really did overwrite negative values
    assert torch.equal(rec["0"].tensor, expected)


class AddsInPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(3, 3)

    def forward(self, x):
        y = self.inner(x)
        y.add_(100.0)
        return y


def test_add_inplace_on_returned_tensor_does_not_change_capture():
    model, x = AddsInPlace(), torch.randn(2, 3)
    with torch.no_grad():
        expected = model.inner(x).clone()
        with hs.record(model, ["inner"]) as rec:
            model(x)
    assert torch.equal(rec["inner"].tensor, expected)


def test_clone_false_fails_loudly_after_inplace_change():
    model, x = AddsInPlace(), torch.randn(2, 3)
    with torch.no_grad(), hs.record(model, ["inner"], clone=False) as rec:
        model(x)
    with pytest.raises(CaptureModifiedError, match="clone=True"):
        rec["inner"].tensor
    # Without an in-place change, clone=False shares memory and reads fine.
    lin = nn.Linear(3, 3)
    with torch.no_grad(), hs.record(lin, [""], clone=False) as rec2:
        y = lin(x)
    assert rec2[""].tensor.data_ptr() == y.data_ptr()


Pair = collections.namedtuple("Pair", "left right")


@dataclasses.dataclass
class Out:
    hidden: torch.Tensor
    extra: list


class Structured(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x):
        if self.kind == "dict":
            return {"a": x * 2, "b": [x + 1, 3]}
        if self.kind == "userdict":
            return collections.UserDict(a=x * 2)
        if self.kind == "namedtuple":
            return Pair(x * 2, x + 1)
        return Out(x * 2, [x + 1])


class Mutator(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.first = Structured(kind)

    def forward(self, x):
        out = self.first(x)
        if isinstance(out, dict | collections.UserDict):
            out["a"] = out["a"] * 0  # replace an entry
            out["new"] = x           # extend
        elif isinstance(out, Out):
            out.hidden = out.hidden * 0
            out.extra.append("later")
        return out


@pytest.mark.parametrize("kind", ["dict", "userdict", "namedtuple", "dataclass"])
def test_structured_outputs_kept_and_safe_from_container_mutation(kind):
    model, x = Mutator(kind), torch.randn(2, 3)
    with hs.record(model, ["first"]) as rec:
        model(x)
    out = rec["first"].output
    assert type(out) is type(Structured(kind)(x))
    if kind in ("dict", "userdict"):
        assert set(out) >= {"a"} and "new" not in out
        assert torch.equal(out["a"], x * 2)
    elif kind == "namedtuple":
        assert torch.equal(out.left, x * 2) and torch.equal(out.right, x + 1)
    else:
        assert torch.equal(out.hidden, x * 2) and len(out.extra) == 1
    assert torch.equal(rec["first"].tensor, x * 2)


def test_hugging_face_model_output_is_safe_from_mutation():
    transformers = pytest.importorskip("transformers")
    x = torch.randn(2, 3)

    class Producer(nn.Module):
        def forward(self, x):
            return transformers.modeling_outputs.BaseModelOutput(last_hidden_state=x * 2)

    class Consumer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.producer = Producer()

        def forward(self, x):
            out = self.producer(x)
            out["last_hidden_state"] = x * 0
            out["hidden_states"] = (x,)
            return out

    model = Consumer()
    with hs.record(model, ["producer"]) as rec:
        model(x)
    out = rec["producer"].output
    assert isinstance(out, transformers.modeling_outputs.BaseModelOutput)
    assert torch.equal(out.last_hidden_state, x * 2) and out.hidden_states is None


def test_stop_skips_the_rest_of_the_model():
    after = Counter()
    model = nn.Sequential(nn.Linear(4, 4), Counter(), nn.Linear(4, 4), after)
    with hs.record(model, ["0", "1"], stop=True) as rec:
        model(torch.randn(2, 4))
        pytest.fail("the block should end at the stop")
    assert after.n == 0 and model[1].n == 1
    assert rec["1"].tensor.shape == (2, 4)
    assert_no_hooks(model)


def test_stop_waits_for_every_labelled_call():
    torch.manual_seed(0)
    model = Shared()
    rec = hs.record(model, ["block"], calls={"block": ["a", "b"]}, stop=True).run(
        torch.randn(1, 4))
    assert [c.label for c in rec.calls("block")] == ["a", "b"]  # stopped before the third


def test_stop_from_inner_recorder_does_not_leak_to_outer(mlp):
    with hs.record(mlp, ["4"]) as outer:
        inner = hs.record(mlp, ["0"], stop=True).run(torch.randn(1, 4))
        mlp(torch.randn(1, 4))
    assert len(inner.calls("0")) == 1
    assert outer.steps == 2 and len(outer.calls("4")) == 1  # the stopped pass never reached "4"


def test_labels_mismatch_is_reported(mlp):
    with pytest.raises(CallCountError, match=r"'0' ran 1 time\(s\) in step 0, but 2 labels"):
        with hs.record(mlp, ["0"], calls={"0": ["premise", "hypothesis"]}) as rec:
            mlp(torch.randn(1, 4))
    assert len(rec.calls("0")) == 1  # the recording is still there, complete


class _Repeat(nn.Module):
    """Calls its block as many times as it is told."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Linear(2, 2)

    def forward(self, x, times: int):
        for _ in range(times):
            x = self.block(x)
        return x


def test_a_call_count_mismatch_names_each_step_it_happened_in():
    """Checked per forward pass: a step that ran the module as often as it has labels is not
    reported, each one that did not is, by its number; a call outside the model's forward
    (the module called directly) is a step too."""
    model = _Repeat()
    x = torch.randn(1, 2)
    with pytest.raises(CallCountError) as err, \
            hs.record(model, ["block"], calls={"block": ["a", "b"]}) as rec:
        model(x, 2)
        model(x, 3)
        model(x, 2)
        model(x, 1)
    message = str(err.value)
    assert "in step 1, but 2 labels" in message and "in step 3, but 2 labels" in message
    assert "step 0" not in message and "step 2" not in message
    assert [len([c for c in rec.calls("block") if c.step == i]) for i in range(4)] == [2, 3, 2, 1]
    with pytest.raises(CallCountError, match=r"'block' ran 1 time\(s\) in step 0"), \
            hs.record(model, ["block"], calls={"block": ["a", "b"]}):
        model.block(x)
        model(x, 2)


def test_several_forward_passes_are_steps(mlp):
    xs = [torch.randn(2, 4) for _ in range(3)]
    with hs.record(mlp, ["2"]) as rec:
        for x in xs:
            mlp(x)
    assert rec.steps == 3 and [c.step for c in rec.calls("2")] == [0, 1, 2]
    with pytest.raises(AmbiguousCallError, match=r"rec.step\(i\)"):
        rec["2"]
    with torch.no_grad():
        assert torch.equal(rec.step(1)["2"].tensor, mlp[:3](xs[1]))
        assert torch.equal(rec.step(-1)["2"].tensor, mlp[:3](xs[2]))


def test_recorder_is_reusable(mlp):
    recorder = hs.record(mlp, ["0"])
    for _ in range(3):
        with recorder as rec:
            mlp(torch.randn(1, 4))
        assert rec.steps == 1 and len(rec.calls("0")) == 1
    assert_no_hooks(mlp)


def test_module_that_never_ran_is_reported():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(2, 2), nn.Linear(2, 2)

        def forward(self, x):
            return self.used(x)

    model = Branchy()
    with hs.record(model, ["used", "unused"]) as rec:
        model(torch.randn(1, 2))
    assert "never ran" in repr(rec)
    with pytest.raises(NotRecordedError, match="never ran"):
        rec["unused"]


def test_inputs_device_dtype_and_pick(mlp):
    x = torch.randn(3, 4)
    with hs.record(mlp, ["2"], inputs=True, device="cpu", dtype=torch.float16,
                   pick={"2": lambda out: out[:, :2]}) as rec:
        mlp(x)
    cap = rec["2"]
    with torch.no_grad():
        hidden = mlp[:2](x)
    assert cap.tensor.dtype == torch.float16 and cap.tensor.shape == (3, 2)
    assert torch.equal(cap.tensor, mlp[2](hidden)[:, :2].detach().half())
    assert torch.equal(cap.inputs[0], hidden.half()) and cap.kwargs == {}


def test_inputs_are_recorded_before_the_module_changes_them():
    class Scales(nn.Module):
        def forward(self, x):
            x.mul_(0)
            return x

    model, x = Scales(), torch.ones(2)
    with hs.record(model, [""], inputs=True) as rec:
        model(x)
    assert torch.equal(rec[""].inputs[0], torch.ones(2))


def test_integer_tensors_are_not_cast():
    emb = nn.Embedding(10, 3)
    with hs.record(emb, [""], inputs=True, dtype=torch.bfloat16) as rec:
        emb(torch.tensor([[1, 2]]))
    assert rec[""].inputs[0].dtype == torch.int64 and rec[""].tensor.dtype == torch.bfloat16
    assert rec[""].numpy().dtype.name == "float32"


def test_bad_arguments_are_clear(mlp):
    with pytest.raises(TypeError, match="nn.Module"):
        hs.record(mlp.state_dict(), ["0"])
    with pytest.raises(ModuleSelectionError, match="No module named '5'.*'4'"):
        hs.record(mlp, ["5"])
    with pytest.raises(ModuleSelectionError, match="not among the recorded"):
        hs.record(mlp, ["0"], calls={"2": ["a"]})
    with pytest.raises(TypeError, match="list of str labels"):
        hs.record(mlp, ["0"], calls={"0": "premise"})
    with pytest.raises(TypeError, match="floating"):
        hs.record(mlp, ["0"], dtype=torch.int8)
    with pytest.raises(TypeError, match="callable"):
        hs.record(mlp, ["0"], pick={"0": 3})
    assert_no_hooks(mlp)


def test_data_parallel_names_resolve_to_the_inner_model(mlp):
    # Where CUDA is available, DataParallel wants its module on cuda:0; one device id keeps
    # it to one replica (no threads).  Without CUDA it simply calls the module.
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    mlp = mlp.to(device)
    wrapped = nn.DataParallel(mlp, device_ids=[0] if device.type == "cuda" else None)
    x = torch.randn(2, 4, device=device)
    with hs.record(wrapped, ["2", "module.4"]) as rec:
        y = wrapped(x)
    with torch.no_grad():
        assert torch.equal(rec["2"].tensor, mlp[:3](x))
    assert torch.equal(rec["4"].tensor, y.detach())
    assert_no_hooks(wrapped)


def test_torch_compile_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(3, 4)
    try:
        compiled(x)
    except Exception as exc:  # pragma: no cover - depends on the machine's toolchain
        pytest.skip(f"torch.compile does not work here: {exc}")
    with hs.record(compiled, ["0", "_orig_mod.2"]) as rec:
        y = compiled(x)
    with torch.no_grad():
        assert torch.allclose(rec["0"].tensor, model[0](x))
    assert torch.allclose(rec["2"].tensor, y.detach())
    assert_no_hooks(model)


def test_clone_false_under_inference_mode_still_safe():
    """Inference tensors have no version counter: they are cloned even with clone=False."""
    model, x = AddsInPlace(), torch.randn(2, 3)
    with torch.inference_mode():
        expected = model.inner(x).clone()
        with hs.record(model, ["inner"], clone=False) as rec:
            model(x)
    assert torch.equal(rec["inner"].tensor, expected)


def test_compiled_model_still_compiled_after_the_block():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(2, 4)
    try:
        compiled(x)
    except Exception as exc:  # pragma: no cover
        pytest.skip(f"torch.compile does not work here: {exc}")
    with hs.record(compiled, ["0"]) as rec:
        compiled(x)
    assert len(rec.calls("0")) == 1
    assert torch.allclose(compiled(x), model(x))  # after the block: runs, no stale hook
    assert len(rec.calls("0")) == 1


class MaskedLayers(nn.Module):
    """Layers called as transformer layers are: ``layer(x, mask, None, scale=..., tag=...)``,
    returning a ``(batch, time, d)`` sequence; a pooler returns ``(batch, d)``."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Layer(), Layer()])
        self.pool = Pool()
        self.score = Score()

    def forward(self, x, attention_mask):
        for layer in self.layers:
            x = layer(x, attention_mask, None, scale=0.5, tag="t")
            x.add_(1.0)  # in place, after the hook: captures must not see it
        return self.pool(x, attention_mask) + self.score(x).sum()


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x, mask, cache, *, scale, tag):
        return self.lin(x) * mask[..., None] * scale


class Pool(nn.Module):
    def forward(self, x, mask):
        return (x * mask[..., None]).sum(1)


class Score(nn.Module):
    """``(batch, time)``: the mask's shape, and no sequence of vectors."""

    def forward(self, x):
        return x.sum(-1)


def test_calls_with_tensor_and_scalar_arguments_record_as_the_general_path_does():
    """The short path (arguments that are tensors, numbers, strings or None) gives what the
    general one gives (``inputs=True`` forces it): values before the in-place change, the
    model's mask where the output is (batch, time, features), none on a (batch, d) output,
    even one of the mask's shape."""
    torch.manual_seed(0)
    model = MaskedLayers().eval()
    x = torch.randn(3, 5, 6)
    mask = torch.ones(3, 5)
    mask[1, 3:] = 0
    names = ["layers.0", "layers.1", "pool", "score"]
    expected = {}

    def keep(name):
        return lambda m, a, k, out: expected.__setitem__(name, out.detach().clone())

    handles = [model.get_submodule(n).register_forward_hook(keep(n), with_kwargs=True)
               for n in names]
    with torch.no_grad():
        model(x, attention_mask=mask)
    for h in handles:
        h.remove()
    recs = []
    for options in ({}, {"inputs": True}):
        with torch.no_grad(), hs.record(model, names, **options) as rec:
            model(x, attention_mask=mask)
        recs.append(rec)
    for rec in recs:
        for n in names:
            assert torch.equal(rec[n].tensor, expected[n])
            assert rec[n].lengths is None
        for n in names[:2]:
            assert torch.equal(rec[n].mask, mask.bool())
        assert rec["pool"].mask is None
        assert rec["score"].tensor.shape == mask.shape and rec["score"].mask is None
    assert_no_hooks(model)


_CAPTURE_FIELDS = ("name", "step", "call", "label", "module_type", "batch_dim", "feature_map",
                   "channels_last", "rnn_state", "bidirectional", "live")


def _same_captures(short: hs.Recording, general: hs.Recording, names: list[str]) -> None:
    for n in names:
        a, b = short.calls(n), general.calls(n)
        assert len(a) == len(b) > 0
        for x, y in zip(a, b, strict=True):
            for field in _CAPTURE_FIELDS:
                assert getattr(x, field) == getattr(y, field), (n, field)
            assert torch.equal(x.tensor, y.tensor)
            for field in ("mask", "lengths"):
                u, v = getattr(x, field), getattr(y, field)
                assert (u is None) == (v is None), (n, field)
                assert u is None or torch.equal(u, v), (n, field)
            assert (x._other_mask is None) == (y._other_mask is None), n


@pytest.mark.parametrize("batch,time", [(3, 7), (4, 4)])
def test_the_short_path_records_a_padded_transformer_as_the_general_path(bert, batch, time):
    """BERT's layers take the short path (a mask that fits, an entry scope, the pooler's
    (batch, d)); ``inputs=True`` forces the general one: both record the same, also where
    the batch and the time steps are as many (the mask cannot tell them apart)."""
    ids = torch.randint(1, 100, (batch, time))
    mask = torch.ones(batch, time, dtype=torch.long)
    mask[0, time // 2:] = 0
    names = ["embeddings", "encoder.layer.0", "encoder.layer.2", "pooler"]
    recs = []
    for options in ({}, {"inputs": True}):
        with torch.no_grad(), hs.record(bert, names, **options) as rec:
            bert(input_ids=ids, attention_mask=mask)
        recs.append(rec)
    _same_captures(*recs, names)
    if batch != time:
        assert torch.equal(recs[0]["encoder.layer.2"].mask, mask.bool())
    assert_no_hooks(bert)


def test_the_short_path_records_feature_maps_and_channels_last_as_the_general_path():
    """Outputs without a mask: a 1-D feature map (Conv1d), channels last (a Linear on
    (batch, h, w, c)), a (batch, d) vector, with and without a mask in the call."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(3, 5, 3, padding=1)
            self.mix = nn.Linear(5, 5)
            self.head = nn.Linear(5, 2)

        def forward(self, x, attention_mask=None):
            y = self.conv(x)  # (batch, 5, length)
            grid = self.mix(y.transpose(1, 2).reshape(x.shape[0], 2, -1, 5))  # 4-D, last
            return self.head(grid.mean((1, 2)))

    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 6)
    names = ["conv", "mix", "head"]
    for call_kwargs in ({}, {"attention_mask": torch.ones(2, 6, dtype=torch.long)}):
        recs = []
        for options in ({}, {"inputs": True}):
            with torch.no_grad(), hs.record(model, names, **options) as rec:
                model(x, **call_kwargs)
            recs.append(rec)
        _same_captures(*recs, names)
        assert recs[0]["conv"].feature_map and recs[0]["mix"].channels_last
    assert_no_hooks(model)


def test_the_short_path_agrees_with_the_general_path_on_a_scope_of_another_batch():
    """A part called with its own mask of another batch (documents cut into chunks): where
    the chunk mask's shape is the pass's (time, batch), the short path and the general one
    (``inputs=True``) decide the layout alike."""

    class Chunks(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 8)
            self.layer = nn.Linear(8, 8)

        def forward(self, input_ids, attention_mask=None):
            return self.layer(self.emb(input_ids))

    class Doc(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = Chunks()
            self.head = nn.Linear(8, 8)

        def forward(self, input_ids, attention_mask=None):
            b, n = input_ids.shape
            return self.head(self.enc(input_ids.reshape(b * 3, n // 3),
                                      attention_mask=attention_mask.reshape(b * 3, n // 3)))

    torch.manual_seed(0)
    model = Doc().eval()
    ids = torch.randint(1, 50, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, 5] = 0
    names = ["enc.layer", "enc", "head"]
    recs = []
    for options in ({}, {"inputs": True}):
        with torch.no_grad(), hs.record(model, names, **options) as rec:
            model(input_ids=ids, attention_mask=mask)
        recs.append(rec)
    _same_captures(*recs, names)
    assert_no_hooks(model)



def test_a_logit_lens_in_a_block_of_its_own_takes_no_mask():
    """What docs/recording.md advises for calls made after a forward pass: in the pass's own
    block they count as its further calls (with its mask); in a block of their own they are
    step 0 without a mask, each value the module's output."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2,
                                     n_positions=16)
    model = transformers.GPT2Model(config).eval()
    ids = torch.randint(0, 50, (3, 5))
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[0, 3:] = 0
    with torch.no_grad(), hs.record(model, ["ln_f"]) as rec:
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert torch.equal(rec["ln_f"].mask, mask.bool())
    with torch.no_grad(), hs.record(model, ["ln_f"]) as lens:
        want = [model.ln_f(h) for h in out.hidden_states[:-1]]
    got = lens.calls("ln_f")
    assert [(c.step, c.call, c.mask) for c in got] == [(0, 0, None), (0, 1, None)]
    for c, w in zip(got, want, strict=True):
        assert torch.equal(c.tensor, w)
