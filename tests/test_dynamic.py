"""The options that make gates depend on the input: features, top-k, straight-through, scope, fitting,
the oracle bound, the prior diagnostics, the preset, and the static yardstick's scope."""

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_bn
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import ftwt
from ftwt import ConfigError, GateConfig, TrainConfig, attach_gates, gated_units, get_model, record
from ftwt.baselines import prune_to_macs
from ftwt.engine import SparseEngine
from ftwt.loss import fit_gates, mask_loss
from ftwt.surgery import find_units, gate_parameters

pytestmark = pytest.mark.usefixtures("one_thread")

PLUS = dict(features="avgmax", softmax=False, rule="topk", criterion="uniform", threshold=0.5, ste=True,
            scope="internal")


def test_topk_keeps_exactly_what_the_uniform_labels_keep_per_sample():
    model = attach_gates(get_model("resnet20", num_classes=10), GateConfig(**PLUS)).eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad(), record(model, labels=True) as rec:
        model(x)
    for unit in gated_units(model):
        mask = rec.masks[unit.name]
        k = unit.out_channels - unit.out_channels // 2
        assert unit.k == k
        assert (mask.sum(1) == k).all()
    # which filters differs between samples: the decision depends on the input
    assert any((rec.masks[u.name] != rec.masks[u.name][:1]).any() for u in gated_units(model))


def test_topk_needs_the_uniform_criterion():
    with pytest.raises(ConfigError, match="uniform"):
        GateConfig(rule="topk", criterion="mass", threshold=0.8)
    with pytest.raises(ConfigError, match="features"):
        GateConfig(features="median")


@pytest.mark.parametrize("ste", [False, True])
def test_straight_through_lets_the_task_loss_train_the_gates(ste):
    model = attach_gates(get_model("resnet20", num_classes=10), GateConfig(**{**PLUS, "ste": ste})).train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    with record(model, labels=False):
        F.cross_entropy(model(x), y).backward()
    grads = [p.grad for p in gate_parameters(model)]
    reached = any(g is not None and bool(g.abs().sum() > 0) for g in grads)
    assert reached == ste


def test_straight_through_forward_applies_the_hard_mask():
    torch.manual_seed(0)
    model = randomize_bn(get_model("resnet20", num_classes=10))
    attach_gates(model, GateConfig(**PLUS))
    x = torch.randn(2, 3, 32, 32)
    model.train()
    with record(model, labels=False):
        out_ste = model(x)
    for unit in gated_units(model):  # same decisions, no straight-through
        object.__setattr__(unit, "config", unit.config.replace(ste=False))
    with record(model, labels=False):
        out_hard = model(x)
    assert torch.allclose(out_ste, out_hard, atol=1e-5)


def test_internal_scope_skips_units_that_feed_a_residual_add():
    import torchvision

    internal = [u.conv for u in find_units(get_model("resnet20", num_classes=10), scope="internal")]
    assert internal == [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)]
    tv = [u.conv for u in find_units(torchvision.models.resnet18(), scope="internal")]
    assert tv == [f"layer{s}.{b}.conv1" for s in (1, 2, 3, 4) for b in range(2)]
    # a plain chain has no residual add: every unit is internal
    assert len(find_units(get_model("vgg11_bn", num_classes=10), scope="internal")) == 8


def test_richer_gate_features_cost_what_they_read():
    model = attach_gates(get_model("resnet20", num_classes=10), GateConfig(**{**PLUS, "hidden": 4}))
    with torch.no_grad(), ftwt.FlopsMeter(model) as meter:
        model.eval()(torch.randn(1, 3, 32, 32))
    gates = {lay.name: lay.dynamic for lay in meter.report().layers if lay.kind == "gate"}
    unit = gated_units(model)[0]
    _, c, h, w = unit.in_shape
    assert gates[unit.name + ".gate"] == 2 * c * h * w + 2 * c * 4 + 4 * unit.out_channels


@pytest.mark.parametrize("cfg", [PLUS, {**PLUS, "hidden": 8, "features": "avg", "softmax": True},
                                 {"features": "avgmax", "softmax": False}])
