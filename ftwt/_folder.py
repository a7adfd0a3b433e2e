"""Image folders: ``data_dir/{train,val}/CLASS/*.jpg`` with transforms that fit their images.

Sizes, augmentation and normalisation default to what the images are (small images get
CIFAR's recipe, large ones ImageNet's); see :class:`ftwt.data.DataConfig`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from ftwt.data import DataConfig, DatasetInfo
from ftwt.errors import DataError

_SMALL_IMAGES = 64  # folders of images up to this side get CIFAR-style defaults
_STATS_SAMPLES = 256  # training images the folder's mean/std are computed from


def _load_image(path: str) -> Image.Image:
    """Open an image as RGB; unreadable files raise DataError naming the file."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")  # convert() forces the decode while the file is open
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {path}: {e}") from e


def _class_dirs(split_dir: Path) -> list[str]:
    """Sorted names of the class folders in one split, as ImageFolder sees them."""
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir())


def build_folder(cfg: DataConfig) -> tuple[Dataset, Dataset, DatasetInfo]:
    """``data_dir/{train,val}/CLASS/*.jpg`` with transforms that fit the images (see :class:`DataConfig`)."""
    from torchvision import datasets, transforms

    if cfg.data_dir is None:
        raise DataError("dataset 'folder' needs --data-dir pointing at a folder with train/ and val/")
    root = Path(cfg.data_dir)
    if not root.is_dir():
        raise DataError(f"data directory not found: {root}; point --data-dir at a folder with train/ and val/")
    classes: dict[str, list[str]] = {}
    for split in ("train", "val"):
        split_dir = root / split
        if not split_dir.is_dir():
            raise DataError(f"missing {split_dir}; --data-dir must contain train/CLASS/*.jpg and val/CLASS/*.jpg")
        classes[split] = _class_dirs(split_dir)
        if not classes[split]:
            raise DataError(f"no class folders in {split_dir}; put images in {split_dir}/CLASS/")
    if classes["train"] != classes["val"]:
        only_train = sorted(set(classes["train"]) - set(classes["val"]))
        only_val = sorted(set(classes["val"]) - set(classes["train"]))
        raise DataError(
            f"train/ and val/ in {root} have different class folders (only in "
            f"train: {only_train[:5]}, only in val: {only_val[:5]}); make them match"
        )
    built = []
    for split in ("train", "val"):
        try:
            built.append(datasets.ImageFolder(str(root / split), loader=_load_image))
        except FileNotFoundError as e:
            # ImageFolder raises this for a class folder without a single image file
            raise DataError(f"{root / split}: {e}; every class folder needs at least one image") from e
    train, val = built
    side = _typical_side(train)
    augment = cfg.augment or ("cifar" if side <= _SMALL_IMAGES else "imagenet")
    size = cfg.image_size or (side if side <= _SMALL_IMAGES else 224)
    if augment == "imagenet":
        # resize to size/0.875 then centre-crop: the usual 256 -> 224 evaluation protocol
        view = [transforms.Resize(int(size / 0.875)), transforms.CenterCrop(size)]
        augmented = [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()]
    else:
        view = [transforms.Resize(size), transforms.CenterCrop(size)]
        # CIFAR's pad-4-and-crop at 32 px, scaled to the image size
        augmented = view + ([transforms.RandomCrop(size, padding=max(1, size // 8)), transforms.RandomHorizontalFlip()]
                            if augment == "cifar" else [])
    if cfg.mean is not None:
        mean, std = tuple(cfg.mean), tuple(cfg.std)
    else:
        mean, std = _folder_stats(train, transforms.Compose([*view, transforms.ToTensor()]))
    normalize = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    train.transform = transforms.Compose(augmented + normalize)
    val.transform = transforms.Compose(view + normalize)
    info = DatasetInfo("folder", len(train.classes), (3, size, size), mean, std, tuple(train.classes), augment)
    return train, val, info


def _spread(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (all of them when ``n <= k``)."""
    return list(range(n)) if n <= k else [i * n // k for i in range(k)]


def _typical_side(train: Dataset) -> int:
    """The median shorter side of a few training images (headers only, nothing decoded).

    Unreadable images are left out here; reading them in training names them.
    """
    sides = []
    for i in _spread(len(train.samples), 16):
        try:
            with Image.open(train.samples[i][0]) as im:
                sides.append(min(im.size))
        except (OSError, ValueError):
            continue
    return sorted(sides)[len(sides) // 2] if sides else 224


def _folder_stats(train: Dataset, view: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of up to ``_STATS_SAMPLES`` training images, as the model sees them."""
    total, squares, count = torch.zeros(3), torch.zeros(3), 0
    for i in _spread(len(train.samples), _STATS_SAMPLES):
        try:
            x = view(train.loader(train.samples[i][0]))
        except DataError:
            continue
        total += x.sum(dim=(1, 2))
        squares += (x * x).sum(dim=(1, 2))
        count += x[0].numel()
    if not count:
        raise DataError("no readable image in the training folder to compute mean/std from")
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(round(float(m), 4) for m in mean), tuple(round(max(float(s), 1e-3), 4) for s in std)
