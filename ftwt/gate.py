"""Gates (mask predictors) and the gated unit that applies them.

A gate looks at a convolution's input and predicts, per sample, which output filters
will fire (FTWT, arXiv 2110.08232, Sec. 3.2). :class:`GatedUnit` holds one gate and the
two forward hooks that put it into an unchanged model: a pre-hook on the convolution
runs the gate on the convolution's input, a hook on the unit's last module (the
BatchNorm, or the convolution itself when none follows) multiplies the output by the mask.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ftwt._config import config_from_dict
from ftwt.criteria import CRITERIA, ground_truth
from ftwt.errors import ConfigError

MODES = ("decoupled", "joint")
MASK_SOURCES = ("gate", "ground_truth", "none")

# Activations after the unit: labels are taken on the activated output, since a filter
# that ReLU silences for a sample does not fire for it. All map 0 to 0, so masking before
# them equals masking after them.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "relu6": F.relu6,
    "hardswish": F.hardswish,
    "silu": F.silu,
    "gelu": F.gelu,
}


@dataclass
class GateConfig:
    """How gates are built and trained; the defaults are the reference code's."""

    criterion: str = "mass"  # ground-truth rule: "mass" (threshold r) or "uniform" (ratio rho)
    threshold: float = 0.9  # r for "mass", rho for "uniform"
    mode: str = "decoupled"  # "decoupled": gate input detached; "joint": mask loss reaches backbone
    pool: int = 1  # d: gate input is adaptive-avg-pooled to d x d per channel
    embed_target: int | None = None  # if set, d = round(sqrt(target / C_in)) per unit instead
    softmax: bool = True  # softmax over pooled features before the linear layer
    decision: float = 0.5  # a filter is computed iff sigmoid(logit) > decision

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise ConfigError(f"unknown criterion {self.criterion!r}; choose from {sorted(CRITERIA)}")
        if self.criterion == "mass" and not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"mass threshold must be in (0, 1], got {self.threshold}")
        if self.criterion == "uniform" and not 0.0 <= self.threshold < 1.0:
            raise ConfigError(f"uniform ratio must be in [0, 1), got {self.threshold}")
        if self.mode not in MODES:
            raise ConfigError(f"unknown mode {self.mode!r}; choose from {list(MODES)}")
        if self.pool < 1:
            raise ConfigError(f"gate pool size must be >= 1, got {self.pool}")
        if self.embed_target is not None and self.embed_target < 1:
            raise ConfigError(f"embed_target must be >= 1, got {self.embed_target}")
        if not 0.0 < self.decision < 1.0:
            raise ConfigError(f"decision threshold must be in (0, 1), got {self.decision}")

    def pool_size(self, in_channels: int) -> int:
        """Pool size ``d`` for a unit with ``in_channels`` inputs."""
        if self.embed_target is None:
            return self.pool
        return max(1, round(math.sqrt(self.embed_target / in_channels)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GateConfig:
        return config_from_dict(cls, data, "gate option(s)")


class Gate(nn.Module):
    """Pool, optional softmax, then one logit per output filter.

    Args:
        in_channels: channels of the unit's input.
        out_channels: filters of the unit.
        pool: adaptive average pool size ``d``.
        softmax: apply softmax over the pooled features.
    """

    def __init__(self, in_channels: int, out_channels: int, pool: int = 1, softmax: bool = True) -> None:
        super().__init__()
        self.pool = pool
        self.softmax = softmax
        self.fc = nn.Linear(in_channels * pool * pool, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.adaptive_avg_pool2d(x, self.pool).flatten(1)
        if self.softmax:
            z = z.softmax(dim=1)
        return self.fc(z)

    def macs(self, in_channels: int, height: int, width: int) -> int:
        """Per-sample cost: pooling reads every input value once, then the linear layer."""
        return in_channels * height * width + self.fc.in_features * self.fc.out_features


@dataclass(frozen=True)
class UnitSpec:
    """Where a gated unit sits in a model.

    Attributes:
        conv: qualified name of the ``nn.Conv2d``.
        norm: qualified name of the BatchNorm applied to its output, or None.
        act: activation applied after the unit (a key of ``ACTIVATIONS``) or None.
    """

    conv: str
    norm: str | None = None
    act: str | None = None

    @property
    def tail(self) -> str:
        """The module whose output is masked."""
        return self.norm or self.conv


class GatedUnit(nn.Module):
    """One gate plus the per-forward state of its unit.

    After each forward of the model: ``logits`` ``(N, C_out)`` (with gradient in training),
    ``mask`` ``(N, C_out)`` bool (the mask applied), ``labels`` ``(N, C_out)`` bool or None
    (ground truth, when collected), ``in_shape`` and ``out_shape`` of the convolution.
    """

    def __init__(self, spec: UnitSpec, conv: nn.Conv2d, config: GateConfig) -> None:
        super().__init__()
        self.spec = spec
        self.in_channels = conv.in_channels
        self.out_channels = conv.out_channels
        self.gate = Gate(conv.in_channels, conv.out_channels, config.pool_size(conv.in_channels), config.softmax)
        self.criterion = config.criterion
        self.threshold = config.threshold
        self.mode = config.mode
        self.decision = config.decision
        self.mask_source = "gate"  # "gate" | "ground_truth" | "none"
        self.label_mode = "train"  # compute ground truth: "train" (training forwards), "always", "never"
        self.logits: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        self.in_shape: tuple[int, ...] | None = None
        self.out_shape: tuple[int, ...] | None = None
        self._handles: list[Any] = []

    @property
    def name(self) -> str:
        return self.spec.conv

    def extra_repr(self) -> str:
        return f"{self.spec.conv}: {self.in_channels} -> {self.out_channels}, {self.criterion}={self.threshold}"

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean mask ``(N, C_out)`` the gate predicts for input ``x``."""
        with torch.no_grad():
            return torch.sigmoid(self.gate(x)) > self.decision

    def gate_macs(self) -> int:
        """Per-sample cost of this gate for the last input seen."""
        if self.in_shape is None:
            raise RuntimeError(f"{self.name}: no forward pass seen yet")
        _, c, h, w = self.in_shape
        return self.gate.macs(c, h, w)

    # Hooks -------------------------------------------------------------------------
    def _on_input(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]
        self.in_shape = tuple(x.shape)
        self.labels = None
        self.mask = None
        if self.mask_source == "none":
            self.logits = None
            return
        gate_in = x.detach() if self.mode == "decoupled" else x
        self.logits = self.gate(gate_in)
        if self.mask_source == "gate":
            # No gradient through the decision: the task loss never trains the gate.
            with torch.no_grad():
                self.mask = torch.sigmoid(self.logits) > self.decision

    def _on_output(self, module: nn.Module, args: tuple[Any, ...], y: torch.Tensor) -> torch.Tensor | None:
        self.out_shape = tuple(y.shape)
        needs_labels = self.mask_source == "ground_truth" or self.label_mode == "always" or (
            self.label_mode == "train" and self.training
        )
        if needs_labels:
            act = ACTIVATIONS.get(self.spec.act or "", None)
            fired = act(y.detach()) if act is not None else y
            self.labels = ground_truth(fired, self.criterion, self.threshold)
        if self.mask_source == "ground_truth":
            self.mask = self.labels
        if self.mask is None:
            return None
        return y * self.mask[:, :, None, None].to(y.dtype)
