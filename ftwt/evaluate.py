"""Evaluation: accuracy, honest FLOPs, and how well and how dynamically the gates decide.

:func:`evaluate` runs a model (dense or gated) over a loader once and reports top-1/top-5,
the FLOPs of the masks it really applied (:mod:`ftwt.flops`), and for gated models:

* the reduction *perfect* gates would give on the same inputs (ground-truth masks, a second
  forward of each batch), to compare with the estimate made before training;
* gate accuracy, precision and recall of the predicted masks against the labels (ground
  truth computed on the unit's real output during the same forward);
* how dynamic the masks are: the share of (unit, filter) decisions that differ between
  inputs. The reference code's gates made the same decision for every test image in over
  99% of cases (FTWT, arXiv 2110.08232; see METHOD.md), i.e. they acted as a static pruner.

:func:`calibrate_decisions` closes the gap between the gates' kept fraction and their
labels' by choosing each unit's sigmoid threshold. :func:`write_report` saves the report.

Every count is a sum held in one tensor, so under ``torch.distributed`` a single
``all_reduce`` gives every rank the same global numbers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ftwt.criteria import ground_truth
from ftwt.errors import DataError
from ftwt.flops import FlopsMeter, FlopsReport
from ftwt.gate import ACTIVATIONS, GatedUnit
from ftwt.surgery import gated_units, is_gated, mask_source, set_decision

log = logging.getLogger(__name__)

# Decision thresholds are kept inside (0.01, 0.99): beyond that a gate is forced on or off.
DECISION_RANGE = (0.01, 0.99)
# Logit-space histogram bins for calibration: resolution ~0.0045 in logit, memory O(units).
_CALIBRATION_BINS = 2048


# Helpers ---------------------------------------------------------------------------------
def _batches(loader: Iterable[Any], max_batches: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            return
        if isinstance(batch, (tuple, list)):
            yield batch[0], batch[1] if len(batch) > 1 else None
        else:
            yield batch, None


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP / DataParallel / ``torch.compile`` wrapper: gates and hooks live there."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _all_reduce(tensor: torch.Tensor, device: torch.device, op: Any = None) -> torch.Tensor:
    """Sum (or ``op``) ``tensor`` over all processes; NCCL needs it on the GPU."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("distributed=True but torch.distributed is not initialised")
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    buf = tensor.to(on)
    dist.all_reduce(buf, op=op if op is not None else dist.ReduceOp.SUM)
    return buf.cpu()


def _ratio(num: float, den: float) -> float | None:
    """``num / den``, or None (JSON null) when undefined: no NaN reaches the report."""
    return float(num) / float(den) if den else None


def _layer(report: FlopsReport | None, name: str) -> Any:
    if report is None:
        return None
    return next((lay for lay in report.layers if lay.name == name and lay.kind == "conv"), None)


class _Sums:
    """Named float64 sums packed into one vector for a single ``all_reduce``."""

    def __init__(self) -> None:
        self.parts: dict[str, torch.Tensor] = {}

    def add(self, name: str, value: torch.Tensor | list[float]) -> None:
        self.parts[name] = torch.as_tensor(value, dtype=torch.float64).cpu()

    def reduce(self, device: torch.device) -> None:
        flat = torch.cat([t.flatten() for t in self.parts.values()])
        flat = _all_reduce(flat, device)
        offset = 0
        for name, t in self.parts.items():
            self.parts[name] = flat[offset : offset + t.numel()].view_as(t)
            offset += t.numel()

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.parts[name]


