"""Every public op of normax.jax on XLA's FFI: the extension is always built with its handlers,
so the default route is the FFI, and the compiled program of each op (under jit, and of its
gradient) holds normax_* custom calls and no host callback (``jax.pure_callback`` lowers to a
``*_callback`` custom call); issue 24's options, statistics and log-probabilities included."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import normax.jax as nj
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from normax.jax import _ffi

N, C, H = 4, 6, 5
X = jnp.asarray(np.random.default_rng(0).standard_normal((N, C)), jnp.float32)
LABELS = jnp.asarray([0, 3, 5, 1], jnp.int32)
HIDDEN = jnp.asarray(np.random.default_rng(1).standard_normal((N, H)), jnp.float32)
WEIGHT = jnp.asarray(np.random.default_rng(2).standard_normal((C, H)), jnp.float32)
ONES = jnp.ones(C, jnp.float32)
TOKEN_WEIGHT = jnp.asarray([0.5, 1.0, 2.0, 0.0], jnp.float32)


def _sharded(fn, in_specs):
    mesh = Mesh(jax.devices()[:1], ("v",))
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=P())


def _power_norm(x):
    y, _ = nj.power_norm(x, ONES, jnp.zeros(C), nj.power_norm_init(C), warmup_iters=1)
    return y


def _with_stats(result):
    """The loss plus the statistics (whose gradient is zero): all of them in the program."""
    loss, stats = result
    return loss + stats.lse.sum() + stats.entropy.sum() + stats.z_loss + stats.correct.sum()


# Each op as a function of one float array, which the gradient is taken with respect to.
OPS = {
    "softmax": lambda x: nj.softmax(x),
    "log_softmax": lambda x: nj.log_softmax(x, axis=0),
    "logsumexp": lambda x: nj.logsumexp(x, axis=-1),
    "logsumexp_b": lambda x: nj.logsumexp(x, axis=-1, b=jnp.abs(X) + 0.5),
    "stablemax": lambda x: nj.stablemax(x),
    "log_stablemax": lambda x: nj.log_stablemax(x),
    "cross_entropy": lambda x: nj.cross_entropy(x, LABELS, weight=ONES, label_smoothing=0.1),
    "rms_norm": lambda x: nj.rms_norm(x, ONES),
    "layer_norm": lambda x: nj.layer_norm(x, ONES, ONES),
    "crms_norm": lambda x: nj.crms_norm(x, ONES),
    "power_norm": _power_norm,
    "linear_cross_entropy": lambda h: nj.linear_cross_entropy(h, WEIGHT, LABELS, weight=ONES),
    "linear_cross_entropy_none": lambda h: nj.linear_cross_entropy(h, WEIGHT, LABELS, reduction="none"),
    "cross_entropy_options": lambda x: _with_stats(
        nj.cross_entropy(x, LABELS, temperature=0.7, token_weight=TOKEN_WEIGHT, reduction="mean", return_stats=True)
    ),
    "logprobs": lambda x: sum(nj.logprobs(x, LABELS, temperature=1.5)),
    "linear_cross_entropy_options": lambda h: _with_stats(
        nj.linear_cross_entropy(h, WEIGHT, LABELS, temperature=0.7, token_weight=TOKEN_WEIGHT, return_stats=True)
    ),
    "linear_logprobs": lambda h: sum(nj.linear_logprobs(h, WEIGHT, LABELS, temperature=1.5)),
    "vocab_parallel_cross_entropy": lambda x: _sharded(
        lambda x: nj.vocab_parallel_cross_entropy(x, LABELS, "v", weight=ONES), (P(None, "v"),)
    )(x),
    "vocab_parallel_linear_cross_entropy": lambda h: _sharded(
        lambda h, w: nj.vocab_parallel_linear_cross_entropy(h, w, LABELS, "v", weight=ONES),
        (P(), P("v", None)),
    )(h, WEIGHT),
    "vocab_parallel_options": lambda x: _sharded(
        lambda x: nj.vocab_parallel_cross_entropy(x, LABELS, "v", temperature=0.7, token_weight=TOKEN_WEIGHT),
        (P(None, "v"),),
    )(x),
    "vocab_parallel_linear_options": lambda h: _sharded(
        lambda h, w: nj.vocab_parallel_linear_cross_entropy(h, w, LABELS, "v", temperature=0.7, token_weight=TOKEN_WEIGHT),
        (P(), P("v", None)),
    )(h, WEIGHT),
}
LINEAR = {
    "linear_cross_entropy", "linear_cross_entropy_none", "vocab_parallel_linear_cross_entropy",
    "linear_cross_entropy_options", "linear_logprobs", "vocab_parallel_linear_options",
}  # fmt: skip


def _custom_call_targets(fn, x) -> list[str]:
    text = jax.jit(fn).lower(x).as_text()
    return [line.split("custom_call @")[1].split("(")[0] for line in text.splitlines() if "custom_call @" in line]


@pytest.mark.parametrize("name", sorted(OPS))
def test_op_and_its_gradient_lower_to_normax_custom_calls_only(name):
    assert _ffi.uses_ffi(), "the extension has no FFI handlers (_core.ffi_targets)"
    op = OPS[name]
    x = HIDDEN if name in LINEAR else X
    for fn in (op, jax.grad(lambda x: jnp.sum(op(x)))):
        targets = _custom_call_targets(fn, x)
        assert targets and all(t.startswith("normax_") for t in targets), (name, targets)
        assert not any("callback" in t for t in targets), (name, targets)
    # And they run: the handlers give a finite value and gradient.
    value, grad = jax.jit(jax.value_and_grad(lambda x: jnp.sum(op(x))))(x)
    assert np.isfinite(value) and np.isfinite(np.asarray(grad)).all(), name
