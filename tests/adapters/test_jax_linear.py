"""normax.jax.linear_cross_entropy against a float64 jnp reference (``hidden @ W.T + b``, then
torch's cross-entropy rules written in jnp): values and the gradients of hidden, linear_weight and
linear_bias for every option and reduction, ignored rows, chunk_size, vmap, dtypes, errors, the
compiled program's memory (no (N, V) buffer), and the FFI route against the pure_callback one.

Tolerances: float64 runs compare to 1e-12 relative (the same math in another order: a few ULP of
these short sums); float32 runs to 2e-5 relative to the largest entry (float32 GEMMs of H = 16
terms and log-sum-exps over V = 11 classes, rounding ~1e-6, with room for the reference's
float64)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import normax.jax as nj
import numpy as np
import pytest
from normax.jax import _ffi

N, H, V = 9, 16, 11


@pytest.fixture
def x64():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


def reference(h, w, t, b=None, cw=None, reduction="mean", ignore_index=-100, label_smoothing=0.0,
              z_loss=0.0, softcap=None):  # fmt: skip
    """torch's cross-entropy of the logits ``h @ w.T + b``, in jnp (differentiable): per row
    ``(1 - s) * w_t * (lse - x_t) + s / V * sum_c w_c (lse - x_c) + z * lse**2``, ignored rows 0;
    the mean divides by the kept rows' summed w_t."""
    x = h @ w.T + (0.0 if b is None else b)
    if softcap is not None:
        x = softcap * jnp.tanh(x / softcap)
    lse = jax.scipy.special.logsumexp(x, axis=-1)
    wc = jnp.ones(x.shape[-1], x.dtype) if cw is None else cw
    kept = t != ignore_index
    safe = jnp.where(kept, t, 0)
    nll = lse - jnp.take_along_axis(x, safe[:, None], axis=-1)[:, 0]
    smooth = jnp.sum(wc * (lse[:, None] - x), axis=-1) / x.shape[-1]
    rows = (1 - label_smoothing) * wc[safe] * nll + label_smoothing * smooth + z_loss * lse**2
    rows = jnp.where(kept, rows, 0.0)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / jnp.where(kept, wc[safe], 0.0).sum()


def _case(dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(N, H)), dtype)
    w = jnp.asarray(rng.normal(size=(V, H)) * 0.5, dtype)
    b = jnp.asarray(rng.normal(size=V), dtype)
    t = rng.integers(0, V, N)
    t[2] = t[5] = -100
    cw = jnp.asarray(rng.random(V) + 0.5, dtype)
    return h, w, b, jnp.asarray(t, jnp.int32), cw


def _value_and_grads(fn, h, w, b, reduction):
    """The loss and the gradients of (h, w, b) of sum(loss * cotangent) (distinct per row for "none")."""
    go = jnp.linspace(0.5, 2.0, N, dtype=h.dtype) if reduction == "none" else jnp.asarray(1.5, h.dtype)
    loss, vjp = jax.vjp(fn, h, w, b)
    return loss, vjp(go)


OPTIONS = [
    {},
    {"label_smoothing": 0.2},
    {"z_loss": 1e-3},
    {"softcap": 3.0},
    {"ignore_index": 4},
    {"chunk_size": 1},
    {"chunk_size": 2 * V},
    {"label_smoothing": 0.1, "z_loss": 1e-4, "softcap": 5.0, "chunk_size": 3 * V},
]


def _assert_close(got, want, rtol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(float(np.abs(want).max(initial=0.0)), 1e-300)
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * scale)


