"""normax.logprobs / linear_logprobs and their backward functions (the adapters' route) against
float64 references: log softmax(x / T) at the target, the entropy, and the gradients of
g_logp * logprob + g_H * entropy (torch autograd in float64), on every ISA; temperatures, ignored
rows, -inf logits, large margins, the class axis, dtypes, bad inputs, untouched caller arrays,
and the linear form equal to the explicit-logits form for every block shape."""

from __future__ import annotations

import normax
import numpy as np
import pytest
import torch
from normax import _logprobs

RNG = np.random.default_rng(24)


def reference(x, t, temperature=1.0, ignore_index=-100, axis=-1):
    """(logprob, entropy) in float64 the plain way, ignored rows 0; p = 0 terms add 0."""
    z = np.moveaxis(np.asarray(x, np.float64), axis, -1) / temperature
    m = z.max(-1, keepdims=True)
    lse = m + np.log(np.exp(z - m).sum(-1, keepdims=True))
    logp = z - lse
    p = np.exp(logp)
    with np.errstate(invalid="ignore"):
        h = -np.where(p > 0, p * logp, 0.0).sum(-1)
    keep = t != ignore_index
    safe = np.where(keep, t, 0)
    lp = np.take_along_axis(logp, safe[..., None], -1)[..., 0]
    return np.where(keep, lp, 0.0), np.where(keep, h, 0.0)


def torch_grads(x, t, gl, gh, temperature=1.0, ignore_index=-100):
    """d(sum(gl * logprob + gh * entropy))/dx by torch autograd in float64 (2-d x)."""
    xt = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    tt = torch.tensor(t)
    keep = tt != ignore_index
    logp = torch.log_softmax(xt / temperature, -1)
    p = logp.exp()
    h = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
    lp = logp.gather(-1, torch.where(keep, tt, 0)[:, None])[:, 0]
    total = (torch.where(keep, lp, 0) * torch.tensor(gl)).sum() + (
        torch.where(keep, h, 0) * torch.tensor(gh)
    ).sum()
    total.backward()
    return xt.grad.numpy()


def formula_grads(x, t, gl, gh):
    """The gradient by its formula in float64, p = 0 terms 0 (torch autograd's entropy of a -inf
    logit is NaN: 0 * -inf in its backward)."""
    z = np.asarray(x, np.float64)
    m = z.max(-1, keepdims=True)
    lse = m + np.log(np.exp(z - m).sum(-1, keepdims=True))
    p = np.exp(z - lse)
    with np.errstate(invalid="ignore"):
        spread = np.where(p > 0, p * (z - lse), 0.0)
    h = -spread.sum(-1, keepdims=True)
    onehot = np.eye(z.shape[-1])[t]
    return gl[:, None] * (onehot - p) - gh[:, None] * (spread + p * h)


@pytest.mark.parametrize("temperature", [1.0, 0.6, 3.0])
@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 2e-6)])
def test_rows_match_float64(isa, temperature, dtype, tol):
    for c in (1, 7, 130, 4099):
        x = (RNG.normal(size=(6, c)) * 4).astype(dtype)
        t = RNG.integers(0, c, 6)
        t[2] = -100
        lp, h = normax.logprobs(x, t, temperature=temperature)
        ref_lp, ref_h = reference(x, t, temperature)
        assert lp.dtype == dtype and h.dtype == dtype and lp.shape == (6,)
        np.testing.assert_allclose(lp, ref_lp, rtol=tol, atol=tol)
        np.testing.assert_allclose(h, ref_h, rtol=tol, atol=tol)
        assert lp[2] == 0 and h[2] == 0
        gl, gh = RNG.normal(size=6), RNG.normal(size=6)
        want = torch_grads(x, t, gl, gh, temperature)
        got = _logprobs.logprobs_backward(x, t, gl, gh, temperature=temperature)
        assert got.dtype == dtype
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
        # Either incoming gradient absent is a zero one.
        only_lp = _logprobs.logprobs_backward(x, t, gl, None, temperature=temperature)
        np.testing.assert_allclose(only_lp, torch_grads(x, t, gl, 0 * gh, temperature), rtol=tol, atol=tol)
        only_h = _logprobs.logprobs_backward(x, t, None, gh, temperature=temperature)
        np.testing.assert_allclose(only_h, torch_grads(x, t, 0 * gl, gh, temperature), rtol=tol, atol=tol)


