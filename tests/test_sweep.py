"""``ftwt sweep``: a tiny sweep end to end, its CSV and figure, skipping and resuming runs."""

from __future__ import annotations

import csv
import json

import pytest
from PIL import Image

import ftwt._sweep_runs as runs
from ftwt.cli import main
from ftwt.errors import ConfigError
from ftwt.sweep import COLUMNS, SweepConfig, read_csv, run_sweep
from ftwt.train import TrainConfig, Trainer

DATA = {"dataset": "digits", "train_subset": 96, "val_subset": 32, "batch_size": 32, "workers": 0, "progress": False}


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    out = tmp_path_factory.mktemp("dense")
    Trainer(TrainConfig(model="resnet20", dense=True, epochs=1, out_dir=str(out), **DATA)).fit()
    return str(out / "last.pt")


def _config(dense, out, **kw):
    settings = dict(init=dense, model="resnet20", masses=(0.8, 0.9), methods=("ftwt", "uniform", "static"), epochs=1,
                    out_dir=str(out), train=DATA, estimate_samples=32, latency_seconds=0.05, latency_samples=2,
                    progress=False)
    return SweepConfig(**{**settings, **kw})


@pytest.fixture(scope="module")
def swept(dense, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    return out, run_sweep(_config(dense, out))


def test_the_csv_has_a_row_per_run_and_every_column(swept):
    out, rows = swept
    with open(out / "sweep.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == COLUMNS
        table = list(reader)
    assert [(r["method"], r["setting"]) for r in table] == [
        ("dense", ""), ("ftwt", "0.8"), ("uniform", "0.8"), ("static", "0.8"),
        ("ftwt", "0.9"), ("uniform", "0.9"), ("static", "0.9")]
    back = read_csv(out / "sweep.csv")
    for row in back[1:]:
        assert 0.0 < row["achieved_reduction"] < 1.0
        assert row["estimation_error"] == pytest.approx(row["estimated_reduction"] - row["achieved_reduction"])
        assert row["latency_ms"] > 0
        assert 0.0 <= row["top1"] <= 100.0
    by = {(r["method"], r["setting"]): r for r in back}
    for r in (0.8, 0.9):
        # static pruning is given the budget of the ftwt estimate at r
        assert by[("static", r)]["achieved_reduction"] == pytest.approx(by[("ftwt", r)]["estimated_reduction"], abs=0.05)
        # uniform's ratio is matched to the ftwt estimate at r
        assert by[("uniform", r)]["estimated_reduction"] == pytest.approx(by[("ftwt", r)]["estimated_reduction"],
                                                                         abs=0.03)
        assert by[("ftwt", r)]["gate_lift"] is not None and by[("static", r)]["gate_lift"] is None
    assert by[("ftwt", 0.8)]["estimated_reduction"] > by[("ftwt", 0.9)]["estimated_reduction"]


def test_the_figure_is_a_png(swept):
    out, _ = swept
    with Image.open(out / "sweep.png") as im:
        assert im.format == "PNG" and im.size[0] > 600 and im.size[1] > 300


def test_a_second_run_skips_finished_runs(swept, dense, monkeypatch):
    out, rows = swept

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(runs, "Trainer", refuse)
    monkeypatch.setattr(runs.Harness, "static", refuse)
    again = run_sweep(_config(dense, out, latency=False))
    assert [r["top1"] for r in again] == [r["top1"] for r in rows]


def test_a_half_finished_run_resumes_from_last_pt(swept, dense, monkeypatch):
    out, rows = swept
    run_dir = out / "runs" / "ftwt-r0.9"
    (run_dir / "row.json").unlink()  # as if killed after its last checkpoint
    resumed = []
    original = runs.Trainer.resume

    def resume(path, *args, **kwargs):
        resumed.append(path)
        return original(path, *args, **kwargs)

    monkeypatch.setattr(runs.Trainer, "resume", staticmethod(resume))
    again = run_sweep(_config(dense, out, latency=False))
    assert resumed == [str(run_dir / "last.pt")]
    assert json.loads((run_dir / "row.json").read_text())["top1"] == rows[4]["top1"]
    assert again[4]["top1"] == rows[4]["top1"]


def test_a_folder_holding_another_sweep_is_refused(swept, dense):
    out, _ = swept
    with pytest.raises(ConfigError, match="other epochs"):
        run_sweep(_config(dense, out, epochs=2))


def test_bad_settings_are_one_line(tmp_path, dense, capsys):
    with pytest.raises(ConfigError, match="unknown methods"):
        _config(dense, tmp_path, methods=("ftwt", "magic"))
    with pytest.raises(ConfigError, match="masses"):
        _config(dense, tmp_path, masses=(0.8, 1.5))
    assert main(["sweep", "--model", "resnet20", "--init", str(tmp_path / "none.pt"), "--out", str(tmp_path)]) == 2
    assert "dense checkpoint not found" in capsys.readouterr().err
