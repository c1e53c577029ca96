"""softmax, log_softmax, logsumexp and their backwards: the NumPy-first API."""

from __future__ import annotations

import math

import numpy as np

from . import _core
from ._arrays import (
    Plan,
    as_backward_inputs,
    as_input,
    check_out,
    compute_dtype,
    direct_output,
    finish,
    foreign_kind,
    normalize_axes,
    scalar_0d,
)

_FAST_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _is_fast(x) -> bool:
    """A C-contiguous native float32/float64 ndarray with at least one axis: no conversion needed.

    Alignment is not checked here (it would cost every call): the kernels refuse a misaligned
    array with a ValueError before writing anything, and the fast paths then take the general
    path, which copies (see :func:`_misaligned`)."""
    return (
        type(x) is np.ndarray
        and x.dtype in _FAST_DTYPES
        and x.ndim > 0
        and x.flags.c_contiguous
        and x.dtype.isnative
    )


def _misaligned(*arrays) -> bool:
    """Whether a fast path's ValueError came from a misaligned array (then the general path
    copies it, or writes a misaligned `out` through a buffer); else the error is re-raised."""
    return not all(a.flags.aligned for a in arrays)


# ---------------------------------------------------------------------------------------------
# Complex input: scipy.special computes softmax, log_softmax and logsumexp of complex arrays, so
# normax does too, in NumPy (no SIMD kernel), with scipy's algorithms and branch conventions.
# complex64 is computed in complex128 and rounded once.


def _complex_work(dtype: np.dtype) -> np.dtype:
    return np.dtype(np.complex128) if dtype.itemsize <= 16 else dtype


def _log1p(z):
    """log(1 + z) for complex z, accurate for small |z| (NumPy's complex log1p forms 1 + z
    first, losing a small z entirely); log(1 + z) itself from |z| = 1/2 on."""
    x, y = z.real, z.imag
    with np.errstate(all="ignore"):
        small = 0.5 * np.log1p(x * (2 + x) + y * y) + 1j * np.arctan2(y, 1 + x)
        return np.where(np.abs(z) < 0.5, small, np.log(1 + z))


def _exp_diff(x, m):
    """exp(x - m) without the rounding of ``x - m`` (which costs |x - m| * u relative, the
    peers' error): the rounding error of each part (TwoSum) is applied as a factor 1 + err."""
    d = x - m
    err = np.zeros_like(d)
    for part in ("real", "imag"):
        a, b, s = getattr(x, part), -getattr(np.asarray(m), part), getattr(d, part)
        bv = s - a
        e = (a - (s - bv)) + (b - bv)
        getattr(err, part)[...] = np.where(np.isfinite(e), e, 0)
    return np.exp(d) * (1 + err)


def _wrap_radians(y):
    """y in (-pi, pi], as scipy's logsumexp wraps the imaginary part of its result."""
    return np.where(np.abs(y) < np.pi, y, -((-y + np.pi) % (2 * np.pi) - np.pi))


def _rows(a, axes):
    """`a` with the `axes` last, as a 2-d (rows, reduced length) array, and its Plan."""
    plan = Plan(a.shape, axes, last=True)
    return plan.arrange(a).reshape(plan.outer, plan.len), plan


def _complex_map(log, x, axis, out):
    """scipy.special.softmax / log_softmax of a complex array."""
    result_dtype = x.dtype
    if out is not None:
        check_out(out, x.shape, result_dtype)
    axes = normalize_axes(axis, x.ndim)
    a = x.astype(_complex_work(result_dtype), copy=False)
    with np.errstate(all="ignore"):
        if not log:
            # scipy: exp(x - max(x)) / sum(...); NumPy's max of complex values is lexicographic,
            # so its real part is the largest (nothing overflows).
            y = a
            if a.size:
                e = _exp_diff(a, np.max(a, axis=axes, keepdims=True))
                y = e / np.sum(e, axis=axes, keepdims=True)
        else:
            # scipy: tmp = x - max (0 where the max is not finite), tmp - log(sum(exp(tmp))); the
            # max term, exactly 1, is kept out of the sum and the log taken as log1p of the rest.
            rows, plan = _rows(a, axes)
            if rows.size:
                k = np.argmax(rows, axis=-1)[:, None]
                top = np.take_along_axis(rows, k, -1)
                finite = np.isfinite(top)
                top = np.where(finite, top, 0)
                tmp = rows - top
                e = _exp_diff(rows, top)
                total = np.sum(e, axis=-1, keepdims=True)
                np.put_along_axis(e, k, 0, -1)
                rest = np.sum(e, axis=-1, keepdims=True)
                lse = np.where(finite, _log1p(rest), np.log(total))
                rows = tmp - lse
            y = plan.restore(rows.reshape(plan.arranged_shape))
    return finish(y, result_dtype, out)


