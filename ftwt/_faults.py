"""Fault injection for tests: pause a run at a named point so that a test can kill it exactly there.

``FTWT_FAULT_PAUSE=POINT`` or ``POINT#N`` makes the N-th time (default the first) this
process reaches ``POINT`` write ``ftwt: fault pause at POINT#N`` to stderr and sleep for
``FTWT_FAULT_PAUSE_SECONDS`` (default 300) before going on. Points: ``step`` (after a
training step), ``evaluate`` (as validation starts) and ``write:NAME`` (inside the atomic
write of a file named ``NAME``, half of it written to the temporary file). Unset, every
point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import time
from collections import Counter

ENV = "FTWT_FAULT_PAUSE"
_hits: Counter[str] = Counter()


def armed(point: str) -> bool:
    """Count one visit to ``point``; True if this visit is the one to pause at."""
    spec = os.environ.get(ENV)
    if not spec:
        return False
    name, _, nth = spec.partition("#")
    if name != point:
        return False
    _hits[point] += 1
    return _hits[point] == int(nth or 1)


def pause(point: str) -> None:
    """Announce the pause on stderr (unbuffered, so the test sees it at once) and sleep."""
    os.write(2, f"ftwt: fault pause at {point}#{_hits[point]}\n".encode())
    time.sleep(float(os.environ.get("FTWT_FAULT_PAUSE_SECONDS", "300")))


def pause_if(point: str) -> None:
    if armed(point):
        pause(point)
