"""Datasets and data loaders: the embedded digits set, CIFAR-10/100 and ImageNet-style folders.

Every failure a user can fix (missing folder, empty class, unreadable image, absent CIFAR
files) raises :class:`~ftwt.errors.DataError` with one line saying what is wrong and what to do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from ftwt.errors import ConfigError, DataError

DATASETS = ("digits", "cifar10", "cifar100", "folder")
# Training augmentation of "folder": pad-and-crop with flip (CIFAR), random-resized crop with flip (ImageNet), none.
AUGMENTS = ("cifar", "imagenet", "none")

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_DIGITS_SEED = 0  # fixed so the train/val split is identical on every run and machine
_DIGITS_VAL_FRACTION = 0.2


@dataclass
class DataConfig:
    """Which dataset to use and how to batch it."""

    dataset: str = "digits"  # one of DATASETS; "digits" is bundled and needs no download
    data_dir: str | None = None  # dataset root; CIFAR defaults to ./data, "folder" requires it
    batch_size: int = 128  # samples per batch on each process
    workers: int = 2  # DataLoader worker processes; 0 loads in the main process
    image_size: int | None = None  # None = dataset default (digits 16, CIFAR 32, folder: its images' side if small, else 224)
    augment: str | None = None  # folder only: cifar, imagenet or none; None: cifar for small images (<= 64 px), else imagenet
    mean: list[float] | None = None  # folder only: per-channel mean; None: computed from (a sample of) the training folder
    std: list[float] | None = None  # folder only: per-channel std; None: computed with the mean
    download: bool = False  # allow torchvision to fetch CIFAR when it is not on disk
    train_subset: int | None = None  # keep only the first N training samples (quick runs)
    val_subset: int | None = None  # keep only the first N validation samples (quick runs)


@dataclass
class DatasetInfo:
    """What a model needs to know about a dataset."""

    name: str
    num_classes: int
    input_size: tuple[int, int, int]  # (C, H, W) of one transformed sample
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] = ()
    augment: str | None = None  # the training augmentation used ("folder": as chosen or defaulted)


class TensorImageDataset(Dataset):
    """Images held in one tensor, with optional random-crop augmentation and normalisation.

    Args:
        images: Float tensor ``(N, C, H, W)`` with values in ``[0, 1]``.
        targets: Long tensor ``(N,)`` of class indices.
        mean: Per-channel mean used for normalisation.
        std: Per-channel standard deviation used for normalisation.
        crop_padding: Zero padding for a random crop back to ``H x W``; 0 disables it.
        classes: Class names, indexed by target.
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        crop_padding: int = 0,
        classes: tuple[str, ...] = (),
    ):
        self.images = images
        self.targets = targets
        self.mean = torch.tensor(mean, dtype=images.dtype).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=images.dtype).view(-1, 1, 1)
        self.crop_padding = crop_padding
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, int]:
        img = self.images[idx]
        if self.crop_padding > 0:
            p = self.crop_padding
            _, h, w = img.shape
            # zero padding matches the digits' black background before normalisation
            padded = F.pad(img, (p, p, p, p))
            i, j = (int(v) for v in torch.randint(0, 2 * p + 1, (2,)))
            img = padded[:, i : i + h, j : j + w]
        return (img - self.mean) / self.std, int(self.targets[idx])


def _validate(cfg: DataConfig) -> None:
    """Raise ConfigError for values no dataset can use."""
    if cfg.dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {cfg.dataset!r}; choose one of: {', '.join(DATASETS)}")
    for name in ("image_size", "train_subset", "val_subset"):
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise ConfigError(f"{name} must be a positive integer or None, got {value}")
    if cfg.augment is not None and cfg.augment not in AUGMENTS:
        raise ConfigError(f"unknown augment {cfg.augment!r}; choose one of: {', '.join(AUGMENTS)}")
    if (cfg.mean is None) != (cfg.std is None):
        raise ConfigError("give mean and std together (or neither: computed from the training folder)")
    if cfg.mean is not None and (len(cfg.mean) != 3 or len(cfg.std) != 3 or min(cfg.std) <= 0):
        raise ConfigError(f"mean and std need 3 values each (RGB), std > 0; got {cfg.mean} and {cfg.std}")


