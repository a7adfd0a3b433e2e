"""CIFAR ResNets (ResNet-20/32/44/56/110) with the parameter-free "option A" shortcut.

From "Deep Residual Learning for Image Recognition", He et al., arXiv 1512.03385, Sec. 4.2:
a 3x3 stem with 16 channels, then three stages of ``n`` basic blocks with 16, 32 and 64
channels, global average pooling and a linear classifier (depth ``6n + 2``).

The state_dict layout (``conv1``, ``bn1``, ``layer1..3``, ``fc``, no shortcut parameters)
matches the widely shared CIFAR ResNet checkpoints (some name the classifier ``linear``
instead of ``fc``) and the FTWT reference code's. The layouts differ only in the
parameter-free shortcut, so a checkpoint loads with ``strict=True`` into any of them and
only the right one gives its accuracy; choose it with ``shortcut=`` (:data:`SHORTCUTS`):

- ``"reference"``: the FTWT reference code's, 2x2 average pooling, then the zero channels
  appended after the identity channels (``torch.cat([pooled, zeros], 1)``);
- ``"subsample"``: the widely shared checkpoints', ``x[:, :, ::2, ::2]``, zeros on both sides;
- ``"avgpool"``: 2x2 average pooling, zeros on both sides (the default: what ftwt built
  before the choice existed, so older checkpoints load as they were trained).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ftwt.channel_scatter import ChannelScatter, register_static_adapter
from ftwt.errors import ConfigError
from ftwt.models._registry import register_model

__all__ = [
    "BasicBlock",
    "SHORTCUTS",
    "OptionAShortcut",
    "ResNetCifar",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
]

NormLayer = Callable[[int], nn.Module]

# Option-A layouts of the checkpoints in circulation; see the module docstring.
SHORTCUTS = ("reference", "subsample", "avgpool")


def check_shortcut(shortcut: str) -> str:
    """``shortcut`` if it is one of :data:`SHORTCUTS`, else :class:`ConfigError`."""
    if shortcut not in SHORTCUTS:
        raise ConfigError(f"unknown shortcut {shortcut!r}; choose one of: {', '.join(SHORTCUTS)}")
    return shortcut


class OptionAShortcut(nn.Module):
    """Parameter-free shortcut: downsample, then add zero channels (where: ``shortcut``).

    Args:
        in_channels: Channels of the block input.
        out_channels: Channels of the block output; the difference is zero-padded.
        stride: Spatial downsampling factor, 1 or 2.
        shortcut: The layout, one of :data:`SHORTCUTS`.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, shortcut: str = "avgpool") -> None:
        super().__init__()
        if out_channels < in_channels or (out_channels - in_channels) % 2:
            raise ValueError(f"option A needs an even channel increase, got {in_channels} -> {out_channels}")
        if stride not in (1, 2):
            raise ValueError(f"option A supports stride 1 or 2, got {stride}")
        self.stride, self.layout = stride, check_shortcut(shortcut)
        extra = out_channels - in_channels
        # zero channels before and after the identity channels
        self.before, self.after = (0, extra) if shortcut == "reference" else (extra // 2, extra // 2)

    def forward(self, x: Tensor) -> Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride] if self.layout == "subsample" else F.avg_pool2d(x, self.stride)
        # F.pad keeps the autograd graph, so the stage input receives gradient through here; for
        # "reference" it equals torch.cat([x, zeros], 1), in a form the sparse engine keeps compact.
        return F.pad(x, (0, 0, 0, 0, self.before, self.after))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, shortcut={self.layout}, zeros=({self.before}, {self.after})"


@register_static_adapter(OptionAShortcut)
def _option_a_scatter(shortcut: OptionAShortcut, in_channels: int) -> ChannelScatter:
    """Static pruning cuts the shortcut's input and output channels apart: a channel scatter."""
    return ChannelScatter.padded(in_channels, shortcut.before, shortcut.after, shortcut.stride,
                                 subsample=shortcut.layout == "subsample")


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection.

    Computes ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        stride: Stride of the first convolution.
        norm_layer: Normalisation layer constructor taking the channel count.
        shortcut: The option-A layout, one of :data:`SHORTCUTS`.
    """

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        norm_layer: NormLayer | None = None,
        shortcut: str = "avgpool",
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(out_channels)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = OptionAShortcut(in_channels, out_channels, stride, shortcut)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet for 32x32 inputs with 16/32/64-channel stages.

    Args:
        blocks_per_stage: Number of basic blocks in each of the three stages.
        num_classes: Output classes.
        norm_layer: Normalisation layer constructor taking the channel count.
        shortcut: The option-A layout of the stage transitions, one of :data:`SHORTCUTS`;
            pick the one the weights to load were trained with.
    """

    def __init__(
        self,
        blocks_per_stage: tuple[int, int, int],
        num_classes: int = 10,
        norm_layer: NormLayer | None = None,
        shortcut: str = "avgpool",
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        self.layout = check_shortcut(shortcut)
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = norm_layer(16)
        self.relu = nn.ReLU()
        self._in_channels = 16
        self.layer1 = self._make_layer(16, blocks_per_stage[0], 1, norm_layer)
        self.layer2 = self._make_layer(32, blocks_per_stage[1], 2, norm_layer)
        self.layer3 = self._make_layer(64, blocks_per_stage[2], 2, norm_layer)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        self._init_weights()

    def _make_layer(self, channels: int, num_blocks: int, stride: int, norm_layer: NormLayer) -> nn.Sequential:
        layers = []
        for i in range(num_blocks):
            layers.append(BasicBlock(self._in_channels, channels, stride if i == 0 else 1, norm_layer, self.layout))
            self._in_channels = channels
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        # He init keeps activation variance stable through the ReLU stack (arXiv 1502.01852).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def _resnet(depth: int, num_classes: int, **kwargs: Any) -> ResNetCifar:
    n = (depth - 2) // 6
    return ResNetCifar((n, n, n), num_classes=num_classes, **kwargs)


@register_model()
def resnet20(num_classes: int = 10, **kwargs: Any) -> ResNetCifar:
    """ResNet-20 for CIFAR (0.27M parameters, 40.55M MACs at 32x32).

    Args:
        num_classes: Output classes.
        **kwargs: Forwarded to :class:`ResNetCifar`, e.g. ``norm_layer`` or ``shortcut``.

    Returns:
        The randomly initialised model.

    Example:
        >>> model = resnet20(shortcut="reference")  # to load the FTWT reference code's weights
    """
    return _resnet(20, num_classes, **kwargs)


@register_model()
def resnet32(num_classes: int = 10, **kwargs: Any) -> ResNetCifar:
    """ResNet-32 for CIFAR (0.46M parameters, 68.86M MACs); arguments as :func:`resnet20`."""
    return _resnet(32, num_classes, **kwargs)


@register_model()
def resnet44(num_classes: int = 10, **kwargs: Any) -> ResNetCifar:
    """ResNet-44 for CIFAR (0.66M parameters, 97.17M MACs); arguments as :func:`resnet20`."""
    return _resnet(44, num_classes, **kwargs)


@register_model()
def resnet56(num_classes: int = 10, **kwargs: Any) -> ResNetCifar:
    """ResNet-56 for CIFAR (0.85M parameters, 125.49M MACs); arguments as :func:`resnet20`."""
    return _resnet(56, num_classes, **kwargs)


@register_model()
def resnet110(num_classes: int = 10, **kwargs: Any) -> ResNetCifar:
    """ResNet-110 for CIFAR (1.73M parameters, 252.89M MACs); arguments as :func:`resnet20`."""
    return _resnet(110, num_classes, **kwargs)
