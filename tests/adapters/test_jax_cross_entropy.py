"""normax.jax.cross_entropy on the normax_cross_entropy target: values and gradients against torch
and float64 jnp formulas, forward mode and second derivatives against an optax-style jnp loss,
vmap (batched class weights included), dtype promotion, errors, and the FFI route against the
pure_callback fallback.

Tolerances: float64 results against float64 references, rtol 1e-12 / atol 1e-12 (a few ULP of
O(1) values); float32 against the float64 reference rounded, rtol 2e-6 / atol 2e-6 (a few
float32 ULP, 6e-8, with room for the log-sum-exp's cancellation); bfloat16 and float16 in and out
(computed in float32): the float32 result rounded once, so within 1 ULP of it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import normax.jax as nj
import numpy as np
import pytest
import torch
from normax.jax import _ffi

F64 = {"rtol": 1e-12, "atol": 1e-12}
F32 = {"rtol": 2e-6, "atol": 2e-6}
LABELS = np.array([3, 0, -100, 4, 1, 2])
WEIGHT = np.linspace(0.5, 2.0, 5)


@pytest.fixture
def x64():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


def logits(*shape, seed=0, dtype=np.float64):
    return jnp.asarray((np.random.default_rng(seed).standard_normal(shape) * 2).astype(dtype))


def torch_ce(x, labels, *, axis=-1, **kw):
    """torch's loss and gradient (float64): the reference for every option torch has."""
    xt = torch.tensor(np.moveaxis(np.asarray(x), axis, 1), requires_grad=True)
    lt = torch.tensor(np.asarray(labels))
    if lt.is_floating_point():
        lt = lt.movedim(axis, 1)
    if kw.get("weight") is not None:
        kw["weight"] = torch.tensor(np.asarray(kw["weight"]))
    loss = torch.nn.functional.cross_entropy(xt, lt, **kw)
    probe = torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64).reshape(loss.shape)
    (loss * probe).sum().backward()
    return loss.detach().numpy(), np.moveaxis(xt.grad.numpy(), 1, axis), probe.numpy()


def jnp_ce(x, labels, weight=None, smoothing=0.0, z_loss=0.0, softcap=None, stablemax=False, ignore=-100):
    """Per-row losses, class axis last: optax's integer-label loss with torch's options, z_loss,
    softcap and StableMax in jnp."""
    if softcap:
        x = softcap * jnp.tanh(x / softcap)
    if stablemax:
        x = jnp.where(x >= 0, jnp.log1p(jnp.abs(x)), -jnp.log1p(jnp.abs(x)))
    lse = jax.nn.logsumexp(x, axis=-1)
    logp = x - lse[..., None]
    w = jnp.ones(x.shape[-1], x.dtype) if weight is None else jnp.asarray(weight, x.dtype)
    counted = labels != ignore
    safe = jnp.where(counted, labels, 0)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0] * w[safe]
    smooth = -jnp.sum(w * logp, axis=-1) / x.shape[-1]
    return jnp.where(counted, (1 - smoothing) * nll + smoothing * smooth + z_loss * lse**2, 0.0)


TORCH_CASES = {
    "plain": {},
    "weight_mean": {"weight": WEIGHT, "reduction": "mean"},
    "weight_smoothing_sum": {"weight": WEIGHT, "label_smoothing": 0.2, "reduction": "sum"},
    "ignore_3": {"ignore_index": 3, "reduction": "mean"},
    "smoothing_mean": {"label_smoothing": 0.1, "reduction": "mean"},
}


@pytest.mark.parametrize("case", sorted(TORCH_CASES))
@pytest.mark.parametrize("axis", [-1, 0])
def test_values_and_gradients_match_torch(case, axis, x64):
    kw = dict(TORCH_CASES[case])
    x = logits(6, 5)
    labels = np.where(LABELS == -100, kw.get("ignore_index", -100), LABELS)
    if axis == 0:
        x = x.T
    want, want_grad, probe = torch_ce(x, labels, axis=axis, reduction=kw.pop("reduction", "none"), **kw)
    reduction = TORCH_CASES[case].get("reduction", "none")
    fn = jax.jit(lambda x: nj.cross_entropy(x, jnp.asarray(labels), axis=axis, reduction=reduction, **kw))
    grad = jax.grad(lambda x: jnp.sum(fn(x) * probe))(x)
    np.testing.assert_allclose(fn(x), want, **F64)
    np.testing.assert_allclose(grad, want_grad, **F64)


def test_soft_labels_match_torch(x64):
    x = logits(4, 3, 5)  # classes on axis 1, as torch's
    probs = jax.nn.softmax(logits(4, 3, 5, seed=1), axis=1)
    for kw in ({"reduction": "none"}, {"reduction": "mean", "label_smoothing": 0.3, "weight": WEIGHT[:3]}):
        want, want_grad, probe = torch_ce(x, probs, axis=1, **kw)
        grad = jax.grad(lambda x, kw=kw, p=probe: jnp.sum(nj.cross_entropy(x, probs, axis=1, **kw) * p))(x)
        np.testing.assert_allclose(nj.cross_entropy(x, probs, axis=1, **kw), want, **F64)
        np.testing.assert_allclose(grad, want_grad, **F64)