def test_class_axis_shapes_and_return_entropy():
    x = RNG.normal(size=(3, 5, 4))
    t = RNG.integers(0, 5, (3, 4))
    lp, h = normax.logprobs(x, t, axis=1)
    ref_lp, ref_h = reference(x, t, axis=1)
    np.testing.assert_allclose(lp, ref_lp, rtol=1e-13)
    np.testing.assert_allclose(h, ref_h, rtol=1e-13)
    only = normax.logprobs(x, t, axis=1, return_entropy=False)
    np.testing.assert_array_equal(only, lp)
    g = _logprobs.logprobs_backward(x, t, np.ones((3, 4)), 1.0, axis=1)
    flat = np.moveaxis(x, 1, -1).reshape(-1, 5)
    want = torch_grads(flat, t.reshape(-1), np.ones(12), np.ones(12))
    np.testing.assert_allclose(np.moveaxis(g, 1, -1).reshape(-1, 5), want, rtol=1e-12, atol=1e-14)
    # One row: numpy scalars, as the per-row cross-entropy.
    lp1, h1 = normax.logprobs(x[0, :, 0], t[0, 0])
    assert np.ndim(lp1) == 0 and np.isclose(lp1, ref_lp[0, 0]) and np.isclose(h1, ref_h[0, 0])


def test_minus_inf_logits_and_special_rows(isa):
    ninf = -np.inf
    x = np.array(
        [[1.0, ninf, 0.5, ninf], [ninf, 2.0, ninf, ninf], [1.0, np.nan, 0, 0], [ninf] * 4], np.float32
    )
    t = np.array([1, 1, 0, 0])
    lp, h = normax.logprobs(x, t)
    assert lp[0] == ninf and np.isfinite(h[0]) and h[0] > 0
    assert lp[1] == 0 and h[1] == 0  # one finite class: probability 1
    assert np.isnan(lp[2:]).all() and np.isnan(h[2:]).all()
    g = _logprobs.logprobs_backward(x[:2], t[:2], np.ones(2), np.ones(2))
    np.testing.assert_allclose(g, formula_grads(x[:2], t[:2], np.ones(2), np.ones(2)), rtol=1e-6, atol=1e-7)
    assert np.isnan(_logprobs.logprobs_backward(x[2:], t[2:], np.ones(2), None)).all()


@pytest.mark.parametrize("margin", [20.0, 45.0])
def test_large_margins_keep_the_gradient(isa, margin):
    # Past margin ~17 (float32) p_y rounds to 1: log_softmax then gives 0 and a zero gradient.
    # Here logprob = -log1p(sum of the rest) and the target's gradient stay accurate and nonzero.
    x = np.zeros((1, 50), np.float32)
    x[0, 7] = margin
    t = np.array([7])
    exact = -np.log1p(49 * np.exp(-margin))
    lp = normax.logprobs(x, t, return_entropy=False)
    assert lp[0] < 0
    np.testing.assert_allclose(lp, [exact], rtol=1e-5)
    g = _logprobs.logprobs_backward(x, t, np.ones(1), None)
    np.testing.assert_allclose(g[0, 7], -np.expm1(exact), rtol=1e-5)
    assert g[0, 7] > 0


@pytest.mark.parametrize("chunk_size", [None, 100, 7])
def test_linear_large_margins_keep_the_gradient(chunk_size):
    # Vocabulary blocks too: the blocks' log-sum-exps combine without losing the dominant target's
    # tiny logprob (a one-hot hidden state picks a row of the weight as its logits).
    v, margin = 300, 30.0
    w = np.zeros((v, 2), np.float32)
    w[123, 0] = margin
    hid = np.array([[1.0, 0.0]], np.float32)
    exact = -np.log1p((v - 1) * np.exp(-margin))
    lp, h = normax.linear_logprobs(hid, w, np.array([123]), chunk_size=chunk_size)
    np.testing.assert_allclose(lp, [exact], rtol=1e-5)
    np.testing.assert_allclose(h, [(v - 1) * np.exp(-margin) * (margin + 1 - exact)], rtol=1e-4)
    _, dw, _ = _logprobs.linear_logprobs_backward(
        hid, w, np.array([123]), np.ones(1), None, chunk_size=chunk_size
    )
    np.testing.assert_allclose(dw[123, 0], -np.expm1(exact), rtol=1e-5)


