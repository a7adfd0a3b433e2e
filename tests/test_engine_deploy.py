"""Deployment: engine files that load without the model's code, checked exports, load_model from a checkpoint."""

import json
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import input_for, randomize_bn
from torch import nn

import ftwt
from ftwt import CheckpointError, ConfigError, GateConfig, SparseEngine, UnsupportedLayerError, attach_gates, get_model
from ftwt.checkpoint import save_checkpoint
from ftwt.cli import main
from ftwt.engine import _artefact
from ftwt.export import export_model

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = ftwt.list_models() + ["torchvision:resnet18", "torchvision:mobilenet_v2"]
FAST_EXPORTS = ("resnet20",)  # an export takes 10-40 s here: the others are marked slow


def _gated(name: str, threshold: float = 0.9) -> nn.Module:
    # An odd class count catches heads rebuilt with a hard-coded width.
    return attach_gates(randomize_bn(get_model(name, num_classes=7)), GateConfig(threshold=threshold)).eval()


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).abs().max()) / max(float(ref.abs().max()), 1e-12)


@pytest.mark.parametrize("name", MODELS)
def test_engine_save_load_round_trip(name, tmp_path):
    model, x = _gated(name), input_for(name, 2)
    engine = SparseEngine(model, example=x[:1])
    path = tmp_path / "engine.safetensors"
    engine.save(path)
    loaded = SparseEngine.load(path)
    assert loaded.choices == engine.choices and "pending" not in loaded.choices.values()
    assert loaded.unit_names == engine.unit_names
    with torch.no_grad():
        assert _rel(loaded(x), engine(x)) <= 1e-5
        assert _rel(loaded(x), model(x)) <= 1e-4
    assert set(SparseEngine.load(path, recalibrate=True).choices.values()) == {"pending"}


