"""FLOPs: closed forms, PyTorch's own counter, residual unions, gates' cost, reference count."""

import pytest
import torch
from conftest import TORCHVISION, input_for, randomize_bn
from torch import nn

from ftwt import (
    FlopsMeter,
    GateConfig,
    attach_gates,
    conv_macs,
    gated_units,
    get_model,
    list_models,
    mask_source,
    measure,
)
from ftwt.flops import dense_macs_fvcount


def test_conv_macs_closed_forms():
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1)
    assert conv_macs(conv, (5, 5)).item() == 9 * 8 * 16 * 25
    active_in = torch.tensor([[True] * 4 + [False] * 4])
    active_out = torch.tensor([[True] * 10 + [False] * 6])
    assert conv_macs(conv, (5, 5), active_in, active_out).item() == 9 * 4 * 10 * 25

    grouped = nn.Conv2d(8, 4, 1, groups=2)  # group 0: in 0-3 -> out 0-1; group 1: in 4-7 -> out 2-3
    ain = torch.tensor([[True, True, True, False, True, False, False, False]])
    aout = torch.tensor([[True, False, True, True]])
    assert conv_macs(grouped, (2, 2)).item() == 4 * (4 * 2 + 4 * 2)  # hw * sum over groups of in x out
    assert conv_macs(grouped, (2, 2), ain, aout).item() == 4 * (3 * 1 + 1 * 2)

    depthwise = nn.Conv2d(4, 4, 3, groups=4)
    ain = torch.tensor([[True, True, False, False], [True, True, True, True]])
    aout = torch.tensor([[True, False, True, False], [True, True, True, True]])
    # Sample 0: only channel 0 has both its input and its output active.
    assert conv_macs(depthwise, (3, 3), ain, aout).tolist() == [9 * 9 * 1, 9 * 9 * 4]


@pytest.mark.parametrize("name", list_models() + TORCHVISION)
def test_dense_count_equals_pytorch_flop_counter(name):
    model = get_model(name, num_classes=10).eval()
    x = torch.ones(1, 3, 32, 32) if not name.startswith("torchvision:") else torch.ones(1, 3, 64, 64)
    report = measure(model, [x])
    assert report.dense_macs == dense_macs_fvcount(model, x)
    # A gated model has the same dense baseline.
    attach_gates(model)
    assert measure(model, [x]).dense_macs == report.dense_macs


class _TwoBranches(nn.Module):
    """x -> (convA, bnA) + (convB, bnB) -> relu -> convC -> pool -> fc."""

    def __init__(self):
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv_b, self.bn_b = nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.conv_c, self.bn_c = nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        s = torch.relu(self.bn_a(self.conv_a(x)) + self.bn_b(self.conv_b(x)))
        return self.fc(self.bn_c(self.conv_c(s)).mean((2, 3)))


def _force(unit, keep):
    """Make a gate always predict ``keep`` (list of bools)."""
    unit.gate.fc.weight.data.zero_()
    unit.gate.fc.bias.data = torch.tensor([10.0 if k else -10.0 for k in keep])


def test_residual_union_gate_cost_and_reference_count():
    model = randomize_bn(_TwoBranches()).eval()
    for bn in (model.bn_a, model.bn_b):
        bn.bias.data.fill_(5.0)  # every kept channel is non-zero after the add
    attach_gates(model, GateConfig(pool=1))
    ua, ub, uc = gated_units(model)
    _force(ua, [True] * 2 + [False] * 6)  # channels 0, 1
    _force(ub, [False, True, True] + [False] * 5)  # channels 1, 2
    _force(uc, [True] * 3 + [False] * 3)
    with FlopsMeter(model) as meter, torch.no_grad():
        model(torch.randn(1, 3, 4, 4))
    report = meter.report()
    layers = {lay.name: lay for lay in report.layers}
    hw = 16
    assert layers["conv_a"].dynamic == 9 * 3 * 2 * hw
    assert layers["conv_b"].dynamic == 1 * 3 * 2 * hw
    # Behind the add the input is the union of both branches: channels 0, 1, 2.
    assert layers["conv_c"].kept_in == 3 / 8
    assert layers["conv_c"].dynamic == 9 * 3 * 3 * hw
    assert layers["fc"].dynamic == 6 * 5
    gate = (3 * hw + 3 * 8) * 2 + (8 * hw + 8 * 6)
    assert report.gate_macs == gate
    assert report.dynamic_macs == 9 * 3 * 2 * hw + 3 * 2 * hw + 9 * 3 * 3 * hw + 30 + gate
    # The reference takes the previous gate's count (conv_b kept 2) as conv_c's input.
    assert layers["conv_c"].reference == 9 * 2 * 3 * hw
    assert report.reference_macs == 9 * 3 * 2 * hw + 3 * 2 * hw + 9 * 2 * 3 * hw
    dense = 9 * 3 * 8 * hw + 3 * 8 * hw + 9 * 8 * 6 * hw
    assert report.reference_dense_macs == dense
    assert report.dense_macs == dense + 30
    assert report.reduction == pytest.approx(1 - report.dynamic_macs / report.dense_macs)


def test_per_sample_counts_differ_with_masks():
    model = randomize_bn(get_model("resnet20")).eval()
    attach_gates(model, GateConfig(threshold=0.6))
    x = input_for("resnet20", n=4)
    with mask_source(model, "ground_truth"):
        report = measure(model, [x[:2], x[2:]])
    assert report.samples == 4
    assert report.per_sample.shape == (4,)
    assert len(set(report.per_sample.tolist())) > 1
    assert report.dynamic_macs == pytest.approx(report.per_sample.mean().item())
    assert 0 < report.reduction < 1
    assert report.reference_reduction > 0
    per_layer = sum(lay.dynamic for lay in report.layers)
    assert per_layer == pytest.approx(report.dynamic_macs)
    assert report.to_dict()["flops_reduction"] == report.reduction
