"""Small things a user hits at once (issue: bring your own data, model and checkpoints)."""

import csv
import os
import stat

import pytest
import yaml

from ftwt._io import atomic_write_text
from ftwt.cli import main
from ftwt.errors import ConfigError


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_files_honour_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        path = atomic_write_text(tmp_path / "report.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


def test_checkpoints_honour_the_umask(tmp_path):
    from ftwt.checkpoint import save_checkpoint

    old = os.umask(0o027)
    try:
        save_checkpoint({"x": 1}, tmp_path / "best.pt")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "best.pt").stat().st_mode) == 0o640


def _one_line_error(capsys, argv, *words):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(w in err[0] for w in words), err


def test_flops_wrong_input_size_is_one_line(capsys):
    _one_line_error(capsys, ["flops", "--model", "resnet20", "--input-size", "1", "32", "32"], "1x32x32", "--input-size")


def test_flops_per_layer_prints_a_table(capsys):
    assert main(["flops", "--model", "resnet20", "--per-layer"]) == 0
    out = capsys.readouterr().out
    assert "layer1.0.conv1" in out and "fc" in out and "share" in out


@pytest.mark.parametrize("command", ["estimate", "bench"])
def test_threshold_is_an_alias_of_mass(command):
    from ftwt.cli import build_parser

    args = build_parser().parse_args([command, "--model", "resnet20", "--threshold", "0.7"])
    assert args.mass == 0.7
    args = build_parser().parse_args([command, "--model", "resnet20", "--mass", "0.6"])
    assert args.mass == 0.6


def test_help_has_no_rst_markup_and_an_example(capsys):
    from ftwt.cli import COMMANDS

    for command in COMMANDS:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        assert "``" not in out, command
        assert f"example:\n  ftwt {command} " in out, command


def test_training_curve_plot(tmp_path):
    from ftwt.plots import plot_training

    metrics = [{"epoch": e, "loss": 2.0 / e, "val_loss": 2.1 / e, "top1": 10.0 * e, "val_top1": 9.0 * e,
                "flops_reduction": None, "val_flops_reduction": 0.1 * e} for e in (1, 2, 3)]
    path = plot_training(metrics, tmp_path / "training.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ConfigError):
        plot_training([], tmp_path / "empty.png")


def test_logger_tensorboard_missing_is_one_line(capsys, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    _one_line_error(capsys, ["train", "--logger", "tensorboard", "--out", str(tmp_path / "run")], "pip install tensorboard")
    assert not (tmp_path / "run" / "last.pt").exists()


def test_train_resizes_digits_for_vgg_logs_csv_and_plots_curves(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--model", "vgg11_bn", "--dense", "--epochs", "2", "--train-subset", "16", "--val-subset", "8",
               "--batch-size", "8", "--workers", "0", "--no-progress", "--logger", "csv", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    # 16x16 digits cannot pass VGG's five poolings: resized to 32, and the run's config says so
    assert yaml.safe_load((out / "config.yaml").read_text())["image_size"] == 32
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"] and float(rows[0]["val_top1"]) >= 0
    assert (out / "training.png").read_bytes()[:4] == b"\x89PNG"
