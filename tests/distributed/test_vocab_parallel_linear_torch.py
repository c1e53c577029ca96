"""normax.torch.vocab_parallel_linear_cross_entropy's logits budget and
normax.torch.vocab_parallel_linear_logprobs over gloo (one spawn of WORLD processes running
_linear_worker.py per world size; a hard timeout kills them, so a hang fails the test)."""

from __future__ import annotations

from pathlib import Path

import pytest
import ranks

WORKER = Path(__file__).with_name("_linear_worker.py")
TIMEOUT_S = 150


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_vocab_parallel_linear_gloo(world, tmp_path):
    results = ranks.spawn(WORKER, world, tmp_path, TIMEOUT_S, OMP_NUM_THREADS="1", NORMAX_NUM_THREADS="1")
    failures = [f for r in results for f in r["failures"]]
    assert not failures, "\n".join(failures[:40])
    # Every case ran on every rank, and the results are bit-identical across the ranks.
    names = set(results[0]["losses"])
    assert len(names) >= 70
    for r in results[1:]:
        assert r["losses"] == results[0]["losses"]
