"""Static pruning yardstick, ``benchmark()``, ``ftwt bench`` and the benchmark script."""

import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import input_for, randomize_bn

from ftwt import GateConfig, attach_gates, get_model, mask_source, measure
from ftwt.baselines import prune_to_macs, static_for_reduction, static_pruned
from ftwt.bench import benchmark, tuned
from ftwt.channel_scatter import STATIC_ADAPTERS, scatter_pruner, swap_adapted
from ftwt.checkpoint import save_checkpoint
from ftwt.cli import main
from ftwt.cli.bench import _rows
from ftwt.engine.fold import fold_model
from ftwt.errors import ConfigError
from ftwt.models import SHORTCUTS, OptionAShortcut

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_engine.py"
TIMING_KEYS = ("dense_ms", "masked_ms", "engine_ms", "static_ms")


def _macs(model, x):
    return measure(model, [x[:1]]).dense_macs


@pytest.mark.parametrize("name", ["resnet20", "vgg16_bn", "torchvision:resnet18"])
def test_static_pruned_hits_target(name, caplog):
    model = randomize_bn(get_model(name, num_classes=7)).eval()
    x = input_for(name)
    dense = _macs(model, x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = static_pruned(model, x, 0.45 * dense)
    assert abs(_macs(small, x) - 0.45 * dense) <= 0.02 * 0.45 * dense
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        out = small(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    after = model.state_dict()  # the original is not touched
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert "predicted" not in caplog.text  # the search's MACs formula agrees with the pruned model


@pytest.mark.parametrize("layout", SHORTCUTS)
def test_option_a_scatter_prunes_like_zeroed_channels(layout):
    import torch_pruning as tp
    shortcut = OptionAShortcut(16, 32, stride=2, shortcut=layout)
    x = torch.randn(2, 16, 8, 8)
    scatter = STATIC_ADAPTERS[OptionAShortcut](shortcut, 16)
    assert torch.equal(scatter(x), shortcut(x))
    pruner = scatter_pruner(tp)
    pruner.prune_in_channels(scatter, [1, 3])
    pruner.prune_out_channels(scatter, [0, 9, 20])
    # Pruned inputs are channels that no longer exist: as if they were zero, then the output is cut.
    zeroed = x.clone()
    zeroed[:, [1, 3]] = 0
    keep_in = [c for c in range(16) if c not in (1, 3)]
    keep_out = [c for c in range(32) if c not in (0, 9, 20)]
    assert torch.equal(scatter(x[:, keep_in]), shortcut(zeroed)[:, keep_out])


@pytest.mark.parametrize("layout", SHORTCUTS)
def test_option_a_shortcut_pruned_consistently(layout):
    # A 30% cut leaves the stage widths at odd ratios, so the shortcut is no longer a symmetric pad.
    model = randomize_bn(get_model("resnet20", shortcut=layout)).eval()
    x = input_for("resnet20")
    adapted = copy.deepcopy(model)
    swap_adapted(adapted, x)
    assert not any(isinstance(m, OptionAShortcut) for m in adapted.modules())
    with torch.no_grad():
        torch.testing.assert_close(adapted(x), model(x))  # the adapter keeps the layout
    res = static_for_reduction(model, x, 0.3)
    assert res.ratio > 0 and abs(res.reduction - 0.3) < 0.01 and abs(res.relative_error) < 0.02
    widths = {m.out_channels for m in res.model.modules() if isinstance(m, torch.nn.Conv2d)}
    assert max(widths) < 64
    assert res.model(x).shape == (2, 10)


def test_static_target_above_dense_is_an_unpruned_copy():
    model = get_model("resnet20").eval()
    x = input_for("resnet20")
    res = prune_to_macs(model, x, 2 * _macs(model, x))
    assert res.model is not model and res.ratio == 0.0 and res.macs == res.dense_macs
    with torch.no_grad():
        assert torch.equal(res.model(x), model(x))


def test_static_unreachable_target_and_missing_library(monkeypatch):
    model = get_model("resnet20").eval()
    x = input_for("resnet20")
    with pytest.raises(ConfigError, match="below what uniform pruning reaches"):
        prune_to_macs(model, x, 1000.0)
    with pytest.raises(ConfigError, match="importance"):
        prune_to_macs(model, x, 1e7, importance="taylor")
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # import now raises ImportError
    with pytest.raises(ConfigError, match="pip install torch-pruning"):
        static_pruned(model, x, 1e7)


def test_benchmark_perfect_gates_resnet20():
    model = attach_gates(randomize_bn(get_model("resnet20")), GateConfig(threshold=0.85))
    x = input_for("resnet20", n=4)
    res = benchmark(model, x, masks="ground_truth", threads=1, min_run_time=0.02, warmup=1)
    for key in (*TIMING_KEYS, "ideal_speedup", "speedup", "static_speedup", "engine_vs_static",
                "realized_fraction", "dense_macs", "dynamic_macs", "static_macs"):
        assert res[key] > 0, key
    with mask_source(model, "ground_truth"):
        flops = measure(model, [x])
    assert res["ideal_speedup"] == pytest.approx(flops.dense_macs / flops.dynamic_macs, rel=1e-6)
    assert res["flops_reduction"] == pytest.approx(flops.reduction, rel=1e-6)
    assert res["speedup"] == pytest.approx(res["dense_ms"] / res["engine_ms"])
    assert res["realized_fraction"] == pytest.approx(res["speedup"] / res["ideal_speedup"])
    assert res["engine_vs_static"] == pytest.approx(res["engine_ms"] / res["static_ms"])
    assert abs(res["static_macs"] - res["dynamic_macs"]) <= 0.02 * res["dynamic_macs"]
    assert res["engine_rel_diff"] < 1e-4  # the engine computes what the masked model does
    assert (res["threads"], res["batch_size"], res["samples"], res["device"]) == (1, 1, 4, "cpu")
    assert res["machine"]["torch"] == torch.__version__ and res["machine"]["cpu"]
    assert model.training  # left as it was
    assert res["dense_tricks"].startswith("BN folded") and res["static_tricks"].startswith("BN folded")


def test_tuned_baseline_folds_batchnorm_and_keeps_outputs():
    model = randomize_bn(get_model("resnet20")).eval()
    x = input_for("resnet20", n=2)
    fast, tricks = tuned(model, x[:1], threads=1)
    assert tricks in ("BN folded (19), NCHW", "BN folded (19), channels-last")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the original is untouched


def test_fold_model_folds_untraceable_models_and_refuses_shared_conv_outputs():
    class Branchy(torch.nn.Module):
        def __init__(self, share: bool):
            super().__init__()
            self.conv, self.bn, self.share = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), share

        def forward(self, x):
            c = self.conv(x)
            y = self.bn(c)
            y = y if float(y.sum()) > 0 else -y  # data-dependent control flow: fx cannot trace it
            return y + c if self.share else y  # the conv's output read past its BatchNorm too

    x = torch.randn(1, 3, 8, 8)
    for share, expected in ((False, 1), (True, 0)):
        model = randomize_bn(Branchy(share)).eval()
        folded, count = fold_model(model, x)
        assert count == expected
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules()) == (expected == 0)
        with torch.no_grad():
            torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)


