"""The XLA FFI handlers of issue 24, called directly with ``jax.ffi.ffi_call`` under jit (and
vmap), against the NumPy-first functions that run the same kernels: the cross-entropy targets'
temperature, token weights and statistics, and the log-probability targets (``normax_logprobs``
with its lse result, ``normax_linear_logprobs`` and its backward with an absent incoming
gradient). Tolerances as tests/adapters/test_jax_ffi_targets.py's (float64 to rounding).
"""

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import normax
from normax import _core

pytestmark = pytest.mark.skipif(not hasattr(jax, "ffi"), reason="jax.ffi is missing")
TOL = {"rtol": 1e-12, "atol": 1e-12}
ABSENT = np.zeros(0)


@pytest.fixture(scope="module", autouse=True)
def registered():
    for name, capsule in _core.ffi_targets("cpu").items():
        jax.ffi.register_ffi_target(name, capsule, platform="cpu")


@pytest.fixture(scope="module", autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def call(target, results, *operands, vmap=False, **attrs):
    structs = [jax.ShapeDtypeStruct(s, d) for s, d in results]
    attrs = {k: (np.int64(v) if type(v) is int else np.float64(v) if type(v) is float else v) for k, v in attrs.items()}

    def f(*ops):
        return jax.ffi.ffi_call(target, structs, vmap_method="broadcast_all")(*ops, **attrs)

    return [np.asarray(o) for o in jax.jit(jax.vmap(f) if vmap else f)(*operands)]


CE = {"ignore_index": -100, "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 0.0, "stablemax": False}


@pytest.mark.parametrize("stablemax", [False, True])
def test_cross_entropy_temperature_token_weight_and_stats(stablemax):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 5)) * 3
    t = np.array([0, 4, -100, 1, 2, 3])
    w, tw = rng.uniform(0.5, 2, 5), rng.uniform(0, 2, 6)
    rows, f64 = (6,), np.float64
    results = [(rows, f64), (x.shape, f64), (rows, f64), (rows, f64), (rows, np.bool_)]
    attrs = {**CE, "stablemax": stablemax, "temperature": 1.7, "with_grad": True, "with_stats": True}
    loss, grad, lse, entropy, correct = call("normax_cross_entropy", results, x, t, w, tw, **attrs)
    normalizer = "stablemax" if stablemax else "softmax"
    ref_loss, ref_grad, stats = normax.cross_entropy_with_grad(
        x, t, weight=w, token_weight=tw, temperature=1.7, reduction="none", label_smoothing=0.1, z_loss=1e-3,
        normalizer=normalizer, return_stats=True,
    )  # fmt: skip
    for got, ref in ((loss, ref_loss), (grad, ref_grad), (lse, stats.lse), (entropy, stats.entropy)):
        np.testing.assert_allclose(got, ref, **TOL)
    np.testing.assert_array_equal(correct, stats.correct)
    np.testing.assert_array_equal(correct, (np.argmax(x, -1) == t) & (t != -100))


def test_cross_entropy_stats_under_vmap_with_batched_class_weights():
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((2, 4, 5)), rng.uniform(0.5, 2, (2, 5))
    t, tw = rng.integers(0, 5, (2, 4)), rng.uniform(0, 2, (2, 4))
    results = [((4,), np.float64)] * 3 + [((4,), np.bool_)]
    attrs = {**CE, "temperature": 0.5, "with_grad": False, "with_stats": True}
    loss, lse, entropy, correct = call("normax_cross_entropy", results, x, t, w, tw, vmap=True, **attrs)
    for b in range(2):
        ref, stats = normax.cross_entropy(
            x[b], t[b], weight=w[b], token_weight=tw[b], temperature=0.5, reduction="none", label_smoothing=0.1,
            z_loss=1e-3, return_stats=True,
        )  # fmt: skip
        np.testing.assert_allclose(loss[b], ref, **TOL)
        np.testing.assert_allclose(lse[b], stats.lse, **TOL)
        np.testing.assert_allclose(entropy[b], stats.entropy, **TOL)
        np.testing.assert_array_equal(correct[b], stats.correct)


