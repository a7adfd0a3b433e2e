"""A static core in each gated unit (``GateConfig.dynamic < 1``): the unit's strongest filters
are computed for every input and the gate picks only the rest of the budget."""

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_bn

import ftwt
from ftwt import ConfigError, GateConfig, attach_gates, gated_units, get_model, record
from ftwt.engine import SparseEngine
from ftwt.surgery import init_gates_from_weights, static_importance

pytestmark = pytest.mark.usefixtures("one_thread")

PLUS = dict(features="avgmax", softmax=False, rule="topk", criterion="uniform", threshold=0.5, ste=True,
            scope="internal")


def _model(dynamic: float = 0.25, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = attach_gates(randomize_bn(get_model("resnet20", num_classes=10)), GateConfig(**PLUS, dynamic=dynamic))
    for unit in gated_units(model):  # gates that depend on the input, so the picks vary
        torch.nn.init.normal_(unit.gate.fc.weight, std=1.0)
    return model.eval()


def _masks(model, x, masks="gate"):
    with torch.no_grad(), record(model, masks=masks, labels=True) as rec:
        out = model(x)
    return out, {k: v.clone() for k, v in rec.masks.items()}, {u.name: u.labels.clone() for u in gated_units(model)}


def test_the_core_is_the_units_strongest_filters_and_is_always_computed():
    model = _model()
    _, masks, _ = _masks(model, torch.randn(8, 3, 32, 32))
    for unit in gated_units(model):
        m = unit.n_dynamic
        assert 1 <= m < unit.k
        assert int(unit.core.sum()) == unit.k - m
        strongest = static_importance(model, unit.spec).topk(unit.k - m).indices
        assert bool(unit.core[strongest].all())
        mask = masks[unit.name]
        assert bool(mask[:, unit.core].all())  # whatever the gate's logits for them say
        assert bool((mask.sum(1) == unit.k).all())  # the same budget as without a core


def test_only_the_non_core_filters_vary_and_they_do():
    model = _model()
    _, masks, _ = _masks(model, torch.randn(16, 3, 32, 32))
    varying = 0
    for unit in gated_units(model):
        mask = masks[unit.name]
        on = mask.float().mean(0)
        assert bool((on[unit.core] == 1).all())
        varying += int(((on > 0) & (on < 1)).sum())
    assert varying > 0


def test_core_logits_cannot_drop_a_core_filter():
    model = _model()
    unit = gated_units(model)[0]
    with torch.no_grad():
        unit.gate.fc.bias[unit.core] = -1e4  # the gate would never pick them on its own
        unit.gate.fc.bias[~unit.core] = 1e4
    _, masks, _ = _masks(model, torch.randn(4, 3, 32, 32))
    assert bool(masks[unit.name][:, unit.core].all())


def test_labels_keep_the_core_and_each_samples_strongest_other_filters():
    model = _model()
    x = torch.randn(6, 3, 32, 32)
    _, _, labels = _masks(model, x)
    plain = _model(dynamic=1.0)  # same weights (same seed), no core: labels are each sample's top k
    _, _, plain_labels = _masks(plain, x)
    differs = False
    for unit in gated_units(model):
        lab = labels[unit.name]
        assert bool(lab[:, unit.core].all())
        assert bool((lab.sum(1) <= unit.k).all())
        differs |= not torch.equal(lab, plain_labels[unit.name])
    assert differs  # the core changes what the gates are asked to predict


def test_the_straight_through_gradient_skips_the_core():
    model = _model().train()
    with record(model, labels=False):
        F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.randint(0, 10, (4,))).backward()
    for unit in gated_units(model):
        grad = unit.gate.fc.weight.grad.abs().sum(1)
        assert float(grad[unit.core].sum()) == 0.0
        assert float(grad[~unit.core].sum()) > 0.0


def test_the_core_travels_in_the_state_dict_and_the_engine_matches_the_model():
    model = _model()
    other = attach_gates(get_model("resnet20", num_classes=10), GateConfig(**PLUS, dynamic=0.25))
    assert any(not torch.equal(a.core, b.core) for a, b in zip(gated_units(model), gated_units(other), strict=True))
    other.load_state_dict(model.state_dict())
    assert all(torch.equal(a.core, b.core) for a, b in zip(gated_units(model), gated_units(other), strict=True))
    x = torch.randn(3, 3, 32, 32)
    ref, _, _ = _masks(model, x)
    engine = SparseEngine(other.eval(), kernel="torch")
    assert torch.allclose(engine(x), ref, atol=1e-4, rtol=1e-4)


def test_a_core_starts_as_the_static_choice_with_weights_init():
    model = _model()
    init_gates_from_weights(model)
    _, masks, _ = _masks(model, torch.randn(4, 3, 32, 32))
    for unit in gated_units(model):
        static = static_importance(model, unit.spec).topk(unit.k).indices
        assert bool(masks[unit.name][:, static].all())


@pytest.mark.parametrize("bad", [dict(dynamic=0.0), dict(dynamic=1.5), dict(dynamic=0.5, rule="threshold",
                                                                            criterion="mass", threshold=0.9)])
def test_bad_dynamic_shares_are_refused(bad):
    with pytest.raises(ConfigError):
        GateConfig(**{**PLUS, **bad})


def test_train_config_and_cli_carry_the_share():
    cfg = ftwt.TrainConfig.from_preset("ftwt+", threshold=0.5, gate_dynamic=0.25)
    assert cfg.gate_config().dynamic == 0.25
    from ftwt.cli import build_parser

    args = build_parser().parse_args(["train", "--preset", "ftwt+", "--gate-dynamic", "0.3"])
    assert args.gate_dynamic == 0.3
