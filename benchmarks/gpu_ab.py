"""Two versions of hookscope in one process, interleaved: is a change faster on the GPU?

The GPU's figures move by several per cent between runs (and between machines of the same
kind), more than most changes to the hooks' host time; two runs of ``gpu.py`` cannot tell a
3 % gain from noise.  Here the working tree's ``hookscope`` and another copy of the package
(a commit's ``hookscope/`` folder, imported under another name) record the same model in the
same process, their calls interleaved with the plain forward and hand-written hooks that
clone: BERT-base (12 layers, fp32 and bf16 autocast) and the story's BiLSTM with ``unsort=``.
Each row gives the wall time per call (GPU work waited for), its ratio to the plain forward
per repeat, and the host time (the time to queue the work: where the host is the bottleneck,
what recording adds).

    git archive <commit> hookscope | tar -x -C /tmp/old    # the version to compare with
    python benchmarks/gpu_ab.py --old /tmp/old/hookscope   # on a CUDA machine

(On the device machine, put the old copy in a folder that travels: an ignored one named in
``carry``.)  ``--quick`` runs tiny sizes on the CPU, a smoke test.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from _common import interleaved, parse_args, raw_hooks
from gpu import CUDA, bert, raw_unsort_hooks, start, story_on_device, token_batch
from gpu_profile import host_and_wall

import hookscope as hs


def load_copy(folder: str, name: str = "hookscope_old") -> ModuleType:
    """The hookscope package in ``folder`` (its ``__init__.py``), imported as ``name``: its
    modules import each other relatively, so both versions live side by side."""
    path = Path(folder)
    if not (path / "__init__.py").is_file():
        raise SystemExit(f"--old {folder}: no hookscope package there (no __init__.py)")
    spec = importlib.util.spec_from_file_location(name, path / "__init__.py",
                                                  submodule_search_locations=[str(path)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def table(title: str, variants: dict[str, Callable[[], Any]], iterations: int,
          repeats: int) -> list[dict]:
    def timed(fn: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            fn()
            sync()
        return run

    walls = interleaved({k: timed(f) for k, f in variants.items()}, iterations, repeats,
                        settle=1, shuffle=True)
    host, _ = host_and_wall(variants, iterations * repeats // 3 or 1)
    plain_host = host["plain"]
    print(f"\n### {title}\n")
    print("| variant | wall per call | ratio to plain (per repeat) | host | host - plain |")
    print("|---|---:|---|---:|---:|")
    rows = []
    for k, ts in walls.items():
        per = [t / p for t, p in zip(ts, walls["plain"], strict=True)]
        print(f"| {k} | {statistics.median(ts) * 1e3:.2f} ms | "
              f"{statistics.median(per):.3f}x ({', '.join(f'{r:.3f}' for r in per)}) | "
              f"{host[k] * 1e6:.0f} us | {(host[k] - plain_host) * 1e6:+.0f} us |")
        rows.append({"case": title, "variant": k, "seconds": ts, "ratios": per,
                     "host_seconds": host[k]})
    return rows


def main(argv: list[str] | None = None) -> int:
    def more(p: Any) -> None:
        p.add_argument("--old", required=True, help="the other version's hookscope/ folder")

    args = parse_args(__doc__, argv, more)
    if not start(args.quick, "gpu_ab.py"):
        return 0
    old = load_copy(args.old)
    iterations, repeats = (2, 1) if args.quick else (20, args.repeats)

    def block(recorder: Any, forward: Callable[[Any], Any], batch: Any) -> None:
        with recorder:
            forward(batch)

    with torch.no_grad():
        model, names, forward, title = bert(args.quick)
        b = token_batch(4, 16) if args.quick else token_batch(32, 128)
        raw = raw_hooks(model, names, lambda t: t.detach().clone())
        this, other = hs.record(model, names), old.record(model, names)
        variants = {"plain": lambda: forward(b),
                    "raw hooks + clone": lambda: raw(lambda: forward(b)),
                    "hs.record (this tree)": lambda: block(this, forward, b),
                    "hs.record (--old)": lambda: block(other, forward, b)}
        table(f"{title}, {len(names)} layers, fp32", variants, iterations, repeats)
        if CUDA:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                table(f"{title}, {len(names)} layers, bf16 autocast", variants, iterations,
                      repeats)
        lstm, lb, sizes, names, options = story_on_device(args.quick)
        unsorting = raw_unsort_hooks(lstm, lb)
        this, other = hs.record(lstm, names, **options), old.record(lstm, names, **options)
        variants = {"plain": lambda: lstm(lb),
                    "raw hooks (index_select / clone)": lambda: unsorting(lambda: lstm(lb)),
                    "hs.record (this tree)": lambda: this.run(lb),
                    "hs.record (--old)": lambda: other.run(lb)}
        table(f"story's BiLSTM ({sizes}), unsort=", variants, iterations, repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
