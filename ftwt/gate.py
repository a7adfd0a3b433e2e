"""Gates: the mask predictors, and the config they are built from.

A gate looks at a convolution's input and predicts, per sample, which output filters will
fire (FTWT, arXiv 2110.08232, Sec. 3.2). It is two small pieces: a feature extractor
(:class:`PooledFeatures`: pool each input channel to ``d x d``, optional softmax) and a
linear layer giving one logit per filter. A new kind of gate is a new feature extractor
(any module with ``out_features(in_channels)``, ``macs(c, h, w)`` and ``forward``) wired
in by :func:`build_gate`; how logits become a mask is the unit's
:meth:`~ftwt.unit.GatedUnit.decide`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ftwt._config import config_from_dict
from ftwt.criteria import CRITERIA
from ftwt.errors import ConfigError

MODES = ("decoupled", "joint")


@dataclass(frozen=True)
class GateConfig:
    """How gates are built and trained; the defaults are the reference code's.

    Frozen: each gated unit keeps the one it was built with. Every check lives in
    :meth:`validate`, which construction and :meth:`replace` run; a new option is a field
    here, a check in :meth:`validate` and, if it changes the gate, a branch in :func:`build_gate`.
    """

    criterion: str = "mass"  # ground-truth rule: "mass" (threshold r) or "uniform" (ratio rho)
    threshold: float = 0.9  # r for "mass", rho for "uniform"
    mode: str = "decoupled"  # "decoupled": gate input detached; "joint": mask loss reaches backbone
    pool: int = 1  # d: gate input is adaptive-avg-pooled to d x d per channel
    embed_target: int | None = None  # if set, d = round(sqrt(target / C_in)) per unit instead
    softmax: bool = True  # softmax over pooled features before the linear layer
    decision: float = 0.5  # a filter is computed iff sigmoid(logit) > decision

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` for any value out of range."""
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

    def replace(self, **changes: Any) -> GateConfig:
        """A validated copy with ``changes`` applied."""
        return replace(self, **changes)

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


class PooledFeatures(nn.Module):
    """The gate's input features: adaptive average pool to ``pool x pool``, flatten, optional softmax."""

    def __init__(self, pool: int = 1, softmax: bool = True) -> None:
        super().__init__()
        self.pool = pool
        self.softmax = softmax

    def out_features(self, in_channels: int) -> int:
        return in_channels * self.pool * self.pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.adaptive_avg_pool2d(x, self.pool).flatten(1)
        return z.softmax(dim=1) if self.softmax else z

    def macs(self, in_channels: int, height: int, width: int) -> int:
        """Pooling reads every input value once."""
        return in_channels * height * width


class Gate(nn.Module):
    """Features of the unit's input, then one logit per output filter.

    Args:
        in_channels: channels of the unit's input.
        out_channels: filters of the unit.
        pool: adaptive average pool size ``d``.
        softmax: apply softmax over the pooled features.
        features: a feature extractor to use instead of :class:`PooledFeatures`.
    """

    def __init__(self, in_channels: int, out_channels: int, pool: int = 1, softmax: bool = True,
                 features: nn.Module | None = None) -> None:
        super().__init__()
        self.features = features if features is not None else PooledFeatures(pool, softmax)
        self.fc = nn.Linear(self.features.out_features(in_channels), out_channels)

    @property
    def pool(self) -> int:
        return self.features.pool

    @property
    def softmax(self) -> bool:
        return self.features.softmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))

    def macs(self, in_channels: int, height: int, width: int) -> int:
        """Per-sample cost: the features, then the linear layer."""
        return self.features.macs(in_channels, height, width) + self.fc.in_features * self.fc.out_features


def build_gate(config: GateConfig, in_channels: int, out_channels: int) -> Gate:
    """The gate ``config`` asks for, for a unit of ``in_channels`` inputs and ``out_channels`` filters."""
    return Gate(in_channels, out_channels, config.pool_size(in_channels), config.softmax)


__all__ = ["MODES", "Gate", "GateConfig", "PooledFeatures", "build_gate"]
