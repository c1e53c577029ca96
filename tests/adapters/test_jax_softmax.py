"""normax.jax's softmax family on XLA's FFI (or its pure_callback fallback): values against float64
references, forward mode (jvp, jacfwd, hessian) against jax.nn, vmap without a loop, jax's dtype
rules, and the FFI route against the fallback.

Tolerances: float32 results against float64 references within 4 float32 ULP relative (normax's
kernels are within a few ULP of correctly rounded); derivatives in float64 (x64 on) against jax.nn's
to 1e-12 relative: both are the same closed forms evaluated a few ULP apart.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import normax
import normax.jax as nj
import numpy as np
import pytest
from normax.jax import _ffi

F32_RTOL = 4 * 2.0**-23
F64 = {"rtol": 1e-12, "atol": 1e-13}


def rand(*shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype) * 2


def stablemax_definition(x, axis):
    s = jnp.where(x >= 0, x + 1, 1 / (1 - x))
    return s / jnp.sum(s, axis=axis, keepdims=True)


# name -> (normax.jax's function, a reference of the same arguments)
ROW_MAPS = {
    "softmax": (nj.softmax, jax.nn.softmax),
    "log_softmax": (nj.log_softmax, jax.nn.log_softmax),
    "stablemax": (nj.stablemax, stablemax_definition),
    "log_stablemax": (nj.log_stablemax, lambda x, axis: jnp.log(stablemax_definition(x, axis))),
}
# Adjacent axes (a reshape), non-adjacent ones (a transpose), all, none, negative.
AXES = [-1, 0, 1, (1, 2), (0, 2), None, (), (-3, -2)]


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("name", sorted(ROW_MAPS))
def test_row_maps_match_float64(name, axis):
    ours, ref = ROW_MAPS[name]
    x = rand(3, 4, 5)
    got = ours(jnp.asarray(x), axis)
    assert got.dtype == jnp.float32 and got.shape == x.shape
    with jax.enable_x64(True):
        want = np.asarray(ref(jnp.asarray(x, jnp.float64), axis))
    np.testing.assert_allclose(got, want, rtol=F32_RTOL, atol=F32_RTOL * np.abs(want).max())


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("keepdims", [False, True])
def test_logsumexp_matches_float64(axis, keepdims):
    a, b = rand(3, 4, 5), rand(4, 5, seed=1)
    with jax.enable_x64(True):
        want = jax.nn.logsumexp(jnp.asarray(a, jnp.float64), axis, keepdims=keepdims)
        want_b = jax.nn.logsumexp(
            jnp.asarray(a, jnp.float64), axis, b=jnp.asarray(b, jnp.float64), keepdims=keepdims,
            return_sign=True,
        )  # fmt: skip
    got = nj.logsumexp(jnp.asarray(a), axis, keepdims=keepdims)
    assert got.shape == want.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=F32_RTOL)
    res, sign = nj.logsumexp(jnp.asarray(a), axis, b=jnp.asarray(b), keepdims=keepdims, return_sign=True)
    np.testing.assert_array_equal(sign, want_b[1])
    # The weighted sums cancel: the error is the float32 rounding of the sum's terms, relative to
    # the largest term (exp(max a + log max|b|)), not to the result.
    scale = np.exp(np.abs(a).max()) * np.abs(b).max() / np.exp(np.asarray(want_b[0]))
    np.testing.assert_allclose(res, want_b[0], rtol=F32_RTOL * max(scale.max(), 1))


def test_logsumexp_cancellation_is_correctly_rounded():
    """JAX's testLogSumExp81 and testLogSumExp776 inputs (test_jax_suite.py deselects both): normax's
    results are the correctly rounded ones (float64 terms summed exactly by math.fsum: the float64
    rounding of each term is far below float32's)."""
    a = np.array(
        [[1.2269024, -4.5765195, -3.9800992e-03, -2.904645], [-0.95875585, 1.44651, -0.53110969, 3.4265475],
         [2.2362924, 0.84065592, 5.4044681, -2.7748373]], np.float32,
    )  # fmt: skip
    b = np.array(
        [[1.7285503, 0.02980828, -6.2182198, 2.358394], [-6.5652533, -1.406512, -2.9123003, -2.8485565],
         [4.423967, 0.89934725, -3.9918787, 4.880283]], np.float32,
    )  # fmt: skip
    exact = [math.fsum(float(w) * math.exp(float(v)) for v, w in zip(ra, rb)) for ra, rb in zip(a, b)]
    res, sign = jax.jit(lambda a, b: nj.logsumexp(a, 1, b=b, return_sign=True))(a, b)
    np.testing.assert_array_equal(res, np.float32([math.log(abs(s)) for s in exact]))
    np.testing.assert_array_equal(sign, np.sign(exact).astype(np.float32))
    # Integer weights cancelling exactly: log(0) = -inf, as jax (SciPy's float64 gives a residue).
    got = nj.logsumexp(
        jnp.array([1, 3, 2, -5]), 0, b=jnp.array([[0, -2, 5, -3], [-1, 1, 3, 2], [5, 1, 0, 1]])
    )
    want = [math.log(-math.exp(1) + 5 * math.exp(1)), -math.inf, math.log(8 * math.exp(2)), -math.inf]
    np.testing.assert_array_equal(got, np.float32(want))


def test_zero_size_and_0d():
    assert nj.softmax(jnp.zeros((2, 0))).shape == (2, 0)
    lse, sign = nj.logsumexp(jnp.zeros((2, 0)), axis=1, return_sign=True)
    np.testing.assert_array_equal(lse, [-np.inf, -np.inf])
    np.testing.assert_array_equal(sign, [0.0, 0.0])
    assert float(nj.softmax(jnp.float32(3.0))) == 1.0 and float(nj.log_stablemax(2.0)) == 0.0
    assert float(nj.logsumexp(jnp.float32(0.5))) == 0.5


# ---------------------------------------------------------------------------------------------
# Forward mode and second derivatives (float64)

DIFFERENTIABLE = {
    "softmax": (lambda x: nj.softmax(x, axis=(0, 2)), lambda x: jax.nn.softmax(x, axis=(0, 2))),
    "log_softmax": (lambda x: nj.log_softmax(x, axis=1), lambda x: jax.nn.log_softmax(x, axis=1)),
    "logsumexp": (lambda x: nj.logsumexp(x, axis=-1), lambda x: jax.nn.logsumexp(x, axis=-1)),
    # Weights of both signs: log|sum(b * exp(a))|.
    "logsumexp_b": (
        lambda x: nj.logsumexp(x, axis=1, b=jnp.linspace(-1.0, 2.0, 4)[:, None], return_sign=True)[0],
        lambda x: jax.nn.logsumexp(x, axis=1, b=jnp.linspace(-1.0, 2.0, 4)[:, None], return_sign=True)[0],
    ),
    "stablemax": (lambda x: nj.stablemax(x, axis=0), lambda x: stablemax_definition(x, 0)),
    "log_stablemax": (lambda x: nj.log_stablemax(x), lambda x: jnp.log(stablemax_definition(x, -1))),
}


@pytest.mark.parametrize("name", sorted(DIFFERENTIABLE))
def test_jvp_jacfwd_hessian_match_jax(name):
    ours, ref = DIFFERENTIABLE[name]
    with jax.enable_x64(True):
        x = jnp.asarray(rand(3, 4, 2, dtype=np.float64))
        t = jnp.asarray(rand(3, 4, 2, seed=3, dtype=np.float64))
        y, dy = jax.jvp(ours, (x,), (t,))
        y_ref, dy_ref = jax.jvp(ref, (x,), (t,))
        np.testing.assert_allclose(y, y_ref, **F64)
        np.testing.assert_allclose(dy, dy_ref, **F64)
        np.testing.assert_allclose(jax.jit(jax.jacfwd(ours))(x), jax.jacfwd(ref)(x), **F64)
        np.testing.assert_allclose(jax.jacrev(ours)(x), jax.jacfwd(ref)(x), **F64)

        def scalar(f):
            return lambda x: jnp.sum(jnp.sin(f(x)))

        np.testing.assert_allclose(jax.hessian(scalar(ours))(x), jax.hessian(scalar(ref))(x), **F64)


def test_logsumexp_derivatives_in_the_weights():
    with jax.enable_x64(True):
        a = jnp.asarray(rand(3, 4, dtype=np.float64))
        b = jnp.asarray(rand(3, 4, seed=5, dtype=np.float64))

        def ours(a, b):
            return nj.logsumexp(a, axis=0, b=b, return_sign=True)[0]

        def ref(a, b):
            return jax.nn.logsumexp(a, axis=0, b=b, return_sign=True)[0]

        for argnums in [0, 1, (0, 1)]:
            got, want = jax.jacfwd(ours, argnums)(a, b), jax.jacfwd(ref, argnums)(a, b)
            jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, **F64), got, want)
        got = jax.hessian(lambda a, b: jnp.sum(ours(a, b)), (0, 1))(a, b)
        want = jax.hessian(lambda a, b: jnp.sum(ref(a, b)), (0, 1))(a, b)
        jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, **F64), got, want)


