"""Per-sample FLOPs, counted honestly.

Convention: one multiply-accumulate (MAC) is one FLOP, as in the paper and in fvcore;
``torch.utils.flop_counter.FlopCounterMode`` counts a MAC as 2, so dense counts here equal
its total divided by 2. Convolutions and linear layers are counted; BatchNorm (folded
into the convolution at inference), activations, pooling outside the gates and additions
are not. Per sample:

* a convolution costs ``k_h * k_w * H' * W' * sum_g active_in_g * active_out_g`` over its
  groups ``g``: ``active_out`` comes from the mask the unit applied, ``active_in`` from the
  channels of the convolution's *real* input that are non-zero for that sample (behind a
  residual add this is the union of both branches);
* a gate costs ``C_in * H * W`` (pooling) plus ``C_in * d * d * C_out`` (its linear layer);
* linear layers are counted dense.

Next to it the *reference* count reproduces the reference code: each gated convolution's
input is the previous gate's kept count, and gates and the classifier are left out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ftwt.record import last_record
from ftwt.surgery import GATES_ATTR, is_gated


def conv_macs(
    conv: nn.Conv2d,
    out_hw: tuple[int, int],
    active_in: torch.Tensor | None = None,
    active_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample MACs of a (grouped, depthwise or dense) convolution.

    Args:
        conv: the convolution.
        out_hw: output height and width.
        active_in: ``(N, C_in)`` bool, input channels that are non-zero (None: all).
        active_out: ``(N, C_out)`` bool, output filters computed (None: all).

    Returns:
        ``(N,)`` float64 MACs (``(1,)`` when both masks are None).
    """
    g = conv.groups
    per_pair = conv.kernel_size[0] * conv.kernel_size[1] * out_hw[0] * out_hw[1]
    n = next((m.shape[0] for m in (active_in, active_out) if m is not None), 1)
    if active_in is None:
        ain = torch.full((n, g), conv.in_channels // g, dtype=torch.float64)
    else:
        ain = active_in.reshape(n, g, -1).sum(-1, dtype=torch.float64).cpu()
    if active_out is None:
        aout = torch.full((n, g), conv.out_channels // g, dtype=torch.float64)
    else:
        aout = active_out.reshape(n, g, -1).sum(-1, dtype=torch.float64).cpu()
    return per_pair * (ain * aout).sum(-1)


def linear_macs(linear: nn.Linear, in_shape: tuple[int, ...]) -> int:
    """Per-sample MACs of a linear layer applied to input of shape ``(N, ..., in_features)``."""
    rows = 1
    for d in in_shape[1:-1]:
        rows *= d
    return rows * linear.in_features * linear.out_features


def dense_macs_fvcount(model: nn.Module, example: torch.Tensor) -> int:
    """Dense MACs per sample by PyTorch's own counter (its FLOPs / 2), for cross-checks."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(example)
    return counter.get_total_flops() // 2 // example.shape[0]


@dataclass
class LayerFlops:
    """Mean per-sample numbers of one layer (a convolution, a linear layer or a gate)."""

    name: str
    kind: str  # "conv", "linear" or "gate"
    gated: bool  # has a gate deciding its output filters
    dense: float  # MACs with everything active
    dynamic: float  # MACs counted honestly
    reference: float  # MACs as the reference code counts them (0 for gates and linear layers)
    kept_out: float  # fraction of output filters computed
    kept_in: float  # fraction of input channels non-zero
    kept_labels: float | None = None  # fraction the ground truth keeps, when labels were computed


@dataclass
class FlopsReport:
    """FLOPs of a model over the samples a :class:`FlopsMeter` saw (means per sample)."""

    samples: int
    dense_macs: float
    dynamic_macs: float
    reference_macs: float
    reference_dense_macs: float
    gate_macs: float
    layers: list[LayerFlops] = field(default_factory=list)
    per_sample: torch.Tensor | None = None  # (samples,) honest MACs of each sample

    @property
    def reduction(self) -> float:
        """Honest FLOPs reduction ``1 - dynamic / dense`` (gates included)."""
        return 1.0 - self.dynamic_macs / self.dense_macs if self.dense_macs else 0.0

    @property
    def reference_reduction(self) -> float:
        """Reduction as the reference code reports it (convolutions only)."""
        if not self.reference_dense_macs:
            return 0.0
        return 1.0 - self.reference_macs / self.reference_dense_macs

    def to_dict(self, per_layer: bool = True) -> dict[str, Any]:
        out = {
            "samples": self.samples,
            "dense_macs": self.dense_macs,
            "dynamic_macs": self.dynamic_macs,
            "flops_reduction": self.reduction,
            "gate_macs": self.gate_macs,
            "reference_macs": self.reference_macs,
            "reference_dense_macs": self.reference_dense_macs,
            "reference_reduction": self.reference_reduction,
        }
        if per_layer:
            out["per_layer"] = [asdict(layer) for layer in self.layers]
        return out


class _Acc:
    """Running sums of one layer."""

    def __init__(self, name: str, kind: str, gated: bool, width_out: int, width_in: int) -> None:
        self.name, self.kind, self.gated = name, kind, gated
        self.width_out, self.width_in = width_out, width_in
        self.dense = 0.0
        self.dynamic = 0.0
        self.reference = 0.0
        self.kept_out = 0.0
        self.kept_in = 0.0
        self.labels = 0.0
        self.label_samples = 0
        self.samples = 0

    def result(self) -> LayerFlops:
        n = max(self.samples, 1)
        labels = self.labels / self.label_samples if self.label_samples else None
        return LayerFlops(
            self.name, self.kind, self.gated, self.dense / n, self.dynamic / n, self.reference / n,
            self.kept_out / n, self.kept_in / n, labels,
        )


_UNCOUNTED = [0]  # > 0 inside uncounted(): active meters skip the forwards run there


@contextlib.contextmanager
def uncounted() -> Iterator[None]:
    """Forwards run inside are not counted by any active :class:`FlopsMeter` (a second width of
    the same batch in training, say, which is not what a deployed input costs)."""
    _UNCOUNTED[0] += 1
    try:
        yield
    finally:
        _UNCOUNTED[0] -= 1


class FlopsMeter:
    """Counts per-sample MACs of every forward pass of ``model`` while active.

    Works on gated and plain models. Use as a context manager around the forwards to
    measure, then read :meth:`report`.

    Example:
        >>> model = attach_gates(resnet56(), GateConfig(threshold=0.9)).eval()
        >>> with FlopsMeter(model) as meter, torch.no_grad():
        ...     model(images)
        >>> meter.report().reduction
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._handles: list[Any] = []
        self._pending: list[tuple[str, nn.Module, torch.Tensor | None, tuple[int, ...], tuple[int, ...]]] = []
        self._acc: dict[str, _Acc] = {}
        self._rec = last_record(model) if is_gated(model) else None
        self._gates = {u.name: u.gate for u in self._rec.units} if self._rec is not None else {}
        self._per_sample: list[torch.Tensor] = []
        self._gate_total = 0.0

    def __enter__(self) -> FlopsMeter:
        gates = getattr(self.model, GATES_ATTR, None)
        gate_modules = {id(m) for m in gates.modules()} if gates is not None else set()
        for name, module in self.model.named_modules():
            if id(module) in gate_modules:
                continue
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                self._handles.append(module.register_forward_hook(self._record(name)))
        self._handles.append(self.model.register_forward_hook(self._finish))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._pending = []

    def _record(self, name: str):
        def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            if _UNCOUNTED[0]:
                return
            x = args[0]
            active = x.detach().flatten(2).ne(0).any(-1) if isinstance(module, nn.Conv2d) else None
            self._pending.append((name, module, active, tuple(x.shape), tuple(out.shape)))

        return hook

    def _finish(self, module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if _UNCOUNTED[0]:
            return
        pending, self._pending = self._pending, []
        if not pending:
            return
        n = pending[0][3][0]
        total = torch.zeros(n, dtype=torch.float64)
        prev: tuple[int, torch.Tensor] | None = None  # (channels, kept count) of the previous gate
        outputs = self._rec.outputs if self._rec is not None else {}
        for name, layer, active_in, in_shape, out_shape in pending:
            seen = outputs.get(name)  # what the gated unit of this conv saw, if it has one
            if isinstance(layer, nn.Linear):
                macs = float(linear_macs(layer, in_shape))
                acc = self._layer(name, "linear", False, layer.out_features, layer.in_features)
                acc.dense += macs * n
                acc.dynamic += macs * n
                acc.kept_out += n
                acc.kept_in += n
                acc.samples += n
                total += macs
                continue
            mask = seen.mask if seen is not None else None
            hw = out_shape[2:]
            dense = conv_macs(layer, hw)
            dyn = conv_macs(layer, hw, active_in, mask)
            kept = mask.sum(1, dtype=torch.float64).cpu() if mask is not None else torch.full((n,), float(layer.out_channels), dtype=torch.float64)
            ref_in = prev[1] if prev is not None and prev[0] == layer.in_channels else torch.full((n,), float(layer.in_channels), dtype=torch.float64)
            ref = layer.kernel_size[0] * layer.kernel_size[1] * hw[0] * hw[1] * ref_in / layer.groups * kept
            if seen is not None:
                prev = (layer.out_channels, kept)
            acc = self._layer(name, "conv", seen is not None, layer.out_channels, layer.in_channels)
            acc.dense += float(dense.item()) * n
            acc.dynamic += float(dyn.sum())
            acc.reference += float(ref.sum())
            acc.kept_out += float(kept.sum()) / layer.out_channels
            acc.kept_in += float(active_in.sum()) / layer.in_channels
            acc.samples += n
            if seen is not None and seen.labels is not None:
                acc.labels += float(seen.labels.sum()) / layer.out_channels
                acc.label_samples += n
            total += dyn
            if seen is not None and seen.logits is not None:
                g = self._layer(name + ".gate", "gate", True, layer.out_channels, layer.in_channels)
                _, c, h, w = seen.in_shape
                gm = float(self._gates[name].macs(c, h, w))
                g.dynamic += gm * n
                g.kept_out += n
                g.kept_in += n
                g.samples += n
                total += gm
                self._gate_total += gm * n
        self._per_sample.append(total)

    def _layer(self, name: str, kind: str, gated: bool, width_out: int, width_in: int) -> _Acc:
        acc = self._acc.get(name)
        if acc is None:
            acc = self._acc[name] = _Acc(name, kind, gated, width_out, width_in)
        return acc

    def reset(self) -> None:
        """Forget everything counted so far."""
        self._acc.clear()
        self._per_sample.clear()
        self._gate_total = 0.0

    def report(self) -> FlopsReport:
        """Mean per-sample FLOPs of all forwards seen since entering (or the last reset)."""
        if not self._per_sample:
            raise RuntimeError("FlopsMeter saw no forward pass")
        per_sample = torch.cat(self._per_sample)
        n = per_sample.numel()
        layers = [acc.result() for acc in self._acc.values()]
        convs = [lay for lay in layers if lay.kind == "conv"]
        return FlopsReport(
            samples=n,
            dense_macs=sum(lay.dense for lay in layers),
            dynamic_macs=float(per_sample.mean()),
            reference_macs=sum(lay.reference for lay in convs),
            reference_dense_macs=sum(lay.dense for lay in convs),
            gate_macs=self._gate_total / n,
            layers=layers,
            per_sample=per_sample,
        )


def measure(model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device | str | None = None) -> FlopsReport:
    """Run ``model`` in eval mode without gradients over ``batches`` and count its FLOPs."""
    was_training = model.training
    model.eval()
    try:
        with FlopsMeter(model) as meter, torch.no_grad():
            for x in batches:
                model(x.to(device) if device is not None else x)
        return meter.report()
    finally:
        model.train(was_training)
