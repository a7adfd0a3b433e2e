"""``ftwt flops``: dense MACs and parameters of a model."""

from __future__ import annotations

import argparse

import torch

from ftwt.cli._common import (
    add_json_arg,
    add_shortcut_arg,
    default_input_size,
    first_line,
    model_kwargs,
    print_json,
    print_table,
)
from ftwt.errors import ConfigError
from ftwt.flops import measure
from ftwt.train import load_model


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("flops", help="dense MACs and parameters of a model", description=__doc__)
    p.add_argument("--model", required=True, help="registry name, torchvision:NAME or your own as package.module:factory")
    p.add_argument("--num-classes", type=int, default=None, help="default: 1000 for torchvision models, else 10")
    p.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"), default=None)
    p.add_argument("--per-layer", action="store_true", help="include each layer's MACs")
    add_shortcut_arg(p)
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    num_classes = args.num_classes or (1000 if args.model.startswith("torchvision:") else 10)
    model = load_model(args.model, num_classes, **model_kwargs(args))
    size = tuple(args.input_size) if args.input_size else default_input_size(args.model)
    # Ones, not zeros: a zero input would count its input channels as inactive.
    try:
        report = measure(model, [torch.ones(1, *size)])
    except RuntimeError as exc:
        raise ConfigError(f"{args.model} cannot take {'x'.join(map(str, size))} inputs ({first_line(exc)}); "
                          "choose another --input-size") from None
    out = {
        "model": args.model,
        "input_size": list(size),
        "dense_macs": int(report.dense_macs),
        "params": sum(p.numel() for p in model.parameters()),
    }
    if args.per_layer:
        out["per_layer"] = [{"name": lay.name, "kind": lay.kind, "macs": int(lay.dense)} for lay in report.layers]
    if args.json:
        print_json(out)
    else:
        print_table([
            ("model", args.model),
            ("input", "x".join(map(str, size))),
            ("dense MACs", f"{out['dense_macs'] / 1e6:.2f}M"),
            ("params", f"{out['params'] / 1e6:.2f}M"),
        ])
        if args.per_layer:
            print()
            _print_layers(out["per_layer"], out["dense_macs"])
    return 0


def _print_layers(layers: list[dict], total: int) -> None:
    width = max([len("layer")] + [len(lay["name"]) for lay in layers])
    print(f"{'layer':<{width}}  {'kind':<10}  {'MACs':>10}  {'share':>6}")
    for lay in layers:
        print(f"{lay['name']:<{width}}  {lay['kind']:<10}  {lay['macs'] / 1e6:>9.3f}M  {lay['macs'] / max(total, 1):>6.1%}")
