"""Tests for ftwt.data: the digits set, image folders and CIFAR on disk."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ftwt.data import DataConfig, DatasetInfo, build_datasets, build_loaders
from ftwt.errors import ConfigError, DataError


def _stack(ds, n=None):
    n = len(ds) if n is None else n
    xs, ys = zip(*(ds[i] for i in range(n)), strict=True)
    return torch.stack(xs), torch.tensor(ys)


# --- digits -------------------------------------------------------------------------------


def test_digits_shapes_and_info():
    train, val, info = build_datasets(DataConfig())
    assert isinstance(info, DatasetInfo)
    assert (info.name, info.num_classes, info.input_size) == ("digits", 10, (3, 16, 16))
    assert len(train) + len(val) == 1797
    assert len(val) == round(1797 * 0.2)
    x, y = train[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and isinstance(y, int)
    assert len(info.mean) == len(info.std) == 3
    assert info.classes == tuple(str(i) for i in range(10))


def test_digits_normalised():
    _, val, _ = build_datasets(DataConfig())
    x, y = _stack(val)
    # statistics come from the training split, so the validation split is only close to 0/1
    assert x.mean(dim=(0, 2, 3)).abs().max() < 0.1
    assert ((x.std(dim=(0, 2, 3)) - 1).abs() < 0.1).all()
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])  # replicated grey
    assert set(y.tolist()) == set(range(10))


def test_digits_split_is_deterministic_and_disjoint():
    train_a, val_a, info_a = build_datasets(DataConfig())
    train_b, val_b, info_b = build_datasets(DataConfig())
    assert info_a == info_b
    assert torch.equal(val_a.images, val_b.images) and torch.equal(val_a.targets, val_b.targets)
    assert torch.equal(train_a.images, train_b.images)
    train_rows = {tuple(r.tolist()) for r in train_a.images.flatten(1)}
    overlap = sum(tuple(r.tolist()) in train_rows for r in val_a.images.flatten(1))
    assert overlap <= 5  # load_digits itself has a few exact duplicate images


def test_digits_train_augmentation_crops_val_does_not():
    train, val, _ = build_datasets(DataConfig())
    torch.manual_seed(0)
    views = torch.stack([train[0][0] for _ in range(20)])
    assert not all(torch.equal(views[0], v) for v in views[1:])
    assert torch.equal(val[0][0], val[0][0])


def test_subsets():
    train, val, _ = build_datasets(DataConfig(train_subset=50, val_subset=20))
    assert (len(train), len(val)) == (50, 20)
    full_train, full_val, _ = build_datasets(DataConfig(val_subset=10_000))
    assert len(full_val) == 359 and torch.equal(val[3][0], full_val[3][0])  # the first N samples
    with pytest.raises(ConfigError, match="train_subset"):
        build_datasets(DataConfig(train_subset=0))


def test_loaders_digits():
    train_dl, val_dl, info = build_loaders(DataConfig(batch_size=64, workers=0, train_subset=129))
    x, y = next(iter(train_dl))
    assert x.shape == (64, 3, 16, 16) and y.shape == (64,) and y.dtype == torch.long
    assert len(train_dl) == 2  # 129 = 2 * 64 + 1: a lone last sample would break BatchNorm
    assert sum(len(b[1]) for b in val_dl) == 359
    assert info.num_classes == 10


def test_loader_options_validated():
    with pytest.raises(ConfigError, match="batch_size"):
        build_loaders(DataConfig(batch_size=0))
    with pytest.raises(ConfigError, match="workers"):
        build_loaders(DataConfig(workers=-1))
    with pytest.raises(ConfigError, match="digits, cifar10, cifar100, folder"):
        build_datasets(DataConfig(dataset="mnist"))


# --- image folders ------------------------------------------------------------------------


def _image(path: Path, size=(40, 30), seed=0):
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _folder(root: Path, classes=("cat", "dog"), val_classes=None, n=2) -> Path:
    for split, names in (("train", classes), ("val", val_classes or classes)):
        for c in names:
            for i in range(n):
                ext = "png" if i % 2 else "jpg"
                _image(root / split / c / f"{i}.{ext}", size=(40 + 7 * i, 30), seed=i)
    return root


def test_folder_loads(tmp_path):
    cfg = DataConfig(dataset="folder", data_dir=str(_folder(tmp_path)), image_size=32, workers=0, batch_size=2)
    train, val, info = build_datasets(cfg)
    assert info.classes == ("cat", "dog") and info.num_classes == 2
    assert info.input_size == (3, 32, 32)
    assert train.classes == ["cat", "dog"] and len(train) == len(val) == 4
    assert train[0][0].shape == (3, 32, 32) and val[3][0].shape == (3, 32, 32)
    assert [t for _, t in val.samples] == [0, 0, 1, 1]
    train_dl, _, _ = build_loaders(cfg)
    x, y = next(iter(train_dl))
    assert x.shape == (2, 3, 32, 32) and y.shape == (2,)


def test_folder_missing(tmp_path):
    with pytest.raises(DataError, match="needs --data-dir"):
        build_datasets(DataConfig(dataset="folder"))
    with pytest.raises(DataError, match="data directory not found"):
        build_datasets(DataConfig(dataset="folder", data_dir=str(tmp_path / "nope")))
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match=r"missing .*val"):
        build_datasets(DataConfig(dataset="folder", data_dir=str(tmp_path)))


def test_folder_without_class_folders(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(DataError, match="no class folders in .*train"):
        build_datasets(DataConfig(dataset="folder", data_dir=str(tmp_path)))


def test_folder_empty_class(tmp_path):
    root = _folder(tmp_path)
    for f in (root / "train" / "dog").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"train.*dog.*at least one image"):
        build_datasets(DataConfig(dataset="folder", data_dir=str(root)))


def test_folder_mismatched_classes(tmp_path):
    root = _folder(tmp_path, classes=("cat", "dog"), val_classes=("bird", "cat"))
    with pytest.raises(DataError, match=r"different class folders.*'dog'.*'bird'"):
        build_datasets(DataConfig(dataset="folder", data_dir=str(root)))


def test_folder_corrupt_image_names_file(tmp_path):
    root = _folder(tmp_path)
    bad = root / "train" / "cat" / "bad.jpg"
    bad.write_bytes(np.random.default_rng(1).bytes(200))
    cfg = DataConfig(dataset="folder", data_dir=str(root), image_size=32, workers=0)
    train, _, _ = build_datasets(cfg)
    idx = [p for p, _ in train.samples].index(str(bad))
    with pytest.raises(DataError, match="cannot read image .*bad.jpg"):
        train[idx]
    train_dl, _, _ = build_loaders(cfg)
    with pytest.raises(DataError, match="bad.jpg"):
        list(train_dl)


# --- CIFAR --------------------------------------------------------------------------------


def test_cifar_missing_without_download(tmp_path):
    with pytest.raises(DataError, match="CIFAR-10 not found.*--download.*cifar-10-batches-py"):
        build_datasets(DataConfig(dataset="cifar10", data_dir=str(tmp_path)))
    with pytest.raises(DataError, match="CIFAR-100 not found.*cifar-100-python"):
        build_datasets(DataConfig(dataset="cifar100", data_dir=str(tmp_path)))


def test_cifar_incomplete_folder(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(DataError, match="could not be loaded"):
        build_datasets(DataConfig(dataset="cifar10", data_dir=str(tmp_path)))


def _dump(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _fake_cifar(root: Path, dataset: str, n: int = 4) -> None:
    """Tiny random files in torchvision's on-disk CIFAR pickle layout."""
    rng = np.random.default_rng(0)

    def batch(label_key, classes):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        return {"data": data, label_key: rng.integers(0, classes, n).tolist()}

    if dataset == "cifar10":
        base = root / "cifar-10-batches-py"
        base.mkdir()
        for i in range(1, 6):
            _dump(base / f"data_batch_{i}", batch("labels", 10))
        _dump(base / "test_batch", batch("labels", 10))
        _dump(base / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    else:
        base = root / "cifar-100-python"
        base.mkdir()
        _dump(base / "train", batch("fine_labels", 100))
        _dump(base / "test", batch("fine_labels", 100))
        _dump(base / "meta", {"fine_label_names": [f"c{i}" for i in range(100)]})


@pytest.mark.parametrize("dataset, classes, n_train", [("cifar10", 10, 20), ("cifar100", 100, 4)])
def test_fake_cifar_loads(tmp_path, monkeypatch, dataset, classes, n_train):
    import torchvision.datasets.cifar as tv_cifar

    _fake_cifar(tmp_path, dataset)
    # torchvision checks each file's md5 against the real release, which random test files
    # cannot match; its _check_integrity() and _load_meta() both go through this function
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    cfg = DataConfig(dataset=dataset, data_dir=str(tmp_path), workers=0, batch_size=4)
    train, val, info = build_datasets(cfg)
    assert (len(train), len(val)) == (n_train, 4)
    assert info.num_classes == classes and info.input_size == (3, 32, 32)
    assert info.classes[0] == "c0"
    x, y = train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < classes
    xv, _ = val[0]
    raw = torch.from_numpy(val.data[0]).permute(2, 0, 1).float() / 255
    mean = torch.tensor(info.mean).view(3, 1, 1)
    std = torch.tensor(info.std).view(3, 1, 1)
    assert torch.allclose(xv, (raw - mean) / std, atol=1e-5)  # val: normalise only
    train_dl, _, _ = build_loaders(cfg)
    assert next(iter(train_dl))[0].shape == (4, 3, 32, 32)
