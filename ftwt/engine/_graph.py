"""A model's ``torch.fx`` graph as plain JSON, and back: the code-free half of a saved engine.

Saving writes each node (op, target, arguments) and, for each module the graph calls, its
``torch.nn`` class name and constructor arguments; the weights go to a safetensors file
beside it (:mod:`ftwt.engine._artefact`). Loading resolves names only from an allow-list:
module classes of ``torch.nn``, functions of ``torch``, ``torch.nn.functional`` and
``operator`` (never underscored names nor loaders), ``getattr`` of public attributes. So a
file, tampered or not, can describe a network but cannot run code of its choosing.
"""

from __future__ import annotations

import builtins
import inspect
import math
import operator
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ftwt.errors import CheckpointError, UnsupportedLayerError

_NAMESPACES = {"torch": torch, "torch.nn.functional": F, "operator": operator}
# Names of torch that read or write files, compile or reach into other namespaces.
_REFUSED = {"load", "save", "compile", "export", "jit", "hub", "ops", "library", "utils", "backends", "classes",
            "from_file", "set_default_device", "set_default_dtype", "manual_seed", "seed"}
_SKIP_ARGS = {"self", "device", "dtype"}


# Values -------------------------------------------------------------------------------
def encode(value: Any) -> Any:
    """A node argument as JSON: nodes by name, tuples, slices and dtypes tagged."""
    if isinstance(value, torch.fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, tuple):
        return {"tuple": [encode(v) for v in value]}
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": [[k, encode(v)] for k, v in value.items()]}
    if isinstance(value, slice):
        return {"slice": [encode(value.start), encode(value.stop), encode(value.step)]}
    if value is Ellipsis:
        return {"ellipsis": True}
    for tag, kind in (("dtype", torch.dtype), ("memory_format", torch.memory_format), ("layout", torch.layout)):
        if isinstance(value, kind):
            return {tag: str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    raise UnsupportedLayerError(f"cannot save a graph argument of type {type(value).__name__} ({value!r})")


def decode(value: Any, nodes: dict[str, torch.fx.Node]) -> Any:
    if isinstance(value, list):
        return [decode(v, nodes) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) != 1:
        raise CheckpointError(f"malformed graph value {value!r}")
    (tag, data), = value.items()
    if tag == "node":
        if data not in nodes:
            raise CheckpointError(f"graph refers to unknown node {data!r}")
        return nodes[data]
    if tag == "float":
        return float(data)
    if tag == "tuple":
        return tuple(decode(v, nodes) for v in data)
    if tag == "dict":
        return {k: decode(v, nodes) for k, v in data}
    if tag == "slice":
        return slice(*(decode(v, nodes) for v in data))
    if tag == "ellipsis":
        return Ellipsis
    if tag == "device":
        return torch.device(data)
    if tag in ("dtype", "memory_format", "layout"):
        kind = {"dtype": torch.dtype, "memory_format": torch.memory_format, "layout": torch.layout}[tag]
        found = getattr(torch, str(data), None)
        if isinstance(found, kind):
            return found
    raise CheckpointError(f"malformed graph value {value!r}")


# Functions ----------------------------------------------------------------------------
def function_name(fn: Any) -> str:
    """``"torch.flatten"``, ``"operator.add"``, ``"getattr"``: the name :func:`resolve_function` reads back."""
    if fn is builtins.getattr:
        return "getattr"
    name = getattr(fn, "__name__", None)
    for space, module in _NAMESPACES.items():
        if name and getattr(module, name, None) is fn:
            return f"{space}.{name}"
    raise UnsupportedLayerError(f"cannot save a call of {fn!r}: only functions of torch, torch.nn.functional and "
                                "operator are saved by name")


def resolve_function(name: str) -> Any:
    if name == "getattr":
        return builtins.getattr  # build_graph checks that the attribute is a public constant name
    space, _, attr = name.rpartition(".")
    module = _NAMESPACES.get(space)
    found = getattr(module, attr, None) if module is not None and not attr.startswith("_") else None
    if found is None or attr in _REFUSED or isinstance(found, type) or inspect.ismodule(found) or not callable(found):
        raise CheckpointError(f"the graph calls {name!r}, which the loader does not allow")
    return found


# Modules ------------------------------------------------------------------------------
def module_spec(name: str, module: nn.Module) -> dict[str, Any]:
    """``{"class": "Conv2d", "kwargs": ...}`` that rebuilds ``module`` (weights aside)."""
    cls = type(module)
    if getattr(nn, cls.__name__, None) is not cls or list(module.children()):
        raise UnsupportedLayerError(f"{name}: {cls.__module__}.{cls.__name__} is not a torch.nn layer, so the engine "
                                    "file cannot rebuild it without its code")
    kwargs = {}
    for arg, param in inspect.signature(cls.__init__).parameters.items():
        if arg in _SKIP_ARGS or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if arg == "bias" and not isinstance(getattr(module, "bias", None), bool):
            kwargs[arg] = module.bias is not None
        elif hasattr(module, arg):
            kwargs[arg] = encode(getattr(module, arg))
        elif param.default is param.empty:
            raise UnsupportedLayerError(f"{name}: cannot read the argument {arg!r} of {cls.__name__} back")
    spec = {"class": cls.__name__, "kwargs": kwargs}
    rebuilt = build_module(spec)
    if rebuilt.extra_repr() != module.extra_repr() or _shapes(rebuilt) != _shapes(module):
        raise UnsupportedLayerError(f"{name}: {cls.__name__} does not rebuild from its attributes ({module!r})")
    return spec


def build_module(spec: dict[str, Any]) -> nn.Module:
    cls = getattr(nn, str(spec.get("class")), None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__module__.startswith("torch.nn.modules")):
        raise CheckpointError(f"the graph uses module class {spec.get('class')!r}, which the loader does not allow")
    try:
        return cls(**{k: decode(v, {}) for k, v in spec.get("kwargs", {}).items()})
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot rebuild {cls.__name__}: {exc}") from exc


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


# Graphs -------------------------------------------------------------------------------
def graph_spec(gm: torch.fx.GraphModule) -> list[dict[str, Any]]:
    nodes = []
    for node in gm.graph.nodes:
        target = function_name(node.target) if node.op == "call_function" else node.target
        if node.op == "call_method" and target.startswith("_"):
            raise UnsupportedLayerError(f"cannot save a call of the private method {target!r}")
        nodes.append({"name": node.name, "op": node.op, "target": target,
                      "args": encode(node.args), "kwargs": encode(dict(node.kwargs))})
    return nodes


def build_graph(spec: list[dict[str, Any]]) -> torch.fx.Graph:
    graph, nodes = torch.fx.Graph(), {}
    for item in spec:
        op, target = item.get("op"), item.get("target")
        if op not in ("placeholder", "get_attr", "call_module", "call_method", "call_function", "output"):
            raise CheckpointError(f"malformed graph: op {op!r}")
        if not isinstance(target, str) or (op == "call_method" and target.startswith("_")):
            raise CheckpointError(f"malformed graph: target {target!r}")
        fn = resolve_function(target) if op == "call_function" else target
        args, kwargs = decode(item.get("args"), nodes), decode(item.get("kwargs"), nodes)
        if fn is builtins.getattr and not (len(args) == 2 and isinstance(args[1], str) and not args[1].startswith("_")):
            raise CheckpointError(f"the graph reads attribute {args[1:]!r}, which the loader does not allow")
        node = graph.create_node(op, fn, tuple(args), dict(kwargs), name=item.get("name"))
        nodes[item.get("name")] = node
    graph.lint()
    return graph
