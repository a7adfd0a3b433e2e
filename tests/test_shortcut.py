"""The CIFAR ResNets' option-A shortcut layouts: each matches its definition, written here anew."""

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_bn
from torch import nn

from ftwt import ConfigError, get_model
from ftwt.cli import main
from ftwt.models import SHORTCUTS, OptionAShortcut
from ftwt.train import Checkpoint, TrainConfig, load_recipe, load_trained


class _Shortcut(nn.Module):
    """Option A as each source writes it."""

    def __init__(self, layout: str, extra: int) -> None:
        super().__init__()
        self.layout, self.extra = layout, extra

    def forward(self, x):
        if self.layout == "reference":  # FTWT reference code: pool, then zeros appended
            pooled = nn.AvgPool2d(2)(x)
            zeros = torch.zeros(pooled.shape[0], self.extra, *pooled.shape[2:], dtype=x.dtype)
            return torch.cat([pooled, zeros], 1)
        if self.layout == "subsample":  # the widely shared checkpoints: LambdaLayer
            return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.extra // 2, self.extra // 2), "constant", 0)
        return F.pad(F.avg_pool2d(x, 2), (0, 0, 0, 0, self.extra // 2, self.extra // 2))


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, layout: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = _Shortcut(layout, cout - cin) if stride != 1 or cin != cout else nn.Sequential()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class _ResNet(nn.Module):
    def __init__(self, n: int, layout: str, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        cin = 16
        for i, (cout, stride) in enumerate([(16, 1), (32, 2), (64, 2)]):
            blocks = []
            for j in range(n):
                blocks.append(_Block(cin, cout, stride if j == 0 else 1, layout))
                cin = cout
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@pytest.mark.parametrize("layout", SHORTCUTS)
def test_layout_matches_its_definition(layout):
    model = randomize_bn(get_model("resnet20", num_classes=7, shortcut=layout)).eval()
    ref = _ResNet(3, layout, 7)
    ref.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ours, theirs = model(x), ref.eval()(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # The layouts differ: weights in the wrong one give other outputs (what made loads silently wrong).
    for other in SHORTCUTS:
        if other != layout:
            wrong = get_model("resnet20", num_classes=7, shortcut=other).eval()
            wrong.load_state_dict(model.state_dict())
            with torch.no_grad():
                assert not torch.allclose(wrong(x), theirs, atol=1e-3)


@pytest.mark.parametrize("layout", SHORTCUTS)
def test_shortcut_keeps_its_gradient(layout):
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    OptionAShortcut(16, 32, 2, layout)(x).sum().backward()
    # each input pixel reaches the output once (subsample: one in four) or as a quarter of a 2x2 mean
    expect = torch.zeros_like(x)
    if layout == "subsample":
        expect[:, :, ::2, ::2] = 1
    else:
        expect[:] = 0.25
    torch.testing.assert_close(x.grad, expect)


def test_reference_appends_zeros_after_the_identity():
    y = OptionAShortcut(16, 32, 2, "reference")(torch.rand(1, 16, 4, 4) + 1)
    assert (y[:, :16] > 0).all() and (y[:, 16:] == 0).all()


def test_unknown_layout_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown shortcut"):
        get_model("resnet20", shortcut="lambda")
    with pytest.raises(ConfigError, match="unknown shortcut"):
        TrainConfig(shortcut="lambda")
    with pytest.raises(ConfigError, match="takes no argument 'shortcut'"):
        get_model("vgg11_bn", shortcut="reference")


def test_paper_recipes_use_the_reference_layout():
    for name in ("cifar10_resnet56_dense", "cifar10_resnet56_r0.80_decoupled", "cifar10_resnet56_r0.88_joint"):
        assert load_recipe(name)["shortcut"] == "reference"


def _save(tmp_path, model, **extra):
    ckpt = Checkpoint(model_name="resnet20", num_classes=10, gate_config=None, model=model.state_dict(),
                      input_size=[3, 32, 32], dataset="cifar10", **extra)
    ckpt.save(tmp_path / "best.pt")
    return tmp_path / "best.pt"


def test_checkpoint_rebuilds_its_layout_and_old_ones_load_as_avgpool(tmp_path):
    model = get_model("resnet20", shortcut="reference")
    loaded, ckpt = load_trained(_save(tmp_path, model, model_kwargs={"shortcut": "reference"}))
    assert ckpt.model_kwargs == {"shortcut": "reference"} and loaded.layer2[0].shortcut.layout == "reference"
    old = torch.load(_save(tmp_path, model), weights_only=True)
    del old["model_kwargs"]  # as written before the field existed
    torch.save(old, tmp_path / "old.pt")
    loaded, _ = load_trained(tmp_path / "old.pt")
    assert loaded.layer2[0].shortcut.layout == "avgpool"
    assert TrainConfig(shortcut="subsample").model_kwargs() == {"shortcut": "subsample"}
    assert TrainConfig().model_kwargs() == {}


def test_flops_takes_shortcut_and_refuses_it_for_other_models(capsys):
    assert main(["flops", "--model", "resnet20", "--shortcut", "subsample", "--json"]) == 0
    assert '"dense_macs"' in capsys.readouterr().out
    assert main(["flops", "--model", "vgg11_bn", "--shortcut", "reference"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shortcut" in err[0]
