"""Model surgery: find the gateable units of any CNN, attach gates, take them off again.

Units are found on the model's ``torch.fx`` graph: every ``nn.Conv2d`` whose output goes
to a BatchNorm (or straight on), optionally followed by an activation. Gates live in one
submodule, ``model.ftwt_gates``, and act through forward hooks, so the model's own
modules, names and state_dict keys stay as they were: a dense checkpoint loads into a
gated model, and :func:`detach_gates` gives back the original model exactly.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from fnmatch import fnmatch

import torch
from torch import nn

from ftwt._ops import NORMS, act_after, activation, feeds_add, trace
from ftwt._placement import skip_reason
from ftwt.errors import ConfigError, UnsupportedLayerError
from ftwt.gate import GateConfig
from ftwt.record import record
from ftwt.unit import GatedUnit, UnitSpec

log = logging.getLogger(__name__)

GATES_ATTR = "ftwt_gates"
_LABEL_MODES = {"train": None, "always": True, "never": False}


def _selected(name: str, include: Sequence[str] | None, exclude: Sequence[str]) -> bool:
    if include is not None and not any(fnmatch(name, p) for p in include):
        return False
    return not any(fnmatch(name, p) for p in exclude)


def find_units(
    model: nn.Module, include: Sequence[str] | None = None, exclude: Sequence[str] = (), scope: str = "all",
    skip_unhelpful: bool = True,
) -> list[UnitSpec]:
    """Find the gateable units of ``model`` in forward order.

    A unit is ``Conv2d [-> BatchNorm2d] [-> activation]``; whatever follows (a residual
    add, a concatenation, pooling) is left alone, the mask acts before it. Grouped and
    depthwise convolutions are units like any other.

    Args:
        model: any ``nn.Module`` that ``torch.fx.symbolic_trace`` can trace.
        include: glob patterns of convolution names to gate (default: all).
        exclude: glob patterns of convolution names not to gate.
        scope: ``"all"``, or ``"internal"``: skip units whose output feeds a residual add.
            Behind an add the next convolution sees the union of both branches, so pruning
            such a unit's filters saves little; a block's internal channels save in two
            convolutions (the block's first, and the input side of the next).
        skip_unhelpful: leave squeeze-excite convolutions and those feeding a LayerNorm or
            GroupNorm dense (see :func:`skipped_units`); each is logged with the reason.
            ``include`` patterns that name such a unit gate it anyway.

    Returns:
        One :class:`UnitSpec` per gated convolution.

    Raises:
        UnsupportedLayerError: a selected layer cannot be gated; the message names it.
    """
    units, skipped = _plan(model, include, exclude, scope, skip_unhelpful)
    for name, reason in skipped:
        log.info("left dense: %s (%s)", name, reason)
    return units


def skipped_units(
    model: nn.Module, include: Sequence[str] | None = None, exclude: Sequence[str] = (), scope: str = "all"
) -> list[tuple[str, str]]:
    """The convolutions :func:`find_units` leaves dense by default, each with the reason.

    Example:
        >>> skipped_units(torchvision.models.efficientnet_b0())[0]
        ('features.1.0.block.1.fc1', 'squeeze-excite (gate costs more than the conv; sigmoid(0) = 0.5)')
    """
    return _plan(model, include, exclude, scope, True)[1]


def _plan(model: nn.Module, include: Sequence[str] | None, exclude: Sequence[str], scope: str,
          skip_unhelpful: bool) -> tuple[list[UnitSpec], list[tuple[str, str]]]:
    gm = trace(model)
    modules = dict(gm.named_modules())
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    units: list[UnitSpec] = []
    skipped: list[tuple[str, str]] = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        name = node.target
        module = modules[name]
        if not isinstance(module, nn.modules.conv._ConvNd) or not _selected(name, include, exclude):
            continue
        if type(module) is not nn.Conv2d:
            raise UnsupportedLayerError(
                f"{name}: {type(module).__name__} cannot be gated (only nn.Conv2d); exclude it with exclude=[{name!r}]"
            )
        if calls[name] > 1:
            raise UnsupportedLayerError(
                f"{name}: the same Conv2d is called {calls[name]} times per forward, so one gate cannot serve it; "
                f"exclude it with exclude=[{name!r}]"
            )
        users = list(node.users)
        norm_users = [u for u in users if u.op == "call_module" and isinstance(modules[u.target], NORMS)]
        tail, norm = node, None
        if norm_users:
            if len(users) > 1 or calls[norm_users[0].target] > 1:
                raise UnsupportedLayerError(
                    f"{name}: its output feeds {norm_users[0].target} and other layers (or that norm is shared), "
                    f"so no mask can zero it after the norm; exclude it with exclude=[{name!r}]"
                )
            tail, norm = norm_users[0], norm_users[0].target
        act_node = act_after(tail, modules)
        act = activation(act_node, modules) if act_node is not None else None
        if scope == "internal" and feeds_add(act_node if act_node is not None else tail, modules):
            continue
        reason = skip_reason(node, act_node if act_node is not None else tail, modules) if skip_unhelpful else None
        if reason is not None and not (include is not None and name in include):
            skipped.append((name, reason))
            continue
        units.append(UnitSpec(conv=name, norm=norm, act=act))
    return units, skipped


def _key(name: str) -> str:
    return name.replace(".", "__")


def attach_gates(
    model: nn.Module,
    config: GateConfig | None = None,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    units: Sequence[UnitSpec] | None = None,
    skip_unhelpful: bool = True,
) -> nn.Module:
    """Give every gateable convolution of ``model`` an FTWT gate, in place.

    Args:
        model: the network; its modules and parameters are left untouched.
        config: gate settings (default :class:`GateConfig`).
        include: glob patterns of convolution names to gate (default: all).
        exclude: glob patterns of convolution names to leave dense.
            ``config.scope`` narrows the units further (see :func:`find_units`).
        units: explicit units, for models ``torch.fx`` cannot trace.
        skip_unhelpful: leave squeeze-excite convolutions and convolutions feeding a
            LayerNorm/GroupNorm dense (logged; see :func:`skipped_units`).

    Returns:
        ``model`` itself, now with a ``ftwt_gates`` submodule.

    Example:
        >>> import torchvision
        >>> model = attach_gates(torchvision.models.resnet18(), GateConfig(threshold=0.9))
        >>> len(gated_units(model))
        20
    """
    if hasattr(model, GATES_ATTR):
        raise ConfigError("model already has gates; call detach_gates(model) first")
    config = config or GateConfig()
    specs = list(units) if units is not None else find_units(model, include, exclude, config.scope, skip_unhelpful)
    if not specs:
        raise UnsupportedLayerError(f"{type(model).__name__}: no Conv2d to gate (include={include}, exclude={exclude})")
    named = dict(model.named_modules())
    gates = nn.ModuleDict()
    for spec in specs:
        for part in (spec.conv, spec.norm):
            if part is not None and part not in named:
                raise UnsupportedLayerError(f"{part}: no such module in {type(model).__name__}")
        conv = named[spec.conv]
        if not isinstance(conv, nn.Conv2d):
            raise UnsupportedLayerError(f"{spec.conv}: {type(conv).__name__} is not an nn.Conv2d")
        unit = GatedUnit(spec, conv, config).to(device=conv.weight.device, dtype=conv.weight.dtype)
        if config.dynamic < 1.0:
            unit.set_core(_importance(named, spec))
        unit._handles = [
            conv.register_forward_pre_hook(unit._on_input),
            named[spec.tail].register_forward_hook(unit._on_output),
        ]
        gates[_key(spec.conv)] = unit
    setattr(model, GATES_ATTR, gates)
    gates.train(model.training)
    return model


def detach_gates(model: nn.Module) -> nn.Module:
    """Remove the gates and their hooks; the model computes exactly what it did before."""
    gates = getattr(model, GATES_ATTR, None)
    if gates is None:
        raise ConfigError("model has no gates to detach")
    for unit in gates.values():
        for handle in unit._handles:
            handle.remove()
        unit._handles = []
    delattr(model, GATES_ATTR)
    return model


def is_gated(model: nn.Module) -> bool:
    return hasattr(model, GATES_ATTR)


def gated_units(model: nn.Module) -> list[GatedUnit]:
    """The model's gated units, in forward order."""
    gates = getattr(model, GATES_ATTR, None)
    if gates is None:
        raise ConfigError("model has no gates; call attach_gates(model) first")
    return list(gates.values())


def gate_config(model: nn.Module) -> GateConfig:
    """The :class:`GateConfig` the gates were attached with, with the first unit's current
    criterion, threshold and decision."""
    unit = gated_units(model)[0]
    return unit.config.replace(criterion=unit.criterion, threshold=unit.threshold, decision=unit.decision)


def set_threshold(model: nn.Module, threshold: float, criterion: str | None = None) -> None:
    """Change the ground-truth threshold (and criterion) of every unit."""
    units = gated_units(model)
    criterion = criterion or units[0].criterion
    units[0].config.replace(criterion=criterion, threshold=threshold)  # validates
    for unit in units:
        unit.criterion, unit.threshold = criterion, float(threshold)


def set_decision(model: nn.Module, decision: float | Sequence[float]) -> None:
    """Set the sigmoid probability above which a filter is computed (one value or one per unit)."""
    units = gated_units(model)
    values = [decision] * len(units) if isinstance(decision, (int, float)) else list(decision)
    if len(values) != len(units):
        raise ConfigError(f"got {len(values)} decision thresholds for {len(units)} units")
    for unit, value in zip(units, values, strict=True):
        unit.config.replace(decision=value)  # validates
        unit.decision = float(value)


@contextlib.contextmanager
def mask_source(model: nn.Module, source: str, labels: str | None = None) -> Iterator[None]:
    """Temporarily choose which mask the units apply: :func:`ftwt.record` with string modes.

    Args:
        model: a gated model.
        source: ``"gate"`` (predicted, the default), ``"ground_truth"`` (perfect gates) or
            ``"none"`` (dense).
        labels: optionally also set when labels are computed: ``"train"``, ``"always"``,
            ``"never"``.
    """
    if labels is not None:
        _label_mode(labels)  # validates
    with record(model, masks=source, labels={"always": True, "never": False}.get(labels, labels)):
        yield


def _label_mode(mode: str) -> bool | None:
    if mode not in _LABEL_MODES:
        raise ConfigError(f"unknown label mode {mode!r}; choose from {list(_LABEL_MODES)}")
    return _LABEL_MODES[mode]


def set_label_mode(model: nn.Module, mode: str) -> None:
    """When the units compute ground truth outside :func:`ftwt.record`: ``"train"``, ``"always"`` or ``"never"``."""
    value = _label_mode(mode)
    for unit in gated_units(model):
        unit.labels_on = value


def static_importance(model: nn.Module, spec: UnitSpec) -> torch.Tensor:
    """The usual static criterion of each filter of a unit: the L1 norm of its convolution
    weights times its norm's ``|gamma|`` (float64, ``(C_out,)``)."""
    return _importance(dict(model.named_modules()), spec)


def _importance(named: dict[str, nn.Module], spec: UnitSpec) -> torch.Tensor:
    score = named[spec.conv].weight.detach().abs().flatten(1).sum(1).double()
    norm = named.get(spec.norm) if spec.norm else None
    if norm is not None and getattr(norm, "weight", None) is not None:
        score = score * norm.weight.detach().abs().double()
    return score


def init_gates_from_weights(model: nn.Module, strength: float = 1.0) -> None:
    """Start every gate as the static pruner: zero input weights, biases ranking the filters by magnitude.

    A filter's importance is :func:`static_importance`; the biases are its z-scores within the
    unit. With the ``topk`` rule the first masks are then exactly the static choice of filters,
    the same for every input; a gate moves away from it only where the task loss (``ste``)
    says that the input calls for other filters.

    ``strength`` multiplies the biases: below 1 the prior is weaker, so a saliency head
    (``GateConfig.saliency="rank"``) needs a smaller push to swap filters for an input.
    """
    named = dict(model.named_modules())
    with torch.no_grad():
        for unit in gated_units(model):
            score = _importance(named, unit.spec)
            z = (score - score.mean()) / score.std().clamp_min(1e-12) if score.numel() > 1 else score * 0
            unit.gate.fc.weight.zero_()
            unit.gate.fc.bias.copy_((strength * z).to(unit.gate.fc.bias.dtype))


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the gates' decisions (for their own optimizer, frozen at cooldown).

    The saliency heads (``GateConfig.saliency``) are not among them: they scale the output
    and get the task's exact gradient, so they train with the backbone, for every epoch.
    """
    return [p for name, p in getattr(model, GATES_ATTR).named_parameters() if ".scale_fc." not in f".{name}"]


def backbone_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the model without its gates' decisions (the saliency heads included)."""
    gate_ids = {id(p) for p in gate_parameters(model)}
    return [p for p in model.parameters() if id(p) not in gate_ids]


__all__ = [
    "attach_gates",
    "backbone_parameters",
    "detach_gates",
    "find_units",
    "gate_config",
    "gate_parameters",
    "gated_units",
    "init_gates_from_weights",
    "is_gated",
    "mask_source",
    "set_decision",
    "set_label_mode",
    "set_threshold",
    "skipped_units",
    "static_importance",
]
