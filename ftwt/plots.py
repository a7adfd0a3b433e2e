"""Plots for reports: accuracy against FLOPs, and each gated layer's kept fraction.

Figures are drawn on matplotlib's Agg canvas through ``matplotlib.figure.Figure`` rather
than ``pyplot``, so nothing opens a window or changes the process-wide backend. Files are
written atomically (temporary file, then ``os.replace``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ftwt._io import atomic_write
from ftwt.errors import ConfigError

# kind -> (marker, colour, legend label); unknown kinds fall back to "ftwt"'s style
_STYLES = {
    "dense": ("s", "black", "dense"),
    "ftwt": ("o", "tab:blue", "FTWT (dynamic)"),
    "ftwt+": ("D", "tab:purple", "ftwt+ (dynamic)"),
    "cascade": ("P", "tab:red", "width cascade (dynamic, recommended)"),
    "static": ("^", "tab:orange", "static pruning"),
    "estimate": ("x", "tab:green", "estimate (perfect gates)"),
}


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike) -> Path:
    fmt = Path(path).suffix.lstrip(".") or "png"
    return atomic_write(path, lambda f: fig.savefig(f, format=fmt, bbox_inches="tight"))


def plot_accuracy_vs_flops(points: Sequence[dict[str, Any]], path: str | os.PathLike, title: str | None = None) -> Path:
    """Top-1 accuracy against FLOPs reduction, one marker per model.

    Args:
        points: dicts with ``label``, ``flops_reduction`` (fraction in [0, 1)) and ``top1``
            (percent), optionally ``kind``: ``"dense"``, ``"ftwt"``, ``"static"`` or
            ``"estimate"`` (marker style). An estimate without ``top1`` is drawn as a
            vertical line at its reduction.
        path: image file to write (format from its suffix, PNG by default).
        title: figure title.

    Returns:
        ``path``.

    Example:
        >>> plot_accuracy_vs_flops([{"label": "dense", "top1": 93.7, "flops_reduction": 0.0, "kind": "dense"},
        ...                         {"label": "r=0.8", "top1": 92.6, "flops_reduction": 0.66}], "acc.png")
    """
    if not points:
        raise ConfigError("no points to plot")
    fig = _figure(6.4, 4.4)
    ax = fig.add_subplot()
    shown: set[str] = set()
    for point in points:
        kind = point.get("kind", "ftwt")
        marker, colour, legend = _STYLES.get(kind, _STYLES["ftwt"])
        x = 100.0 * float(point["flops_reduction"])
        label = None if kind in shown else legend
        shown.add(kind)
        if point.get("top1") is None:
            ax.axvline(x, color=colour, linestyle="--", linewidth=1, label=label)
            ax.annotate(str(point.get("label", "")), (x, 0.02), xycoords=("data", "axes fraction"), rotation=90,
                        fontsize=8, color=colour)
            continue
        y = float(point["top1"])
        ax.scatter([x], [y], marker=marker, color=colour, label=label, zorder=3)
        ax.annotate(str(point.get("label", "")), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("FLOPs reduction (%)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_per_layer(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Each gated unit's kept fraction: predicted, labels and ground truth side by side.

    Args:
        report: an :func:`ftwt.evaluate.evaluate` report of a gated model (``per_layer``
            entries with ``name``, ``kept`` and optionally ``kept_labels`` and
            ``kept_ground_truth``; missing or None series are left out).
        path: image file to write.

    Returns:
        ``path``.

    Raises:
        ConfigError: the report has no per-layer gate data (a dense model).
    """
    layers = report.get("per_layer") or []
    if not layers:
        raise ConfigError("report has no per-layer gate data (dense model?)")
    series = [
        ("kept", "predicted (gates)", "tab:blue"),
        ("kept_labels", "labels", "tab:gray"),
        ("kept_ground_truth", "ground truth (perfect gates)", "tab:orange"),
    ]
    series = [s for s in series if all(lay.get(s[0]) is not None for lay in layers)]
    n = len(layers)
    fig = _figure(max(6.0, 0.28 * n * len(series)), 4.2)
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    for i, (key, legend, colour) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(n)]
        ax.bar(xs, [lay[key] for lay in layers], width=width, label=legend, color=colour)
    ax.set_xticks(range(n))
    ax.set_xticklabels([lay["name"] for lay in layers], rotation=90, fontsize=7)
    ax.set_ylim(0, 1.2)  # headroom above 1 for the legend
    ax.set_ylabel("kept fraction of filters")
    summary = f"FLOPs reduction {report.get('flops_reduction', 0.0):.1%}"
    if report.get("ground_truth_reduction") is not None:
        summary += f" (perfect gates {report['ground_truth_reduction']:.1%})"
    if report.get("varying_fraction") is not None:
        summary += f"; masks vary for {report['varying_fraction']:.1%} of decisions"
    ax.set_title(summary, fontsize=9)
    ax.legend(fontsize=8, loc="upper left", ncol=len(series))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_training(metrics: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Loss, top-1 and FLOPs reduction per epoch, training and validation (a run's ``training.png``).

    Args:
        metrics: the lines of a run's ``metrics.jsonl``: ``epoch``, ``loss``, ``top1``,
            ``flops_reduction`` and their ``val_`` twins (missing or None values are left out).
        path: image file to write.

    Returns:
        ``path``.

    Example:
        >>> plot_training([{"epoch": 1, "loss": 2.1, "top1": 30.0, "val_top1": 35.0}], "training.png")
    """
    if not metrics:
        raise ConfigError("no epochs to plot")
    fig = _figure(12.0, 3.6)
    panels = [("loss", "loss", 1.0), ("top1", "top-1 accuracy (%)", 1.0), ("flops_reduction", "FLOPs reduction (%)", 100.0)]
    for i, (key, label, scale) in enumerate(panels):
        ax = fig.add_subplot(1, 3, i + 1)
        for name, legend, colour in ((key, "training", "tab:blue"), (f"val_{key}", "validation", "tab:orange")):
            points = [(m["epoch"], scale * m[name]) for m in metrics if m.get(name) is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=legend, color=colour)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


# sweep method -> (marker, colour, legend label, dashed): dynamic solid, bounds and static dashed
_SWEEP_STYLES = {
    "ftwt": ("o", "tab:blue", "FTWT (paper mode)", False),
    "uniform": ("v", "tab:purple", "FTWT, uniform criterion", False),
    "ftwt+": ("D", "tab:red", "ftwt+ (per-input gates)", False),
    "oracle": ("*", "tab:gray", "oracle (perfect gates, not deployable)", True),
    "static": ("^", "tab:orange", "static, all channel groups", True),
    "static-inner": ("s", "tab:brown", "static, blocks' inner channels", True),
}


def plot_sweep(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str | None = None) -> Path:
    """A sweep's trade-off: top-1 against honest FLOPs reduction, and against measured latency.

    Args:
        rows: the rows of ``sweep.csv`` (:mod:`ftwt.sweep`): ``method``, ``achieved_reduction``,
            ``top1`` and ``latency_ms`` (None where not measured); the ``dense`` row is drawn
            as a horizontal line (and its latency as a vertical one).
        path: image file to write.
        title: figure title.

    Returns:
        ``path``.
    """
    if not rows:
        raise ConfigError("no rows to plot")
    fig = _figure(12.0, 4.6)
    panels = [("achieved_reduction", 100.0, "honest FLOPs reduction (%, gates included)"),
              ("latency_ms", 1.0, "batch-1 CPU latency (ms)")]
    dense = next((r for r in rows if r["method"] == "dense"), None)
    for i, (key, scale, label) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        for method, (marker, colour, legend, dashed) in _SWEEP_STYLES.items():
            # in order of FLOPs reduction on both panels, so that each line visits the same runs in turn
            points = [(scale * float(r[key]), float(r["top1"])) for r in
                      sorted(rows, key=lambda r: float(r["achieved_reduction"] or 0.0))
                      if r["method"] == method and r.get(key) is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker=marker, color=colour, label=legend,
                        linestyle="--" if dashed else "-", linewidth=1.2)
        if dense is not None:
            ax.axhline(float(dense["top1"]), color="black", linewidth=1, linestyle=":",
                       label=f"dense ({float(dense['top1']):.2f}%)")
            if key == "latency_ms" and dense.get(key) is not None:
                ax.scatter([float(dense[key])], [float(dense["top1"])], marker="s", color="black", zorder=3)
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 accuracy (%)")
        ax.grid(alpha=0.3)
        if not ax.lines:
            ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center")
        else:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


__all__ = ["plot_accuracy_vs_flops", "plot_per_layer", "plot_sweep", "plot_training"]
