"""Adapters that make model-specific modules prunable by Torch-Pruning, and the one they share.

Static pruning (:mod:`ftwt.baselines`) needs every module between convolutions to be one
whose channels Torch-Pruning knows how to cut. A model family with a parameter-free
module of its own (the CIFAR ResNets' option-A shortcut) registers an adapter here, from
its model file, that turns it into an equivalent :class:`ChannelScatter`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

# module type -> (module, its input channels) -> an equivalent module Torch-Pruning can prune
STATIC_ADAPTERS: dict[type, Callable[[Any, int], nn.Module]] = {}

AdapterT = TypeVar("AdapterT", bound=Callable[[Any, int], nn.Module])


def register_static_adapter(module_type: type) -> Callable[[AdapterT], AdapterT]:
    """Decorator: ``fn(module, in_channels)`` turns a ``module_type`` into a prunable equivalent.

    Raises:
        ValueError: ``module_type`` already has an adapter.
    """

    def wrapper(fn: AdapterT) -> AdapterT:
        if module_type in STATIC_ADAPTERS:
            raise ValueError(f"{module_type.__name__} already has a static-pruning adapter")
        STATIC_ADAPTERS[module_type] = fn
        return fn

    return wrapper


class ChannelScatter(nn.Module):
    """A parameter-free shortcut that places input channels at given output positions.

    Generalises zero-padding shortcuts (such as the CIFAR ResNets' option A: average pool
    or subsample, then zero channels) so that Torch-Pruning can prune its input and output
    channels independently: output channel ``j`` is input channel ``index[j]``, or zero where
    ``index[j] < 0``. ``stride`` downsamples first, by average pooling or, with ``subsample``,
    by taking every ``stride``-th pixel.
    """

    def __init__(self, in_channels: int, index: torch.Tensor, stride: int, subsample: bool = False) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.stride, self.subsample = stride, subsample
        # Buffers, so that .to(device) moves them; not persistent, the weights file stays as it was.
        self.register_buffer("index", index.long(), persistent=False)
        self.register_buffer("_dst", torch.empty(0, dtype=torch.long), persistent=False)
        self.register_buffer("_src", torch.empty(0, dtype=torch.long), persistent=False)
        self._refresh()

    @classmethod
    def padded(cls, in_channels: int, before: int, after: int, stride: int = 1, subsample: bool = False) -> ChannelScatter:
        """The input channels with ``before`` and ``after`` zero channels around them."""
        index = torch.full((in_channels + before + after,), -1, dtype=torch.long)
        index[before : before + in_channels] = torch.arange(in_channels)
        return cls(in_channels, index, stride, subsample)

    @property
    def out_channels(self) -> int:
        return int(self.index.numel())

    def _refresh(self) -> None:
        dst = (self.index >= 0).nonzero().flatten()
        self._dst, self._src = dst, self.index[dst]
        # The common case stays a plain pad, as cheap as the original shortcut.
        self._pad: tuple[int, int] | None = None
        n = dst.numel()
        if n == self.in_channels and n and torch.equal(self._src, torch.arange(n, device=self._src.device)):
            lo = int(dst[0])
            if int(dst[-1]) - lo + 1 == n:
                self._pad = (lo, self.out_channels - lo - n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride] if self.subsample else F.avg_pool2d(x, self.stride)
        if self._pad is not None:
            return F.pad(x, (0, 0, 0, 0, *self._pad))
        out = x.new_zeros(x.shape[0], self.out_channels, *x.shape[2:])
        return out.index_copy(1, self._dst, x.index_select(1, self._src))

    def extra_repr(self) -> str:
        return f"{self.in_channels} -> {self.out_channels}, stride={self.stride}{', subsample' if self.subsample else ''}"


def scatter_pruner(tp: Any) -> Any:
    class ScatterPruner(tp.pruner.BasePruningFunc):
        """Input and output channels of a :class:`ChannelScatter` are pruned independently."""

        TARGET_MODULES = ChannelScatter

        def prune_out_channels(self, layer: ChannelScatter, idxs: list[int]) -> ChannelScatter:
            keep = torch.ones(layer.out_channels, dtype=torch.bool)
            keep[list(idxs)] = False
            layer.index = layer.index[keep.to(layer.index.device)]
            layer._refresh()
            return layer

        def prune_in_channels(self, layer: ChannelScatter, idxs: list[int]) -> ChannelScatter:
            keep = torch.ones(layer.in_channels, dtype=torch.bool)
            keep[list(idxs)] = False
            renumber = torch.full((layer.in_channels,), -1, dtype=torch.long)
            renumber[keep] = torch.arange(int(keep.sum()))
            index = layer.index.cpu()
            valid = index >= 0
            index[valid] = renumber[index[valid]]
            layer.index = index.to(layer.index.device)
            layer.in_channels = int(keep.sum())
            layer._refresh()
            return layer

        def get_out_channels(self, layer: ChannelScatter) -> int:
            return layer.out_channels

        def get_in_channels(self, layer: ChannelScatter) -> int:
            return layer.in_channels

    return ScatterPruner()


def swap_adapted(model: nn.Module, example: torch.Tensor) -> None:
    """Replace every module that has a registered adapter by its adapted twin, in place."""
    shortcuts = {name: m for name, m in model.named_modules() if type(m) in STATIC_ADAPTERS}
    if not shortcuts:
        return
    in_channels: dict[str, int] = {}
    handles = [
        m.register_forward_pre_hook(lambda mod, args, name=name: in_channels.__setitem__(name, args[0].shape[1]))
        for name, m in shortcuts.items()
    ]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    for name, shortcut in shortcuts.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, STATIC_ADAPTERS[type(shortcut)](shortcut, in_channels[name]).to(example.device))


__all__ = ["STATIC_ADAPTERS", "ChannelScatter", "register_static_adapter", "scatter_pruner", "swap_adapted"]