def _complex_logsumexp(a, b, axes, keepdims, return_sign, result_dtype):
    """scipy.special.logsumexp of complex values (`a` or `b` complex, broadcast to one shape).

    As scipy: elements with b == 0 are left out; the imaginary part of the result (or the phase
    returned as the sign) is the principal one, in (-pi, pi]; where the result is not finite it
    is log(sum(b * exp(a))) as C99's complex exp and log give it. The element of largest real part
    is kept out of the sum: log(t + s) = log(t) + log1p(s / t), accurate when the result is near 0.
    """
    work = _complex_work(result_dtype)
    real_dtype = np.finfo(result_dtype).dtype
    arows, plan = _rows(a.astype(work, copy=False), axes)
    brows = None if b is None else _rows(b.astype(work, copy=False), axes)[0]
    shape = plan.keepdims_shape if keepdims else plan.reduced_shape
    with np.errstate(all="ignore"):
        rows = arows if brows is None else np.where(brows == 0, -np.inf, arows)
        direct = np.sum(np.exp(arows) if brows is None else brows * np.exp(arows), axis=-1)
        re = im = np.zeros(plan.outer, real_dtype)
        finite = np.zeros(plan.outer, bool)  # an empty sum: log(0) = -inf below
        if plan.len:
            k = np.argmax(rows.real, axis=-1)[:, None]
            top = np.take_along_axis(rows, k, -1)[:, 0]
            m = top.real
            m = np.where(np.isfinite(m), m, 0)
            e = _exp_diff(rows, m[:, None])
            if brows is not None:
                e *= brows
            t = np.take_along_axis(e, k, -1)[:, 0]
            np.put_along_axis(e, k, 0, -1)
            lp = _log1p(np.sum(e, axis=-1) / t)
            bk = 1 if brows is None else np.take_along_axis(brows, k, -1)[:, 0]
            re = lp.real + np.log(np.abs(bk)) + top.real
            im = lp.imag + np.angle(bk)
            # A large Im(top) is reduced by exp's exact argument reduction, not by a float 2*pi.
            big = np.abs(top.imag) > np.pi
            im = np.where(
                big, np.angle(np.exp(1j * np.where(big, top.imag, 0)) * np.exp(1j * im)), im + top.imag
            )
            im = _wrap_radians(im)
            finite = np.isfinite(re) & np.isfinite(im)
        if return_sign:
            res = np.where(finite, re, np.log(np.abs(direct)))
            # NumPy's sign (z / |z|, +1 for +inf), NaN where the direct sum has a NaN part.
            sign = np.where(
                finite, np.exp(1j * im), np.where(np.isnan(direct), complex(np.nan, np.nan), np.sign(direct))
            )
            return (
                scalar_0d(res.astype(real_dtype).reshape(shape)),
                scalar_0d(sign.astype(result_dtype).reshape(shape)),
            )
        res = np.where(finite, re + 1j * im, np.log(direct))
        return scalar_0d(res.astype(result_dtype).reshape(shape))


def row_map(kernel, kernel_last, x, axis, out):
    """Runs a row-to-row kernel (softmax, log_softmax; stablemax's too) on `x` over `axis`:
    `kernel_last` is its one-call form over the last axis."""
    # The common call in one crossing into Rust: a contiguous float32/float64 array over its last
    # axis, into a fresh array or into an `out` of its shape and dtype that is `x` itself or does
    # not overlap it (None back for anything else, before anything is written; the general path
    # below then gives any refusal its message, or computes through a buffer: a partial overlap,
    # a misaligned or strided `out`).
    if axis == -1:
        try:
            y = kernel_last(x, out)
        except ValueError:
            if not _misaligned(x):
                raise
            y = None  # read from one aligned copy below
        if y is not None:
            return y

    a = np.asarray(x)
    if a.dtype.kind == "c":
        return _complex_map(kernel is _core.log_softmax, a, axis, out)
    a, result_dtype = as_input(a)
    if out is not None:
        check_out(out, a.shape, result_dtype)
    axes = normalize_axes(axis, a.ndim)
    plan = Plan(a.shape, axes)
    if a.ndim == 0:
        a = a.reshape(1)
    work = plan.arrange(a)
    y = direct_output(out, work, plan) if out is not None else None
    if y is None:
        y = np.empty_like(work)
    if work.size:
        kernel(work, y, (plan.outer, plan.len, plan.inner))
    return finish(plan.restore(y).reshape(plan.shape), result_dtype, out)


