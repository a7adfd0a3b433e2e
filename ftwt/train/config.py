"""The training configuration: every key a recipe (``ftwt/recipes/*.yaml``) or flag may set.

Fields are grouped (model, data, gates, optimisation, run), each with its checks; the
gate group builds a :class:`~ftwt.GateConfig`, the data group a :class:`~ftwt.data.DataConfig`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from ftwt._config import config_from_dict
from ftwt.data import DATASETS, DataConfig
from ftwt.errors import ConfigError
from ftwt.gate import GateConfig
from ftwt.models.resnet_cifar import check_shortcut

SCHEDULES = ("step", "cosine")

# The recommended dynamic mode (the README's "ftwt+"), measured against the paper's mode and
# static pruning in benchmarks/dev_cifar.py. threshold is rho, the share of each gated
# unit's filters pruned for every sample (labels and masks keep the top 1 - rho).
PRESETS: dict[str, dict[str, Any]] = {
    "ftwt+": {
        "criterion": "uniform",  # labels (for the reports): each sample's top 1 - rho filters by peak activation
        "threshold": 0.5,
        "gate_rule": "topk",  # masks: the gate's top 1 - rho logits per sample (a fixed, known cost)
        "gate_features": "avgmax",  # mean and peak of each input channel, no softmax
        "gate_softmax": False,
        "gate_ste": True,  # the task loss trains the gates through their decisions
        "lam": 0.0,  # and nothing else: BCE on activation labels cost accuracy on real images
        "gate_init": "weights",  # start as the static L1 choice; move only where the input calls for it
        "gate_scope": "internal",  # blocks' inner channels: masks there save in two convolutions
        "cooldown": 0.75,  # gates train for three quarters of the epochs
        "schedule": "cosine",
    },
    # The mode that beats static pruning on the development benchmark: a width cascade
    # (ftwt.cascade). threshold is the share of the blocks' inner filters outside the core.
    "cascade": {
        "criterion": "uniform",
        "threshold": 0.7,
        "gate_rule": "topk",
        "gate_init": "weights",  # the core: the static L1 x |gamma| choice, the same for every input
        "gate_scope": "internal",
        "cooldown": 0,  # the core's gates never train
        "lam": 0.0,
        "cascade": 0.5,  # honest FLOPs reduction of the whole cascade; sets how many inputs run every filter
        "schedule": "cosine",
    },
}


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
    shortcut: str | None = None  # CIFAR ResNets' option-A layout: reference, subsample or avgpool; None: the model's (avgpool)
    include: str | None = None  # comma-separated globs of convolutions to gate; None: all that can help
    exclude: str | None = None  # comma-separated globs of convolutions to leave dense
    # data
    dataset: str = "digits"  # digits (embedded), cifar10, cifar100 or folder
    data_dir: str | None = None  # dataset root (CIFAR files or train/ and val/ class folders)
    download: bool = False  # let torchvision fetch CIFAR
    image_size: int | None = None  # None: the dataset's own (digits 16, CIFAR 32, folder: its images' if small, else 224)
    augment: str | None = None  # folder: cifar (pad-and-crop, flip), imagenet or none; None: from the image size
    mean: list[float] | None = None  # folder: per-channel mean; None: computed from the training folder
    std: list[float] | None = None  # folder: per-channel std; None: computed with the mean
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
    gate_features: str = "avg"  # gate input: "avg" pooling (reference) or "avgmax" (average and max)
    gate_hidden: int = 0  # hidden ReLU layer width in each gate (0: one linear layer, reference)
    gate_rule: str = "threshold"  # "threshold" (sigmoid > decision, reference), "topk" or "budget" (criterion uniform)
    gate_ste: bool = False  # straight-through: the task loss trains the gates through their decisions
    gate_scope: str = "all"  # "all" units, or "internal": not those whose output feeds a residual add
    gate_saliency: str = "none"  # "scale": a second head scales each kept filter per sample; "rank": and ranks them
    gate_offset: bool = False  # a per-sample offset of all of a unit's logits (with gate_rule "budget": how many it keeps)
    gate_dynamic: float = 1.0  # with gate_rule "topk": share of each sample's filters the gate picks; the rest a static core
    gate_init: str = "random"  # "random", or "weights": gates start as the static L1 choice of filters
    gate_warmup: int = 0  # steps fitting the gates to the frozen init model's labels before training
    masks: str = "gate"  # masks applied in training and evaluation: "gate", or "ground_truth" (the oracle bound)
    cascade: float | None = None  # width cascade (ftwt.cascade) of this honest FLOPs reduction; None: none
    cascade_holdout: float = 0.1  # share of the training set held out (not trained on) to set the cascade's tau
    lam: float = 1.0  # mask-loss weight until cooldown (then 0)
    cooldown: float | None = None  # epoch from which gates are frozen (below 1: a share of the epochs); None: half, rounded up (reference)
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
    save_every: int | None = None  # also write last.pt every N training steps (long epochs); None: at epoch ends
    skip_nonfinite: bool = False  # skip batches whose loss is inf/NaN (counted in the metrics) instead of stopping

    def __post_init__(self) -> None:
        _check_types(self)
        self.milestones = list(self.milestones)
        self._check_data()
        self._check_gates()
        self._check_optimisation()

    def _check_data(self) -> None:
        for name in ("batch_size", "estimate_samples", "calibrate_batches"):
            _positive(self, name)
        for name in ("num_classes", "image_size", "train_subset", "val_subset"):
            _positive(self, name, optional=True)
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers}")
        if self.dataset not in DATASETS:
            raise ConfigError(f"unknown dataset {self.dataset!r}; choose one of: {', '.join(DATASETS)}")
        if self.shortcut is not None:
            check_shortcut(self.shortcut)

    def _check_gates(self) -> None:
        _positive(self, "gate_pool")
        _positive(self, "gate_embed", optional=True)
        if self.cooldown is not None and self.cooldown < 0:
            raise ConfigError(f"cooldown must be >= 0 epochs, got {self.cooldown}")
        if self.gate_init not in ("random", "weights"):
            raise ConfigError(f"unknown gate_init {self.gate_init!r}; choose 'random' or 'weights'")
        if self.gate_warmup < 0:
            raise ConfigError(f"gate_warmup must be >= 0 steps, got {self.gate_warmup}")
        if self.masks not in ("gate", "ground_truth"):
            raise ConfigError(f"unknown masks {self.masks!r}; choose 'gate' or 'ground_truth' (the oracle bound)")
        if self.cascade is not None:
            if self.dense or self.masks != "gate":
                raise ConfigError("cascade needs a gated run with masks 'gate' (its core is the gates' masks)")
            if not 0 < self.cascade < 1:
                raise ConfigError(f"cascade is an honest FLOPs reduction in (0, 1), got {self.cascade}")
            if not 0 < self.cascade_holdout < 1:
                raise ConfigError(f"cascade_holdout must be a share in (0, 1), got {self.cascade_holdout}")
        # GateConfig checks the rest; a dense run's threshold is never used, so it is not checked
        self._gates(self.threshold if not self.dense else GateConfig.threshold)

    def _check_optimisation(self) -> None:
        _positive(self, "epochs")
        _positive(self, "flops_every")
        _positive(self, "save_every", optional=True)
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; choose from {list(SCHEDULES)}")
        if any(m <= 0 for m in self.milestones):
            raise ConfigError(f"milestones must be > 0 (epochs, or fractions of epochs below 1), got {self.milestones}")
        for name in ("lr", "gate_lr"):
            value = getattr(self, name)
            if value is not None and not 0 < value < math.inf:  # also refuses NaN
                raise ConfigError(f"{name} must be a finite number > 0, got {value}")
        if self.lam < 0 or self.weight_decay < 0 or self.momentum < 0 or self.gate_momentum < 0 or self.gamma <= 0:
            raise ConfigError("lam, weight_decay and momenta must be >= 0 and gamma > 0")

    def _gates(self, threshold: float) -> GateConfig:
        return GateConfig(criterion=self.criterion, threshold=threshold, mode=self.mode, pool=self.gate_pool,
                          embed_target=self.gate_embed, softmax=self.gate_softmax, features=self.gate_features,
                          hidden=self.gate_hidden, rule=self.gate_rule, ste=self.gate_ste, scope=self.gate_scope,
                          saliency=self.gate_saliency, offset=self.gate_offset,
                          dynamic=self.gate_dynamic)

    def gate_config(self) -> GateConfig | None:
        """The :class:`GateConfig` of this run (None for a dense run)."""
        return None if self.dense else self._gates(self.threshold)

    def gate_patterns(self) -> dict[str, Any]:
        """``include`` / ``exclude`` as :func:`~ftwt.attach_gates` takes them."""
        def split(text: str | None) -> list[str]:
            return [p.strip() for p in (text or "").split(",") if p.strip()]
        return {"include": split(self.include) or None, "exclude": split(self.exclude)}

    def model_kwargs(self) -> dict[str, Any]:
        """Builder arguments besides ``num_classes`` (what checkpoints record to rebuild the model)."""
        return {"shortcut": self.shortcut} if self.shortcut is not None else {}

    def data_config(self) -> DataConfig:
        return DataConfig(dataset=self.dataset, data_dir=self.data_dir, batch_size=self.batch_size,
                          workers=self.workers, image_size=self.image_size, download=self.download,
                          augment=self.augment, mean=self.mean, std=self.std,
                          train_subset=self.train_subset, val_subset=self.val_subset)

    def resolved(self) -> TrainConfig:
        """A copy with the recipe-dependent defaults filled in and milestones in epochs."""
        milestones = sorted({round(m * self.epochs) if m < 1 else int(m) for m in self.milestones})
        return replace(
            self,
            lr=self.lr if self.lr is not None else (0.1 if self.dense else 0.01),
            schedule=self.schedule or ("cosine" if self.dense else "step"),
            cooldown=_cooldown(self.cooldown, self.epochs),
            milestones=[m for m in milestones if m > 0],
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a recipe or checkpoint dict; unknown keys raise :class:`ConfigError`."""
        return config_from_dict(cls, data, "config key(s)")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> TrainConfig:
        """A config with :data:`PRESETS` ``[name]`` applied, then ``overrides``.

        Example:
            >>> cfg = TrainConfig.from_preset("ftwt+", model="resnet56", init="dense.pt", threshold=0.5)
        """
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


def _cooldown(value: float | None, epochs: int) -> int:
    if value is None:
        return math.ceil(epochs / 2)
    return round(value * epochs) if 0 < value < 1 else int(value)


def _positive(config: TrainConfig, name: str, optional: bool = False) -> None:
    value = getattr(config, name)
    if optional and value is None:
        return
    if value <= 0:
        raise ConfigError(f"{name} must be a positive integer{' or null' if optional else ''}, got {value}")


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


__all__ = ["PRESETS", "SCHEDULES", "TrainConfig"]
