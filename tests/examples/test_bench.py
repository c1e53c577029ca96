"""The peer benchmark (benches/python/bench.py): its table fits 100 columns with no nan or ?
cells, tiny cases are measured, the plot has a row per suite. Run on tiny inputs: timings are not
checked, only what the user reads."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "benches" / "python"
sys.path.insert(0, str(BENCH))
bench = pytest.importorskip("bench")  # imports the suites (torch and JAX where installed)
from report import AFTER_TORCH, Case, Table, plot
from timer import (
    MIN_BATCH_S,
    SETTLE_MAX_S,
    SETTLE_SLICE_S,
    SIZING_CALLS,
    Timing,
    batch_calls,
    compare,
    paired_ratio,
    settle,
)


def _line_ok(line):
    assert len(line) <= 100, line
    assert "nan" not in line and "?" not in line and "inf" not in line, line


def test_compare_interleaves_and_reports_spread():
    order = []
    t = compare({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, 0.0, min_runs=3, max_runs=3)
    assert set(t) == {"a", "b"} and all(v.runs == 3 and v.spread >= 0 and v.median > 0 for v in t.values())
    # After the warm-up and batch-sizing calls, runs alternate: a batch of a, then a batch of b.
    tail = order[order.index("b") :]
    assert "a" in tail[tail.index("b") :]


class _ScriptedClock:
    """A clock for compare(): runs the calls and says each took `seconds(name, k)` (k counts the
    clock's uses of that contender), logging what ran; `elapsed` advances by what was timed."""

    def __init__(self, seconds, log):
        self.seconds, self.log, self.uses, self.now = seconds, log, {}, 0.0

    def __call__(self, fn, calls=1):
        for _ in range(calls):
            fn()
        name = fn.__name__
        k = self.uses[name] = self.uses.get(name, -1) + 1
        self.log.append(f"timed {name} x{calls}")
        took = self.seconds(name, k) * calls
        self.now += took
        return took

    def elapsed(self):
        return self.now


def _contenders(log, *names):
    fns = {}
    for name in names:

        def fn(name=name):
            log.append(name)

        fn.__name__ = name
        fns[name] = fn
    return fns


def test_a_batch_is_sized_from_the_fastest_call_not_a_slow_first_one():
    """A first call that pays page faults (46 ms for a 0.9 ms softmax) must not make every run one
    call: the batch comes from the fastest of the sizing calls."""
    times = iter([46e-3, 0.9e-3, 1.0e-3])
    clock = _ScriptedClock(lambda name, k: next(times), [])
    (fn,) = _contenders([], "normax").values()
    assert batch_calls(fn, clock) == int(MIN_BATCH_S / 0.9e-3)
    assert clock.uses["normax"] == SIZING_CALLS - 1


def test_sizing_a_long_call_stops_early():
    clock = _ScriptedClock(lambda name, k: 0.5, [])
    (fn,) = _contenders([], "slow").values()
    assert batch_calls(fn, clock) == 1 and clock.uses["slow"] == 0  # one call, already over the limit


def test_compare_rotates_the_order_and_keeps_the_rounds_samples():
    log = []
    clock = _ScriptedClock(lambda name, k: {"a": 1e-3, "b": 2e-3, "c": 4e-3}[name], log)
    fns = _contenders([], "a", "b", "c")  # their calls unlogged: a batch is many
    t = compare(
        fns,
        0.0,
        min_runs=3,
        max_runs=3,
        clock=clock,
        settle=lambda: log.append("settle"),
        elapsed=clock.elapsed,
    )
    rounds = log[log.index("settle") :]
    # Each run: settle, then its batch (20 ms / 1 ms = 20 calls of a), timed as one.
    runs = [rounds[i : i + 2] for i in range(0, len(rounds), 2)]
    assert [run[0] for run in runs] == ["settle"] * 9
    assert [run[1] for run in runs] == [
        f"timed {n} x{int(MIN_BATCH_S / t)}"
        for n, t in zip("abcbcacab", [1e-3, 2e-3, 4e-3, 2e-3, 4e-3, 1e-3, 4e-3, 1e-3, 2e-3])
    ]
    assert t["b"].samples == (2e-3,) * 3 and t["c"].median == 4e-3 and t["a"].runs == 3
    assert paired_ratio(t["c"], t["a"]) == pytest.approx(4.0)


def test_before_runs_right_before_every_timed_call_and_each_run_is_one_call():
    log = []
    clock = _ScriptedClock(lambda name, k: 1e-4, log)
    fns = _contenders(log, "normax", "torch")
    compare(
        fns,
        0.0,
        min_runs=2,
        max_runs=2,
        before=lambda: log.append("torch op"),
        clock=clock,
        settle=lambda: log.append("settle"),
        elapsed=clock.elapsed,
    )
    runs = log[log.index("settle") :]
    # Each run: settle, the torch op, then one call, timed (the clock logs after the call ran).
    order = ["normax", "torch", "torch", "normax"]  # the second round starts with the second
    assert runs == [e for n in order for e in ("settle", "torch op", n, f"timed {n} x1")]


def test_compare_stops_at_the_budget_once_it_has_min_runs():
    clock = _ScriptedClock(lambda name, k: 0.1, [])
    fns = _contenders([], "a", "b")
    t = compare(
        fns, 0.25, min_runs=2, max_runs=50, warmup=0, clock=clock, settle=lambda: None, elapsed=clock.elapsed
    )
    # Every round costs 0.2 s of the two contenders' 0.5 s: the budget is spent after three rounds.
    assert t["a"].runs == t["b"].runs == 3


def test_paired_ratio_cancels_a_slow_round():
    normax = Timing(1.0, 0.0, 3, (1.0, 3.0, 1.0))
    torch = Timing(2.0, 0.0, 3, (2.0, 6.0, 2.0))
    assert paired_ratio(torch, normax) == 2.0
    # Without rounds in common: the ratio of the medians.
    assert paired_ratio(Timing(3.0, 0.0, 1), normax) == 3.0


class _ScriptedMachine:
    """A clock and a CPU meter for settle(): each sleep advances the clock by its length and, while
    `spinning_slices` remain, the CPU meter by the same (one thread spinning through the sleep)."""

    def __init__(self, spinning_slices):
        self.now = self.cpu = 0.0
        self.spinning_slices = spinning_slices
        self.sleeps = 0

    def clock(self):
        return self.now

    def cpu_time(self):
        return self.cpu

    def sleep(self, seconds):
        self.sleeps += 1
        self.now += seconds
        if self.spinning_slices > 0:
            self.spinning_slices -= 1
            self.cpu += seconds


def _settle(machine):
    return settle(cpu_time=machine.cpu_time, sleep=machine.sleep, clock=machine.clock)


def test_settle_waits_for_a_spinning_thread_to_stop():
    """A contender's pool that spins on after its call (torch's OpenMP workers do, for about 10 ms)
    must not run into the next contender's timed run: settle() returns only once it stopped."""
    machine = _ScriptedMachine(spinning_slices=5)
    assert _settle(machine) == 6  # five busy slices, then the first idle one
    assert machine.spinning_slices == 0


def test_settle_returns_after_one_slice_when_nothing_spins():
    machine = _ScriptedMachine(spinning_slices=0)
    assert _settle(machine) == 1 and machine.now == SETTLE_SLICE_S


def test_settle_gives_up_at_its_limit_when_a_thread_never_stops():
    machine = _ScriptedMachine(spinning_slices=10**6)
    slices = _settle(machine)
    assert slices == math.ceil(SETTLE_MAX_S / SETTLE_SLICE_S - 1e-9)
    assert SETTLE_MAX_S <= machine.now < SETTLE_MAX_S + SETTLE_SLICE_S


def test_a_case_after_a_torch_op_is_labelled_by_its_situation():
    table = Table(("torch",), 20, 40.0, 32 << 20)
    t = Timing(1e-3, 0.01, 50)
    settled = Case("softmax", "softmax", (4096, 1024), 8 << 22, t, {"torch": t})
    after = Case("softmax", "softmax", (4096, 1024), 8 << 22, t, {"torch": t}, situation=AFTER_TORCH)
    assert table.row(settled).startswith("softmax ")
    assert table.row(after).startswith(f"  {AFTER_TORCH} ")


def test_the_cache_resident_shapes_are_also_timed_after_a_torch_op():
    after = [shape for shape in bench.softmax.DEFAULT_SHAPES if bench.softmax.after_torch(shape)]
    assert after == [(4096, 1024), (32, 128256)]


@pytest.mark.parametrize("module", list(bench.SUITES.values()), ids=list(bench.SUITES))
def test_table_fits_100_columns_for_the_longest_rows(module):
    table = Table(module.PEERS, module.OP_WIDTH, 40.0, 32 << 20)
    slow, noisy = Timing(123.456, 0.0, 5), Timing(1e-6, 2.0, 5)
    case = Case("s", "x" * module.OP_WIDTH, (8192, 1024, 32768), 0, noisy, {p: slow for p in module.PEERS})
    for line in (table.header() + "\n" + table.row(case)).splitlines():
        _line_ok(line)
    assert "~" in table.row(case)  # the noisy ratio is marked


def test_a_single_run_has_no_spread_and_its_ratio_is_marked():
    table = Table(("torch",), 30, 40.0, 32 << 20)
    once = Timing(10.0, 0.0, 1)
    row = table.row(Case("s", "linear", (8, 8, 8), 0, once, {"torch": once}))
    assert row.split()[2:4] == ["10000", "-"] and row.endswith("1.00~")


def test_softmax_suite_on_a_tiny_shape_prints_every_case(monkeypatch):
    # What the user reads, not timings: 3 short runs per contender, no settling between them.
    import timer

    def brief(fns, budget_s, **kwargs):
        return compare(fns, budget_s, **{**kwargs, "min_runs": 3, "max_runs": 3}, settle=lambda: None)

    monkeypatch.setattr(timer, "MIN_BATCH_S", 1e-3)
    monkeypatch.setattr(bench.softmax, "compare", brief)
    shapes = [(8, 16)]
    copy = 10.0
    table = Table(bench.softmax.PEERS, bench.softmax.OP_WIDTH, copy, 32 << 20)
    cases = list(bench.softmax.suite(0.001, shapes))
    assert len(cases) == bench.softmax.count(shapes)
    for case in cases:
        assert case.normax.median > 0 and all(t.median > 0 for t in case.peers.values())
        assert "np.exp" not in case.peers  # a yardstick, not a peer
        for line in table.row(case).splitlines():
            _line_ok(line)
    first = cases[0]
    assert first.op == "softmax" and "np.exp on the same array" in first.yardsticks


def test_plot_has_a_row_per_suite(tmp_path):
    pytest.importorskip("matplotlib")
    t = Timing(1e-3, 0.01, 5)
    cases = [
        Case("softmax", "softmax", (16384, 4096), 8 << 26, t, {"torch": Timing(3e-3, 0.2, 5)}),
        Case("norms", "rms_norm", (4096, 1024), 8 << 22, t, {"torch": t, "jax": t}),
    ]
    path = tmp_path / "bench.png"
    plot(cases, 40.0, 32 << 20, str(path))
    import matplotlib.image

    height, width = matplotlib.image.imread(str(path)).shape[:2]
    assert width == 1500 and height >= 400  # 15 inches at 100 dpi, two rows


def test_the_load_line_warns_when_the_machine_is_busier_than_its_cores():
    quiet, busy = bench.load_line("at the start", 0.5, 2), bench.load_line("at the end", 4.0, 2)
    assert quiet == "load at the start: 0.5 on 2 CPUs"
    assert busy.startswith("load at the end: 4.0 on 2 CPUs (") and "not results" in busy
    _line_ok(busy)


def test_help_describes_every_option():
    for action in bench.make_parser()._actions:
        assert action.help, action.option_strings
    assert np.isfinite(bench.estimate_s(list(bench.SUITES), 0.5, bench.softmax.DEFAULT_SHAPES))
