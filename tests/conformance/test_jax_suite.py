"""JAX's own softmax tests (``tests/nn_test.py``) and logsumexp tests (``tests/lax_scipy_test.py``)
run against ``normax.jax``.

pip's jax ships no test files, so the two files are vendored unmodified from jax-v0.10.2 in
``jax_upstream/`` (see its README). They run in a subprocess (the swap must come before the test
modules import: nn_test's parameterized tests take ``nn.softmax`` at import) with the ``jax_swap``
plugin putting normax.jax's softmax, log_softmax and logsumexp into ``jax.nn`` and
``jax.scipy.special``, under ``jax_numpy_dtype_promotion="strict"`` (JAX's ``JaxTestCase`` sets it
for every test; the environment variable covers module-level code too).

``JAX_NUM_GENERATED_CASES`` (jtu's sample count; JAX's CI leaves its default, 10) is set above the
size of testLogSumExp's product (960 cases) so every case runs: 983 cases collected, 980 run.

Three cases are deselected, each for a reason outside normax's results:

- ``testSoftmaxGradFlag`` checks the residuals of jax.nn.softmax's pre-custom_jvp rule (3 arrays
  with ``jax.softmax_custom_jvp(False)``): normax's softmax is always a custom_jvp (1 residual,
  which the flag's other half and testSoftmaxGradResiduals check and pass).
- ``testLogSumExp81`` (float32, b= with cancellation): normax's result is the correctly rounded
  one (tests/adapters/test_jax_softmax.py checks it on these inputs), SciPy's float32 reference
  is 3e-6 relative off (beyond the test's 1e-6); jax passes only by being as far off as SciPy.
- ``testLogSumExp776`` (int32 a and b whose weighted sum is exactly 0): normax gives -inf, as jax
  itself does; the reference (float64 SciPy) gives log of a rounding residue. It fails on jax too.

The case names follow jtu's sampling of this jax version: a new jax may renumber them (the plugin
then refuses a name it did not collect, or the count below fails, and the list is renewed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import normax

HERE = Path(__file__).resolve().parent
UPSTREAM = HERE / "jax_upstream"
DESELECTED = {
    "testSoftmaxGradFlag": "residuals of jax's pre-custom_jvp rule",
    "testLogSumExp81": "SciPy's float32 reference is off",
    "testLogSumExp776": "fails on jax itself",
}


def test_jax_softmax_and_logsumexp_suites_pass(tmp_path):
    report, swap_report = tmp_path / "report.xml", tmp_path / "swap.json"
    python_dir = Path(normax.__file__).resolve().parent.parent
    env = {
        **os.environ,
        "JAX_NUMPY_DTYPE_PROMOTION": "strict",
        "JAX_NUM_GENERATED_CASES": "1000",
        "NORMAX_JAX_SWAP_REPORT": str(swap_report),
        "NORMAX_JAX_DESELECT": ",".join(DESELECTED),
        "PYTHONPATH": os.pathsep.join([str(python_dir), str(HERE), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [
        sys.executable, "-m", "pytest", "nn_test.py", "lax_scipy_test.py", "-k", "oftmax or LogSumExp",
        "-p", "jax_swap", "-p", "no:cacheprovider", "-q", "--rootdir", str(UPSTREAM),
        "--confcutdir", str(UPSTREAM), "-c", os.devnull, f"--junitxml={report}",
    ]  # fmt: skip
    # check=False: the failures are read from the report, which names them.
    run = subprocess.run(cmd, check=False, cwd=UPSTREAM, env=env, capture_output=True, text=True, timeout=900)
    assert report.exists(), run.stdout[-3000:] + run.stderr[-3000:]

    outcomes: dict[str, list[str]] = {"passed": [], "failed": [], "skipped": []}
    for case in ET.parse(report).getroot().iter("testcase"):
        name = case.get("name")
        if case.find("failure") is not None or case.find("error") is not None:
            outcomes["failed"].append(name)
        elif case.find("skipped") is not None:
            outcomes["skipped"].append(name)
        else:
            outcomes["passed"].append(name)

    assert outcomes["failed"] == [], f"failures: {sorted(outcomes['failed'])}\n" + run.stdout[-6000:]
    ran = outcomes["passed"] + outcomes["skipped"]
    assert len(ran) == 980, len(ran)
    assert not set(DESELECTED) & set(ran)
    # The headline case, and every testLogSumExp case of the product.
    assert "testSoftmaxGrad" in outcomes["passed"]
    assert sum(n.startswith("testLogSumExp") and n[13:].isdigit() for n in outcomes["passed"]) == 958
    # The one skip is JAX's own: that test needs jax_softmax_custom_jvp=True, not the default.
    assert outcomes["skipped"] == ["testSoftmaxGradResiduals"], outcomes["skipped"]

    swap = json.loads(swap_report.read_text(encoding="utf-8"))
    assert swap["in_place"], swap
    assert all(swap["calls"].get(name, 0) > 0 for name in ("softmax", "log_softmax", "logsumexp")), swap
