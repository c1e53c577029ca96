"""Extremes handled as documented (issue 13 items 7, 8, 9, 11).

- float64 log_softmax at large offsets is exact to a few ULP (item 7), and so are the float64
  cross-entropy gradients there;
- the norms keep working where the sum of squares overflows or underflows the element type:
  |x| past ~1.8e19 / sqrt(n) in float32, subnormal rows with a tiny eps, and a zero row with an eps
  so small that 1/sqrt(eps) is past the float32 maximum (item 8), forward and backward, every ISA;
- a mean over zero total target weight is NaN as torch's, also with label smoothing or z-loss
  (item 9);
- bad combinations of arguments fail in the caller's terms (item 11).
"""

from __future__ import annotations

import re

import normax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mpmath import mp

NORMS = ("rms", "layer", "crms")


# ---------------------------------------------------------------------------------- item 7


def _mp_log_softmax(x):
    mp.prec = 200
    v = [mp.mpf(float(e)) for e in x]
    lse = mp.log(mp.fsum(mp.exp(e) for e in v))
    return np.array([float(e - lse) for e in v])


def test_float64_log_softmax_is_exact_at_large_offsets():
    # The case: 9.3e-13 off (~22,000 ULP) when log_softmax was x - (hi + lo).
    # Now within an ULP of the correctly rounded result, as scipy and torch.
    x = np.array([1e4, 1e4 - 1])
    np.testing.assert_array_max_ulp(normax.log_softmax(x), _mp_log_softmax(x), maxulp=1)
    rng = np.random.default_rng(7)
    worst = 0.0
    for off in np.linspace(1e4, 6e4, 60):
        for n in (2, 3, 17, 100):
            x = off - rng.uniform(0, 5, n)
            ref = _mp_log_softmax(x)
            got = normax.log_softmax(x)
            # ULPs of each result, but at least of 1: a result near 0 is x - max - log(sum), each
            # term ~1, so its absolute error is a few roundoffs of 1.
            worst = max(worst, float(np.max(np.abs(got - ref) / np.spacing(np.maximum(np.abs(ref), 1.0)))))
    assert worst <= 4, worst


def test_float64_cross_entropy_gradient_is_exact_at_large_offsets():
    mp.prec = 200
    for off in (1e4, 2.5e4, 6e4):
        x = np.array([[off, off - 1, off - 3, off - 0.25]])
        v = [mp.mpf(float(e)) for e in x[0]]
        z = mp.fsum(mp.exp(e) for e in v)
        ref = np.array([float(mp.exp(e) / z) for e in v])
        ref[1] -= 1.0
        _, grad = normax.cross_entropy_with_grad(x, np.array([1]))
        assert np.max(np.abs(grad[0] - ref) / np.spacing(np.abs(ref))) <= 2, (off, grad[0] - ref)


# ---------------------------------------------------------------------------------- item 8


def _forward(norm, x, **kw):
    return {"rms": normax.rms_norm, "layer": normax.layer_norm, "crms": normax.crms_norm}[norm](x, **kw)


def _backward(norm, dy, x, **kw):
    f = {
        "rms": normax.rms_norm_backward,
        "layer": normax.layer_norm_backward,
        "crms": normax.crms_norm_backward,
    }
    return f[norm](dy, x, **kw)


def _reference(norm, x, eps, dy=None):
    """The norm (and dx for `dy`) in float64 torch, on x scaled to ~1 and eps scaled to match:
    the result is homogeneous (degree 0 in x, dx degree -1), so nothing over- or underflows."""
    x64 = x.astype(np.float64)
    k = 2.0 ** -np.floor(np.log2(np.max(np.abs(x64), axis=-1, keepdims=True)))
    t = torch.tensor(x64 * k, requires_grad=True)
    e = torch.tensor((np.sqrt(eps) * k) ** 2)
    if norm == "crms":
        tf = torch.cat([t, -t.sum(-1, keepdim=True)], -1)
        y = t / torch.sqrt((tf * tf).mean(-1, keepdim=True) + e)
    elif norm == "rms":
        y = t / torch.sqrt((t * t).mean(-1, keepdim=True) + e)
    else:
        c = t - t.mean(-1, keepdim=True)
        y = c / torch.sqrt((c * c).mean(-1, keepdim=True) + e)
    if dy is None:
        # A constant LayerNorm row is 0 / sqrt(eps) = 0 for eps > 0, however eps k^2 rounds.
        constant = (x64 == x64.mean(-1, keepdims=True)) & (norm == "layer") & (eps > 0)
        return np.where(constant, 0.0, y.detach().numpy())
    (dx,) = torch.autograd.grad(y, t, torch.tensor(dy.astype(np.float64)))
    return dx.numpy() * k


