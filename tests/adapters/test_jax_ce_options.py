"""normax.jax's cross-entropies with issue 24's options: temperature, token_weight and
return_stats on cross_entropy, linear_cross_entropy and the vocabulary-parallel forms (temperature
and token_weight), against float64 jnp references (jax.nn.logsumexp of logits / T, jax.grad of
the reference loss), under jit, grad, vmap, forward mode, and on both routes (FFI, fallback).

Tolerances: float64 against float64 references, rtol/atol 1e-12 (a few ULP of O(1) values; the
kernels' sums are ordered differently from jnp's); the linear forms 1e-10 (their GEMMs block the
sums); the FFI route against the fallback: the same kernels, so 4 ULP.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import normax.jax as nj
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads
from normax.jax import _ffi

F64 = {"rtol": 1e-12, "atol": 1e-12}
LINEAR = {"rtol": 1e-10, "atol": 1e-10}
LABELS = np.array([3, 0, -100, 4, 1, 2])
CLASS_WEIGHT = np.linspace(0.5, 2.0, 5)
TOKEN_WEIGHT = np.array([0.5, 2.0, 7.0, 1.0, 0.0, 1.5])


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def data(*shape, seed=0, scale=2.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale)


def reference(x, labels, *, temperature=1.0, token_weight=None, weight=None, label_smoothing=0.0, z_loss=0.0,
              softcap=None, reduction="none", ignore_index=-100):  # fmt: skip
    """(loss, lse, entropy, correct, z term) in float64 jnp, class axis last: the spec's formulas."""
    z = x / temperature
    if softcap:
        z = softcap * jnp.tanh(z / softcap)
    lse = jax.nn.logsumexp(z, axis=-1)
    logp = z - lse[..., None]
    w = jnp.ones(x.shape[-1]) if weight is None else jnp.asarray(weight)
    tw = jnp.ones(labels.shape) if token_weight is None else jnp.asarray(token_weight)
    counted = labels != ignore_index
    safe = jnp.where(counted, labels, 0)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0] * w[safe]
    smooth = -jnp.sum(w * logp, axis=-1) / x.shape[-1]
    rows = (
        jnp.where(counted, (1 - label_smoothing) * nll + label_smoothing * smooth + z_loss * lse**2, 0) * tw
    )
    denom = jnp.sum(jnp.where(counted, w[safe] * tw, 0))
    p = jnp.exp(logp)
    entropy = jnp.where(counted, -jnp.sum(jnp.where(p > 0, p * logp, 0), axis=-1), 0)
    correct = counted & (jnp.argmax(x, axis=-1) == labels)
    zterm = z_loss * jnp.sum(jnp.where(counted, tw * lse**2, 0))
    if reduction == "mean":
        rows, zterm = rows.sum() / denom, zterm / denom
    elif reduction == "sum":
        rows = rows.sum()
    return rows, jnp.where(counted, lse, 0), entropy, correct, zterm


def assert_stats(stats, ref, tol):
    _, lse, entropy, correct, zterm = ref
    assert isinstance(stats, nj.CrossEntropyStats)
    np.testing.assert_allclose(stats.lse, lse, **tol)
    np.testing.assert_allclose(stats.entropy, entropy, **tol)
    np.testing.assert_array_equal(stats.correct, correct)
    assert stats.correct.dtype == jnp.bool_ and stats.z_loss.shape == ()
    np.testing.assert_allclose(stats.z_loss, zterm, **tol)


