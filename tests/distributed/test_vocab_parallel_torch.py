"""normax.torch.vocab_parallel_cross_entropy / vocab_parallel_linear_cross_entropy over gloo.

Each world size is one spawn of WORLD processes running _worker.py (every case in one process
group, to keep CI time down); a hard timeout kills them, so a hang fails the test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import ranks

WORKER = Path(__file__).with_name("_worker.py")
TIMEOUT_S = 150


def spawn(world: int, outdir: Path) -> list[dict]:
    return ranks.spawn(WORKER, world, outdir, TIMEOUT_S, OMP_NUM_THREADS="1", NORMAX_NUM_THREADS="1")


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_vocab_parallel_gloo(world, tmp_path):
    results = spawn(world, tmp_path)
    failures = [f for r in results for f in r["failures"]]
    assert not failures, "\n".join(failures[:40])
    # Every case ran on every rank, and the losses are bit-identical across the ranks.
    names = set(results[0]["losses"])
    assert len(names) >= 40
    for r in results[1:]:
        assert r["losses"] == results[0]["losses"]

