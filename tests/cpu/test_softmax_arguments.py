"""The softmax family's call contract (softmax, log_softmax, logsumexp): input dtypes, ``out=``,
inputs never modified, logsumexp's weights, signs, keepdims and 0-d results, axis errors. The
accuracy over row lengths, layouts and special values is in test_softmax.py, whose docstring
explains the tolerances."""

from __future__ import annotations

import normax
import numpy as np
import pytest
import scipy.special as sps
from accuracy import scaled_error
from numpy.exceptions import AxisError

from .softmax_reference import BF16, F32, F64, FORWARD, SCIPY_RTOL, log_scale, reference, rng_for

# ---------------------------------------------------------------------------------------------
# dtypes


@pytest.mark.parametrize(
    "dtype, ulp_rel, sub_abs",
    [
        # float16: 11-bit significand, so rounding the float32 result costs <= 2**-11 relative
        # (half an ULP at the bottom of a binade) on top of the float32 error; below float16's
        # normal range (6.1e-5) the spacing is 2**-24, half of which is the absolute bound.
        (np.dtype(np.float16), 2.0**-11, 2.0**-25),
        # bfloat16: 8-bit significand, float32's exponent range (no subnormals in reach).
        (BF16, 2.0**-8, 0.0),
    ],
    ids=["float16", "bfloat16"],
)
def test_small_floats_computed_in_float32(isa, dtype, ulp_rel, sub_abs):
    x = rng_for("small", str(dtype)).normal(0, 5, (6, 37)).astype(dtype)
    for axis in (-1, 0):
        sm, lsm, lse = reference(x, axis)
        y, ly = normax.softmax(x, axis=axis), normax.log_softmax(x, axis=axis)
        l = normax.logsumexp(x, axis=axis, keepdims=True)
        for got in (y, ly, l):
            assert got.dtype == dtype
        slack = ulp_rel + 1e-6  # rounding to dtype + the float32 kernel's error
        err = np.abs(y.astype(np.float64) - sm) - slack * sm
        assert np.max(err) <= sub_abs
        assert (
            np.max(np.abs(ly.astype(np.float64) - lsm) - ulp_rel * np.abs(lsm) - 1e-6 * log_scale(lsm, lse))
            <= 0
        )
        assert (
            np.max(
                np.abs(l.astype(np.float64) - lse) - ulp_rel * np.abs(lse) - 1e-6 * np.maximum(1, np.abs(lse))
            )
            <= 0
        )
        # Exactly the float32 computation, rounded: computed in float32, not in the small dtype.
        x32 = x.astype(np.float32)
        np.testing.assert_array_equal(y, normax.softmax(x32, axis=axis).astype(dtype))
        np.testing.assert_array_equal(ly, normax.log_softmax(x32, axis=axis).astype(dtype))


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.int64, np.uint8, np.uint64, np.bool_])
def test_integers_and_bool_become_float64(dtype):
    x = (rng_for("ints", str(dtype)).integers(0, 30, (4, 9)) % (2 if dtype is np.bool_ else 30)).astype(dtype)
    xd = x.astype(np.float64)
    for f, ref in (
        (normax.softmax, lambda a: sps.softmax(a, axis=-1)),
        (normax.log_softmax, lambda a: sps.log_softmax(a, axis=-1)),
        (normax.logsumexp, lambda a: sps.logsumexp(a, axis=-1)),
    ):
        got = f(x)
        assert got.dtype == np.float64
        np.testing.assert_array_equal(got, f(xd))
        np.testing.assert_allclose(got, ref(xd), rtol=SCIPY_RTOL, atol=SCIPY_RTOL)


