"""normax.jax against jax.nn and optax-style jnp formulas: forward, check_grads, jit, grad, vmap.

Gradient checks run in float64 (``jax_enable_x64`` switched on by a fixture and restored), where
``jax.test_util.check_grads`` compares our reverse-mode gradients with finite differences at its
default tolerances. Forward comparisons:
- float64: rtol 1e-12, atol 1e-12; both sides are a few ULP (2.2e-16) from exact on O(1) inputs.
- float32: rtol 2e-5, atol 2e-6; a few float32 ULP (6e-8) each, with an absolute term for values
  formed by cancellation (log-softmax near 0, centered norms).
- bfloat16: against the float32 formula rounded to bfloat16: 2 ULP (rtol 1.6e-2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import normax
import normax.jax as nj
import numpy as np
import pytest
from jax.test_util import check_grads

TOL = {
    jnp.float64: {"rtol": 1e-12, "atol": 1e-12},
    jnp.float32: {"rtol": 2e-5, "atol": 2e-6},
    jnp.bfloat16: {"rtol": 1.6e-2, "atol": 1.6e-2},
}


@pytest.fixture
def x64():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


def assert_close(actual, expected, dtype, what=""):
    a = np.asarray(
        jnp.asarray(actual).astype(jnp.float32 if dtype != jnp.float64 else jnp.float64), np.float64
    )
    e = np.asarray(
        jnp.asarray(expected).astype(jnp.float32 if dtype != jnp.float64 else jnp.float64), np.float64
    )
    tol = TOL[dtype]
    scale = max(float(np.max(np.abs(e))) if e.size else 0.0, 1.0)
    np.testing.assert_allclose(a, e, rtol=tol["rtol"], atol=tol["atol"] * scale, err_msg=what)


def rand(*shape, dtype=jnp.float32, seed=0, scale=2.0):
    x = np.random.default_rng(seed).standard_normal(shape) * scale
    return jnp.asarray(x.astype(np.float64)).astype(dtype)


LABELS = np.array([3, 0, -100, 4, 1, 2])
WEIGHT = np.linspace(0.5, 2.0, 5)


def torch_style_ce(logits, labels, weight=None, smoothing=0.0, reduction="mean", ignore=-100):
    """torch.nn.functional.cross_entropy's semantics, class axis last, in jnp."""
    c = logits.shape[-1]
    labels = jnp.asarray(labels)  # (a NumPy int64 here trips JAX's dispatch cache across x64 toggles)
    logp = jax.nn.log_softmax(logits, axis=-1)
    w = jnp.ones(c, logits.dtype) if weight is None else jnp.asarray(weight, logits.dtype)
    counted = labels != ignore
    safe = jnp.where(counted, labels, 0)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0] * w[safe]
    smooth = -jnp.sum(logp * w, axis=-1) / c
    rows = jnp.where(counted, (1 - smoothing) * nll + smoothing * smooth, 0.0)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / jnp.sum(jnp.where(counted, w[safe], 0.0))


def rms_formula(x, w, eps):
    return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * w


def layer_formula(x, w, b, eps):
    m = jnp.mean(x, axis=-1, keepdims=True)
    v = jnp.mean((x - m) ** 2, axis=-1, keepdims=True)
    return (x - m) / jnp.sqrt(v + eps) * w + b


