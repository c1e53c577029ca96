# Type stub of the Rust extension (rust/normax-py). Arrays are C-contiguous, aligned, native
# float32/float64 ndarrays (a misaligned one is a ValueError); the Python layer (normax._arrays:
# as_input, contiguous, direct_output) prepares them. The checked options cross as one object
# (normax._options builds them from the user's arguments): CeOptions, NormOptions,
# PowerNormOptions, VocabParallelLayout, LogprobOptions; `layout` is (outer, len, inner), the
# reduced axis in the middle.

from typing import Any

import numpy as np
from typing_extensions import TypeAlias

Layout: TypeAlias = tuple[int, int, int]

class CeOptions:
    """The cross-entropy options (torch.nn.functional.cross_entropy's), checked."""

    def __init__(
        self,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        temperature: float = 1.0,
    ) -> None: ...
    @property
    def ignore_index(self) -> int: ...
    @property
    def reduction(self) -> str: ...
    @property
    def label_smoothing(self) -> float: ...
    @property
    def z_loss(self) -> float: ...
    @property
    def softcap(self) -> float | None: ...
    @property
    def temperature(self) -> float: ...
    def replace(self, **changes: Any) -> CeOptions: ...

class NormOptions:
    """Which normalization ("rms", "layer" or "crms") and its eps."""

    def __init__(self, kind: str, eps: float) -> None: ...
    @property
    def kind(self) -> str: ...
    @property
    def eps(self) -> float: ...

class PowerNormOptions:
    """PowerNorm's channels, channel groups and eps."""

    def __init__(self, channels: int, groups: int, eps: float) -> None: ...
    @property
    def channels(self) -> int: ...
    @property
    def groups(self) -> int: ...
    @property
    def eps(self) -> float: ...

class VocabParallelLayout:
    """One rank's rows x classes [start, start + length) of a vocabulary of `classes`."""

    def __init__(self, rows: int, start: int, length: int, classes: int) -> None: ...
    @property
    def rows(self) -> int: ...
    @property
    def start(self) -> int: ...
    @property
    def length(self) -> int: ...
    @property
    def classes(self) -> int: ...

# d(loss)/d(output): a number, or one per row (reduction "none").
GradOutput: TypeAlias = float | np.ndarray

def softmax(x: np.ndarray, out: np.ndarray, layout: Layout) -> None: ...
def softmax_last(x: object, out: object = None) -> np.ndarray | None: ...
def log_softmax_last(x: object, out: object = None) -> np.ndarray | None: ...
def log_softmax(x: np.ndarray, out: np.ndarray, layout: Layout) -> None: ...
def stablemax(x: np.ndarray, out: np.ndarray, layout: Layout) -> None: ...
def stablemax_last(x: object, out: object = None) -> np.ndarray | None: ...
def log_stablemax(x: np.ndarray, out: np.ndarray, layout: Layout) -> None: ...
def log_stablemax_last(x: object, out: object = None) -> np.ndarray | None: ...
def logsumexp(
    x: np.ndarray, b: np.ndarray | None, out: np.ndarray, sign: np.ndarray | None, layout: Layout
) -> None: ...
def softmax_backward(y: np.ndarray, dy: np.ndarray, dx: np.ndarray, layout: Layout) -> None: ...
def log_softmax_backward(y: np.ndarray, dy: np.ndarray, dx: np.ndarray, layout: Layout) -> None: ...
def exp(x: np.ndarray, out: np.ndarray) -> None: ...

# Cross-entropy of (rows, classes) logits; `grad` a fresh array or `logits` itself (in place).
# `weight`: class weights, or (class weights, token weights), either None; `loss`: the loss, or
# (loss, lse, entropy, correct) for the per-row statistics too.
def cross_entropy(
    logits: np.ndarray,
    target: np.ndarray,
    weight: np.ndarray | tuple[np.ndarray | None, np.ndarray | None] | None,
    options: CeOptions,
    loss: np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    grad: np.ndarray | None = None,
    grad_output: GradOutput = 1.0,
) -> None: ...

