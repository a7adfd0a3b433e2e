"""Training end to end: both gate modes, dense baselines, exact resume, torchrun, recipes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ftwt.checkpoint import load_checkpoint
from ftwt.cli import main
from ftwt.surgery import gate_parameters
from ftwt.train import TrainConfig, Trainer, list_recipes, load_recipe, load_trained

# 8x8 digits, a few batches: every run here takes seconds on a CPU.
TINY = dict(model="resnet20", dataset="digits", image_size=8, train_subset=64, val_subset=32, batch_size=32,
            workers=0, progress=False, device="cpu")
TINY_ARGS = ["--model", "resnet20", "--image-size", "8", "--train-subset", "64", "--val-subset", "32",
             "--batch-size", "16", "--workers", "0", "--no-progress", "--device", "cpu"]
REPORT_KEYS = {"top1", "dense_macs", "dynamic_macs", "flops_reduction", "per_layer", "estimated_reduction"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory) -> Path:
    """A dense ResNet-20 trained for a few epochs: the init of the FTWT runs below."""
    out = tmp_path_factory.mktemp("dense")
    cfg = TrainConfig(**{**TINY, "train_subset": 384, "val_subset": 96}, dense=True, epochs=3, out_dir=str(out))
    Trainer(cfg).fit()
    return out


def test_dense_training_beats_chance(dense_run):
    report = json.loads((dense_run / "report.json").read_text())
    assert report["top1"] > 40.0  # chance is 10%
    assert report["flops_reduction"] == pytest.approx(0.0, abs=0.05)
    assert report["estimated_reduction"] is None and "per_layer" not in report
    lines = _lines(dense_run / "metrics.jsonl")
    assert [m["epoch"] for m in lines] == [1, 2, 3]
    assert lines[-1]["top1"] > lines[0]["top1"]
    assert lines[0]["lr"] == pytest.approx(0.1)  # the dense recipe
    ckpt = load_checkpoint(dense_run / "best.pt")
    assert ckpt["gate_config"] is None and ckpt["model_name"] == "resnet20"


@pytest.mark.parametrize("mode", ["decoupled", "joint"])
def test_ftwt_epoch_trains_gates(tmp_path, dense_run, mode):
    trainer = Trainer(TrainConfig(**TINY, init=str(dense_run / "last.pt"), mode=mode, threshold=0.8, epochs=1,
                                  out_dir=str(tmp_path)))
    before = [p.detach().clone() for p in gate_parameters(trainer.model)]
    report = trainer.fit()
    after = gate_parameters(trainer.model)
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True)), "gates did not learn"
    assert REPORT_KEYS <= set(report)
    assert 0.0 < report["estimated_reduction"] < 1.0  # made before training, from the dense init
    (line,) = _lines(tmp_path / "metrics.jsonl")
    assert line["epoch"] == 1 and line["gate_accuracy"] is not None and line["mask_loss"] > 0
    assert REPORT_KEYS - {"per_layer", "estimated_reduction"} <= set(json.loads((tmp_path / "report.json").read_text()))
    assert (tmp_path / "config.yaml").exists()
    for name in ("last.pt", "best.pt"):
        ckpt = load_checkpoint(tmp_path / name)  # weights_only
        assert ckpt["gate_config"]["mode"] == mode and ckpt["epoch"] == 1
        assert {"optimizers", "schedulers", "scaler", "rng", "best_top1", "config", "input_size"} <= set(ckpt)
    model, _ = load_trained(str(tmp_path / "last.pt"))
    assert len(gate_parameters(model)) == len(after)


class _Interrupt(Exception):
    pass


def _stop_after(epoch: int):
    def callback(trainer, metrics):
        if metrics["epoch"] == epoch:
            raise _Interrupt

    return callback


def _same_run(a: Trainer, b: Trainer, dir_a: Path, dir_b: Path) -> list[dict]:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), "resumed weights differ"
    lines = [[{k: v for k, v in m.items() if k != "time"} for m in _lines(d / "metrics.jsonl")] for d in (dir_a, dir_b)]
    assert lines[0] == lines[1]
    return lines[0]


def test_resume_after_interruption_equals_uninterrupted(tmp_path, dense_run):
    # cooldown (2, with calibration) at the resume point, lr milestone after it
    base = dict(TINY, init=str(dense_run / "last.pt"), epochs=4, milestones=[3], calibrate=True, calibrate_batches=2)
    full = Trainer(TrainConfig(**base, out_dir=str(tmp_path / "full")))
    full.fit()
    with pytest.raises(_Interrupt):
        Trainer(TrainConfig(**base, out_dir=str(tmp_path / "part")), callbacks=[_stop_after(2)]).fit()
    resumed = Trainer.resume(str(tmp_path / "part" / "last.pt"))
    assert resumed.start_epoch == 2
    resumed.fit()
    lines = _same_run(full, resumed, tmp_path / "full", tmp_path / "part")
    assert [m["gates_frozen"] for m in lines] == [False, False, True, True]
    assert [m["lr"] for m in lines] == pytest.approx([0.01, 0.01, 0.01, 0.001])
    assert resumed.calibrated is not None and resumed.calibrated == full.calibrated


def test_resume_extends_a_finished_run(tmp_path, dense_run):
    base = dict(TINY, init=str(dense_run / "last.pt"), cooldown=3, milestones=[3])
    full = Trainer(TrainConfig(**base, epochs=4, out_dir=str(tmp_path / "full")))
    full.fit()
    Trainer(TrainConfig(**base, epochs=2, out_dir=str(tmp_path / "part"))).fit()
    resumed = Trainer.resume(str(tmp_path / "part" / "last.pt"), {"epochs": 4})
    resumed.fit()
    lines = _same_run(full, resumed, tmp_path / "full", tmp_path / "part")
    assert [m["gates_frozen"] for m in lines] == [False, False, False, True]


def test_cli_recipe_then_flags(tmp_path, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("model: resnet32\ndense: true\nepochs: 5\nlr: 0.05\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(recipe), *TINY_ARGS, "--epochs", "1", "--out", str(out)]) == 0
    import yaml

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert (config["model"], config["epochs"], config["lr"], config["dense"]) == ("resnet20", 1, 0.05, True)
    assert "top-1" in capsys.readouterr().out


def test_two_processes_with_torchrun(tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert main(["train", *TINY_ARGS, "--epochs", "1", "--out", str(single)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ftwt",
           "train", *TINY_ARGS, "--epochs", "1", "--out", str(multi)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("top-1") == 1  # only rank 0 prints
    assert _lines(multi / "metrics.jsonl")[0].keys() == _lines(single / "metrics.jsonl")[0].keys()
    one, two = (json.loads((d / "report.json").read_text()) for d in (single, multi))
    assert one.keys() == two.keys()
    assert two["samples"] == 32  # 32 validation images over two processes, each counted once


def test_every_recipe_parses():
    names = list_recipes()
    assert len(names) >= 14
    for name in names:
        config = TrainConfig.from_dict(load_recipe(name)).resolved()
        assert config.epochs > 0
        shipped = Path(__file__).parents[1] / "ftwt" / "recipes" / f"{name}.yaml"
        assert "Paper target" in shipped.read_text(), name
    assert load_recipe("cifar10_resnet56_r0.80_decoupled.yaml") == load_recipe("cifar10_resnet56_r0.80_decoupled")
    # The path the README uses from the repository root resolves to the shipped recipe.
    assert load_recipe("recipes/cifar10_resnet56_r0.80_decoupled.yaml") == load_recipe("cifar10_resnet56_r0.80_decoupled")


def test_best_checkpoint_comes_after_cooldown(tmp_path, dense_run):
    # Before cooldown the masks are not final; best.pt must hold the model that is evaluated.
    trainer = Trainer(TrainConfig(**TINY, init=str(dense_run / "last.pt"), threshold=0.8, epochs=3, cooldown=2,
                                  out_dir=str(tmp_path)))
    trainer.fit()
    lines = _lines(tmp_path / "metrics.jsonl")
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["epoch"] == 3
    assert best["best_top1"] == lines[-1]["val_top1"]
