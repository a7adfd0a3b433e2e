"""The training loop: dense baselines and FTWT gates, on one process or many (``torchrun``).

The FTWT recipe (arXiv 2110.08232; the authors' reference code): start from a trained
dense model, train backbone and gates with two SGD optimizers, the gates only from their
own mask loss (weight ``lam``). At ``cooldown`` (half of the epochs) the gates freeze and
the backbone adapts to their masks for the remaining epochs. The phases are hooks of
:class:`Trainer`: :meth:`~Trainer.on_start` (estimate the budget) and
:meth:`~Trainer.on_cooldown` (freeze the gates, calibrate their decisions).

Every run writes into ``out_dir``: ``config.yaml`` (the resolved config, at the start),
one JSON line per epoch in ``metrics.jsonl``, ``last.pt`` and ``best.pt`` (best top-1;
for FTWT runs among the epochs after cooldown, whose masks are final) after every epoch,
and at the end ``report.json`` / ``per_layer.png`` (:func:`ftwt.report.write_report`) with
the FLOPs reduction estimated *before* training next to the one achieved. Under
``torchrun`` (``WORLD_SIZE > 1``) the same code runs DistributedDataParallel; only rank 0
writes files and shows progress.

Example:
    >>> from ftwt.train import TrainConfig, Trainer
    >>> dense = Trainer(TrainConfig(model="resnet20", dense=True, epochs=10, out_dir="runs/dense")).fit()
    >>> ftwt = Trainer(TrainConfig(model="resnet20", init="runs/dense/best.pt", threshold=0.9,
    ...                            epochs=10, out_dir="runs/ftwt")).fit()
    >>> print(ftwt["top1"], ftwt["estimated_reduction"], ftwt["flops_reduction"])
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ftwt import _faults
from ftwt._io import FolderLock, append_text
from ftwt.calibrate import calibrate_decisions
from ftwt.cascade import holdout_split
from ftwt.errors import ConfigError, OutputError
from ftwt.evaluate import evaluate
from ftwt.surgery import gate_parameters
from ftwt.train import _phases
from ftwt.train._epoch import Position, TrainStep, run_epoch
from ftwt.train._files import check_out_dir, inside, start_files
from ftwt.train._state import restore, resume_config, snapshot
from ftwt.train._state import save as save_state
from ftwt.train._user import Data, build_model, check_input, model_name, resolve_data, stated
from ftwt.train.checkpoint import Checkpoint
from ftwt.train.config import TrainConfig
from ftwt.train.optim import build_optimizers
from ftwt.train.runtime import Loaders, Processes, resolve_device, seed_everything

log = logging.getLogger(__name__)

Callback = Callable[["Trainer", dict[str, Any]], None]


class Trainer:
    """Trains one model as :class:`TrainConfig` says; see the module docstring.

    Args:
        config: the run.
        callbacks: called as ``callback(trainer, metrics)`` after every epoch, on every rank.
        model: your own ``nn.Module`` instead of ``config.model`` (gates are attached to it);
            checkpoints record its class as ``module:Class`` (or ``config.model`` if that is an
            import path), and :func:`~ftwt.train.load_model` loads them back into it.
        train_data: your own ``Dataset`` (or ``DataLoader``: its dataset and batch size) of
            ``(image, class)`` pairs instead of ``config.dataset``.
        val_data: likewise for validation; the training data if only ``train_data`` is given.

    Example:
        >>> Trainer(TrainConfig(dense=True, epochs=5, out_dir="runs/mine"), model=MyNet(),
        ...         train_data=my_train_set, val_data=my_val_set).fit()

    Raises:
        FTWTError: any problem with the config, data, device or checkpoints, before a
            single file is written.
    """

    def __init__(self, config: TrainConfig, callbacks: Sequence[Callback] = (), *, model: nn.Module | None = None,
                 train_data: Data | None = None, val_data: Data | None = None, _state: Checkpoint | None = None,
                 _resume_path: str | None = None) -> None:
        cfg = config.resolved()
        self.callbacks, self.out = list(callbacks), Path(cfg.out_dir)
        check_out_dir(self.out, cfg.overwrite, _resume_path)
        self.procs = Processes.from_env()  # the process group itself is joined last, once nothing can fail
        self.is_main = self.procs.is_main
        self.device = resolve_device(cfg.device, self.procs.local_rank)
        if cfg.amp and self.device.type != "cuda" and self.is_main:
            log.warning("amp needs CUDA; training in float32 on %s", self.device)
        self.amp = cfg.amp and self.device.type == "cuda"
        if cfg.sync_bn and self.procs.world > 1 and self.device.type != "cuda":
            raise ConfigError("sync_bn needs CUDA")
        seed_everything(cfg.seed)
        cfg, self.train_set, val_set, self.info = resolve_data(cfg, train_data, val_data, model)
        self.holdout_set = None  # a width cascade sets its threshold on these, never trained on
        if cfg.cascade is not None:
            self.train_set, self.holdout_set = holdout_split(self.train_set, cfg.cascade_holdout, cfg.seed)
        if model is not None:
            cfg = replace(cfg, model=model_name(model, cfg.model))
        self.loaders = Loaders(self.train_set, val_set, cfg.data_config(), cfg.seed, self.procs, self.device)
        self.config = cfg = replace(cfg, num_classes=cfg.num_classes or self.info.num_classes, **stated(cfg, self.info))
        self.num_classes, self.gated = cfg.num_classes, not cfg.dense
        self.model = build_model(cfg, _state is None, cfg.sync_bn and self.procs.world > 1, self.is_main, model)
        self.model.to(self.device)
        check_input(self.model, self.info.input_size, cfg.model, self.device)
        self.optimizers, self.schedulers = build_optimizers(cfg, self.model)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.start_epoch, self.best_top1, self.estimated = 0, -1.0, None
        self.calibrated: list[float] | None = None  # decision thresholds, once calibrated
        self.frozen = False  # gates frozen (from cooldown on)
        self._lock = FolderLock(self.out)  # taken by fit() on rank 0
        self._position: Position | None = None  # where a mid-epoch checkpoint left its epoch
        if _state is not None:
            self._restore(_state)
        self._owns_group = self.procs.join(self.device)
        # the oracle bound applies the labels themselves: its gates are never trained
        self.net = self._wrap(train_gates=self.gated and cfg.masks == "gate")

    @classmethod
    def resume(cls, path: str, overrides: dict[str, Any] | None = None, callbacks: Sequence[Callback] = (), *,
               model: nn.Module | None = None, train_data: Data | None = None, val_data: Data | None = None) -> Trainer:
        """A trainer that continues the run saved in ``path`` (a ``last.pt``) exactly.

        ``overrides`` changes config keys, e.g. ``{"epochs": 300}`` to train longer. A run that
        was given its own ``model`` and data gets them again here (a fresh instance of the same
        model; the checkpoint's weights, gates and optimizer state are loaded into it).

        Raises:
            CheckpointError: the file is missing, corrupt, not a training checkpoint, or its
                model differs from the (overridden) config's.
        """
        ckpt, config = resume_config(path, overrides)
        return cls(config, callbacks, model=model, train_data=train_data, val_data=val_data, _state=ckpt,
                   _resume_path=path)

    # Phases ----------------------------------------------------------------------------------
    def on_start(self) -> None:
        """Before the first epoch of a gated run: estimate the budget, initialise and warm up the gates."""
        _phases.start(self)

    def on_cooldown(self, epoch: int) -> None:
        """From ``epoch`` on the gates are frozen; at the cooldown epoch itself, calibrate them if asked."""
        if self.config.calibrate and epoch == self.config.cooldown and self.calibrated is None:
            self.calibrate(epoch)
        for p in gate_parameters(self.model):
            p.requires_grad_(False)
        self.frozen = True
        self.net = self._wrap(train_gates=False)  # DDP registers the parameters that need gradients

    def calibrate(self, epoch: int) -> None:
        """Per-unit decision thresholds so that the gates keep what their labels keep.

        Done when the gates freeze, not after the last epoch, so that the backbone adapts to
        the calibrated masks (calibrating a finished model costs far more accuracy). The
        thresholds are unit state: checkpoints carry them in ``state_dict``.
        """
        self.loaders.seed_epoch(epoch)  # the same batches whether or not the run was resumed
        self.calibrated = calibrate_decisions(self.model, self.loaders.train, self.device,
                                              max_batches=self.config.calibrate_batches,
                                              distributed=self.procs.world > 1)

    # Loop ------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train from the current epoch to ``epochs``; returns the final report.

        Rank 0 holds the output folder's lock (:class:`ftwt._io.FolderLock`) while it runs.

        Raises:
            OutputError: another live run uses the output folder, or the folder cannot be written.
            NonFiniteLossError: the loss or the weights became inf/NaN; the last good checkpoint is kept.
        """
        try:
            if self.is_main:
                self._lock.acquire()
            return self._fit()
        except OSError as exc:
            if isinstance(exc, OutputError) or not inside(exc.filename, self.out):
                raise
            raise OutputError(f"cannot write {exc.filename}: {exc.strerror or exc}") from exc
        finally:
            self._lock.release()
            if self._owns_group:
                dist.destroy_process_group()

    def _fit(self) -> dict[str, Any]:
        cfg, report = self.config, None
        if self.is_main:
            start_files(self.out, cfg, self.start_epoch)
        if self.gated and self.start_epoch == 0 and self.estimated is None:
            self.on_start()
        for epoch in range(self.start_epoch, cfg.epochs):
            start = time.time()
            if self.gated and epoch >= cfg.cooldown and not self.frozen:
                self.on_cooldown(epoch)
            self.loaders.seed_epoch(epoch)
            position, self._position = self._position, None
            gates_train = self.gated and not self.frozen and cfg.masks == "gate"
            train = run_epoch(self, epoch, train_gates=gates_train, start=position)
            for sched in self.schedulers[: None if gates_train else 1]:  # a gate lr matters only while they train
                sched.step()
            report = self.evaluate()
            metrics = {"epoch": epoch + 1, **train, **{f"val_{k}": v for k, v in report.items()
                                                     if not isinstance(v, (list, dict))}, "time": time.time() - start}
            # Before cooldown the gates still move (and calibration comes at cooldown): a
            # checkpoint from then has other masks and another budget than the final model.
            is_best = (not self.gated or epoch >= min(cfg.cooldown, cfg.epochs - 1)) and report["top1"] > self.best_top1
            self.best_top1 = report["top1"] if is_best else self.best_top1
            if self.is_main:
                self._lock.check()
                append_text(self.out / "metrics.jsonl", json.dumps(metrics) + "\n")
                # best.pt first: killed in between, the run redoes this epoch and writes both again
                self.save(("best.pt", "last.pt") if is_best else ("last.pt",), epoch + 1)
                log.info("epoch %d/%d: loss %.4f, train top-1 %.2f, val top-1 %.2f, FLOPs reduction %.1f%%",
                         epoch + 1, cfg.epochs, train["loss"], train["top1"], report["top1"],
                         100 * report["flops_reduction"])
            for callback in self.callbacks:
                callback(self, metrics)
        return _phases.finish(self, report)

    def evaluate(self) -> dict[str, Any]:
        """The current model's report on the validation data (all processes take part)."""
        if self.procs.world > 1:
            # BatchNorm statistics drift apart per rank; evaluate what rank 0 saves
            for buf in self.model.buffers():
                dist.broadcast(buf, 0)
        _faults.pause_if("evaluate")
        return evaluate(self.model, self.loaders.val, self.device, distributed=self.procs.world > 1,
                        masks=self.config.masks if self.gated else "gate")

    # State -----------------------------------------------------------------------------------
    def _wrap(self, train_gates: bool) -> nn.Module:
        step = TrainStep(self.model, train_gates, self.config.balance_loss, self.config.cascade is not None)
        if self.procs.world == 1:
            return step
        return DistributedDataParallel(step, device_ids=[self.device] if self.device.type == "cuda" else None)

    def checkpoint(self, epoch: int) -> Checkpoint:
        """The run's state after ``epoch`` completed epochs."""
        return snapshot(self, epoch)

    def save(self, names: Sequence[str], epochs_done: int, **position: Any) -> None:
        """Write ``names`` (in the output folder) atomically, refusing non-finite weights."""
        self._lock.check()
        save_state(self, names, epochs_done, **position)

    def save_position(self, epoch: int, step: int, sums: torch.Tensor) -> None:
        """Write ``last.pt`` in the middle of ``epoch`` (``save_every``): ``step`` steps done, their metric sums."""
        if self.procs.world > 1:
            sums = sums.clone()
            dist.all_reduce(sums)
        if self.is_main:
            self.save(("last.pt",), epoch, step=step, epoch_sums=sums.tolist())

    def _restore(self, ckpt: Checkpoint) -> None:
        restore(self, ckpt)


__all__ = ["Callback", "Trainer"]