def _reference_stats(norm, x, eps):
    """mean (LayerNorm) and rstd in float64 from x scaled to ~1 (so nothing over- or underflows)."""
    x64 = x.astype(np.float64)
    k = 2.0 ** -np.floor(np.log2(np.max(np.abs(x64), axis=-1)))
    xk = x64 * k[:, None]
    n = x.shape[-1]
    if norm == "layer":
        ms = xk.var(-1)
    elif norm == "rms":
        ms = (xk * xk).mean(-1)
    else:
        ms = ((xk * xk).sum(-1) + xk.sum(-1) ** 2) / (n + 1)
    with np.errstate(divide="ignore"):
        return x64.mean(-1), np.where(ms == 0, 1 / np.sqrt(eps), k / np.sqrt(ms + (np.sqrt(eps) * k) ** 2))


def _rows(dtype, scale, n, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((3, n)) * scale).astype(dtype)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize(
    "dtype, scale",
    [
        (np.float32, 3e19),  # squares overflow float32
        (np.float32, 1e37),  # near the float32 maximum
        (np.float32, 1e-30),  # squares subnormal: eps decides whether that shows
        (np.float32, 1e-42),  # the row itself subnormal
        (np.float64, 1e160),  # squares overflow float64
        (np.float64, 1e-170),
    ],
)
@pytest.mark.parametrize("n", [1, 7, 64, 1000])
def test_norms_of_huge_and_tiny_rows(isa, norm, dtype, scale, n):
    x = _rows(dtype, scale, n)
    # eps 0: only the row's own size matters, so a wrong scaling cannot hide behind eps (but a
    # LayerNorm row of one element is 0 / 0 then, as torch's).
    for eps in (0.0, 1e-300) if norm != "layer" or n > 1 else (1e-300,):
        y, *stats = _forward(norm, x, eps=eps, return_stats=True)
        ref = _reference(norm, x, eps)
        assert np.all(np.isfinite(y))
        # A few roundoffs of 1 (outputs are ~1; subnormal inputs carry fewer digits).
        tol = 1e-3 if scale < 1e-40 else 64 * np.finfo(dtype).eps
        np.testing.assert_allclose(y, ref, rtol=0, atol=tol * max(1.0, np.sqrt(n)))
        # The statistics (float64 whatever the input) are those of the true, unscaled row.
        ref_mean, ref_rstd = _reference_stats(norm, x, eps)
        np.testing.assert_allclose(stats[-1], ref_rstd, rtol=1e-5 if dtype == np.float32 else 1e-12)
        if norm == "layer":
            np.testing.assert_allclose(stats[0], ref_mean, rtol=1e-12)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype, scale", [(np.float32, 3e19), (np.float32, 1e-30), (np.float64, 1e160)])
@pytest.mark.parametrize("saved", [False, True])
def test_norm_backward_of_huge_and_tiny_rows(isa, norm, dtype, scale, saved):
    n = 33
    x = _rows(dtype, scale, n)
    dy = _rows(dtype, 1.0, n, seed=1)
    kw = {"eps": 0.0}
    if saved:
        _, *stats = _forward(norm, x, eps=0.0, return_stats=True)
        kw.update(zip(("mean", "rstd") if norm == "layer" else ("rstd",), stats))
    out = _backward(norm, dy, x, **kw)
    dx = out[0]
    ref = _reference(norm, x, 0.0, dy)
    assert np.all(np.isfinite(dx)), dx
    scale_ref = np.max(np.abs(ref))
    np.testing.assert_allclose(dx, ref, rtol=0, atol=512 * np.finfo(dtype).eps * scale_ref)


