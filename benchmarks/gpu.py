"""Recording on a GPU, as ratios to the plain forward measured in the same run (issue 12).

    python benchmarks/gpu.py --json out.json   # on a CUDA machine (a few minutes)
    python benchmarks/gpu.py --quick           # tiny sizes; without CUDA a smoke run on the CPU

- BERT-base architecture (random weights; Hugging Face ``BertModel`` where transformers is
  installed, else ``nn.TransformerEncoder`` of the same shape), 12 layers recorded, batch
  32 x 128 with an attention mask, fp32 and bf16 autocast: plain; hand-written hooks that
  detach, that clone, that call ``.to("cpu")``; ``hs.record`` of 12 layers, of 3 layers,
  with ``device="cpu"``, and with ``stop=True`` after layer 0.
- The story's BiLSTM (batch 64) with ``unsort=``: plain, hand-written hooks that detach, and
  that make the copies the recorder makes (``index_select`` of the encoder's output, ``h`` and
  ``c``, clones of the rest), ``hs.record`` (on the GPU and with ``device="cpu"``).
- ``record_dataset`` of the 12 layers, ``reduce="mean"``, 40 batches of 64 x 128, against
  plain inference over the same batches (list and binary vector encodings; and with the model
  fingerprint hashed before the first batch, as until 8e152fd, against while the first
  batches run).
- Host-device synchronisations counted with ``torch.cuda.set_sync_debug_mode("warn")``: a
  recorded forward against the plain one (they must be equal).

Every call ends with ``torch.cuda.synchronize()``, so a time is the whole forward with its
copies.  Variants are interleaved in a new (seeded) order each round, each timed call right
after an untimed call of the same variant; medians per repeat, 3 repeats.
Prints the device name and the torch version; ``--json PATH`` writes every figure.
"""

from __future__ import annotations

import contextlib
import json
import platform
import statistics
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import torch
from _common import (  # benchmarks/ is on sys.path
    hooked,
    interleaved,
    parse_args,
    raw_hooks,
    story_batch,
)
from torch import nn

import hookscope as hs
from hookscope.offload import count_host_syncs

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> Callable[[], None]:
    """``fn`` and a wait for the GPU to finish it (its copies included)."""
    def run() -> None:
        fn()
        sync()
    return run


def bert(quick: bool) -> tuple[nn.Module, list[str], Callable[[Any], Any], str]:
    """(model, the 12 layer names, forward(batch), description)."""
    layers, d, heads = (2, 64, 4) if quick else (12, 768, 12)
    torch.manual_seed(0)
    try:
        from transformers import BertConfig, BertModel

        config = BertConfig(hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=4 * d, vocab_size=30522)
        model = BertModel(config).eval().to(DEVICE)
        names = [f"encoder.layer.{i}" for i in range(layers)]
        return model, names, lambda b: model(**b), f"BertModel (random), {layers} x d {d}"
    except ImportError:  # the same shape without transformers
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, batch_first=True)
        model = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).eval()
        model = model.to(DEVICE)
        embed = nn.Embedding(30522, d).to(DEVICE)
        names = [f"layers.{i}" for i in range(layers)]

        def forward(b: dict) -> Any:
            return model(embed(b["input_ids"]), src_key_padding_mask=b["attention_mask"] == 0)

        return model, names, forward, f"nn.TransformerEncoder, {layers} x d {d}"


def token_batch(batch: int, seq: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (batch, seq), generator=g)
    lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=g)
    mask = (torch.arange(seq)[None] < lengths[:, None]).long()
    return {"input_ids": ids.to(DEVICE), "attention_mask": mask.to(DEVICE)}


