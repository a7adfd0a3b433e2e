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
FEATURES = ("avg", "avgmax")
RULES = ("threshold", "topk", "budget")
SCOPES = ("all", "internal")
SALIENCY = ("none", "scale", "rank")


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
    features: str = "avg"  # gate input: "avg" pooling (reference) or "avgmax" (average and max, concatenated)
    hidden: int = 0  # width of a hidden ReLU layer in the gate; 0: one linear layer (reference)
    rule: str = "threshold"  # mask: "threshold" (sigmoid > decision, reference) or "topk" (each sample's top logits;
    #   with the uniform criterion: as many filters as its labels keep, C - floor(rho * C)), or "budget"
    #   (in training the batch's top share of (sample, filter) logits, so inputs compete for the unit's
    #   budget and a sample may take more or fewer filters; at inference a cut learnt from those batches)
    offset: bool = False  # a per-sample scalar added to all of a unit's logits: with "budget", how many filters
    #   of its ranking an input takes
    ste: bool = False  # straight-through estimator: the task loss trains the gates through their decision
    scope: str = "all"  # units to gate: "all", or "internal" (not those whose output feeds a residual add)
    saliency: str = "none"  # "scale": kept filters are multiplied by 2 * sigmoid(u), u from a second head that
    #   starts at zero (the identity); "rank": and the filters are ranked by logit + u, so what the task
    #   teaches the scale (an exact gradient) also moves which filters are computed
    dynamic: float = 1.0  # with "topk": the share of each sample's k filters its gate chooses; the other
    #   k - m are a static core (the unit's strongest filters by L1 x |gamma| when the gates are attached),
    #   computed for every input and counted as kept in the labels too

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
        for name, value, choices in (("features", self.features, FEATURES), ("rule", self.rule, RULES),
                                     ("scope", self.scope, SCOPES), ("saliency", self.saliency, SALIENCY)):
            if value not in choices:
                raise ConfigError(f"unknown gate {name} {value!r}; choose from {list(choices)}")
        if self.hidden < 0:
            raise ConfigError(f"gate hidden width must be >= 0, got {self.hidden}")
        if not 0.0 < self.dynamic <= 1.0:
            raise ConfigError(f"dynamic share must be in (0, 1], got {self.dynamic}")
        if self.dynamic < 1.0 and self.rule != "topk":
            raise ConfigError(f"a static core (dynamic={self.dynamic}) needs gate rule 'topk', got {self.rule!r}")
        if self.rule in ("topk", "budget") and self.criterion != "uniform":
            raise ConfigError(f"gate rule {self.rule!r} keeps a fixed share per unit: use it with criterion 'uniform' "
                              "(threshold = the share of filters pruned)")

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
    """The gate's input features: each channel pooled to ``pool x pool`` (average, and max with
    ``with_max``), flattened, optional softmax.

    The reference's softmax over average-pooled features squeezes them into a distribution
    whose entries are all about ``1 / C_in``; without it and with the max beside the mean,
    the gate sees how strongly and how locally each input channel fires.
    """

    def __init__(self, pool: int = 1, softmax: bool = True, with_max: bool = False) -> None:
        super().__init__()
        self.pool = pool
        self.softmax = softmax
        self.with_max = with_max

    def out_features(self, in_channels: int) -> int:
        return in_channels * self.pool * self.pool * (2 if self.with_max else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.adaptive_avg_pool2d(x, self.pool).flatten(1)
        if self.with_max:
            z = torch.cat([z, F.adaptive_max_pool2d(x, self.pool).flatten(1)], 1)
        return z.softmax(dim=1) if self.softmax else z

    def macs(self, in_channels: int, height: int, width: int) -> int:
        """Pooling reads every input value once per pooling kind."""
        return in_channels * height * width * (2 if self.with_max else 1)


class Gate(nn.Module):
    """Features of the unit's input, an optional hidden ReLU layer, then one logit per output filter.

    Args:
        in_channels: channels of the unit's input.
        out_channels: filters of the unit.
        pool: adaptive pool size ``d``.
        softmax: apply softmax over the pooled features.
        features: a feature extractor to use instead of :class:`PooledFeatures`.
        hidden: width of a hidden layer (0: none).
        saliency: ``"none"``, ``"scale"`` or ``"rank"`` (:attr:`GateConfig.saliency`).
        offset: add one per-sample scalar to every logit (:attr:`GateConfig.offset`).
    """

    def __init__(self, in_channels: int, out_channels: int, pool: int = 1, softmax: bool = True,
                 features: nn.Module | None = None, hidden: int = 0, saliency: str = "none",
                 offset: bool = False) -> None:
        super().__init__()
        self.features = features if features is not None else PooledFeatures(pool, softmax)
        width = self.features.out_features(in_channels)
        self.hidden = nn.Linear(width, hidden) if hidden else None
        self.fc = nn.Linear(hidden or width, out_channels)
        self.rank_by_scale = saliency == "rank"
        # Feature boosting (FBS-style): a per-sample scale of each kept filter. Zero weights and
        # bias make it exactly 1 at first, so a gated model starts as the one it was built from.
        self.scale_fc = nn.Linear(hidden or width, out_channels) if saliency != "none" else None
        # The offset starts at zero too: the ranking the biases hold is the gate's first decision.
        self.offset_fc = nn.Linear(hidden or width, 1) if offset else None
        for head in (self.scale_fc, self.offset_fc):
            if head is not None:
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)

    @property
    def pool(self) -> int:
        return self.features.pool

    @property
    def softmax(self) -> bool:
        return self.features.softmax

    @property
    def is_reference(self) -> bool:
        """Average pooling straight into one linear layer: the form the engine's fused native gate computes."""
        return (isinstance(self.features, PooledFeatures) and not self.features.with_max and self.hidden is None
                and self.scale_fc is None and self.offset_fc is None)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits ``(N, C_out)`` that rank the filters, and the kept filters' scale ``(N, C_out)`` (None without saliency)."""
        z = self.features(x)
        if self.hidden is not None:
            z = F.relu(self.hidden(z))
        logits = self.fc(z)
        if self.offset_fc is not None:
            logits = logits + self.offset_fc(z)
        if self.scale_fc is None:
            return logits, None
        u = self.scale_fc(z)
        return (logits + u if self.rank_by_scale else logits), 2.0 * torch.sigmoid(u)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(x)[0]

    def macs(self, in_channels: int, height: int, width: int) -> int:
        """Per-sample cost: the features, then the linear layers (the scale's multiply rides on the mask's)."""
        heads = (self.fc, self.hidden, self.scale_fc, self.offset_fc)
        lin = sum(m.in_features * m.out_features for m in heads if m is not None)
        return self.features.macs(in_channels, height, width) + lin


def build_gate(config: GateConfig, in_channels: int, out_channels: int) -> Gate:
    """The gate ``config`` asks for, for a unit of ``in_channels`` inputs and ``out_channels`` filters."""
    features = PooledFeatures(config.pool_size(in_channels), config.softmax, config.features == "avgmax")
    return Gate(in_channels, out_channels, features=features, hidden=config.hidden, saliency=config.saliency,
                offset=config.offset)


__all__ = ["FEATURES", "MODES", "RULES", "SALIENCY", "SCOPES", "Gate", "GateConfig", "PooledFeatures", "build_gate"]
