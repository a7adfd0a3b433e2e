"""Saliency gates (``GateConfig.saliency``): a second head that scales each kept filter per sample,
and with ``rank`` also moves which filters are kept."""

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_bn
from torch.utils.flop_counter import FlopCounterMode

import ftwt
from ftwt import ConfigError, GateConfig, attach_gates, gated_units, get_model, record
from ftwt.engine import SparseEngine
from ftwt.surgery import backbone_parameters, gate_parameters, init_gates_from_weights

pytestmark = pytest.mark.usefixtures("one_thread")

PLUS = dict(features="avgmax", softmax=False, rule="topk", criterion="uniform", threshold=0.5, ste=True,
            scope="internal")


def _model(saliency: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = attach_gates(randomize_bn(get_model("resnet20", num_classes=10)), GateConfig(**PLUS, saliency=saliency))
    init_gates_from_weights(model)
    return model.eval()


def _forward(model, x):
    with torch.no_grad(), record(model, labels=False) as rec:
        return model(x), {k: v.clone() for k, v in rec.masks.items()}


def test_saliency_starts_as_the_model_it_was_built_from():
    x = torch.randn(3, 3, 32, 32)
    ref, ref_masks = _forward(_model("none"), x)
    for saliency in ("scale", "rank"):
        out, masks = _forward(_model(saliency), x)
        assert torch.allclose(out, ref, atol=1e-6)
        assert all(torch.equal(masks[k], ref_masks[k]) for k in ref_masks)


def test_saliency_heads_train_with_the_backbone_not_with_the_decisions():
    model = _model("scale").train()
    heads = {id(u.gate.scale_fc.weight) for u in gated_units(model)}
    assert heads and not heads & {id(p) for p in gate_parameters(model)}
    assert heads <= {id(p) for p in backbone_parameters(model)}
    for p in gate_parameters(model):  # decisions frozen (cooldown): the scale still learns
        p.requires_grad_(False)
    with record(model, labels=False):
        F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.randint(0, 10, (4,))).backward()
    assert all(u.gate.scale_fc.weight.grad.abs().sum() > 0 for u in gated_units(model))


@pytest.mark.parametrize("saliency", ["scale", "rank"])
def test_the_scale_multiplies_the_kept_filters_and_rank_lets_it_choose_them(saliency):
    model = _model(saliency)
    unit = gated_units(model)[0]
    x = torch.randn(2, 3, 32, 32)
    _, before = _forward(model, x)
    dropped = int((~before[unit.name][0]).nonzero()[0])
    kept = int(before[unit.name][0].nonzero()[0])
    with torch.no_grad():
        unit.gate.scale_fc.bias[dropped] = 20.0  # the task asks for this filter, strongly
        unit.gate.scale_fc.bias[kept] = -20.0
    _, after = _forward(model, x)
    assert bool(after[unit.name][:, dropped].all()) == (saliency == "rank")
    assert bool(after[unit.name][:, kept].any()) == (saliency == "scale")
    seen = {}
    handle = model.get_submodule(unit.spec.tail).register_forward_hook(lambda m, a, y: seen.update(y=y))
    with torch.no_grad(), record(model, labels=False):
        model(x)
    handle.remove()
    if saliency == "rank":  # computed now, at about twice its size
        assert seen["y"][:, dropped].abs().sum() > 0
    else:  # still computed, scaled by 2 * sigmoid(-20)
        assert 0 < seen["y"][:, kept].abs().max() < 1e-6


def test_unknown_saliency_is_refused():
    with pytest.raises(ConfigError, match="saliency"):
        GateConfig(saliency="boost")


@pytest.mark.parametrize("saliency", ["scale", "rank"])
def test_engine_applies_the_scale_exactly_and_counts_the_head(saliency):
    model = _model(saliency, seed=1)
    with torch.no_grad():
        for unit in gated_units(model):
            unit.gate.scale_fc.weight.normal_(std=0.5)
    engine = SparseEngine(model, kernel="torch")
    x = torch.randn(3, 3, 32, 32)
    ref, _ = _forward(model, x)
    out = torch.cat([engine(x[i: i + 1]) for i in range(3)])
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    with torch.no_grad(), record(model, labels=False), ftwt.FlopsMeter(model) as meter:
        model(x[:1])
    pooling = sum(u.gate.features.macs(*u.in_shape[1:]) for u in gated_units(model))
    gates = {lay.name: lay.dynamic for lay in meter.report().layers if lay.kind == "gate"}
    for u in gated_units(model):  # pooling, then the decision and the saliency heads
        assert gates[u.name + ".gate"] == u.gate.features.macs(*u.in_shape[1:]) + 2 * u.gate.fc.in_features * u.out_channels
    counter = FlopCounterMode(display=False)
    with counter:
        engine(x[:1])
    assert counter.get_total_flops() // 2 == round(meter.report().dynamic_macs) - pooling


