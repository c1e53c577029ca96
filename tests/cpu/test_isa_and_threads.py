"""The run-time configuration: ISA selection (set_isa, NORMAX_ISA) and threads (results that do not
depend on the thread count, concurrent Python threads), and the long rows split across threads.
"""

from __future__ import annotations

import concurrent.futures
import os

import normax
import numpy as np
import pytest
from accuracy import UNIT_ROUNDOFF, rel_error, scaled_error

from .softmax_reference import (
    BACKWARD_C,
    F32,
    F64,
    TINY,
    log_scale,
    log_softmax_grad_ref,
    reference,
    rng_for,
    softmax_grad_ref,
)

# ---------------------------------------------------------------------------------------------
# ISA selection


def test_set_isa_accepts_supported_and_rejects_others(isa):
    supported = normax.supported_isas()
    assert supported[0] == "scalar" and set(supported) <= {"scalar", "avx2", "avx512"}
    for name in ("scalar", "avx2", "avx512"):
        if name in supported:
            normax.set_isa(name)
            assert normax.get_isa() == name
        else:  # this CPU lacks it: refused, and the active path is unchanged
            before = normax.get_isa()
            with pytest.raises(ValueError):
                normax.set_isa(name)
            assert normax.get_isa() == before
    with pytest.raises(ValueError):
        normax.set_isa("sse9")


def test_isa_paths_agree(isa):
    """Every path computes the same function: each is within tolerance of the reference (checked
    above), hence within twice that of the others; here against the scalar path directly."""
    x = rng_for("agree").normal(0, 5, (7, 300)).astype(np.float32)
    got = [normax.softmax(x), normax.log_softmax(x), normax.logsumexp(x)]
    normax.set_isa("scalar")
    ref = [normax.softmax(x), normax.log_softmax(x), normax.logsumexp(x)]
    np.testing.assert_allclose(got[0], ref[0], rtol=2e-6, atol=0)
    np.testing.assert_allclose(got[1], ref[1], rtol=0, atol=2e-6 * 30)
    np.testing.assert_allclose(got[2], ref[2], rtol=2e-6)