@pytest.mark.parametrize("route", ["default", "fallback"])
@pytest.mark.parametrize(
    "reduction, bias, class_weights, options",
    [(r, bi, c, o) for r, bi, c in itertools.product(["mean", "sum", "none"], [False, True], [False, True])
     for o in OPTIONS],
)  # fmt: skip
def test_values_and_gradients_match_the_float64_reference(
    x64, route, reduction, bias, class_weights, options
):
    h, w, b, t, cw = _case()
    kw = dict(options, reduction=reduction)
    chunk = kw.pop("chunk_size", None)
    cw = cw if class_weights else None
    if "ignore_index" in kw:  # the ignored rows carry the other ignore_index
        t = jnp.where(t == -100, kw["ignore_index"], t)

    def got_fn(h, w, b):
        return nj.linear_cross_entropy(
            h, w, t, linear_bias=b if bias else None, weight=cw, chunk_size=chunk, **kw
        )

    def want_fn(h, w, b):
        return reference(h, w, t, b if bias else None, cw, **kw)

    with _ffi.use_ffi(route == "default"):
        got, got_grads = _value_and_grads(jax.jit(got_fn), h, w, b, reduction)
    want, want_grads = _value_and_grads(want_fn, h, w, b, reduction)
    assert got.shape == want.shape and got.dtype == jnp.float64
    _assert_close(got, want, 1e-12)
    for name, g, e in zip(["hidden", "linear_weight", "linear_bias"], got_grads, want_grads):
        assert g.shape == e.shape, name
        _assert_close(g, e, 1e-12)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_float32_and_the_ffi_route_equal_to_the_fallback(x64, reduction):
    """float32 against the float64 reference, and the default route (the FFI: the extension is
    always built with its handlers) bit-for-bit equal to the pure_callback route: both run the
    same kernels."""
    assert _ffi.uses_ffi(), "the extension has no FFI handlers (_core.ffi_targets)"
    h, w, b, t, cw = _case(np.float32)

    def fn(h, w, b):
        return nj.linear_cross_entropy(
            h, w, t, linear_bias=b, weight=cw, reduction=reduction, label_smoothing=0.1
        )

    got, grads = _value_and_grads(jax.jit(fn), h, w, b, reduction)
    with _ffi.use_ffi(False):
        fb, fb_grads = _value_and_grads(jax.jit(fn), h, w, b, reduction)
    np.testing.assert_array_equal(got, fb)
    for g, e in zip(grads, fb_grads):
        np.testing.assert_array_equal(g, e)
    f64 = [jnp.asarray(a, np.float64) for a in (h, w, b)]
    want, want_grads = jax.jit(lambda: _value_and_grads(
        lambda h, w, b: reference(h, w, t, b, cw.astype(h.dtype), reduction, label_smoothing=0.1), *f64, reduction
    ))()  # fmt: skip
    _assert_close(got, want, 2e-5)
    for g, e in zip(grads, want_grads):
        assert g.dtype == jnp.float32
        _assert_close(g, e, 2e-5)


def test_all_rows_ignored_mean_is_nan_and_gradients_zero(x64):
    h, w, _, _, _ = _case()
    t = jnp.full(N, -100, jnp.int32)
    loss, grads = jax.value_and_grad(lambda h, w: nj.linear_cross_entropy(h, w, t, reduction="sum"), (0, 1))(
        h, w
    )
    assert float(loss) == 0.0 and all(not np.asarray(g).any() for g in grads)
    assert np.isnan(float(nj.linear_cross_entropy(h, w, t)))


def test_leading_dimensions_and_unbatched_hidden(x64):
    h, w, b, t, _ = _case()
    h3, t3 = h[:8].reshape(2, 4, H), t[:8].reshape(2, 4)
    got = nj.linear_cross_entropy(h3, w, t3, linear_bias=b, reduction="none")
    assert got.shape == (2, 4)
    _assert_close(got.reshape(-1), reference(h[:8], w, t[:8], b, reduction="none"), 1e-12)
    one = nj.linear_cross_entropy(h[0], w, t[0], reduction="none")
    assert one.shape == ()
    _assert_close(one, reference(h[:1], w, t[:1], reduction="none")[0], 1e-12)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_vmap_over_hidden_and_weight(x64, reduction):
    h, w, b, t, _ = _case()
    hs, ws = jnp.stack([h, 2 * h]), jnp.stack([w, -w])

    def fn(h, w):
        return nj.linear_cross_entropy(h, w, t, linear_bias=b, reduction=reduction)

    def scalar(h, w):
        return jnp.sum(fn(h, w) * jnp.linspace(1.0, 2.0, N)) if reduction == "none" else fn(h, w)

    got = jax.vmap(fn)(hs, ws)
    got_grads = jax.vmap(jax.grad(scalar, (0, 1)))(hs, ws)
    for k in range(2):
        _assert_close(got[k], fn(hs[k], ws[k]), 1e-12)
        for g, e in zip(got_grads, jax.grad(scalar, (0, 1))(hs[k], ws[k])):
            _assert_close(g[k], e, 1e-12)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_in_and_out_computed_in_float32(dtype):
    h, w, _, t, _ = _case(np.float32)
    want = nj.linear_cross_entropy(
        h.astype(dtype).astype(jnp.float32), w.astype(dtype).astype(jnp.float32), t
    )
    got, grads = jax.value_and_grad(lambda h, w: nj.linear_cross_entropy(h, w, t), (0, 1))(
        h.astype(dtype), w.astype(dtype)
    )
    assert got.dtype == dtype and grads[0].dtype == dtype and grads[1].dtype == dtype
    # The float32 result rounded once to the 16-bit type.
    assert got == want.astype(dtype)


