"""StableMax (Prieto et al. 2025, "Grokking at the Edge of Numerical Stability"): normax.stablemax,
log_stablemax, their backwards and cross_entropy(normalizer="stablemax"), against a float64 NumPy
reference of the paper's definition s(x) = x + 1 (x >= 0), 1 / (1 - x) (x < 0), normalized.

Tolerances: float32 results are a few roundings from the float64 reference (s(x), the float32
partial sums, 1/sum, the product): relative 8 * 2^-24. float64 results: 8 * 2^-53 plus the
reference's own rounding (it is float64 too), so 64 * 2^-53.
"""

from __future__ import annotations

import normax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

RTOL = {np.dtype(np.float32): 8 * 2.0**-24, np.dtype(np.float64): 64 * 2.0**-53}


def s_ref(x):
    x = np.asarray(x, np.float64)
    with np.errstate(divide="ignore"):
        return np.where(x >= 0, x + 1.0, 1.0 / (1.0 - np.minimum(x, 0.0)))


def stablemax_ref(x, axis=-1):
    s = s_ref(x)
    return s / s.sum(axis=axis, keepdims=True)


def log_stablemax_ref(x, axis=-1):
    """log of stablemax_ref, the largest element as -log1p(rest / s(max)) (log(y) of a y near 1
    would carry y's rounding, up to 1e-13 relative near 0)."""
    x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    s = s_ref(x)
    total = s.sum(-1, keepdims=True)
    k = np.argmax(x, -1)[..., None]
    rest = np.sum(np.where(np.arange(x.shape[-1]) == k, 0.0, s), -1, keepdims=True)
    out = np.log(s) - np.log(total)
    np.put_along_axis(out, k, -np.log1p(rest / np.take_along_axis(s, k, -1)), -1)
    return np.moveaxis(out, -1, axis)


