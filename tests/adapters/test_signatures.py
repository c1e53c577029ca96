"""A drop-in means the same call works: normax.torch / normax.jax / normax.scipy.special have the
installed peers' signatures (names, kinds, defaults) and give the peers' values on the calls those
signatures allow (issue 12, "Signatures")."""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional
nt = pytest.importorskip("normax.torch")


def _params(sig):
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


def _doc_signature(fn):
    """A builtin's signature from its docstring's first line (``torch.logsumexp`` has no other)."""
    line = fn.__doc__.strip().splitlines()[0]
    ns: dict = {}
    exec(f"def {line}: pass", ns)  # noqa: S102 - torch's own docstring, parsed as a def
    return inspect.signature(ns[fn.__name__])


# ---------------------------------------------------------------------------------------------
# normax.torch


@pytest.mark.parametrize("name", ["softmax", "log_softmax", "layer_norm", "rms_norm"])
def test_torch_signature_is_torchs(name):
    assert _params(inspect.signature(getattr(nt, name))) == _params(inspect.signature(getattr(F, name)))


def test_torch_logsumexp_signature_is_torchs():
    assert _params(inspect.signature(nt.logsumexp)) == _params(_doc_signature(torch.logsumexp))


def test_torch_cross_entropy_signature_starts_with_torchs():
    ours = _params(inspect.signature(nt.cross_entropy))
    theirs = _params(inspect.signature(F.cross_entropy))
    assert ours[: len(theirs)] == theirs
    assert all(kind == inspect.Parameter.KEYWORD_ONLY for _, kind, _ in ours[len(theirs) :])


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@pytest.mark.parametrize("shape", [(), (5,), (3, 4), (2, 3, 4), (2, 3, 4, 5)])
def test_torch_softmax_implicit_dim(name, shape):
    x = torch.randn(shape, dtype=torch.float64)
    with pytest.warns(UserWarning, match="Implicit dimension") as ours:
        y = getattr(nt, name)(x)
    with pytest.warns(UserWarning, match="Implicit dimension"):
        expected = getattr(F, name)(x)
    torch.testing.assert_close(y, expected)
    assert ours[0].filename == __file__  # torch's _stacklevel=3 points at the caller


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_torch_softmax_positional_as_torch(name):
    x = torch.randn(3, 4)
    y = getattr(nt, name)(x, 0, 3, torch.float64)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, getattr(F, name)(x, 0, 3, torch.float64))


def test_torch_logsumexp_out():
    x = torch.randn(3, 4, 5)
    out = torch.empty(0)
    r = nt.logsumexp(x, (0, 2), out=out)
    assert r is out and out.shape == (4,)
    torch.testing.assert_close(out, torch.logsumexp(x, (0, 2)))
    out64 = torch.empty(3, 1, 5, dtype=torch.float64)
    nt.logsumexp(x, 1, True, out=out64)
    torch.testing.assert_close(out64, torch.logsumexp(x.double(), 1, True))
    with pytest.raises(RuntimeError):
        nt.logsumexp(x, 1, out=torch.empty(3, 5, dtype=torch.int64))


@pytest.mark.parametrize("size_average", [None, True, False])
@pytest.mark.parametrize("reduce", [None, True, False])
def test_torch_cross_entropy_legacy_reduction(size_average, reduce):
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 4, 2, 1, 3, 0])
    w = torch.rand(5, dtype=torch.float64)
    ctx = (
        pytest.warns(UserWarning, match="size_average and reduce")
        if size_average is not None or reduce is not None
        else warnings.catch_warnings()
    )
    with ctx:
        ours = nt.cross_entropy(x, t, w, size_average, -100, reduce)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = F.cross_entropy(x, t, w, size_average, -100, reduce)
    torch.testing.assert_close(ours, theirs)
    (g1,) = torch.autograd.grad(ours.sum(), x)
    (g2,) = torch.autograd.grad(theirs.sum(), x)
    torch.testing.assert_close(g1, g2)


def test_torch_cross_entropy_keywords_still_work():
    x, t = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    torch.testing.assert_close(
        nt.cross_entropy(x, t, ignore_index=1, reduction="sum", label_smoothing=0.1),
        F.cross_entropy(x, t, ignore_index=1, reduction="sum", label_smoothing=0.1),
    )


@pytest.mark.parametrize("eps", [-1e-3, -0.0, -10.0, float("inf")])
@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
def test_torch_norm_any_eps(kind, eps):
    torch.manual_seed(0)
    x = (torch.randn(4, 6, dtype=torch.float64) * 3).requires_grad_()
    w = torch.rand(6, dtype=torch.float64, requires_grad=True)
    args = (x, (6,), w) + ((None,) if kind == "layer_norm" else ())
    ours = getattr(nt, kind)(*args, eps)
    theirs = getattr(F, kind)(*args, eps)
    torch.testing.assert_close(ours, theirs, equal_nan=True)
    if torch.isfinite(theirs).all():
        g1 = torch.autograd.grad(ours.sum(), (x, w))
        g2 = torch.autograd.grad(theirs.sum(), (x, w))
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b)


