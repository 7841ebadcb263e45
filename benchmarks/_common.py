"""Shared by the benchmark scripts: interleaved timing and the results table."""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from typing import Any


def interleaved(variants: dict[str, Callable[[], Any]], iterations: int, repeats: int,
                warmup: int = 1, settle: int = 0, shuffle: bool = False
                ) -> dict[str, list[float]]:
    """Median seconds per call of each variant, one value per repeat.  Variants run in turn
    (A B C A B C ...) so that drift of the machine hits all of them alike.

    ``settle`` untimed calls of a variant come right before each timed one, so that a timed
    call follows its own kind, not whatever ran before it (on a GPU, the variant after one
    that copies 150 MB to pageable memory); ``shuffle`` draws a
    new order of the variants for each round (seeded: the same order on every machine)."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    order = list(variants)
    rng = random.Random(0)
    out: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(iterations):
            if shuffle:
                rng.shuffle(order)
            for name in order:
                fn = variants[name]
                for _ in range(settle):
                    fn()
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        for name, ts in times.items():
            out[name].append(statistics.median(ts))
    return out


def parse_args(doc: str, argv: list[str] | None,
               more: Callable[[argparse.ArgumentParser], None] | None = None
               ) -> argparse.Namespace:
    """``--quick`` (tiny sizes, for smoke tests), ``--json PATH``, ``--repeats N``, and what
    ``more`` adds."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--repeats", type=int, default=3)
    if more is not None:
        more(p)
    return p.parse_args(argv)


def print_table(results: list[dict]) -> None:
    """Markdown: measurement, time, and its figure (a ratio, a rate or a size)."""
    print("| measurement | time | figure |\n|---|---:|---|")
    for r in results:
        secs = "" if r.get("seconds") is None else f"{r['seconds']:.3f} s"
        figure = (f"{r['ratio']:.2f}x ({r['note']})" if "ratio" in r else
                  f"{r['values_per_s'] / 1e6:.1f} M values/s" if "values_per_s" in r else
                  f"{r['rows_per_s']:.0f} rows/s" if "rows_per_s" in r else
                  f"{r['MiB']:.0f} MiB" + (f" ({r['note']})" if "note" in r else "")
                  if "MiB" in r else "")
        print(f"| {r['what']} | {secs} | {figure} |")


def story_batch(quick: bool) -> tuple[Any, Any, str]:
    """The story's BiLSTM NLI model at benchmark size (vocab 20k, dim 300, hidden 300,
    batch 64) with a random batch of lengths 5-40, sorted by length as the story's vectoriser
    does.  Returns (model, batch, description)."""
    import torch

    from hookscope.examples.nli import NLIBatch, build_model

    vocab, dim, hidden, batch = (500, 32, 32, 8) if quick else (20_000, 300, 300, 64)
    model = build_model(vocab, dim, hidden, seed=0)
    g = torch.Generator().manual_seed(0)

    def side() -> tuple:
        lengths = torch.randint(5, 41, (batch,), generator=g)
        order = torch.argsort(lengths, descending=True, stable=True)
        ids = torch.randint(2, vocab, (batch, int(lengths.max())), generator=g)
        ids = ids * (torch.arange(ids.shape[1]) < lengths[:, None])
        return ids[order], lengths[order], torch.argsort(order)

    sizes = f"vocab {vocab}, dim {dim}, hidden {hidden}, batch {batch}"
    return model, NLIBatch(*side(), *side()), sizes


def raw_hooks(model: Any, names: list[str], keep: Callable[[Any], Any] | None = None
              ) -> Callable[[Callable[[], Any]], list]:
    """The hand-written way: ``register_forward_hook`` on ``names`` storing ``keep(output)``
    (default: the output detached where it is a tensor; given ``keep``, it gets the output's
    first tensor), run the call, remove the hooks."""
    import torch

    modules = dict(model.named_modules())

    def first(o: Any) -> Any:
        return o if torch.is_tensor(o) else first(o[0])

    def store_of(out: list) -> Callable[..., None]:
        if keep is None:
            return lambda m, i, o: out.append(o.detach() if torch.is_tensor(o) else o)
        return lambda m, i, o: out.append(keep(first(o)))

    def run(call: Callable[[], Any]) -> list:
        store: list = []
        hooked([(modules[n], store_of(store)) for n in names], call)
        return store

    return run


def hooked(hooks: list[tuple[Any, Callable[..., Any]]], call: Callable[[], Any]) -> None:
    """``call()`` with each ``(module, hook)`` registered as a forward hook, removed after."""
    handles = [m.register_forward_hook(fn) for m, fn in hooks]
    try:
        call()
    finally:
        for h in handles:
            h.remove()
