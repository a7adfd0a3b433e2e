"""Kernel choice of SparseEngine(kernel="auto"): never slower than the fallback, recorded, and honest about MACs."""

import copy
import logging

import pytest
import torch
from conftest import randomize_bn
from torch.utils.flop_counter import FlopCounterMode

from ftwt import ConfigError, GateConfig, attach_gates, gated_units, get_model
from ftwt.engine import SparseEngine, _choose
from ftwt.engine import sparse_engine as engine_module
from ftwt.surgery import detach_gates

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(name="resnet20", threshold=0.9):
    return attach_gates(randomize_bn(get_model(name, num_classes=10)), GateConfig(threshold=threshold)).eval()


def _close(out, ref):
    return torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("times,expected", [
    ({"torch": 1.0, "native": 0.5, "dense": 0.8}, "native"),
    ({"torch": 1.0, "native": 2.0, "dense": 0.3}, "dense"),
    ({"torch": 1.0, "native": 3.0, "dense": 4.0}, "torch"),
    ({"torch": 1.0, "native": 0.97}, "torch"),  # within the noise margin: the fallback stays
    ({"torch": 1.0}, "torch"),
])
def test_pick_takes_the_fastest_only_when_it_beats_the_fallback(times, expected):
    assert _choose.pick(times) == expected
    assert times[_choose.pick(times)] <= times["torch"]


def test_auto_with_mocked_timings_never_runs_a_mode_slower_than_torch(monkeypatch, caplog):
    # A CPU where the native kernels are slow everywhere and dense wins on wide layers.
    def fake(conv, mode, x, masks):
        return {"torch": 1.0, "native": 5.0, "dense": 0.5 if conv.c_out >= 64 else 2.0}[mode]

    monkeypatch.setattr(_choose, "measure", fake)
    monkeypatch.setattr(_choose, "compare", lambda run, candidates: {k: 0.5 if k == "chosen" else 1.0 for k in candidates})
    engine_module._say_once.cache_clear()
    model = _model()
    x = torch.randn(1, 3, 32, 32)
    with caplog.at_level(logging.INFO, logger="ftwt.engine.sparse_engine"):
        engine = SparseEngine(model, example=x)
    choices = engine.choices
    assert "native" not in choices.values() and "pending" not in choices.values()
    for name, conv in engine.plan.convs.items():
        assert engine.timings[name][choices[name]] <= engine.timings[name]["torch"], name
        wide = conv.unit is not None and conv.c_out >= 64
        assert choices[name] == ("dense" if wide else "torch"), name
    assert "kernels chosen by timing" in caplog.text
    if engine.native:  # said once, not silently
        assert caplog.text.count("slower than PyTorch's ops") == 1
    batch = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert _close(engine(x), model(x))
        assert _close(engine(batch), model(batch))
    engine.calibrate(batch)  # three samples: their times add up
    assert all(t["torch"] == 3.0 for t in engine.timings.values())
    assert engine.choices == choices


def test_choices_slower_than_the_fallback_on_the_whole_model_are_dropped(monkeypatch, caplog):
    monkeypatch.setattr(_choose, "measure", lambda conv, mode, x, masks: {"torch": 1.0}.get(mode, 0.1))
    runs = []

    def slower(run, candidates):  # the per-layer winners lose as a whole
        for choices in candidates.values():
            run(choices)
            runs.append(dict(choices))
        return {k: {"chosen": 2.0, "fallback": 1.0}.get(k, 3.0) for k in candidates}

    monkeypatch.setattr(_choose, "compare", slower)
    model = _model()
    x = torch.randn(2, 3, 32, 32)
    with caplog.at_level(logging.INFO, logger="ftwt.engine.sparse_engine"):
        engine = SparseEngine(model, example=x)
    assert set(runs[0].values()) != {"torch"}  # the per-layer choice was timed against the fallback
    assert set(engine.choices.values()) == {"torch"} and engine.check["fallback"] == 1.0
    assert "running PyTorch's ops" in caplog.text
    with torch.no_grad():
        assert _close(engine(x), model(x))


def test_every_unit_dense_is_kept_when_fastest_on_the_whole_model(monkeypatch, caplog):
    # Per layer PyTorch's ops win, but as a whole the dense units (one fixed shape each) are faster.
    monkeypatch.setattr(_choose, "measure", lambda conv, mode, x, masks: {"torch": 1.0}.get(mode, 2.0))
    timed = {}

    def dense_wins(run, candidates):
        timed.update(candidates)
        return {k: 0.5 if k == "dense" else 1.0 for k in candidates}

    monkeypatch.setattr(_choose, "compare", dense_wins)
    model = _model()
    x = torch.randn(2, 3, 32, 32)
    with caplog.at_level(logging.INFO, logger="ftwt.engine.sparse_engine"):
        engine = SparseEngine(model, example=x)
    assert "chosen" in timed and "dense" in timed and "fallback" not in timed  # chosen is torch everywhere: timed once
    for name, conv in engine.plan.convs.items():
        assert engine.choices[name] == ("dense" if conv.unit is not None else "torch"), name
    assert "every gated unit densely" in caplog.text
    with torch.no_grad():
        assert _close(engine(x), model(x))
    # the dense units do more multiply-adds than the honest count PyTorch's ops on the kept blocks do
    assert engine.executed_macs(x[:1]) > SparseEngine(model, kernel="torch").executed_macs(x[:1])


