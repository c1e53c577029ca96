"""Shared fixtures of the normax test suite (the ISA loop, the thread count) and the `gpu` marker's
rule. The error measures are in accuracy.py: a plain module, since `from conftest import` finds
whichever conftest pytest imported last.
"""

from __future__ import annotations

import normax
import pytest


def pytest_runtest_setup(item):
    """A `gpu` test (selected with ``-m gpu``; pyproject deselects them by default) errors without a
    CUDA device: a GPU run on a machine without one must not look green."""
    if item.get_closest_marker("gpu") is None:
        return
    import torch

    if not torch.cuda.is_available():
        pytest.fail("no CUDA device visible to torch: the gpu tests need one", pytrace=False)


@pytest.fixture(params=normax.supported_isas())
def isa(request):
    """Runs the test once per SIMD path this CPU supports, restoring the active one afterwards.

    Only the supported paths are parametrized (an unsupported one cannot run here and would have to
    be skipped); which paths ran is visible in the test ids.
    """
    previous = normax.get_isa()
    normax.set_isa(request.param)
    assert normax.get_isa() == request.param
    try:
        yield request.param
    finally:
        normax.set_isa(previous)


@pytest.fixture
def num_threads():
    """Restores the kernels' thread count after a test that changes it."""
    previous = normax.get_num_threads()
    try:
        yield previous
    finally:
        normax.set_num_threads(previous)
