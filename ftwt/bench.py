"""Wall-clock speed of dynamic pruning: dense, masked, sparse engine and static model side by side.

FLOPs are a promise; latency is what a deployment gets. For one gated model this times
four ways of computing the same predictions, per batch (batch 1 by default), with
PyTorch's own timer:

* **dense**: the original model, gates detached, as fast as plain PyTorch runs it: BatchNorm
  folded into the convolutions and the faster of NCHW and channels-last (:func:`tuned`);
* **masked**: the gated model computing every filter and multiplying by the mask, which is
  what the reference code does at inference (ground truth is not built while timing);
* **engine**: :class:`ftwt.engine.SparseEngine`, computing only the active filters from
  the active input channels, with BatchNorm folded;
* **static**: a Torch-Pruning model of the same mean MACs as the dynamic one
  (:mod:`ftwt.baselines`), the bar a dynamic method has to clear, tuned as dense is.

Masks come from the gates (a trained checkpoint) or, with ``masks="ground_truth"``, from
the ground truth at the gates' threshold, collected once and replayed into the engine:
the speed that *perfect* gates would buy.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import os
import platform
import statistics
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ftwt.baselines import prune_to_macs
from ftwt.engine import SparseEngine, kept_filters
from ftwt.errors import ConfigError
from ftwt.flops import measure
from ftwt.record import record
from ftwt.surgery import detach_gates, is_gated

MASKS = ("gate", "ground_truth")


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """What the timings were measured on: CPU model, core count, torch version (and GPU)."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def describe_machine(info: dict[str, Any]) -> str:
    """One line for tables: ``AMD EPYC 7B13, 2 cores, torch 2.5.1``."""
    gpu = f", {info['gpu']}" if "gpu" in info else ""
    return f"{info['cpu']}, {info['cores']} cores{gpu}, torch {info['torch']}"


