"""Tests of the normalization ops: rms_norm, layer_norm, crms_norm, their backwards, and PowerNorm.

References are float64 NumPy written from the definitions, evaluated on the *same* input values
(a float32 or float16 input converted to float64 exactly), so input rounding never counts against
the kernels; and PyTorch (``F.rms_norm``, ``F.layer_norm`` and their autograd gradients).

Error measure: normwise per row. Each output element is a sum of a few terms (x_hat * w and b in
the forward; r * g and the two correction terms in the backward), so the natural bound for its
rounding error is a few roundoffs of the size of those terms. We divide the largest error in a
row by the largest such term size in the row, and compare to a multiple of the unit roundoff
(2**-24 float32, 2**-53 float64, 2**-11 for results rounded to float16).
"""

from __future__ import annotations

import normax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - torch is a test dependency
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="needs torch")

U32, U64, U16 = 2.0**-24, 2.0**-53, 2.0**-11
NORMS = ("rms", "layer", "crms")
DTYPES = (np.float32, np.float64, np.float16)
LENGTHS = (1, 7, 64, 1000, 4096, 8191)
# Default eps of each op for a dtype (rms_norm: machine eps of the input, as torch).
DEFAULT_EPS = {"layer": lambda dt: 1e-5, "crms": lambda dt: 1e-6, "rms": lambda dt: float(np.finfo(dt).eps)}

# Forward tolerances, in units of the row's largest |x_hat * w| + |b|. float32: the statistics are
# float64-accurate up to the float32 partial sums (at most 64 terms per lane before each fold into
# float64), then 3 roundings per element (x - m0 is exact, * rstd, + c, fma with w and b): 16
# roundoffs covers it. float64: partial sums run over up to len/4 terms per accumulator (8191 ->
# ~2000 roundings worst case, ~50 typical): 256 roundoffs. float16: computed in float32, then one
# rounding to float16 (one roundoff of 2**-11) on top.
FWD_TOL = {np.float32: 16 * U32, np.float64: 256 * U64, np.float16: U16 + 16 * U32}
# Backward: a row sum (float64-accurate as above) and ~4 roundings per element for dx; dweight and
# dbias sum float32 terms in blocks of 16 rows before folding into float64 (measured against the
# sum of the terms' magnitudes): both within 32 roundoffs. float16 adds its output rounding.
BWD_TOL = {np.float32: 32 * U32, np.float64: 512 * U64, np.float16: U16 + 32 * U32}


# --------------------------------------------------------------------------------------------------
# float64 references, from the definitions


def _rows(a, k):
    """(rows, len) view of an array normalized over its last k axes."""
    a = np.asarray(a, dtype=np.float64)
    n = int(np.prod(a.shape[a.ndim - k :]))
    return a.reshape(-1, n)


def ref_stats(norm, x2, eps):
    """(mean, rstd) per row of a (rows, n) float64 array."""
    n = x2.shape[1]
    if norm == "layer":
        mean = x2.mean(axis=1)
        ms = ((x2 - mean[:, None]) ** 2).mean(axis=1)
    elif norm == "rms":
        mean = np.zeros(len(x2))
        ms = (x2 * x2).mean(axis=1)
    else:
        mean = np.zeros(len(x2))
        ms = ((x2 * x2).sum(axis=1) + x2.sum(axis=1) ** 2) / (n + 1)
    return mean, 1.0 / np.sqrt(ms + eps)


def ref_forward(norm, x, w, b, eps, k=1):
    """y and the row-wise term size |x_hat * w| + |b| (for the error measure), shaped (rows, n)."""
    x2 = _rows(x, k)
    n = x2.shape[1]
    mean, rstd = ref_stats(norm, x2, eps)
    xhat = (x2 - mean[:, None]) * rstd[:, None]
    w = np.ones(n) if w is None else np.asarray(w, np.float64).reshape(-1)
    b = np.zeros(n) if b is None else np.asarray(b, np.float64).reshape(-1)
    return xhat * w + b, np.abs(xhat * w) + np.abs(b)


def ref_backward(norm, dy, x, w, eps, k=1):
    """dx, dweight, dbias (rows, n / n / n) from the chain rule, and dx's per-element term size."""
    x2, dy2 = _rows(x, k), _rows(dy, k)
    n = x2.shape[1]
    mean, rstd = ref_stats(norm, x2, eps)
    r = rstd[:, None]
    w = np.ones(n) if w is None else np.asarray(w, np.float64).reshape(-1)
    g = dy2 * w
    xhat = (x2 - mean[:, None]) * r
    if norm == "layer":
        t1, t2 = g.mean(axis=1, keepdims=True), xhat * (g * xhat).mean(axis=1, keepdims=True)
        dx = r * (g - t1 - t2)
        size = r * (np.abs(g) + np.abs(t1) + np.abs(t2))
    elif norm == "rms":
        t = x2 * r**3 * (g * x2).mean(axis=1, keepdims=True)
        dx, size = r * g - t, r * np.abs(g) + np.abs(t)
    else:
        s = x2.sum(axis=1, keepdims=True)
        t = (x2 + s) * r**3 * (g * x2).sum(axis=1, keepdims=True) / (n + 1)
        dx, size = r * g - t, r * np.abs(g) + np.abs(t)
    return dx, (dy2 * xhat).sum(axis=0), dy2.sum(axis=0), size, np.abs(dy2 * xhat).sum(axis=0)