@pytest.mark.parametrize("class_weight", [False, True])
def test_linear_cross_entropy_temperature_token_weight_and_stats(class_weight):
    rng = np.random.default_rng(2)
    n, h, v = 5, 4, 7
    hidden, w, b = rng.standard_normal((n, h)), rng.standard_normal((v, h)), rng.standard_normal(v)
    t, tw = np.array([6, 0, -100, 3, 3]), rng.uniform(0, 2, n)
    cw = rng.uniform(0.5, 2, v) if class_weight else None
    results = [((), np.float64), ((n, h), np.float64), ((v, h), np.float64), ((v,), np.float64)]
    results += [((n,), np.float64)] * 2 + [((n,), np.bool_)]
    attrs = {**CE, "temperature": 0.6, "reduction": "mean", "chunk_size": 8, "with_grad": True, "with_stats": True}
    got = call("normax_linear_cross_entropy", results, hidden, w, b, t, ABSENT if cw is None else cw, tw, **attrs)
    *ref, stats = normax.linear_cross_entropy_with_grad(
        hidden, w, t, linear_bias=b, weight=cw, token_weight=tw, temperature=0.6, label_smoothing=0.1,
        z_loss=1e-3, chunk_size=8, return_stats=True,
    )  # fmt: skip
    for g, r in zip(got, [*ref, stats.lse, stats.entropy]):
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-10)
    np.testing.assert_array_equal(got[-1], stats.correct)


def test_logprobs_target_and_its_lse():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 5, 6)) * 4
    x[0, 1, 2] = -np.inf  # the target's logit: logprob -inf, lse summed directly
    t = np.array([[0, 2, -100, 5, 1], [3, 3, 0, 1, -100]])
    rows = ((5,), np.float64)
    logp, lse, entropy = call(
        "normax_logprobs", [rows] * 3, x, t, vmap=True, temperature=0.8, ignore_index=-100, with_entropy=True
    )
    for b in range(2):
        ref_logp, ref_h = normax.logprobs(x[b], t[b], temperature=0.8)
        np.testing.assert_allclose(logp[b], ref_logp, **TOL)
        np.testing.assert_allclose(entropy[b], ref_h, **TOL)
        kept = t[b] != -100
        ref_lse = np.where(kept, np.log(np.exp(x[b] / 0.8).sum(-1)), 0)
        np.testing.assert_allclose(lse[b], ref_lse, **TOL)
    assert logp[0, 1] == -np.inf and np.isfinite(lse[0, 1])


def test_linear_logprobs_targets_with_an_absent_gradient():
    rng = np.random.default_rng(4)
    n, h, v = 5, 3, 8
    hidden, w, b = rng.standard_normal((n, h)), rng.standard_normal((v, h)), rng.standard_normal(v)
    t = np.array([7, 0, -100, 2, 2])
    attrs = {"temperature": 1.3, "ignore_index": -100, "chunk_size": 10}
    logp, entropy = call("normax_linear_logprobs", [((n,), np.float64)] * 2, hidden, w, b, t, with_entropy=True,
                         **attrs)  # fmt: skip
    ref = normax.logprobs(hidden @ w.T + b, t, temperature=1.3)
    np.testing.assert_allclose(logp, ref[0], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(entropy, ref[1], rtol=1e-10, atol=1e-10)
    g_logp = rng.standard_normal(n)
    results = [((n, h), np.float64), ((v, h), np.float64), ((v,), np.float64)]
    got = call("normax_linear_logprobs_backward", results, hidden, w, b, t, g_logp, ABSENT, **attrs)
    # d(sum g_logp * logprob): torch-free reference through the logits' gradient.
    z = (hidden @ w.T + b) / 1.3
    p = np.exp(z - np.log(np.exp(z).sum(-1, keepdims=True)))
    onehot = np.eye(v)[np.where(t == -100, 0, t)]
    dz = np.where((t != -100)[:, None], g_logp[:, None] * (onehot - p), 0) / 1.3
    for g, r in zip(got, (dz @ w, dz.T @ hidden, dz.sum(0))):
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-10)
