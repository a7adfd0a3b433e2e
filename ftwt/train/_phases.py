"""What a :class:`~ftwt.train.Trainer` does around the epochs of a gated run.

At the start: estimate, with perfect gates at ``r`` on the init weights, the FLOPs
reduction the budget should buy, then initialise and warm up the gates as the config says.
At the end: the report (:func:`ftwt.report.write_report`), calibrating first if the gates
never froze.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from ftwt.cascade import WIDTHS, WidthCascade, bn_statistics
from ftwt.checkpoint import save_checkpoint
from ftwt.errors import ConfigError
from ftwt.estimate import estimate
from ftwt.loss import fit_gates
from ftwt.report import write_report
from ftwt.surgery import gate_parameters, init_gates_from_weights
from ftwt.train._files import plot_curves

if TYPE_CHECKING:
    from ftwt.train.trainer import Trainer

log = logging.getLogger(__name__)


def start(t: Trainer) -> None:
    """Estimate the budget; initialise the gates; fit them to the init model's labels for ``gate_warmup`` steps."""
    cfg = t.config
    loader = DataLoader(t.train_set, batch_size=cfg.batch_size, shuffle=False)
    est = estimate(t.model, (x for x, _ in loader), cfg.threshold, cfg.criterion,
                   samples=cfg.estimate_samples, device=t.device)
    if t.is_main:
        log.info("estimated FLOPs reduction at %s=%g before training: %.1f%%",
                 cfg.criterion, cfg.threshold, 100 * est.reduction)
    t.estimated = est.reduction
    if cfg.gate_init == "weights":
        init_gates_from_weights(t.model)
    if cfg.gate_warmup and cfg.masks == "gate":
        t.loaders.seed_epoch(0)
        loss = fit_gates(t.model, (x for x, _ in t.loaders.train), t.optimizers[1], cfg.gate_warmup, cfg.balance_loss)
        if t.procs.world > 1:  # each process fitted on its own shard: keep rank 0's gates
            for p in gate_parameters(t.model):
                dist.broadcast(p.data, 0)
        if t.is_main:
            log.info("gates fitted to the init model's labels for %d steps (mask loss %.3f)", cfg.gate_warmup, loss)


def finish(t: Trainer, last: dict[str, Any] | None) -> dict[str, Any]:
    """The final report (written on rank 0), from the last epoch's evaluation ``last`` if still current."""
    cfg = t.config
    if t.gated and cfg.calibrate and t.calibrated is None:
        # the gates never froze (cooldown >= epochs): calibrate the final model
        t.calibrate(cfg.epochs)
        if t.is_main:
            t.save(("last.pt",), cfg.epochs)
        last = None
    report = {
        "model": cfg.model, "dataset": t.info.name, "mode": "dense" if cfg.dense else cfg.mode,
        "criterion": None if cfg.dense else cfg.criterion, "threshold": None if cfg.dense else cfg.threshold,
        "epochs": cfg.epochs, **(last or t.evaluate()),  # none yet: calibrated, or nothing trained here
        "estimated_reduction": t.estimated, "best_top1": t.best_top1, "calibrated_decisions": t.calibrated,
    }
    if cfg.cascade is not None:
        report["cascade"] = _cascade(t, report["dense_macs"])
    if t.is_main:
        write_report(report, t.out)
        plot_curves(t.out)
    return report


def _cascade(t: Trainer, dense_macs: float) -> dict[str, Any]:
    """Build the trained model's width cascade, save it as ``cascade.pt`` and report it on the whole validation set."""
    cfg = t.config
    bn = {w: bn_statistics(t.model, t.loaders.train, w, t.device, cfg.calibrate_batches) for w in WIDTHS}
    cascade = WidthCascade(t.model, bn)
    try:
        cascade.set_budget(DataLoader(t.holdout_set, batch_size=cfg.batch_size, shuffle=False),
                           macs=(1.0 - cfg.cascade) * dense_macs, device=t.device)
    except ConfigError as exc:
        log.warning("cascade: %s; no input escalates", exc)
    if t.procs.world > 1:  # each process estimated on its own shard: keep rank 0's
        for stats in cascade.bn.values():
            for v in stats.values():
                dist.broadcast(v, 0)
        tau = torch.tensor([cascade.tau], device=t.device)
        dist.broadcast(tau, 0)
        cascade.tau = float(tau)
    rep = cascade.report(DataLoader(t.loaders.val.dataset, batch_size=cfg.batch_size, shuffle=False), t.device)
    if t.is_main:
        save_checkpoint({**cascade.cascade_state(), "cascade": cfg.cascade}, t.out / "cascade.pt")
        log.info("cascade: top-1 %.2f%% at %.1f%% honest FLOPs reduction; %.1f%% of inputs ran every filter "
                 "(core alone %.2f%%); exit decision lift %+.1f pts", rep["top1"], 100 * rep["flops_reduction"],
                 100 * rep["escalated"], rep["core_top1"], 100 * rep["gate_lift"])
    return rep


__all__ = ["finish", "start"]