@pytest.mark.parametrize("dtype", [np.float16, "bfloat16"])
def test_small_floats_in_and_out(dtype):
    import ml_dtypes

    dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    x = RNG.normal(size=(4, 9)).astype(dtype)
    t = RNG.integers(0, 9, 4)
    lp, h = normax.logprobs(x, t, temperature=0.7)
    assert lp.dtype == dtype and h.dtype == dtype
    ref_lp, ref_h = reference(x.astype(np.float32), t, 0.7)
    np.testing.assert_allclose(lp.astype(np.float64), ref_lp, rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(h.astype(np.float64), ref_h, rtol=1e-2, atol=1e-2)


def test_bad_inputs_name_the_argument():
    x, t = np.zeros((2, 3)), np.array([0, 1])
    for bad in (0.0, -1.0, np.nan, np.inf):
        with pytest.raises(ValueError, match=r"^temperature: must be a finite number > 0, got"):
            normax.logprobs(x, t, temperature=bad)
        with pytest.raises(ValueError, match=r"^temperature: must be a finite number > 0"):
            normax.linear_logprobs(x, x, t, temperature=bad)
    for bad in (True, "1.0", None):
        with pytest.raises(TypeError, match=r"^temperature"):
            normax.logprobs(x, t, temperature=bad)
    with pytest.raises(TypeError, match=r"^target: expected integer class indices"):
        normax.logprobs(x, t.astype(np.float32))
    with pytest.raises(TypeError, match=r"^target: expected integer class indices"):
        normax.linear_logprobs(x, x, t.astype(np.float32))
    with pytest.raises(IndexError, match=r"^target: class index 3 at position 1 is out of range \[0, 3\)"):
        normax.logprobs(x, np.array([0, 3]))
    with pytest.raises(IndexError, match=r"^target: class index -1 at position 0"):
        normax.linear_logprobs(x, x, np.array([-1, 0]))
    with pytest.raises(ValueError, match=r"^target: expected shape \(2,\)"):
        normax.logprobs(x, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match=r"^chunk_size: must be at least 1"):
        normax.linear_logprobs(x, x, t, chunk_size=0)
    with pytest.raises(ValueError, match=r"^linear_bias: expected shape \(2,\)"):
        normax.linear_logprobs(x, x, t, linear_bias=np.zeros(3))
    with pytest.raises(ValueError, match=r"^logits: the class axis 1 is empty"):
        normax.logprobs(np.zeros((2, 0)), t)
    with pytest.raises(TypeError, match=r"^ignore_index"):
        normax.logprobs(x, t, ignore_index=1.5)
    with pytest.raises(ValueError, match=r"^grad_entropy: shape \(3,\) does not broadcast"):
        _logprobs.logprobs_backward(x, t, None, np.ones(3))


def test_caller_arrays_are_not_modified():
    x = RNG.normal(size=(5, 8)).astype(np.float32)
    h, w, b = RNG.normal(size=(5, 3)), RNG.normal(size=(8, 3)), RNG.normal(size=8)
    t = np.array([1, 2, -100, 7, 0])
    gl, gh = np.ones(5, np.float32), np.ones(5, np.float32)
    copies = [a.copy() for a in (x, h, w, b, t, gl, gh)]
    normax.logprobs(x, t, temperature=2.0)
    _logprobs.logprobs_backward(x, t, gl, gh, temperature=2.0)
    normax.linear_logprobs(h, w, t, linear_bias=b, temperature=2.0, chunk_size=10)
    _logprobs.linear_logprobs_backward(h, w, t, gl, gh, linear_bias=b, temperature=2.0, chunk_size=10)
    for a, c in zip((x, h, w, b, t, gl, gh), copies):
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("chunk_size", [None, 10_000, 700, 13, 1])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_equals_the_explicit_logits(isa, chunk_size, with_bias):
    n, hd, v = 29, 6, 250
    hid, w = RNG.normal(size=(n, hd)), RNG.normal(size=(v, hd))
    b = RNG.normal(size=v) if with_bias else None
    t = RNG.integers(0, v, n)
    t[[3, 11]] = -7
    temperature = 1.3
    logits = hid @ w.T + (0 if b is None else b)
    kw = {"linear_bias": b, "temperature": temperature, "ignore_index": -7, "chunk_size": chunk_size}
    lp, h = normax.linear_logprobs(hid, w, t, **kw)
    ref_lp, ref_h = normax.logprobs(logits, t, temperature=temperature, ignore_index=-7)
    np.testing.assert_allclose(lp, ref_lp, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(h, ref_h, rtol=1e-12, atol=1e-13)
    gl, gh = RNG.normal(size=n), RNG.normal(size=n)
    dh, dw, db = _logprobs.linear_logprobs_backward(hid, w, t, gl, gh, **kw)
    g = _logprobs.logprobs_backward(logits, t, gl, gh, temperature=temperature, ignore_index=-7)
    np.testing.assert_allclose(dh, g @ w, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(dw, g.T @ hid, rtol=1e-11, atol=1e-12)
    if with_bias:
        np.testing.assert_allclose(db, g.sum(0), rtol=1e-11, atol=1e-12)
    else:
        assert db is None
    # float32 inputs: the float64 results within float32 rounding.
    f = np.float32
    lp32 = normax.linear_logprobs(
        hid.astype(f), w.astype(f), t, **{**kw, "linear_bias": None if b is None else b.astype(f)}
    )[0]
    assert lp32.dtype == np.float32
    np.testing.assert_allclose(lp32, lp, rtol=1e-4, atol=1e-4)


def test_linear_backward_with_one_gradient_absent():
    hid, w = RNG.normal(size=(7, 4)), RNG.normal(size=(11, 4))
    t = RNG.integers(0, 11, 7)
    logits = hid @ w.T
    gl = RNG.normal(size=7)
    for pair in ((gl, None), (None, gl)):
        dh, dw, _ = _logprobs.linear_logprobs_backward(hid, w, t, *pair, chunk_size=20)
        g = _logprobs.logprobs_backward(logits, t, *pair)
        np.testing.assert_allclose(dh, g @ w, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(dw, g.T @ hid, rtol=1e-12, atol=1e-13)
