"""One training epoch, and the step module that DistributedDataParallel wraps."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ftwt import _faults
from ftwt.cascade import full_forward
from ftwt.errors import NonFiniteLossError
from ftwt.flops import FlopsMeter, uncounted
from ftwt.loss import mask_loss
from ftwt.record import record
from ftwt.train.runtime import set_rng_state

# loss sum, ce sum, mask-loss sum, correct, samples, gate-correct, gate decisions, skipped batches
_SUMS = 8


class TrainStep(nn.Module):
    """The model's forward plus its mask loss, so that under DDP the gates are parameters the output uses.

    Args:
        model: the (gated or dense) model.
        train_gates: compute the mask loss (before cooldown); otherwise it is zero.
        balance: class-balanced mask loss.
        cascade: also run every filter (the full width of a :mod:`ftwt.cascade`), whose logits
            are the third output; its FLOPs are not counted (a deployed input runs one width
            at a time, and the report counts both).
    """

    def __init__(self, model: nn.Module, train_gates: bool, balance: bool = False, cascade: bool = False) -> None:
        super().__init__()
        self.model = model
        self.train_gates = train_gates
        self.balance = balance
        self.cascade = cascade

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        out = self.model(x)
        ml = mask_loss(self.model, self.balance) if self.train_gates else out.new_zeros(())
        if not self.cascade:
            return out, ml, None
        with uncounted():
            return out, ml, full_forward(self.model, x)


@dataclass
class Position:
    """Where a ``save_every`` checkpoint left an epoch: steps done, their metric sums (all processes'), RNG state."""

    step: int
    sums: list[float]
    rng: dict[str, Any]


def run_epoch(trainer: Any, epoch: int, train_gates: bool, start: Position | None = None) -> dict[str, Any]:
    """Train ``trainer``'s model for one epoch; returns the epoch's metrics, summed over all processes.

    With ``start`` the epoch continues from a mid-epoch checkpoint: the loader replays the
    batches before it without training (so that worker processes draw what they drew
    before), then the RNG state saved after them is restored.
    """
    from tqdm import tqdm

    cfg, device = trainer.config, trainer.device
    net = trainer.net
    net.train()
    labels = ("train" if train_gates else False) if trainer.gated else None
    sums = torch.zeros(_SUMS, dtype=torch.float64, device=device)
    flops_before = torch.zeros(3, dtype=torch.float64, device=device)  # of the steps before ``start``
    if start is not None and trainer.is_main:  # the saved sums are all processes': count them once
        saved = torch.tensor(start.sums, dtype=torch.float64, device=device)
        sums, flops_before = saved[:_SUMS].clone(), saved[_SUMS:].clone()
    first, steps = (start.step if start is not None else 0), len(trainer.loaders.train)
    meter = FlopsMeter(trainer.model)
    bar = tqdm(trainer.loaders.train, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
               disable=not (trainer.is_main and cfg.progress), dynamic_ncols=True)
    # frozen gates need no labels: skip the ground truth's sort and cumsum
    rec_ctx = record(trainer.model, masks=cfg.masks, labels=labels) if trainer.gated else contextlib.nullcontext()
    with rec_ctx as rec:
        for step, (x, y) in enumerate(bar):
            if step < first:
                if step == first - 1:
                    set_rng_state(start.rng)
                continue
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with meter if step % cfg.flops_every == 0 else contextlib.nullcontext():
                with torch.autocast(device.type, enabled=trainer.amp):
                    out, ml, full = net(x)
                    ce = F.cross_entropy(out, y)
                    loss = ce + cfg.lam * ml
                    if full is not None:  # a width cascade: both widths learn the task
                        loss = loss + F.cross_entropy(full, y)
            if not _finite(loss, trainer.procs.world):
                if not cfg.skip_nonfinite:
                    value = loss.item()
                    what = f"loss is {value}" if not math.isfinite(value) else "another process's loss is not finite"
                    raise NonFiniteLossError(_diverged(trainer, f"{what} at epoch {epoch + 1}, step {step + 1}"))
                sums[7] += 1
                _after_step(trainer, epoch, step, steps, sums, flops_before, meter)
                continue
            for opt in trainer.optimizers:
                opt.zero_grad(set_to_none=True)
            trainer.scaler.scale(loss).backward()
            trainer.scaler.step(trainer.optimizers[0])
            if train_gates:
                trainer.scaler.step(trainer.optimizers[1])
            trainer.scaler.update()
            with torch.no_grad():
                n = y.shape[0]
                row = [loss.detach() * n, ce.detach() * n, ml.detach() * n, (out.argmax(1) == y).sum(), n, 0, 0]
                for o in (rec.outputs.values() if rec is not None else ()):
                    if o.mask is not None and o.labels is not None:
                        row[5] += (o.mask == o.labels).sum()
                        row[6] += o.labels.numel()
                sums[:7] += torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in row])
            _after_step(trainer, epoch, step, steps, sums, flops_before, meter)
            if not bar.disable and step % 20 == 0:
                bar.set_postfix(_postfix(sums, meter))
    totals = torch.cat([sums, flops_before + _flops(meter, device)])
    if trainer.procs.world > 1:
        dist.all_reduce(totals)
    s = totals.tolist()
    bar.close()
    if not s[4]:
        raise NonFiniteLossError(_diverged(trainer, f"every batch of epoch {epoch + 1} had a non-finite loss"))
    return {
        "lr": trainer.optimizers[0].param_groups[0]["lr"],
        "gate_lr": trainer.optimizers[1].param_groups[0]["lr"] if trainer.gated else None,
        "gates_frozen": trainer.gated and not train_gates,
        "loss": s[0] / s[4],
        "ce": s[1] / s[4],
        "mask_loss": s[2] / s[4] if train_gates else None,
        "top1": 100 * s[3] / s[4],
        "gate_accuracy": s[5] / s[6] if s[6] else None,
        "flops_reduction": 1 - s[10] / s[9] if s[9] else None,
        "skipped_nonfinite": int(s[7]),
    }


