"""``ftwt bench``: real latency of dynamic pruning against dense, masked and static models.

Either a trained gated checkpoint (``--checkpoint``, masks from its gates) or a model and
a mass threshold (``--model NAME --mass R``, ground-truth masks at ``R``: the speed of
perfect gates). Times the dense model, the reference-style masked forward, the sparse
engine and a Torch-Pruning static model of the same mean FLOPs, on samples of the
checkpoint's data set (the embedded digits by default, resized to the model's input).
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import torch

from ftwt.bench import benchmark, describe_machine
from ftwt.cli._common import (
    add_json_arg,
    add_shortcut_arg,
    default_input_size,
    load_trained_model,
    model_kwargs,
    positive,
    print_json,
    print_table,
    unit_interval,
)
from ftwt.data import DataConfig, build_datasets
from ftwt.errors import ConfigError
from ftwt.gate import GateConfig
from ftwt.surgery import attach_gates, is_gated, set_threshold
from ftwt.train import load_model
from ftwt.train.runtime import resolve_device

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="latency: dense vs masked vs sparse engine vs static", description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a gated checkpoint written by ftwt train (masks from its gates)")
    src.add_argument("--model", help="registry name, torchvision:NAME or package.module:factory (ground-truth masks at --mass)")
    p.add_argument("--mass", "--threshold", dest="mass", type=unit_interval, default=None,
                   help="mass threshold r: ground-truth masks at r (required with --model)")
    p.add_argument("--init", metavar="CKPT", default=None, help="dense weights for --model (.pt or .safetensors)")
    add_shortcut_arg(p, "the checkpoint's, else avgpool")
    p.add_argument("--num-classes", type=positive(int), default=None, help="classifier outputs (default: the data's)")
    group = p.add_argument_group("data")
    group.add_argument("--dataset", default=None, help="digits (embedded), cifar10, cifar100 or folder "
                                                       "(default: the checkpoint's, else digits)")
    group.add_argument("--data-dir", default=None, help="dataset root (CIFAR files or an ImageNet-style folder)")
    group.add_argument("--samples", type=positive(int), default=32, help="validation samples to cycle over")
    timing = p.add_argument_group("timing")
    timing.add_argument("--batch-size", type=positive(int), default=1, help="samples per timed call")
    timing.add_argument("--threads", type=positive(int), default=None, help="CPU threads (default: torch's)")
    timing.add_argument("--device", default="cpu", help="cpu or cuda")
    timing.add_argument("--round-to", type=positive(int), default=1,
                        help="engine: round active channel counts up to a multiple of K")
    timing.add_argument("--kernel", default="auto", choices=("auto", "native", "torch"),
                        help="engine kernels: auto (the fastest per layer, timed on the first input), native (fused, "
                             "compiled once) or torch (PyTorch ops)")
    timing.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per variant, at least")
    timing.add_argument("--importance", default="l1", choices=("l1", "l2", "random"),
                        help="channel ranking of the static model")
    add_json_arg(p)
    p.set_defaults(func=run)


def _load(args: argparse.Namespace) -> tuple[torch.nn.Module | None, str, str, str, tuple[int, ...]]:
    """Gated model, model name, mask source, data set and input size from the arguments.

    The model is None with ``--model``: it is built once the data says how many classes.
    """
    if args.checkpoint is not None:
        if args.init is not None or args.num_classes is not None:
            raise ConfigError("--init and --num-classes go with --model; a checkpoint carries its own weights")
        model, ckpt = load_trained_model(args.checkpoint, args)
        name, trained_on = ckpt.model_name, ckpt.dataset or "digits"
        dataset = args.dataset or trained_on
        size = ckpt.input_size
        # The checkpoint's input size only applies to the data it was trained on.
        shape = tuple(int(s) for s in size) if size and dataset == trained_on else default_input_size(name)
        if args.mass is not None:
            if not is_gated(model):
                attach_gates(model, GateConfig(threshold=args.mass))
            set_threshold(model, args.mass, "mass")
            return model, name, "ground_truth", dataset, shape
        if not is_gated(model):
            raise ConfigError(f"{args.checkpoint} holds a dense model; add --mass R to time perfect gates at R")
        return model, name, "gate", dataset, shape
    if args.mass is None:
        raise ConfigError("--model needs --mass R (the mass threshold whose ground-truth masks are replayed)")
    return None, args.model, "ground_truth", args.dataset or "digits", default_input_size(args.model)


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)  # first: no data loading before a "no CUDA" error
    if args.min_run_time <= 0:
        raise ConfigError(f"--min-run-time must be > 0, got {args.min_run_time}")
    model, name, masks, dataset, shape = _load(args)
    _, val, info = build_datasets(DataConfig(dataset=dataset, data_dir=args.data_dir, image_size=shape[-1],
                                             val_subset=args.samples))
    if model is None:
        model = load_model(name, args.num_classes or info.num_classes, args.init, **model_kwargs(args))
        if args.init is None:
            log.warning("no --init given: ground-truth masks of untrained weights; pass a trained dense checkpoint")
        attach_gates(model, GateConfig(threshold=args.mass))
    inputs = torch.stack([val[i][0] for i in range(len(val))])
    result = benchmark(
        model, inputs, masks=masks, batch_size=args.batch_size, threads=args.threads, device=device,
        round_to=args.round_to, min_run_time=args.min_run_time, importance=args.importance, kernel=args.kernel,
    )
    out = {"model": name, "checkpoint": args.checkpoint, "mass": args.mass, "dataset": info.name, **result}
    if args.json:
        print_json(out)
    else:
        print_table(_rows(out))
    return 0


def _rows(out: dict[str, Any]) -> list[tuple[str, str]]:
    source = "gates' predictions" if out["masks"] == "gate" else f"ground truth at r = {out['mass']} (perfect gates)"
    return [
        ("model", out["model"] + (f" ({out['checkpoint']})" if out["checkpoint"] else "")),
        ("masks", f"{source}, {out['samples']} {out['dataset']} samples"),
        ("machine", f"{describe_machine(out['machine'])}; {out['threads']} threads, batch {out['batch_size']}, "
                    f"{out['device']}"),
        ("MACs", f"dense {out['dense_macs'] / 1e6:.2f}M, dynamic {out['dynamic_macs'] / 1e6:.2f}M "
                 f"({out['flops_reduction']:.1%} reduction), static {out['static_macs'] / 1e6:.2f}M"),
        ("engine_macs", f"{out['engine_executed_macs'] / 1e6:.2f}M executed (FlopCounterMode; gates' pooling "
                        "not counted; above the honest count where units run densely)"),
        ("dense_ms", f"{out['dense_ms']:.3f} ({out['dense_tricks']})"),
        ("masked_ms", f"{out['masked_ms']:.3f} ({out['masked_speedup']:.2f}x)"),
        ("engine_ms", f"{out['engine_ms']:.3f} (kernels: {out['engine_kernels']}"
                      f"{'' if out.get('engine_isa') is None else ', ' + out['engine_isa'] + ' build'}; logits vs masked: max |diff| "
                      f"{out['engine_max_abs_diff']:.1e}, relative {out['engine_rel_diff']:.1e})"),
        ("static_ms", f"{out['static_ms']:.3f} ({out['static_speedup']:.2f}x; {out['static_tricks']})"),
        ("ideal_speedup", f"{out['ideal_speedup']:.2f}x (dense / dynamic MACs)"),
        ("speedup", f"{out['speedup']:.2f}x (dense / engine; {out['realized_fraction']:.0%} of ideal)"),
        ("engine_vs_static", f"{out['engine_vs_static']:.2f} (engine / static time; < 1: the engine wins)"),
    ]
