"""Activation checkpointing re-runs modules inside ``backward()``: a re-run is never a call of
its own, gets its call's edit, and brings its call's gradient; what cannot be matched is an
error or a warning.  The reference is the same model without checkpointing, with hand-written
hooks that edit and ``retain_grad``."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.utils.checkpoint as checkpoint
from torch import nn

import hookscope as hs
from hookscope.errors import HookscopeError
from tests.conftest import assert_no_hooks

MODES = ["reentrant", "non-reentrant"]


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.act = nn.Tanh()
        self.out = nn.Linear(d, d)

    def forward(self, x):
        return x + self.out(self.act(self.lin(x)))


class Net(nn.Module):
    """Each block checkpointed (``mode``), or not (``None``)."""

    def __init__(self, mode: str | None, d: int = 6, n: int = 3, shared: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(4, d)
        block = Block(d)
        self.blocks = nn.ModuleList([block if shared else Block(d) for _ in range(n)])
        self.head = nn.Linear(d, 2)
        self.mode = mode

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h) if self.mode is None else checkpoint.checkpoint(
                b, h, use_reentrant=self.mode == "reentrant")
        return self.head(h)


def shifted(out):
    """An edit: a column set, another scaled (the graph through the rest is kept)."""
    out = out.clone()
    out[:, 1] = 3.0
    out[:, 2] = out[:, 2] * -2
    return out


def reference(model, x, names, edit=None):
    """Hand-written hooks on the model without checkpointing: values, gradients of the
    outputs (retain_grad) and of the parameters."""
    model = copy.deepcopy(model)
    model.mode = None
    modules = dict(model.named_modules())
    kept = {}

    def hook(name):
        def run(m, args, out):
            if edit and name in edit:
                out = edit[name](out)
            if out.requires_grad:
                out.retain_grad()
            kept.setdefault(name, []).append(out)
            return out
        return run

    handles = [modules[n].register_forward_hook(hook(n)) for n in {*names, *(edit or {})}]
    model(x).pow(2).sum().backward()
    for h in handles:
        h.remove()
    return kept, {n: p.grad for n, p in model.named_parameters()}


def close(a, b):
    return a is not None and b is not None and torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_a_re_run_is_no_call_and_brings_its_calls_gradient(mode):
    torch.manual_seed(0)
    model, x = Net(mode), torch.randn(5, 4, requires_grad=mode == "reentrant")
    names = ["blocks.0", "blocks.1.lin", "blocks.1.act", "head"]
    kept, _ = reference(model, x, names)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no warning: every gradient arrives)
        with hs.record(model, names, grads=True) as rec:
            model(x).pow(2).sum().backward()
    for name in names:
        calls = rec.calls(name)
        assert len(calls) == 1, name  # a re-run was a second call
        assert close(calls[0].tensor, kept[name][0].detach())
        assert close(calls[0].grad, kept[name][0].grad), name  # (reentrant: was None)
    assert rec.to_frame(values="value*grad").shape[0] == 5
    assert_no_hooks(model)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("target", ["blocks.1.act", "blocks.1"])
def test_an_edit_is_applied_to_its_re_run(mode, target):
    """Without the edit on the re-run, the gradients are those of an unedited forward."""
    torch.manual_seed(0)
    model, x = Net(mode), torch.randn(5, 4, requires_grad=mode == "reentrant")
    kept, params = reference(model, x, ["blocks.1.lin"], edit={target: shifted})
    for edit in (shifted, [shifted], hs.at((), shifted)):
        fresh = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with hs.record(fresh, ["blocks.1.lin"], edit={target: edit}, grads=True) as rec:
                fresh(x).pow(2).sum().backward()
        for name, p in fresh.named_parameters():
            assert close(p.grad, params[name]), name
        assert close(rec["blocks.1.lin"].grad, kept["blocks.1.lin"][0].grad)


def test_hs_patch_is_applied_to_its_re_run():
    torch.manual_seed(0)
    model, x = Net("non-reentrant"), torch.randn(5, 4)
    source = torch.randn(5, 6)
    _, params = reference(model, x, [], edit={"blocks.1.act": lambda out: source.clone()})
    with hs.patch(model, {"blocks.1.act": source}):
        model(x).pow(2).sum().backward()
    for name, p in model.named_parameters():
        if params[name] is None:
            assert p.grad is None or not p.grad.any(), name
        else:
            assert close(p.grad, params[name]), name


@pytest.mark.parametrize("mode", MODES)
def test_a_call_dependent_edit_of_a_module_run_twice_is_an_error(mode):
    """The re-runs of one shared block cannot be matched to calls 0 and 1."""
    torch.manual_seed(0)
    model = Net(mode, n=2, shared=True)
    x = torch.randn(5, 4, requires_grad=mode == "reentrant")
    with hs.record(model, [], edit={"blocks.0.act": [shifted, None]}):
        loss = model(x).pow(2).sum()
        with pytest.raises(HookscopeError, match="re-run inside backward.*cannot be matched"):
            loss.backward()
    assert_no_hooks(model)


@pytest.mark.parametrize("mode", MODES)
def test_one_edit_for_every_call_of_a_module_run_twice_is_applied(mode):
    torch.manual_seed(0)
    model = Net(mode, n=2, shared=True)
    x = torch.randn(5, 4, requires_grad=mode == "reentrant")
    _, params = reference(model, x, [], edit={"blocks.0.act": shifted})
    with hs.record(model, ["blocks.0.lin"], edit={"blocks.0.act": shifted}) as rec:
        model(x).pow(2).sum().backward()
    assert len(rec.calls("blocks.0.lin")) == 2
    for name, p in model.named_parameters():
        assert close(p.grad, params[name]), name


@pytest.mark.parametrize("mode", MODES)
def test_backward_after_the_block_of_an_edited_checkpointed_forward_warns(mode):
    torch.manual_seed(0)
    model, x = Net(mode), torch.randn(5, 4, requires_grad=mode == "reentrant")
    with pytest.warns(UserWarning, match="no backward.*reached them.*inside the block"):
        with hs.record(model, [], edit={"blocks.1.act": shifted}):
            loss = model(x).pow(2).sum()
    loss.backward()  # (runs; its gradients are what the warning said)


@pytest.mark.parametrize("mode", MODES)
def test_re_runs_of_a_forward_from_outside_the_block_are_an_error(mode):
    """A loss of a clean forward (before the block) and an edited one: the clean forward's
    re-run must not get the edit, and cannot be told from the edited one's."""
    torch.manual_seed(0)
    model, x = Net(mode), torch.randn(5, 4, requires_grad=mode == "reentrant")
    clean = model(x)
    with hs.record(model, [], edit={"blocks.1.act": shifted}):
        edited = model(x)
        with pytest.raises(HookscopeError, match="re-run 2 times inside one backward"):
            (edited - clean).pow(2).sum().backward()


