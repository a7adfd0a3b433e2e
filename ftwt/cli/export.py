"""``ftwt export``: a trained gated model as a ``torch.export`` program, an ONNX file or a sparse engine.

``--format torch`` (``.pt2``) and ``--format onnx`` (``.onnx``) write the gated model's graph:
it runs the gates and applies their masks, but computes every filter densely, so it is no
faster than the dense model (plus the gates); any runtime that reads the format can serve
it. ``--format engine`` (``.safetensors``) writes :class:`ftwt.engine.SparseEngine`, which
computes only the kept filters: the real savings, served with ``SparseEngine.load(FILE)``
(PyTorch and ftwt, not the model's code). Each export is read back and its outputs checked
against the eager model's on a random input of the checkpoint's size.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ftwt.cli._common import (
    add_json_arg,
    add_shortcut_arg,
    default_input_size,
    load_trained_model,
    positive,
    print_json,
)
from ftwt.errors import ConfigError
from ftwt.export import FORMATS, export_model

SUFFIX = {"torch": ".pt2", "onnx": ".onnx", "engine": ".safetensors"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="a checkpoint as torch.export, ONNX or a sparse-engine file", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by ftwt train")
    p.add_argument("--format", dest="fmt", choices=(*FORMATS, "engine"), default="torch",
                   help="torch (.pt2, dense compute, masks applied), onnx (.onnx, the same; needs ftwt[onnx]) "
                        "or engine (.safetensors, the sparse engine)")
    p.add_argument("--out", required=True, help="output file (.pt2, .onnx or .safetensors)")
    p.add_argument("--model", default=None, help="rebuild with this builder instead of the checkpoint's")
    add_shortcut_arg(p, "the checkpoint's")
    p.add_argument("--batch-size", type=positive(int), default=1, help="batch of the example input")
    p.add_argument("--kernel", default="auto", choices=("auto", "native", "torch"),
                   help="engine: kernels (auto: timed per layer on the first input where it is served)")
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.suffix != SUFFIX[args.fmt]:
        raise ConfigError(f"--format {args.fmt} writes a {SUFFIX[args.fmt]} file; got --out {args.out}")
    model, ckpt = load_trained_model(args.checkpoint, args)
    model.eval()
    shape = tuple(int(s) for s in ckpt.input_size) if ckpt.input_size else default_input_size(ckpt.model_name)
    example = torch.randn(args.batch_size, *shape, generator=torch.Generator().manual_seed(0))
    if args.fmt == "engine":
        result = _export_engine(model, example, out, args.kernel)
    else:
        result = export_model(model, example, out, fmt=args.fmt)
    result = {"checkpoint": args.checkpoint, **result}
    if args.json:
        print_json(result)
    else:
        checked = (f"outputs checked with {result['checked_with']}: max relative difference {result['max_rel_diff']:.1e}"
                   if result["checked_with"] else "outputs not checked")
        dense = "" if args.fmt == "engine" else "; masks applied, every filter computed (use --format engine for speed)"
        print(f"wrote {result['path']} ({args.fmt}; {checked}{dense})")
    return 0


def _export_engine(model: torch.nn.Module, example: torch.Tensor, out: Path, kernel: str) -> dict:
    from ftwt.engine import SparseEngine
    from ftwt.surgery import is_gated

    if not is_gated(model):
        raise ConfigError("the checkpoint holds a dense model; the sparse engine needs a gated one (train it with --mass R)")
    engine = SparseEngine(model, kernel=kernel)
    engine.save(out)
    loaded = SparseEngine.load(out, kernel="torch")
    with torch.no_grad():
        ref = model(example)
        diff = float((loaded(example) - ref).abs().max()) / max(float(ref.abs().max()), 1e-12)
    if diff > 1e-4:
        raise ConfigError(f"the saved engine's outputs differ from the model's by {diff:.1e} (relative)")
    return {"format": "engine", "path": str(out), "checked_with": "SparseEngine.load", "max_rel_diff": diff}