class _GateCounts:
    """Per-unit confusion counts, label keeps and per-filter on counts, on the device."""

    def __init__(self, units: list[GatedUnit], device: torch.device) -> None:
        self.units = units
        # rows: true keep (TP), false keep (FP), false prune (FN), true prune (TN), label keeps
        self.confusion = torch.zeros(len(units), 5, dtype=torch.float64, device=device)
        self.on = [torch.zeros(u.out_channels, dtype=torch.float64, device=device) for u in units]
        self.has_labels = True

    def add(self) -> None:
        for j, unit in enumerate(self.units):
            if unit.mask is None:  # unit not on this forward's path
                continue
            mask = unit.mask.to(self.on[j].device)
            self.on[j] += mask.sum(0, dtype=torch.float64)
            if unit.labels is None:
                self.has_labels = False
                continue
            labels = unit.labels.to(mask.device)
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

    Returns:
        A JSON-ready dict: ``top1``, ``top5`` (percent; top-5 is top-min(5, classes)),
        ``loss``, ``samples``, ``dense_macs``, ``dynamic_macs``, ``flops_reduction``,
        ``reference_macs``, ``reference_reduction``, ``gate_macs``, ``per_sample_macs``
        (``min``/``mean``/``max``); gated models add ``ground_truth_reduction``,
        ``gate_accuracy``, ``gate_precision``, ``gate_recall``, ``kept``, ``kept_labels``,
        ``varying_fraction``, ``always_on_fraction``, ``always_off_fraction`` and
        ``per_layer`` (one dict per gated unit). Undefined ratios are None.

    Raises:
        DataError: the loader gave no samples (on any process).

    Example:
        >>> report = evaluate(model.to("cpu"), val_loader, "cpu")
        >>> print(f"{report['top1']:.2f}% at {report['flops_reduction']:.1%} fewer FLOPs, "
        ...       f"masks vary for {report['varying_fraction']:.1%} of decisions")
    """
    device = torch.device(device)
    model = _unwrap(model)
    gated = is_gated(model)
    units = gated_units(model) if gated else []
    with_gt = gated and ground_truth
    pred_meter = FlopsMeter(model)
    gt_meter = FlopsMeter(model) if with_gt else None
    counts = _GateCounts(units, device) if gated else None
    task = torch.zeros(4, dtype=torch.float64, device=device)  # top1 hits, top5 hits, loss sum, samples
    was_training = model.training
    model.eval()
    gate_ctx = mask_source(model, "gate", labels="always" if with_gt else "never") if gated else contextlib.nullcontext()
    try:
        with torch.no_grad(), gate_ctx:
            for x, y in _batches(loader, max_batches):
                if y is None:
                    raise DataError("evaluate needs (inputs, targets) batches")
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
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
                    counts.add()
                if gt_meter is not None:
                    # Same inputs, perfect gates: what the masks' labels would buy.
                    with gt_meter, mask_source(model, "ground_truth"):
                        model(x)
    finally:
        model.train(was_training)

    local_n = int(task[3].item())
    pred = pred_meter.report() if local_n else None
    gt = gt_meter.report() if gt_meter is not None and local_n else None

    sums = _Sums()
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
        sums.add("labels_missing", [0.0 if counts.has_labels or not with_gt else 1.0])
    extremes = torch.tensor(
        [float(pred.per_sample.max()), -float(pred.per_sample.min())] if pred else [-math.inf, -math.inf],
        dtype=torch.float64,
    )
    if distributed:
        sums.reduce(device)
        # min and max in one MAX reduction: min(x) = -max(-x)
        extremes = _all_reduce(extremes, device, dist.ReduceOp.MAX)
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


def _gate_report(
    units: list[GatedUnit], sums: _Sums, n: float, with_gt: bool, dense_sum: float, gt_sum: float
) -> dict[str, Any]:
    """The gated keys of :func:`evaluate`'s report, from the reduced sums."""
    confusion = sums["confusion"]  # (U, 5): TP, FP, FN, TN, label keeps
    with_labels = with_gt and not sums["labels_missing"][0].item()
    on_all = sums["on"]
    widths = [u.out_channels for u in units]
    per_layer, offset = [], 0
    for j, unit in enumerate(units):
        on = on_all[offset : offset + widths[j]]
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
        )
    out["per_layer"] = per_layer
    return out


