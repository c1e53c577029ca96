"""The JAX check, run in a fresh process: XLA_FLAGS must give 4 CPU devices before jax is imported."""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

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
n, v = 10, 44
x = jnp.asarray(rng.normal(size=(n, v)).astype(np.float32) * 3)
labels = rng.integers(0, v, n)
labels[0], labels[1] = v - 1, -100
labels = jnp.asarray(labels, jnp.int32)
w = jnp.asarray(rng.random(v).astype(np.float32) + 0.5)
gout = jnp.asarray(rng.random(n).astype(np.float32) + 0.5)

CASES = [
    {},
    {"label_smoothing": 0.1, "z_loss": 1e-3},
    {"softcap": 4.0, "weight": w},
    {"weight": w, "label_smoothing": 0.2, "reduction": "mean"},
    {"reduction": "sum"},
]
for kw in CASES:
    wt = kw.get("weight")

    def sharded(x, labels, kw=kw, wt=wt):
        opts = {k: val for k, val in kw.items() if k != "weight"}
        return nj.vocab_parallel_cross_entropy(x, labels, "v", weight=wt, **opts)

    f = jax.shard_map(sharded, mesh=mesh, in_specs=(P(None, "v"), P()), out_specs=P())
    ref = lambda x, kw=kw: nj.cross_entropy(x, labels, **kw)
    scalar = kw.get("reduction", "none") != "none"

    def objective(fn, x, scalar=scalar):
        out = fn(x)
        return out if scalar else (out * gout).sum()

    def sharded_loss(y, f=f):
        return f(y, labels)

    got, g = jax.value_and_grad(lambda x, s=sharded_loss: objective(s, x))(x)
    want, gw = jax.value_and_grad(lambda x, r=ref: objective(r, x))(x)
    np.testing.assert_allclose(
        np.asarray(f(x, labels)), np.asarray(ref(x)), rtol=1e-6, atol=0, err_msg=str(kw)
    )
    # Gradients: within 1e-6 of the largest entry (small entries carry the same absolute error).
    scale = float(jnp.abs(gw).max())
    np.testing.assert_allclose(np.asarray(g), np.asarray(gw), rtol=0, atol=1e-6 * scale, err_msg=str(kw))

    # jit, and the collective: exactly one all-gather in the forward, none in the gradient's own pass.
    def collectives(fn):
        text = jax.jit(fn).lower(x).as_text()
        return {op: text.count(f"stablehlo.{op}") for op in ("all_gather", "all_reduce", "all_to_all")}

    assert collectives(sharded_loss) == {"all_gather": 1, "all_reduce": 0, "all_to_all": 0}, kw
    # The gradient's program holds the forward's all-gather and nothing more: no collective backward.
    grad_fn = jax.grad(lambda x, s=sharded_loss: objective(s, x))
    assert collectives(grad_fn) == {"all_gather": 1, "all_reduce": 0, "all_to_all": 0}, kw

    # Forward mode (custom_jvp): the tangent is one psum of each shard's part per row.
    dx = jnp.asarray(rng.normal(size=(n, v)).astype(np.float32))
    _, tangent = jax.jvp(sharded_loss, (x,), (dx,))
    _, tangent_want = jax.jvp(ref, (x,), (dx,))
    np.testing.assert_allclose(
        np.asarray(tangent), np.asarray(tangent_want), rtol=1e-5, atol=1e-5, err_msg=str(kw)
    )
    jvp_fn = lambda x, s=sharded_loss, dx=dx: jax.jvp(s, (x,), (dx,))[1]
    assert collectives(jvp_fn) == {"all_gather": 1, "all_reduce": 1, "all_to_all": 0}, kw

    # The default route is the FFI (the extension is always built with its handlers); it and the
    # pure_callback fallback agree exactly.
    assert _ffi.uses_ffi()
    routes = []
    for enabled in (True, False):
        with _ffi.use_ffi(enabled):
            fn = jax.jit(
                lambda x, kw=kw, wt=wt: jax.shard_map(
                    lambda x, t: nj.vocab_parallel_cross_entropy(
                        x, t, "v", weight=wt, **{k: val for k, val in kw.items() if k != "weight"}
                    ),
                    mesh=mesh,
                    in_specs=(P(None, "v"), P()),
                    out_specs=P(),
                )(x, labels)
            )
            routes.append((fn(x), jax.grad(lambda x, fn=fn: jnp.sum(fn(x)))(x)))
    for a, b in zip(*routes):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(kw))

# The FFI route traces (forced: tracing needs no handler), shard_map's checks of varying values
# included: stats and combine in the forward, the backward target in grad and jvp, no callback.
traced = jax.shard_map(
    lambda x, t: nj.vocab_parallel_cross_entropy(x, t, "v", weight=w, label_smoothing=0.1),
    mesh=mesh,
    in_specs=(P(None, "v"), P()),
    out_specs=P(),
)
ready = _ffi._ffi_ready
_ffi._ffi_ready = lambda: True
try:
    for name, fn in {
        "value": lambda x: traced(x, labels),
        "grad": jax.grad(lambda x: traced(x, labels).sum()),
        "jvp": lambda x: jax.jvp(lambda x: traced(x, labels), (x,), (x,)),
    }.items():
        text = str(jax.make_jaxpr(fn)(x))
        targets = ("stats", "combine") + (("backward",) if name != "value" else ())
        assert "pure_callback" not in text and all(f"normax_vocab_parallel_{t}" in text for t in targets), (
            name
        )
finally:
    _ffi._ffi_ready = ready

# pmap: the same losses; gradients by pmap's convention for collectives (every device's copy of
# the loss counts), as for the loss written with jnp collectives: 4 x the shard's gradient.
shards = x.reshape(n, 4, v // 4).transpose(1, 0, 2)
per_device = jax.pmap(lambda s: nj.vocab_parallel_cross_entropy(s, labels, "v"), axis_name="v")(shards)
np.testing.assert_allclose(np.asarray(per_device[2]), np.asarray(nj.cross_entropy(x, labels)), rtol=1e-6)
g = jax.pmap(jax.grad(lambda s: nj.vocab_parallel_cross_entropy(s, labels, "v").sum()), axis_name="v")(shards)
gw = jax.grad(lambda x: nj.cross_entropy(x, labels).sum())(x)
np.testing.assert_allclose(
    np.asarray(g.transpose(1, 0, 2).reshape(n, v)), 4 * np.asarray(gw), rtol=1e-5, atol=1e-6
)

# bfloat16 shards in and out, computed in float32.
half = x.astype(jnp.bfloat16)
f = jax.shard_map(
    lambda x, t: nj.vocab_parallel_cross_entropy(x, t, "v"),
    mesh=mesh,
    in_specs=(P(None, "v"), P()),
    out_specs=P(),
)
got = f(half, labels)
assert got.dtype == jnp.bfloat16
want = nj.cross_entropy(half.astype(jnp.float32), labels).astype(jnp.bfloat16)
np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=8e-3)
print("ok")