# name -> (ours(x), reference(x), shape); each maps one array to one array.
FUNCTIONS = {
    "softmax": (lambda x: nj.softmax(x, axis=1), lambda x: jax.nn.softmax(x, axis=1), (4, 7, 3)),
    "softmax_axes": (
        lambda x: nj.softmax(x, axis=(0, 2)),
        lambda x: jax.nn.softmax(x, axis=(0, 2)),
        (4, 7, 3),
    ),
    "log_softmax": (nj.log_softmax, jax.nn.log_softmax, (4, 7, 3)),
    "logsumexp": (nj.logsumexp, jax.nn.logsumexp, (4, 7, 3)),
    "logsumexp_axis_keepdims": (
        lambda x: nj.logsumexp(x, axis=1, keepdims=True),
        lambda x: jax.nn.logsumexp(x, axis=1, keepdims=True),
        (4, 7, 3),
    ),
    "logsumexp_b": (
        lambda x: nj.logsumexp(x, axis=-1, b=jnp.arange(1.0, 4.0, dtype=x.dtype)),
        lambda x: jax.nn.logsumexp(x, axis=-1, b=jnp.arange(1.0, 4.0, dtype=x.dtype)),
        (4, 7, 3),
    ),
    "cross_entropy_optax": (
        lambda x: nj.cross_entropy(x, jnp.array([3, 0, 2, 4, 1, 2])),
        lambda x: (
            -jnp.take_along_axis(jax.nn.log_softmax(x), jnp.array([3, 0, 2, 4, 1, 2])[:, None], -1)[:, 0]
        ),
        (6, 5),
    ),
    "cross_entropy_weighted_mean": (
        lambda x: nj.cross_entropy(x, LABELS, weight=WEIGHT, reduction="mean", label_smoothing=0.1),
        lambda x: torch_style_ce(x, LABELS, WEIGHT, 0.1),
        (6, 5),
    ),
    "cross_entropy_class_axis_0": (
        lambda x: nj.cross_entropy(x, LABELS, axis=0, reduction="sum"),
        lambda x: torch_style_ce(x.T, LABELS, reduction="sum"),
        (5, 6),
    ),
    "rms_norm": (
        lambda x: nj.rms_norm(x, jnp.array([0.5, 1.0, 2.0])),
        lambda x: rms_formula(x, jnp.array([0.5, 1.0, 2.0], x.dtype), 1e-6),
        (4, 7, 3),
    ),
    "layer_norm": (
        lambda x: nj.layer_norm(x, jnp.array([0.5, 1.0, 2.0]), jnp.array([0.1, 0.0, -0.1]), eps=1e-5),
        lambda x: layer_formula(
            x, jnp.array([0.5, 1.0, 2.0], x.dtype), jnp.array([0.1, 0.0, -0.1], x.dtype), 1e-5
        ),
        (4, 7, 3),
    ),
}


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_and_jit(name, dtype):
    ours, ref, shape = FUNCTIONS[name]
    x = rand(*shape, dtype=dtype)
    got = ours(x)
    assert got.dtype == dtype
    expected = ref(x.astype(jnp.float32)).astype(dtype)
    assert got.shape == expected.shape
    assert_close(got, expected, dtype, name)
    assert_close(jax.jit(ours)(x), got, jnp.float32, f"{name} jit")


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_check_grads_float64(name, x64):
    ours, ref, shape = FUNCTIONS[name]
    x = rand(*shape, dtype=jnp.float64)
    assert_close(ours(x), jax.jit(ref)(x), jnp.float64, name)
    check_grads(jax.jit(ours), (x,), order=1, modes=["rev"])
    # And against the reference's own gradient, through jit.
    probe = rand(*ours(x).shape, dtype=jnp.float64, seed=1)
    g_ours = jax.jit(jax.grad(lambda a: jnp.sum(ours(a) * probe)))(x)
    g_ref = jax.jit(jax.grad(lambda a: jnp.sum(ref(a) * probe)))(x)
    assert_close(g_ours, g_ref, jnp.float64, f"{name} grad")


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_vmap_matches_a_loop(name, x64):
    ours, _, shape = FUNCTIONS[name]
    xs = rand(3, *shape, dtype=jnp.float64)
    batched = jax.vmap(ours)(xs)
    looped = jnp.stack([ours(xs[i]) for i in range(3)])
    assert_close(batched, looped, jnp.float64, name)
    probe = rand(*looped.shape[1:], dtype=jnp.float64, seed=2)
    grads = jax.vmap(jax.grad(lambda a: jnp.sum(ours(a) * probe)))(xs)
    assert_close(
        grads, jnp.stack([jax.grad(lambda a: jnp.sum(ours(a) * probe))(xs[i]) for i in range(3)]), jnp.float64
    )


