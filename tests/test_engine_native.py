"""The engine's native kernels: the same numbers as PyTorch's ops, and a clean fallback without them."""

import logging
import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_bn
from torch.utils.flop_counter import FlopCounterMode

from ftwt import ConfigError, DeviceError, GateConfig, attach_gates, get_model
from ftwt.engine import SparseEngine, _native

pytestmark = pytest.mark.usefixtures("one_thread")


def _native_or_skip() -> None:
    # CI sets FTWT_REQUIRE_NATIVE=1: there a kernel that fails to build is a failure, not a skip.
    if os.environ.get("FTWT_REQUIRE_NATIVE") == "1":
        assert _native.available("native")
    elif not _native.available("auto"):
        pytest.skip("the native kernels cannot be built here (no C++ compiler or ninja)")


def _reference(w, cols, outs, ins, taps, bias):
    block = w.view(w.shape[0], -1, taps)[outs][:, ins].reshape(len(outs), -1)
    y = block @ cols
    return y if bias is None else y + bias[outs, None]


@pytest.mark.parametrize("taps", [1, 9])
@pytest.mark.parametrize("positions", [1, 3, 4, 7, 8, 17, 33, 70])
def test_gather_mm_equals_gather_then_matmul(taps, positions):
    _native_or_skip()
    g = torch.Generator().manual_seed(positions * taps)
    w = torch.randn(21, 13 * taps, generator=g)
    outs = torch.randperm(21, generator=g)[:11].sort().values  # a short last tile of rows
    ins = torch.randperm(13, generator=g)[:6]  # any order: cols follow it
    cols = torch.randn(6 * taps, positions, generator=g)
    bias = torch.randn(21, generator=g)
    for b in (None, bias):
        got = _native.gather_mm(w, cols, outs, ins, taps, b)
        assert torch.allclose(got, _reference(w, cols, outs, ins, taps, b), rtol=1e-5, atol=1e-5)
    # Counted as a matrix product of the block: 2 flops per multiply-add.
    counter = FlopCounterMode(display=False)
    with counter:
        _native.gather_mm(w, cols, outs, ins, taps, None)
    assert counter.get_total_flops() == 2 * 11 * 6 * taps * positions


@pytest.mark.parametrize("taps", [1, 9])
@pytest.mark.parametrize("positions", [1, 2, 3, 4, 5])
def test_gather_dot_equals_gather_then_matmul(taps, positions):
    _native_or_skip()
    g = torch.Generator().manual_seed(positions * taps + 7)
    w, bias = torch.randn(21, 40 * taps, generator=g), torch.randn(21, generator=g)
    # Runs of consecutive inputs (one contiguous stretch of weights), single ones, the last input, any order.
    ins = torch.tensor([0, 1, 2, 3, 4, 5, 9, 11, 12, 30, 39, 20, 21])
    for n_out in (1, 3, 4, 5, 11, 21):  # full and short blocks of filters
        outs = torch.randperm(21, generator=g)[:n_out].sort().values
        cols_t = torch.randn(positions, len(ins) * taps, generator=g)
        for b in (None, bias):
            got = _native.gather_dot(w, cols_t, outs, ins, taps, b)
            ref = _reference(w, cols_t.t(), outs, ins, taps, b)
            assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5), n_out
    counter = FlopCounterMode(display=False)
    with counter:
        _native.gather_dot(w, cols_t, outs, ins, taps, None)
    assert counter.get_total_flops() == 2 * 21 * len(ins) * taps * positions
    with pytest.raises(RuntimeError, match="input index out of range"):
        _native.gather_dot(w, torch.randn(positions, taps), outs, torch.tensor([40]), taps, None)


