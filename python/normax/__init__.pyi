# Type stub of normax's public API (the implementation is untyped: array_api(...) wrappers).
# Array functions return the caller's kind: a NumPy array, torch tensor, JAX or array-API array
# in gives the same kind out (the first overload); lists, scalars and other array-likes give a
# NumPy array (the second). A 0-d result of NumPy input is a NumPy scalar (typed as an array).

from typing import Any, Literal, NamedTuple, Protocol, TypeAlias, TypeVar, overload

import numpy as np
import numpy.typing as npt

__version__: str

class _Array(Protocol):
    """Anything with a shape: NumPy arrays, torch tensors, JAX and array-API arrays."""

    @property
    def shape(self) -> Any: ...

_A = TypeVar("_A", bound=_Array)
_NDArray: TypeAlias = npt.NDArray[Any]
_Axis: TypeAlias = int | tuple[int, ...] | None
_Device: TypeAlias = Literal["cpu", "wgpu"] | None
_Reduction: TypeAlias = Literal["mean", "sum", "none"]

class PowerNormState:
    num_features: int
    group_num: int
    eps: float
    alpha_fwd: float
    alpha_bkw: float
    warmup_iters: int
    running_phi: npt.NDArray[np.float64]
    ema_gz: npt.NDArray[np.float64]
    iters: int
    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        alpha_fwd: float = 0.9,
        alpha_bkw: float = 0.9,
        warmup_iters: int = 10000,
        group_num: int = 1,
    ) -> None: ...
    def copy(self) -> PowerNormState: ...

class CrossEntropyStats(NamedTuple):
    """Per-row metrics of a cross-entropy (return_stats=True); no gradient flows through them."""

    lse: Any
    entropy: Any
    correct: Any
    z_loss: Any

class PowerNormSaved:
    """What power_norm_backward needs from one power_norm(..., return_saved=True) call."""

    def __init__(self, **fields: Any) -> None: ...

# Threads, ISA and backend.
def get_num_threads() -> int: ...
def set_num_threads(n: int) -> None: ...
def get_isa() -> str: ...
def set_isa(name: str) -> None: ...
def supported_isas() -> list[str]: ...
def get_backend() -> str: ...
def set_backend(name: Literal["cpu", "wgpu"]) -> None: ...

# Softmax family.
@overload
def softmax(x: _A, axis: _Axis = -1, *, out: _Array | None = None, device: _Device = None) -> _A: ...
@overload
def softmax(
    x: npt.ArrayLike, axis: _Axis = -1, *, out: _Array | None = None, device: _Device = None
) -> _NDArray: ...
@overload
def log_softmax(x: _A, axis: _Axis = -1, *, out: _Array | None = None, device: _Device = None) -> _A: ...
@overload
def log_softmax(
    x: npt.ArrayLike, axis: _Axis = -1, *, out: _Array | None = None, device: _Device = None
) -> _NDArray: ...
@overload
def logsumexp(
    x: _A,
    axis: _Axis = -1,
    *,
    b: npt.ArrayLike | _Array | None = None,
    keepdims: bool = False,
    return_sign: Literal[False] = False,
    device: _Device = None,
) -> _A: ...
@overload
def logsumexp(
    x: npt.ArrayLike,
    axis: _Axis = -1,
    *,
    b: npt.ArrayLike | _Array | None = None,
    keepdims: bool = False,
    return_sign: Literal[False] = False,
    device: _Device = None,
) -> _NDArray: ...
@overload
def logsumexp(
    x: _A,
    axis: _Axis = -1,
    *,
    b: npt.ArrayLike | _Array | None = None,
    keepdims: bool = False,
    return_sign: Literal[True],
    device: _Device = None,
) -> tuple[_A, _A]: ...
@overload
def logsumexp(
    x: npt.ArrayLike,
    axis: _Axis = -1,
    *,
    b: npt.ArrayLike | _Array | None = None,
    keepdims: bool = False,
    return_sign: Literal[True],
    device: _Device = None,
) -> tuple[_NDArray, _NDArray]: ...
@overload
def softmax_backward(y: _A, dy: _A | npt.ArrayLike, axis: _Axis = -1, *, device: _Device = None) -> _A: ...
@overload
def softmax_backward(
    y: npt.ArrayLike, dy: npt.ArrayLike, axis: _Axis = -1, *, device: _Device = None
) -> _NDArray: ...
@overload
def log_softmax_backward(
    y: _A, dy: _A | npt.ArrayLike, axis: _Axis = -1, *, device: _Device = None
) -> _A: ...
@overload
def log_softmax_backward(
    y: npt.ArrayLike, dy: npt.ArrayLike, axis: _Axis = -1, *, device: _Device = None
) -> _NDArray: ...

