"""BatchNorm folding: an eval-mode ``BatchNorm2d`` after a convolution is an affine map per
output channel, so it can be merged into the convolution's weight and bias once, at build
time, instead of being applied to every activation at run time.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ftwt.errors import ConfigError


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight and bias of ``bn(conv(x))`` as one convolution, with the BN in eval mode.

    ``bn(y) = (y - mean) / sqrt(var + eps) * gamma + beta`` per channel, so with
    ``s = gamma / sqrt(var + eps)`` the folded convolution has weight ``W * s`` and bias
    ``(b - mean) * s + beta``. Pure: neither module is changed.

    Args:
        conv: the convolution.
        bn: the BatchNorm applied to its output, or None (the conv's own parameters are
            returned, detached).

    Returns:
        ``(weight, bias)``: weight shaped like ``conv.weight``; bias ``(C_out,)``, or None
        when there is neither a conv bias nor a BN.

    Raises:
        ConfigError: the BN has no running statistics or does not match the conv's width.

    Example:
        >>> conv, bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8).eval()
        >>> w, b = fold_bn(conv, bn)
        >>> x = torch.randn(1, 3, 8, 8)
        >>> torch.allclose(nn.functional.conv2d(x, w, b), bn(conv(x)), atol=1e-6)
        True
    """
    weight = conv.weight.detach()
    bias = conv.bias.detach() if conv.bias is not None else None
    if bn is None:
        return weight.clone(), None if bias is None else bias.clone()
    if bn.running_mean is None or bn.running_var is None:
        raise ConfigError(f"{type(bn).__name__} without running statistics cannot be folded")
    if bn.num_features != conv.out_channels:
        raise ConfigError(f"BatchNorm of {bn.num_features} channels after a conv of {conv.out_channels} filters")
    # Fold in float64 so the folded layer matches conv-then-BN to float32 rounding.
    var = bn.running_var.detach().double()
    mean = bn.running_mean.detach().double()
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    if bias is not None:
        shift = shift + bias.double() * scale
    folded = weight.double() * scale.view(-1, *([1] * (weight.dim() - 1)))
    return folded.to(weight.dtype), shift.to(weight.dtype)


def fold_model(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, int]:
    """A copy of a plain eval-mode model with each BatchNorm folded into the convolution that feeds it.

    Pairs are found by running ``example`` once: a ``BatchNorm2d`` whose input is the very
    tensor a ``Conv2d`` (called once) returned. This needs no tracing, so it works on models
    ``torch.fx`` cannot trace. The folded copy's output is checked against the original's on
    ``example``; where it differs (a conv output that something else also reads), nothing is
    folded.

    Returns:
        ``(model, folded)``: the copy and how many BatchNorms were folded (0: an unchanged copy).
    """
    source, model = model, copy.deepcopy(model).eval()
    # Output tensor id -> (conv, the tensor): holding the tensors keeps their ids from being reused.
    produced: dict[int, tuple[nn.Module, Any]] = {}
    pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]] = []
    calls: dict[nn.Module, int] = {}

    def on_conv(conv: nn.Module, _: Any, out: Any) -> None:
        calls[conv] = calls.get(conv, 0) + 1
        produced[id(out)] = (conv, out)

    def on_bn(bn: nn.Module, args: Any) -> None:
        calls[bn] = calls.get(bn, 0) + 1
        if id(args[0]) in produced:
            pairs.append((produced[id(args[0])][0], bn))

    hooks = [m.register_forward_hook(on_conv) for m in model.modules() if type(m) is nn.Conv2d]
    hooks += [m.register_forward_pre_hook(on_bn) for m in model.modules() if type(m) is nn.BatchNorm2d]
    with torch.no_grad():
        reference = model(example)
    for h in hooks:
        h.remove()
    produced.clear()
    pairs = [(c, b) for c, b in pairs if calls[c] == 1 and calls[b] == 1 and b.track_running_stats]
    if not pairs:
        return model, 0
    folded_bns = {id(b) for _, b in pairs}
    for conv, bn in pairs:
        weight, bias = fold_bn(conv, bn)
        conv.weight = nn.Parameter(weight, requires_grad=False)
        conv.bias = nn.Parameter(bias, requires_grad=False)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if id(child) in folded_bns:
                setattr(parent, name, nn.Identity())
    with torch.no_grad():
        out = model(example)
    scale = max(float(reference.abs().max()), 1e-12) if isinstance(reference, torch.Tensor) else 1.0
    if not isinstance(out, torch.Tensor) or float((out - reference).abs().max()) > 1e-4 * scale:
        return copy.deepcopy(source).eval(), 0
    return model, len(pairs)
