"""Width cascade: a gated model's static core for every input, every filter for the inputs that need it.

A per-filter choice that changes from one input to the next costs the backbone training fit
(each such filter sees a share of the data, and the next layer a changing mix of inputs);
measured on real images, it costs more than it returns even when the choice is exact. What
a static model cannot do is spend more on hard inputs and less on easy ones. A
:class:`WidthCascade` runs one set of weights in two widths:

* the *core*: the gated model's masks, for every input. With gates started as the static
  L1 x |gamma| choice and not trained (:func:`ftwt.surgery.init_gates_from_weights`), the
  same filters for every input, so the engine runs fixed shapes;
* the *full* width: every filter, for the inputs whose core prediction is not confident
  (top softmax probability below :attr:`WidthCascade.tau`). They pay the core pass and a
  full pass: nothing of the core pass is reused, since the residual stream changes with
  the width.

Both widths train together (:func:`cascade_loss`, the sum of their losses, as slimmable
networks train), and each keeps its own BatchNorm statistics (:func:`bn_statistics`,
re-estimated after training; the affine parameters are shared). ``tau`` is set by
:meth:`WidthCascade.set_budget` on images no model was trained on, so that the mean honest
cost is a budget.

The exit decision is the cascade's gate. Its label for an input is whether the core gets
the input wrong (the input needs more filters than the core); :meth:`WidthCascade.report`
gives its accuracy, the best input-independent predictor's (the majority label) and the
lift, as :func:`ftwt.evaluate` does for per-filter gates.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ftwt._passes import batches
from ftwt.cascade_deploy import CascadeEngine
from ftwt.errors import ConfigError, DataError
from ftwt.record import record
from ftwt.surgery import detach_gates, is_gated

WIDTHS = ("core", "full")
_MASKS = {"core": "gate", "full": "none"}  # the full width runs no gate


def _bns(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def width_forward(model: nn.Module, x: torch.Tensor, width: str) -> torch.Tensor:
    """``model(x)`` at one width: ``"core"`` (the gates' masks) or ``"full"`` (every filter)."""
    if width not in _MASKS:
        raise ConfigError(f"unknown width {width!r}; choose from {list(WIDTHS)}")
    with record(model, masks=_MASKS[width], labels=False):
        return model(x)


@contextlib.contextmanager
def running_stats_kept(model: nn.Module) -> Iterator[None]:
    """BatchNorm normalises with the batch's statistics but leaves its running ones as they are
    (momentum 0), so that they follow the core alone during training, and a validation pass of
    the core in between epochs is not run with a mix of both widths' statistics."""
    bns = _bns(model)
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.momentum = 0.0
    try:
        yield
    finally:
        for bn, mom in zip(bns, saved, strict=True):
            bn.momentum = mom


def full_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The full width's training forward: every filter, its BatchNorm running statistics untouched."""
    with running_stats_kept(model):
        return width_forward(model, x, "full")


def cascade_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both widths' cross-entropy on one batch (each width's BatchNorm uses this batch's statistics;
    the running statistics follow the core), and the core's output."""
    core = width_forward(model, x, "core")
    return F.cross_entropy(core, y) + F.cross_entropy(full_forward(model, x), y), core