@overload
def stablemax(x: _A, axis: _Axis = -1, *, out: _Array | None = None, device: _Device = None) -> _A: ...
@overload
def stablemax(
    x: npt.ArrayLike, axis: _Axis = -1, *, out: _Array | None = None, device: _Device = None
) -> _NDArray: ...
@overload
def log_stablemax(x: _A, axis: _Axis = -1, *, out: _Array | None = None, device: _Device = None) -> _A: ...
@overload
def log_stablemax(
    x: npt.ArrayLike, axis: _Axis = -1, *, out: _Array | None = None, device: _Device = None
) -> _NDArray: ...
@overload
def stablemax_backward(
    y: _A, dy: _A | npt.ArrayLike, x: _A | npt.ArrayLike, axis: _Axis = -1, *, device: _Device = None
) -> _A: ...
@overload
def stablemax_backward(
    y: npt.ArrayLike, dy: npt.ArrayLike, x: npt.ArrayLike, axis: _Axis = -1, *, device: _Device = None
) -> _NDArray: ...
@overload
def log_stablemax_backward(
    y: _A, dy: _A | npt.ArrayLike, x: _A | npt.ArrayLike, axis: _Axis = -1, *, device: _Device = None
) -> _A: ...
@overload
def log_stablemax_backward(
    y: npt.ArrayLike, dy: npt.ArrayLike, x: npt.ArrayLike, axis: _Axis = -1, *, device: _Device = None
) -> _NDArray: ...

