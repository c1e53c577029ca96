# Type stub of the Rust extension (rust/normax-py). Arrays are C-contiguous float32/float64
# ndarrays laid out as (outer, len, inner); the Python layer (normax._softmax) prepares them.

import numpy as np

def softmax(x: np.ndarray, out: np.ndarray, outer: int, len: int, inner: int) -> None: ...
def softmax_last(x: object) -> np.ndarray | None: ...
def log_softmax_last(x: object) -> np.ndarray | None: ...
def log_softmax(x: np.ndarray, out: np.ndarray, outer: int, len: int, inner: int) -> None: ...
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
def get_num_threads() -> int: ...
def set_num_threads(n: int) -> None: ...
def get_isa() -> str: ...
def set_isa(name: str) -> None: ...
def supported_isas() -> list[str]: ...

# Only in builds with the Cargo feature "wgpu" (the released wheel has it). 2-d C-contiguous
# float32 rows in, new float32 arrays out (normax._wgpu prepares them).
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