def rowwise_error(actual, expected, size, k=1):
    """max over rows of max |actual - expected| / max size, all viewed as (rows, n)."""
    a = _rows(actual, k)
    e, s = np.reshape(expected, a.shape), np.reshape(size, a.shape)
    if not a.size:
        return 0.0
    return float(np.max(np.max(np.abs(a - e), axis=1) / np.maximum(np.max(s, axis=1), 1e-300)))


def termwise_error(actual, expected, size):
    """max |actual - expected| / size elementwise (a sum measured against the sum of its terms'
    magnitudes; 0 where both are exactly 0)."""
    err = np.abs(np.asarray(actual, np.float64) - expected)
    return float(np.max(err / np.maximum(size, 1e-300), initial=0.0))


def _inputs(rng, shape, dtype, n_norm, affine):
    x = rng.standard_normal(shape).astype(dtype)
    w = (1 + 0.5 * rng.standard_normal(n_norm)).astype(dtype) if affine != "none" else None
    b = (0.5 * rng.standard_normal(n_norm)).astype(dtype) if affine == "weight+bias" else None
    return x, w, b


def _forward(norm, x, w, b, **kw):
    if norm == "layer":
        return normax.layer_norm(x, w, b, **kw)
    return getattr(normax, f"{norm}_norm")(x, w, **kw)


def _backward(norm, dy, x, w, b, **kw):
    if norm == "layer":
        return normax.layer_norm_backward(dy, x, w, b, **kw)
    dx, dw = getattr(normax, f"{norm}_norm_backward")(dy, x, w, **kw)
    return dx, dw, None


def _affines(norm):
    return ("none", "weight", "weight+bias") if norm == "layer" else ("none", "weight")


GRID = [(norm, a) for norm in NORMS for a in _affines(norm)]


# --------------------------------------------------------------------------------------------------
# torch references


def torch_forward_backward(norm, x, w, b, dy, eps, k=1):
    """The torch result (y, dx, dw, db) for x, w, b, dy in their own dtype (crms: float64 through the
    full zero-mean vector, torch.cat + F.rms_norm, and autograd through both)."""
    tx = torch.tensor(x, requires_grad=True)
    tw = None if w is None else torch.tensor(w, requires_grad=True)
    tb = None if b is None else torch.tensor(b, requires_grad=True)
    shape = tuple(x.shape[x.ndim - k :])
    if norm == "rms":
        y = F.rms_norm(tx, shape, tw, eps)
    elif norm == "layer":
        y = F.layer_norm(tx, shape, tw, tb, eps)
    else:
        assert k == 1
        full = torch.cat([tx, -tx.sum(dim=-1, keepdim=True)], dim=-1)
        y = F.rms_norm(full, (shape[0] + 1,), None, eps)[..., :-1]
        if tw is not None:
            y = y * tw
    y.backward(torch.tensor(dy))
    grads = [None if t is None else t.grad.numpy() for t in (tx, tw, tb)]
    return (y.detach().numpy(), *grads)


# --------------------------------------------------------------------------------------------------
# forward and backward against the references


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(("norm", "affine"), GRID)
def test_forward_and_backward(norm, affine, dtype, n):
    rng = np.random.default_rng(n)
    rows = 3 if n >= 1000 else 6
    x, w, b = _inputs(rng, (rows, n), dtype, n, affine)
    dy = rng.standard_normal((rows, n)).astype(dtype)
    eps = DEFAULT_EPS[norm](dtype)

    y = _forward(norm, x, w, b)
    assert y.dtype == dtype and y.shape == x.shape
    ey, size = ref_forward(norm, x, w, b, eps)
    assert rowwise_error(y, ey, size) <= FWD_TOL[dtype]

    dx, dw, db = _backward(norm, dy, x, w, b)
    edx, edw, edb, dsize, wsize = ref_backward(norm, dy, x, w, eps)
    assert dx.dtype == dtype and dx.shape == x.shape
    assert rowwise_error(dx, edx, dsize) <= BWD_TOL[dtype]
    if w is None:
        assert dw is None
    else:
        assert dw.dtype == dtype and dw.shape == w.shape
        assert termwise_error(dw, edw, wsize) <= BWD_TOL[dtype]
    if b is None:
        assert db is None
    else:
        assert termwise_error(db, edb, np.abs(dy.astype(np.float64)).sum(axis=0)) <= BWD_TOL[dtype]


