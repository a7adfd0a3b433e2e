"""Image folders get transforms that fit their images: augmentation, size and statistics."""

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torchvision import transforms

from ftwt.cli import main
from ftwt.data import DataConfig, build_datasets
from ftwt.errors import ConfigError


def _folder(root, side, n=3, value=None):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            for i in range(n):
                arr = rng.integers(0, 256, (side, side, 3), dtype=np.uint8) if value is None else \
                    np.full((side, side, 3), value, dtype=np.uint8)
                (root / split / c).mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(root / split / c / f"{i}.png")
    return root


def _kinds(ds):
    return [type(t) for t in ds.transform.transforms]


def test_small_images_get_cifar_transforms_and_their_own_statistics(tmp_path):
    train, val, info = build_datasets(DataConfig(dataset="folder", data_dir=str(_folder(tmp_path, 32))))
    assert info.augment == "cifar" and info.input_size == (3, 32, 32)
    assert transforms.RandomCrop in _kinds(train) and transforms.RandomResizedCrop not in _kinds(train)
    crop = next(t for t in train.transform.transforms if isinstance(t, transforms.RandomCrop))
    assert crop.padding == 4
    # uniform random pixels: mean 0.5, std 1/sqrt(12), computed from the training images
    assert info.mean == pytest.approx((0.5,) * 3, abs=0.03) and info.std == pytest.approx((0.2887,) * 3, abs=0.03)
    x = torch.stack([val[i][0] for i in range(len(val))])
    assert x.shape[1:] == (3, 32, 32) and abs(float(x.mean())) < 0.1


def test_large_images_keep_imagenet_transforms(tmp_path):
    train, _, info = build_datasets(DataConfig(dataset="folder", data_dir=str(_folder(tmp_path, 80))))
    assert info.augment == "imagenet" and info.input_size == (3, 224, 224)
    assert transforms.RandomResizedCrop in _kinds(train)


def test_given_augment_and_statistics_are_used(tmp_path):
    cfg = DataConfig(dataset="folder", data_dir=str(_folder(tmp_path, 32, value=255)), augment="none",
                     mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    train, _, info = build_datasets(cfg)
    assert info.augment == "none" and info.mean == (0.5, 0.5, 0.5)
    assert not {transforms.RandomCrop, transforms.RandomHorizontalFlip} & set(_kinds(train))
    torch.testing.assert_close(train[0][0], torch.full((3, 32, 32), 2.0))  # (1 - 0.5) / 0.25


@pytest.mark.parametrize("bad", [{"augment": "autoaugment"}, {"mean": [0.5, 0.5, 0.5]},
                                 {"mean": [0.5], "std": [0.2]}])
def test_bad_folder_options(tmp_path, bad):
    with pytest.raises(ConfigError):
        build_datasets(DataConfig(dataset="folder", data_dir=str(_folder(tmp_path, 32)), **bad))


def test_train_states_the_folder_defaults_in_config_yaml(tmp_path, capsys):
    root, out = _folder(tmp_path / "data", 32), tmp_path / "run"
    rc = main(["train", "--model", "resnet20", "--dense", "--dataset", "folder", "--data-dir", str(root),
               "--epochs", "1", "--batch-size", "4", "--workers", "0", "--no-progress", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["augment"] == "cifar" and cfg["image_size"] == 32
    assert len(cfg["mean"]) == 3 and all(0.4 < m < 0.6 for m in cfg["mean"]) and len(cfg["std"]) == 3
    # eval rebuilds the same transforms from the checkpoint's config
    assert main(["eval", "--checkpoint", str(out / "last.pt"), "--data-dir", str(root), "--json"]) == 0
    assert '"samples": 6' in capsys.readouterr().out
