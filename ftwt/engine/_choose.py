"""Per-layer kernel choice of ``SparseEngine(kernel="auto")``: a short measurement on real input.

Which way of computing a layer is fastest depends on the CPU (vector width, cache sizes,
oneDNN's kernels for it), on the layer's shape and on how many filters its gate keeps, so
the engine does not guess: on its first input each convolution runs every way it can
(:attr:`SparseConv.modes`) a few times and keeps the fastest. PyTorch's ops on the kept
block are the fallback, and another way replaces them only when it is measurably faster, so
``auto`` is never slower than ``kernel="torch"`` by more than the timing noise.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from ftwt.engine._compact import Compact
    from ftwt.engine._conv import SparseConv

FALLBACK = "torch"
REPEATS = 5  # timed calls per way, taking turns: the minimum is robust to a noisy neighbour
MARGIN = 0.95  # another way must beat the fallback by 5% to replace it


def measure(conv: SparseConv, mode: str, x: Compact, masks: dict[str, Tensor] | None) -> float:
    """Seconds of one call of ``conv`` computing ``x`` in ``mode``, as the first call of its block shape."""
    conv.set_mode(mode)
    seen = set(conv._seen)
    start = time.perf_counter()
    conv(x, masks)
    elapsed = time.perf_counter() - start
    # In a stream of samples each mask gives a new block shape, for which conv2d has not
    # compiled a oneDNN kernel yet: do not let the repeats here profit from one.
    conv._seen = seen
    return elapsed


def pick(times: dict[str, float]) -> str:
    """The mode to run from measured seconds per mode: the fastest, unless it does not beat the fallback by :data:`MARGIN`."""
    best = min(times, key=times.__getitem__)
    if FALLBACK in times and times[best] > MARGIN * times[FALLBACK]:
        return FALLBACK
    return best


def choose(conv: SparseConv, x: Compact, masks: dict[str, Tensor] | None) -> None:
    """Time every mode of ``conv`` on ``x``, add the times to ``conv.times`` and switch it to the one :func:`pick` picks.

    The modes take turns, so that a noisy spell hits them alike; each keeps its fastest call.
    Called on several samples, the times add up: the choice is the fastest over all of them.
    """
    seen = set(conv._seen)
    for mode in conv.modes:  # warm-up: the allocator's buffers, the kernels' first touch of the weights
        conv.set_mode(mode)
        conv(x, masks)
        conv._seen = set(seen)
    best = dict.fromkeys(conv.modes, math.inf)
    for _ in range(REPEATS):
        for mode in conv.modes:
            best[mode] = min(best[mode], measure(conv, mode, x, masks))
    for mode, seconds in best.items():
        conv.times[mode] = conv.times.get(mode, 0.0) + seconds
    conv.set_mode(pick(conv.times))


def compare(run: Callable[[dict[str, str]], None], candidates: dict[str, dict[str, str]]) -> dict[str, float]:
    """Seconds of ``run(choices)`` for each named set of choices, taking turns, the fastest of :data:`REPEATS`.

    The per-layer times add up to the model's only roughly (caches, the allocator, the
    layers' order), so the choice as a whole is checked against the alternatives as a whole.
    """
    best = dict.fromkeys(candidates, math.inf)
    # As many turns as a layer gets: with fewer, one noisy spell decided whole models here.
    for _ in range(REPEATS):
        for key, choices in candidates.items():
            start = time.perf_counter()
            run(choices)
            best[key] = min(best[key], time.perf_counter() - start)
    return best


def winner(seconds: dict[str, float]) -> str:
    """The fastest candidate of :func:`compare`; on a tie the first named."""
    return min(seconds, key=seconds.__getitem__)