def test_engine_runs_the_richer_gates_exactly(cfg):
    model = attach_gates(randomize_bn(get_model("resnet20", num_classes=10)), GateConfig(**cfg)).eval()
    engine = SparseEngine(model, kernel="torch")  # exactly the honest multiply-adds (auto may run units densely)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad(), record(model, labels=False):
        ref = model(x)
    out = torch.cat([engine(x[i: i + 1]) for i in range(3)])
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    with torch.no_grad(), record(model, labels=False), ftwt.FlopsMeter(model) as meter:
        model(x[:1])
    pooling = sum(u.gate.features.macs(*u.in_shape[1:]) for u in gated_units(model))
    counter = FlopCounterMode(display=False)
    with counter:
        engine(x[:1])
    assert counter.get_total_flops() // 2 == round(meter.report().dynamic_macs) - pooling


class _Spikes(nn.Module):
    """One unit whose filter c copies input channel c: its labels are the channels with a spike."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, 2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(c)[:, :, None, None])

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


def _spike_batches(n_batches: int, c: int = 8, seed: int = 0) -> list[torch.Tensor]:
    """Every channel has the same mean; half of them, chosen per sample, hold it in one spike."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        x = torch.full((32, c, 8, 8), 1.0)
        for i in range(32):
            for ch in torch.randperm(c, generator=g)[: c // 2]:
                x[i, ch] = 0.0
                x[i, ch, int(torch.randint(8, (1,), generator=g)), int(torch.randint(8, (1,), generator=g))] = 64.0
        out.append(x)
    return out


def _lift(features: str, softmax: bool) -> float:
    torch.manual_seed(0)
    model = _Spikes().eval()
    attach_gates(model, GateConfig(criterion="uniform", threshold=0.5, rule="topk", features=features, softmax=softmax))
    opt = torch.optim.Adam(gate_parameters(model), lr=0.05)
    fit_gates(model, _spike_batches(60), opt, 60)
    report = ftwt.evaluate(model, [(x, torch.zeros(32, dtype=torch.long)) for x in _spike_batches(4, seed=1)], "cpu")
    return report["gate_lift"]


def test_max_pooled_features_see_what_average_pooling_cannot():
    reference, richer = _lift("avg", True), _lift("avgmax", False)
    assert reference < 0.05  # equal means: average pooling carries nothing about the labels
    assert richer > 0.3
    assert richer > reference + 0.25


def test_fit_gates_lowers_the_mask_loss_and_leaves_the_backbone():
    model = randomize_bn(get_model("resnet20", num_classes=10))
    attach_gates(model, GateConfig(**PLUS))
    before = {k: v.clone() for k, v in model.state_dict().items() if "ftwt_gates" not in k}
    xs = [torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(i % 2)) for i in range(30)]
    opt = torch.optim.SGD(gate_parameters(model), lr=0.1, momentum=0.9)
    first = fit_gates(model, xs[:1], opt, 1)
    last = fit_gates(model, xs, opt, 30)
    assert last < first
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_prior_diagnostics_on_constant_gates_and_on_the_labels_themselves():
    model = randomize_bn(get_model("resnet20", num_classes=10))
    attach_gates(model, GateConfig(threshold=0.8))
    for unit in gated_units(model):  # a gate that ignores its input: its bias alone decides
        nn.init.zeros_(unit.gate.fc.weight)
    data = [(torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))) for _ in range(2)]
    rep = ftwt.evaluate(model, data, "cpu")
    assert rep["varying_fraction"] == 0.0
    assert 0.0 < rep["label_varying_fraction"] <= 1.0
    assert rep["gate_lift"] <= 1e-9  # a constant cannot beat each filter's majority label
    assert rep["gate_lift"] == pytest.approx(rep["gate_accuracy"] - rep["static_oracle_accuracy"])
    oracle = ftwt.evaluate(model, data, "cpu", masks="ground_truth")
    assert oracle["gate_accuracy"] == 1.0
    assert oracle["gate_lift"] == pytest.approx(1.0 - oracle["static_oracle_accuracy"])
    assert oracle["gate_lift"] > 0
    for entry in rep["per_layer"]:
        assert {"label_varying_fraction", "static_oracle_accuracy", "gate_lift"} <= set(entry)


