"""The whole method in about a minute on a laptop CPU: ``ftwt demo``.

On the embedded digits data (no download, no GPU): train a dense ResNet-20, estimate the
FLOPs reduction *before* training the gates, train the recommended mode (a width cascade,
:data:`ftwt.PRESETS` ``["cascade"]``, :mod:`ftwt.cascade`) and the paper's mode from the dense
model, and compare accuracy and honest FLOPs with the dense model and with the best static
model of the same FLOPs (Torch-Pruning, every channel group or the blocks' inner channels
only, chosen on the training data, fine-tuned for as many epochs with the same schedule).
Writes ``OUT/report.json``, ``OUT/accuracy_vs_flops.png`` and each run's own folder
(``OUT/dense``, ``OUT/cascade``, ``OUT/ftwt``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ftwt._io import atomic_write_text
from ftwt.train import TrainConfig, Trainer

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """Settings of the demo (its run time is in the README)."""

    out_dir: str = "runs/demo"  # report.json, accuracy_vs_flops.png, dense/ and ftwt/ runs
    model: str = "resnet20"  # the smallest CIFAR ResNet: accurate on digits within a few epochs
    threshold: float = 0.85  # paper mode's mass r: keep the filters carrying 85% of each unit's activation mass
    rho: float = 0.7  # cascade: share of each block's inner filters outside the core (computed only when unsure)
    budget: float = 0.5  # cascade: its honest FLOPs reduction, which sets how many images run every filter
    dense_epochs: int = 6  # cosine schedule from lr 0.1: ~99% top-1 on digits
    ftwt_epochs: int = 4  # gates train for the first half, the backbone adapts in the second
    batch_size: int = 64  # small batches: more steps per epoch on a 1,437-image training set
    calibrate: bool = True  # match the gates' kept fraction to their labels' when they freeze
    image_size: int = 16  # digits are 8x8, upsampled: 16 px gives the CIFAR models room to downsample
    train_subset: int | None = None  # first N training images only (quick checks); None: all 1,437
    seed: int = 0  # fixed: the demo gives the same numbers on every run
    device: str = "auto"  # CUDA if present, else CPU
    threads: int | None = 1  # CPU threads; at 16 px a second one saves little and, on shared cores, costs more
    progress: bool = True  # tqdm bars
    sweep_masses: tuple[float, ...] = (0.75, 0.85, 0.95)  # --sweep: the thresholds r of the small sweep


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    keys = ("top1", "top5", "core_top1", "full_top1", "escalated", "core_macs", "dense_macs", "dynamic_macs",
            "flops_reduction", "gate_macs", "kept", "kept_labels",
            "gate_accuracy", "varying_fraction", "label_varying_fraction", "static_oracle_accuracy", "gate_lift",
            "ground_truth_reduction", "estimated_reduction")
    return {k: report[k] for k in keys if k in report}


def _static_yardstick(cfg: DemoConfig, dense_ckpt: Path, target_macs: float, dense_macs: float) -> dict[str, Any]:
    """The bar a dynamic model has to clear: the better static model of its FLOPs, trained as long.

    Both scopes are pruned and fine-tuned (cosine schedule, as the recommended mode); the
    one more accurate on the *training* data is the yardstick (validation data stays unseen).
    """
    from ftwt.baselines import SCOPES, finetune, prune_to_macs
    from ftwt.data import DataConfig, build_loaders
    from ftwt.evaluate import evaluate
    from ftwt.train import load_trained

    data = DataConfig(dataset="digits", image_size=cfg.image_size, train_subset=cfg.train_subset,
                      batch_size=cfg.batch_size, workers=0)
    train, val, info = build_loaders(data)
    model, _ = load_trained(dense_ckpt)
    example = torch.zeros(1, *info.input_size)
    best: dict[str, Any] | None = None
    for scope in SCOPES:
        torch.manual_seed(cfg.seed)
        pruned = prune_to_macs(model, example, target_macs, scope=scope)
        small = finetune(pruned.model, train, cfg.ftwt_epochs)
        train_top1 = evaluate(small, train, torch.device("cpu"))["top1"]
        if best is None or train_top1 > best["train_top1"]:
            best = {"top1": evaluate(small, val, torch.device("cpu"))["top1"], "dense_macs": pruned.macs,
                    "flops_reduction": 1.0 - pruned.macs / dense_macs, "scope": scope, "train_top1": train_top1}
    return best


def run_demo(config: DemoConfig | None = None) -> dict[str, Any]:
    """Dense training, FLOPs estimate, FTWT training and evaluation, end to end.

    Args:
        config: demo settings (default :class:`DemoConfig`).

    Returns:
        The dict written to ``OUT/report.json``: ``dense``, ``cascade`` and ``ftwt`` summaries, the
        static yardsticks of their FLOPs (``static_cascade``, ``static``), the paper mode's
        ``estimated_reduction`` and ``achieved_reduction``, ``accuracy_drop`` and timings.

    Example:
        >>> result = run_demo(DemoConfig(out_dir="runs/demo"))
        >>> result["ftwt"]["top1"], result["achieved_reduction"]
    """
    from ftwt.bench import num_threads

    cfg = config or DemoConfig()
    with num_threads(cfg.threads):  # one thread also gives the same numbers on every machine
        return _run(cfg)


def run_demo_sweep(config: DemoConfig | None = None) -> list[dict[str, Any]]:
    """``ftwt demo --sweep``: the dense model, then :func:`ftwt.sweep.run_sweep` on the embedded digits.

    Every method at each of ``sweep_masses``, fine-tuned for ``ftwt_epochs``; writes
    ``OUT/sweep/sweep.csv`` and ``OUT/sweep/sweep.png`` and returns the rows.
    """
    from ftwt.bench import num_threads
    from ftwt.sweep import SweepConfig, run_sweep

    cfg = config or DemoConfig()
    with num_threads(cfg.threads):
        out = Path(cfg.out_dir)
        data = dict(dataset="digits", image_size=cfg.image_size, train_subset=cfg.train_subset,
                    batch_size=cfg.batch_size, workers=0, seed=cfg.seed, device=cfg.device)
        dense = out / "dense" / "last.pt"
        log.info("dense %s on digits, %d epochs", cfg.model, cfg.dense_epochs)
        Trainer(TrainConfig(dense=True, model=cfg.model, epochs=cfg.dense_epochs, out_dir=str(dense.parent),
                            overwrite=True, progress=cfg.progress, **data)).fit()
        return run_sweep(SweepConfig(init=str(dense), model=cfg.model, masses=cfg.sweep_masses,
                                     epochs=cfg.ftwt_epochs, out_dir=str(out / "sweep"), train=data,
                                     latency_seconds=0.5, progress=cfg.progress))


def _run(cfg: DemoConfig) -> dict[str, Any]:
    from ftwt.plots import plot_accuracy_vs_flops

    out = Path(cfg.out_dir)
    common = dict(model=cfg.model, dataset="digits", image_size=cfg.image_size, train_subset=cfg.train_subset,
                  batch_size=cfg.batch_size, workers=0, seed=cfg.seed,
                  device=cfg.device, overwrite=True, progress=cfg.progress)
    start = time.time()
    log.info("1/2 dense %s on digits, %d epochs", cfg.model, cfg.dense_epochs)
    dense = Trainer(TrainConfig(dense=True, epochs=cfg.dense_epochs, out_dir=str(out / "dense"), **common)).fit()
    dense_time = time.time() - start
    init = str(out / "dense" / "last.pt")
    log.info("2/3 width cascade (recommended) at %.0f%% reduction, core rho=%g, from the dense model, %d epochs",
             100 * cfg.budget, cfg.rho, cfg.ftwt_epochs)
    run = Trainer(TrainConfig.from_preset("cascade", init=init, threshold=cfg.rho, cascade=cfg.budget,
                                          epochs=cfg.ftwt_epochs, out_dir=str(out / "cascade"), **common)).fit()
    cascade = {**run["cascade"], "estimated_reduction": run["estimated_reduction"]}
    log.info("3/3 FTWT paper mode at r=%g from the dense model, %d epochs", cfg.threshold, cfg.ftwt_epochs)
    ftwt = Trainer(TrainConfig(init=init, threshold=cfg.threshold, epochs=cfg.ftwt_epochs,
                               calibrate=cfg.calibrate, calibrate_batches=8, out_dir=str(out / "ftwt"), **common)).fit()
    log.info("yardsticks: static models of the same FLOPs (Torch-Pruning), fine-tuned for %d epochs", cfg.ftwt_epochs)
    static_cascade = _static_yardstick(cfg, out / "dense" / "last.pt", cascade["dynamic_macs"], dense["dense_macs"])
    static = _static_yardstick(cfg, out / "dense" / "last.pt", ftwt["dynamic_macs"], dense["dense_macs"])
    points = [
        {"label": "dense", "top1": dense["top1"], "flops_reduction": 0.0, "kind": "dense"},
        {"label": "static, same FLOPs", "top1": static_cascade["top1"], "flops_reduction": static_cascade["flops_reduction"],
         "kind": "static"},
        {"label": "static, same FLOPs", "top1": static["top1"], "flops_reduction": static["flops_reduction"],
         "kind": "static"},
        {"label": "cascade", "top1": cascade["top1"], "flops_reduction": cascade["flops_reduction"],
         "kind": "cascade"},
        {"label": f"FTWT r={cfg.threshold:g}", "top1": ftwt["top1"], "flops_reduction": ftwt["flops_reduction"],
         "kind": "ftwt"},
        {"label": f"estimate r={cfg.threshold:g}", "top1": None, "flops_reduction": ftwt["estimated_reduction"],
         "kind": "estimate"},
    ]
    plot = plot_accuracy_vs_flops(points, out / "accuracy_vs_flops.png", title=f"{cfg.model} on digits")
    result = {
        "config": asdict(cfg),
        "dense": _summary(dense),
        "cascade": _summary(cascade),
        "static_cascade": static_cascade,
        "ftwt": _summary(ftwt),
        "static": static,
        "estimated_reduction": ftwt["estimated_reduction"],
        "achieved_reduction": ftwt["flops_reduction"],
        "accuracy_drop": dense["top1"] - ftwt["top1"],
        "dense_seconds": dense_time,
        "total_seconds": time.time() - start,
        "files": {"plot": str(plot), "dense": str(out / "dense"), "cascade": str(out / "cascade"), "ftwt": str(out / "ftwt")},
    }
    atomic_write_text(out / "report.json", json.dumps(result, indent=2, allow_nan=False) + "\n")
    return result


__all__ = ["DemoConfig", "run_demo", "run_demo_sweep"]
