"""normax for JAX: ``jax.nn``-style functions that work under jit, grad, value_and_grad and vmap.

    import normax.jax as nj
    y = nj.softmax(x, axis=-1)
    losses = nj.cross_entropy(logits, labels)            # per example, as optax's integer-label loss
    y = jax.jit(lambda x, w: nj.rms_norm(x, w))(x, w)

Each op is a ``jax.custom_vjp`` whose forward and backward are ``jax.pure_callback`` calls into the
NumPy-first functions (inputs read in place through NumPy views of JAX's CPU buffers). The
callbacks batch with ``vmap_method="expand_dims"``: under ``vmap`` one call sees the whole batch as
extra leading dimensions. Row-wise work (softmax rows, per-example losses, normalized rows) then
runs as one kernel call over all rows; work that reduces over rows into a per-example result
(weight gradients, PowerNorm statistics) loops over the batch inside the callback.

Notes
-----
- Host kernels only: every op runs normax's CPU kernels. Arrays on a GPU work, but
  ``pure_callback`` copies each callback's operands to host memory and its results back to the
  device (a round trip per forward and per backward); ``normax.jax`` does not use normax's CUDA or
  wgpu backends.
- The callbacks are opaque to XLA: no fusion across them, and ``jax.jvp`` (forward mode) is not
  available (``custom_vjp`` defines reverse mode only), nor are second derivatives (differentiating
  a backward reaches a callback: JAX raises "Pure callbacks do not support JVP").
- dtypes: float32, float64 (with ``jax_enable_x64``), float16 and bfloat16 (computed in float32
  inside the kernels).

This package imports jax; ``import normax`` alone does not. Layout: one file per op family, named
as the NumPy-first module it calls (``_softmax`` with logsumexp, ``_stablemax``, ``_cross_entropy``,
``_norms``, ``_power_norm``), each holding the family's ``custom_vjp`` and public functions;
``_callback`` (``pure_callback`` with its vmap batching, and the argument checks every family
shares); ``_vocab_parallel`` (cross-entropy over a sharded class axis, inside ``shard_map``);
``_linear`` (``linear_cross_entropy``: a ``custom_vjp`` over its FFI targets, no (N, V) logits) and
``_vocab_parallel_linear`` (its form with the weight sharded over the vocabulary). This
file only names the public API.
"""

from __future__ import annotations

from ._cross_entropy import cross_entropy
from ._linear import linear_cross_entropy
from ._norms import crms_norm, layer_norm, rms_norm
from ._power_norm import PowerNormState, power_norm, power_norm_init
from ._softmax import log_softmax, logsumexp, softmax
from ._stablemax import log_stablemax, stablemax
from ._vocab_parallel import vocab_parallel_cross_entropy
from ._vocab_parallel_linear import vocab_parallel_linear_cross_entropy

__all__ = [
    "PowerNormState",
    "crms_norm",
    "cross_entropy",
    "layer_norm",
    "linear_cross_entropy",
    "log_softmax",
    "log_stablemax",
    "logsumexp",
    "power_norm",
    "power_norm_init",
    "rms_norm",
    "softmax",
    "stablemax",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
]

# The public names keep the module they were defined in before the split: a pickled PowerNormState
# and reprs name normax.jax, whatever file holds the code.
for _name in __all__:
    globals()[_name].__module__ = __name__
del _name
