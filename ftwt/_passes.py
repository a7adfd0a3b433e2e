"""Helpers for one pass of a model over a loader, on one process or many."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def batches(loader: Iterable[Any], max_batches: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            return
        if isinstance(batch, (tuple, list)):
            yield batch[0], batch[1] if len(batch) > 1 else None
        else:
            yield batch, None


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP / DataParallel / ``torch.compile`` wrapper: gates and hooks live there."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def all_reduce(tensor: torch.Tensor, device: torch.device, op: Any = None) -> torch.Tensor:
    """Sum (or ``op``) ``tensor`` over all processes; NCCL needs it on the GPU."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("distributed=True but torch.distributed is not initialised")
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    buf = tensor.to(on)
    dist.all_reduce(buf, op=op if op is not None else dist.ReduceOp.SUM)
    return buf.cpu()


class Sums:
    """Named float64 sums packed into one vector for a single ``all_reduce``."""

    def __init__(self) -> None:
        self.parts: dict[str, torch.Tensor] = {}

    def add(self, name: str, value: torch.Tensor | list[float]) -> None:
        self.parts[name] = torch.as_tensor(value, dtype=torch.float64).cpu()

    def reduce(self, device: torch.device) -> None:
        flat = torch.cat([t.flatten() for t in self.parts.values()])
        flat = all_reduce(flat, device)
        offset = 0
        for name, t in self.parts.items():
            self.parts[name] = flat[offset : offset + t.numel()].view_as(t)
            offset += t.numel()

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.parts[name]