def test_parameter_gradients_under_jit_and_vmap(x64):
    """weight/bias gradients (a reduction over rows inside the callback) under jit and vmap."""
    x = rand(5, 4, 6, dtype=jnp.float64)
    w = rand(6, dtype=jnp.float64, seed=1)
    b = rand(6, dtype=jnp.float64, seed=2)
    check_grads(lambda x, w, b: nj.layer_norm(x, w, b), (x, w, b), order=1, modes=["rev"])
    check_grads(lambda x, w: nj.rms_norm(x, w, eps=1e-3), (x, w), order=1, modes=["rev"])

    def loss(w, b, x):
        return jnp.sum(nj.layer_norm(x, w, b) ** 3)

    def ref_loss(w, b, x):
        return jnp.sum(layer_formula(x, w, b, 1e-5) ** 3)

    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(w, b, x)
    # The formulas' derivatives jitted: one compile each, not one per primitive.
    ref_value, ref_grads = jax.jit(jax.value_and_grad(ref_loss, argnums=(0, 1)))(w, b, x)
    assert_close(value, ref_value, jnp.float64)
    for a, e in zip(grads, ref_grads):
        assert_close(a, e, jnp.float64, "jit value_and_grad")
    # Per-example parameter gradients: vmap over x with w, b shared; and with w batched too.
    per_example = jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(None, None, 0))(w, b, x)
    expected = jax.jit(jax.vmap(jax.grad(ref_loss, argnums=(0, 1)), in_axes=(None, None, 0)))(w, b, x)
    for a, e in zip(per_example, expected):
        assert a.shape == (5, 6)
        assert_close(a, e, jnp.float64, "vmap grad")
    ws = rand(5, 6, dtype=jnp.float64, seed=3)
    assert_close(
        jax.vmap(lambda w, x: nj.rms_norm(x, w))(ws, x),
        jax.jit(jax.vmap(lambda w, x: rms_formula(x, w, 1e-6)))(ws, x),
        jnp.float64,
        "vmap over weights",
    )


def test_logsumexp_sign_and_weights(x64):
    a = rand(4, 5, dtype=jnp.float64)
    b = jnp.asarray([[1.0, -2.0, 0.5, 0.0, 3.0]])
    res, sign = nj.logsumexp(a, axis=1, b=b, return_sign=True)
    ref_res, ref_sign = jax.nn.logsumexp(a, axis=1, b=b, return_sign=True)
    assert_close(res, ref_res, jnp.float64)
    np.testing.assert_array_equal(sign, ref_sign)
    assert bool(jnp.all(jnp.isnan(nj.logsumexp(a, axis=1, b=b)) == (ref_sign < 0)))
    bpos = jnp.abs(b) + 0.1
    check_grads(lambda a, b: nj.logsumexp(a, axis=1, b=b), (a, bpos), order=1, modes=["rev"])
    assert nj.logsumexp(a).shape == () and nj.logsumexp(3.0).shape == ()