@pytest.mark.parametrize("kernel,stride,padding,dilation", [
    ((3, 3), (1, 1), (1, 1), (1, 1)),
    ((3, 3), (2, 1), (1, 2), (1, 2)),
    ((1, 1), (2, 2), (0, 0), (1, 1)),
    ((5, 3), (1, 2), (0, 1), (2, 1)),
])
def test_conv_gather_equals_conv2d_of_the_cut_weight(kernel, stride, padding, dilation):
    _native_or_skip()
    g = torch.Generator().manual_seed(sum(kernel + stride + padding + dilation))
    w = torch.randn(10, 8, *kernel, generator=g)
    bias = torch.randn(10, generator=g)
    outs, ins = torch.tensor([0, 3, 4, 5, 6, 7, 8, 9, 1]), torch.tensor([1, 2, 5, 7, 0])
    # Maps of many positions (gather_mm) and of a few (gather_dot: VGG's 2x2 at batch 1).
    for shape in ((2, 5, 11, 9), (1, 5, 2, 2), (1, 5, 3, 1), (1, 5, 9, 3)):
        if any(s + 2 * p < d * (k - 1) + 1 for s, p, d, k in zip(shape[2:], padding, dilation, kernel, strict=True)):
            continue  # the kernel does not fit this map
        x = torch.randn(*shape, generator=g)
        ref = F.conv2d(x, w[outs][:, ins], bias[outs], stride, padding, dilation)
        got = _native.conv_gather(x, w.view(10, -1), outs, ins, kernel, stride, padding, dilation, bias)
        assert torch.allclose(got, ref.transpose(0, 1).reshape(len(outs), -1), rtol=1e-5, atol=1e-5), shape
    x = torch.randn(2, 5, 11, 9, generator=g)
    ref = F.conv2d(x, w[outs][:, ins], bias[outs], stride, padding, dilation)
    counter = FlopCounterMode(display=False)
    with counter:
        _native.conv_gather(x[:1], w.view(10, -1), outs, ins, kernel, stride, padding, dilation, None)
    assert counter.get_total_flops() == 2 * len(outs) * len(ins) * kernel[0] * kernel[1] * ref[0, 0].numel()


# Maps and filter counts that reach every tiling of the direct convolution on any vector width:
# rows split in segments with a partial last one, two short rows per vector (an odd last row
# alone), rows too short for either (im2col), full, half and repeated filter blocks, and bands of
# rows or groups of filters per thread; layers where the weights are the larger operand and
# their blocks go outer; bands large enough that the weights are packed first; 3x3 kernels at
# stride 1 and 2, whose taps are unrolled, next to other kernels, strides and dilations.
_DIRECT_CASES = [
    # (n, c, h, w, filters, kernel, stride, padding, dilation)
    (1, 6, 12, 40, 9, 3, 1, 1, 1),
    (1, 5, 9, 7, 3, 3, 1, 1, 1),
    (2, 4, 7, 5, 17, 3, 2, 1, 1),
    (1, 3, 23, 21, 25, 7, 2, 3, 1),
    (3, 7, 10, 13, 5, 3, 1, 2, 2),
    (1, 8, 16, 16, 8, 1, 1, 0, 1),
    (1, 4, 11, 11, 6, 3, 3, 1, 1),
    (1, 9, 6, 3, 4, 3, 1, 1, 1),
    (1, 10, 4, 8, 20, 3, 1, 1, 1),
    (1, 512, 5, 14, 12, 3, 1, 1, 1),
    (1, 20, 24, 24, 13, 3, 1, 1, 1),  # bands of 512 positions or more: weights packed first
    (1, 16, 24, 24, 150, 3, 1, 1, 1),  # ... block by block, the weights outer
    (1, 6, 64, 32, 10, 3, 2, 1, 1),  # 3x3 at stride 2 (its taps unrolled), packed on one thread
    (1, 5, 16, 8, 7, 3, 2, 1, 1),  # ... two short rows per vector where the lanes allow
    (1, 3, 9, 11, 5, 3, 2, 0, 1),  # ... no padding, an odd width: the phases differ in length
    (1, 6, 32, 32, 11, 1, 2, 0, 1),  # a strided 1x1 kernel: subsampled, then at stride 1
    (2, 7, 13, 18, 9, 1, 2, 0, 1),  # ... odd height, rows too short for the vectors
]


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", _DIRECT_CASES)
def test_conv_gather_direct_tilings_equal_conv2d(case, threads, layout):
    _native_or_skip()
    n, c, h, w, filters, k, s, p, d = case
    g = torch.Generator().manual_seed(h * w + filters)
    weight = torch.randn(filters + 3, c + 2, k, k, generator=g)
    bias = torch.randn(filters + 3, generator=g)
    outs = torch.randperm(filters + 3, generator=g)[:filters].sort().values
    ins = torch.randperm(c + 2, generator=g)[:c].sort().values
    x = torch.randn(n, c, h, w, generator=g).contiguous(memory_format=layout)  # channels-last: read in place
    ref = F.conv2d(x, weight[outs][:, ins], bias[outs], s, p, d)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = _native.conv_gather(x, weight.view(filters + 3, -1), outs, ins, (k, k), (s, s), (p, p), (d, d), bias)
    finally:
        torch.set_num_threads(previous)
    want = ref.transpose(0, 1).reshape(filters, -1)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item()), case