@pytest.mark.parametrize("mode", MODES)
def test_gradient_accumulation_steps_get_their_own_gradients(mode):
    """Two forward passes in one block, each backed up: step k's re-run belongs to step k
    (matched by the value it reproduces where the module ran more than once)."""
    torch.manual_seed(0)
    model = Net(mode)
    xs = [torch.randn(5, 4, requires_grad=mode == "reentrant") for _ in range(2)]
    refs = [reference(model, x, ["blocks.1.lin"])[0]["blocks.1.lin"][0] for x in xs]
    with hs.record(model, ["blocks.1.lin"], grads=True) as rec:
        for x in xs:
            model(x).pow(2).sum().backward()
    calls = rec.calls("blocks.1.lin")
    assert [c.step for c in calls] == [0, 1]
    for c, ref in zip(calls, refs, strict=True):
        assert close(c.grad, ref.grad)


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing_enable.*:FutureWarning")
def test_hugging_face_gradient_checkpointing():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4,
                                     n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0)
    plain = transformers.GPT2LMHeadModel(config).train()
    ids = torch.randint(0, 50, (3, 7))
    names = ["transformer.h.1.mlp.c_fc", "transformer.h.1"]
    with hs.record(plain, names, grads=True, edit={"transformer.h.0.mlp.act": lambda t: t * 2}
                   ) as ref:
        plain(input_ids=ids, labels=ids).loss.backward()
    for reentrant in (True, False):
        model = copy.deepcopy(plain)
        model.zero_grad()
        model.gradient_checkpointing_enable({"use_reentrant": reentrant})
        with hs.record(model, names, grads=True,
                       edit={"transformer.h.0.mlp.act": lambda t: t * 2}) as rec:
            model(input_ids=ids, labels=ids).loss.backward()
        for name in names:
            assert len(rec.calls(name)) == 1
            assert close(rec[name].grad, ref[name].grad), (reentrant, name)
        for (name, p), (_, q) in zip(model.named_parameters(), plain.named_parameters(),
                                     strict=True):
            assert close(p.grad, q.grad), (reentrant, name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", MODES)
def test_re_runs_on_the_gpus_backward_thread_get_their_edit(mode):
    """CUDA's backward runs on a thread of its own: the re-run is still this block's."""
    torch.manual_seed(0)
    model = Net(mode).cuda()
    x = torch.randn(5, 4, device="cuda", requires_grad=mode == "reentrant")
    _, params = reference(model, x, [], edit={"blocks.1.act": shifted})
    with hs.record(model, ["blocks.1.lin"], edit={"blocks.1.act": shifted}, grads=True) as rec:
        model(x).pow(2).sum().backward()
    assert len(rec.calls("blocks.1.lin")) == 1 and rec["blocks.1.lin"].grad is not None
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, params[name], rtol=1e-4, atol=1e-5), name


