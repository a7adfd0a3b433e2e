"""Data of the real-image development benchmark: a CIFAR-10 JPEG folder, decoded once into tensors.

The folder is ``ROOT/{train,val}/CLASS/*.jpg`` (32x32); the decoded uint8 tensors are cached
as ``ROOT/decoded_u8.pt`` so later runs skip the JPEG decoding. Augmentation is CIFAR's
pad-4 random crop and horizontal flip, drawn from one generator so runs repeat exactly.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# channel statistics of the training images (0-255 scale), from the data's README
MEAN = torch.tensor([125.3, 122.9, 113.9]).view(1, 3, 1, 1) / 255
STD = torch.tensor([62.5, 61.9, 66.5]).view(1, 3, 1, 1) / 255


def _decode(split_dir: Path):
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    imgs, tg = [], []
    for ci, c in enumerate(classes):
        for f in sorted(os.listdir(split_dir / c)):
            with Image.open(split_dir / c / f) as im:
                imgs.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
            tg.append(ci)
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(tg), classes


def load(root: str, per_class: int | None = None):
    """``(train images, train targets, val images, val targets)``; ``per_class``: the first N training images of each class."""
    root = Path(root)
    cache = root / "decoded_u8.pt"
    if cache.exists():
        d = torch.load(cache, weights_only=True)
    else:
        xtr, ytr, classes = _decode(root / "train")
        xva, yva, _ = _decode(root / "val")
        d = {"xtr": xtr, "ytr": ytr, "xva": xva, "yva": yva}
        torch.save(d, cache)
    xtr, ytr = d["xtr"], d["ytr"]
    if per_class is not None:
        idx = torch.cat([torch.nonzero(ytr == c).flatten()[:per_class] for c in range(10)])
        xtr, ytr = xtr[idx], ytr[idx]
    return xtr, ytr, d["xva"], d["yva"]


def load_unseen(root: str, start: int, per_class: int):
    """Training-folder images ``start .. start + per_class`` of each class: past the ``start`` that
    the dense model saw (and the fewer the fine-tuning sees), so no model was trained on them."""
    xtr, ytr, _, _ = load(root)
    idx = torch.cat([torch.nonzero(ytr == c).flatten()[start: start + per_class] for c in range(10)])
    return xtr[idx], ytr[idx]


def normalize(x_u8: torch.Tensor) -> torch.Tensor:
    """uint8 images to normalised float."""
    return (x_u8.float() / 255 - MEAN) / STD


def augment(x_u8: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """CIFAR pad-4 random crop and horizontal flip, per sample."""
    n, _, h, w = x_u8.shape
    padded = torch.nn.functional.pad(x_u8, (4, 4, 4, 4))
    off = torch.randint(0, 9, (n, 2), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    out = torch.empty_like(x_u8)
    for i in range(n):
        crop = padded[i, :, off[i, 0]: off[i, 0] + h, off[i, 1]: off[i, 1] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


def batches(x_u8, y, batch, gen=None, train=False):
    """Normalised ``(x, y)`` batches; ``train``: shuffled and augmented, no last batch of one sample."""
    n = len(y)
    order = torch.randperm(n, generator=gen) if train else torch.arange(n)
    for s in range(0, n - (1 if train else 0), batch):
        idx = order[s: s + batch]
        if train and len(idx) < 2:
            break
        xb = x_u8[idx]
        if train:
            xb = augment(xb, gen)
        yield normalize(xb), y[idx]
