"""normax.jax on a GPU: the ops under ``jax.jit`` run normax's CUDA FFI handlers on XLA's stream
(the compiled program calls the ``normax_*`` custom-call targets) and agree with jax.nn.

Run on a GPU machine with ``pytest -m gpu tests/cuda`` (benches/gpu/run.sh does); deselected
elsewhere. Skipped where the installed jax has no CUDA backend (``pip install "jax[cuda13]"``).
The emulation tests of the same handlers, with no GPU, are in test_ffi_cuda.py. Tolerances: float32
kernels against XLA's own float32 ops, summing in another order (rows of at most 4096).
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp

pytestmark = pytest.mark.gpu

import normax.jax as nj


@pytest.fixture(autouse=True)
def _jax_has_a_gpu():
    # Checked when a test runs, not at collection: elsewhere these tests are deselected (-m "not gpu").
    if not any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("this jax has no CUDA backend")

SHAPES = [(8, 64), (64, 1000), (32, 4096)]
RTOL, ATOL = 2e-5, 2e-6


def on_gpu(shape, seed=0, scale=3.0):
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * scale
    return jax.device_put(x, jax.devices("gpu")[0])


def calls_target(f, target, *args):
    """Whether the program jax compiles for f(*args) calls the FFI target `target`."""
    return f'custom_call_target="{target}"' in jax.jit(f).lower(*args).as_text(dialect="hlo")


def close(got, want, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=rtol, atol=atol)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "ours,theirs,target",
    [
        (nj.softmax, jax.nn.softmax, "normax_softmax"),
        (nj.log_softmax, jax.nn.log_softmax, "normax_log_softmax"),
    ],
)
def test_softmax_family_under_jit(ours, theirs, target, shape):
    x = on_gpu(shape)
    assert calls_target(ours, target, x)
    close(jax.jit(ours)(x), theirs(x))
    # The gradient too (its rule is jnp code over the handler's outputs).
    g = jax.jit(jax.grad(lambda v: (ours(v) * jnp.arange(v.shape[-1])).sum()))(x)
    close(g, jax.grad(lambda v: (theirs(v) * jnp.arange(v.shape[-1])).sum())(x), atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_logsumexp_under_jit(shape):
    x = on_gpu(shape)

    def f(v):
        return nj.logsumexp(v, axis=-1)

    assert calls_target(f, "normax_logsumexp", x)
    close(jax.jit(f)(x), jax.scipy.special.logsumexp(x, axis=-1))


@pytest.mark.parametrize("shape", SHAPES)
def test_cross_entropy_value_and_grad_under_jit(shape):
    logits = on_gpu(shape)
    labels = jnp.asarray(np.random.default_rng(1).integers(0, shape[1], shape[0]), jnp.int32)

    def ours(x):
        return nj.cross_entropy(x, labels).mean()

    def theirs(x):
        return -jnp.take_along_axis(jax.nn.log_softmax(x), labels[:, None], axis=-1).mean()

    assert calls_target(ours, "normax_cross_entropy", logits)
    (loss, grad), (ref_loss, ref_grad) = (
        jax.jit(jax.value_and_grad(ours))(logits),
        jax.value_and_grad(theirs)(logits),
    )
    close(loss, ref_loss, rtol=1e-5)
    close(grad, ref_grad, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_rms_and_layer_norm_under_jit(shape):
    x, w = on_gpu(shape), on_gpu(shape[-1:], seed=2, scale=1.0)

    def rms_ref(v):
        return v * jax.lax.rsqrt((v * v).mean(-1, keepdims=True) + 1e-6) * w

    def layer_ref(v):
        mu = v.mean(-1, keepdims=True)
        return (v - mu) * jax.lax.rsqrt(((v - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * w

    cases = [
        (lambda v: nj.rms_norm(v, w, eps=1e-6), rms_ref),
        (lambda v: nj.layer_norm(v, w, eps=1e-5), layer_ref),
    ]
    for ours, ref in cases:
        assert calls_target(ours, "normax_norm_forward", x)
        close(jax.jit(ours)(x), ref(x), rtol=1e-5, atol=1e-5)
        g = jax.jit(jax.grad(lambda v, f=ours: (f(v) ** 2).sum()))(x)
        close(g, jax.grad(lambda v, f=ref: (f(v) ** 2).sum())(x), rtol=1e-4, atol=1e-4)