# inputs = (hidden (N, H), linear weight (V, H), bias (V,) or None); grads = (dhidden,
# dlinear_weight, dlinear_bias or None); target: class indices or (class indices, token weights
# or None); loss as for cross_entropy.
def linear_cross_entropy(
    inputs: tuple[np.ndarray, np.ndarray, np.ndarray | None],
    target: np.ndarray | tuple[np.ndarray, np.ndarray | None],
    options: CeOptions,
    chunk_size: int | None,
    loss: np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    grads: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None,
    grad_output: GradOutput = 1.0,
) -> None: ...

class LogprobOptions:
    """The log-probabilities' options: the ignored target and the temperature (finite, > 0)."""

    def __init__(self, ignore_index: int = -100, temperature: float = 1.0) -> None: ...
    @property
    def ignore_index(self) -> int: ...
    @property
    def temperature(self) -> float: ...

# (rows, classes) logits, (rows,) int64 targets; outputs (rows,) in the logits' dtype. The
# backward's grads are (grad_logprob, grad_entropy), each (rows,) or None.
def logprobs(
    logits: np.ndarray, target: np.ndarray, options: LogprobOptions, logprob: np.ndarray, entropy: np.ndarray | None = None
) -> None: ...
def logprobs_backward(
    logits: np.ndarray,
    target: np.ndarray,
    options: LogprobOptions,
    grads: tuple[np.ndarray | None, np.ndarray | None],
    grad: np.ndarray,
) -> None: ...
def linear_logprobs(
    inputs: tuple[np.ndarray, np.ndarray, np.ndarray | None],
    target: np.ndarray,
    options: LogprobOptions,
    chunk_size: int | None,
    logprob: np.ndarray,
    entropy: np.ndarray | None = None,
) -> None: ...
def linear_logprobs_backward(
    inputs: tuple[np.ndarray, np.ndarray, np.ndarray | None],
    target: np.ndarray,
    options: LogprobOptions,
    chunk_size: int | None,
    grads: tuple[np.ndarray | None, np.ndarray | None],
    outputs: tuple[np.ndarray, np.ndarray, np.ndarray | None],
) -> None: ...

# Rows are x's last axis; statistics float64, one per row.
def norm_forward(
    options: NormOptions,
    x: np.ndarray,
    weight: np.ndarray | None,
    bias: np.ndarray | None,
    y: np.ndarray,
    mean: np.ndarray | None = None,
    rstd: np.ndarray | None = None,
) -> None: ...
def norm_backward(
    options: NormOptions,
    dy: np.ndarray,
    x: np.ndarray,
    weight: np.ndarray | None,
    saved: tuple[np.ndarray | None, np.ndarray | None],
    dx: np.ndarray,
    dparams: tuple[np.ndarray | None, np.ndarray | None],
) -> None: ...

# x is (tokens, channels); out = (scale, shift, y); saved = (zscale, ema, dscale).
def power_norm_forward(
    options: PowerNormOptions,
    x: np.ndarray,
    pad: np.ndarray | None,
    sumsq: np.ndarray | None,
    out: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
) -> None: ...
def power_norm_backward(
    options: PowerNormOptions,
    dy: np.ndarray,
    x: np.ndarray,
    weight: np.ndarray | None,
    saved: tuple[np.ndarray, np.ndarray, np.ndarray],
    dx: np.ndarray,
    sums: np.ndarray,
) -> None: ...
def get_num_threads() -> int: ...
def set_num_threads(n: int) -> None:
    """Threads for the CPU kernels: 1 to max(1024, 4 x logical CPUs), else ValueError naming n.
    Threads start with the next call; safe across fork()."""

def get_isa() -> str: ...
def set_isa(name: str) -> None: ...
def supported_isas() -> list[str]: ...

# Vocabulary-parallel cross-entropy (rust/normax-py/src/vocab_parallel.rs). labels = (target
# class indices, class weights or None); saved = (lse (rows, 2) float64, denom, grad_output).
Labels: TypeAlias = tuple[np.ndarray, np.ndarray | None]
LinearInputs: TypeAlias = tuple[np.ndarray, np.ndarray, np.ndarray | None]

