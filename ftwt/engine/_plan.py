"""Compile a model's ``torch.fx`` graph into a plan: a flat list of small closures over slots.

Each node becomes one step that reads its inputs from a list of slots and writes its output
to one, so a forward pass is a plain Python loop with no graph interpretation left. A
convolution absorbs the BatchNorm that follows it (folded) and the activation after that;
channel-wise ops (activations, pooling, dropout) run on compact data; residual adds,
channel padding and channel concatenation stay compact; every other op gets full-width
tensors and runs as the model would run it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ftwt._ops import ACTIVATIONS, act_after, activation, norm_after
from ftwt.engine._channelwise import channelwise
from ftwt.engine._compact import Compact, add, cat_channels, pad_channels, widen
from ftwt.engine._conv import SparseConv
from ftwt.errors import UnsupportedLayerError
from ftwt.unit import GatedUnit

Step = Callable[[list], None]


def _as_compact(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() >= 3:
        return Compact(value, None, value.shape[1])
    return value


class Plan:
    """The compiled forward: ``steps`` run in order over a list of ``slots`` values."""

    def __init__(self, gm: torch.fx.GraphModule, units: dict[str, GatedUnit], round_to: int, native: bool = False) -> None:
        self.modules = dict(gm.named_modules())
        self.units, self.round_to, self.native = units, round_to, native
        self.slot: dict[torch.fx.Node, int] = {}
        self.steps: list[tuple[Step, tuple[int, ...]]] = []
        self.convs: dict[str, SparseConv] = {}
        self.inputs: list[int] = []
        self.output = 0
        self.num_slots = 1  # slot 0 holds the masks of the current call
        self._absorbed: set[torch.fx.Node] = set()
        self._reads: list[list[int]] = []
        for node in gm.graph.nodes:
            if node not in self._absorbed:
                self._compile(node, gm)
        missing = sorted(set(units) - set(self.convs))
        if missing:
            raise UnsupportedLayerError(f"gated convolution(s) {missing} do not appear as modules in the traced graph")
        self._free_after_last_use()

    # Slots ------------------------------------------------------------------------
    def _new_slot(self, node: torch.fx.Node | None = None) -> int:
        self.num_slots += 1
        if node is not None:
            self.slot[node] = self.num_slots - 1
        return self.num_slots - 1

    def _add(self, step: Step, reads: list[int]) -> None:
        self.steps.append((step, ()))
        self._reads.append(reads)

    def _free_after_last_use(self) -> None:
        last: dict[int, int] = {}
        for i, reads in enumerate(self._reads):
            for s in reads:
                last[s] = i
        dead: list[list[int]] = [[] for _ in self.steps]
        for s, i in last.items():
            if s != self.output:
                dead[i].append(s)
        self.steps = [(step, tuple(d)) for (step, _), d in zip(self.steps, dead, strict=True)]

    # Nodes ------------------------------------------------------------------------
    def _compile(self, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
        if node.op == "placeholder":
            self.inputs.append(self._new_slot(node))
            return
        if node.op == "output":
            src = node.args[0]
            self.output = self._generic_args(src)
            return
        if node.op == "get_attr":
            self._constant(node, _fetch_attr(gm, node.target))
            return
        module = self.modules.get(node.target) if node.op == "call_module" else None
        if type(module) is nn.Conv2d:
            self._conv(node, module)
            return
        fn = channelwise(node, self.modules)
        if fn is not None and isinstance(node.args[0], torch.fx.Node):
            self._channelwise_step(node, *fn)
        elif node.op == "call_function" and node.target in (operator.add, torch.add) and self._binary_nodes(node):
            self._add_step(node)
        elif node.op == "call_function" and node.target is F.pad and self._channel_pad(node) is not None:
            self._pad_step(node, *self._channel_pad(node))
        elif node.op == "call_function" and node.target is torch.cat and self._channel_cat(node):
            self._cat_step(node)
        elif node.op == "call_function" and node.target is getattr and node.args[1] == "shape":
            self._shape_step(node, lambda v: v.shape)
        elif node.op == "call_method" and node.target == "size":
            self._shape_step(node, lambda v, *a: v.shape if not a else v.shape[a[0]])
        elif node.op == "call_method" and node.target == "dim":
            self._shape_step(node, lambda v: len(v.shape))
        else:
            self._generic(node)

    def _constant(self, node: torch.fx.Node, value: Any) -> None:
        dst = self._new_slot(node)

        def step(env: list) -> None:
            env[dst] = value

        self._add(step, [])

    def _conv(self, node: torch.fx.Node, conv: nn.Conv2d) -> None:
        name = node.target
        unit = self.units.get(name)
        norm = norm_after(node, self.modules)
        if unit is not None and (unit.spec.norm or None) != (norm.target if norm is not None else None):
            raise UnsupportedLayerError(
                f"{name}: its gate masks the output of {unit.spec.tail!r}, but the graph feeds the conv into "
                f"{[u.target for u in node.users]}; the engine cannot fold that unit"
            )
        bn, tail = None, node
        if norm is not None and self.modules[norm.target].running_var is not None and not self.modules[norm.target].training:
            bn, tail = self.modules[norm.target], norm
        elif unit is not None and norm is not None:
            raise UnsupportedLayerError(f"{name}: the engine folds only eval-mode norms with running statistics")
        act_node = act_after(tail, self.modules, strict=True)
        act = activation(act_node, self.modules, strict=True) if act_node is not None else None
        if unit is not None and act != unit.spec.act:
            act_node, act = None, None  # the unit's spec says what follows it; run the op as the graph has it
        after = [act_node] if act_node is not None else []
        key = name if name not in self.convs else f"{name}@{node.name}"
        sparse = SparseConv(name, conv, bn, unit, act, self.round_to, trim_inputs=self.round_to == 1, native=self.native)
        self.convs[key] = sparse
        src = self._generic_args(node.args[0])
        dst = self._new_slot(node)
        for absorbed in ([tail] if tail is not node else []) + after:
            self.slot[absorbed] = dst
            self._absorbed.add(absorbed)

        def step(env: list) -> None:
            env[dst] = sparse(_as_compact(env[src]), env[0])

        self._add(step, [src])

    def _channelwise_step(self, node: torch.fx.Node, fn: Callable, nonneg: bool | None) -> None:
        src, dst = self.slot[node.args[0]], self._new_slot(node)

        def step(env: list) -> None:
            v = env[src]
            if isinstance(v, Compact):
                env[dst] = v.with_data(fn(v.data), v.nonneg if nonneg is None else nonneg)
            else:
                env[dst] = fn(v)

        self._add(step, [src])

    def _binary_nodes(self, node: torch.fx.Node) -> bool:
        return len(node.args) == 2 and not node.kwargs and all(isinstance(a, torch.fx.Node) for a in node.args)

    def _add_step(self, node: torch.fx.Node) -> None:
        a, b = self.slot[node.args[0]], self.slot[node.args[1]]
        dst = self._new_slot(node)
        act_node = act_after(node, self.modules, strict=True)
        act = activation(act_node, self.modules, strict=True) if act_node is not None else None
        inplace = ACTIVATIONS[act].inplace if act is not None and ACTIVATIONS[act].nonneg else None
        after = [act_node]
        if inplace is not None:
            # The sum is a fresh buffer, so its only consumer (an activation) may run in place.
            self.slot[after[0]] = dst
            self._absorbed.add(after[0])

        native = self.native

        def step(env: list) -> None:
            x, y = env[a], env[b]
            if isinstance(x, Compact) and isinstance(y, Compact) and x.shape == y.shape:
                out = add(x, y, native)
                if inplace is not None:
                    inplace(out.data)
                    out.nonneg = True
            else:
                out = widen(x) + widen(y)
                if inplace is not None:
                    out = inplace(out)
            env[dst] = out

        self._add(step, [a, b])

    def _channel_pad(self, node: torch.fx.Node) -> tuple[int, int] | None:
        pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
        mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
        value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
        if not isinstance(pad, (tuple, list)) or len(pad) != 6 or any(pad[:4]) or mode != "constant" or value not in (None, 0, 0.0):
            return None
        if not all(isinstance(p, int) and p >= 0 for p in pad):
            return None
        return pad[4], pad[5]

    def _pad_step(self, node: torch.fx.Node, before: int, after: int) -> None:
        src, dst = self.slot[node.args[0]], self._new_slot(node)

        def step(env: list) -> None:
            v = env[src]
            if isinstance(v, Compact) and v.data.dim() == 4:
                env[dst] = pad_channels(v, before, after)
            else:
                env[dst] = F.pad(widen(v), (0, 0, 0, 0, before, after))

        self._add(step, [src])

    def _channel_cat(self, node: torch.fx.Node) -> bool:
        tensors = node.args[0]
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        return isinstance(tensors, (tuple, list)) and all(isinstance(t, torch.fx.Node) for t in tensors) and dim in (1, -3)

    def _cat_step(self, node: torch.fx.Node) -> None:
        srcs, dst = [self.slot[t] for t in node.args[0]], self._new_slot(node)

        def step(env: list) -> None:
            vals = [_as_compact(env[s]) for s in srcs]
            if all(isinstance(v, Compact) and v.data.dim() == 4 for v in vals):
                env[dst] = cat_channels(vals)
            else:
                env[dst] = torch.cat([widen(v) for v in vals], 1)

        self._add(step, srcs)

    def _shape_step(self, node: torch.fx.Node, fn: Callable) -> None:
        rest = node.args[1:] if node.op == "call_method" else ()
        if any(isinstance(a, torch.fx.Node) for a in rest) or node.kwargs:
            self._generic(node)
            return
        src, dst = self.slot[node.args[0]], self._new_slot(node)

        def step(env: list) -> None:
            v = env[src]
            env[dst] = fn(v, *rest) if isinstance(v, Compact) else _shape_fallback(node, v, rest)

        self._add(step, [src])

    def _generic_args(self, arg: Any) -> int:
        """Slot holding ``arg``; a nested structure of nodes gets a step that gathers it."""
        if isinstance(arg, torch.fx.Node):
            return self.slot[arg]
        reads = [self.slot[n] for n in _nodes_in(arg)]
        dst, slot = self._new_slot(), self.slot

        def step(env: list) -> None:
            env[dst] = torch.fx.node.map_arg(arg, lambda n: env[slot[n]])

        self._add(step, reads)
        return dst

    def _generic(self, node: torch.fx.Node) -> None:
        """Any other op: widen compact inputs to full tensors and run the op as the model does."""
        reads = [self.slot[n] for n in _nodes_in((node.args, node.kwargs))]
        dst = self._new_slot(node)
        slot, op, target = self.slot, node.op, node.target
        fn = self.modules[target] if op == "call_module" else target
        args, kwargs = node.args, node.kwargs

        # An in-place method must not write into a buffer the engine shares between values.
        private = op == "call_method" and target.endswith("_") and isinstance(args[0], torch.fx.Node)

        def step(env: list) -> None:
            a = widen(torch.fx.node.map_arg(args, lambda n: env[slot[n]]))
            k = widen(torch.fx.node.map_arg(kwargs, lambda n: env[slot[n]]))
            if private:
                a = (a[0].clone(), *a[1:])
            env[dst] = getattr(a[0], target)(*a[1:], **k) if op == "call_method" else fn(*a, **k)

        self._add(step, reads)


def _nodes_in(arg: Any) -> list[torch.fx.Node]:
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg(arg, lambda n: found.append(n) or n)
    return found


def _shape_fallback(node: torch.fx.Node, value: Any, rest: tuple) -> Any:
    if node.op == "call_method":
        return getattr(value, node.target)(*rest)
    return getattr(value, node.args[1])


def _fetch_attr(gm: torch.fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
