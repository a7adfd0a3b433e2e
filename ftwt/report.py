"""Report files: ``report.json`` and, for gated models, the per-layer plot."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from ftwt._io import atomic_write_text

log = logging.getLogger(__name__)


def write_report(report: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """Write ``out_dir/report.json`` and, for gated models, ``out_dir/per_layer.png``.

    The per-layer plot shows each gated unit's predicted kept fraction next to its ground
    truth; a dense model's report has no gate data, so its plot is skipped. Files are
    written atomically (temporary file, then ``os.replace``); ``out_dir`` is created.

    Args:
        report: as returned by :func:`evaluate` (extra JSON-ready keys are kept).
        out_dir: destination folder.

    Returns:
        The paths written.
    """
    from ftwt.plots import plot_per_layer  # lazy: matplotlib only when a report is written

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "report.json"
    # allow_nan=False: a NaN would make the file invalid JSON for strict readers
    atomic_write_text(json_path, json.dumps(report, indent=2, allow_nan=False, default=float) + "\n")
    written = [json_path]
    if report.get("per_layer"):
        png = out / "per_layer.png"
        plot_per_layer(report, png)
        written.append(png)
    else:
        log.info("dense model: no per-layer gate plot")
    return written


__all__ = ["write_report"]