class _Net(nn.Module):
    """A model class the loading process never imports."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.branch(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_engine_loads_in_a_fresh_process_without_the_model_class(tmp_path):
    model = attach_gates(randomize_bn(_Net()), GateConfig(threshold=0.8)).eval()
    x = torch.randn(3, 3, 12, 12)
    SparseEngine(model, kernel="torch").save(tmp_path / "engine.safetensors")
    with torch.no_grad():
        torch.save({"x": x, "ref": model(x)}, tmp_path / "io.pt")
    script = (
        "import sys, torch, ftwt\n"
        "engine = ftwt.SparseEngine.load(sys.argv[1])\n"
        "io = torch.load(sys.argv[2], weights_only=True)\n"
        "assert not any('test_engine_deploy' in m for m in sys.modules)\n"
        "diff = (engine(io['x']) - io['ref']).abs().max() / io['ref'].abs().max()\n"
        "print(float(diff))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "engine.safetensors"), str(tmp_path / "io.pt")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip().splitlines()[-1]) <= 1e-5


def _saved(tmp_path) -> tuple:
    from safetensors import safe_open

    path = tmp_path / "engine.safetensors"
    SparseEngine(_gated("resnet20"), kernel="torch").save(path)
    with safe_open(str(path), framework="pt") as f:
        return path, f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def _refused(path, match: str) -> None:
    with pytest.raises(CheckpointError, match=match) as info:
        SparseEngine.load(path)
    assert "\n" not in str(info.value)


def test_tampered_damaged_or_foreign_engine_files_are_refused_with_one_line(tmp_path):
    from safetensors.torch import save_file

    path, meta, tensors = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40  # one weight changed
    (tmp_path / "weight.safetensors").write_bytes(bytes(data))
    _refused(tmp_path / "weight.safetensors", "modified or damaged")
    spec = json.loads(meta["ftwt_engine"])
    spec["engine"]["round_to"] = 4  # the settings edited, the checksum left
    save_file(tensors, str(tmp_path / "meta.safetensors"), {**meta, "ftwt_engine": json.dumps(spec)})
    _refused(tmp_path / "meta.safetensors", "modified or damaged")
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[:100])
    _refused(tmp_path / "cut.safetensors", "not a readable engine file")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    _refused(tmp_path / "plain.safetensors", "not an ftwt engine")
    _refused(tmp_path / "missing.safetensors", "not found")


@pytest.mark.parametrize("target", ["torch.load", "builtins.eval", "os.system", "torch._C._get_tracing_state"])
def test_a_forged_graph_cannot_call_outside_the_allow_list(tmp_path, target):
    from safetensors.torch import save_file

    path, meta, tensors = _saved(tmp_path)
    spec = json.loads(meta["ftwt_engine"])
    node = next(n for n in spec["graph"] if n["op"] == "call_function")
    node["target"] = target
    text = json.dumps(spec)  # a forger can recompute the checksum; the allow-list still holds
    save_file(tensors, str(path), {**meta, "ftwt_engine": text, "ftwt_sha256": _artefact._digest(text, tensors)})
    _refused(path, "does not allow")


@torch.fx.wrap
def _scale(x: torch.Tensor) -> torch.Tensor:
    return x * 2


class _Wrapped(_Net):
    def forward(self, x):
        return _scale(super().forward(x))


def test_saving_a_model_whose_code_is_needed_is_refused(tmp_path):
    model = attach_gates(_Wrapped()).eval()
    engine = SparseEngine(model, kernel="torch")
    with pytest.raises(UnsupportedLayerError, match="_scale"):
        engine.save(tmp_path / "engine.safetensors")
    assert not (tmp_path / "engine.safetensors").exists()


def _checkpoint(path, name="resnet20") -> nn.Module:
    config = GateConfig(threshold=0.9)
    model = attach_gates(randomize_bn(get_model(name, num_classes=10)), config).eval()
    save_checkpoint({"model_name": name, "num_classes": 10, "gate_config": config.to_dict(),
                     "model": model.state_dict(), "dataset": "digits", "input_size": [3, 16, 16]}, path)
    return model


def test_load_model_rebuilds_a_gated_model_from_a_training_checkpoint(tmp_path):
    original = _checkpoint(tmp_path / "best.pt")
    model = ftwt.load_model(tmp_path / "best.pt")
    assert ftwt.is_gated(model) and not model.training
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), original(x))
    # The other forms keep their meaning.
    assert not ftwt.is_gated(ftwt.load_model("resnet20", 10))
    assert ftwt.is_gated(ftwt.load_model(tmp_path / "best.pt", model=get_model("resnet20", num_classes=10)))
    with pytest.raises(ConfigError, match="not found"):
        ftwt.load_model(tmp_path / "nope.pt")
    with pytest.raises(ConfigError, match="num_classes"):
        ftwt.load_model("resnet20")


@pytest.mark.parametrize("name", [n if n in FAST_EXPORTS else pytest.param(n, marks=pytest.mark.slow) for n in MODELS])
def test_torch_export_round_trip(name, tmp_path):
    model, x = _gated(name), input_for(name, 2)
    result = export_model(model, x, tmp_path / "model.pt2", fmt="torch")
    assert result["checked_with"] == "torch.export.load" and result["max_rel_diff"] <= 1e-5
    program = torch.export.load(str(tmp_path / "model.pt2")).module()
    x3 = input_for(name, 3)  # another batch size: the batch stays dynamic
    with torch.no_grad():
        assert _rel(program(x3), model(x3)) <= 1e-5


@pytest.mark.parametrize("name", ["resnet20", pytest.param("torchvision:resnet18", marks=pytest.mark.slow)])
def test_onnx_export_runs_in_onnx_runtime(name, tmp_path):
    pytest.importorskip("onnxscript", reason="ONNX export needs ftwt[onnx]")
    pytest.importorskip("onnxruntime", reason="the ONNX check needs ftwt[onnx]")
    model, x = _gated(name), input_for(name, 2)
    result = export_model(model, x, tmp_path / "model.onnx", fmt="onnx")
    assert result["checked_with"] == "onnxruntime" and result["max_rel_diff"] <= 1e-5


def test_export_refuses_a_wrong_format_or_suffix(tmp_path):
    model, x = _gated("resnet20"), input_for("resnet20", 1)
    with pytest.raises(ConfigError, match="format"):
        export_model(model, x, tmp_path / "m.tflite", fmt="tflite")
    with pytest.raises(ConfigError, match=".pt2"):
        export_model(model, x, tmp_path / "m.pt", fmt="torch")


def test_cli_export_engine_and_errors(tmp_path, capsys):
    original = _checkpoint(tmp_path / "best.pt")
    out = tmp_path / "engine.safetensors"
    code = main(["export", "--checkpoint", str(tmp_path / "best.pt"), "--format", "engine", "--out", str(out),
                 "--json"])
    printed, _ = capsys.readouterr()
    assert code == 0 and json.loads(printed)["max_rel_diff"] <= 1e-5
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert _rel(SparseEngine.load(out)(x), original(x)) <= 1e-4
    code = main(["export", "--checkpoint", str(tmp_path / "best.pt"), "--format", "torch", "--out", str(out)])
    _, err = capsys.readouterr()
    assert code == 2 and ".pt2" in err and len(err.strip().splitlines()) == 1


def test_an_engine_pickles_as_its_engine_file():
    model, x = _gated("resnet20"), input_for("resnet20", 2)
    engine = SparseEngine(model, example=x[:1])
    copy = pickle.loads(pickle.dumps(engine))
    assert copy.choices == engine.choices
    with torch.no_grad():
        assert _rel(copy(x), engine(x)) <= 1e-5


def test_saved_choices_are_timed_again_on_another_cpu(tmp_path, monkeypatch):
    model, x = _gated("resnet20"), input_for("resnet20", 1)
    SparseEngine(model, example=x).save(tmp_path / "engine.safetensors")
    monkeypatch.setattr(_artefact, "cpu_name", lambda: "another CPU")
    assert set(SparseEngine.load(tmp_path / "engine.safetensors").choices.values()) == {"pending"}
