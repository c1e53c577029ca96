"""The one timer of the benchmarks: the median of repeated timed calls, on the wall clock or on
CUDA events (``benches/gpu``).

A clock is ``clock(fn, calls) -> seconds`` for ``calls`` back-to-back calls of ``fn``.
"""

from __future__ import annotations

import statistics
import time
from typing import NamedTuple

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


class Timing(NamedTuple):
    """Median seconds per call and the spread of the runs: (75th - 25th percentile) / median."""

    median: float
    spread: float
    runs: int


# A run of a fast call is a batch of calls lasting at least this long, so what the first call of a
# run pays (waking a sleeping thread pool, reloading data another contender evicted from cache) is
# a small part of it, not the result: back-to-back calls, as in a training loop.
MIN_BATCH_S = 20e-3


# After a run, a library's thread pool may keep spinning: torch's OpenMP workers burn about 10 ms
# of CPU after each parallel region, XLA's pool some too. On a 2-core machine that is a core taken
# from whichever contender runs next (normax's fwd+bwd at 4096x1024 took 2x as long right after a
# torch call as alone). So each run starts once the process has stopped using CPU for a slice.
SETTLE_SLICE_S = 2e-3
SETTLE_MAX_S = 0.05


def settle(cpu_time=time.process_time, sleep=time.sleep, clock=time.perf_counter) -> int:
    """Sleep until no thread of this process used more than a tenth of a slice of CPU during one
    ``SETTLE_SLICE_S`` sleep (at most ``SETTLE_MAX_S``): every contender starts from idle pools.

    Returns the number of slices slept. `cpu_time` (the process's CPU seconds), `sleep` and `clock`
    are injectable so the logic is tested with a scripted meter, not with the machine's scheduler.
    """
    deadline = clock() + SETTLE_MAX_S
    slices = 0
    while clock() < deadline:
        used = cpu_time()
        sleep(SETTLE_SLICE_S)
        slices += 1
        if cpu_time() - used < 0.1 * SETTLE_SLICE_S:
            break
    return slices


def compare(fns: dict, budget_s=0.5, min_runs=5, max_runs=50, *, warmup=1, setup=None) -> dict:
    """``{name: Timing}`` of every contender in `fns`, timed in interleaved runs (A, B, C, A, B, C,
    ...) so a busy moment of a shared machine falls on all of them alike, each run started after
    :func:`settle` so that no contender's spinning pool slows the next one's run.

    Calls under ``MIN_BATCH_S`` are timed in batches. `budget_s` is per contender; `setup()`, if
    given, runs untimed before every call (and every run is then one call).
    """
    calls = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            if setup is not None:
                setup()
            fn()
        if setup is not None:
            calls[name] = 1
        else:
            first = wall_clock(fn, 1) if warmup else None
            calls[name] = 1 if first is None else max(1, min(100_000, int(MIN_BATCH_S / max(first, 1e-9))))
    times = {name: [] for name in fns}
    start = time.perf_counter()
    total_budget = budget_s * len(fns)
    while True:
        runs = len(next(iter(times.values())))
        if runs >= max_runs or (runs >= min_runs and time.perf_counter() - start >= total_budget):
            break
        for name, fn in fns.items():
            if setup is not None:
                setup()
            settle()
            times[name].append(wall_clock(fn, calls[name]) / calls[name])
    result = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        q = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) > 1 else [med, med, med]
        result[name] = Timing(med, (q[2] - q[0]) / med if med > 0 else 0.0, len(ts))
    return result
