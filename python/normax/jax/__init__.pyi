# Type stub of normax.jax: jax.nn's signatures over JAX arrays.

from typing import Any, Literal, NamedTuple, TypeAlias, overload

import jax
import numpy.typing as npt

from normax import CrossEntropyStats as CrossEntropyStats

_Axis: TypeAlias = int | tuple[int, ...] | None
_Like: TypeAlias = jax.Array | npt.ArrayLike

class PowerNormState(NamedTuple):
    running_phi: jax.Array
    ema_gz: jax.Array
    iters: jax.Array

def softmax(x: _Like, axis: _Axis = -1, where: _Like | None = None) -> jax.Array: ...
def log_softmax(x: _Like, axis: _Axis = -1, where: _Like | None = None) -> jax.Array: ...
@overload
def logsumexp(
    a: _Like,
    axis: _Axis = None,
    b: _Like | None = None,
    keepdims: bool = False,
    return_sign: Literal[False] = False,
    where: _Like | None = None,
) -> jax.Array: ...
@overload
def logsumexp(
    a: _Like,
    axis: _Axis,
    b: _Like | None,
    keepdims: bool,
    return_sign: Literal[True],
    where: _Like | None = None,
) -> tuple[jax.Array, jax.Array]: ...
@overload
def logsumexp(
    a: _Like,
    axis: _Axis = None,
    b: _Like | None = None,
    keepdims: bool = False,
    *,
    return_sign: Literal[True],
    where: _Like | None = None,
) -> tuple[jax.Array, jax.Array]: ...
@overload
def cross_entropy(
    logits: _Like,
    labels: _Like,
    *,
    axis: int = -1,
    weight: _Like | None = None,
    ignore_index: int = -100,
    reduction: Literal["mean", "sum", "none"] = "none",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    normalizer: str = "softmax",
    temperature: float = 1.0,
    token_weight: _Like | None = None,
    return_stats: Literal[False] = False,
) -> jax.Array: ...
@overload
def cross_entropy(
    logits: _Like,
    labels: _Like,
    *,
    axis: int = -1,
    weight: _Like | None = None,
    ignore_index: int = -100,
    reduction: Literal["mean", "sum", "none"] = "none",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    normalizer: str = "softmax",
    temperature: float = 1.0,
    token_weight: _Like | None = None,
    return_stats: Literal[True],
) -> tuple[jax.Array, CrossEntropyStats]: ...
@overload
def linear_cross_entropy(
    hidden: _Like,
    linear_weight: _Like,
    labels: _Like,
    *,
    linear_bias: _Like | None = None,
    weight: _Like | None = None,
    reduction: Literal["mean", "sum", "none"] = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    temperature: float = 1.0,
    token_weight: _Like | None = None,
    return_stats: Literal[False] = False,
) -> jax.Array: ...
@overload
def linear_cross_entropy(
    hidden: _Like,
    linear_weight: _Like,
    labels: _Like,
    *,
    linear_bias: _Like | None = None,
    weight: _Like | None = None,
    reduction: Literal["mean", "sum", "none"] = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    temperature: float = 1.0,
    token_weight: _Like | None = None,
    return_stats: Literal[True],
) -> tuple[jax.Array, CrossEntropyStats]: ...
@overload
def logprobs(
    logits: _Like,
    target: _Like,
    *,
    axis: int = -1,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: Literal[True] = True,
) -> tuple[jax.Array, jax.Array]: ...
@overload
def logprobs(
    logits: _Like,
    target: _Like,
    *,
    axis: int = -1,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: Literal[False],
) -> jax.Array: ...
@overload
def linear_logprobs(
    hidden: _Like,
    linear_weight: _Like,
    target: _Like,
    *,
    linear_bias: _Like | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    return_entropy: Literal[True] = True,
) -> tuple[jax.Array, jax.Array]: ...
@overload
def linear_logprobs(
    hidden: _Like,
    linear_weight: _Like,
    target: _Like,
    *,
    linear_bias: _Like | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    return_entropy: Literal[False],
) -> jax.Array: ...
def stablemax(x: _Like, axis: _Axis = -1) -> jax.Array: ...
def log_stablemax(x: _Like, axis: _Axis = -1) -> jax.Array: ...
def rms_norm(
    x: _Like, weight: _Like | None = None, *, eps: float = 1e-6, axis: int | tuple[int, ...] = -1
) -> jax.Array: ...
def crms_norm(
    x: _Like, weight: _Like | None = None, *, eps: float = 1e-6, axis: int | tuple[int, ...] = -1
) -> jax.Array: ...
def layer_norm(
    x: _Like,
    weight: _Like | None = None,
    bias: _Like | None = None,
    *,
    eps: float = 1e-5,
    axis: int | tuple[int, ...] = -1,
) -> jax.Array: ...
def power_norm_init(num_features: int, dtype: Any = ...) -> PowerNormState: ...
def power_norm(
    x: _Like,
    weight: _Like | None,
    bias: _Like | None,
    state: PowerNormState,
    *,
    training: bool = True,
    pad_mask: _Like | None = None,
    eps: float = 1e-5,
    alpha_fwd: float = 0.9,
    alpha_bkw: float = 0.9,
    warmup_iters: int = 10000,
    group_num: int = 1,
) -> tuple[jax.Array, PowerNormState]: ...
def vocab_parallel_cross_entropy(
    logits_shard: _Like,
    labels: _Like,
    axis_name: Any,
    *,
    weight: _Like | None = None,
    ignore_index: int = -100,
    reduction: str = "none",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    token_weight: _Like | None = None,
) -> jax.Array: ...
def vocab_parallel_linear_cross_entropy(
    hidden: _Like,
    linear_weight_shard: _Like,
    labels: _Like,
    axis_name: Any,
    *,
    linear_bias_shard: _Like | None = None,
    weight: _Like | None = None,
    reduction: Literal["mean", "sum", "none"] = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    temperature: float = 1.0,
    token_weight: _Like | None = None,
) -> jax.Array: ...

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
