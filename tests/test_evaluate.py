"""Tests for ftwt.evaluate, ftwt.plots and ``ftwt eval``: accuracy, FLOPs and gate statistics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ftwt.calibrate import DECISION_RANGE, calibrate_decisions
from ftwt.checkpoint import save_checkpoint
from ftwt.cli import main
from ftwt.data import DataConfig, build_datasets
from ftwt.errors import DataError
from ftwt.estimate import estimate
from ftwt.evaluate import evaluate
from ftwt.flops import measure
from ftwt.gate import GateConfig
from ftwt.models import get_model
from ftwt.plots import plot_accuracy_vs_flops
from ftwt.report import write_report
from ftwt.surgery import attach_gates, gated_units, mask_source, set_decision

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GATED_KEYS = {
    "ground_truth_reduction", "gate_accuracy", "gate_precision", "gate_recall", "varying_fraction",
    "always_on_fraction", "always_off_fraction", "per_layer", "kept", "kept_labels",
}
BASE_KEYS = {
    "top1", "top5", "loss", "samples", "dense_macs", "dynamic_macs", "flops_reduction", "reference_macs",
    "reference_reduction", "gate_macs", "per_sample_macs",
}


@pytest.fixture(scope="module")
def val_loader() -> DataLoader:
    _, val, _ = build_datasets(DataConfig(val_subset=48))
    return DataLoader(val, batch_size=16, shuffle=False)


def _gated(seed: int = 0, **gate: object) -> nn.Module:
    torch.manual_seed(seed)
    # softmax off: the digits' three identical channels would otherwise give the first gate
    # the same input for every image
    config = GateConfig(threshold=0.8, softmax=False, **gate)
    return attach_gates(get_model("resnet20", num_classes=10), config).eval()


def _force_gates(model: nn.Module, bias: float, weight_std: float = 0.0) -> None:
    with torch.no_grad():
        for unit in gated_units(model):
            unit.gate.fc.weight.normal_(0.0, weight_std) if weight_std else unit.gate.fc.weight.zero_()
            unit.gate.fc.bias.fill_(bias)


def _collect(model: nn.Module, loader: DataLoader) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Predicted masks and labels of every unit over ``loader``, gathered by hand."""
    units = gated_units(model)
    masks: list[list[torch.Tensor]] = [[] for _ in units]
    labels: list[list[torch.Tensor]] = [[] for _ in units]
    with torch.no_grad(), mask_source(model, "gate", labels="always"):
        for x, _ in loader:
            model(x)
            for j, unit in enumerate(units):
                masks[j].append(unit.mask.clone())
                labels[j].append(unit.labels.clone())
    return [torch.cat(m) for m in masks], [torch.cat(lab) for lab in labels]


