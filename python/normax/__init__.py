"""normax: fast, accurate softmax, log-sum-exp and normalization ops for NumPy arrays.

The kernels are Rust (SIMD with run-time ISA dispatch, rayon threads); these functions follow
NumPy and SciPy conventions. See the README for the benchmark and the API overview.
"""

from ._core import get_isa, get_num_threads, set_isa, set_num_threads, supported_isas
from ._cross_entropy import (
    cross_entropy,
    cross_entropy_with_grad,
    linear_cross_entropy,
    linear_cross_entropy_with_grad,
)
from ._norms import (
    PowerNormSaved,
    PowerNormState,
    crms_norm,
    crms_norm_backward,
    layer_norm,
    layer_norm_backward,
    power_norm,
    power_norm_backward,
    rms_norm,
    rms_norm_backward,
)
from ._softmax import log_softmax, log_softmax_backward, logsumexp, softmax, softmax_backward

__version__ = "0.1.0"

__all__ = [
    "PowerNormSaved",
    "PowerNormState",
    "crms_norm",
    "crms_norm_backward",
    "cross_entropy",
    "cross_entropy_with_grad",
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
    "set_isa",
    "set_num_threads",
    "softmax",
    "softmax_backward",
    "supported_isas",
]