def softmax(x, axis=-1, *, out=None):
    """Softmax: ``exp(x) / sum(exp(x), axis)``.

    Parameters
    ----------
    x : array_like
        Input. float32 and float64 are computed as themselves; float16, bfloat16 (ml_dtypes) are
        computed in float32 and returned in their dtype; integers (ml_dtypes' ``int4`` and the
        like included) and bool become float64; complex input is computed as
        ``scipy.special.softmax`` computes it (see Notes); any other dtype is a TypeError. Any
        memory layout is read: strided, reversed, byte-swapped or misaligned arrays are copied
        once.
    axis : int, tuple of int or None, default -1
        Axis or axes the probabilities sum to one over; None means all axes.
    out : ndarray, optional
        Writeable array of the result's shape and dtype to write into; may be `x` itself. Any
        layout (a misaligned `out` included) is written: where the kernel cannot write it
        directly, the result is computed into a buffer and copied in.

    Returns
    -------
    ndarray or scalar
        Same shape as `x`; a 0-d result (from a 0-d array or a scalar, without `out`) is a NumPy
        scalar, as in SciPy.

    Raises
    ------
    numpy.exceptions.AxisError
        If an axis is out of range.
    TypeError
        For string or object input, or an `out` of the wrong dtype.
    ValueError
        For an `out` of the wrong shape, or a read-only one.

    Notes
    -----
    Two-pass algorithm (Dukhan & Ablavatski, 2020): exp(x) is evaluated as ``m * 2**n`` from x
    itself, and the row's sum is kept as a (mantissa, exponent) pair, so nothing overflows and no
    ``x - max`` rounding enters the result: float32 results are within a few ULP of the correctly
    rounded value. Short rows use an in-cache variant (max pass, exp pass, scale pass) with the
    same accuracy. A row holding NaN or +inf, or only -inf, is all NaN (as ``torch.softmax`` and
    ``scipy.special.softmax``). Unlike ``scipy.special.softmax`` (default ``axis=None``), the
    default axis is the last one, as in ``torch.softmax`` and ``jax.nn.softmax``.

    Complex input (as SciPy; torch and JAX do not take it) is computed in NumPy, not by the SIMD
    kernels, with SciPy's algorithm ``exp(x - max(x)) / sum(exp(x - max(x)))`` (NumPy's
    lexicographic max), complex64 in complex128.

    0-d results follow SciPy and NumPy's ufuncs: every NumPy-first normax function returns a
    NumPy scalar where its result is 0-d and no `out` is given (an `out` is returned as given);
    other libraries' 0-d arrays come back as their 0-d arrays.

    Examples
    --------
    >>> import numpy as np, normax
    >>> normax.softmax(np.array([0.0, np.log(3.0)]))
    array([0.25, 0.75])
    """
    return row_map(_core.softmax, _core.softmax_last, x, axis, out)


def log_softmax(x, axis=-1, *, out=None):
    """Log-softmax: ``x - logsumexp(x, axis, keepdims=True)``.

    Parameters
    ----------
    x : array_like
        Input; dtype rules as in :func:`softmax`, complex included.
    axis : int, tuple of int or None, default -1
        Axis or axes to normalize over; None means all axes.
    out : ndarray, optional
        Writeable array of the result's shape and dtype; may be `x` itself.

    Returns
    -------
    ndarray or scalar
        Same shape as `x`; a 0-d result is a NumPy scalar, as :func:`softmax`.

    Raises
    ------
    numpy.exceptions.AxisError, TypeError, ValueError
        As :func:`softmax`.

    Notes
    -----
    The log-sum-exp is formed in float64 from the two-pass sum and split into a high and a low
    part, so ``x - lse`` is exact where x is close to lse (the cancellation case). A row holding
    NaN or +inf, or only -inf, is all NaN; -inf entries of other rows give -inf.

    Complex input: SciPy's ``(x - max) - log(sum(exp(x - max)))`` (a non-finite max taken as 0,
    so the imaginary parts keep SciPy's branch), in NumPy, with the max's own term kept out of
    the sum and the log taken as an accurate complex log1p of the rest.

    Examples
    --------
    >>> import numpy as np, normax
    >>> normax.log_softmax(np.array([0.0, 0.0]))
    array([-0.69314718, -0.69314718])
    """
    return row_map(_core.log_softmax, _core.log_softmax_last, x, axis, out)