def _rows(dtype, shape=(7, 1037), scale=10.0, seed=0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_the_definition(isa, dtype):
    for shape, scale in (((7, 1037), 10.0), ((3, 5), 1e3), ((2, 1), 1.0), ((4, 64), 0.1)):
        x = _rows(dtype, shape, scale)
        want = stablemax_ref(x)
        y = normax.stablemax(x)
        assert y.dtype == dtype and y.shape == x.shape
        np.testing.assert_allclose(y, want, rtol=RTOL[np.dtype(dtype)], atol=0)
        ly = normax.log_stablemax(x)
        np.testing.assert_allclose(ly, log_stablemax_ref(x), rtol=RTOL[np.dtype(dtype)], atol=0)


def test_zero_and_signed_zero(isa):
    # s(0) = 1 from both sides, also in float32 (no subnormal threshold: JAX's callback threads
    # run with denormals-are-zero, where such a constant reads as 0).
    for dtype in (np.float32, np.float64):
        x = np.array([[-1.0, 0.0, -0.0, 1.0]], dtype)
        np.testing.assert_allclose(normax.stablemax(x), [[1 / 9, 2 / 9, 2 / 9, 4 / 9]], rtol=4e-7)
        np.testing.assert_allclose(normax.log_stablemax(x), np.log([[1 / 9, 2 / 9, 2 / 9, 4 / 9]]), rtol=4e-7)


def test_axes_out_and_in_place():
    x = _rows(np.float64, (3, 4, 5))
    np.testing.assert_allclose(normax.stablemax(x, axis=1), stablemax_ref(x, 1), rtol=1e-14)
    np.testing.assert_allclose(normax.stablemax(x, axis=(0, 2)), stablemax_ref(x, (0, 2)), rtol=1e-14)
    np.testing.assert_allclose(normax.stablemax(x, axis=None), stablemax_ref(x, None), rtol=1e-14)
    np.testing.assert_allclose(normax.log_stablemax(x, axis=0), log_stablemax_ref(x, 0), rtol=1e-14)
    out = np.empty_like(x)
    assert normax.stablemax(x, out=out) is out
    np.testing.assert_allclose(out, stablemax_ref(x), rtol=1e-14)
    y = x.copy()
    normax.log_stablemax(y, out=y)
    np.testing.assert_allclose(y, log_stablemax_ref(x), rtol=1e-14)
    np.testing.assert_allclose(normax.stablemax(x.T, axis=0), stablemax_ref(x.T, 0), rtol=1e-14)


def test_dtypes_and_0d():
    x16 = _rows(np.float16, (2, 9), 3.0)
    y = normax.stablemax(x16)
    assert y.dtype == np.float16
    np.testing.assert_allclose(y, stablemax_ref(x16.astype(np.float64)), rtol=2**-10)
    yi = normax.stablemax(np.array([[1, 2, -3]]))
    assert yi.dtype == np.float64
    np.testing.assert_allclose(yi, stablemax_ref([[1.0, 2.0, -3.0]]), rtol=1e-15)
    assert normax.stablemax(np.float64(3.0)) == 1.0 and np.isscalar(normax.stablemax(np.float64(3.0)))
    assert normax.log_stablemax(np.float64(-3.0)) == 0.0
    assert not np.signbit(normax.log_stablemax(np.array([[5.0]], np.float32))).any()  # +0, as log_softmax


def test_special_values_and_errors():
    y = normax.stablemax(np.array([[np.nan, 1.0], [np.inf, 1.0], [-np.inf, 1.0], [-np.inf, -np.inf]]))
    assert np.isnan(y[:2]).all() and np.isnan(y[3]).all()
    np.testing.assert_array_equal(y[2], [0.0, 1.0])
    assert normax.log_stablemax(np.array([-np.inf, 0.0]))[0] == -np.inf
    # Values whose float32 partial sums overflow: summed in float64, still exact.
    np.testing.assert_array_equal(
        normax.stablemax(np.full((1, 40), 3e38, np.float32)), np.full((1, 40), 1 / 40, np.float32)
    )
    with pytest.raises(TypeError, match="x"):
        normax.stablemax(np.array([1 + 1j, 2]))
    with pytest.raises(TypeError, match="x"):
        normax.log_stablemax(np.array(["a"]))
    with pytest.raises(np.exceptions.AxisError):
        normax.stablemax(np.ones((2, 2)), axis=2)


def test_log_of_a_dominant_element_keeps_its_relative_accuracy(isa):
    # log y_max = -log1p(rest / s(max)): near 0, not the rounding of log s(max) - log(sum).
    for big in (1e4, 1e6, 3e7):
        x = np.array([[big, 0.5, -3.0, 0.0]], np.float32)
        want = -np.log1p((s_ref(x[0, 1:]).sum()) / s_ref(np.float64(x[0, 0])))
        got = normax.log_stablemax(x)[0, 0]
        assert abs(got - want) <= 8 * 2.0**-24 * abs(want), (big, got, want)
        assert got < 0.0


def test_long_rows():
    n = (1 << 18) + 7
    x = _rows(np.float32, (1, n), 5.0)
    np.testing.assert_allclose(normax.stablemax(x), stablemax_ref(x), rtol=16 * 2.0**-24)
    np.testing.assert_allclose(normax.log_stablemax(x), log_stablemax_ref(x), rtol=16 * 2.0**-24)


def _torch_ref(x, dim, log):
    xt = torch.from_numpy(np.asarray(x, np.float64)).requires_grad_()
    s = torch.where(xt >= 0, xt + 1, 1 / (1 - xt.clamp(max=0)))
    y = s / s.sum(dim, keepdim=True)
    return xt, (torch.log(y) if log else y)


@pytest.mark.parametrize("log", [False, True])
def test_backwards_against_autograd_of_the_definition(isa, log):
    x = _rows(np.float64, (5, 33), 4.0)
    x[0, 0] = 0.0  # s is differentiable at 0 (both sides give 1)
    dy = np.random.default_rng(9).standard_normal(x.shape)
    for axis in (-1, 0):
        xt, yt = _torch_ref(x, axis, log)
        (yt * torch.from_numpy(dy)).sum().backward()
        fwd, bwd = (
            (normax.log_stablemax, normax.log_stablemax_backward)
            if log
            else (normax.stablemax, normax.stablemax_backward)
        )
        y = fwd(x, axis=axis)
        dx = bwd(y, dy, x, axis=axis)
        np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="x"):
        normax.stablemax_backward(y, dy, x[:, :3])
    with pytest.raises(ValueError, match="dy"):
        normax.log_stablemax_backward(y, dy[:, :3], x)
    # float32: computed in float32.
    x32 = x.astype(np.float32)
    y32 = fwd(x32)
    dx32 = bwd(y32, dy.astype(np.float32), x32)
    assert dx32.dtype == np.float32
    xt, yt = _torch_ref(x32, -1, log)
    (yt * torch.from_numpy(dy)).sum().backward()
    np.testing.assert_allclose(dx32, xt.grad.numpy(), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# cross_entropy(normalizer="stablemax")


def _ce_ref(x, target, weight=None, label_smoothing=0.0, z_loss=0.0, softcap=None, reduction="mean"):
    """torch's cross-entropy rules with log_stablemax for log_softmax, in float64 autograd; z_loss on
    log(sum(s(x))). Class dim last; (loss, dloss/dx)."""
    xt = torch.from_numpy(np.asarray(x, np.float64)).requires_grad_()
    xc = xt if softcap is None else softcap * torch.tanh(xt / softcap)
    s = torch.where(xc >= 0, xc + 1, 1 / (1 - xc.clamp(max=0)))
    log_norm = torch.log(s.sum(-1))
    logp = torch.log(s) - log_norm[..., None]
    t = torch.from_numpy(np.asarray(target))
    w = None if weight is None else torch.from_numpy(np.asarray(weight, np.float64))
    # torch's cross_entropy of normalized log-probabilities is its NLL with smoothing: logsumexp(logp) = 0.
    loss = torch.nn.functional.cross_entropy(
        logp.reshape(-1, x.shape[-1]), t.reshape(-1) if t.dtype == torch.int64 else t.reshape(-1, x.shape[-1]),
        weight=w, label_smoothing=label_smoothing, reduction="none",
    )  # fmt: skip
    if t.dtype == torch.int64:
        kept = t.reshape(-1) != -100
        wy = torch.ones_like(loss) if w is None else w[t.reshape(-1).clamp(min=0)]
        loss = loss + z_loss * log_norm.reshape(-1) ** 2 * kept
        denom = (wy * kept).sum()
    else:
        loss = loss + z_loss * log_norm.reshape(-1) ** 2
        denom = torch.tensor(float(loss.numel()), dtype=torch.float64)
    if reduction == "mean":
        total = loss.sum() / denom
    elif reduction == "sum":
        total = loss.sum()
    else:
        total = loss.reshape(np.shape(x)[:-1])
    total.sum().backward()
    return total.detach().numpy(), xt.grad.numpy()


CE_CASES = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"label_smoothing": 0.1},
    {"z_loss": 1e-3},
    {"softcap": 5.0},
    {"weight": True},
    {"weight": True, "label_smoothing": 0.2, "z_loss": 1e-4, "softcap": 20.0},
]


