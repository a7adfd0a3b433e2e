"""A :class:`~ftwt.train.Trainer`'s state to and from a :class:`~ftwt.train.Checkpoint`.

What a run needs to continue exactly: weights (gate decisions included), optimizers,
schedulers, the AMP scaler, every RNG, the best top-1, the budget estimate and, for a
``--save-every`` checkpoint, the position inside its epoch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from ftwt.checkpoint import load_state_dict_into
from ftwt.errors import CheckpointError, NonFiniteLossError
from ftwt.surgery import gated_units
from ftwt.train._epoch import Position
from ftwt.train.checkpoint import Checkpoint
from ftwt.train.config import TrainConfig
from ftwt.train.optim import load_optimizer_states, plain_state
from ftwt.train.runtime import rng_state, set_rng_state

if TYPE_CHECKING:
    from ftwt.train.trainer import Trainer

# What decides the order of an epoch's batches: a mid-epoch checkpoint resumes only with them unchanged.
ORDER_KEYS = ("dataset", "data_dir", "image_size", "batch_size", "train_subset", "seed")


def snapshot(t: Trainer, epoch: int) -> Checkpoint:
    """The run's state after ``epoch`` completed epochs."""
    cfg = t.config
    return Checkpoint(
        model_name=cfg.model, num_classes=t.num_classes,
        gate_config=cfg.gate_config().to_dict() if t.gated else None, model=t.model.state_dict(),
        input_size=list(t.info.input_size), dataset=t.info.name, epoch=epoch,
        optimizers=[o.state_dict() for o in t.optimizers], schedulers=[plain_state(s) for s in t.schedulers],
        scaler=t.scaler.state_dict(), rng=rng_state(), best_top1=t.best_top1,
        estimated_reduction=t.estimated, calibrated_decisions=t.calibrated, config=cfg.to_dict(),
        model_kwargs=cfg.model_kwargs(),
        gate_units=[u.spec.conv for u in gated_units(t.model)] if t.gated else None,
    )


def save(t: Trainer, names: Sequence[str], epochs_done: int, **position: Any) -> None:
    """Write checkpoints atomically; never non-finite weights, never into a folder that vanished."""
    ckpt = replace(snapshot(t, epochs_done), **position)
    bad = [k for k, v in ckpt.model.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        when = f"epoch {epochs_done + 1}, step {position['step']}" if position.get("step") else f"epoch {epochs_done}"
        raise NonFiniteLossError(f"the weights became non-finite ({bad[0]}) by {when}: training diverged; "
                                 f"the last good checkpoint in {t.out} is kept; lower --lr")
    for name in names:
        ckpt.save(t.out / name)


def restore(t: Trainer, ckpt: Checkpoint) -> None:
    """Put a checkpoint's state into a freshly built trainer of the same config."""
    load_state_dict_into(t.model, ckpt.model, strict=True)
    load_optimizer_states(t.optimizers, t.schedulers, ckpt.optimizers, ckpt.schedulers)
    if ckpt.scaler:
        t.scaler.load_state_dict(ckpt.scaler)
    t.start_epoch, t.best_top1 = int(ckpt.epoch), float(ckpt.best_top1)
    t.estimated, t.calibrated = ckpt.estimated_reduction, ckpt.calibrated_decisions
    set_rng_state(ckpt.rng)
    if ckpt.step:
        t._position = Position(int(ckpt.step), list(ckpt.epoch_sums), ckpt.rng)


def resume_config(path: str, overrides: dict[str, Any] | None) -> tuple[Checkpoint, TrainConfig]:
    """The checkpoint in ``path`` and the config that continues it, or a :class:`CheckpointError` saying why not."""
    ckpt = Checkpoint.load(path)
    missing = ckpt.missing_for_resume()
    if missing:
        raise CheckpointError(f"{path} is not a training checkpoint written by ftwt train (missing {missing})")
    config = TrainConfig.from_dict({**ckpt.config, **(overrides or {})})
    changed = [k for k in ORDER_KEYS if ckpt.step and getattr(config, k) != ckpt.config.get(k)]
    if changed:
        raise CheckpointError(f"{path} was saved in the middle of epoch {ckpt.epoch + 1}; resume it "
                              f"without changing {changed}, which decide the order of its batches")
    if config.model != ckpt.model_name or config.dense != (not ckpt.gated):
        kind = "gated" if ckpt.gated else "dense"
        raise CheckpointError(f"{path} holds a {kind} {ckpt.model_name}, which cannot resume a "
                              f"{'dense' if config.dense else 'gated'} {config.model} run")
    return ckpt, config


__all__ = ["ORDER_KEYS", "restore", "resume_config", "save", "snapshot"]
