"""The README's bad-input table, row by row: exit status 2, one line on stderr, no traceback, and
nothing already written (a finished run, data, checkpoints, recipes) changed."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from ftwt._io import FolderLock
from ftwt.checkpoint import save_checkpoint
from ftwt.cli import main
from ftwt.models import get_model

TINY = ["--model", "resnet20", "--image-size", "8", "--train-subset", "32", "--val-subset", "16", "--batch-size",
        "16", "--workers", "0", "--no-progress", "--device", "cpu", "--epochs", "1"]

pytestmark = pytest.mark.usefixtures("one_thread")


class _Evil:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/ftwt-bad-input-ran-code"),))


def _images(folder: Path, classes: dict[str, int], mode: str = "RGB", size: int = 10) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, count in classes.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new(mode, (size + i, size), color=40 * i).save(folder / name / f"{i}.png")


@pytest.fixture(scope="module")
def w(tmp_path_factory) -> Path:
    """Everything the rows need, written once: a finished run, image folders, checkpoints, recipes."""
    root = tmp_path_factory.mktemp("bad")
    assert main(["train", *TINY, "--dense", "--out", str(root / "run")]) == 0
    assert main(["train", *TINY, "--dense", "--save-every", "1", "--out", str(root / "mid")]) == 0
    mid = torch.load(root / "mid" / "last.pt", weights_only=True)
    save_checkpoint({**mid, "epoch": 0, "step": 1, "epoch_sums": [0.0] * 11}, root / "mid_epoch.pt")
    for split in ("train", "val"):
        _images(root / "good" / split, {"a": 2, "b": 2})
        _images(root / "flat" / split, {})
        Image.new("RGB", (10, 10)).save(root / "flat" / split / "0.png")  # images, but no class folders
        _images(root / "no_images" / split, {"a": 2})
        (root / "no_images" / split / "b").mkdir()
        _images(root / "broken" / split, {"a": 2, "b": 2})
        _images(root / "mismatch" / split, {"a": 1, ("b" if split == "train" else "c"): 1})
    (root / "broken" / "train" / "a" / "notes.png").write_text("meeting notes, saved as .png by mistake\n")
    (root / "empty").mkdir()
    save_checkpoint(get_model("resnet20").state_dict(), root / "resnet20.pt")
    save_checkpoint(get_model("resnet20", num_classes=7).state_dict(), root / "resnet20_7classes.pt")
    good = (root / "run" / "last.pt").read_bytes()
    (root / "truncated.pt").write_bytes(good[: len(good) // 2])
    (root / "random.pt").write_bytes(bytes(range(256)) * 64)
    (root / "evil.pt").write_bytes(pickle.dumps({"model": _Evil()}))
    (root / "a_file").write_text("not a folder\n")
    (root / "unknown_key.yaml").write_text("model: resnet20\nlearning_rate: 0.1\n")
    (root / "wrong_type.yaml").write_text("model: resnet20\nseed: zero\n")
    (root / "broken.yaml").write_text("model: resnet20\nepochs: [1\n")
    return root


def _train(*extra: str, out: str = "fresh"):
    return lambda w: ["train", *TINY, "--dense", "--out", str(w / out), *extra]


def _gated(w: Path, *extra: str) -> list[str]:
    return ["train", *TINY, "--init", str(w / "resnet20.pt"), "--out", str(w / "fresh"), *extra]


def _folder(name: str):
    return lambda w: ["train", *TINY, "--dense", "--dataset", "folder", "--data-dir", str(w / name),
                      "--out", str(w / "fresh")]


def _estimate(*extra: str):
    return lambda w: ["estimate", "--model", "resnet20", "--samples", "16", "--batch-size", "16", "--device", "cpu",
                      "--init", str(w / "resnet20.pt"), *extra]


# (row id, command, what the one line says): the README's table, in its order
ROWS = [
    ("data folder missing", _folder("nowhere"), "data directory not found"),
    ("data folder empty", _folder("empty"), "missing"),
    ("no class subfolders", _folder("flat"), "no class folders in"),
    ("class folder without images", _folder("no_images"), "every class folder needs at least one image"),
    ("train and val classes differ", _folder("mismatch"), "different class folders"),
    ("non-image file among images", _folder("broken"), "cannot read image"),
    ("folder data without --data-dir", lambda w: _train("--dataset", "folder")(w), "needs --data-dir"),
    ("CIFAR not downloaded", lambda w: _train("--dataset", "cifar10", "--data-dir", str(w / "empty"))(w),
     "CIFAR-10 not found"),
    ("unknown dataset", _train("--dataset", "mnist"), "unknown dataset"),
    ("unknown model", _train("--model", "resnet9000"), "unknown model"),
    ("input too small for the model", _train("--model", "vgg11_bn"), "cannot take 3x8x8 inputs"),
    ("mass above 1", lambda w: _gated(w, "--mass", "1.5"), "threshold"),
    ("mass zero", lambda w: _gated(w, "--mass", "0"), "threshold"),
    ("unreachable target reduction", _estimate("--target-reduction", "0.99"), "out of reach"),
    ("target reduction of 100%", _estimate("--target-reduction", "1.0"), "must be in [0, 1)"),
    ("checkpoint of another model", lambda w: _train("--model", "resnet32", "--init", str(w / "resnet20.pt"))(w),
     "does not fit"),
    ("checkpoint for another class count",
     lambda w: _train("--init", str(w / "resnet20_7classes.pt"))(w), "shape mismatch"),
    ("truncated checkpoint", lambda w: _train("--init", str(w / "truncated.pt"))(w), "corrupt"),
    ("corrupt checkpoint", lambda w: _train("--init", str(w / "random.pt"))(w), "corrupt"),
    ("code-running checkpoint", lambda w: _train("--init", str(w / "evil.pt"))(w), "could run code"),
    ("missing checkpoint", lambda w: ["eval", "--checkpoint", str(w / "nope.pt")], "not found"),
    ("resume from plain weights", lambda w: _train("--resume", str(w / "resnet20.pt"))(w),
     "not an ftwt training checkpoint"),
    ("resume as another model", lambda w: _train("--resume", str(w / "run" / "last.pt"), "--model", "resnet32",
                                                 out="run")(w), "cannot resume"),
    ("mid-epoch resume with another batch size",
     lambda w: _train("--resume", str(w / "mid_epoch.pt"), "--batch-size", "8")(w), "middle of epoch 1"),
    ("zero epochs", _train("--epochs", "0"), "epochs must be a positive integer"),
    ("negative epochs", _train("--epochs", "-3"), "epochs must be a positive integer"),
    ("zero batch size", _train("--batch-size", "0"), "batch_size must be a positive integer"),
    ("negative batch size", _train("--batch-size", "-8"), "batch_size must be a positive integer"),
    ("learning rate not a positive number", _train("--lr", "nan"), "lr must be a finite number > 0"),
    ("save every zero steps", _train("--save-every", "0"), "save_every must be a positive integer"),
    ("negative workers", _train("--workers", "-1"), "workers must be >= 0"),
    ("output folder under a file", lambda w: _train(out="a_file/run")(w), "is a file, not a folder"),
    ("output folder holds another run", _train(out="run"), "already holds a run"),
    ("output folder in use by a live run", _train(out="locked"), "in use by a running ftwt train"),
    ("recipe with an unknown key", lambda w: _train("--config", str(w / "unknown_key.yaml"))(w), "unknown recipe key"),
    ("recipe with a wrong type", lambda w: _train("--config", str(w / "wrong_type.yaml"))(w), "must be int"),
    ("recipe that is not YAML", lambda w: _train("--config", str(w / "broken.yaml"))(w), "is not valid YAML"),
    ("recipe that does not exist", _train("--config", "cifar10_resnet9000"), "no recipe file"),
    ("cuda without a GPU", _train("--device", "cuda"), "CUDA is not available"),
    ("unknown device", _train("--device", "tpu"), "unknown device"),
]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and p.name != ".lock" and not p.relative_to(root).parts[0] == "fresh"}


@pytest.mark.parametrize(("command", "needle"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_is_one_line_and_exit_2(w, command, needle, capsys):
    if needle == "CUDA is not available" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    shutil.rmtree(w / "fresh", ignore_errors=True)  # each row starts a run of its own there
    before = _snapshot(w)
    lock = FolderLock(w / "locked")
    lock.acquire()  # as a live run holds it
    try:
        code = main(command(w))
    finally:
        lock.release()
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("ftwt ") and needle in lines[0], err
    assert "Traceback" not in err
    assert _snapshot(w) == before  # nothing already written was lost or changed
    assert not Path("/tmp/ftwt-bad-input-ran-code").exists()


def test_table_in_readme_lists_every_row():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## When things go wrong", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in section.splitlines() if ln.startswith("| ") and not ln.startswith("| bad input")]
    rows = [ln for ln in rows if not set(ln) <= set("|- ")]
    assert len(rows) == len(ROWS) >= 20


def test_inputs_that_are_not_errors(w, capsys):
    """Grayscale and odd-sized images, and files that are not images at all, train: they are converted or skipped."""
    data = w / "accepted" / "gray"
    for split in ("train", "val"):
        _images(data / split, {"a": 2, "b": 2}, mode="L", size=7)
        (data / split / "a" / ".DS_Store").write_bytes(b"\x00\x01")
        (data / split / "b" / "README.txt").write_text("where these came from\n")
    assert main(["train", *TINY, "--dense", "--dataset", "folder", "--data-dir", str(data),
                 "--out", str(w / "accepted" / "run")]) == 0
    assert (w / "accepted" / "run" / "last.pt").is_file()
