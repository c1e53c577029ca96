"""normax.jax rms_norm, layer_norm, crms_norm (normax_norm_forward target) and power_norm
(normax_power_norm_* targets): values and derivatives against float64 jnp formulas (x, weight
and bias; reverse and forward mode, Hessians), vmap with batched parameters, dtype promotion, and
the FFI route against the pure_callback fallback.

Tolerances: float64 results against float64 formulas, rtol 1e-12 / atol 1e-12 (a few ULP of O(1)
values); float32 against the float64 formula, rtol 1e-5 / atol 1e-5 (float32 statistics and the
tangent's sums over a row, each a few ULP of 6e-8, times the row length).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import normax
import normax.jax as nj
import numpy as np
import pytest
from normax.jax import _ffi

F64 = {"rtol": 1e-12, "atol": 1e-12}


@pytest.fixture
def x64():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


def rand(*shape, seed=0, dtype=np.float64):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(dtype))


def rms_ref(x, w, eps, k=1):
    axes = tuple(range(-k, 0))
    return x / jnp.sqrt(jnp.mean(x * x, axis=axes, keepdims=True) + eps) * w


def layer_ref(x, w, b, eps, k=1):
    axes = tuple(range(-k, 0))
    m = jnp.mean(x, axis=axes, keepdims=True)
    v = jnp.mean((x - m) ** 2, axis=axes, keepdims=True)
    return (x - m) / jnp.sqrt(v + eps) * w + b


def crms_ref(x, w, eps, k=1):
    axes = tuple(range(-k, 0))
    d = np.prod(x.shape[-k:]) + 1
    ms = (jnp.sum(x * x, axis=axes, keepdims=True) + jnp.sum(x, axis=axes, keepdims=True) ** 2) / d
    return x / jnp.sqrt(ms + eps) * w


# name -> (ours(x, w, b), reference(x, w, b)) over the trailing k axes.
def norms(k):
    axis = tuple(range(-k, 0))
    return {
        "rms": (
            lambda x, w, b: nj.rms_norm(x, w, eps=1e-3, axis=axis),
            lambda x, w, b: rms_ref(x, w, 1e-3, k),
        ),
        "layer": (
            lambda x, w, b: nj.layer_norm(x, w, b, eps=1e-3, axis=axis),
            lambda x, w, b: layer_ref(x, w, b, 1e-3, k),
        ),
        "crms": (
            lambda x, w, b: nj.crms_norm(x, w, eps=1e-3, axis=axis),
            lambda x, w, b: crms_ref(x, w, 1e-3, k),
        ),
    }


@pytest.mark.parametrize("name", ["rms", "layer", "crms"])
@pytest.mark.parametrize("k", [1, 2])
def test_values_gradients_jvp_and_hessian(name, k, x64):
    ours, ref = norms(k)[name]
    x = rand(3, 2, 4) * 2 + 0.5
    w = rand(*x.shape[3 - k :], seed=1)
    b = rand(*x.shape[3 - k :], seed=2)
    args = (x, w, b)
    np.testing.assert_allclose(jax.jit(ours)(*args), ref(*args), **F64)
    probe = rand(*x.shape, seed=3)

    def objective(f):
        return lambda *a: jnp.sum(jnp.sin(f(*a)) * probe)

    grads = jax.jit(jax.grad(objective(ours), argnums=(0, 1, 2)))(*args)
    for got, want in zip(grads, jax.grad(objective(ref), argnums=(0, 1, 2))(*args)):
        np.testing.assert_allclose(got, want, **F64)
    tangents = (rand(*x.shape, seed=4), rand(*w.shape, seed=5), rand(*b.shape, seed=6))
    np.testing.assert_allclose(jax.jvp(ours, args, tangents)[1], jax.jvp(ref, args, tangents)[1], **F64)
    np.testing.assert_allclose(jax.jacfwd(ours, 1)(*args), jax.jacfwd(ref, 1)(*args), **F64)
    for argnum in (0, 1):
        got = jax.hessian(objective(ours), argnum)(*args)
        np.testing.assert_allclose(got, jax.hessian(objective(ref), argnum)(*args), **F64)


def test_without_parameters_and_vmap_with_batched_ones(x64):
    xs = rand(3, 5, 6)
    ws = rand(3, 6, seed=1)
    bs = rand(3, 6, seed=2)
    for name, (ours, ref) in norms(1).items():
        np.testing.assert_allclose(ours(xs, None, None), ref(xs, 1.0, 0.0), **F64)
        for in_axes in ((0, 0, 0), (None, 0, None), (0, None, 0)):
            args = [a if ax == 0 else a[0] for a, ax in zip((xs, ws, bs), in_axes)]
            got = jax.jit(jax.vmap(ours, in_axes))(*args)
            np.testing.assert_allclose(got, jax.vmap(ref, in_axes)(*args), **F64, err_msg=f"{name} {in_axes}")
        # Per-example weight gradients: a sum over rows per batch element.
        g = jax.vmap(jax.grad(lambda x, w, b, f=ours: jnp.sum(f(x, w, b) ** 3), 1))(xs, ws, bs)
        g_ref = jax.vmap(jax.grad(lambda x, w, b, f=ref: jnp.sum(f(x, w, b) ** 3), 1))(xs, ws, bs)
        np.testing.assert_allclose(g, g_ref, **F64, err_msg=name)


def test_layer_norm_gradient_with_a_large_mean_in_float32(x64):
    """|mean| = 1e5 std: the tangent centers x on the kernel's float32 mean and corrects it once,
    so the float32 gradient is within 2e-6 (relative to its largest entry) of the float64 one
    (measured 9e-8; without the correction 1.5e-4)."""
    x = (rand(4, 64) * 0.1 + 1e4).astype(jnp.float32)
    probe = rand(4, 64, seed=1)
    g = jax.grad(lambda x: jnp.sum(nj.layer_norm(x) * probe.astype(jnp.float32)))(x)
    want = jax.grad(lambda x: jnp.sum(layer_ref(x, 1.0, 0.0, 1e-5) * probe))(x.astype(jnp.float64))
    np.testing.assert_allclose(
        np.asarray(g, np.float64), want, rtol=0, atol=2e-6 * float(jnp.abs(want).max())
    )


@pytest.mark.parametrize("enable_x64", [False, True])
@pytest.mark.parametrize("mode", ["standard", "strict"])
def test_dtypes_as_jax(enable_x64, mode):
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", enable_x64)
    try:
        with jax.numpy_dtype_promotion(mode):
            ints = (jnp.arange(12).reshape(3, 4) % 5).astype(jnp.int32)
            for name, (ours, _) in norms(1).items():
                y = ours(ints, jnp.ones(4, jnp.int32), jnp.zeros(4, jnp.int32))
                assert y.dtype == jax.nn.softmax(ints).dtype == jnp.float32, name
                for dtype in (jnp.bfloat16, jnp.float16):
                    x = rand(3, 4, dtype=np.float32)
                    half = ours(x.astype(dtype), jnp.ones(4), jnp.zeros(4))
                    assert half.dtype == dtype
                    full = ours(x.astype(dtype).astype(jnp.float32), jnp.ones(4), jnp.zeros(4))
                    np.testing.assert_array_equal(
                        np.asarray(half, np.float32), np.asarray(full.astype(dtype), np.float32)
                    )
                    g = jax.grad(lambda x, f=ours: jnp.sum(f(x, None, None).astype(jnp.float32) ** 2))(
                        x.astype(dtype)
                    )
                    assert g.dtype == dtype
            y, _ = nj.power_norm(ints, jnp.ones(4), jnp.zeros(4), nj.power_norm_init(4))
            assert y.dtype == jnp.float32
    finally:
        jax.config.update("jax_enable_x64", previous)


def test_power_norm_under_vmap_is_one_call_per_element(x64):
    settings = {"warmup_iters": 2, "group_num": 2}
    xs = rand(2, 5, 4)
    state = nj.power_norm_init(4, jnp.float64)

    def step(x):
        return nj.power_norm(x, jnp.ones(4), jnp.zeros(4), state, **settings)

    ys, states = jax.vmap(step)(xs)
    for i in range(2):
        ref = normax.PowerNormState(4, **settings)
        np.testing.assert_allclose(
            ys[i], normax.power_norm(np.asarray(xs[i]), np.ones(4), np.zeros(4), ref), **F64
        )
        np.testing.assert_allclose(states.running_phi[i], ref.running_phi, **F64)


def test_ffi_route_equals_the_fallback(x64):
    """The default route is the FFI (the extension is always built with its handlers) and gives
    the pure_callback fallback's values and gradients exactly: both run the same kernels."""
    assert _ffi.uses_ffi(), "the extension has no FFI handlers (_core.ffi_targets)"
    x = rand(5, 6)
    w = rand(6, seed=1)
    b = rand(6, seed=2)
    state = nj.power_norm_init(6, jnp.float64)
    ops = {name: ours for name, (ours, _) in norms(1).items()}
    ops["power"] = lambda x, w, b: nj.power_norm(
        x, w, b, state._replace(iters=jnp.asarray(1)), warmup_iters=1
    )[0]
    for name, op in ops.items():
        results = []
        for enabled in (True, False):
            with _ffi.use_ffi(enabled):
                f = jax.jit(lambda x, w, b, op=op: op(x, w, b))
                results.append(
                    (f(x, w, b), *jax.grad(lambda *a, f=f: jnp.sum(f(*a) ** 2), (0, 1, 2))(x, w, b))
                )
        for a, e in zip(*results):
            np.testing.assert_allclose(a, e, rtol=0, atol=0, err_msg=name)


