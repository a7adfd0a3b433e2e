"""VGG with batch normalisation for 32x32 inputs (VGG-11/13/16/19-BN).

From "Very Deep Convolutional Networks for Large-Scale Image Recognition", Simonyan and
Zisserman, arXiv 1409.1556, with BatchNorm after every convolution and the three fully
connected layers replaced by one ``Linear(512, num_classes)``, as is usual on CIFAR.
Five 2x2 max-pools bring 32x32 down to 1x1, so the classifier sees 512 features.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ftwt.models._registry import register_model

__all__ = ["VGGCifar", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"]

NormLayer = Callable[[int], nn.Module]

# "M" marks a 2x2 max-pool; integers are 3x3 conv output channels.
CONFIGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class VGGCifar(nn.Module):
    """VGG-BN feature extractor followed by a single linear classifier.

    Args:
        config: Layer list; integers are conv widths, ``"M"`` a 2x2 max-pool.
        num_classes: Output classes.
        norm_layer: Normalisation layer constructor taking the channel count.
    """

    def __init__(
        self,
        config: Sequence[int | str],
        num_classes: int = 10,
        norm_layer: NormLayer | None = None,
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        layers: list[nn.Module] = []
        in_channels = 3
        for v in config:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            out_channels = int(v)
            # Conv bias kept (though BN makes it redundant) so the common CIFAR VGG checkpoints load.
            layers += [
                nn.Conv2d(in_channels, out_channels, 3, padding=1),
                norm_layer(out_channels),
                nn.ReLU(),
            ]
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # He init keeps activation variance stable through the ReLU stack (arXiv 1502.01852).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def _vgg(config: str, num_classes: int, **kwargs: Any) -> VGGCifar:
    return VGGCifar(CONFIGS[config], num_classes=num_classes, **kwargs)


@register_model()
def vgg11_bn(num_classes: int = 10, **kwargs: Any) -> VGGCifar:
    """VGG-11 with BatchNorm for CIFAR; arguments as :func:`vgg16_bn`."""
    return _vgg("vgg11", num_classes, **kwargs)


@register_model()
def vgg13_bn(num_classes: int = 10, **kwargs: Any) -> VGGCifar:
    """VGG-13 with BatchNorm for CIFAR; arguments as :func:`vgg16_bn`."""
    return _vgg("vgg13", num_classes, **kwargs)


@register_model()
def vgg16_bn(num_classes: int = 10, **kwargs: Any) -> VGGCifar:
    """VGG-16 with BatchNorm for CIFAR (14.73M parameters, 313.2M MACs at 32x32).

    Args:
        num_classes: Output classes.
        **kwargs: Forwarded to :class:`VGGCifar`, e.g. ``norm_layer``.

    Returns:
        The randomly initialised model.
    """
    return _vgg("vgg16", num_classes, **kwargs)


@register_model()
def vgg19_bn(num_classes: int = 10, **kwargs: Any) -> VGGCifar:
    """VGG-19 with BatchNorm for CIFAR; arguments as :func:`vgg16_bn`."""
    return _vgg("vgg19", num_classes, **kwargs)
