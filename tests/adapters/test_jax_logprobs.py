"""normax.jax.logprobs and linear_logprobs against float64 jnp references (jax.nn.log_softmax of
logits / T gathered at the target, the entropy -sum p log p, jax.grad of both), under jit, grad,
vmap, forward mode (logprobs), with ignored rows, -inf logits, large margins, and on both routes.

Tolerances: float64, rtol/atol 1e-12 for logprobs (a few ULP of O(1) values) and 1e-10 for the
linear form (blocked GEMM sums); float32 against the float64 reference 2e-6 (a few float32 ULP);
the FFI route against the fallback: the same kernels, 4 ULP.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import normax.jax as nj
import numpy as np
import pytest
from jax.test_util import check_grads
from normax.jax import _ffi

F64 = {"rtol": 1e-12, "atol": 1e-12}
LINEAR = {"rtol": 1e-10, "atol": 1e-10}
F32 = {"rtol": 2e-6, "atol": 2e-6}
TARGET = np.array([3, 0, -100, 4, 1, 2])


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def data(*shape, seed=0, scale=2.0, dtype=np.float64):
    return jnp.asarray((np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype))


def reference(x, target, temperature=1.0, ignore_index=-100):
    """(logprob, entropy) per row in jnp, class axis last; ignored rows 0, 0."""
    logp = jax.nn.log_softmax(x / temperature, axis=-1)
    counted = target != ignore_index
    safe = jnp.where(counted, target, 0)
    lp = jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    p = jnp.exp(logp)
    entropy = -jnp.sum(jnp.where(p > 0, p * logp, 0), axis=-1)
    return jnp.where(counted, lp, 0), jnp.where(counted, entropy, 0)


@pytest.mark.parametrize("temperature", [1.0, 0.35, 2.5])
def test_logprobs_values_and_gradients_of_both_outputs(x64, temperature):
    x, t = data(6, 7), jnp.asarray(TARGET)
    logp, entropy = jax.jit(lambda x: nj.logprobs(x, t, temperature=temperature))(x)
    ref = reference(x, t, temperature)
    np.testing.assert_allclose(logp, ref[0], **F64)
    np.testing.assert_allclose(entropy, ref[1], **F64)
    assert logp[2] == 0 and entropy[2] == 0
    a, b = jnp.linspace(0.5, 1.5, 6), jnp.linspace(-1.0, 2.0, 6)

    def objective(fn):
        return lambda x: jnp.sum(a * fn(x)[0] + b * fn(x)[1])

    ours = objective(lambda x: nj.logprobs(x, t, temperature=temperature))
    theirs = objective(lambda x: reference(x, t, temperature))
    np.testing.assert_allclose(jax.jit(jax.grad(ours))(x), jax.grad(theirs)(x), **F64)
    np.testing.assert_allclose(jax.hessian(ours)(x), jax.hessian(theirs)(x), **F64)
    check_grads(ours, (x,), order=2, modes=["fwd", "rev"])
    # Either output alone.
    only_logp = jax.grad(lambda x: nj.logprobs(x, t, temperature=temperature)[0].sum())(x)
    np.testing.assert_allclose(only_logp, jax.grad(lambda x: reference(x, t, temperature)[0].sum())(x), **F64)
    only_h = jax.grad(lambda x: nj.logprobs(x, t, temperature=temperature)[1].sum())(x)
    np.testing.assert_allclose(only_h, jax.grad(lambda x: reference(x, t, temperature)[1].sum())(x), **F64)


def test_logprobs_without_entropy_axis_and_leading_dims(x64):
    x = data(2, 7, 3)  # classes on axis 1
    t = jnp.asarray([[0, 6, 2], [-100, 1, 1]])
    logp = nj.logprobs(x, t, axis=1, return_entropy=False)
    assert isinstance(logp, jax.Array) and logp.shape == (2, 3)
    np.testing.assert_allclose(logp, reference(jnp.moveaxis(x, 1, -1), t)[0], **F64)
    g = jax.grad(lambda x: nj.logprobs(x, t, axis=1, return_entropy=False).sum())(x)
    np.testing.assert_allclose(g, jax.grad(lambda x: reference(jnp.moveaxis(x, 1, -1), t)[0].sum())(x), **F64)


def test_logprobs_vmap_matches_a_loop(x64):
    xs, ts = data(3, 6, 7), jnp.asarray(np.random.default_rng(1).integers(0, 7, (3, 6)))

    def f(x, t):
        logp, h = nj.logprobs(x, t, temperature=0.8)
        return jnp.sum(logp) + 0.1 * jnp.sum(h)

    got = jax.jit(jax.vmap(jax.value_and_grad(f)))(xs, ts)
    for i in range(3):
        v, g = jax.value_and_grad(f)(xs[i], ts[i])
        np.testing.assert_allclose(got[0][i], v, **F64)
        np.testing.assert_allclose(got[1][i], g, **F64)


def test_logprobs_extremes(x64):
    """-inf logits (their terms are 0, finite gradients), a margin of 60 (logprob -3 e^-60, not
    the 0 of jax.nn.log_softmax even in float64; the target's gradient 1 - p_y = 3 e^-60, not 0)
    and float32 input."""
    x = jnp.asarray([[0.0, -jnp.inf, 1.0, 2.0], [60.0, 0.0, 0.0, 0.0]])
    t = jnp.asarray([2, 0])
    logp, h = nj.logprobs(x, t)
    ref = reference(x, t)
    np.testing.assert_allclose(logp[0], ref[0][0], rtol=1e-12)
    np.testing.assert_allclose(h[0], ref[1][0], rtol=1e-12)
    tiny = np.exp(-60.0)
    np.testing.assert_allclose(logp[1], -3 * tiny, rtol=1e-12)
    np.testing.assert_allclose(h[1], 183 * tiny, rtol=1e-12)  # 3 e^-60 (target) + 3 * 60 e^-60
    g = jax.grad(lambda x: sum(o.sum() for o in nj.logprobs(x, t)))(x)
    assert np.isfinite(g).all() and g[0, 1] == 0
    g_logp = jax.grad(lambda x: nj.logprobs(x, t)[0].sum())(x)
    np.testing.assert_allclose(g_logp[1], [3 * tiny, -tiny, -tiny, -tiny], rtol=1e-12)
    g_h = jax.grad(lambda x: nj.logprobs(x, t)[1].sum())(x)
    # dH/dx_c = -p_c (z_c - lse + H): the target's -180 e^-60, each other class's 60 e^-60.
    np.testing.assert_allclose(g_h[1], [-180 * tiny, 60 * tiny, 60 * tiny, 60 * tiny], rtol=1e-10)
    x32 = data(6, 7, dtype=np.float32)
    logp32, h32 = nj.logprobs(x32, jnp.asarray(TARGET))
    assert logp32.dtype == jnp.float32
    ref32 = reference(x32.astype(jnp.float64), jnp.asarray(TARGET))
    np.testing.assert_allclose(logp32, ref32[0], **F32)
    np.testing.assert_allclose(h32, ref32[1], **F32)


def test_logprobs_errors_name_the_argument():
    x = data(3, 4, dtype=np.float32)
    with pytest.raises(TypeError, match="target"):
        nj.logprobs(x, jnp.zeros(3))
    with pytest.raises(ValueError, match="target"):
        nj.logprobs(x, jnp.zeros(4, jnp.int32))
    with pytest.raises(ValueError, match="temperature"):
        nj.logprobs(x, jnp.zeros(3, jnp.int32), temperature=0.0)
    with pytest.raises((jax.errors.JaxRuntimeError, IndexError, ValueError), match="class index 9"):
        jax.block_until_ready(nj.logprobs(x, jnp.asarray([0, 9, 1])))


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_linear_logprobs_values_and_gradients(x64, temperature, with_bias):
    hidden, w = data(6, 5, seed=1), data(9, 5, seed=2, scale=0.8)
    b = data(9, seed=3) if with_bias else None
    t = jnp.asarray([8, 0, -100, 4, 1, 2])
    kw = {"temperature": temperature, "chunk_size": 12}

    def logits(h, w, b):
        return h @ w.T + (0 if b is None else b)

    out = jax.jit(lambda h: nj.linear_logprobs(h, w, t, linear_bias=b, **kw))(hidden)
    ref = reference(logits(hidden, w, b), t, temperature)
    for o, r in zip(out, ref):
        np.testing.assert_allclose(o, r, **LINEAR)
    a, c = jnp.linspace(0.5, 1.5, 6), jnp.linspace(-1.0, 2.0, 6)
    argnums = (0, 1, 2) if with_bias else (0, 1)

    def ours(h, w, b):
        logp, h_ = nj.linear_logprobs(h, w, t, linear_bias=b, **kw)
        return jnp.sum(a * logp + c * h_)

    def theirs(h, w, b):
        logp, h_ = reference(logits(h, w, b), t, temperature)
        return jnp.sum(a * logp + c * h_)

    got = jax.jit(jax.grad(ours, argnums))(hidden, w, b)
    want = jax.grad(theirs, argnums)(hidden, w, b)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, **LINEAR)
    check_grads(lambda h, w: ours(h, w, b), (hidden, w), order=1, modes=["rev"])
    # One output unused: its cotangent is a symbolic zero, which the backward skips.
    for k in (0, 1):
        g = jax.grad(lambda h, k=k: nj.linear_logprobs(h, w, t, linear_bias=b, **kw)[k].sum())(hidden)
        r = jax.grad(lambda h, k=k: reference(logits(h, w, b), t, temperature)[k].sum())(hidden)
        np.testing.assert_allclose(g, r, **LINEAR)
    logp_only = nj.linear_logprobs(hidden, w, t, linear_bias=b, return_entropy=False, **kw)
    np.testing.assert_allclose(logp_only, ref[0], **LINEAR)


def test_linear_logprobs_vmap_leading_dims_and_float32(x64):
    hs, w = data(2, 3, 4, 5, seed=4), data(7, 5, seed=5)
    ts = jnp.asarray(np.random.default_rng(6).integers(0, 7, (2, 3, 4)))

    def f(h, t):
        logp, ent = nj.linear_logprobs(h, w, t)
        return jnp.sum(logp) - 0.01 * jnp.sum(ent)

    got = jax.vmap(jax.value_and_grad(f))(hs, ts)
    for i in range(2):

        def ref(h, t=ts[i]):
            logp, ent = reference(h @ w.T, t)
            return jnp.sum(logp) - 0.01 * jnp.sum(ent)

        v, g = jax.value_and_grad(ref)(hs[i])
        np.testing.assert_allclose(got[0][i], v, **LINEAR)
        np.testing.assert_allclose(got[1][i], g, **LINEAR)
    h32, w32 = hs[0].astype(jnp.float32), w.astype(jnp.float32)
    logp, ent = nj.linear_logprobs(h32, w32, ts[0])
    assert logp.dtype == jnp.float32 and logp.shape == (3, 4)
    ref = reference(hs[0] @ w.T, ts[0])
    np.testing.assert_allclose(logp, ref[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ent, ref[1], rtol=1e-5, atol=1e-5)


def test_linear_logprobs_errors_and_no_forward_mode():
    h, w = data(3, 4, dtype=np.float32), data(5, 4, dtype=np.float32)
    with pytest.raises(TypeError, match="target"):
        nj.linear_logprobs(h, w, jnp.zeros(3))
    with pytest.raises(ValueError, match="target"):
        nj.linear_logprobs(h, w, jnp.zeros(4, jnp.int32))
    with pytest.raises(ValueError, match="linear_weight"):
        nj.linear_logprobs(h, w.T, jnp.zeros(3, jnp.int32))
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda h: nj.linear_logprobs(h, w, jnp.zeros(3, jnp.int32))[0], (h,), (h,))


def test_ffi_route_equals_the_fallback(x64):
    assert _ffi.uses_ffi(), "the extension has no FFI handlers (_core.ffi_targets)"
    x, t = data(6, 7), jnp.asarray(TARGET)
    hidden, w, b = data(6, 5, seed=1), data(7, 5, seed=2), data(7, seed=3)

    def run():
        out = jax.jit(lambda x: nj.logprobs(x, t, temperature=0.9))(x)
        g = jax.grad(lambda x: sum(o.sum() for o in nj.logprobs(x, t, temperature=0.9)))(x)
        lin = nj.linear_logprobs(hidden, w, t, linear_bias=b, temperature=1.3)
        dlin = jax.grad(lambda h, w, b: sum(o.sum() for o in nj.linear_logprobs(h, w, t, linear_bias=b)),
                        argnums=(0, 1, 2))(hidden, w, b)  # fmt: skip
        return [*out, g, *lin, *dlin]

    with _ffi.use_ffi(True):
        ffi = run()
    with _ffi.use_ffi(False):
        fallback = run()
    for a, b_ in zip(ffi, fallback):
        np.testing.assert_allclose(a, b_, rtol=4 * np.finfo(np.float64).eps, atol=1e-15)
