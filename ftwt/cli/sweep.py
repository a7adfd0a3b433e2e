"""``ftwt sweep``: accuracy and latency against FLOPs, dynamic against static, from one dense model.

For each mass threshold in ``--masses``: the FLOPs estimate before training, then every
``--methods`` run fine-tuned for ``--epochs`` from ``--init`` (ftwt: the paper's mode;
uniform and ftwt+: their ratio matched to the ftwt estimate; oracle: perfect gates, the
bound; static / static-inner: Torch-Pruning to the FLOPs of that estimate). Writes
``OUT/sweep.csv`` and ``OUT/sweep.png``; run again, it skips finished runs and resumes a
half-finished one from its ``last.pt``.
"""

from __future__ import annotations

import argparse

from ftwt.cli._common import add_folder_args, add_shortcut_arg, print_json, print_table
from ftwt.errors import ConfigError
from ftwt.sweep import METHODS, SweepConfig, run_sweep

_DEFAULTS = SweepConfig(init="")
# Flags passed on to every run's TrainConfig when given.
_TRAIN_KEYS = ("dataset", "data_dir", "download", "image_size", "augment", "mean", "std", "batch_size", "workers",
               "train_subset", "val_subset", "shortcut", "seed", "device", "num_classes")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="accuracy and latency against FLOPs for FTWT, ftwt+ and static pruning",
                       description=__doc__)
    p.add_argument("--model", required=True, help="registry name, torchvision:NAME or package.module:factory")
    p.add_argument("--init", metavar="CKPT", required=True, help="the trained dense checkpoint every run starts from")
    p.add_argument("--num-classes", dest="num_classes", type=int, default=argparse.SUPPRESS,
                   help="classifier outputs (default: the data's)")
    add_shortcut_arg(p)
    p.add_argument("--masses", type=_floats, default=_DEFAULTS.masses,
                   help=f"mass thresholds r (default {','.join(f'{r:g}' for r in _DEFAULTS.masses)})")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of: {', '.join(METHODS)} (default all)")
    p.add_argument("--epochs", type=int, default=_DEFAULTS.epochs,
                   help=f"fine-tuning epochs of every run (default {_DEFAULTS.epochs})")
    p.add_argument("--out", default=_DEFAULTS.out_dir, help=f"output folder (default {_DEFAULTS.out_dir})")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=argparse.SUPPRESS, help="digits (embedded, default), cifar10, cifar100 or folder")
    g.add_argument("--data-dir", dest="data_dir", default=argparse.SUPPRESS, help="dataset root")
    g.add_argument("--download", action="store_true", default=argparse.SUPPRESS, help="let torchvision download CIFAR")
    g.add_argument("--image-size", dest="image_size", type=int, default=argparse.SUPPRESS,
                   help="input size (default: the dataset's)")
    add_folder_args(g)
    g.add_argument("--batch-size", dest="batch_size", type=int, default=argparse.SUPPRESS, help="default 128")
    g.add_argument("--workers", type=int, default=argparse.SUPPRESS, help="DataLoader worker processes (default 2)")
    g.add_argument("--train-subset", dest="train_subset", type=int, default=argparse.SUPPRESS,
                   help="first N training samples only")
    g.add_argument("--val-subset", dest="val_subset", type=int, default=argparse.SUPPRESS,
                   help="first N validation samples only")
    g.add_argument("--seed", type=int, default=argparse.SUPPRESS, help="default 0")
    g.add_argument("--device", default=argparse.SUPPRESS, help="auto (default), cpu, cuda or cuda:N")
    g = p.add_argument_group("measurement")
    g.add_argument("--estimate-samples", dest="estimate_samples", type=int, default=_DEFAULTS.estimate_samples,
                   help=f"training samples of each estimate (default {_DEFAULTS.estimate_samples})")
    g.add_argument("--no-latency", dest="latency", action="store_false", help="do not time the deployed models")
    g.add_argument("--latency-seconds", dest="latency_seconds", type=float, default=_DEFAULTS.latency_seconds,
                   help=f"timing per deployed model (default {_DEFAULTS.latency_seconds:g} s)")
    g.add_argument("--threads", type=int, default=_DEFAULTS.threads, help="CPU threads while timing (default 1)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=run)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:5.1f}%"


def run(args: argparse.Namespace) -> int:
    if args.threads <= 0 or args.latency_seconds <= 0 or args.estimate_samples <= 0:
        raise ConfigError("--threads, --latency-seconds and --estimate-samples must be positive")
    train = {k: getattr(args, k) for k in _TRAIN_KEYS if hasattr(args, k)}
    rows = run_sweep(SweepConfig(
        init=args.init, model=args.model, masses=args.masses,
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()), epochs=args.epochs,
        out_dir=args.out, train=train, estimate_samples=args.estimate_samples, latency=args.latency,
        latency_seconds=args.latency_seconds, threads=args.threads, progress=args.progress))
    if args.json:
        print_json(rows)
    else:
        print_sweep(rows, args.out)
    return 0


def print_sweep(rows: list[dict], out: str) -> None:
    """One line per run: top-1, honest and estimated reduction, latency."""
    table = [("run", "top-1    honest red.  estimated  latency")]
    for row in rows:
        ms = "-" if row.get("latency_ms") is None else f"{row['latency_ms']:.2f} ms"
        table.append((row["run"].rsplit("/", 1)[-1], f"{row['top1']:6.2f}%  {_pct(row.get('achieved_reduction'))}"
                      f"       {_pct(row.get('estimated_reduction'))}     {ms}"))
    table.append(("written", f"{out}/sweep.csv, {out}/sweep.png"))
    print_table(table)