def test_cross_entropy_soft_labels_and_z_loss(x64):
    x = rand(6, 5, dtype=jnp.float64)
    probs = jax.nn.softmax(rand(6, 5, dtype=jnp.float64, seed=4))
    expected = -jnp.sum(probs * jax.nn.log_softmax(x), axis=-1)
    assert_close(nj.cross_entropy(x, probs), expected, jnp.float64, "soft labels")
    assert_close(nj.cross_entropy(x, probs, reduction="mean"), expected.mean(), jnp.float64)
    check_grads(lambda x: nj.cross_entropy(x, probs, reduction="mean"), (x,), order=1, modes=["rev"])
    labels = jnp.asarray(LABELS)

    def z_formula(x):
        lse = jax.nn.logsumexp(x, axis=-1)
        return torch_style_ce(x, labels, reduction="none") + jnp.where(labels != -100, 1e-2 * lse**2, 0.0)

    assert_close(nj.cross_entropy(x, labels, z_loss=1e-2), z_formula(x), jnp.float64, "z_loss")
    check_grads(lambda x: nj.cross_entropy(x, labels, z_loss=1e-2, softcap=4.0), (x,), order=1, modes=["rev"])
    # A mean over no counted example is NaN, as torch.
    assert bool(jnp.isnan(nj.cross_entropy(x, jnp.full(6, -100), reduction="mean")))


def test_power_norm_matches_the_numpy_api(x64):
    """Six jitted training steps (warmup 3) with a pad mask, then evaluation, against normax's
    NumPy PowerNorm: outputs, gradients, and the state, ema_gz included (through its gradient)."""
    c, t_len, b = 8, 4, 3
    settings = {"eps": 1e-5, "alpha_fwd": 0.9, "alpha_bkw": 0.7, "warmup_iters": 3, "group_num": 2}
    w = rand(c, dtype=jnp.float64, seed=1) * 0.1 + 1.0
    bias = rand(c, dtype=jnp.float64, seed=2) * 0.1
    pad = np.zeros((b, t_len), bool)
    pad[1, 2:] = True
    state = nj.power_norm_init(c, jnp.float64)
    ref = normax.PowerNormState(c, **settings)

    def loss(params, ema, state, x, probe):
        y, new_state = nj.power_norm(x, *params, state._replace(ema_gz=ema), pad_mask=pad, **settings)
        return jnp.sum(y * probe), (y, new_state)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    for i in range(6):
        x = rand(t_len, b, c, dtype=jnp.float64, seed=10 + i)
        probe = rand(t_len, b, c, dtype=jnp.float64, seed=20 + i)
        (_, (y, new_state)), ((dw, db), dema) = step((w, bias), state.ema_gz, state, x, probe)
        state = new_state._replace(ema_gz=state.ema_gz + dema)
        y_ref, saved = normax.power_norm(
            np.asarray(x), np.asarray(w), np.asarray(bias), ref, pad_mask=pad, return_saved=True
        )
        _, dw_ref, db_ref = normax.power_norm_backward(np.asarray(probe), saved, ref)
        assert_close(y, y_ref, jnp.float64, f"y {i}")
        assert_close(dw, dw_ref, jnp.float64, f"dweight {i}")
        assert_close(db, db_ref, jnp.float64, f"dbias {i}")
        assert_close(state.running_phi, ref.running_phi, jnp.float64, f"running_phi {i}")
        assert_close(state.ema_gz, ref.ema_gz, jnp.float64, f"ema_gz {i}")
        assert int(state.iters) == ref.iters == i + 1
    x = rand(t_len, b, c, dtype=jnp.float64, seed=99)
    y, after = nj.power_norm(x, w, bias, state, training=False, **settings)
    assert_close(
        y, normax.power_norm(np.asarray(x), np.asarray(w), np.asarray(bias), ref, training=False), jnp.float64
    )
    assert int(after.iters) == 6
    check_grads(
        lambda x, w: nj.power_norm(x, w, bias, state, training=False, **settings)[0],
        (x, w),
        order=1,
        modes=["rev"],
    )


def test_bad_arguments():
    x = rand(3, 4)
    with pytest.raises(ValueError, match="axis"):
        nj.softmax(x, axis=2)
    with pytest.raises(ValueError, match="trailing"):
        nj.rms_norm(x, axis=0)
    with pytest.raises(ValueError, match="weight shape"):
        nj.layer_norm(x, jnp.ones(3))
    with pytest.raises(ValueError, match="reduction"):
        nj.cross_entropy(x, jnp.array([0, 1, 2]), reduction="avg")