@pytest.mark.parametrize("name", normax.supported_isas())
def test_normax_isa_environment_variable(name):
    """NORMAX_ISA forces a path at import; an unknown name fails the import loudly."""
    import subprocess
    import sys

    code = "import normax; print(normax.get_isa())"
    # The child imports the same normax as this process, wherever that came from.
    root = os.path.dirname(os.path.dirname(os.path.abspath(normax.__file__)))
    path = os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    env = dict(os.environ, NORMAX_ISA=name, PYTHONPATH=path)
    run = [sys.executable, "-c", code]
    out = subprocess.run(run, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == name
    env["NORMAX_ISA"] = "bogus"
    bad = subprocess.run(run, env=env, capture_output=True, text=True, check=False)
    assert bad.returncode != 0 and "bogus" in bad.stderr


# ---------------------------------------------------------------------------------------------
# Threads


def test_num_threads_round_trip(num_threads):
    for n in (1, 2, 3, num_threads):
        normax.set_num_threads(n)
        assert normax.get_num_threads() == n
    for bad in (0, -1):
        with pytest.raises(ValueError):
            normax.set_num_threads(bad)
    assert normax.get_num_threads() == num_threads


def _all_ops(x, dy):
    y = normax.softmax(x)
    ly = normax.log_softmax(x)
    return [
        y,
        ly,
        normax.logsumexp(x),
        normax.softmax_backward(y, dy),
        normax.log_softmax_backward(ly, dy),
        normax.logsumexp(x, b=dy, return_sign=True),
    ]


def _assert_identical(a, b, what):
    for i, (u, v) in enumerate(zip(a, b)):
        np.testing.assert_array_equal(u, v, err_msg=f"{what}: op {i}")


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("shape", [(3_000_000,), (3, 300_000), (4, 300_000), (2000, 700)], ids=str)
def test_one_and_two_threads_identical(num_threads, dtype, shape):
    """Long rows are split across threads in fixed chunks (the driver's SPLIT_CHUNK, "fixed, so
    results do not depend on the thread count"), so the result must not depend on the thread
    count; many rows are independent. Few long rows (3, 4) are where the split decision itself
    could depend on the thread count."""
    rng = rng_for("threads", str(dtype), shape)
    x = rng.normal(0, 5, shape).astype(dtype)
    dy = rng.normal(0, 1, shape).astype(dtype)
    normax.set_num_threads(1)
    one = _all_ops(x, dy)
    normax.set_num_threads(2)
    two = _all_ops(x, dy)
    _assert_identical(one, two, f"{shape} 1 vs 2 threads")
    normax.set_num_threads(3)
    _assert_identical(one, _all_ops(x, dy), f"{shape} 1 vs 3 threads")


def test_concurrent_python_threads_match_serial(num_threads):
    normax.set_num_threads(2)
    rng = rng_for("concurrent")
    jobs = []
    for i in range(16):
        shape = [(64, 257), (300_000,), (9, 31, 5), (1, 4097)][i % 4]
        dtype = (np.float32, np.float64)[i % 2]
        jobs.append((rng.normal(0, 5, shape).astype(dtype), rng.normal(0, 1, shape).astype(dtype)))
    serial = [_all_ops(x, dy) for x, dy in jobs]
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(2):
            parallel = list(pool.map(lambda j: _all_ops(*j), jobs))
            for i, (s, p) in enumerate(zip(serial, parallel)):
                _assert_identical(s, p, f"job {i}")



def test_overlap_check_sees_only_its_own_call(monkeypatch):
    """Two threads each calling ``softmax(a, out=a)`` on one array: the second is not refused as
    if its own arguments overlapped ("shares memory with another argument of this call").

    The interleaving is forced, not timed: a main-thread call of 2**22 elements asks Python for
    the SIGINT handler (``signal.getsignal``, interrupt.rs) with its arrays already taken for the
    call, and this test's stand-in for getsignal runs the second thread's whole call right then.
    So the calls run one after the other, the other thread's first: a = softmax(softmax(a0)).
    """
    import signal
    import threading

    a0 = np.random.default_rng(21).normal(0, 3, (1024, 4096)).astype(np.float32)
    a = a0.copy()
    errors, inside = [], []
    getsignal = signal.getsignal

    def second_call():
        try:
            normax.softmax(a, out=a)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    def getsignal_running_another_call(signum):
        if not inside:  # the main thread's call, inside the binding
            inside.append(True)
            other = threading.Thread(target=second_call)
            other.start()
            other.join()
        return getsignal(signum)

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("the binding asks for the SIGINT handler on the main thread only")
    monkeypatch.setattr(signal, "getsignal", getsignal_running_another_call)
    assert normax.softmax(a, out=a) is a
    monkeypatch.undo()
    if not inside:  # pytest.fail, not an AssertionError: never taken for the expected failure
        pytest.fail("the binding no longer asks for the SIGINT handler: force the interleaving another way")
    assert not errors, errors
    np.testing.assert_allclose(a, normax.softmax(normax.softmax(a0)), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# A long single row: the split-row path


LONG = 2**22 + 3


@pytest.fixture(scope="module")
def long_row():
    x = np.random.default_rng(2024).normal(0, 5, LONG).astype(np.float32)
    return x, reference(x)


def test_long_row_float32_vs_float64(isa, num_threads, long_row):
    normax.set_num_threads(2)  # split across threads (rows this long always are with > 1 thread)
    x, (sm, lsm, lse) = long_row
    assert rel_error(normax.softmax(x), sm, TINY[F32]) <= 1e-6
    assert scaled_error(normax.log_softmax(x), lsm, log_scale(lsm, lse)) <= 1e-6
    assert scaled_error(normax.logsumexp(x, keepdims=True), lse, np.maximum(1, np.abs(lse))) <= 1e-6
    # The backwards on the same long row (their sums are chunked the same way).
    dy = np.random.default_rng(2025).normal(0, 1, LONG).astype(np.float32)
    y, ly = normax.softmax(x), normax.log_softmax(x)
    for f, ref_f, yy in (
        (normax.softmax_backward, softmax_grad_ref, y),
        (normax.log_softmax_backward, log_softmax_grad_ref, ly),
    ):
        ref, bound = ref_f(yy, dy, -1)
        err = np.abs(f(yy, dy).astype(np.float64) - ref) - BACKWARD_C * UNIT_ROUNDOFF[F32] * bound
        assert np.max(err) <= 0, f.__name__
    # One thread: the same values (results do not depend on the thread count).
    normax.set_num_threads(1)
    assert rel_error(normax.softmax(x), sm, TINY[F32]) <= 1e-6
    assert scaled_error(normax.logsumexp(x, keepdims=True), lse, np.maximum(1, np.abs(lse))) <= 1e-6


def test_long_strided_rows(num_threads):
    """Rows of 2**18 + 5 along axis 0 (gathered, and long enough to be chunked): accurate, and the
    same for every thread count."""
    x = rng_for("long_strided").normal(0, 5, (2**18 + 5, 3)).astype(np.float32)
    sm, lsm, lse = reference(x, 0)
    results = []
    for threads in (1, 2, 3):
        normax.set_num_threads(threads)
        y, ly = normax.softmax(x, axis=0), normax.log_softmax(x, axis=0)
        l = normax.logsumexp(x, axis=0, keepdims=True)
        assert rel_error(y, sm, TINY[F32]) <= 1e-6
        assert scaled_error(ly, lsm, log_scale(lsm, lse)) <= 1e-6
        assert scaled_error(l, lse, np.maximum(1, np.abs(lse))) <= 1e-6
        results.append((y, ly, l))
    for other in results[1:]:
        _assert_identical(results[0], other, "axis=0, 1 vs more threads")


@pytest.mark.parametrize(
    "value, expect_nan, lse_expect",
    [(np.nan, True, np.nan), (np.inf, True, np.inf), (1e30, False, 1e30), (-np.inf, False, None)],
    ids=["nan", "inf", "huge", "neg_inf"],
)
def test_long_row_special_values_across_chunks(num_threads, value, expect_nan, lse_expect):
    """A special value in one chunk of a split row decides the whole row."""
    normax.set_num_threads(2)
    x = np.random.default_rng(7).normal(0, 5, 2**19 + 5).astype(np.float32)
    x[300_001] = value
    y, ly, l = normax.softmax(x), normax.log_softmax(x), normax.logsumexp(x)
    if expect_nan:
        assert np.all(np.isnan(y)) and np.all(np.isnan(ly))
        np.testing.assert_array_equal(l, np.float32(lse_expect))
        return
    sm, lsm, lse = reference(x)
    with np.errstate(over="ignore"):
        assert rel_error(y, sm.astype(np.float32), TINY[F32]) <= 1e-6 + 2**-24
        assert scaled_error(ly, lsm.astype(np.float32), log_scale(lsm, lse)) <= 1e-6 + 2**-24
    if lse_expect is not None:
        assert l == np.float32(lse_expect)
        assert y[300_001] == 1.0
    else:
        assert y[300_001] == 0.0 and ly[300_001] == -np.inf
