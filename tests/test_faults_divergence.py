"""Numerical faults: a diverging run stops with one line naming where, and keeps its last good checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from ftwt.cli import main
from ftwt.train import Checkpoint, TrainConfig, Trainer, load_trained

TINY = ["--model", "resnet20", "--dense", "--image-size", "8", "--train-subset", "64", "--val-subset", "32",
        "--batch-size", "16", "--workers", "0", "--no-progress", "--device", "cpu", "--epochs", "2"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in model.state_dict().values() if v.is_floating_point())


def test_diverging_lr_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    # lr 1e38: the first step is finite, its update overflows the activations of the second
    assert main(["train", *TINY, "--lr", "1e38", "--save-every", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "loss is nan at epoch 1, step 2" in err and "diverged" in err and str(out / "last.pt") in err, err
    model, ckpt = load_trained(out / "last.pt")
    assert (ckpt.epoch, ckpt.step) == (0, 1) and _finite(model)
    assert not (out / "metrics.jsonl").exists() and not list(out.glob(".*.tmp"))


def test_weights_that_overflow_are_never_saved(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--lr", "1e6", "--save-every", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "weights became non-finite" in err and "epoch 1" in err, err
    if (out / "last.pt").exists():  # written before they overflowed
        assert _finite(load_trained(out / "last.pt")[0])


def test_skip_nonfinite_skips_the_batch_and_counts_it(tmp_path, monkeypatch):
    import ftwt.train._epoch as epoch_module

    calls = {"n": 0}
    cross_entropy = epoch_module.F.cross_entropy

    class _F:  # the loss of the third batch is NaN, as one corrupt sample would make it
        def __getattr__(self, name):
            return getattr(torch.nn.functional, name)

        @staticmethod
        def cross_entropy(out, y):
            calls["n"] += 1
            loss = cross_entropy(out, y)
            return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(epoch_module, "F", _F())
    base = dict(model="resnet20", dense=True, image_size=8, train_subset=64, val_subset=32, batch_size=16, workers=0,
                progress=False, device="cpu", epochs=1)
    report = Trainer(TrainConfig(**base, skip_nonfinite=True, out_dir=str(tmp_path / "skip"))).fit()
    (line,) = [json.loads(ln) for ln in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert line["skipped_nonfinite"] == 1 and report["top1"] >= 0
    assert _finite(Checkpoint.load(tmp_path / "skip" / "last.pt").build_model())

    calls["n"] = 0
    from ftwt.errors import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match="epoch 1, step 3"):
        Trainer(TrainConfig(**base, out_dir=str(tmp_path / "stop"))).fit()