# Cross-entropy. The loss is a 0-d result for reduction "mean"/"sum" (a NumPy scalar for NumPy
# input), per row for "none": typed as the input's kind. return_stats=True appends a
# CrossEntropyStats to the result (typed here without it).
@overload
def cross_entropy(
    logits: _A,
    target: _Array | npt.ArrayLike,
    *,
    axis: int = -1,
    weight: _Array | npt.ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: _Reduction = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    normalizer: str = "softmax",
    temperature: float = 1.0,
    token_weight: _Array | npt.ArrayLike | None = None,
    return_stats: bool = False,
    device: _Device = None,
) -> _A: ...
@overload
def cross_entropy(
    logits: npt.ArrayLike,
    target: _Array | npt.ArrayLike,
    *,
    axis: int = -1,
    weight: _Array | npt.ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: _Reduction = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    normalizer: str = "softmax",
    temperature: float = 1.0,
    token_weight: _Array | npt.ArrayLike | None = None,
    return_stats: bool = False,
    device: _Device = None,
) -> _NDArray: ...
@overload
def cross_entropy_with_grad(
    logits: _A,
    target: _Array | npt.ArrayLike,
    *,
    axis: int = -1,
    weight: _Array | npt.ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: _Reduction = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    grad_output: float | _Array | npt.ArrayLike = 1.0,
    inplace: bool = False,
    normalizer: str = "softmax",
    temperature: float = 1.0,
    token_weight: _Array | npt.ArrayLike | None = None,
    return_stats: bool = False,
    device: _Device = None,
) -> tuple[_A, _A]: ...
@overload
def cross_entropy_with_grad(
    logits: npt.ArrayLike,
    target: _Array | npt.ArrayLike,
    *,
    axis: int = -1,
    weight: _Array | npt.ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: _Reduction = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    grad_output: float | _Array | npt.ArrayLike = 1.0,
    inplace: bool = False,
    normalizer: str = "softmax",
    temperature: float = 1.0,
    token_weight: _Array | npt.ArrayLike | None = None,
    return_stats: bool = False,
    device: _Device = None,
) -> tuple[_NDArray, _NDArray]: ...
@overload
def linear_cross_entropy(
    hidden: _A,
    linear_weight: _Array | npt.ArrayLike,
    target: _Array | npt.ArrayLike,
    *,
    linear_bias: _Array | npt.ArrayLike | None = None,
    weight: _Array | npt.ArrayLike | None = None,
    reduction: _Reduction = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    temperature: float = 1.0,
    token_weight: _Array | npt.ArrayLike | None = None,
    return_stats: bool = False,
    device: _Device = None,
) -> _A: ...
@overload
def linear_cross_entropy(
    hidden: npt.ArrayLike,
    linear_weight: _Array | npt.ArrayLike,
    target: _Array | npt.ArrayLike,
    *,
    linear_bias: _Array | npt.ArrayLike | None = None,
    weight: _Array | npt.ArrayLike | None = None,
    reduction: _Reduction = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    temperature: float = 1.0,
    token_weight: _Array | npt.ArrayLike | None = None,
    return_stats: bool = False,
    device: _Device = None,
) -> _NDArray: ...
@overload
def linear_cross_entropy_with_grad(
    hidden: _A,
    linear_weight: _Array | npt.ArrayLike,
    target: _Array | npt.ArrayLike,
    *,
    linear_bias: _Array | npt.ArrayLike | None = None,
    weight: _Array | npt.ArrayLike | None = None,
    reduction: _Reduction = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    grad_output: float | _Array | npt.ArrayLike = 1.0,
    temperature: float = 1.0,
    token_weight: _Array | npt.ArrayLike | None = None,
    return_stats: bool = False,
    device: _Device = None,
) -> tuple[_A, _A, _A, _A | None]: ...
@overload
def linear_cross_entropy_with_grad(
    hidden: npt.ArrayLike,
    linear_weight: _Array | npt.ArrayLike,
    target: _Array | npt.ArrayLike,
    *,
    linear_bias: _Array | npt.ArrayLike | None = None,
    weight: _Array | npt.ArrayLike | None = None,
    reduction: _Reduction = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    grad_output: float | _Array | npt.ArrayLike = 1.0,
    temperature: float = 1.0,
    token_weight: _Array | npt.ArrayLike | None = None,
    return_stats: bool = False,
    device: _Device = None,
) -> tuple[_NDArray, _NDArray, _NDArray, _NDArray | None]: ...

