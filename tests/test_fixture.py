"""A checkpoint written before unit state moved into ``state_dict`` still loads and gives the same masks."""

from pathlib import Path

import pytest
import torch

from ftwt.flops import measure
from ftwt.models import _registry
from ftwt.models.resnet_cifar import ResNetCifar
from ftwt.record import record
from ftwt.surgery import gated_units
from ftwt.train import load_trained

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def legacy(monkeypatch):
    """The fixture's model name, registered for this test only (the registry tests stay as they are)."""
    monkeypatch.setitem(_registry._MODELS, "fixture_resnet8",
                        lambda num_classes=10, **kw: ResNetCifar((1, 1, 1), num_classes=num_classes, **kw))
    from fixtures.make_legacy_checkpoint import fixed_batch

    return FIXTURES / "legacy_resnet8.pt", torch.load(FIXTURES / "legacy_resnet8_expected.pt", weights_only=True), fixed_batch()


def test_legacy_checkpoint_reproduces_masks_and_top1(legacy, one_thread):
    path, expected, (x, y) = legacy
    model, ckpt = load_trained(str(path))
    model.eval()
    assert ckpt.calibrated_decisions is not None and all(u.decision == 0.5 for u in gated_units(model))
    assert torch.equal(y, expected["targets"])
    with torch.no_grad(), record(model) as rec:
        logits = model(x)
    masks = rec.masks
    assert masks.keys() == expected["masks"].keys()
    for name, mask in masks.items():
        assert torch.equal(mask, expected["masks"][name]), name
    torch.testing.assert_close(logits, expected["logits"])
    assert float((logits.argmax(1) == y).double().mean() * 100) == expected["top1"]
    flops = measure(model, [x])
    assert flops.dynamic_macs == expected["dynamic_macs"] and flops.dense_macs == expected["dense_macs"]