# ---------------------------------------------------------------------------------------------
# vmap: one call over the whole batch


def _kernel_calls(jaxpr) -> list[str]:
    return [line for line in str(jaxpr).splitlines() if "pure_callback[" in line or "ffi_call[" in line]


@pytest.mark.parametrize("name", sorted(DIFFERENTIABLE))
def test_vmap_is_one_call_and_matches_a_loop(name):
    ours, _ = DIFFERENTIABLE[name]
    xs = jnp.asarray(rand(2, 5, 3, 4, 2))
    batched = jax.vmap(jax.vmap(ours), in_axes=1)(xs)
    looped = jnp.stack([jnp.stack([ours(xs[i, j]) for i in range(2)]) for j in range(5)])
    np.testing.assert_array_equal(batched, looped)
    # The nested vmap is still one kernel call, its result the whole (5, 2) batch: no loop (a
    # sequential vmap_method would be a scan around a per-element call).
    jaxpr = str(jax.make_jaxpr(jax.vmap(jax.vmap(ours), in_axes=1))(xs))
    (call,) = _kernel_calls(jaxpr)
    assert "f32[5,2," in call.split("=")[0] and "scan[" not in jaxpr and "while[" not in jaxpr
    grads = jax.vmap(jax.grad(lambda x: jnp.sum(ours(x))))(xs[0])
    np.testing.assert_allclose(grads, jnp.stack([jax.grad(lambda x: jnp.sum(ours(x)))(x) for x in xs[0]]),
                               rtol=1e-6, atol=1e-7)  # fmt: skip


