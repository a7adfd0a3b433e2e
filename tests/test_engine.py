"""Sparse engine: same outputs as the gated model, exactly the honest multiply-adds, clear errors."""

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_bn
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ftwt import (
    ConfigError,
    FlopsMeter,
    GateConfig,
    UnitSpec,
    UnsupportedLayerError,
    attach_gates,
    gated_units,
    get_model,
    list_models,
    mask_source,
)
from ftwt.data import DataConfig, build_datasets
from ftwt.engine import SparseEngine, _native, fold_bn, kept_filters
from ftwt.models import SHORTCUTS
from ftwt.surgery import detach_gates

MODELS = list_models() + ["torchvision:resnet18", "torchvision:mobilenet_v2"]
RTOL = 1e-4
# Fixed kernels do exactly the honest multiply-adds; "auto" may run a unit densely (more).
EXACT = "native" if _native.available("auto") else "torch"


pytestmark = pytest.mark.usefixtures("one_thread")


def _size(name: str) -> int:
    return 64 if name.startswith("torchvision:") else 32


@functools.cache
def _digits(size: int, n: int) -> torch.Tensor:
    _, val, _ = build_datasets(DataConfig(dataset="digits", image_size=size))
    return torch.stack([val[i][0] for i in range(n)])


def _gated(model: nn.Module, **kwargs) -> nn.Module:
    return attach_gates(randomize_bn(model), GateConfig(**kwargs)).eval()


def _close(out: torch.Tensor, ref: torch.Tensor) -> bool:
    return torch.allclose(out, ref, rtol=RTOL, atol=RTOL * ref.abs().max().item())


def _engine_macs(engine: SparseEngine, x: torch.Tensor, masks: dict | None = None) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        engine(x, masks=masks)
    return counter.get_total_flops() // 2


def _honest_macs_without_pooling(model: nn.Module, x: torch.Tensor, source: str) -> tuple[int, dict, torch.Tensor]:
    """Honest MACs of one sample minus the gates' pooling (FlopCounterMode does not count pooling)."""
    with mask_source(model, source), FlopsMeter(model) as meter, torch.no_grad():
        ref = model(x)
    pooling = sum(u.in_shape[1] * u.in_shape[2] * u.in_shape[3] for u in gated_units(model))
    masks = {u.name: u.mask.clone() for u in gated_units(model)}
    return round(meter.report().dynamic_macs) - pooling, masks, ref


@pytest.mark.parametrize("name", MODELS)
def test_engine_equals_gated_model_and_counts_honest_macs(name):
    model = _gated(get_model(name, num_classes=10))
    engine = SparseEngine(model, kernel=EXACT)
    size = _size(name)
    inputs = {"random": torch.randn(3, 3, size, size), "digits": _digits(size, 3)}
    for kind, x in inputs.items():
        with torch.no_grad():
            ref = model(x)
        assert _close(engine(x), ref), f"{kind} batch of 3, gates"
        with mask_source(model, "ground_truth"), torch.no_grad():
            ref = model(x)
        masks = {u.name: u.mask.clone() for u in gated_units(model)}
        assert _close(engine(x, masks=masks), ref), f"{kind} batch of 3, ground-truth masks replayed"
    # One sample: outputs and multiply-adds, with the gates' masks and with replayed ones.
    for kind, source in [(k, s) for k in inputs for s in ("gate", "ground_truth")]:
        x = inputs[kind][1:2]
        macs, masks, ref = _honest_macs_without_pooling(model, x, source)
        replay = masks if source == "ground_truth" else None
        assert _close(engine(x, masks=replay), ref), f"{kind} sample, {source} masks"
        assert _engine_macs(engine, x, replay) == macs, f"{kind} sample, {source} masks"


@pytest.mark.parametrize("name", ["resnet20", "mobilenet_v2_cifar", "torchvision:resnet18"])
def test_union_batches_and_rounding_keep_outputs(name):
    model = _gated(get_model(name, num_classes=10))
    x = torch.randn(3, 3, _size(name), _size(name))
    with torch.no_grad():
        ref = model(x)
    assert _close(SparseEngine(model, batch="union")(x), ref)
    assert _close(SparseEngine(model, round_to=8)(x), ref)
    assert _close(SparseEngine(model, round_to=8, batch="union")(x), ref)


