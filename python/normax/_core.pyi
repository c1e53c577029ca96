# Type stub of the Rust extension (rust/normax-py). Arrays are C-contiguous, aligned, native
# float32/float64 ndarrays laid out as (outer, len, inner) (a misaligned one is a ValueError);
# the Python layer (normax._arrays: as_input, contiguous, direct_output) prepares them.

import numpy as np

def softmax(x: np.ndarray, out: np.ndarray, outer: int, len: int, inner: int) -> None: ...
def softmax_last(x: object) -> np.ndarray | None: ...
def log_softmax_last(x: object) -> np.ndarray | None: ...
def log_softmax(x: np.ndarray, out: np.ndarray, outer: int, len: int, inner: int) -> None: ...
def stablemax(x: np.ndarray, out: np.ndarray, outer: int, len: int, inner: int) -> None: ...
def stablemax_last(x: object) -> np.ndarray | None: ...
def log_stablemax(x: np.ndarray, out: np.ndarray, outer: int, len: int, inner: int) -> None: ...
def log_stablemax_last(x: object) -> np.ndarray | None: ...
def logsumexp(
    x: np.ndarray,
    b: np.ndarray | None,
    out: np.ndarray,
    sign: np.ndarray | None,
    outer: int,
    len: int,
    inner: int,
) -> None: ...
def softmax_backward(
    y: np.ndarray, dy: np.ndarray, dx: np.ndarray, outer: int, len: int, inner: int
) -> None: ...
def log_softmax_backward(
    y: np.ndarray, dy: np.ndarray, dx: np.ndarray, outer: int, len: int, inner: int
) -> None: ...
def exp(x: np.ndarray, out: np.ndarray) -> None: ...

