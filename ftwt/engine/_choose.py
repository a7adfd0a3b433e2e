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
from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from ftwt.engine._compact import Compact
    from ftwt.engine._conv import SparseConv

FALLBACK = "torch"
REPEATS = 5  # timed calls per way: the minimum of a few runs is robust to a noisy neighbour
MARGIN = 0.95  # another way must beat the fallback by 5% to replace it


def measure(conv: SparseConv, mode: str, x: Compact, masks: dict[str, Tensor] | None) -> float:
    """Seconds of one call of ``conv`` computing ``x`` in ``mode``: the fastest of :data:`REPEATS` after a warm-up."""
    conv.set_mode(mode)
    conv(x, masks)  # warm-up: oneDNN's kernel for the shape, the allocator's buffers
    best = math.inf
    for _ in range(REPEATS):
        start = time.perf_counter()
        conv(x, masks)
        best = min(best, time.perf_counter() - start)
    return best


def pick(times: dict[str, float]) -> str:
    """The mode to run from measured seconds per mode: the fastest, unless it does not beat the fallback by :data:`MARGIN`."""
    best = min(times, key=times.__getitem__)
    if FALLBACK in times and times[best] > MARGIN * times[FALLBACK]:
        return FALLBACK
    return best


def choose(conv: SparseConv, x: Compact, masks: dict[str, Tensor] | None) -> dict[str, float]:
    """Time every mode of ``conv`` on ``x``, switch it to the one :func:`pick` picks; the times per mode."""
    times = {mode: measure(conv, mode, x, masks) for mode in conv.modes}
    conv.set_mode(pick(times))
    return times