# Normalization. return_stats=True adds the saved statistics (float64 rstd; mean for layer_norm).
@overload
def rms_norm(
    x: _A,
    weight: _Array | npt.ArrayLike | None = None,
    *,
    eps: float | None = None,
    axis: int | tuple[int, ...] = -1,
    out: _Array | None = None,
    return_stats: Literal[False] = False,
    device: _Device = None,
) -> _A: ...
@overload
def rms_norm(
    x: npt.ArrayLike,
    weight: _Array | npt.ArrayLike | None = None,
    *,
    eps: float | None = None,
    axis: int | tuple[int, ...] = -1,
    out: _Array | None = None,
    return_stats: Literal[False] = False,
    device: _Device = None,
) -> _NDArray: ...
@overload
def rms_norm(
    x: _A,
    weight: _Array | npt.ArrayLike | None = None,
    *,
    eps: float | None = None,
    axis: int | tuple[int, ...] = -1,
    out: _Array | None = None,
    return_stats: Literal[True],
    device: _Device = None,
) -> tuple[_A, _A]: ...
@overload
def rms_norm(
    x: npt.ArrayLike,
    weight: _Array | npt.ArrayLike | None = None,
    *,
    eps: float | None = None,
    axis: int | tuple[int, ...] = -1,
    out: _Array | None = None,
    return_stats: Literal[True],
    device: _Device = None,
) -> tuple[_NDArray, _NDArray]: ...
@overload
def rms_norm_backward(
    dy: _A,
    x: _Array | npt.ArrayLike,
    weight: _Array | npt.ArrayLike | None = None,
    *,
    eps: float | None = None,
    axis: int | tuple[int, ...] = -1,
    rstd: _Array | npt.ArrayLike | None = None,
    device: _Device = None,
) -> tuple[_A, _A | None]: ...
@overload
def rms_norm_backward(
    dy: npt.ArrayLike,
    x: _Array | npt.ArrayLike,
    weight: _Array | npt.ArrayLike | None = None,
    *,
    eps: float | None = None,
    axis: int | tuple[int, ...] = -1,
    rstd: _Array | npt.ArrayLike | None = None,
    device: _Device = None,
) -> tuple[_NDArray, _NDArray | None]: ...
@overload
def crms_norm(
    x: _A,
    weight: _Array | npt.ArrayLike | None = None,
    *,
    eps: float = 1e-6,
    axis: int | tuple[int, ...] = -1,
    out: _Array | None = None,
    return_stats: Literal[False] = False,
    device: _Device = None,
) -> _A: ...
@overload
def crms_norm(
    x: npt.ArrayLike,
    weight: _Array | npt.ArrayLike | None = None,
    *,
    eps: float = 1e-6,
    axis: int | tuple[int, ...] = -1,
    out: _Array | None = None,
    return_stats: Literal[False] = False,
    device: _Device = None,
) -> _NDArray: ...
@overload
def crms_norm(
    x: _A,
    weight: _Array | npt.ArrayLike | None = None,
    *,
    eps: float = 1e-6,
    axis: int | tuple[int, ...] = -1,
    out: _Array | None = None,
    return_stats: Literal[True],
    device: _Device = None,
) -> tuple[_A, _A]: ...
@overload
def crms_norm(
    x: npt.ArrayLike,
    weight: _Array | npt.ArrayLike | None = None,
    *,
    eps: float = 1e-6,
    axis: int | tuple[int, ...] = -1,
    out: _Array | None = None,
    return_stats: Literal[True],
    device: _Device = None,
) -> tuple[_NDArray, _NDArray]: ...
@overload
def crms_norm_backward(
    dy: _A,
    x: _Array | npt.ArrayLike,
    weight: _Array | npt.ArrayLike | None = None,
    *,
    eps: float = 1e-6,
    axis: int | tuple[int, ...] = -1,
    rstd: _Array | npt.ArrayLike | None = None,
    device: _Device = None,
) -> tuple[_A, _A | None]: ...
@overload
def crms_norm_backward(
    dy: npt.ArrayLike,
    x: _Array | npt.ArrayLike,
    weight: _Array | npt.ArrayLike | None = None,
    *,
    eps: float = 1e-6,
    axis: int | tuple[int, ...] = -1,
    rstd: _Array | npt.ArrayLike | None = None,
    device: _Device = None,
) -> tuple[_NDArray, _NDArray | None]: ...
@overload
def layer_norm(
    x: _A,
    weight: _Array | npt.ArrayLike | None = None,
    bias: _Array | npt.ArrayLike | None = None,
    *,
    eps: float = 1e-5,
    axis: int | tuple[int, ...] = -1,
    out: _Array | None = None,
    return_stats: Literal[False] = False,
    device: _Device = None,
) -> _A: ...
@overload
def layer_norm(
    x: npt.ArrayLike,
    weight: _Array | npt.ArrayLike | None = None,
    bias: _Array | npt.ArrayLike | None = None,
    *,
    eps: float = 1e-5,
    axis: int | tuple[int, ...] = -1,
    out: _Array | None = None,
    return_stats: Literal[False] = False,
    device: _Device = None,
) -> _NDArray: ...
@overload
def layer_norm(
    x: _A,
    weight: _Array | npt.ArrayLike | None = None,
    bias: _Array | npt.ArrayLike | None = None,
    *,
    eps: float = 1e-5,
    axis: int | tuple[int, ...] = -1,
    out: _Array | None = None,
    return_stats: Literal[True],
    device: _Device = None,
) -> tuple[_A, _A, _A]: ...
@overload
def layer_norm(
    x: npt.ArrayLike,
    weight: _Array | npt.ArrayLike | None = None,
    bias: _Array | npt.ArrayLike | None = None,
    *,
    eps: float = 1e-5,
    axis: int | tuple[int, ...] = -1,
    out: _Array | None = None,
    return_stats: Literal[True],
    device: _Device = None,
) -> tuple[_NDArray, _NDArray, _NDArray]: ...
@overload
def layer_norm_backward(
    dy: _A,
    x: _Array | npt.ArrayLike,
    weight: _Array | npt.ArrayLike | None = None,
    bias: _Array | npt.ArrayLike | None = None,
    *,
    eps: float = 1e-5,
    axis: int | tuple[int, ...] = -1,
    mean: _Array | npt.ArrayLike | None = None,
    rstd: _Array | npt.ArrayLike | None = None,
    device: _Device = None,
) -> tuple[_A, _A | None, _A | None]: ...
@overload
def layer_norm_backward(
    dy: npt.ArrayLike,
    x: _Array | npt.ArrayLike,
    weight: _Array | npt.ArrayLike | None = None,
    bias: _Array | npt.ArrayLike | None = None,
    *,
    eps: float = 1e-5,
    axis: int | tuple[int, ...] = -1,
    mean: _Array | npt.ArrayLike | None = None,
    rstd: _Array | npt.ArrayLike | None = None,
    device: _Device = None,
) -> tuple[_NDArray, _NDArray | None, _NDArray | None]: ...

