"""The self-supervised mask loss, to add to any task loss.

``L = CE + lambda * mean_over_units( sum_c mean_n BCEWithLogits(logit[n, c], label[n, c]) )``
(FTWT, arXiv 2110.08232, Eq. 4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ftwt.surgery import gated_units


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


def mask_loss(model: nn.Module, balance: bool = False) -> torch.Tensor:
    """Mask loss of the last training forward of a gated ``model``.

    Call after ``model(x)`` in training mode; add ``lambda * mask_loss(model)`` to the task
    loss. Units that computed no labels (evaluation mode, or labels switched off) are
    skipped; with none, the result is a zero that still carries the gates' graph.

    Example:
        >>> out = model(images)
        >>> loss = F.cross_entropy(out, targets) + mask_loss(model)
        >>> loss.backward()
    """
    terms = [
        unit_loss(u.logits, u.labels, balance)
        for u in gated_units(model)
        if u.logits is not None and u.labels is not None
    ]
    if not terms:
        return sum((p.sum() * 0 for p in gated_units(model)[0].parameters()), torch.zeros(()))
    return torch.stack(terms).mean()