@torch.no_grad()
def bn_statistics(model: nn.Module, loader: Iterable[Any], width: str, device: torch.device | str = "cpu",
                  max_batches: int | None = None) -> dict[str, torch.Tensor]:
    """BatchNorm running statistics of one width, re-estimated over ``loader`` (a cumulative
    average over its batches); the model's own statistics are left as they were."""
    bns = _bns(model)
    saved = [(bn.momentum, bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
             for bn in bns]
    was_training = model.training
    try:
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
        model.train()
        seen = 0
        for x, _ in batches(loader, max_batches):
            width_forward(model, x.to(device), width)
            seen += 1
        if not seen:
            raise DataError("bn_statistics: the loader gave no batches")
        return {f"{i}.{k}": getattr(bn, k).clone() for i, bn in enumerate(bns) for k in ("running_mean", "running_var")}
    finally:
        for bn, (mom, mean, var, tracked) in zip(bns, saved, strict=True):
            bn.momentum = mom
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            bn.num_batches_tracked.copy_(tracked)
        model.train(was_training)


def _use_bn(model: nn.Module, stats: dict[str, torch.Tensor]) -> None:
    bns = _bns(model)
    if len(stats) != 2 * len(bns):
        raise ConfigError(f"BatchNorm statistics for {len(stats) // 2} layers, the model has {len(bns)}")
    for i, bn in enumerate(bns):
        bn.running_mean.copy_(stats[f"{i}.running_mean"])
        bn.running_var.copy_(stats[f"{i}.running_var"])


class WidthCascade(nn.Module):
    """A gated model run as a two-width cascade (see the module's docstring); inference only.

    Args:
        model: a gated model (its gates' masks are the core).
        bn: ``{"core": stats, "full": stats}``, each from :func:`bn_statistics` (``"core"`` only
            with ``full``).
        tau: inputs whose core top probability is below ``tau`` also run the full width
            (0: none does; above 1: every one does).
        full: a separate plain model as the full width (the dense model the core was pruned
            from, say) instead of the gated model's own filters: two sets of weights, and the
            core trains alone.

    Example:
        >>> bn = {w: ftwt.cascade.bn_statistics(model, train_loader, w) for w in ftwt.cascade.WIDTHS}
        >>> cascade = ftwt.WidthCascade(model, bn)
        >>> cascade.set_budget(held_out_loader, macs=0.5 * dense_macs)
        >>> cascade.report(val_loader)["top1"]
    """

    def __init__(self, model: nn.Module, bn: dict[str, dict[str, torch.Tensor]], tau: float = 0.0,
                 full: nn.Module | None = None) -> None:
        super().__init__()
        if not is_gated(model):
            raise ConfigError("WidthCascade needs a gated model (ftwt.attach_gates): its masks are the core")
        if full is not None and is_gated(full):
            raise ConfigError("WidthCascade: a separate full width must be a plain model (ftwt.detach_gates)")
        needed = ("core",) if full is not None else WIDTHS
        missing = [w for w in needed if w not in bn]
        if missing:
            raise ConfigError(f"WidthCascade: no BatchNorm statistics for width(s) {missing}")
        for w in needed:
            if len(bn[w]) != 2 * len(_bns(model)):
                raise ConfigError(f"WidthCascade: {w!r} statistics are for {len(bn[w]) // 2} BatchNorm layers, "
                                  f"the model has {len(_bns(model))}")
        self.model = model
        self.bn = {w: bn[w] for w in needed}
        self.tau = float(tau)
        self.full = full.eval() if full is not None else None

    def use(self, width: str) -> nn.Module:
        """The model with ``width``'s BatchNorm statistics loaded (to evaluate one width with other tools)."""
        if width == "full" and self.full is not None:
            return self.full
        if width not in self.bn:
            raise ConfigError(f"unknown width {width!r}; choose from {list(WIDTHS)}")
        _use_bn(self.model, self.bn[width])
        return self.model

    @torch.no_grad()
    def _pass(self, x: torch.Tensor, width: str, meter: Any = None) -> torch.Tensor:
        net = self.use(width).eval()
        with meter if meter is not None else contextlib.nullcontext():
            return net(x) if net is self.full else width_forward(net, x, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits: the core's, and the full width's for the inputs the core is not confident about."""
        out = self._pass(x, "core")
        up = out.softmax(1).amax(1) < self.tau
        if bool(up.any()):
            out[up] = self._pass(x[up], "full")
        return out

    @torch.no_grad()
    def outputs(self, loader: Iterable[Any], device: torch.device | str = "cpu",
                max_batches: int | None = None) -> dict[str, torch.Tensor]:
        """Both widths over ``loader``: softmax outputs, per-sample honest MACs, the dense count, the core
        masks, targets."""
        from ftwt.flops import FlopsMeter

        got: dict[str, list[torch.Tensor]] = {k: [] for k in ("core", "full", "y")}
        meters = {w: FlopsMeter(self.use(w)) for w in WIDTHS}
        masks: dict[str, list[torch.Tensor]] = {}
        with record(self.model) as rec:
            for x, y in batches(loader, max_batches):
                if y is None:
                    raise DataError("WidthCascade needs (inputs, targets) batches")
                x = x.to(device)
                for w in WIDTHS:
                    got[w].append(self._pass(x, w, meters[w]).softmax(1).cpu())
                    if w == "core":
                        for name, m in rec.masks.items():
                            masks.setdefault(name, []).append(m.cpu())
                got["y"].append(y.cpu())
        if not got["y"]:
            raise DataError("WidthCascade: the loader gave no samples")
        out = {k: torch.cat(v) for k, v in got.items()}
        for w in WIDTHS:
            out[f"{w}_macs"] = meters[w].report().per_sample
        out["dense_macs"] = meters["full"].report().dense_macs
        out["masks"] = {k: torch.cat(v) for k, v in masks.items()}
        return out

    def set_budget(self, loader: Iterable[Any], *, macs: float | None = None, share: float | None = None,
                   device: torch.device | str = "cpu", max_batches: int | None = None) -> float:
        """Set :attr:`tau` on ``loader``'s images (not the training images: their confidence is
        inflated) so that the mean honest MACs per input are ``macs``, or so that ``share`` of the
        inputs run the full width; returns ``tau``."""
        if (macs is None) == (share is None):
            raise ConfigError("set_budget: give exactly one of macs= and share=")
        out = self.outputs(loader, device, max_batches)
        core, full = float(out["core_macs"].mean()), float(out["full_macs"].mean())
        if macs is not None:
            if macs < core:
                raise ConfigError(f"set_budget: {macs:.4g} MACs is below the core's own {core:.4g}; prune the core more")
            share = (macs - core) / full
        if not 0.0 <= share <= 1.0:
            raise ConfigError(f"set_budget: share {share:.3f} of the inputs would run the full width; it must be in [0, 1]")
        conf = out["core"].amax(1)
        self.tau = 0.0 if share == 0 else (2.0 if share == 1 else float(torch.quantile(conf.double(), share)))
        return self.tau

    def report(self, loader: Iterable[Any], device: torch.device | str = "cpu",
               max_batches: int | None = None) -> dict[str, Any]:
        """Accuracy, honest MACs and the exit decision's statistics over ``loader`` (JSON-ready).

        Keys: ``top1``, ``core_top1``, ``full_top1``, ``escalated`` (share of inputs that ran
        the full width), ``tau``, ``samples``, ``dense_macs``, ``core_macs``, ``dynamic_macs``,
        ``flops_reduction``, ``varying_fraction`` (gated filters whose decision differs between
        inputs), ``label_varying_fraction``, ``gate_accuracy``, ``static_oracle_accuracy`` and
        ``gate_lift`` of the exit decision against its label (the core gets the input wrong).
        """
        return score(self.outputs(loader, device, max_batches), self.tau)

    def core_model(self, example: torch.Tensor) -> nn.Module:
        """The core as a physically smaller plain model (Torch-Pruning): the filters outside it removed,
        the core's BatchNorm statistics in. Only a static core (the same filters for every input,
        as the ``cascade`` preset's) can be removed for good."""
        from ftwt.baselines import _tp

        tp = _tp()
        plain = copy.deepcopy(self.model).cpu().eval()
        _use_bn(plain, self.bn["core"])
        with torch.no_grad(), record(plain) as rec:
            width_forward(plain, example.cpu(), "core")
            masks = {k: m.cpu() for k, m in rec.masks.items()}
        if any(not bool((m == m[:1]).all()) for m in masks.values()):
            raise ConfigError("the core's masks vary with the input: only a static core can be pruned for good "
                              "(use engine(kind='sparse'))")
        detach_gates(plain)
        named = dict(plain.named_modules())
        graph = tp.DependencyGraph().build_dependency(plain, example_inputs=example.cpu())
        for name, m in masks.items():
            drop = (~m[0]).nonzero().flatten().tolist()
            if drop:
                graph.get_pruning_group(named[name], tp.prune_conv_out_channels, idxs=drop).prune()
        return plain.eval()

    def full_model(self) -> nn.Module:
        """Every filter: a plain copy of the model, gates detached, the full width's BatchNorm statistics in
        (or a copy of the separate full model)."""
        if self.full is not None:
            return copy.deepcopy(self.full).cpu().eval()
        plain = copy.deepcopy(self.model).cpu().eval()
        _use_bn(plain, self.bn["full"])
        detach_gates(plain)
        return plain.eval()

    def engine(self, example: torch.Tensor, kind: str = "pruned", kernel: str = "auto") -> CascadeEngine:
        """The cascade for deployment (:class:`CascadeEngine`), one input at a time.

        ``kind="pruned"``: the core as a physically smaller model (:meth:`core_model`) and the
        full width as the plain model (:meth:`full_model`), both PyTorch modules with BatchNorm
        folded (:func:`ftwt.engine.fold.fold_model`); saved as two
        ``torch.export`` programs. ``"sparse"``: both widths on :class:`ftwt.SparseEngine` (its
        gates decide; for a core whose masks vary), kernels chosen on ``example``.
        """
        from ftwt.engine import SparseEngine
        from ftwt.engine.fold import fold_model

        if kind == "pruned":  # BatchNorm folded into the convolutions: the same outputs, fewer passes
            ex = example[:1].cpu()
            return CascadeEngine(fold_model(self.core_model(ex), ex)[0], fold_model(self.full_model(), ex)[0], self.tau)
        if kind != "sparse":
            raise ConfigError(f"unknown cascade engine kind {kind!r}; choose 'pruned' or 'sparse'")
        if self.full is not None:
            raise ConfigError("a separate full model is not gated: use engine(kind='pruned')")
        widths = {}
        for w in WIDTHS:
            model = copy.deepcopy(self.model).cpu().eval()
            _use_bn(model, self.bn[w])
            widths[w] = model
        full = SparseEngine(widths["full"], kernel=kernel)
        engine = CascadeEngine(SparseEngine(widths["core"], kernel=kernel, example=example), full, self.tau)
        full.calibrate(example[:1], engine._all)  # kept-filter indices hold for one sample
        return engine

    def cascade_state(self) -> dict[str, Any]:
        """What a checkpoint needs beside the model's state: ``{"bn": ..., "tau": ...}`` (tensors and a float)."""
        return {"bn": {w: {k: v.cpu() for k, v in s.items()} for w, s in self.bn.items()}, "tau": self.tau}

    @classmethod
    def load(cls, run_dir: str | Path) -> WidthCascade:
        """The cascade a training run with ``cascade`` set wrote: its final model (``last.pt``) and ``cascade.pt``."""
        from ftwt.checkpoint import load_checkpoint
        from ftwt.train import load_model

        run = Path(run_dir)
        if not (run / "cascade.pt").is_file():
            raise ConfigError(f"{run} holds no cascade.pt: train with the config key cascade set (--preset cascade)")
        return cls.from_state(load_model(run / "last.pt"), load_checkpoint(run / "cascade.pt"))

    @classmethod
    def from_state(cls, model: nn.Module, state: dict[str, Any], full: nn.Module | None = None) -> WidthCascade:
        """The cascade of :meth:`cascade_state` on ``model`` (and the separate ``full`` model it had, if any)."""
        if not isinstance(state, dict) or "bn" not in state or "tau" not in state:
            raise ConfigError("a width cascade's state needs 'bn' and 'tau' (WidthCascade.cascade_state)")
        return cls(model, state["bn"], float(state["tau"]), full)


def score(out: dict[str, Any], tau: float) -> dict[str, Any]:
    """:meth:`WidthCascade.report`'s numbers from :meth:`WidthCascade.outputs` at threshold ``tau``."""
    core, full, y = out["core"], out["full"], out["y"]
    up = core.amax(1) < tau
    pred = torch.where(up, full.argmax(1), core.argmax(1))
    wrong = core.argmax(1) != y
    gate_acc = float((up == wrong).double().mean())
    prior = float(max(wrong.double().mean(), 1 - wrong.double().mean()))
    per_sample = out["core_macs"] + up.double() * out["full_macs"]
    on = labelled = filters = 0
    for m in out["masks"].values():  # a gated filter runs where the core keeps it or the input escalates
        runs, needed = m | up[:, None], m | wrong[:, None]
        on += int(((runs.any(0)) & ~(runs.all(0))).sum())
        labelled += int(((needed.any(0)) & ~(needed.all(0))).sum())
        filters += m.shape[1]
    decided = filters or 1
    # Every filter of every layer; the full width's honest count is lower where an input
    # channel is all zero (the engine skips it too).
    dense_macs = float(out["dense_macs"])
    return {
        "top1": 100.0 * float((pred == y).double().mean()),
        "core_top1": 100.0 * float((core.argmax(1) == y).double().mean()),
        "full_top1": 100.0 * float((full.argmax(1) == y).double().mean()),
        "escalated": float(up.double().mean()), "tau": tau, "samples": int(y.numel()),
        "dense_macs": dense_macs, "core_macs": float(out["core_macs"].mean()),
        "dynamic_macs": float(per_sample.mean()), "flops_reduction": 1.0 - float(per_sample.mean()) / dense_macs,
        "varying_fraction": on / decided, "label_varying_fraction": labelled / decided,
        "gate_accuracy": gate_acc, "static_oracle_accuracy": prior, "gate_lift": gate_acc - prior,
    }


def holdout_split(dataset: Any, share: float, seed: int = 0) -> tuple[Any, Any]:
    """``(rest, held out)``: a random ``share`` of ``dataset`` (fixed by ``seed``, the same on every
    process) kept out of training, to set ``tau`` on images the model has not fitted."""
    from torch.utils.data import Subset

    n = len(dataset)
    k = max(1, round(share * n))
    if k >= n:
        raise ConfigError(f"holding out {k} of {n} training samples leaves none to train on")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(dataset, sorted(order[k:])), Subset(dataset, sorted(order[:k]))

