"""``ftwt eval``: accuracy, honest FLOPs and gate statistics of a trained checkpoint.

Evaluates on the checkpoint's dataset (validation split) unless --dataset says otherwise,
and writes report.json and per_layer.png into --out, by default a folder eval_NAME next to
the checkpoint NAME.pt (the training run's own report stays as it is).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from ftwt.cascade import WidthCascade
from ftwt.checkpoint import load_checkpoint
from ftwt.cli._common import add_json_arg, add_shortcut_arg, load_trained_model, positive, print_json, print_table
from ftwt.data import DataConfig, build_datasets
from ftwt.errors import ConfigError
from ftwt.evaluate import evaluate
from ftwt.report import write_report
from ftwt.train.runtime import resolve_device


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="accuracy, FLOPs and gate statistics of a checkpoint", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by ftwt train")
    p.add_argument("--model", default=None,
                   help="rebuild the model with this builder instead of the checkpoint's: a registry name or the "
                        "import path of your own, package.module:factory")
    group = p.add_argument_group("data")
    group.add_argument("--dataset", default=None, help="digits, cifar10, cifar100 or folder (default: the checkpoint's)")
    group.add_argument("--data-dir", default=None, help="dataset root (CIFAR files or an ImageNet-style folder)")
    group.add_argument("--batch-size", type=positive(int), default=256)
    group.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    group.add_argument("--max-batches", type=positive(int), default=None, help="evaluate at most N batches")
    p.add_argument("--device", default="auto")
    add_shortcut_arg(p, "the checkpoint's (avgpool for checkpoints that do not say)")
    p.add_argument("--out", default=None,
                   help="folder for report.json and per_layer.png (default: eval_NAME next to the checkpoint NAME.pt)")
    add_json_arg(p)
    p.set_defaults(func=run)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _table(out: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [
        ("checkpoint", out["checkpoint"]),
        ("model", f"{out['model']} ({'gated' if 'per_layer' in out else 'dense'})"),
        ("data", f"{out['dataset']} validation, {out['samples']} samples"),
        ("top-1 / top-5", f"{out['top1']:.2f}% / {out['top5']:.2f}%"),
        ("loss", f"{out['loss']:.4f}"),
        ("dense MACs", f"{out['dense_macs'] / 1e6:.2f}M"),
        ("dynamic MACs", f"{out['dynamic_macs'] / 1e6:.2f}M (gates {out['gate_macs'] / 1e6:.3f}M; per sample "
                         f"{out['per_sample_macs']['min'] / 1e6:.2f}M to {out['per_sample_macs']['max'] / 1e6:.2f}M)"),
        ("FLOPs reduction", f"{out['flops_reduction']:.1%} (reference-style count {out['reference_reduction']:.1%})"),
    ]
    if "per_layer" not in out:
        return rows
    if "ground_truth_reduction" in out:
        rows.append(("perfect-gate reduction", f"{out['ground_truth_reduction']:.1%} (ground-truth masks, same inputs)"))
    if "gate_accuracy" in out:
        rows += [
            ("kept filters", f"{_pct(out['kept'])} predicted vs {_pct(out['kept_labels'])} in the labels"),
            ("gate accuracy", f"{_pct(out['gate_accuracy'])} (precision {_pct(out['gate_precision'])}, "
                              f"recall {_pct(out['gate_recall'])}; positive = keep)"),
        ]
    rows.append((
        "dynamic?",
        f"masks vary for {out['varying_fraction']:.2%} of decisions; {out['always_on_fraction']:.1%} of filters "
        f"always on, {out['always_off_fraction']:.1%} always off",
    ))
    if out.get("cascade"):
        c = out["cascade"]
        rows.append(("cascade", f"top-1 {c['top1']:.2f}% at {c['flops_reduction']:.1%} honest reduction; "
                                f"{c['escalated']:.1%} of inputs ran every filter (core alone {c['core_top1']:.2f}%); "
                                f"exit decision lift {100 * c['gate_lift']:+.1f} pts"))
    if out.get("gate_lift") is not None:
        verdict = ("the gates predict the labels better than each filter's prior" if out["gate_lift"] > 0 else
                   "no better than each filter's majority label: if the decisions do not vary either, the gates ignore the input")
        rows.append((
            "gate lift",
            f"{100 * out['gate_lift']:+.1f} pts over the static oracle ({_pct(out['static_oracle_accuracy'])}; "
            f"labels vary for {_pct(out['label_varying_fraction'])} of filters): {verdict}",
        ))
    return rows


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    model, ckpt = load_trained_model(args.checkpoint, args)
    if ckpt.dataset == "custom" and not args.dataset:
        raise ConfigError(f"{args.checkpoint} was trained on your own data; pass --dataset (and --data-dir) to "
                          "evaluate on a dataset ftwt can build, or use ftwt.evaluate in Python")
    dataset = args.dataset or ckpt.dataset or "digits"
    image_size = None
    size = ckpt.input_size
    # The checkpoint's input size only applies to the data it was trained on.
    if size and dataset == (ckpt.dataset or "digits"):
        image_size = int(list(size)[-1])
    # an image folder's transforms as in training (its config states size, augmentation and statistics)
    same = {k: (ckpt.config or {}).get(k) for k in ("augment", "mean", "std")} if dataset == ckpt.dataset else {}
    cfg = DataConfig(dataset=dataset, data_dir=args.data_dir, batch_size=args.batch_size, workers=args.workers,
                     image_size=image_size, **same)
    _, val, info = build_datasets(cfg)
    if info.num_classes != int(ckpt.num_classes):
        raise ConfigError(
            f"{args.checkpoint} has {ckpt.num_classes} classes but {info.name} has {info.num_classes}; "
            "pass the --dataset it was trained on"
        )
    loader = DataLoader(val, batch_size=args.batch_size, shuffle=False, num_workers=args.workers)
    report = evaluate(model.to(device), loader, device, max_batches=args.max_batches)
    out = {"checkpoint": str(args.checkpoint), "model": ckpt.model_name, "dataset": info.name, **report}
    ckpt_path = Path(args.checkpoint).resolve()
    if (ckpt_path.parent / "cascade.pt").is_file() and ckpt_path.name == "last.pt":
        # a width cascade's run: its thresholds and BatchNorm statistics belong to the final model
        cascade = WidthCascade.from_state(model, load_checkpoint(ckpt_path.parent / "cascade.pt"))
        out["cascade"] = cascade.report(loader, device, max_batches=args.max_batches)
    out_dir = Path(args.out) if args.out else ckpt_path.parent / f"eval_{ckpt_path.stem}"
    written = write_report(out, out_dir)
    if args.json:
        print_json(out)
    else:
        print_table(_table(out) + [("written", ", ".join(str(p) for p in written))])
    return 0