BAD_INPUTS = {
    # Complex forwards are computed as scipy does (tests/cpu/test_conformance_numpy.py); the
    # backwards have no complex meaning in any peer.
    "complex64": np.array([1 + 1j, 2], np.complex64),
    "complex128": np.array([1 + 1j, 2]),
    "str": np.array(["1.0", "2.0"]),
    "bytes": np.array([b"1", b"2"]),
    "object": np.array([1.0, 2.0], dtype=object),
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_unsupported_dtypes_raise_type_error(kind):
    x = BAD_INPUTS[kind]
    ok = np.array([0.5, 0.5])
    forwards = () if kind.startswith("complex") else (
        lambda: normax.softmax(x),
        lambda: normax.log_softmax(x),
        lambda: normax.logsumexp(x),
        lambda: normax.logsumexp(ok, b=x),
    )
    for call in (
        *forwards,
        lambda: normax.softmax_backward(x, ok),
        lambda: normax.softmax_backward(ok, x),
        lambda: normax.log_softmax_backward(x, ok),
        lambda: normax.log_softmax_backward(ok, x),
    ):
        with pytest.raises(TypeError):
            call()


# ---------------------------------------------------------------------------------------------
# out=


@pytest.mark.parametrize("fname", list(FORWARD))
@pytest.mark.parametrize("dtype", [F32, F64, np.dtype(np.float16), BF16], ids=str)
@pytest.mark.parametrize("axis", [-1, 0, (0, 2), None], ids=repr)
def test_out_argument(isa, fname, dtype, axis):
    f = FORWARD[fname]
    x = rng_for("out", fname, str(dtype)).normal(0, 5, (3, 4, 10)).astype(dtype)
    expect = f(x, axis=axis)
    out = np.full_like(x, 7)
    assert f(x, axis=axis, out=out) is out
    np.testing.assert_array_equal(out, expect)
    # A non-contiguous writeable view is a valid out as well.
    big = np.full((3, 4, 20), 7, dtype)
    view = big[..., ::2]
    assert f(x, axis=axis, out=view) is view
    np.testing.assert_array_equal(view, expect)
    assert np.all(big[..., 1::2] == 7)
    # In place: out=x.
    inplace = x.copy()
    assert f(inplace, axis=axis, out=inplace) is inplace
    np.testing.assert_array_equal(inplace, expect)
    # In place on a transposed / Fortran-ordered array.
    xt = np.asfortranarray(x)
    assert f(xt, axis=axis, out=xt) is xt
    np.testing.assert_array_equal(xt, expect)


@pytest.mark.parametrize("fname", list(FORWARD))
def test_out_partially_overlapping_input(fname):
    """out shares memory with x without being x: the result is as if x had been copied first."""
    f = FORWARD[fname]
    buf = rng_for("overlap").normal(0, 5, 41)
    x = buf[:-1].reshape(4, 10)
    expect = f(x.copy())
    out = buf[1:].reshape(4, 10)
    f(x, out=out)
    np.testing.assert_array_equal(out, expect)


@pytest.mark.parametrize("fname", list(FORWARD))
def test_out_errors_leave_out_untouched(fname):
    f = FORWARD[fname]
    x = np.linspace(-3, 3, 12, dtype=np.float32).reshape(3, 4)

    def sentinel(shape, dtype):
        return np.full(shape, 42, dtype)

    cases = [
        (sentinel((4, 3), np.float32), ValueError),  # wrong shape
        (sentinel((3, 4, 1), np.float32), ValueError),  # wrong shape (same size)
        (sentinel((3, 4), np.float64), TypeError),  # wrong dtype
        (sentinel((3, 4), np.float16), TypeError),
    ]
    ro = sentinel((3, 4), np.float32)
    ro.flags.writeable = False
    cases.append((ro, ValueError))
    for out, exc in cases:
        before = out.copy()
        with pytest.raises(exc):
            f(x, out=out)
        np.testing.assert_array_equal(out, before)
    # A read-only x with out=x: the error comes before anything is written.
    xr = x.copy()
    xr.flags.writeable = False
    with pytest.raises(ValueError):
        f(xr, out=xr)
    np.testing.assert_array_equal(xr, x)
    with pytest.raises(TypeError):
        f(x, out=[[0.0] * 4] * 3)


@pytest.mark.parametrize("name", ["softmax", "log_softmax", "stablemax", "log_stablemax"])
def test_one_call_binding_hands_every_refusal_back_before_writing(name):
    """`<op>_last(x, out)`, the whole call for a contiguous `out` (the path that makes `out=` cost
    no more than a fresh result), returns None for every `out` it cannot write as given, with
    `out` untouched; the general path then refuses or writes through a buffer."""
    from normax import _core

    kernel_last = getattr(_core, f"{name}_last")
    x = np.linspace(-3, 3, 12, dtype=np.float32).reshape(3, 4)

    class Sub(np.ndarray):
        pass

    read_only = np.full((3, 4), 42, np.float32)
    read_only.flags.writeable = False
    raw = np.zeros(12 * 4 + 1, np.uint8)
    misaligned = raw[1:].view(np.float32).reshape(3, 4)
    misaligned[...] = 42
    buf = np.full(13, 42, np.float32)
    refused = [
        np.full((4, 3), 42, np.float32),
        np.full((3, 4), 42, np.float64),
        read_only,
        np.full((3, 4), 42, np.float32).view(Sub),
        misaligned,
        np.full((3, 8), 42, np.float32)[:, ::2],
        np.full((4, 3), 42, np.float32).T,
        buf[1:].reshape(3, 4),  # overlaps x = buf[:-1] partially (below)
    ]
    for i, out in enumerate(refused):
        xi = buf[:-1].reshape(3, 4) if i == len(refused) - 1 else x
        before = out.copy()
        assert kernel_last(xi, out) is None, i
        np.testing.assert_array_equal(out, before)
    assert kernel_last(x, [[0.0] * 4] * 3) is None
    expect = kernel_last(x)
    out = np.full_like(x, 42)
    assert kernel_last(x, out) is out
    np.testing.assert_array_equal(out, expect)
    inplace = x.copy()
    assert kernel_last(inplace, inplace) is inplace
    np.testing.assert_array_equal(inplace, expect)


@pytest.mark.parametrize("fname", list(FORWARD))
def test_out_refusals_name_out(fname):
    """A contiguous `out` goes straight to the kernel, whose binding refuses what it cannot write;
    the messages are still the general path's, naming `out`."""
    f = FORWARD[fname]
    x = np.linspace(-3, 3, 12, dtype=np.float32).reshape(3, 4)
    ro = np.zeros_like(x)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out: array is read-only"):
        f(x, out=ro)
    with pytest.raises(TypeError, match="out: dtype float64 does not match"):
        f(x, out=np.zeros(x.shape))
    with pytest.raises(ValueError, match="out: shape"):
        f(x, out=np.zeros((4, 3), np.float32))
    # A partial overlap of two contiguous float32 arrays: computed as if x had been copied first.
    buf = np.linspace(-2, 2, 13, dtype=np.float32)
    x, out = buf[:-1].reshape(3, 4), buf[1:].reshape(3, 4)
    expect = f(x.copy())
    assert f(x, out=out) is out
    np.testing.assert_array_equal(out, expect)


# ---------------------------------------------------------------------------------------------
# The caller's input is never modified


def test_inputs_never_modified(isa):
    rng = rng_for("immutable")
    inputs = [
        rng.normal(0, 5, (5, 70)).astype(np.float32),
        rng.normal(0, 5, (5, 70)),
        rng.normal(0, 5, (6, 8, 9))[:, ::-1].transpose(2, 0, 1),
        rng.normal(0, 5, (5, 70)).astype(np.float16),
        rng.normal(0, 5, (5, 70)).astype(">f8"),
        rng.integers(-5, 5, (5, 70)),
        np.array([[1.0, np.nan, np.inf, -np.inf]]),
    ]
    for x in inputs:
        keep = x.copy()
        for axis in (-1, 0, None):
            normax.softmax(x, axis=axis)
            normax.log_softmax(x, axis=axis)
            normax.logsumexp(x, axis=axis)
            normax.logsumexp(x, axis=axis, b=np.ones(x.shape[-1]), return_sign=True)
            y = normax.softmax(x, axis=axis)
            dy = np.ones_like(y)
            ykeep, dykeep = y.copy(), dy.copy()
            normax.softmax_backward(y, dy, axis=axis)
            normax.log_softmax_backward(y, dy, axis=axis)
            np.testing.assert_array_equal(y, ykeep)
            np.testing.assert_array_equal(dy, dykeep)
        np.testing.assert_array_equal(x, keep)
        assert x.dtype == keep.dtype


# ---------------------------------------------------------------------------------------------
# logsumexp: weights, signs, keepdims, scalars


@pytest.mark.parametrize("axis", [-1, 0, (0, 2), None], ids=repr)
@pytest.mark.parametrize("b_kind", ["full", "last_axis", "keepdims_col", "scalar", "negative", "with_zeros"])
def test_logsumexp_weights_vs_scipy(axis, b_kind):
    rng = rng_for("weights", str(axis), b_kind)
    x = rng.normal(0, 5, (3, 4, 6))
    b = {
        "full": rng.uniform(0.1, 3, (3, 4, 6)),
        "last_axis": rng.uniform(0.1, 3, 6),
        "keepdims_col": rng.uniform(0.1, 3, (3, 1, 1)),
        "scalar": 2.5,
        "negative": rng.uniform(-3, 3, (3, 4, 6)),
        "with_zeros": np.where(rng.random((4, 6)) < 0.4, 0.0, rng.uniform(-2, 2, (4, 6))),
    }[b_kind]
    for keepdims in (False, True):
        got, sgn = normax.logsumexp(x, axis=axis, b=b, keepdims=keepdims, return_sign=True)
        ref, rsgn = sps.logsumexp(x, axis=axis, b=b, keepdims=keepdims, return_sign=True)
        assert np.shape(got) == np.shape(ref) and np.shape(sgn) == np.shape(rsgn)
        np.testing.assert_array_equal(sgn, rsgn)
        np.testing.assert_allclose(got, ref, rtol=SCIPY_RTOL, atol=1e-12)
        plain = normax.logsumexp(x, axis=axis, b=b, keepdims=keepdims)
        np.testing.assert_allclose(
            plain, sps.logsumexp(x, axis=axis, b=b, keepdims=keepdims), rtol=SCIPY_RTOL, atol=1e-12
        )
        # Without return_sign, a negative weighted sum is NaN (as SciPy).
        np.testing.assert_array_equal(np.isnan(plain), np.asarray(sgn) < 0)


def test_logsumexp_weights_special_cases():
    inf, nan = np.inf, np.nan
    cases = [
        # x, b, (value, sign)
        ([inf, 1.0], [0.0, 1.0], (1.0, 1.0)),  # b == 0 leaves +inf out
        ([nan, 1.0], [0.0, 1.0], (1.0, 1.0)),  # ... and NaN
        ([1.0, 1.0], [1.0, -1.0], (-inf, 0.0)),  # exact cancellation
        ([inf, 1.0], [-1.0, 1.0], (inf, -1.0)),
        ([inf, inf], [1.0, -1.0], (nan, nan)),  # inf - inf
        ([1.0, 2.0], [nan, 1.0], (nan, nan)),
        ([0.0, 0.0], [0.0, 0.0], (-inf, 0.0)),
    ]
    for x, b, (v, s) in cases:
        got = normax.logsumexp(np.array(x), b=np.array(b), return_sign=True)
        ref = sps.logsumexp(np.array(x), b=np.array(b), return_sign=True)
        np.testing.assert_array_equal(got, (v, s), err_msg=f"x={x} b={b}")
        np.testing.assert_array_equal(got, ref, err_msg=f"x={x} b={b} vs scipy")


def test_logsumexp_weights_dtypes():
    x32 = rng_for("wdt").normal(0, 5, (4, 9)).astype(np.float32)
    # Python-scalar weights keep float32; integer and float64 weight arrays promote to float64,
    # as scipy's result_type(a, b) (tests/cpu/test_conformance_numpy.py).
    assert normax.logsumexp(x32, b=np.arange(1, 10)).dtype == np.float64
    assert normax.logsumexp(x32, b=2.0).dtype == np.float32
    r64 = normax.logsumexp(x32, b=np.full(9, 2.0))
    assert r64.dtype == np.float64
    ref = sps.logsumexp(x32.astype(np.float64), b=np.arange(1, 10), axis=-1)
    got = normax.logsumexp(x32, b=np.arange(1, 10))
    assert scaled_error(got, ref, np.maximum(1, np.abs(ref))) <= 1e-6
    np.testing.assert_allclose(r64, sps.logsumexp(x32.astype(np.float64), b=2.0, axis=-1), rtol=SCIPY_RTOL)


def test_logsumexp_b_must_broadcast():
    x = np.zeros((3, 4))
    for b in (np.ones(3), np.ones((2, 4)), np.ones((4, 3))):
        with pytest.raises(ValueError):
            normax.logsumexp(x, b=b)


def test_logsumexp_b_broadcast_enlarges_x_like_scipy():
    x = np.array([0.0, 1.0, 2.0])
    b = np.array([[1.0], [2.0]])
    got = normax.logsumexp(x, b=b)
    np.testing.assert_allclose(got, sps.logsumexp(x, b=b, axis=-1), rtol=SCIPY_RTOL)
    assert got.shape == (2,)


def test_zero_d_results_are_numpy_scalars():
    for dtype in (np.float32, np.float64):
        x = np.array([0.5, 1.5, -2.0], dtype)
        r = normax.logsumexp(x)
        assert isinstance(r, dtype) and not isinstance(r, np.ndarray)
        r2 = normax.logsumexp(np.ones((2, 3), dtype), axis=None)
        assert isinstance(r2, dtype)
        v, s = normax.logsumexp(x, return_sign=True)
        assert isinstance(v, dtype) and isinstance(s, dtype) and s == 1
        v, s = normax.logsumexp(x, b=-np.ones(3, dtype), return_sign=True)
        assert isinstance(v, dtype) and isinstance(s, dtype) and s == -1
        assert isinstance(normax.logsumexp(x, b=np.ones(3, dtype)), dtype)
        k = normax.logsumexp(np.ones((2, 3), dtype), axis=None, keepdims=True)
        assert isinstance(k, np.ndarray) and k.shape == (1, 1)
        assert float(r) == pytest.approx(float(sps.logsumexp(x.astype(np.float64))), rel=1e-6)
    assert isinstance(normax.logsumexp(np.float64(3.0), axis=None), np.float64)


@pytest.mark.parametrize(
    "call",
    [
        lambda x, a: normax.softmax(x, axis=a),
        lambda x, a: normax.log_softmax(x, axis=a),
        lambda x, a: normax.logsumexp(x, axis=a),
        lambda x, a: normax.logsumexp(x, axis=a, b=np.ones_like(x)),
        lambda x, a: normax.softmax_backward(x, x, axis=a),
        lambda x, a: normax.log_softmax_backward(x, x, axis=a),
    ],
    ids=["softmax", "log_softmax", "logsumexp", "logsumexp_b", "softmax_backward", "log_softmax_backward"],
)
def test_axis_errors(call):
    x = np.zeros((2, 3))
    for axis in (2, -3, (0, 2), (-3,), 100):
        with pytest.raises(AxisError):
            call(x, axis)
    with pytest.raises(ValueError):  # a repeated axis, as NumPy
        call(x, (0, 0))
