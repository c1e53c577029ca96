"""What cross_entropy and linear_cross_entropy share in normax.torch: their checked options (and
linear_cross_entropy's torch ``options``), the token-weight check, and the per-row statistics
(``CrossEntropyStats``) as tensors and fake tensors.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .._backends import missing
from .._cross_entropy import CrossEntropyStats
from .._options import CeOptions, ce_options
from ._convert import needs_grad, to_tensor


@functools.lru_cache(maxsize=256, typed=True)  # typed: True and 1.0 are different options
def _cached_options(ignore_index, reduction, label_smoothing, z_loss, softcap, temperature) -> CeOptions:
    return ce_options(ignore_index, reduction, label_smoothing, z_loss, softcap, temperature)


# The ops' options object from the scalars their schemas carry: one object per set of options.
options_of = functools.lru_cache(maxsize=256)(CeOptions)


@torch.compiler.assume_constant_result
def checked_options(ignore_index, reduction, label_smoothing, z_loss, softcap, temperature) -> tuple:
    # Python scalars in, a constant out: torch.compile runs the NumPy API's checks once while
    # tracing instead of tracing into them, and an eager training loop checks its (unchanging)
    # options once. A plain tuple of literals, not the CeOptions object: the custom ops' schemas
    # take Python scalars, and torch 2.11's dynamo cannot unpack a NamedTuple constant (it guards
    # on a constant source and fails the fullgraph compile) while it unpacks a tuple natively.
    try:
        opts = _cached_options(ignore_index, reduction, label_smoothing, z_loss, softcap, temperature)
    except TypeError:  # unhashable arguments: checked uncached (and most likely refused)
        opts = ce_options(ignore_index, reduction, label_smoothing, z_loss, softcap, temperature)
    return (
        opts.ignore_index,
        opts.reduction,
        opts.label_smoothing,
        opts.z_loss,
        opts.softcap,
        opts.temperature,
    )


def options_chunk(
    fname, options, input, linear_weight, target, reduction, label_smoothing, soft
) -> int | None:
    """linear_cross_entropy: the rows per block that torch's ``LinearCrossEntropyOptions`` asks for, as a number of
    logits, after torch's own checks; None where torch would not chunk (it then ignores them)."""
    if not isinstance(options, torch.nn.LinearCrossEntropyOptions):
        raise TypeError(
            f"{fname}: options must be a torch.nn.LinearCrossEntropyOptions or None, got "
            f"{type(options).__name__}"
        )
    chunked = (
        label_smoothing == 0.0
        and linear_weight.ndim == 2
        and (target.dtype == torch.int64 or (soft and target.dtype == input.dtype and not needs_grad(target)))
    )
    if not chunked:
        return None
    n, features = input.shape if input.ndim == 2 else (1, input.shape[0])
    classes = linear_weight.shape[0]
    # torch's resolution of the "auto" fields (and its ValueError for a batch_chunk_size that
    # contradicts chunking_method), then its check of acc_dtype.
    resolved = options._adjust(
        num_batches=n, in_features=features, num_classes=classes, dtype=input.dtype,
        device=input.device, prob_target=soft,
    )  # fmt: skip
    acc = resolved.acc_dtype
    if acc != input.dtype and not (input.dtype in (torch.float16, torch.bfloat16) and acc == torch.float32):
        raise RuntimeError(
            f"{fname}: acc_dtype {acc} is not supported with {input.dtype} input (torch takes "
            "float32 with float16/bfloat16 input, else the input's dtype)"
        )
    return resolved.batch_chunk_size * classes


def check_extras(fname: str, token_weight, return_stats) -> None:
    """The token weights (a tensor that needs no gradient) and `return_stats` (a bool)."""
    if token_weight is not None:
        if not isinstance(token_weight, Tensor):
            raise TypeError(
                f"{fname}: token_weight must be a torch.Tensor or None, got {type(token_weight).__name__}"
            )
        if needs_grad(token_weight):  # torch's error for nll_loss's weight, raised at the call
            raise RuntimeError("the derivative for 'token_weight' is not implemented.")
    if type(return_stats) is not bool:
        raise TypeError(f"{fname}: return_stats must be a bool, got {return_stats!r}")


def refuse_on_cuda(op: str, temperature: float, token_weight, return_stats: bool) -> None:
    """CUDA tensors: the CUDA kernels take no temperature, token weights or statistics yet."""
    for given, option in (
        (temperature != 1.0, "temperature != 1"),
        (token_weight is not None, "token_weight="),
        (return_stats, "return_stats=True"),
    ):
        if given:
            raise missing("cuda", op, option)


def stat_dtype(*inputs: Tensor) -> torch.dtype:
    """lse, entropy and z_loss: float64 when the inputs compute in float64, float32 otherwise
    (float16/bfloat16 too)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in inputs) else torch.float32


def stats_tensors(stats, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The NumPy layer's CrossEntropyStats as fresh tensors (lse, entropy, correct, z_loss);
    `dtype`: :func:`stat_dtype`'s."""
    lse, entropy, correct, z_loss = stats
    return (
        to_tensor(lse, dtype),
        to_tensor(entropy, dtype),
        to_tensor(correct, torch.bool),
        to_tensor(z_loss, dtype),
    )


def stats_fake(input: Tensor, shape, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The statistics' fake tensors: per row (`shape`, the per-row loss's), z_loss 0-d."""
    return (
        input.new_empty(shape, dtype=dtype),
        input.new_empty(shape, dtype=dtype),
        input.new_empty(shape, dtype=torch.bool),
        input.new_empty((), dtype=dtype),
    )


def as_stats(outputs) -> CrossEntropyStats:
    """The public result's statistics from an op's last four outputs."""
    return CrossEntropyStats(*outputs[-4:])