CASES = {
    "temperature": {"temperature": 0.7},
    "token_weight_mean": {"token_weight": TOKEN_WEIGHT, "reduction": "mean"},
    "everything_mean": {
        "temperature": 1.9,
        "token_weight": TOKEN_WEIGHT,
        "weight": CLASS_WEIGHT,
        "label_smoothing": 0.1,
        "z_loss": 1e-3,
        "softcap": 4.0,
        "reduction": "mean",
    },
    "token_weight_sum_z": {
        "token_weight": TOKEN_WEIGHT,
        "z_loss": 1e-2,
        "reduction": "sum",
        "temperature": 3.0,
    },
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cross_entropy_values_stats_and_gradients(case):
    kw = CASES[case]
    x, labels = data(6, 5), jnp.asarray(LABELS)
    loss, stats = jax.jit(lambda x: nj.cross_entropy(x, labels, return_stats=True, **kw))(x)
    # The float64 reference and its derivatives jitted: one compile each, not one per primitive.
    ref = jax.jit(lambda x: reference(x, labels, **kw))(x)
    np.testing.assert_allclose(loss, ref[0], **F64)
    assert_stats(stats, ref, F64)
    # Without stats: the same loss.
    np.testing.assert_allclose(nj.cross_entropy(x, labels, **kw), ref[0], **F64)
    # The gradient carries 1/T and the token weights; second derivatives too.
    probe = jnp.linspace(0.5, 1.5, np.size(ref[0])).reshape(jnp.shape(ref[0]))

    def ours(x):
        return jnp.sum(nj.cross_entropy(x, labels, **kw) * probe)

    def theirs(x):
        return jnp.sum(reference(x, labels, **kw)[0] * probe)

    np.testing.assert_allclose(jax.grad(ours)(x), jax.jit(jax.grad(theirs))(x), **F64)
    np.testing.assert_allclose(jax.hessian(ours)(x), jax.jit(jax.hessian(theirs))(x), **F64)
    check_grads(ours, (x,), order=2, modes=["fwd", "rev"])


def test_token_weight_and_stats_get_no_gradient():
    """The token weights are constants to autodiff (documented), the statistics metrics: their
    tangents and cotangents are zero."""
    x, labels, tw = data(6, 5), jnp.asarray(LABELS), jnp.asarray(TOKEN_WEIGHT)
    g = jax.grad(lambda tw: nj.cross_entropy(x, labels, token_weight=tw, reduction="sum"))(tw)
    np.testing.assert_array_equal(g, 0)

    def metrics(x):
        _, s = nj.cross_entropy(x, labels, z_loss=1e-3, return_stats=True, token_weight=tw)
        return s.lse.sum() + s.entropy.sum() + s.z_loss

    np.testing.assert_array_equal(jax.grad(metrics)(x), 0)
    _, tangent = jax.jvp(metrics, (x,), (jnp.ones_like(x),))
    assert tangent == 0


def test_class_probabilities_with_token_weights_and_stats():
    x = data(4, 5, seed=3)
    probs = jax.nn.softmax(data(4, 5, seed=4))
    tw = jnp.asarray([1.0, 0.5, 2.0, 0.0])
    loss, stats = nj.cross_entropy(
        x, probs, token_weight=tw, temperature=0.5, reduction="mean", return_stats=True
    )
    z = x / 0.5
    rows = -jnp.sum(probs * jax.nn.log_softmax(z), axis=-1) * tw
    np.testing.assert_allclose(loss, rows.sum() / tw.sum(), **F64)
    np.testing.assert_array_equal(stats.correct, jnp.argmax(x, -1) == jnp.argmax(probs, -1))
    np.testing.assert_allclose(stats.lse, jax.nn.logsumexp(z, axis=-1), **F64)


def test_zero_token_weight_total_gives_nan_mean():
    x = data(6, 5)
    loss = nj.cross_entropy(x, jnp.asarray(LABELS), token_weight=jnp.zeros(6), reduction="mean")
    assert np.isnan(loss)


def test_vmap_over_logits_and_token_weights_and_axis():
    xs, tws = data(3, 6, 5), jnp.asarray(np.random.default_rng(5).uniform(0, 2, (3, 6)))
    labels = jnp.asarray(LABELS)

    def f(x, tw):
        loss, s = nj.cross_entropy(
            x, labels, token_weight=tw, temperature=1.3, reduction="mean", return_stats=True
        )
        return loss, s.entropy

    got = jax.jit(jax.vmap(f))(xs, tws)
    for i in range(3):
        ref = reference(xs[i], labels, token_weight=tws[i], temperature=1.3, reduction="mean")
        np.testing.assert_allclose(got[0][i], ref[0], **F64)
        np.testing.assert_allclose(got[1][i], ref[2], **F64)
    grads = jax.vmap(jax.grad(lambda x, tw: f(x, tw)[0]))(xs, tws)
    np.testing.assert_allclose(grads[2], jax.grad(lambda x: f(x, tws[2])[0])(xs[2]), **F64)
    # The class axis elsewhere: the stats keep the other axes' shape.
    _, s = nj.cross_entropy(jnp.moveaxis(xs[0], -1, 0), labels, axis=0, return_stats=True, temperature=2.0)
    np.testing.assert_allclose(s.entropy, reference(xs[0], labels, temperature=2.0)[2], **F64)


def test_bad_options_raise_naming_them():
    x, labels = data(6, 5), jnp.asarray(LABELS)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            nj.cross_entropy(x, labels, temperature=bad)
        with pytest.raises(ValueError, match="temperature"):
            nj.linear_logprobs(x, jnp.ones((3, 5)), jnp.zeros(6, jnp.int32), temperature=bad)
    with pytest.raises(TypeError, match="temperature"):
        nj.cross_entropy(x, labels, temperature="2")
    with pytest.raises(ValueError, match="token_weight"):
        nj.cross_entropy(x, labels, token_weight=jnp.ones(5))
    with pytest.raises(ValueError, match="token_weight"):
        nj.linear_cross_entropy(x, jnp.ones((3, 5)), jnp.zeros(6, jnp.int32), token_weight=jnp.ones((6, 1)))
    with pytest.raises(TypeError, match="token_weight"):
        nj.cross_entropy(x, labels, token_weight=jnp.ones(6, jnp.complex64))


LINEAR_CASES = {
    "temperature_mean": {"temperature": 0.6},
    "token_weight_sum": {"token_weight": TOKEN_WEIGHT, "reduction": "sum", "z_loss": 1e-3},
    "everything_mean": {
        "temperature": 1.7,
        "token_weight": TOKEN_WEIGHT,
        "weight": CLASS_WEIGHT,
        "label_smoothing": 0.1,
        "z_loss": 1e-3,
        "softcap": 3.0,
    },
    "token_weight_none": {"token_weight": TOKEN_WEIGHT, "temperature": 2.5, "reduction": "none"},
}


@pytest.mark.parametrize("case", sorted(LINEAR_CASES))
def test_linear_cross_entropy_values_stats_and_gradients(case):
    kw = {"reduction": "mean", **LINEAR_CASES[case]}
    hidden, w, b = data(6, 4, seed=1), data(5, 4, seed=2, scale=0.7), data(5, seed=3)
    labels = jnp.asarray(LABELS)

    def ours(hidden, w, b):
        return nj.linear_cross_entropy(hidden, w, labels, linear_bias=b, chunk_size=8, **kw)

    def theirs(hidden, w, b):
        return reference(hidden @ w.T + b, labels, **kw)[0]

    loss, stats = jax.jit(
        lambda h: nj.linear_cross_entropy(h, w, labels, linear_bias=b, return_stats=True, **kw)
    )(hidden)
    ref = reference(hidden @ w.T + b, labels, **kw)
    np.testing.assert_allclose(loss, ref[0], **LINEAR)
    assert_stats(stats, ref, LINEAR)
    probe = jnp.linspace(0.5, 1.5, np.size(ref[0])).reshape(jnp.shape(ref[0]))
    got = jax.jit(jax.grad(lambda *a: jnp.sum(ours(*a) * probe), argnums=(0, 1, 2)))(hidden, w, b)
    want = jax.grad(lambda *a: jnp.sum(theirs(*a) * probe), argnums=(0, 1, 2))(hidden, w, b)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, **LINEAR)
    check_grads(lambda h: jnp.sum(ours(h, w, b) * probe), (hidden,), order=1, modes=["rev"])


