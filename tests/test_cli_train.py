"""``ftwt train`` and ``ftwt demo`` on the command line: bad input is one line and exit 2."""

from __future__ import annotations

import json

import pytest
import torch

from ftwt.cli import main

TINY = ["--model", "resnet20", "--image-size", "8", "--train-subset", "64", "--val-subset", "32",
        "--batch-size", "16", "--workers", "0", "--no-progress", "--device", "cpu", "--epochs", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished one-epoch dense run whose files must survive every bad command below."""
    out = tmp_path_factory.mktemp("run")
    assert main(["train", *TINY, "--dense", "--out", str(out)]) == 0
    return out


def _fails(capsys, argv: list[str], needle: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err and needle in err, err


def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys, run_dir):
    bad_recipe = tmp_path / "bad.yaml"
    bad_recipe.write_text("model: resnet20\nlearning_rate: 0.1\n")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    fresh = str(tmp_path / "fresh")
    cases = [
        (["--config", str(bad_recipe)], "unknown recipe key"),
        (["--config", "no_such_recipe"], "no recipe"),
        (["--dataset", "mnist"], "unknown dataset"),
        (["--model", "resnet9000"], "unknown model"),
        (["--epochs", "0"], "epochs"),
        (["--epochs", "-3"], "epochs"),
        (["--batch-size", "0"], "batch_size"),
        (["--batch-size", "-8"], "batch_size"),
        (["--dataset", "folder", "--data-dir", str(tmp_path / "missing")], "not found"),
        (["--mass", "1.5"], "threshold"),
        (["--init", str(corrupt)], "corrupt"),
        (["--init", str(run_dir / "last.pt"), "--model", "resnet32"], "does not fit"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "CUDA"))
    for extra, needle in cases:
        _fails(capsys, ["train", *TINY, "--out", fresh, *extra], needle)
    assert not (tmp_path / "fresh").exists()  # nothing was written by a failed start


def test_bad_resume_keeps_the_run(tmp_path, capsys, run_dir):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x80\x02garbage")
    files = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    out = ["--out", str(run_dir)]
    _fails(capsys, ["train", "--resume", str(corrupt), *out], "corrupt")
    _fails(capsys, ["train", "--resume", str(tmp_path / "nope.pt"), *out], "not found")
    _fails(capsys, ["train", "--resume", str(run_dir / "last.pt"), "--model", "resnet32", *out], "resnet20")
    _fails(capsys, ["train", *TINY, "--dense", *out], "already holds a run")  # a fresh start would overwrite it
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == files


def test_resume_extends_a_finished_run(tmp_path, capsys, run_dir):
    out = tmp_path / "copy"
    out.mkdir()
    for p in run_dir.iterdir():
        if p.is_file():
            (out / p.name).write_bytes(p.read_bytes())
    assert main(["train", "--resume", str(out / "last.pt"), "--epochs", "2", "--out", str(out)]) == 0
    assert "top-1" in capsys.readouterr().out
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


def test_demo_writes_report_and_plot(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--dense-epochs", "1", "--ftwt-epochs", "2", "--image-size", "8",
            "--train-subset", "128", "--no-progress"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "dense" in table and "FTWT" in table and "estimate" in table
    report = json.loads((out / "report.json").read_text())
    assert {"dense", "ftwt", "static", "estimated_reduction", "achieved_reduction"} <= set(report)
    # The static yardstick is pruned to the FTWT model's mean MACs.
    assert report["static"]["dense_macs"] == pytest.approx(report["ftwt"]["dynamic_macs"], rel=0.1)
    assert 0 <= report["static"]["top1"] <= 100
    assert (out / "accuracy_vs_flops.png").stat().st_size > 0
    # The recommended mode is the width cascade; its yardstick is pruned to the cascade's mean MACs.
    cascade = report["cascade"]
    assert "cascade (recommended)" in table and "exit lift" in table
    assert report["static_cascade"]["dense_macs"] == pytest.approx(cascade["dynamic_macs"], rel=0.1)
    assert cascade["core_macs"] < cascade["dynamic_macs"] and {"gate_lift", "varying_fraction"} <= set(cascade)
    assert (out / "cascade" / "cascade.pt").is_file()