def test_ffi_route_traces_every_transformation(monkeypatch):
    """With the FFI route taken (forced here: tracing needs no handler), the norms' value, grad,
    jvp, hessian and vmap, and PowerNorm's training step, trace to FFI calls and no callback."""
    monkeypatch.setattr(_ffi, "_ffi_ready", lambda: True)
    x = rand(5, 6, dtype=np.float32)
    w = jnp.ones(6)
    b = jnp.zeros(6)
    state = nj.power_norm_init(6)
    for name, (ours, _) in norms(1).items():

        def objective(x, w, op=ours):
            return jnp.sum(op(x, w, b) ** 3)

        for fn, args in (
            (objective, (x, w)),
            (jax.grad(objective, (0, 1)), (x, w)),
            (lambda x, w, f=objective: jax.jvp(f, (x, w), (x, w)), (x, w)),
            (jax.hessian(objective), (x, w)),
            (jax.vmap(jax.grad(objective, 1)), (jnp.stack([x, x]), jnp.stack([w, w]))),
        ):
            text = str(jax.make_jaxpr(fn)(*args))
            assert "normax_norm_forward" in text and "pure_callback" not in text, name

    def step(x, w, ema):
        y, new_state = nj.power_norm(x, w, b, state._replace(ema_gz=ema), warmup_iters=3)
        return jnp.sum(y**2), new_state

    text = str(jax.make_jaxpr(jax.grad(step, (1, 2), has_aux=True))(x, w, state.ema_gz))
    assert "normax_power_norm_forward" in text and "normax_power_norm_backward" in text
    assert "pure_callback" not in text
