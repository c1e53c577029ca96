"""normax.jax.vocab_parallel_cross_entropy under shard_map on a 4-device CPU mesh: loss, jax.grad
and jax.jvp equal to the unsharded normax.jax.cross_entropy's, the collectives counted, the FFI
route against the fallback where the extension has it, pmap, bfloat16 shards. XLA_FLAGS must be
set before jax is imported, so the check runs in a fresh process (_jax_worker.py), with a
timeout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import normax


def test_vocab_parallel_jax_shard_map():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(normax.__file__).parent.parent), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("_jax_worker.py"))],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert out.stdout.strip().endswith("ok")
