"""``ftwt train``: train a dense baseline or FTWT gates from a recipe and/or flags.

Settings are layered: TrainConfig defaults, then the ``--resume`` checkpoint's config, then the
``--preset`` (``cascade``: the recommended mode; ``ftwt+``: per-input gates), then
the ``--config`` recipe (a YAML path or a shipped recipe name such as
``cifar10_resnet56_r0.80_decoupled``), then the flags given. Writes ``config.yaml``,
``metrics.jsonl``, ``last.pt``, ``best.pt`` and ``report.json`` into ``--out``. For several
processes, launch with torchrun: ``torchrun --nproc_per_node 4 -m ftwt train ...``.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any

from ftwt.cli._common import add_folder_args, add_shortcut_arg, print_json, print_table
from ftwt.errors import ConfigError
from ftwt.train import PRESETS, TrainConfig, Trainer, list_recipes, load_recipe
from ftwt.train.loggers import LOGGERS, make_logger

_KEYS = {f.name for f in fields(TrainConfig)}
_BOOL = argparse.BooleanOptionalAction


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a dense baseline or FTWT gates", description=__doc__,
                       argument_default=argparse.SUPPRESS)
    p.add_argument("--config", metavar="RECIPE", default=None,
                   help=f"recipe YAML file or shipped name ({', '.join(list_recipes())})")
    p.add_argument("--resume", metavar="CKPT", default=None,
                   help="continue the run saved in OUT/last.pt exactly (its config is the base)")

    g = p.add_argument_group("model")
    g.add_argument("--model", help="registry name, torchvision:NAME or package.module:factory (default resnet56)")
    g.add_argument("--num-classes", dest="num_classes", type=int, help="classifier outputs (default: the data's)")
    g.add_argument("--init", metavar="CKPT", help="dense checkpoint to start from (FTWT fine-tunes a trained model)")
    add_shortcut_arg(g)

    g = p.add_argument_group("data")
    g.add_argument("--dataset", help="digits (embedded, default), cifar10, cifar100 or folder")
    g.add_argument("--data-dir", dest="data_dir", help="dataset root")
    g.add_argument("--download", action=_BOOL, help="let torchvision download CIFAR")
    g.add_argument("--image-size", dest="image_size", type=int, help="input size (default: the dataset's)")
    add_folder_args(g)
    g.add_argument("--batch-size", dest="batch_size", type=int, help="per process (default 128)")
    g.add_argument("--workers", type=int, help="DataLoader worker processes (default 2)")
    g.add_argument("--train-subset", dest="train_subset", type=int, help="first N training samples only")
    g.add_argument("--val-subset", dest="val_subset", type=int, help="first N validation samples only")

    g = p.add_argument_group("gates")
    g.add_argument("--dense", action=_BOOL, help="train without gates (the baseline)")
    g.add_argument("--mode", help="decoupled (default) or joint")
    g.add_argument("--criterion", help="mass (default) or uniform")
    g.add_argument("--mass", "--threshold", dest="threshold", type=float,
                   help="mass threshold r in (0, 1] (uniform: ratio rho); default 0.9")
    g.add_argument("--include", help="comma-separated globs of convolutions to gate, e.g. 'layer2.*,layer3.*' "
                   "(default: every one that can help; squeeze-excite and LayerNorm-fed convs are left dense)")
    g.add_argument("--exclude", help="comma-separated globs of convolutions to leave dense, e.g. 'conv1,*downsample*'")
    g.add_argument("--gate-pool", dest="gate_pool", type=int, help="gate input pooled to d x d (default 1)")
    g.add_argument("--gate-softmax", dest="gate_softmax", action=_BOOL, help="softmax over pooled features (default on)")
    g.add_argument("--gate-embed", dest="gate_embed", type=int, help="target gate embedding size (sets d per unit)")
    g.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="a method preset applied before the recipe and flags: cascade is the recommended mode "
                   "(a width cascade), ftwt+ per-input gates")
    g.add_argument("--gate-features", dest="gate_features", help="avg (default) or avgmax")
    g.add_argument("--gate-hidden", dest="gate_hidden", type=int, help="hidden layer width in each gate (default 0)")
    g.add_argument("--gate-rule", dest="gate_rule", help="threshold (default), topk or budget (with --criterion uniform)")
    g.add_argument("--gate-saliency", dest="gate_saliency",
                   help="none (default); scale: a second gate head scales each kept filter; rank: and picks them")
    g.add_argument("--gate-offset", dest="gate_offset", action=_BOOL,
                   help="a per-sample offset of each unit's logits (with --gate-rule budget: how many filters it keeps)")
    g.add_argument("--gate-dynamic", dest="gate_dynamic", type=float,
                   help="with --gate-rule topk: share of each input's filters its gate picks; the rest, the unit's "
                   "strongest by L1 x |gamma|, are a static core computed for every input (default 1: all picked)")
    g.add_argument("--gate-ste", dest="gate_ste", action=_BOOL, help="task loss trains the gates (straight-through)")
    g.add_argument("--gate-scope", dest="gate_scope", help="all (default) or internal (skip units feeding a residual add)")
    g.add_argument("--gate-init", dest="gate_init", help="random (default) or weights: start as the static L1 choice")
    g.add_argument("--gate-warmup", dest="gate_warmup", type=int,
                   help="steps fitting the gates to the init model's labels before training (default 0)")
    g.add_argument("--masks", help="gate (default) or ground_truth: the oracle bound, perfect gates")
    g.add_argument("--cascade", type=float,
                   help="train a width cascade of this honest FLOPs reduction (0-1): the gates' masks for every "
                   "input, every filter for the inputs the core is unsure of; writes cascade.pt")
    g.add_argument("--cascade-holdout", dest="cascade_holdout", type=float,
                   help="share of the training set held out to set the cascade's threshold (default 0.1)")
    g.add_argument("--lam", type=float, help="mask-loss weight until cooldown (default 1)")
    g.add_argument("--cooldown", type=float,
                   help="epoch from which gates are frozen; below 1 a share of the epochs (default: half)")
    g.add_argument("--balance-loss", dest="balance_loss", action=_BOOL, help="class-balanced mask loss")
    g.add_argument("--calibrate", action=_BOOL, help="at cooldown, match each gate's kept fraction to its labels'")
    g.add_argument("--calibrate-batches", dest="calibrate_batches", type=int,
                   help="training batches per process and round for --calibrate (default 100)")
    g.add_argument("--estimate-samples", dest="estimate_samples", type=int,
                   help="training samples for the FLOPs estimate before training (default 256)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help="default 200")
    g.add_argument("--lr", type=float, help="backbone lr (default 0.01 FTWT, 0.1 dense)")
    g.add_argument("--momentum", type=float, help="backbone SGD momentum (default 0.9)")
    g.add_argument("--weight-decay", dest="weight_decay", type=float, help="backbone weight decay (default 5e-4)")
    g.add_argument("--schedule", help="step or cosine (default: step FTWT, cosine dense)")
    g.add_argument("--milestones", type=float, nargs="+",
                   help="step-schedule epochs; values below 1 are fractions of the epochs")
    g.add_argument("--gamma", type=float, help="lr factor at each milestone (default 0.1)")
    g.add_argument("--gate-lr", dest="gate_lr", type=float, help="gate lr (default 0.1)")
    g.add_argument("--gate-momentum", dest="gate_momentum", type=float, help="gate SGD momentum (default 0.9)")
    g.add_argument("--amp", action=_BOOL, help="mixed precision (CUDA only)")
    g.add_argument("--sync-bn", dest="sync_bn", action=_BOOL, help="SyncBatchNorm under torchrun (CUDA)")
    g.add_argument("--flops-every", dest="flops_every", type=int, help="count training FLOPs every N batches")
    g.add_argument("--seed", type=int, help="default 0")
    g.add_argument("--skip-nonfinite", dest="skip_nonfinite", action=_BOOL,
                   help="skip batches whose loss is inf/NaN (counted as skipped_nonfinite) instead of stopping")

    g = p.add_argument_group("output")
    g.add_argument("--out", dest="out_dir", metavar="DIR", help="output folder (default runs/train)")
    g.add_argument("--overwrite", action=_BOOL, help="start afresh in a folder that already holds a run")
    g.add_argument("--save-every", dest="save_every", type=int, metavar="N",
                   help="also write last.pt every N training steps, for long epochs (default: at epoch ends)")
    g.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    g.add_argument("--progress", action=_BOOL, help="progress bar (default on)")
    g.add_argument("--json", action="store_true", default=False, help="print the final report as JSON")
    g.add_argument("--logger", choices=LOGGERS, default=None,
                   help="also log each epoch to OUT/metrics.csv or TensorBoard (OUT/tensorboard, if installed)")
    p.set_defaults(func=run)


def _recipe(name: str) -> dict[str, Any]:
    recipe = load_recipe(name)
    unknown = sorted(set(recipe) - _KEYS)
    if unknown:
        raise ConfigError(f"unknown recipe key(s) {unknown} in {name}; known keys: {', '.join(sorted(_KEYS))}")
    return recipe


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def run(args: argparse.Namespace) -> int:
    flags = {k: v for k, v in vars(args).items() if k in _KEYS}
    preset = PRESETS[args.preset] if getattr(args, "preset", None) else {}
    settings = {**preset, **(_recipe(args.config) if args.config else {}), **flags}
    # made first: a missing TensorBoard stops before any training
    callbacks = [make_logger(args.logger)] if args.logger else []
    if args.resume:
        trainer = Trainer.resume(args.resume, settings, callbacks)
    else:
        trainer = Trainer(TrainConfig.from_dict(settings), callbacks)
    report = trainer.fit()
    if not trainer.is_main:
        return 0
    if args.json:
        print_json(report)
        return 0
    cfg = trainer.config
    rows = [
        ("model", f"{cfg.model} on {report['dataset']}, {cfg.epochs} epochs"),
        ("gates", "none (dense)" if cfg.dense else f"{cfg.mode}, {cfg.criterion} {cfg.threshold:g}"),
        ("top-1 (final / best)", f"{report['top1']:.2f}% / {report['best_top1']:.2f}%"),
        ("FLOPs reduction", f"{_pct(report['flops_reduction'])} achieved, {_pct(report['estimated_reduction'])} "
                            "estimated before training"),
        ("output", str(trainer.out)),
    ]
    if report.get("gate_lift") is not None:
        lift = report["gate_lift"]
        rows.insert(-1, ("dynamic?", f"decisions vary for {report['varying_fraction']:.1%} of filters; gate lift "
                                     f"{100 * lift:+.1f} pts over each filter's prior"
                                     + ("" if lift > 0 else " (no better than each filter's majority label)")))
    if report.get("cascade"):
        c = report["cascade"]
        rows.insert(-1, ("cascade", f"top-1 {c['top1']:.2f}% at {_pct(c['flops_reduction'])} honest reduction: "
                                    f"{c['escalated']:.1%} of inputs ran every filter (core alone {c['core_top1']:.2f}%); "
                                    f"exit decision lift {100 * c['gate_lift']:+.1f} pts; decisions vary for "
                                    f"{c['varying_fraction']:.1%} of filters"))
    print_table(rows)
    return 0