@needs_torch
@pytest.mark.parametrize("n", (7, 1000, 8191))
@pytest.mark.parametrize("dtype", (np.float32, np.float64), ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(("norm", "affine"), GRID)
def test_agrees_with_torch(norm, affine, dtype, n):
    """normax is within its tolerance of the float64 reference, and torch within its own error of
    normax: |normax - torch| <= tol * size + |torch - reference|."""
    rng = np.random.default_rng(n + 1)
    x, w, b = _inputs(rng, (4, n), dtype, n, affine)
    dy = rng.standard_normal((4, n)).astype(dtype)
    eps = DEFAULT_EPS[norm](dtype)
    if norm == "crms":  # torch has no crms_norm: compare to the float64 zero-mean-vector identity
        ty, tdx, tdw, _ = torch_forward_backward(
            norm,
            x.astype(np.float64),
            None if w is None else w.astype(np.float64),
            None,
            dy.astype(np.float64),
            eps,
        )
        tdb = None
    else:
        ty, tdx, tdw, tdb = torch_forward_backward(norm, x, w, b, dy, eps)
    y = _forward(norm, x, w, b)
    dx, dw, db = _backward(norm, dy, x, w, b)
    ey, size = ref_forward(norm, x, w, b, eps)
    edx, edw, edb, dsize, wsize = ref_backward(norm, dy, x, w, eps)
    tol, btol = FWD_TOL[dtype], BWD_TOL[dtype]
    assert np.all(np.abs(y - ty) <= tol * size.max(axis=1, keepdims=True) + np.abs(ty - ey))
    assert np.all(np.abs(dx - tdx) <= btol * dsize.max(axis=1, keepdims=True) + np.abs(tdx - edx))
    if w is not None:
        assert np.all(np.abs(dw - tdw) <= btol * wsize + np.abs(tdw - edw))
    if b is not None:
        assert np.all(np.abs(db - tdb) <= btol * np.abs(dy).sum(axis=0) + np.abs(tdb - edb))


AXIS_FORMS = [
    (-1, 1),
    (2, 1),
    ((-1,), 1),
    ((1, 2), 2),
    ((-2, -1), 2),
    ((2, 1), 2),
    ((0, 1, 2), 3),
]


@pytest.mark.parametrize(("axis", "k"), AXIS_FORMS, ids=str)
@pytest.mark.parametrize("norm", NORMS)
def test_axis_forms(norm, axis, k):
    """axis as an int or a tuple of trailing axes (any order, negative or not): the normalized shape
    is x.shape[-k:], with weight/bias of that shape, as torch's normalized_shape."""
    rng = np.random.default_rng(k)
    shape = (3, 4, 5)
    x, w, b = _inputs(rng, shape, np.float64, shape[3 - k :], "weight+bias" if norm == "layer" else "weight")
    dy = rng.standard_normal(shape)
    eps = DEFAULT_EPS[norm](np.float64)
    y = _forward(norm, x, w, b, axis=axis)
    ey, size = ref_forward(norm, x, w, b, eps, k)
    assert rowwise_error(y, ey, size, k) <= FWD_TOL[np.float64]
    dx, dw, _ = _backward(norm, dy, x, w, b, axis=axis)
    edx, edw, _, dsize, wsize = ref_backward(norm, dy, x, w, eps, k)
    assert rowwise_error(dx, edx, dsize, k) <= BWD_TOL[np.float64]
    assert dw.shape == w.shape
    assert termwise_error(dw.reshape(-1), edw, wsize) <= BWD_TOL[np.float64]
    if torch is not None and norm != "crms":
        ty, tdx, tdw, _ = torch_forward_backward(norm, x, w, b, dy, eps, k)
        np.testing.assert_allclose(y, ty, rtol=0, atol=1e-12)
        np.testing.assert_allclose(dx, tdx, rtol=0, atol=1e-12)
        np.testing.assert_allclose(dw, tdw, rtol=0, atol=1e-12)


def _strided_views(x):
    """Views of x's values with other memory layouts: (name, view, equivalent C-contiguous array)."""
    big = np.repeat(x, 2, axis=-1)
    yield "step 2", big[..., ::2], big[..., ::2].copy()
    yield "reversed rows", x[::-1], x[::-1].copy()
    yield "reversed columns", x[:, ::-1], x[:, ::-1].copy()
    yield "transposed", np.ascontiguousarray(x.T).T, x
    yield "fortran", np.asfortranarray(x), x
    yield "byteswapped", x.astype(x.dtype.newbyteorder()), x


@pytest.mark.parametrize("norm", NORMS)
def test_strided_inputs(norm):
    """Any memory layout of x, dy and weight gives the same bits as the contiguous array."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 33)).astype(np.float32)
    dy = rng.standard_normal((5, 33)).astype(np.float32)
    w = rng.standard_normal(66).astype(np.float32)[::2]
    b = rng.standard_normal(33).astype(np.float32) if norm == "layer" else None
    wc = w.copy()
    for name, view, same in _strided_views(x):
        assert np.array_equal(_forward(norm, view, w, b), _forward(norm, same, wc, b)), name
        _, dview, dsame = next(v for v in _strided_views(dy) if v[0] == name)
        got, want = _backward(norm, dview, view, w, b), _backward(norm, dsame, same, wc, b)
        for g, e in zip(got, want):
            assert (g is None and e is None) or np.array_equal(g, e), name


def test_variance_is_stable_far_from_zero():
    """Rows with mean 1e4 and spread 1e-2 (float32 spacing there is 1e-3): the variance is 1e-4
    while E[x^2] is 1e8, so E[x^2] - E[x]^2 would lose all digits; the two-pass variance keeps the
    normal float32 accuracy, forward and backward."""
    rng = np.random.default_rng(4)
    for n in (7, 4096):
        x = (1e4 + 1e-2 * rng.standard_normal((3, n))).astype(np.float32)
        dy = rng.standard_normal((3, n)).astype(np.float32)
        naive = np.mean(x * x, axis=1, dtype=np.float32) - np.mean(x, axis=1, dtype=np.float32) ** 2
        true_var = np.var(x.astype(np.float64), axis=1)
        assert np.max(np.abs(naive - true_var) / true_var) >= 0.5  # the hazard is real
        y, mean, rstd = normax.layer_norm(x, eps=0.0, return_stats=True)
        ey, size = ref_forward("layer", x, None, None, 0.0)
        assert rowwise_error(y, ey, size) <= FWD_TOL[np.float32]
        np.testing.assert_allclose(rstd, 1 / np.sqrt(true_var), rtol=16 * U32)
        np.testing.assert_allclose(mean, x.astype(np.float64).mean(axis=1), rtol=U64 * 64)
        dx, _, _ = normax.layer_norm_backward(dy, x, eps=0.0)
        edx, _, _, dsize, _ = ref_backward("layer", dy, x, None, 0.0)
        assert rowwise_error(dx, edx, dsize) <= BWD_TOL[np.float32]


@pytest.mark.parametrize("dtype", (np.float32, np.float16), ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("norm", NORMS)
def test_zero_rows(norm, dtype):
    """A row of zeros normalizes to zeros, not NaN, for eps > 0 (rms_norm's default eps too), and
    its gradient is finite and right (rstd = 1/sqrt(eps) there)."""
    x = np.zeros((2, 16), dtype)
    x[1] = np.arange(16)
    w = np.full(16, 2, dtype)
    dy = np.arange(16, dtype=dtype)[::-1] * np.ones((2, 1), dtype)
    y = _forward(norm, x, w, None)
    assert np.all(y[0] == 0)
    dx, _, _ = _backward(norm, dy, x, w, None)
    assert np.all(np.isfinite(dx))
    eps = DEFAULT_EPS[norm](dtype)
    edx, _, _, dsize, _ = ref_backward(norm, dy, x, w, eps)
    assert np.abs(edx[0]).max() > 100  # 1/sqrt(eps) scales the zero row's gradient
    assert rowwise_error(dx, edx, dsize) <= BWD_TOL[dtype]


def test_bfloat16_and_integer_inputs():
    """bfloat16 (ml_dtypes) is computed in float32 and returned as bfloat16, with rms_norm's default
    eps that of bfloat16; integers become float64, as the other ops."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = np.random.default_rng(13).standard_normal((3, 40)).astype(ml_dtypes.bfloat16)
    y = normax.rms_norm(x)
    assert y.dtype == ml_dtypes.bfloat16
    eps = float(ml_dtypes.finfo(ml_dtypes.bfloat16).eps)
    ey, size = ref_forward("rms", x.astype(np.float64), None, None, eps)
    assert rowwise_error(y.astype(np.float64), ey, size) <= 2.0**-8 + 16 * U32  # bfloat16 rounding
    yi = normax.layer_norm(np.arange(12).reshape(3, 4))
    assert yi.dtype == np.float64
    np.testing.assert_allclose(yi, normax.layer_norm(np.arange(12.0).reshape(3, 4)), rtol=0, atol=0)


def test_out_argument():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 10)).astype(np.float32)
    w = rng.standard_normal(10).astype(np.float32)
    want = normax.rms_norm(x, w)
    out = np.empty_like(x)
    assert normax.rms_norm(x, w, out=out) is out
    assert np.array_equal(out, want)
    inplace = x.copy()
    assert normax.rms_norm(inplace, w, out=inplace) is inplace
    assert np.array_equal(inplace, want)
    strided = np.empty((4, 20), np.float32)[:, ::2]
    normax.layer_norm(x, out=strided)
    assert np.array_equal(strided, normax.layer_norm(x))
    half = np.empty((4, 10), np.float16)
    normax.crms_norm(x.astype(np.float16), out=half)
    assert np.array_equal(half, normax.crms_norm(x.astype(np.float16)))
    with pytest.raises(ValueError, match="out"):
        normax.rms_norm(x, out=np.empty((4, 11), np.float32))
    with pytest.raises(TypeError, match="out"):
        normax.rms_norm(x, out=np.empty((4, 10), np.float64))
    ro = np.empty_like(x)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out"):
        normax.rms_norm(x, out=ro)