# Calibration -----------------------------------------------------------------------------
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


def _matched_mask_hook(unit: GatedUnit) -> Any:
    """Forward hook, run before the unit's own, that applies a mask keeping as many filters
    as the labels do in this batch: the highest logits of the batch."""
    act = ACTIVATIONS.get(unit.spec.act or "")

    def hook(module: nn.Module, args: tuple[Any, ...], y: torch.Tensor) -> None:
        if unit.logits is None:
            return
        labels = ground_truth(act(y) if act is not None else y, unit.criterion, unit.threshold)
        flat = unit.logits.detach().flatten()
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[flat.topk(int(labels.sum())).indices] = True
        unit.mask = mask.view_as(unit.logits)  # the unit's own hook applies unit.mask

    return hook


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

    Gates trained with BCE on labels that are mostly 1 lean towards "keep": the reference's
    kept 96% of filters where the labels kept 83%, so the reduction reached after training
    fell well short of the one estimated before it (METHOD.md). Here each unit gets the
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
    model = _unwrap(model)
    units = gated_units(model)
    lo, hi = _logit(DECISION_RANGE[0]), _logit(DECISION_RANGE[1])
    edges = torch.linspace(lo, hi, _CALIBRATION_BINS + 1, dtype=torch.float64)
    edges_dev = edges.to(device=device, dtype=torch.float32)
    decisions = [u.decision for u in units]
    named = dict(model.named_modules())
    was_training = model.training
    model.eval()
    try:
        for round_ in range(max(1, rounds)):
            handles = []
            if round_ == 0:
                handles = [named[u.spec.tail].register_forward_hook(_matched_mask_hook(u), prepend=True) for u in units]
            hist = torch.zeros(len(units), _CALIBRATION_BINS + 2, dtype=torch.float64, device=device)
            kept = torch.zeros(len(units), 2, dtype=torch.float64, device=device)  # label keeps, decisions
            try:
                with torch.no_grad(), mask_source(model, "gate", labels="always"):
                    for x, _ in _batches(loader, max_batches):
                        model(x.to(device, non_blocking=True))
                        for j, unit in enumerate(units):
                            if unit.logits is None or unit.labels is None:
                                continue
                            idx = torch.bucketize(unit.logits.float().flatten(), edges_dev)
                            hist[j] += torch.bincount(idx, minlength=_CALIBRATION_BINS + 2).to(torch.float64)
                            kept[j, 0] += unit.labels.sum()
                            kept[j, 1] += unit.labels.numel()
            finally:
                for handle in handles:
                    handle.remove()
            if distributed:
                flat = _all_reduce(torch.cat([hist.flatten(), kept.flatten()]), device)
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


# Report files ----------------------------------------------------------------------------
def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(report: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """Write ``out_dir/report.json`` and, for gated models, ``out_dir/per_layer.png``.

    The per-layer plot shows each gated unit's predicted kept fraction next to its ground
    truth; a dense model's report has no gate data, so its plot is skipped. Files are
    written atomically (temporary file, then ``os.replace``); ``out_dir`` is created.

    Args:
        report: as returned by :func:`evaluate` (extra JSON-ready keys are kept).
        out_dir: destination folder.

    Returns:
        The paths written.
    """
    from ftwt.plots import plot_per_layer  # lazy: matplotlib only when a report is written

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "report.json"
    # allow_nan=False: a NaN would make the file invalid JSON for strict readers
    _atomic_write_text(json_path, json.dumps(report, indent=2, allow_nan=False, default=float) + "\n")
    written = [json_path]
    if report.get("per_layer"):
        png = out / "per_layer.png"
        plot_per_layer(report, png)
        written.append(png)
    else:
        log.info("dense model: no per-layer gate plot")
    return written


__all__ = ["DECISION_RANGE", "calibrate_decisions", "evaluate", "write_report"]