def test_benchmark_needs_gates():
    with pytest.raises(ConfigError, match="gated model"):
        benchmark(get_model("resnet20"), input_for("resnet20"))


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_bench_cuda_without_gpu_is_one_line(capsys):
    code, out, err = run(capsys, "bench", "--model", "resnet20", "--mass", "0.9", "--device", "cuda")
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "CUDA is not available" in lines[0]


@pytest.mark.parametrize("argv", [
    ["bench", "--mass", "0.9"],
    ["bench", "--checkpoint", "c.pt", "--model", "resnet20", "--mass", "0.9"],
])
def test_bench_needs_exactly_one_source(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "--checkpoint" in capsys.readouterr().err


def test_bench_model_needs_mass(capsys):
    code, _, err = run(capsys, "bench", "--model", "resnet20")
    assert code == 2 and "--mass" in err


def _gated_checkpoint(path):
    config = GateConfig(threshold=0.9)
    model = attach_gates(get_model("resnet20"), config)
    save_checkpoint({"model_name": "resnet20", "num_classes": 10, "gate_config": config.to_dict(),
                     "model": model.state_dict(), "dataset": "digits", "input_size": [3, 16, 16]}, path)


def test_bench_checkpoint_json(capsys, tmp_path):
    ckpt = tmp_path / "gated.pt"
    _gated_checkpoint(ckpt)
    code, out, _ = run(capsys, "bench", "--checkpoint", str(ckpt), "--samples", "2", "--threads", "1",
                       "--min-run-time", "0.02", "--kernel", "torch", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["model"] == "resnet20" and data["masks"] == "gate" and data["dataset"] == "digits"
    assert data["engine_kernels"] == "torch"
    assert all(data[k] > 0 for k in (*TIMING_KEYS, "ideal_speedup", "speedup"))
    assert data["engine_rel_diff"] < 1e-4

    rows = dict(_rows(data))  # the table printed without --json
    for key in ("dense_ms", "masked_ms", "engine_ms", "static_ms", "ideal_speedup", "speedup"):
        assert float(rows[key].split()[0].rstrip("x")) == pytest.approx(data[key], abs=0.006), key


def test_bench_script_quick(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_engine", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out_file = tmp_path / "table.md"
    args = script.get_args_parser().parse_args(["--quick", "--models", "resnet20", "--out", str(out_file)])
    assert script.main(args) == 0
    table = out_file.read_text()
    assert capsys.readouterr().out == table
    lines = table.splitlines()
    assert lines[0].startswith("Machine: ") and "torch " in lines[0] and "threads 1" in lines[0]
    assert "| engine ms |" in lines[2] and "| engine/static |" in lines[2]
    rows = [line for line in lines[4:] if line.startswith("| resnet20 |")]
    assert len(rows) == 1 and len(rows[0].strip("|").split("|")) == len(script.COLUMNS)
