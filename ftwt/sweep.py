"""The accuracy-and-latency trade-off of several pruning methods on one harness: ``ftwt sweep``.

For each mass threshold ``r`` the sweep estimates, before any training, the honest FLOPs
reduction perfect gates at ``r`` would give, then fine-tunes from the same dense model with
the same epochs and data:

* ``ftwt``: the paper's mode at ``r``;
* ``uniform``: the paper's mode with the ``uniform`` criterion, its ratio ``rho`` chosen so
  that its estimate matches the ``ftwt`` estimate at ``r``;
* ``ftwt+``: the recommended dynamic mode (:data:`ftwt.PRESETS`), ``rho`` matched the same way;
* ``oracle``: the labels themselves as masks (perfect gates, not deployable): the bound;
* ``static`` / ``static-inner``: Torch-Pruning of every channel group / of the blocks' inner
  channels only, to the honest FLOPs of the ``ftwt`` estimate at ``r``, fine-tuned with the
  same epochs and a cosine schedule.

So every method of one setting is given the same budget, the estimate at ``r``; the paper's
mode and the ``uniform`` criterion may end elsewhere (``estimation_error``), and the curves
compare methods at the FLOPs each achieved.

Each run lives in ``OUT/runs/NAME``; a finished one (``row.json``) is skipped when the sweep
is run again, a gated one killed midway resumes from its ``last.pt``. At the end the batch-1
CPU latency of what each run would deploy (the sparse engine for gated models, the pruned
model for static ones, the dense model) is measured side by side, and ``OUT/sweep.csv`` and
``OUT/sweep.png`` are written.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ftwt._io import atomic_write_text
from ftwt._sweep_runs import Harness
from ftwt.errors import ConfigError
from ftwt.train import TrainConfig

log = logging.getLogger(__name__)

METHODS = ("ftwt", "uniform", "ftwt+", "oracle", "static", "static-inner")
COLUMNS = ("method", "setting", "parameter", "estimated_reduction", "achieved_reduction", "estimation_error",
           "reference_reduction", "top1", "top5", "varying_fraction", "gate_lift", "latency_ms", "deployed",
           "train_seconds", "run")
# Keys of the sweep that decide every run's result: a folder holding runs made with others is refused.
_IDENTITY = ("model", "init", "epochs", "train", "estimate_samples")


@dataclass
class SweepConfig:
    """One sweep; ``train`` holds further :class:`~ftwt.train.TrainConfig` keys shared by every run."""

    init: str  # the dense checkpoint every run starts from
    model: str = "resnet56"  # registry name, torchvision:NAME or package.module:factory
    masses: tuple[float, ...] = (0.8, 0.85, 0.9, 0.95, 1.0)  # the settings r
    methods: tuple[str, ...] = METHODS
    epochs: int = 10  # fine-tuning epochs of every run, static ones included
    out_dir: str = "runs/sweep"
    train: dict[str, Any] = field(default_factory=dict)  # e.g. dataset, data_dir, batch_size, workers, seed
    estimate_samples: int = 256  # training samples of each estimate (and of the rho matching)
    latency: bool = True  # measure batch-1 CPU latency at the end
    latency_samples: int = 16  # validation images cycled while timing
    latency_seconds: float = 1.0  # timing per deployed model
    threads: int = 1  # CPU threads while timing
    progress: bool = True  # training bars

    def __post_init__(self) -> None:
        self.masses, self.methods = tuple(float(r) for r in self.masses), tuple(self.methods)
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ConfigError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
        bad = [r for r in self.masses if not 0.0 < r <= 1.0]
        if bad or not self.masses:
            raise ConfigError(f"masses must lie in (0, 1], got {list(self.masses) or 'none'}")
        if self.epochs <= 0:
            raise ConfigError(f"epochs must be positive, got {self.epochs}")
        reserved = {"init", "model", "epochs", "out_dir"} & set(self.train)
        if reserved:
            raise ConfigError(f"set {sorted(reserved)} on the sweep itself, not in its train settings")
        TrainConfig(model=self.model, **self.train)  # unknown or bad keys are one line now

    def identity(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k in _IDENTITY}


def run_sweep(config: SweepConfig) -> list[dict[str, Any]]:
    """Run (or finish) the sweep; returns the rows of ``OUT/sweep.csv``.

    Raises:
        ConfigError: bad settings, a missing dense checkpoint, or an output folder that holds
            a sweep of another model, checkpoint, epochs or data.

    Example:
        >>> rows = run_sweep(SweepConfig(init="runs/dense/best.pt", model="resnet20", masses=(0.8, 0.9),
        ...                              epochs=10, train={"dataset": "cifar10"}, out_dir="runs/sweep"))
    """
    cfg = config
    if not Path(cfg.init).is_file():
        raise ConfigError(f"dense checkpoint not found: {cfg.init}; train one with ftwt train --dense")
    out = Path(cfg.out_dir)
    _claim(out, cfg)
    harness = Harness(cfg, out)
    rows = [harness.row("dense", None, harness.dense)]
    for r in cfg.masses:
        for method in sorted(cfg.methods, key=METHODS.index):
            rows.append(harness.row(method, r, harness.runner(method, r)))
    if cfg.latency:
        for row, ms in zip(rows, harness.latencies(rows), strict=True):
            row["latency_ms"] = ms
    write_csv(rows, out / "sweep.csv")
    from ftwt.plots import plot_sweep

    plot_sweep(rows, out / "sweep.png", title=f"{cfg.model}, {cfg.epochs} epochs of fine-tuning")
    return rows


def _claim(out: Path, cfg: SweepConfig) -> None:
    """Record the sweep's identity in ``OUT/sweep.json``; refuse a folder holding another sweep."""
    out.mkdir(parents=True, exist_ok=True)
    path, identity = out / "sweep.json", json.loads(json.dumps(cfg.identity()))
    if path.exists():
        held = json.loads(path.read_text())
        changed = sorted(k for k in set(held) | set(identity) if held.get(k) != identity.get(k))
        if changed:
            raise ConfigError(f"{out} holds a sweep with other {', '.join(changed)}; choose another --out "
                              "or remove the folder")
    atomic_write_text(path, json.dumps(identity, indent=1) + "\n")


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """The rows as CSV, columns :data:`COLUMNS`, empty cells for what does not apply."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in COLUMNS})
    atomic_write_text(path, buf.getvalue())


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """``sweep.csv`` back as rows, numbers as floats and empty cells as None."""
    def value(text: str) -> Any:
        if text == "":
            return None
        try:
            return float(text)
        except ValueError:
            return text

    with open(path, newline="") as f:
        return [{k: value(v) for k, v in row.items()} for row in csv.DictReader(f)]


__all__ = ["COLUMNS", "METHODS", "SweepConfig", "read_csv", "run_sweep", "write_csv"]
