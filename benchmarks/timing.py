"""Timing of contenders on a shared machine, for the benchmark scripts."""

from __future__ import annotations

import time

import numpy as np


def median_times(fns: dict, rounds: int, inner: int = 1, clock=time.perf_counter) -> dict:
    """Median seconds per call of each zero-argument function, the contenders interleaved.

    Each of ``rounds`` rounds times ``inner`` calls of every function in turn with ``clock``
    (``time.process_time`` charges a one-thread process only for its own time slices).
    """
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t = clock()
            for _ in range(inner):
                fn()
            times[k].append((clock() - t) / inner)
    return {k: float(np.median(v)) for k, v in times.items()}