_TINY64 = float(np.finfo(np.float64).tiny)


def _scalar_weight(s) -> tuple[np.float64, float]:
    """A Python number weight `s` as (weight in float64, shift): ``logsumexp(x, b=s)`` is
    ``logsumexp(x, b=weight) + shift``. `s` itself where float64 holds it as a normal number (or
    it is 0, inf or NaN); else its sign, with ``log(abs(s))`` as the shift (an int beyond
    float64, a subnormal float), so nothing overflows or underflows."""
    try:
        f = float(s)
    except OverflowError:  # an int beyond float64's range; math.log takes any int
        return np.float64(1.0 if s > 0 else -1.0), math.log(abs(s))
    if f == 0.0 or not math.isfinite(f) or abs(f) >= _TINY64:
        return np.float64(f), 0.0
    return np.float64(math.copysign(1.0, f)), math.log(abs(f))


def _numpy_int(a: np.ndarray) -> np.ndarray:
    """An array of a foreign integer dtype (ml_dtypes.int4, ...) as NumPy's integer of its size,
    which NumPy can promote; anything else unchanged."""
    if a.dtype.kind != "V" or foreign_kind(a.dtype) != "i":
        return a
    with np.errstate(all="ignore"):
        signed = np.array(-1.0).astype(a.dtype).astype(np.float64) == -1.0
    return a.astype(np.dtype(f"{'i' if signed else 'u'}{a.dtype.itemsize}"))


def _weighted_dtype(x, a: np.ndarray, b, b_arr: np.ndarray) -> np.dtype:
    """The result dtype of logsumexp(x, b=b), as scipy: ``result_type(x, b)`` made floating.

    Python scalars are weak (a float32 `x` with ``b=2.0`` stays float32, NEP 50), everything
    else is its array's dtype (float32 with int32 weights gives float64, float16 with float32
    weights float32); integers and bool alone give float64.
    """
    weak = (int, float, complex)
    if a.dtype.kind == "V" or b_arr.dtype.kind == "V":
        # ml_dtypes floats (bfloat16, float8_*), which NumPy cannot promote with its own types
        # (and promotes with Python scalars to float64): promoted as float16 is (int8 keeps
        # bfloat16, int16 gives float32, int32 and int64 float64), two different small floats
        # to float32, in which both are exact.
        dtypes = [arr.dtype for v, arr in ((x, a), (b, b_arr)) if type(v) not in weak]
        small = {d for d in dtypes if d.kind == "V" or d == np.float16}
        if len(small) > 1:
            return np.dtype(np.float32)
        r = np.result_type(*(np.float16 if d.kind == "V" else d for d in dtypes))
        return small.pop() if r == np.float16 else r
    r = np.result_type(x if type(x) in weak else a.dtype, b if type(b) in weak else b_arr.dtype)
    return r if r.kind in "fc" else np.dtype(np.float64)