def test_gather_mm_refuses_bad_indices_and_shapes():
    _native_or_skip()
    w, cols = torch.randn(4, 6), torch.randn(3, 2)
    with pytest.raises(RuntimeError, match="output index out of range"):
        _native.gather_mm(w, cols, torch.tensor([4]), torch.tensor([0, 1, 2]), 1, None)
    with pytest.raises(RuntimeError, match="input index out of range"):
        _native.gather_mm(w, cols, torch.tensor([0]), torch.tensor([0, 1, 6]), 1, None)
    with pytest.raises(RuntimeError, match="rows"):
        _native.gather_mm(w, cols, torch.tensor([0]), torch.tensor([0, 1]), 1, None)


@pytest.mark.parametrize("a_idx,b_idx", [([0, 2, 5], [1, 2, 6]), ([3], [0, 1]), ([], [4, 5]), ([1, 4], [1, 4])])
def test_union_add_equals_adding_the_full_tensors(a_idx, b_idx):
    _native_or_skip()
    g = torch.Generator().manual_seed(len(a_idx) + 10 * len(b_idx))
    a_idx, b_idx = torch.tensor(a_idx, dtype=torch.long), torch.tensor(b_idx, dtype=torch.long)
    a, b = torch.randn(2, len(a_idx), 3, 5, generator=g), torch.randn(2, len(b_idx), 3, 5, generator=g)
    full_a, full_b = torch.zeros(2, 7, 3, 5), torch.zeros(2, 7, 3, 5)
    full_a[:, a_idx], full_b[:, b_idx] = a, b
    data, union = _native.union_add(a, a_idx, b, b_idx)
    expected = sorted(set(a_idx.tolist()) | set(b_idx.tolist()))
    assert union.tolist() == expected
    assert torch.equal(data, (full_a + full_b)[:, expected])  # the same float sums, bit for bit