def test_oracle_training_applies_the_labels_and_trains_no_gate(tmp_path):
    cfg = TrainConfig(model="resnet20", masks="ground_truth", threshold=0.8, epochs=1, train_subset=64,
                      val_subset=32, batch_size=32, workers=0, progress=False, out_dir=str(tmp_path))
    trainer = ftwt.Trainer(cfg)
    gates_before = [p.clone() for p in gate_parameters(trainer.model)]
    report = trainer.fit()
    assert report["gate_accuracy"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(gates_before, gate_parameters(trainer.model), strict=True))


def test_preset_trains_and_rebuilds_the_same_gates(tmp_path):
    cfg = TrainConfig.from_preset("ftwt+", model="resnet20", epochs=2, train_subset=64, val_subset=32,
                                  batch_size=32, workers=0, progress=False, out_dir=str(tmp_path), gate_warmup=2)
    assert cfg.resolved().cooldown == 2  # three quarters of 2 epochs, rounded
    report = ftwt.Trainer(cfg).fit()
    assert 0.3 < report["flops_reduction"] < 0.6
    assert report["estimated_reduction"] == pytest.approx(report["flops_reduction"], abs=0.05)
    model, ckpt = ftwt.load_trained(tmp_path / "last.pt")
    units = gated_units(model)
    assert len(units) == 9 and all(u.config.rule == "topk" and u.config.ste for u in units)
    with pytest.raises(ConfigError, match="preset"):
        TrainConfig.from_preset("nope")


def test_static_internal_scope_keeps_the_residual_stream_whole():
    model = get_model("resnet20", num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    dense = ftwt.measure(model, [x]).dense_macs
    res = prune_to_macs(model, x, 0.5 * dense, scope="internal")
    assert abs(res.macs / dense - 0.5) < 0.01
    widths = {n: m.out_channels for n, m in res.model.named_modules() if isinstance(m, nn.Conv2d)}
    assert widths["conv1"] == 16 and widths["layer3.2.conv2"] == 64  # the streams
    assert widths["layer1.0.conv1"] < 16 and widths["layer3.0.conv1"] < 64  # the blocks' insides
    uniform = prune_to_macs(model, x, 0.5 * dense, scope="all")
    assert {n: m.out_channels for n, m in uniform.model.named_modules() if isinstance(m, nn.Conv2d)}["conv1"] < 16
    with pytest.raises(ConfigError, match="scope"):
        prune_to_macs(model, x, 0.5 * dense, scope="middle")


def test_mask_loss_uses_the_topk_labels():
    model = attach_gates(get_model("resnet20", num_classes=10), GateConfig(**PLUS)).train()
    with record(model, labels=True) as rec:
        model(torch.randn(4, 3, 32, 32))
    for unit in gated_units(model):
        assert (rec.labels[unit.name].sum(1) <= unit.k).all()
    assert mask_loss(rec).requires_grad


def test_gates_initialised_from_weights_start_as_the_static_choice():
    model = randomize_bn(get_model("resnet20", num_classes=10))
    attach_gates(model, GateConfig(**PLUS))
    ftwt.surgery.init_gates_from_weights(model)
    with torch.no_grad(), record(model.eval(), labels=False) as rec:
        model(torch.randn(6, 3, 32, 32))
    named = dict(model.named_modules())
    for unit in gated_units(model):
        mask = rec.masks[unit.name]
        assert (mask == mask[:1]).all()  # the same filters for every input
        conv, bn = named[unit.spec.conv], named[unit.spec.norm]
        score = conv.weight.abs().flatten(1).sum(1) * bn.weight.abs()
        assert set(mask[0].nonzero().flatten().tolist()) == set(score.topk(unit.k).indices.tolist())
    with pytest.raises(ConfigError, match="gate_init"):
        TrainConfig(gate_init="zeros")
