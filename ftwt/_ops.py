"""The op table that surgery and the sparse engine share: norms, activations, the unit pattern, tracing.

A *unit* is ``Conv2d [-> norm] [-> activation]``: the gate masks the norm's output (or the
convolution's), the activation after it is where labels are read. Surgery finds units with
:func:`unit_pattern` and stores them as :class:`~ftwt.unit.UnitSpec`; the engine compiles the
stored specs of gated units and uses the same pattern for the convolutions without a gate.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ftwt.errors import UnsupportedLayerError

# Norms a unit may end in; in eval mode both are the same per-channel affine map (foldable).
NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)


@dataclass(frozen=True)
class Activation:
    """A zero-preserving activation a unit may end in (so masking before it equals masking after)."""

    fn: Callable[[torch.Tensor], torch.Tensor]  # out of place
    inplace: Callable[[torch.Tensor], torch.Tensor]  # may overwrite its input (a fresh buffer)
    nonneg: bool  # output >= 0 for every input


ACTIVATIONS: dict[str, Activation] = {
    "relu": Activation(F.relu, torch.relu_, True),
    "relu6": Activation(F.relu6, lambda t: F.hardtanh_(t, 0.0, 6.0), True),
    "hardswish": Activation(F.hardswish, lambda t: F.hardswish(t, inplace=True), False),
    "silu": Activation(F.silu, lambda t: F.silu(t, inplace=True), False),
    "gelu": Activation(F.gelu, F.gelu, False),
    "gelu_tanh": Activation(partial(F.gelu, approximate="tanh"), partial(F.gelu, approximate="tanh"), False),
}
_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardswish: "hardswish", nn.SiLU: "silu", nn.GELU: "gelu"}
_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.hardswish: "hardswish", F.silu: "silu",
              F.gelu: "gelu"}
_METHODS = {"relu": "relu", "relu_": "relu"}
_KWARGS = {"inplace", "approximate"}


def _gelu(name: str, approximate: object) -> str | None:
    if name != "gelu" or approximate in (None, "none"):
        return name
    return "gelu_tanh" if approximate == "tanh" else None


def activation(node: torch.fx.Node, modules: dict[str, nn.Module], strict: bool = False) -> str | None:
    """The key of :data:`ACTIVATIONS` that ``node`` applies, or None.

    Args:
        node: a traced node.
        modules: the traced module's ``named_modules()``.
        strict: also require a single tensor argument (no positional extras, no keywords
            besides ``inplace`` and ``approximate``), as the engine needs to run it itself.
    """
    if strict and (len(node.args) != 1 or set(node.kwargs) - _KWARGS):
        return None
    if node.op == "call_module":
        module = modules[node.target]
        name = _MODULES.get(type(module))
        return _gelu(name, getattr(module, "approximate", None)) if name else None
    if node.op == "call_function" and node.target in _FUNCTIONS:
        return _gelu(_FUNCTIONS[node.target], node.kwargs.get("approximate"))
    if node.op == "call_method":
        return _METHODS.get(node.target)
    return None


def norm_after(node: torch.fx.Node, modules: dict[str, nn.Module]) -> torch.fx.Node | None:
    """The norm node that is the only consumer of ``node``'s output, or None."""
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_module" and isinstance(modules[users[0].target], NORMS):
        return users[0]
    return None


def act_after(tail: torch.fx.Node, modules: dict[str, nn.Module], strict: bool = False) -> torch.fx.Node | None:
    """The activation node that is the only consumer of ``tail`` (and takes it first), or None."""
    after = list(tail.users)
    if len(after) == 1 and after[0].args and after[0].args[0] is tail and activation(after[0], modules, strict):
        return after[0]
    return None


_ADDS = {operator.add, operator.iadd, torch.add}


def _is_add(node: torch.fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADDS) or (
        node.op == "call_method" and node.target in ("add", "add_"))


def feeds_add(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node``'s output reaches an addition before any conv or linear layer.

    Such a unit writes a residual stream (a ResNet stem, the last conv of a block):
    the next convolution sees the union of both branches, so its masks thin little.
    """
    seen, todo = set(), list(node.users)
    while todo:
        user = todo.pop()
        if user in seen:
            continue
        seen.add(user)
        if _is_add(user):
            return True
        if user.op == "call_module" and isinstance(modules[user.target], (nn.Conv2d, nn.Linear)):
            continue
        todo.extend(user.users)
    return False


def trace(model: nn.Module) -> torch.fx.GraphModule:
    """``torch.fx.symbolic_trace(model)``, or one :class:`UnsupportedLayerError` that says what to do."""
    try:
        return torch.fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types for untraceable Python
        raise UnsupportedLayerError(
            f"could not trace {type(model).__name__} with torch.fx ({type(exc).__name__}: {exc}); "
            "pass the units explicitly: attach_gates(model, units=[UnitSpec(conv=..., norm=..., act=...)])"
        ) from exc