def test_linear_cross_entropy_vmap_with_token_weights():
    hs, w = data(2, 6, 4, seed=6), data(5, 4, seed=7)
    tws = jnp.asarray(np.random.default_rng(8).uniform(0, 2, (2, 6)))
    labels = jnp.asarray(LABELS)

    def f(h, tw):
        return nj.linear_cross_entropy(h, w, labels, token_weight=tw, temperature=0.8)

    got = jax.vmap(jax.value_and_grad(f))(hs, tws)
    for i in range(2):
        kw = {"token_weight": tws[i], "temperature": 0.8, "reduction": "mean"}
        ref = jax.value_and_grad(lambda h, kw=kw: reference(h @ w.T, labels, **kw)[0])(hs[i])
        np.testing.assert_allclose(got[0][i], ref[0], **LINEAR)
        np.testing.assert_allclose(got[1][i], ref[1], **LINEAR)


def _shard_map(fn, in_specs):
    mesh = Mesh(jax.devices()[:1], ("v",))
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=P())


def test_vocab_parallel_forms_take_temperature_and_token_weights():
    """One device holding the whole vocabulary: the single-process values and gradients (the
    multi-process ones are tests/distributed's)."""
    x, labels, tw = data(6, 5), jnp.asarray(LABELS), jnp.asarray(TOKEN_WEIGHT)
    hidden, w = data(6, 4, seed=1), data(5, 4, seed=2)
    kw = {"temperature": 0.8, "token_weight": tw, "reduction": "mean", "label_smoothing": 0.1}

    vp = _shard_map(lambda x: nj.vocab_parallel_cross_entropy(x, labels, "v", **kw), (P(None, "v"),))
    np.testing.assert_allclose(vp(x), nj.cross_entropy(x, labels, **kw), **F64)
    np.testing.assert_allclose(
        jax.grad(vp)(x), jax.jit(jax.grad(lambda x: reference(x, labels, **kw)[0]))(x), **F64
    )

    vpl = _shard_map(
        lambda h, w: nj.vocab_parallel_linear_cross_entropy(h, w, labels, "v", **kw), (P(), P("v", None))
    )
    ref = jax.jit(jax.value_and_grad(lambda h, w: reference(h @ w.T, labels, **kw)[0], argnums=(0, 1)))(
        hidden, w
    )
    got = jax.value_and_grad(vpl, argnums=(0, 1))(hidden, w)
    np.testing.assert_allclose(got[0], ref[0], **LINEAR)
    for g, r in zip(got[1], ref[1]):
        np.testing.assert_allclose(g, r, **LINEAR)