def test_vmap_of_logsumexp_with_unbatched_weights():
    a, b = jnp.asarray(rand(6, 3, 4)), jnp.asarray(rand(4, seed=2))
    got = jax.vmap(lambda a: nj.logsumexp(a, axis=1, b=b, return_sign=True), out_axes=1)(a)
    want = [nj.logsumexp(x, axis=1, b=b, return_sign=True) for x in a]
    np.testing.assert_array_equal(got[0], jnp.stack([w[0] for w in want], axis=1))
    np.testing.assert_array_equal(got[1], jnp.stack([w[1] for w in want], axis=1))


# ---------------------------------------------------------------------------------------------
# dtypes as jax's


@pytest.mark.parametrize("x64", [False, True])
@pytest.mark.parametrize("promotion", ["standard", "strict"])
@pytest.mark.parametrize("dtype", [np.bool_, np.int8, np.uint16, np.int32, np.int64])
def test_integer_and_bool_promote_as_jax(dtype, promotion, x64):
    with jax.enable_x64(x64), jax.numpy_dtype_promotion(promotion):
        x = jnp.asarray((np.arange(6).reshape(2, 3) % 3).astype(dtype))
        want = jax.scipy.special.logsumexp(x, axis=1)
        assert nj.logsumexp(x, axis=1).dtype == want.dtype
        np.testing.assert_allclose(nj.logsumexp(x, axis=1), want, rtol=F32_RTOL)
        np.testing.assert_allclose(nj.logsumexp(x, 1, b=x), jax.scipy.special.logsumexp(x, 1, b=x),
                                   rtol=F32_RTOL)  # fmt: skip
        for fn in (nj.softmax, nj.log_softmax, nj.stablemax, nj.log_stablemax):
            assert fn(x).dtype == want.dtype
        # The promoted values (jax.nn.softmax itself refuses bool, and gives NaN for unsigned ints).
        np.testing.assert_allclose(nj.softmax(x), jax.nn.softmax(x.astype(want.dtype)), rtol=F32_RTOL)


