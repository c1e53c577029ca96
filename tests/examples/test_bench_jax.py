"""The JAX benchmark (benches/python/bench_jax.py) run with --quick: every table is printed, every
row holds numbers, lines fit 100 columns, the targets are listed as met or missed. Timings are not
checked, only what the user reads."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benches" / "python"
sys.path.insert(0, str(BENCH))
bench_jax = pytest.importorskip("bench_jax")  # imports jax


def test_quick_run_prints_every_table(capsys):
    assert bench_jax.main(["--quick", "--budget", "0.001"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for line in lines:
        assert len(line) <= 100, line
        assert not re.search(r"\b(nan|inf)\b", line), line
    assert lines[0].startswith("machine: ") and "jax on cpu" in lines[0]
    assert any(line.startswith("normax.jax route: ") for line in lines)

    # Part 1: one row per op, four numbers each; the overhead is normax.jax minus the kernel.
    start = lines.index(next(line for line in lines if line.startswith("== call cost per op at 8x64")))
    cost_rows = lines[start + 3 : start + 7]
    assert [row.split()[0] for row in cost_rows] == ["softmax", "log_softmax", "logsumexp", "cross_entropy"]
    for row in cost_rows:
        ours, kernel, overhead, theirs = map(float, row.split()[1:])
        assert min(ours, kernel, theirs) > 0 and overhead == pytest.approx(ours - kernel, abs=0.02)

    # Part 2 and 3: a row per op and quick shape, then the linear case with its memory note.
    part2 = lines[lines.index("== normax.jax vs jax") :]
    rows = [line for line in part2 if re.match(r"(softmax|logsumexp|CE value_and_grad|linear CE) ", line)]
    shapes = ["x".join(map(str, s)) for s in bench_jax.QUICK_SHAPES]
    expected = [(op, s) for s in shapes for op in ("softmax", "logsumexp", "CE value_and_grad")]
    expected.append(("linear CE value_and_grad", "x".join(map(str, bench_jax.QUICK_LINEAR))))
    assert [(r[: bench_jax.OP_WIDTH].strip(), r.split()[-6]) for r in rows] == expected
    for row in rows:
        assert float(row.split()[-5]) > 0  # normax ms
        assert float(row.split()[-1].rstrip("~")) > 0  # xjax
    memory = lines[lines.index(rows[-1]) + 1]
    assert re.fullmatch(
        r"    memory \(temp \+ output\): normax [\d.]+ MiB, jnp [\d.]+ MiB \([\d.]+%\)", memory
    )

    # The targets: the 8x64 ones apply to a quick run (its other sizes are not the issue's).
    tail = lines[lines.index("== the issue's targets") + 1 :]
    assert len(tail) == 4 + 3 and all(re.match(r"  (met |miss)  ", line) for line in tail)
