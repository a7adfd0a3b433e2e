"""BatchNorm folding: an eval-mode ``BatchNorm2d`` after a convolution is an affine map per
output channel, so it can be merged into the convolution's weight and bias once, at build
time, instead of being applied to every activation at run time.
"""

from __future__ import annotations

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
