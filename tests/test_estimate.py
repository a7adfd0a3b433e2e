"""Estimation before training and the inverse search for a threshold."""

import pytest
import torch
from conftest import randomize_bn

from ftwt import ConfigError, GateConfig, attach_gates, estimate, find_threshold, gated_units, get_model, is_gated


@pytest.fixture(scope="module")
def model_and_data():
    torch.manual_seed(0)
    model = randomize_bn(get_model("resnet20")).eval()
    data = [torch.randn(8, 3, 16, 16) for _ in range(2)]
    return model, data


def test_reduction_grows_as_r_falls(model_and_data):
    model, data = model_and_data
    reductions = [estimate(model, data, r).reduction for r in (1.0, 0.95, 0.9, 0.8, 0.6)]
    assert reductions == sorted(reductions)
    assert reductions[-1] > reductions[0] + 0.2


def test_estimate_leaves_the_model_as_it_was(model_and_data):
    model, data = model_and_data
    before = model(data[0])
    estimate(model, data, 0.8)
    assert not is_gated(model)
    assert torch.equal(model(data[0]), before)

    gated = attach_gates(get_model("resnet20"), GateConfig(threshold=0.9))
    estimate(gated, data, 0.5)
    assert all(u.threshold == 0.9 and u.masks == "gate" for u in gated_units(gated))


def test_r_equal_one_prunes_exactly_the_dead_filters():
    torch.manual_seed(0)
    model = randomize_bn(get_model("vgg11_bn")).eval()
    bn = model.features[1]
    bn.bias.data[:16] = -100.0  # 16 of 64 filters never survive ReLU: dead
    data = [torch.randn(4, 3, 32, 32)]
    result = estimate(model, data, 1.0)
    first = result.to_dict()["per_layer"][0]
    assert first["name"] == "features.0"
    assert first["kept"] == pytest.approx(48 / 64)
    # The next conv sees those 16 input channels as zero, for every sample.
    assert result.to_dict()["per_layer"][1]["kept_in"] <= 48 / 64


def test_samples_limit(model_and_data):
    model, data = model_and_data
    assert estimate(model, data, 0.9, samples=5).flops.samples == 5
    assert estimate(model, [(x, None) for x in data], 0.9).flops.samples == 16


def test_find_threshold_meets_target(model_and_data):
    model, data = model_and_data
    found = find_threshold(model, data, 0.4)
    assert found.reduction >= 0.4
    assert found.reduction - 0.4 < 0.05
    assert estimate(model, data, found.threshold).reduction == pytest.approx(found.reduction)
    assert 0 < found.threshold < 1


def test_find_threshold_rejects_unreachable_targets(model_and_data):
    model, data = model_and_data
    with pytest.raises(ConfigError, match="out of reach"):
        find_threshold(model, data, 0.999)
    with pytest.raises(ConfigError):
        find_threshold(model, data, 1.5)
