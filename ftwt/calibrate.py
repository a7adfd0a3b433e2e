"""Calibrated decisions: each unit's threshold set so that its gates keep what its labels keep.

Gates trained with BCE on labels that are mostly 1 lean towards "keep", so the reduction
reached after training falls short of the one estimated before it. :func:`calibrate_decisions`
chooses each unit's sigmoid threshold from the data and stores it in the unit's state
(``state_dict`` carries it); :func:`fold_decisions` optionally moves the thresholds into the
gate biases, for an exported model whose decisions are all 0.5.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ftwt._passes import all_reduce, batches, unwrap
from ftwt.errors import DataError
from ftwt.record import record
from ftwt.surgery import gated_units, set_decision
from ftwt.unit import GatedUnit

log = logging.getLogger(__name__)

# Decision thresholds are kept inside (0.01, 0.99): beyond that a gate is forced on or off.
DECISION_RANGE = (0.01, 0.99)
# Logit-space histogram bins for calibration: resolution ~0.0045 in logit, memory O(units).
_CALIBRATION_BINS = 2048


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def _threshold_from_histogram(counts: torch.Tensor, edges: torch.Tensor, keep: float) -> float:
    """Logit ``t`` such that about ``keep`` of the histogrammed values lie above it.

    ``counts[i]`` holds the values in ``(edges[i-1], edges[i]]``, with ``counts[0]`` and
    ``counts[-1]`` the under- and overflow; within a bin values are taken as uniform.
    """
    above = counts.flip(0).cumsum(0).flip(0)[1:]  # above[i]: values > edges[i]
    hit = torch.nonzero(above <= keep)
    if hit.numel() == 0:  # even the overflow alone is too much: highest threshold allowed
        return float(edges[-1])
    i = int(hit[0])
    if i == 0:  # even everything inside the range is too little: lowest threshold allowed
        return float(edges[0])
    width = float(edges[i] - edges[i - 1])
    return float(edges[i]) - width * (keep - float(above[i])) / float(counts[i])


def _matched_mask(unit: GatedUnit, logits: torch.Tensor | None, labels: torch.Tensor | None) -> torch.Tensor | None:
    """The mask that keeps as many filters as the labels do in this batch: the highest logits of the batch."""
    if logits is None or labels is None:
        return None
    flat = logits.detach().flatten()
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[flat.topk(int(labels.sum())).indices] = True
    return mask.view_as(logits)


def calibrate_decisions(
    model: nn.Module,
    loader: Iterable[Any],
    device: torch.device | str,
    max_batches: int | None = None,
    *,
    rounds: int = 2,
    distributed: bool = False,
) -> list[float]:
    """Set each unit's decision threshold so that its gates keep as much as its labels do.

    Gates trained with BCE on labels that are mostly 1 lean towards "keep" (the reference
    gates keep far more filters than their labels), so the reduction reached after training
    falls well short of the one estimated before it. Here each unit gets the
    threshold ``t`` at which the share of (sample, filter) pairs with ``sigmoid(logit) > t``
    on ``loader`` equals the share its labels keep: a quantile of the unit's probabilities,
    clamped into ``DECISION_RANGE``. Quantiles come from a logit histogram, so memory does
    not grow with the data.

    A unit's inputs, and so its logits and labels, depend on the masks of the units before
    it. In the first round every unit therefore applies, batch by batch, the mask that keeps
    its highest logits in the number its labels keep, so that all units see inputs pruned as
    they will be once calibrated, in one pass. Each further round re-measures with the
    thresholds just set and corrects what is left.

    Runs in eval mode without gradients (training mode is restored). Use training data: the
    thresholds are then part of the model, like its weights.

    Args:
        model: a gated model on ``device``.
        loader: yields ``(inputs, targets)`` or input batches.
        device: where the model lives.
        max_batches: use at most this many batches per round.
        rounds: passes over the data (at least 1).
        distributed: pool the histograms of all processes, so every rank sets the same
            thresholds.

    Returns:
        The thresholds set, one per unit in :func:`~ftwt.surgery.gated_units` order.

    Example:
        >>> decisions = calibrate_decisions(model, train_loader, "cpu", max_batches=20)
        >>> evaluate(model, val_loader, "cpu")["kept"]  # now close to "kept_labels"
    """
    device = torch.device(device)
    model = unwrap(model)
    units = gated_units(model)
    lo, hi = _logit(DECISION_RANGE[0]), _logit(DECISION_RANGE[1])
    edges = torch.linspace(lo, hi, _CALIBRATION_BINS + 1, dtype=torch.float64)
    edges_dev = edges.to(device=device, dtype=torch.float32)
    decisions = [u.decision for u in units]
    was_training = model.training
    model.eval()
    try:
        for round_ in range(max(1, rounds)):
            hist = torch.zeros(len(units), _CALIBRATION_BINS + 2, dtype=torch.float64, device=device)
            kept = torch.zeros(len(units), 2, dtype=torch.float64, device=device)  # label keeps, decisions
            with torch.no_grad(), record(model, masks=_matched_mask if round_ == 0 else "gate", labels=True) as rec:
                for x, _ in batches(loader, max_batches):
                    rec.clear()
                    model(x.to(device, non_blocking=True))
                    outputs = rec.outputs
                    for j, unit in enumerate(units):
                        out = outputs.get(unit.name)
                        if out is None or out.logits is None or out.labels is None:
                            continue
                        idx = torch.bucketize(out.logits.float().flatten(), edges_dev)
                        hist[j] += torch.bincount(idx, minlength=_CALIBRATION_BINS + 2).to(torch.float64)
                        kept[j, 0] += out.labels.sum()
                        kept[j, 1] += out.labels.numel()
            if distributed:
                flat = all_reduce(torch.cat([hist.flatten(), kept.flatten()]), device)
                hist, kept = flat[: hist.numel()].view_as(hist), flat[hist.numel() :].view_as(kept)
            hist, kept = hist.cpu(), kept.cpu()
            if kept[:, 1].sum() == 0:
                raise DataError("no samples to calibrate on: the loader is empty (or max_batches is 0)")
            for j in range(len(units)):
                if kept[j, 1] == 0:  # never ran: keep its current threshold
                    continue
                t = _threshold_from_histogram(hist[j], edges, float(kept[j, 0]))
                p = 1.0 / (1.0 + math.exp(-t))
                decisions[j] = min(max(p, DECISION_RANGE[0]), DECISION_RANGE[1])
            set_decision(model, decisions)
    finally:
        model.train(was_training)
    log.info("calibrated %d decision thresholds: %.3f to %.3f", len(units), min(decisions), max(decisions))
    return decisions


def fold_decisions(model: nn.Module) -> None:
    """Move each unit's decision threshold into its gate's bias and set the decisions to 0.5.

    ``sigmoid(l) > t`` iff ``l - logit(t) > 0``: the masks stay the same (up to float
    rounding at the boundary), and a reader that knows only the default decision of 0.5
    reproduces them from the weights alone.
    """
    units = gated_units(model)
    with torch.no_grad():
        for unit in units:
            unit.gate.fc.bias -= _logit(unit.decision)
    set_decision(model, 0.5)


__all__ = ["DECISION_RANGE", "calibrate_decisions", "fold_decisions"]
