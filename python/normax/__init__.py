"""normax: fast, accurate softmax, log-sum-exp, cross-entropy and normalization ops.

The kernels are Rust (SIMD with run-time ISA dispatch, rayon threads); these functions follow
NumPy and SciPy conventions and take any CPU array (NumPy, PyTorch, JAX, array-API), returning
the caller's kind. ``normax.torch`` and ``normax.jax`` (imported on demand) are the framework
adapters with autograd. See the README for the benchmark and the API overview.
"""

from . import _cross_entropy, _norms, _power_norm, _softmax, _stablemax
from ._core import get_isa, get_num_threads, set_isa, set_num_threads, supported_isas
from ._cross_entropy import CrossEntropyStats
from ._dispatch import array_api, get_backend, set_backend
from ._power_norm import PowerNormSaved, PowerNormState

# Any array in, the same kind out: each public array function is its NumPy-first op (the CPU
# path, which the framework adapters call directly) behind the array-API layer, defined here once.
softmax = array_api(_softmax.softmax)
log_softmax = array_api(_softmax.log_softmax)
logsumexp = array_api(_softmax.logsumexp)
softmax_backward = array_api(_softmax.softmax_backward)
log_softmax_backward = array_api(_softmax.log_softmax_backward)
stablemax = array_api(_stablemax.stablemax)
log_stablemax = array_api(_stablemax.log_stablemax)
stablemax_backward = array_api(_stablemax.stablemax_backward)
log_stablemax_backward = array_api(_stablemax.log_stablemax_backward)
cross_entropy = array_api(_cross_entropy.cross_entropy)
cross_entropy_with_grad = array_api(_cross_entropy.cross_entropy_with_grad)
linear_cross_entropy = array_api(_cross_entropy.linear_cross_entropy)
linear_cross_entropy_with_grad = array_api(_cross_entropy.linear_cross_entropy_with_grad)
rms_norm = array_api(_norms.rms_norm)
rms_norm_backward = array_api(_norms.rms_norm_backward)
layer_norm = array_api(_norms.layer_norm)
layer_norm_backward = array_api(_norms.layer_norm_backward)
crms_norm = array_api(_norms.crms_norm)
crms_norm_backward = array_api(_norms.crms_norm_backward)
power_norm = array_api(_power_norm.power_norm)
power_norm_backward = array_api(_power_norm.power_norm_backward)

__version__ = "0.1.0"

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
    "log_stablemax",
    "log_stablemax_backward",
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
    "stablemax",
    "stablemax_backward",
    "supported_isas",
]
