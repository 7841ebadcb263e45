"""Analysis and export speed, against the baselines they replace (measured in the same run).

    python benchmarks/analysis.py            # full sizes (a few minutes on 2 CPU cores)
    python benchmarks/analysis.py --quick    # tiny sizes, seconds (run by the test suite)

- nearest_neighbors (cosine, k=10) vs the bare matrix products over the same query blocks (the
  compute floor) and vs scipy ``cdist`` + ``argsort`` (timed on a slice of the queries and
  scaled, since the full distance matrix would need 20 GB); peak RSS measured in a child
  process.
- linear_cka vs a plain NumPy formula (tall: more items than features).
- CKA at scale (wide layers, fewer items than features): linear_cka vs the bare NumPy Gram
  form, and similarity_matrix of six representations vs six bare centred Gram matrices and
  15 inner products; the feature-space formula for comparison (full run only).
- Recording.to_frame("wide") vs ``pd.DataFrame(array)``; ``kind="long"`` in values per second
  vs a naive pandas construction.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch
from _common import print_table  # benchmarks/ is on sys.path when run

import hookscope as hs
from hookscope.analysis import _BLOCK_ELEMENTS


def best_of(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def interleaved(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Best time of each function, run in turns (A B A B ...) so that load from other
    processes hits both alike: the ratios are what is reported."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return [min(t) for t in times]


_CHILD = """
import json, sys, numpy as np, hookscope as hs

def status(key):  # KiB; VmHWM is this process's peak RSS (getrusage's ru_maxrss would also
    # count the parent's pages copied by fork before exec)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key))