def _assert_exact(model, x):
    """The engine equals the gated model on a batch, and on one sample does exactly its honest MACs."""
    engine = SparseEngine(model, kernel=EXACT)
    with torch.no_grad():
        ref = model(x)
    assert _close(engine(x), ref)
    macs, _, ref1 = _honest_macs_without_pooling(model, x[:1], "gate")
    assert _close(engine(x[:1]), ref1)
    assert _engine_macs(engine, x[:1]) == macs


@pytest.mark.parametrize("layout", SHORTCUTS)
def test_every_option_a_layout(layout):
    model = _gated(get_model("resnet20", num_classes=10, shortcut=layout))
    _assert_exact(model, torch.randn(2, 3, 32, 32))
    # the shortcut's downsampling (pooling or x[:, :, ::2, ::2]) runs on compact values
    from ftwt.engine._channelwise import channelwise

    shortcut = torch.fx.symbolic_trace(get_model("resnet20", shortcut=layout).layer2[0].shortcut)
    ops = [n for n in shortcut.graph.nodes if n.op == "call_function" and n.target is not F.pad]
    assert len(ops) == 1 and channelwise(ops[0], {}) is not None


@pytest.mark.parametrize("name,exclude", [("resnet20", ["layer2.*"]), ("torchvision:resnet18", ["*downsample*", "conv1"])])
def test_convs_without_gates_compute_every_filter_from_live_inputs(name, exclude):
    model = attach_gates(randomize_bn(get_model(name, num_classes=10)), exclude=exclude).eval()
    _assert_exact(model, torch.randn(2, 3, _size(name), _size(name)))


def test_empty_and_full_masks_and_a_dead_input_channel():
    model = _gated(get_model("resnet20", num_classes=10))
    x = torch.randn(2, 3, 32, 32)
    x[:, 1] = 0  # a dead input channel: the stem reads two
    masks = {u.name: torch.rand(2, u.out_channels) > 0.5 for u in gated_units(model)}
    names = list(masks)
    masks[names[1]][:] = False  # a unit that computes nothing: its block passes only the shortcut
    masks[names[2]][:] = True
    masks[names[5]][0] = False  # nothing for one sample only
    modules = dict(model.named_modules())
    handles = [
        modules[u.spec.tail].register_forward_hook(lambda mod, args, y, m=masks[u.name]: y * m[:, :, None, None])
        for u in gated_units(model)
    ]
    with mask_source(model, "none"), torch.no_grad():
        ref = model(x)
    for h in handles:
        h.remove()
    for batch in ("loop", "union"):
        assert _close(SparseEngine(model, batch=batch)(x, masks=masks), ref), batch


def test_rounding_computes_a_superset():
    model = _gated(get_model("vgg11_bn", num_classes=10))
    x = torch.randn(1, 3, 32, 32)
    macs, _, _ = _honest_macs_without_pooling(model, x, "gate")
    assert _engine_macs(SparseEngine(model, round_to=16, kernel=EXACT), x) > macs


def test_fold_bn_matches_conv_then_bn():
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    bn = randomize_bn(nn.Sequential(nn.BatchNorm2d(6)))[0].eval()
    x = torch.randn(2, 4, 5, 5)
    w, b = fold_bn(conv, bn)
    assert torch.allclose(F.conv2d(x, w, b, padding=1, groups=2), bn(conv(x)), atol=1e-5)
    w0, b0 = fold_bn(conv, None)
    assert torch.equal(w0, conv.weight) and torch.equal(b0, conv.bias) and w0 is not conv.weight
    assert fold_bn(nn.Conv2d(4, 6, 1, bias=False), None)[1] is None
    with pytest.raises(ConfigError):
        fold_bn(conv, nn.BatchNorm2d(6, track_running_stats=False))


