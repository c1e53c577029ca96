"""SciPy drop-ins: ``import normax.scipy.special as special`` in place of ``scipy.special``.

Only :mod:`normax.scipy.special` lives here (``softmax``, ``log_softmax``, ``logsumexp`` with
SciPy's names, positional order and defaults). This package does not import SciPy: inside it,
``import scipy`` still means the real SciPy.
"""

from __future__ import annotations

from . import special

__all__ = ["special"]
