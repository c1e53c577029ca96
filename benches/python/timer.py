"""The one timer of the benchmarks: the median of repeated timed calls, on the wall clock or on
CUDA events (``benches/gpu``).

A clock is ``clock(fn, calls) -> seconds`` for ``calls`` back-to-back calls of ``fn``.
"""

from __future__ import annotations

import statistics
import time

# Calls shorter than this are timed in batches and divided, so the timer's own overhead does not
# swamp microsecond calls (the 8x16 softmax and its np.exp yardstick).
MIN_TIMED_S = 20e-6


def wall_clock(fn, calls: int = 1) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return time.perf_counter() - t0


def cuda_clock(torch):
    """A clock of CUDA events around the calls on the current stream: the host's per-call work
    overlaps the GPU's as in a training loop (and shows where it is longer)."""

    def clock(fn, calls: int = 1) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    return clock


def median_time(
    fn, budget_s=0.5, min_runs=5, max_runs=50, *, calls=None, warmup=1, setup=None, clock=wall_clock
) -> float:
    """Median seconds per call of fn(), over at least `min_runs` and at most `max_runs` timed runs
    (more while `budget_s` lasts), after `warmup` untimed calls.

    A run is `calls` back-to-back calls divided by their number; `calls=None` picks it from one
    timed call (batches only for calls under ``MIN_TIMED_S``). `setup()`, if given, runs untimed
    before every call, and every run is then one call (for example: restoring an input that an
    in-place call overwrote).
    """
    if setup is not None:
        calls = 1
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    times = []
    if calls is None:
        first = clock(fn, 1)
        calls = max(1, int(MIN_TIMED_S / max(first, 1e-9)))
        if calls == 1:
            times.append(first)
    start = time.perf_counter()
    while len(times) < min_runs or (len(times) < max_runs and time.perf_counter() - start < budget_s):
        if setup is not None:
            setup()
        times.append(clock(fn, calls) / calls)
    return statistics.median(times)