@pytest.mark.parametrize("norm", NORMS)
def test_saved_statistics(norm):
    """return_stats gives float64 statistics of the rows' shape; the backward given them returns the
    same bits as the backward that recomputes them."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 3, 50)).astype(np.float32)
    dy = rng.standard_normal((2, 3, 50)).astype(np.float32)
    w = rng.standard_normal(50).astype(np.float32)
    eps = DEFAULT_EPS[norm](np.float32)
    res = _forward(norm, x, w, None, return_stats=True)
    emean, erstd = ref_stats(norm, _rows(x, 1), eps)
    if norm == "layer":
        y, mean, rstd = res
        assert mean.dtype == np.float64 and mean.shape == (2, 3)
        # m0 + mean(x - m0): the float32 differences round at |x|, so the mean is good to U32 * |x|.
        scale = np.abs(x).max(axis=-1).reshape(-1)
        assert np.all(np.abs(mean.reshape(-1) - emean) <= 4 * U32 * scale)
        saved = {"mean": mean, "rstd": rstd}
    else:
        y, rstd = res
        saved = {"rstd": rstd}
    assert rstd.dtype == np.float64 and rstd.shape == (2, 3)
    np.testing.assert_allclose(rstd.reshape(-1), erstd, rtol=64 * U32)
    assert np.array_equal(y, _forward(norm, x, w, None))
    for got, want in zip(_backward(norm, dy, x, w, None, **saved), _backward(norm, dy, x, w, None)):
        assert (got is None and want is None) or np.array_equal(got, want)
    with pytest.raises(ValueError, match="rstd"):
        _backward(norm, dy, x, w, None, **{**saved, "rstd": rstd[0]})
    if norm == "layer":
        with pytest.raises(ValueError, match="rstd"):
            normax.layer_norm_backward(dy, x, w, mean=mean)
        with pytest.raises(ValueError, match="mean"):
            normax.layer_norm_backward(dy, x, w, rstd=rstd)


def test_bad_inputs_name_the_argument():
    x = np.ones((3, 4, 5), np.float32)
    with pytest.raises(ValueError, match="weight"):
        normax.rms_norm(x, np.ones(4))
    with pytest.raises(ValueError, match="weight"):
        normax.layer_norm(x, np.ones((4, 5)))  # normalized shape is (5,) for axis=-1
    with pytest.raises(ValueError, match="bias"):
        normax.layer_norm(x, np.ones(5), np.ones(6))
    with pytest.raises(ValueError, match="weight"):
        normax.crms_norm_backward(x, x, np.ones(3))
    for axis in (0, 1, (0, 2), (0, 1)):
        with pytest.raises(ValueError, match="axis"):
            normax.layer_norm(x, axis=axis)
        with pytest.raises(ValueError, match="axis"):
            normax.rms_norm_backward(x, x, axis=axis)
    with pytest.raises(ValueError, match="axis"):
        normax.rms_norm(x, axis=())
    with pytest.raises(np.exceptions.AxisError):
        normax.rms_norm(x, axis=3)
    with pytest.raises(TypeError, match="axis"):
        normax.rms_norm(x, axis=None)
    with pytest.raises(ValueError, match="dy"):
        normax.layer_norm_backward(x[:2], x)
    with pytest.raises(ValueError, match="eps"):
        normax.rms_norm(x, eps=-1.0)
    with pytest.raises(ValueError, match="eps"):
        normax.layer_norm(x, eps=float("nan"))
    with pytest.raises(TypeError):
        normax.rms_norm(x.astype(np.complex64))


def test_weight_gradient_does_not_depend_on_thread_count(num_threads):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3000, 96)).astype(np.float32)
    dy = rng.standard_normal((3000, 96)).astype(np.float32)
    w, b = np.ones(96, np.float32), np.zeros(96, np.float32)
    results = []
    for n in (1, 2, 3):
        normax.set_num_threads(n)
        results.append(normax.layer_norm_backward(dy, x, w, b))
    for other in results[1:]:
        for got, want in zip(other, results[0]):
            assert np.array_equal(got, want)


@pytest.mark.parametrize("norm", NORMS)
def test_large_outputs_give_the_same_bits(norm):
    """Outputs of 32 MiB and more are written with streaming stores (rows of 1023 float32 start
    misaligned); every row is the same bits as when computed in a small array."""
    rng = np.random.default_rng(12)
    x = rng.standard_normal((8300, 1023)).astype(np.float32)
    dy = rng.standard_normal((8300, 1023)).astype(np.float32)
    w = rng.standard_normal(1023).astype(np.float32)
    y = _forward(norm, x, w, None)
    dx, _, _ = _backward(norm, dy, x, None, None)
    for rows in (slice(0, 3), slice(4000, 4005), slice(8297, 8300)):
        assert np.array_equal(y[rows], _forward(norm, x[rows], w, None))
        assert np.array_equal(dx[rows], _backward(norm, dy[rows], x[rows], None, None)[0])


def test_empty_inputs():
    x = np.ones((0, 8), np.float32)
    assert normax.layer_norm(x).shape == (0, 8)
    dx, dw, db = normax.layer_norm_backward(x, x, np.ones(8), np.ones(8))
    assert dx.shape == (0, 8) and np.array_equal(dw, np.zeros(8)) and np.array_equal(db, np.zeros(8))
    y, rstd = normax.rms_norm(np.ones((3, 0)), return_stats=True)
    assert y.shape == (3, 0) and np.all(np.isnan(rstd))


@pytest.mark.parametrize("norm", NORMS)
def test_every_isa(norm, isa):
    """The same checks on each SIMD path this CPU supports (f32 and f64, a tail length and a long row)."""
    rng = np.random.default_rng(8)
    for dtype in (np.float32, np.float64):
        for n in (7, 1000):
            x, w, b = _inputs(rng, (5, n), dtype, n, "weight+bias" if norm == "layer" else "weight")
            dy = rng.standard_normal((5, n)).astype(dtype)
            eps = DEFAULT_EPS[norm](dtype)
            ey, size = ref_forward(norm, x, w, b, eps)
            assert rowwise_error(_forward(norm, x, w, b), ey, size) <= FWD_TOL[dtype], isa
            dx, dw, _ = _backward(norm, dy, x, w, b)
            edx, edw, _, dsize, wsize = ref_backward(norm, dy, x, w, eps)
            assert rowwise_error(dx, edx, dsize) <= BWD_TOL[dtype], isa
            assert termwise_error(dw, edw, wsize) <= BWD_TOL[dtype], isa


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 4),
    n=st.integers(1, 40),
    k=st.integers(-30, 30),
    seed=st.integers(0, 2**16),
)
def test_power_of_two_scaling_is_exact(rows, n, k, seed):
    """With eps = 0, scaling x by 2**k scales every sum exactly, so the output is the same bits."""
    x = np.random.default_rng(seed).standard_normal((rows, n)).astype(np.float32)
    for norm in NORMS:
        if norm == "layer" and n == 1:
            continue  # zero variance: 0/0
        a = _forward(norm, x, None, None, eps=0.0)
        b = _forward(norm, np.ldexp(x, k), None, None, eps=0.0)
        assert np.array_equal(a, b), norm


# --------------------------------------------------------------------------------------------------
# PowerNorm


class RefPowerNorm:
    """MaskPowerNorm from the issue's equations, in float64 NumPy: buffers, forward, backward."""

    def __init__(self, c, *, eps, alpha_fwd, alpha_bkw, warmup_iters, group_num):
        self.c, self.eps, self.g = c, eps, group_num
        self.afwd, self.abkw, self.warmup = alpha_fwd, alpha_bkw, warmup_iters
        self.running_phi, self.ema_gz, self.iters = np.ones(c), np.zeros(c), 0

    def group_scale(self, x):
        """u = x / sqrt(mean over the channel group of x^2 + eps), and that scale s (N, G, 1)."""
        xg = x.reshape(len(x), self.g, -1)
        s = 1 / np.sqrt((xg * xg).mean(axis=-1, keepdims=True) + self.eps)
        return (xg * s).reshape(x.shape), s

    def group_scale_grad(self, du, x, s):
        """Exact gradient through the group scaling: d/dx of x * (mean(x^2) + eps)^-1/2."""
        dug, xg = du.reshape(len(x), self.g, -1), x.reshape(len(x), self.g, -1)
        return (s * dug - xg * s**3 * (dug * xg).mean(axis=-1, keepdims=True)).reshape(x.shape)

    def forward(self, x, w, b, keep, training):
        x = np.asarray(x, np.float64).reshape(-1, self.c)
        u, s = self.group_scale(x)
        if training:
            self.iters += 1
            it = self.iters
            var = (u[keep] ** 2).mean(axis=0)
            z = u / np.sqrt((var if it <= self.warmup else self.running_phi) + self.eps)
            if it < self.warmup:
                self.running_phi = self.running_phi * (it - 1) / it + var / it
            self.running_phi = self.afwd * self.running_phi + (1 - self.afwd) * var
            du_scale = 1 / np.sqrt(var + self.eps)
        else:
            du_scale = 1 / np.sqrt(self.running_phi + self.eps)
            z = u * du_scale
        self.saved = (x, s, z, du_scale, training)
        return w * z + b

    def backward(self, dy, w):
        x, s, z, du_scale, training = self.saved
        dy = np.asarray(dy, np.float64).reshape(-1, self.c)
        g = dy * w
        if training:
            g = g - (1 - self.abkw) * self.ema_gz * z
            self.ema_gz = self.ema_gz + (g * z).mean(axis=0)
        dx = self.group_scale_grad(g * du_scale, x, s)
        return dx, (dy * z).sum(axis=0), dy.sum(axis=0)


