"""Export a gated model for other runtimes: ``torch.export`` programs (``.pt2``) and ONNX.

An exported graph computes what the gated model computes in eval mode: each gate runs and
its mask multiplies its unit's output. It computes every filter, though: an exported graph
is dense, so it is as fast as the dense model plus the gates, not faster. The FLOPs that
dynamic pruning saves become time only in :class:`ftwt.engine.SparseEngine` (save it with
``engine.save``). Every export is read back and run on the example input, and its outputs
are checked against the eager model's.

Example:
    >>> model, _ = ftwt.load_trained("runs/ftwt/best.pt")
    >>> export_model(model.eval(), torch.randn(1, 3, 32, 32), "model.pt2", fmt="torch")["max_rel_diff"] < 1e-5
    True
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftwt.errors import ConfigError, DeviceError, UnsupportedLayerError

log = logging.getLogger(__name__)

FORMATS = ("torch", "onnx")
CHECK_RTOL = 1e-5  # outputs of the export relative to the largest eager logit


def _rel_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).abs().max()) / max(float(ref.abs().max()), 1e-12)


def export_model(model: nn.Module, example: torch.Tensor, path: str | os.PathLike, fmt: str = "torch",
                 check: bool = True) -> dict[str, Any]:
    """Export ``model`` (gated or not, in eval mode) traced on ``example`` to ``path``.

    Args:
        model: the model; put in eval mode for the export and left so.
        example: an input batch; the batch dimension stays dynamic where the model allows it.
        path: the output file (``.pt2`` for ``"torch"``, ``.onnx`` for ``"onnx"``).
        fmt: ``"torch"`` (``torch.export``, read with ``torch.export.load``) or ``"onnx"``
            (needs the ``onnx`` and ``onnxscript`` packages: ``pip install ftwt[onnx]``).
        check: read the export back and compare its outputs on ``example`` with the eager
            model's (ONNX: with ONNX Runtime, when installed).

    Returns:
        ``{"format", "path", "checked_with", "max_rel_diff"}`` (the last two None without a check).

    Raises:
        ConfigError: unknown format, or the export's outputs differ from the model's.
        DeviceError: the ONNX exporter's packages are missing.
        UnsupportedLayerError: the exporter cannot trace the model.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose from {list(FORMATS)}")
    path = Path(path)
    suffix = {"torch": ".pt2", "onnx": ".onnx"}[fmt]
    if path.suffix != suffix:
        raise ConfigError(f"a {fmt} export is a {suffix} file; got {path}")
    model.eval()
    with torch.no_grad():
        ref = model(example)
    if fmt == "torch":
        checked, diff = _export_torch(model, example, path, ref, check)
    else:
        checked, diff = _export_onnx(model, example, path, ref, check)
    if diff is not None and diff > CHECK_RTOL:
        raise ConfigError(f"the {fmt} export's outputs differ from the model's by {diff:.1e} (relative); "
                          "not safe to deploy")
    return {"format": fmt, "path": str(path), "checked_with": checked, "max_rel_diff": diff}


def _batch_dim(example: torch.Tensor) -> tuple[dict[str, Any], ...]:
    # Without a named dimension the batch of the example would be fixed into the graph.
    return ({0: torch.export.Dim("batch", min=1, max=4096)},)


def _export_torch(model: nn.Module, example: torch.Tensor, path: Path, ref: torch.Tensor,
                  check: bool) -> tuple[str | None, float | None]:
    try:
        try:
            program = torch.export.export(model, (example,), dynamic_shapes=_batch_dim(example), strict=False)
        except Exception as exc:  # a model that needs a fixed batch: export that
            log.info("export with a dynamic batch failed (%s); exporting a fixed batch of %d",
                     type(exc).__name__, example.shape[0])
            program = torch.export.export(model, (example,), strict=False)
    except Exception as exc:
        raise UnsupportedLayerError(f"torch.export cannot trace {type(model).__name__}: "
                                    f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}") from exc
    torch.export.save(program, str(path))
    if not check:
        return None, None
    with torch.no_grad():
        out = torch.export.load(str(path)).module()(example)
    return "torch.export.load", _rel_diff(out, ref)


def _export_onnx(model: nn.Module, example: torch.Tensor, path: Path, ref: torch.Tensor,
                 check: bool) -> tuple[str | None, float | None]:
    try:
        import onnx  # noqa: F401  (the exporter needs it; fail here with the fix)
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise DeviceError(f"ONNX export needs the onnx and onnxscript packages ({exc.name} is missing): "
                          "pip install 'ftwt[onnx]'") from exc
    try:
        torch.onnx.export(model, (example,), str(path), dynamo=True, input_names=["input"], output_names=["logits"],
                          dynamic_shapes=_batch_dim(example), verbose=False)
    except Exception as exc:
        raise UnsupportedLayerError(f"the ONNX exporter cannot export {type(model).__name__}: "
                                    f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}") from exc
    if not check:
        return None, None
    try:
        import onnxruntime
    except ImportError:
        log.warning("onnxruntime is not installed: the ONNX file was written but not run (pip install 'ftwt[onnx]')")
        return None, None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: example.numpy()})[0]
    return "onnxruntime", _rel_diff(torch.from_numpy(out), ref)


__all__ = ["FORMATS", "export_model"]
