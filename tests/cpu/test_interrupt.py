"""Ctrl-C stops a long call (issue 13 item 12).

A fresh interpreter times one uninterrupted call, then starts the same call again and gets
SIGINT 0.3 s in; it must raise KeyboardInterrupt well before the call would have finished (the
parallel loops stop starting tasks; `out=` is left partly written, as NumPy leaves it). Each
scenario runs under a timeout, so a call that ignores the signal fails instead of hanging.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import normax
import pytest

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGINT") or os.name != "posix", reason="POSIX signals")

DELAY = 0.15  # seconds from the call's start to SIGINT
# From SIGINT to KeyboardInterrupt: the issue asks for ~100 ms; the margin is for a loaded CI
# machine (the tasks themselves take a few milliseconds).
LATENCY = 0.25

CHILD = """
import json, signal, sys, time
import numpy as np
import normax

# Python's own Ctrl-C handler, as in an interactive session: a child started from a background job
# inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler at all.
signal.signal(signal.SIGINT, signal.default_int_handler)

op, rows, cols = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])


def arrays(rows):
    x = np.empty((rows, cols), np.float32)  # distinct values, cheap to make
    x[:] = (np.arange(rows, dtype=np.float32)[:, None] % 97) * 0.01
    x += np.arange(cols, dtype=np.float32) * 1e-4
    return x, np.empty_like(x)


x, out = arrays(rows)
w, b = np.ones(cols, np.float32), np.zeros(cols, np.float32)
vocab = np.full((cols, 1024), 0.01, np.float32)
calls = {
    "softmax": lambda x, out: normax.softmax(x, out=out),
    "cross_entropy": lambda x, out: normax.cross_entropy_with_grad(x, np.zeros(len(x), np.int64)),
    "softmax_axis0": lambda x, out: normax.softmax(x, axis=0, out=out),
    "log_softmax_axis0": lambda x, out: normax.log_softmax(x, axis=0, out=out),
    "layer_norm_backward": lambda x, out: normax.layer_norm_backward(x, x, w, b),
    "linear_cross_entropy": lambda x, out: normax.linear_cross_entropy(
        x[:, :1024], vocab, np.zeros(len(x), np.int64)
    ),
}
call = calls[op]
# The whole call's time, estimated from an eighth of it. On a fast machine the call grows (more
# rows, at most 1 GiB an array) until it takes about a second, so SIGINT arrives mid-call.
t0 = time.perf_counter()
call(x[: rows // 8], out[: rows // 8])
estimate = 8 * (time.perf_counter() - t0)
grow = min(int(np.ceil(1.0 / max(estimate, 1e-3))), (1 << 28) // (rows * cols))
if grow > 1:
    rows *= grow
    x, out = arrays(rows)
    estimate *= grow
out[...] = 7.0
print(json.dumps({"start": True}), flush=True)
t0 = time.perf_counter()
try:
    call(x, out)
    print(json.dumps({"finished": time.perf_counter() - t0, "estimate": estimate}), flush=True)
except KeyboardInterrupt:
    elapsed = time.perf_counter() - t0
    print(json.dumps({"interrupted": elapsed, "estimate": estimate, "written": float(np.mean(out != 7.0))}), flush=True)
"""


def _env(threads, isa=None):
    root = os.path.dirname(os.path.dirname(os.path.abspath(normax.__file__)))
    path = os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    env = {k: v for k, v in os.environ.items() if k not in ("NORMAX_NUM_THREADS", "RAYON_NUM_THREADS")}
    env.update(PYTHONPATH=path, NORMAX_NUM_THREADS=str(threads))
    env.pop("NORMAX_ISA", None)
    if isa:
        env["NORMAX_ISA"] = isa
    return env


def _interrupt(op, threads, isa, rows, cols):
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CHILD), op, str(rows), str(cols)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(threads, isa),
    )
    try:
        assert json.loads(proc.stdout.readline()) == {"start": True}, proc.stderr.read()
        time.sleep(DELAY)
        proc.send_signal(signal.SIGINT)
        result = json.loads(proc.stdout.readline())
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 or "finished" in result, proc.stderr.read()
    return result


# Calls of 0.6-8 s here (2 shared cores), long enough without a lot of memory: the scalar ISA on
# one thread for the contiguous paths (each task a block of rows), the strided softmax (column
# blocks; scalar too: the vectorized column kernels finish 8192x8192 in about 0.3 s), the norm backward (column sums through threads::map), the cross-entropy, and the
# linear cross-entropy (GEMMs inside the pool). At most 512 MiB per array.
@pytest.mark.parametrize(
    "op, threads, isa, rows, cols",
    [
        ("softmax", 1, "scalar", 8192, 8192),
        ("softmax_axis0", 1, "scalar", 8192, 8192),
        ("log_softmax_axis0", 2, "scalar", 8192, 8192),
        ("layer_norm_backward", 1, "scalar", 16384, 8192),
        ("cross_entropy", 1, "scalar", 16384, 8192),
        ("linear_cross_entropy", 2, None, 4096, 32768),
    ],
)
def test_ctrl_c_stops_a_long_call(op, threads, isa, rows, cols):
    result = _interrupt(op, threads, isa, rows, cols)
    assert "interrupted" in result, (
        f"the call ran to the end ({result}) instead of raising KeyboardInterrupt; if it took "
        f"under {DELAY} s, this machine needs a larger call"
    )
    if op == "linear_cross_entropy":
        # It stops between its GEMMs (one block of logits: 0.5-1 s on 2 loaded cores), never
        # inside the gemm crate's product: checked against the whole call instead.
        assert result["interrupted"] < result["estimate"] / 3, result
    else:
        assert result["interrupted"] < DELAY + LATENCY, result
        assert result["interrupted"] < result["estimate"] / 2, result
    if "softmax" in op:
        assert 0.0 < result["written"] < 1.0, result  # out= partly written, as NumPy leaves it


def test_small_calls_and_other_handlers_are_left_alone():
    # A custom SIGINT handler (which may not raise) is never bypassed: the call runs to the end
    # and the handler runs once, after it.
    code = textwrap.dedent(
        """
        import signal, time, numpy as np, normax
        hits = []
        signal.signal(signal.SIGINT, lambda *a: hits.append(time.perf_counter()))
        x = np.zeros((4096, 4096), np.float32)
        ref = normax.softmax(x, axis=0)
        import os, threading
        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()
        t0 = time.perf_counter()
        for _ in range(20):
            y = normax.softmax(x, axis=0)
        assert np.array_equal(y, ref)
        time.sleep(0.1)
        print(len(hits))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, env=_env(2), timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"
