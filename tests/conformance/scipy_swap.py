"""A pytest plugin (``-p scipy_swap``) for SciPy's own ``special/tests/test_logsumexp.py``: every
test runs with the module's ``softmax``, ``log_softmax`` and ``logsumexp`` replaced by
``normax.scipy.special``'s, so SciPy's assertions check normax. test_scipy_suite.py runs it."""

from __future__ import annotations

import normax.scipy.special as nss
import pytest

SWAPPED = ("softmax", "log_softmax", "logsumexp")


@pytest.fixture(autouse=True)
def _normax_functions(request, monkeypatch):
    module = request.module
    assert all(hasattr(module, name) for name in SWAPPED), module.__name__
    for name in SWAPPED:
        monkeypatch.setattr(module, name, getattr(nss, name))
    yield
    # The test saw normax's functions (a test that rebinds them would escape the check).
    assert all(getattr(module, name) is getattr(nss, name) for name in SWAPPED)