def test_crms_norm_backward_given_the_forward_rstd_is_not_nan():
    # The case: the forward's rstd of a huge row handed to the backward gave NaN.
    x = np.full((2, 256), 3e19, np.float32)
    x[:, ::3] *= -1
    _, rstd = normax.crms_norm(x, return_stats=True)
    dx, _ = normax.crms_norm_backward(np.ones_like(x), x, rstd=rstd)
    dx2, _ = normax.crms_norm_backward(np.ones_like(x), x)
    assert np.all(np.isfinite(dx))
    np.testing.assert_allclose(dx, dx2, rtol=1e-5, atol=1e-30)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("eps", [1e-77, 1e-80, 1e-300, 5e-324])
def test_zero_rows_give_the_documented_zeros_for_any_positive_eps(isa, norm, dtype, eps):
    x = np.zeros((2, 16), dtype)
    w = np.linspace(0.5, 2, 16).astype(dtype)
    kw = {"eps": eps, "return_stats": True}
    if norm == "layer":
        b = np.linspace(-1, 1, 16).astype(dtype)
        y, _, rstd = normax.layer_norm(x, w, b, **kw)
        np.testing.assert_array_equal(y, np.broadcast_to(b, y.shape))
    else:
        y, rstd = _forward(norm, x, weight=w, **kw)
        np.testing.assert_array_equal(y, 0)
    np.testing.assert_allclose(rstd, 1 / np.sqrt(eps), rtol=1e-15)
    # eps = 0 stays 0 / 0 = NaN, as torch's.
    assert np.isnan(_forward(norm, x, eps=0.0)).all()


def test_power_norm_of_huge_values():
    state = normax.PowerNormState(8)
    x = (np.random.default_rng(3).standard_normal((64, 8)) * 3e19).astype(np.float32)
    y = normax.power_norm(x, np.ones(8, np.float32), np.zeros(8, np.float32), state)
    assert np.all(np.isfinite(y)) and np.max(np.abs(y)) > 0.1


# ---------------------------------------------------------------------------------- item 9


@pytest.mark.parametrize(
    "kw", [{"label_smoothing": 0.5}, {"z_loss": 0.1}, {"label_smoothing": 0.2, "z_loss": 0.1}]
)
def test_mean_over_zero_total_weight_is_nan_like_torch(kw):
    logits = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    weight, target = np.array([1, 0, 1], np.float32), np.array([1, 1])
    assert np.isnan(normax.cross_entropy(logits, target, weight=weight, **kw))
    loss, grad = normax.cross_entropy_with_grad(logits, target, weight=weight, **kw)
    assert np.isnan(loss) and not np.isfinite(grad).any()  # torch's: all NaN (z-loss: not in torch)
    # All rows ignored: 0 / 0 as well, with zero gradients (torch's).
    ignored = np.array([-100, -100])
    loss, grad = normax.cross_entropy_with_grad(logits, ignored, **kw)
    assert np.isnan(loss) and not grad.any()
    h = np.ones((2, 4), np.float32)
    assert np.isnan(normax.linear_cross_entropy(h, np.ones((3, 4), np.float32), ignored, **kw))
    # Sum and none are unaffected.
    assert np.isfinite(normax.cross_entropy(logits, target, weight=weight, reduction="sum", **kw))


def test_mean_over_zero_total_weight_matches_torch_with_smoothing():
    logits = torch.randn(2, 3, dtype=torch.float64)
    weight, target = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64), torch.tensor([1, 1])
    expect = F.cross_entropy(logits, target, weight=weight, label_smoothing=0.5)
    got = normax.cross_entropy(logits, target, weight=weight, label_smoothing=0.5)
    assert torch.isnan(expect) and torch.isnan(torch.as_tensor(got))
    import normax.torch as nt

    got = nt.cross_entropy(logits, target, weight=weight, label_smoothing=0.5)
    assert torch.isnan(got)


# ---------------------------------------------------------------------------------- item 11