def logsumexp(x, axis=-1, *, b=None, keepdims=False, return_sign=False):
    """``log(sum(b * exp(x), axis))``, computed without overflow.

    Parameters
    ----------
    x : array_like
        Input; dtype rules as in :func:`softmax`, complex included.
    axis : int, tuple of int or None, default -1
        Axis or axes to reduce; None means all.
    b : array_like, optional
        Weights broadcast against `x`, as in ``scipy.special.logsumexp`` (real or complex).
        Elements with b == 0 are left out (so x = inf there does not make the result inf or NaN).
        A Python number is weak (NEP 50: the result keeps `x`'s dtype) but is applied in float64,
        never rounded to `x`'s dtype: ``logsumexp(float32 x, b=1e300)`` is
        ``logsumexp(x) + log(1e300)`` in float32, not inf (SciPy: inf), and any Python int is
        taken (``log(abs(b))`` of an int beyond float64 is exact).
    keepdims : bool, default False
        Keep the reduced axes with length one.
    return_sign : bool, default False
        Also return the sign of the weighted sum (+1, -1, 0 for an empty or zero sum; for complex
        values the phase ``s / abs(s)``, as SciPy).

    Returns
    -------
    res : ndarray or scalar
        ``log(sum(b * exp(x)))``; with `return_sign`, ``log(abs(sum(b * exp(x))))`` (real also
        for complex input). Real input without `return_sign`: NaN where the weighted sum is
        negative (as SciPy). Complex: the imaginary part is in (-pi, pi]. A 0-d result is
        returned as a NumPy scalar.
    sgn : ndarray or scalar
        The sign, only with ``return_sign=True``.

    Raises
    ------
    numpy.exceptions.AxisError
        If an axis is out of range.
    ValueError
        If `b` does not broadcast against `x`.
    TypeError
        For string or object input or weights.

    Notes
    -----
    Differences from ``scipy.special.logsumexp``: the default axis is -1 (SciPy: None), and a
    0-d input with ``keepdims=True`` gives a NumPy scalar, as NumPy's reductions (SciPy: shape
    (1,)). The result dtype is SciPy's: the input's (float32 stays float32) and, with `b`,
    ``numpy.result_type(x, b)`` made floating, Python scalars weak (NEP 50): float32 `x` with
    ``b=2.0`` is float32, with int32 or float64 weights float64, float16 with float32 weights
    float32. bfloat16 and the other ml_dtypes floats (which NumPy cannot promote) promote as
    float16 does: with int8 weights they stay bfloat16, with int16 float32, with int32 or int64
    float64; ml_dtypes integers (``int4``, ...) promote as NumPy's integer
    of their size (``int8``). A real Python-number `b` is computed in float64 (real input in
    float64, the log of the weighted sum rounded once to the result dtype); where the weight is
    subnormal or beyond float64 (a huge int) the result is ``logsumexp(x) + log(abs(b))`` with
    the sign of `b`. NaN anywhere in a reduced row gives NaN; +inf (and no NaN)
    gives +inf; an empty reduction or a row of only -inf gives -inf.

    Complex input or weights are computed in NumPy (complex64 in complex128), as SciPy: elements
    with b == 0 left out, the element of largest real part kept out of the sum (``log(t + s) =
    log(t) + log1p(s / t)`` with an accurate complex log1p, so a result near 0 keeps its relative
    accuracy), the imaginary part reduced to (-pi, pi] through exp's own argument reduction, and
    non-finite results given by ``log(sum(b * exp(x)))`` (C99 complex exp and log). The sign of
    an infinite sum is its phase (+1 for +inf, not SciPy's NaN), and of an empty one 0.

    Examples
    --------
    >>> import numpy as np, normax
    >>> float(normax.logsumexp(np.log(np.array([1.0, 2.0, 3.0]))))
    1.791759469228055
    """
    if b is None and not keepdims and not return_sign and axis == -1 and _is_fast(x) and x.ndim > 1:
        n = x.shape[-1]
        res = np.empty(x.shape[:-1], x.dtype)
        if not res.size:
            return res
        try:
            _core.logsumexp(x, None, res, None, (res.size, n, 1))
            return res
        except ValueError:
            if not _misaligned(x):
                raise
    a = np.asarray(x)
    shift = 0.0
    if b is None:
        b_arr = None
        if a.dtype.kind == "c":
            return _complex_logsumexp(a, None, normalize_axes(axis, a.ndim), keepdims, return_sign, a.dtype)
        a, result_dtype = as_input(a)
    elif type(b) in (int, float) and a.dtype.kind != "c":
        # A Python number is weak (NEP 50): the result has x's dtype (float32 stays float32), but
        # the weight is applied in float64, never rounded to x's dtype (b=1e300 is no inf there).
        a, result_dtype = as_input(a)
        a = a.astype(np.float64, copy=False)
        weight, shift = _scalar_weight(b)
        b_arr = np.broadcast_to(weight, a.shape)
    else:
        b_arr = np.asarray(b)
        for v, arr, name in ((x, a, "x"), (b, b_arr, "b")):
            if arr.dtype.kind not in "fiubc" and not (arr.dtype.kind == "V" and foreign_kind(arr.dtype)):
                raise TypeError(f"{name}: unsupported dtype {arr.dtype}; expected a real or complex array")
        a, b_arr = _numpy_int(a), _numpy_int(b_arr)
        result_dtype = _weighted_dtype(x, a, b, b_arr)
        try:
            a, b_arr = np.broadcast_arrays(a, b_arr)
        except ValueError:
            raise ValueError(f"b: shape {b_arr.shape} does not broadcast with x shape {a.shape}") from None
        if result_dtype.kind == "c":
            axes = normalize_axes(axis, a.ndim)
            return _complex_logsumexp(a, b_arr, axes, keepdims, return_sign, result_dtype)
        work_dtype = compute_dtype(result_dtype, "x")[0]
        a = a.astype(work_dtype)
        b_arr = b_arr.astype(work_dtype)
    axes = normalize_axes(axis, a.ndim)
    plan = Plan(a.shape, axes)
    if a.ndim == 0:
        a = a.reshape(1)
        b_arr = b_arr.reshape(1) if b_arr is not None else None
    work = plan.arrange(a)
    wb = plan.arrange(b_arr) if b_arr is not None else None
    res = np.empty(plan.reduced_shape, a.dtype)
    sign = np.empty(plan.reduced_shape, a.dtype) if (return_sign or b_arr is not None) else None
    if res.size:
        _core.logsumexp(work, wb, res, sign, (plan.outer, plan.len, plan.inner))
    if shift:
        res += shift
    if b_arr is not None and not return_sign:
        res[sign < 0] = np.nan
    if keepdims:
        res = res.reshape(plan.keepdims_shape)
        sign = sign.reshape(plan.keepdims_shape) if sign is not None else None
    res = finish(res, result_dtype, None)
    return (res, finish(sign, result_dtype, None)) if return_sign else res