@pytest.mark.parametrize("softmax", [False, True])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_gate_live_equals_pool_linear_and_liveness(softmax, layout):
    _native_or_skip()
    g = torch.Generator().manual_seed(1)
    data = torch.rand(1, 5, 3, 4, generator=g)
    data[:, [1, 3]] = 0  # two dead channels
    idx = torch.tensor([0, 2, 3, 6, 7])
    w, b = torch.randn(9, 8, generator=g), torch.randn(9, generator=g)
    # Channels-last (oneDNN's output) is read in place, not copied.
    logits, kept, live = _native.gate_live(data.contiguous(memory_format=layout), idx, 8, w, b, softmax, 0.5)
    pooled = torch.zeros(1, 8)
    pooled[0, idx] = data.mean((2, 3))[0]
    z = pooled.softmax(1) if softmax else pooled
    expected = F.linear(z, w, b)
    assert torch.allclose(logits, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(kept, (torch.sigmoid(expected[0]) > 0.5).nonzero().squeeze(1))
    assert live.tolist() == [0, 2, 4]


@pytest.mark.parametrize("name", ["vgg11_bn", "resnet20", "mobilenet_v2_cifar"])
def test_native_and_torch_kernels_agree_in_outputs_and_macs(name):
    _native_or_skip()
    model = attach_gates(randomize_bn(get_model(name, num_classes=10)), GateConfig(threshold=0.85)).eval()
    native, plain = SparseEngine(model, kernel="native"), SparseEngine(model, kernel="torch")
    assert native.native and not plain.native
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    for engine in (native, plain):
        assert torch.allclose(engine(x), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    macs = []
    for engine in (native, plain):
        counter = FlopCounterMode(display=False)
        with counter:
            engine(x[:1])
        macs.append(counter.get_total_flops())
    assert macs[0] == macs[1]


def test_without_a_compiler_the_engine_warns_and_uses_torch_ops(monkeypatch, caplog):
    model = attach_gates(randomize_bn(get_model("resnet20", num_classes=10))).eval()
    monkeypatch.setattr(_native, "_load", lambda: "CalledProcessError: no C++ compiler")
    _native._warn_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="ftwt.engine._native"):
        engine = SparseEngine(model)
    assert not engine.native
    assert "no C++ compiler" in caplog.text and "PyTorch ops" in caplog.text
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(engine(x), model(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(DeviceError, match="no C\\+\\+ compiler"):
        SparseEngine(model, kernel="native")
    with pytest.raises(ConfigError, match="kernel"):
        SparseEngine(model, kernel="cuda")


_VARIANT_CHECK = """
import os, sys, torch
from torch.utils.flop_counter import FlopCounterMode
from ftwt import GateConfig, attach_gates, get_model
from ftwt.engine import SparseEngine, _native
torch.set_num_threads(1)
why = _native._load()
if why is not None:
    print("UNAVAILABLE", why)
    sys.exit(3)
assert _native.loaded_isa() == os.environ["FTWT_ENGINE_ISA"], _native.loaded_isa()
g = torch.Generator().manual_seed(0)
for n_out in (1, 2, 3, 5, 6, 7, 13, 21):  # full, half and repeated-row blocks of any register blocking
    for positions in (1, 3, 4, 7, 8, 15, 16, 17, 31, 32, 33, 70):
        taps = 9 if positions % 2 else 1
        w, bias = torch.randn(21, 5 * taps, generator=g), torch.randn(21, generator=g)
        outs, ins = torch.randperm(21, generator=g)[:n_out].sort().values, torch.tensor([4, 0, 2])
        cols = torch.randn(3 * taps, positions, generator=g)
        ref = w.view(21, 5, taps)[outs][:, ins].reshape(n_out, -1) @ cols + bias[outs, None]
        got = _native.gather_mm(w, cols, outs, ins, taps, bias)
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5), (n_out, positions)
        if positions <= 5:
            got = _native.gather_dot(w, cols.t().contiguous(), outs, ins, taps, bias)
            assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5), ("dot", n_out, positions)
import torch.nn.functional as F
for n, c, h, w, n_out, k, s in ((1, 6, 12, 40, 9, 3, 1), (2, 5, 9, 4, 7, 3, 1), (1, 3, 15, 15, 13, 5, 2), (1, 300, 5, 5, 9, 3, 1)):
    for threads in (1, 2):
        torch.set_num_threads(threads)
        wt, bias = torch.randn(n_out, c, k, k, generator=g), torch.randn(n_out, generator=g)
        x = torch.randn(n, c, h, w, generator=g)
        ref = F.conv2d(x, wt, bias, s, k // 2).transpose(0, 1).reshape(n_out, -1)
        got = _native.conv_gather(x, wt.view(n_out, -1), torch.arange(n_out), torch.arange(c), (k, k), (s, s), (k // 2, k // 2), (1, 1), bias)
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item()), ("conv", n, c, h, w, threads)
torch.set_num_threads(1)
model = attach_gates(get_model("vgg11_bn", num_classes=10), GateConfig(threshold=0.85)).eval()
x = torch.randn(1, 3, 32, 32)
native, plain = SparseEngine(model, kernel="native"), SparseEngine(model, kernel="torch")
with torch.no_grad():
    ref = model(x)
    assert torch.allclose(native(x), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
macs = []
for engine in (native, plain):
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        engine(x)
    macs.append(counter.get_total_flops())
assert macs[0] == macs[1], macs
print("OK", _native.loaded_isa())
"""


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="an x86 build variant")
@pytest.mark.skipif(_native.best_isa() not in ("avx2", "avx512"), reason="the CPU lacks AVX2 (x86-64-v3)")
def test_the_avx2_build_variant_matches_pytorch_in_outputs_and_macs():
    # Built with -march=x86-64-v3 in a fresh process (one variant per process), whatever this CPU's best ISA.
    env = {**os.environ, _native.ISA_ENV: "avx2"}
    out = subprocess.run([sys.executable, "-c", _VARIANT_CHECK], capture_output=True, text=True, env=env, timeout=600)
    if out.returncode == 3 and os.environ.get("FTWT_REQUIRE_NATIVE") != "1":
        pytest.skip(f"the native kernels cannot be built here: {out.stdout.strip()}")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().splitlines()[-1] == "OK avx2"


def test_isa_variant_requests_are_checked(monkeypatch):
    monkeypatch.setenv(_native.ISA_ENV, "avx1024")
    with pytest.raises(DeviceError, match="not a kernel variant"):
        _native.isa()
    monkeypatch.setattr(_native, "best_isa", lambda: "x86-64")
    monkeypatch.setenv(_native.ISA_ENV, "avx512")
    with pytest.raises(DeviceError, match="runs only"):
        _native.isa()
    monkeypatch.setenv(_native.ISA_ENV, "x86-64")
    assert _native.isa() == "x86-64"
    monkeypatch.delenv(_native.ISA_ENV)
    assert _native.isa() == "x86-64"