# PowerNorm (stateful: the running statistics live in `state`).
@overload
def power_norm(
    x: _A,
    weight: _Array | npt.ArrayLike | None,
    bias: _Array | npt.ArrayLike | None,
    state: PowerNormState,
    *,
    training: bool = True,
    pad_mask: _Array | npt.ArrayLike | None = None,
    return_saved: Literal[False] = False,
    device: _Device = None,
) -> _A: ...
@overload
def power_norm(
    x: npt.ArrayLike,
    weight: _Array | npt.ArrayLike | None,
    bias: _Array | npt.ArrayLike | None,
    state: PowerNormState,
    *,
    training: bool = True,
    pad_mask: _Array | npt.ArrayLike | None = None,
    return_saved: Literal[False] = False,
    device: _Device = None,
) -> _NDArray: ...
@overload
def power_norm(
    x: _A,
    weight: _Array | npt.ArrayLike | None,
    bias: _Array | npt.ArrayLike | None,
    state: PowerNormState,
    *,
    training: bool = True,
    pad_mask: _Array | npt.ArrayLike | None = None,
    return_saved: Literal[True],
    device: _Device = None,
) -> tuple[_A, PowerNormSaved]: ...
@overload
def power_norm(
    x: npt.ArrayLike,
    weight: _Array | npt.ArrayLike | None,
    bias: _Array | npt.ArrayLike | None,
    state: PowerNormState,
    *,
    training: bool = True,
    pad_mask: _Array | npt.ArrayLike | None = None,
    return_saved: Literal[True],
    device: _Device = None,
) -> tuple[_NDArray, PowerNormSaved]: ...
@overload
def power_norm_backward(
    dy: _A, saved: PowerNormSaved, state: PowerNormState, *, device: _Device = None
) -> tuple[_A, _A | None, _A | None]: ...
@overload
def power_norm_backward(
    dy: npt.ArrayLike, saved: PowerNormSaved, state: PowerNormState, *, device: _Device = None
) -> tuple[_NDArray, _NDArray | None, _NDArray | None]: ...

__all__ = [
    "CrossEntropyStats",
    "PowerNormSaved",
    "PowerNormState",
    "crms_norm",
    "crms_norm_backward",
    "cross_entropy",
    "cross_entropy_with_grad",
    "get_backend",
    "get_isa",
    "get_num_threads",
    "layer_norm",
    "layer_norm_backward",
    "linear_cross_entropy",
    "linear_cross_entropy_with_grad",
    "log_softmax",
    "log_softmax_backward",
    "logsumexp",
    "power_norm",
    "power_norm_backward",
    "rms_norm",
    "rms_norm_backward",
    "set_backend",
    "set_isa",
    "set_num_threads",
    "softmax",
    "softmax_backward",
    "supported_isas",
]