@pytest.mark.parametrize("kw", CE_CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_stablemax_matches_the_definition(kw, dtype):
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((6, 11)) * 5).astype(dtype)
    target = rng.integers(0, 11, size=6)
    target[2] = -100
    kw = dict(kw)
    if kw.pop("weight", False):
        kw["weight"] = rng.uniform(0.5, 2.0, size=11).astype(dtype)
    want_loss, want_grad = _ce_ref(x, target, **kw)
    loss = normax.cross_entropy(x, target, normalizer="stablemax", **kw)
    loss2, grad = normax.cross_entropy_with_grad(x, target, normalizer="stablemax", **kw)
    tol = 1e-12 if dtype == np.float64 else 4e-7
    np.testing.assert_allclose(loss, want_loss, rtol=tol, atol=tol)
    np.testing.assert_allclose(loss2, want_loss, rtol=tol, atol=tol)
    assert np.asarray(loss).dtype == dtype and grad.dtype == dtype
    np.testing.assert_allclose(grad, want_grad, rtol=tol, atol=tol * np.abs(want_grad).max())


def test_cross_entropy_stablemax_probabilities_axis_inplace():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 7)) * 3
    p = rng.dirichlet(np.ones(7), size=4)
    want_loss, want_grad = _ce_ref(x, p, label_smoothing=0.1)
    loss, grad = normax.cross_entropy_with_grad(x, p, normalizer="stablemax", label_smoothing=0.1)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-12)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-11, atol=1e-15)
    # Classes on axis 0, in place.
    xt = np.ascontiguousarray(x.T)
    target = np.array([1, 0, 6, 3])
    want_loss, want_grad = _ce_ref(x, target)
    loss, g = normax.cross_entropy_with_grad(xt, target, axis=0, normalizer="stablemax", inplace=True)
    assert g is xt
    np.testing.assert_allclose(loss, want_loss, rtol=1e-12)
    np.testing.assert_allclose(xt.T, want_grad, rtol=1e-11, atol=1e-15)


def test_cross_entropy_default_is_softmax_and_unknown_normalizers_raise():
    x = np.random.default_rng(6).standard_normal((3, 4))
    t = np.array([0, 1, 2])
    assert normax.cross_entropy(x, t) == normax.cross_entropy(x, t, normalizer="softmax")
    assert normax.cross_entropy(x, t) != normax.cross_entropy(x, t, normalizer="stablemax")
    for bad in ("StableMax", "sparsemax", None, 1):
        with pytest.raises(ValueError, match="normalizer"):
            normax.cross_entropy(x, t, normalizer=bad)
        with pytest.raises(ValueError, match="normalizer"):
            normax.cross_entropy_with_grad(x, t, normalizer=bad)
    with pytest.raises(IndexError, match="target"):
        normax.cross_entropy(x, np.array([0, 1, 9]), normalizer="stablemax")


def test_stablemax_does_not_collapse_where_softmax_does():
    # A margin of 40 in float32: softmax's probability of the target rounds to 1, StableMax's
    # (s = 41 against 1/(1+x) for the rest) does not; its loss is the float64 value.
    x = np.full((1, 10), -1.0, np.float32)
    x[0, 0] = 40.0
    loss, grad = normax.cross_entropy_with_grad(x, np.array([0]), normalizer="stablemax")
    want_loss, want_grad = _ce_ref(x.astype(np.float64), np.array([0]))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-6)
    assert grad[0, 0] < 0.0
