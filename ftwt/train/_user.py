"""The user's own data and model in :class:`~ftwt.train.Trainer`: what ftwt needs to know about them.

A ``DataLoader`` gives its dataset and batch size; the trainer draws its own batches from
them, so that shuffling stays seeded, resumable and sharded across processes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ftwt.data import DatasetInfo, build_datasets, input_size_for
from ftwt.errors import ConfigError, DataError
from ftwt.models import get_model
from ftwt.surgery import attach_gates
from ftwt.train.checkpoint import load_dense, load_model
from ftwt.train.config import TrainConfig

log = logging.getLogger(__name__)

Data = Dataset | DataLoader


def resolve_data(cfg: TrainConfig, train_data: Data | None, val_data: Data | None,
                 model: nn.Module | None) -> tuple[TrainConfig, Dataset, Dataset, DatasetInfo]:
    """The run's datasets: the user's where given, else the config's ``dataset``."""
    if train_data is None:
        if cfg.dataset == "digits" and cfg.image_size is None:  # 16x16: resized for models that need more, as bench does
            probe = model if model is not None else get_model(cfg.model, num_classes=10, **cfg.model_kwargs())
            cfg = replace(cfg, image_size=input_size_for(probe))
        train, val, info = build_datasets(cfg.data_config())
        return cfg, train, val if val_data is None else _dataset(val_data, "val_data")[0], info
    train, batch_size = _dataset(train_data, "train_data")
    if batch_size is not None:
        cfg = replace(cfg, batch_size=batch_size)
    if val_data is None:
        log.warning("no val_data given: validating on the training data")
        val = train
    else:
        val = _dataset(val_data, "val_data")[0]
    sample = train[0]
    if not isinstance(sample, (tuple, list)) or len(sample) < 2 or not torch.is_tensor(sample[0]) or sample[0].dim() != 3:
        raise DataError("train_data must yield (image (C, H, W) tensor, class index) pairs")
    classes = tuple(str(c) for c in getattr(train, "classes", ()))
    num_classes = cfg.num_classes or len(classes) or _count_classes(train)
    info = DatasetInfo("custom", num_classes, tuple(sample[0].shape), (), (), classes)
    return replace(cfg, num_classes=num_classes), train, val, info


def model_name(model: nn.Module, configured: str) -> str:
    """The name a checkpoint records: the config's import path if it gives one, else the class's."""
    return configured if ":" in configured else f"{type(model).__module__}:{type(model).__qualname__}"


def stated(cfg: TrainConfig, info: DatasetInfo) -> dict[str, Any]:
    """What an image folder's defaults came to (size, augmentation, statistics), for config.yaml and resumes."""
    if cfg.dataset != "folder":
        return {}
    return {"image_size": info.input_size[-1], "augment": info.augment, "mean": list(info.mean), "std": list(info.std)}


def build_model(cfg: TrainConfig, load_init: bool, sync_bn: bool, warn: bool, model: nn.Module | None) -> nn.Module:
    """The run's model (the user's, or ``cfg.model`` from the registry) with ``cfg.init`` loaded and gates attached."""
    init = cfg.init if load_init else None
    if model is None:
        model = load_model(cfg.model, cfg.num_classes, init, **cfg.model_kwargs())
    else:
        model = load_dense(model, init)
    if cfg.init is None and not cfg.dense and load_init and warn:
        log.warning("FTWT without --init: gates learn from an untrained backbone; train a dense model first")
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # new modules: before the gates hook them
    if not cfg.dense:
        attach_gates(model, cfg.gate_config(), **cfg.gate_patterns())
    return model


def check_input(model: nn.Module, input_size: Sequence[int], name: str, device: torch.device) -> None:
    """One sample through the model in eval mode (no state changes): a size it cannot take is one line now."""
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_size, device=device))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{name} cannot take {'x'.join(map(str, input_size))} inputs ({first}); "
                          "choose another --image-size or model") from None
    finally:
        model.train(was_training)


def _dataset(data: Any, what: str) -> tuple[Dataset, int | None]:
    if isinstance(data, DataLoader):
        return data.dataset, data.batch_size
    if isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        return data, None
    raise ConfigError(f"{what} must be a torch Dataset or DataLoader, got {type(data).__name__}")


def _count_classes(train: Any) -> int:
    labels = None
    if hasattr(train, "tensors") and len(train.tensors) > 1:  # TensorDataset
        labels = train.tensors[1]
    elif hasattr(train, "targets"):
        labels = torch.as_tensor(train.targets)
    if labels is None or labels.numel() == 0:
        raise ConfigError("cannot tell how many classes train_data has; set num_classes in the config")
    return int(labels.max()) + 1


__all__ = ["Data", "build_model", "check_input", "model_name", "resolve_data", "stated"]
