"""Your own model and data through Trainer, load_model and the command line."""

import json

import pytest
import torch
from tests_pkg.mod import TinyNet, factory
from torch.utils.data import DataLoader, TensorDataset

from ftwt import ConfigError, gated_units, get_model, is_gated
from ftwt.cli import main
from ftwt.train import Checkpoint, TrainConfig, Trainer, load_model


def _data(n: int = 32, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 3, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One epoch of FTWT on a custom model and TensorDatasets, on CPU."""
    out = tmp_path_factory.mktemp("own") / "run"
    cfg = TrainConfig(epochs=1, batch_size=64, workers=0, device="cpu", progress=False, out_dir=str(out),
                      estimate_samples=16, flops_every=1)
    report = Trainer(cfg, model=TinyNet(), train_data=DataLoader(_data(), batch_size=8), val_data=_data(16, 1)).fit()
    return out, report


def test_trainer_takes_a_custom_model_and_data(run):
    out, report = run
    assert report["dataset"] == "custom" and report["samples"] == 16
    ckpt = Checkpoint.load(out / "last.pt")
    assert ckpt.model_name == "tests_pkg.mod:TinyNet" and ckpt.gated and ckpt.input_size == [3, 16, 16]
    assert ckpt.config["batch_size"] == 8  # the DataLoader's
    # gates on the stem, the depthwise and the pointwise convolution (the add is no obstacle)
    assert len(gated_units(ckpt.build_model())) >= 2


def test_load_model_into_the_users_model(run):
    out, _ = run
    net = load_model(out / "best.pt", model=TinyNet())
    assert is_gated(net)
    ckpt = Checkpoint.load(out / "best.pt")
    assert all(torch.equal(net.state_dict()[k], v) for k, v in ckpt.model.items())
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(net.eval()(x), ckpt.build_model().eval()(x))  # the class path rebuilds it too
    # the name form still works
    assert load_model("resnet20", 10).fc.out_features == 10
    with pytest.raises(ConfigError, match="num_classes"):
        load_model("resnet20")


def test_eval_with_an_import_path(run, capsys):
    out, _ = run
    capsys.readouterr()
    rc = main(["eval", "--checkpoint", str(out / "best.pt"), "--model", "tests_pkg.mod:factory", "--dataset",
               "digits", "--max-batches", "1", "--device", "cpu", "--json"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert report["samples"] > 0 and 0 <= report["top1"] <= 100 and "per_layer" in report
    assert (out / "eval_best" / "report.json").is_file()
    # trained on custom data: eval says what to pass instead of failing on the name
    assert main(["eval", "--checkpoint", str(out / "best.pt")]) == 2
    assert "--dataset" in capsys.readouterr().err


def test_import_path_models(capsys):
    assert isinstance(get_model("tests_pkg.mod:factory", num_classes=3), TinyNet)
    assert get_model("tests_pkg.mod:TinyNet", num_classes=4).head.out_features == 4
    assert factory().head.out_features == 10
    for bad, words in [("tests_pkg.nope:factory", "cannot import"), ("tests_pkg.mod:nope", "has no")]:
        assert main(["flops", "--model", bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0]
    assert main(["flops", "--model", "tests_pkg.mod:factory", "--input-size", "3", "16", "16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dense_macs"] > 0


def test_readme_own_project_section(tmp_path, monkeypatch, capsys):
    import re
    import sys
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Use ftwt in your own project", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 3 and "Trainer(cfg, model=MyNet()" in blocks[1] and "calibrate_decisions" in blocks[2]
    for block in blocks:
        compile(block, "README.md", "exec")
    (tmp_path / "mynet.py").write_text(blocks[0])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert "ftwt flops --model mynet:MyNet --per-layer" in section
    assert main(["flops", "--model", "mynet:MyNet", "--per-layer"]) == 0  # the folder it runs in is importable
    assert "dw.0" in capsys.readouterr().out


def test_resume_a_run_on_the_users_model_and_data(run, tmp_path):
    out, _ = run
    resumed = tmp_path / "run"
    resumed.mkdir()
    (resumed / "last.pt").write_bytes((out / "last.pt").read_bytes())
    trainer = Trainer.resume(str(resumed / "last.pt"), {"epochs": 2, "out_dir": str(resumed)}, model=TinyNet(),
                             train_data=DataLoader(_data(), batch_size=8), val_data=_data(16, 1))
    first = Checkpoint.load(out / "last.pt")
    assert all(torch.equal(trainer.model.state_dict()[k], v) for k, v in first.model.items())
    report = trainer.fit()
    assert report["epochs"] == 2 and report["dataset"] == "custom"
    assert Checkpoint.load(resumed / "last.pt").epoch == 2
