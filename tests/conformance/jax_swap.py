"""A pytest plugin (``-p jax_swap``) for JAX's own ``tests/nn_test.py`` and
``tests/lax_scipy_test.py`` (vendored in ``jax_upstream/``): ``jax.nn.softmax``, ``log_softmax``,
``logsumexp`` and ``jax.scipy.special.logsumexp`` are normax.jax's functions for the whole run,
so JAX's assertions check normax. test_jax_suite.py runs it.

The swap happens when the plugin loads, before collection: nn_test's parameterized tests take
``nn.softmax`` at import. Each swapped function counts its calls; with ``NORMAX_JAX_SWAP_REPORT``
set, the session's end writes the counts there, and whether the swap was still in place, as JSON.
``NORMAX_JAX_DESELECT`` (test names, comma-separated) deselects those exact tests: pytest's
``--deselect`` takes node-id prefixes, so ``testLogSumExp81`` would take ``testLogSumExp810`` too.
"""

from __future__ import annotations

import collections
import functools
import json
import os

import jax
import jax.nn
import jax.scipy.special
import normax.jax as nj
import pytest

CALLS: collections.Counter[str] = collections.Counter()


def _counted(name):
    fn = getattr(nj, name)

    @functools.wraps(fn)
    def swapped(*args, **kwargs):
        CALLS[name] += 1
        return fn(*args, **kwargs)

    return swapped


SWAPPED = {name: _counted(name) for name in ("softmax", "log_softmax", "logsumexp")}
MODULES = {jax.nn: ("softmax", "log_softmax", "logsumexp"), jax.scipy.special: ("logsumexp",)}
for _module, _names in MODULES.items():
    for _name in _names:
        setattr(_module, _name, SWAPPED[_name])


def pytest_collection_modifyitems(config, items):
    names = {n for n in os.environ.get("NORMAX_JAX_DESELECT", "").split(",") if n}
    if not names:
        return
    missing = names - {item.name for item in items}
    if missing:  # a stale list would deselect nothing and hide it
        raise pytest.UsageError(f"NORMAX_JAX_DESELECT names no collected test: {sorted(missing)}")
    config.hook.pytest_deselected(items=[item for item in items if item.name in names])
    items[:] = [item for item in items if item.name not in names]


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("NORMAX_JAX_SWAP_REPORT")
    if not path:
        return
    in_place = all(getattr(m, n) is SWAPPED[n] for m, names in MODULES.items() for n in names)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"calls": dict(CALLS), "in_place": in_place}, f)
