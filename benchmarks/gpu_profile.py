"""Where recording's time goes on a GPU: profiler tables and the stack of every host-device
synchronisation, for the cases of ``benchmarks/gpu.py`` that miss their targets.

    python benchmarks/gpu_profile.py            # on a CUDA machine (about a minute)
    python benchmarks/gpu_profile.py --quick    # tiny sizes; without CUDA a smoke run

Prints, for the story's BiLSTM with ``unsort=`` (on the GPU and with ``device="cpu"``), BERT
with ``device="cpu"`` and ``record_dataset``: the operators that take the most host time
(``torch.profiler``), and where in hookscope each synchronisation was asked for
(``torch.cuda.set_sync_debug_mode("warn")``).  Diagnostics, not figures: the figures are
``benchmarks/gpu.py``'s.
"""

from __future__ import annotations

import tempfile
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from _common import parse_args, raw_hooks  # benchmarks/ is on sys.path
from gpu import CUDA, bert, raw_unsort_hooks, start, story_on_device, token_batch

import hookscope as hs


def profile(title: str, fn: Callable[[], Any], runs: int, rows: int = 18) -> None:
    """The operators with the most host time over ``runs`` calls of ``fn`` (after a warm
    call)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fn()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(runs):
            fn()
        if CUDA:
            torch.cuda.synchronize()
    print(f"\n### {title}: {runs} calls, by host time\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def sync_sites(title: str, fn: Callable[[], Any]) -> None:
    """Each place a synchronisation is asked for during one call of ``fn``, with the frames
    of hookscope and of this script that led to it."""
    if not CUDA:
        return
    fn()
    torch.cuda.synchronize()
    sites: Counter = Counter()
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            original = warnings.showwarning

            def show(message, category, filename, lineno, file=None, line=None):
                frames = [f for f in traceback.extract_stack()[:-1]
                          if "hookscope" in f.filename or "benchmarks" in f.filename]
                sites[(str(message)[:80], " <- ".join(
                    f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}"
                    for f in reversed(frames[-5:])))] += 1

            warnings.showwarning = show
            fn()
            torch.cuda.synchronize()
            for w in caught:
                show(w.message, w.category, w.filename, w.lineno)
            warnings.showwarning = original
    finally:
        torch.cuda.set_sync_debug_mode(old)
    print(f"\n### synchronisations: {title}: {sum(sites.values())}\n")
    for (msg, where), n in sites.most_common(12):
        print(f"- {n}x {msg}\n    {where}")


def host_and_wall(variants: dict[str, Callable[[], Any]], runs: int
                  ) -> tuple[dict[str, float], dict[str, float]]:
    """Median host time per call (the time to queue the work) and wall time (with the wait
    for the GPU), variants interleaved: ``runs * 3`` calls of each, each timed call right
    after an untimed one of its own, in a new order each round (see _common.interleaved)."""
    import random
    import statistics
    import time

    host: dict[str, list[float]] = {k: [] for k in variants}
    wall: dict[str, list[float]] = {k: [] for k in variants}
    order, rng = list(variants), random.Random(0)
    for _ in range(runs * 3):
        rng.shuffle(order)
        for k in order:
            fn = variants[k]
            fn()
            if CUDA:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
            if CUDA:
                torch.cuda.synchronize()
            host[k].append(t1 - t0)
            wall[k].append(time.perf_counter() - t0)
    return ({k: statistics.median(v) for k, v in host.items()},
            {k: statistics.median(v) for k, v in wall.items()})


def host_times(title: str, variants: dict[str, Callable[[], Any]], runs: int) -> None:
    """The table of :func:`host_and_wall`.  Where the host is the bottleneck, what recording
    adds is the host difference.  Run before any profiler: a profiler leaves launches slower."""
    host, wall = host_and_wall(variants, runs)
    print(f"\n### host and wall time per call: {title}\n\n| variant | host | wall |\n"
          "|---|---:|---:|")
    for k in variants:
        print(f"| {k} | {host[k] * 1e6:.0f} us | {wall[k] * 1e6:.0f} us |")


def run_block(recorder: hs.Recorder, call: Callable[[], Any]) -> None:
    with recorder:
        call()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__, argv)
    if not start(args.quick, "gpu_profile.py"):
        return 0
    runs = 2 if args.quick else 10
    with torch.no_grad():
        model, b, sizes, names, options = story_on_device(args.quick)
        bmodel, bnames, forward, btitle = bert(args.quick)
        tb = token_batch(4, 16) if args.quick else token_batch(32, 128)
        # Host times first (a profiler leaves launches slower): the BiLSTM, and BERT in bf16
        # with 3, 6 and 12 layers recorded, where the H100 runs found 12 layers at 1.2x and 3
        # at 1.0x: the slope per hook, recorded against hand-written.
        r = hs.record(model, names, **options)
        raw_lstm = raw_hooks(model, names, lambda t: t.detach())
        unsorting = raw_unsort_hooks(model, b)
        host_times(f"BiLSTM ({sizes})", {
            "plain": lambda: model(b), "raw hooks (detach)": lambda: raw_lstm(lambda: model(b)),
            "raw hooks (index_select / clone)": lambda: unsorting(lambda: model(b)),
            "hs.record, unsort=": lambda: run_block(r, lambda: model(b))}, runs)
        raw12 = raw_hooks(bmodel, bnames, lambda t: t.detach().clone())
        r12 = hs.record(bmodel, bnames)
        host_times(f"{btitle}, fp32", {
            "plain": lambda: forward(tb),
            f"raw hooks + clone, {len(bnames)} layers": lambda: raw12(lambda: forward(tb)),
            f"hs.record, {len(bnames)} layers": lambda: run_block(r12, lambda: forward(tb))},
            runs)
        ac = (torch.autocast("cuda", dtype=torch.bfloat16) if CUDA
              else torch.autocast("cpu", enabled=False))
        with ac:
            variants: dict[str, Callable[[], Any]] = {"plain": lambda: forward(tb)}
            for k in dict.fromkeys(min(k, len(bnames)) for k in (3, 6, len(bnames))):
                some = bnames[:k]
                raw = raw_hooks(bmodel, some, lambda t: t.detach().clone())
                rec_k = hs.record(bmodel, some)
                variants[f"raw hooks + clone, {k} layers"] = (
                    lambda raw=raw: raw(lambda: forward(tb)))
                variants[f"hs.record, {k} layers"] = (
                    lambda rec_k=rec_k: run_block(rec_k, lambda: forward(tb)))
            host_times(f"{btitle}, bf16 autocast", variants, runs)
        for device in (None, "cpu"):
            r = hs.record(model, names, device=device, **options)
            title = f"BiLSTM ({sizes}), unsort=, device={device!r}"
            profile(title, lambda r=r: run_block(r, lambda: model(b)), runs)
            sync_sites(title, lambda r=r: run_block(r, lambda: model(b)))
        profile("BiLSTM plain forward", lambda: model(b), runs, rows=10)
        with ac:  # the default recorder, where the H100 run found it slower than raw hooks
            r12 = hs.record(bmodel, bnames)
            profile(f"{btitle}, bf16 autocast, hs.record", lambda: run_block(
                r12, lambda: forward(tb)), runs)
        r = hs.record(bmodel, bnames, device="cpu")
        profile(f"{btitle}, device='cpu'", lambda: run_block(r, lambda: forward(tb)), runs)
        sync_sites(f"{btitle}, device='cpu'", lambda: run_block(r, lambda: forward(tb)))

        batches = [token_batch(4 if args.quick else 64, 16 if args.quick else 128, seed=i)
                   for i in range(3 if args.quick else 8)]

        def dataset() -> None:
            with tempfile.TemporaryDirectory() as tmp:
                hs.record_dataset(bmodel, batches, bnames, f"{tmp}/ds", reduce="mean",
                                  forward=lambda m, x: forward(x), progress=False,
                                  setup_id="benchmarks/gpu_profile.py")
    profile(f"record_dataset, {len(batches)} batches", dataset, 1)
    sync_sites(f"record_dataset, {len(batches)} batches", dataset)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