def vocab_parallel_fields(options: CeOptions) -> int: ...
def vocab_parallel_stats(
    logits: np.ndarray, labels: Labels, shard: VocabParallelLayout, options: CeOptions, packed: np.ndarray
) -> None: ...
def vocab_parallel_combine(
    gathered: np.ndarray,
    shards: list[VocabParallelLayout],
    labels: Labels,
    options: CeOptions,
    out: tuple[np.ndarray, np.ndarray],
) -> float: ...
def vocab_parallel_backward(
    logits: np.ndarray,
    labels: Labels,
    shard: VocabParallelLayout,
    options: CeOptions,
    saved: tuple[np.ndarray, float, GradOutput],
    grad: np.ndarray,
) -> None: ...
def vocab_parallel_linear_stats(
    inputs: LinearInputs,
    labels: Labels,
    shard: VocabParallelLayout,
    options: CeOptions,
    chunk_size: int | None,
    packed: np.ndarray,
) -> None: ...
def vocab_parallel_linear_backward(
    inputs: LinearInputs,
    labels: Labels,
    shard: VocabParallelLayout,
    options: CeOptions,
    chunk_size: int | None,
    saved: tuple[np.ndarray, float, GradOutput],
    grads: tuple[np.ndarray, np.ndarray, np.ndarray | None],
) -> None: ...

# XLA typed-FFI handlers (rust/normax-py/src/ffi) for jax.ffi.register_ffi_target: target name ->
# PyCapsule whose pointer is the handler function; platform "cpu" or "CUDA" ({} for a platform
# this build has no handlers for).
def ffi_targets(platform: str) -> dict[str, Any]: ...

# Only in builds with the Cargo feature "wgpu" (the released wheel has it). 2-d C-contiguous
# float32 rows in, new float32 arrays out (normax._backends.wgpu prepares them).
def wgpu_adapter() -> str: ...
def wgpu_softmax(x: np.ndarray) -> np.ndarray: ...
def wgpu_log_softmax(x: np.ndarray) -> np.ndarray: ...
def wgpu_logsumexp(x: np.ndarray) -> np.ndarray: ...
def wgpu_norm(
    options: NormOptions, x: np.ndarray, weight: np.ndarray | None, bias: np.ndarray | None
) -> np.ndarray: ...
def wgpu_cross_entropy(
    logits: np.ndarray,
    target: np.ndarray,
    weight: np.ndarray | None,
    options: CeOptions,
    grad_output: GradOutput | None = None,
) -> tuple[np.ndarray, np.ndarray | None]: ...

# Only in builds with the Cargo feature "cuda" (the released wheel has it). Array arguments are
# raw arrays (ptr, dtype code, len) of C-contiguous CUDA arrays: the device address of element 0,
# 0 float32 / 1 float16 / 2 bfloat16 / 3 int64, the element count (normax._backends.cuda.device
# makes them), grouped in tuples where they go together; `shape` is (rows, cols); the kernels are enqueued on
# `stream` and nothing is returned.
class CudaStream:
    """The caller's CUDA device and current stream (a raw CUstream handle)."""

    def __init__(self, device: int, handle: int) -> None: ...
    @property
    def device(self) -> int: ...
    @property
    def handle(self) -> int: ...

Capsule: TypeAlias = tuple[int, int, int]  # a raw array: (ptr, dtype code, len)
Shape: TypeAlias = tuple[int, int]
# (grad, grad_output as float32 on the device, stride: 0 for one value, 1 for one per row)
ScaledGrad: TypeAlias = tuple[Capsule, Capsule, int]

def cuda_compile_all(arch: str) -> list[tuple[str, int]]: ...
def cuda_compile_cubin(module: str, arch: str) -> bytes: ...
def cuda_nvrtc_version() -> tuple[int, int]: ...
def cuda_nvrtc_probes() -> int: ...

# (event: "launch" | "memset" | "alloc" | "free", kernel or driver call, grid, block)
Recorded: TypeAlias = tuple[str, str, tuple[int, int, int], tuple[int, int, int]]

# Recorded, then the CUstream it was enqueued on and a launch's kernel arguments (4- and 8-byte ones as
# ints, argument blocks as None; a memset's address)
RecordedCall: TypeAlias = tuple[str, str, tuple[int, int, int], tuple[int, int, int], int, list[int | None]]

