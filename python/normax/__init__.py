"""normax: fast, accurate softmax, log-sum-exp and normalization ops for NumPy arrays.

The kernels are Rust (SIMD with run-time ISA dispatch, rayon threads); these functions follow
NumPy and SciPy conventions. See the README for the benchmark and the API overview.
"""

from ._core import get_isa, get_num_threads, set_isa, set_num_threads, supported_isas
from ._softmax import log_softmax, log_softmax_backward, logsumexp, softmax, softmax_backward

__version__ = "0.1.0"

__all__ = [
    "get_isa",
    "get_num_threads",
    "log_softmax",
    "log_softmax_backward",
    "logsumexp",
    "set_isa",
    "set_num_threads",
    "softmax",
    "softmax_backward",
    "supported_isas",
]