n, d, k = map(int, sys.argv[1:])
x = np.random.default_rng(0).standard_normal((n, d), dtype=np.float32)
hs.nearest_neighbors(x[:10], 2)  # load the libraries first
before = status("VmRSS:")
hs.nearest_neighbors(x, k)
print(json.dumps([before, status("VmHWM:")]))
"""


def knn(n: int, d: int, k: int, repeats: int) -> list[dict]:
    from scipy.spatial.distance import cdist

    x = np.random.default_rng(0).standard_normal((n, d), dtype=np.float32)
    xt = torch.from_numpy(x)
    unit = torch.nn.functional.normalize(xt, dim=1)
    block = max(1, _BLOCK_ELEMENTS // n)

    def floor() -> None:  # the same matrix products, nothing else
        for s in range(0, n, block):
            unit[s : s + block] @ unit.T

    ours = best_of(lambda: hs.nearest_neighbors(x, k), repeats)
    bare = best_of(floor, repeats)
    q = min(n, 1000)

    def scipy_slice() -> None:
        dist = cdist(x[:q], x, "cosine")
        np.fill_diagonal(dist[:, :q], np.inf)
        np.argsort(dist, axis=1)[:, :k]

    scipy_time = best_of(scipy_slice, 1 if n > 10_000 else repeats) * n / q
    sklearn_rows = []
    try:
        from sklearn.neighbors import NearestNeighbors

        index = NearestNeighbors(n_neighbors=k + 1, algorithm="brute", metric="cosine").fit(x)
        sk_time = best_of(lambda: index.kneighbors(x[:q]), 1 if n > 10_000 else repeats) * n / q
        sklearn_rows = [{"what": f"scikit-learn brute NearestNeighbors (timed on {q} queries, "
                                 "scaled)", "seconds": sk_time, "ratio": sk_time / ours,
                         "note": "scikit-learn / hookscope"}]
    except ImportError:
        sklearn_rows = [{"what": "scikit-learn: not installed, skipped", "seconds": None}]
    done = subprocess.run([sys.executable, "-c", _CHILD, str(n), str(d), str(k)],
                          capture_output=True, text=True, check=True)
    rss_before, rss_after = json.loads(done.stdout.strip().splitlines()[-1])
    return [
        {"what": f"nearest_neighbors {n} x {d}, k={k}, cosine", "seconds": ours},
        {"what": "bare matrix products, same blocks (floor)", "seconds": bare,
         "ratio": ours / bare, "note": "hookscope / floor"},
        {"what": f"scipy cdist + argsort (timed on {q} queries, scaled)", "seconds": scipy_time,
         "ratio": scipy_time / ours, "note": "scipy / hookscope"},
        *sklearn_rows,
        {"what": "peak RSS of a process running only nearest_neighbors", "seconds": None,
         "MiB": rss_after / 1024,
         "note": f"before the call {rss_before / 1024:.0f} MiB with libraries and the "
                 f"{x.nbytes / 2**20:.0f} MiB of data"},
    ]


def cka(n: int, d: int, repeats: int) -> list[dict]:
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((n, d)), rng.standard_normal((n, d))

    def numpy_cka() -> float:
        xc, yc = x - x.mean(0), y - y.mean(0)
        return np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc)
                                                 * np.linalg.norm(yc.T @ yc))

    ours = best_of(lambda: hs.linear_cka(x, y), repeats)
    ref = best_of(numpy_cka, repeats)
    return [{"what": f"linear_cka {n} x {d} (float64)", "seconds": ours},
            {"what": "plain NumPy formula", "seconds": ref, "ratio": ref / ours,
             "note": "numpy / hookscope"}]


def _bare_gram(x: np.ndarray) -> np.ndarray:
    xc = x - x.mean(0)
    return xc @ xc.T  # NumPy computes A @ A.T with one symmetric product (syrk)


def cka_wide(n: int, d: int, repeats: int, feature_form: bool) -> list[dict]:
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((n, d)), rng.standard_normal((n, d))

    def bare() -> float:
        k, l_ = _bare_gram(x), _bare_gram(y)
        return float(np.vdot(k, l_) / np.sqrt(np.vdot(k, k) * np.vdot(l_, l_)))

    ours, ref = interleaved([lambda: hs.linear_cka(x, y), bare], repeats)
    assert abs(hs.linear_cka(x, y) - bare()) < 1e-9
    rows = [{"what": f"linear_cka {n} x {d} (float64, Gram form)", "seconds": ours},
            {"what": "bare NumPy Gram form", "seconds": ref, "ratio": ours / ref,
             "note": "hookscope / bare (target <= 1.5)"}]
    if feature_form:
        def features() -> float:
            xc, yc = x - x.mean(0), y - y.mean(0)
            return np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc)
                                                     * np.linalg.norm(yc.T @ yc))

        slow = best_of(features, 1)
        rows.append({"what": "NumPy feature-space formula (d x d products)", "seconds": slow,
                     "ratio": slow / ours, "note": "feature form / hookscope"})
    return rows


def similarity_wide(m: int, n: int, d: int, repeats: int) -> list[dict]:
    rng = np.random.default_rng(1)
    reps = {f"r{i}": rng.standard_normal((n, d)) for i in range(m)}

    def bare() -> np.ndarray:
        grams = [_bare_gram(r) for r in reps.values()]
        norms = [np.sqrt(np.vdot(g, g)) for g in grams]
        out = np.eye(m)
        for i in range(m):
            for j in range(i + 1, m):
                out[i, j] = out[j, i] = np.vdot(grams[i], grams[j]) / (norms[i] * norms[j])
        return out

    ours, ref = interleaved([lambda: hs.similarity_matrix(reps), bare], repeats)
    assert np.allclose(hs.similarity_matrix(reps).to_numpy(), bare(), atol=1e-12)
    return [{"what": f"similarity_matrix of {m} x ({n} x {d}), CKA", "seconds": ours},
            {"what": f"bare NumPy: {m} centred Grams + {m * (m - 1) // 2} inner products",
             "seconds": ref, "ratio": ours / ref, "note": "hookscope / bare (target <= 1.5)"}]


def frames(rows: int, units: int, seq: tuple[int, int, int], repeats: int) -> list[dict]:
    ident = torch.nn.Identity()
    big = torch.randn(rows, units)
    with hs.record(ident, [""]) as rec:
        ident(big)
    array = big.numpy()
    wide = best_of(lambda: rec.to_frame(), repeats)
    plain = best_of(lambda: pd.DataFrame(array), repeats)
    three = torch.nn.ModuleList([torch.nn.Identity() for _ in range(3)])
    parts = big.split(units // 3, dim=1)
    with hs.record(three, ["0", "1", "2"]) as rec3:
        for module, part in zip(three, parts, strict=True):
            module(part)
    wide3 = best_of(lambda: rec3.to_frame(), repeats)

    b, t, u = seq
    lstm_like = torch.randn(b, t, u)
    lengths = torch.randint(5, t + 1, (b,))
    packed = torch.nn.utils.rnn.pack_padded_sequence(lstm_like, lengths, batch_first=True,
                                                     enforce_sorted=False)
    with hs.record(ident, [""]) as seq_rec:
        ident(packed)
    cap = seq_rec[""]
    values = int(lengths.sum()) * u
    long_t = best_of(lambda: cap.to_frame(kind="long"), repeats)

    def naive() -> pd.DataFrame:  # what one writes without hookscope: a row per value
        arr = cap.tensor.numpy()
        rows_ = [(i, p, j, arr[i, p, j]) for i in range(b) for p in range(int(lengths[i]))
                 for j in range(u)]
        return pd.DataFrame(rows_, columns=["example", "position", "unit", "value"])

    naive_t = best_of(naive, 1)
    return [
        {"what": f"to_frame('wide') {rows} x {units} float32", "seconds": wide},
        {"what": "pd.DataFrame(array) alone", "seconds": plain, "ratio": wide / plain,
         "note": "hookscope / pandas: zero copy"},
        {"what": f"to_frame('wide'), the same {rows} x {units} from 3 modules", "seconds": wide3,
         "ratio": wide3 / plain, "note": "hookscope / pandas: one concatenation"},
        {"what": f"to_frame('long') {b} x {t} x {u} (padding excluded)", "seconds": long_t,
         "values_per_s": values / long_t},
        {"what": "naive pandas rows", "seconds": naive_t, "ratio": naive_t / long_t,
         "note": "naive / hookscope"},
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only-cka", action="store_true", help="only the CKA-at-scale rows")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.quick:
        results = (knn(2_000, 64, 10, 2) + cka(500, 32, 2) + cka_wide(100, 2_048, 2, True)
                   + similarity_wide(3, 200, 512, 2) + frames(2_000, 240, (8, 10, 16), 2))
    elif args.only_cka:
        results = cka_wide(500, 16_384, 5, True) + similarity_wide(6, 2_000, 4_096, 5)
    else:
        results = (knn(50_000, 600, 10, 2) + cka(10_000, 600, 3)
                   + cka_wide(500, 16_384, 5, True) + similarity_wide(6, 2_000, 4_096, 5)
                   + frames(100_000, 2_400, (64, 40, 600), 3))
    print_table(results)
    if args.json:
        import os
        import platform

        info = {"torch": torch.__version__, "numpy": np.__version__, "pandas": pd.__version__,
                "threads": torch.get_num_threads(), "quick": args.quick,
                "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                "python": sys.version.split()[0]}
        with open(args.json, "w") as f:
            json.dump({"machine": info, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


