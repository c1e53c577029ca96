"""The JAX vocabulary-parallel linear cross-entropy check, run in a fresh process: XLA_FLAGS must
give 4 CPU devices before jax is imported. float64 (x64 on): the sharded and the single-device
ops compute the same sums in another order, so they agree to 1e-12 relative."""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
os.environ["JAX_ENABLE_X64"] = "1"

import jax
import jax.numpy as jnp
import normax.jax as nj
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from normax.jax import _ffi

assert len(jax.devices()) == 4, jax.devices()
mesh = Mesh(np.array(jax.devices()), ("v",))
rng = np.random.default_rng(0)
n, h, v = 10, 6, 44
hidden = jnp.asarray(rng.normal(size=(n, h)))
weight = jnp.asarray(rng.normal(size=(v, h)))
bias = jnp.asarray(rng.normal(size=v))
labels = rng.integers(0, v, n)
labels[0], labels[1] = v - 1, -100
labels = jnp.asarray(labels, jnp.int32)
class_weights = jnp.asarray(rng.random(v) + 0.5)
gout = jnp.linspace(0.5, 2.0, n)

CASES = [
    {},
    {"reduction": "none"},
    {"reduction": "sum", "label_smoothing": 0.1, "z_loss": 1e-3},
    {"softcap": 4.0, "weight": class_weights, "chunk_size": 7},
    {"weight": class_weights, "label_smoothing": 0.2, "reduction": "none", "chunk_size": 1},
]


def close(got, want, what):
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-12 * scale, err_msg=what)


def count(fn, *args):
    text = jax.jit(fn).lower(*args).as_text()
    return {op: text.count(f"stablehlo.{op}") for op in ("all_gather", "all_reduce", "all_to_all")}


for kw in CASES:
    scalar = kw.get("reduction", "mean") != "none"

    def sharded(hd, w, b, kw=kw):
        return nj.vocab_parallel_linear_cross_entropy(hd, w, labels, "v", linear_bias_shard=b, **kw)

    f = jax.shard_map(sharded, mesh=mesh, in_specs=(P(), P("v", None), P("v")), out_specs=P())

    def whole(hd, w, b, kw=kw):
        return nj.linear_cross_entropy(hd, w, labels, linear_bias=b, **kw)

    def objective(fn, scalar=scalar):
        return lambda *a: fn(*a) if scalar else (fn(*a) * gout).sum()

    got, grads = jax.value_and_grad(objective(f), (0, 1, 2))(hidden, weight, bias)
    want, want_grads = jax.value_and_grad(objective(whole), (0, 1, 2))(hidden, weight, bias)
    close(f(hidden, weight, bias), whole(hidden, weight, bias), f"loss {kw}")
    for name, g, e in zip(("hidden", "weight", "bias"), grads, want_grads):
        close(g, e, f"d{name} {kw}")
    # One collective in the forward (the all-gather of the packed rows); the gradient's program adds
    # one all-reduce (d hidden summed over the shards), nothing else.
    assert count(f, hidden, weight, bias) == {"all_gather": 1, "all_reduce": 0, "all_to_all": 0}, kw
    grad_fn = jax.grad(objective(f), (0, 1, 2))
    assert count(grad_fn, hidden, weight, bias) == {"all_gather": 1, "all_reduce": 1, "all_to_all": 0}, kw

# Class weights of the wrong length: refused at trace time (a kernel error on one device before
# the all-gather would leave the others waiting in it).
bad = jax.shard_map(
    lambda hd, w: nj.vocab_parallel_linear_cross_entropy(hd, w, labels, "v", weight=class_weights[:-1]),
    mesh=mesh,
    in_specs=(P(), P("v", None)),
    out_specs=P(),
)
try:
    bad(hidden, weight)
except ValueError as e:
    assert "weight has shape (43,); expected (44,)" in str(e), str(e)
else:
    raise AssertionError("class weights of the wrong length were accepted")
# A class id out of range: normax's error after the gather, on every device alike (no hang).
try:
    jax.block_until_ready(f(hidden, weight, bias))  # f: the last case's, on good labels
    f_bad = jax.shard_map(
        lambda hd, w: nj.vocab_parallel_linear_cross_entropy(hd, w, labels.at[4].set(v + 3), "v"),
        mesh=mesh,
        in_specs=(P(), P("v", None)),
        out_specs=P(),
    )
    jax.block_until_ready(f_bad(hidden, weight))
except (jax.errors.JaxRuntimeError, ValueError) as e:  # by route; the message is normax's
    assert f"class index {v + 3} at position 4 is out of range" in str(e), str(e)[-500:]
else:
    raise AssertionError("a class id out of range was accepted")

# The FFI route's program under shard_map, lowered (lowering needs no handler): its operands and
# results typed varying over the mesh axis as ffi_call requires, one all-gather forward.
_ffi._ffi_ready = lambda: True
for kw in CASES[:2]:

    def sharded_ffi(hd, w, b, kw=kw):
        return nj.vocab_parallel_linear_cross_entropy(hd, w, labels, "v", linear_bias_shard=b, **kw).sum()

    f = jax.shard_map(sharded_ffi, mesh=mesh, in_specs=(P(), P("v", None), P("v")), out_specs=P())
    assert count(f, hidden, weight, bias) == {"all_gather": 1, "all_reduce": 0, "all_to_all": 0}, kw
    grad_fn = jax.grad(f, (0, 1, 2))
    assert count(grad_fn, hidden, weight, bias) == {"all_gather": 1, "all_reduce": 1, "all_to_all": 0}, kw
    text = jax.jit(grad_fn).lower(hidden, weight, bias).as_text()
    assert "@normax_vocab_parallel_linear_stats" in text and "@normax_vocab_parallel_linear_backward" in text
print("ok")