def test_compare_takes_turns_and_winner_breaks_ties_in_order():
    order = []
    secs = _choose.compare(lambda c: order.append(c["a"]), {"x": {"a": "1"}, "y": {"a": "2"}})
    assert order == ["1", "2"] * _choose.REPEATS and set(secs) == {"x", "y"}
    assert _choose.winner({"chosen": 1.0, "fallback": 1.0}) == "chosen"
    assert _choose.winner({"chosen": 1.0, "fallback": 0.5, "dense": 0.7}) == "fallback"


def test_real_choice_is_recorded_and_not_slower_than_torch():
    model = _model()
    x = torch.randn(1, 3, 32, 32)
    engine = SparseEngine(model)
    assert set(engine.choices.values()) == {"pending"}
    with torch.no_grad():
        out = engine(x)  # the first call chooses
        assert _close(out, model(x))
    assert "pending" not in engine.choices.values()
    assert engine.check == {}  # checked as a whole only on an example given to calibrate
    engine.calibrate(torch.randn(2, 3, 32, 32))
    if engine.check:  # the whole engine runs the fastest candidate it timed
        assert engine.check[_choose.winner(engine.check)] == min(engine.check.values())
    for name, times in engine.timings.items():
        assert set(times) == set(engine.plan.convs[name].modes)
        assert times[engine.choices[name]] <= times["torch"]
    fixed = SparseEngine(model, kernel="torch")
    assert set(fixed.choices.values()) == {"torch"} and fixed.timings == {}


def test_dense_units_report_their_executed_macs():
    model = _model(threshold=0.8)
    x = torch.randn(1, 3, 32, 32)
    engine = SparseEngine(model, kernel="torch")
    honest = engine.executed_macs(x)
    engine.set_choices({u.name: "dense" for u in gated_units(model)})
    with torch.no_grad():
        assert _close(engine(x), model(x))
    # Every gated unit dense: the dense model's multiply-adds plus the gates' linear layers.
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        detach_gates(copy.deepcopy(model))(x)
    gates = sum(u.gate.fc.weight.numel() for u in gated_units(model))
    assert engine.executed_macs(x) == counter.get_total_flops() // 2 + gates > honest
    # Dense units hand on full outputs with the skipped filters zeroed; sparse units after
    # them trim those channels again. Mixed, per sample and on a batch's union, nothing changes.
    names = [u.name for u in gated_units(model)]
    xs = torch.randn(3, 3, 32, 32)
    for batch in ("loop", "union"):
        mixed = SparseEngine(model, kernel="torch", batch=batch)
        mixed.set_choices({n: "dense" if i % 2 else "torch" for i, n in enumerate(names)})
        with torch.no_grad():
            assert _close(mixed(xs), model(xs)), batch
    with pytest.raises(ConfigError, match="unknown"):
        engine.set_choices({"nope": "dense"})
    with pytest.raises(ConfigError, match="mode"):
        engine.set_choices({gated_units(model)[0].name: "fast"})


def test_max_pool_runs_in_the_layout_timed_fastest(monkeypatch):
    from ftwt.engine import _channelwise

    calls = []

    def fake_fastest(fn, options, repeats=3):  # a CPU where NCHW wins, as in PyTorch's scalar build
        calls.append(options)
        return torch.contiguous_format

    monkeypatch.setattr(_channelwise, "_fastest", fake_fastest)
    pool = _channelwise._max_pool(3, 2, 1)
    x = torch.rand(1, 16, 64, 64).contiguous(memory_format=torch.channels_last)
    ref = torch.nn.functional.max_pool2d(x.contiguous(), 3, 2, 1)
    for _ in range(3):  # timed once per input shape and layout
        y = pool(x)
        assert torch.equal(y, ref) and y.is_contiguous()
    assert len(calls) == 1 and torch.channels_last in calls[0]
    small = torch.rand(1, 4, 8, 8)  # too small to time: runs as it comes
    assert torch.equal(pool(small), torch.nn.functional.max_pool2d(small, 3, 2, 1)) and len(calls) == 1


def test_fastest_takes_the_quickest_option():
    import time

    from ftwt.engine._channelwise import _fastest

    assert _fastest(lambda delay: time.sleep(delay), (0.02, 0.0, 0.01)) == 0.0