def _build_digits(cfg: DataConfig) -> tuple[Dataset, Dataset, DatasetInfo]:
    """scikit-learn's 8x8 digits, upsampled and made 3-channel so CIFAR models accept them."""
    from sklearn.datasets import load_digits  # imported lazily: only this dataset needs it

    size = cfg.image_size or 16
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    # bilinear interpolation is a convex combination, so values stay in [0, 1]
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = images.repeat(1, 3, 1, 1).contiguous()
    targets = torch.tensor(bunch.target, dtype=torch.long)
    perm = torch.randperm(len(targets), generator=torch.Generator().manual_seed(_DIGITS_SEED))
    n_val = round(len(targets) * _DIGITS_VAL_FRACTION)
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    # statistics from the training split only, so validation data never leaks into them
    train_images = images[train_idx]
    mean = tuple(float(m) for m in train_images.mean(dim=(0, 2, 3)))
    std = tuple(float(s) for s in train_images.std(dim=(0, 2, 3)))
    classes = tuple(str(c) for c in bunch.target_names)
    train = TensorImageDataset(
        train_images, targets[train_idx], mean, std, crop_padding=max(1, size // 8), classes=classes
    )
    val = TensorImageDataset(images[val_idx], targets[val_idx], mean, std, classes=classes)
    return train, val, DatasetInfo("digits", 10, (3, size, size), mean, std, classes)


def _build_cifar(cfg: DataConfig) -> tuple[Dataset, Dataset, DatasetInfo]:
    """CIFAR-10/100 through torchvision, with the standard crop-and-flip augmentation."""
    from torchvision import datasets, transforms

    is10 = cfg.dataset == "cifar10"
    cls = datasets.CIFAR10 if is10 else datasets.CIFAR100
    label = "CIFAR-10" if is10 else "CIFAR-100"
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if is10 else (CIFAR100_MEAN, CIFAR100_STD)
    root = Path(cfg.data_dir or "data")
    base = root / cls.base_folder
    if not cfg.download and not base.is_dir():
        raise DataError(
            f"{label} not found: {base} does not exist; pass --download, or --data-dir "
            f"pointing at a folder containing {cls.base_folder}"
        )
    size = cfg.image_size or 32
    resize = [transforms.Resize(size)] if size != 32 else []
    normalize = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    train_tf = transforms.Compose(
        resize + [transforms.RandomCrop(size, padding=size // 8), transforms.RandomHorizontalFlip()] + normalize
    )
    val_tf = transforms.Compose(resize + normalize)
    try:
        train = cls(root=str(root), train=True, transform=train_tf, download=cfg.download)
        val = cls(root=str(root), train=False, transform=val_tf, download=False)
    except (RuntimeError, OSError, EOFError, ValueError, KeyError) as e:
        # torchvision reports bad checksums and failed downloads as RuntimeError / OSError
        raise DataError(
            f"{label} in {base} could not be loaded ({e}); delete that folder and "
            "pass --download, or point --data-dir at a complete copy"
        ) from e
    info = DatasetInfo(cfg.dataset, len(train.classes), (3, size, size), mean, std, tuple(train.classes))
    return train, val, info


def _build_folder(cfg: DataConfig) -> tuple[Dataset, Dataset, DatasetInfo]:
    from ftwt._folder import build_folder  # it imports this module's types

    return build_folder(cfg)


def _first(ds: Dataset, n: int | None) -> Dataset:
    """The first ``n`` samples of ``ds`` (all of them when ``n`` is None or too large)."""
    if n is None or n >= len(ds):
        return ds
    return Subset(ds, range(n))


def input_size_for(model: nn.Module, sizes: Sequence[int] = (16, 32, 64, 224)) -> int | None:
    """The smallest of ``sizes`` (square, 3 channels) that ``model`` takes, or None if it takes none.

    The embedded digits are 16x16; VGG's five poolings need 32.
    """
    was_training = model.training
    try:
        for size in sizes:
            try:
                with torch.no_grad():
                    model.eval()(torch.zeros(1, 3, size, size))
            except RuntimeError:
                continue
            return size
        return None
    finally:
        model.train(was_training)


def build_datasets(cfg: DataConfig) -> tuple[Dataset, Dataset, DatasetInfo]:
    """Build the training and validation datasets named by ``cfg``.

    Args:
        cfg: Dataset choice, location and subset sizes.

    Returns:
        ``(train, val, info)``.

    Raises:
        ConfigError: Unknown dataset name or a non-positive size.
        DataError: The data is missing, empty, inconsistent or unreadable.
    """
    _validate(cfg)
    builders = {"digits": _build_digits, "cifar10": _build_cifar, "cifar100": _build_cifar, "folder": _build_folder}
    train, val, info = builders[cfg.dataset](cfg)
    return _first(train, cfg.train_subset), _first(val, cfg.val_subset), info


def build_loaders(cfg: DataConfig, distributed: bool = False) -> tuple[DataLoader, DataLoader, DatasetInfo]:
    """Build training and validation loaders.

    Args:
        cfg: Dataset and batching options.
        distributed: Shard both sets with ``DistributedSampler``; the process group must
            already be initialised. Call ``train_loader.sampler.set_epoch(epoch)`` every epoch.

    Returns:
        ``(train_loader, val_loader, info)``.

    Raises:
        ConfigError: ``batch_size <= 0``, ``workers < 0`` or another invalid option.
        DataError: As :func:`build_datasets`.
    """
    if cfg.batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {cfg.batch_size}")
    if cfg.workers < 0:
        raise ConfigError(f"workers must be >= 0, got {cfg.workers}")
    train, val, info = build_datasets(cfg)
    train_sampler = DistributedSampler(train, shuffle=True) if distributed else None
    val_sampler = DistributedSampler(val, shuffle=False) if distributed else None
    train_loader, val_loader = make_loaders(train, val, cfg, train_sampler=train_sampler, val_sampler=val_sampler)
    return train_loader, val_loader, info


def make_loaders(
    train: Dataset,
    val: Dataset,
    cfg: DataConfig,
    *,
    train_sampler: Sampler | None = None,
    val_sampler: Sampler | None = None,
    generator: torch.Generator | None = None,
    pin_memory: bool | None = None,
    persistent_workers: bool | None = None,
) -> tuple[DataLoader, DataLoader]:
    """Loaders over already built datasets, batched as ``cfg`` says.

    Args:
        train, val: the datasets.
        cfg: batch size and workers.
        train_sampler, val_sampler: samplers (None: shuffle the training set, keep the
            validation order).
        generator: the training loader's generator (its workers' seeds).
        pin_memory: default: whenever CUDA is available.
        persistent_workers: default: whenever there are workers.
    """
    n_train = train_sampler.num_samples if isinstance(train_sampler, DistributedSampler) else len(train)
    common = dict(
        batch_size=cfg.batch_size,
        num_workers=cfg.workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=cfg.workers > 0 if persistent_workers is None else persistent_workers,
    )
    # BatchNorm cannot train on a batch of one sample, so never emit such a last batch
    train_loader = DataLoader(
        train,
        sampler=train_sampler,
        shuffle=train_sampler is None,
        generator=generator,
        drop_last=n_train > cfg.batch_size and n_train % cfg.batch_size == 1,
        **common,
    )
    val_loader = DataLoader(val, sampler=val_sampler, shuffle=False, **common)
    return train_loader, val_loader
