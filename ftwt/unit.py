"""The gated unit: one gate, its state, and the two hooks that put it into an unchanged model.

A pre-hook on the convolution runs the gate on the convolution's input; a hook on the
unit's last module (the norm, or the convolution when none follows) computes the labels
when asked and multiplies the output by the mask. What a unit decides with is module state
that ``state_dict`` carries (buffers ``criterion_id``, ``label_threshold``,
``decision_threshold``); what it saw in the last forward is :attr:`GatedUnit.last`.
Which mask it applies and whether it builds labels is set by :func:`ftwt.record` only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ftwt._ops import ACTIVATIONS
from ftwt.criteria import CRITERIA, filter_scores, ground_truth
from ftwt.gate import GateConfig, build_gate

MASK_SOURCES = ("gate", "ground_truth", "none")
# A mask rule chosen by ``record(masks=fn)``: (unit, logits, labels) -> (N, C_out) bool.
MaskFn = Callable[["GatedUnit", torch.Tensor | None, torch.Tensor | None], torch.Tensor | None]
_CRITERIA = tuple(CRITERIA)  # criterion_id indexes this; new criteria are appended


@dataclass(frozen=True)
class UnitSpec:
    """Where a gated unit sits in a model.

    Attributes:
        conv: qualified name of the ``nn.Conv2d``.
        norm: qualified name of the norm applied to its output, or None.
        act: activation applied after the unit (a key of ``ftwt._ops.ACTIVATIONS``) or None.
    """

    conv: str
    norm: str | None = None
    act: str | None = None

    @property
    def tail(self) -> str:
        """The module whose output is masked."""
        return self.norm or self.conv


@dataclass
class UnitOutput:
    """What one unit saw in one forward.

    Attributes:
        logits: ``(N, C_out)`` gate logits (with gradient in training), None when no gate ran.
        mask: ``(N, C_out)`` bool, the mask applied, or None (dense).
        labels: ``(N, C_out)`` bool ground truth, or None when not collected.
        in_shape: shape of the convolution's input.
        out_shape: shape of the masked output.
    """

    logits: torch.Tensor | None
    mask: torch.Tensor | None
    labels: torch.Tensor | None
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]


class GatedUnit(nn.Module):
    """One gate plus the state of its unit.

    To extend: what the gate computes is :func:`ftwt.gate.build_gate` (its feature
    extractor and linear layer), how logits become a mask is :meth:`decide`, and a mask rule
    for one pass is ``ftwt.record(model, masks=fn)``; labels come from :mod:`ftwt.criteria`.

    Attributes:
        spec: where the unit sits.
        config: the :class:`GateConfig` it was attached with (not changed afterwards).
        criterion, threshold: how its labels are computed now (:func:`ftwt.set_threshold`).
        decision: sigmoid probability above which a filter is computed (calibration sets it).
        last: what the unit saw in the last forward (:class:`UnitOutput`), or None.
    """

    # State entries that checkpoints written before they existed lack: those units keep
    # the values of their config (calibrated decisions were then folded into the biases).
    optional_state = ("criterion_id", "label_threshold", "decision_threshold")

    def __init__(self, spec: UnitSpec, conv: nn.Conv2d, config: GateConfig) -> None:
        super().__init__()
        self.spec = spec
        self.config = config
        self.in_channels = conv.in_channels
        self.out_channels = conv.out_channels
        self.gate = build_gate(config, conv.in_channels, conv.out_channels)
        # float64 and kept so by _apply: a float32 copy of 0.9 would move label boundaries
        self.register_buffer("criterion_id", torch.tensor(_CRITERIA.index(config.criterion)))
        self.register_buffer("label_threshold", torch.tensor(config.threshold, dtype=torch.float64))
        self.register_buffer("decision_threshold", torch.tensor(config.decision, dtype=torch.float64))
        if config.rule == "budget":
            # The inference cut of the "budget" rule: a running mean of the training batches' cuts
            # (as BatchNorm keeps its statistics); NaN until the first training batch.
            self.register_buffer("budget_cut", torch.tensor(float("nan")))
        if config.dynamic < 1.0:
            # The static core (GateConfig.dynamic): filters computed for every input. attach_gates
            # sets it from the weights; a checkpoint's copy replaces it on load.
            self.register_buffer("core", torch.zeros(conv.out_channels, dtype=torch.bool))
        self._values: dict[str, Any] = {}  # the buffers as Python numbers: read every forward, no device sync
        self._refresh()
        self.masks: str | MaskFn = "gate"  # set by ftwt.record
        self.labels_on: bool | None = None  # None: labels in training forwards only; set by ftwt.record
        self.last: UnitOutput | None = None
        self._logits: torch.Tensor | None = None
        self._scale: torch.Tensor | None = None
        self._in_shape: tuple[int, ...] = ()
        self._handles: list[Any] = []

    @property
    def name(self) -> str:
        return self.spec.conv

    def extra_repr(self) -> str:
        return f"{self.spec.conv}: {self.in_channels} -> {self.out_channels}, {self.criterion}={self.threshold}"

    # State carried by state_dict ----------------------------------------------------
    @property
    def criterion(self) -> str:
        return self._values["criterion"]

    @criterion.setter
    def criterion(self, value: str) -> None:
        self.criterion_id.fill_(_CRITERIA.index(value))
        self._refresh()

    @property
    def threshold(self) -> float:
        return self._values["threshold"]

    @threshold.setter
    def threshold(self, value: float) -> None:
        self.label_threshold.fill_(value)
        self._refresh()

    @property
    def decision(self) -> float:
        return self._values["decision"]

    @decision.setter
    def decision(self, value: float) -> None:
        self.decision_threshold.fill_(value)
        self._refresh()

    def _refresh(self) -> None:
        self._values = {"criterion": _CRITERIA[int(self.criterion_id)], "threshold": float(self.label_threshold),
                        "decision": float(self.decision_threshold)}

    def _apply(self, fn: Callable, recurse: bool = True) -> GatedUnit:
        # Follow device moves, never dtype casts (model.half() must not round the thresholds).
        exact = {k: self._buffers[k] for k in ("label_threshold", "decision_threshold")}
        super()._apply(fn, recurse)
        for key, value in exact.items():
            self._buffers[key] = value.to(self._buffers[key].device)
        return self

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        missing = args[2]  # (local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        for key in self.optional_state:
            if prefix + key in missing:
                missing.remove(prefix + key)
        self._refresh()

    # Deciding ---------------------------------------------------------------------------
    @property
    def k(self) -> int:
        """Filters computed per sample under the ``topk`` rule: what the uniform criterion keeps."""
        return max(1, self.out_channels - math.floor(self.threshold * self.out_channels))

    @property
    def n_dynamic(self) -> int:
        """Filters of the ``k`` that the gate chooses per sample; the others are the static core."""
        return self.k if self.config.dynamic >= 1.0 else max(1, round(self.config.dynamic * self.k))

    def set_core(self, importance: torch.Tensor) -> None:
        """Make the ``k - n_dynamic`` filters of largest ``importance`` ``(C_out,)`` the static core."""
        if self.config.dynamic >= 1.0:
            raise ValueError(f"{self.name}: no static core without GateConfig.dynamic < 1")
        top = importance.detach().flatten().topk(self.k - self.n_dynamic).indices
        self.core.zero_()
        self.core[top.to(self.core.device)] = True

    def core_first(self, scores: torch.Tensor) -> torch.Tensor:
        """Non-negative filter scores ``(..., C_out)`` with the static core (if any) above every
        other filter, still finite (the criteria divide by their sum)."""
        core = getattr(self, "core", None)
        return scores if core is None else torch.where(core, scores.amax() * 2 + 1, scores)

    def _ranked(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits with the static core (if any) ranked above every other filter."""
        core = getattr(self, "core", None)
        return logits if core is None else logits.masked_fill(core, float("inf"))

    def _batch_cut(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rule ``budget`` in training: the batch's ``N * k`` largest (sample, filter) logits, and
        the cut halfway between the last kept and the first dropped."""
        flat = logits.detach().flatten()
        k = logits.shape[0] * self.k
        if k >= flat.numel():
            return torch.ones_like(logits, dtype=torch.bool), flat.min() - 1.0
        top = flat.topk(k + 1)
        keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(0, top.indices[:k], True)
        return keep.view_as(logits), (top.values[k - 1] + top.values[k]) / 2

    def decide(self, logits: torch.Tensor) -> torch.Tensor:
        """The gate's mask for ``logits``: filters whose probability exceeds :attr:`decision`
        (rule ``threshold``), each sample's ``k`` largest logits (rule ``topk``), or (rule
        ``budget``) the batch's largest in training and those above the learnt cut otherwise
        (each sample's ``k`` largest until a training batch has set the cut)."""
        with torch.no_grad():  # the mask itself carries no gradient (see _straight_through)
            rule = self.config.rule
            if rule == "budget" and self.training:
                mask, cut = self._batch_cut(logits)
                cut = cut.to(self.budget_cut.dtype)
                if torch.isnan(self.budget_cut):
                    self.budget_cut.copy_(cut)
                else:
                    self.budget_cut.lerp_(cut, 0.1)
                return mask
            if rule == "budget" and not torch.isnan(self.budget_cut):
                return logits > self.budget_cut.to(logits.dtype)
            if rule in ("topk", "budget"):  # a budget gate with no cut learnt yet: the same budget per sample
                top = self._ranked(logits).topk(self.k, dim=1).indices
                return torch.zeros_like(logits, dtype=torch.bool).scatter_(1, top, True)
            return torch.sigmoid(logits) > self.decision

    def _straight_through(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The hard mask in the forward pass; in the backward pass the gradient of a sigmoid
        centred on the decision boundary, so the task loss tells each gate which filters help.

        The boundary is ``logit(decision)`` for ``threshold``, and halfway between each sample's
        k-th and (k+1)-th logit for ``topk``.
        """
        if self.config.rule == "budget":  # the batch's cut, read off the mask decide() just made
            d = logits.detach()
            centre = (d[mask].min() + d[~mask].max()) / 2 if not bool(mask.all()) else d.min() - 1.0
        elif self.config.rule == "topk":
            if self.k < self.out_channels:
                top = self._ranked(logits.detach()).topk(self.k + 1, dim=1).values
                centre = (top[:, -2:-1] + top[:, -1:]) / 2
            else:
                centre = logits.detach().amin(1, keepdim=True) - 1.0
        else:
            centre = logits.new_tensor(math.log(self.decision / (1.0 - self.decision)))
        soft = torch.sigmoid(logits - centre)
        core = getattr(self, "core", None)
        if core is not None:  # the core is kept whatever its logits say: no gradient to them
            soft = soft.masked_fill(core, 0.0)
        return mask.to(soft.dtype) + (soft - soft.detach())

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean mask ``(N, C_out)`` the gate predicts for input ``x``."""
        with torch.no_grad():
            return self.decide(self.gate(x))

    def ground_truth(self, y: torch.Tensor) -> torch.Tensor:
        """Labels of the unit output ``y``, read after the unit's activation (a filter ReLU silences does not fire)."""
        act = ACTIVATIONS.get(self.spec.act or "")
        y = act.fn(y.detach()) if act is not None else y.detach()
        if getattr(self, "core", None) is not None:
            # Labels with the static core kept: the rest of the k are each sample's strongest
            # other filters, so the labels ask of the gate only what it decides.
            return CRITERIA[self.criterion](self.core_first(filter_scores(y)), self.threshold)
        return ground_truth(y, self.criterion, self.threshold)

    def gate_macs(self) -> int:
        """Per-sample cost of this gate for the last input seen."""
        if self.last is None:
            raise RuntimeError(f"{self.name}: no forward pass seen yet")
        _, c, h, w = self.last.in_shape
        return self.gate.macs(c, h, w)

    # Shortcuts to the last forward's output ------------------------------------------------
    @property
    def mask(self) -> torch.Tensor | None:
        return self.last.mask if self.last is not None else None

    @property
    def labels(self) -> torch.Tensor | None:
        return self.last.labels if self.last is not None else None

    @property
    def logits(self) -> torch.Tensor | None:
        return self.last.logits if self.last is not None else None

    @property
    def in_shape(self) -> tuple[int, ...] | None:
        return self.last.in_shape if self.last is not None else None

    # Hooks --------------------------------------------------------------------------------
    def _on_input(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]
        self._in_shape = tuple(x.shape)
        self._logits = self._scale = None
        if self.masks != "none":
            self._logits, self._scale = self.gate.heads(x.detach() if self.config.mode == "decoupled" else x)

    def _on_output(self, module: nn.Module, args: tuple[Any, ...], y: torch.Tensor) -> torch.Tensor | None:
        logits, self._logits = self._logits, None
        scale, self._scale = self._scale, None
        wants = self.labels_on if self.labels_on is not None else self.training
        labels = self.ground_truth(y) if wants or self.masks == "ground_truth" else None
        if self.masks == "gate":
            mask = self.decide(logits)
        elif self.masks == "ground_truth":
            mask = labels
        elif self.masks == "none":
            mask = None
        else:
            mask = self.masks(self, logits, labels)
        self.last = UnitOutput(logits, mask, labels, self._in_shape, tuple(y.shape))
        if mask is None:
            return None
        if self.masks == "gate" and self.config.ste and self.training and torch.is_grad_enabled():
            factor = self._straight_through(logits, mask)
        else:
            factor = mask.to(y.dtype)
        if scale is not None:
            factor = factor * scale
        return y * factor[:, :, None, None].to(y.dtype)


__all__ = ["MASK_SOURCES", "GatedUnit", "MaskFn", "UnitOutput", "UnitSpec"]
