"""The runs of a sweep (:mod:`ftwt.sweep`): the dense reference, gated runs, static ones, and their latency.

One :class:`Harness` per sweep holds what the runs share: the data, the dense model's
FLOPs and the estimate at each ``r`` (the budget every method of that setting is given).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ftwt._io import atomic_write_text
from ftwt.checkpoint import load_checkpoint, save_checkpoint
from ftwt.estimate import estimate, first_samples
from ftwt.evaluate import evaluate
from ftwt.train import PRESETS, TrainConfig, Trainer, load_model, load_trained
from ftwt.train._files import read_metrics
from ftwt.train._user import build_model, resolve_data
from ftwt.train.runtime import resolve_device

if TYPE_CHECKING:
    from ftwt.sweep import SweepConfig

log = logging.getLogger(__name__)

Runner = Callable[[Path], dict[str, Any]]
_GATED = {"ftwt": {}, "oracle": {"masks": "ground_truth"}, "uniform": {"criterion": "uniform"},
          "ftwt+": PRESETS["ftwt+"]}
_STATIC_SCOPES = {"static": "all", "static-inner": "internal"}
_RHO_STEPS = 12  # bisection steps matching rho to an estimate: 2^-12 of the range


class Harness:
    """Builds and runs the sweep's runs; each returns its row (see :data:`ftwt.sweep.COLUMNS`)."""

    def __init__(self, cfg: SweepConfig, out: Path) -> None:
        self.cfg, self.runs = cfg, out / "runs"
        base = TrainConfig(model=cfg.model, init=cfg.init, epochs=cfg.epochs, **cfg.train)
        self.base, train_set, val_set, self.info = resolve_data(base.resolved(), None, None, None)
        self.device = resolve_device(self.base.device)
        gen = torch.Generator().manual_seed(self.base.seed)
        self.train = DataLoader(train_set, batch_size=self.base.batch_size, shuffle=True, generator=gen,
                                num_workers=self.base.workers)
        self.val = DataLoader(val_set, batch_size=self.base.batch_size, num_workers=self.base.workers)
        plain = DataLoader(train_set, batch_size=self.base.batch_size, shuffle=False)
        torch.manual_seed(self.base.seed)  # the same augmented samples, so the same budgets, on every invocation
        self.samples = first_samples(plain, cfg.estimate_samples)
        self.example = torch.zeros(1, *self.info.input_size)
        self.num_classes = self.base.num_classes or self.info.num_classes
        self._dense = load_model(cfg.model, self.num_classes, cfg.init, **self.base.model_kwargs())  # read once
        self.dense_macs = 0.0
        self._estimates: dict[float, float] = {}

    # Rows ------------------------------------------------------------------------------------
    def row(self, method: str, r: float | None, runner: Runner) -> dict[str, Any]:
        """The row of one run: read back if it finished before, else run now and keep it."""
        name = method if r is None else f"{method}-r{r:g}"
        run_dir = self.runs / name
        path = run_dir / "row.json"
        if path.exists():
            row = json.loads(path.read_text())
            log.info("%s: finished before, skipped (top-1 %.2f%%)", name, row["top1"])
        else:
            run_dir.mkdir(parents=True, exist_ok=True)
            row = {"method": method, "setting": r, "run": str(run_dir), **runner(run_dir)}
            if row.get("estimated_reduction") is not None and row.get("achieved_reduction") is not None:
                row["estimation_error"] = row["estimated_reduction"] - row["achieved_reduction"]
            atomic_write_text(path, json.dumps(row, indent=1) + "\n")
            log.info("%s: top-1 %.2f%%, honest FLOPs reduction %s (estimated %s), %.0f s", name, row["top1"],
                     _pct(row.get("achieved_reduction")), _pct(row.get("estimated_reduction")), row["train_seconds"])
        if method == "dense":
            self.dense_macs = row["dense_macs"]
        return row

    def runner(self, method: str, r: float) -> Runner:
        if method in _STATIC_SCOPES:
            return lambda run_dir: self.static(run_dir, r, _STATIC_SCOPES[method])
        return lambda run_dir: self.gated(run_dir, method, r)

    def dense(self, run_dir: Path) -> dict[str, Any]:
        rep = evaluate(self._dense_model(), self.val, self.device)
        return {"parameter": None, "achieved_reduction": 0.0, "reference_reduction": 0.0, "top1": rep["top1"],
                "top5": rep["top5"], "dense_macs": rep["dense_macs"], "deployed": "dense model", "train_seconds": 0.0}

    def gated(self, run_dir: Path, method: str, r: float) -> dict[str, Any]:
        last = run_dir / "last.pt"
        if last.exists():  # a run killed midway: continue it exactly
            log.info("%s: resuming from %s", run_dir.name, last)
            trainer = Trainer.resume(str(last), {"progress": self.cfg.progress})
            parameter = trainer.config.threshold
        else:
            parameter = r if method in ("ftwt", "oracle") else self.matched_rho(method, r)
            trainer = Trainer(TrainConfig(**{
                **self.cfg.train, **_GATED[method], "threshold": parameter, "model": self.cfg.model,
                "init": self.cfg.init, "epochs": self.cfg.epochs, "out_dir": str(run_dir),
                "progress": self.cfg.progress, "overwrite": True}))
        rep = trainer.fit()
        deployable = method != "oracle"
        return {"parameter": parameter, "estimated_reduction": rep["estimated_reduction"],
                "achieved_reduction": rep["flops_reduction"], "reference_reduction": rep["reference_reduction"],
                "top1": rep["top1"], "top5": rep["top5"], "varying_fraction": rep.get("varying_fraction"),
                "gate_lift": rep.get("gate_lift"), "dynamic_macs": rep["dynamic_macs"],
                "deployed": "sparse engine" if deployable else "none (its masks need the full output)",
                "train_seconds": _epoch_seconds(run_dir)}

    def static(self, run_dir: Path, r: float, scope: str) -> dict[str, Any]:
        from ftwt.baselines import finetune, prune_to_macs

        target = self.dense_macs * (1.0 - self.estimate(r))
        torch.manual_seed(self.base.seed)
        pruned = prune_to_macs(self._dense_model().cpu(), self.example, target, scope=scope)
        start = time.time()
        model = finetune(pruned.model, _Epochs(self.train, run_dir.name, self.cfg.progress), self.cfg.epochs,
                         device=self.device)
        seconds = time.time() - start
        rep = evaluate(model, self.val, self.device)
        save_checkpoint({"model": model.cpu().state_dict(), "target_macs": target, "scope": scope},
                        run_dir / "static.pt")
        achieved = 1.0 - pruned.macs / self.dense_macs
        return {"parameter": 1.0 - target / self.dense_macs, "estimated_reduction": 1.0 - target / self.dense_macs,
                "achieved_reduction": achieved, "reference_reduction": achieved, "top1": rep["top1"],
                "top5": rep["top5"], "deployed": "pruned model", "train_seconds": seconds}

    # Budgets ---------------------------------------------------------------------------------
    def estimate(self, r: float) -> float:
        """The paper's estimate at ``r``: honest reduction of perfect mass gates on the dense model."""
        if r not in self._estimates:
            self._estimates[r] = estimate(self._dense_model(), self.samples, r, "mass", device=self.device).reduction
        return self._estimates[r]

    def matched_rho(self, method: str, r: float) -> float:
        """The ratio rho whose estimate under ``method``'s gates matches the ``ftwt`` estimate at ``r``."""
        target = self.estimate(r)
        cfg = TrainConfig(**{**self.cfg.train, **_GATED[method], "model": self.cfg.model, "init": self.cfg.init,
                             "num_classes": self.num_classes})
        model = build_model(cfg.resolved(), True, False, False, None).to(self.device)
        lo, hi = 0.0, 0.99
        for _ in range(_RHO_STEPS):  # the estimate grows with rho
            mid = (lo + hi) / 2
            reduction = estimate(model, self.samples, mid, "uniform", device=self.device).reduction
            lo, hi = (lo, mid) if reduction >= target else (mid, hi)
        log.info("%s at r=%g: rho %.3f matches the estimate %.1f%%", method, r, hi, 100 * target)
        return round(hi, 4)

    # Latency ---------------------------------------------------------------------------------
    def latencies(self, rows: list[dict[str, Any]]) -> list[float | None]:
        """Batch-1 CPU milliseconds of what each row would deploy, all measured side by side."""
        from ftwt.bench import time_calls
        from ftwt.engine import SparseEngine

        xs = [x[None] for x in torch.cat(first_samples(self.val, self.cfg.latency_samples))]
        fns: dict[str, Callable[[], Any]] = {}
        for row in rows:
            run = Path(row["run"])
            if row["method"] == "dense":
                fns[run.name] = _call(self._dense_model().eval(), xs)
            elif row["method"] in _STATIC_SCOPES:
                fns[run.name] = _call(self._static_model(run).eval(), xs)
            elif row["deployed"] == "sparse engine":
                fns[run.name] = _call(SparseEngine(load_trained(run / "last.pt")[0].eval()), xs)
        ms = time_calls(fns, threads=self.cfg.threads, min_run_time=self.cfg.latency_seconds)
        return [ms.get(Path(row["run"]).name) for row in rows]

    def _dense_model(self) -> nn.Module:
        """A fresh copy of the dense model every run starts from."""
        return copy.deepcopy(self._dense).to(self.device)

    def _static_model(self, run: Path) -> nn.Module:
        from ftwt.baselines import prune_to_macs

        saved = load_checkpoint(run / "static.pt")
        torch.manual_seed(self.base.seed)
        model = prune_to_macs(self._dense_model().cpu(), self.example, saved["target_macs"],
                              scope=saved["scope"]).model
        model.load_state_dict(saved["model"])
        return model


class _Epochs:
    """A loader that shows a progress bar for each pass over it."""

    def __init__(self, loader: DataLoader, name: str, progress: bool) -> None:
        self.loader, self.name, self.progress, self.epoch = loader, name, progress, 0

    def __iter__(self) -> Iterator[Any]:
        from tqdm.auto import tqdm

        self.epoch += 1
        return iter(tqdm(self.loader, desc=f"{self.name} epoch {self.epoch}", leave=False, disable=not self.progress))


def _call(fn: Callable[[torch.Tensor], Any], xs: list[torch.Tensor]) -> Callable[[], Any]:
    it = _cycle(xs)
    return lambda: fn(next(it))


def _cycle(xs: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    while True:
        yield from xs


def _epoch_seconds(run_dir: Path) -> float:
    """Training wall time: the epochs' own times in ``metrics.jsonl`` (a resumed run's included)."""
    return float(sum(m.get("time", 0.0) for m in read_metrics(run_dir)))


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


__all__ = ["Harness"]
