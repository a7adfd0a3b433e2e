"""Model zoo: CIFAR ResNets, VGG-BN and MobileNets, plus torchvision models by name.

Build any model with ``get_model("resnet56", num_classes=10)`` or
``get_model("torchvision:resnet18", num_classes=100)``; see :func:`list_models`.
"""

from ftwt.models._registry import get_model, list_models, register_model
from ftwt.models.mobilenet_cifar import (
    MobileNetV1Cifar,
    MobileNetV2Cifar,
    mobilenet_v1,
    mobilenet_v2_cifar,
)
from ftwt.models.resnet_cifar import (
    SHORTCUTS,
    BasicBlock,
    OptionAShortcut,
    ResNetCifar,
    resnet20,
    resnet32,
    resnet44,
    resnet56,
    resnet110,
)
from ftwt.models.vgg_cifar import VGGCifar, vgg11_bn, vgg13_bn, vgg16_bn, vgg19_bn

__all__ = [
    "SHORTCUTS",
    "BasicBlock",
    "MobileNetV1Cifar",
    "MobileNetV2Cifar",
    "OptionAShortcut",
    "ResNetCifar",
    "VGGCifar",
    "get_model",
    "list_models",
    "mobilenet_v1",
    "mobilenet_v2_cifar",
    "register_model",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "vgg11_bn",
    "vgg13_bn",
    "vgg16_bn",
    "vgg19_bn",
]
