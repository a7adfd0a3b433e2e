"""Training: dense baselines and FTWT gates, on one process or many (``torchrun``).

The FTWT recipe (arXiv 2110.08232; the authors' reference code): start from a trained
dense model, train backbone and gates with two SGD optimizers, the gates only from their
own mask loss (weight ``lam``). At ``cooldown`` (half of the epochs) the gates freeze and
the backbone adapts to their masks for the remaining epochs.

Every run writes into ``out_dir``: ``config.yaml`` (the resolved config, at the start),
one JSON line per epoch in ``metrics.jsonl``, ``last.pt`` and ``best.pt`` (best top-1;
for FTWT runs among the epochs after cooldown, whose masks are final) after every epoch, and at the end ``report.json`` / ``per_layer.png``
(:func:`ftwt.evaluate.write_report`) with the FLOPs reduction estimated *before* training
next to the one achieved. Under ``torchrun`` (``WORLD_SIZE > 1``) the same code runs
DistributedDataParallel; only rank 0 writes files and shows progress.

Example:
    >>> from ftwt.train import TrainConfig, Trainer
    >>> dense = Trainer(TrainConfig(model="resnet20", dense=True, epochs=10, out_dir="runs/dense")).fit()
    >>> ftwt = Trainer(TrainConfig(model="resnet20", init="runs/dense/best.pt", threshold=0.9,
    ...                            epochs=10, out_dir="runs/ftwt")).fit()
    >>> print(ftwt["top1"], ftwt["estimated_reduction"], ftwt["flops_reduction"])
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from ftwt._config import config_from_dict
from ftwt.checkpoint import load_checkpoint, load_state_dict_into, save_checkpoint
from ftwt.criteria import CRITERIA
from ftwt.data import DATASETS, DataConfig, build_datasets
from ftwt.errors import CheckpointError, ConfigError, DeviceError
from ftwt.estimate import estimate
from ftwt.flops import FlopsMeter
from ftwt.gate import MODES, GateConfig
from ftwt.loss import mask_loss
from ftwt.models import get_model
from ftwt.surgery import GATES_ATTR, attach_gates, backbone_parameters, gate_parameters, gated_units, set_label_mode

log = logging.getLogger(__name__)

SCHEDULES = ("step", "cosine")


@dataclass
class TrainConfig:
    """Everything a training run needs; recipes (``ftwt/recipes/*.yaml``) set these keys.

    ``None`` defaults are resolved by :meth:`resolved` (FTWT and dense runs differ) and the
    resolved values are what ``config.yaml`` and the checkpoints record.
    """

    # model
    model: str = "resnet56"  # registry name or torchvision:NAME
    num_classes: int | None = None  # None: the dataset's number of classes
    init: str | None = None  # dense checkpoint to start from; FTWT fine-tunes a trained dense model
    # data
    dataset: str = "digits"  # digits (embedded), cifar10, cifar100 or folder
    data_dir: str | None = None  # dataset root (CIFAR files or train/ and val/ class folders)
    download: bool = False  # let torchvision fetch CIFAR
    image_size: int | None = None  # None: the dataset's own (digits 16, CIFAR 32, folder 224)
    batch_size: int = 128  # per process (reference: 128 on one GPU)
    workers: int = 2  # DataLoader worker processes; 0 loads in the main process
    train_subset: int | None = None  # first N training samples only (quick runs)
    val_subset: int | None = None  # first N validation samples only (quick runs)
    # gates
    dense: bool = False  # no gates: train the dense baseline FTWT starts from
    mode: str = "decoupled"  # "decoupled": mask loss trains gates only; "joint": it reaches the backbone
    criterion: str = "mass"  # ground-truth rule: "mass" or "uniform" (ablation)
    threshold: float = 0.9  # mass r (or uniform ratio rho): the compute budget
    gate_pool: int = 1  # gate input pooled to d x d per channel (reference d = 1)
    gate_softmax: bool = True  # softmax over pooled features (reference default)
    gate_embed: int | None = None  # if set, d = round(sqrt(gate_embed / C_in)) per unit
    lam: float = 1.0  # mask-loss weight until cooldown (then 0)
    cooldown: int | None = None  # epoch from which gates are frozen; None: half the epochs, rounded up (reference)
    balance_loss: bool = False  # class-balanced mask loss: labels are mostly 1 and plain BCE leans to keeping
    calibrate: bool = False  # at cooldown, set per-unit decisions so that gates keep what labels keep
    calibrate_batches: int = 100  # training batches per process and round for calibration; quantiles settle fast
    estimate_samples: int = 256  # training samples for the FLOPs estimate made before training
    # optimisation
    epochs: int = 200  # reference CIFAR recipe
    lr: float | None = None  # backbone SGD lr; None: 0.01 for FTWT (reference), 0.1 for dense
    momentum: float = 0.9  # backbone SGD momentum (reference)
    weight_decay: float = 5e-4  # backbone weight decay (reference); gates have none
    schedule: str | None = None  # "step" or "cosine"; None: step for FTWT (reference), cosine for dense
    milestones: list[float] = field(default_factory=lambda: [0.405, 0.61, 0.755])  # step epochs; < 1 = fraction of epochs (reference 81/122/151 of 200)
    gamma: float = 0.1  # lr factor at each milestone (reference)
    gate_lr: float = 0.1  # gate SGD lr (reference "mlr")
    gate_momentum: float = 0.9  # gate SGD momentum (reference)
    amp: bool = False  # float16 autocast with loss scaling; CUDA only (ignored on CPU)
    sync_bn: bool = False  # SyncBatchNorm across processes (CUDA, torchrun only)
    flops_every: int = 10  # count training FLOPs on every N-th batch: the count syncs with the GPU
    # run
    seed: int = 0  # seeds init, augmentation and the per-epoch shuffle (seed + epoch)
    device: str = "auto"  # "auto", "cpu", "cuda" or "cuda:N"
    out_dir: str = "runs/train"  # config.yaml, metrics.jsonl, last.pt, best.pt, report.json
    overwrite: bool = False  # allow starting a fresh run in a folder that already holds one
    progress: bool = True  # tqdm bar on rank 0

    def __post_init__(self) -> None:
        _check_types(self)
        self.milestones = list(self.milestones)
        for name in ("epochs", "batch_size", "estimate_samples", "calibrate_batches", "flops_every", "gate_pool"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("num_classes", "image_size", "train_subset", "val_subset", "gate_embed"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be a positive integer or null, got {value}")
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers}")
        if self.dataset not in DATASETS:
            raise ConfigError(f"unknown dataset {self.dataset!r}; choose one of: {', '.join(DATASETS)}")
        if self.mode not in MODES:
            raise ConfigError(f"unknown mode {self.mode!r}; choose from {list(MODES)}")
        if self.criterion not in CRITERIA:
            raise ConfigError(f"unknown criterion {self.criterion!r}; choose from {sorted(CRITERIA)}")
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; choose from {list(SCHEDULES)}")
        if self.cooldown is not None and self.cooldown < 0:
            raise ConfigError(f"cooldown must be >= 0 epochs, got {self.cooldown}")
        if any(m <= 0 for m in self.milestones):
            raise ConfigError(f"milestones must be > 0 (epochs, or fractions of epochs below 1), got {self.milestones}")
        for name in ("lr", "gate_lr"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be > 0, got {value}")
        if self.lam < 0 or self.weight_decay < 0 or self.momentum < 0 or self.gate_momentum < 0 or self.gamma <= 0:
            raise ConfigError("lam, weight_decay and momenta must be >= 0 and gamma > 0")
        if not self.dense:
            self.gate_config()  # validates threshold against criterion

    def gate_config(self) -> GateConfig | None:
        """The :class:`GateConfig` of this run (None for a dense run)."""
        if self.dense:
            return None
        return GateConfig(criterion=self.criterion, threshold=self.threshold, mode=self.mode, pool=self.gate_pool,
                          embed_target=self.gate_embed, softmax=self.gate_softmax)

    def data_config(self) -> DataConfig:
        return DataConfig(dataset=self.dataset, data_dir=self.data_dir, batch_size=self.batch_size,
                          workers=self.workers, image_size=self.image_size, download=self.download,
                          train_subset=self.train_subset, val_subset=self.val_subset)

    def resolved(self) -> TrainConfig:
        """A copy with the recipe-dependent defaults filled in and milestones in epochs."""
        milestones = sorted({round(m * self.epochs) if m < 1 else int(m) for m in self.milestones})
        return replace(
            self,
            lr=self.lr if self.lr is not None else (0.1 if self.dense else 0.01),
            schedule=self.schedule or ("cosine" if self.dense else "step"),
            cooldown=self.cooldown if self.cooldown is not None else math.ceil(self.epochs / 2),
            milestones=[m for m in milestones if m > 0],
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a recipe or checkpoint dict; unknown keys raise :class:`ConfigError`."""
        return config_from_dict(cls, data, "config key(s)")


def _check_types(config: TrainConfig) -> None:
    """Recipes are YAML: refuse a wrong type with one line instead of failing deep inside."""
    for f in fields(config):
        value, kind = getattr(config, f.name), str(f.type)
        if value is None and "None" in kind:
            continue
        if kind.startswith("bool"):
            ok = isinstance(value, bool)
        elif kind.startswith("int"):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind.startswith("float"):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if ok:
                setattr(config, f.name, float(value))
        elif kind.startswith("str"):
            ok = isinstance(value, str)
        elif kind.startswith("list"):
            ok = isinstance(value, (list, tuple)) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
            )
        else:
            ok = True
        if not ok:
            raise ConfigError(f"config key {f.name!r} must be {kind}, got {value!r}")


# Recipes ---------------------------------------------------------------------------------
def list_recipes() -> list[str]:
    """Names of the recipes shipped in ``ftwt/recipes``."""
    folder = resources.files("ftwt") / "recipes"
    if not folder.is_dir():
        return []
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """Read a recipe: a YAML file path, or the bare name of a shipped recipe.

    Returns the raw dict; :meth:`TrainConfig.from_dict` checks its keys.

    Raises:
        ConfigError: no such file or recipe, unreadable YAML, or not a mapping.
    """
    path = Path(name_or_path)
    if path.is_file():
        text, where = path.read_text(), str(path)
    else:
        # `recipes/NAME.yaml` (as the README writes it) names a shipped recipe too.
        shipped = resources.files("ftwt") / "recipes" / f"{path.name.removesuffix('.yaml')}.yaml"
        if not shipped.is_file():
            raise ConfigError(f"no recipe file or shipped recipe named {name_or_path!r}; shipped: {', '.join(list_recipes())}")
        text, where = shipped.read_text(), f"recipe {path.stem}"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{where} is not valid YAML: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of config keys, got {type(data).__name__}")
    return data


# Process, device and randomness ------------------------------------------------------------
def _resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} was asked for but CUDA is not available on this machine; use cpu")
        if name == "cuda":
            name = f"cuda:{local_rank}"
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {name!r}: {exc}") from None


def _rng_state() -> dict[str, Any]:
    """All RNG states, as plain data (checkpoints hold no numpy objects)."""
    import numpy as np

    version, state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": [version, list(state), gauss],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
    }


def _set_rng_state(rng: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    version, state, gauss = rng["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


def _seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _plain(state: dict[str, Any]) -> dict[str, Any]:
    """A scheduler state_dict without ``Counter`` (MultiStepLR), which weights-only loading refuses."""
    return {k: dict(v) if isinstance(v, Counter) else v for k, v in state.items()}


def _loaders(train_set: Any, val_set: Any, cfg: TrainConfig, world: int, rank: int,
             device: torch.device) -> tuple[DistributedSampler, torch.Generator, DataLoader, DataLoader]:
    # DistributedSampler even on one process: its shuffle is seeded by (seed, epoch), so a
    # resumed run draws exactly the order the uninterrupted one would.
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, seed=cfg.seed)
    gen = torch.Generator()  # worker seeds, reseeded every epoch for the same reason
    common: dict[str, Any] = dict(batch_size=cfg.batch_size, num_workers=cfg.workers,
                                  pin_memory=device.type == "cuda")
    n, bs = sampler.num_samples, cfg.batch_size
    # BatchNorm cannot train on a batch of one sample, so never emit such a last batch
    train = DataLoader(train_set, sampler=sampler, generator=gen, drop_last=n > bs and n % bs == 1, **common)
    val_sampler = DistributedSampler(val_set, world, rank, shuffle=False) if world > 1 else None
    val = DataLoader(val_set, sampler=val_sampler, shuffle=False, **common)
    return sampler, gen, train, val


def _build_model(cfg: TrainConfig, load_init: bool, sync_bn: bool, warn: bool) -> nn.Module:
    model = get_model(cfg.model, num_classes=cfg.num_classes)
    if cfg.init is not None and load_init:
        load_state_dict_into(model, load_checkpoint(cfg.init), strict=True)
    elif cfg.init is None and not cfg.dense and load_init and warn:
        log.warning("FTWT without --init: gates learn from an untrained backbone; train a dense model first")
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # new modules: before the gates hook them
    if not cfg.dense:
        attach_gates(model, cfg.gate_config())
    return model


# Trainer ---------------------------------------------------------------------------------
Callback = Callable[["Trainer", dict[str, Any]], None]


class Trainer:
    """Trains one model as :class:`TrainConfig` says; see the module docstring.

    Args:
        config: the run.
        callbacks: called as ``callback(trainer, metrics)`` after every epoch, on every rank.

    Raises:
        FTWTError: any problem with the config, data, device or checkpoints, before a
            single file is written.
    """

    def __init__(self, config: TrainConfig, callbacks: Sequence[Callback] = (), *, _state: dict | None = None,
                 _resume_path: str | None = None) -> None:
        cfg = self.config = config.resolved()
        self.callbacks = list(callbacks)
        self.out = Path(cfg.out_dir)
        resuming_here = _resume_path is not None and Path(_resume_path).resolve().parent == self.out.resolve()
        if (self.out / "last.pt").exists() and not cfg.overwrite and not resuming_here:
            raise ConfigError(f"{self.out} already holds a run (last.pt); resume it with --resume "
                              f"{self.out / 'last.pt'}, pass --overwrite, or choose another output folder")
        # torchrun's environment; the process group itself is joined last, once nothing can fail
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0")) if self.world > 1 else 0
        self.is_main = self.rank == 0
        self.device = _resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
        if cfg.amp and self.device.type != "cuda" and self.is_main:
            log.warning("amp needs CUDA; training in float32 on %s", self.device)
        self.amp = cfg.amp and self.device.type == "cuda"
        if cfg.sync_bn and self.world > 1 and self.device.type != "cuda":
            raise ConfigError("sync_bn needs CUDA")
        _seed_everything(cfg.seed)

        self.train_set, val_set, self.info = build_datasets(cfg.data_config())
        self.sampler, self.loader_gen, self.train_loader, self.val_loader = _loaders(
            self.train_set, val_set, cfg, self.world, self.rank, self.device)
        self.num_classes = cfg.num_classes or self.info.num_classes
        self.config = cfg = replace(cfg, num_classes=self.num_classes)
        self.gated = not cfg.dense
        sync_bn = cfg.sync_bn and self.world > 1
        self.model = _build_model(cfg, load_init=_state is None, sync_bn=sync_bn, warn=self.is_main).to(self.device)
        params = backbone_parameters(self.model) if self.gated else list(self.model.parameters())
        self.optimizers = [torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)]
        if self.gated:
            self.optimizers.append(
                torch.optim.SGD(gate_parameters(self.model), lr=cfg.gate_lr, momentum=cfg.gate_momentum))
        self.schedulers = [
            torch.optim.lr_scheduler.MultiStepLR(o, cfg.milestones, cfg.gamma) if cfg.schedule == "step"
            else torch.optim.lr_scheduler.CosineAnnealingLR(o, cfg.epochs)
            for o in self.optimizers
        ]
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.start_epoch, self.best_top1, self.estimated = 0, -1.0, None
        self.calibrated: list[float] | None = None  # decision thresholds, once calibrated
        self._last_report: dict[str, Any] | None = None
        if _state is not None:
            self._load_state(_state)
        self.ddp: DistributedDataParallel | None = None
        self._owns_group = self.world > 1 and not dist.is_initialized()
        if self.world > 1:
            self._wrap_ddp()

    def _wrap_ddp(self) -> None:
        if self._owns_group:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        if self.gated:
            # Gates learn only from the mask loss, which is not part of the model's output,
            # so DDP's unused-parameter search (find_unused_parameters) would mark them unused
            # and then fail when their gradient arrives; after cooldown they get no gradient
            # at all. DDP therefore leaves them alone and _sync_gate_grads averages them.
            names = [f"{GATES_ATTR}.{k}" for k, _ in getattr(self.model, GATES_ATTR).named_parameters()]
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.model, names)
            for p in gate_parameters(self.model):
                dist.broadcast(p.data, 0)
        device_ids = [self.device] if self.device.type == "cuda" else None
        self.ddp = DistributedDataParallel(self.model, device_ids=device_ids)

    @classmethod
    def resume(cls, path: str, overrides: dict[str, Any] | None = None, callbacks: Sequence[Callback] = ()) -> Trainer:
        """A trainer that continues the run saved in ``path`` (a ``last.pt``) exactly.

        Args:
            path: checkpoint written by a :class:`Trainer`.
            overrides: config keys to change, e.g. ``{"epochs": 300}`` to train longer.
            callbacks: as for the constructor.

        Raises:
            CheckpointError: the file is missing, corrupt, not a training checkpoint, or its
                model differs from the (overridden) config's.
        """
        state = load_checkpoint(path)
        missing = [k for k in ("config", "model", "model_name", "epoch", "optimizers", "schedulers", "rng")
                   if k not in state]
        if missing:
            raise CheckpointError(f"{path} is not a training checkpoint written by ftwt train (missing {missing})")
        data = {**state["config"], **(overrides or {})}
        config = TrainConfig.from_dict(data)
        if config.model != state["model_name"] or config.dense != (state.get("gate_config") is None):
            kind = "dense" if state.get("gate_config") is None else "gated"
            raise CheckpointError(f"{path} holds a {kind} {state['model_name']}, which cannot resume a "
                                  f"{'dense' if config.dense else 'gated'} {config.model} run")
        return cls(config, callbacks, _state=state, _resume_path=path)

    # Checkpoints ---------------------------------------------------------------------------
    def _state(self, epoch: int) -> dict[str, Any]:
        return {
            "model_name": self.config.model,
            "num_classes": self.num_classes,
            "gate_config": self.config.gate_config().to_dict() if self.gated else None,
            "model": self.model.state_dict(),
            "input_size": list(self.info.input_size),
            "dataset": self.info.name,
            "epoch": epoch,  # completed epochs
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [_plain(s.state_dict()) for s in self.schedulers],
            "scaler": self.scaler.state_dict(),
            "rng": _rng_state(),
            "best_top1": self.best_top1,
            "estimated_reduction": self.estimated,
            "calibrated_decisions": self.calibrated,
            "config": self.config.to_dict(),
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        load_state_dict_into(self.model, state["model"], strict=True)
        try:
            for obj, sd in zip(self.optimizers, state["optimizers"], strict=True):
                obj.load_state_dict(sd)
            for sched, sd in zip(self.schedulers, state["schedulers"], strict=True):
                sched.load_state_dict(sd)
                if isinstance(sched, torch.optim.lr_scheduler.MultiStepLR):
                    sched.milestones = Counter(sched.milestones)
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"optimizer state in the checkpoint does not fit this run: {exc}") from None
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.start_epoch = int(state["epoch"])
        self.best_top1 = float(state.get("best_top1", -1.0))
        self.estimated = state.get("estimated_reduction")
        self.calibrated = state.get("calibrated_decisions")
        _set_rng_state(state["rng"])

    def _save(self, name: str, epoch: int) -> None:
        if self.is_main:
            save_checkpoint(self._state(epoch), self.out / name)

    # Training ------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train from the current epoch to ``epochs``; returns the final report."""
        try:
            return self._fit()
        finally:
            if self._owns_group:
                dist.destroy_process_group()

    def _fit(self) -> dict[str, Any]:
        cfg = self.config
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            self._trim_metrics()
        if self.gated and self.start_epoch == 0:
            self.estimated = self._estimate()
        for epoch in range(self.start_epoch, cfg.epochs):
            start = time.time()
            if self.gated and cfg.calibrate and epoch == cfg.cooldown and self.calibrated is None:
                self._calibrate(epoch)
            train = self._train_epoch(epoch)
            for sched in self.schedulers:
                sched.step()
            report = self._evaluate()
            metrics = {"epoch": epoch + 1, **train, **{f"val_{k}": v for k, v in report.items()
                                                     if not isinstance(v, (list, dict))},
                       "time": time.time() - start}
            # Before cooldown the gates still move (and calibration comes at cooldown): a
            # checkpoint from then has other masks and another budget than the final model.
            eligible = not self.gated or epoch >= min(cfg.cooldown, cfg.epochs - 1)
            is_best = eligible and report["top1"] > self.best_top1
            if is_best:
                self.best_top1 = report["top1"]
            if self.is_main:
                with open(self.out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(metrics) + "\n")
                self._save("last.pt", epoch + 1)
                if is_best:
                    self._save("best.pt", epoch + 1)
                log.info("epoch %d/%d: loss %.4f, train top-1 %.2f, val top-1 %.2f, FLOPs reduction %.1f%%",
                         epoch + 1, cfg.epochs, train["loss"], train["top1"], report["top1"],
                         100 * report["flops_reduction"])
            for callback in self.callbacks:
                callback(self, metrics)
        return self._finish()

    def _trim_metrics(self) -> None:
        """Drop lines of epochs after the checkpoint (written before a crash, redone now)."""
        path = self.out / "metrics.jsonl"
        if self.start_epoch == 0:
            path.unlink(missing_ok=True)
        elif path.exists():
            keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["epoch"] <= self.start_epoch]
            path.write_text("".join(ln + "\n" for ln in keep))

    def _estimate(self) -> float:
        # Perfect gates at r on the init weights: what the budget should buy (METHOD.md).
        loader = DataLoader(self.train_set, batch_size=self.config.batch_size, shuffle=False)
        est = estimate(self.model, (x for x, _ in loader), self.config.threshold, self.config.criterion,
                       samples=self.config.estimate_samples, device=self.device)
        if self.is_main:
            log.info("estimated FLOPs reduction at %s=%g before training: %.1f%%",
                     self.config.criterion, self.config.threshold, 100 * est.reduction)
        return est.reduction

    def _set_gates_training(self, on: bool) -> None:
        for p in gate_parameters(self.model):
            p.requires_grad_(on)
        # frozen gates need no labels: skip the ground truth's sort and cumsum
        set_label_mode(self.model, "train" if on else "never")

    def _sync_gate_grads(self) -> None:
        grads = [p.grad for p in gate_parameters(self.model) if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()

    def _seed_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.loader_gen.manual_seed(self.config.seed * 100_003 + epoch)

    def _train_epoch(self, epoch: int) -> dict[str, Any]:
        from tqdm import tqdm

        cfg = self.config
        train_gates = self.gated and epoch < cfg.cooldown
        if self.gated:
            self._set_gates_training(train_gates)
        self._seed_epoch(epoch)
        net = self.ddp or self.model
        net.train()
        units = gated_units(self.model) if self.gated else []
        # loss sum, ce sum, mask-loss sum, correct, samples, gate-correct, gate decisions
        sums = torch.zeros(7, dtype=torch.float64, device=self.device)
        meter = FlopsMeter(self.model)
        bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not (self.is_main and cfg.progress), dynamic_ncols=True)
        for step, (x, y) in enumerate(bar):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with meter if step % cfg.flops_every == 0 else contextlib.nullcontext():
                with torch.autocast(self.device.type, enabled=self.amp):
                    out = net(x)
                    ce = F.cross_entropy(out, y)
                    ml = mask_loss(self.model, cfg.balance_loss) if train_gates else ce.new_zeros(())
                    loss = ce + cfg.lam * ml
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if train_gates and self.world > 1:
                self._sync_gate_grads()
            self.scaler.step(self.optimizers[0])
            if train_gates:
                self.scaler.step(self.optimizers[1])
            self.scaler.update()
            with torch.no_grad():
                n = y.shape[0]
                row = [loss.detach() * n, ce.detach() * n, ml.detach() * n, (out.argmax(1) == y).sum(), n, 0, 0]
                for u in units:
                    if u.mask is not None and u.labels is not None:
                        row[5] += (u.mask == u.labels).sum()
                        row[6] += u.labels.numel()
                sums += torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device) for v in row])
            if not bar.disable and step % 20 == 0:
                bar.set_postfix(self._postfix(sums, meter))
        flops = torch.zeros(3, dtype=torch.float64, device=self.device)  # samples, dense sum, dynamic sum
        with contextlib.suppress(RuntimeError):  # no batch metered (empty shard)
            rep = meter.report()
            flops += torch.tensor([rep.samples, rep.dense_macs * rep.samples, rep.dynamic_macs * rep.samples],
                                  dtype=torch.float64, device=self.device)
        totals = torch.cat([sums, flops])
        if self.world > 1:
            dist.all_reduce(totals)
        s = totals.tolist()
        bar.close()
        return {
            "lr": self.optimizers[0].param_groups[0]["lr"],
            "gate_lr": self.optimizers[1].param_groups[0]["lr"] if self.gated else None,
            "gates_frozen": self.gated and not train_gates,
            "loss": s[0] / s[4],
            "ce": s[1] / s[4],
            "mask_loss": s[2] / s[4] if train_gates else None,
            "top1": 100 * s[3] / s[4],
            "gate_accuracy": s[5] / s[6] if s[6] else None,
            "flops_reduction": 1 - s[9] / s[8] if s[8] else None,
        }

    @staticmethod
    def _postfix(sums: torch.Tensor, meter: FlopsMeter) -> dict[str, str]:
        s = sums.tolist()
        post = {"loss": f"{s[0] / s[4]:.3f}", "acc": f"{100 * s[3] / s[4]:.1f}"}
        if s[6]:
            post["gate_acc"] = f"{100 * s[5] / s[6]:.1f}"
        with contextlib.suppress(RuntimeError):
            post["flops"] = f"-{100 * meter.report().reduction:.1f}%"
        return post

    def _evaluate(self) -> dict[str, Any]:
        from ftwt.evaluate import evaluate

        if self.world > 1:
            # BatchNorm statistics drift apart per rank; evaluate what rank 0 saves
            for buf in self.model.buffers():
                dist.broadcast(buf, 0)
        self._last_report = evaluate(self.model, self.val_loader, self.device, distributed=self.world > 1)
        return self._last_report

    def _finish(self) -> dict[str, Any]:
        from ftwt.report import write_report

        cfg = self.config
        report = self._last_report
        if self.gated and cfg.calibrate and self.calibrated is None:
            # the gates never froze (cooldown >= epochs): calibrate the final model, which
            # becomes part of its weights (extending this run later differs from a longer one)
            self._calibrate(cfg.epochs)
            self._save("last.pt", cfg.epochs)
            report = None
        if report is None:  # calibrated, or nothing trained in this process
            report = self._evaluate()
        report = {
            "model": cfg.model,
            "dataset": self.info.name,
            "mode": "dense" if cfg.dense else cfg.mode,
            "criterion": None if cfg.dense else cfg.criterion,
            "threshold": None if cfg.dense else cfg.threshold,
            "epochs": cfg.epochs,
            **report,
            "estimated_reduction": self.estimated,
            "best_top1": self.best_top1,
            "calibrated_decisions": self.calibrated,
        }
        if self.is_main:
            write_report(report, self.out)
        return report

    def _calibrate(self, epoch: int) -> None:
        """Per-unit decision thresholds so that the gates keep what their labels keep.

        Done when the gates freeze, not after the last epoch, so that the backbone adapts to
        the calibrated masks: calibrating a finished model cost 22 points of top-1 on digits
        (96.1% to 74.1%, ResNet-20, r = 0.9). Each threshold then moves into its gate's bias:
        ``sigmoid(l) > t`` iff ``l - logit(t) > 0``, so the masks stay the same while the
        state_dict alone reproduces them (checkpoints and ``ftwt eval`` need no extra key).
        """
        from ftwt.calibrate import calibrate_decisions

        self._seed_epoch(epoch)  # the same batches whether or not the run was resumed
        decisions = calibrate_decisions(self.model, self.train_loader, self.device,
                                        max_batches=self.config.calibrate_batches, distributed=self.world > 1)
        self.calibrated = decisions
        with torch.no_grad():
            for unit, t in zip(gated_units(self.model), decisions, strict=True):
                unit.gate.fc.bias -= math.log(t / (1 - t))
                unit.decision = 0.5


__all__ = ["TrainConfig", "Trainer", "list_recipes", "load_recipe"]
