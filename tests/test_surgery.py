"""Attaching gates to any CNN, masking, training modes, and taking gates off again."""

import pytest
import torch
import torch.nn.functional as F
from conftest import TORCHVISION, input_for, randomize_bn
from torch import nn

from ftwt import (
    ConfigError,
    GateConfig,
    UnsupportedLayerError,
    attach_gates,
    backbone_parameters,
    detach_gates,
    find_units,
    gate_parameters,
    gated_units,
    get_model,
    list_models,
    mask_loss,
    mask_source,
)
from ftwt.checkpoint import load_state_dict_into

ALL_MODELS = list_models() + TORCHVISION


@pytest.mark.parametrize("name", ALL_MODELS)
def test_attach_masks_and_detach_restores_exactly(name):
    model = randomize_bn(get_model(name, num_classes=7)).eval()
    x = input_for(name)
    before = model(x)
    keys = list(model.state_dict())
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]

    attach_gates(model, GateConfig(threshold=0.8))
    units = gated_units(model)
    assert [u.name for u in units] == convs  # every conv gated, in forward order
    out = model(x)
    assert out.shape == before.shape
    for unit in units:
        assert unit.mask.shape == (2, unit.out_channels) and unit.mask.dtype == torch.bool
    assert any(not u.mask.all() for u in units)  # random gates do prune something

    detach_gates(model)
    assert not hasattr(model, "ftwt_gates")
    assert list(model.state_dict()) == keys
    assert torch.equal(model(x), before)


def test_units_of_cifar_resnet():
    units = find_units(get_model("resnet56"))
    assert len(units) == 55
    assert units[0].conv == "conv1" and units[0].norm == "bn1" and units[0].act == "relu"
    first, second = units[1], units[2]
    assert (first.conv, first.norm, first.act) == ("layer1.0.conv1", "layer1.0.bn1", "relu")
    # The second conv feeds the residual add: gated before it, labels on the BN output.
    assert (second.conv, second.norm, second.act) == ("layer1.0.conv2", "layer1.0.bn2", None)


def test_depthwise_and_grouped_convs_are_units():
    model = get_model("mobilenet_v1")
    depthwise = [u for u in find_units(model) if model.get_submodule(u.conv).groups > 1]
    assert len(depthwise) == 13
    attach_gates(model)
    model.eval()(torch.randn(1, 3, 32, 32))
    unit = next(u for u in gated_units(model) if u.name == depthwise[0].conv)
    assert unit.mask.shape == (1, model.get_submodule(unit.name).out_channels)


def test_masked_filters_are_exactly_zero_after_the_unit():
    model = randomize_bn(get_model("vgg11_bn")).eval()
    attach_gates(model)
    seen = {}
    model.features[2].register_forward_hook(lambda m, a, out: seen.setdefault("relu", out))
    model(torch.randn(2, 3, 32, 32))
    mask = gated_units(model)[0].mask
    assert (~mask).any() and mask.any()
    assert seen["relu"][~mask].abs().max() == 0
    assert seen["relu"][mask].abs().max() > 0


def test_mask_sources():
    model = randomize_bn(get_model("resnet20")).eval()
    attach_gates(model, GateConfig(threshold=0.7))
    x = torch.randn(2, 3, 32, 32)
    with mask_source(model, "none"):
        dense = model(x)
        assert all(u.mask is None for u in gated_units(model))
    detached = detach_gates(model)(x)
    assert torch.equal(dense, detached)
    attach_gates(model, GateConfig(threshold=0.7))
    with mask_source(model, "ground_truth"):
        model(x)
        assert all(torch.equal(u.mask, u.labels) for u in gated_units(model))
    assert all(u.masks == "gate" for u in gated_units(model))  # restored


