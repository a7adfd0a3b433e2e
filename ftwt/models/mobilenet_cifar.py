"""MobileNetV1 and MobileNetV2 adapted to 32x32 inputs.

MobileNetV1 follows "MobileNets: Efficient Convolutional Neural Networks for Mobile Vision
Applications", Howard et al., arXiv 1704.04861; MobileNetV2 follows "MobileNetV2: Inverted
Residuals and Linear Bottlenecks", Sandler et al., arXiv 1801.04381. Both use a stride-1
stem (and V2 a stride-1 second stage) so 32x32 images are not downsampled too early, as in
the common CIFAR versions of these networks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ftwt.models._registry import register_model

__all__ = [
    "DepthwiseSeparable",
    "InvertedResidual",
    "MobileNetV1Cifar",
    "MobileNetV2Cifar",
    "mobilenet_v1",
    "mobilenet_v2_cifar",
]

NormLayer = Callable[[int], nn.Module]

# Output channels of each depthwise-separable block; a tuple gives (channels, stride).
# fmt: off
V1_CONFIG: list[int | tuple[int, int]] = [
    64, (128, 2), 128, (256, 2), 256, (512, 2), 512, 512, 512, 512, 512, (1024, 2), 1024,
]
# fmt: on

# (expansion t, output channels c, repeats n, first stride s), Table 2 of arXiv 1801.04381
# with the second stage at stride 1 for 32x32 inputs.
V2_CONFIG: list[tuple[int, int, int, int]] = [
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def _init_weights(model: nn.Module) -> None:
    # He init keeps activation variance stable through the ReLU stack (arXiv 1502.01852).
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


class DepthwiseSeparable(nn.Module):
    """Depthwise 3x3 conv-BN-ReLU followed by pointwise 1x1 conv-BN-ReLU.

    Args:
        in_channels: Input channels.
        out_channels: Output channels of the pointwise convolution.
        stride: Stride of the depthwise convolution.
        norm_layer: Normalisation layer constructor taking the channel count.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        norm_layer: NormLayer | None = None,
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, stride, 1, groups=in_channels, bias=False)
        self.bn1 = norm_layer(in_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn2 = norm_layer(out_channels)
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(x)))


class MobileNetV1Cifar(nn.Module):
    """MobileNetV1 with a stride-1 stem for 32x32 inputs.

    Args:
        num_classes: Output classes.
        config: Block widths; a ``(channels, stride)`` tuple marks a downsampling block.
        norm_layer: Normalisation layer constructor taking the channel count.
    """

    def __init__(
        self,
        num_classes: int = 10,
        config: Sequence[int | tuple[int, int]] = tuple(V1_CONFIG),
        norm_layer: NormLayer | None = None,
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        self.conv1 = nn.Conv2d(3, 32, 3, 1, 1, bias=False)
        self.bn1 = norm_layer(32)
        self.relu = nn.ReLU()
        blocks = []
        in_channels = 32
        for item in config:
            out_channels, stride = item if isinstance(item, tuple) else (item, 1)
            blocks.append(DepthwiseSeparable(in_channels, out_channels, stride, norm_layer))
            in_channels = out_channels
        self.layers = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


class InvertedResidual(nn.Module):
    """MobileNetV2 bottleneck: 1x1 expand, 3x3 depthwise, linear 1x1 projection.

    The expansion conv (``conv1``/``bn1``/``relu1``) is omitted when ``expand_ratio`` is 1,
    as in torchvision. The projection ``conv3``/``bn3`` has no activation and feeds the
    residual add, which is present only when the stride is 1 and the width is unchanged.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        stride: Stride of the depthwise convolution.
        expand_ratio: Hidden width as a multiple of ``in_channels``.
        norm_layer: Normalisation layer constructor taking the channel count.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        expand_ratio: int,
        norm_layer: NormLayer | None = None,
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        hidden = in_channels * expand_ratio
        self.use_residual = stride == 1 and in_channels == out_channels
        self.has_expansion = expand_ratio != 1
        if self.has_expansion:
            self.conv1 = nn.Conv2d(in_channels, hidden, 1, bias=False)
            self.bn1 = norm_layer(hidden)
            self.relu1 = nn.ReLU6()
        self.conv2 = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
        self.bn2 = norm_layer(hidden)
        self.relu2 = nn.ReLU6()
        self.conv3 = nn.Conv2d(hidden, out_channels, 1, bias=False)
        self.bn3 = norm_layer(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        out = x
        # Python-level flags fixed at construction, so torch.fx traces a static graph.
        if self.has_expansion:
            out = self.relu1(self.bn1(self.conv1(out)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.use_residual:
            out = out + x
        return out


class MobileNetV2Cifar(nn.Module):
    """MobileNetV2 (width 1.0) with a stride-1 stem for 32x32 inputs.

    Args:
        num_classes: Output classes.
        config: ``(t, c, n, s)`` rows as in Table 2 of the paper.
        last_channels: Width of the final 1x1 convolution.
        norm_layer: Normalisation layer constructor taking the channel count.
    """

    def __init__(
        self,
        num_classes: int = 10,
        config: Sequence[tuple[int, int, int, int]] = tuple(V2_CONFIG),
        last_channels: int = 1280,
        norm_layer: NormLayer | None = None,
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        self.conv1 = nn.Conv2d(3, 32, 3, 1, 1, bias=False)
        self.bn1 = norm_layer(32)
        self.relu1 = nn.ReLU6()
        blocks = []
        in_channels = 32
        for t, c, n, s in config:
            for i in range(n):
                blocks.append(InvertedResidual(in_channels, c, s if i == 0 else 1, t, norm_layer))
                in_channels = c
        self.layers = nn.Sequential(*blocks)
        self.conv2 = nn.Conv2d(in_channels, last_channels, 1, bias=False)
        self.bn2 = norm_layer(last_channels)
        self.relu2 = nn.ReLU6()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(last_channels, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.layers(x)
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


@register_model()
def mobilenet_v1(num_classes: int = 10, **kwargs: Any) -> MobileNetV1Cifar:
    """MobileNetV1 for CIFAR (3.22M parameters, 46.35M MACs at 32x32 with 10 classes).

    The MAC count covers convolutions and the classifier; the 46.36M quoted in some tables
    matches adding thop's 5,120 operations for the final average pooling.

    Args:
        num_classes: Output classes.
        **kwargs: Forwarded to :class:`MobileNetV1Cifar`, e.g. ``norm_layer``.

    Returns:
        The randomly initialised model.
    """
    return MobileNetV1Cifar(num_classes=num_classes, **kwargs)


@register_model()
def mobilenet_v2_cifar(num_classes: int = 10, **kwargs: Any) -> MobileNetV2Cifar:
    """MobileNetV2 for CIFAR (2.24M parameters, 87.98M MACs at 32x32 with 10 classes).

    Args:
        num_classes: Output classes.
        **kwargs: Forwarded to :class:`MobileNetV2Cifar`, e.g. ``norm_layer``.

    Returns:
        The randomly initialised model.
    """
    return MobileNetV2Cifar(num_classes=num_classes, **kwargs)