def bert_variants(quick: bool) -> tuple[str, dict[str, Callable[[], None]]]:
    model, names, forward, title = bert(quick)
    b = token_batch(4, 16) if quick else token_batch(32, 128)
    three = [names[0], names[len(names) // 2], names[-1]]
    keeps = {"detach": lambda t: t.detach(), "clone": lambda t: t.detach().clone(),
             '.to("cpu")': lambda t: t.detach().to("cpu")}
    raws = {k: raw_hooks(model, names, fn) for k, fn in keeps.items()}
    recorders = {
        f"hs.record, {len(names)} layers": hs.record(model, names),
        "hs.record, 3 layers": hs.record(model, three),
        f'hs.record, {len(names)} layers, device="cpu"': hs.record(model, names, device="cpu"),
        "hs.record, stop=True after layer 0": hs.record(model, names[:1], stop=True),
    }
    variants = {"plain forward": timed(lambda: forward(b))}
    for k, raw in raws.items():
        variants[f"raw hooks + {k}"] = timed(lambda raw=raw: raw(lambda: forward(b)))
    for k, r in recorders.items():
        variants[k] = timed(lambda r=r: _run(r, forward, b))
    return title, variants


def _run(recorder: hs.Recorder, forward: Callable[[Any], Any], batch: Any) -> hs.Recording:
    with recorder as rec:
        forward(batch)
    return rec


def story_on_device(quick: bool) -> tuple[Any, Any, str, list[str], dict]:
    """The story's BiLSTM and batch on the benchmark's device: (model, batch, sizes, the
    three modules, the calls= and unsort= options)."""
    model, b, sizes = story_batch(quick)
    model = model.to(DEVICE)
    for side in ("premise", "hypothesis"):  # lengths stay on the CPU (pack_padded_sequence)
        for field in (side, f"{side}_orig_idx"):
            setattr(b, field, getattr(b, field).to(DEVICE))
    options = {"calls": {"encoder": ["premise", "hypothesis"],
                         "pooling": ["premise", "hypothesis"]},
               "unsort": {"encoder": [b.premise_orig_idx, b.hypothesis_orig_idx]}}
    return model, b, sizes, ["encoder", "pooling", "aggregation"], options


def start(quick: bool, script: str) -> bool:
    """Print the device line; whether there is anything to run (CUDA, or a --quick smoke run
    on the CPU)."""
    name = torch.cuda.get_device_name() if CUDA else "no CUDA device"
    print(f"device: {name}; torch {torch.__version__}; hookscope {hs.__version__}")
    if not CUDA and not quick:
        print(f"benchmarks/{script} measures a GPU: none here, nothing measured.")
        return False
    if not CUDA:
        print("(no CUDA device: a smoke run of the same code on the CPU; no GPU figures)")
    return True


def raw_unsort_hooks(model: Any, b: Any) -> Callable[[Callable[[], Any]], list]:
    """The hand-written floor of what ``hs.record(..., unsort=)`` keeps on the story's model:
    each encoder call's output, ``h`` and ``c`` put back in order with one ``index_select``
    each (a copy, so safe from later in-place ops), and the pooling and aggregation outputs
    cloned; registered and removed per call."""
    perms = [b.premise_orig_idx, b.hypothesis_orig_idx]

    def run(call: Callable[[], Any]) -> list:
        store: list = []
        calls = [0]

        def encoder(m: Any, i: Any, o: Any) -> None:
            p = perms[calls[0] % 2]
            calls[0] += 1
            out, (h, c) = o
            store.append((out.index_select(0, p), h.index_select(1, p), c.index_select(1, p)))

        def clone(m: Any, i: Any, o: Any) -> None:
            store.append(o.detach().clone())

        hooked([(model.encoder, encoder), (model.pooling, clone), (model.aggregation, clone)],
               call)
        return store

    return run


def bilstm_variants(quick: bool) -> tuple[str, dict[str, Callable[[], None]], Any, Any]:
    model, b, sizes, names, options = story_on_device(quick)
    raw = raw_hooks(model, names, lambda t: t.detach())
    unsorting = raw_unsort_hooks(model, b)
    recorder = hs.record(model, names, **options)
    offload = hs.record(model, names, device="cpu", **options)
    variants = {"plain forward": timed(lambda: model(b)),
                "raw hooks (detach)": timed(lambda: raw(lambda: model(b))),
                "raw hooks (index_select / clone: the same copies)": timed(
                    lambda: unsorting(lambda: model(b))),
                "hs.record, unsort=": timed(lambda: recorder.run(b)),
                'hs.record, unsort=, device="cpu"': timed(lambda: offload.run(b))}
    return f"story's BiLSTM ({sizes})", variants, model, b


def sync_checks(quick: bool, lstm: Any, lstm_batch: Any) -> list[dict]:
    model, names, forward, _ = bert(quick)
    b = token_batch(4, 16) if quick else token_batch(32, 128)
    out = []
    unsort = {"encoder": [lstm_batch.premise_orig_idx, lstm_batch.hypothesis_orig_idx]}
    calls = {"encoder": ["premise", "hypothesis"], "pooling": ["premise", "hypothesis"]}
    cases = [("BERT, attention mask", lambda: forward(b), model, names, {}),
             ("BiLSTM, unsort=", lambda: lstm(lstm_batch), lstm,
              ["encoder", "pooling", "aggregation"], {"calls": calls, "unsort": unsort})]
    for what, call, m, ns, opts in cases:
        for device in (None, "cpu"):
            recorder = hs.record(m, ns, device=device, **opts)
            _run(recorder, lambda _, call=call: call(), None)  # warm: perms copied once
            call()  # and the plain call warm too (a first call can sync once on its own)
            plain = count_host_syncs(call)
            with recorder:  # the block's end waits for the copies: not counted
                recorded = count_host_syncs(call)
            out.append({"what": f"syncs: {what}, device={device!r}", "plain": plain,
                        "recorded": recorded})
    return out


def dataset_case(quick: bool, repeats: int) -> list[dict]:
    model, names, forward, title = bert(quick)
    n, batch, seq = (3, 4, 16) if quick else (40, 64, 128)
    batches = [token_batch(batch, seq, seed=i) for i in range(n)]

    def plain() -> None:
        with torch.no_grad():
            for b in batches:
                forward(b)
        sync()

    def record(encoding: str, fingerprint_first: bool = False) -> Callable[[], None]:
        def run() -> None:
            import hookscope.fingerprint as fp

            background = fp._BACKGROUND_BYTES
            if fingerprint_first:  # the model hashed before the first batch, as until 8e152fd
                fp._BACKGROUND_BYTES = 1 << 62
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    hs.record_dataset(model, batches, names, f"{tmp}/ds", reduce="mean",
                                      forward=lambda m, b: forward(b), progress=False,
                                      vector_encoding=encoding, setup_id="benchmarks/gpu.py")
                sync()
            finally:
                fp._BACKGROUND_BYTES = background
        return run

    variants = {"plain inference": plain, "record_dataset (list)": record("list"),
                "record_dataset (binary)": record("binary"),
                "record_dataset (list), fingerprint before the first batch":
                    record("list", fingerprint_first=True)}
    times = interleaved(variants, 1, repeats)
    rows = []
    for k, ts in times.items():
        ratios = [p / t for p, t in zip(times["plain inference"], ts, strict=True)]
        rows.append({"case": f"record_dataset: {title}, {n} batches of {batch} x {seq}, "
                             "reduce='mean'", "variant": k, "seconds": ts,
                     "throughput_vs_plain": ratios})
    plain_syncs, recorded_syncs = count_host_syncs(plain), count_host_syncs(record("list"))
    if plain_syncs is not None:  # per batch: the one wait for the copy, and any others
        rows.append({"what": "syncs per batch: record_dataset vs plain inference",
                     "plain": plain_syncs / n, "recorded": recorded_syncs / n})
    return rows


def report(title: str, times: dict[str, list[float]]) -> list[dict]:
    base = times[next(iter(times))]
    print(f"\n### {title}\n\n| variant | median per call | ratio to plain (per repeat) |")
    print("|---|---:|---|")
    rows = []
    for name, ts in times.items():
        ratios = [t / b for t, b in zip(ts, base, strict=True)]
        print(f"| {name} | {statistics.median(ts) * 1e3:.2f} ms | "
              f"{statistics.median(ratios):.3f}x ({', '.join(f'{r:.3f}' for r in ratios)}) |")
        rows.append({"case": title, "variant": name, "seconds": ts, "ratio_to_plain": ratios})
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__, argv)
    if not start(args.quick, "gpu.py"):
        return 0
    name = torch.cuda.get_device_name() if CUDA else "no CUDA device"
    iters = 2 if args.quick else 20
    repeats = 1 if args.quick else args.repeats
    # Each timed call right after an untimed one of its own variant, in a new order each
    # round: in a fixed order, hs.record of 12 layers always ran right after the 150 MB copy
    # to pageable memory, and measured 1.2x in bf16 where its host time was no more than
    # that of hand-written hooks (gpu_profile.py).
    order = {"settle": 1, "shuffle": True}
    results: list[dict] = []
    with torch.no_grad():
        title, variants = bert_variants(args.quick)
        results += report(f"{title}, fp32", interleaved(variants, iters, repeats, **order))
        with (torch.autocast("cuda", dtype=torch.bfloat16) if CUDA
              else contextlib.nullcontext()):  # (the CPU smoke run: fp32 again)
            results += report(f"{title}, bf16 autocast",
                              interleaved(variants, iters, repeats, **order))
            # The way sessions before 2026-11-27 measured: a fixed order, no settling call.
            results += report(f"{title}, bf16 autocast, fixed order, no settling call",
                              interleaved(variants, iters, repeats))
        title, variants, lstm, lstm_batch = bilstm_variants(args.quick)
        results += report(title, interleaved(variants, iters, repeats, **order))
        checks = sync_checks(args.quick, lstm, lstm_batch)
    if CUDA:
        print("\n| host-device synchronisations per forward | plain | recorded |\n|---|---:|---:|")
        for c in checks:
            print(f"| {c['what']} | {c['plain']} | {c['recorded']} |")
    rows = dataset_case(args.quick, repeats)
    print("\n| record_dataset | throughput vs plain inference (per repeat) |\n|---|---|")
    for r in rows:
        if "variant" in r:
            print(f"| {r['variant']} | "
                  f"{', '.join(f'{x:.3f}' for x in r['throughput_vs_plain'])} |")
        else:
            print(f"| {r['what']} | plain {r['plain']:.2f}, recorded {r['recorded']:.2f} |")
    results += rows + checks
    if args.json:
        info = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
                "python": sys.version.split()[0], "cpu": platform.processor()
                or platform.machine(), "quick": args.quick, "hookscope": hs.__version__}
        with open(args.json, "w") as f:
            json.dump({"machine": info, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