def test_reference_group_scaling_gradient_matches_finite_differences():
    ref = RefPowerNorm(8, eps=1e-3, alpha_fwd=0.9, alpha_bkw=0.9, warmup_iters=5, group_num=2)
    rng = np.random.default_rng(9)
    x, du = rng.standard_normal((3, 8)), rng.standard_normal((3, 8))
    _, s = ref.group_scale(x)
    grad = ref.group_scale_grad(du, x, s)
    h = 1e-6
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        fd = ((ref.group_scale(xp)[0] - ref.group_scale(xm)[0]) * du).sum() / (2 * h)
        assert abs(fd - grad[i]) < 1e-7


def _pad_mask(rng, t, b):
    pad = rng.random((b, t)) < 0.3
    pad[:, 0] = False  # every sequence keeps a token
    return pad


def _normwise(a, e):
    e = np.asarray(e, np.float64)
    return float(np.max(np.abs(np.asarray(a, np.float64) - e)) / max(np.max(np.abs(e)), 1e-300))


@pytest.mark.parametrize("ndim", (3, 2))
@pytest.mark.parametrize("padded", (False, True), ids=("no_pad", "pad"))
@pytest.mark.parametrize("group_num", (1, 4))
@pytest.mark.parametrize("dtype", (np.float64, np.float32), ids=lambda d: np.dtype(d).name)
def test_power_norm_matches_reference(dtype, group_num, padded, ndim):
    """20 training steps with warmup_iters=7 (steps before, at and after warmup), then 3 evaluation
    steps: outputs, gradients and the state match the float64 reference at every step.

    float64: 1e-12 normwise. float32: each step rounds like the norms above (~1e-6 normwise); the
    state carries float32-rounded batch statistics from step to step, so 2e-5 after 20 steps.
    """
    t, bsz, c = 6, 4, 16
    rng = np.random.default_rng(group_num + 2 * padded + 4 * ndim)
    settings_ = {"eps": 1e-5, "alpha_fwd": 0.9, "alpha_bkw": 0.8, "warmup_iters": 7, "group_num": group_num}
    state = normax.PowerNormState(c, **settings_)
    ref = RefPowerNorm(c, **settings_)
    w = (1 + 0.3 * rng.standard_normal(c)).astype(dtype)
    b = (0.3 * rng.standard_normal(c)).astype(dtype)
    tol = 1e-12 if dtype == np.float64 else 2e-5
    for step in range(23):
        training = step < 20
        shape = (t, bsz, c) if ndim == 3 else (t * bsz, c)
        x = (rng.standard_normal(shape) * rng.uniform(0.5, 3, c)).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        pad = _pad_mask(rng, t, bsz) if padded else None
        if ndim == 2 and pad is not None:
            pad = pad.reshape(-1, 1)  # (N, 1): B = N tokens, T = 1
        keep = np.ones(t * bsz, bool) if pad is None else ~pad.T.reshape(-1)
        before = (state.running_phi.copy(), state.ema_gz.copy(), state.iters)

        y, saved = normax.power_norm(x, w, b, state, training=training, pad_mask=pad, return_saved=True)
        ey = ref.forward(x, w.astype(np.float64), b.astype(np.float64), keep, training)
        assert y.dtype == dtype and y.shape == x.shape
        assert _normwise(y.reshape(-1, c), ey) <= tol, step
        dx, dw, db = normax.power_norm_backward(dy, saved, state)
        edx, edw, edb = ref.backward(dy, w.astype(np.float64))
        assert dx.shape == x.shape
        assert _normwise(dx.reshape(-1, c), edx) <= tol, step
        assert _normwise(dw, edw) <= tol and _normwise(db, edb) <= tol, step
        assert state.iters == ref.iters
        np.testing.assert_allclose(state.running_phi, ref.running_phi, rtol=tol)
        np.testing.assert_allclose(state.ema_gz, ref.ema_gz, rtol=0, atol=tol * np.max(np.abs(ref.ema_gz)))
        if not training:
            assert np.array_equal(state.running_phi, before[0]) and np.array_equal(state.ema_gz, before[1])
            assert state.iters == before[2]
    assert state.iters == 20


