"""The peers' own test data: torch's OpInfo/ModuleInfo databases and SciPy's test_logsumexp.py.

torch's ``torch.testing._internal`` imports ``expecttest`` (a test-only dependency of torch's own
suite, in pyproject's ``[test]`` extra) for one base class of its TestCase; the databases used
here never call it, so where it is missing a stand-in module lets them import.
"""

from __future__ import annotations

import sys
import types
import unittest

try:
    import expecttest  # noqa: F401
except ImportError:  # pragma: no cover - depends on the environment
    _stub = types.ModuleType("expecttest")
    _stub.TestCase = unittest.TestCase
    sys.modules["expecttest"] = _stub


import pytest
import torch

# JAX's own test files, run only through test_jax_suite.py (with normax's functions swapped in).
collect_ignore = ["jax_upstream"]


@pytest.fixture(autouse=True, scope="package")
def _one_torch_thread():
    """The samples are tiny: torch's intra-op threads only contend (10x slower on 2 busy cores)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
