"""Command line: ``hookscope demo`` and ``hookscope summary``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

__all__ = ["main"]

PREMISES = ["Five men are playing frisbee on the beach"] * 2
HYPOTHESES = ["Some people are playing at the seafront", "A group of women is crossing a busy road"]


def demo(out=None) -> int:
    """Record the story's model in one forward pass and print what came out."""
    out = out or sys.stdout
    import hookscope as hs
    from hookscope.examples.nli import Vectoriser, build_model

    vec = Vectoriser.fit(PREMISES + HYPOTHESES)
    model = build_model(len(vec), embedding_dim=50, hidden_size=64, seed=0)
    batch = vec.batch_transform_nli_padded_sorted(PREMISES, HYPOTHESES, y=[1, 0])
    print("The story's BiLSTM NLI model (untrained, seeded weights: the trained model and its "
          "corpus come in a later release).\n", file=out)
    with torch.no_grad(), hs.record(
        model, ["encoder", "pooling", "aggregation"],
        calls={"encoder": ["premise", "hypothesis"], "pooling": ["premise", "hypothesis"]},
        unsort={"encoder": [batch.premise_orig_idx, batch.hypothesis_orig_idx]},
    ) as rec:
        scores = model(batch)
    print(rec, "\n", file=out)

    prem, hypo = rec["encoder", "premise"], rec["encoder", "hypothesis"]
    u, v = rec.calls("pooling")
    cos = torch.nn.functional.cosine_similarity

    def final_state(cap):  # forward half at position length-1, backward half at position 0
        t, idx = cap.tensor, torch.arange(len(cap.lengths))
        half = t.shape[-1] // 2
        return torch.cat([t[idx, cap.lengths - 1, :half], t[:, 0, half:]], dim=1)

    naive = cos(prem.tensor[:, -1], hypo.tensor[:, -1])
    before = cos(final_state(prem), final_state(hypo))
    after = cos(u.tensor, v.tensor)
    print(f"{'pair':<60} {'[:, -1, :]':>10} {'final':>8} {'pooled':>8}", file=out)
    for i, (p, h) in enumerate(zip(PREMISES, HYPOTHESES, strict=True)):
        print(f"{(p + ' / ' + h)[:60]:<60} {naive[i]:10.4f} {before[i]:8.4f} {after[i]:8.4f}",
              file=out)
    print("\n[:, -1, :] is the story's 'final state': for every sentence shorter than the longest"
          "\nit is padding (lengths here: premise "
          f"{prem.lengths.tolist()}, hypothesis {hypo.lengths.tolist()}).", file=out)
    print(f"\nscores: {scores.tolist()}", file=out)
    return 0


def summary_command(path: str, trusted: bool, out=None) -> int:
    """Load a saved model file and list its modules (no forward pass: no example input)."""
    out = out or sys.stdout
    import hookscope as hs

    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trusted)
    except Exception as exc:
        hint = ("" if trusted else " If the file is a whole pickled model that you trust, pass "
                "--trust-pickle (torch.load(weights_only=False) can run arbitrary code).")
        print(f"hookscope: cannot load {path!r}: {exc}.{hint}", file=sys.stderr)
        return 2
    if not isinstance(obj, torch.nn.Module):
        tensors = {k: tuple(v.shape) for k, v in obj.items() if torch.is_tensor(v)} if isinstance(
            obj, dict) else {}
        print(f"{path}: a {type(obj).__name__} of {len(tensors)} tensors (a state dict?)",
              file=out)
        for k, shape in tensors.items():
            print(f"  {k}: {shape}", file=out)
        return 0
    rows = [(n, type(m).__name__, sum(p.numel() for p in m.parameters()))
            for n, m in obj.named_modules()]
    print(hs.format_summary(__import__("pandas").DataFrame(
        [(n, t, "", "", "", p) for n, t, p in rows],
        columns=["name", "type", "calls", "output_shape", "dtype", "params"])), file=out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hookscope", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="record the story's model in one forward pass")
    s = sub.add_parser("summary", help="list the modules of a saved model file")
    s.add_argument("path")
    s.add_argument("--trust-pickle", action="store_true",
                   help="load a whole pickled model (runs code from the file: trusted files only)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo()
    return summary_command(args.path, args.trust_pickle)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
