"""Width cascade: both widths train, each keeps its BatchNorm statistics, the budget sets tau, the report is honest."""

import copy
import json

import pytest
import torch
from conftest import randomize_bn

import ftwt
from ftwt import ConfigError, TrainConfig, attach_gates, get_model
from ftwt.cascade import WIDTHS, CascadeEngine, WidthCascade, bn_statistics, cascade_loss, width_forward
from ftwt.cli import main
from ftwt.surgery import gated_units, init_gates_from_weights

pytestmark = pytest.mark.usefixtures("one_thread")


def _core_model():
    cfg = TrainConfig.from_preset("ftwt+", threshold=0.5).gate_config()
    model = attach_gates(randomize_bn(get_model("resnet20", num_classes=10)), cfg)
    init_gates_from_weights(model)  # the static core: the same filters for every input
    return model


def _loader(n=24, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return [(x[i: i + batch], y[i: i + batch]) for i in range(0, n, batch)]


def _cascade(model=None):
    model = model or _core_model()
    bn = {w: bn_statistics(model, _loader(seed=1), w) for w in WIDTHS}
    return WidthCascade(model.eval(), bn)


def test_both_widths_train_filters_outside_the_core_learn_only_through_the_full_width():
    model = _core_model().train()
    unit = gated_units(model)[0]
    conv = dict(model.named_modules())[unit.name]
    x, y = _loader()[0]
    with ftwt.record(model, masks="gate", labels=False) as rec:
        model(x)
        core_mask = rec.masks[unit.name][0]
    outside = (~core_mask).nonzero().flatten()
    assert outside.numel() > 0
    loss, core_out = cascade_loss(model, x, y)
    loss.backward()
    assert conv.weight.grad[outside].abs().sum() > 0
    assert core_out.shape == (8, 10)
    model.zero_grad()
    torch.nn.functional.cross_entropy(width_forward(model, x, "core"), y).backward()
    assert conv.weight.grad[outside].abs().sum() == 0  # the core alone never reaches them


def test_bn_statistics_differ_between_widths_and_leave_the_model_as_it_was():
    model = _core_model()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    core, full = (bn_statistics(model, _loader(), w) for w in WIDTHS)
    after = {k: v for k, v in model.state_dict().items() if "running" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.allclose(core[k], full[k]) for k in core)
    with pytest.raises(ftwt.DataError):
        bn_statistics(model, [], "core")
    with pytest.raises(ConfigError, match="unknown width"):
        width_forward(model, torch.randn(1, 3, 32, 32), "half")


def test_tau_picks_the_width_per_input():
    cascade = _cascade()
    x = torch.randn(6, 3, 32, 32)
    cascade.tau = 0.0
    core = cascade(x.clone())
    cascade.tau = 2.0
    full = cascade(x.clone())
    assert not torch.allclose(core, full)
    conf = core.softmax(1).amax(1)
    cascade.tau = float(conf.sort().values[2:4].mean())  # between two inputs: no tie to break
    mixed = cascade(x.clone())
    up = conf < cascade.tau
    assert 0 < int(up.sum()) < 6
    assert torch.allclose(mixed[up], full[up], atol=1e-5) and torch.allclose(mixed[~up], core[~up], atol=1e-5)


def test_set_budget_meets_the_mean_macs_and_the_report_is_consistent():
    cascade = _cascade()
    held_out = _loader(n=40, seed=2)
    out = cascade.outputs(held_out)
    core, full = float(out["core_macs"].mean()), float(out["full_macs"].mean())
    target = core + 0.25 * full
    cascade.set_budget(held_out, macs=target)
    rep = cascade.report(held_out)
    assert abs(rep["dynamic_macs"] - target) <= full / 40 + 1e-6  # one input's full pass at most
    assert rep["escalated"] == pytest.approx(0.25, abs=1 / 40)
    assert rep["gate_lift"] == pytest.approx(rep["gate_accuracy"] - rep["static_oracle_accuracy"])
    assert rep["flops_reduction"] == pytest.approx(1 - rep["dynamic_macs"] / rep["dense_macs"])
    assert rep["varying_fraction"] > 0  # filters outside the core run for the escalated inputs only
    cascade.set_budget(held_out, share=0.0)
    assert cascade.report(held_out)["varying_fraction"] == 0.0  # a static core, nothing escalates
    with pytest.raises(ConfigError, match="below the core"):
        cascade.set_budget(held_out, macs=0.5 * core)
    with pytest.raises(ConfigError, match="exactly one"):
        cascade.set_budget(held_out)
    with pytest.raises(ConfigError, match="must be in"):
        cascade.set_budget(held_out, macs=core + 2 * full)


@pytest.mark.parametrize("kind", ["pruned", "sparse"])
def test_engine_matches_the_cascade_and_saves_without_model_code(tmp_path, kind):
    cascade = _cascade()
    x = torch.randn(5, 3, 32, 32)
    conf = cascade._pass(x, "core").softmax(1).amax(1)
    cascade.tau = float(conf.sort().values[2:4].mean())  # between two inputs: no tie to break
    ref = cascade(x.clone())
    engine = cascade.engine(x[:2], kind=kind, kernel="torch")
    got = engine(x)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    if kind == "pruned":  # the filters outside the core are gone for good: a smaller model
        core_params = sum(p.numel() for p in engine.core.parameters())
        assert core_params < 0.8 * sum(p.numel() for p in engine.full.parameters())
    saved = CascadeEngine.load(engine.save(tmp_path / "served", example=x[:1]))
    assert saved.tau == engine.tau and torch.allclose(saved(x), got, atol=1e-5)
    (tmp_path / "served" / "cascade.json").write_text('{"format": "other"}')
    with pytest.raises(ftwt.CheckpointError, match="not a saved width cascade"):
        CascadeEngine.load(tmp_path / "served")


def test_state_round_trips_and_bad_states_are_refused():
    cascade = _cascade()
    x = torch.randn(3, 3, 32, 32)
    cascade.tau = 0.5
    again = WidthCascade.from_state(cascade.model, cascade.cascade_state())
    assert again.tau == cascade.tau and torch.allclose(again(x.clone()), cascade(x.clone()))
    with pytest.raises(ConfigError):
        WidthCascade.from_state(cascade.model, {"tau": 0.5})
    with pytest.raises(ConfigError, match="BatchNorm"):
        WidthCascade(cascade.model, {"core": cascade.bn["core"], "full": {}})
    with pytest.raises(ConfigError, match="gated model"):
        WidthCascade(get_model("resnet20", num_classes=10), cascade.bn)
    with pytest.raises(ConfigError, match="unknown cascade engine kind"):
        cascade.engine(x[:1], kind="fast")
    varying = attach_gates(randomize_bn(get_model("resnet20", num_classes=10)), ftwt.GateConfig(threshold=0.9))
    with pytest.raises(ConfigError, match="only a static core"):  # per-input masks cannot be removed for good
        WidthCascade(varying.eval(), {w: bn_statistics(varying, _loader(), w) for w in WIDTHS}).core_model(x)

TINY = dict(model="resnet20", dataset="digits", image_size=8, val_subset=64, batch_size=32, workers=0,
            progress=False, device="cpu")


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("dense")
    ftwt.Trainer(TrainConfig(**TINY, train_subset=256, dense=True, epochs=2, out_dir=str(out))).fit()
    return out / "last.pt"


def test_trainer_runs_the_cascade_preset_end_to_end(tmp_path, dense_ckpt):
    cfg = TrainConfig.from_preset("cascade", **TINY, train_subset=200, init=str(dense_ckpt), epochs=2,
                                  cascade=0.4, out_dir=str(tmp_path))
    trainer = ftwt.Trainer(cfg)
    assert len(trainer.train_set) == 180 and len(trainer.holdout_set) == 20  # a tenth held out
    report = trainer.fit()
    rep = report["cascade"]
    assert rep["core_macs"] < rep["dynamic_macs"] < rep["dense_macs"] and 0 < rep["escalated"] < 1
    assert rep["gate_lift"] == pytest.approx(rep["gate_accuracy"] - rep["static_oracle_accuracy"])
    # training FLOPs count the core only: the full width's second forward is not what an input costs
    last = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["flops_reduction"] == pytest.approx(report["flops_reduction"], abs=0.05)
    assert json.loads((tmp_path / "report.json").read_text())["cascade"]["top1"] == pytest.approx(rep["top1"])
    again = WidthCascade.load(tmp_path)
    assert again.tau == pytest.approx(rep["tau"])
    val = [(x, y) for x, y in torch.utils.data.DataLoader(trainer.loaders.val.dataset, batch_size=32)]
    assert again.report(val)["top1"] == pytest.approx(rep["top1"])
    with pytest.raises(ConfigError, match="no cascade.pt"):
        WidthCascade.load(dense_ckpt.parent)
    # ftwt eval of the run's final checkpoint reports the cascade next to the core
    assert main(["eval", "--checkpoint", str(tmp_path / "last.pt"), "--json", "--out", str(tmp_path / "ev")]) == 0
    ev = json.loads((tmp_path / "ev" / "report.json").read_text())["cascade"]
    assert ev["tau"] == pytest.approx(rep["tau"]) and ev["core_macs"] < ev["dynamic_macs"] < ev["dense_macs"]


@pytest.mark.parametrize("bad", [dict(cascade=1.5), dict(cascade=0.5, dense=True), dict(cascade=0.5, cascade_holdout=0.0),
                                 dict(cascade=0.5, masks="ground_truth")])
def test_cascade_config_errors_are_one_line(bad):
    with pytest.raises(ConfigError, match="cascade"):
        TrainConfig(**{**TINY, **bad})


def test_the_full_width_leaves_the_running_statistics_to_the_core():
    model = _core_model().train()
    x, y = _loader()[0]
    core_only = copy.deepcopy(model)
    with torch.no_grad():
        width_forward(core_only, x, "core")
    cascade_loss(model, x, y)
    ours, theirs = model.state_dict(), core_only.state_dict()
    stats = [k for k in ours if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.allclose(ours[k], theirs[k]) for k in stats)
    with torch.no_grad():
        width_forward(core_only, x, "full")  # without the guard the full width would move them
    assert any(not torch.allclose(ours[k], core_only.state_dict()[k]) for k in stats)


def test_a_separate_full_model_serves_the_escalated_inputs():
    model = _core_model()
    dense = randomize_bn(get_model("resnet20", num_classes=10), seed=3).eval()
    cascade = WidthCascade(model.eval(), {"core": bn_statistics(model, _loader(), "core")}, full=dense)
    x = torch.randn(4, 3, 32, 32)
    cascade.tau = 2.0  # every input escalates: the separate model's output
    with torch.no_grad():
        assert torch.allclose(cascade(x.clone()), dense(x), atol=1e-6)
    rep = cascade.report(_loader(seed=4))
    assert rep["escalated"] == 1.0 and rep["dynamic_macs"] > rep["dense_macs"]  # both passes paid
    engine = cascade.engine(x[:1])
    assert torch.allclose(engine(x), cascade(x.clone()), atol=1e-5)
    with pytest.raises(ConfigError, match="plain model"):
        WidthCascade(model, {"core": cascade.bn["core"]}, full=model)
    with pytest.raises(ConfigError, match="not gated"):
        cascade.engine(x[:1], kind="sparse")
