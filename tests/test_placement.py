"""Gates only where they can help: squeeze-excite and LayerNorm/GroupNorm-fed convs stay dense, and say so."""

import logging

import pytest
import torch
import torchvision
from torch import nn

from ftwt import GateConfig, attach_gates, gated_units
from ftwt.cli import main
from ftwt.surgery import skipped_units
from ftwt.train import Checkpoint, load_trained


class _Mixed(nn.Module):
    """A conv into GroupNorm, a conv into a channels-last LayerNorm (ConvNeXt), a squeeze-excite, a plain unit."""

    def __init__(self) -> None:
        super().__init__()
        self.gn_conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.ln_conv = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.ln = nn.LayerNorm(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(8, 4, 1)
        self.fc2 = nn.Conv2d(4, 8, 1)
        self.plain = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.gn(self.gn_conv(x))
        x = self.ln(self.ln_conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = x * torch.sigmoid(self.fc2(torch.relu(self.fc1(self.pool(x)))))
        x = torch.relu(self.bn(self.plain(x)))
        return self.head(x.mean((2, 3)))


def test_unhelpful_units_are_skipped_with_their_reason(caplog):
    skipped = dict(skipped_units(_Mixed()))
    assert set(skipped) == {"gn_conv", "ln_conv", "fc1", "fc2"}
    assert "GroupNorm" in skipped["gn_conv"] and "LayerNorm" in skipped["ln_conv"]
    assert "squeeze-excite" in skipped["fc1"] and "squeeze-excite" in skipped["fc2"]
    with caplog.at_level(logging.INFO, logger="ftwt.surgery"):
        model = attach_gates(_Mixed())
    assert [u.spec.conv for u in gated_units(model)] == ["plain"]
    assert "left dense: fc1 (squeeze-excite" in caplog.text
    # asked for by name, or with the check off, they are gated
    assert {u.spec.conv for u in gated_units(attach_gates(_Mixed(), include=["fc1", "plain"]))} == {"fc1", "plain"}
    assert len(gated_units(attach_gates(_Mixed(), skip_unhelpful=False))) == 5


def test_efficientnet_b0_skips_its_squeeze_excite_convs():
    model = torchvision.models.efficientnet_b0()
    skipped = skipped_units(model)
    se = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and (n.endswith(".fc1") or n.endswith(".fc2"))]
    assert len(se) == 32 and sorted(n for n, _ in skipped) == sorted(se)
    assert all("squeeze-excite" in reason for _, reason in skipped)
    gated = {u.spec.conv for u in gated_units(attach_gates(model))}
    assert gated and not gated & set(se)


def test_checkpoints_bring_back_the_same_gates(tmp_path):
    # one written before gate_units existed: every convolution gated, and it still loads
    legacy = attach_gates(_Mixed(), GateConfig(), skip_unhelpful=False)
    old = Checkpoint(model_name="tests_pkg.mod:TinyNet", num_classes=10, gate_config=GateConfig().to_dict(),
                     model=legacy.state_dict())
    model = _Mixed()
    old.attach_gates(model)
    assert len(gated_units(model)) == 5
    new = Checkpoint(model_name="x:y", num_classes=10, gate_config=GateConfig().to_dict(), model={},
                     gate_units=["plain", "fc1"])
    model = _Mixed()
    new.attach_gates(model)
    assert {u.spec.conv for u in gated_units(model)} == {"plain", "fc1"}


def test_train_include_exclude_are_stored_and_rebuilt(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--model", "resnet20", "--exclude", "layer1.*,conv1", "--epochs", "1", "--train-subset", "16",
               "--val-subset", "8", "--batch-size", "8", "--workers", "0", "--estimate-samples", "8", "--no-progress",
               "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    ckpt = Checkpoint.load(out / "last.pt")
    assert ckpt.gate_units and not [u for u in ckpt.gate_units if u.startswith("layer1.") or u == "conv1"]
    assert "layer2.0.conv1" in ckpt.gate_units and ckpt.config["exclude"] == "layer1.*,conv1"
    model, _ = load_trained(out / "last.pt")
    assert [u.spec.conv for u in gated_units(model)] == ckpt.gate_units


@pytest.mark.parametrize("model", ["resnet20", "vgg11_bn", "mobilenet_v2_cifar"])
def test_zoo_models_lose_no_gates(model):
    from ftwt import get_model

    assert skipped_units(get_model(model)) == []
