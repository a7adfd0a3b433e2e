"""``ftwt estimate``: the FLOPs reduction a mass threshold buys, before any training.

Runs the (pretrained) dense model with ground-truth masks, as if the gates were perfect,
and counts FLOPs honestly. ``--target-reduction`` finds the threshold for a budget.
"""

from __future__ import annotations

import argparse
import logging

from ftwt.cli._common import (
    add_data_args,
    add_json_arg,
    add_model_args,
    model_kwargs,
    positive,
    print_json,
    print_table,
    unit_interval,
)
from ftwt.data import DataConfig, build_datasets
from ftwt.estimate import estimate, find_threshold
from ftwt.train import load_model
from ftwt.train.runtime import resolve_device

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("estimate", help="FLOPs reduction of a threshold, before training", description=__doc__)
    add_model_args(p)
    goal = p.add_mutually_exclusive_group(required=True)
    goal.add_argument("--mass", "--threshold", dest="mass", type=unit_interval, help="mass threshold r in (0, 1]")
    goal.add_argument("--target-reduction", type=float, help="find the r that gives this FLOPs reduction (0..1)")
    add_data_args(p)
    p.add_argument("--samples", type=positive(int), default=256, help="training samples to estimate on")
    p.add_argument("--device", default="auto")
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    cfg = DataConfig(dataset=args.dataset, data_dir=args.data_dir, download=args.download, train_subset=args.samples)
    train, _, info = build_datasets(cfg)
    model = load_model(args.model, args.num_classes or info.num_classes, args.init, **model_kwargs(args)).to(device)
    if args.init is None:
        log.warning("no --init given: estimating on untrained weights; pass a trained dense checkpoint for a real budget")
    # Training images without augmentation would be closer to the truth, but the loader's
    # crops match what the gates will see in training.
    batches = (x for x, _ in _batches(train, args.batch_size))
    if args.mass is not None:
        result = estimate(model, batches, args.mass, samples=args.samples, device=device)
    else:
        result = find_threshold(model, batches, args.target_reduction, samples=args.samples, device=device)
    out = {"model": args.model, "dataset": info.name, **result.to_dict()}
    if args.json:
        print_json(out)
    else:
        print_table([
            ("model", args.model),
            ("data", f"{info.name}, {out['samples']} samples"),
            ("mass r", f"{result.threshold:.4f}"),
            ("dense MACs", f"{out['dense_macs'] / 1e6:.2f}M"),
            ("estimated MACs", f"{out['estimated_macs'] / 1e6:.2f}M (gates {out['gate_macs'] / 1e6:.2f}M)"),
            ("estimated reduction", f"{out['estimated_reduction']:.1%} (reference-style count {out['reference_reduction']:.1%})"),
        ])
    return 0


def _batches(dataset, batch_size: int):
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=batch_size, shuffle=False)
