"""The log-probabilities benchmark (benches/python/logprobs.py) run with --quick: the table holds a
row per case with numbers, its memory notes are filled in, lines fit 100 columns. Timings are not
checked, only what the user reads."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benches" / "python"
sys.path.insert(0, str(BENCH))
bench = pytest.importorskip("logprobs")  # imports torch


def test_quick_run_prints_every_row(capsys):
    assert bench.main(["--quick", "--budget", "0.001", "--runs", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for line in lines:
        assert len(line) <= 100, line
        assert not re.search(r"\b(nan|inf)\b", line), line
    assert lines[0].startswith("machine: ")
    rows = [line for line in lines if re.match(r"(linear_)?logprobs fwd\+bwd ", line)]
    shapes = ["x".join(map(str, s)) for s in (bench.QUICK_LINEAR, bench.QUICK_ROWS)]
    assert [r.split()[-6] for r in rows] == shapes
    for row in rows:
        assert float(row.split()[-5]) > 0 and float(row.split()[-1].rstrip("~")) > 0
    memory = [line for line in lines if line.startswith("    peak extra memory: ")]
    assert len(memory) == 2
    for line in memory:
        assert re.fullmatch(
            r"    peak extra memory: normax [\d.]+ MiB, torch [\d.]+ MiB \([\d.]+%\)", line
        ), line
    assert "== the issue's targets" not in lines  # the quick sizes are not the issue's