def test_integer_input_promotes_and_strict_promotion_works():
    h, w, _, t, _ = _case(np.float32)
    hi, wi = jnp.round(h * 2).astype(jnp.int32), jnp.round(w * 2).astype(jnp.int32)
    with jax.numpy_dtype_promotion("strict"):
        got = nj.linear_cross_entropy(hi, wi, t)
        assert got.dtype == jnp.float32
        assert float(got) == pytest.approx(
            float(nj.linear_cross_entropy(hi.astype(float), wi.astype(float), t))
        )
        with pytest.raises(jax.dtypes.TypePromotionError):
            nj.linear_cross_entropy(h, w.astype(jnp.bfloat16), t)  # mixed floats: refused, as jnp's matmul


def test_errors_name_the_argument_or_the_class_id():
    h, w, b, t, _ = _case(np.float32)
    with pytest.raises(ValueError, match="linear_weight must have shape"):
        nj.linear_cross_entropy(h, w.T, t)
    with pytest.raises(ValueError, match="linear_bias must have shape"):
        nj.linear_cross_entropy(h, w, t, linear_bias=b[:3])
    with pytest.raises(ValueError, match="labels have shape"):
        nj.linear_cross_entropy(h, w, t[:3])
    with pytest.raises(TypeError, match="labels must be integer"):
        nj.linear_cross_entropy(h, w, t.astype(jnp.float32))
    with pytest.raises(ValueError, match="chunk_size"):
        nj.linear_cross_entropy(h, w, t, chunk_size=0)
    with pytest.raises(ValueError, match="label_smoothing"):
        nj.linear_cross_entropy(h, w, t, label_smoothing=2.0)
    bad = t.at[3].set(V + 6)
    # XLA's error (JaxRuntimeError; the callback route's surfaces as ValueError) with normax's message.
    with pytest.raises((jax.errors.JaxRuntimeError, ValueError), match=f"class index {V + 6} at position 3"):
        jax.block_until_ready(nj.linear_cross_entropy(h, w, bad))


def test_forward_mode_is_refused_as_documented():
    h, w, _, t, _ = _case(np.float32)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda h: nj.linear_cross_entropy(h, w, t), (h,), (h,))


def test_compiled_program_holds_no_logits():
    """At N x V = 512 x 8192 the float32 logits are 16 MiB against 0.4 MiB of inputs: the jnp
    reference's compiled value_and_grad holds them (and their gradient); normax's holds nothing
    that size (the inputs' gradients are its only outputs beyond the loss)."""
    n, h, v = 512, 8, 8192
    rng = np.random.default_rng(1)
    hid = jnp.asarray(rng.normal(size=(n, h)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(v, h)), jnp.float32)
    t = jnp.asarray(rng.integers(0, v, n), jnp.int32)
    logits_bytes = n * v * 4

    def memory(fn):
        m = jax.jit(jax.value_and_grad(fn, (0, 1))).lower(hid, w).compile().memory_analysis()
        return m.temp_size_in_bytes, m.output_size_in_bytes

    ref_temp, _ = memory(lambda hid, w: reference(hid, w, t))
    temp, out = memory(lambda hid, w: nj.linear_cross_entropy(hid, w, t))
    assert ref_temp >= logits_bytes  # the check can tell: the reference does form the logits
    assert temp < logits_bytes // 8 and out < logits_bytes // 8, (temp, out)


def _custom_calls(fn, *args):
    text = jax.jit(fn).lower(*args).as_text()
    return [line for line in text.splitlines() if "stablehlo.custom_call @normax_" in line]


def test_ffi_route_value_and_grad_is_one_call_with_grad(monkeypatch):
    """The program the FFI route builds (lowered only: no handler is needed to lower, so this runs
    whether or not the extension exports them): value_and_grad of a mean is ONE call of the target
    with with_grad, a primal-only call has with_grad false, and "none" adds the one-shard pair."""
    monkeypatch.setattr(_ffi, "_ffi_ready", lambda: True)
    h, w, b, t, _ = _case(np.float32)

    def loss(reduction):
        return lambda h, w: nj.linear_cross_entropy(h, w, t, linear_bias=b, reduction=reduction).sum()

    (call,) = _custom_calls(jax.value_and_grad(loss("mean"), (0, 1)), h, w)
    assert (
        "@normax_linear_cross_entropy" in call and "with_grad = true" in call and 'reduction = "mean"' in call
    )
    (call,) = _custom_calls(loss("sum"), h, w)
    assert "with_grad = false" in call and 'reduction = "sum"' in call
    calls = _custom_calls(jax.value_and_grad(loss("none"), (0, 1)), h, w)
    assert [c.split("@")[1].split("(")[0] for c in calls] == [
        "normax_linear_cross_entropy",
        "normax_vocab_parallel_linear_stats",
        "normax_vocab_parallel_linear_backward",
    ]
