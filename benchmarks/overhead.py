"""Overhead of recording, as ratios to a plain forward measured in the same run.

    python benchmarks/overhead.py            # full sizes (minutes on 2 CPU cores)
    python benchmarks/overhead.py --quick    # tiny sizes, seconds (run by the test suite)
    python benchmarks/overhead.py --cases intervene   # only edit= and grads=True
    python benchmarks/overhead.py --cases tiny        # only the tiny MLP (fixed cost per call)

Variants are interleaved (A B C A B C ...) within each repeat so that drift of the machine hits
all of them alike; each repeat reports medians, and the table shows the median over repeats.
Results go to stdout as a Markdown table and, with --json PATH, to a JSON file with machine info.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from collections.abc import Callable

import torch
from _common import interleaved, parse_args, raw_hooks, story_batch  # benchmarks/ is on sys.path
from torch import nn

import hookscope as hs

Variant = Callable[[], object]


def nli_case(quick: bool) -> tuple[str, dict[str, Variant]]:
    model, b, sizes = story_batch(quick)
    names = ["encoder", "pooling", "aggregation"]
    raw = raw_hooks(model, names)
    options = {"calls": {"encoder": ["premise", "hypothesis"],
                         "pooling": ["premise", "hypothesis"]},
               "unsort": {"encoder": [b.premise_orig_idx, b.hypothesis_orig_idx]}}
    recorder = hs.record(model, names, **options)
    lazy = hs.record(model, names, clone="lazy", **options)
    return (f"BiLSTM NLI ({sizes}, lengths 5-40)", {
                "plain forward": lambda: model(b),
                "raw hooks (detach)": lambda: raw(lambda: model(b)),
                "hookscope.record, 3 modules": lambda: recorder.run(b),
                'hookscope.record, clone="lazy"': lambda: lazy.run(b),
            })


def transformer_case(quick: bool) -> tuple[str, dict[str, Variant]]:
    d, layers, batch, seq = (64, 6, 4, 16) if quick else (384, 6, 32, 128)
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d, nhead=6 if d % 6 == 0 else 4, dim_feedforward=4 * d,
                                       batch_first=True)
    model = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).eval()
    x = torch.randn(batch, seq, d)
    names = ["layers.0", "layers.3", "layers.5"]
    raw = raw_hooks(model, names)
    recorder = hs.record(model, names)
    lazy = hs.record(model, names, clone="lazy")
    first = hs.record(model, ["layers.0"], stop=True)
    return (f"TransformerEncoder ({layers} layers, d_model {d}, batch {batch} x {seq})", {
        "plain forward": lambda: model(x),
        "raw hooks (detach)": lambda: raw(lambda: model(x)),
        "hookscope.record, 3 modules": lambda: recorder.run(x),
        'hookscope.record, clone="lazy"': lambda: lazy.run(x),
        "hookscope stop=True, layer 0 of 6": lambda: first.run(x),
    })


def numpy_case(quick: bool) -> tuple[str, dict[str, Variant]]:
    """A CNN fed NumPy data (torch.from_numpy): its Flatten output is a view of the caller's
    memory, which copy-on-write cannot share: hookscope copies it."""
    import numpy as np

    batch, size = (4, 16) if quick else (64, 64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3),
                          nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(256, 10)).eval()
    data = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
    names = ["0", "2", "4"]
    raw = raw_hooks(model, names)
    recorder = hs.record(model, names)
    lazy = hs.record(model, names, clone="lazy")
    return (f"CNN fed torch.from_numpy (batch {batch}, 3 x {size} x {size})", {
        "plain forward": lambda: model(torch.from_numpy(data)),
        "raw hooks (detach)": lambda: raw(lambda: model(torch.from_numpy(data))),
        "hookscope.record, 3 modules": lambda: recorder.run(torch.from_numpy(data)),
        'hookscope.record, clone="lazy"': lambda: lazy.run(torch.from_numpy(data)),
    })


def nested_case(quick: bool) -> tuple[str, dict[str, Variant]]:
    """nn.TransformerEncoder's fast path with a padding mask: layers return nested tensors."""
    d, layers, batch, seq = (32, 2, 4, 16) if quick else (256, 4, 32, 128)
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d, nhead=4, dim_feedforward=4 * d, batch_first=True)
    model = nn.TransformerEncoder(layer, layers).eval()
    x = torch.randn(batch, seq, d)
    lengths = torch.randint(seq // 4, seq + 1, (batch,), generator=torch.Generator().manual_seed(0))
    pad = torch.arange(seq)[None, :] >= lengths[:, None]
    names = [f"layers.{i}" for i in range(layers)]
    raw = raw_hooks(model, names)
    recorder = hs.record(model, names)
    return (f"TransformerEncoder fast path, nested outputs ({layers} x d {d}, {batch} x {seq})", {
        "plain forward": lambda: model(x, src_key_padding_mask=pad),
        "raw hooks (detach)": lambda: raw(lambda: model(x, src_key_padding_mask=pad)),
        "hookscope.record, all layers": lambda: recorder.run(x, src_key_padding_mask=pad),
    })


def tiny_case(quick: bool) -> tuple[str, dict[str, Variant]]:
    """Each measurement is a loop of LOOP calls (reported per call), so that the variant that
    keeps one record block open across calls does not leave hooks on during the others."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)).eval()
    x = torch.randn(4, 16)
    names = ["0", "1", "2"]
    raw = raw_hooks(model, names)
    recorder = hs.record(model, names)

    def loop(fn: Callable[[], object]) -> Variant:
        def run() -> None:
            for _ in range(TINY_LOOP):
                fn()
        return run

    def new_record_per_call() -> None:
        with hs.record(model, names):
            model(x)

    def one_block() -> None:  # one record block around the loop: each forward is a step
        with hs.record(model, names) as rec:
            for _ in range(TINY_LOOP):
                model(x)
        assert rec.steps == TINY_LOOP

    def raw_once_clone(count_steps: bool) -> Variant:
        """The floor: hand-written hooks registered once, cloning; with ``count_steps``, plus
        a model pre-hook counting forward passes (what any recorder must know to tell a module
        called twice from two passes)."""
        def run() -> None:
            store: list = []
            steps = [0]

            def new_step(m: nn.Module, args: tuple, kwargs: dict) -> None:
                steps[0] += 1

            handles = [model[int(n)].register_forward_hook(
                lambda m, i, o: store.append(o.detach().clone())) for n in names]
            if count_steps:
                handles.append(model.register_forward_pre_hook(new_step, with_kwargs=True))
            try:
                for _ in range(TINY_LOOP):
                    model(x)
            finally:
                for h in handles:
                    h.remove()
        return run

    return (f"tiny MLP (3 x Linear(16, 16), batch 4), per call, loops of {TINY_LOOP}", {
        "plain forward": loop(lambda: model(x)),
        "raw hooks registered+removed per call": loop(lambda: raw(lambda: model(x))),
        "raw hooks registered once, clone": raw_once_clone(count_steps=False),
        "the same + a model pre-hook counting forward passes": raw_once_clone(count_steps=True),
        "hookscope.record(...) per call": loop(new_record_per_call),
        "one Recorder, run() per call": loop(lambda: recorder.run(x)),
        "one record block, a step per call": one_block,
    })


TINY_LOOP = 100


# -- edit= and grads=True against hand-written hooks doing the same (autograd on) -----------


def _models(quick: bool) -> list[tuple[str, nn.Module, Callable[[], object], list[str], dict]]:
    """The two real-size models: the story's BiLSTM (edits and gradients through unsort=) and
    a 6-layer transformer encoder."""
    nli, b, sizes = story_batch(quick)
    d, batch, seq = (64, 4, 16) if quick else (384, 32, 128)
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d, nhead=4, dim_feedforward=4 * d, batch_first=True,
                                       dropout=0.0)
    enc = nn.TransformerEncoder(layer, 6, enable_nested_tensor=False).eval()
    x = torch.randn(batch, seq, d)
    perms = [b.premise_orig_idx, b.hypothesis_orig_idx]
    return [
        (f"BiLSTM NLI ({sizes}), encoder x 2 calls, unsort=", nli, lambda: nli(b), ["encoder"],
         {"calls": {"encoder": ["premise", "hypothesis"]}, "unsort": {"encoder": perms}},
         ),
        (f"TransformerEncoder (6 x d {d}, {batch} x {seq}), 3 layers", enc, lambda: enc(x),
         ["layers.0", "layers.3", "layers.5"], {}),
    ]


def hand_written(model: nn.Module, names: list[str], perms: list | None, grads: bool):
    """What a careful user writes, per call of each module: with ``grads=False``, put the
    batch in the caller's order, apply the (identity) edit, keep a clone, put it back in the
    model's order; with ``grads=True``, keep a clone and, in backward, the gradient (in the
    caller's order)."""
    modules = dict(model.named_modules())

    def run(call: Callable[[], object]) -> list:
        store: list = []
        counts = dict.fromkeys(names, 0)

        def make(name: str):
            def hook(m, i, o):
                k = counts[name]
                counts[name] += 1
                t = o[0] if isinstance(o, tuple) else o
                perm = None if perms is None else perms[k]
                if grads:
                    store.append((t if perm is None else t.index_select(0, perm)).detach()
                                 .clone())
                    t.register_hook(lambda g: store.append(
                        (g if perm is None else g.index_select(0, perm)).clone()))
                    return None
                if perm is not None:
                    t = t.index_select(0, perm)
                t = (lambda v: v)(t)  # the identity edit
                store.append(t.detach().clone())
                if perm is not None:
                    t = t.index_select(0, perm.argsort())
                return (t, *o[1:]) if isinstance(o, tuple) else t
            return hook

        handles = [modules[n].register_forward_hook(make(n)) for n in names]
        try:
            out = call()
            if grads:
                out.sum().backward()
        finally:
            for h in handles:
                h.remove()
        return store

    return run


def intervene_cases(quick: bool) -> list[tuple[str, dict[str, Variant]]]:
    cases = []
    for title, model, call, names, options in _models(quick):
        perms = options.get("unsort", {}).get("encoder")
        identity = {n: (lambda out: out) for n in names}
        edit = hs.record(model, names, edit=identity, **options)
        grads = hs.record(model, names, grads=True, **options)
        hand_edit = hand_written(model, names, perms, grads=False)
        hand_grads = hand_written(model, names, perms, grads=True)

        def edited(call=call, edit=edit) -> None:
            with edit:
                call()

        def with_grads(call=call, grads=grads) -> None:
            with grads:
                call().sum().backward()

        cases.append((f"{title}: edit= (identity), forward only", {
            "plain forward": call,
            "hand-written hooks: unsort, edit, clone, re-sort": lambda h=hand_edit, c=call: h(c),
            "hookscope.record(edit=identity)": edited,
        }))
        cases.append((f"{title}: grads=True, forward + backward", {
            "plain forward": lambda c=call: c().sum().backward(),
            "hand-written hooks: clone + tensor hook": lambda h=hand_grads, c=call: h(c),
            "hookscope.record(grads=True)": with_grads,
        }))
    return cases


def main(argv: list[str] | None = None) -> int:
    def cases(p: argparse.ArgumentParser) -> None:
        p.add_argument("--cases", nargs="+", default=["record", "intervene"],
                       choices=["record", "intervene", "tiny"],
                       help="record: recording overhead (inference); intervene: edit= and "
                            "grads=True against hand-written hooks (autograd on); tiny: only "
                            "the tiny MLP's fixed cost per forward")

    args = parse_args(__doc__, argv, cases)
    iters = {"tiny": 5, "nli": 5, "transformer": 5, "numpy": 5, "nested": 5} if args.quick \
        else {"tiny": 50, "nli": 15, "transformer": 8, "numpy": 15, "nested": 8}
    results: list[dict] = []

    def report(title: str, times: dict[str, list[float]]) -> None:
        base = times["plain forward"]
        print(f"\n### {title}\n\n| variant | median per call | ratio to plain (per repeat) |")
        print("|---|---:|---|")
        for name, ts in times.items():
            ratios = [t / b for t, b in zip(ts, base, strict=True)]
            med = statistics.median(ts)
            unit = f"{med * 1e3:.2f} ms" if med > 1e-3 else f"{med * 1e6:.1f} µs"
            print(f"| {name} | {unit} | {statistics.median(ratios):.3f}x "
                  f"({', '.join(f'{r:.3f}' for r in ratios)}) |")
            results.append({"case": title, "variant": name, "seconds": ts,
                            "ratio_to_plain": ratios})

    record_cases = (("nli", nli_case), ("transformer", transformer_case),
                    ("numpy", numpy_case), ("nested", nested_case), ("tiny", tiny_case))
    with torch.inference_mode():
        chosen = record_cases if "record" in args.cases else \
            [c for c in record_cases if c[0] == "tiny" and "tiny" in args.cases]
        for key, make in chosen:
            title, variants = make(args.quick)
            times = interleaved(variants, iters[key], args.repeats)
            if key == "tiny":
                times = {k: [t / TINY_LOOP for t in v] for k, v in times.items()}
            report(title, times)
    intervene = intervene_cases(args.quick) if "intervene" in args.cases else []
    for title, variants in intervene:  # autograd on: edits and gradients
        report(title, interleaved(variants, iters["transformer"], args.repeats))
    if args.json:
        info = {"python": sys.version.split()[0], "torch": torch.__version__,
                "threads": torch.get_num_threads(), "cpu": platform.processor() or
                platform.machine(), "cores": os.cpu_count(), "quick": args.quick,
                "hookscope": hs.__version__}
        with open(args.json, "w") as f:
            json.dump({"machine": info, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
