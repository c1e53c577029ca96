"""Spawned ranks for the torch.distributed tests (gloo on CPU, NCCL on a GPU machine): one process
per rank running a worker script, a free localhost port, and a hard timeout so a hang fails the
test instead of blocking CI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import normax
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker: Path, world: int, outdir: Path, timeout_s: float, **env_vars: str) -> list[dict]:
    """Runs `worker RANK WORLD PORT OUTDIR` as `world` processes; returns each rank's
    `OUTDIR/rank{r}.json`, in rank order, once every rank exited with status 0."""
    env = dict(os.environ)
    # The workers import this checkout's normax, whatever the parent's working directory.
    env["PYTHONPATH"] = os.pathsep.join([str(Path(normax.__file__).parent.parent), env.get("PYTHONPATH", "")])
    env.update(env_vars)
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(r), str(world), str(port), str(outdir)],
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
            outputs.append(p.communicate(timeout=timeout_s)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"world {world}: the ranks did not finish within {timeout_s} s (a hang)")
    for r, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {r} of {world} exited with {p.returncode}:\n{out[-4000:]}"
    return [json.loads((outdir / f"rank{r}.json").read_text()) for r in range(world)]
