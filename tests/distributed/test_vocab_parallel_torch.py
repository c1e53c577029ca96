"""normax.torch.vocab_parallel_cross_entropy / vocab_parallel_linear_cross_entropy over gloo.

Each world size is one spawn of WORLD processes running _worker.py (every case in one process
group, to keep CI time down); a hard timeout kills them, so a hang fails the test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import normax
import pytest

WORKER = Path(__file__).with_name("_worker.py")
TIMEOUT_S = 150


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(world: int, outdir: Path) -> list[dict]:
    env = dict(os.environ)
    # The workers import this checkout's normax, whatever the parent's working directory.
    env["PYTHONPATH"] = os.pathsep.join([str(Path(normax.__file__).parent.parent), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env["NORMAX_NUM_THREADS"] = "1"
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(r), str(world), str(port), str(outdir)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"world {world}: the ranks did not finish within {TIMEOUT_S} s (a hang)")
    for r, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {r} of {world} exited with {p.returncode}:\n{out[-4000:]}"
    return [json.loads((outdir / f"rank{r}.json").read_text()) for r in range(world)]


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


def test_size_classes_pad_little_and_group_near_sizes():
    from normax.torch._vocab_parallel import _MIN_BYTES, _size_class

    sizes = [1, 100, _MIN_BYTES - 1, _MIN_BYTES, _MIN_BYTES + 1, 100_000, 1 << 20, (1 << 20) + 1, 12_345_678]
    for n in sizes:
        c = _size_class(n)
        assert c >= n and c % 8 == 0, (n, c)
        assert c == _MIN_BYTES or c <= n * 1.125, (n, c)
        assert _size_class(c) == c  # a class is its own class
    # Sizes within a class send the same byte count: small payloads all share the first class.
    assert _size_class(12 * 12 + 64) == _size_class(11 * 12 + 64) == _MIN_BYTES
    assert len({_size_class(n) for n in range((1 << 20) + 1, (1 << 21) + 1, 997)}) == 8