OVERLAP = re.compile(r"shares memory with another argument")


@pytest.mark.parametrize("norm", NORMS)
def test_out_aliasing_weight_or_bias_is_a_clear_error(norm):
    x = np.ones((1, 8), np.float32)
    w = np.ones(8, np.float32)
    with pytest.raises(ValueError, match=OVERLAP):
        _forward(norm, x, weight=w, out=w[None])
    if norm == "layer":
        b = np.zeros(8, np.float32)
        with pytest.raises(ValueError, match=OVERLAP):
            normax.layer_norm(x, w, b, out=b[None])
    # out=x itself stays allowed (in place).
    xx = np.arange(8, dtype=np.float32)[None] + 1
    expect = _forward(norm, xx.copy(), weight=w)
    np.testing.assert_array_equal(_forward(norm, xx, weight=w, out=xx), expect)


def test_inplace_cross_entropy_whose_target_is_a_view_of_the_logits():
    logits = np.zeros((4, 8))
    target = logits.reshape(-1).view(np.int64)[:4]  # contiguous: the first row's bytes
    with pytest.raises(ValueError, match=OVERLAP) as e:
        normax.cross_entropy_with_grad(logits, target, inplace=True)
    assert str(e.value).startswith("logits:")
    # A strided view is copied (laid out) before the call: then it is read before written.
    logits = np.zeros((4, 8))
    loss, grad = normax.cross_entropy_with_grad(logits, logits.view(np.int64)[:, 0], inplace=True)
    ref_loss, ref_grad = normax.cross_entropy_with_grad(np.zeros((4, 8)), np.zeros(4, np.int64))
    assert loss == ref_loss
    np.testing.assert_array_equal(grad, ref_grad)


def test_out_requiring_grad_is_refused_as_torch_does():
    x = torch.randn(4, 8)
    out = torch.zeros(4, 8, requires_grad=True)
    msg = "functions with out=... arguments don't support automatic differentiation"
    with pytest.raises(RuntimeError, match=re.escape(msg)):
        torch.exp(x, out=out)  # torch's own rule, which normax follows
    for f in (normax.softmax, normax.log_softmax, normax.rms_norm, normax.layer_norm, normax.crms_norm):
        with pytest.raises(RuntimeError, match=re.escape(msg)):
            f(x, out=out)
    # An input that requires grad with out=: refused too, as torch refuses it.
    with pytest.raises(RuntimeError, match=re.escape(msg)):
        normax.softmax(x.clone().requires_grad_(), out=torch.empty(4, 8))
    assert not out.detach().any()  # nothing was written
    # Under no_grad torch allows the write, and so does normax.
    with torch.no_grad():
        r = normax.softmax(x, out=out)
    assert r is out
    torch.testing.assert_close(out.detach(), torch.softmax(x, -1))


def test_inplace_cross_entropy_over_logits_requiring_grad_is_refused():
    logits = torch.randn(4, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="inplace=True"):
        normax.cross_entropy_with_grad(logits, torch.tensor([1, 2, 3, 4]), inplace=True)


@pytest.mark.parametrize("name", ["label_smoothing", "z_loss"])
def test_string_options_are_type_errors(name):
    with pytest.raises(TypeError, match=name):
        normax.cross_entropy(np.zeros((2, 3)), np.array([0, 1]), **{name: "0.1"})


def test_layer_norm_stats_of_a_row_with_inf_match_torch():
    x = np.array([[1.0, np.inf, 2.0], [1.0, 2.0, 3.0]], np.float32)
    y, mean, rstd = normax.layer_norm(x, return_stats=True)
    ty, tmean, trstd = torch.native_layer_norm(torch.tensor(x), [3], None, None, 1e-5)
    np.testing.assert_array_equal(np.isnan(y), torch.isnan(ty).numpy())
    np.testing.assert_array_equal(np.isnan(mean), torch.isnan(tmean).numpy().ravel())
    np.testing.assert_array_equal(np.isnan(rstd), torch.isnan(trstd).numpy().ravel())
    np.testing.assert_allclose(rstd[1], trstd[1, 0].item(), rtol=1e-6)
