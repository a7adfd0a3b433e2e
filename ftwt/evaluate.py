"""Evaluation: accuracy, honest FLOPs, and how well and how dynamically the gates decide.

:func:`evaluate` runs a model (dense or gated) over a loader once and reports top-1/top-5,
the FLOPs of the masks it really applied (:mod:`ftwt.flops`), and for gated models:

* the reduction *perfect* gates would give on the same inputs (ground-truth masks, a second
  forward of each batch), to compare with the estimate made before training;
* gate accuracy, precision and recall of the predicted masks against the labels (ground
  truth computed on the unit's real output during the same forward);
* how dynamic the masks are: the share of (unit, filter) decisions that differ between
  inputs. The reference code's gates made the same decision for every test image in over
  99% of cases (FTWT, arXiv 2110.08232), i.e. they acted as a static pruner.

Calibration is :mod:`ftwt.calibrate`; report files are :mod:`ftwt.report`.

Every count is a sum held in one tensor, so under ``torch.distributed`` a single
``all_reduce`` gives every rank the same global numbers.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ftwt._passes import Sums, all_reduce, batches, unwrap
from ftwt.errors import ConfigError, DataError
from ftwt.flops import FlopsMeter, FlopsReport
from ftwt.record import Record, record
from ftwt.surgery import gated_units, is_gated
from ftwt.unit import GatedUnit, MaskFn


def _ratio(num: float, den: float) -> float | None:
    """``num / den``, or None (JSON null) when undefined: no NaN reaches the report."""
    return float(num) / float(den) if den else None


def _layer(report: FlopsReport | None, name: str) -> Any:
    if report is None:
        return None
    return next((lay for lay in report.layers if lay.name == name and lay.kind == "conv"), None)


class _GateCounts:
    """Per-unit confusion counts, label keeps and per-filter on counts, on the device."""

    def __init__(self, units: list[GatedUnit], device: torch.device) -> None:
        self.units = units
        # rows: true keep (TP), false keep (FP), false prune (FN), true prune (TN), label keeps
        self.confusion = torch.zeros(len(units), 5, dtype=torch.float64, device=device)
        self.on = [torch.zeros(u.out_channels, dtype=torch.float64, device=device) for u in units]
        self.label_on = [torch.zeros(u.out_channels, dtype=torch.float64, device=device) for u in units]
        self.has_labels = True

    def add(self, rec: Record) -> None:
        outputs = rec.outputs
        for j, unit in enumerate(self.units):
            out = outputs.get(unit.name)
            if out is None or out.mask is None:  # unit not on this forward's path
                continue
            mask = out.mask.to(self.on[j].device)
            self.on[j] += mask.sum(0, dtype=torch.float64)
            if out.labels is None:
                self.has_labels = False
                continue
            labels = out.labels.to(mask.device)
            self.label_on[j] += labels.sum(0, dtype=torch.float64)
            self.confusion[j] += torch.stack([
                (mask & labels).sum(), (mask & ~labels).sum(), (~mask & labels).sum(), (~mask & ~labels).sum(),
                labels.sum(),
            ]).to(torch.float64)


# Evaluation ------------------------------------------------------------------------------
def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    device: torch.device | str,
    *,
    distributed: bool = False,
    max_batches: int | None = None,
    ground_truth: bool = True,
    masks: str | MaskFn = "gate",
) -> dict[str, Any]:
    """Accuracy, FLOPs and gate statistics of ``model`` over ``loader``.

    Runs in eval mode without gradients; the model's training mode is restored afterwards.
    The model must already be on ``device``; batches are moved there. Gated models apply
    their *predicted* masks; labels are computed in the same forward (they never change the
    mask applied, they only cost this report pass time).

    Gate metrics treat "keep" as the positive class: precision is the share of computed
    filters that the labels keep, recall the share of label-kept filters that were computed.
    Counts are pooled over all units' decisions (micro average). A filter whose decision is
    the same for every evaluated input is *static*; ``varying_fraction`` is the share of
    (unit, filter) pairs that are not.

    Args:
        model: a dense or gated model (DDP / DataParallel / compiled wrappers are unwrapped).
        loader: yields ``(inputs, targets)`` batches.
        device: where the model lives.
        distributed: sum every count over the processes of the default process group, so
            that each rank returns the same global numbers. With a ``DistributedSampler``
            the samples it pads in are counted too, as usual.
        max_batches: evaluate at most this many batches (per process).
        ground_truth: for gated models, compute labels and the perfect-gate pass. False
            gives a cheaper check (accuracy, FLOPs, how dynamic the masks are) without the
            keys that need labels.
        masks: the masks applied: ``"gate"`` (predicted) or ``"ground_truth"`` (the oracle
            bound: perfect gates, which cannot be deployed since labels need the full output),
            or a mask rule ``(unit, logits, labels) -> mask`` as :func:`ftwt.record` takes.

    Returns:
        A JSON-ready dict: ``top1``, ``top5`` (percent; top-5 is top-min(5, classes)),
        ``loss``, ``samples``, ``dense_macs``, ``dynamic_macs``, ``flops_reduction``,
        ``reference_macs``, ``reference_reduction``, ``gate_macs``, ``per_sample_macs``
        (``min``/``mean``/``max``); gated models add ``ground_truth_reduction``,
        ``gate_accuracy``, ``gate_precision``, ``gate_recall``, ``kept``, ``kept_labels``,
        ``varying_fraction``, ``always_on_fraction``, ``always_off_fraction``,
        ``label_varying_fraction`` (filters whose *label* differs between inputs),
        ``static_oracle_accuracy`` (accuracy of the best input-independent predictor of the
        labels: each filter's majority label), ``gate_lift`` (``gate_accuracy`` minus it:
        at or below zero the gates have learned each filter's prior, not the input) and
        ``per_layer`` (one dict per gated unit). Undefined ratios are None.

    Raises:
        DataError: the loader gave no samples (on any process).

    Example:
        >>> report = evaluate(model.to("cpu"), val_loader, "cpu")
        >>> print(f"{report['top1']:.2f}% at {report['flops_reduction']:.1%} fewer FLOPs, "
        ...       f"masks vary for {report['varying_fraction']:.1%} of decisions")
    """
    device = torch.device(device)
    model = unwrap(model)
    gated = is_gated(model)
    units = gated_units(model) if gated else []
    with_gt = gated and ground_truth
    pred_meter = FlopsMeter(model)
    gt_meter = FlopsMeter(model) if with_gt else None
    counts = _GateCounts(units, device) if gated else None
    task = torch.zeros(4, dtype=torch.float64, device=device)  # top1 hits, top5 hits, loss sum, samples
    was_training = model.training
    model.eval()
    if not callable(masks) and masks not in ("gate", "ground_truth"):
        raise ConfigError(f"evaluate: unknown masks {masks!r}; choose 'gate', 'ground_truth' or a mask rule")
    gate_ctx = record(model, masks=masks, labels=with_gt) if gated else contextlib.nullcontext()
    try:
        with torch.no_grad(), gate_ctx as rec:
            for x, y in batches(loader, max_batches):
                if y is None:
                    raise DataError("evaluate needs (inputs, targets) batches")
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                if rec is not None:
                    rec.clear()
                with pred_meter:
                    out = model(x)
                k = min(5, out.shape[1])
                hits = out.topk(k, dim=1).indices.eq(y[:, None])
                task += torch.stack([
                    hits[:, 0].sum().double(),
                    hits.any(1).sum().double(),
                    F.cross_entropy(out.double(), y, reduction="sum"),
                    torch.tensor(float(y.shape[0]), dtype=torch.float64, device=device),
                ])
                if counts is not None:
                    counts.add(rec)
                if gt_meter is not None:
                    # Same inputs, perfect gates: what the masks' labels would buy.
                    with gt_meter, record(model, masks="ground_truth"):
                        model(x)
    finally:
        model.train(was_training)

    local_n = int(task[3].item())
    pred = pred_meter.report() if local_n else None
    gt = gt_meter.report() if gt_meter is not None and local_n else None

    sums = Sums()
    sums.add("task", task)
    n_local = float(local_n)
    sums.add("flops", [
        pred.dense_macs * n_local if pred else 0.0,
        float(pred.per_sample.sum()) if pred else 0.0,
        pred.reference_macs * n_local if pred else 0.0,
        pred.reference_dense_macs * n_local if pred else 0.0,
        pred.gate_macs * n_local if pred else 0.0,
        gt.dynamic_macs * n_local if gt else 0.0,
    ])
    if gated:
        unit_rows = []
        for unit in units:
            lay, gt_lay = _layer(pred, unit.name), _layer(gt, unit.name)
            unit_rows.append([
                lay.dense * n_local if lay else 0.0,
                lay.dynamic * n_local if lay else 0.0,
                gt_lay.kept_out * n_local if gt_lay else 0.0,
            ])
        sums.add("units", unit_rows)
        sums.add("confusion", counts.confusion)
        sums.add("on", torch.cat(counts.on))
        sums.add("label_on", torch.cat(counts.label_on))
        sums.add("labels_missing", [0.0 if counts.has_labels or not with_gt else 1.0])
    extremes = torch.tensor(
        [float(pred.per_sample.max()), -float(pred.per_sample.min())] if pred else [-math.inf, -math.inf],
        dtype=torch.float64,
    )
    if distributed:
        sums.reduce(device)
        # min and max in one MAX reduction: min(x) = -max(-x)
        extremes = all_reduce(extremes, device, dist.ReduceOp.MAX)
    n = sums["task"][3].item()
    if n == 0:
        raise DataError("no samples to evaluate: the loader is empty (or max_batches is 0)")

    hits1, hits5, loss_sum, _ = sums["task"].tolist()
    dense_sum, dyn_sum, ref_sum, ref_dense_sum, gate_sum, gt_sum = sums["flops"].tolist()
    report: dict[str, Any] = {
        "top1": 100.0 * hits1 / n,
        "top5": 100.0 * hits5 / n,
        "loss": loss_sum / n,
        "samples": int(n),
        "dense_macs": dense_sum / n,
        "dynamic_macs": dyn_sum / n,
        "flops_reduction": 1.0 - dyn_sum / dense_sum if dense_sum else 0.0,
        "reference_macs": ref_sum / n,
        "reference_reduction": 1.0 - ref_sum / ref_dense_sum if ref_dense_sum else 0.0,
        "gate_macs": gate_sum / n,
        "per_sample_macs": {"min": -extremes[1].item(), "mean": dyn_sum / n, "max": extremes[0].item()},
    }
    if gated:
        report.update(_gate_report(units, sums, n, with_gt, dense_sum, gt_sum))
    return report


def _prior_keys(label_on: torch.Tensor, n: float, gate_accuracy: float | None) -> dict[str, Any]:
    """How input-dependent the labels are, and whether the gates beat each filter's prior.

    ``label_on`` holds, per filter, how many of the ``n`` inputs its label keeps. The best
    predictor that ignores the input keeps a filter iff most inputs keep it; its accuracy is
    the mean of ``max(p, 1 - p)`` over filters (``p`` the keep rate).
    """
    if gate_accuracy is None or not label_on.numel():
        return {"label_varying_fraction": None, "static_oracle_accuracy": None, "gate_lift": None}
    p = label_on / n
    prior = float(torch.maximum(p, 1 - p).mean())
    return {
        "label_varying_fraction": float(((label_on > 0) & (label_on < n)).double().mean()),
        "static_oracle_accuracy": prior,
        "gate_lift": gate_accuracy - prior,
    }


def _gate_report(
    units: list[GatedUnit], sums: Sums, n: float, with_gt: bool, dense_sum: float, gt_sum: float
) -> dict[str, Any]:
    """The gated keys of :func:`evaluate`'s report, from the reduced sums."""
    confusion = sums["confusion"]  # (U, 5): TP, FP, FN, TN, label keeps
    with_labels = with_gt and not sums["labels_missing"][0].item()
    on_all, label_all = sums["on"], sums["label_on"]
    widths = [u.out_channels for u in units]
    per_layer, offset = [], 0
    for j, unit in enumerate(units):
        on = on_all[offset : offset + widths[j]]
        label_on = label_all[offset : offset + widths[j]]
        offset += widths[j]
        tp, fp, fn, tn, label_keeps = confusion[j].tolist()
        dense, dynamic, gt_kept = sums["units"][j].tolist()
        decisions = n * widths[j]
        entry: dict[str, Any] = {
            "name": unit.name,
            "dense_macs": dense / n,
            "dynamic_macs": dynamic / n,
            "kept": float(on.sum()) / decisions,
            "decision": unit.decision,
            "varying_fraction": float(((on > 0) & (on < n)).double().mean()),
            "always_on_fraction": float((on >= n).double().mean()),
            "always_off_fraction": float((on <= 0).double().mean()),
            "kept_labels": label_keeps / decisions if with_labels else None,
            "kept_ground_truth": gt_kept / n if with_gt else None,
            "gate_accuracy": _ratio(tp + tn, tp + fp + fn + tn) if with_labels else None,
            "precision": _ratio(tp, tp + fp) if with_labels else None,
            "recall": _ratio(tp, tp + fn) if with_labels else None,
            **_prior_keys(label_on, n, _ratio(tp + tn, tp + fp + fn + tn) if with_labels else None),
        }
        per_layer.append(entry)
    out: dict[str, Any] = {
        "kept": float(on_all.sum()) / (n * on_all.numel()),
        "varying_fraction": float(((on_all > 0) & (on_all < n)).double().mean()),
        "always_on_fraction": float((on_all >= n).double().mean()),
        "always_off_fraction": float((on_all <= 0).double().mean()),
    }
    if with_gt:
        out["ground_truth_reduction"] = 1.0 - gt_sum / dense_sum if dense_sum else 0.0
    if with_labels:
        tp, fp, fn, tn, label_keeps = confusion.sum(0).tolist()
        out.update(
            kept_labels=label_keeps / (n * on_all.numel()),
            gate_accuracy=_ratio(tp + tn, tp + fp + fn + tn),
            gate_precision=_ratio(tp, tp + fp),
            gate_recall=_ratio(tp, tp + fn),
            **_prior_keys(label_all, n, _ratio(tp + tn, tp + fp + fn + tn)),
        )
    out["per_layer"] = per_layer
    return out


__all__ = ["evaluate"]
