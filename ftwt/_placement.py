"""Where a gate cannot help: units that :func:`ftwt.surgery.find_units` leaves dense by default.

- A squeeze-excite convolution (its input globally pooled, or its output squashed by a
  sigmoid into channel weights): it runs on one pixel, so its gate costs more than the
  conv saves, and a zero before the sigmoid becomes 0.5, not 0.
- A convolution whose output reaches a LayerNorm or GroupNorm before anything else: the
  norm mixes channels, so the zeros a mask writes come out non-zero (ConvNeXt's blocks).
"""

from __future__ import annotations

import operator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ftwt._ops import activation

_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_POOL_FUNCTIONS = {F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
_SIGMOIDS = (nn.Sigmoid, nn.Hardsigmoid)
_SIGMOID_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid}
_MIXING_NORMS = (nn.LayerNorm, nn.GroupNorm)
# ops that move values around without mixing channels (ConvNeXt permutes before its LayerNorm)
_SHAPE_METHODS = {"permute", "reshape", "view", "flatten", "contiguous", "transpose"}
_SHAPE_FUNCTIONS = {torch.permute, torch.reshape, torch.flatten, torch.transpose, operator.getitem}


def skip_reason(conv: torch.fx.Node, tail: torch.fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """Why the unit ``conv`` (ending at ``tail``) should stay dense, or None to gate it."""
    if _global_pool(_through_acts(conv.args[0], modules, back=True), modules) or _ends_in_sigmoid(tail, modules):
        return "squeeze-excite (gate costs more than the conv; sigmoid(0) = 0.5)"
    norm = _mixing_norm_after(tail, modules)
    if norm is not None:
        return f"feeds {type(modules[norm.target]).__name__} {norm.target!r}, which undoes the mask's zeros"
    return None


def _through_acts(node: object, modules: dict[str, nn.Module], back: bool) -> object:
    while isinstance(node, torch.fx.Node) and activation(node, modules) is not None:
        node = node.args[0] if back else next(iter(node.users), None) if len(node.users) == 1 else None
    return node


def _global_pool(node: object, modules: dict[str, nn.Module]) -> bool:
    if not isinstance(node, torch.fx.Node):
        return False
    if node.op == "call_module" and isinstance(modules[node.target], _POOLS):
        return modules[node.target].output_size in (1, (1, 1))
    if node.op == "call_function" and node.target in _POOL_FUNCTIONS:
        return (node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")) in (1, (1, 1))
    if node.op == "call_method" and node.target == "mean":
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return tuple(dims or ()) in ((2, 3), (-2, -1), [2, 3])
    return False


def _ends_in_sigmoid(tail: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    node = tail
    while len(node.users) == 1:
        node = next(iter(node.users))
        if (node.op == "call_module" and isinstance(modules[node.target], _SIGMOIDS)) or (
                node.op == "call_function" and node.target in _SIGMOID_FUNCTIONS) or (
                node.op == "call_method" and node.target == "sigmoid"):
            return True
        if activation(node, modules) is None:
            return False
    return False


def _mixing_norm_after(tail: torch.fx.Node, modules: dict[str, nn.Module]) -> torch.fx.Node | None:
    node = tail
    while len(node.users) == 1:
        node = next(iter(node.users))
        if node.op == "call_module":
            module = modules[node.target]
            if isinstance(module, _MIXING_NORMS):
                return node
            if type(module).__name__ != "Permute":  # torchvision.ops.misc.Permute
                return None
        elif not ((node.op == "call_method" and node.target in _SHAPE_METHODS)
                  or (node.op == "call_function" and node.target in _SHAPE_FUNCTIONS)):
            return None
    return None


__all__ = ["skip_reason"]
