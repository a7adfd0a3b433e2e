"""Arguments and helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftwt.checkpoint import load_checkpoint, load_state_dict_into
from ftwt.errors import ConfigError, DeviceError
from ftwt.gate import GateConfig
from ftwt.models import get_model
from ftwt.surgery import GATES_ATTR, attach_gates

CIFAR_INPUT = (3, 32, 32)
IMAGENET_INPUT = (3, 224, 224)


def add_model_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", required=required, help="registry name (see list_models) or torchvision:NAME")
    group.add_argument("--num-classes", type=int, default=None, help="classifier outputs (default: the data's)")
    group.add_argument("--init", metavar="CKPT", default=None, help="dense weights to start from (.pt or .safetensors)")


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


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU is an error a user can act on."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for but CUDA is not available on this machine; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {name!r}: {exc}") from None


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


def build_model(name: str, num_classes: int, init: str | None = None) -> nn.Module:
    """A registry or torchvision model, with dense weights from ``init`` if given."""
    model = get_model(name, num_classes=num_classes)
    if init is not None:
        if not Path(init).is_file():
            raise ConfigError(f"checkpoint not found: {init}")
        load_state_dict_into(model, load_checkpoint(init), strict=True, ignore_prefixes=(GATES_ATTR + ".",))
    return model


def load_trained(path: str) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model written by ``ftwt train`` (gated or dense) from its checkpoint.

    The checkpoint holds ``model_name``, ``num_classes``, ``gate_config`` (None for a
    dense model) and ``model`` (the state_dict).
    """
    ckpt = load_checkpoint(path)
    missing = [k for k in ("model_name", "num_classes", "model") if k not in ckpt]
    if missing:
        raise ConfigError(f"{path} is not an ftwt training checkpoint (missing {missing}); use --init for plain weights")
    model = get_model(ckpt["model_name"], num_classes=int(ckpt["num_classes"]))
    if ckpt.get("gate_config"):
        attach_gates(model, GateConfig.from_dict(ckpt["gate_config"]))
    load_state_dict_into(model, ckpt["model"], strict=True)
    return model, ckpt


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=float)
    sys.stdout.write("\n")


def print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
