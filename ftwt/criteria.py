"""Ground-truth masks: which filters of a unit's real output "fire" for each sample.

These are the labels the gates learn from (FTWT, arXiv 2110.08232, Sec. 3). Every function
here is pure: tensors in, boolean masks out, no module state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ftwt.errors import ConfigError

# Scores at or below this share of the total mass count as dead filters (reference value).
EPS = 1e-5


def filter_scores(y: torch.Tensor) -> torch.Tensor:
    """Spatial peak of each filter's absolute response.

    Args:
        y: unit output of shape ``(N, C, H, W)``.

    Returns:
        ``(N, C)`` scores ``s_c = max_{h,w} |y[n, c, h, w]|``.
    """
    return y.detach().abs().amax(dim=(2, 3))


def _shares(scores: torch.Tensor) -> torch.Tensor:
    total = scores.sum(dim=1, keepdim=True)
    # All-zero rows get all-zero shares instead of NaN.
    return torch.where(total > 0, scores / total.clamp_min(torch.finfo(scores.dtype).tiny), 0)


def _keep_top_one(keep: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    # Differs from the reference on purpose: it can prune every filter of a unit.
    top = scores.argmax(dim=1, keepdim=True)
    empty = ~keep.any(dim=1, keepdim=True)
    return keep | torch.zeros_like(keep).scatter(1, top, empty)


def mass_mask(scores: torch.Tensor, r: float) -> torch.Tensor:
    """The ``mass`` criterion: keep the filters that carry the top ``r`` of the mass.

    Shares ``p = s / sum(s)`` are sorted in descending order (ties keep the lower
    channel index first) and the filter at sorted position ``j`` is kept iff
    ``cumsum(p)_j - r <= 1e-5``. For ``r = 1`` only dead filters (``p <= 1e-5``) are
    pruned. At least one filter (the strongest) is always kept.

    Args:
        scores: ``(N, C)`` non-negative filter scores, see :func:`filter_scores`.
        r: mass threshold in ``(0, 1]``.

    Returns:
        ``(N, C)`` boolean mask, True = keep.

    Example:
        >>> mass_mask(torch.tensor([[6.0, 3.0, 1.0]]), 0.9)
        tensor([[ True,  True, False]])
    """
    if not 0.0 < r <= 1.0:
        raise ConfigError(f"mass threshold r must be in (0, 1], got {r}")
    p = _shares(scores)
    if r >= 1.0:
        keep = p > EPS
    else:
        sorted_p, order = torch.sort(p, dim=1, descending=True, stable=True)
        keep_sorted = (sorted_p.cumsum(dim=1) - r) <= EPS
        # Dead filters never count as firing, even when the cumulative rule admits them.
        keep_sorted &= sorted_p > EPS
        keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    return _keep_top_one(keep, scores)


def uniform_mask(scores: torch.Tensor, rho: float) -> torch.Tensor:
    """The ``uniform`` criterion: prune the ``floor(rho * C)`` weakest filters and dead ones.

    Args:
        scores: ``(N, C)`` non-negative filter scores.
        rho: fraction of filters to prune, in ``[0, 1)``.

    Returns:
        ``(N, C)`` boolean mask, True = keep; at least one filter is kept.
    """
    if not 0.0 <= rho < 1.0:
        raise ConfigError(f"uniform pruning ratio must be in [0, 1), got {rho}")
    n_prune = int(rho * scores.shape[1])
    keep = _shares(scores) > EPS
    if n_prune:
        order = torch.sort(scores, dim=1, stable=True).indices[:, :n_prune]
        keep = keep.scatter(1, order, False)
    return _keep_top_one(keep, scores)


CRITERIA: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "mass": mass_mask,
    "uniform": uniform_mask,
}


def ground_truth(y: torch.Tensor, criterion: str, threshold: float) -> torch.Tensor:
    """Ground-truth mask of a unit output ``y`` ``(N, C, H, W)`` under a named criterion."""
    try:
        fn = CRITERIA[criterion]
    except KeyError:
        raise ConfigError(f"unknown criterion {criterion!r}; choose from {sorted(CRITERIA)}") from None
    return fn(filter_scores(y), threshold)
