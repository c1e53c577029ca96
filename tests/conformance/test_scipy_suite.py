"""SciPy's own ``scipy/special/tests/test_logsumexp.py`` (softmax, log_softmax, logsumexp) run
against ``normax.scipy.special`` on the NumPy, array_api_strict and torch backends.

The installed SciPy's test file is run as it is, by pytest in a subprocess (SciPy reads
``SCIPY_ARRAY_API`` at import and its conftest sets torch's default dtype, so it needs a fresh
interpreter), with the ``scipy_swap`` plugin replacing the module's three functions by normax's
in every test. Nothing is copied from SciPy.

Every test passes (SciPy's own xfails and backend skips aside), on every backend: 0 failed.
``test_device[array_api_strict-*]`` included, which asks for the result on array_api_strict's
``Device("device1")``: normax computes such arrays with their own namespace on their device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import normax
import scipy

HERE = Path(__file__).resolve().parent
BACKENDS = ["numpy", "array_api_strict", "torch"]


def test_scipy_logsumexp_suite_passes(tmp_path):
    scipy_dir = Path(scipy.__file__).parent
    test_file = scipy_dir / "special" / "tests" / "test_logsumexp.py"
    assert test_file.exists(), f"SciPy {scipy.__version__} ships no {test_file}"
    report = tmp_path / "report.xml"
    python_dir = Path(normax.__file__).resolve().parent.parent
    env = {
        **os.environ,
        "SCIPY_ARRAY_API": json.dumps(BACKENDS),
        "PYTHONPATH": os.pathsep.join([str(python_dir), str(HERE), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [
        sys.executable, "-m", "pytest", str(test_file), "-p", "scipy_swap", "-p", "no:cacheprovider",
        "-q", "--rootdir", str(scipy_dir), "-c", os.devnull, f"--junitxml={report}",
    ]  # fmt: skip
    # check=False: the failures are read from the report, which names them.
    run = subprocess.run(cmd, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert report.exists(), run.stdout[-3000:] + run.stderr[-3000:]

    outcomes: dict[str, list[str]] = {"passed": [], "failed": [], "skipped": [], "xfailed": []}
    for case in ET.parse(report).getroot().iter("testcase"):
        name = case.get("name")
        failure = case.find("failure")
        if failure is None:
            failure = case.find("error")
        skipped = case.find("skipped")
        if failure is not None:
            outcomes["failed"].append(name)
        elif skipped is not None:
            kind = "xfailed" if skipped.get("type") == "pytest.xfail" else "skipped"
            outcomes[kind].append(name)
        else:
            outcomes["passed"].append(name)

    assert outcomes["failed"] == [], f"failures: {sorted(outcomes['failed'])}\n" + run.stdout[-6000:]
    # The second device's cases ran and passed.
    assert any(n.startswith("test_device[array_api_strict") for n in outcomes["passed"])
    # Every backend ran, with softmax, log_softmax and logsumexp tests each.
    for backend in BACKENDS:
        ran = [n for n in outcomes["passed"] if f"[{backend}" in n]
        assert len(ran) > 100, (backend, len(ran))
    for name in ("test_softmax", "test_log_softmax", "test_logsumexp"):
        assert any(n.startswith(name) for n in outcomes["passed"]), name
    # SciPy's own xfails (array_api_strict's int->float promotion), nothing else missing.
    assert all("array_api_strict" in n for n in outcomes["xfailed"]), outcomes["xfailed"]
    assert len(outcomes["passed"]) > 1000, len(outcomes["passed"])
