"""Arguments and helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ftwt.data import AUGMENTS
from ftwt.models.resnet_cifar import SHORTCUTS

CIFAR_INPUT = (3, 32, 32)
IMAGENET_INPUT = (3, 224, 224)


def add_model_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", required=required, help="registry name (see list_models), torchvision:NAME, or your own as package.module:factory")
    group.add_argument("--num-classes", type=int, default=None, help="classifier outputs (default: the data's)")
    group.add_argument("--init", metavar="CKPT", default=None, help="dense weights to start from (.pt or .safetensors)")
    add_shortcut_arg(group)


def add_shortcut_arg(group: argparse._ActionsContainer, default_help: str = "avgpool") -> None:
    group.add_argument("--shortcut", choices=SHORTCUTS, default=argparse.SUPPRESS,
                       help="CIFAR ResNets' option-A shortcut, as the weights were trained: reference (FTWT code: "
                            "pool, zeros after), subsample (x[:, :, ::2, ::2], zeros both sides) or avgpool "
                            f"(pool, zeros both sides); default: {default_help}")


def add_folder_args(group: argparse._ActionsContainer) -> None:
    """--augment, --mean and --std of the folder dataset (absent unless given)."""
    group.add_argument("--augment", choices=AUGMENTS, default=argparse.SUPPRESS,
                       help="folder: cifar (pad-and-crop, flip), imagenet (random-resized crop, flip) or none "
                            "(default: cifar for images up to 64 px, else imagenet)")
    group.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"), default=argparse.SUPPRESS,
                       help="folder: per-channel mean (default: computed from the training folder)")
    group.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"), default=argparse.SUPPRESS,
                       help="folder: per-channel std (with --mean)")


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Builder arguments the flags set (only those given, so other models take none)."""
    return {"shortcut": args.shortcut} if getattr(args, "shortcut", None) else {}


def load_trained_model(path: str, args: argparse.Namespace) -> tuple[Any, Any]:
    """:func:`ftwt.load_trained`, with the builder (--model) and its arguments the flags give replacing the checkpoint's."""
    from ftwt.train import Checkpoint

    ckpt = Checkpoint.load(path)
    if getattr(args, "model", None):
        ckpt.model_name = args.model
    ckpt.model_kwargs = {**(ckpt.model_kwargs or {}), **model_kwargs(args)}
    return ckpt.build_model(), ckpt


def add_data_args(parser: argparse.ArgumentParser, default: str = "digits") -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", default=default, help="digits (embedded), cifar10, cifar100 or folder")
    group.add_argument("--data-dir", default=None, help="dataset root (CIFAR files or an ImageNet-style folder)")
    group.add_argument("--download", action="store_true", help="let torchvision download CIFAR")
    group.add_argument("--batch-size", type=int, default=128)
    group.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")


def add_json_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")


def default_input_size(model_name: str) -> tuple[int, int, int]:
    return IMAGENET_INPUT if model_name.startswith("torchvision:") else CIFAR_INPUT


def positive(kind: type = int):
    """argparse type for strictly positive numbers (``--epochs 0`` is refused up front)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def unit_interval(text: str) -> float:
    """argparse type for a mass threshold in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (PyTorch's shape errors run to many)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=float)
    sys.stdout.write("\n")


def print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
