"""The one timer of the benchmarks: the median of repeated timed calls, on the wall clock or on
CUDA events (``benches/gpu``).

A clock is ``clock(fn, calls) -> seconds`` for ``calls`` back-to-back calls of ``fn``.
"""

from __future__ import annotations

import itertools
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
    """Median seconds per call and the spread of the runs: (75th - 25th percentile) / median.

    `samples` are the runs' seconds per call in the order they ran: for contenders timed together
    by :func:`compare`, the k-th samples of each were timed in the same round.
    """

    median: float
    spread: float
    runs: int
    samples: tuple = ()


# A run of a fast call is a batch of calls lasting at least this long, so what the first call of a
# run pays (waking a sleeping thread pool, reloading data another contender evicted from cache) is
# a small part of it, not the result: back-to-back calls, as in a training loop.
MIN_BATCH_S = 20e-3
# The batch is sized from the fastest of up to this many calls after the warm-up (while they last
# under SIZING_MAX_S in all): the first calls may pay what the loop does not, such as the page
# faults of a heap that grows to hold a fresh output (46 ms for a 0.9 ms softmax of 4096x1024),
# and one such call would make every run a single call straight after settle().
SIZING_CALLS = 3
SIZING_MAX_S = 0.1


def batch_calls(fn, clock=wall_clock) -> int:
    """How many back-to-back calls of fn() make a run of at least ``MIN_BATCH_S``."""
    times = []
    while len(times) < SIZING_CALLS and sum(times) < SIZING_MAX_S:
        times.append(clock(fn, 1))
    return max(1, min(100_000, int(MIN_BATCH_S / max(min(times), 1e-9))))


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


def compare(
    fns: dict,
    budget_s=0.5,
    min_runs=5,
    max_runs=50,
    *,
    warmup=1,
    setup=None,
    before=None,
    clock=wall_clock,
    settle=settle,
    elapsed=time.perf_counter,
) -> dict:
    """``{name: Timing}`` of every contender in `fns`, timed in interleaved rounds (A, B, C, then
    B, C, A, then C, A, B, ...: a busy moment of a shared machine falls on all of them alike, and
    none always runs right after the same other), each run started after :func:`settle` so that no
    contender's spinning pool slows the next one's run.

    A run is a batch of back-to-back calls lasting at least ``MIN_BATCH_S`` (sized by
    :func:`batch_calls` after `warmup` calls), or one call where `setup` or `before` is given.
    `budget_s` is per contender. `setup()` runs untimed before every call, before the settling
    (restoring an input that an in-place call overwrote); `before()` runs untimed right before
    every timed call, after the settling (the situation the call is timed in, such as a torch op
    whose thread pool still spins). `clock`, `settle` and `elapsed` (the budget's clock) are
    injectable so the logic is tested without timing anything.
    """
    names = list(fns)
    calls = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            if setup is not None:
                setup()
            fn()
        one_call = setup is not None or before is not None or not warmup
        calls[name] = 1 if one_call else batch_calls(fn, clock)
    times = {name: [] for name in names}
    start = elapsed()
    total_budget = budget_s * len(names)
    for rnd in itertools.count():
        runs = len(times[names[0]])
        if runs >= max_runs or (runs >= min_runs and elapsed() - start >= total_budget):
            break
        first = rnd % len(names)
        for name in names[first:] + names[:first]:
            fn = fns[name]
            if setup is not None:
                setup()
            settle()
            if before is not None:
                before()
            times[name].append(clock(fn, calls[name]) / calls[name])
    result = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        q = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) > 1 else [med, med, med]
        result[name] = Timing(med, (q[2] - q[0]) / med if med > 0 else 0.0, len(ts), tuple(ts))
    return result


def paired_ratio(numerator: Timing, denominator: Timing) -> float:
    """numerator / denominator time: the median of the rounds' ratios where both were timed in the
    same rounds (a slow moment of the machine slows both runs of a round, and cancels), else the
    ratio of the medians."""
    a, b = numerator.samples, denominator.samples
    if a and len(a) == len(b) and all(t > 0 for t in b):
        return statistics.median(x / y for x, y in zip(a, b))
    return numerator.median / denominator.median
