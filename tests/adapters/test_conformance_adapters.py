"""Issue 12 items 1, 2 and 8 in the framework adapters: no silent wrong answer.

1. Complex input: ``normax.torch.logsumexp`` and ``normax.jax.logsumexp`` / ``softmax`` /
   ``log_softmax`` give the peer's complex result and gradient (computed by the peer itself:
   normax's kernels are real); where the peer has no complex meaning (torch's softmax raises
   NotImplementedError, cross-entropy and the norms) a TypeError, never a dropped imaginary part.
2. ``normax.torch.cross_entropy`` with probability targets that require grad: torch's target
   gradient for every reduction, class weight, label smoothing, softcap and z_loss.
8. ``normax.jax.logsumexp``: `a` and `b` broadcast together as in jax, and under
   ``jax.debug_nans`` a finite input never raises.

Tolerances, and why:
- Delegated complex paths run the peer's own code: equal up to float64 rounding of identical
  operations (rtol 1e-12 in complex128, 1e-6 in complex64 = ~8 ULP for jit-vs-eager fusion).
- float64 target gradients: -log_softmax from normax's kernel vs torch's, each a few ULP from exact,
  times the same scale: rtol 1e-12, atol 1e-13.
- float32 results against jax.nn in float32: both a few ULP from exact: rtol 1e-6 (~8 ULP),
  atol 1e-6 for gradient entries formed by cancellation.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import normax.jax as nj
import normax.torch as nt
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from normax.torch import _cross_entropy


@pytest.fixture
def x64():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


def crand(*shape, dtype=torch.complex128, seed=0):
    g = torch.Generator().manual_seed(seed)
    re = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    im = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    return torch.complex(re, im).to(dtype)


# ---------------------------------------------------------------------------------------------
# Item 1, torch


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize("dim,keepdim", [(1, False), ((0, 2), False), (-1, True)])
def test_torch_logsumexp_complex_is_torchs(dtype, dim, keepdim):
    """Before: a real float32 (the logsumexp of the real parts)."""
    z = crand(4, 5, 3, dtype=dtype)
    rtol = 1e-12 if dtype == torch.complex128 else 1e-6
    zz, zt = z.clone().requires_grad_(), z.clone().requires_grad_()
    got, want = nt.logsumexp(zz, dim, keepdim), torch.logsumexp(zt, dim, keepdim)
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol)
    # The gradient of a real function of the complex result, as torch's autograd gives it.
    dy = crand(*got.shape, dtype=dtype, seed=1)
    (g1,) = torch.autograd.grad((got * dy).real.sum() + got.abs().sum(), zz)
    (g2,) = torch.autograd.grad((want * dy).real.sum() + want.abs().sum(), zt)
    torch.testing.assert_close(g1, g2, rtol=rtol, atol=rtol)


def test_torch_complex_where_torch_has_no_meaning_raises_type_error():
    z = crand(3, 4, dtype=torch.complex64)
    for f in (torch.softmax, torch.log_softmax):  # the peer has no complex softmax either
        with pytest.raises(NotImplementedError):
            f(z, 1)
    for f in (
        lambda: nt.softmax(z, 1),
        lambda: nt.log_softmax(z, 1),
        lambda: nt.softmax(z.real, 1, dtype=torch.complex64),
        lambda: nt.cross_entropy(z, torch.tensor([0, 1, 2])),
        lambda: nt.layer_norm(z, (4,)),
        lambda: nt.rms_norm(z, (4,)),
    ):
        with pytest.raises(TypeError):
            f()


# ---------------------------------------------------------------------------------------------
# Item 2: probability targets that require grad


def _ce_grads(f, x, t, x_grad, dy_seed=3, **kw):
    xx = x.clone().requires_grad_(x_grad)
    tt = t.clone().requires_grad_()
    loss = f(xx, tt, **kw)
    dy = torch.linspace(0.5, 2.0, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    return loss, torch.autograd.grad(loss, [tt, xx] if x_grad else [tt], dy)


SHAPES = {"2d": (6, 5), "kdim": (2, 5, 3), "1d": (5,)}


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("x_grad", [False, True])
def test_cross_entropy_probability_target_gradient_is_torchs(
    shape, reduction, weighted, label_smoothing, x_grad
):
    """Before: target.grad None (normax's op returned no gradient for the target)."""
    shape = SHAPES[shape]
    axis = 1 if len(shape) >= 2 else 0
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    t = torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64), axis)
    w = torch.linspace(0.5, 2.0, 5, dtype=torch.float64) if weighted else None
    kw = {"weight": w, "reduction": reduction, "label_smoothing": label_smoothing}
    l1, g1 = _ce_grads(nt.cross_entropy, x, t, x_grad, **kw)
    l2, g2 = _ce_grads(F.cross_entropy, x, t, x_grad, **kw)
    torch.testing.assert_close(l1, l2, rtol=1e-12, atol=1e-13)
    for a, e in zip(g1, g2):
        assert a is not None and a.dtype == e.dtype
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-13)


