"""One training epoch, and the step module that DistributedDataParallel wraps."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ftwt.flops import FlopsMeter
from ftwt.loss import mask_loss
from ftwt.record import record


class TrainStep(nn.Module):
    """The model's forward plus its mask loss, so that under DDP the gates are parameters the output uses.

    Args:
        model: the (gated or dense) model.
        train_gates: compute the mask loss (before cooldown); otherwise it is zero.
        balance: class-balanced mask loss.
    """

    def __init__(self, model: nn.Module, train_gates: bool, balance: bool = False) -> None:
        super().__init__()
        self.model = model
        self.train_gates = train_gates
        self.balance = balance

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(x)
        ml = mask_loss(self.model, self.balance) if self.train_gates else out.new_zeros(())
        return out, ml


def run_epoch(trainer: Any, epoch: int, train_gates: bool) -> dict[str, Any]:
    """Train ``trainer``'s model for one epoch; returns the epoch's metrics, summed over all processes."""
    from tqdm import tqdm

    cfg, device = trainer.config, trainer.device
    net = trainer.net
    net.train()
    labels = ("train" if train_gates else False) if trainer.gated else None
    # loss sum, ce sum, mask-loss sum, correct, samples, gate-correct, gate decisions
    sums = torch.zeros(7, dtype=torch.float64, device=device)
    meter = FlopsMeter(trainer.model)
    bar = tqdm(trainer.loaders.train, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
               disable=not (trainer.is_main and cfg.progress), dynamic_ncols=True)
    # frozen gates need no labels: skip the ground truth's sort and cumsum
    rec_ctx = record(trainer.model, labels=labels) if trainer.gated else contextlib.nullcontext()
    with rec_ctx as rec:
        for step, (x, y) in enumerate(bar):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with meter if step % cfg.flops_every == 0 else contextlib.nullcontext():
                with torch.autocast(device.type, enabled=trainer.amp):
                    out, ml = net(x)
                    ce = F.cross_entropy(out, y)
                    loss = ce + cfg.lam * ml
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
                sums += torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in row])
            if not bar.disable and step % 20 == 0:
                bar.set_postfix(_postfix(sums, meter))
    flops = torch.zeros(3, dtype=torch.float64, device=device)  # samples, dense sum, dynamic sum
    with contextlib.suppress(RuntimeError):  # no batch metered (empty shard)
        rep = meter.report()
        flops += torch.tensor([rep.samples, rep.dense_macs * rep.samples, rep.dynamic_macs * rep.samples],
                              dtype=torch.float64, device=device)
    totals = torch.cat([sums, flops])
    if trainer.procs.world > 1:
        dist.all_reduce(totals)
    s = totals.tolist()
    bar.close()
    return {
        "lr": trainer.optimizers[0].param_groups[0]["lr"],
        "gate_lr": trainer.optimizers[1].param_groups[0]["lr"] if trainer.gated else None,
        "gates_frozen": trainer.gated and not train_gates,
        "loss": s[0] / s[4],
        "ce": s[1] / s[4],
        "mask_loss": s[2] / s[4] if train_gates else None,
        "top1": 100 * s[3] / s[4],
        "gate_accuracy": s[5] / s[6] if s[6] else None,
        "flops_reduction": 1 - s[9] / s[8] if s[8] else None,
    }


def _postfix(sums: torch.Tensor, meter: FlopsMeter) -> dict[str, str]:
    s = sums.tolist()
    post = {"loss": f"{s[0] / s[4]:.3f}", "acc": f"{100 * s[3] / s[4]:.1f}"}
    if s[6]:
        post["gate_acc"] = f"{100 * s[5] / s[6]:.1f}"
    with contextlib.suppress(RuntimeError):
        post["flops"] = f"-{100 * meter.report().reduction:.1f}%"
    return post
