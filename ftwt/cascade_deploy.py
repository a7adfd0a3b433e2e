"""Serving a width cascade (:mod:`ftwt.cascade`): the core, then every filter for the inputs it is unsure of.

:meth:`ftwt.WidthCascade.engine` builds a :class:`CascadeEngine`; :meth:`CascadeEngine.save`
writes it as files that load without the model's code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ftwt.errors import CheckpointError, ConfigError


class CascadeEngine:
    """:meth:`WidthCascade.engine`: one input at a time, the core, then the full width if the core is unsure.

    ``core`` and ``full`` are PyTorch modules (the pruned core and the plain model) or
    :class:`ftwt.SparseEngine` instances; a sparse full width is given every filter as its
    masks (its gates still run, a pooling and a small product per unit, and are ignored).
    """

    def __init__(self, core: Any, full: Any, tau: float) -> None:
        self.core, self.full, self.tau = core, full, float(tau)
        plan = getattr(full, "plan", None)
        self._all = None if plan is None else {
            name: torch.arange(conv.c_out) for name, conv in plan.convs.items() if conv.unit is not None}

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != 1:
            return torch.cat([self(x[i: i + 1]) for i in range(x.shape[0])])
        out = self.core(x)
        if float(out.softmax(1).amax()) < self.tau:
            return self.full(x) if self._all is None else self.full(x, self._all)
        return out

    def save(self, folder: str | Path, example: torch.Tensor | None = None) -> Path:
        """Write both widths and ``cascade.json`` (the threshold) into ``folder``: ``core.pt2`` and
        ``full.pt2`` (``torch.export``, traced on ``example``) for PyTorch modules, ``core.safetensors``
        and ``full.safetensors`` for sparse engines. Either loads without the model's code."""
        from ftwt._io import atomic_write_text

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        if self._all is None:
            if example is None:
                raise ConfigError("saving a pruned cascade traces its models: pass example=")
            for name, module in (("core", self.core), ("full", self.full)):
                torch.export.save(torch.export.export(module, (example[:1].cpu(),)), str(out / f"{name}.pt2"))
            kind = "pruned"
        else:
            self.core.save(out / "core.safetensors")
            self.full.save(out / "full.safetensors")
            kind = "sparse"
        atomic_write_text(out / "cascade.json", json.dumps({"format": "ftwt-cascade", "kind": kind, "tau": self.tau}) + "\n")
        return out

    @classmethod
    def load(cls, folder: str | Path) -> CascadeEngine:
        """A saved cascade (:meth:`save`), without the model's code."""
        from ftwt.engine import SparseEngine

        folder = Path(folder)
        try:
            meta = json.loads((folder / "cascade.json").read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{folder}: no readable cascade.json ({exc})") from None
        if (not isinstance(meta, dict) or meta.get("format") != "ftwt-cascade" or meta.get("kind") not in ("pruned", "sparse")
                or not isinstance(meta.get("tau"), float)):
            raise CheckpointError(f"{folder / 'cascade.json'} is not a saved width cascade")
        if meta["kind"] == "sparse":
            return cls(SparseEngine.load(folder / "core.safetensors"), SparseEngine.load(folder / "full.safetensors"),
                       meta["tau"])
        core, full = (torch.export.load(str(folder / f"{n}.pt2")).module() for n in ("core", "full"))
        return cls(core, full, meta["tau"])


__all__ = ["CascadeEngine"]
