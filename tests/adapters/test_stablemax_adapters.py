"""StableMax in normax.torch and normax.jax: values against a float64 reference of the paper's
definition, gradients by torch.autograd.gradcheck (float64) and jax.grad against JAX's own
autodiff of the definition, and cross_entropy(normalizer="stablemax") against the NumPy-first
function (which tests/cpu/test_stablemax.py checks against the definition)."""

from __future__ import annotations

import normax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = jax.numpy

import normax.jax as nj
import normax.torch as nt


def _ref(x, dim=-1, log=False):
    x = np.asarray(x, np.float64)
    s = np.where(x >= 0, x + 1.0, 1.0 / (1.0 - np.minimum(x, 0.0)))
    y = s / s.sum(dim, keepdims=True)
    return np.log(y) if log else y


@pytest.mark.parametrize("log", [False, True])
def test_torch_values_and_gradcheck(log):
    fn = nt.log_stablemax if log else nt.stablemax
    x = torch.randn(4, 6, dtype=torch.float64) * 3
    x[0, 0] = 0.0
    for dim in (-1, 0):
        np.testing.assert_allclose(fn(x, dim).numpy(), _ref(x.numpy(), dim, log), rtol=1e-12)
        xg = x.clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda t, dim=dim: fn(t, dim), (xg,))
        assert torch.autograd.gradgradcheck(lambda t, dim=dim: fn(t, dim), (xg,))
    x32 = x.float()
    y = fn(x32)
    assert y.dtype == torch.float32
    np.testing.assert_allclose(y.numpy(), _ref(x.numpy(), -1, log), rtol=2e-6, atol=1e-7)
    yb = fn(x32.bfloat16())
    assert yb.dtype == torch.bfloat16
    with pytest.raises(TypeError):
        fn(torch.ones(3, dtype=torch.complex64))
    assert fn(x32, dtype=torch.float64).dtype == torch.float64


def test_torch_compile_and_opcheck():
    from normax.torch._stablemax import _stablemax_op

    x = torch.randn(3, 5)
    torch.library.opcheck(_stablemax_op, (x, 1, False))
    torch.library.opcheck(_stablemax_op, (x, 0, True))
    f = torch.compile(lambda t: nt.stablemax(t, -1), fullgraph=True)
    torch.testing.assert_close(f(x), nt.stablemax(x, -1))


@pytest.mark.parametrize("kw", [{}, {"label_smoothing": 0.1, "z_loss": 1e-3}, {"softcap": 4.0}])
def test_torch_cross_entropy_stablemax(kw):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 7)).astype(np.float32) * 4
    t = rng.integers(0, 7, size=5)
    w = rng.uniform(0.5, 2.0, 7).astype(np.float32)
    want_loss, want_grad = normax.cross_entropy_with_grad(x, t, weight=w, normalizer="stablemax", **kw)
    xt = torch.from_numpy(x).requires_grad_()
    loss = nt.cross_entropy(xt, torch.from_numpy(t), torch.from_numpy(w), normalizer="stablemax", **kw)
    loss.backward()
    assert loss.dtype == torch.float32
    np.testing.assert_allclose(loss.item(), want_loss, rtol=1e-6)
    np.testing.assert_allclose(xt.grad.numpy(), want_grad, rtol=1e-5, atol=1e-7)
    module = nt.CrossEntropyLoss(torch.from_numpy(w), normalizer="stablemax", **kw)
    np.testing.assert_allclose(module(xt, torch.from_numpy(t)).item(), want_loss, rtol=1e-6)
    # float64 gradcheck of the whole loss, K-dim input (classes on dim 1).
    x64 = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    t64 = torch.tensor([[0, 3, 1], [2, 2, 0]])
    assert torch.autograd.gradcheck(lambda a: nt.cross_entropy(a, t64, normalizer="stablemax", **kw), (x64,))
    with pytest.raises(ValueError, match="normalizer"):
        nt.cross_entropy(xt, torch.from_numpy(t), normalizer="softermax")


@pytest.mark.parametrize("log", [False, True])
def test_jax_values_and_grad(log):
    fn = nj.log_stablemax if log else nj.stablemax

    def definition(x, axis):
        s = jnp.where(x >= 0, x + 1, 1 / (1 - jnp.minimum(x, 0)))
        y = s / s.sum(axis, keepdims=True)
        return jnp.log(y) if log else y

    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32) * 3)
    for axis in (-1, 0):
        np.testing.assert_allclose(fn(x, axis), _ref(np.asarray(x), axis, log), rtol=2e-6, atol=1e-7)
        c = jnp.asarray(np.random.default_rng(2).standard_normal((3, 5)).astype(np.float32))
        got = jax.grad(lambda a, axis=axis, c=c: jnp.sum(fn(a, axis) * c))(x)
        want = jax.grad(lambda a, axis=axis, c=c: jnp.sum(definition(a, axis) * c))(x)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # Exact zeros inside JAX's callback (its threads flush subnormals: no subnormal constant).
    z = jnp.array([-1.0, 0.0, 1.0])
    np.testing.assert_allclose(fn(z), _ref(np.asarray(z), -1, log), rtol=1e-6)
    jitted = jax.jit(lambda a: fn(a))(x)
    np.testing.assert_allclose(jitted, fn(x), rtol=0)
    batched = jax.vmap(fn)(x)
    np.testing.assert_allclose(batched, fn(x), rtol=1e-7)
    with pytest.raises(TypeError):
        fn(jnp.ones(3, jnp.complex64))


def test_jax_cross_entropy_stablemax():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 6)).astype(np.float32) * 3
    t = rng.integers(0, 6, size=4)
    want = normax.cross_entropy(x, t, reduction="none", normalizer="stablemax", label_smoothing=0.1)
    got = nj.cross_entropy(jnp.asarray(x), jnp.asarray(t), normalizer="stablemax", label_smoothing=0.1)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    g = jax.grad(lambda a: nj.cross_entropy(a, jnp.asarray(t), reduction="mean", normalizer="stablemax"))(
        jnp.asarray(x)
    )
    _, want_g = normax.cross_entropy_with_grad(x, t, normalizer="stablemax")
    np.testing.assert_allclose(g, want_g, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="normalizer"):
        nj.cross_entropy(jnp.asarray(x), jnp.asarray(t), normalizer="x")
