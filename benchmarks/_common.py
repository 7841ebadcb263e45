"""Shared by the benchmark scripts: interleaved timing and the results table."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def interleaved(variants: dict[str, Callable[[], Any]], iterations: int, repeats: int,
                warmup: int = 1) -> dict[str, list[float]]:
    """Median seconds per call of each variant, one value per repeat.  Variants run in turn
    (A B C A B C ...) so that drift of the machine hits all of them alike."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    out: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(iterations):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        for name, ts in times.items():
            out[name].append(statistics.median(ts))
    return out


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