def test_cross_entropy_target_gradient_softcap_and_z_loss():
    """softcap: torch's gradient on the capped logits; z_loss adds nothing to the target's."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64) * 4
    t = torch.softmax(torch.randn(6, 5, generator=g, dtype=torch.float64), 1)
    for reduction in ("mean", "none"):
        kw = {"reduction": reduction, "label_smoothing": 0.1}
        _, (gt, gx) = _ce_grads(
            lambda a, b, **k: nt.cross_entropy(a, b, softcap=3.0, z_loss=1e-2, **k), x, t, True, **kw
        )
        _, (et, ex) = _ce_grads(
            lambda a, b, **k: F.cross_entropy(3.0 * torch.tanh(a / 3.0), b, **k), x, t, True, **kw
        )
        torch.testing.assert_close(gt, et, rtol=1e-12, atol=1e-13)
        # The logits' gradient differs from torch's by z_loss's term only: check that it exists.
        assert gx.shape == ex.shape


def test_cross_entropy_target_gradient_float32_and_gradcheck():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 6, 3, generator=g) * 3
    t = torch.softmax(torch.randn(4, 6, 3, generator=g), 1)
    w = torch.linspace(0.5, 2.0, 6)
    _, (a,) = _ce_grads(nt.cross_entropy, x, t, False, weight=w, label_smoothing=0.1)
    _, (e,) = _ce_grads(F.cross_entropy, x, t, False, weight=w, label_smoothing=0.1)
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)
    # Finite differences in float64, the target and logits both differentiated.
    xd = x.double().requires_grad_()
    td = t.double().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: nt.cross_entropy(a, b, w.double(), reduction="none", softcap=5.0), (xd, td)
    )


def test_cross_entropy_target_gradient_opcheck_and_compile():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.softmax(torch.randn(4, 5, generator=g, dtype=torch.float64), 1).requires_grad_()
    w = torch.linspace(0.5, 2.0, 5, dtype=torch.float64)
    for reduction in ("mean", "none"):
        torch.library.opcheck(
            _cross_entropy._cross_entropy_op.custom_op, (x, t, w, 1, -100, reduction, 0.1, 1e-3, None)
        )
        torch.library.opcheck(
            _cross_entropy._cross_entropy_op.custom_op,
            (x.detach(), t, None, 1, -100, reduction, 0.0, 0.0, 4.0),
        )

    def f(x, t):
        return nt.cross_entropy(x, t, w, label_smoothing=0.1, softcap=4.0) * 2

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    grads = []
    for fn in (f, compiled):
        xx, tt = x.detach().requires_grad_(), t.detach().requires_grad_()
        loss = fn(xx, tt)
        grads.append((loss, *torch.autograd.grad(loss, (xx, tt))))
    for a, e in zip(*grads):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-13)


def test_cross_entropy_target_gradient_second_derivative_raises():
    """A target that requires grad takes the unfused op: a second derivative through the logits'
    gradient raises instead of leaving out its dependence on the target."""
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.softmax(torch.randn(3, 4, dtype=torch.float64), 1).requires_grad_()
    (gx,) = torch.autograd.grad(nt.cross_entropy(x, t), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        torch.autograd.grad(gx.square().sum(), t)


# ---------------------------------------------------------------------------------------------
# Item 1, JAX


def _jc(shape, seed=0, dtype=np.complex64):
    r = np.random.default_rng(seed)
    return jnp.asarray((r.standard_normal(shape) + 1j * r.standard_normal(shape)).astype(dtype))


@pytest.mark.parametrize("name", ["softmax", "log_softmax", "logsumexp"])
def test_jax_complex_is_jax_nn(name):
    """Before: the imaginary part was dropped (a real result)."""
    z = _jc((3, 4))
    ours, ref = getattr(nj, name), getattr(jax.nn, name)
    got, want = ours(z, axis=1), ref(z, axis=1)
    assert got.dtype == want.dtype == jnp.complex64 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)

    def loss(f):
        return lambda z: jnp.sum(jnp.real(f(z, axis=1)) * 1.5 + jnp.imag(f(z, axis=1)))

    np.testing.assert_allclose(jax.grad(loss(ours))(z), jax.grad(loss(ref))(z), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jax.jit(lambda z: ours(z, axis=0))(z), ref(z, axis=0), rtol=1e-6, atol=1e-6)


def test_jax_logsumexp_complex_b_and_sign_is_jax(x64):
    a, bc = _jc((3, 4), dtype=np.complex128), _jc((4,), seed=1, dtype=np.complex128)
    ar = jnp.real(a)
    for args, kw in (
        ((a, 1), {"b": jnp.arange(1.0, 5.0)}),
        ((ar, 1), {"b": bc}),
        ((a, None), {"return_sign": True}),
        ((a, 0), {"keepdims": True}),
    ):
        got, want = nj.logsumexp(*args, **kw), jax.nn.logsumexp(*args, **kw)
        for g_, w_ in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert g_.dtype == w_.dtype and g_.shape == w_.shape
            np.testing.assert_allclose(g_, w_, rtol=1e-12, atol=1e-12)


def test_jax_complex_without_meaning_raises_type_error():
    z = _jc((3, 4))
    for f in (
        lambda: nj.cross_entropy(z, jnp.array([0, 1, 2])),
        lambda: nj.cross_entropy(jnp.real(z), z),
        lambda: nj.rms_norm(z),
        lambda: nj.layer_norm(z),
        lambda: nj.layer_norm(jnp.real(z), z[0]),
    ):
        with pytest.raises(TypeError, match="complex"):
            f()


# ---------------------------------------------------------------------------------------------
# Item 8: b broadcasts with a; debug_nans


BROADCASTS = [
    ((3, 1), (1, 4), 0),
    ((3, 1), (1, 4), None),
    ((3, 1), (1, 4), (0, 1)),
    ((3,), (2, 3), 0),
    ((3,), (2, 3), -1),
    ((), (3,), None),
    ((2, 1, 3), (4, 1), 1),
    ((4,), (), 0),
]


@pytest.mark.parametrize("a_shape,b_shape,axis", BROADCASTS)
@pytest.mark.parametrize("keepdims", [False, True])
def test_jax_logsumexp_b_broadcasts_as_jax(a_shape, b_shape, axis, keepdims):
    """Before: b that did not broadcast to a's own shape raised ValueError."""
    r = np.random.default_rng(0)
    a = jnp.asarray(r.standard_normal(a_shape).astype(np.float32))
    b = jnp.asarray(r.uniform(0.5, 2.0, b_shape).astype(np.float32))
    got = nj.logsumexp(a, axis, b=b, keepdims=keepdims)
    want = jax.nn.logsumexp(a, axis, b=b, keepdims=keepdims)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    res, sign = nj.logsumexp(a, axis, b=-b, keepdims=keepdims, return_sign=True)
    wres, wsign = jax.nn.logsumexp(a, axis, b=-b, keepdims=keepdims, return_sign=True)
    np.testing.assert_allclose(res, wres, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(sign, wsign)

    def loss(f):
        return lambda a, b: jnp.sum(
            f(a, axis, b=b, keepdims=keepdims) * jnp.arange(1.0, 1.0 + want.size).reshape(want.shape)
        )

    for ga, wa in zip(
        jax.grad(loss(nj.logsumexp), (0, 1))(a, b), jax.grad(loss(jax.nn.logsumexp), (0, 1))(a, b)
    ):
        assert ga.shape == wa.shape
        np.testing.assert_allclose(ga, wa, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        jax.jit(lambda a, b: nj.logsumexp(a, axis, b=b, keepdims=keepdims))(a, b), want, rtol=1e-6, atol=1e-6
    )


def test_jax_logsumexp_b_not_broadcastable_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(3, 2\).*\(4,\)"):
        nj.logsumexp(jnp.zeros((3, 2)), b=jnp.ones(4))


def test_jax_debug_nans_finite_input_does_not_raise():
    """Before: the NaN branch of a ``where`` raised FloatingPointError under debug_nans (checked op
    by op under disable_jit) even though the result was finite."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32))
    labels = jnp.array([0, 4, 2])
    probs = jax.nn.softmax(x * 0.5)
    cases = {
        "logsumexp": (lambda x: nj.logsumexp(x, 1), lambda x: jax.nn.logsumexp(x, 1)),
        "logsumexp_all": (lambda x: nj.logsumexp(x), lambda x: jax.nn.logsumexp(x)),
        "logsumexp_b": (
            lambda x: nj.logsumexp(x, 0, b=jnp.ones((1, 5))),
            lambda x: jax.nn.logsumexp(x, 0, b=jnp.ones((1, 5))),
        ),
        "softmax": (nj.softmax, jax.nn.softmax),
        "log_softmax": (nj.log_softmax, jax.nn.log_softmax),
        "cross_entropy": (
            lambda x: nj.cross_entropy(x, labels, reduction="mean"),
            lambda x: -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(x), labels[:, None], 1)),
        ),
        "cross_entropy_soft": (
            lambda x: nj.cross_entropy(x, probs, reduction="mean"),
            lambda x: -jnp.mean(jnp.sum(probs * jax.nn.log_softmax(x), 1)),
        ),
    }
    # jax's results, once per case for both modes, jitted (one compile each, not one per primitive).
    wanted = {
        name: (jax.jit(ref)(x), jax.jit(jax.grad(lambda x, f=ref: jnp.sum(f(x) ** 2)))(x))
        for name, (_, ref) in cases.items()
    }
    for nojit, (name, (ours, _)) in itertools.product((True, False), cases.items()):
        with jax.debug_nans(True), jax.disable_jit(nojit):
            got = ours(x)
            grad = jax.grad(lambda x, f=ours: jnp.sum(f(x) ** 2))(x)
        want, want_grad = wanted[name]
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6, err_msg=name)
    # A negative weighted sum is NaN, as jax's (which does not raise there either).
    with jax.debug_nans(True), jax.disable_jit():
        got = nj.logsumexp(jnp.zeros(2), b=jnp.array([1.0, -2.0]))
        want = jax.nn.logsumexp(jnp.zeros(2), b=jnp.array([1.0, -2.0]))
    assert np.isnan(got) and np.isnan(want)
