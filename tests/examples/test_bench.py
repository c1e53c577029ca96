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
from report import Case, Table, plot
from timer import SETTLE_MAX_S, SETTLE_SLICE_S, Timing, compare, settle


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


def test_softmax_suite_on_a_tiny_shape_prints_every_case():
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


def test_help_describes_every_option():
    for action in bench.make_parser()._actions:
        assert action.help, action.option_strings
    assert np.isfinite(bench.estimate_s(list(bench.SUITES), 0.5, bench.softmax.DEFAULT_SHAPES))
