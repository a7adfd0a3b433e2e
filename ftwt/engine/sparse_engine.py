"""The sparse inference engine: a gated model that computes only what its gates keep."""

from __future__ import annotations

import functools
import logging
import os
import weakref
from collections import Counter
from typing import Any

import torch
from torch import Tensor, nn

from ftwt._ops import trace
from ftwt.engine import _choose, _native
from ftwt.engine._compact import Compact, widen
from ftwt.engine._plan import Plan
from ftwt.errors import ConfigError, UnsupportedLayerError
from ftwt.surgery import gated_units, is_gated

BATCH_MODES = ("loop", "union")

log = logging.getLogger(__name__)


class SparseEngine:
    """Runs a trained gated model computing, per sample, only the kept filters on the live inputs.

    The model's ``torch.fx`` graph is compiled once into a flat plan (see :mod:`ftwt.engine`).
    The output equals the gated model's eval-mode output up to float rounding, and the
    multiply-adds performed on one sample are exactly those :class:`ftwt.flops.FlopsMeter`
    counts for it (convolutions, linear layers and the gates' linear layers).

    Args:
        model: a gated model (:func:`ftwt.attach_gates`) in eval mode. Its weights are read
            once: build a new engine after changing them.
        round_to: round each kept-filter count up to a multiple of this, taking the next
            filters by gate probability. The extra filters are computed and then zeroed, so
            outputs are unchanged but the multiply-adds exceed the honest count; the
            zero-channel trimming of inputs is off in this mode so that input widths stay
            the rounded ones.
        batch: how batches of more than one sample run. ``"loop"`` (default): one sample at
            a time, each with its own filters. ``"union"``: the whole batch at once on the
            union of its samples' filters, masked per sample afterwards (more multiply-adds,
            fewer, larger calls). Union wins for small inputs, where per-call overhead
            dominates; loop for large ones (README, "Real speedup").
        kernel: ``"auto"`` (default): each convolution is timed on the first input (or
            ``example``) every way it can run and keeps the fastest (:attr:`choices`): the
            fused native kernels (compiled on first use for this CPU's vector ISA: C++
            compiler and ``ninja``, once, cached; a warning where they cannot be built),
            PyTorch's ops on the kept block (the fallback, replaced only by a measurably
            faster way), or, for a gated unit, every filter densely with the skipped ones
            zeroed afterwards (more multiply-adds than the honest count, see
            :meth:`executed_macs`, for units that keep nearly all their filters).
            ``"native"``: the native kernels, failing if they cannot be built; ``"torch"``:
            PyTorch's ops only. Outputs are the same either way; with ``"native"`` and
            ``"torch"`` the multiply-adds are exactly the honest count.
        example: samples to choose the kernels on now (``kernel="auto"``; a few give a
            steadier choice than one); without it they are chosen on the first call, which
            then takes longer.

    Raises:
        ConfigError: the model has no gates, is in training mode, or an option is invalid.
        UnsupportedLayerError: the model cannot be traced, or a gated unit cannot be compiled.
        DeviceError: ``kernel="native"`` and the native kernel cannot be built.

    Example:
        >>> model = attach_gates(resnet56(), GateConfig(threshold=0.9)).eval()
        >>> engine = SparseEngine(model)
        >>> torch.allclose(engine(x), model(x), rtol=1e-4, atol=1e-5)
        True
    """

    def __init__(self, model: nn.Module, *, round_to: int = 1, batch: str = "loop", kernel: str = "auto",
                 example: Tensor | None = None) -> None:
        if not is_gated(model):
            raise ConfigError("SparseEngine needs a gated model; call ftwt.attach_gates(model) first")
        if model.training:
            raise ConfigError("SparseEngine computes eval-mode outputs (BatchNorm folded); call model.eval() first")
        if not isinstance(round_to, int) or round_to < 1:
            raise ConfigError(f"round_to must be a positive integer, got {round_to!r}")
        if batch not in BATCH_MODES:
            raise ConfigError(f"unknown batch mode {batch!r}; choose from {list(BATCH_MODES)}")
        if kernel not in _native.KERNELS:
            raise ConfigError(f"unknown kernel {kernel!r}; choose from {list(_native.KERNELS)}")
        self.round_to, self.batch, self.kernel = round_to, batch, kernel
        on_cpu = all(p.device.type == "cpu" for p in model.parameters())
        self.native = on_cpu and _native.available(kernel)
        self.isa = _native.loaded_isa() if self.native else None  # the native build's vector ISA
        units = {u.name: u for u in gated_units(model)}
        gm = trace(model)
        with torch.no_grad():
            self.plan = Plan(gm, units, round_to, native=self.native)
        self.graph_module = gm  # the graph save() writes
        if len(self.plan.inputs) != 1:
            raise UnsupportedLayerError(f"the engine runs models with one input, {type(model).__name__} has {len(self.plan.inputs)}")
        self.unit_names = frozenset(units)
        # Kept-filter index tensors found valid, by unit and id (a WeakSet would compare tensors elementwise).
        self._checked: dict[tuple[str, int], weakref.ref] = {}
        self.model = model  # what save() writes
        self.check: dict[str, float] = {}  # seconds per forward of each whole-model candidate (calibrate)
        if kernel == "auto":
            self.calibrate(example)

    def save(self, path: str | os.PathLike) -> None:
        """Write the engine to one safetensors file that :meth:`load` reads without the model's code.

        The file holds the model's graph, its ``torch.nn`` layers and gates, the weights and
        the kernel choices (see :mod:`ftwt.engine._artefact`); nothing in it is pickled.

        Raises:
            UnsupportedLayerError: the model calls a layer outside ``torch.nn`` (its code
                would be needed to rebuild it) or a function outside ``torch``,
                ``torch.nn.functional`` and ``operator``.
        """
        from ftwt.engine._artefact import save_engine

        save_engine(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, *, kernel: str | None = None, recalibrate: bool = False) -> SparseEngine:
        """An engine saved by :meth:`save`, in any process, without the model's class.

        Args:
            path: the engine file.
            kernel: the kernel setting (default: the saved one).
            recalibrate: with ``kernel="auto"``, time the kernels again on the first input
                instead of reusing the saved choices (which are reused only on the CPU and
                kernel build they were timed on).

        Raises:
            CheckpointError: not an engine file, damaged or modified since it was saved.

        Example:
            >>> engine = SparseEngine.load("engine.safetensors")
            >>> logits = engine(torch.randn(1, 3, 32, 32))
        """
        from ftwt.engine._artefact import read_engine_file

        return cls._rebuild(*read_engine_file(path), kernel=kernel, recalibrate=recalibrate)

    def __reduce__(self) -> tuple:
        # Pickled (multiprocessing, a serving framework) as the bytes of its engine file: plain data.
        from ftwt.engine._artefact import engine_bytes

        return (_from_bytes, (engine_bytes(self),))

    @classmethod
    def _rebuild(cls, spec: dict, tensors: dict[str, Tensor], kernel: str | None, recalibrate: bool) -> SparseEngine:
        from ftwt.engine._artefact import rebuild_model

        options = spec.get("engine", {})
        kernel = kernel or options.get("kernel", "auto")
        engine = cls(rebuild_model(spec, tensors), round_to=int(options.get("round_to", 1)),
                     batch=options.get("batch", "loop"), kernel=kernel)
        from ftwt.engine._artefact import cpu_name

        saved = {k: v for k, v in options.get("choices", {}).items() if k in engine.plan.convs}
        usable = all(mode in engine.plan.convs[k].modes for k, mode in saved.items())
        # Choices timed on another CPU or kernel build are timed again on the first input here.
        here = options.get("isa") == engine.isa and options.get("cpu") == cpu_name()
        if kernel == "auto" and not recalibrate and here and saved and usable and len(saved) == len(engine.plan.convs):
            engine.set_choices(saved)
        return engine

    @property
    def choices(self) -> dict[str, str]:
        """How each convolution runs: ``{name: "native" | "torch" | "dense"}`` (``"pending"`` until chosen)."""
        return {name: "pending" if conv.pending else conv.mode for name, conv in self.plan.convs.items()}

    @property
    def timings(self) -> dict[str, dict[str, float]]:
        """The seconds per mode that ``kernel="auto"`` measured for each convolution (empty before)."""
        return {name: dict(conv.times) for name, conv in self.plan.convs.items() if conv.times}

    def calibrate(self, example: Tensor | None = None, masks: dict[str, Tensor] | None = None) -> None:
        """Choose each convolution's kernel by timing on ``example`` (or on the next call when None).

        Every sample of ``example`` is timed (one at a time, as ``batch="loop"`` runs them)
        and the times add up, so a few samples give a choice that holds for a stream of them.
        ``masks`` are replayed as in :meth:`forward`. With ``example``, the whole engine is
        then timed on it with the choices, with PyTorch's ops everywhere and with every gated
        unit dense, and the fastest of the three is kept (:attr:`check`).
        """
        n = 1 if example is None or self.batch == "union" else max(1, example.shape[0])
        for conv in self.plan.convs.values():
            conv.pending = n if len(conv.modes) > 1 else 0
            conv.times = {}
        if example is not None:
            self.forward(example, masks)
            self._check_whole_model(example, masks)

    def _check_whole_model(self, example: Tensor, masks: dict[str, Tensor] | None) -> None:
        """Time the whole engine with the per-layer choices, with PyTorch's ops everywhere and with every
        gated unit dense (each filter computed, the skipped ones zeroed: dense cost plus the gates'),
        and keep the fastest, so that a sum of per-layer wins that loses as a whole is not kept."""
        convs = self.plan.convs
        chosen = {name: conv.mode for name, conv in convs.items()}
        dense = {name: "dense" if "dense" in conv.modes else chosen[name] for name, conv in convs.items()}
        candidates: dict[str, dict[str, str]] = {}
        for key, choices in (("chosen", chosen), ("fallback", dict.fromkeys(chosen, _choose.FALLBACK)), ("dense", dense)):
            if choices not in candidates.values():  # time each distinct set once
                candidates[key] = choices
        if len(candidates) == 1:
            return
        seen = {id(conv): set(conv._seen) for conv in convs.values()}

        def run(choices: dict[str, str]) -> None:
            self.set_choices(choices)
            for conv in convs.values():  # every block shape as new, as in a stream of samples
                conv._seen = set(seen[id(conv)])
            self.forward(example, masks)

        self.check = _choose.compare(run, candidates)
        best = _choose.winner(self.check)
        self.set_choices(candidates[best])
        if best != "chosen":
            way = "PyTorch's ops" if best == "fallback" else "every gated unit densely"
            log.info("ftwt engine: the per-layer choices were not the fastest on the whole model; running %s", way)

    def set_choices(self, choices: dict[str, str]) -> None:
        """Run each named convolution in the given mode (as :attr:`choices` gives them), without timing."""
        unknown = sorted(set(choices) - set(self.plan.convs))
        if unknown:
            raise ConfigError(f"kernel choices for unknown convolution(s) {unknown}")
        for name, mode in choices.items():
            conv = self.plan.convs[name]
            conv.pending = 0
            conv.set_mode(mode)

    def executed_macs(self, x: Tensor, masks: dict[str, Tensor] | None = None) -> float:
        """Multiply-adds the engine performs on ``x``, per sample, as ``FlopCounterMode`` counts them.

        With ``kernel="native"`` or ``"torch"`` this is the honest count of
        :class:`ftwt.flops.FlopsMeter` minus the gates' pooling (which ``FlopCounterMode``
        does not count); ``"auto"`` may run some units densely and do more.
        """
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            self.forward(x, masks)
        return counter.get_total_flops() / 2 / max(1, x.shape[0])

    def __call__(self, x: Tensor, masks: dict[str, Tensor] | None = None) -> Any:
        return self.forward(x, masks)

    def forward(self, x: Tensor, masks: dict[str, Tensor] | None = None) -> Any:
        """The gated model's output for ``x``.

        Args:
            x: input batch ``(N, C, H, W)``.
            masks: optional ``{unit name: (N, C_out) bool}`` that replaces the gates'
                decisions (the gates still run, so their cost is paid), e.g. ground-truth
                masks to measure perfect gates. Units not named use their gates. For one
                sample a unit's entry may instead be its kept filters, ascending int64
                ``(k,)`` (:func:`kept_filters`): the form the native gate hands on, so a
                replay then costs what the gates' own decisions cost.

        Returns:
            What the model returns, as full tensors.
        """
        n = x.shape[0] if isinstance(x, Tensor) and x.dim() > 0 else 1
        if masks is not None:
            unknown = sorted(set(masks) - self.unit_names)
            if unknown:
                raise ConfigError(f"masks for unknown unit(s) {unknown}; units: {sorted(self.unit_names)}")
            wrong = sorted(k for k, m in masks.items() if not (m.dim() == 2 and m.shape[0] == n or _is_kept(m, n)))
            if wrong:
                raise ConfigError(f"masks {wrong} are not (N, C_out) bool with N = {n}, the batch size, "
                                  "nor (for one sample) int64 kept-filter indices")
            self._check_kept_once(masks)
        with torch.inference_mode():
            if n == 1 or self.batch == "union":
                return self._run(x, masks)
            outs = [self._run(x[i : i + 1], None if masks is None else {k: m[i : i + 1] for k, m in masks.items()}) for i in range(n)]
            if not all(isinstance(o, Tensor) for o in outs):
                return self._run(x, masks)
            return torch.cat(outs)

    def _check_kept_once(self, masks: dict[str, Tensor]) -> None:
        """Check each kept-filter index tensor the first time it comes: replays reuse them."""
        for name, m in masks.items():
            if m.dim() != 1:
                continue
            seen = self._checked.get((name, id(m)))
            if seen is None or seen() is not m:
                _check_kept(name, m, self.plan.convs[name].c_out)
                if len(self._checked) > 4096:
                    self._checked.clear()
                self._checked[(name, id(m))] = weakref.ref(m)

    def _run(self, x: Tensor, masks: dict[str, Tensor] | None) -> Any:
        pending = any(conv.pending for conv in self.plan.convs.values())
        out = self._steps(x, masks)
        if pending and not any(conv.pending for conv in self.plan.convs.values()):
            _report_choices(self.choices, self.native)
        return out

    def _steps(self, x: Tensor, masks: dict[str, Tensor] | None) -> Any:
        env: list[Any] = [None] * self.plan.num_slots
        env[0] = masks
        env[self.plan.inputs[0]] = Compact(x, None, x.shape[1]) if isinstance(x, Tensor) and x.dim() >= 3 else x
        for step, dead in self.plan.steps:
            step(env)
            for slot in dead:
                env[slot] = None
        return widen(env[self.plan.output])