def test_power_norm_without_affine_and_float16():
    rng = np.random.default_rng(10)
    x = rng.standard_normal((5, 3, 8))
    s16, s64 = normax.PowerNormState(8, warmup_iters=3), normax.PowerNormState(8, warmup_iters=3)
    y16, saved16 = normax.power_norm(x.astype(np.float16), None, None, s16, return_saved=True)
    y64 = normax.power_norm(x.astype(np.float16).astype(np.float64), None, None, s64)
    assert y16.dtype == np.float16
    np.testing.assert_allclose(y16.astype(np.float64), y64, rtol=2 * U16, atol=2 * U16)
    dx, dw, db = normax.power_norm_backward(np.ones_like(y16), saved16, s16)
    assert dx.dtype == np.float16 and dw is None and db is None
    np.testing.assert_allclose(s16.running_phi, s64.running_phi, rtol=1e-6)


@needs_torch
def test_power_norm_matches_the_torch_module():
    """The torch MaskPowerNorm (the oracle of the torch adapter's tests and the benchmark's peer)
    computes what normax computes (float64, with a pad mask, across warmup)."""
    from torch_power_norm import torch_mask_power_norm

    t, bsz, c = 5, 3, 8
    module = torch_mask_power_norm(c, warmup_iters=3, group_num=2, alpha_bkw=0.7).double()
    state = normax.PowerNormState(c, warmup_iters=3, group_num=2, alpha_bkw=0.7)
    rng = np.random.default_rng(11)
    for _ in range(6):
        x = rng.standard_normal((t, bsz, c))
        dy = rng.standard_normal((t, bsz, c))
        pad = _pad_mask(rng, t, bsz)
        tx = torch.tensor(x, requires_grad=True)
        module.zero_grad(set_to_none=True)
        ty = module(tx, torch.tensor(pad))
        ty.backward(torch.tensor(dy))
        y, saved = normax.power_norm(x, np.ones(c), np.zeros(c), state, pad_mask=pad, return_saved=True)
        dx, dw, db = normax.power_norm_backward(dy, saved, state)
        np.testing.assert_allclose(y, ty.detach().numpy(), rtol=0, atol=1e-12)
        np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=0, atol=1e-12)
        np.testing.assert_allclose(dw, module.weight.grad.numpy(), rtol=0, atol=1e-12)
        np.testing.assert_allclose(db, module.bias.grad.numpy(), rtol=0, atol=1e-12)
        np.testing.assert_allclose(state.running_phi, module.running_phi.numpy(), rtol=1e-13)
        np.testing.assert_allclose(state.ema_gz, module.ema_gz.numpy(), rtol=0, atol=1e-13)