class _Odd(nn.Module):
    """Ops the engine must handle: grouped, multiplier-depthwise and reflect-padded convs,
    channel concatenation, a standalone BatchNorm, a sigmoid gate (SE-like) and a mean."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.grouped, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False), nn.BatchNorm2d(8)
        self.dw, self.bn2 = nn.Conv2d(8, 16, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(16)
        self.reflect = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
        self.lone_bn = nn.BatchNorm2d(32)
        self.head, self.fc = nn.Conv2d(32, 12, 1), nn.Linear(12, 5)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        a = F.relu(self.bn1(self.grouped(x)))
        b = F.relu6(self.bn2(self.dw(a)))
        c = self.reflect(x)
        y = self.lone_bn(torch.cat([a, b, c], 1))
        y = y * torch.sigmoid(y.mean((2, 3), keepdim=True))
        y = F.max_pool2d(F.relu(self.head(y)), 2)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


def test_unusual_ops_widen_or_stay_compact_correctly():
    model = _gated(_Odd())
    _assert_exact(model, torch.randn(3, 3, 12, 12))


def test_bad_input_raises():
    with pytest.raises(ConfigError):
        SparseEngine(get_model("resnet20").eval())
    model = attach_gates(get_model("resnet20"))
    with pytest.raises(ConfigError):
        SparseEngine(model.train())
    engine = SparseEngine(model.eval())
    with pytest.raises(ConfigError):
        SparseEngine(model, round_to=0)
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ConfigError):
        engine(x, masks={"nope": torch.ones(1, 16, dtype=torch.bool)})
    with pytest.raises(ConfigError):
        engine(x, masks={"conv1": torch.ones(1, 15, dtype=torch.bool)})
    with pytest.raises(ConfigError):
        engine(torch.randn(2, 3, 32, 32), masks={"conv1": torch.ones(1, 16, dtype=torch.bool)})


@pytest.mark.parametrize("round_to", [1, 4])
def test_kept_filter_indices_replay_as_the_bool_masks_do(round_to):
    # The index form skips a conversion per unit and call; it must change nothing else.
    model = _gated(get_model("resnet20", num_classes=10), threshold=0.8)
    engine = SparseEngine(model, kernel=EXACT, round_to=round_to)
    x = _digits(32, 2)[1:2]
    macs, masks, ref = _honest_macs_without_pooling(model, x, "ground_truth")
    kept = kept_filters(masks)
    assert all(k.dtype == torch.int64 and k.numel() == int(masks[n].sum()) for n, k in kept.items())
    assert any(k.numel() < masks[n].shape[1] for n, k in kept.items())  # some filters skipped
    assert _close(engine(x, masks=kept), ref)
    assert torch.equal(engine(x, masks=kept), engine(x, masks=masks))
    if round_to == 1:
        assert _engine_macs(engine, x, kept) == macs
    name = next(iter(kept))
    for bad in ([0, masks[name].shape[1]], [3, 1], [-1, 2]):  # out of range, not ascending
        with pytest.raises(ConfigError, match="ascending indices below"):
            engine(x, masks={name: torch.tensor(bad)})
    with pytest.raises(ConfigError, match="int64"):
        engine(torch.cat([x, x]), masks={name: kept[name]})  # indices are for one sample
    with pytest.raises(ConfigError, match="one sample"):
        kept_filters({name: torch.cat([masks[name]] * 2)})


def test_mask_before_batchnorm_is_refused():
    # The gate masks the conv output *before* its BN, so folding the BN would be wrong.
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    attach_gates(model, units=[UnitSpec(conv="0")]).eval()
    with pytest.raises(UnsupportedLayerError, match="0"):
        SparseEngine(model)


@pytest.mark.parametrize("name", ["resnet56", "vgg16_bn"])
def test_units_keeping_every_filter_run_the_full_weight_exactly(name):
    # r = 1 keeps (almost) every filter: the full-weight channels-last kernel, the fused
    # gate/liveness reduction and the small-map conv2d path must stay exact and honest.
    model = _gated(get_model(name, num_classes=10), threshold=1.0)
    engine = SparseEngine(model, kernel=EXACT)
    for x in (_digits(32, 2)[1:2], torch.randn(1, 3, 32, 32)):
        macs, masks, ref = _honest_macs_without_pooling(model, x, "ground_truth")
        assert _close(engine(x, masks=masks), ref)
        assert _engine_macs(engine, x, masks) == macs
        every = {k: torch.ones_like(m) for k, m in masks.items()}
        with torch.no_grad():
            dense = detach_gates(copy.deepcopy(model))(x)
        assert _close(engine(x, masks=every), dense)
