"""Which graph ops run on compact activations, and the fast CPU max-pool they use.

An op can take a :class:`~ftwt.engine._compact.Compact` value as is when it acts on each
channel alone and maps an all-zero channel to an all-zero channel: zero-preserving
activations, pooling, spatial slicing (``x[:, :, ::2, ::2]``), dropout in eval mode. Everything else sees full-width tensors.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ftwt._ops import ACTIVATIONS, activation

# Channel-wise ops that keep zero channels zero and are not unit activations (those are
# ftwt._ops.ACTIVATIONS), run out of place since compact buffers may be shared between nodes.
_EXTRA_MODULES: dict[type, Callable[[nn.Module], Callable[[torch.Tensor], torch.Tensor]]] = {
    nn.LeakyReLU: lambda m: partial(F.leaky_relu, negative_slope=m.negative_slope),
    nn.ELU: lambda m: partial(F.elu, alpha=m.alpha),
    nn.Tanh: lambda m: torch.tanh,
    nn.Identity: lambda m: _identity,
}
_EXTRA_FUNCTIONS = {F.leaky_relu, F.elu, torch.tanh, F.hardtanh}
_POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_POOL_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
_INPLACE_KW = ("inplace",)
# Max-pool inputs of at least this many values are timed in both memory layouts (smaller
# maps cost too little for the layout to matter: they run as they come).
_CHANNELS_LAST_MIN_NUMEL = 32768


def channelwise(node: torch.fx.Node, modules: dict[str, nn.Module]) -> tuple[Callable, bool | None] | None:
    """A function of the node's tensor input that maps zero channels to zero channels.

    Returns ``(fn, nonneg)`` with ``nonneg`` True when the output is always >= 0, None when
    it is >= 0 whenever the input is, False otherwise; or None when the node is not such an op.
    """
    name = activation(node, modules)
    if name is not None and (node.op != "call_function" or len(node.args) == 1):
        act = ACTIVATIONS[name]
        return act.fn, act.nonneg
    if node.op == "call_module":
        module = modules[node.target]
        if type(module) in _EXTRA_MODULES:
            return _EXTRA_MODULES[type(module)](module), None if isinstance(module, nn.Identity) else False
        if isinstance(module, nn.Hardtanh) and module.min_val <= 0 <= module.max_val:
            return partial(F.hardtanh, min_val=module.min_val, max_val=module.max_val), module.min_val >= 0 or None
        if isinstance(module, (nn.Dropout, nn.Dropout2d)) and not module.training:
            return _identity, None
        if isinstance(module, nn.MaxPool2d) and not module.return_indices:
            return _max_pool(module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode), None
        if isinstance(module, _POOL_MODULES) and not getattr(module, "return_indices", False):
            return module, None
        return None
    args, kwargs = node.args[1:], {k: v for k, v in node.kwargs.items() if k not in _INPLACE_KW}
    if any(isinstance(a, torch.fx.Node) for a in (*args, *kwargs.values())):
        return None
    target = node.target
    if node.op == "call_function" and (target in _EXTRA_FUNCTIONS or activation(node, modules)):
        if target is F.hardtanh and not _hardtanh_keeps_zero(args, kwargs):
            return None
        return _bind(target, args, kwargs), True if target in (torch.relu, F.relu, F.relu6) else False
    if node.op == "call_function" and target in _POOL_FUNCTIONS and not kwargs.get("return_indices", False):
        if target is F.max_pool2d and len(args) <= 4 and set(kwargs) <= {"stride", "padding", "dilation", "ceil_mode"}:
            names = ("stride", "padding", "dilation", "ceil_mode")
            params = {**dict(zip(names[: len(args) - 1], args[1:], strict=True)), **kwargs}
            return _max_pool(args[0] if args else kwargs["kernel_size"], **params), None
        return _bind(target, args, kwargs), None
    if node.op == "call_function" and target is operator.getitem and _spatial_slice(args):
        return _bind(operator.getitem, args, kwargs), None
    if node.op == "call_function" and target is F.dropout and kwargs.get("training", True) is False:
        return _identity, None
    if node.op == "call_method" and target == "tanh" and not args and not kwargs:
        return torch.tanh, False
    return None


def _max_pool(
    kernel_size: Any, stride: Any = None, padding: Any = 0, dilation: Any = 1, ceil_mode: bool = False
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``F.max_pool2d`` with these settings, on large CPU inputs in the memory layout timed fastest here.

    Which layout wins depends on the CPU: where PyTorch's kernels are vectorised (AVX2,
    AVX-512) its channels-last kernel is an order of magnitude faster than the NCHW one at
    batch 1 (ResNet-18's stem pool), even counting the copy; in PyTorch's scalar build the
    NCHW kernel is faster. So each input shape is timed once, as it comes, in channels-last
    and in NCHW, and the fastest kept. The values are the same every way.
    """
    k, p, d = _pair(kernel_size), _pair(padding), _pair(dilation)
    s = _pair(stride) if stride is not None and stride != [] else k
    layouts: dict[tuple[Any, ...], torch.memory_format | None] = {}  # input shape and layout -> the fastest

    def run(t: torch.Tensor, layout: torch.memory_format | None) -> torch.Tensor:
        return F.max_pool2d(t if layout is None else t.contiguous(memory_format=layout), k, s, p, d, ceil_mode)

    def pool(t: torch.Tensor) -> torch.Tensor:
        if t.dim() != 4 or t.device.type != "cpu" or t.numel() < _CHANNELS_LAST_MIN_NUMEL:
            return F.max_pool2d(t, k, s, p, d, ceil_mode)
        key = (tuple(t.shape), t.dtype, t.is_contiguous(), t.is_contiguous(memory_format=torch.channels_last))
        if key not in layouts:
            layouts[key] = _fastest(lambda layout: run(t, layout), (None, torch.channels_last, torch.contiguous_format))
        return run(t, layouts[key])

    return pool


def _fastest(fn: Callable[[Any], Any], options: tuple[Any, ...], repeats: int = 3) -> Any:
    """The option for which ``fn(option)`` ran fastest (the best of ``repeats`` calls each, after one warm-up)."""
    best: dict[int, float] = {}
    for i, option in enumerate(options):
        fn(option)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(option)
            times.append(time.perf_counter() - start)
        best[i] = min(times)
    return options[min(best, key=best.get)]


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _bind(fn: Callable, args: tuple, kwargs: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    """``t -> fn(t, *args, **kwargs)``."""
    return lambda t: fn(t, *args, **kwargs)


def _spatial_slice(args: tuple) -> bool:
    """``[:, :, ...]``: slices of the spatial dimensions only, which act on each channel alone."""
    index = args[0] if len(args) == 1 else None
    return (isinstance(index, tuple) and 2 < len(index) <= 4 and all(isinstance(i, slice) for i in index)
            and index[0] == index[1] == slice(None))


def _hardtanh_keeps_zero(args: tuple, kwargs: dict) -> bool:
    lo = kwargs.get("min_val", args[0] if args else -1.0)
    hi = kwargs.get("max_val", args[1] if len(args) > 1 else 1.0)
    return lo <= 0 <= hi


