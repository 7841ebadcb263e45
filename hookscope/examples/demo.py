"""``hookscope demo``: the story's questions answered on a trained model, in one pass each."""

from __future__ import annotations

import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pandas as pd
import torch

import hookscope as hs

from .report import Report, readable, save_figure, write_frame

PREMISES = ["Five men are playing frisbee on the beach"] * 2
HYPOTHESES = ["Some people are playing at the seafront",
              "A group of women is crossing a busy road"]
STORY_LABELS = ["entailment", "contradiction"]


class _Steps:
    """Prints each step with its duration; a tqdm bar where tqdm is installed and a step is
    long (the demo's steps take well under a second each on 2 CPU cores)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def __call__(self, text: str) -> _Steps:
        self.text, self.t0 = text, time.perf_counter()
        return self

    def __enter__(self) -> None:
        print(f"- {self.text} ...", end="", file=self.out, flush=True)

    def __exit__(self, *exc: Any) -> None:
        print(f" {time.perf_counter() - self.t0:.2f} s", file=self.out, flush=True)


def _progress(items: list, desc: str, out: TextIO) -> Iterator:
    try:
        from tqdm import tqdm
    except ImportError:
        yield from items
        return
    yield from tqdm(items, desc=desc, file=out, leave=False, disable=len(items) < 4)


def sentence_states(model: Any, vec: Any, sentences: list[str],
                    batch_size: int = 256, out: TextIO = sys.stderr) -> tuple[torch.Tensor,
                                                                              torch.Tensor]:
    """Final encoder state and pooled vector of each sentence (as a premise), in one forward
    pass per batch.  Returns (final_states, pooled), both (n, 2 * hidden)."""
    finals, pooled = [], []
    chunks = [sentences[i : i + batch_size] for i in range(0, len(sentences), batch_size)]
    for chunk in _progress(chunks, "encoding", out):
        batch = vec.batch_transform_nli_padded_sorted(chunk, chunk)
        rec = hs.record(model, ["encoder", "pooling"],
                        calls={"encoder": ["premise", "hypothesis"],
                               "pooling": ["premise", "hypothesis"]},
                        unsort={"encoder": [batch.premise_orig_idx, batch.hypothesis_orig_idx]},
                        stop=True).run(batch)  # stop: aggregation and classifier never run
        enc = rec["encoder", "premise"]
        finals.append(hs.last_state(enc.tensor, enc.lengths, bidirectional=True))
        pooled.append(rec["pooling", "premise"].tensor)
    return torch.cat(finals), torch.cat(pooled)


def _pyplot() -> Any:
    """matplotlib.pyplot on the file-only backend, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def nan_note(prem: Any, hypo: Any) -> str:
    """Why the story's ``[:, -1, :]`` gives a NaN cosine, with this batch's lengths."""
    return (f"[:, -1, :] is the story's 'final state'. Lengths here: premise "
            f"{prem.lengths.tolist()}, hypothesis {hypo.lengths.tolist()}, padded to "
            f"{hypo.tensor.shape[1]} positions: for a sentence shorter than the padded length, "
            "[:, -1, :] reads a padding position (a zero vector), so its cosine is NaN. "
            "hs.last_state takes each sentence's true last position (and the backward "
            "direction's first), which is what 'cos final state' uses.")


