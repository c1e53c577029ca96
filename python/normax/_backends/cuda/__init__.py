"""The CUDA path of the public functions: torch CUDA tensors and CuPy arrays in, the same out.

The arrays are read and written where they are, passed by device address (no host round trip);
the kernels run on the caller's current stream (``torch.cuda.current_stream()``,
``cupy.cuda.get_current_stream()``), so they are ordered with the caller's own work and nothing
here synchronizes, except that class indices are checked before a cross-entropy (one device-to-
host read of a flag, as the CPU path raises IndexError for a bad index; the ``normax.torch`` ops
assert on the device instead, as torch's own kernels do, and so does anything under CUDA-graph
capture).

Differences from the CPU functions, stated once:

- float32, float16 and bfloat16 only (float32 arithmetic inside); float64 and integer arrays
  raise TypeError rather than silently losing precision.
- Saved statistics (``return_stats=True``) are float32; ``dweight``/``dbias`` are summed in
  float32 and returned in `x`'s dtype. Norm parameters are read in their own dtype where it is
  float32 or `x`'s (others are cast to float32 first).
- Not on the GPU: ``logsumexp``'s ``b=`` and ``return_sign=True``, the linear cross-entropy's
  class weights and shapes other than 2-d hidden and linear_weight with 1-d class indices;
  those raise the registry's NotImplementedError (normax._backends.missing), naming the op and
  the option.
- PowerNorm keeps its state (float64 NumPy buffers) on the host: a training call reads C
  per-channel sums back from the device, a host synchronization (see the PowerNorm section).
- The linear cross-entropy holds whole rows of logits (the vocabulary is never split), so a
  ``chunk_size`` below V still holds one row; by default blocks of at most 256 MiB of logits
  (``cross_entropy.linear_block_rows``). Its loss is float32 for float16/bfloat16 inputs (the
  CPU rounds it to the inputs' dtype).
- Results are the caller's library arrays; a reduced loss is a 0-d array (as torch returns).

The kernels are compiled by NVRTC for the device at first use (about a second per op family),
then cached for the process. NVRTC comes from the ``nvidia-cuda-nvrtc`` wheel (installed with
PyTorch) or a CUDA toolkit on the library path.

Layout: one module per op family (``softmax``, ``stablemax``, ``cross_entropy``, ``norms``, ``power_norm``, as
the CPU path and ``kernels/*.cu``) over ``device`` (the caller's library, raw arrays, streams,
the kernels' entry point). ``cross_entropy_rows``, ``linear_blocks`` and ``norm_backward`` are the
families' cores, ``vocab_parallel_stats`` / ``vocab_parallel_backward`` the vocabulary-parallel cross-entropy's kernels, with the options ``normax.torch`` needs (no read-back check, parameter
gradients in the parameters' own dtype where the kernels write it: float32 or `x`'s).
"""

from .cross_entropy import (
    cross_entropy,
    cross_entropy_rows,
    cross_entropy_with_grad,
    linear_blocks,
    linear_cross_entropy,
    linear_cross_entropy_with_grad,
    vocab_parallel_backward,
    vocab_parallel_linear_backward,
    vocab_parallel_linear_stats,
    vocab_parallel_stats,
)
from .device import available, compile_check, is_cuda_array, load_nvrtc
from .logprobs import linear_logprobs, logprobs
from .norms import (
    crms_norm,
    crms_norm_backward,
    layer_norm,
    layer_norm_backward,
    norm_backward,
    rms_norm,
    rms_norm_backward,
)
from .power_norm import power_norm, power_norm_backward, power_norm_backward_as, power_norm_saved
from .softmax import log_softmax, log_softmax_backward, logsumexp, softmax, softmax_backward
from .stablemax import log_stablemax, log_stablemax_backward, stablemax, stablemax_backward

__all__ = [
    "available",
    "compile_check",
    "crms_norm",
    "crms_norm_backward",
    "cross_entropy",
    "cross_entropy_rows",
    "cross_entropy_with_grad",
    "is_cuda_array",
    "layer_norm",
    "layer_norm_backward",
    "linear_blocks",
    "linear_cross_entropy",
    "linear_cross_entropy_with_grad",
    "linear_logprobs",
    "load_nvrtc",
    "log_softmax",
    "log_softmax_backward",
    "log_stablemax",
    "log_stablemax_backward",
    "logprobs",
    "logsumexp",
    "norm_backward",
    "power_norm",
    "power_norm_backward",
    "power_norm_backward_as",
    "power_norm_saved",
    "rms_norm",
    "rms_norm_backward",
    "softmax",
    "softmax_backward",
    "stablemax",
    "stablemax_backward",
    "vocab_parallel_backward",
    "vocab_parallel_linear_backward",
    "vocab_parallel_linear_stats",
    "vocab_parallel_stats",
]

# The public functions this backend runs (every array function of normax), for the registry.
OPS = {
    f.__name__: f
    for f in (
        softmax,
        log_softmax,
        logsumexp,
        softmax_backward,
        log_softmax_backward,
        stablemax,
        log_stablemax,
        stablemax_backward,
        log_stablemax_backward,
        cross_entropy,
        cross_entropy_with_grad,
        linear_cross_entropy,
        linear_cross_entropy_with_grad,
        logprobs,
        linear_logprobs,
        rms_norm,
        rms_norm_backward,
        layer_norm,
        layer_norm_backward,
        crms_norm,
        crms_norm_backward,
        power_norm,
        power_norm_backward,
    )
}