JNP_CASES = {
    "z_loss": {"z_loss": 1e-2},
    "softcap": {"softcap": 3.0, "label_smoothing": 0.1},
    "stablemax": {"normalizer": "stablemax", "weight": WEIGHT},
    "stablemax_softcap_z": {"normalizer": "stablemax", "softcap": 4.0, "z_loss": 1e-3},
}


def _jnp_kwargs(kw):
    return {
        "weight": kw.get("weight"),
        "smoothing": kw.get("label_smoothing", 0.0),
        "z_loss": kw.get("z_loss", 0.0),
        "softcap": kw.get("softcap"),
        "stablemax": kw.get("normalizer") == "stablemax",
    }


@pytest.mark.parametrize("case", sorted(JNP_CASES))
def test_options_torch_lacks_match_jnp(case, x64):
    kw = JNP_CASES[case]
    x = logits(6, 5)
    labels = jnp.asarray(LABELS)
    probe = jnp.linspace(0.5, 1.5, 6)
    ours = lambda x: nj.cross_entropy(x, labels, **kw)
    ref = lambda x: jnp_ce(x, labels, **_jnp_kwargs(kw))
    np.testing.assert_allclose(jax.jit(ours)(x), ref(x), **F64)
    g = jax.grad(lambda x: jnp.sum(ours(x) * probe))(x)
    np.testing.assert_allclose(g, jax.grad(lambda x: jnp.sum(ref(x) * probe))(x), **F64)


@pytest.mark.parametrize("case", ["plain", "z_loss", "softcap", "stablemax_softcap_z"])
def test_forward_mode_and_hessian_match_jnp(case, x64):
    kw = {"plain": {}, **JNP_CASES}[case]
    x = logits(4, 5)
    labels = jnp.asarray([3, 0, -100, 4])
    ours = lambda x: nj.cross_entropy(x, labels, **kw)
    ref = lambda x: jnp_ce(x, labels, **_jnp_kwargs(kw))
    dx = logits(4, 5, seed=3)
    # The jnp references' derivatives jitted: one compile each, not one per primitive.
    (y, dy), (y_ref, dy_ref) = jax.jvp(ours, (x,), (dx,)), jax.jit(lambda x: jax.jvp(ref, (x,), (dx,)))(x)
    np.testing.assert_allclose(y, y_ref, **F64)
    np.testing.assert_allclose(dy, dy_ref, **F64)
    np.testing.assert_allclose(jax.jacfwd(ours)(x), jax.jit(jax.jacfwd(ref))(x), **F64)
    total = lambda f: lambda x: jnp.sum(f(x) * jnp.arange(1.0, 5.0))
    np.testing.assert_allclose(
        jax.jit(jax.hessian(total(ours)))(x), jax.jit(jax.hessian(total(ref)))(x), **F64
    )


def test_soft_label_hessian_matches_jnp(x64):
    x = logits(3, 4)
    probs = jax.nn.softmax(logits(3, 4, seed=5))

    def ref(x):
        return -jnp.sum((0.9 * probs + 0.1 / 4) * jax.nn.log_softmax(x), axis=-1).mean()

    ours = lambda x: nj.cross_entropy(x, probs, reduction="mean", label_smoothing=0.1)
    np.testing.assert_allclose(jax.hessian(ours)(x), jax.jit(jax.hessian(ref))(x), **F64)


def test_vmap_matches_a_loop_with_batched_class_weights(x64):
    xs = logits(3, 6, 5)
    ws = jnp.asarray(np.random.default_rng(7).random((3, 5)) + 0.5)
    labels = jnp.asarray(LABELS)

    def loss(x, w):
        return nj.cross_entropy(x, labels, weight=w, reduction="mean", label_smoothing=0.1)

    for in_axes in ((0, 0), (0, None), (None, 0)):
        args = (xs if in_axes[0] == 0 else xs[0], ws if in_axes[1] == 0 else ws[0])
        got = jax.jit(jax.vmap(loss, in_axes))(*args)
        want = jnp.stack(
            [loss(xs[i] if in_axes[0] == 0 else xs[0], ws[i] if in_axes[1] == 0 else ws[0]) for i in range(3)]
        )
        np.testing.assert_allclose(got, want, **F64)
    grads = jax.vmap(jax.grad(loss))(xs, ws)
    np.testing.assert_allclose(grads, jnp.stack([jax.grad(loss)(xs[i], ws[i]) for i in range(3)]), **F64)
    # Per-example Hessians: vmap of a second derivative.
    hess = jax.vmap(jax.hessian(loss))(xs, ws)
    assert hess.shape == (3, 6, 5, 6, 5)
    np.testing.assert_allclose(hess[1], jax.hessian(loss)(xs[1], ws[1]), **F64)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_in_and_out_computed_in_float32(dtype):
    x = logits(6, 5, dtype=np.float32)
    half = x.astype(dtype)
    labels = jnp.asarray(LABELS)
    got = nj.cross_entropy(half, labels, weight=WEIGHT, label_smoothing=0.1)
    assert got.dtype == dtype
    want = nj.cross_entropy(half.astype(jnp.float32), labels, weight=WEIGHT, label_smoothing=0.1)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want.astype(dtype), np.float32))
    g = jax.grad(lambda x: nj.cross_entropy(x, labels, reduction="sum"))(half)
    assert g.dtype == dtype


