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
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ftwt import _faults
from ftwt._io import FolderLock, append_text, atomic_write_text, check_writable
from ftwt.calibrate import calibrate_decisions
from ftwt.checkpoint import load_state_dict_into
from ftwt.data import DatasetInfo
from ftwt.errors import CheckpointError, ConfigError, NonFiniteLossError, OutputError
from ftwt.estimate import estimate
from ftwt.evaluate import evaluate
from ftwt.loss import fit_gates
from ftwt.plots import plot_training
from ftwt.report import write_report
from ftwt.surgery import attach_gates, gate_parameters, gated_units, init_gates_from_weights
from ftwt.train._epoch import Position, TrainStep, run_epoch
from ftwt.train._user import Data, model_name, resolve_data
from ftwt.train.checkpoint import Checkpoint, load_dense, load_model
from ftwt.train.config import TrainConfig
from ftwt.train.optim import build_optimizers, load_optimizer_states, plain_state
from ftwt.train.runtime import Loaders, Processes, resolve_device, rng_state, seed_everything, set_rng_state

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
        _check_out_dir(self.out, cfg.overwrite, _resume_path)
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
        if model is not None:
            cfg = replace(cfg, model=model_name(model, cfg.model))
        self.loaders = Loaders(self.train_set, val_set, cfg.data_config(), cfg.seed, self.procs, self.device)
        self.config = cfg = replace(cfg, num_classes=cfg.num_classes or self.info.num_classes, **_stated(cfg, self.info))
        self.num_classes, self.gated = cfg.num_classes, not cfg.dense
        self.model = _build_model(cfg, _state is None, cfg.sync_bn and self.procs.world > 1, self.is_main, model)
        self.model.to(self.device)
        _check_input(self.model, self.info.input_size, cfg.model, self.device)
        self.optimizers, self.schedulers = build_optimizers(cfg, self.model)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.start_epoch, self.best_top1, self.estimated = 0, -1.0, None
        self.calibrated: list[float] | None = None  # decision thresholds, once calibrated
        self.frozen = False  # gates frozen (from cooldown on)
        self._last_report: dict[str, Any] | None = None
        self._lock = FolderLock(self.out)  # taken by fit() on rank 0
        self._position: Position | None = None  # where a mid-epoch checkpoint left its epoch
        if _state is not None:
            self._load(_state)
        self._owns_group = self.procs.join(self.device)
        # the oracle bound applies the labels themselves: its gates are never trained
        self.net = self._wrap(train_gates=self.gated and cfg.masks == "gate")

    @classmethod
    def resume(cls, path: str, overrides: dict[str, Any] | None = None, callbacks: Sequence[Callback] = ()) -> Trainer:
        """A trainer that continues the run saved in ``path`` (a ``last.pt``) exactly.

        Args:
            path: checkpoint written by a :class:`Trainer`.
            overrides: config keys to change, e.g. ``{"epochs": 300}`` to train longer.
            callbacks: as for the constructor.

        Raises:
            CheckpointError: the file is missing, corrupt, not a training checkpoint, or its
                model differs from the (overridden) config's.
        """
        ckpt = Checkpoint.load(path)
        missing = ckpt.missing_for_resume()
        if missing:
            raise CheckpointError(f"{path} is not a training checkpoint written by ftwt train (missing {missing})")
        config = TrainConfig.from_dict({**ckpt.config, **(overrides or {})})
        changed = [k for k in _ORDER_KEYS if ckpt.step and getattr(config, k) != ckpt.config.get(k)]
        if changed:
            raise CheckpointError(f"{path} was saved in the middle of epoch {ckpt.epoch + 1}; resume it "
                                  f"without changing {changed}, which decide the order of its batches")
        if config.model != ckpt.model_name or config.dense != (not ckpt.gated):
            kind = "gated" if ckpt.gated else "dense"
            raise CheckpointError(f"{path} holds a {kind} {ckpt.model_name}, which cannot resume a "
                                  f"{'dense' if config.dense else 'gated'} {config.model} run")
        return cls(config, callbacks, _state=ckpt, _resume_path=path)

    # Phases ----------------------------------------------------------------------------------
    def on_start(self) -> None:
        """Before the first epoch of an FTWT run: estimate, with perfect gates at ``r`` on the init
        weights, the FLOPs reduction the budget should buy; then fit the gates to the init
        model's labels for ``gate_warmup`` steps."""
        loader = DataLoader(self.train_set, batch_size=self.config.batch_size, shuffle=False)
        cfg = self.config
        est = estimate(self.model, (x for x, _ in loader), cfg.threshold, cfg.criterion,
                       samples=cfg.estimate_samples, device=self.device)
        if self.is_main:
            log.info("estimated FLOPs reduction at %s=%g before training: %.1f%%",
                     cfg.criterion, cfg.threshold, 100 * est.reduction)
        self.estimated = est.reduction
        if cfg.gate_init == "weights":
            init_gates_from_weights(self.model)
        if cfg.gate_warmup and cfg.masks == "gate":
            self.loaders.seed_epoch(0)
            loss = fit_gates(self.model, (x for x, _ in self.loaders.train), self.optimizers[1], cfg.gate_warmup,
                             cfg.balance_loss)
            if self.procs.world > 1:  # each process fitted on its own shard: keep rank 0's gates
                for p in gate_parameters(self.model):
                    dist.broadcast(p.data, 0)
            if self.is_main:
                log.info("gates fitted to the init model's labels for %d steps (mask loss %.3f)", cfg.gate_warmup, loss)

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
            if isinstance(exc, OutputError) or not _inside(exc.filename, self.out):
                raise
            raise OutputError(f"cannot write {exc.filename}: {exc.strerror or exc}") from exc
        finally:
            self._lock.release()
            if self._owns_group:
                dist.destroy_process_group()

    def _fit(self) -> dict[str, Any]:
        cfg = self.config
        if self.is_main:
            _start_files(self.out, cfg, self.start_epoch)
        if self.gated and self.start_epoch == 0 and self.estimated is None:
            self.on_start()
        for epoch in range(self.start_epoch, cfg.epochs):
            start = time.time()
            if self.gated and epoch >= cfg.cooldown and not self.frozen:
                self.on_cooldown(epoch)
            self.loaders.seed_epoch(epoch)
            position, self._position = self._position, None
            train = run_epoch(self, epoch, train_gates=self.gated and not self.frozen and cfg.masks == "gate",
                              start=position)
            for sched in self.schedulers:
                sched.step()
            report = self._evaluate()
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
                self._save(("best.pt", "last.pt") if is_best else ("last.pt",), epoch + 1)
                log.info("epoch %d/%d: loss %.4f, train top-1 %.2f, val top-1 %.2f, FLOPs reduction %.1f%%",
                         epoch + 1, cfg.epochs, train["loss"], train["top1"], report["top1"],
                         100 * report["flops_reduction"])
            for callback in self.callbacks:
                callback(self, metrics)
        return self._finish()

    def _evaluate(self) -> dict[str, Any]:
        if self.procs.world > 1:
            # BatchNorm statistics drift apart per rank; evaluate what rank 0 saves
            for buf in self.model.buffers():
                dist.broadcast(buf, 0)
        _faults.pause_if("evaluate")
        self._last_report = evaluate(self.model, self.loaders.val, self.device, distributed=self.procs.world > 1,
                                     masks=self.config.masks if self.gated else "gate")
        return self._last_report

    def _finish(self) -> dict[str, Any]:
        cfg, report = self.config, self._last_report
        if self.gated and cfg.calibrate and self.calibrated is None:
            # the gates never froze (cooldown >= epochs): calibrate the final model
            self.calibrate(cfg.epochs)
            if self.is_main:
                self._save(("last.pt",), cfg.epochs)
            report = None
        report = {
            "model": cfg.model, "dataset": self.info.name, "mode": "dense" if cfg.dense else cfg.mode,
            "criterion": None if cfg.dense else cfg.criterion, "threshold": None if cfg.dense else cfg.threshold,
            "epochs": cfg.epochs, **(report or self._evaluate()),  # none yet: calibrated, or nothing trained here
            "estimated_reduction": self.estimated, "best_top1": self.best_top1, "calibrated_decisions": self.calibrated,
        }
        if self.is_main:
            write_report(report, self.out)
            _plot_curves(self.out)
        return report

    # State -----------------------------------------------------------------------------------
    def _wrap(self, train_gates: bool) -> nn.Module:
        step = TrainStep(self.model, train_gates, self.config.balance_loss)
        if self.procs.world == 1:
            return step
        return DistributedDataParallel(step, device_ids=[self.device] if self.device.type == "cuda" else None)

    def checkpoint(self, epoch: int) -> Checkpoint:
        """The run's state after ``epoch`` completed epochs."""
        return Checkpoint(
            model_name=self.config.model, num_classes=self.num_classes,
            gate_config=self.config.gate_config().to_dict() if self.gated else None, model=self.model.state_dict(),
            input_size=list(self.info.input_size), dataset=self.info.name, epoch=epoch,
            optimizers=[o.state_dict() for o in self.optimizers], schedulers=[plain_state(s) for s in self.schedulers],
            scaler=self.scaler.state_dict(), rng=rng_state(), best_top1=self.best_top1,
            estimated_reduction=self.estimated, calibrated_decisions=self.calibrated, config=self.config.to_dict(),
            model_kwargs=self.config.model_kwargs(),
            gate_units=[u.spec.conv for u in gated_units(self.model)] if self.gated else None,
        )

    def save_position(self, epoch: int, step: int, sums: torch.Tensor) -> None:
        """Write ``last.pt`` in the middle of ``epoch`` (``save_every``): ``step`` steps done, their metric sums."""
        if self.procs.world > 1:
            sums = sums.clone()
            dist.all_reduce(sums)
        if self.is_main:
            self._save(("last.pt",), epoch, step=step, epoch_sums=sums.tolist())

    def _save(self, names: Sequence[str], epochs_done: int, **position: Any) -> None:
        """Write checkpoints atomically; never non-finite weights, never into a folder that vanished."""
        self._lock.check()
        ckpt = replace(self.checkpoint(epochs_done), **position)
        bad = [k for k, v in ckpt.model.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            when = f"epoch {epochs_done + 1}, step {position['step']}" if position.get("step") else f"epoch {epochs_done}"
            raise NonFiniteLossError(f"the weights became non-finite ({bad[0]}) by {when}: training diverged; "
                                     f"the last good checkpoint in {self.out} is kept; lower --lr")
        for name in names:
            ckpt.save(self.out / name)

    def _load(self, ckpt: Checkpoint) -> None:
        load_state_dict_into(self.model, ckpt.model, strict=True)
        load_optimizer_states(self.optimizers, self.schedulers, ckpt.optimizers, ckpt.schedulers)
        if ckpt.scaler:
            self.scaler.load_state_dict(ckpt.scaler)
        self.start_epoch, self.best_top1 = int(ckpt.epoch), float(ckpt.best_top1)
        self.estimated, self.calibrated = ckpt.estimated_reduction, ckpt.calibrated_decisions
        set_rng_state(ckpt.rng)
        if ckpt.step:
            self._position = Position(int(ckpt.step), list(ckpt.epoch_sums), ckpt.rng)


# What decides the order of an epoch's batches: a mid-epoch checkpoint resumes only with them unchanged.
_ORDER_KEYS = ("dataset", "data_dir", "image_size", "batch_size", "train_subset", "seed")


def _inside(filename: Any, folder: Path) -> bool:
    return filename is not None and Path(str(filename)).absolute().is_relative_to(folder.absolute())


def _check_out_dir(out: Path, overwrite: bool, resume_path: str | None) -> None:
    FolderLock(out).check_free()
    check_writable(out)
    resuming_here = resume_path is not None and Path(resume_path).resolve().parent == out.resolve()
    if (out / "last.pt").exists() and not overwrite and not resuming_here:
        raise ConfigError(f"{out} already holds a run (last.pt); resume it with --resume "
                          f"{out / 'last.pt'}, pass --overwrite, or choose another output folder")


def _start_files(out: Path, cfg: TrainConfig, start_epoch: int) -> None:
    """Write ``config.yaml``; drop the metrics lines of epochs after the checkpoint (redone now)."""
    atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    path = out / "metrics.jsonl"
    if start_epoch == 0:
        path.unlink(missing_ok=True)
    elif path.exists():
        keep = [ln for ln in path.read_text().splitlines() if (e := _epoch_of(ln)) is not None and e <= start_epoch]
        atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def _stated(cfg: TrainConfig, info: DatasetInfo) -> dict[str, Any]:
    """What an image folder's defaults came to (size, augmentation, statistics), for config.yaml and resumes."""
    if cfg.dataset != "folder":
        return {}
    return {"image_size": info.input_size[-1], "augment": info.augment, "mean": list(info.mean), "std": list(info.std)}


def _plot_curves(out: Path) -> None:
    """``training.png``: loss, top-1 and FLOPs reduction of every epoch in ``metrics.jsonl``."""
    path = out / "metrics.jsonl"
    lines = [ln for ln in path.read_text().splitlines() if _epoch_of(ln) is not None] if path.exists() else []
    if lines:
        plot_training([json.loads(ln) for ln in lines], out / "training.png")


def _epoch_of(line: str) -> int | None:
    """The epoch of a metrics line; None for a line a kill cut short."""
    try:
        return int(json.loads(line)["epoch"])
    except (ValueError, KeyError, TypeError):
        return None


def _check_input(model: nn.Module, input_size: Sequence[int], name: str, device: torch.device) -> None:
    """One sample through the model in eval mode (no state changes): a size it cannot take is one line now."""
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_size, device=device))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{name} cannot take {'x'.join(map(str, input_size))} inputs ({first}); "
                          "choose another --image-size or model") from None
    finally:
        model.train(was_training)


def _build_model(cfg: TrainConfig, load_init: bool, sync_bn: bool, warn: bool, model: nn.Module | None) -> nn.Module:
    init = cfg.init if load_init else None
    if model is None:
        model = load_model(cfg.model, cfg.num_classes, init, **cfg.model_kwargs())
    else:
        model = load_dense(model, init)
    if cfg.init is None and not cfg.dense and load_init and warn:
        log.warning("FTWT without --init: gates learn from an untrained backbone; train a dense model first")
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # new modules: before the gates hook them
    if not cfg.dense:
        attach_gates(model, cfg.gate_config(), **cfg.gate_patterns())
    return model


__all__ = ["Callback", "Trainer"]
