"""Where and how a run executes: devices, processes, seeds and RNG state, data loaders."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

from ftwt.data import DataConfig, make_loaders
from ftwt.errors import ConfigError, DeviceError


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` means this process's GPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} was asked for but CUDA is not available on this machine; use cpu")
        if name == "cuda":
            name = f"cuda:{local_rank}"
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {name!r}: {exc}") from None


@dataclass
class Processes:
    """This process's place in a ``torchrun`` launch (one process without one)."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Processes:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0")) if world > 1 else 0
        return cls(world, rank, int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def join(self, device: torch.device) -> bool:
        """Join the process group unless one exists; True if this call created it (and must destroy it)."""
        if self.world == 1 or dist.is_initialized():
            return False
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return True


def seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """All RNG states, as plain data (checkpoints hold no numpy objects)."""
    import numpy as np

    version, state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": [version, list(state), gauss],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
    }


def set_rng_state(rng: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    version, state, gauss = rng["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


class Loaders:
    """Training and validation loaders whose order depends only on ``(seed, epoch)``.

    A ``DistributedSampler`` shards and shuffles the training set even on one process, and
    the loader's generator (the workers' seeds) is reseeded every epoch, so a resumed run
    draws exactly the batches the uninterrupted one would.
    """

    def __init__(self, train: Dataset, val: Dataset, cfg: DataConfig, seed: int, procs: Processes,
                 device: torch.device) -> None:
        self.seed = seed
        self.sampler = DistributedSampler(train, num_replicas=procs.world, rank=procs.rank, seed=seed)
        self.generator = torch.Generator()
        val_sampler = DistributedSampler(val, procs.world, procs.rank, shuffle=False) if procs.world > 1 else None
        self.train, self.val = make_loaders(train, val, cfg, train_sampler=self.sampler, val_sampler=val_sampler,
                                            generator=self.generator, pin_memory=device.type == "cuda",
                                            persistent_workers=False)

    def seed_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.generator.manual_seed(self.seed * 100_003 + epoch)


__all__ = ["Loaders", "Processes", "resolve_device", "rng_state", "seed_everything", "set_rng_state"]
