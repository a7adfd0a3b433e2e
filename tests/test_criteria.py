"""Ground-truth criteria on hand-computed examples."""

import pytest
import torch

from ftwt.criteria import filter_scores, ground_truth, mass_mask, uniform_mask
from ftwt.errors import ConfigError


def keep(mask: torch.Tensor) -> list[list[bool]]:
    return mask.tolist()


def test_scores_are_spatial_peaks_of_absolute_values():
    y = torch.tensor([[[[1.0, -3.0], [2.0, 0.5]], [[0.0, 0.0], [0.0, -0.25]]]])
    assert filter_scores(y).tolist() == [[3.0, 0.25]]


@pytest.mark.parametrize(
    ("scores", "r", "expected"),
    [
        ([6.0, 3.0, 1.0], 0.9, [True, True, False]),  # cumsum .6 .9 1.0
        ([6.0, 3.0, 1.0], 0.6, [True, False, False]),  # .6 - .6 <= 1e-5
        ([6.0, 3.0, 1.0], 0.61, [True, False, False]),  # .9 exceeds .61
        ([1.0, 3.0, 6.0], 0.9, [False, True, True]),  # order of channels does not matter
        ([1.0, 1.0, 1.0, 1.0], 0.5, [True, True, False, False]),  # ties: lower index first
        ([1.0, 1.0, 1.0, 1.0], 0.6, [True, True, False, False]),
        ([5.0, 0.0, 3.0, 0.0], 1.0, [True, False, True, False]),  # r = 1: only dead filters go
        ([1.0, 1e-6, 1.0], 1.0, [True, False, True]),  # share 5e-7 <= 1e-5 counts as dead
        ([100.0, 0.001, 0.001], 0.9, [True, False, False]),  # dominant filter alone exceeds r: kept anyway
        ([0.0, 0.0, 0.0], 0.9, [True, False, False]),  # all-zero output: one filter kept
        ([0.0, 0.0, 0.0], 1.0, [True, False, False]),
    ],
)
def test_mass_mask_hand_computed(scores, r, expected):
    assert keep(mass_mask(torch.tensor([scores]), r)) == [expected]


def test_mass_mask_rows_are_independent():
    scores = torch.tensor([[6.0, 3.0, 1.0], [1.0, 1.0, 8.0]])
    assert keep(mass_mask(scores, 0.8)) == [[True, False, False], [False, False, True]]


def test_mass_mask_keeps_fewer_as_r_falls():
    scores = torch.rand(64, 32)
    counts = [int(mass_mask(scores, r).sum()) for r in (1.0, 0.95, 0.8, 0.5, 0.2)]
    assert counts == sorted(counts, reverse=True)
    assert counts[0] > counts[-1]


@pytest.mark.parametrize("r", [0.0, -0.1, 1.01])
def test_mass_threshold_out_of_range(r):
    with pytest.raises(ConfigError):
        mass_mask(torch.ones(1, 3), r)


@pytest.mark.parametrize(
    ("scores", "rho", "expected"),
    [
        ([4.0, 3.0, 2.0, 1.0], 0.5, [True, True, False, False]),
        ([4.0, 0.0, 2.0, 1.0], 0.25, [True, False, True, True]),  # the dead one is the lowest
        ([4.0, 0.0, 2.0, 1.0], 0.5, [True, False, True, False]),
        ([4.0, 0.0, 2.0, 0.0], 0.0, [True, False, True, False]),  # rho = 0: dead filters still go
        ([2.0, 2.0, 2.0], 0.34, [False, True, True]),  # floor(1.02) = 1; tie: lowest index pruned first
        ([0.0, 0.0], 0.5, [True, False]),
    ],
)
def test_uniform_mask_hand_computed(scores, rho, expected):
    assert keep(uniform_mask(torch.tensor([scores]), rho)) == [expected]


def test_uniform_ratio_out_of_range():
    with pytest.raises(ConfigError):
        uniform_mask(torch.ones(1, 3), 1.0)


def test_ground_truth_dispatches_on_criterion():
    y = torch.zeros(1, 3, 2, 2)
    y[0, 0, 0, 0], y[0, 1, 1, 1], y[0, 2, 0, 1] = 6.0, -3.0, 1.0
    assert keep(ground_truth(y, "mass", 0.9)) == [[True, True, False]]
    assert keep(ground_truth(y, "uniform", 0.34)) == [[True, True, False]]
    with pytest.raises(ConfigError):
        ground_truth(y, "nope", 0.5)