def run_story(out_dir: Path, n_sentences: int = 300, out: TextIO = sys.stdout) -> dict:
    from .corpus import LABELS, sentences
    from .nli import load_pretrained

    step = _Steps(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with step("loading the trained example model"):
        model, vec, meta = load_pretrained()
    about = (f"BiLSTM NLI model trained on the generated corpus: dev accuracy "
             f"{meta['dev_accuracy']:.1%} on held-out scenes ({meta['dev_pairs']} pairs)")
    print(f"  {about}", file=out)

    with step("recording encoder, pooling and aggregation in one forward pass"):
        batch = vec.batch_transform_nli_padded_sorted(PREMISES, HYPOTHESES)
        with torch.no_grad(), hs.record(
                model, ["encoder", "pooling", "aggregation"],
                calls={"encoder": ["premise", "hypothesis"],
                       "pooling": ["premise", "hypothesis"]},
                unsort={"encoder": [batch.premise_orig_idx, batch.hypothesis_orig_idx]}) as rec:
            scores = model(batch)
    print(f"\n{rec}\n", file=out)

    prem, hypo = rec["encoder", "premise"], rec["encoder", "hypothesis"]
    u, v = rec.calls("pooling")
    final = hs.cosine(hs.last_state(prem.tensor, prem.lengths, bidirectional=True),
                      hs.last_state(hypo.tensor, hypo.lengths, bidirectional=True))
    naive = hs.cosine(prem.tensor[:, -1], hypo.tensor[:, -1])
    after = hs.cosine(u.tensor, v.tensor)
    probs = torch.softmax(scores, 1)
    story = pd.DataFrame({
        "premise": PREMISES, "hypothesis": HYPOTHESES, "gold": STORY_LABELS,
        "predicted": [LABELS[i] for i in probs.argmax(1).tolist()],
        "p(predicted)": probs.max(1).values.numpy().round(3),
        "cos [:, -1, :]": naive.round(4), "cos final state": final.round(4),
        "cos after pooling": after.round(4)})
    with pd.option_context("display.width", 200, "display.max_colwidth", 45):
        print(story.drop(columns=["premise"]).to_string(index=False), file=out)
    note = nan_note(prem, hypo)
    print("\n" + textwrap.fill(note, 95, initial_indent="  ", subsequent_indent="  ") + "\n",
          file=out)

    texts = list(dict.fromkeys(PREMISES + HYPOTHESES + sentences(0)[:n_sentences]))
    with step(f"encoding {len(texts)} corpus sentences (stop=True: classifier skipped)"):
        finals, pooled = sentence_states(model, vec, texts, out=out)
    with step("neighbourhoods before vs after pooling"):
        change = hs.neighborhood_change(finals, pooled, k=5, labels=texts)
        overlap = hs.neighborhood_overlap(finals, pooled, k=5)
    print(f"  mean overlap@5 of final-state vs pooled neighbourhoods: "
          f"{overlap.mean_overlap:.2f} (1 = unchanged)", file=out)
    story_items = list(dict.fromkeys(PREMISES + HYPOTHESES))
    for sentence in story_items:
        row = change.loc[sentence]
        print(f"\n  {sentence!r}: kept {round(row.overlap * 5)} of 5 neighbours", file=out)
        print(f"    entered: {'; '.join(row.entered[:3]) or '-'}", file=out)
        print(f"    left:    {'; '.join(row.left[:3]) or '-'}", file=out)

    report = Report("hookscope demo: the story, on a trained model", about)
    written = _write_story(out_dir, report, rec, story, note, change, overlap.mean_overlap,
                           story_items)
    _print_written(written, out)
    return {"story": story, "overlap": overlap.mean_overlap, "written": written}


def _print_written(written: list[tuple[Path, str]], out: TextIO) -> None:
    print("\nwritten:", file=out)
    for path, how in written:
        print(f"  {path}" + (f"    read it: {how}" if how else ""), file=out)


def _story_figure(change: pd.DataFrame, items: list[str]) -> Any:
    plt = _pyplot()
    if plt is None:
        return None
    fig = plt.figure(figsize=(11, 2.8 + 1.9 * len(items)), layout="constrained")
    grid = fig.add_gridspec(1 + len(items), 1, height_ratios=[2.4] + [1.8] * len(items))
    hs.plot.overlap_histogram(
        change, ax=fig.add_subplot(grid[0]),
        title=f"{len(change)} sentences: how many of their 5 nearest neighbours (cosine) "
              "stay the same from the final state to the max-pooled vector")
    for i, item in enumerate(items, 1):
        hs.plot.neighbor_diagram(change, item, ax=fig.add_subplot(grid[i]),
                                 before="nearest by final state", after="nearest after pooling")
    return fig


def _write_story(out_dir: Path, report: Report, rec: Any, story: pd.DataFrame, note: str,
                 change: pd.DataFrame, mean_overlap: float,
                 items: list[str]) -> list[tuple[Path, str]]:
    written: list[tuple[Path, str]] = []
    frame = rec.to_frame(reduce="max", meta={"premise": PREMISES, "hypothesis": HYPOTHESES})
    written.append(write_frame(frame, out_dir / "story_vectors"))
    change_csv = out_dir / "neighbourhood_change.csv"
    readable(change).to_csv(change_csv)
    written.append((change_csv, f'pd.read_csv("{change_csv.name}", index_col=0)  # lists '
                                "joined with '; '"))
    written.append((hs.save(rec, out_dir / "story.hsrec"), 'hs.load("story.hsrec")'))

    report.heading("The recording: one forward pass, the encoder's two calls kept apart")
    report.html(f'<div class="nowrap">{rec._repr_html_()}</div>')
    report.heading("Cosine of premise and hypothesis, before and after pooling")
    report.table(story, index=False, digits=4)
    report.text(note, note=True)
    report.heading("How pooling changes neighbourhoods (k = 5, cosine)")
    report.text(f"For each of {len(change)} sentences: its 5 nearest sentences by the encoder's "
                "final state, and by the max-pooled vector. Mean overlap: "
                f"{mean_overlap:.2f} (1 = unchanged). Below, the story's sentences, then the "
                "sentences whose neighbourhood changed most.")
    written += save_figure(_story_figure(change, items), out_dir / "neighbourhoods.png", report,
                           "neighbourhood change before and after pooling")
    table = change.rename_axis("sentence").reset_index()
    table.insert(1, "kept (of 5)", (table.pop("overlap") * 5).round().astype(int))
    report.text("The 10 sentences whose neighbourhood changed most:")
    report.table(table.sort_values("kept (of 5)", kind="stable").head(10)
                 [["sentence", "kept (of 5)", "left", "entered"]], index=False)
    report.table(table[["sentence", "kept (of 5)", "before", "after"]], index=False,
                 fold=f"All {len(change)} sentences with their 5 nearest neighbours before and "
                      "after pooling (click to open, then filter)")
    return report.write(out_dir / "report.html", written)


def main(model: str = "story", out_dir: str | Path = "hookscope-demo",
         out: TextIO = sys.stdout) -> int:
    torch.manual_seed(0)
    np.random.seed(0)
    if model == "minilm":
        from .demo_minilm import run_minilm

        run_minilm(Path(out_dir), out=out)
    else:
        run_story(Path(out_dir), out=out)
    return 0
