"""The thread pool across fork (issue 13 item 1) and the bound on the thread count (item 2).

Fork: once the parent has run a multi-threaded call, its pool threads do not exist in a child
made by fork(); the child must rebuild the pool instead of waiting on it forever. Each scenario
runs in its own interpreter under a timeout (a hang fails the test rather than the CI job), and
every child compares what it computes with the parent's result.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import normax
import pytest

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")

TIMEOUT = 120  # seconds for a whole scenario; each runs in well under 10


def _env(**extra):
    """The environment of a child interpreter that imports this process's normax."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(normax.__file__)))
    path = os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    env = {k: v for k, v in os.environ.items() if k not in ("NORMAX_NUM_THREADS", "RAYON_NUM_THREADS")}
    env.update(PYTHONPATH=path, **extra)
    return env


def _run(code, timeout=TIMEOUT, **env):
    """Runs `code` in a fresh interpreter in its own session; on a timeout kills the whole group
    (forked children included) and fails."""
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"hung for {timeout} s (a forked child waiting on the parent's pool?)\n{out}\n{err}")
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{out}\nstderr:\n{err}"
    return out, err


# Shared by the scenarios: wait for a child with a deadline, killing it when it hangs.
PRELUDE = """
import os, signal, sys, time
import numpy as np
import normax

def wait(pid, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    sys.exit(f"child {pid} hung")

def big(seed, shape=(512, 1024)):
    return np.random.default_rng(seed).normal(0, 3, shape).astype(np.float32)

normax.set_num_threads(2)  # multi-threaded even on a one-CPU machine
"""


def test_fork_after_multithreaded_call():
    """The issue's reproducer, then: a child that changes the thread count, and a grandchild
    forked from a child that rebuilt its pool."""
    _run(
        PRELUDE
        + """
x = big(0)
want = normax.softmax(x)
want_ce = normax.cross_entropy(x, np.arange(512) % 1024, reduction="none")

def child_work():
    ok = np.array_equal(normax.softmax(x), want)
    ok &= np.array_equal(normax.cross_entropy(x, np.arange(512) % 1024, reduction="none"), want_ce)
    ok &= normax.get_num_threads() == 2
    normax.set_num_threads(3)
    ok &= np.array_equal(normax.softmax(x), want) and normax.get_num_threads() == 3
    return ok

pid = os.fork()
if pid == 0:
    ok = child_work()
    grandchild = os.fork()
    if grandchild == 0:
        os._exit(0 if np.array_equal(normax.softmax(x), want) else 3)
    ok &= wait(grandchild) == 0
    os._exit(0 if ok else 3)
assert wait(pid) == 0, "child failed"
# The parent's pool is untouched.
assert np.array_equal(normax.softmax(x), want)
print("ok")
"""
    )


def test_multiprocessing_fork_pool():
    """multiprocessing.Pool with the 'fork' start method (Linux's default before 3.14, and what
    DataLoader workers use)."""
    _run(
        PRELUDE
        + """
import multiprocessing as mp

def work(seed):
    return normax.log_softmax(big(seed)), normax.rms_norm(big(seed), np.ones(1024, np.float32))

if __name__ == "__main__":
    want = [work(s) for s in range(6)]  # multi-threaded calls in the parent first
    with mp.get_context("fork").Pool(2) as pool:
        got = pool.map_async(work, range(6)).get(timeout=60)
    for (a, b), (c, d) in zip(want, got):
        assert np.array_equal(a, c) and np.array_equal(b, d)
    print("ok")
"""
    )


def test_fork_while_another_thread_is_inside_a_call():
    """A Python thread keeps running long multi-threaded calls (the GIL released) while the main
    thread forks, several times: each child computes on a fresh pool."""
    out, _ = _run(
        PRELUDE
        + """
import threading

x = big(1)
want = normax.softmax(x)
long = big(2, (1024, 8192))
want_long = normax.softmax(long)
stop = threading.Event()
calls = [0]

def busy():
    while not stop.is_set():
        normax.softmax(long)
        calls[0] += 1

t = threading.Thread(target=busy)
t.start()
while calls[0] == 0:
    time.sleep(0.001)
failures = 0
for i in range(6):
    time.sleep(0.003 * (i + 1))  # land at different points of the background call
    pid = os.fork()
    if pid == 0:
        ok = np.array_equal(normax.softmax(x), want) and np.array_equal(normax.softmax(long), want_long)
        os._exit(0 if ok else 3)
    failures += wait(pid) != 0
stop.set()
t.join()
assert failures == 0, f"{failures} children failed"
assert np.array_equal(normax.softmax(long), want_long)
print("ok", calls[0])
"""
    )
    assert out.startswith("ok")


# ---------------------------------------------------------------------------------------------
# The bound on the thread count


def _max_threads():
    with pytest.raises(ValueError, match=r"^n must be at most \d+") as e:
        normax.set_num_threads(10**6)
    return int(re.search(r"at most (\d+)", str(e.value)).group(1))


def test_set_num_threads_is_bounded(num_threads):
    start = time.perf_counter()
    for too_many in (10**6, 2**40, 2**63 - 1, 2**63, 2**70, 10**100):
        with pytest.raises(ValueError, match=r"n must be at most \d+ .*logical CPUs\), got "):
            normax.set_num_threads(too_many)
    for too_few in (0, -1, -(2**63), -(2**70)):
        with pytest.raises(ValueError, match="n must be at least 1"):
            normax.set_num_threads(too_few)
    with pytest.raises(TypeError):
        normax.set_num_threads(2.0)
    assert time.perf_counter() - start < 1.0  # refused at once, no thread started
    assert normax.get_num_threads() == num_threads
    most = _max_threads()
    assert most >= 1024
    # The maximum itself is accepted (and starts nothing until a call).
    start = time.perf_counter()
    normax.set_num_threads(most)
    assert normax.get_num_threads() == most
    normax.set_num_threads(num_threads)
    assert time.perf_counter() - start < 1.0
    with pytest.raises(ValueError):
        normax.set_num_threads(most + 1)


@pytest.mark.parametrize("var", ["NORMAX_NUM_THREADS", "RAYON_NUM_THREADS"])
def test_environment_thread_count_is_bounded(var):
    """A count above the maximum is clamped to it with a RuntimeWarning at import (as OpenBLAS and
    numexpr clamp theirs); 0 means the CPU count; garbage is ignored with a warning."""
    code = """
import warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import normax
print(normax.get_num_threads())
try:
    normax.set_num_threads(10**9)
except ValueError as e:
    print(e)
for w in caught:
    print(w.category.__name__, w.message)
"""
    most = _max_threads()
    for value in ("1000000", str(2**40), "9" * 30):
        out, _ = _run(code, timeout=60, **{var: value})
        lines = out.splitlines()
        assert int(lines[0]) == most, out
        assert f"at most {most}" in lines[1]
        assert "RuntimeWarning" in out and var in out and f"using {most}" in out, out
    out, _ = _run(code, timeout=60, **{var: "3"})
    assert out.splitlines()[0] == "3" and "Warning" not in out, out
    out, _ = _run(code, timeout=60, **{var: "many"})
    assert "RuntimeWarning" in out and "ignoring" in out and var in out, out


def test_normax_num_threads_takes_precedence():
    out, _ = _run(
        "import normax; print(normax.get_num_threads())",
        timeout=60,
        NORMAX_NUM_THREADS="3",
        RAYON_NUM_THREADS="5",
    )
    assert out.strip() == "3"