# The cross-entropies take the loss options (ignore_index ... softcap) as the fields of
# normax._options.CeOptions, in order: callers spread the one checked tuple.
def cross_entropy(
    logits: np.ndarray,
    target: np.ndarray,
    weight: np.ndarray | None,
    loss: np.ndarray,
    grad: np.ndarray | None,
    grad_rows: np.ndarray | None,
    grad_scalar: float,
    rows: int,
    classes: int,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
) -> None: ...
def linear_cross_entropy(
    hidden: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None,
    target: np.ndarray,
    loss: np.ndarray,
    dhidden: np.ndarray | None,
    dweight: np.ndarray | None,
    dbias: np.ndarray | None,
    grad_rows: np.ndarray | None,
    grad_scalar: float,
    n: int,
    h: int,
    v: int,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    chunk_size: int | None,
) -> None: ...
def norm_forward(
    norm: str,
    x: np.ndarray,
    weight: np.ndarray | None,
    bias: np.ndarray | None,
    y: np.ndarray,
    mean: np.ndarray | None,
    rstd: np.ndarray | None,
    len: int,
    eps: float,
) -> None: ...
def norm_backward(
    norm: str,
    dy: np.ndarray,
    x: np.ndarray,
    weight: np.ndarray | None,
    mean: np.ndarray | None,
    rstd: np.ndarray | None,
    dx: np.ndarray,
    dweight: np.ndarray | None,
    dbias: np.ndarray | None,
    len: int,
    eps: float,
) -> None: ...
def power_norm_forward(
    x: np.ndarray,
    channels: int,
    groups: int,
    eps: float,
    pad: np.ndarray | None,
    sumsq: np.ndarray | None,
    scale: np.ndarray | None,
    shift: np.ndarray | None,
    y: np.ndarray | None,
) -> None: ...
def power_norm_backward(
    dy: np.ndarray,
    x: np.ndarray,
    channels: int,
    groups: int,
    eps: float,
    weight: np.ndarray | None,
    zscale: np.ndarray,
    ema: np.ndarray,
    dscale: np.ndarray,
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

# Only in builds with the Cargo feature "wgpu" (the released wheel has it). 2-d C-contiguous
# float32 rows in, new float32 arrays out (normax._backends.wgpu prepares them).
def wgpu_adapter() -> str: ...
def wgpu_softmax(x: np.ndarray) -> np.ndarray: ...
def wgpu_log_softmax(x: np.ndarray) -> np.ndarray: ...
def wgpu_logsumexp(x: np.ndarray) -> np.ndarray: ...
def wgpu_rms_norm(x: np.ndarray, weight: np.ndarray | None, eps: float) -> np.ndarray: ...
def wgpu_layer_norm(
    x: np.ndarray, weight: np.ndarray | None, bias: np.ndarray | None, eps: float
) -> np.ndarray: ...
def wgpu_cross_entropy(
    logits: np.ndarray,
    target: np.ndarray,
    weight: np.ndarray | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    with_grad: bool,
    grad_rows: np.ndarray | None,
    grad_scalar: float,
) -> tuple[np.ndarray, np.ndarray | None]: ...

# Only in builds with the Cargo feature "cuda" (the released wheel has it). Array arguments are
# DLPack capsules of C-contiguous CUDA arrays (normax._backends.cuda makes them); the kernels are enqueued
# on `stream_handle` (a CUstream of device `device`) and nothing is returned.
def cuda_compile_all(arch: str) -> list[tuple[str, int]]: ...
def cuda_nvrtc_version() -> tuple[int, int]: ...
def cuda_device_name(device: int) -> str: ...
def cuda_softmax(
    x: object, out: object, rows: int, cols: int, log: bool, device: int, stream_handle: int
) -> None: ...
def cuda_logsumexp(x: object, out: object, rows: int, cols: int, device: int, stream_handle: int) -> None: ...
def cuda_stablemax(
    x: object, out: object, rows: int, cols: int, log: bool, device: int, stream_handle: int
) -> None: ...
def cuda_softmax_backward(
    y: object, dy: object, dx: object, rows: int, cols: int, log: bool, device: int, stream_handle: int
) -> None: ...
def cuda_cross_entropy(
    logits: object,
    target: object,
    weight: object | None,
    loss_rows: object,
    grad: object | None,
    scale: object | None,
    scale_stride: int,
    rows: int,
    cols: int,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    device: int,
    stream_handle: int,
) -> None: ...
def cuda_shard_stats(
    logits: object,
    target: object,
    weight: object | None,
    packed: object,
    rows: int,
    start: int,
    length: int,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
    device: int,
    stream_handle: int,
) -> None: ...
def cuda_shard_backward(
    logits: object,
    target: object,
    weight: object | None,
    lse: object,
    grad: object,
    scale: object,
    scale_stride: int,
    rows: int,
    start: int,
    length: int,
    classes: int,
    w_sum: float,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    device: int,
    stream_handle: int,
) -> None: ...
def cuda_norm_forward(
    kind: str,
    x: object,
    weight: object | None,
    bias: object | None,
    out: object | None,
    mean: object | None,
    rstd: object | None,
    rows: int,
    cols: int,
    eps: float,
    device: int,
    stream_handle: int,
) -> None: ...
def cuda_norm_backward(
    kind: str,
    dy: object,
    x: object,
    weight: object | None,
    mean: object | None,
    rstd: object,
    dx: object,
    dweight: object | None,
    dbias: object | None,
    rows: int,
    cols: int,
    device: int,
    stream_handle: int,
) -> None: ...
def cuda_power_norm_forward(
    x: object,
    tokens: int,
    channels: int,
    groups: int,
    eps: float,
    pad: object | None,
    sumsq: object | None,
    scale: object | None,
    shift: object | None,
    y: object | None,
    device: int,
    stream_handle: int,
) -> None: ...
def cuda_power_norm_backward(
    dy: object,
    x: object,
    tokens: int,
    channels: int,
    groups: int,
    eps: float,
    weight: object | None,
    zscale: object,
    ema: object,
    dscale: object,
    dx: object,
    sums: object,
    device: int,
    stream_handle: int,
) -> None: ...

# Vocabulary-parallel cross-entropy (rust/normax-py/src/vocab_parallel.rs)
def shard_fields(label_smoothing: float) -> int: ...
def shard_stats(
    logits: np.ndarray,
    target: np.ndarray,
    weight: np.ndarray | None,
    packed: np.ndarray,
    rows: int,
    start: int,
    length: int,
    ignore_index: int,
    label_smoothing: float,
    softcap: float | None,
) -> None: ...
def shard_combine(
    gathered: np.ndarray,
    stride: int,
    starts: list[int],
    lengths: list[int],
    rows: int,
    target: np.ndarray,
    weight: np.ndarray | None,
    loss: np.ndarray,
    lse: np.ndarray,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
) -> float: ...
def shard_backward(
    logits: np.ndarray,
    target: np.ndarray,
    weight: np.ndarray | None,
    lse: np.ndarray,
    denom: float,
    grad: np.ndarray,
    grad_rows: np.ndarray | None,
    grad_scalar: float,
    rows: int,
    start: int,
    length: int,
    classes: int,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
) -> None: ...
def shard_linear_stats(
    hidden: np.ndarray,
    weight_shard: np.ndarray,
    bias_shard: np.ndarray | None,
    target: np.ndarray,
    weight: np.ndarray | None,
    packed: np.ndarray,
    rows: int,
    h: int,
    start: int,
    length: int,
    ignore_index: int,
    label_smoothing: float,
    softcap: float | None,
    chunk_size: int | None,
) -> None: ...
def shard_linear_backward(
    hidden: np.ndarray,
    weight_shard: np.ndarray,
    bias_shard: np.ndarray | None,
    target: np.ndarray,
    weight: np.ndarray | None,
    lse: np.ndarray,
    denom: float,
    dhidden: np.ndarray,
    dweight: np.ndarray,
    dbias: np.ndarray | None,
    grad_rows: np.ndarray | None,
    grad_scalar: float,
    rows: int,
    h: int,
    start: int,
    length: int,
    classes: int,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    chunk_size: int | None,
) -> None: ...