# Accuracy --------------------------------------------------------------------------------
class _Logits(nn.Module):
    """Returns its input as the logits (through an identity linear layer, so FLOPs are counted)."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(classes, classes, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_top1_top5_on_known_logits() -> None:
    logits = torch.tensor([
        [9.0, 8, 7, 6, 5, 4, 3],  # target 0: rank 1 -> top-1 and top-5
        [9.0, 8, 7, 6, 5, 4, 3],  # target 3: rank 4 -> top-5 only
        [9.0, 8, 7, 6, 5, 4, 3],  # target 6: rank 7 -> neither
    ])
    targets = torch.tensor([0, 3, 6])
    loader = DataLoader(TensorDataset(logits, targets), batch_size=2)
    report = evaluate(_Logits(7), loader, "cpu")
    assert report["samples"] == 3
    assert report["top1"] == pytest.approx(100 / 3)
    assert report["top5"] == pytest.approx(200 / 3)
    assert report["loss"] == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-6)
    assert report["dense_macs"] == report["dynamic_macs"] == 49
    assert not GATED_KEYS & set(report)


def test_top5_with_fewer_than_five_classes() -> None:
    logits = torch.tensor([[3.0, 2, 1], [3.0, 2, 1]])
    loader = DataLoader(TensorDataset(logits, torch.tensor([2, 1])), batch_size=2)
    report = evaluate(_Logits(3), loader, "cpu")
    assert (report["top1"], report["top5"]) == (0.0, 100.0)  # top-3 holds every class


def test_max_batches_and_empty_loader() -> None:
    model = _Logits(3)
    loader = DataLoader(TensorDataset(torch.randn(10, 3), torch.zeros(10, dtype=torch.long)), batch_size=4)
    assert evaluate(model, loader, "cpu", max_batches=2)["samples"] == 8
    with pytest.raises(DataError, match="no samples"):
        evaluate(model, loader, "cpu", max_batches=0)


# Dense model -----------------------------------------------------------------------------
def test_dense_report(val_loader: DataLoader) -> None:
    torch.manual_seed(0)
    model = get_model("resnet20", num_classes=10).train()
    report = evaluate(model, val_loader, "cpu")
    assert model.training  # mode restored
    assert set(report) == BASE_KEYS
    assert report["samples"] == 48
    assert report["gate_macs"] == 0 and report["reference_reduction"] == 0
    # no gates: the only savings are input channels that happen to be all zero
    assert 0.0 <= report["flops_reduction"] < 0.1
    expected = measure(model, [x for x, _ in val_loader])
    assert report["flops_reduction"] == pytest.approx(expected.reduction, abs=1e-9)
    ps = report["per_sample_macs"]
    assert ps["mean"] == pytest.approx(report["dynamic_macs"])
    assert ps["min"] <= ps["mean"] <= ps["max"] <= report["dense_macs"]


# Gated model -----------------------------------------------------------------------------
def test_all_kept_gates_are_static(val_loader: DataLoader) -> None:
    model = _gated()
    _force_gates(model, bias=10.0)  # every logit is +10: every filter is kept
    report = evaluate(model, val_loader, "cpu")
    assert BASE_KEYS | GATED_KEYS <= set(report)
    assert report["kept"] == 1.0
    assert report["varying_fraction"] == 0.0  # static: the same decision for every input
    assert report["always_on_fraction"] == 1.0 and report["always_off_fraction"] == 0.0
    assert report["gate_recall"] == 1.0
    # with everything kept, the labels are those of the dense forward: count them by hand
    with torch.no_grad(), mask_source(model, "none", labels="always"):
        keeps, total = [], []
        for x, _ in val_loader:
            model(x)
            keeps.append(torch.tensor([u.labels.sum().item() for u in gated_units(model)]))
            total.append(torch.tensor([u.labels.numel() for u in gated_units(model)]))
    keeps, total = torch.stack(keeps).sum(0).double(), torch.stack(total).sum(0).double()
    rate = (keeps.sum() / total.sum()).item()
    assert report["gate_precision"] == pytest.approx(rate)
    assert report["gate_accuracy"] == pytest.approx(rate)
    assert report["kept_labels"] == pytest.approx(rate)
    for layer, k, t in zip(report["per_layer"], keeps, total, strict=True):
        assert layer["kept"] == 1.0 and layer["varying_fraction"] == 0.0
        assert layer["precision"] == pytest.approx((k / t).item()) and layer["recall"] == 1.0
    # gates prune nothing here, so their own cost is all that differs from the ungated model
    with mask_source(model, "none"):
        ungated = measure(model, [x for x, _ in val_loader])
    assert report["gate_macs"] > 0
    assert report["dynamic_macs"] == pytest.approx(ungated.dynamic_macs + report["gate_macs"])


def test_varying_gates_match_hand_counts(val_loader: DataLoader) -> None:
    model = _gated(seed=1)
    _force_gates(model, bias=0.0, weight_std=3.0)
    report = evaluate(model, val_loader, "cpu")
    masks, labels = _collect(model, val_loader)
    assert report["varying_fraction"] > 0
    on = torch.cat([m.sum(0) for m in masks])
    n = masks[0].shape[0]
    assert report["varying_fraction"] == pytest.approx(((on > 0) & (on < n)).double().mean().item())
    assert report["always_off_fraction"] == pytest.approx((on == 0).double().mean().item())
    m, lab = torch.cat([x.flatten() for x in masks]), torch.cat([x.flatten() for x in labels])
    tp, fp, fn = (m & lab).sum().item(), (m & ~lab).sum().item(), (~m & lab).sum().item()
    assert report["gate_accuracy"] == pytest.approx((m == lab).double().mean().item())
    assert report["gate_precision"] == pytest.approx(tp / (tp + fp))
    assert report["gate_recall"] == pytest.approx(tp / (tp + fn))
    for layer, mask in zip(report["per_layer"], masks, strict=True):
        assert 0.0 <= layer["kept"] <= 1.0 and 0.0 <= layer["kept_ground_truth"] <= 1.0
        assert layer["kept"] == pytest.approx(mask.double().mean().item())


def test_ground_truth_reduction_equals_estimate(val_loader: DataLoader) -> None:
    model = _gated(seed=2)
    report = evaluate(model, val_loader, "cpu")
    est = estimate(model, (x for x, _ in val_loader), threshold=0.8)
    assert report["ground_truth_reduction"] == pytest.approx(est.reduction, abs=1e-9)
    kept_gt = [layer["kept_ground_truth"] for layer in report["per_layer"]]
    est_kept = [layer["kept"] for layer in est.to_dict()["per_layer"] if layer["name"] in
                {u.name for u in gated_units(model)}]
    assert kept_gt == pytest.approx(est_kept)


def test_without_ground_truth_skips_label_keys(val_loader: DataLoader) -> None:
    model = _gated(seed=1)
    full = evaluate(model, val_loader, "cpu")
    quick = evaluate(model, val_loader, "cpu", ground_truth=False)
    assert not {"ground_truth_reduction", "gate_accuracy", "kept_labels"} & set(quick)
    assert quick["varying_fraction"] == full["varying_fraction"]
    assert quick["flops_reduction"] == pytest.approx(full["flops_reduction"])


def test_wrapped_model_is_unwrapped(val_loader: DataLoader) -> None:
    model = _gated(seed=1)
    wrapped = evaluate(nn.DataParallel(model), val_loader, "cpu", max_batches=1)
    assert wrapped == evaluate(model, val_loader, "cpu", max_batches=1)
    assert "per_layer" in wrapped


# Calibration -----------------------------------------------------------------------------
def test_calibrate_matches_label_keep_rate(val_loader: DataLoader) -> None:
    model = _gated(seed=3)
    _force_gates(model, bias=1.0, weight_std=3.0)  # leaning to "keep", like BCE-trained gates
    before = evaluate(model, val_loader, "cpu")
    decisions = calibrate_decisions(model, val_loader, "cpu")
    assert decisions == [u.decision for u in gated_units(model)]
    assert all(DECISION_RANGE[0] <= d <= DECISION_RANGE[1] for d in decisions)
    after = evaluate(model, val_loader, "cpu")
    gap_before = max(abs(lay["kept"] - lay["kept_labels"]) for lay in before["per_layer"])
    for layer in after["per_layer"]:
        assert layer["kept"] == pytest.approx(layer["kept_labels"], abs=0.04), layer["name"]
    assert gap_before > 0.1
    assert abs(after["kept"] - after["kept_labels"]) < 0.01


def test_calibrate_clamps_thresholds(val_loader: DataLoader) -> None:
    model = _gated()
    _force_gates(model, bias=10.0)  # sigmoid ~1 everywhere: no threshold inside the range can cut
    decisions = calibrate_decisions(model, val_loader, "cpu", max_batches=1, rounds=1)
    assert decisions == [DECISION_RANGE[1]] * len(decisions)


# Distributed -----------------------------------------------------------------------------
def test_distributed_single_process_matches(val_loader: DataLoader, tmp_path: Path) -> None:
    model = _gated(seed=1)
    _force_gates(model, bias=0.5, weight_std=3.0)
    plain = evaluate(model, val_loader, "cpu", max_batches=2)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        shared = evaluate(model, val_loader, "cpu", distributed=True, max_batches=2)
        d_shared = calibrate_decisions(model, val_loader, "cpu", max_batches=1, distributed=True, rounds=1)
    finally:
        dist.destroy_process_group()
    set_decision(model, 0.5)
    d_plain = calibrate_decisions(model, val_loader, "cpu", max_batches=1, rounds=1)
    assert d_shared == pytest.approx(d_plain)
    assert shared.keys() == plain.keys()
    for key, value in plain.items():
        if key == "per_layer":
            for a, b in zip(value, shared[key], strict=True):
                assert a == pytest.approx(b)
        elif isinstance(value, dict):
            assert shared[key] == pytest.approx(value)
        else:
            assert shared[key] == pytest.approx(value), key


# Report files ----------------------------------------------------------------------------
def test_write_report_gated_and_dense(val_loader: DataLoader, tmp_path: Path) -> None:
    report = evaluate(_gated(), val_loader, "cpu", max_batches=1)
    written = write_report(report, tmp_path / "new" / "dir")
    assert [p.name for p in written] == ["report.json", "per_layer.png"]
    data = json.loads((tmp_path / "new" / "dir" / "report.json").read_text())
    assert data["top1"] == pytest.approx(report["top1"]) and len(data["per_layer"]) == len(report["per_layer"])
    assert (tmp_path / "new" / "dir" / "per_layer.png").read_bytes()[:8] == PNG_MAGIC
    dense = evaluate(_Logits(3), DataLoader(TensorDataset(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))), "cpu")
    assert [p.name for p in write_report(dense, tmp_path / "dense")] == ["report.json"]
    assert not list(tmp_path.rglob("*.tmp"))  # temporary files were renamed into place


def test_plot_accuracy_vs_flops(tmp_path: Path) -> None:
    points = [
        {"label": "dense", "top1": 93.7, "flops_reduction": 0.0, "kind": "dense"},
        {"label": "r=0.8", "top1": 92.6, "flops_reduction": 0.66},
        {"label": "static", "top1": 93.9, "flops_reduction": 0.53, "kind": "static"},
        {"label": "est r=0.8", "top1": None, "flops_reduction": 0.7, "kind": "estimate"},
    ]
    path = plot_accuracy_vs_flops(points, tmp_path / "acc.png", title="ResNet-56")
    assert path.read_bytes()[:8] == PNG_MAGIC


# CLI -------------------------------------------------------------------------------------
def _checkpoint(path: Path, gated: bool = True) -> Path:
    torch.manual_seed(0)
    model = get_model("resnet20", num_classes=10)
    config = GateConfig(threshold=0.8)
    if gated:
        attach_gates(model, config)
    save_checkpoint({
        "model_name": "resnet20", "num_classes": 10, "gate_config": config.to_dict() if gated else None,
        "model": model.state_dict(), "dataset": "digits", "input_size": [3, 16, 16],
    }, path)
    return path


def test_cli_eval_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _checkpoint(tmp_path / "run" / "last.pt")
    rc = main(["eval", "--checkpoint", str(ckpt), "--max-batches", "1", "--batch-size", "16", "--device", "cpu",
               "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert BASE_KEYS | GATED_KEYS <= set(out)
    assert (out["model"], out["dataset"], out["samples"]) == ("resnet20", "digits", 16)
    # its own folder: a training run's report.json and per_layer.png next to the checkpoint stay
    assert json.loads((tmp_path / "run" / "eval_last" / "report.json").read_text())["samples"] == 16
    assert (tmp_path / "run" / "eval_last" / "per_layer.png").is_file()
    assert not (tmp_path / "run" / "report.json").exists()
    assert all(math.isfinite(out[k]) for k in ("top1", "flops_reduction", "varying_fraction"))


def test_cli_eval_table_dense(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _checkpoint(tmp_path / "dense.pt", gated=False)
    rc = main(["eval", "--checkpoint", str(ckpt), "--max-batches", "1", "--device", "cpu", "--out",
               str(tmp_path / "out")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "top-1" in text and "FLOPs reduction" in text and "dense" in text
    assert (tmp_path / "out" / "report.json").is_file()


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize("kind", ["missing", "corrupt", "plain_weights", "malicious"])
def test_cli_eval_bad_checkpoint(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.pt"
    if kind == "corrupt":
        path.write_bytes(b"not a checkpoint at all")
    elif kind == "plain_weights":
        save_checkpoint(get_model("resnet20", num_classes=10).state_dict(), path)
    elif kind == "malicious":
        torch.save({"model": _Evil()}, path)
    rc = main(["eval", "--checkpoint", str(path), "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.out == "" and "pwned" not in captured.err
    assert len(captured.err.strip().splitlines()) == 1 and "ftwt eval: error:" in captured.err


def test_a_mask_rule_is_evaluated_as_applied(val_loader: DataLoader) -> None:
    # Every unit keeps only its first filter: the report's MACs and kept share follow the rule.
    model = _gated()

    def first_only(unit, logits, labels):
        mask = torch.zeros_like(logits, dtype=torch.bool)
        mask[:, 0] = True
        return mask

    rule = evaluate(model, val_loader, "cpu", masks=first_only)
    gate = evaluate(model, val_loader, "cpu")
    assert rule["dynamic_macs"] < gate["dynamic_macs"]
    assert rule["varying_fraction"] == 0.0
    assert rule["always_on_fraction"] == pytest.approx(
        len(gated_units(model)) / sum(u.out_channels for u in gated_units(model)))
    with pytest.raises(Exception, match="mask rule"):
        evaluate(model, val_loader, "cpu", masks="labels")
