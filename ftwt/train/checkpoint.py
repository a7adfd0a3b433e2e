"""The training checkpoint: what ``ftwt train`` writes after every epoch, and how models come back from it.

A :class:`Checkpoint` holds tensors and plain data only (see :mod:`ftwt.checkpoint`), so it
is read with ``torch.load(weights_only=True)``. :func:`load_trained` rebuilds the model a
checkpoint holds, gated or dense; :func:`load_model` builds a registry model with plain
dense weights (``--init``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from torch import nn

from ftwt.checkpoint import load_checkpoint, load_state_dict_into, save_checkpoint
from ftwt.errors import CheckpointError, ConfigError
from ftwt.gate import GateConfig
from ftwt.models import get_model
from ftwt.surgery import GATES_ATTR, attach_gates, is_gated

# Keys without which a file is not a model written by ftwt train.
_MODEL_KEYS = ("model_name", "num_classes", "model")
# Keys a run needs to resume exactly.
RESUME_KEYS = ("config", "model", "model_name", "epoch", "optimizers", "schedulers", "rng")


@dataclass
class Checkpoint:
    """One training checkpoint (``last.pt`` / ``best.pt``).

    Attributes:
        model_name: registry name of the model.
        num_classes: classifier outputs.
        gate_config: the :class:`GateConfig` as a dict, or None for a dense model.
        model: the model's ``state_dict`` (gated units' decisions included).
        input_size: ``[C, H, W]`` of one training sample.
        dataset: the dataset trained on.
        epoch: completed epochs.
        step: training steps done in the epoch after those (a ``--save-every`` checkpoint); 0 at an
            epoch's end. The loader's order is a function of ``(seed, epoch)``, so the step is
            the loader's position; the epoch's batches before it are replayed without training.
        epoch_sums: the metric sums of those steps (all processes'), so that the epoch's metrics
            come out as if it had never been interrupted.
        optimizers, schedulers, scaler, rng: training state, for an exact resume.
        best_top1: best validation top-1 so far (among the epochs eligible for ``best.pt``).
        estimated_reduction: FLOPs reduction estimated before training (FTWT runs).
        calibrated_decisions: the calibrated decision thresholds, once set.
        config: the resolved :class:`~ftwt.train.TrainConfig` as a dict.
        model_kwargs: builder arguments besides ``num_classes``, e.g. ``{"shortcut": "reference"}``;
            empty in checkpoints written before they were recorded (the builders' defaults).
        gate_units: the gated convolutions' names, so the same gates come back; None in
            checkpoints written before they were recorded (those gated every convolution).
    """

    model_name: str
    num_classes: int
    gate_config: dict[str, Any] | None
    model: dict[str, Any]
    input_size: list[int] | None = None
    dataset: str | None = None
    epoch: int = 0
    step: int = 0
    epoch_sums: list[float] | None = None
    optimizers: list[dict[str, Any]] = field(default_factory=list)
    schedulers: list[dict[str, Any]] = field(default_factory=list)
    scaler: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, Any] | None = None
    best_top1: float = -1.0
    estimated_reduction: float | None = None
    calibrated_decisions: list[float] | None = None
    config: dict[str, Any] | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    gate_units: list[str] | None = None

    @property
    def gated(self) -> bool:
        return self.gate_config is not None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "checkpoint") -> Checkpoint:
        """Read a checkpoint dict; keys it does not know are ignored (newer writers may add some)."""
        missing = [k for k in _MODEL_KEYS if k not in data]
        if missing:
            raise CheckpointError(f"{where} is not an ftwt training checkpoint (missing {missing}); "
                                  "use --init for plain weights")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (see :func:`ftwt.checkpoint.save_checkpoint`)."""
        save_checkpoint(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Checkpoint:
        """Read a checkpoint without running code from the file.

        Raises:
            CheckpointError: missing, corrupt or unsafe file, or not written by ``ftwt train``.
        """
        return cls.from_dict(load_checkpoint(path), str(path))

    def missing_for_resume(self) -> list[str]:
        """The keys an exact resume needs that this checkpoint lacks (empty: it can resume)."""
        data = self.to_dict()
        return [k for k in RESUME_KEYS
                if data.get(k) is None or (k in ("optimizers", "schedulers", "rng") and not data[k])]

    def build_model(self) -> nn.Module:
        """The model this checkpoint holds, with its weights (and gates, for FTWT runs)."""
        model = get_model(self.model_name, num_classes=int(self.num_classes), **(self.model_kwargs or {}))
        if self.gate_config:
            self.attach_gates(model)
        load_state_dict_into(model, self.model, strict=True)
        return model

    def attach_gates(self, model: nn.Module) -> None:
        """The checkpoint's gates on ``model``: on the units it names (older checkpoints: every unit)."""
        include = list(self.gate_units) if self.gate_units is not None else None
        attach_gates(model, GateConfig.from_dict(self.gate_config), include=include, skip_unhelpful=False)


def load_trained(path: str | os.PathLike) -> tuple[nn.Module, Checkpoint]:
    """Rebuild a model written by ``ftwt train`` (gated or dense) and return it with its checkpoint.

    Checkpoints written before units kept their decisions in ``state_dict`` (calibration
    folded into the gate biases) load too, with the same masks.

    Example:
        >>> model, ckpt = load_trained("runs/ftwt/best.pt")
        >>> ckpt.epoch, ckpt.gated
    """
    ckpt = Checkpoint.load(path)
    return ckpt.build_model(), ckpt


def load_model(name: str | os.PathLike, num_classes: int | None = None, init: str | os.PathLike | None = None, *,
               model: nn.Module | None = None, **model_kwargs: Any) -> nn.Module:
    """A model by name with dense weights from ``init``, a trained model from its checkpoint, or a checkpoint
    loaded into your own model.

    Three forms:

    - ``load_model(checkpoint)``: the model a checkpoint of ``ftwt train`` holds, rebuilt with its
      weights and gates (as :func:`load_trained`, without the checkpoint object), in eval mode.
    - ``load_model(name, num_classes, init=None, **model_kwargs)``: a registry, torchvision or
      ``package.module:factory`` model, with dense weights from ``init`` (any checkpoint or
      state dict; gates left out) if given. ``model_kwargs`` go to the builder, e.g.
      ``shortcut="reference"`` for a CIFAR ResNet.
    - ``load_model(checkpoint, model=MyNet())``: the checkpoint's weights (gates attached as it
      says, for an FTWT run) loaded into ``model``, which is returned. The checkpoint may be
      one ``ftwt train`` wrote or a plain state dict.

    Example:
        >>> model = load_model("runs/ftwt/best.pt")
        >>> net = load_model("runs/mine/best.pt", model=MyNet())

    Raises:
        CheckpointError: the checkpoint is unreadable or does not fit the model.
        ConfigError: no such file, or a name without ``num_classes``.
    """
    if model is not None:
        return _load_into(model, name)
    if num_classes is None and init is None and not model_kwargs and Path(name).is_file():
        return load_trained(name)[0].eval()
    if num_classes is None and Path(name).suffix in (".pt", ".pth", ".safetensors"):
        raise ConfigError(f"checkpoint not found: {name}")
    if num_classes is None:
        raise ConfigError("load_model(name, num_classes): give num_classes, a checkpoint path, or model= to load "
                          "a checkpoint into it")
    return load_dense(get_model(str(name), num_classes=num_classes, **model_kwargs), init)


def load_dense(model: nn.Module, init: str | os.PathLike | None) -> nn.Module:
    """``model`` with the dense weights of ``init`` (gates in it left out); unchanged when ``init`` is None."""
    if init is not None:
        if not Path(init).is_file():
            raise ConfigError(f"checkpoint not found: {init}")
        load_state_dict_into(model, load_checkpoint(init), strict=True, ignore_prefixes=(GATES_ATTR + ".",))
    return model


def _load_into(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    if not Path(path).is_file():
        raise ConfigError(f"checkpoint not found: {path}")
    data = load_checkpoint(path)
    if not all(k in data for k in _MODEL_KEYS):  # plain weights
        load_state_dict_into(model, data, strict=True)
        return model
    ckpt = Checkpoint.from_dict(data, str(path))
    if ckpt.gate_config and not is_gated(model):
        ckpt.attach_gates(model)
    load_state_dict_into(model, ckpt.model, strict=True)
    return model


__all__ = ["Checkpoint", "RESUME_KEYS", "load_model", "load_trained"]
