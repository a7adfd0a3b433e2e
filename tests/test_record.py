"""Unit state in state_dict, ftwt.record, the shared op table and the checkpoint type."""

import pytest
import torch
from conftest import randomize_bn
from torch import nn

import ftwt
from ftwt import GateConfig, attach_gates, gate_config, gated_units, get_model, record, set_decision, set_threshold
from ftwt.calibrate import fold_decisions
from ftwt.checkpoint import load_state_dict_into
from ftwt.engine import SparseEngine
from ftwt.train import Checkpoint, load_trained

pytestmark = pytest.mark.usefixtures("one_thread")


def _gated(config: GateConfig | None = None) -> nn.Module:
    return attach_gates(randomize_bn(get_model("resnet20")), config or GateConfig(threshold=0.8)).eval()


def test_gate_config_reports_a_changed_criterion():
    model = _gated(GateConfig(criterion="uniform", threshold=0.3, pool=2))
    set_threshold(model, 0.85, "mass")
    config = gate_config(model)
    assert (config.criterion, config.threshold, config.pool) == ("mass", 0.85, 2)
    assert all(u.config.criterion == "uniform" for u in gated_units(model))  # the attach-time config stays


def test_unit_state_survives_a_state_dict_round_trip():
    model = _gated()
    decisions = [0.3 + 0.02 * i for i in range(len(gated_units(model)))]
    set_decision(model, decisions)
    set_threshold(model, 0.3, "uniform")
    fresh = _gated()
    load_state_dict_into(fresh, model.state_dict(), strict=True)
    assert [u.decision for u in gated_units(fresh)] == decisions
    assert all((u.criterion, u.threshold) == ("uniform", 0.3) for u in gated_units(fresh))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), record(model) as a, record(fresh) as b:
        model(x)
        fresh(x)
    assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)


def test_casts_keep_thresholds_exact():
    model = _gated(GateConfig(threshold=0.9, decision=0.7))
    model.half().float()
    assert all(u.threshold == 0.9 and u.decision == 0.7 for u in gated_units(model))
    assert gated_units(model)[0].label_threshold.dtype == torch.float64


def test_record_sets_and_restores_modes_and_reads_the_forward():
    model = _gated()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), record(model, masks="ground_truth") as rec:
        model(x)
        assert rec.masks.keys() == rec.labels.keys() == {u.name for u in gated_units(model)}
        assert all(torch.equal(rec.masks[k], rec.labels[k]) for k in rec.masks)
        shapes = rec.shapes["conv1"]
    assert shapes == ((2, 3, 32, 32), (2, 16, 32, 32))
    assert all(u.masks == "gate" and u.labels_on is None for u in gated_units(model))
    keep_first = lambda unit, logits, labels: torch.arange(unit.out_channels)[None].expand(len(logits), -1) == 0  # noqa: E731
    with torch.no_grad(), record(model, masks=keep_first, labels=False) as rec:
        model(x)
    assert all(m.sum(1).eq(1).all() for m in rec.masks.values()) and not rec.labels
    with pytest.raises(ftwt.ConfigError):
        with record(model, masks="sometimes"):
            pass


def test_fold_decisions_keeps_the_masks():
    model = _gated()
    set_decision(model, [0.2 + 0.03 * i for i in range(len(gated_units(model)))])
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad(), record(model) as rec:
        model(x)
        before = dict(rec.masks)
        fold_decisions(model)
        model(x)
        after = rec.masks
    assert all(u.decision == 0.5 for u in gated_units(model))
    assert all(torch.equal(before[k], after[k]) for k in before)


class _Gelu(nn.Module):
    def __init__(self, norm: type = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 8, 3, padding=1), norm(8), nn.GELU(approximate="tanh")
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.bn(self.conv(x))).mean((2, 3)))


@pytest.mark.parametrize("norm", [nn.BatchNorm2d, nn.SyncBatchNorm])
def test_one_op_table_for_surgery_and_engine(norm):
    model = randomize_bn(_Gelu(norm))
    for m in model.modules():
        if isinstance(m, nn.SyncBatchNorm):  # randomize_bn covers BatchNorm2d only
            m.running_var.uniform_(0.5, 1.5)
    (spec,) = ftwt.find_units(model)
    assert (spec.norm, spec.act) == ("bn", "gelu_tanh")
    attach_gates(model, GateConfig(threshold=0.8)).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
        out = SparseEngine(model, kernel="torch")(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_checkpoint_save_load_and_load_trained(tmp_path):
    model = _gated()
    set_decision(model, 0.6)
    ckpt = Checkpoint(model_name="resnet20", num_classes=10, gate_config=GateConfig(threshold=0.8).to_dict(),
                      model=model.state_dict(), epoch=3)
    ckpt.save(tmp_path / "c.pt")
    loaded, back = load_trained(tmp_path / "c.pt")
    assert back.epoch == 3 and back.gated and "optimizers" in back.missing_for_resume()
    assert all(u.decision == 0.6 for u in gated_units(loaded))
    with pytest.raises(ftwt.CheckpointError):
        Checkpoint.from_dict({"model": {}})
