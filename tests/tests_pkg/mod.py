"""A small CNN as a user would write it: a residual add and a depthwise convolution."""

import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)  # depthwise
        self.dw_bn = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 8, 1, bias=False)
        self.pw_bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = torch.relu(self.dw_bn(self.dw(x)))
        x = torch.relu(x + self.pw_bn(self.pw(y)))  # residual add
        return self.head(x.mean((2, 3)))


def factory(num_classes: int = 10) -> TinyNet:
    return TinyNet(num_classes)
