"""The self-supervised mask loss, to add to any task loss.

``L = CE + lambda * mean_over_units( sum_c mean_n BCEWithLogits(logit[n, c], label[n, c]) )``
(FTWT, arXiv 2110.08232, Eq. 4).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ftwt.record import Record, last_record, record


def unit_loss(logits: torch.Tensor, labels: torch.Tensor, balance: bool = False) -> torch.Tensor:
    """BCE of one unit, summed over filters and averaged over samples.

    Args:
        logits: ``(N, C)`` gate logits.
        labels: ``(N, C)`` bool ground truth.
        balance: weight each class by the inverse of its frequency in this batch, so that
            the few pruned filters weigh as much as the many kept ones (labels are mostly 1
            and plain BCE leans towards keeping).
    """
    target = labels.to(logits.dtype)
    weight = None
    if balance:
        pos = target.mean().clamp(1e-3, 1 - 1e-3)
        weight = torch.where(labels, 0.5 / pos, 0.5 / (1 - pos)).detach()
    bce = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="none")
    return bce.mean(0).sum()


def mask_loss(model: nn.Module | Record, balance: bool = False) -> torch.Tensor:
    """Mask loss of the last training forward of a gated ``model`` (or of a :class:`~ftwt.Record`).

    Call after ``model(x)`` in training mode; add ``lambda * mask_loss(model)`` to the task
    loss. Units that computed no labels (evaluation mode, or labels switched off) are
    skipped; with none, the result is a zero that still carries the gates' graph.

    Example:
        >>> out = model(images)
        >>> loss = F.cross_entropy(out, targets) + mask_loss(model)
        >>> loss.backward()
    """
    rec = model if isinstance(model, Record) else last_record(model)
    terms = [
        unit_loss(out.logits, out.labels, balance)
        for out in rec.outputs.values()
        if out.logits is not None and out.labels is not None
    ]
    if not terms:
        return sum((p.sum() * 0 for p in rec.units[0].parameters()), torch.zeros(()))
    return torch.stack(terms).mean()


def _dense_with_logits(unit: Any, logits: torch.Tensor | None, labels: torch.Tensor | None) -> None:
    return None  # the gates run (their logits are kept), no mask is applied


def fit_gates(model: nn.Module, batches: Iterable[torch.Tensor], optimizer: torch.optim.Optimizer,
              steps: int, balance: bool = False) -> float:
    """Fit the gates to their labels on the frozen model, before any fine-tuning.

    The backbone runs densely in eval mode (its weights and BatchNorm statistics stay as
    they are) and each gate learns from the labels of the unmasked model, as the reference
    code's initialisation step does: gates that start from this fit pick informed filters
    from the first fine-tuning step on, instead of random ones.

    Args:
        model: a gated model.
        batches: input batches; ``steps`` of them are used (fewer if it runs out).
        optimizer: an optimizer over the gate parameters.
        steps: optimizer steps.
        balance: class-balanced mask loss.

    Returns:
        The mean mask loss of the last step (0.0 when no step ran).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    last = 0.0
    try:
        with record(model, masks=_dense_with_logits, labels=True) as rec:
            for step, x in enumerate(batches):
                if step >= steps:
                    break
                model(x.to(device))
                loss = mask_loss(rec, balance)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                last = float(loss.detach())
    finally:
        model.zero_grad(set_to_none=True)  # in joint mode the loss reached the backbone too
        model.train(was_training)
    return last