def test_power_norm_bad_inputs():
    state = normax.PowerNormState(8, group_num=2)
    x = np.ones((4, 3, 8))
    w = np.ones(8)
    with pytest.raises(ValueError, match="pad_mask"):
        normax.power_norm(x, w, w, state, pad_mask=np.zeros((4, 3), bool))  # (T, B), not (B, T)
    with pytest.raises(ValueError, match="pad_mask"):
        normax.power_norm(x[0], w, w, state, pad_mask=np.zeros((2, 1), bool))
    with pytest.raises(TypeError, match="pad_mask"):
        normax.power_norm(x, w, w, state, pad_mask=np.zeros((3, 4)))
    with pytest.raises(ValueError, match="weight"):
        normax.power_norm(x, np.ones(7), w, state)
    with pytest.raises(ValueError, match="bias"):
        normax.power_norm(x, w, np.ones((1, 8)), state)
    with pytest.raises(ValueError, match="x"):
        normax.power_norm(np.ones((4, 3, 6)), None, None, state)
    with pytest.raises(ValueError, match="x"):
        normax.power_norm(np.ones(8), None, None, state)
    with pytest.raises(TypeError, match="state"):
        normax.power_norm(x, w, w, object())
    with pytest.raises(ValueError, match="group_num"):
        normax.PowerNormState(8, group_num=3)
    with pytest.raises(ValueError, match="alpha_fwd"):
        normax.PowerNormState(8, alpha_fwd=1.5)
    with pytest.raises(ValueError, match="num_features"):
        normax.PowerNormState(0)
    _, saved = normax.power_norm(x, w, w, state, return_saved=True)
    with pytest.raises(ValueError, match="dy"):
        normax.power_norm_backward(np.ones((4, 8)), saved, state)
    assert state.iters == 1  # the failed calls changed nothing
