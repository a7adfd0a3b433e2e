"""The FTWT optimisers: SGD for the backbone and, for gated runs, a second SGD for the gates."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import nn

from ftwt.errors import CheckpointError
from ftwt.surgery import backbone_parameters, gate_parameters
from ftwt.train.config import TrainConfig

Scheduler = torch.optim.lr_scheduler.LRScheduler


def build_optimizers(cfg: TrainConfig, model: nn.Module) -> tuple[list[torch.optim.Optimizer], list[Scheduler]]:
    """``[backbone, gates]`` optimisers (``[backbone]`` for a dense run) and one schedule each."""
    gated = cfg.gate_config() is not None
    params = backbone_parameters(model) if gated else list(model.parameters())
    optimizers = [torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)]
    if gated:
        optimizers.append(torch.optim.SGD(gate_parameters(model), lr=cfg.gate_lr, momentum=cfg.gate_momentum))
    schedulers = [
        torch.optim.lr_scheduler.MultiStepLR(o, cfg.milestones, cfg.gamma) if cfg.schedule == "step"
        else torch.optim.lr_scheduler.CosineAnnealingLR(o, cfg.epochs)
        for o in optimizers
    ]
    return optimizers, schedulers


def plain_state(scheduler: Scheduler) -> dict[str, Any]:
    """A scheduler's state_dict without ``Counter`` (MultiStepLR), which weights-only loading refuses."""
    return {k: dict(v) if isinstance(v, Counter) else v for k, v in scheduler.state_dict().items()}


def load_optimizer_states(optimizers: list[torch.optim.Optimizer], schedulers: list[Scheduler],
                          optimizer_states: list[dict], scheduler_states: list[dict]) -> None:
    """Restore what :func:`plain_state` and ``optimizer.state_dict()`` saved.

    Raises:
        CheckpointError: the saved states do not fit these optimisers.
    """
    try:
        for obj, sd in zip(optimizers, optimizer_states, strict=True):
            obj.load_state_dict(sd)
        for sched, sd in zip(schedulers, scheduler_states, strict=True):
            sched.load_state_dict(sd)
            if isinstance(sched, torch.optim.lr_scheduler.MultiStepLR):
                sched.milestones = Counter(sched.milestones)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"optimizer state in the checkpoint does not fit this run: {exc}") from None
