"""Route labels for the development benchmark: which filters fire for a *kind* of image.

Per-image top-k labels flip a unit's marginal filters from one image to the next, and a
backbone fine-tuned under such masks fits its data worse than a static one. Route labels
smooth them over similar images: the training images are clustered (k-means on the dense
model's penultimate features, cosine), and each unit's label for an image is the top k
filters by the *mean* peak activation over its cluster (its static core, if any, kept), or
(``score="taylor"``) by what dropping each filter would cost the cluster's task loss, to
first order: the mean over its images of ``|sum over positions of y * dL/dy|`` at the unit's
masked output ``y`` (Molchanov et al.'s Taylor criterion, per kind of image).
The labels still say which filters fire, as FTWT's do, but they change only where the
kind of image changes, so a gate can learn them and the backbone sees consistent masks.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

import ftwt
from ftwt._ops import ACTIVATIONS
from ftwt.surgery import gated_units


@torch.no_grad()
def penultimate(model: nn.Module, images: torch.Tensor, normalize, batch: int = 500) -> torch.Tensor:
    """L2-normalised inputs of the model's ``fc`` layer, ``(N, D)``."""
    feats: list[torch.Tensor] = []
    handle = model.fc.register_forward_pre_hook(lambda m, a: feats.append(a[0].flatten(1)))
    model.eval()
    try:
        for s in range(0, len(images), batch):
            model(normalize(images[s: s + batch]))
    finally:
        handle.remove()
    return torch.nn.functional.normalize(torch.cat(feats), dim=1)


def kmeans(z: torch.Tensor, k: int, iters: int = 50, seed: int = 0) -> torch.Tensor:
    """Centroids ``(k, D)`` of cosine k-means on unit-norm rows ``z`` (k-means++ start)."""
    gen = torch.Generator().manual_seed(seed)
    cent = z[torch.randint(len(z), (1,), generator=gen)]
    while len(cent) < k:
        d = (1 - z @ cent.T).amin(1).clamp_min(0)
        cent = torch.cat([cent, z[torch.multinomial(d + 1e-12, 1, generator=gen)]])
    for _ in range(iters):
        a = assign(z, cent)
        for j in range(k):
            if bool((a == j).any()):
                cent[j] = torch.nn.functional.normalize(z[a == j].mean(0), dim=0)
    return cent


def assign(z: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    return (z @ centroids.T).argmax(1)


def route_masks(model: nn.Module, images: torch.Tensor, clusters: torch.Tensor, k: int, normalize,
                batch: int = 500, score: str = "peak", targets: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per unit, ``(k, C_out)`` bool: each cluster's top filters by mean peak activation
    (``score="peak"``) or mean Taylor score (``"taylor"``, needs ``targets``), the model run
    densely on ``images`` (the core of a unit with one always among them)."""
    named = dict(model.named_modules())
    units = gated_units(model)
    sums = {u.name: torch.zeros(k, u.out_channels, dtype=torch.float64) for u in units}
    current: list[torch.Tensor] = []
    seen: dict[str, torch.Tensor] = {}

    def hook(unit):
        act = ACTIVATIONS.get(unit.spec.act or "")

        def fn(module, args, y):
            if score == "taylor":
                y.retain_grad()
                seen[unit.name] = y
                return
            a = act.fn(y) if act is not None else y
            sums[unit.name].index_add_(0, current[0], a.abs().amax((2, 3)).double())
        return fn

    handles = [named[u.spec.tail].register_forward_hook(hook(u)) for u in units]
    model.eval()
    try:
        with ftwt.record(model, masks="none", labels=False), torch.set_grad_enabled(score == "taylor"):
            for s in range(0, len(images), batch):
                current[:] = [clusters[s: s + batch]]
                logits = model(normalize(images[s: s + batch]))
                if score == "taylor":
                    F.cross_entropy(logits, targets[s: s + batch], reduction="sum").backward()
                    for name, y in seen.items():
                        sums[name].index_add_(0, current[0], (y * y.grad).sum((2, 3)).abs().double())
                    seen.clear()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    counts = torch.bincount(clusters, minlength=k).clamp_min(1).double()[:, None]
    out = {}
    for u in units:
        top = u.core_first(sums[u.name] / counts).topk(u.k, dim=1).indices
        out[u.name] = torch.zeros(k, u.out_channels, dtype=torch.bool).scatter_(1, top, True)
    return out


def lift(masks: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> dict[str, float]:
    """Gate accuracy against route labels, the best input-independent predictor's (each
    filter's majority label), and the difference, pooled over units as ``ftwt.evaluate`` does."""
    hits = prior = total = 0
    for name, m in masks.items():
        lab = labels[name]
        hits += int((m == lab).sum())
        majority = lab.float().mean(0) >= 0.5
        prior += int((lab == majority).sum())
        total += lab.numel()
    return {"route_gate_accuracy": hits / total, "route_static_oracle_accuracy": prior / total,
            "route_gate_lift": (hits - prior) / total}