def kept_filters(masks: dict[str, Tensor]) -> dict[str, Tensor]:
    """One sample's ``{unit: (1, C_out) bool}`` masks as ``{unit: (k,) int64}`` kept filters, ascending.

    The engine takes either (:meth:`SparseEngine.forward`); this form skips the conversion
    on every call, as the native gate does, so a replay of recorded masks is timed as
    deployment runs.
    """
    wrong = sorted(k for k, m in masks.items() if m.dim() != 2 or m.shape[0] != 1)
    if wrong:
        raise ConfigError(f"kept_filters takes one sample's (1, C_out) masks; {wrong} are not")
    return {k: m.reshape(-1).to(torch.bool).nonzero().view(-1) for k, m in masks.items()}


def _check_kept(name: str, kept: Tensor, width: int) -> None:
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= width or not bool((kept[1:] > kept[:-1]).all())):
        raise ConfigError(f"masks[{name!r}]: kept filters must be ascending indices below {width}, "
                          f"the unit's filters (ftwt.engine.kept_filters gives them)")


def _is_kept(m: Tensor, n: int) -> bool:
    return n == 1 and m.dim() == 1 and m.dtype == torch.int64


def _report_choices(choices: dict[str, str], native: bool) -> None:
    counts = Counter(choices.values())
    log.info("ftwt engine: kernels chosen by timing: %s", ", ".join(f"{m} {c}" for m, c in sorted(counts.items())))
    if native and not counts.get("native"):
        _say_once("the native kernels were slower than PyTorch's ops on every layer here; running PyTorch's ops")


@functools.cache
def _say_once(message: str) -> None:
    log.warning("ftwt engine: %s", message)


def _from_bytes(data: bytes) -> SparseEngine:
    from ftwt.engine._artefact import parse_engine

    return SparseEngine._rebuild(*parse_engine(data), kernel=None, recalibrate=False)
