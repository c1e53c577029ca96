# Type stub of normax.torch: torch.nn.functional's signatures; the modules are torch.nn.Modules.

from collections.abc import Sequence
from typing import Any, Literal, TypeAlias, overload

import torch
from torch import Tensor

from .._cross_entropy import CrossEntropyStats as CrossEntropyStats
from ._modules import CrossEntropyLoss as CrossEntropyLoss
from ._modules import LayerNorm as LayerNorm
from ._modules import LinearCrossEntropyLoss as LinearCrossEntropyLoss
from ._modules import RMSNorm as RMSNorm
from ._power_norm import PowerNorm as PowerNorm

_Shape: TypeAlias = int | Sequence[int] | torch.Size

def softmax(
    input: Tensor, dim: int | None = None, _stacklevel: int = 3, dtype: torch.dtype | None = None
) -> Tensor: ...
def log_softmax(
    input: Tensor, dim: int | None = None, _stacklevel: int = 3, dtype: torch.dtype | None = None
) -> Tensor: ...
def logsumexp(
    input: Tensor, dim: int | Sequence[int], keepdim: bool = False, *, out: Tensor | None = None
) -> Tensor: ...
@overload
def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    normalizer: str = "softmax",
    temperature: float = 1.0,
    token_weight: Tensor | None = None,
    return_stats: Literal[False] = False,
) -> Tensor: ...
@overload
def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    normalizer: str = "softmax",
    temperature: float = 1.0,
    token_weight: Tensor | None = None,
    return_stats: Literal[True],
) -> tuple[Tensor, CrossEntropyStats]: ...
@overload
def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    options: torch.nn.LinearCrossEntropyOptions | None = None,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    accumulation: str = "float32",
    temperature: float = 1.0,
    token_weight: Tensor | None = None,
    return_stats: Literal[False] = False,
) -> Tensor: ...
@overload
def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    options: torch.nn.LinearCrossEntropyOptions | None = None,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    accumulation: str = "float32",
    temperature: float = 1.0,
    token_weight: Tensor | None = None,
    return_stats: Literal[True],
) -> tuple[Tensor, CrossEntropyStats]: ...
def layer_norm(
    input: Tensor,
    normalized_shape: _Shape,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor: ...
def rms_norm(
    input: Tensor, normalized_shape: _Shape, weight: Tensor | None = None, eps: float | None = None
) -> Tensor: ...
@overload
def logprobs(
    logits: Tensor,
    target: Tensor,
    *,
    axis: int = -1,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: Literal[True] = True,
) -> tuple[Tensor, Tensor]: ...
@overload
def logprobs(
    logits: Tensor,
    target: Tensor,
    *,
    axis: int = -1,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: Literal[False],
) -> Tensor: ...
@overload
def linear_logprobs(
    hidden: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    return_entropy: Literal[True] = True,
) -> tuple[Tensor, Tensor]: ...
@overload
def linear_logprobs(
    hidden: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    return_entropy: Literal[False],
) -> Tensor: ...
def stablemax(input: Tensor, dim: int = -1, *, dtype: torch.dtype | None = None) -> Tensor: ...
def log_stablemax(input: Tensor, dim: int = -1, *, dtype: torch.dtype | None = None) -> Tensor: ...
def patch(model: torch.nn.Module) -> int: ...
def vocab_parallel_cross_entropy(
    logits_shard: Tensor,
    target: Tensor,
    *,
    group: Any = None,
    vocab_start: int | None = None,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    token_weight: Tensor | None = None,
) -> Tensor: ...
def vocab_parallel_linear_cross_entropy(
    hidden: Tensor,
    weight_shard: Tensor,
    target: Tensor,
    *,
    group: Any = None,
    bias_shard: Tensor | None = None,
    vocab_start: int | None = None,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    logits_budget: int | None = None,
    temperature: float = 1.0,
    token_weight: Tensor | None = None,
) -> Tensor: ...
@overload
def vocab_parallel_linear_logprobs(
    hidden: Tensor,
    weight_shard: Tensor,
    target: Tensor,
    *,
    group: Any = None,
    bias_shard: Tensor | None = None,
    vocab_start: int | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    return_entropy: Literal[True] = True,
    logits_budget: int | None = None,
) -> tuple[Tensor, Tensor]: ...
@overload
def vocab_parallel_linear_logprobs(
    hidden: Tensor,
    weight_shard: Tensor,
    target: Tensor,
    *,
    group: Any = None,
    bias_shard: Tensor | None = None,
    vocab_start: int | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    return_entropy: Literal[False],
    logits_budget: int | None = None,
) -> Tensor: ...

__all__ = [
    "CrossEntropyLoss",
    "CrossEntropyStats",
    "LayerNorm",
    "LinearCrossEntropyLoss",
    "PowerNorm",
    "RMSNorm",
    "cross_entropy",
    "layer_norm",
    "linear_cross_entropy",
    "linear_logprobs",
    "log_softmax",
    "log_stablemax",
    "logprobs",
    "logsumexp",
    "patch",
    "rms_norm",
    "softmax",
    "stablemax",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
    "vocab_parallel_linear_logprobs",
]