def test_ffi_route_equals_the_fallback():
    assert _ffi.uses_ffi(), "the extension has no FFI handlers (_core.ffi_targets)"
    x, hidden, w = data(6, 5), data(6, 4, seed=1), data(5, 4, seed=2)
    labels = jnp.asarray(LABELS)
    kw = {"temperature": 1.4, "token_weight": TOKEN_WEIGHT, "z_loss": 1e-3, "label_smoothing": 0.1}

    def run():
        loss, s = jax.jit(lambda x: nj.cross_entropy(x, labels, return_stats=True, reduction="mean", **kw))(x)
        grad = jax.grad(lambda x: nj.cross_entropy(x, labels, reduction="sum", **kw))(x)
        lin, ls = nj.linear_cross_entropy(hidden, w, labels, return_stats=True, **kw)
        dlin = jax.grad(lambda h: nj.linear_cross_entropy(h, w, labels, reduction="none", **kw).sum())(hidden)
        return [loss, *s, grad, lin, *ls, dlin]

    with _ffi.use_ffi(True):
        ffi = run()
    with _ffi.use_ffi(False):
        fallback = run()
    for a, b in zip(ffi, fallback):
        np.testing.assert_allclose(a, b, rtol=4 * np.finfo(np.float64).eps, atol=1e-15)