BUDGET = {**PLUS, "rule": "budget", "offset": True}


def _budget_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = attach_gates(randomize_bn(get_model("resnet20", num_classes=10)), GateConfig(**BUDGET))
    init_gates_from_weights(model)
    with torch.no_grad():
        for unit in gated_units(model):  # inputs now differ in how many filters they ask for
            unit.gate.offset_fc.weight.normal_(std=0.3)
    return model


def test_budget_rule_shares_the_batch_budget_between_samples_and_learns_its_cut():
    model = _budget_model().train()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad(), record(model, labels=False) as rec:
        model(x)
    counts = {u.name: rec.masks[u.name].sum(1) for u in gated_units(model)}
    for unit in gated_units(model):
        assert int(counts[unit.name].sum()) == 8 * unit.k  # the unit's budget, exactly
        assert not torch.isnan(unit.budget_cut)
    assert any(len(set(c.tolist())) > 1 for c in counts.values())  # but not the same count for every sample
    model.eval()  # inference: the learnt cut, one sample at a time
    with torch.no_grad(), record(model, labels=False) as rec:
        model(x[:1])
    for unit in gated_units(model):
        logits = unit.logits
        assert torch.equal(rec.masks[unit.name], logits > unit.budget_cut)


def test_budget_gate_before_any_training_batch_keeps_each_samples_top_k():
    model = _budget_model().eval()
    with torch.no_grad(), record(model, labels=False) as rec:
        model(torch.randn(3, 3, 32, 32))
    for unit in gated_units(model):
        assert torch.isnan(unit.budget_cut)
        assert (rec.masks[unit.name].sum(1) == unit.k).all()
    with pytest.raises(ConfigError, match="uniform"):
        GateConfig(rule="budget", criterion="mass", threshold=0.8)


def test_offset_starts_at_zero_and_the_budget_gate_starts_as_the_static_choice():
    model = attach_gates(randomize_bn(get_model("resnet20", num_classes=10)), GateConfig(**BUDGET)).train()
    init_gates_from_weights(model)
    with torch.no_grad(), record(model, labels=False) as rec:
        model(torch.randn(4, 3, 32, 32))
    for unit in gated_units(model):
        mask = rec.masks[unit.name]
        assert (mask == mask[:1]).all() and int(mask[0].sum()) == unit.k


def test_engine_and_checkpoint_carry_the_budget_gate():
    model = _budget_model(seed=2).train()
    with torch.no_grad(), record(model, labels=False):
        model(torch.randn(16, 3, 32, 32))
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    ref, _ = _forward(model, x)
    engine = SparseEngine(model, kernel="torch")
    out = torch.cat([engine(x[i: i + 1]) for i in range(3)])
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    again = attach_gates(get_model("resnet20", num_classes=10), GateConfig(**BUDGET))
    again.load_state_dict(model.state_dict())
    again.eval()
    assert torch.allclose(_forward(again, x)[0], ref)


@pytest.mark.parametrize("options", [{"gate_saliency": "rank"}, {"gate_rule": "budget", "gate_offset": True}])
def test_trainer_trains_and_reloads_the_new_gates(tmp_path, options):
    cfg = ftwt.TrainConfig.from_preset("ftwt+", model="resnet20", epochs=1, train_subset=64, val_subset=32,
                                       batch_size=32, workers=0, progress=False, out_dir=str(tmp_path), **options)
    report = ftwt.Trainer(cfg).fit()
    assert 0.3 < report["flops_reduction"] < 0.7
    model, _ = ftwt.load_trained(tmp_path / "last.pt")
    unit = gated_units(model)[0]
    assert (unit.gate.scale_fc is not None) == ("gate_saliency" in options)
    assert (unit.gate.offset_fc is not None) == ("gate_offset" in options)
    if "gate_rule" in options:  # the learnt cut travels with the checkpoint
        assert not torch.isnan(unit.budget_cut)
