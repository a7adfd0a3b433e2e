"""A sparse engine as one safetensors file: its graph and settings as JSON, its weights as tensors.

``engine.save(path)`` writes what :meth:`SparseEngine.load` needs to rebuild the engine in a
fresh process, without the model's Python class: the ``torch.fx`` graph of the model and the
``torch.nn`` layers it calls (:mod:`ftwt.engine._graph`), the gates' config and units, the
engine's options and its measured kernel choices in the file's metadata, and the weights
(BatchNorm unfolded, gates included) as tensors. Nothing in the file is unpickled or
executed. A SHA-256 of the metadata and tensors, stored beside them, makes a file that was
edited or damaged after saving fail to load with one line; it detects accidents, not a
forger who recomputes it (the format itself is what keeps a forged file from running code).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.fx

from ftwt.engine._graph import build_graph, build_module, graph_spec, module_spec
from ftwt.errors import CheckpointError, ConfigError
from ftwt.gate import GateConfig
from ftwt.surgery import GATES_ATTR, attach_gates, gated_units
from ftwt.unit import UnitSpec

if TYPE_CHECKING:
    from ftwt.engine.sparse_engine import SparseEngine

FORMAT, VERSION = "ftwt-engine", 1


def _digest(meta: str, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(meta.encode())
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous().reshape(-1)
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_engine(engine: SparseEngine, path: str | os.PathLike) -> None:
    """Write ``engine`` to ``path`` (safetensors), atomically."""
    data = engine_bytes(engine)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def engine_bytes(engine: SparseEngine) -> bytes:
    """The engine file's content (what :func:`save_engine` writes; what pickling an engine carries)."""
    from safetensors.torch import save

    from ftwt import __version__

    gm, model = engine.graph_module, engine.model
    called = sorted({n.target for n in gm.graph.nodes if n.op == "call_module"})
    modules = dict(gm.named_modules())
    tensors: dict[str, torch.Tensor] = {}
    for name in called:
        for key, value in modules[name].state_dict().items():
            tensors[f"m.{name}.{key}"] = value
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = _attr(gm, node.target)
            if not isinstance(value, torch.Tensor):
                raise ConfigError(f"cannot save the graph constant {node.target!r} of type {type(value).__name__}")
            tensors[f"a.{node.target}"] = value
    for key, value in getattr(model, GATES_ATTR).state_dict().items():
        tensors[f"g.{key}"] = value
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    units = gated_units(model)
    spec = {
        "format": FORMAT, "version": VERSION, "ftwt": __version__, "torch": torch.__version__,
        "model": type(model).__name__,
        "graph": graph_spec(gm),
        "modules": {name: module_spec(name, modules[name]) for name in called},
        "gates": {"config": units[0].config.to_dict(),
                  "units": [{"conv": u.spec.conv, "norm": u.spec.norm, "act": u.spec.act} for u in units]},
        "engine": {"round_to": engine.round_to, "batch": engine.batch, "kernel": engine.kernel,
                   "choices": engine.choices, "isa": engine.isa, "cpu": cpu_name()},
    }
    meta = json.dumps(spec, sort_keys=True)
    return save(tensors, metadata={"format": "pt", "ftwt_engine": meta, "ftwt_sha256": _digest(meta, tensors)})


def cpu_name() -> str:
    """The CPU the kernel choices were timed on (they are reused only on the same one)."""
    from ftwt.bench import machine_info

    return str(machine_info()["cpu"])


def _attr(gm: torch.nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def read_engine_file(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The JSON spec and the tensors of an engine file, checked against its digest.

    Raises:
        CheckpointError: missing, not an engine file, or changed since it was saved.
    """
    if not Path(path).is_file():
        raise CheckpointError(f"engine file not found: {path}")
    return parse_engine(Path(path).read_bytes(), str(path))


def parse_engine(data: bytes, where: str = "engine data") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """:func:`read_engine_file` on the bytes of an engine file."""
    from safetensors.torch import load

    try:
        # safetensors: an 8-byte little-endian header length, then the JSON header with the metadata.
        size = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
        tensors = load(data)
    except Exception as exc:  # safetensors raises its own error types for damaged headers
        raise CheckpointError(f"{where} is not a readable engine file ({type(exc).__name__}: {exc})") from exc
    if "ftwt_engine" not in meta or "ftwt_sha256" not in meta:
        raise CheckpointError(f"{where} is a safetensors file but not an ftwt engine (save one with engine.save)")
    if _digest(meta["ftwt_engine"], tensors) != meta["ftwt_sha256"]:
        raise CheckpointError(f"{where} was modified or damaged after it was saved (checksum mismatch); "
                              "save the engine again")
    try:
        spec = json.loads(meta["ftwt_engine"])
    except ValueError as exc:
        raise CheckpointError(f"{where}: unreadable engine metadata ({exc})") from exc
    if spec.get("format") != FORMAT or not isinstance(spec.get("version"), int) or spec["version"] > VERSION:
        raise CheckpointError(f"{where}: engine format {spec.get('format')!r} v{spec.get('version')} is not one "
                              f"this ftwt reads (v{VERSION}); upgrade ftwt")
    return spec, tensors


def rebuild_model(spec: dict[str, Any], tensors: dict[str, torch.Tensor]) -> torch.fx.GraphModule:
    """The gated model of an engine file: a ``GraphModule`` of ``torch.nn`` layers with its gates, in eval mode."""
    root: dict[str, Any] = {name: build_module(s) for name, s in spec["modules"].items()}
    for key, value in tensors.items():
        if key.startswith("a."):
            root[key[2:]] = value
    try:
        for name in spec["modules"]:
            prefix = f"m.{name}."
            root[name].load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        gm = torch.fx.GraphModule(root, build_graph(spec["graph"]), class_name=str(spec.get("model", "Model")))
        gates = spec["gates"]
        units = [UnitSpec(conv=u["conv"], norm=u.get("norm"), act=u.get("act")) for u in gates["units"]]
        attach_gates(gm, GateConfig.from_dict(gates["config"]), units=units)
        getattr(gm, GATES_ATTR).load_state_dict({k[2:]: v for k, v in tensors.items() if k.startswith("g.")})
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise CheckpointError(f"engine file does not rebuild: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    return gm.eval()