def row_backward(kernel, y, dy, axis):
    """Runs a backward kernel (softmax_backward, log_softmax_backward) on y, dy over `axis`."""
    if axis == -1 and _is_fast(y) and _is_fast(dy) and y.dtype == dy.dtype and y.shape == dy.shape:
        dx = np.empty_like(y)
        n = y.shape[-1]
        if not n:
            return dx
        try:
            kernel(y, dy, dx, (y.size // n, n, 1))
            return dx
        except ValueError:
            if not _misaligned(y, dy):
                raise
    ya, _, dya, work_dtype, result_dtype = as_backward_inputs(y, "y", dy)
    axes = normalize_axes(axis, ya.ndim)
    plan = Plan(ya.shape, axes)
    if ya.ndim == 0:
        ya, dya = ya.reshape(1), dya.reshape(1)
    wy = plan.arrange(ya.astype(work_dtype, copy=False))
    wdy = plan.arrange(dya.astype(work_dtype, copy=False))
    dx = np.empty_like(wy)
    if dx.size:
        kernel(wy, wdy, dx, (plan.outer, plan.len, plan.inner))
    return finish(plan.restore(dx).reshape(plan.shape), result_dtype, None)


def softmax_backward(y, dy, axis=-1):
    """Gradient of :func:`softmax`: ``dx = y * (dy - sum(dy * y, axis))``.

    Parameters
    ----------
    y : array_like
        The forward output, ``softmax(x, axis)``.
    dy : array_like
        Gradient of the loss with respect to `y`; same shape as `y`.
    axis : int, tuple of int or None, default -1
        The axis (or axes) the forward normalized over.

    Returns
    -------
    ndarray or scalar
        dx, the gradient with respect to x, shaped like `y`, in the promoted dtype of `y`, `dy`
        (a NumPy scalar for 0-d `y`, as :func:`softmax`).

    Raises
    ------
    ValueError
        If `dy` is not shaped like `y`.
    numpy.exceptions.AxisError, TypeError
        As :func:`softmax`.

    Examples
    --------
    >>> import numpy as np, normax
    >>> y = normax.softmax(np.array([1.0, 2.0]))
    >>> normax.softmax_backward(y, np.array([1.0, 1.0]))
    array([0., 0.])
    """
    return row_backward(_core.softmax_backward, y, dy, axis)


def log_softmax_backward(y, dy, axis=-1):
    """Gradient of :func:`log_softmax`: ``dx = dy - exp(y) * sum(dy, axis)``.

    Parameters
    ----------
    y : array_like
        The forward output, ``log_softmax(x, axis)``.
    dy : array_like
        Gradient of the loss with respect to `y`; same shape as `y`.
    axis : int, tuple of int or None, default -1
        The axis (or axes) the forward normalized over.

    Returns
    -------
    ndarray or scalar
        dx, shaped like `y`, in the promoted dtype of `y`, `dy` (a NumPy scalar for 0-d `y`).

    Raises
    ------
    ValueError
        If `dy` is not shaped like `y`.
    numpy.exceptions.AxisError, TypeError
        As :func:`softmax`.

    Examples
    --------
    >>> import numpy as np, normax
    >>> y = normax.log_softmax(np.array([0.0, 0.0]))
    >>> normax.log_softmax_backward(y, np.array([1.0, 0.0]))
    array([ 0.5, -0.5])
    """
    return row_backward(_core.log_softmax_backward, y, dy, axis)
