"""Static pruning yardstick: a physically narrower model of the same FLOPs, by Torch-Pruning.

A dynamic pruner has to beat the best *static* model of the same compute, in accuracy and
in wall-clock time, not just the dense model. This module builds that static model with
the field's standard library, Torch-Pruning (DepGraph, Fang et al., CVPR 2023, arXiv
2301.12900): every prunable channel group loses the same fraction of its channels (L1
magnitude ranking by default), residual couplings are resolved by its dependency graph,
and the classifier keeps its outputs. The fraction is found by bisection so that the
pruned model's dense MACs match a target, typically the mean MACs of a dynamic model.

Torch-Pruning is imported on first use (it is a dependency of ``ftwt``).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ftwt.channel_scatter import ChannelScatter, scatter_pruner, swap_adapted
from ftwt.errors import ConfigError
from ftwt.flops import measure
from ftwt.surgery import detach_gates, is_gated

log = logging.getLogger(__name__)

IMPORTANCES = ("l1", "l2", "random")
# "all": every channel group loses the same share; "internal": only groups with one producing
# convolution (a ResNet block's inner channels), so residual streams keep their width.
SCOPES = ("all", "internal")
_MAX_RATIO = 0.99  # upper end of the ratio search; every group keeps at least one channel anyway


@dataclass
class StaticPruned:
    """A statically pruned model and how close it came to its MACs target.

    Attributes:
        model: the pruned, physically narrower copy (eval mode).
        ratio: the uniform fraction of channels removed from every group (a group may
            lose one rounding step more, see :func:`prune_to_macs`).
        dense_macs: per-sample MACs of the original model.
        macs: per-sample MACs of the pruned model, measured.
        target_macs: the MACs asked for.
    """

    model: nn.Module
    ratio: float
    dense_macs: float
    macs: float
    target_macs: float

    @property
    def reduction(self) -> float:
        """FLOPs reduction of the pruned model relative to the original."""
        return 1.0 - self.macs / self.dense_macs

    @property
    def relative_error(self) -> float:
        """``(macs - target) / target``: how far the pruned model is from the target."""
        return (self.macs - self.target_macs) / self.target_macs


def _tp() -> Any:
    try:
        import torch_pruning
    except ImportError:
        raise ConfigError(
            "static pruning needs Torch-Pruning, which is not installed: pip install torch-pruning"
        ) from None
    return torch_pruning


def _importance(tp: Any, name: str) -> Any:
    if name == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if name == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "random":
        return tp.importance.RandomImportance()
    raise ConfigError(f"unknown importance {name!r}; choose from {list(IMPORTANCES)}")


class _Plan:
    """The channel groups of a model, ranked once, with a MACs formula for any pruning plan.

    Pruning and re-measuring a model for every candidate ratio costs seconds; counting
    the MACs a plan *would* give from the group structure costs microseconds, so the
    search runs on the formula and the model is pruned once, at the end.
    """

    def __init__(self, tp: Any, model: nn.Module, example: torch.Tensor, importance: Any, scope: str = "all") -> None:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        self.graph = tp.DependencyGraph().build_dependency(
            model, example_inputs=example, customized_pruners={ChannelScatter: scatter_pruner(tp)}
        )
        self.layers = self._shapes(model, example)
        self.groups: list[tuple[Any, torch.Tensor]] = []  # (group, channel order: least important first)
        # per group: [(layer, "in"|"out", rank of each of the layer's channels in the group)]
        self.members: list[list[tuple[nn.Module, str, torch.Tensor]]] = []
        for group in self.graph.get_all_groups(ignored_layers=linears, root_module_types=(nn.Conv2d,)):
            imp = importance(group)
            if imp is None:
                continue
            order = torch.argsort(imp.cpu(), stable=True)
            rank = torch.empty_like(order)
            rank[order] = torch.arange(order.numel())
            members = []
            for item in group.items:
                layer = item.dep.target.module
                if layer not in self.layers:
                    continue
                side = "out" if self.graph.is_out_channel_pruning_fn(item.dep.handler) else "in"
                members.append((layer, side, rank[torch.tensor(list(item.root_idxs), dtype=torch.long)]))
            producers = {id(layer) for layer, side, _ in members if side == "out" and isinstance(layer, nn.Conv2d)}
            if scope == "internal" and len(producers) > 1:
                continue  # a residual stream: several convolutions write these channels
            self.groups.append((group, order))
            self.members.append(members)
        self.sizes = [order.numel() for _, order in self.groups]

    @staticmethod
    def _shapes(model: nn.Module, example: torch.Tensor) -> dict[nn.Module, int]:
        """Per-channel-pair MAC factor of every conv and linear layer (kernel area times output positions)."""
        factor: dict[nn.Module, int] = {}

        def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            if isinstance(module, nn.Conv2d):
                factor[module] = module.kernel_size[0] * module.kernel_size[1] * out.shape[2] * out.shape[3]
            else:
                rows = 1
                for d in args[0].shape[1:-1]:
                    rows *= d
                factor[module] = rows

        handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        try:
            with torch.no_grad():
                model(example)
        finally:
            for h in handles:
                h.remove()
        return factor

    def counts(self, ratio: float, round_to: int | None) -> list[int]:
        """Channels each group loses at a uniform ``ratio`` (Torch-Pruning's local rule)."""
        out = []
        for size in self.sizes:
            kept = int(size * (1.0 - ratio))
            if round_to:
                kept -= kept % round_to
            out.append(size - max(kept, round_to or 1))
        return out

    def macs(self, counts: list[int]) -> float:
        pruned: dict[tuple[nn.Module, str], int] = {}
        for members, n in zip(self.members, counts, strict=True):
            for layer, side, rank in members:
                pruned[(layer, side)] = pruned.get((layer, side), 0) + int((rank < n).sum())
        total = 0.0
        for layer, factor in self.layers.items():
            if isinstance(layer, nn.Linear):
                c_in, c_out, groups = layer.in_features, layer.out_features, 1
            else:
                c_in, c_out, groups = layer.in_channels, layer.out_channels, layer.groups
            p_in, p_out = pruned.get((layer, "in"), 0), pruned.get((layer, "out"), 0)
            if groups > 1 and groups == c_in == c_out:  # depthwise: in and out are the same channels
                kept = c_out - max(p_in, p_out)
                total += factor * kept
            else:
                total += factor * (c_in - p_in) // groups * (c_out - p_out)
        return float(total)

    def apply(self, counts: list[int]) -> None:
        for (group, order), n in zip(self.groups, counts, strict=True):
            if n <= 0:
                continue
            root = group[0].dep
            idxs = sorted(int(i) for i in order[:n])
            self.graph.get_pruning_group(root.target.module, root.handler, idxs).prune()


def _search(plan: _Plan, target: float, round_to: int | None, steps: int = 40) -> tuple[float, list[int]]:
    """The uniform ratio, then per-group rounding steps, whose MACs come closest to ``target``."""
    lo, hi = 0.0, _MAX_RATIO  # macs(lo) >= target > macs(hi) is kept invariant
    for _ in range(steps):
        mid = (lo + hi) / 2
        if plan.macs(plan.counts(mid, round_to)) >= target:
            lo = mid
        else:
            hi = mid
    above, below = plan.counts(lo, round_to), plan.counts(hi, round_to)
    # Channel counts are integers, so one uniform ratio reaches only a coarse set of MACs
    # (ResNet-20's 16-channel stage alone moves ~8% per channel). Close the gap by giving
    # some groups the next rounding step, largest savings first, never undershooting.
    def step(counts: list[int], g: int) -> list[int]:
        return [below[i] if i == g else c for i, c in enumerate(counts)]

    counts, current = list(above), plan.macs(above)
    candidates = [g for g in range(len(counts)) if below[g] != above[g]]
    for g in sorted(candidates, key=lambda g: plan.macs(step(above, g))):
        trial = step(counts, g)
        macs = plan.macs(trial)
        if macs >= target:
            counts, current = trial, macs
    # One more step may land closer below the target than we are above it.
    best = (abs(current - target), counts)
    for g in candidates:
        if counts[g] != below[g]:
            err = abs(plan.macs(step(counts, g)) - target)
            if err < best[0]:
                best = (err, step(counts, g))
    return lo, best[1]


def prune_to_macs(
    model: nn.Module,
    example_input: torch.Tensor,
    target_macs: float,
    *,
    importance: str = "l1",
    round_to: int | None = None,
    scope: str = "all",
) -> StaticPruned:
    """Prune a copy of ``model`` uniformly until its dense MACs are closest to ``target_macs``.

    Every channel group (a convolution's filters together with everything coupled to them:
    BatchNorms, residual adds, the next layers' inputs) loses the same fraction of its
    channels, ranked by ``importance``; linear layers keep their outputs. Because channel
    counts are integers, groups may lose one rounding step more than the uniform fraction
    so that the result lands within a fraction of a percent of the target.

    Args:
        model: the dense model (left untouched; gates, if attached, are dropped in the copy).
        example_input: one input batch, used to trace the model; MACs are per sample.
        target_macs: per-sample MACs wanted (``ftwt.flops`` convention: one MAC per multiply-add).
        importance: channel ranking: ``"l1"`` or ``"l2"`` weight magnitude, or ``"random"``.
        round_to: keep channel counts multiples of this (e.g. 8 for vectorised kernels).
        scope: ``"all"`` channel groups, or ``"internal"`` ones only (see :data:`SCOPES`): for
            residual networks the stronger static model at the same FLOPs is usually the
            one that keeps the residual streams whole.

    Returns:
        A :class:`StaticPruned` with the eval-mode copy and its measured MACs. A target at
        or above the dense MACs gives an unpruned copy (ratio 0).

    Raises:
        ConfigError: Torch-Pruning is missing, the target is not positive or below what
            the model can reach, or ``importance`` is unknown.

    Example:
        >>> res = prune_to_macs(resnet56(), torch.randn(1, 3, 32, 32), 60e6)
        >>> f"{res.macs / 1e6:.1f}M"
    """
    tp = _tp()
    imp = _importance(tp, importance)
    if not target_macs > 0:
        raise ConfigError(f"target MACs must be positive, got {target_macs}")
    work = copy.deepcopy(model).eval()
    if is_gated(work):
        detach_gates(work)
    device = next(work.parameters()).device
    example = example_input[:1].to(device)
    dense = measure(work, [example]).dense_macs
    if target_macs >= dense:
        return StaticPruned(work, 0.0, dense, dense, float(target_macs))
    swap_adapted(work, example)
    if scope not in SCOPES:
        raise ConfigError(f"unknown static pruning scope {scope!r}; choose from {list(SCOPES)}")
    plan = _Plan(tp, work, example, imp, scope)
    floor = plan.macs(plan.counts(_MAX_RATIO, round_to))
    if target_macs < floor:
        raise ConfigError(
            f"target {target_macs / 1e6:.3f}M MACs is below what uniform pruning reaches "
            f"({floor / 1e6:.3f}M at ratio {_MAX_RATIO}; dense {dense / 1e6:.3f}M)"
        )
    ratio, counts = _search(plan, float(target_macs), round_to)
    predicted = plan.macs(counts)
    plan.apply(counts)
    macs = measure(work, [example]).dense_macs
    if abs(macs - predicted) > 1e-6 * dense:
        # The formula mirrors Torch-Pruning's coupling; say so if a model breaks that.
        log.warning("static pruning: predicted %.4gM MACs, measured %.4gM", predicted / 1e6, macs / 1e6)
    return StaticPruned(work, ratio, dense, macs, float(target_macs))


def static_pruned(
    model: nn.Module,
    example_input: torch.Tensor,
    target_macs: float,
    *,
    importance: str = "l1",
    round_to: int | None = None,
    scope: str = "all",
) -> nn.Module:
    """A physically narrower copy of ``model`` whose dense MACs are closest to ``target_macs``.

    See :func:`prune_to_macs`, which also reports the ratio and the MACs reached.

    Example:
        >>> small = static_pruned(vgg16_bn(), torch.randn(1, 3, 32, 32), 150e6)
        >>> small(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return prune_to_macs(model, example_input, target_macs, importance=importance, round_to=round_to,
                         scope=scope).model


def static_for_reduction(
    model: nn.Module,
    example_input: torch.Tensor,
    reduction: float,
    *,
    importance: str = "l1",
    round_to: int | None = None,
    scope: str = "all",
) -> StaticPruned:
    """Prune a copy of ``model`` to a FLOPs reduction (``0.5``: half the dense MACs).

    Raises:
        ConfigError: ``reduction`` outside ``[0, 1)`` or out of reach.
    """
    if not 0.0 <= reduction < 1.0:
        raise ConfigError(f"reduction must be in [0, 1), got {reduction}")
    device = next(model.parameters()).device
    dense = measure(model, [example_input[:1].to(device)]).dense_macs
    return prune_to_macs(model, example_input, dense * (1.0 - reduction), importance=importance,
                         round_to=round_to, scope=scope)


def finetune(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    epochs: int,
    *,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Fine-tune a statically pruned model the way FTWT fine-tunes its backbone.

    SGD with the reference backbone settings (lr 0.01, momentum 0.9, weight decay 5e-4) and a
    cosine schedule over ``epochs``, so that a static model and an FTWT model of the same
    FLOPs get the same training budget before they are compared.
    """
    if epochs <= 0:
        raise ConfigError(f"epochs must be positive, got {epochs}")
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x.to(device)), y.to(device)).backward()
            opt.step()
        sched.step()
    return model.eval()


__all__ = ["IMPORTANCES", "SCOPES", "StaticPruned", "finetune", "prune_to_macs", "static_for_reduction", "static_pruned"]
