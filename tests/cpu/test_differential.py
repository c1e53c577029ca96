"""Differential fuzzing against float64 references (issue 13, "Keep").

hypothesis draws shapes, axes, dtypes and value ranges, extremes included (offsets far from 0,
spreads past exp's range, -inf entries, magnitudes whose squares over- or underflow the dtype,
ignored targets, class weights); every result is compared with a reference computed in float64
(long double for float64 softmax) from the very values normax received. The example budget is
bounded and derandomized, so CI runs the same examples every time, in a few seconds.

Tolerances (u: unit roundoff, 2**-24 float32, 2**-53 float64):
- softmax family: as test_softmax.py (`TOL`: relative 1e-6 / 32 u; log-domain results relative
  to max(1, |result|, |lse|));
- cross-entropy: a loss is a log-sum-exp minus a logit, so its error is a few u of the logits'
  magnitude (times the row count for a sum); gradients are softmax - target, a few u of 1;
  tolerances 64 u of those scales;
- norms: outputs are O(1) (xhat times a weight of O(1)), their error a few u each of the mean,
  the mean square and the product; 64 u absolute, times sqrt(len) for the crowded rows where one
  element carries the whole row (|xhat| up to sqrt(len)).
"""

from __future__ import annotations

import normax
import numpy as np
import torch
import torch.nn.functional as F
from accuracy import UNIT_ROUNDOFF, rel_error, scaled_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .softmax_reference import TINY, TOL, log_scale, reference

BUDGET = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

DTYPES = st.sampled_from([np.float32, np.float64])


@st.composite
def arrays(draw, max_ndim=3, max_side=40, finite_only=False):
    """(x, dtype, seed-derived pieces): values = offset + spread * normal, with extremes mixed in."""
    dtype = np.dtype(draw(DTYPES))
    ndim = draw(st.integers(1, max_ndim))
    shape = tuple(draw(st.lists(st.integers(1, max_side), min_size=ndim, max_size=ndim)))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    big = 1e4 if dtype == np.float32 else 1e6
    offset = draw(st.sampled_from([0.0, 1.0, -50.0, 80.0, big, -big]))
    spread = draw(st.sampled_from([1e-6, 1.0, 10.0, 200.0, 2000.0]))
    x = offset + spread * rng.standard_normal(shape)
    if not finite_only and draw(st.booleans()):
        # -inf entries (masked logits); each row keeps a finite element (reference's domain).
        x = np.where(rng.random(shape) < 0.2, -np.inf, x)
    return x.astype(dtype), dtype, rng


@given(data=st.data())
@BUDGET
def test_softmax_family_matches_the_reference(data):
    x, dtype, _ = data.draw(arrays())
    axis = data.draw(st.integers(-x.ndim, x.ndim - 1))
    # Keep a finite element in every row along `axis`.
    first = [slice(None)] * x.ndim
    first[axis] = slice(0, 1)
    x[tuple(first)] = np.where(np.isfinite(x[tuple(first)]), x[tuple(first)], 0)
    sm, lsm, lse = reference(x, axis)
    y = normax.softmax(x, axis=axis)
    ly = normax.log_softmax(x, axis=axis)
    l = normax.logsumexp(x, axis=axis, keepdims=True)
    assert y.dtype == ly.dtype == l.dtype == dtype
    assert rel_error(y, sm, TINY[dtype]) <= TOL[dtype]
    assert scaled_error(ly, lsm, log_scale(lsm, lse)) <= TOL[dtype]
    assert scaled_error(l, lse, np.maximum(1.0, np.abs(lse))) <= TOL[dtype]


