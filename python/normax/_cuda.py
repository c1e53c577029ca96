"""``normax._cuda``: the CUDA backend (normax._backends.cuda) under the name the README and .ci/run
use (``normax._cuda.load_nvrtc()``). The one alias in the package, kept for those callers."""

import sys

from ._backends import cuda

sys.modules[__name__] = cuda
