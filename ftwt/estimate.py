"""The compute budget before training: FLOPs that perfect gates would give at a threshold.

FTWT's labels depend only on the dense model's activations, so running a pretrained dense
model with the ground-truth masks applied predicts the reduction a threshold ``r`` will
buy (arXiv 2110.08232, Sec. 4.3). The count is the honest one of :mod:`ftwt.flops`,
gates' own cost included. :func:`find_threshold` inverts it by bisection.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ftwt.errors import ConfigError
from ftwt.flops import FlopsReport, measure
from ftwt.gate import GateConfig
from ftwt.record import record
from ftwt.surgery import attach_gates, detach_gates, gate_config, is_gated, set_threshold


@dataclass
class Estimate:
    """FLOPs that perfect gates would give at one threshold."""

    criterion: str
    threshold: float
    flops: FlopsReport

    @property
    def reduction(self) -> float:
        return self.flops.reduction

    def to_dict(self) -> dict[str, Any]:
        report = self.flops.to_dict()
        return {
            "criterion": self.criterion,
            "mass" if self.criterion == "mass" else "ratio": self.threshold,
            "dense_macs": report["dense_macs"],
            "estimated_macs": report["dynamic_macs"],
            "estimated_reduction": report["flops_reduction"],
            "gate_macs": report["gate_macs"],
            "reference_reduction": report["reference_reduction"],
            "samples": report["samples"],
            "per_layer": [
                {"name": lay["name"], "kept": lay["kept_out"], "kept_in": lay["kept_in"], "dense_macs": lay["dense"],
                 "estimated_macs": lay["dynamic"]}
                for lay in report["per_layer"]
                if lay["kind"] == "conv"
            ],
        }


@contextlib.contextmanager
def _perfect_gates(model: nn.Module, config: GateConfig) -> Iterator[nn.Module]:
    attached = not is_gated(model)
    if attached:
        attach_gates(model, config)
    saved = gate_config(model)
    try:
        set_threshold(model, config.threshold, config.criterion)
        with record(model, masks="ground_truth"):
            yield model
    finally:
        set_threshold(model, saved.threshold, saved.criterion)
        if attached:
            detach_gates(model)


def first_samples(batches: Iterable[Any], samples: int | None) -> list[torch.Tensor]:
    """The first ``samples`` inputs of ``batches`` (tensors, or ``(x, y)`` pairs), as batches; all for None."""
    out, seen = [], 0
    for x in batches:
        if isinstance(x, (tuple, list)):
            x = x[0]
        if samples is not None and seen + x.shape[0] > samples:
            x = x[: samples - seen]
        if x.shape[0]:
            out.append(x)
        seen += x.shape[0]
        if samples is not None and seen >= samples:
            break
    if not out:
        raise ConfigError("no input samples: the data is empty")
    return out


def estimate(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    threshold: float,
    criterion: str = "mass",
    samples: int | None = None,
    device: torch.device | str | None = None,
) -> Estimate:
    """Estimate the FLOPs reduction perfect gates would give at ``threshold``.

    Args:
        model: a trained dense model (or a gated one; its gates are not used).
        batches: input batches (tensors, or ``(input, target)`` pairs).
        threshold: ``r`` for the mass criterion, ``rho`` for uniform.
        criterion: ``"mass"`` or ``"uniform"``.
        samples: use at most this many samples.
        device: where to run.

    Example:
        >>> est = estimate(resnet56_trained, loader, threshold=0.9)
        >>> print(f"{est.reduction:.1%}")
    """
    config = GateConfig(criterion=criterion, threshold=threshold)
    data = first_samples(batches, samples)
    with _perfect_gates(model, config):
        return Estimate(criterion, threshold, measure(model, data, device))


def find_threshold(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    target_reduction: float,
    samples: int | None = None,
    device: torch.device | str | None = None,
    tol: float = 0.005,
    max_steps: int = 20,
) -> Estimate:
    """Find the mass threshold ``r`` whose estimated reduction meets ``target_reduction``.

    Bisection on ``r`` (the reduction falls as ``r`` grows). Returns the estimate at the
    largest ``r`` found whose reduction is at least the target, within ``tol``.

    Raises:
        ConfigError: the target is outside ``[0, 1)`` or not reachable even at tiny ``r``
            (the message gives the reachable range).
    """
    if not 0.0 <= target_reduction < 1.0:
        raise ConfigError(f"target reduction must be in [0, 1), got {target_reduction}")
    data = first_samples(batches, samples)
    config = GateConfig(criterion="mass", threshold=1.0)
    with _perfect_gates(model, config):

        def at(r: float) -> Estimate:
            set_threshold(model, r, "mass")
            return Estimate("mass", r, measure(model, data, device))

        hi = at(1.0)
        if hi.reduction >= target_reduction:
            return hi
        lo = at(1e-3)
        if lo.reduction < target_reduction:
            raise ConfigError(
                f"target reduction {target_reduction:.1%} is out of reach: this model and data allow "
                f"{hi.reduction:.1%} (r = 1) to {lo.reduction:.1%} (r = 0.001)"
            )
        lo_r, hi_r, best = lo.threshold, hi.threshold, lo
        for _ in range(max_steps):
            mid = at((lo_r + hi_r) / 2)
            if mid.reduction >= target_reduction:
                lo_r, best = mid.threshold, mid
                if mid.reduction - target_reduction <= tol:
                    break
            else:
                hi_r = mid.threshold
        return best
