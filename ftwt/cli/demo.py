"""``ftwt demo``: dense model, FLOPs estimate, the recommended width cascade and the paper's gates, against static pruning.

Runs on the embedded digits data: no download, no GPU needed.
"""

from __future__ import annotations

import argparse

from ftwt.cli._common import print_json, print_table, unit_interval
from ftwt.cli.sweep import print_sweep
from ftwt.demo import DemoConfig, run_demo, run_demo_sweep
from ftwt.errors import ConfigError

_DEFAULTS = DemoConfig()


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the method end to end on the embedded digits, in about a minute",
                       description=__doc__)
    p.add_argument("--out", default=_DEFAULTS.out_dir, help=f"output folder (default {_DEFAULTS.out_dir})")
    p.add_argument("--model", default=_DEFAULTS.model, help=f"default {_DEFAULTS.model}")
    p.add_argument("--mass", type=unit_interval, default=_DEFAULTS.threshold,
                   help=f"mass threshold r (default {_DEFAULTS.threshold})")
    p.add_argument("--rho", type=unit_interval, default=_DEFAULTS.rho,
                   help=f"cascade: share of the blocks' inner filters outside the core (default {_DEFAULTS.rho})")
    p.add_argument("--budget", type=unit_interval, default=_DEFAULTS.budget,
                   help=f"cascade: its honest FLOPs reduction (default {_DEFAULTS.budget})")
    p.add_argument("--dense-epochs", type=int, default=_DEFAULTS.dense_epochs)
    p.add_argument("--ftwt-epochs", type=int, default=_DEFAULTS.ftwt_epochs)
    p.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                   help="keep the gates' 0.5 decision (they then keep more than their labels)")
    p.add_argument("--image-size", type=int, default=_DEFAULTS.image_size, help="digits upsampled to this size")
    p.add_argument("--train-subset", type=int, default=None, help="first N training images only (quick checks)")
    p.add_argument("--seed", type=int, default=_DEFAULTS.seed)
    p.add_argument("--threads", type=int, default=_DEFAULTS.threads, help="CPU threads (default 1: fast on shared cores)")
    p.add_argument("--device", default=_DEFAULTS.device, help="auto, cpu or cuda")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("--sweep", action="store_true",
                   help="instead: a small sweep (every method at several thresholds) into OUT/sweep/sweep.csv and .png")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.dense_epochs <= 0 or args.ftwt_epochs <= 0:
        raise ConfigError("--dense-epochs and --ftwt-epochs must be positive")
    if args.threads is not None and args.threads <= 0:
        raise ConfigError(f"--threads must be positive, got {args.threads}")
    config = DemoConfig(out_dir=args.out, model=args.model, threshold=args.mass, rho=args.rho, budget=args.budget,
                        dense_epochs=args.dense_epochs, ftwt_epochs=args.ftwt_epochs,
                        calibrate=args.calibrate, image_size=args.image_size,
                        train_subset=args.train_subset, seed=args.seed, device=args.device, threads=args.threads,
                        progress=args.progress)
    if args.sweep:
        rows = run_demo_sweep(config)
        if args.json:
            print_json(rows)
        else:
            print_sweep(rows, f"{args.out}/sweep")
        return 0
    result = run_demo(config)
    if args.json:
        print_json(result)
        return 0
    dense, cascade, ftwt = result["dense"], result["cascade"], result["ftwt"]

    def dynamic(run):
        lift = run.get("gate_lift")
        told = "" if lift is None or lift > 0 else " (no better than each filter's majority label)"
        return (f"{run['top1']:6.2f}%  {run['dynamic_macs'] / 1e6:7.2f}M     {run['flops_reduction']:.1%} achieved "
                f"(estimate {run['estimated_reduction']:.1%}); decisions vary for {run['varying_fraction']:.0%} of "
                f"filters, gate lift {100 * (lift or 0):+.1f} pts{told}")

    def cascaded(run):
        lift = run["gate_lift"]
        told = "" if lift > 0 else " (no better than the majority label)"
        return (f"{run['top1']:6.2f}%  {run['dynamic_macs'] / 1e6:7.2f}M     {run['flops_reduction']:.1%} achieved; "
                f"{run['escalated']:.0%} of images ran every filter (core alone {run['core_top1']:.2f}%), decisions "
                f"vary for {run['varying_fraction']:.0%} of filters, exit lift {100 * lift:+.1f} pts{told}")

    def static(run):
        return (f"{run['top1']:6.2f}%  {run['dense_macs'] / 1e6:7.2f}M     {run['flops_reduction']:.1%} "
                f"(Torch-Pruning, {run['scope']} groups, same FLOPs and fine-tuning)")

    print_table([
        ("", "top-1     MACs/image   FLOPs reduction"),
        ("dense", f"{dense['top1']:6.2f}%  {dense['dense_macs'] / 1e6:7.2f}M     -"),
        ("cascade (recommended)", cascaded(cascade)),
        ("static", static(result["static_cascade"])),
        (f"FTWT paper r={args.mass:g}", dynamic(ftwt)),
        ("static", static(result["static"])),
        ("time", f"{result['total_seconds']:.0f} s"),
        ("written", f"{args.out}/report.json, {result['files']['plot']}"),
    ])
    return 0