def test_gates_follow_config():
    model = get_model("resnet20")
    attach_gates(model, GateConfig(pool=2, softmax=False, decision=0.7))
    unit = gated_units(model)[1]
    assert unit.gate.fc.in_features == 16 * 4 and not unit.gate.softmax and unit.decision == 0.7
    detach_gates(model)
    attach_gates(model, GateConfig(embed_target=256))
    assert gated_units(model)[1].gate.pool == 4  # round(sqrt(256 / 16))
    with pytest.raises(ConfigError):
        attach_gates(model)  # twice


def _grads(params):
    return [p.grad for p in params]


@pytest.mark.parametrize("mode", ["decoupled", "joint"])
def test_training_modes(mode):
    model = get_model("resnet20").train()
    attach_gates(model, GateConfig(mode=mode, threshold=0.8))
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    out = model(x)
    assert all(u.labels is not None for u in gated_units(model))

    # Task loss alone never reaches the gates.
    F.cross_entropy(out, y).backward(retain_graph=True)
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in gate_parameters(model))
    model.zero_grad(set_to_none=True)

    # Mask loss trains the gates; it reaches the backbone only in joint mode.
    mask_loss(model).backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in gate_parameters(model) if p.dim() == 2)
    reached = any(p.grad is not None and p.grad.abs().max() > 0 for p in backbone_parameters(model))
    assert reached == (mode == "joint")


def test_mask_loss_value_matches_formula():
    model = get_model("resnet20").train()
    attach_gates(model)
    model(torch.randn(3, 3, 32, 32))
    units = gated_units(model)
    expected = torch.stack([
        F.binary_cross_entropy_with_logits(u.logits, u.labels.float(), reduction="none").mean(0).sum() for u in units
    ]).mean()
    assert torch.allclose(mask_loss(model), expected)
    assert mask_loss(model, balance=True).item() != pytest.approx(expected.item())


def test_no_labels_in_eval_by_default():
    model = get_model("resnet20").eval()
    attach_gates(model)
    model(torch.randn(1, 3, 32, 32))
    assert all(u.labels is None for u in gated_units(model))


def test_dense_checkpoint_loads_into_gated_model():
    dense = get_model("resnet20")
    model = attach_gates(get_model("resnet20"))
    load_state_dict_into(model, dense.state_dict(), strict=True, ignore_prefixes=("ftwt_gates.",))
    assert torch.equal(model.conv1.weight, dense.conv1.weight)
    assert any(k.startswith("ftwt_gates.") for k in model.state_dict())


def test_include_and_exclude():
    model = get_model("resnet20")
    only = find_units(model, include=["layer1.*"])
    assert only and all(u.conv.startswith("layer1.") for u in only)
    rest = find_units(model, exclude=["conv1", "layer3.*"])
    assert "conv1" not in {u.conv for u in rest} and not any(u.conv.startswith("layer3") for u in rest)


class _SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.conv(self.conv(x))


class _Conv1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.seq = nn.Conv1d(4, 4, 1)

    def forward(self, x):
        return self.seq(self.conv(x).flatten(2))


class _BranchBeforeNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.conv(x)
        return self.conv(-x)


@pytest.mark.parametrize(
    ("model", "layer"),
    [(_SharedConv(), "conv"), (_Conv1d(), "seq"), (_BranchBeforeNorm(), "conv"), (_Untraceable(), "_Untraceable")],
)
def test_unsupported_patterns_name_the_layer(model, layer):
    with pytest.raises(UnsupportedLayerError, match=layer):
        attach_gates(model)


def test_unsupported_layer_can_be_excluded_and_untraceable_models_take_explicit_units():
    model = _Conv1d()
    attach_gates(model, exclude=["seq"])
    assert [u.name for u in gated_units(model)] == ["conv"]
    from ftwt import UnitSpec

    model = _Untraceable()
    attach_gates(model, units=[UnitSpec(conv="conv")])
    model(torch.randn(1, 3, 4, 4))
    assert gated_units(model)[0].mask.shape == (1, 4)