def cuda_record(on: bool, arguments: bool = False) -> list[Recorded] | list[RecordedCall] | None: ...
def cuda_device_name(device: int) -> str: ...
def cuda_softmax(x: Capsule, out: Capsule, shape: Shape, log: bool, stream: CudaStream) -> None: ...
def cuda_logsumexp(x: Capsule, out: Capsule, shape: Shape, stream: CudaStream) -> None: ...
def cuda_stablemax(x: Capsule, out: Capsule, shape: Shape, log: bool, stream: CudaStream) -> None: ...
def cuda_softmax_backward(
    y: Capsule, dy: Capsule, dx: Capsule, shape: Shape, log: bool, stream: CudaStream
) -> None: ...
def cuda_cross_entropy(
    inputs: tuple[Capsule, Capsule, Capsule | None],
    options: CeOptions,
    shape: Shape,
    loss_rows: Capsule,
    grad: ScaledGrad | None,
    stream: CudaStream,
    extras: tuple[float, Capsule | None, tuple[Capsule, Capsule, Capsule] | None] | None = None,
) -> None: ...
def cuda_logprobs_forward(
    inputs: tuple[Capsule, Capsule],
    options: tuple[int, float],
    shape: Shape,
    outputs: tuple[Capsule, Capsule, Capsule],
    stream: CudaStream,
) -> None: ...
def cuda_logprobs_backward(
    inputs: tuple[Capsule, Capsule],
    options: tuple[int, float],
    shape: Shape,
    saved: tuple[Capsule, Capsule, Capsule],
    grad: tuple[Capsule | None, Capsule | None, Capsule],
    stream: CudaStream,
) -> None: ...
def cuda_ce_forward(
    options: CeOptions,
    inputs: tuple[Capsule, Capsule, Capsule | None],
    shape: Shape,
    outputs: tuple[Capsule, Capsule, Capsule | None],
    stream: CudaStream,
) -> None: ...
def cuda_ce_backward(
    options: CeOptions,
    inputs: tuple[Capsule, Capsule, Capsule | None],
    shape: Shape,
    saved: tuple[Capsule, Capsule | None],
    grad: tuple[Capsule, Capsule, int],
    stream: CudaStream,
) -> None: ...
def cuda_vocab_parallel_stats(
    logits: Capsule,
    labels: tuple[Capsule, Capsule | None],
    shard: VocabParallelLayout,
    options: CeOptions,
    packed: Capsule,
    stream: CudaStream,
) -> None: ...
def cuda_vocab_parallel_backward(
    logits: Capsule,
    labels: tuple[Capsule, Capsule | None],
    shard: VocabParallelLayout,
    options: CeOptions,
    saved: tuple[Capsule, float],
    grad: ScaledGrad,
    stream: CudaStream,
) -> None: ...
def cuda_norm_forward(
    options: NormOptions,
    x: Capsule,
    params: tuple[Capsule | None, Capsule | None],
    out: Capsule | None,
    stats: tuple[Capsule | None, Capsule | None],
    shape: Shape,
    stream: CudaStream,
) -> None: ...
def cuda_norm_backward(
    options: NormOptions,
    inputs: tuple[Capsule, Capsule, Capsule | None],
    saved: tuple[Capsule | None, Capsule],
    outputs: tuple[Capsule, tuple[Capsule | None, Capsule | None], Capsule | None],
    shape: Shape,
    stream: CudaStream,
) -> None: ...
def cuda_norm_workspace(options: NormOptions, shape: Shape, has_params: bool, stream: CudaStream) -> int: ...
def cuda_power_norm_forward(
    options: PowerNormOptions,
    x: Capsule,
    pad: Capsule | None,
    sumsq: Capsule | None,
    out: tuple[Capsule, Capsule, Capsule] | None,
    stream: CudaStream,
) -> None: ...
def cuda_power_norm_backward(
    options: PowerNormOptions,
    inputs: tuple[Capsule, Capsule, Capsule | None],
    saved: tuple[Capsule, Capsule, Capsule],
    outs: tuple[Capsule, Capsule],
    stream: CudaStream,
) -> None: ...
