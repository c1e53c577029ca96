"""normax for JAX: ``jax.nn``-style functions that work under jit, grad, value_and_grad and vmap.

    import normax.jax as nj
    y = nj.softmax(x, axis=-1)
    losses = nj.cross_entropy(logits, labels)            # per example, as optax's integer-label loss
    y = jax.jit(lambda x, w: nj.rms_norm(x, w))(x, w)

Every op runs on XLA's typed FFI: one ``jax.ffi.ffi_call`` per kernel, of a handler exported by
normax's extension (``_core.ffi_targets``, registered once per platform by ``_ffi``), which reads
XLA's buffers in place inside the compiled program: the CPU kernels on XLA:CPU, the CUDA kernels on
XLA's stream where jax has a GPU and the extension was built with CUDA. Each op is a
``jax.custom_jvp`` whose tangent rule is linear jnp code of the call's outputs (the cross-entropy's
tangent uses the gradient its call formed in the same pass), so ``jax.jvp``, ``jacfwd``,
``hessian``, ``grad``, ``vmap`` and ``jit`` all apply; reverse mode is JAX's transpose of that
tangent (jnp code XLA fuses). Four are a ``jax.custom_vjp`` instead, where no jvp can be written:
``linear_cross_entropy``, ``vocab_parallel_linear_cross_entropy`` and ``linear_logprobs`` (a
tangent would need the (N, V) logits they never form) and ``power_norm`` (its backward updates
the running state). ``CrossEntropyStats`` (``return_stats=True``) is normax's class, holding jax
arrays; statistics get zero tangents.
Under ``vmap`` a call sees the batch as leading dimensions (``vmap_method="broadcast_all"``: one
call over the whole batch); PowerNorm's and the vocabulary-parallel statistics' targets run
``"sequential"`` (a ``lax.map`` inside the compiled program). No Python loop either way.

Where the FFI is unavailable (a jaxlib without ``jax.ffi``, an extension without handlers, or
``NORMAX_JAX_FFI=0``) the same targets run as ``jax.pure_callback`` of their NumPy host
implementations: same results, but host arrays, no fusion around the call, and reverse mode only
through the same jnp rules.

dtypes: float32, float64 (with ``jax_enable_x64``), float16 and bfloat16 (computed in float32);
bool and integers promote as ``jax.nn.softmax`` / ``jax.scipy.special.logsumexp`` do, under every
``jax_numpy_dtype_promotion`` mode.

This package imports jax; ``import normax`` alone does not. Layout: one file per op family, named
as the NumPy-first module it calls (``_softmax`` with logsumexp, ``_stablemax``, ``_cross_entropy``,
``_norms``, ``_power_norm``, ``_logprobs``), each holding the family's differentiation rules, host
implementations and public functions; ``_ffi`` (handler registration and the one call every FFI
op makes, with its pure_callback fallback); ``_args`` (the argument checks and dtype rules every
family shares); ``_vocab_parallel`` (cross-entropy over a sharded class axis, inside ``shard_map``);
``_linear`` (``linear_cross_entropy``: a ``custom_vjp`` over its FFI targets, no (N, V) logits) and
``_vocab_parallel_linear`` (its form with the weight sharded over the vocabulary). This file only
names the public API.
"""

from __future__ import annotations

from .._cross_entropy import CrossEntropyStats
from ._cross_entropy import cross_entropy
from ._linear import linear_cross_entropy
from ._logprobs import linear_logprobs, logprobs
from ._norms import crms_norm, layer_norm, rms_norm
from ._power_norm import PowerNormState, power_norm, power_norm_init
from ._softmax import log_softmax, logsumexp, softmax
from ._stablemax import log_stablemax, stablemax
from ._vocab_parallel import vocab_parallel_cross_entropy
from ._vocab_parallel_linear import vocab_parallel_linear_cross_entropy

__all__ = [
    "CrossEntropyStats",
    "PowerNormState",
    "crms_norm",
    "cross_entropy",
    "layer_norm",
    "linear_cross_entropy",
    "linear_logprobs",
    "log_softmax",
    "log_stablemax",
    "logprobs",
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
# and reprs name normax.jax, whatever file holds the code. CrossEntropyStats is normax's own class,
# re-exported.
for _name in __all__:
    if _name != "CrossEntropyStats":
        globals()[_name].__module__ = __name__
del _name