@pytest.mark.parametrize("mode", MODES)
def test_a_checkpointed_forward_from_before_the_block_keeps_its_own_values(mode):
    """A loss of a checkpointed forward from before the block and of the block's (not
    checkpointed) edited forward: the earlier forward's re-run is not the block's call, and
    gets neither its edit nor its gradient slot."""
    torch.manual_seed(0)
    model = Net(None)
    x1 = torch.randn(5, 4, requires_grad=True)
    x2 = torch.randn(5, 4, requires_grad=True)
    reference_model = copy.deepcopy(model)
    kept = {}

    def hook(m, args, out):
        if torch.is_grad_enabled() and kept.get("on"):
            out = shifted(out)
            out.retain_grad()
            kept["out"] = out
            return out

    handle = reference_model.blocks[1].act.register_forward_hook(hook)
    reference_model.mode = mode
    first = reference_model(x1)
    reference_model.mode, kept["on"] = None, True
    second = reference_model(x2)
    kept["on"] = False  # (the first forward's re-run in backward stays unedited)
    (first + second).pow(2).sum().backward()
    handle.remove()
    model.mode = mode
    first = model(x1)
    model.mode = None
    with hs.record(model, ["blocks.1.act"], edit={"blocks.1.act": shifted}, grads=True) as rec:
        (first + model(x2)).pow(2).sum().backward()
    assert close(rec["blocks.1.act"].grad, kept["out"].grad)
    for (name, p), (_, q) in zip(model.named_parameters(), reference_model.named_parameters(),
                                 strict=True):
        assert close(p.grad, q.grad), name


def test_unsort_with_reentrant_checkpointing_sends_each_call_its_gradient():
    """Each call its own permutation: the re-run is matched to the call whose kept value it
    reproduces under that call's permutation."""
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
    wa, wb = nn.Linear(6, 1), nn.Linear(6, 1)
    model = nn.ModuleDict({"enc": enc, "wa": wa, "wb": wb})
    a, b = torch.randn(5, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    perms = [torch.tensor([3, 0, 4, 1, 2]), torch.tensor([1, 2, 0, 4, 3])]

    def loss(reentrant):
        f = enc if reentrant is None else (
            lambda x: checkpoint.checkpoint(enc, x, use_reentrant=reentrant))
        return (wa(f(a)) + 3 * wb(f(b)) ** 2).sum()

    grads = {}
    for reentrant in (None, True):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with hs.record(model, ["enc"], grads=True, unsort={"enc": perms}) as rec:
                loss(reentrant).backward()
        grads[reentrant] = [c.grad for c in rec.calls("enc")]
    for plain, checkpointed in zip(grads[None], grads[True], strict=True):
        assert close(checkpointed, plain)


class _Reversible(torch.autograd.Function):
    """A reversible layer's pattern (Reformer): the module runs without autograd in forward
    and again with autograd in backward."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.save_for_backward(x)
        ctx.layer = layer
        with torch.no_grad():
            return layer(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            out = ctx.layer(x)
            params = tuple(ctx.layer.parameters())
            grads = torch.autograd.grad(out, (x, *params), grad)
        for p, g in zip(params, grads[1:], strict=True):
            p.grad = g if p.grad is None else p.grad + g
        return grads[0], None


def test_a_module_re_run_by_an_autograd_function_gets_its_gradient_without_a_warning():
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    x = torch.randn(3, 4, requires_grad=True)
    out = layer[0](x)
    out.retain_grad()
    layer[1](out).pow(2).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (was: "ran without autograd ... stays None")
        with hs.record(layer, ["0"], grads=True) as rec:
            _Reversible.apply(x, layer).pow(2).sum().backward()
    assert len(rec.calls("0")) == 1 and close(rec["0"].grad, out.grad)


@pytest.mark.parametrize("mode", MODES)
def test_a_step_backed_up_after_the_block_warns_though_another_was_inside(mode):
    torch.manual_seed(0)
    model = Net(mode)
    xs = [torch.randn(5, 4, requires_grad=mode == "reentrant") for _ in range(2)]
    with pytest.warns(UserWarning, match="1 call.*no backward.*reached them"):
        with hs.record(model, [], edit={"blocks.1.act": shifted}):
            model(xs[0]).pow(2).sum().backward()
            later = model(xs[1]).pow(2).sum()
    del later


@pytest.mark.parametrize("mode", MODES)
def test_an_ablation_to_a_constant_with_backward_inside_does_not_warn(mode):
    torch.manual_seed(0)
    model, x = Net(mode), torch.randn(5, 4, requires_grad=mode == "reentrant")
    _, params = reference(model, x, [], edit={"blocks.1.out": torch.zeros_like})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with hs.record(model, [], edit={"blocks.1.out": torch.zeros_like}):
            model(x).pow(2).sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is None and params[name] is None) or close(p.grad, params[name]), name
