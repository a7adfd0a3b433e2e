"""The run folder: what a :class:`~ftwt.train.Trainer` checks and writes there besides checkpoints.

``config.yaml`` at the start, ``metrics.jsonl`` (one JSON line per epoch; a resume drops
the lines of the epochs it redoes) and ``training.png`` at the end.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from ftwt._io import FolderLock, atomic_write_text, check_writable
from ftwt.errors import ConfigError
from ftwt.plots import plot_training
from ftwt.train.config import TrainConfig


def check_out_dir(out: Path, overwrite: bool, resume_path: str | None) -> None:
    """Refuse a folder a live run holds, one that cannot be written, or one with a run not being resumed."""
    FolderLock(out).check_free()
    check_writable(out)
    resuming_here = resume_path is not None and Path(resume_path).resolve().parent == out.resolve()
    if (out / "last.pt").exists() and not overwrite and not resuming_here:
        raise ConfigError(f"{out} already holds a run (last.pt); resume it with --resume "
                          f"{out / 'last.pt'}, pass --overwrite, or choose another output folder")


def start_files(out: Path, cfg: TrainConfig, start_epoch: int) -> None:
    """Write ``config.yaml``; drop the metrics lines of epochs after the checkpoint (redone now)."""
    atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    path = out / "metrics.jsonl"
    if start_epoch == 0:
        path.unlink(missing_ok=True)
    elif path.exists():
        keep = [ln for ln in path.read_text().splitlines() if (e := epoch_of(ln)) is not None and e <= start_epoch]
        atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def read_metrics(out: Path) -> list[dict[str, Any]]:
    """The epochs in ``out/metrics.jsonl`` (none if it is missing; a line a kill cut short left out)."""
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(ln) for ln in lines if epoch_of(ln) is not None]


def plot_curves(out: Path) -> None:
    """``training.png``: loss, top-1 and FLOPs reduction of every epoch in ``metrics.jsonl``."""
    metrics = read_metrics(out)
    if metrics:
        plot_training(metrics, out / "training.png")


def epoch_of(line: str) -> int | None:
    """The epoch of a metrics line; None for a line a kill cut short."""
    try:
        return int(json.loads(line)["epoch"])
    except (ValueError, KeyError, TypeError):
        return None


def inside(filename: Any, folder: Path) -> bool:
    """Whether an ``OSError``'s file lies in ``folder`` (the run's own storage failed)."""
    return filename is not None and Path(str(filename)).absolute().is_relative_to(folder.absolute())


__all__ = ["check_out_dir", "epoch_of", "inside", "plot_curves", "read_metrics", "start_files"]