@contextlib.contextmanager
def num_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` intra-op CPU threads (None: as they are), then restore them."""
    if threads is None:
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def time_calls(
    fns: dict[str, Callable[[], Any]],
    *,
    threads: int,
    min_run_time: float = 1.0,
    warmup: int = 3,
    rounds: int = 3,
) -> dict[str, float]:
    """Median wall-clock milliseconds of one call of each function.

    Uses ``torch.utils.benchmark.Timer.blocked_autorange``, which synchronises CUDA around
    its measurements. The functions take turns over ``rounds`` rounds, so that a noisy
    spell on a shared machine hits all of them alike; the result is the median over all
    timed blocks of a function.

    Args:
        fns: name to call (each call should cycle over its inputs itself).
        threads: intra-op threads for the whole measurement, warm-up included.
        min_run_time: seconds of measurement per function at least, over all rounds.
        warmup: untimed calls first (allocator, oneDNN primitive caches, lazy engine setup).
        rounds: how many turns each function gets.
    """
    # Imported here: it pulls in torch.utils.cpp_extension, which logs a warning at import on
    # machines with a CUDA_HOME but no CUDA, and every ``ftwt`` command imports this module.
    from torch.utils import benchmark as tbench

    times: dict[str, list[float]] = {name: [] for name in fns}
    with num_threads(threads), torch.no_grad():
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        for _ in range(rounds):
            for name, fn in fns.items():
                timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
                times[name] += timer.blocked_autorange(min_run_time=min_run_time / rounds).times
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def kernel_summary(choices: dict[str, str]) -> str:
    """``"native 12, torch 3, dense 2"``: how many convolutions run each way; ``"torch"`` when all run one way."""
    counts: dict[str, int] = {}
    for mode in choices.values():
        counts[mode] = counts.get(mode, 0) + 1
    if len(counts) == 1:
        return next(iter(counts))
    return ", ".join(f"{mode} {n}" for mode, n in sorted(counts.items()))


def _cat_masks(masks: list[dict[str, torch.Tensor] | None]) -> dict[str, torch.Tensor] | None:
    if any(m is None for m in masks):
        return None
    return {k: torch.cat([m[k] for m in masks]) for k in masks[0]}


def collect_masks(model: nn.Module, batches: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Ground-truth masks at the gates' threshold, per batch: ``{unit name: (N, C_out) bool}``."""
    masks = []
    with record(model, masks="ground_truth") as rec, torch.no_grad():
        for x in batches:
            model(x)
            masks.append({name: m.clone() for name, m in rec.masks.items()})
    return masks


class _ChannelsLast(nn.Module):
    """A model run in channels-last, its input converted on the way in (the conversion is timed too)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> Any:
        return self.model(x.contiguous(memory_format=torch.channels_last))


def tuned(model: nn.Module, example: torch.Tensor, *, threads: int | None = None) -> tuple[nn.Module, str]:
    """A copy of a plain eval-mode model as fast as PyTorch's own tricks make it, and what they were.

    BatchNorm is folded into the convolution that feeds it (:func:`ftwt.engine.fold.fold_model`,
    as the engine folds it), and the model runs in NCHW or channels-last, whichever a short
    timing on ``example`` finds faster: a baseline gets every speed trick that is not
    specific to dynamic pruning. The description is e.g. ``"BN folded (19), channels-last"``.
    """
    from ftwt.engine.fold import fold_model

    model, folded = fold_model(model, example)
    tricks = f"BN folded ({folded})" if folded else "BN not folded"
    if example.dim() != 4:
        return model, tricks
    layouts = {"NCHW": model, "channels-last": _ChannelsLast(copy.deepcopy(model))}
    calls = {name: (lambda m=m: m(example)) for name, m in layouts.items()}
    ms = time_calls(calls, threads=threads or torch.get_num_threads(), min_run_time=0.2, warmup=2, rounds=2)
    best = min(ms, key=ms.__getitem__)
    return layouts[best], f"{tricks}, {best}"


def _cycle(fn: Callable[..., Any], args: list[tuple[Any, ...]]) -> Callable[[], Any]:
    # Each call takes the next batch, so every sample (and its masks) is timed in turn.
    it = itertools.cycle(args)
    return lambda: fn(*next(it))


def benchmark(
    model: nn.Module,
    inputs: torch.Tensor,
    *,
    masks: str = "gate",
    batch_size: int = 1,
    threads: int | None = None,
    device: torch.device | str = "cpu",
    round_to: int = 1,
    min_run_time: float = 1.0,
    warmup: int = 3,
    importance: str = "l1",
    static_model: nn.Module | None = None,
    kernel: str = "auto",
    compare_fallback: bool = False,
    rounds: int = 3,
) -> dict[str, Any]:
    """Time dense, masked, sparse-engine and static-pruned inference of a gated model.

    Args:
        model: a gated model (:func:`ftwt.attach_gates`), trained or not; moved to ``device``,
            otherwise left as it was.
        inputs: ``(N, C, H, W)`` samples; cut into batches of ``batch_size``, the last
            incomplete one dropped, and cycled over while timing.
        masks: ``"gate"`` (the gates' predictions) or ``"ground_truth"`` (perfect gates at
            the gates' threshold, replayed into the engine).
        batch_size: samples per timed call.
        threads: intra-op CPU threads (default: the current setting).
        device: where to run; inputs are moved there before timing.
        round_to: the engine rounds active channel counts up to a multiple of this.
        min_run_time: seconds of timing per variant, at least (over all ``rounds``).
        warmup: untimed calls per variant.
        importance: channel ranking of the static model (see :mod:`ftwt.baselines`).
        static_model: a static model to time instead of pruning one to the dynamic MACs.
        kernel: the engine's kernels (see :class:`ftwt.engine.SparseEngine`).
        compare_fallback: also time an engine on PyTorch's ops only (``kernel="torch"``),
            reported as ``engine_torch_ms``: the check that ``auto`` is not slower.
        rounds: turns each variant takes while timing (more: steadier ratios on a noisy machine).

    Returns:
        A flat dict: ``dense_ms``, ``masked_ms``, ``engine_ms``, ``static_ms`` (median ms
        per call); ``dense_macs``, ``dynamic_macs`` (honest, gates included),
        ``static_macs`` (per sample); ``flops_reduction``, ``ideal_speedup`` (dense /
        dynamic MACs), ``speedup`` (dense / engine time), ``masked_speedup``,
        ``static_speedup``, ``engine_vs_static`` (engine / static time),
        ``realized_fraction`` (speedup / ideal speedup), ``engine_max_abs_diff`` and
        ``engine_rel_diff`` (engine against the masked model's logits, on the first batch;
        relative to the largest logit), ``engine_kernels`` (how many convolutions ran each
        way, e.g. ``"native 12, torch 3, dense 2"``), ``engine_choices`` (per convolution),
        ``engine_isa`` (the native build's vector ISA, None without it),
        ``engine_executed_macs`` (per sample, as ``FlopCounterMode`` counts what the engine
        ran: above the honest ``dynamic_macs`` where units run densely, gates' pooling not
        included), ``dense_tricks`` and ``static_tricks`` (how :func:`tuned` runs those two,
        e.g. ``"BN folded, channels-last"``), and the setting: ``masks``, ``samples``,
        ``batch_size``, ``threads``, ``device``, ``machine``.

    Raises:
        ConfigError: the model has no gates, bad ``masks`` or too few samples.

    Example:
        >>> model = attach_gates(resnet56(), GateConfig(threshold=0.9))
        >>> res = benchmark(model, images[:32], masks="ground_truth", threads=1)
        >>> print(f"{res['speedup']:.2f}x of an ideal {res['ideal_speedup']:.2f}x")
    """
    if not is_gated(model):
        raise ConfigError("benchmark needs a gated model: attach_gates(model, GateConfig(threshold=r)) first")
    if masks not in MASKS:
        raise ConfigError(f"unknown mask source {masks!r}; choose from {list(MASKS)}")
    if batch_size < 1 or inputs.shape[0] < batch_size:
        raise ConfigError(f"need at least one batch of {batch_size} samples, got {inputs.shape[0]}")
    device = torch.device(device)
    threads = threads or torch.get_num_threads()
    n = inputs.shape[0] // batch_size * batch_size
    batches = [b.to(device) for b in inputs[:n].split(batch_size)]

    model.to(device)
    # Ground truth is training-time work; building it while timing is the reference's overhead.
    with _eval_mode(model), record(model, labels=False):
        plain = detach_gates(copy.deepcopy(model))
        with record(model, masks=masks):
            flops = measure(model, batches)
        replay = collect_masks(model, batches) if masks == "ground_truth" else [None] * len(batches)
        engine = SparseEngine(model, round_to=round_to, kernel=kernel)

        with torch.no_grad(), num_threads(threads):
            with record(model, masks=masks):
                reference = model(batches[0])
            if kernel == "auto":  # chosen on a few samples, under the threads of the run
                engine.calibrate(torch.cat(batches[:4]), _cat_masks(replay[:4]))
            diff = float((engine(batches[0], masks=replay[0]) - reference).abs().max())
            executed = statistics.fmean(engine.executed_macs(x, m) for x, m in zip(batches, replay, strict=True))
            # Untrained ResNets give logits in the thousands; float rounding scales with them.
            rel_diff = diff / max(float(reference.abs().max()), 1e-12)

        if static_model is None:
            static = prune_to_macs(plain, batches[0], flops.dynamic_macs, importance=importance).model
        else:
            static = static_model.to(device).eval()
        static_macs = measure(static, batches[:1]).dense_macs
        dense, dense_tricks = tuned(plain, batches[0], threads=threads)
        static, static_tricks = tuned(static, batches[0], threads=threads)

        # One sample's replayed masks as kept-filter indices, the form the native gate hands
        # on: the engine is timed as deployment runs it, not with a conversion per unit and call.
        served = [kept_filters(m) if m is not None and batch_size == 1 else m for m in replay]
        timed = {
            "dense_ms": _cycle(dense, [(x,) for x in batches]),
            "masked_ms": _cycle(model, [(x,) for x in batches]),
            "engine_ms": _cycle(engine, list(zip(batches, served, strict=True))),
            "static_ms": _cycle(static, [(x,) for x in batches]),
        }
        if compare_fallback:
            fallback = SparseEngine(model, round_to=round_to, kernel="torch")
            timed["engine_torch_ms"] = _cycle(fallback, list(zip(batches, served, strict=True)))
        # The masked variant runs the gates' own masks; its cost does not depend on which.
        with record(model, masks="gate"):
            ms = time_calls(timed, threads=threads, min_run_time=min_run_time, warmup=warmup, rounds=rounds)

    ideal = flops.dense_macs / flops.dynamic_macs
    speedup = ms["dense_ms"] / ms["engine_ms"]
    return {
        **ms,
        "dense_macs": flops.dense_macs,
        "dynamic_macs": flops.dynamic_macs,
        "static_macs": static_macs,
        "flops_reduction": flops.reduction,
        "ideal_speedup": ideal,
        "speedup": speedup,
        "masked_speedup": ms["dense_ms"] / ms["masked_ms"],
        "static_speedup": ms["dense_ms"] / ms["static_ms"],
        "engine_vs_static": ms["engine_ms"] / ms["static_ms"],
        "realized_fraction": speedup / ideal,
        "engine_max_abs_diff": diff,
        "engine_rel_diff": rel_diff,
        "engine_kernels": kernel_summary(engine.choices),
        "engine_isa": engine.isa,
        "engine_choices": engine.choices,
        "engine_executed_macs": executed,
        "dense_tricks": dense_tricks,
        "static_tricks": static_tricks,
        "masks": masks,
        "samples": n,
        "batch_size": batch_size,
        "threads": threads,
        "device": str(device),
        "machine": machine_info(device),
    }


__all__ = ["MASKS", "benchmark", "collect_masks", "describe_machine", "kernel_summary", "machine_info", "num_threads",
           "time_calls", "tuned"]