@given(data=st.data())
@BUDGET
def test_cross_entropy_matches_torch_in_float64(data):
    x, dtype, rng = data.draw(arrays(max_ndim=2, max_side=50, finite_only=True))
    logits = x.reshape(x.shape[0], -1) if x.ndim == 2 else x[None]
    rows, classes = logits.shape
    target = rng.integers(0, classes, rows)
    target[rng.random(rows) < 0.2] = -100
    weight = data.draw(st.sampled_from([None, "random"]))
    if weight == "random":
        weight = rng.uniform(0.0, 2.0, classes).astype(dtype)
    reduction = data.draw(st.sampled_from(["mean", "sum", "none"]))
    smoothing = data.draw(st.sampled_from([0.0, 0.1, 0.7]))
    kw = {"weight": weight, "reduction": reduction, "label_smoothing": smoothing}

    t_logits = torch.tensor(logits.astype(np.float64), requires_grad=True)
    t_weight = None if weight is None else torch.tensor(weight.astype(np.float64))
    ref = F.cross_entropy(
        t_logits, torch.tensor(target), weight=t_weight, reduction=reduction, label_smoothing=smoothing
    )
    (ref_grad,) = torch.autograd.grad(ref.sum(), t_logits)
    ref = ref.detach().numpy()

    loss, grad = normax.cross_entropy_with_grad(logits, target, **kw)
    assert np.asarray(loss).dtype == grad.dtype == dtype
    u = UNIT_ROUNDOFF[dtype]
    w = np.ones(classes) if weight is None else weight.astype(np.float64)
    denom = w[target[target != -100]].sum() if reduction == "mean" else 1.0
    if denom == 0:  # a mean over zero weight: NaN, as torch's
        assert np.isnan(loss) and np.isnan(ref)
        return
    # Log-domain: a few u of the logits' magnitude (spread and offset) per row, weighted, summed.
    mag = 1.0 + np.max(np.abs(logits))
    terms = 1.0 if reduction == "none" else max(1, rows)
    wmax = max(1.0, float(np.max(w)))
    assert scaled_error(loss, ref, 64 * u * mag * terms * wmax / denom) <= 1.0
    # Gradients: (softmax - target) times the row's weight / denom: a few u of that factor.
    assert scaled_error(grad, ref_grad.numpy(), 64 * u * wmax / denom) <= 1.0
    # The loss alone is the same number.
    np.testing.assert_array_equal(normax.cross_entropy(logits, target, **kw), loss)


def _norm_reference(norm, x, eps):
    """The norm in float64 from x scaled to ~1 (and eps scaled to match): homogeneous of degree
    0, so nothing over- or underflows whatever x's magnitude."""
    x64 = x.astype(np.float64)
    most = np.max(np.abs(x64), axis=-1, keepdims=True)
    k = np.where(most > 0, 2.0 ** -np.floor(np.log2(np.where(most > 0, most, 1.0))), 1.0)
    with np.errstate(over="ignore"):  # eps k^2 = inf: 1/sqrt(inf) = 0, as it should be
        xk, ek = x64 * k, (np.sqrt(eps) * k) ** 2
    n = x.shape[-1]
    if norm == "layer":
        c = xk - xk.mean(-1, keepdims=True)
        return c / np.sqrt((c * c).mean(-1, keepdims=True) + ek)
    if norm == "rms":
        return xk / np.sqrt((xk * xk).mean(-1, keepdims=True) + ek)
    ms = ((xk * xk).sum(-1, keepdims=True) + xk.sum(-1, keepdims=True) ** 2) / (n + 1)
    return xk / np.sqrt(ms + ek)


@given(data=st.data())
@BUDGET
def test_norms_match_the_reference(data):
    dtype = np.dtype(data.draw(DTYPES))
    ndim = data.draw(st.integers(1, 3))
    shape = tuple(data.draw(st.lists(st.integers(1, 70), min_size=ndim, max_size=ndim)))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    # Magnitudes across the whole range, the squares' overflow and underflow included.
    top = 1e37 if dtype == np.float32 else 1e300
    low = 1e-40 if dtype == np.float32 else 1e-300
    scale = data.draw(st.sampled_from([1.0, 1e-3, 1e3, 3e19, top, 1e-25, low]))
    offset = data.draw(st.sampled_from([0.0, 0.0, 5.0]))
    x = ((offset + rng.standard_normal(shape)) * scale).astype(dtype)
    eps = data.draw(st.sampled_from([1e-5, 1e-12, 1e-300]))
    norm = data.draw(st.sampled_from(["rms", "layer", "crms"]))
    f = {"rms": normax.rms_norm, "layer": normax.layer_norm, "crms": normax.crms_norm}[norm]
    y = f(x, eps=eps)
    ref = _norm_reference(norm, x, eps)
    assert y.dtype == dtype and y.shape == x.shape
    assert np.isfinite(y).all()
    n = shape[-1]
    tol = 64 * UNIT_ROUNDOFF[dtype] * np.sqrt(n) * (1 + offset)
    if np.max(np.abs(x.astype(np.float64))) < 1e-37 and dtype == np.float32:
        tol = max(tol, 2.0**-10)  # subnormal inputs carry fewer digits than the dtype
    np.testing.assert_allclose(y, ref, rtol=0, atol=tol)