def test_torch_norm_modules_negative_eps():
    x = torch.randn(3, 8)
    torch.testing.assert_close(nt.LayerNorm(8, eps=-1e-4)(x), torch.nn.LayerNorm(8, eps=-1e-4)(x))
    torch.testing.assert_close(nt.RMSNorm(8, eps=-1e-4)(x), torch.nn.RMSNorm(8, eps=-1e-4)(x))


# ---------------------------------------------------------------------------------------------
# normax.jax


jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
nj = pytest.importorskip("normax.jax")


@pytest.mark.parametrize("name", ["softmax", "log_softmax", "logsumexp"])
def test_jax_signature_is_jaxs(name):
    assert _params(inspect.signature(getattr(nj, name))) == _params(inspect.signature(getattr(jax.nn, name)))


@pytest.mark.parametrize("name", ["softmax", "log_softmax", "logsumexp"])
@pytest.mark.parametrize("axis", [-1, 0, None, (0, 1)])
def test_jax_where(name, axis):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((3, 4)), jnp.float32)
    where = jnp.asarray(rng.random((3, 4)) > 0.3).at[:, 0].set(True)
    ours = getattr(nj, name)(x, axis, where=where)
    theirs = getattr(jax.nn, name)(x, axis, where=where)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)
    # masked elements do not count
    masked = getattr(nj, name)(jnp.where(where, x, 1e3), axis, where=where)
    np.testing.assert_allclose(masked, theirs, rtol=1e-6, atol=1e-7)

    def loss(f):
        return lambda x: jnp.sum(
            jnp.where(where, f(x, axis, where=where), 0.0) if name != "logsumexp" else f(x, axis, where=where)
        )

    np.testing.assert_allclose(
        jax.grad(loss(getattr(nj, name)))(x), jax.grad(loss(getattr(jax.nn, name)))(x), rtol=1e-5, atol=1e-6
    )


def test_jax_logsumexp_where_positional_and_sign():
    a = jnp.array([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
    b = jnp.array([1.0, -2.0, 1.0])
    where = jnp.array([True, True, False])
    ours = nj.logsumexp(a, 1, b, True, True, where)
    theirs = jax.nn.logsumexp(a, 1, b, True, True, where)
    for o, t in zip(ours, theirs):
        np.testing.assert_allclose(o, t, rtol=1e-6)


def test_jax_axis_none_defaults():
    x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 4)), jnp.float32)
    np.testing.assert_allclose(nj.logsumexp(x), jax.nn.logsumexp(x), rtol=1e-6)
    np.testing.assert_allclose(nj.softmax(x, None), jax.nn.softmax(x, None), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# normax.scipy.special


special = pytest.importorskip("scipy.special")


def test_scipy_subpackage_is_importable_and_leaves_scipy_alone():
    import normax.scipy.special as ns
    import scipy

    assert scipy.special is special and ns is not special
    assert ns.__name__ == "normax.scipy.special"


@pytest.mark.parametrize("name", ["softmax", "log_softmax", "logsumexp"])
def test_scipy_signature_is_scipys(name):
    import normax.scipy.special as ns

    assert _params(inspect.signature(getattr(ns, name))) == _params(inspect.signature(getattr(special, name)))
    assert "SciPy drop-in" in getattr(ns, name).__doc__


@pytest.mark.parametrize("name", ["softmax", "log_softmax", "logsumexp"])
def test_scipy_values_and_axis_none_default(name):
    import normax.scipy.special as ns

    x = np.random.default_rng(3).standard_normal((3, 4, 5))
    for args in [(x,), (x, None), (x, 1), (x, (0, 2)), (x, -1)]:
        ours, theirs = getattr(ns, name)(*args), getattr(special, name)(*args)
        np.testing.assert_allclose(ours, theirs, rtol=1e-13, atol=1e-15)
        assert np.shape(ours) == np.shape(theirs)
    t = torch.from_numpy(x)
    ours = getattr(ns, name)(t)
    assert isinstance(ours, torch.Tensor)
    np.testing.assert_allclose(ours.numpy(), getattr(special, name)(x), rtol=1e-13, atol=1e-15)


def test_scipy_logsumexp_positional():
    import normax.scipy.special as ns

    a = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
    b = np.array([1.0, -2.0, 1.0])
    for args in [(a, 1, b), (a, 1, b, True), (a, None, b, False, True), (a, 0, None, True, True)]:
        ours, theirs = ns.logsumexp(*args), special.logsumexp(*args)
        for o, t in zip(
            np.atleast_1d(ours) if not isinstance(ours, tuple) else ours,
            np.atleast_1d(theirs) if not isinstance(theirs, tuple) else theirs,
        ):
            np.testing.assert_allclose(o, t, rtol=1e-13)
