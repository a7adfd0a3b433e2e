"""Choose what a gated model's forward does, and read what it saw.

:func:`record` is the one place the units' modes are set and restored: which mask they
apply (their gates', the ground truth, none, or a rule of the caller's) and whether they
build labels. The :class:`Record` it yields reads the units' outputs of the latest forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ftwt.errors import ConfigError
from ftwt.unit import MASK_SOURCES, GatedUnit, MaskFn, UnitOutput


class Record:
    """What the units of a model saw in its latest forward.

    Attributes:
        units: the model's gated units, in forward order.
    """

    def __init__(self, units: list[GatedUnit]) -> None:
        self.units = units

    @property
    def outputs(self) -> dict[str, UnitOutput]:
        """``{unit name: UnitOutput}`` of the units that ran in the latest forward."""
        return {u.name: u.last for u in self.units if u.last is not None}

    def __getitem__(self, name: str) -> UnitOutput:
        return self.outputs[name]

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """``{unit name: (N, C_out) bool}``: the masks applied (units that applied one)."""
        return {k: o.mask for k, o in self.outputs.items() if o.mask is not None}

    @property
    def labels(self) -> dict[str, torch.Tensor]:
        """``{unit name: (N, C_out) bool}``: the ground truth (units that built it)."""
        return {k: o.labels for k, o in self.outputs.items() if o.labels is not None}

    @property
    def logits(self) -> dict[str, torch.Tensor]:
        """``{unit name: (N, C_out)}``: the gate logits (units whose gate ran)."""
        return {k: o.logits for k, o in self.outputs.items() if o.logits is not None}

    @property
    def shapes(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
        """``{unit name: (input shape, output shape)}``."""
        return {k: (o.in_shape, o.out_shape) for k, o in self.outputs.items()}

    def clear(self) -> None:
        """Forget the latest forward (units that do not run in the next one then report nothing)."""
        for unit in self.units:
            unit.last = None


def _units(model: nn.Module) -> list[GatedUnit]:
    from ftwt.surgery import gated_units  # surgery builds on this module

    return gated_units(model)


@contextlib.contextmanager
def record(model: nn.Module, masks: str | MaskFn | None = None, labels: bool | str | None = None) -> Iterator[Record]:
    """Run a gated model's forwards with the given mask source and label collection.

    Args:
        model: a gated model.
        masks: ``"gate"`` (predicted), ``"ground_truth"`` (perfect gates), ``"none"`` (dense,
            no gate runs), a function ``(unit, logits, labels) -> mask``, or None to keep
            the current choice.
        labels: True: build labels in every forward; False: never (unless the mask is the
            ground truth); ``"train"``: in training forwards only (the default outside any
            record); None: keep the current choice.

    Yields:
        A :class:`Record` of the latest forward; the modes are restored on exit.

    Example:
        >>> with ftwt.record(model, masks="ground_truth", labels=True) as rec:
        ...     model(images)
        >>> {name: m.float().mean() for name, m in rec.masks.items()}
    """
    if masks is not None and not callable(masks) and masks not in MASK_SOURCES:
        raise ConfigError(f"unknown mask source {masks!r}; choose from {list(MASK_SOURCES)}")
    if labels not in (None, True, False, "train"):
        raise ConfigError(f"labels must be True, False, 'train' or None, got {labels!r}")
    units = _units(model)
    saved = [(u.masks, u.labels_on) for u in units]
    try:
        for unit in units:
            if masks is not None:
                unit.masks = masks
            if labels is not None:
                unit.labels_on = None if labels == "train" else labels
        yield Record(units)
    finally:
        for unit, (src, lab) in zip(units, saved, strict=True):
            unit.masks, unit.labels_on = src, lab


def last_record(model: nn.Module) -> Record:
    """The :class:`Record` of ``model``'s latest forward, whatever its modes were."""
    return Record(_units(model))


__all__ = ["Record", "last_record", "record"]