def test_mixed_dtypes_follow_jax_promotion():
    a, i = jnp.ones(3, jnp.float32), jnp.ones(3, jnp.int32)
    assert nj.logsumexp(a, b=i).dtype == jax.scipy.special.logsumexp(a, b=i).dtype == jnp.float32
    assert nj.logsumexp(i, b=2.0).dtype == jnp.float32
    with jax.numpy_dtype_promotion("strict"):
        for b in (i, jnp.ones(3, jnp.bfloat16)):
            # jax's own promotion refuses them, in both.
            with pytest.raises(jax.dtypes.TypePromotionError):
                jax.scipy.special.logsumexp(a, b=b)
            with pytest.raises(jax.dtypes.TypePromotionError):
                nj.logsumexp(a, b=b)
        assert nj.logsumexp(a, b=2.0).dtype == jnp.float32  # a weak Python scalar is no mixing


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", sorted(ROW_MAPS))
def test_half_precision_in_and_out(name, dtype):
    ours, ref = ROW_MAPS[name]
    x = jnp.asarray(rand(4, 6)).astype(dtype)
    got = ours(x, -1)
    assert got.dtype == dtype
    # Computed in float32, rounded once: the float32 reference rounded to `dtype`, within 1 ULP.
    want = ref(x.astype(jnp.float32), -1).astype(dtype)
    ulp = float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=ulp, atol=ulp * 1e-2)
    lse, sign = nj.logsumexp(x, axis=0, b=x, return_sign=True)
    assert lse.dtype == sign.dtype == dtype
    assert jax.grad(lambda x: jnp.sum(ours(x, -1).astype(jnp.float32)))(x).dtype == dtype


# ---------------------------------------------------------------------------------------------
# The FFI route and the pure_callback fallback


ROUTE_CASES = {
    **{name: (lambda x, f=fn: f(x, (0, 2))) for name, (fn, _) in ROW_MAPS.items()},
    "logsumexp": lambda x: nj.logsumexp(x, axis=1, return_sign=True),
    "logsumexp_b": lambda x: nj.logsumexp(x, axis=-1, b=x[::-1], return_sign=True),
}


@pytest.mark.parametrize("name", sorted(ROUTE_CASES))
def test_ffi_route_and_fallback_agree(name):
    """Always runs the fallback (checked against the NumPy-first functions, which it calls); where
    the extension has FFI handlers, also the FFI route, which must give the same bits (the same
    kernels on the same (outer, L, inner) layout)."""
    fn = ROUTE_CASES[name]
    x = jnp.asarray(rand(3, 4, 5, seed=7))
    results = {}
    routes = {False: "pure_callback[", True: "ffi_call["}
    for ffi in [False] + ([True] if _ffi.uses_ffi() else []):
        with _ffi.use_ffi(ffi):
            # A fresh function per route: jit caches a trace, and the route is picked while tracing.
            jaxpr = jax.make_jaxpr(lambda x: fn(x))(x)
            assert _kernel_calls(jaxpr) and all(routes[ffi] in line for line in _kernel_calls(jaxpr))
            results[ffi] = jax.jit(lambda x: fn(x))(x)
    jax.tree.map(np.testing.assert_array_equal, results[False], results.get(True, results[False]))
    np_x = np.asarray(x)
    numpy_first = {
        "softmax": lambda: normax.softmax(np_x, (0, 2)),
        "log_softmax": lambda: normax.log_softmax(np_x, (0, 2)),
        "stablemax": lambda: normax.stablemax(np_x, (0, 2)),
        "log_stablemax": lambda: normax.log_stablemax(np_x, (0, 2)),
        "logsumexp": lambda: normax.logsumexp(np_x, 1, return_sign=True),
        "logsumexp_b": lambda: normax.logsumexp(np_x, -1, b=np_x[::-1], return_sign=True),
    }[name]()
    jax.tree.map(np.testing.assert_array_equal, results[False], numpy_first)


def test_argument_errors():
    with pytest.raises(ValueError, match="axis"):
        nj.softmax(jnp.ones((2, 3)), axis=2)
    with pytest.raises(ValueError, match="repeats"):
        nj.logsumexp(jnp.ones((2, 3)), axis=(1, -1))
    with pytest.raises(ValueError, match="broadcast"):
        nj.logsumexp(jnp.ones((2, 3)), b=jnp.ones(2))
    with pytest.raises(TypeError, match="complex"):
        nj.stablemax(jnp.ones(3, jnp.complex64))