def _finite(loss: torch.Tensor, world: int) -> bool:
    """Whether every process's loss is finite (one sync per step; all processes must agree to skip)."""
    ok = torch.isfinite(loss.detach()).to(torch.float32)
    if world > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok)


def _diverged(trainer: Any, what: str) -> str:
    last = trainer.out / "last.pt"
    kept = f"the last good checkpoint {last} is kept" if last.is_file() else "no checkpoint had been written yet"
    hint = "lower --lr" + ("" if trainer.config.skip_nonfinite else ", or pass --skip-nonfinite to skip such batches")
    return f"{what}: training diverged; {kept}; {hint}"


def _flops(meter: FlopsMeter, device: torch.device) -> torch.Tensor:
    """Samples, dense and dynamic MAC sums of the metered batches. Per-sample MACs are whole numbers, so
    rounding makes the sums exact, and an epoch split by a resume adds up to the same numbers."""
    with contextlib.suppress(RuntimeError):  # no batch metered (empty shard)
        rep = meter.report()
        return torch.tensor([rep.samples, round(rep.dense_macs * rep.samples), round(rep.dynamic_macs * rep.samples)],
                            dtype=torch.float64, device=device)
    return torch.zeros(3, dtype=torch.float64, device=device)


def _after_step(trainer: Any, epoch: int, step: int, steps: int, sums: torch.Tensor, flops_before: torch.Tensor,
                meter: FlopsMeter) -> None:
    _faults.pause_if("step")
    every = trainer.config.save_every
    if every and (step + 1) % every == 0 and step + 1 < steps:  # the epoch's last step: the epoch's checkpoint
        trainer.save_position(epoch, step + 1, torch.cat([sums, flops_before + _flops(meter, sums.device)]))


def _postfix(sums: torch.Tensor, meter: FlopsMeter) -> dict[str, str]:
    s = sums.tolist()
    if not s[4]:
        return {}
    post = {"loss": f"{s[0] / s[4]:.3f}", "acc": f"{100 * s[3] / s[4]:.1f}"}
    if s[6]:
        post["gate_acc"] = f"{100 * s[5] / s[6]:.1f}"
    with contextlib.suppress(RuntimeError):
        post["flops"] = f"-{100 * meter.report().reduction:.1f}%"
    return post