@pytest.mark.parametrize("enable_x64", [False, True])
@pytest.mark.parametrize("mode", ["standard", "strict"])
def test_integer_and_bool_logits_promote_as_jax(enable_x64, mode):
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", enable_x64)
    try:
        with jax.numpy_dtype_promotion(mode):
            labels = jnp.asarray([0, 3, 1], jnp.int16)
            # Jitted: one compile per float dtype, shared by the integer and bool inputs.
            reference = jax.jit(lambda x: jnp_ce(x, labels, weight=jnp.arange(1, 5)).sum() / (1 + 4 + 2))
            for dtype in (jnp.int32, jnp.uint8, jnp.bool_) + ((jnp.int64,) if enable_x64 else ()):
                x = (jnp.arange(12).reshape(3, 4) % 3).astype(dtype)
                got = nj.cross_entropy(x, labels, weight=jnp.arange(1, 5), reduction="mean")
                # jax's own promotion of the same input: int64 (with x64) to float64, the rest to
                # float32 (jax.nn.softmax refuses bool; jax.scipy.special's logsumexp takes it).
                expected_dtype = jax.eval_shape(jax.scipy.special.logsumexp, x).dtype
                assert got.dtype == expected_dtype
                ref = reference(x.astype(expected_dtype))
                np.testing.assert_allclose(got, ref, **(F64 if expected_dtype == jnp.float64 else F32))
    finally:
        jax.config.update("jax_enable_x64", previous)


def test_bad_class_id_raises_naming_it():
    x = logits(6, 5, dtype=np.float32)
    with pytest.raises((jax.errors.JaxRuntimeError, IndexError, ValueError), match="class index 7"):
        jax.block_until_ready(jax.jit(nj.cross_entropy)(x, jnp.asarray([3, 0, 7, 4, 1, 2])))
    with pytest.raises(ValueError, match="shape"):
        nj.cross_entropy(x, jnp.zeros(5, jnp.int32))
    with pytest.raises(ValueError, match="weight"):
        nj.cross_entropy(x, jnp.asarray(LABELS), weight=jnp.ones(4))
    with pytest.raises(ValueError, match="empty"):
        nj.cross_entropy(jnp.zeros((3, 0)), jnp.zeros(3, jnp.int32))
    with pytest.raises(TypeError, match="integer class indices or float probabilities"):
        nj.cross_entropy(x, jnp.ones(6, bool))


def test_ffi_route_equals_the_fallback(x64):
    """The default route is the FFI (the extension is always built with its handlers) and gives
    the pure_callback fallback's losses and gradients: the same kernels, except StableMax's
    phi = log1p(|x|), libm's in the handler and NumPy's on the fallback (a last-bit difference)."""
    assert _ffi.uses_ffi(), "the extension has no FFI handlers (_core.ffi_targets)"
    x = logits(6, 5)
    labels = jnp.asarray(LABELS)
    cases = [{}, *JNP_CASES.values(), {"weight": WEIGHT, "label_smoothing": 0.2, "reduction": "mean"}]
    for kw in cases:
        results = []
        for enabled in (True, False):
            with _ffi.use_ffi(enabled):
                f = jax.jit(lambda x, kw=kw: nj.cross_entropy(x, labels, **kw))
                results.append((f(x), jax.grad(lambda x, f=f: jnp.sum(f(x)))(x)))
        ulps = 4 if kw.get("normalizer") == "stablemax" else 0
        for a, b in zip(*results):
            np.testing.assert_allclose(a, b, rtol=ulps * np.finfo(np.float64).eps, atol=0, err_msg=str(kw))


def test_ffi_route_traces_every_transformation(monkeypatch):
    """With the FFI route taken (forced here: tracing needs no handler), value, grad, jvp,
    hessian and vmap trace to ``normax_cross_entropy`` FFI calls and no callback."""
    monkeypatch.setattr(_ffi, "_ffi_ready", lambda: True)
    x = logits(6, 5, dtype=np.float32)
    labels = jnp.asarray(LABELS)
    ws = jnp.ones((2, 5))

    def loss(x, w):
        return nj.cross_entropy(x, labels, weight=w, reduction="mean", z_loss=1e-3)

    traced = {
        "value": (loss, (x, ws[0])),
        "grad": (jax.grad(loss), (x, ws[0])),
        "jvp": (lambda x, w: jax.jvp(lambda x: loss(x, w), (x,), (x,)), (x, ws[0])),
        "hessian": (jax.hessian(loss), (x, ws[0])),
        "vmap": (jax.vmap(jax.grad(loss)), (jnp.stack([x, x]), ws)),
    }
    for name, (fn, args) in traced.items():
        text = str(jax.make_jaxpr(fn)(*args))
        assert "normax_cross_entropy" in text and "pure_callback" not in text, name
