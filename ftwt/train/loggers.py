"""Epoch loggers for :class:`~ftwt.train.Trainer` callbacks: a CSV file or TensorBoard.

``metrics.jsonl`` always holds every epoch; these write the same numbers where other tools
read them. Pass one as a callback, or ``--logger csv|tensorboard`` to ``ftwt train``.

Example:
    >>> trainer = Trainer(config, callbacks=[make_logger("csv")])
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from ftwt.errors import ConfigError

LOGGERS = ("csv", "tensorboard")


class CSVLogger:
    """Appends each epoch's numbers to ``metrics.csv`` in ``out_dir`` (default: the run's folder), on rank 0."""

    def __init__(self, out_dir: str | os.PathLike | None = None) -> None:
        self.out_dir, self._fields = out_dir, None

    def __call__(self, trainer: Any, metrics: dict[str, Any]) -> None:
        if not trainer.is_main:
            return
        self.path = Path(self.out_dir if self.out_dir is not None else trainer.out) / "metrics.csv"
        if trainer.start_epoch == 0 and metrics["epoch"] == 1:
            self.path.unlink(missing_ok=True)  # a fresh run, not a resumed one
        if self._fields is None:
            if self.path.exists() and self.path.stat().st_size:
                with self.path.open(newline="") as f:
                    self._fields = next(csv.reader(f))
            else:
                self._fields = [k for k, v in metrics.items() if v is None or isinstance(v, (int, float, bool))]
        new = not self.path.exists() or not self.path.stat().st_size
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, self._fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(metrics)


class TensorBoardLogger:
    """Writes each epoch's numbers as TensorBoard scalars in ``out_dir`` (default: the run's ``tensorboard``), rank 0."""

    def __init__(self, out_dir: str | os.PathLike | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("--logger tensorboard needs the tensorboard package (pip install tensorboard); "
                              "or use --logger csv") from None
        self._writer_type, self.log_dir, self._writer = SummaryWriter, out_dir, None

    def __call__(self, trainer: Any, metrics: dict[str, Any]) -> None:
        if not trainer.is_main:
            return
        if self._writer is None:
            log_dir = self.log_dir if self.log_dir is not None else Path(trainer.out) / "tensorboard"
            self._writer = self._writer_type(log_dir=str(log_dir))
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch":
                self._writer.add_scalar(key.replace("val_", "val/", 1) if key.startswith("val_") else f"train/{key}",
                                        value, metrics["epoch"])
        self._writer.flush()


def make_logger(kind: str, out_dir: str | os.PathLike | None = None) -> CSVLogger | TensorBoardLogger:
    """The logger named ``kind`` (one of :data:`LOGGERS`) writing into ``out_dir`` (default: the run's folder).

    Raises:
        ConfigError: unknown kind, or TensorBoard asked for but not installed.
    """
    if kind == "csv":
        return CSVLogger(out_dir)
    if kind == "tensorboard":
        return TensorBoardLogger(out_dir)
    raise ConfigError(f"unknown logger {kind!r}; choose one of: {', '.join(LOGGERS)}")


__all__ = ["LOGGERS", "CSVLogger", "TensorBoardLogger", "make_logger"]
